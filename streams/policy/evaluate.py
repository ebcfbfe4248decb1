"""Replay a trace through every policy at equal memory and compare them with the bound.

:func:`evaluate_trace` runs LRU, LFU, GDSF, the rules, the bandit (GDSF eviction with the VW
admission/TTL table of :mod:`.learned`), the learned policy (the learned eviction of
:mod:`.eviction`) and the combined one (the bandit's admission/TTL in front of the learned
eviction; the three learn online over the same trace, cold; :data:`POLICY_HELP`) on one
trace at one byte budget, computes the offline bound
(:func:`~streams.policy.bounds.lp_bound`, falling back to the knapsack bound when the LP is
unavailable) and returns a :class:`WorkloadReport`. :func:`evaluate_workloads` does it for
generated workload families. Nothing here does I/O; the CLI prints and writes the reports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from streams.policy.bounds import Bound, knapsack_bound, lp_bound
from streams.policy.eviction import EvictionConfig, EvictionTable, replay_learned_eviction
from streams.policy.exceptions import BoundUnavailable
from streams.policy.learned import (
    LearnerConfig,
    PolicyTable,
    replay_bandit_eviction,
    replay_learned,
)
from streams.policy.policies import ControlledCache, GDSFCache, LFUCache, LRUCache, RuleAdmission
from streams.policy.simulator import CacheSimulator, L2Model, SimResult, replay
from streams.policy.trace import Request, trace_footprint
from streams.policy.workloads import generate

__all__ = [
    "POLICIES",
    "POLICY_HELP",
    "PolicyRow",
    "WorkloadReport",
    "default_budget",
    "evaluate_trace",
    "evaluate_workloads",
    "reports_to_json",
]

POLICIES = ("lru", "lfu", "gdsf", "rules", "bandit", "learned", "combined")
# What each row of the report holds (the CLI and docs/benchmarks.md print these).
POLICY_HELP = {
    "lru": "least recently used, admit all",
    "lfu": "in-cache request counts, LRU among ties, admit all",
    "gdsf": "Greedy-Dual-Size-Frequency with cost, admit all",
    "rules": "GDSF eviction + rule admission and idle TTL",
    "bandit": "GDSF eviction + VW contextual-bandit admission and idle TTL",
    "learned": "learned eviction (density table / decayed counts / rate x survival, picked by "
    "shadow caches), admission by rank",
    "combined": "VW bandit admission and idle TTL in front of the learned eviction",
}
BoundKind = Literal["lp", "knapsack"]


@dataclass(frozen=True, slots=True)
class PolicyRow:
    """One policy on one trace. ``bound_share``: saved / bound; ``vs_lru``: saved / LRU's."""

    policy: str
    hit_ratio: float
    saved_cost: float
    saved_share: float
    bound_share: float
    vs_lru: float
    mean_bytes: float
    peak_bytes: int
    admitted: int
    bypassed: int
    # with a modelled L2 (:class:`~streams.policy.simulator.L2Model`; 0 without one):
    l2_hit_ratio: float = 0.0  # (L0 hits + right L2 serves) / requests
    l2_saved_share: float = 0.0  # share of the proxy cost saved by both
    false_hits: int = 0  # L2 serves of another query's answer
    false_hit_ratio: float = 0.0  # false hits / requests


@dataclass(frozen=True, slots=True)
class WorkloadReport:
    """Every policy on one trace at ``budget_bytes``, with the bound(s) it is measured by."""

    workload: str
    requests: int
    budget_bytes: int
    footprint_bytes: int
    total_cost: float
    bound: Bound  # the tightest bound computed (LP unless unavailable)
    knapsack: Bound
    rows: tuple[PolicyRow, ...]
    table: PolicyTable | None  # the bandit's last admission/TTL table
    eviction: EvictionTable | None = None  # the learned policy's last eviction table
    picks: tuple[str, ...] = ()  # the table the learned policy picked, per period
    l2_precision: float | None = None  # the modelled L2's precision (None: L0 only)
    combined_picks: tuple[str, ...] = ()  # the tables the combined policy picked

    def row(self, policy: str) -> PolicyRow:
        return next(r for r in self.rows if r.policy == policy)


def default_budget(requests: Sequence[Request], fraction: float = 0.05) -> int:
    """``fraction`` of the bytes needed to hold every distinct key (at least 1 byte)."""
    return max(1, int(trace_footprint(requests) * fraction))


def evaluate_trace(
    name: str,
    requests: Sequence[Request],
    budget_bytes: int,
    *,
    bound: BoundKind = "lp",
    config: LearnerConfig | None = None,
    progress: Callable[[int], None] | None = None,
    stage: Callable[[str], None] | None = None,
    eviction: EvictionConfig | None = None,
    l2_precision: float | None = None,
    seed: int = 0,
) -> WorkloadReport:
    """Replay ``requests`` through :data:`POLICIES` at ``budget_bytes`` and bound them.

    ``progress(n)`` is called as requests are replayed (``len(POLICIES) * len(requests)`` in
    all); ``stage(text)`` names each step as it starts. With ``l2_precision`` every policy
    also runs with a modelled L2 (:class:`L2Model`, labels drawn from ``seed``); its L0
    figures are the same either way.
    """

    def l2() -> L2Model | None:
        return None if l2_precision is None else L2Model(l2_precision, seed=seed)

    say = stage or (lambda _text: None)
    sims: dict[str, Callable[[], CacheSimulator]] = {
        "lru": lambda: LRUCache(budget_bytes),
        "lfu": lambda: LFUCache(budget_bytes),
        "gdsf": lambda: GDSFCache(budget_bytes),
        "rules": lambda: ControlledCache(budget_bytes, RuleAdmission()),
    }
    results: dict[str, SimResult] = {}
    for policy, make in sims.items():
        say(f"{name}: {policy}")
        sim = make()
        sim.l2 = l2()
        results[policy] = replay(sim, requests, progress)
    say(f"{name}: bandit")
    bandit = replay_learned(requests, budget_bytes, config, progress, l2=l2())
    results["bandit"] = bandit.result
    say(f"{name}: learned")
    learned = replay_learned_eviction(requests, budget_bytes, eviction, progress, l2=l2())
    results["learned"] = learned.result
    say(f"{name}: combined")
    combined = replay_bandit_eviction(
        requests, budget_bytes, config, eviction, progress, name="combined", l2=l2()
    )
    results["combined"] = combined.result
    say(f"{name}: bound")
    knap = knapsack_bound(requests, budget_bytes)
    best = knap
    if bound == "lp":
        try:
            best = lp_bound(requests, budget_bytes)
        except BoundUnavailable:
            best = knap
    lru = results["lru"].saved_cost
    rows = tuple(
        PolicyRow(
            p,
            r.hit_ratio,
            r.saved_cost,
            r.saved_share,
            r.saved_cost / best.savings if best.savings > 0 else 1.0,
            r.saved_cost / lru if lru > 0 else float("inf"),
            r.mean_bytes,
            r.peak_bytes,
            r.admitted,
            r.bypassed,
            r.l2_hit_ratio,
            r.l2_saved_share,
            r.false_hits,
            r.false_hit_ratio,
        )
        for p, r in results.items()
    )
    return WorkloadReport(
        name,
        len(requests),
        budget_bytes,
        trace_footprint(requests),
        knap.total_cost,
        best,
        knap,
        rows,
        bandit.table,
        learned.table,
        learned.picks,
        l2_precision,
        combined.picks,
    )


def evaluate_workloads(
    names: Sequence[str],
    n_requests: int,
    *,
    seed: int = 0,
    budget_bytes: int | None = None,
    budget_fraction: float = 0.05,
    bound: BoundKind = "lp",
    config: LearnerConfig | None = None,
    progress: Callable[[int], None] | None = None,
    stage: Callable[[str], None] | None = None,
    eviction: EvictionConfig | None = None,
    l2_precision: float | None = None,
) -> list[WorkloadReport]:
    """:func:`evaluate_trace` on each generated workload (budget: ``budget_bytes`` if given,
    else ``budget_fraction`` of each trace's footprint)."""
    reports = []
    for name in names:
        if stage is not None:
            stage(f"{name}: generating")
        requests = generate(name, n_requests, seed)
        budget = budget_bytes or default_budget(requests, budget_fraction)
        reports.append(
            evaluate_trace(
                name,
                requests,
                budget,
                bound=bound,
                config=config,
                progress=progress,
                stage=stage,
                eviction=eviction,
                l2_precision=l2_precision,
                seed=seed,
            )
        )
    return reports


def reports_to_json(reports: Sequence[WorkloadReport]) -> dict[str, Any]:
    """A JSON-ready dict of the reports: the bandit's table (its model left out) and, for the
    learned eviction, the last table's name and how often each candidate was picked."""
    out = []
    for rep in reports:
        d = {
            "workload": rep.workload,
            "requests": rep.requests,
            "budget_bytes": rep.budget_bytes,
            "footprint_bytes": rep.footprint_bytes,
            "total_cost": rep.total_cost,
            "bound": asdict(rep.bound),
            "knapsack_bound": asdict(rep.knapsack),
            "policies": [asdict(r) for r in rep.rows],
            "bandit_table": rep.table.to_json() if rep.table is not None else None,
            "learned_eviction": None
            if rep.eviction is None
            else {
                "table": rep.eviction.name,
                "version": rep.eviction.version,
                "picks": {p: rep.picks.count(p) for p in sorted(set(rep.picks))},
            },
            "combined_picks": {
                p: rep.combined_picks.count(p) for p in sorted(set(rep.combined_picks))
            },
            "l2_precision": rep.l2_precision,
        }
        out.append(d)
    return {"reports": out}
