"""The combined policy (VW bandit admission/TTL in front of the learned eviction) and the
modelled L2 with false hits (streams/policy/{eviction,learned,simulator,evaluate}.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from streams.cli import app
from streams.policy import (
    EvictionConfig,
    EvictionTable,
    LearnerConfig,
    LRUCache,
    Request,
    default_budget,
    evaluate_trace,
    generate,
    replay,
)
from streams.policy.eviction import BanditEvictingCache, KeyCounts
from streams.policy.learned import ACTIONS, replay_bandit_eviction
from streams.policy.simulator import L2_PRECISION, Decision, L2Model


def req(
    t: float, key: str, *, size: int = 10, cost: float = 1.0, cluster: str | None = None
) -> Request:
    ctx: dict[str, float | int | str] = {"filter": "none"}
    if cluster is not None:
        ctx["cluster"] = cluster
    return Request(t, key, size, cost, ctx)


class _Fixed:
    """An admission policy that always answers ``decision``."""

    name = "fixed"

    def __init__(self, decision: Decision) -> None:
        self.decision = decision
        self.calls = 0

    def decide(self, index: int, req: Request, ctx: object, state: object) -> Decision:
        self.calls += 1
        return self.decision


def combined(
    budget: int, decision: Decision, *, rank_admission: bool = True, tau: float = 100.0
) -> BanditEvictingCache:
    counts = KeyCounts((tau,))
    cache = BanditEvictingCache(
        budget,
        EvictionTable.decayed(tau),
        _Fixed(decision),
        counts=counts,
        rank_admission=rank_admission,
    )
    return cache


def run(cache: BanditEvictingCache, trace: list[Request]) -> list[bool]:
    out = []
    for i, r in enumerate(trace):
        cache.counts.observe(r)
        out.append(cache.access(i, r))
        assert cache.used_bytes <= cache.budget_bytes
    return out


# -- the combined cache ---------------------------------------------------------------------


def test_a_bandit_bypass_is_never_admitted() -> None:
    cache = combined(100, Decision("bypass", False, None, 0.9, "b7"))
    hits = run(cache, [req(0.0, "a"), req(1.0, "a"), req(2.0, "a")])
    assert hits == [False, False, False] and cache.used_bytes == 0
    assert [d.decision.bucket for d in cache.log.decisions] == ["b7"] * 3
    assert all(d.decision.probability == 0.9 for d in cache.log.decisions)


def test_the_bandits_ttl_expires_an_idle_entry_and_a_hit_renews_it() -> None:
    cache = combined(100, Decision("ttl5", True, 5.0, 1.0, "b"))
    trace = [req(0.0, "a"), req(4.0, "a"), req(8.0, "a"), req(20.0, "z"), req(21.0, "a")]
    assert run(cache, trace) == [False, True, True, False, False]
    # "a" expired at 13 s (its last hit at 8 s + 5 s): freed without an eviction event
    assert cache.log.evictions == []
    assert cache.holds("a") and cache.holds("z")  # "a" re-admitted at 21 s
    assert cache.used_bytes == 20


def test_eviction_follows_the_learned_rank_and_the_rank_can_still_bypass() -> None:
    admit = Decision("ttl300", True, 300.0, 1.0, "b")
    cache = combined(20, admit)  # two entries of 10 bytes
    trace = [req(0.0, "hot"), req(0.1, "hot"), req(0.2, "hot"), req(0.3, "cold"), req(0.4, "new")]
    run(cache, trace)
    # "new" (count 1) is not ranked below "cold" (count 1, idle): cold goes, hot stays
    assert cache.holds("hot") and cache.holds("new") and not cache.holds("cold")
    assert cache.log.evictions[0][1] == "cold"
    # a miss cheaper per byte than every entry is bypassed by rank, logged in the bandit's
    # bucket; without rank admission the bandit's admit stands
    cheap = req(0.5, "cheap", cost=0.01)
    run(cache, [cheap])
    assert not cache.holds("cheap")
    assert cache.log.decisions[-1].decision == Decision("bypass", False, None, 1.0, "b")
    loose = combined(20, admit, rank_admission=False)
    run(loose, [*trace, cheap])
    assert loose.holds("cheap") and loose.log.decisions[-1].decision == admit


def test_replay_bandit_eviction_learns_both_tables_and_is_deterministic() -> None:
    trace = generate("sessions", 12_000, 0)
    budget = default_budget(trace)
    lru = replay(LRUCache(budget), trace)
    cfg, ecfg = LearnerConfig(update_every=2_000), EvictionConfig(update_every=2_000, warmup=1_000)
    out = replay_bandit_eviction(trace, budget, cfg, ecfg)
    assert out.result.peak_bytes <= budget
    assert out.result.saved_cost > 1.1 * lru.saved_cost
    assert out.table is not None and out.table.entries  # the bandit learned a table
    assert set(out.table.entries.values()) <= set(range(len(ACTIONS)))
    assert len(out.picks) == 5  # an eviction table picked per period but the last
    # both learners acted: bypasses by the bandit and TTL admissions are in the result
    assert out.result.bypassed > 0 and out.result.admitted > 0
    again = replay_bandit_eviction(trace, budget, cfg, ecfg)
    assert (again.result, again.picks, again.table.entries if again.table else None) == (
        out.result,
        out.picks,
        out.table.entries,
    )


# -- the modelled L2 and false hits -------------------------------------------------------------


def test_l2_serves_a_miss_from_a_cached_sibling_only() -> None:
    trace = [
        req(0.0, "a", cluster="c", cost=2.0),
        req(1.0, "b", cluster="c", cost=3.0),
        req(2.0, "x", cluster="d"),
        req(3.0, "y", cost=5.0),
    ]
    sim = LRUCache(100)
    sim.l2 = L2Model(precision=1.0)
    r = replay(sim, trace)
    # "b" is served from "a" (same cluster, cached); "x" has no cached sibling; "y" no cluster
    assert (r.hits, r.l2_hits, r.false_hits, r.l2_saved_cost) == (0, 1, 0, 3.0)
    assert r.l2_hit_ratio == pytest.approx(0.25)
    assert r.l2_saved_share == pytest.approx(3.0 / 11.0) and r.saved_share == 0.0
    wrong = LRUCache(100)
    wrong.l2 = L2Model(precision=0.0)
    w = replay(wrong, trace)
    assert (w.l2_hits, w.false_hits, w.l2_saved_cost) == (0, 1, 0.0)
    assert w.false_hit_ratio == pytest.approx(0.25) and w.l2_saved_share == 0.0


def test_an_evicted_sibling_serves_nothing() -> None:
    sim = LRUCache(10)  # one entry
    sim.l2 = L2Model(precision=1.0)
    r = replay(sim, [req(0.0, "a", cluster="c"), req(1.0, "z"), req(2.0, "b", cluster="c")])
    assert r.l2_hits == r.false_hits == 0


def test_l2_leaves_l0_alone_and_draws_labels_per_request() -> None:
    trace = generate("neardup", 6_000, 0)
    budget = default_budget(trace)
    plain = replay(LRUCache(budget), trace)
    sim = LRUCache(budget)
    sim.l2 = L2Model(seed=3)
    with_l2 = replay(sim, trace)
    assert (with_l2.hits, with_l2.saved_cost, with_l2.admitted) == (
        plain.hits,
        plain.saved_cost,
        plain.admitted,
    )
    served = with_l2.l2_hits + with_l2.false_hits
    assert served > 500
    # the "same answer" labels follow the documented precision (binomial, 4 sigma)
    assert (
        abs(with_l2.false_hits / served - (1 - L2_PRECISION))
        < 4 * (L2_PRECISION * (1 - L2_PRECISION) / served) ** 0.5
    )
    again = LRUCache(budget)
    again.l2 = L2Model(seed=3)
    assert replay(again, trace) == with_l2
    other = LRUCache(budget)
    other.l2 = L2Model(seed=4)
    assert replay(other, trace).false_hits != with_l2.false_hits


def test_l2_model_rejects_bad_probabilities() -> None:
    with pytest.raises(ValueError, match="precision"):
        L2Model(precision=1.5)
    with pytest.raises(ValueError, match="precision"):
        L2Model(recall=-0.1)


def test_evaluate_reports_l0_figures_unchanged_by_l2() -> None:
    trace = generate("neardup", 4_000, 0)
    budget = default_budget(trace)
    ecfg = EvictionConfig(update_every=1_000, warmup=500)
    cfg = LearnerConfig(update_every=1_000)
    base = evaluate_trace("n", trace, budget, bound="knapsack", config=cfg, eviction=ecfg)
    l2 = evaluate_trace(
        "n", trace, budget, bound="knapsack", config=cfg, eviction=ecfg, l2_precision=0.9
    )
    assert [r.policy for r in l2.rows][-1] == "combined" and l2.l2_precision == 0.9
    for a, b in zip(base.rows, l2.rows, strict=True):
        assert (a.hit_ratio, a.saved_cost) == (b.hit_ratio, b.saved_cost)
        assert a.false_hits == 0 and b.false_hits > 0
        assert b.l2_saved_share > b.saved_share


def test_cli_l2_columns(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    res = CliRunner().invoke(
        app,
        [
            "policy",
            "eval",
            "--workload",
            "neardup",
            "--requests",
            "3000",
            "--bound",
            "knapsack",
            "--l2",
            "--json",
            str(out),
        ],
        terminal_width=200,
    )
    assert res.exit_code == 0, res.output
    assert "false hits" in res.output and "combined: VW bandit admission" in res.output
    report = json.loads(out.read_text())["reports"][0]
    assert report["l2_precision"] == pytest.approx(0.951)
    assert all(p["false_hits"] > 0 for p in report["policies"])
    bad = CliRunner().invoke(
        app, ["policy", "eval", "--workload", "neardup", "--requests", "100", "--l2-precision", "2"]
    )
    assert bad.exit_code != 0
