"""The warm path: ``query-log`` in, versioned PolicyUpdates out on ``policy``.

:class:`OnlineLearner` reads SearchEvents through the log port (a consumer group, so a
restarted learner goes on where it committed), keeps per index the replay log the offline
side uses (:class:`~streams.policy.simulator.ReplayLog`: one hit flag per search, the
logged decision of each miss), joins decisions with their outcomes
(:class:`~streams.policy.join.OutcomeJoin`), trains the Vowpal Wabbit bandit
(:class:`~streams.policy.learned.PolicyLearner`) and, once ``update_every`` new decisions
of an index are trained, publishes its table as a PolicyUpdate: ``version`` = newest on the
topic + 1, ``parent_version`` = that newest, the guardrails, the VW weights as ``model``.

A step (:meth:`OnlineLearner.step`), in order:

1. Poll up to ``max_events`` events; decode; append each to its index's window.
2. Per index with new events: account them (rent, cost scale, turnover), join, train.
3. Publish an update for every index with ``update_every`` newly trained decisions
   (durable on return).
4. Commit the group's offsets. A crash between 3 and 4 re-trains those events on top of
   the published model (counted twice), never loses them.

Start: the newest update of every index is read from the compacted ``policy`` topic; its
``model`` warm-starts that index's learner and its version is the parent of the next.
Memory: an index's window holds at most ``max_window`` searches; then the pending
decisions are resolved (as at the end of a log) and a new window starts.

Learned eviction (``cache_eviction: learned``, :mod:`streams.cache.learned_eviction`): per
index an :class:`~streams.policy.eviction.ExpertSelector` replays every search through
its shadow caches, one per candidate table, as the simulator's ``learned`` row does
(:func:`~streams.policy.eviction.replay_learned_eviction`), with only the candidates a
node can apply (:data:`NODE_EVICTION`: density and decayed counts at the node's tau of
300 s, and the ``rate`` tables, which rank by the total count). Its periods end where the
simulator's do (:func:`~streams.policy.eviction.period_ends`: every ``update_every``
searches of the :class:`EvictionConfig`, and at ``warmup`` before the first: learn only,
no pick), counted in searches, not at publishes: the VW side's publishing pace (trained
decisions) must not change the selection. A window reset (and a flush) ends a period
too, before its searches are dropped. The density learner in the selector learns from
its own shadow's evictions, not from the node's removal events (those go to the join
only). Once the selector has replayed ``eviction_min_requests`` searches every published
version carries in ``eviction_table`` its newest pick; before its first pick, the newest
version's table carried forward over a restart, else the rule the simulator starts on
(decayed counts at ``start_tau_s``). Before ``eviction_min_requests``, the carried table
or none.

Removal events (a SearchEvent with ``removal`` set: an admitted entry left the cache, and
why) replace the join's estimates where present (:class:`EventJoin`): the admission that
stored the entry ends when it really left, and the characteristic time the hindsight
outcomes use is the measured idle time of evicted entries instead of Che's estimate.

Feedback (``feedback``, read in the same group): a ``wrong`` or ``stale`` on a search the
cache answered counts against the decision that admitted the entry: the proxy cost of that
hit is taken back from the decision's observed saving, plus ``wrong_penalty`` x that cost
(so the bandit's cost of the arm rises). ``clicked`` confirms the hit (counted, no change).
Feedback names the event (``event_id``) or the query key (the key's latest cache hit). A
resolved decision waits ``feedback_grace_s`` of log time before it is trained, so feedback
given shortly after a hit still reaches it; later feedback is counted as ``late``.

The ``policy`` topic keeps every version a node may roll back to: each PolicyUpdate is keyed
``tenant/index/v<version>`` (compaction keeps them all) and publishing version N deletes
(tombstones) version ``N - keep`` (``keep`` = 16, the holder's history), so a node that
restarts after compaction still has the versions to roll back to.

:class:`PolicyFeed` is the query node's side: :meth:`PolicyFeed.load` reads the compacted
topic to its end into a :class:`~streams.cache.policy.PolicyHolder` (before serving), and
its thread applies every later update as it is appended, without a restart.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from streams.log.port import Log, LogPosition, Record, StoredRecord
from streams.policy.eviction import EvictionConfig, EvictionTable, ExpertSelector
from streams.policy.join import JoinedDecision, Outcome, OutcomeJoin, _Pending
from streams.policy.learned import ACTIONS, LearnerConfig, PolicyLearner, PolicyTable
from streams.policy.simulator import Decision, LoggedDecision, ReplayLog
from streams.policy.trace import Request
from streams.schemas import catalog
from streams.schemas.codec import AvroCodec
from streams.topics import Topics

if TYPE_CHECKING:
    from streams.cache.policy import GuardConfig, PolicyHolder
    from streams.cache.result_cache import ResultCache
    from streams.service.vector_service import VectorService

__all__ = [
    "DEFAULT_GUARDRAILS",
    "KEEP_VERSIONS",
    "LEARNER_GROUP",
    "NODE_EVICTION",
    "EventJoin",
    "OnlineLearner",
    "PolicyFeed",
    "PolicyLoop",
    "newest_policies",
    "policy_record",
    "policy_status",
    "publish_policy",
    "read_policies",
    "rollback_policy",
    "rollback_record",
]

log = logging.getLogger(__name__)

LEARNER_GROUP = "streamvec-policy-learner"
DEFAULT_GUARDRAILS: Mapping[str, float] = {
    "max_staleness_ms": 300_000,
    "p99_budget_ms": 0.0,
    "min_hit_rate": 0.0,
    "canary_share": 1.0,
}
KEEP_VERSIONS = 16  # versions of an index the policy topic keeps (GuardConfig.history)
NODE_TAU_S = 300.0  # the count tau a node's learned eviction keeps (learned_eviction.DEFAULT_TAU_S)
# the selector's candidates a node can apply: density and decayed counts at its tau, rate
# (the EvictionConfig defaults, spelled out: the simulator's ``learned`` row runs the same)
NODE_EVICTION = EvictionConfig(
    taus_s=(NODE_TAU_S,), density_taus_s=(NODE_TAU_S,), start_tau_s=NODE_TAU_S
)
_TTLS = tuple(t for _, t in ACTIONS)
_ARM = {name: (i, ttl) for i, (name, ttl) in enumerate(ACTIONS)}


def _ms(value: Any) -> int:
    """A timestamp-millis field as decoded (fastavro gives an aware datetime)."""
    return int(value.timestamp() * 1000) if isinstance(value, datetime) else int(value)


# -- the policy topic ----------------------------------------------------------------------


def policy_record(
    table: PolicyTable,
    tenant: str,
    index: str,
    *,
    version: int,
    parent_version: int | None,
    guardrails: Mapping[str, float] | None = None,
    reason: str = "trained",
    with_model: bool = True,
    eviction_table: str | None = None,
) -> dict[str, Any]:
    """The PolicyUpdate record of ``table``: each bucket's greedy arm with the probability
    the hot path gives it (1 - epsilon + epsilon / arms, the rest spread evenly);
    ``eviction_table``: the learned eviction's JSON (module docstring), or None."""
    n = len(ACTIONS)
    p = 1.0 - table.epsilon + table.epsilon / n
    rules = []
    for b, a in sorted(table.entries.items()):
        ttl = ACTIONS[a][1]
        rules.append(
            {
                "bucket": b,
                "admit": ttl is not None,
                "ttl_ms": 0 if ttl is None else int(ttl * 1000),
                "probability": p,
            }
        )
    g = {**DEFAULT_GUARDRAILS, **(guardrails or {})}
    return {
        "tenant": tenant,
        "index": index,
        "version": version,
        "kind": "table",
        "table": rules,
        "model": table.model if with_model and table.model else None,
        "model_format": "vowpal-wabbit" if with_model and table.model else None,
        "guardrails": {
            "max_staleness_ms": int(g["max_staleness_ms"]),
            "p99_budget_ms": float(g["p99_budget_ms"]),
            "min_hit_rate": float(g["min_hit_rate"]),
            "canary_share": float(g["canary_share"]),
        },
        "parent_version": parent_version,
        "reason": reason,
        "eviction_table": eviction_table,
        "created_ms": int(time.time() * 1000),
    }


def policy_key(tenant: str, index: str, version: int) -> str:
    """The ``policy`` topic's key of one version: one key per version, so compaction keeps
    every version a node may roll back to (module docstring)."""
    return f"{tenant}/{index}/v{version}"


def publish_policy(
    log: Log,
    topics: Topics,
    codec: AvroCodec,
    record: Mapping[str, Any],
    *,
    keep: int = KEEP_VERSIONS,
) -> LogPosition:
    """Append a PolicyUpdate keyed ``tenant/index/v<version>`` and, in the same batch, a
    tombstone for version ``version - keep``; returns the update's position once durable."""
    subject = catalog.subject_for(topics.policy)
    schema = catalog.load_schema(catalog.TOPIC_VALUE_SCHEMA["policy"])
    value = codec.encode(subject, schema, dict(record))
    tenant, index, version = record["tenant"], record["index"], int(record["version"])
    records = [Record.of(topics.policy, policy_key(tenant, index, version), value)]
    if keep >= 1 and version - keep >= 1:
        records.append(Record.of(topics.policy, policy_key(tenant, index, version - keep), None))
    return log.append_batch(records)[0]


def _decode_all(codec: AvroCodec, records: Iterable[StoredRecord]) -> list[dict[str, Any]]:
    out = []
    for r in records:
        if r.value is None:
            continue
        _, rec = codec.decode(r.value)
        rec["created_ms"] = _ms(rec["created_ms"])
        out.append(rec)
    return out


def read_policies(log: Log, topics: Topics, codec: AvroCodec) -> list[dict[str, Any]]:
    """Every PolicyUpdate still on the topic, in log order (compaction keeps at least the
    newest per key)."""
    out: list[dict[str, Any]] = []
    topic = topics.policy
    for partition, end in sorted(log.end_offsets(topic).items()):
        offset = log.start_offsets(topic).get(partition, 0)
        while offset < end:
            batch = log.read(topic, partition, offset, 500)
            if not batch:
                break
            out.extend(_decode_all(codec, batch))
            offset = batch[-1].offset + 1
    return out


def newest_policies(records: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """The highest version per ``tenant/index``."""
    newest: dict[str, Mapping[str, Any]] = {}
    for rec in records:
        key = f"{rec['tenant']}/{rec['index']}"
        if key not in newest or rec["version"] > newest[key]["version"]:
            newest[key] = rec
    return newest


def rollback_record(
    records: Iterable[Mapping[str, Any]], tenant: str, index: str, version: int
) -> dict[str, Any]:
    """The PolicyUpdate that rolls ``tenant/index`` back to ``version``: its content under
    the next version number, ``parent_version`` = ``version``. Raises
    :class:`~streams.index.exceptions.NotFound` when ``version`` is no longer on the topic
    (compaction keeps only the newest per key once the cleaner has run)."""
    from streams.index.exceptions import NotFound

    mine = [r for r in records if r["tenant"] == tenant and r["index"] == index]
    source = next((r for r in mine if r["version"] == version), None)
    if source is None:
        kept = sorted(r["version"] for r in mine)
        raise NotFound(f"policy {tenant}/{index} has no version {version} (kept: {kept})")
    record = dict(source)
    record.update(
        version=max(r["version"] for r in mine) + 1,
        parent_version=version,
        reason=f"rollback to {version}",
        created_ms=int(time.time() * 1000),
    )
    return record


class PolicyFeed:
    """The ``policy`` topic into a holder: :meth:`load` to the end, then follow."""

    def __init__(self, log: Log, topics: Topics, codec: AvroCodec, holder: PolicyHolder) -> None:
        self.log, self.topics, self.codec, self.holder = log, topics, codec, holder
        self._sub = log.subscribe([topics.policy], None, from_start=True)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.applied = 0
        self.rejected = 0

    def _apply(self, records: list[StoredRecord]) -> None:
        for rec in _decode_all(self.codec, records):
            try:
                self.applied += self.holder.apply(rec)
            except (KeyError, ValueError):  # a malformed update: keep the version in force
                self.rejected += 1
                log.warning(
                    "policy update %s/%s v%s rejected",
                    rec.get("tenant"),
                    rec.get("index"),
                    rec.get("version"),
                    exc_info=True,
                )

    def load(self) -> int:
        """Apply everything up to the topic's end at call time; returns how many applied."""
        ends = {
            (self.topics.policy, p): e for p, e in self.log.end_offsets(self.topics.policy).items()
        }
        while any(self._sub.positions().get(tp, 0) < e for tp, e in ends.items()):
            batch = self._sub.poll(500, 0.1)
            if not batch:
                break
            self._apply(batch)
        return self.applied

    def start(self) -> PolicyFeed:
        self._thread = threading.Thread(target=self._run, name="policy-feed", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._sub.poll(500, 0.2)
            if batch:
                self._apply(batch)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        self._sub.close()


# -- the learner ---------------------------------------------------------------------------


class EventJoin(OutcomeJoin):
    """:class:`OutcomeJoin` with the cache's removal events (module docstring).

    :meth:`removed` is called in log order, ``before`` = the number of searches logged
    before the removal event; :meth:`advance` applies each removal once the join has
    consumed those searches. A removal matches the pending admitted decision of its key
    whose search was stored at ``stored_s`` (the decision's event follows its put by at
    most ``match_s``); that decision's entry is then gone at the removal's time (or, when
    it expired, at its last hit + TTL). Evicted entries' idle times (removal - last hit)
    give :attr:`measured_char_time_s` once ``min_samples`` are in."""

    def __init__(
        self,
        ttls: Sequence[float | None],
        *,
        match_s: float = 1.0,
        min_samples: int = 20,
        samples: int = 1000,
    ) -> None:
        super().__init__(ttls)
        self.match_s = match_s
        self.min_samples = min_samples
        self._removals: deque[tuple[int, str, float, float, str]] = deque()
        self._exact: set[int] = set()  # decisions whose end a removal event gave
        # removals logged before their decision's search event (an entry evicted by its
        # own put): kept until that event is joined, or the horizon has passed
        self._orphans: dict[str, list[tuple[float, float, str]]] = {}
        self._resolved: dict[str, deque[float]] = {}  # key -> its resolved admissions' t0
        self._requests: Sequence[Request] | None = None
        self.late = 0  # removals whose decision had been resolved before they came
        self._idle: deque[float] = deque(maxlen=samples)
        self.matched = 0
        self.unmatched = 0

    def removed(self, before: int, key: str, t: float, stored_s: float, reason: str) -> None:
        self._removals.append((before, key, t, stored_s, reason))

    @property
    def measured_char_time_s(self) -> float | None:
        """Median idle time before eviction of matched evicted entries (None: too few)."""
        if len(self._idle) < self.min_samples:
            return None
        return float(statistics.median(self._idle))

    def advance(
        self, requests: Sequence[Request], log: ReplayLog, upto: int
    ) -> list[JoinedDecision]:
        out: list[JoinedDecision] = []
        self._requests = requests
        removals = self._removals
        while removals and removals[0][0] <= upto:
            before, key, t, stored_s, reason = removals.popleft()
            if before > self.consumed:
                out.extend(super().advance(requests, log, before))
                self._adopt(requests[before - 1].time)
            if not self._apply(key, t, stored_s, reason):
                self._orphans.setdefault(key, []).append((t, stored_s, reason))
        out.extend(super().advance(requests, log, upto))
        if upto > 0:
            self._adopt(requests[upto - 1].time)
        return out

    def _adopt(self, now: float) -> None:
        """Join orphaned removals with decisions whose events have arrived since; those
        still alone ``match_s`` after they left are counted as unmatched."""
        for key in list(self._orphans):
            left = []
            for o in self._orphans[key]:
                if self._apply(key, *o):
                    continue
                if now - o[0] <= self.match_s:
                    left.append(o)
                else:
                    self.unmatched += 1
            if left:
                self._orphans[key] = left
            else:
                del self._orphans[key]

    def _apply(self, key: str, t: float, stored_s: float, reason: str) -> bool:
        """Join one removal with its decision: the first admission of ``key`` logged at
        or after the entry was stored (timestamps are milliseconds: 1 ms of slack). True
        when joined, or when that decision was already resolved (counted ``late``)."""
        best: _Pending | None = None
        for p in self._pending.get(key, ()):
            near = stored_s - 1e-3 <= p.t0 <= stored_s + self.match_s
            if p.admitted and near and (best is None or p.t0 < best.t0):
                best = p
        if best is None:
            if any(
                stored_s - 1e-3 <= t0 <= stored_s + self.match_s
                for t0 in self._resolved.get(key, ())
            ):
                self.late += 1  # resolved after max_events: its outcome is already out
                return True
            return False
        self.matched += 1
        best.live = False
        last = best.since  # a parked admission's entry was stored at its repeat
        for te, _, hit in best.events:  # its last hit before it left
            if hit and te <= t:
                last = te
        if reason == "expired" and best.ttl is not None:
            best.end = min(t, last + best.ttl)
        else:
            best.end = t
        if reason == "evicted":
            self._idle.append(max(t - last, 0.0))
        self._exact.add(best.index)
        return True

    def orphans_unmatched(self) -> None:
        """The end of a window: removals still waiting for their decision never get one."""
        self.unmatched += sum(map(len, self._orphans.values()))
        self._orphans.clear()

    def _resolve(self, p: _Pending) -> JoinedDecision:
        if p.admitted and self._requests is not None:
            seen = self._resolved.setdefault(self._requests[p.index].key, deque(maxlen=4))
            seen.append(p.t0)
        return super()._resolve(p)

    def _held(self, p: _Pending) -> float:
        if p.index in self._exact and p.end is not None:
            self._exact.discard(p.index)
            return max(p.end - p.since, 0.0)
        return super()._held(p)


@dataclass(slots=True)
class _Window:
    """One index's searches since its window started, as the offline replay log, with
    what the feedback join needs: which admission served each cache hit."""

    requests: list[Request] = field(default_factory=list)
    replay: ReplayLog = field(default_factory=ReplayLog)
    join: EventJoin = field(default_factory=lambda: EventJoin(_TTLS))
    accounted: int = 0  # requests already given to observe_log / the join
    owner: dict[str, int] = field(default_factory=dict)  # key -> its live admission
    served: OrderedDict[str, tuple[int, float]] = field(default_factory=OrderedDict)
    last_hit: dict[str, tuple[int, float]] = field(default_factory=dict)
    penalty: dict[int, float] = field(default_factory=dict)  # decision -> cost taken back
    confirmed: dict[int, int] = field(default_factory=dict)  # decision -> clicks
    ready: deque[tuple[float, JoinedDecision]] = field(default_factory=deque)
    trained: set[int] = field(default_factory=set)  # decisions already learned


@dataclass(slots=True)
class _IndexState:
    learner: PolicyLearner
    version: int  # newest published (0: none)
    window: _Window = field(default_factory=_Window)
    trained_at_publish: int = 0
    # the learned eviction (module docstring)
    selector: ExpertSelector | None = None
    eviction_seen: int = 0  # searches the selector has replayed (every window)
    eviction_from: int = 0  # the window's first search not yet in a closed period
    eviction_next: int = 0  # eviction_seen at which the next period may close
    eviction_periods: int = 0  # periods closed
    eviction_pick: EvictionTable | None = None  # the selector's newest pick
    eviction_table: str | None = None  # the newest published (carried forward)


class OnlineLearner:
    """The policy learner (module docstring). ``budget_bytes``: the query nodes' cache
    budget (the rent, and the shadow caches' budget); ``guardrails``: those published
    with every version; ``eviction_config``: the expert selection's (default
    :data:`NODE_EVICTION`; ``ValueError`` when a candidate is keyed by a count tau other
    than the node's, a table the node would refuse); ``eviction_tables`` False: no expert
    selection at all (its shadow caches are most of the learner's time), each version
    carrying the eviction table of the one before, for nodes that do not evict by it
    (``cache_eviction`` other than ``learned``)."""

    def __init__(
        self,
        log: Log,
        topics: Topics,
        codec: AvroCodec,
        *,
        budget_bytes: int,
        group: str = LEARNER_GROUP,
        update_every: int = 500,
        max_window: int = 200_000,
        config: LearnerConfig | None = None,
        guardrails: Mapping[str, float] | None = None,
        feedback_grace_s: float = 10.0,
        wrong_penalty: float = 1.0,
        max_served: int = 100_000,
        eviction_config: EvictionConfig | None = None,
        eviction_min_requests: int = 1_000,
        eviction_tables: bool = True,
    ) -> None:
        self.log, self.topics, self.codec = log, topics, codec
        cfg = eviction_config or NODE_EVICTION
        odd = {*cfg.taus_s, *cfg.density_taus_s, cfg.start_tau_s} - {NODE_TAU_S}
        if odd:
            raise ValueError(
                f"eviction_config: a node keeps key counts at tau {NODE_TAU_S:g} s only; "
                f"candidates at {sorted(odd)} s would be refused (taus_s, density_taus_s, "
                "start_tau_s)"
            )
        self.eviction_config = cfg
        self.eviction_min_requests = eviction_min_requests
        self.eviction_tables = eviction_tables
        self.budget_bytes = budget_bytes
        self.feedback_grace_s = feedback_grace_s
        self.wrong_penalty = wrong_penalty
        self.max_served = max_served
        self.group = group
        self.update_every = update_every
        self.max_window = max_window
        self.config = config or LearnerConfig()
        self.guardrails = dict(guardrails or {})
        self._indexes: dict[str, _IndexState] = {}
        self._newest = newest_policies(read_policies(log, topics, codec))
        self._sub = log.subscribe([topics.query_log, topics.feedback], group, from_start=True)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.events = 0
        self.decisions = 0
        self.published: list[dict[str, Any]] = []
        self.error: Exception | None = None
        self.busy_s = 0.0  # time spent in steps that read events (throughput)
        self.cpu_s = 0.0  # CPU time of the learner thread's steps (``start``)
        self.paused_s = 0.0  # pauses the thread's CPU share asked for (``start``)
        self.removals = 0
        # removal events of windows already closed: joined, late, never joined
        self._removal_counts = {"matched": 0, "late": 0, "unmatched": 0}
        self.feedback = dict.fromkeys(
            ("clicked", "wrong", "stale", "other", "unmatched", "late"), 0
        )
        self._waiting: OrderedDict[str, dict[str, Any]] = OrderedDict()  # event_id -> fb

    def _state(self, key: str) -> _IndexState:
        st = self._indexes.get(key)
        if st is None:
            newest = self._newest.get(key)
            model = newest.get("model") if newest else None
            if model and newest is not None and newest.get("model_format") == "vowpal-wabbit":
                learner = PolicyLearner.from_model(self.budget_bytes, model, self.config)
            else:
                learner = PolicyLearner(self.budget_bytes, self.config)
            version = int(newest["version"]) if newest else 0
            learner.version = version
            st = self._indexes[key] = _IndexState(learner, version)
            cfg = self.eviction_config
            st.selector = ExpertSelector(self.budget_bytes, cfg) if self.eviction_tables else None
            st.eviction_next = cfg.warmup if cfg.warmup < cfg.update_every else cfg.update_every
            st.eviction_table = newest.get("eviction_table") if newest else None
        return st

    def _add(self, ev: Mapping[str, Any]) -> None:
        st = self._state(f"{ev['tenant']}/{ev['index']}")
        w = st.window
        key = ev["query_key"]
        removal = ev.get("removal")
        if removal is not None:  # an admitted entry left the cache: not a search
            self.removals += 1
            w.join.removed(
                len(w.requests),
                key,
                _ms(ev["timestamp"]) / 1000,
                _ms(removal["stored_ms"]) / 1000,
                str(removal["reason"]),
            )
            w.owner.pop(key, None)
            return
        features = ev.get("features") or {}
        size = max(1, int(features.get("size", 1)))
        cost = float(ev["proxy_cost"])
        w.requests.append(Request(_ms(ev["timestamp"]) / 1000, key, size, cost))
        w.replay.hits.append(1 if ev["cache_hit"] else 0)
        here = len(w.requests) - 1
        if ev["cache_hit"]:
            self._served(w, ev, key, cost)
        arm = _ARM.get(ev["action"])
        if not ev["cache_hit"]:
            if arm is not None and arm[1] is not None and ev.get("bucket"):
                w.owner[key] = here  # this admission serves the key's next hits
            else:
                w.owner.pop(key, None)
        if not ev["cache_hit"] and arm is not None and ev.get("bucket"):
            ttl = arm[1]
            w.replay.decisions.append(
                LoggedDecision(
                    len(w.requests) - 1,
                    Decision(
                        ev["action"],
                        ttl is not None,
                        ttl,
                        float(ev["action_probability"]),
                        ev["bucket"],
                    ),
                )
            )
            self.decisions += 1
            if features.get("parked"):  # a lazy offer: the join settles it at its repeat
                w.join.parked.add(here)

    # -- feedback ---------------------------------------------------------------------------

    def _served(self, w: _Window, ev: Mapping[str, Any], key: str, cost: float) -> None:
        """A cache hit: remember which admission served it, for feedback on it."""
        owner = w.owner.get(key)
        if owner is None:
            return
        w.last_hit[key] = w.served[ev["event_id"]] = (owner, cost)
        if len(w.served) > self.max_served:
            w.served.popitem(last=False)
        early = self._waiting.pop(ev["event_id"], None)
        if early is not None:  # its feedback was read first (another topic)
            self._feedback(early)

    def _feedback(self, fb: Mapping[str, Any]) -> None:
        """Join one Feedback record with the admission that served the hit it names."""
        kind = str(fb.get("kind") or "other")
        key = f"{fb['tenant']}/{fb['index']}"
        st = self._indexes.get(key)
        w = st.window if st is not None else None
        found = None
        if w is not None and fb.get("event_id"):
            found = w.served.get(fb["event_id"])
        if w is not None and found is None and fb.get("query_key"):
            found = w.last_hit.get(fb["query_key"])
        if found is None or w is None:
            if fb.get("event_id") and fb["event_id"] not in self._waiting:
                self._waiting[fb["event_id"]] = dict(fb)  # its event may come later
                while len(self._waiting) > 10_000:
                    self._waiting.popitem(last=False)
            else:
                self.feedback["unmatched"] += 1
            return
        decision, cost = found
        if decision in w.trained:
            self.feedback["late"] += 1
            return
        self.feedback[kind if kind in self.feedback else "other"] += 1
        if kind in ("wrong", "stale"):
            w.penalty[decision] = w.penalty.get(decision, 0.0) + (1 + self.wrong_penalty) * cost
        elif kind == "clicked":
            w.confirmed[decision] = w.confirmed.get(decision, 0) + 1

    def _penalised(self, w: _Window, joined: Iterable[JoinedDecision]) -> list[JoinedDecision]:
        out = []
        for j in joined:
            pen = w.penalty.pop(j.index, 0.0)
            w.confirmed.pop(j.index, None)
            if pen:
                o = j.outcomes[j.action]
                outcomes = list(j.outcomes)
                outcomes[j.action] = Outcome(o.saved - pen, o.held_s, o.observed)
                j = replace(j, outcomes=tuple(outcomes))
            w.trained.add(j.index)
            out.append(j)
        return out

    def _release(self, w: _Window, now: float) -> list[JoinedDecision]:
        """Resolved decisions whose feedback grace has passed at log time ``now``."""
        out = []
        while w.ready and w.ready[0][0] <= now:
            out.append(w.ready.popleft()[1])
        return self._penalised(w, out)

    def _train(self, st: _IndexState, *, flush: bool = False) -> None:
        w, learner = st.window, st.learner
        stop = len(w.requests)
        if stop > w.accounted:
            self._eviction_replay(st, stop)
            learner.observe_log(w.requests, w.replay, w.accounted, stop)
            measured = w.join.measured_char_time_s
            w.join.char_time_s = learner.char_time_s if measured is None else measured
            now = w.requests[stop - 1].time
            for j in w.join.advance(w.requests, w.replay, stop):
                w.ready.append((now + self.feedback_grace_s, j))
            w.accounted = stop
            learner.learn(self._release(w, now))
        if flush or stop >= self.max_window:
            self._eviction_period(st)  # before the window's searches go
            w.join.orphans_unmatched()
            for name in self._removal_counts:
                self._removal_counts[name] += getattr(w.join, name)
            for j in w.join.flush():
                w.ready.append((math.inf, j))
            learner.learn(self._release(w, math.inf))
            learner.new_log()
            st.window = _Window()
            st.eviction_from = 0

    def _publish(self, key: str, st: _IndexState, reason: str = "trained") -> dict[str, Any]:
        tenant, _, index = key.partition("/")
        table = st.learner.export(with_model=True)
        record = policy_record(
            table,
            tenant,
            index,
            version=st.version + 1,
            parent_version=st.version or None,
            guardrails=self.guardrails,
            reason=reason,
            eviction_table=self._eviction_table(st),
        )
        publish_policy(self.log, self.topics, self.codec, record)
        st.version = st.learner.version = record["version"]
        st.trained_at_publish = st.learner.trained
        self.published.append(record)
        return record

    def _eviction_replay(self, st: _IndexState, stop: int) -> None:
        """Replay the window's searches up to ``stop`` in the selector, closing a period
        wherever the simulator's ends (module docstring)."""
        selector, requests = st.selector, st.window.requests
        if selector is None:
            return
        i = st.window.accounted
        while i < stop:
            upto = min(stop, i + st.eviction_next - st.eviction_seen)
            for j in range(i, upto):
                selector.access(j, requests[j])
            st.eviction_seen += upto - i
            i = upto
            if st.eviction_seen >= st.eviction_next:
                self._eviction_period(st, upto)

    def _eviction_period(self, st: _IndexState, stop: int | None = None) -> None:
        """Close the selector's period: the window's searches from the last end to
        ``stop`` (None: every one accounted; a window reset). The first period is the
        warm-up when ``warmup < update_every``: learn only, no pick (module docstring)."""
        selector, w = st.selector, st.window
        start = st.eviction_from
        stop = w.accounted if stop is None else stop
        if selector is None or stop <= start:
            return
        cfg = selector.config
        warmup = st.eviction_periods == 0 and cfg.warmup < cfg.update_every
        table = selector.update(w.requests, start, stop, select=not warmup)
        for shadow in selector.shadows:  # unread by the selector: bound a long-lived learner
            shadow.log.hits.clear()
            shadow.log.decisions.clear()
        st.eviction_periods += 1
        st.eviction_from = stop
        st.eviction_next = (st.eviction_seen // cfg.update_every + 1) * cfg.update_every
        if table is not None:
            st.eviction_pick = table

    def _eviction_table(self, st: _IndexState) -> str | None:
        """The learned eviction's table for the next version (module docstring)."""
        from streams.cache.learned_eviction import eviction_payload

        if st.selector is None or st.eviction_seen < self.eviction_min_requests:
            return st.eviction_table
        if st.eviction_pick is not None:
            st.eviction_table = eviction_payload(st.eviction_pick)
        elif st.eviction_table is None:  # no pick yet and nothing carried: the rule
            st.eviction_table = eviction_payload(st.selector.start)
        return st.eviction_table

    def step(
        self, max_events: int = 5_000, timeout_s: float = 0.0, *, flush: bool = False
    ) -> list[dict[str, Any]]:
        """One pass of steps 1-4 (module docstring); ``flush``: resolve every pending
        decision first (the end of a log: ``streamvec policy learn`` without
        ``--follow``) and publish any index with new training. Returns what it published."""
        batch = self._sub.poll(max_events, timeout_s)
        t0 = time.perf_counter()
        feedback = []
        for r in batch:
            if r.value is None:
                continue
            if r.topic == self.topics.feedback:
                feedback.append(r)
                continue
            _, ev = self.codec.decode(r.value)
            self._add(ev)
        for r in feedback:  # after the batch's searches: they may be what it names
            if r.value is not None:
                self._feedback(self.codec.decode(r.value)[1])
        self.events += len(batch) - len(feedback)
        published = []
        for key, st in self._indexes.items():
            self._train(st, flush=flush)
            fresh = st.learner.trained - st.trained_at_publish
            if fresh >= self.update_every or (flush and fresh > 0):
                published.append(self._publish(key, st))
        if batch:
            self._sub.commit()
            self.busy_s += time.perf_counter() - t0
        return published

    def caught_up(self) -> bool:
        pos = self._sub.positions()
        return all(
            pos.get((topic, p), 0) >= end
            for topic in (self.topics.query_log, self.topics.feedback)
            for p, end in self.log.end_offsets(topic).items()
        )

    def run_to_end(self) -> list[dict[str, Any]]:
        """Learn everything in the log now, resolve what is pending, publish."""
        out: list[dict[str, Any]] = []
        while not self.caught_up():
            before = self.events
            out.extend(self.step())
            if self.events == before:
                break
        out.extend(self.step(flush=True))
        return out

    def start(
        self, poll_s: float = 0.5, *, cpu_share: float = 1.0, max_events: int = 500
    ) -> OnlineLearner:
        """Learn on a thread until :meth:`close`. ``cpu_share`` (0 to 1]: the share of one
        CPU the thread may take: a step that used ``c`` s of CPU is followed by a pause of
        ``c x (1/share - 1)``, so a learner inside a query node falls behind under load
        (its policy gets older; the guardrails judge its age) instead of taking the GIL
        from searches. ``max_events``: events per step (a pause follows each: about 0.2 s of
        CPU at a time once the shadow caches are full)."""
        if not 0.0 < cpu_share <= 1.0:
            raise ValueError("cpu_share must be in (0, 1]")

        def loop() -> None:
            while not self._stop.is_set():
                c0 = time.thread_time()
                try:
                    self.step(max_events, timeout_s=poll_s)
                except Exception as exc:  # stop learning, keep the node serving
                    self.error = exc  # uncommitted events are re-read by the next learner
                    log.exception("policy learner stopped")
                    return
                cpu = time.thread_time() - c0
                self.cpu_s += cpu
                if cpu_share < 1.0 and cpu > 0.0:
                    pause = cpu * (1.0 / cpu_share - 1.0)
                    self.paused_s += pause
                    self._stop.wait(pause)

        self._thread = threading.Thread(target=loop, name="policy-learner", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self._sub.close()

    def removal_counts(self) -> dict[str, int]:
        """Removal events joined with the decision that admitted their entry (``matched``),
        come after it was resolved (``late``), or that found no decision (``unmatched``)."""
        out = dict(self._removal_counts)
        for st in self._indexes.values():
            for name in out:
                out[name] += getattr(st.window.join, name)
        return out

    def stats(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "decisions": self.decisions,
            "published": len(self.published),
            "error": None if self.error is None else repr(self.error),
            "events_per_s": self.events / self.busy_s if self.busy_s else 0.0,
            "cpu_s": round(self.cpu_s, 3),
            "paused_s": round(self.paused_s, 3),
            "removals": self.removals,
            "removals_joined": self.removal_counts(),
            "feedback": dict(self.feedback),
            "versions": {k: st.version for k, st in sorted(self._indexes.items())},
        }


# -- a query node's part of the loop ---------------------------------------------------------


class PolicyLoop:
    """What a query node runs of the loop: a :class:`PolicyHolder` as its cache's admission
    policy, the query-log emitter, the :class:`PolicyFeed` and (``prefetch``) the
    prefetcher, wired to the service through one
    :class:`~streams.cache.querylog.SearchObserver`; stats in ``VEC.INFO`` under
    ``policy``. :meth:`start` returns once the newest policy of every index is in force."""

    def __init__(
        self,
        log: Log,
        topics: Topics,
        codec: AvroCodec,
        service: VectorService,
        cache: ResultCache,
        *,
        guard: GuardConfig | None = None,
        prefetch: bool = False,
        query_log_capacity: int = 10_000,
    ) -> None:
        from streams.cache.policy import PolicyHolder
        from streams.cache.prefetch import Prefetcher
        from streams.cache.querylog import QueryLogEmitter, SearchObserver

        self.holder = PolicyHolder(cache.budget_bytes, guard=guard)
        cache.policy = self.holder
        if cache.learned is not None:  # cache_eviction: learned ranks by the version's table
            from streams.cache.learned_eviction import HolderTables

            cache.learned.source = HolderTables(self.holder)
        self.emitter = QueryLogEmitter(log, topics, codec, capacity=query_log_capacity)
        self.feed = PolicyFeed(log, topics, codec, self.holder)
        self.prefetcher = Prefetcher(service) if prefetch else None
        self.observer = SearchObserver(self.emitter, self.holder, self.prefetcher, cache=cache)
        cache.add_removal_listener(self.observer.removed)  # removal events in query-log
        service.search_observer = self.observer
        service.info_sections["policy"] = lambda _key: self.observer.stats()

    def start(self) -> PolicyLoop:
        from streams.cache.querylog import register_metrics
        from streams.service.metrics import METRICS

        register_metrics(METRICS.registry)
        self.feed.load()  # the newest version of every index, before the node serves
        self.feed.start()
        self.emitter.start()
        if self.prefetcher is not None:
            self.prefetcher.start()
        return self

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
        self.feed.close()
        self.emitter.close()


# -- the control plane (HTTP) ----------------------------------------------------------------


def _policy_loop_of(dataplane: object) -> tuple[VectorService, PolicyHolder]:
    from streams.index.exceptions import InvalidRequest
    from streams.service.vector_service import VectorService

    observer = getattr(dataplane, "search_observer", None)
    holder = getattr(observer, "holder", None)
    if not isinstance(dataplane, VectorService) or holder is None:
        raise InvalidRequest("this node runs no cache policy loop (policy_enabled)")
    return dataplane, holder


def policy_status(dataplane: object, tenant: str, index: str) -> dict[str, Any]:
    """The cache policy of ``tenant/index`` on a node: the version in force (or why it
    fell back), the versions still on the ``policy`` topic, this index's fallbacks, the
    learned eviction table in force (None: GDSF)."""
    from streams.index.model import check_name

    check_name(tenant, "tenant")
    check_name(index, "index")
    svc, holder = _policy_loop_of(dataplane)
    key = f"{tenant}/{index}"
    status = holder.status()
    records = read_policies(svc.log, svc.topics, svc.codec)
    return {
        "key": key,
        "in_force": status["indexes"].get(key),
        "versions": sorted(
            r["version"] for r in records if r["tenant"] == tenant and r["index"] == index
        ),
        "fallbacks": [f for f in status["fallbacks"] if f["key"] == key],
        "eviction_table": _eviction_status(holder, key, svc),
    }


def _eviction_status(holder: PolicyHolder, key: str, svc: VectorService) -> dict[str, Any] | None:
    """The learned eviction table in force for ``key`` (None: GDSF decides); ``applied``:
    whether this node's cache ranks by it (False: refused, GDSF decides; None: the cache
    does not evict by learned tables)."""
    from streams.cache.learned_eviction import HolderTables

    found = HolderTables(holder).table_for(key)
    if found is None:
        return None
    t = found.table
    cache = getattr(svc.search_observer, "cache", None)
    learned = getattr(cache, "learned", None)
    return {
        "version": t.version,
        "kind": t.kind,
        "tau_s": t.tau_s,
        "by_filter": found.by_filter,
        "applied": None if learned is None else learned.can_apply(t),
    }


def rollback_policy(dataplane: object, tenant: str, index: str, version: int) -> dict[str, Any]:
    """Publish a new version of ``tenant/index``'s policy with ``version``'s content (from
    the topic, else the node's kept history) and put it in force on this node at once;
    every other node applies it from the topic. ``NotFound`` if neither has it."""
    from streams.index.model import check_name

    check_name(tenant, "tenant")
    check_name(index, "index")
    svc, holder = _policy_loop_of(dataplane)
    records = read_policies(svc.log, svc.topics, svc.codec)
    kept = holder.version_of(f"{tenant}/{index}", version)
    if kept is not None and not any(
        r["tenant"] == tenant and r["index"] == index and r["version"] == version for r in records
    ):
        records.append(dict(kept.record))  # compacted away, but this node kept it
    record = rollback_record(records, tenant, index, version)  # NotFound
    pos = publish_policy(svc.log, svc.topics, svc.codec, record)
    holder.apply(record)
    return {
        "key": f"{tenant}/{index}",
        "version": record["version"],
        "parent_version": version,
        "position": pos.token,
    }
