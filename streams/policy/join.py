"""The learner's join: logged decisions with what happened to them afterwards.

This is the join the production policy learner runs over ``query-log`` (ARCHITECTURE §3):
every search event carries its key, time, proxy cost, whether it hit, and on a miss the
decision (action, probability, context bucket). :class:`OutcomeJoin` reads those events in
order, incrementally, and emits one :class:`JoinedDecision` per decision once its outcome is
known:

- **observed** (the action that was taken): for an admission, the hits the entry served
  until it was gone (the next miss on its key, or its idle TTL after its last hit) and how
  long it held its bytes; a bypass observes 0 saved for 0 byte-seconds.
- **hindsight** (the other actions): from the key's later requests in the log, what each
  TTL would have served had the entry been admitted with it: requests while the gaps stay
  under the TTL and the characteristic time (below). Bypass is always known (0).

Eviction. When the log carries eviction events (:attr:`ReplayLog.evictions`, logged by the
simulators that evict), an admitted entry's observed outcome ends at its eviction: the time
it held its bytes is known, not estimated. Otherwise (the production query-log before it had
removal events) the join models eviction with the cache's characteristic time
``char_time_s`` (Che's approximation, set by the learner from the log: budget over admitted
bytes per second): an entry nobody hits for that long is gone. The actions not taken are
hindsight either way: they count the later requests while the gaps stay under
``min(ttl, char_time_s)`` (with eviction events the learner sets ``char_time_s`` to the
median idle age of evicted entries).

A decision is resolved once ``max_events`` later requests of its key have been seen, or the
key has been idle for longer than ``min(largest TTL, char_time_s)``; :meth:`OutcomeJoin.flush`
resolves the rest at the end of a log. Results are deterministic in the log's order.

Parked admissions (the query node's lazy offers, ``streams/cache/controller.py``): a decision
whose index is in :attr:`OutcomeJoin.parked` was admitted but its entry is built and stored
only when its key is searched again. Such a decision does not expire by the idle limit
above while it waits: its key's next event settles it. A hit means the entry was stored at
that event: from then on it is an ordinary admitted entry (its bytes are held from that
time, the hit is credited to it). A miss means it was never stored (dropped from the parked
map, or refused by its late put): no reuse, no bytes. A parked decision whose key is not
searched again within ``parked_cap_s`` (default 10 x the largest TTL; the parked map drops
its oldest entries silently, so this is what resolves those) is resolved the same way: no
reuse, no bytes. The simulators never park, so their joins are unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from streams.policy.simulator import LoggedDecision, ReplayLog
from streams.policy.trace import Request

__all__ = ["JoinedDecision", "Outcome", "OutcomeJoin"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one action earned for one decision: cost saved, bytes held for ``held_s``."""

    saved: float
    held_s: float
    observed: bool  # True: what really happened; False: hindsight from the log


@dataclass(frozen=True, slots=True)
class JoinedDecision:
    """A decision (its bucket, action index, probability) with an outcome per action."""

    index: int
    time: float
    bucket: str
    action: int
    probability: float
    size: int
    outcomes: tuple[Outcome, ...]  # indexed like the action set


@dataclass(slots=True)
class _Pending:
    index: int
    t0: float
    bucket: str
    action: int
    probability: float
    size: int
    ttl: float | None
    admitted: bool
    events: list[tuple[float, float, bool]] = field(default_factory=list)  # (t, cost, hit)
    live: bool = True  # the admitted entry has not been seen gone yet
    parked: bool = False  # a lazy offer not yet settled by its key's next event
    since: float = 0.0  # when the entry began to hold its bytes (t0, or a parked one's repeat)
    saved: float = 0.0
    end: float | None = None  # when the observed entry was gone


class OutcomeJoin:
    """Incremental join over a replay log. ``ttls``: TTL of each action (None = bypass).

    :meth:`advance` consumes requests ``[consumed, upto)``; every call returns the decisions
    resolved by then, each exactly once.
    """

    def __init__(
        self,
        ttls: Sequence[float | None],
        *,
        max_events: int = 8,
        parked_cap_s: float | None = None,
    ) -> None:
        self.ttls = tuple(ttls)
        self.horizon = max(t for t in self.ttls if t is not None)
        # how long a parked admission may wait for its key's next event (module docstring)
        self.parked_cap_s = 10 * self.horizon if parked_cap_s is None else parked_cap_s
        self.parked: set[int] = set()  # request indexes whose admission was parked
        self.max_events = max_events
        self.consumed = 0
        self.char_time_s = math.inf  # how long an unhit entry survives eviction (Che)
        self._next_decision = 0
        self._next_eviction = 0
        self._evictions_logged = False  # the log has eviction events: outcomes end at them
        self._pending: dict[str, list[_Pending]] = {}

    def _action_of(self, d: LoggedDecision) -> int:
        if not d.decision.admitted:
            return self.ttls.index(None)
        return self.ttls.index(d.decision.ttl_s)

    def advance(
        self, requests: Sequence[Request], log: ReplayLog, upto: int
    ) -> list[JoinedDecision]:
        out: list[JoinedDecision] = []
        decisions = log.decisions
        for i in range(self.consumed, upto):
            req = requests[i]
            hit = bool(log.hits[i])
            plist = self._pending.get(req.key)
            if plist:
                keep: list[_Pending] = []
                for p in plist:
                    self._add_event(p, req, hit)
                    if len(p.events) >= self.max_events:
                        out.append(self._resolve(p))
                    else:
                        keep.append(p)
                plist[:] = keep
            while self._next_decision < len(decisions) and decisions[self._next_decision].index < i:
                self._next_decision += 1  # decisions logged before the join started
            if self._next_decision < len(decisions) and decisions[self._next_decision].index == i:
                d = decisions[self._next_decision]
                self._next_decision += 1
                p = _Pending(
                    i,
                    req.time,
                    d.decision.bucket,
                    self._action_of(d),
                    d.decision.probability,
                    req.size,
                    d.decision.ttl_s,
                    d.decision.admitted,
                    parked=d.decision.admitted and i in self.parked,
                    since=req.time,
                )
                self.parked.discard(i)
                self._pending.setdefault(req.key, []).append(p)
            evictions = log.evictions
            while self._next_eviction < len(evictions) and evictions[self._next_eviction][0] <= i:
                _, key, _ = evictions[self._next_eviction]
                self._next_eviction += 1
                self._evictions_logged = True
                for p in self._pending.get(key, ()):
                    if p.admitted and p.live:
                        p.live = False
                        p.end = req.time
        self.consumed = max(self.consumed, upto)
        now = requests[upto - 1].time if upto > 0 else 0.0
        out.extend(self._expire(now))
        return out

    def flush(self) -> list[JoinedDecision]:
        """Resolve everything still pending (end of the log)."""
        return self._expire(math.inf)

    def _add_event(self, p: _Pending, req: Request, hit: bool) -> None:
        last = p.events[-1][0] if p.events else p.t0
        if p.parked:  # its key's next event settles it (module docstring)
            p.parked = False
            p.since = last = req.time  # a hit: stored by this repeat, which it serves
            if not hit:  # never stored: no reuse, no bytes
                p.live = False
                p.end = req.time
        if p.admitted and p.live:
            gone = p.ttl is not None and req.time - last > p.ttl
            if hit and not gone:
                p.saved += req.cost
            else:
                p.live = False
                p.end = min(req.time, last + p.ttl) if p.ttl is not None else req.time
        p.events.append((req.time, req.cost, hit))

    def _expire(self, now: float) -> list[JoinedDecision]:
        out: list[JoinedDecision] = []
        limit = min(self.horizon, self.char_time_s)
        for key in list(self._pending):
            plist = self._pending[key]
            keep = []
            for p in plist:
                last = p.events[-1][0] if p.events else p.t0
                if now - last > (self.parked_cap_s if p.parked else limit):
                    out.append(self._resolve(p))
                else:
                    keep.append(p)
            if keep:
                self._pending[key] = keep
            else:
                del self._pending[key]
        return out

    def _resolve(self, p: _Pending) -> JoinedDecision:
        outcomes: list[Outcome] = []
        for a, ttl in enumerate(self.ttls):
            if a == p.action and p.admitted:
                outcomes.append(Outcome(p.saved, self._held(p), True))
            elif ttl is None:
                outcomes.append(Outcome(0.0, 0.0, a == p.action))
            else:
                outcomes.append(self._hindsight(p, ttl))
        return JoinedDecision(
            p.index, p.t0, p.bucket, p.action, p.probability, p.size, tuple(outcomes)
        )

    def _held(self, p: _Pending) -> float:
        """Seconds the admitted entry held its bytes: until it was seen gone (evicted, or
        missed), but at most its last hit plus the idle TTL; when the log has no eviction
        events, or the entry was not seen gone, at most its last hit plus
        ``min(ttl, char_time_s)`` (eviction takes an entry nobody hits). A parked entry
        holds bytes from its repeat's hit (``since``); one never stored holds none."""
        if p.parked or (p.since > p.t0 and p.end is not None and p.end <= p.since):
            return 0.0
        last = p.since
        for t, _, hit in p.events:
            if not hit or (p.end is not None and t >= p.end):
                break
            last = t
        ttl = p.ttl if p.ttl is not None else math.inf
        if p.end is not None and self._evictions_logged:
            end = min(p.end, last + ttl)
        else:  # not seen gone by the time it was resolved: the estimate
            idle = min(ttl, self.char_time_s)
            end = last + idle if p.end is None else min(p.end, last + idle)
        return max(end - p.since, 0.0) if math.isfinite(end) else 0.0

    def _hindsight(self, p: _Pending, ttl: float) -> Outcome:
        idle = min(ttl, self.char_time_s)  # expiry, or eviction of an entry nobody hits
        saved, last = 0.0, p.t0
        for t, cost, _ in p.events:
            if t - last > idle:
                break
            saved += cost
            last = t
        return Outcome(saved, last + idle - p.t0, False)
