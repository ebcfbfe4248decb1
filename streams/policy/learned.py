"""The learned admission/TTL policy: a Vowpal Wabbit contextual bandit, exported as a table.

Loop (what the production learner does over ``query-log``, here over a replay):

1. The hot path (:class:`TablePolicy`) looks the request's context bucket up in the current
   :class:`PolicyTable`, falls back to the hand-written rules for buckets the table has not
   seen, explores with probability ``epsilon`` (uniform over :data:`ACTIONS`), and logs the
   action with its probability.
2. :class:`~streams.policy.join.OutcomeJoin` joins each decision with what followed.
3. :class:`PolicyLearner` turns outcomes into bandit costs, ``-(saved - rent * size * held_s)
   / cost_scale`` where ``rent`` is what a byte of this cache saves per second on average (so
   an entry must out-earn the memory it takes), and trains VW ``--cb_explore_adf`` on them:
   the taken action with its logged probability (IPS weight), the other actions'
   hindsight outcomes with probability 1 (they are not explored: they are read off the log).
4. :meth:`PolicyLearner.export` predicts every bucket seen so far and keeps the greedy action:
   a ``PolicyTable`` the hot path applies with one dict lookup. ``model`` (VW's serialized
   weights, :meth:`PolicyLearner.from_model`) is the small-model form, which also answers
   for buckets the table has not seen.

:func:`replay_learned` runs 1-4 online over a trace: it starts from the rules and emits a new
table version every ``update_every`` requests, using only what the log held by then.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import vowpal_wabbit_next as vw

from streams.policy.context import Context
from streams.policy.eviction import (
    BanditEvictingCache,
    EvictionConfig,
    EvictionTable,
    ExpertSelector,
    period_ends,
)
from streams.policy.join import JoinedDecision, OutcomeJoin
from streams.policy.policies import (
    TTL_BUCKETS_S,
    AdmissionPolicy,
    CacheState,
    ControlledCache,
    RuleAdmission,
)
from streams.policy.simulator import Decision, L2Model, Meter, ReplayLog, SimResult
from streams.policy.trace import Request

__all__ = [
    "ACTIONS",
    "CombinedRun",
    "LearnedRun",
    "LearnerConfig",
    "PolicyLearner",
    "PolicyTable",
    "TablePolicy",
    "replay_bandit_eviction",
    "replay_learned",
]

ACTIONS: tuple[tuple[str, float | None], ...] = (
    ("bypass", None),
    *((f"ttl{t:g}", t) for t in TTL_BUCKETS_S),
)
_TTLS = tuple(t for _, t in ACTIONS)
_INDEX = {name: i for i, (name, _) in enumerate(ACTIONS)}


@dataclass(frozen=True, slots=True)
class PolicyTable:
    """A PolicyUpdate's payload: context bucket -> action index into ``actions``."""

    version: int
    actions: tuple[str, ...]
    entries: Mapping[str, int]
    epsilon: float
    model: bytes = b""  # VW weights (the small-model form); empty when not exported

    def to_json(self) -> dict[str, Any]:
        """JSON form for the ``policy`` topic (the model travels as its own field)."""
        return {
            "version": self.version,
            "actions": list(self.actions),
            "epsilon": self.epsilon,
            "table": dict(sorted(self.entries.items())),
        }


class TablePolicy:
    """The hot-path admission policy: table lookup, rules fallback, epsilon exploration."""

    name = "learned"

    def __init__(
        self, *, epsilon: float = 0.05, seed: int = 0, fallback: AdmissionPolicy | None = None
    ) -> None:
        self.table: PolicyTable | None = None
        self.epsilon = epsilon
        self.fallback = fallback or RuleAdmission()
        self._rng = random.Random(seed)

    def decide(self, index: int, req: Request, ctx: Context, state: CacheState) -> Decision:
        base = self.fallback.decide(index, req, ctx, state)
        greedy = _INDEX[base.action]
        if self.table is not None:
            greedy = self.table.entries.get(base.bucket, greedy)
        n = len(ACTIONS)
        chosen = self._rng.randrange(n) if self._rng.random() < self.epsilon else greedy
        p = self.epsilon / n + (1.0 - self.epsilon if chosen == greedy else 0.0)
        name, ttl = ACTIONS[chosen]
        return Decision(name, ttl is not None, ttl, p, base.bucket)


def _features(bucket: str, generalize: bool) -> str:
    """Shared-namespace features of a bucket: the bucket itself (so that a well-visited
    bucket gets its own estimate) and, if ``generalize``, each field and every pair of fields
    (so that a rarely visited bucket borrows from its neighbours)."""
    own = "b" + bucket.replace(".", "_")
    if not generalize:
        return own
    parts = bucket.split(".")
    pairs = [f"{a}{b}" for i, a in enumerate(parts) for b in parts[i + 1 :]]
    return " ".join([own, *parts, *pairs])


@dataclass(frozen=True, slots=True)
class LearnerConfig:
    """Knobs of the learner; the defaults are the ones docs/benchmarks.md reports.

    ``rent_factor`` scales the cache's *average* earning per byte-second into the rent an
    admitted entry is charged: the entries an admission displaces are the least valuable
    ones, so the marginal rent is well below the average (0.1 did best of 0.1-1.0 on the
    four workload families at a 5% budget).
    """

    epsilon: float = 0.05
    update_every: int = 5_000
    rent_factor: float = 0.1
    hindsight: bool = True
    generalize: bool = True
    seed: int = 0
    # power_t 1: per-feature steps shrink as 1/n, so a bucket's estimate is close to the
    # mean of its (heavy-tailed) outcomes rather than a recency-weighted guess.
    vw_args: tuple[str, ...] = (
        "--cb_explore_adf",
        "-q",
        "SA",
        "--power_t",
        "1",
        "--quiet",
        "-b",
        "20",
    )


class PolicyLearner:
    """VW ``cb_explore_adf`` over :data:`ACTIONS`, fed with joined decisions.

    Besides the model it keeps, from the logs it has read, the three estimates the costs
    need: the rent (:attr:`rent`), the cost scale (mean proxy cost per request) and the
    characteristic time (:attr:`char_time_s`). It may read several logs in turn (call
    :meth:`new_log` between them): a learner trained on yesterday's log warm-starts today's.
    """

    def __init__(self, budget_bytes: int, config: LearnerConfig | None = None) -> None:
        self.budget_bytes = budget_bytes
        self.config = config or LearnerConfig()
        self.version = 0
        self.trained = 0
        args = [
            *self.config.vw_args,
            "--epsilon",
            str(self.config.epsilon),
            "--random_seed",
            str(self.config.seed),
        ]
        self._ws = vw.Workspace(args)
        self._parser = vw.TextFormatParser(self._ws)
        self._buckets: set[str] = set()
        self._saved = self._cost = self._span = self._admitted_bytes = 0.0
        self._count = 0
        self._last_t: float | None = None

    @classmethod
    def from_model(
        cls, budget_bytes: int, model: bytes, config: LearnerConfig | None = None
    ) -> PolicyLearner:
        """A learner whose VW weights come from ``PolicyTable.model`` (the small-model form):
        :meth:`greedy` answers as the exporting learner did. The rent, cost scale and
        turnover estimates are not in the model; they start over."""
        learner = cls(budget_bytes, config)
        learner._ws = vw.Workspace(model_data=model)
        learner._parser = vw.TextFormatParser(learner._ws)
        return learner

    def new_log(self) -> None:
        """The next :meth:`observe_log` starts a new log (its clock may start over)."""
        self._last_t = None

    def observe_log(
        self, requests: Sequence[Request], log: ReplayLog, start: int, stop: int
    ) -> None:
        """Account requests ``[start, stop)`` for the rent, cost scale and turnover."""
        first = bisect.bisect_left(log.decisions, start, key=lambda d: d.index)
        for d in log.decisions[first:]:
            if d.index >= stop:
                break
            if d.decision.admitted:
                self._admitted_bytes += requests[d.index].size
        for i in range(start, stop):
            r = requests[i]
            if self._last_t is not None and r.time > self._last_t:
                self._span += r.time - self._last_t
            self._last_t = r.time
            self._count += 1
            self._cost += r.cost
            if log.hits[i]:
                self._saved += r.cost

    @property
    def rent(self) -> float:
        """Proxy cost a cached byte saved per second on average, times ``rent_factor``."""
        if self._span <= 0:
            return 0.0
        return self.config.rent_factor * self._saved / self._span / self.budget_bytes

    @property
    def char_time_s(self) -> float:
        """Seconds the cache takes to turn its budget over with admitted bytes (Che's
        characteristic time): how long an entry nobody hits survives eviction."""
        if self._admitted_bytes <= self.budget_bytes or self._span <= 0:
            return math.inf
        return self.budget_bytes * self._span / self._admitted_bytes

    def _example(self, bucket: str, label: tuple[int, float, float] | None) -> list[Any]:
        lines = [f"shared |S {_features(bucket, self.config.generalize)}"]
        for a, (name, ttl) in enumerate(ACTIONS):
            feats = f"|A {name}" + (" admit" if ttl is not None else "")
            if label is not None and label[0] == a:
                feats = f"0:{label[1]:.6f}:{label[2]:.6f} {feats}"
            lines.append(feats)
        return [self._parser.parse_line(line) for line in lines]

    def learn(self, joined: Sequence[JoinedDecision]) -> None:
        """Train on resolved decisions (observed action by IPS, the rest by hindsight)."""
        rent = self.rent
        scale = self._cost / self._count if self._cost > 0 else 1.0
        for j in joined:
            self._buckets.add(j.bucket)
            for a, o in enumerate(j.outcomes):
                cost = -(o.saved - rent * j.size * o.held_s) / scale
                cost = max(-50.0, min(50.0, cost))
                if o.observed:
                    self._ws.learn_one(self._example(j.bucket, (a, cost, j.probability)))
                elif self.config.hindsight:
                    self._ws.learn_one(self._example(j.bucket, (a, cost, 1.0)))
            self.trained += 1

    def greedy(self, bucket: str) -> int:
        """The action VW currently prefers in ``bucket``."""
        probs = cast(list[tuple[int, float]], self._ws.predict_one(self._example(bucket, None)))
        return max(probs, key=lambda ap: ap[1])[0]

    def export(self, *, with_model: bool = False) -> PolicyTable:
        """A new table version over every bucket seen in training."""
        self.version += 1
        entries = {b: self.greedy(b) for b in sorted(self._buckets)}
        model = self._ws.serialize() if with_model else b""
        return PolicyTable(
            self.version, tuple(n for n, _ in ACTIONS), entries, self.config.epsilon, model
        )


def _evicted_idle_median(log: ReplayLog, last: int = 2_000) -> float | None:
    """The median idle age of the last evictions in ``log`` (how long an entry nobody hits
    survives, measured rather than Che's estimate); None before the first eviction."""
    if not log.evictions:
        return None
    idle = sorted(e[2] for e in log.evictions[-last:])
    return idle[len(idle) // 2]


@dataclass(frozen=True, slots=True)
class LearnedRun:
    """The learned policy's replay: its result, last table, and the learner (reusable)."""

    result: SimResult
    table: PolicyTable | None
    updates: int
    learner: PolicyLearner


def replay_learned(
    requests: Sequence[Request],
    budget_bytes: int,
    config: LearnerConfig | None = None,
    progress: Callable[[int], None] | None = None,
    *,
    learner: PolicyLearner | None = None,
    l2: L2Model | None = None,
) -> LearnedRun:
    """Replay ``requests`` through the learned policy, learning online (module docstring).

    The table used at request ``i`` was trained only on decisions resolved from the log of
    requests ``< i`` (and on earlier logs, if ``learner`` comes warm from them). A cold
    learner leaves the first ``update_every`` requests to the rules plus exploration.
    """
    cfg = config or (learner.config if learner is not None else LearnerConfig())
    learner = learner or PolicyLearner(budget_bytes, cfg)
    learner.new_log()
    policy = TablePolicy(epsilon=cfg.epsilon, seed=cfg.seed)
    if learner.trained:
        policy.table = learner.export()
    cache = ControlledCache(budget_bytes, policy)
    cache.l2 = l2
    join = OutcomeJoin(_TTLS)
    meter = Meter()
    updates = 0
    for start in range(0, len(requests), cfg.update_every):
        stop = min(start + cfg.update_every, len(requests))
        for i in range(start, stop):
            req = requests[i]
            meter.record(req, cache.access(i, req), cache.used_bytes)
        if progress is not None:
            progress(stop - start)
        learner.observe_log(requests, cache.log, start, stop)
        measured = _evicted_idle_median(cache.log)
        join.char_time_s = learner.char_time_s if measured is None else measured
        learner.learn(join.advance(requests, cache.log, stop))
        if stop < len(requests):
            policy.table = learner.export()
            updates += 1
    learner.learn(join.flush())
    final = learner.export(with_model=True) if learner.trained else None
    return LearnedRun(meter.result(cache), final, updates, learner)


@dataclass(frozen=True, slots=True)
class CombinedRun:
    """The combined replay: its result, the bandit's last table, the last eviction table
    and the eviction table picked per period."""

    result: SimResult
    table: PolicyTable | None
    eviction: EvictionTable
    picks: tuple[str, ...]


def replay_bandit_eviction(
    requests: Sequence[Request],
    budget_bytes: int,
    config: LearnerConfig | None = None,
    eviction: EvictionConfig | None = None,
    progress: Callable[[int], None] | None = None,
    *,
    rank_admission: bool = True,
    name: str = "learned",
    l2: L2Model | None = None,
) -> CombinedRun:
    """The VW bandit's admission/TTL in front of the learned eviction, both learning online
    from the same replay log (:class:`~streams.policy.eviction.BanditEvictingCache`).

    The eviction side is :func:`~streams.policy.eviction.replay_learned_eviction`'s loop
    (shadow caches, a table picked every ``update_every`` requests); the bandit side is
    :func:`replay_learned`'s (join, VW training, a new admission table at the same points).
    Nothing reads the future: both tables used at request ``i`` come from requests ``< i``.
    """
    cfg = config or LearnerConfig()
    ecfg = eviction or EvictionConfig()
    learner = PolicyLearner(budget_bytes, cfg)
    policy = TablePolicy(epsilon=cfg.epsilon, seed=cfg.seed)
    selector = ExpertSelector(budget_bytes, ecfg)
    cache = BanditEvictingCache(
        budget_bytes,
        EvictionTable.decayed(ecfg.start_tau_s),
        policy,
        counts=selector.counts,
        samples=ecfg.samples,
        seed=ecfg.seed,
        rank_admission=rank_admission,
        name=name,
    )
    cache.l2 = l2
    join = OutcomeJoin(_TTLS)
    meter = Meter()
    n = len(requests)
    ends = period_ends(n, ecfg.update_every, ecfg.warmup)
    start = 0
    for stop in ends:
        for i in range(start, stop):
            req = requests[i]
            selector.access(i, req)
            meter.record(req, cache.access(i, req), cache.used_bytes)
        if progress is not None:
            progress(stop - start)
        learner.observe_log(requests, cache.log, start, stop)
        measured = _evicted_idle_median(cache.log)
        join.char_time_s = learner.char_time_s if measured is None else measured
        learner.learn(join.advance(requests, cache.log, stop))
        if stop < n:
            policy.table = learner.export()
            table = selector.update(requests, start, stop, select=stop != ecfg.warmup)
            if table is not None:
                cache.table = table
        start = stop
    learner.learn(join.flush())
    final = learner.export(with_model=True) if learner.trained else None
    return CombinedRun(meter.result(cache), final, cache.table, tuple(selector.picks))
