"""``cache_eviction: learned``: the L0 cache evicts by the EvictionTable the policy learner
publishes (streams.cache.learned_eviction): GDSF until a table is in force, sampled
eviction by the table after, per-tenant budgets kept, the table delivered, reloaded and
rolled back through the ``policy`` topic."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.cache import CachedResult, ResultCache, query_key
from streams.cache.eviction import Slot
from streams.cache.learned_eviction import (
    HolderTables,
    InstalledTable,
    LearnedEviction,
    StaticTables,
    eviction_payload,
    filter_kind_of,
    parse_eviction_payload,
)
from streams.cache.policy import GuardConfig, PolicyHolder
from streams.config import Settings
from streams.index.filters import Filter, NumericClause, TagClause
from streams.index.model import IndexConfig, Metric, VectorUpsert
from streams.policy.eviction import (
    AGE_EDGES_S,
    COUNT_EDGES,
    LIFE_EDGES_S,
    RATE_TAU_S,
    EvictingCache,
    EvictionTable,
)
from streams.policy.learner import OnlineLearner, policy_status, publish_policy, read_policies
from streams.policy.trace import Request
from streams.service.api import SearchRequest
from tests.rigs import Rig
from tests.test_policy_online import LoopRig

DIM = 4
TAG = Filter((TagClause("color", ("red",)),))
RANGE = Filter((NumericClause("price", "<", 3.0),))
SHAPE = (len(COUNT_EDGES) + 1, 5, len(LIFE_EDGES_S) + 1, len(AGE_EDGES_S) + 1)


class Clock:
    """A hand-moved clock for the per-key stats (seconds)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def entry(
    i: int,
    *,
    tenant: str = "t",
    cost: float = 1.0,
    filter: Filter | None = None,
    index: str = "i",
) -> CachedResult:
    q = np.array([i, 1, 0, 0], dtype=np.float32)
    key = f"{tenant}/{index}"
    ids = ("a", "b", "c")
    return CachedResult(
        query_key(key, Metric.COSINE, q, 8, filter),
        key,
        Metric.COSINE,
        q,
        8,
        filter,
        (0, 1, 2),
        ids,
        (1.0, 0.9, 0.8),
        (None,) * 3,
        compute_ms=cost,
    )


def table(fn: Any, version: int = 1) -> EvictionTable:
    """A density table with ``fn(f, x, l, a)`` in every cell (count bin, filter kind,
    lifetime bin, idle-age bin)."""
    dens = np.fromfunction(np.vectorize(fn), SHAPE, dtype=int).astype(np.float64)
    return EvictionTable.from_json(
        {"version": version, "kind": "density", "tau_s": 300.0, "density": dens.tolist()}
    )


class Evicted:
    def __init__(self) -> None:
        self.keys: list[object] = []

    def __call__(self, slot: Slot, reason: str) -> None:
        if reason == "evicted":
            self.keys.append(slot.key)


def learned_cache(budget_entries: int, **kw: Any) -> tuple[ResultCache, StaticTables, Clock]:
    clock, tables = Clock(), StaticTables()
    cache = ResultCache(
        budget_entries * entry(0).nbytes,
        eviction=LearnedEviction(tables, clock=clock, seed=1),
        **kw,
    )
    return cache, tables, clock


# -- the table on the hot path ----------------------------------------------------------------


def random_ops(seed: int, n: int) -> list[tuple[int, float, bool]]:
    """``n`` random operations on 12 keys: (entry number, cost, hit or put)."""
    rng = np.random.default_rng(seed)
    return [
        (int(rng.integers(0, 12)), float(rng.uniform(0.1, 20)), rng.random() < 0.5)
        for _ in range(n)
    ]


def evictions_of(cache: ResultCache, ops: list[tuple[int, float, bool]]) -> list[Any]:
    """The keys ``cache`` evicts while it runs ``ops`` (hits of ``entry(i)``, or puts)."""
    rec = Evicted()
    cache.add_removal_listener(rec)
    for i, cost, hit in ops:
        if hit:
            cache.hit(entry(i).key)
        else:
            cache.put(entry(i, cost=cost), 0)
    return rec.keys


def test_without_a_table_learned_evicts_exactly_as_gdsf() -> None:
    ops = random_ops(3, 300)
    seen = [evictions_of(c, ops) for c in (ResultCache(5 * entry(0).nbytes), learned_cache(5)[0])]
    assert seen[0] and seen[0] == seen[1]
    assert learned_cache(1)[0].stats().eviction == "learned"


def test_an_installed_table_picks_the_victim_gdsf_would_keep() -> None:
    cache, tables, clock = learned_cache(3)
    rec = Evicted()
    cache.add_removal_listener(rec)
    hot = entry(0, cost=50.0)  # unfiltered, expensive, hit often: GDSF's keeper
    cache.put(hot, 0)
    for _ in range(5):
        cache.hit(hot.key)
    cache.put(entry(1, cost=0.1, filter=TAG), 0)
    cache.put(entry(2, cost=0.1, filter=TAG), 0)
    # the table values tag-filtered entries 1000x more than unfiltered ones
    tables.install("t/i", table(lambda f, x, ln, a: 1000.0 if x == 1 else 1.0), by_filter=True)
    clock.t += 1.0
    out = cache.put(entry(3, cost=0.1, filter=TAG), 0)
    assert out.stored and rec.keys == [hot.key]
    # the table gone (e.g. a guardrail fell back): GDSF again, the cheap unhit entry goes
    tables.install("t/i", None)
    cache.put(entry(4, cost=0.1, filter=TAG), 0)
    assert rec.keys[1] in {entry(i, filter=TAG).key for i in (1, 2, 3)}
    assert cache.learned is not None and cache.learned.counts["learned"] == 1


def test_a_miss_ranked_below_every_sample_is_evicted_by_its_own_put() -> None:
    cache, tables, _ = learned_cache(3)
    tables.install("*", table(lambda f, x, ln, a: 1.0))  # same density: cost/size decides
    for i in range(3):
        cache.put(entry(i, cost=10.0), 0)
    out = cache.put(entry(9, cost=0.01), 0)
    assert out.outcome == "evicted" and entry(9).key not in cache
    assert all(entry(i).key in cache for i in range(3))
    assert cache.learned is not None and cache.learned.counts["bypassed"] == 1


@pytest.mark.parametrize(
    "tab",
    [
        EvictionTable.rate(0.3, 30.0, 1e-3, horizon_s=25.0),  # the hit density over 25 s
        EvictionTable.rate(0.3, 30.0, 1e-3),
        EvictionTable.decayed(300.0),
        table(lambda f, x, ln, a: 1.0 + f + 3 * ln + 0.1 * a),
    ],
    ids=["rate-horizon", "rate", "decayed", "density"],
)
def test_node_and_simulator_rank_the_same_key_state_alike(tab: EvictionTable) -> None:
    """The same requests of one key (stored, then hits) seen by a node's cache and by the
    simulator's: both rank it the same at several later times (the node gives a ``rate``
    table the total count, the simulator its count decayed with RATE_TAU_S, equal to
    1e-7)."""
    clock = Clock()
    learned = LearnedEviction(StaticTables(), clock=clock)
    e = entry(0, cost=3.0)
    slot = Slot(e.key, e, e.nbytes)
    sim = EvictingCache(1 << 20, tab, taus_s=(300.0, RATE_TAU_S))
    for i, dt in enumerate((0.0, 2.0, 3.0, 40.0, 41.5, 160.0)):
        clock.t = 1000.0 + dt
        if i == 0:
            learned.added(slot)
        else:
            learned.hit(e.key)
        sim.access(i, Request(clock.t, "k", e.nbytes, 3.0, {"filter": "none"}))
    for later in (0.0, 5.0, 60.0, 400.0):
        now = clock.t + later
        node = learned.priority(slot, InstalledTable(tab), now)
        assert node > 0.0 and node == pytest.approx(sim.priority_of("k", now), rel=1e-6)


def test_a_hit_updates_the_keys_decayed_and_total_counts_and_last_request() -> None:
    cache, _, clock = learned_cache(4)
    e = entry(0, filter=RANGE)
    cache.put(e, 0)
    learned = cache.learned
    assert learned is not None
    s = learned.state(e.key)
    assert s is not None and (s.count, s.first, s.last, s.kind) == (1.0, 1000.0, 1000.0, 2)
    assert s.total == 1.0
    clock.t += 300.0  # one tau: the old count decays to 1/e; the total does not
    cache.hit(e.key)
    assert s.count == pytest.approx(1.0 + np.exp(-1.0)) and s.last == 1300.0
    assert s.first == 1000.0 and s.total == 2.0
    assert filter_kind_of(None) == 0 and filter_kind_of(TAG) == 1


def test_the_density_table_ranks_idle_rarely_used_entries_first() -> None:
    """A density-shaped table: the longer idle, the lower the density (as learned on
    stationary traces): after a pause the entry hit just now survives, the idle ones go."""
    cache, tables, clock = learned_cache(3)
    tables.install("*", table(lambda f, x, ln, a: 10.0 ** (-a)))
    for i in range(3):
        cache.put(entry(i), 0)
    clock.t += 30.0
    cache.hit(entry(1).key)
    rec = Evicted()
    cache.add_removal_listener(rec)
    cache.put(entry(7), 0)
    cache.put(entry(8), 0)
    assert set(rec.keys) == {entry(0).key, entry(2).key}


budget_ops = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c"]),
        st.integers(0, 9),
        st.floats(0.05, 50.0),
        st.booleans(),
        st.sampled_from([None, TAG, RANGE]),
    ),
    min_size=1,
    max_size=100,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=budget_ops, step=st.floats(0.0, 20.0))
def test_budgets_hold_and_a_tenant_over_budget_evicts_only_its_own(
    ops: list[tuple[str, int, float, bool, Filter | None]], step: float
) -> None:
    size = entry(0).nbytes
    cache, tables, clock = learned_cache(12)
    tables.install("*", table(lambda f, x, ln, a: (f + 1) * (x + 1) / (a + 1)), by_filter=True)
    budgets = {"a": 3 * size, "b": 5 * size, "c": None}
    for tenant, b in budgets.items():
        cache.set_tenant_budget(tenant, b)
    cache.set_index_budget("c/i", 2 * size)
    rec: list[tuple[str, str]] = []
    cache.add_removal_listener(lambda slot, reason: rec.append((slot.entry.index_key, reason)))
    for tenant, i, cost, hit, f in ops:
        clock.t += step
        e = entry(i, tenant=tenant, cost=cost, filter=f)
        if hit:
            cache.hit(e.key)
            continue
        global_over = cache.stats().bytes + e.nbytes > cache.budget_bytes
        before = len(rec)
        cache.put(e, 0)
        evicted = [k for k, why in rec[before:] if why == "evicted"]
        if not global_over:
            assert all(k == f"{tenant}/i" for k in evicted)
        for t, b in budgets.items():
            assert b is None or cache.scope_bytes(f"t:{t}") <= b
        assert cache.scope_bytes("i:c/i") <= 2 * size
        assert cache.stats().bytes <= cache.budget_bytes
    learned = cache.learned
    assert learned is not None
    assert learned.stats()["entries"] == cache.stats().entries


def test_the_setting_accepts_learned() -> None:
    assert Settings(cache_eviction="learned").cache_eviction == "learned"
    assert ResultCache(1 << 20, eviction="learned").learned is not None
    assert ResultCache(1 << 20).learned is None


# -- the table on the policy topic ------------------------------------------------------------


def record(version: int, evict: str | None, **kw: Any) -> dict[str, Any]:
    return {
        "tenant": "acme",
        "index": "docs",
        "version": version,
        "kind": "table",
        "table": [],
        "model": None,
        "model_format": None,
        "guardrails": {
            "max_staleness_ms": 300_000,
            "p99_budget_ms": 0.0,
            "min_hit_rate": kw.get("min_hit_rate", 0.0),
            "canary_share": 1.0,
        },
        "parent_version": None,
        "reason": "test",
        "eviction_table": evict,
        "created_ms": int(time.time() * 1000),
    }


def test_payload_round_trips_and_malformed_ones_are_refused() -> None:
    t = table(lambda f, x, ln, a: f + a * 0.5, version=4)
    back = parse_eviction_payload(eviction_payload(t, by_filter=True))
    assert back.table == t and back.by_filter
    for bad in ("{", "[]", '{"table": 3}', '{"table": {"kind": "density", "tau_s": 1}}'):
        with pytest.raises(ValueError):
            parse_eviction_payload(bad)


def test_the_holder_installs_rolls_back_and_falls_back_to_gdsf() -> None:
    holder = PolicyHolder(1 << 20, guard=GuardConfig(decision_budget_us=1e9, min_searches=10))
    src = HolderTables(holder)
    assert src.table_for("acme/docs") is None
    t1 = table(lambda f, x, ln, a: 1.0, version=1)
    t2 = table(lambda f, x, ln, a: 2.0, version=2)
    holder.apply(record(1, eviction_payload(t1)))
    found = src.table_for("acme/docs")
    assert found is not None and found.table == t1
    holder.apply(record(2, eviction_payload(t2)))
    assert src.table_for("acme/docs").table == t2  # type: ignore[union-attr]
    rolled = holder.rollback("acme/docs", 1)
    assert rolled["eviction_table"] == eviction_payload(t1)
    assert src.table_for("acme/docs").table == t1  # type: ignore[union-attr]
    holder.apply(record(4, "not json"))  # admission table in force, eviction: GDSF
    assert src.table_for("acme/docs") is None and src.rejected == 1
    holder.apply(record(5, eviction_payload(t2), min_hit_rate=0.9))
    assert src.table_for("acme/docs") is not None
    for _ in range(10):  # a 0 hit rate trips min_hit_rate: the rules, and GDSF, decide
        holder.record_search("acme", "acme/docs", False, 1.0)
    assert holder.in_force("acme/docs") is None and src.table_for("acme/docs") is None


# -- on a node, through the learner -------------------------------------------------------------


class LearnedRig(LoopRig):
    """A LoopRig whose node's cache evicts by the learned tables."""

    budget = 64 << 20

    def node_options(self) -> dict[str, Any]:
        return {
            **super().node_options(),
            "cache_eviction": "learned",
            "cache_budget_bytes": self.budget,
        }


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[LearnedRig]:
    r = LearnedRig(tmp_path)
    yield r
    r.close()


def fill(rig: Rig, n: int = 100) -> None:
    rig.node.service.create_index(IndexConfig("acme", "docs", DIM, recipe="Flat"))
    rng = np.random.default_rng(0)
    for i in range(n):
        rig.node.service.upsert(
            VectorUpsert("acme", "docs", f"v{i}", rng.standard_normal(DIM).astype(np.float32))
        )
    assert rig.node.catch_up(30)


def test_the_learner_publishes_a_table_the_node_applies_and_a_restart_reloads(
    rig: LearnedRig,
) -> None:
    fill(rig)
    rng = np.random.default_rng(1)
    pool = [rng.standard_normal(DIM).astype(np.float32) for _ in range(40)]
    p = 1 / np.arange(1, 41)
    for i in rng.choice(40, size=400, p=p / p.sum()):
        rig.node.service.search(SearchRequest("acme", "docs", pool[int(i)], 5))
    loop = rig.node.policy_loop
    assert loop is not None and loop.emitter.flush(10)

    few = OnlineLearner(
        rig.log,
        rig.topics,
        rig.codec,
        budget_bytes=64 << 20,
        eviction_min_requests=10_000,
        group="few",
    )
    first = few.run_to_end()
    assert first and all(r["eviction_table"] is None for r in first)  # not enough yet
    few.close()
    learner = OnlineLearner(
        rig.log, rig.topics, rig.codec, budget_bytes=64 << 20, eviction_min_requests=300
    )
    published = learner.run_to_end()
    learner.close()
    assert published and published[-1]["eviction_table"] is not None
    sent = parse_eviction_payload(published[-1]["eviction_table"])
    # 400 searches: the selector has no pick yet (its warm-up is 2,500): the start rule
    assert sent.table == EvictionTable.decayed(300.0) and not sent.by_filter
    version = published[-1]["version"]

    cache = rig.node.cache
    assert cache is not None and cache.learned is not None
    deadline = time.monotonic() + 10
    while loop.holder.current("acme/docs") is None or (
        loop.holder.current("acme/docs").version != version  # type: ignore[union-attr]
    ):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    live = cache.learned.source.table_for("acme/docs")
    assert live is not None and live.table == sent.table  # applied without a restart

    rig.restart_node()
    cache = rig.node.cache
    assert cache is not None and cache.learned is not None
    reloaded = cache.learned.source.table_for("acme/docs")
    assert reloaded is not None and reloaded.table == sent.table

    # a restarted learner with too few new events carries the table forward
    again = OnlineLearner(
        rig.log,
        rig.topics,
        rig.codec,
        budget_bytes=64 << 20,
        eviction_min_requests=10_000,
        update_every=1,
    )
    for q in pool[:5]:
        rig.node.service.search(SearchRequest("acme", "docs", q, 5))
    assert rig.node.policy_loop is not None and rig.node.policy_loop.emitter.flush(10)
    newer = again.run_to_end()
    again.close()
    assert newer and newer[-1]["eviction_table"] == published[-1]["eviction_table"]

    # a learner for nodes that do not evict by the table runs no shadow caches, and
    # carries the newest table forward unchanged
    plain = OnlineLearner(rig.log, rig.topics, rig.codec, budget_bytes=64 << 20,
                          eviction_min_requests=1, eviction_tables=False, group="plain")
    carried = plain.run_to_end()
    plain.close()
    assert carried and all(st.selector is None for st in plain._indexes.values())
    assert carried[-1]["eviction_table"] == published[-1]["eviction_table"]


def test_a_node_evicts_by_the_published_table_and_rollback_restores_the_old_one(
    rig: LearnedRig,
) -> None:
    fill(rig)
    rng = np.random.default_rng(2)
    qs = [rng.standard_normal(DIM).astype(np.float32) for _ in range(6)]
    cache = rig.node.cache
    assert cache is not None and rig.node.service.cache_layers is not None
    rig.node.service.cache_layers.lazy_offers = False  # each search below stores its entry
    rig.node.service.search(SearchRequest("acme", "docs", qs[0], 5))
    size = cache.stats().bytes
    assert size > 0
    cache.budget_bytes = int(3.5 * size)  # three entries fit
    # v1: the longer idle the better, few requests better than many (anti-GDSF);
    # v2: the opposite (the usual shape). Sent through the policy topic.
    anti = table(lambda f, x, ln, a: 10.0 ** (2 * a - 4 * f), version=1)
    usual = table(lambda f, x, ln, a: 10.0 ** (4 * f - 2 * a), version=2)
    publish_policy(rig.log, rig.topics, rig.codec, record(1, eviction_payload(anti)))
    holder = rig.node.policy_loop.holder  # type: ignore[union-attr]
    deadline = time.monotonic() + 10
    while holder.current("acme/docs") is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    rec = Evicted()
    cache.add_removal_listener(rec)
    for q in qs[1:3]:
        rig.node.service.search(SearchRequest("acme", "docs", q, 5))
    time.sleep(0.5)  # entries 0-2 idle (age bin >= 2)
    for _ in range(4):  # entry 2 hot again: count bin >= 2, idle ~0
        rig.node.service.search(SearchRequest("acme", "docs", qs[2], 5))
    rig.node.service.search(SearchRequest("acme", "docs", qs[3], 5))
    evicted = list(rec.keys)
    hot = rig.node.service.search(SearchRequest("acme", "docs", qs[2], 5)).debug["layer"]
    assert len(evicted) == 1 and hot != "L0"  # the hot entry went (GDSF keeps it: hits)

    publish_policy(rig.log, rig.topics, rig.codec, record(2, eviction_payload(usual)))
    record3 = holder.rollback("acme/docs", 1)  # back to v1's table
    assert parse_eviction_payload(record3["eviction_table"]).table == anti
    assert cache.learned is not None
    now = cache.learned.source.table_for("acme/docs")
    assert now is not None and now.table == anti
    assert [r["version"] for r in read_policies(rig.log, rig.topics, rig.codec)] == [1, 2]
    shown = policy_status(rig.node.service, "acme", "docs")["eviction_table"]
    assert shown == {
        "version": 1,
        "kind": "density",
        "tau_s": 300.0,
        "by_filter": False,
        "applied": True,
    }
