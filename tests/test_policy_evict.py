"""The learned eviction (streams/policy/eviction.py): the hot-path rank on hand-made entries,
sampled eviction on traces with known answers, the density table learned from the log
without reading its future, the shadow selection, and a fixed-seed run against LRU."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.policy import (
    ControlledCache,
    EvictingCache,
    EvictionConfig,
    EvictionTable,
    LRUCache,
    Request,
    default_budget,
    generate,
    replay,
    replay_learned_eviction,
)
from streams.policy.eviction import (
    RATE_TAU_S,
    DensityLearner,
    ExpertSelector,
    KeyCounts,
    fit_rate_prior,
    rate_alive,
    rate_hit_density,
)
from streams.policy.join import OutcomeJoin
from streams.policy.learned import ACTIONS
from streams.policy.simulator import Decision, ReplayLog


def req(t: float, key: str, *, size: int = 10, cost: float = 1.0, filt: str = "none") -> Request:
    return Request(t, key, size, cost, {"filter": filt})


# -- the hot-path rank -----------------------------------------------------------------------


def test_decayed_priority_is_count_decayed_times_cost_per_byte() -> None:
    t = EvictionTable.decayed(100.0)
    assert t.priority(10, 2.0, 3.0, 0, 0.0, 5.0) == pytest.approx(0.6)
    assert t.priority(10, 2.0, 3.0, 0, 100.0, 5.0) == pytest.approx(0.6 / math.e)
    # cheaper per byte ranks lower at the same count
    assert t.priority(20, 2.0, 3.0, 0, 0.0, 5.0) < t.priority(10, 2.0, 3.0, 0, 0.0, 5.0)


def test_tables_round_trip_through_json_and_bad_ones_are_refused() -> None:
    learner = DensityLearner(EvictionConfig(), 300.0)
    trace = [req(float(i), f"k{i % 3}") for i in range(50)]
    learner.observe(trace, [], 0, len(trace))
    table = learner.export(1e6)
    back = EvictionTable.from_json(json.loads(json.dumps(table.to_json())))
    assert back == table
    assert back.priority(10, 1.0, 4.0, 0, 1.0, 30.0) == table.priority(10, 1.0, 4.0, 0, 1.0, 30.0)
    dec = EvictionTable.decayed(30.0, version=7)
    assert EvictionTable.from_json(dec.to_json()) == dec
    with pytest.raises(ValueError, match="density must be"):
        EvictionTable.from_json({**table.to_json(), "density": [[1.0]]})
    with pytest.raises(ValueError, match="kind"):
        EvictionTable.from_json({"kind": "magic", "tau_s": 1.0})
    with pytest.raises(ValueError, match="kind"):
        EvictionTable.from_json({"kind": "decayed", "tau_s": -1.0})
    bad = table.to_json()
    bad["density"][0][0][0][0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        EvictionTable.from_json(bad)


def test_rate_priority_is_the_posterior_rate_times_the_chance_the_key_lives() -> None:
    # no hazard: the Gamma(a, b) posterior mean of the rate after the first request
    assert rate_alive(5.0, 30.0, 100.0, 0.5, 20.0, 0.0) == pytest.approx(4.5 / 120.0)
    t = EvictionTable.rate(0.5, 20.0, 0.0)
    assert t.tau_s == RATE_TAU_S and t.name == "rate0"
    assert t.priority(10, 2.0, 5.0, 0, 30.0, 100.0) == pytest.approx(4.5 / 120.0 * 0.2)
    # with a hazard the rank falls with idle time, faster for a key that used to be busy
    ages = [0.0, 1.0, 10.0, 100.0]
    hot = [rate_alive(100.0, a, 100.0, 0.5, 20.0, 1e-3) for a in ages]
    assert hot[0] == pytest.approx(99.5 / 120.0) and hot == sorted(hot, reverse=True)
    # a key that sent 100 requests in 100 s and then nothing for 30 s has most likely died:
    # it ranks below a slow key idle as long; without the hazard it would rank above
    hot_idle = rate_alive(100.0, 30.0, 130.0, 0.5, 20.0, 1e-3)
    slow_idle = rate_alive(3.0, 30.0, 130.0, 0.5, 20.0, 1e-3)
    assert hot_idle < slow_idle
    assert rate_alive(100.0, 30.0, 130.0, 0.5, 20.0, 0.0) > rate_alive(
        3.0, 30.0, 130.0, 0.5, 20.0, 0.0
    )


def test_rate_hit_density_is_hits_per_occupied_second_under_the_posterior() -> None:
    from scipy import stats

    # the closed form against the expectation over the Gamma(alpha, beta) posterior,
    # alpha below, at and above 1 (count 1 with a = 1: the limit form)
    for count, life, a, b, horizon in (
        (1.0, 0.0, 0.3, 30.0, 20.0),
        (1.0, 5.0, 1.0, 10.0, 50.0),
        (8.0, 100.0, 0.3, 30.0, 30.0),
    ):
        al, be = count - 1.0 + a, life + b
        post = stats.gamma(al, scale=1.0 / be)
        hits = post.expect(lambda x, t=horizon: -math.expm1(-x * t))
        occupied = post.expect(lambda x, t=horizon: -math.expm1(-x * t) / x, limit=200)
        got = rate_hit_density(count, 0.0, life, a, b, 0.0, horizon)
        assert got == pytest.approx(hits / occupied, rel=1e-5)
    # T -> 0: the posterior mean, i.e. rate_alive, with and without a hazard
    for h in (0.0, 1e-3):
        assert rate_hit_density(5.0, 30.0, 100.0, 0.5, 20.0, h, 1e-9) == pytest.approx(
            rate_alive(5.0, 30.0, 100.0, 0.5, 20.0, h), rel=1e-6
        )
    # same posterior mean (0.01/s), but one key was seen once: most draws of its rate bring
    # no hit within T, so it ranks below the key seen 11 times; rate_alive ties them
    once, often = (1.0, 0.0), (11.0, 1000.0)
    assert rate_alive(*once[:1], 0.0, once[1], 0.3, 30.0, 0.0) == pytest.approx(
        rate_alive(*often[:1], 0.0, often[1], 0.3, 30.0, 0.0)
    )
    d_once = rate_hit_density(once[0], 0.0, once[1], 0.3, 30.0, 0.0, 100.0)
    d_often = rate_hit_density(often[0], 0.0, often[1], 0.3, 30.0, 0.0, 100.0)
    assert d_once < 0.7 * d_often
    # with a hazard: a key dead (chance 1 - p, p as in rate_alive) has no hit and
    # occupies all of T
    count, idle, life, horizon = 20.0, 15.0, 100.0, 20.0
    p = rate_alive(count, idle, life, 0.3, 30.0, 1e-3) / rate_alive(
        count, idle, life, 0.3, 30.0, 0.0
    )
    hits = 1.0 - (130.0 / (130.0 + horizon)) ** 19.3
    occupied = hits / rate_hit_density(count, idle, life, 0.3, 30.0, 0.0, horizon)
    assert 0.05 < p < 0.95
    assert rate_hit_density(count, idle, life, 0.3, 30.0, 1e-3, horizon) == pytest.approx(
        p * hits / (p * occupied + (1.0 - p) * horizon)
    )
    # a long silence: likely dead, it occupies T for nothing
    assert rate_hit_density(50.0, 60.0, 100.0, 0.3, 30.0, 1e-3, 20.0) < 0.1 * rate_hit_density(
        50.0, 0.0, 100.0, 0.3, 30.0, 1e-3, 20.0
    )
    t = EvictionTable.rate(0.3, 30.0, 1e-3, horizon_s=20.0)
    assert t.priority(10, 2.0, 8.0, 0, 3.0, 100.0) == pytest.approx(
        rate_hit_density(8.0, 3.0, 100.0, 0.3, 30.0, 1e-3, 20.0) * 0.2
    )
    assert t.priority(10, 2.0, 8.0, 0, 3.0, 100.0) != EvictionTable.rate(0.3, 30.0, 1e-3).priority(
        10, 2.0, 8.0, 0, 3.0, 100.0
    )


def test_the_selector_sets_each_rate_tables_horizon_from_its_own_evictions() -> None:
    trace = dying_keys(horizon_s=700.0)
    for factor in (1.5, 0.0):
        cfg = EvictionConfig(
            update_every=2_000,
            density_taus_s=(),
            rate_horizon_factor=factor,
            rate_hazards_per_s=(0.0, 0.01),
        )
        sel = ExpertSelector(100, cfg)
        idle: list[list[float]] = [[], []]
        for i, r in enumerate(trace[:4_000]):
            sel.access(i, r)
            if (i + 1) % 2_000 == 0:
                for mine, shadow in zip(idle, sel.rate_shadows, strict=True):
                    mine.extend(e[2] for e in shadow.log.evictions)
                sel.update(trace, i + 1 - 2_000, i + 1)
        assert all(idle)
        got = [s.table.horizon_s for s in sel.rate_shadows]
        assert got == pytest.approx([factor * float(np.median(m)) for m in idle])
        assert (min(got) > 0.0) == (factor > 0.0)


def test_the_rate_prior_is_fitted_from_counts_alone() -> None:
    rng = np.random.default_rng(3)
    for a, b in ((0.3, 30.0), (2.0, 100.0)):
        lam = rng.gamma(a, 1.0 / b, size=20_000)
        exposure = rng.uniform(10.0, 500.0, size=20_000)
        fa, fb = fit_rate_prior(rng.poisson(lam * exposure), exposure)
        # the grid's steps are about 27% (a) and 32% (b)
        assert a / 1.5 < fa < a * 1.5 and b / 1.6 < fb < b * 1.6
        assert fa / fb == pytest.approx(a / b, rel=0.15)  # the mean rate
    assert fit_rate_prior(np.array([]), np.array([])) == (0.3, 30.0)


def test_rate_tables_round_trip_through_json_and_bad_ones_are_refused() -> None:
    t = EvictionTable.rate(0.25, 40.0, 1e-3, version=4)
    back = EvictionTable.from_json(json.loads(json.dumps(t.to_json())))
    assert back == t and back.priority(10, 1.0, 7.0, 0, 3.0, 60.0) == t.priority(
        10, 1.0, 7.0, 0, 3.0, 60.0
    )
    for field, value in (("prior_a", 0.0), ("prior_b", -1.0), ("hazard_per_s", -1e-3)):
        with pytest.raises(ValueError, match="rate table"):
            EvictionTable.from_json({**t.to_json(), field: value})
    with pytest.raises(ValueError, match="rate table"):
        EvictionTable.from_json({"kind": "rate", "tau_s": RATE_TAU_S, "prior_a": 1.0})
    with pytest.raises(ValueError, match="rate table"):
        EvictionTable.from_json({**t.to_json(), "prior_b": float("inf")})
    with_t = EvictionTable.rate(0.25, 40.0, 1e-3, version=5, horizon_s=25.0)
    assert EvictionTable.from_json(json.loads(json.dumps(with_t.to_json()))) == with_t
    for value in (-1.0, 1e-320, True):  # a subnormal T would divide by 0; true is no number
        with pytest.raises(ValueError, match="rate table"):
            EvictionTable.from_json({**with_t.to_json(), "horizon_s": value})
    old = {k: v for k, v in with_t.to_json().items() if k != "horizon_s"}  # published before
    assert EvictionTable.from_json(old).horizon_s == 0.0


def dying_keys(seed: int = 0, horizon_s: float = 2_000.0) -> list[Request]:
    """20 steady keys at 0.2 requests/s; every 30 s a new burst key that sends 1/s for 60 s
    and then nothing again (it dies). Equal sizes and costs."""
    rng = np.random.default_rng(seed)
    events: list[tuple[float, str]] = []
    for k in range(20):
        t = rng.exponential(5.0)
        while t < horizon_s:
            events.append((t, f"s{k}"))
            t += rng.exponential(5.0)
    for j, born in enumerate(np.arange(0.0, horizon_s, 30.0)):
        t = born + rng.exponential(1.0)
        while t < min(born + 60.0, horizon_s):
            events.append((t, f"b{j}"))
            t += rng.exponential(1.0)
    return [req(t, k) for t, k in sorted(events)]


def test_where_keys_die_the_selector_picks_a_rate_table_with_a_hazard() -> None:
    trace = dying_keys()
    cfg = EvictionConfig(
        update_every=2_000, taus_s=(30.0, 100.0), density_taus_s=(), rate_hazards_per_s=(0.0, 0.01)
    )
    sel = ExpertSelector(100, cfg)  # room for 10 of the 22 live keys
    for i, r in enumerate(trace):
        sel.access(i, r)
        if (i + 1) % 2_000 == 0:
            sel.update(trace, i + 1 - 2_000, i + 1)
    assert sel.prior is not None
    saved = {s.name: s.log.hits.count(True) for s in sel.shadows}
    # a dead burst key keeps a high count for a while: decayed counts and a rate with no
    # hazard keep it cached long after its last request; the hazard lets it go
    assert saved["rate0.01"] > 1.05 * max(saved["decayed30"], saved["decayed100"]), saved
    assert saved["rate0.01"] > 1.3 * saved["rate0"], saved
    assert sel.picks[-3:] == ["rate0.01"] * 3


def test_per_key_state_is_bounded_and_forgets_the_least_recent_keys() -> None:
    counts = KeyCounts((300.0, RATE_TAU_S), max_keys=100)
    for i in range(1_000):
        counts.observe(req(float(i), f"k{i}"))
        counts.observe(req(float(i) + 0.5, "hot"))  # requested all along: never forgotten
    assert len(counts.stats) <= 100 and counts.forgotten >= 900
    assert "hot" in counts.stats and counts.stats["hot"].counts[1] == pytest.approx(1_000)
    assert "k999" in counts.stats and "k0" not in counts.stats
    learner = DensityLearner(EvictionConfig(max_keys=100), 300.0)
    trace = [req(float(i), f"k{i}") for i in range(1_000)]
    learner.observe(trace, [], 0, len(trace))
    assert len(learner._stats) <= 100
    with pytest.raises(ValueError, match="max_keys"):
        KeyCounts((300.0,), max_keys=1)


def test_a_cached_key_forgotten_by_the_counts_is_ranked_by_its_new_stats() -> None:
    counts = KeyCounts((RATE_TAU_S,), max_keys=4)
    cache = EvictingCache(10_000, EvictionTable.rate(0.3, 30.0, 0.0), counts=counts)
    trace = [req(0.0, "a"), *(req(float(i), f"x{i}") for i in range(1, 10)), req(10.0, "a")]
    for i, r in enumerate(trace):
        counts.observe(r)
        cache.access(i, r)
    assert cache.log.hits[-1]  # still cached: the budget holds everything
    assert cache._entries["a"].stats is counts.stats["a"]  # not the forgotten object
    assert counts.stats["a"].first == 10.0


# -- sampled eviction with known answers ------------------------------------------------------


def test_the_frequent_key_survives_and_the_one_off_is_evicted() -> None:
    # room for two entries; "a" is requested every other step, the rest once each
    sim = EvictingCache(20, EvictionTable.decayed(1000.0), samples=8)
    trace = []
    for i in range(40):
        trace.append(req(float(2 * i), "a"))
        trace.append(req(float(2 * i + 1), f"once{i}"))
    replay(sim, trace)
    hits = [trace[i].key for i, h in enumerate(sim.log.hits) if h]
    assert hits == ["a"] * 39  # every request of "a" after the first is a hit
    assert sim.log.evictions  # one-offs made room for one-offs
    assert all(key.startswith("once") for _, key, _ in sim.log.evictions)
    assert all(idle >= 0 for _, _, idle in sim.log.evictions)


def test_a_miss_ranked_below_every_entry_is_bypassed_and_nothing_is_evicted() -> None:
    sim = EvictingCache(20, EvictionTable.decayed(1000.0), samples=8)
    trace = [
        req(0.0, "a", cost=5.0),
        req(1.0, "b", cost=5.0),
        req(2.0, "a", cost=5.0),
        req(3.0, "b", cost=5.0),
        req(4.0, "cheap", cost=0.1),
    ]
    replay(sim, trace)
    last = sim.log.decisions[-1]
    assert (last.index, last.decision.admitted) == (4, False)
    assert sim.log.evictions == []
    assert sim.used_bytes == 20


def test_a_table_needs_the_counts_it_ranks_by() -> None:
    sim = EvictingCache(100, EvictionTable.decayed(100.0))
    with pytest.raises(ValueError, match="no key counts"):
        sim.table = EvictionTable.decayed(42.0)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(0, 12), st.integers(1, 40), st.sampled_from(["none", "tag", "user"])),
        min_size=1,
        max_size=120,
    ),
    st.integers(1, 100),
)
def test_budget_holds_and_every_eviction_is_logged(
    rows: list[tuple[int, int, str]], budget: int
) -> None:
    sizes = {k: s for k, s, _ in rows}  # one size per key
    trace = [req(float(i), f"k{k}", size=sizes[k], filt=f) for i, (k, _, f) in enumerate(rows)]
    learner = DensityLearner(EvictionConfig(), 300.0)
    learner.observe(trace, [], 0, len(trace))
    for table in (EvictionTable.decayed(300.0), learner.export(trace[-1].time)):
        sim = EvictingCache(budget, table)
        held: dict[str, int] = {}
        for i, r in enumerate(trace):
            n_ev = len(sim.log.evictions)
            hit = sim.access(i, r)
            assert hit == (r.key in held)
            for _, key, _ in sim.log.evictions[n_ev:]:
                del held[key]
            if not hit and sim.log.decisions[-1].decision.admitted:
                held[r.key] = r.size
            assert sim.used_bytes == sum(held.values()) <= budget


# -- learning from the log ---------------------------------------------------------------------


def test_density_labels_come_only_from_the_past() -> None:
    trace = [req(0.0, "a"), req(3.0, "a")]
    learner = DensityLearner(EvictionConfig(), 300.0)
    learner.observe(trace, [], 0, 1)
    table = learner.export(2.0)  # the second request has not happened yet
    assert all(v == 0.0 for cube in table.density for mat in cube for row in mat for v in row)
    learner.observe(trace, [], 1, 2)
    table = learner.export(3.0)
    assert table.density[0][0][0][0] > 0.0  # count 1, filter none, new, idle 0: a hit came


def test_the_density_table_learns_that_personal_queries_never_repeat() -> None:
    trace = []
    t = 0.0
    for i in range(3_000):
        t += 0.05
        if i % 2:
            trace.append(req(t, f"user{i}", filt="user"))
        else:
            trace.append(req(t, f"shared{(i // 2) % 50}"))
    learner = DensityLearner(EvictionConfig(), 300.0)
    learner.observe(trace, [], 0, len(trace))
    table = learner.export(t)
    # first request (count 1), just made (idle 0): a shared key is worth far more
    new_user = table.priority(10, 1.0, 1.0, 3, 0.0, 0.0)
    new_shared = table.priority(10, 1.0, 1.0, 0, 0.0, 0.0)
    assert new_user < 0.1 * new_shared
    sim = EvictingCache(200, table)  # room for 20 of the 50 shared keys
    replay(sim, trace)
    # the personal entries that filled the empty cache give way (to each other at equal
    # rank, then to shared keys); after that no personal query is admitted
    assert not any(
        d.decision.admitted
        for d in sim.log.decisions
        if d.index > 200 and trace[d.index].key.startswith("user")
    )
    assert not any(key.startswith("shared") for _, key, _ in sim.log.evictions[:20])


def test_the_selector_picks_the_shadow_that_saved_most() -> None:
    # a stationary hot set with a long tail: long memory wins over short
    cfg = EvictionConfig(
        update_every=2_000, taus_s=(1.0, 1000.0), density_taus_s=(), rate_hazards_per_s=()
    )
    trace = generate("neardup", 8_000, 1)
    budget = default_budget(trace)
    sel = ExpertSelector(budget, cfg)
    for i, r in enumerate(trace[:6_000]):
        sel.access(i, r)
        if (i + 1) % 2_000 == 0:
            sel.update(trace, i + 1 - 2_000, i + 1)
    saved = [s.log.hits.count(1) for s in sel.shadows]
    assert saved[1] > saved[0]
    assert sel.picks[-1] == "decayed1000"


def test_learned_eviction_beats_lru_and_is_deterministic() -> None:
    trace = generate("latest", 20_000, 0)
    budget = default_budget(trace)
    lru = replay(LRUCache(budget), trace)
    cfg = EvictionConfig(update_every=2_000)
    run = replay_learned_eviction(trace, budget, cfg)
    assert run.result.saved_cost > 1.2 * lru.saved_cost
    assert run.result.peak_bytes <= budget
    assert len(run.picks) == 9  # one pick per period but the last
    again = replay_learned_eviction(trace, budget, cfg)
    assert (again.result, again.picks) == (run.result, run.picks)


# -- eviction events in the bandit's join ------------------------------------------------------


class _Admit300:
    name = "admit300"

    def decide(self, index: int, req: Request, ctx: object, state: object) -> Decision:
        return Decision("ttl300", True, 300.0, 1.0, "b")


def test_the_join_ends_an_admission_at_its_logged_eviction() -> None:
    sim = ControlledCache(20, _Admit300())  # room for two entries of 10 bytes
    trace = [req(0.0, "a"), req(1.0, "b"), req(2.0, "c"), req(50.0, "a")]
    replay(sim, trace)
    assert sim.log.evictions == [(2, "a", 2.0), (3, "b", 49.0)]  # GDSF tie: older first
    join = OutcomeJoin(tuple(t for _, t in ACTIONS))
    out = {j.index: j for j in [*join.advance(trace, sim.log, len(trace)), *join.flush()]}
    ttl300 = out[0].outcomes[[n for n, _ in ACTIONS].index("ttl300")]
    assert ttl300.observed and ttl300.held_s == pytest.approx(2.0)  # evicted at t=2
    # without the eviction events the same log holds "a" until its next request (a miss)
    blind = OutcomeJoin(tuple(t for _, t in ACTIONS))
    log = ReplayLog(sim.log.hits, sim.log.decisions)
    out = {j.index: j for j in [*blind.advance(trace, log, len(trace)), *blind.flush()]}
    assert out[0].outcomes[[n for n, _ in ACTIONS].index("ttl300")].held_s == pytest.approx(50.0)
