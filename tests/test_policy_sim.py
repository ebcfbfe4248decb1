"""The cache-policy simulator (issue 4): simulators on hand-made traces with known answers,
the offline bounds against brute force and against every policy, the generators' seeding,
the learner's join, and a fixed-seed smoke run of the learned policy."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import streams.policy as policy
from streams.cli import app
from streams.policy import (
    WORKLOADS,
    ControlledCache,
    GDSFCache,
    LearnerConfig,
    LFUCache,
    LRUCache,
    PolicyLearner,
    PolicyTable,
    Request,
    RuleAdmission,
    TablePolicy,
    TraceFormatError,
    belady_hits,
    default_budget,
    generate,
    knapsack_bound,
    lp_bound,
    read_trace,
    replay,
    replay_learned,
    write_trace,
)
from streams.policy.join import OutcomeJoin
from streams.policy.learned import ACTIONS
from streams.policy.simulator import CacheSimulator, Decision, LoggedDecision, ReplayLog


def unit(keys: str, *, cost: float = 1.0) -> list[Request]:
    """A trace of unit-size requests, one second apart: one letter per request."""
    return [Request(float(i), k, 1, cost) for i, k in enumerate(keys)]


def hits_of(sim: CacheSimulator, trace: Sequence[Request]) -> list[int]:
    replay(sim, trace)
    return [i for i, h in enumerate(sim.log.hits) if h]


# -- simulators on traces with known answers -------------------------------------------------


def test_lru_evicts_least_recently_used() -> None:
    # cap 2: A B A(hit) C(evicts B) B(evicts A) A(evicts C)
    assert hits_of(LRUCache(2), unit("ABACBA")) == [2]


def test_lfu_evicts_least_frequently_used() -> None:
    # cap 2: A B A(hit, A=2) C(evicts B, count 1) B(evicts C, count 1) A(hit)
    assert hits_of(LFUCache(2), unit("ABACBA")) == [2, 5]


def test_lfu_breaks_ties_by_recency() -> None:
    # A and B both count 1; C evicts A (older), so B hits and A misses
    assert hits_of(LFUCache(2), unit("ABCBA")) == [3]


def test_belady_bypasses_the_key_needed_last() -> None:
    # cap 2: at C, A is next needed at 5, B at 4, C never: C is bypassed, B and A hit
    assert belady_hits(list("ABACBA"), 2) == 3
    assert belady_hits(list("ABA"), 1) == 1  # bypass B to keep A (demand paging gets 0)


def test_gdsf_keeps_the_expensive_entry() -> None:
    trace = [
        Request(0, "X", 5, 10.0),
        Request(1, "Y", 5, 1.0),
        Request(2, "Z", 5, 1.0),
        Request(3, "X", 5, 10.0),
    ]
    gdsf = replay(GDSFCache(10), trace)
    assert (gdsf.hits, gdsf.saved_cost) == (1, 10.0)  # Z evicted Y (H 0.2 < X's 2.0)
    assert replay(LRUCache(10), trace).hits == 0  # LRU evicted X


def test_too_large_results_are_bypassed_and_logged() -> None:
    sim = LRUCache(4)
    replay(sim, [Request(0, "big", 5, 1.0), Request(1, "big", 5, 1.0)])
    assert sim.used_bytes == 0
    assert [d.decision.action for d in sim.log.decisions] == ["bypass", "bypass"]


def test_idle_ttl_expires_and_a_hit_renews_it() -> None:
    class TTL2:
        name = "ttl2"

        def decide(self, *_: object) -> Decision:
            return Decision("ttl2", True, 2.0)

    trace = [Request(t, "A", 1, 1.0) for t in (0.0, 1.5, 3.0, 5.5)]
    sim = ControlledCache(10, TTL2())
    assert hits_of(sim, trace) == [1, 2]  # gaps 1.5 and 1.5 renew; the gap of 2.5 expires


# -- bounds ---------------------------------------------------------------------------------


def brute_force_hits(keys: Sequence[str], capacity: int) -> int:
    """Best hits of any on-demand cache of ``capacity`` unit entries (DP over cache sets)."""
    best: dict[frozenset[str], int] = {frozenset(): 0}
    for k in keys:
        nxt: dict[frozenset[str], int] = {}
        for held, hits in best.items():
            h = hits + (k in held)
            pool = sorted(held | {k})
            for mask in range(1 << len(pool)):
                keep = frozenset(p for b, p in enumerate(pool) if mask >> b & 1)
                if len(keep) <= capacity and nxt.get(keep, -1) < h:
                    nxt[keep] = h
        best = nxt
    return max(best.values())


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="abcd", max_size=10), st.integers(1, 3))
def test_belady_equals_brute_force_on_unit_traces(keys: str, capacity: int) -> None:
    assert belady_hits(list(keys), capacity) == brute_force_hits(keys, capacity)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="abcde", max_size=14), st.integers(1, 3))
def test_lp_bound_is_belady_on_unit_traces(keys: str, capacity: int) -> None:
    # unit sizes: the interval matrix is totally unimodular, so the LP is integral
    bound = lp_bound(unit(keys), capacity)
    assert bound.savings == pytest.approx(belady_hits(list(keys), capacity), abs=1e-6)


requests_st = st.lists(
    st.tuples(st.sampled_from("abcdef"), st.integers(1, 6), st.integers(0, 20)),
    min_size=1,
    max_size=30,
)


def weighted(rows: list[tuple[str, int, int]]) -> list[Request]:
    """A trace whose keys keep one size (the first drawn); costs vary per request."""
    size: dict[str, int] = {}
    return [
        Request(float(i), k, size.setdefault(k, s), float(c)) for i, (k, s, c) in enumerate(rows)
    ]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests_st, st.integers(1, 12))
def test_bound_is_at_least_every_policy(rows: list[tuple[str, int, int]], budget: int) -> None:
    trace = weighted(rows)
    lp = lp_bound(trace, budget)
    knap = knapsack_bound(trace, budget)
    tol = 1e-6 * max(1.0, lp.total_cost)
    assert lp.savings <= knap.savings + tol  # the knapsack relaxes the LP further
    sims: list[CacheSimulator] = [
        LRUCache(budget),
        LFUCache(budget),
        GDSFCache(budget),
        ControlledCache(budget, RuleAdmission()),
        ControlledCache(budget, TablePolicy(epsilon=0.5, seed=len(rows))),
    ]
    for sim in sims:
        result = replay(sim, trace)
        assert sim.used_bytes <= budget
        assert result.peak_bytes <= budget
        assert result.saved_cost <= lp.savings + tol, sim.name
    learned = replay_learned(trace, budget, LearnerConfig(update_every=5)).result
    assert learned.saved_cost <= lp.savings + tol


# -- generators and traces ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_generators_are_deterministic_under_a_seed(name: str) -> None:
    a, b, c = generate(name, 3_000, 7), generate(name, 3_000, 7), generate(name, 3_000, 8)
    assert a == b
    assert a != c
    assert all(r.size > 0 and r.cost > 0 for r in a)
    assert all(x.time <= y.time for x, y in itertools.pairwise(a))
    sizes: dict[str, int] = {}
    assert all(sizes.setdefault(r.key, r.size) == r.size for r in a)  # one size per key


def test_costs_grow_with_k_and_filtering() -> None:
    trace = generate("zipf", 20_000, 0)

    def mean(rs: list[Request]) -> float:
        return sum(r.cost for r in rs) / len(rs)

    small = [r for r in trace if r.ctx["k"] == 10 and r.ctx["filter"] == "none"]
    large = [r for r in trace if r.ctx["k"] == 100 and r.ctx["filter"] == "none"]
    filtered = [r for r in trace if r.ctx["k"] == 10 and r.ctx["filter"] == "range"]
    assert mean(large) > 2 * mean(small)
    assert mean(filtered) > 1.5 * mean(small)


def test_trace_round_trips_and_reports_bad_lines(tmp_path: Path) -> None:
    trace = generate("neardup", 500, 1)
    path = tmp_path / "t.jsonl"
    assert write_trace(path, trace) == 500
    assert read_trace(path) == trace
    path.write_text(path.read_text() + '{"t": 1e9, "key": "x", "size": 0, "cost": 1}\n')
    with pytest.raises(TraceFormatError) as info:
        read_trace(path)
    assert info.value.line == 501


# -- the learner ------------------------------------------------------------------------------


def test_join_observes_the_taken_action_and_hindsights_the_others() -> None:
    trace = [
        Request(0.0, "A", 100, 2.0),
        Request(10.0, "A", 100, 2.0),
        Request(20.0, "A", 100, 2.0),
        Request(100.0, "A", 100, 2.0),
    ]
    log = ReplayLog(
        bytearray([0, 1, 1, 0]),
        [
            LoggedDecision(0, Decision("ttl30", True, 30.0, 0.9, "b")),
            LoggedDecision(3, Decision("ttl30", True, 30.0, 0.9, "b")),
        ],
    )
    join = OutcomeJoin([t for _, t in ACTIONS])
    joined = join.advance(trace, log, 4) + join.flush()
    first = next(j for j in joined if j.index == 0)
    assert ACTIONS[first.action][0] == "ttl30" and first.probability == 0.9
    by_name = {ACTIONS[a][0]: o for a, o in enumerate(first.outcomes)}
    assert by_name["ttl30"].observed and by_name["ttl30"].saved == 4.0
    assert by_name["ttl30"].held_s == pytest.approx(50.0)  # last hit at 20 + idle TTL 30
    assert by_name["bypass"].saved == 0.0
    assert by_name["ttl5"].saved == 0.0 and not by_name["ttl5"].observed  # gap 10 > 5
    assert by_name["ttl300"].saved == 6.0  # would also have served the request at 100


def test_table_policy_logs_its_probabilities() -> None:
    eps, n = 0.2, len(ACTIONS)
    pol = TablePolicy(epsilon=eps, seed=3)
    pol.table = PolicyTable(1, tuple(name for name, _ in ACTIONS), {}, eps)
    sim = ControlledCache(10_000, pol)
    replay(sim, [Request(float(i), f"k{i}", 10, 1.0) for i in range(400)])
    probs: dict[str, set[float]] = {}
    for d in sim.log.decisions:
        probs.setdefault(d.decision.action, set()).add(round(d.decision.probability, 9))
    assert len(probs) == n  # exploration tried every action
    greedy = [a for a, ps in probs.items() if round(1 - eps + eps / n, 9) in ps]
    assert len(greedy) == 1  # the table (empty: the rules) picked one action for all
    assert all(ps == {round(eps / n, 9)} for a, ps in probs.items() if a not in greedy)


def test_learned_beats_lru_on_sessions_smoke() -> None:
    trace = generate("sessions", 20_000, 0)
    budget = default_budget(trace)
    lru = replay(LRUCache(budget), trace)
    run = replay_learned(trace, budget, LearnerConfig(update_every=2_000))
    assert run.result.saved_cost > 1.15 * lru.saved_cost  # 1.29x at this seed
    assert run.table is not None and run.table.entries
    assert set(run.table.entries.values()) <= set(range(len(ACTIONS)))
    # the small-model form (VW weights) comes with the last table and answers like it
    model = PolicyLearner.from_model(budget, run.table.model)
    assert all(model.greedy(b) == a for b, a in list(run.table.entries.items())[:50])


# -- surface ----------------------------------------------------------------------------------


def test_public_surface() -> None:
    assert sorted(policy.__all__) == sorted(set(policy.__all__))
    for name in policy.__all__:
        assert getattr(policy, name) is not None


def test_cli_policy_eval(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    res = CliRunner().invoke(
        app,
        [
            "policy",
            "eval",
            "--workload",
            "latest",
            "--requests",
            "3000",
            "--bound",
            "knapsack",
            "--json",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())["reports"][0]
    assert [p["policy"] for p in report["policies"]] == list(policy.POLICIES)
    assert report["bound"]["method"] == "knapsack"
    assert all(p["saved_cost"] <= report["bound"]["savings"] + 1e-6 for p in report["policies"])
