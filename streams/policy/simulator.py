"""The replay loop shared by every cache simulator: byte accounting, the decision log.

A simulator is an on-demand result cache with a byte budget (see :mod:`bounds` for the
model). :meth:`CacheSimulator.access` serves one request and returns whether it was a hit;
on a miss the policy decides, and the decision (action, TTL, probability of that action
under the policy that took it) is logged, as the hot path logs it to ``query-log``. After
every call ``used_bytes <= budget_bytes`` holds.

The log (:class:`ReplayLog`) is what the production learner reads: per request, hit or miss;
per miss, the decision and the context bucket it was taken in. :func:`replay` runs a whole
trace and summarises it as a :class:`SimResult`.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from streams.policy.trace import Request

__all__ = [
    "L2_PRECISION",
    "CacheSimulator",
    "Decision",
    "L2Model",
    "LoggedDecision",
    "Meter",
    "ReplayLog",
    "SimResult",
    "replay",
]

# Share of the answers the default L2 rule serves that are right: the precision measured on
# the QQP odd rows at the defaults (d = 0.02, v = 0.8), docs/benchmarks.md "Semantic cache
# (QQP)". The simulator's "same answer" label of an L2 serve is drawn with this probability.
L2_PRECISION = 0.951


@dataclass(frozen=True, slots=True)
class Decision:
    """What the policy did on a miss. ``ttl_s`` is an idle timeout (None: no expiry);
    ``probability`` is the probability the policy gave this action (1.0: deterministic)."""

    action: str
    admitted: bool
    ttl_s: float | None = None
    probability: float = 1.0
    bucket: str = ""  # the context bucket the decision was taken in ("" if none)


ADMIT = Decision("admit", True)
BYPASS_TOO_BIG = Decision("bypass", False)


@dataclass(frozen=True, slots=True)
class LoggedDecision:
    """A decision with the index of the request that triggered it."""

    index: int
    decision: Decision


@dataclass(slots=True)
class ReplayLog:
    """What a replay leaves in the query-log: hits (one flag per request), decisions, and
    the evictions of simulators that log them: ``(request index, key, idle seconds)``, the
    request whose miss made room and how long the evicted entry had gone unrequested."""

    hits: bytearray = field(default_factory=bytearray)
    decisions: list[LoggedDecision] = field(default_factory=list)
    evictions: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SimResult:
    """Totals of one policy over one trace at one budget."""

    policy: str
    requests: int
    hits: int
    saved_cost: float
    total_cost: float
    budget_bytes: int
    peak_bytes: int
    mean_bytes: float
    admitted: int
    bypassed: int
    l2_hits: int = 0  # L0 misses served right by the modelled L2 (0 without one)
    l2_saved_cost: float = 0.0  # the proxy cost those saved
    false_hits: int = 0  # L0 misses the L2 served with another query's answer

    @property
    def l2_hit_ratio(self) -> float:
        """(L0 hits + right L2 serves) / requests; false hits are not hits."""
        return (self.hits + self.l2_hits) / self.requests if self.requests else 0.0

    @property
    def l2_saved_share(self) -> float:
        """Share of the proxy cost saved by L0 hits and right L2 serves (a false hit saves
        index time too, but serves a wrong answer: it is not counted as saved)."""
        saved = self.saved_cost + self.l2_saved_cost
        return saved / self.total_cost if self.total_cost else 0.0

    @property
    def false_hit_ratio(self) -> float:
        return self.false_hits / self.requests if self.requests else 0.0

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def saved_share(self) -> float:
        """Share of the trace's proxy cost that hits saved."""
        return self.saved_cost / self.total_cost if self.total_cost else 0.0


class L2Model:
    """A modelled semantic layer (L2) in front of the index, behind the exact L0 cache.

    On an L0 miss of a request whose context names a near-duplicate ``cluster``, the L2
    serves it from the entry of a sibling (another key of the cluster) if the L0 cache holds
    one: with probability ``recall`` the L2 rule matches the pair at all, and a served answer
    is the right one with probability ``precision`` (a per-request label). A right serve is
    an L2 hit and saves the request's cost; a wrong one is a *false hit*, counted apart and
    not as saved. The L0 side is unchanged: the miss still goes to the policy (its decision
    and log are exactly those without L2), so one replay gives both sets of figures.

    Labels are drawn per request index from ``seed`` (``random.Random(f"{seed}:{index}")``):
    the same request gets the same label under every policy. The siblings looked at are the
    ``max_siblings`` keys of the cluster requested most recently.
    """

    def __init__(
        self,
        precision: float = L2_PRECISION,
        *,
        recall: float = 1.0,
        seed: int = 0,
        max_siblings: int = 16,
    ) -> None:
        if not 0.0 <= precision <= 1.0 or not 0.0 <= recall <= 1.0:
            raise ValueError("precision and recall must be in [0, 1]")
        self.precision, self.recall, self.seed = precision, recall, seed
        self.max_siblings = max_siblings
        self.hits = self.false_hits = 0
        self.saved = 0.0
        self._recent: dict[str, dict[str, None]] = {}  # cluster -> keys, oldest first

    def serve(self, index: int, req: Request, holds: Callable[[str], bool]) -> None:
        """Account the L0 miss ``req``: L2 hit, false hit, or nothing; then remember it."""
        cluster = req.ctx.get("cluster")
        if not isinstance(cluster, str):
            return
        keys = self._recent.setdefault(cluster, {})
        if any(k != req.key and holds(k) for k in keys):
            rng = random.Random(f"{self.seed}:{index}")
            if rng.random() < self.recall:
                if rng.random() < self.precision:
                    self.hits += 1
                    self.saved += req.cost
                else:
                    self.false_hits += 1
        keys.pop(req.key, None)
        keys[req.key] = None
        if len(keys) > self.max_siblings:
            del keys[next(iter(keys))]


class CacheSimulator(ABC):
    """Base of the simulators: subclasses implement :meth:`_lookup` and :meth:`_on_miss`.

    ``_on_miss`` must leave ``used_bytes <= budget_bytes`` (it evicts first, then admits);
    requests larger than the budget never reach it (they are bypassed here).
    """

    name = "base"

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes <= 0:
            raise ValueError("budget_bytes must be > 0")
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.log = ReplayLog()
        self.l2: L2Model | None = None  # a modelled L2 (set before the first access)

    def holds(self, key: str) -> bool:
        """Whether ``key`` is cached now (no side effect); needed only with an L2 model."""
        raise NotImplementedError(f"{type(self).__name__} cannot model an L2")

    @abstractmethod
    def _lookup(self, index: int, req: Request) -> bool:
        """Serve ``req`` from the cache if held (updating recency/frequency); True on a hit."""

    @abstractmethod
    def _on_miss(self, index: int, req: Request) -> Decision:
        """Decide on the missed ``req``; evict and admit as decided; return the decision."""

    def access(self, index: int, req: Request) -> bool:
        """Serve request number ``index``; True on a hit. Logs the decision on a miss."""
        hit = self._lookup(index, req)
        self.log.hits.append(hit)
        if not hit:
            if self.l2 is not None:
                self.l2.serve(index, req, self.holds)
            decision = BYPASS_TOO_BIG if req.size > self.budget_bytes else self._on_miss(index, req)
            self.log.decisions.append(LoggedDecision(index, decision))
        return hit


class Meter:
    """Accumulates a :class:`SimResult` request by request (hits, savings, occupancy)."""

    def __init__(self) -> None:
        self.requests = self.hits = self.peak = 0
        self.saved = self.total = self.byte_sum = 0.0

    def record(self, req: Request, hit: bool, used_bytes: int) -> None:
        self.requests += 1
        self.total += req.cost
        if hit:
            self.hits += 1
            self.saved += req.cost
        self.byte_sum += used_bytes
        self.peak = max(self.peak, used_bytes)

    def result(self, sim: CacheSimulator) -> SimResult:
        admitted = sum(1 for d in sim.log.decisions if d.decision.admitted)
        l2 = sim.l2
        return SimResult(
            sim.name,
            self.requests,
            self.hits,
            self.saved,
            self.total,
            sim.budget_bytes,
            self.peak,
            self.byte_sum / self.requests if self.requests else 0.0,
            admitted,
            len(sim.log.decisions) - admitted,
            0 if l2 is None else l2.hits,
            0.0 if l2 is None else l2.saved,
            0 if l2 is None else l2.false_hits,
        )


def replay(
    sim: CacheSimulator,
    requests: Sequence[Request],
    progress: Callable[[int], None] | None = None,
) -> SimResult:
    """Run ``requests`` (numbered from 0) through a fresh ``sim``; ``progress(n)`` is called
    with the number of requests done since its last call, every 10^4 and at the end."""
    meter = Meter()
    for i, req in enumerate(requests):
        meter.record(req, sim.access(i, req), sim.used_bytes)
        if progress is not None and (i + 1) % 10_000 == 0:
            progress(10_000)
    if progress is not None and len(requests) % 10_000:
        progress(len(requests) % 10_000)
    return meter.result(sim)
