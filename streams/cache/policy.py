"""Admission on the hot path: the rules, the learned table, and the holder that guards them.

Every decision carries the action (``admit``/``reject``), the policy's arm (``bypass``,
``ttl5``, ``ttl30``, ``ttl300``: the action set of :mod:`streams.policy.learned`), the
probability with which the policy took it, the context bucket, the TTL and the eviction
priority, so that the query log records it and a learned policy (a contextual bandit,
ARCHITECTURE §3) can be trained and evaluated offline against it.

- :class:`RulesPolicy` cost-aware rules: admit when the expected saving per second
  (estimated request rate x the search's proxy cost) beats the memory rent of the entry's
  bytes plus a staleness charge (:class:`streams.policy.policies.RuleAdmission`, the rules
  the simulator measures); TTL covers a few expected gaps; priority = rate x cost / size.
- :class:`LearnedTablePolicy` a ``PolicyUpdate``'s table: bucket -> arm with the probability
  of taking it (the rest spread evenly over the other arms: exact propensities for
  off-policy evaluation); the rules answer for buckets the table has not seen.
- :class:`PolicyHolder` what ``ResultCache`` asks (it is an :class:`AdmissionPolicy`): per
  index the newest applied version, swapped atomically on update (no restart), and the
  guardrails that put the rules (or plain LRU) back in charge, recording why: the version
  is older than ``max_age_s``; its decisions' p99 exceeds ``decision_budget_us``; on its
  canary share of tenants (stable hash) the hit rate or search p99 is worse than the rules'
  on the other tenants (a version for every tenant: than the rules' last window before it
  came in force), or breaks the version's own ``min_hit_rate``/``p99_budget_ms``.
  :meth:`PolicyHolder.rollback` restores a named earlier version as a new version.

Domain code: no I/O. Decisions are microseconds (docs/benchmarks.md, "Online policy loop").
"""

from __future__ import annotations

import math
import random
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, Protocol

from streams.policy.context import Context, ContextTracker, bucket
from streams.policy.learned import ACTIONS
from streams.policy.policies import CacheState, RuleAdmission
from streams.policy.trace import Request

if TYPE_CHECKING:
    from streams.cache.entry import CachedResult

__all__ = [
    "ARMS",
    "GLOBAL_KEY",
    "AdmissionAction",
    "AdmissionDecision",
    "AdmissionPolicy",
    "AdmitAll",
    "GuardConfig",
    "LearnedTablePolicy",
    "OnlineContext",
    "PolicyHolder",
    "PolicyVersion",
    "RulesPolicy",
    "in_canary",
]

AdmissionAction = Literal["admit", "reject"]

ARMS: tuple[tuple[str, float | None], ...] = ACTIONS  # (name, idle TTL s; None = bypass)
_ARM_INDEX = {name: i for i, (name, _) in enumerate(ARMS)}
GLOBAL_KEY = "*/*"  # a PolicyUpdate keyed ``*/*`` applies to every index without its own


@dataclass(frozen=True, slots=True)
class AdmissionDecision:
    """What the policy chose for one result: ``probability`` is the chance it had of
    taking ``action`` (1.0 for a deterministic policy). ``arm``: the policy's action name
    (what the query log records); ``ttl_ms``: the entry's time to live (None: none);
    ``version``: the PolicyUpdate that decided (None: built-in); ``priority``: value per
    byte, for eviction; ``features``: the context the policy saw."""

    action: AdmissionAction
    probability: float
    reason: str
    arm: str = "admit"
    ttl_ms: int | None = None
    bucket: str | None = None
    version: int | None = None
    priority: float = 0.0
    features: Mapping[str, float] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {self.probability}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "probability": self.probability,
            "reason": self.reason,
            "arm": self.arm,
            "ttl_ms": self.ttl_ms,
            "bucket": self.bucket,
            "version": self.version,
            "features": dict(self.features),
        }


class AdmissionPolicy(Protocol):
    """Decides admission on the search's hot path: must be cheap (microseconds), must not
    block and must not raise."""

    def decide(self, entry: CachedResult) -> AdmissionDecision: ...


_ADMIT_ALL = AdmissionDecision("admit", 1.0, "admit-all")


class AdmitAll:
    """Admit every result (eviction alone bounds the cache: LRU)."""

    def decide(self, entry: CachedResult) -> AdmissionDecision:
        return _ADMIT_ALL


# -- context -------------------------------------------------------------------------------


class OnlineContext:
    """The hot path's :class:`ContextTracker` (the same buckets the learner trains on) and
    the memory price: an exponentially weighted rate of the proxy cost hits save (time
    constant ``price_window_s``) over the budget, what a cached byte earns per second.

    Thread-safe (one lock; held for microseconds). Memory is bounded: past ``max_keys``
    tracked keys the oldest-inserted half is forgotten (they decide as first-seen keys).
    """

    def __init__(
        self,
        budget_bytes: int,
        *,
        half_life: int = 20_000,
        price_window_s: float = 60.0,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.budget_bytes = max(1, budget_bytes)
        self.tracker = ContextTracker(half_life)
        self.max_keys = max_keys
        self.clock = clock
        self._window = price_window_s
        self._saved = 0.0
        self._t = clock()
        self._lock = threading.Lock()

    @staticmethod
    def request(entry: CachedResult, now: float) -> Request:
        ctx = _NO_FILTER if entry.filter is None else _TAG_FILTER  # read-only, shared
        return Request(now, str(entry.key), max(1, entry.nbytes), entry.compute_ms, ctx)

    def _decay(self, now: float) -> None:
        if now > self._t:
            self._saved *= math.exp(-(now - self._t) / self._window)
            self._t = now

    def observe(self, entry: CachedResult, *, hit: bool) -> tuple[Request, Context, CacheState]:
        """Count one lookup of ``entry``'s key; the request, the context before it and the
        cache state."""
        now = self.clock()
        req = self.request(entry, now)
        tracker = self.tracker
        with self._lock:
            if now > self._t:
                self._decay(now)
            if hit:
                self._saved += entry.compute_ms
            ctx = tracker.observe(req)
            if len(tracker._key) > self.max_keys:
                self._trim()
            price = self._saved / self._window / self.budget_bytes
        return req, ctx, CacheState(now, 0, self.budget_bytes, price)

    def last_seen(self, key: str) -> float | None:
        """When ``key`` was last requested (the clock's seconds), if still tracked."""
        return self.tracker._last.get(key)

    def _trim(self) -> None:
        # ContextTracker keeps plain dicts (insertion ordered); forget the oldest half.
        t = self.tracker
        if len(t._key) <= self.max_keys:
            return
        for table in (t._key, t._last, t._cluster):
            drop = len(table) // 2
            for name in list(table)[:drop]:
                del table[name]


_NO_FILTER: Mapping[str, str] = MappingProxyType({"filter": "none"})
_TAG_FILTER: Mapping[str, str] = MappingProxyType({"filter": "tag"})


def _features(ctx: Context) -> Mapping[str, float]:
    return _Features(ctx)


class _Features(Mapping[str, float]):
    """The context features a decision records, built when first read (the query log's
    thread reads them through ``AdmissionDecision.as_dict``; the search path only keeps
    the context it already has)."""

    __slots__ = ("_ctx", "_d")

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._d: dict[str, float] | None = None

    def _dict(self) -> dict[str, float]:
        d = self._d
        if d is None:
            ctx = self._ctx
            d = self._d = {
                "freq": ctx.freq,
                "gap_s": min(ctx.gap_s, 1e9),
                "size": float(ctx.size),
                "rel_cost": ctx.rel_cost,
            }
        return d

    def __getitem__(self, name: str) -> float:
        return self._dict()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dict())

    def __len__(self) -> int:
        return 4

    def __repr__(self) -> str:
        return repr(self._dict())


# -- the policies ---------------------------------------------------------------------------


class RulesPolicy:
    """The cost-aware rules (module docstring). ``stale_per_s``: the staleness charge in
    proxy cost per second (0: L0 invalidation is exact); ``margin`` scales the rent."""

    def __init__(
        self, *, margin: float = 1.0, stale_per_s: float = 0.0, ttl_gaps: float = 3.0
    ) -> None:
        self.rules = RuleAdmission(margin=margin, stale_per_s=stale_per_s, ttl_gaps=ttl_gaps)

    def decide_ctx(self, req: Request, ctx: Context, state: CacheState) -> AdmissionDecision:
        d = self.rules.decide(0, req, ctx, state)
        priority = self.rules.rate(ctx) * ctx.cost / max(ctx.size, 1)
        return AdmissionDecision(
            "admit" if d.admitted else "reject",
            1.0,
            "rules",
            d.action,
            None if d.ttl_s is None else int(d.ttl_s * 1000),
            d.bucket,
            None,
            priority,
            _features(ctx),
        )


@dataclass(frozen=True, slots=True)
class PolicyVersion:
    """One decoded PolicyUpdate (the Avro record of ``schemas/PolicyUpdate.avsc``):
    ``table`` maps a bucket to (arm index, probability of taking it)."""

    tenant: str
    index: str
    version: int
    table: Mapping[str, tuple[int, float]]
    max_staleness_ms: int
    p99_budget_ms: float
    min_hit_rate: float
    canary_share: float
    created_ms: int
    parent_version: int | None
    reason: str | None
    record: Mapping[str, Any]  # the update as decoded, for rollback

    @property
    def key(self) -> str:
        return f"{self.tenant}/{self.index}"

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> PolicyVersion:
        """Raises ``ValueError`` on a table that names no known arm or a bad probability."""
        table: dict[str, tuple[int, float]] = {}
        for rule in rec.get("table", ()):
            p = float(rule["probability"])
            if not 0.0 < p <= 1.0:
                raise ValueError(f"rule {rule['bucket']!r}: probability {p} not in (0, 1]")
            table[str(rule["bucket"])] = (_arm_of(bool(rule["admit"]), int(rule["ttl_ms"])), p)
        g = rec["guardrails"]
        created = rec["created_ms"]
        if not isinstance(created, int):  # fastavro decodes timestamp-millis to datetime
            created = int(created.timestamp() * 1000)
        return cls(
            str(rec["tenant"]),
            str(rec["index"]),
            int(rec["version"]),
            table,
            int(g["max_staleness_ms"]),
            float(g["p99_budget_ms"]),
            float(g["min_hit_rate"]),
            float(g["canary_share"]),
            created,
            rec.get("parent_version"),
            rec.get("reason"),
            dict(rec),
        )


def _arm_of(admit: bool, ttl_ms: int) -> int:
    if not admit:
        return _ARM_INDEX["bypass"]
    ttls = [(abs((t or 0) * 1000 - ttl_ms), i) for i, (_, t) in enumerate(ARMS) if t]
    return min(ttls)[1]


class LearnedTablePolicy:
    """Applies one :class:`PolicyVersion`: table lookup, exploration with the rule's
    probability, the rules for unseen buckets; TTLs capped at ``max_staleness_ms``."""

    def __init__(self, version: PolicyVersion, rules: RulesPolicy, *, seed: int = 0) -> None:
        self.version = version
        self.rules = rules
        self._rng = random.Random(seed)

    def decide_ctx(self, req: Request, ctx: Context, state: CacheState) -> AdmissionDecision:
        v = self.version
        b = bucket(ctx)
        rule = v.table.get(b)
        if rule is None:
            base = self.rules.decide_ctx(req, ctx, state)
            return AdmissionDecision(
                base.action,
                1.0,
                "table-miss-rules",
                base.arm,
                base.ttl_ms,
                b,
                v.version,
                base.priority,
                base.features,
            )
        greedy, p = rule
        chosen, prob = greedy, p
        if p < 1.0 and self._rng.random() >= p:
            others = [a for a in range(len(ARMS)) if a != greedy]
            chosen, prob = self._rng.choice(others), (1.0 - p) / len(others)
        name, ttl = ARMS[chosen]
        ttl_ms = None if ttl is None else min(int(ttl * 1000), v.max_staleness_ms or 2**62)
        rate = self.rules.rules.rate(ctx)
        return AdmissionDecision(
            "reject" if ttl is None else "admit",
            prob,
            "table",
            name,
            ttl_ms,
            b,
            v.version,
            rate * ctx.cost / max(ctx.size, 1),
            _features(ctx),
        )


def in_canary(tenant: str, share: float) -> bool:
    """Whether ``tenant`` is in a canary of ``share`` (0..1): a stable hash, so the same
    tenants stay in as long as the share does, and a larger share contains a smaller one."""
    if share >= 1.0:
        return True
    return zlib.crc32(tenant.encode()) / 2**32 < share


# -- the holder and its guardrails ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GuardConfig:
    """Guardrail knobs of a node. ``fallback``: what decides when no version may
    (``rules``, or ``lru``: admit everything and let LRU eviction bound the cache)."""

    max_age_s: float = 24 * 3600.0
    decision_budget_us: float = 500.0  # p99; measured ~10 us, GIL waits included
    latency_window: int = 256  # decisions per decision-latency check
    min_searches: int = 200  # searches on each side before comparing canary with control
    hit_rate_tolerance: float = 0.02  # absolute drop in hit rate tolerated
    p99_tolerance: float = 0.25  # relative rise in search p99 tolerated
    fallback: Literal["rules", "lru"] = "rules"
    history: int = 16  # versions kept per index for rollback
    # rules-decided searches per control window: the control is bounded (a node with no
    # version in force records every search into it)
    control_window: int = 4096


class _Window:
    """Lookups, hits and search latencies since the last comparison."""

    __slots__ = ("hits", "latencies", "lookups")

    def __init__(self) -> None:
        self.lookups = 0
        self.hits = 0
        self.latencies: list[float] = []

    def add(self, hit: bool, latency_ms: float) -> None:
        self.lookups += 1
        self.hits += hit
        self.latencies.append(latency_ms)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    def p99(self) -> float:
        if not self.latencies:
            return 0.0
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, math.ceil(0.99 * len(xs)) - 1)]


@dataclass(slots=True)
class _Active:
    policy: LearnedTablePolicy
    fallback_reason: str | None = None
    decision_ns: list[int] = field(default_factory=list)
    window: _Window = field(default_factory=_Window)


class PolicyHolder:
    """The hot path's policy (module docstring). ``decide`` is what ``ResultCache`` calls
    on a miss, ``on_hit`` counts a hit for the context, ``record_search`` feeds the canary
    comparison, ``apply`` swaps a version in. All thread-safe; a decision takes no lock
    but the context's."""

    def __init__(
        self,
        budget_bytes: int,
        *,
        guard: GuardConfig | None = None,
        rules: RulesPolicy | None = None,
        clock: Callable[[], float] = time.time,
        seed: int = 0,
    ) -> None:
        self.guard = guard or GuardConfig()
        self.rules = rules or RulesPolicy()
        self.context = OnlineContext(budget_bytes, clock=clock)
        self.clock = clock
        self._seed = seed
        self._active: dict[str, _Active] = {}  # replaced whole on change: readers never lock
        self._history: dict[str, dict[int, PolicyVersion]] = {}
        self._control = _Window()
        # the last control window that reached min_searches: what a version is compared
        # with while the current one is short (a version for every tenant: the rules'
        # last window before it came in force)
        self._baseline: _Window | None = None
        self._lock = threading.Lock()
        self.fallbacks: deque[dict[str, Any]] = deque(maxlen=64)
        self.counts = {"decisions": 0, "learned": 0, "fallback_count": 0, "applied": 0}

    # -- versions ---------------------------------------------------------------------------

    def apply(self, record: Mapping[str, Any]) -> bool:
        """Put a decoded PolicyUpdate in force for its key, if newer than the one there;
        returns whether it was. Raises ``ValueError`` for a malformed table."""
        v = PolicyVersion.from_record(record)
        with self._lock:
            hist = self._history.setdefault(v.key, {})
            hist[v.version] = v
            for old in sorted(hist)[: -self.guard.history]:
                del hist[old]
            cur = self._active.get(v.key)
            if cur is not None and cur.policy.version.version >= v.version:
                return False
            active = dict(self._active)
            active[v.key] = _Active(LearnedTablePolicy(v, self.rules, seed=self._seed))
            self._active = active
            self.counts["applied"] += 1
            return True

    def versions(self, key: str) -> list[int]:
        with self._lock:
            return sorted(self._history.get(key, {}))

    def version_of(self, key: str, version: int) -> PolicyVersion | None:
        """A kept version of ``key`` (None if not kept)."""
        with self._lock:
            return self._history.get(key, {}).get(version)

    def current(self, key: str) -> PolicyVersion | None:
        a = self._active.get(key)
        return None if a is None else a.policy.version

    def rollback(self, key: str, version: int) -> dict[str, Any]:
        """A new version (newest + 1) with the content of ``version``, put in force and
        returned as a PolicyUpdate record for the ``policy`` topic. ``KeyError`` when the
        holder has not kept ``version``."""
        with self._lock:
            hist = self._history.get(key, {})
            if version not in hist:
                raise KeyError(f"{key} has no version {version} (kept: {sorted(hist)})")
            newest = max(hist)
            record = dict(hist[version].record)
        record.update(
            version=newest + 1,
            parent_version=version,
            reason=f"rollback to {version}",
            created_ms=int(self.clock() * 1000),
        )
        self.apply(record)
        return record

    def in_force(self, index_key: str) -> PolicyVersion | None:
        """The version deciding for ``index_key`` now: None when the rules (or LRU) do
        (no version, a guardrail fell back, outside the canary, too old). What the
        learned eviction reads its table from (streams.cache.learned_eviction)."""
        a = self._route(index_key.split("/", 1)[0], index_key)
        return None if a is None else a.policy.version

    # -- the hot path ------------------------------------------------------------------------

    def _route(self, tenant: str, index_key: str) -> _Active | None:
        a = self._active.get(index_key) or self._active.get(GLOBAL_KEY)
        if a is None or a.fallback_reason is not None:
            return None
        v = a.policy.version
        if not in_canary(tenant, v.canary_share):
            return None
        if self.clock() - v.created_ms / 1000 > self.guard.max_age_s:
            self._fall_back(
                a, f"stale: version {v.version} is older than {self.guard.max_age_s:g} s"
            )
            return None
        return a

    def decide(self, entry: CachedResult) -> AdmissionDecision:
        return self.decide_routed(entry, self.route(entry.index_key))

    def route(self, index_key: str) -> _Active | None:
        """What decides for ``index_key`` now: a version in force (None: the rules, or LRU).
        A decision taken later (a lazy miss parked undecided, streams.cache.controller)
        captures it at its search and passes it to :meth:`decide_routed`."""
        active = self._active
        if not active:  # no version at all (the rules decide): the common case, cheaply
            return None
        return self._route(index_key.split("/", 1)[0], index_key)

    def decide_routed(self, entry: CachedResult, a: _Active | None) -> AdmissionDecision:
        """:meth:`decide` by ``a`` (from :meth:`route`), even if it has fallen back since:
        the policy in force when the search ran decides its result."""
        req, ctx, state = self.context.observe(entry, hit=False)
        self.counts["decisions"] += 1
        if a is None:
            if self.guard.fallback == "lru":
                return _ADMIT_ALL
            return self.rules.decide_ctx(req, ctx, state)
        t0 = time.perf_counter_ns()
        d = a.policy.decide_ctx(req, ctx, state)
        elapsed = time.perf_counter_ns() - t0
        self.counts["learned"] += 1
        if self._active.get(a.policy.version.key) is not a:
            return d  # replaced since its search: its speed no longer judges a version in force
        a.decision_ns.append(elapsed)
        if len(a.decision_ns) >= self.guard.latency_window:
            xs = sorted(a.decision_ns)
            a.decision_ns = []
            p99_us = xs[math.ceil(0.99 * len(xs)) - 1] / 1000
            if p99_us > self.guard.decision_budget_us:
                self._fall_back(
                    a,
                    f"slow: decision p99 {p99_us:.1f} us > budget "
                    f"{self.guard.decision_budget_us:g} us",
                )
        return d

    def on_hit(self, entry: CachedResult) -> None:
        """Count a cache hit of ``entry`` (its key's frequency; the memory price)."""
        self.context.observe(entry, hit=True)

    def expired(self, entry: CachedResult, now_s: float | None = None) -> bool:
        """Whether ``entry`` outlived its idle TTL: no request for its key for ``ttl_ms``
        (as in the simulator: a hit renews the entry). The key's last request is the
        context's; a key it has forgotten counts from the entry's creation (``created_s``
        and ``now_s`` are ``time.monotonic()``). Then the search treats it as a miss."""
        d = entry.admission
        if d is None or d.ttl_ms is None:
            return False
        last = self.context.last_seen(str(entry.key))
        if last is not None:
            return (self.clock() - last) * 1000 > d.ttl_ms
        now = time.monotonic() if now_s is None else now_s
        return (now - entry.created_s) * 1000 > d.ttl_ms

    def record_search(self, tenant: str, index_key: str, hit: bool, latency_ms: float) -> None:
        """Feed one answered search to the comparison of canary and control; trips the
        regression guardrails. Searches the rules decided fill the control window (at
        most ``control_window``, then it becomes the baseline and a new one starts)."""
        a = self._route(tenant, index_key)
        g = self.guard
        with self._lock:
            if a is None:
                self._control.add(hit, latency_ms)
                if self._control.lookups >= max(g.control_window, g.min_searches):
                    self._baseline, self._control = self._control, _Window()
                return
            a.window.add(hit, latency_ms)
            if a.window.lookups < g.min_searches:
                return
            reason = self._regression(a)
            a.window = _Window()
            if self._control.lookups >= g.min_searches:
                self._baseline, self._control = self._control, _Window()
        if reason is not None:
            self._fall_back(a, reason)

    def _regression(self, a: _Active) -> str | None:
        v, w, g = a.policy.version, a.window, self.guard
        c = self._control if self._control.lookups >= g.min_searches else self._baseline
        if v.min_hit_rate > 0 and w.hit_rate < v.min_hit_rate:
            return f"hit rate {w.hit_rate:.3f} < min_hit_rate {v.min_hit_rate:g}"
        if v.p99_budget_ms > 0 and w.p99() > v.p99_budget_ms:
            return f"p99 {w.p99():.2f} ms > budget {v.p99_budget_ms:g} ms"
        if c is None:
            return None
        if w.hit_rate < c.hit_rate - g.hit_rate_tolerance:
            return f"hit rate regression: {w.hit_rate:.3f} vs rules {c.hit_rate:.3f}"
        if w.p99() > c.p99() * (1 + g.p99_tolerance):
            return f"p99 regression: {w.p99():.2f} ms vs rules {c.p99():.2f} ms"
        return None

    def _fall_back(self, a: _Active, reason: str) -> None:
        with self._lock:
            if a.fallback_reason is not None:
                return
            a.fallback_reason = reason
            self.counts["fallback_count"] += 1
            v = a.policy.version
            self.fallbacks.append(
                {
                    "key": v.key,
                    "version": v.version,
                    "reason": reason,
                    "to": self.guard.fallback,
                    "at_ms": int(self.clock() * 1000),
                }
            )

    def status(self) -> dict[str, Any]:
        """Versions in force, fallbacks with their reasons, counters (for stats)."""
        active = self._active
        return {
            "indexes": {
                k: {
                    "version": a.policy.version.version,
                    "canary_share": a.policy.version.canary_share,
                    "in_force": a.fallback_reason is None,
                    "fallback_reason": a.fallback_reason,
                }
                for k, a in sorted(active.items())
            },
            "fallbacks": list(self.fallbacks),
            **self.counts,
        }
