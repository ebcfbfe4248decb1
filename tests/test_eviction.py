"""Cost-aware eviction of the L0 ``ResultCache`` (streams.cache.eviction): GDSF against a
brute-force reference, budgets never exceeded, tenants evict only their own entries, the
``cache_eviction`` setting, a pluggable scorer, and the removal reasons listeners hear."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from streams.cache import CachedResult, ResultCache, query_key
from streams.cache.eviction import GDSFScorer, Slot
from streams.cache.policy import AdmissionDecision
from streams.cache.result_cache import REMOVAL_REASONS
from streams.config import Settings
from streams.index.model import Metric

DIM = 4


def entry(
    i: int, *, tenant: str = "t", cost: float = 1.0, hits: int = 3, index: str = "i"
) -> CachedResult:
    """Entry ``i`` of ``tenant/index``: ``hits`` result rows (its size), ``cost`` ms."""
    q = np.array([i, 1, 0, 0], dtype=np.float32)
    key = f"{tenant}/{index}"
    ids = tuple(f"id{j}" for j in range(hits))
    return CachedResult(
        query_key(key, Metric.COSINE, q, 8, None),
        key,
        Metric.COSINE,
        q,
        8,
        None,
        tuple(range(hits)),
        ids,
        tuple(1.0 - j / 100 for j in range(hits)),
        (None,) * hits,
        compute_ms=cost,
    )


@dataclass
class Recorder:
    """A removal listener that records (key, index key, reason, priority)."""

    seen: list[tuple[object, str, str, float]] = field(default_factory=list)

    def __call__(self, slot: Slot, reason: str) -> None:
        self.seen.append((slot.key, slot.entry.index_key, reason, slot.priority))

    def evicted(self) -> list[tuple[object, str, str, float]]:
        return [s for s in self.seen if s[2] == "evicted"]


# -- GDSF against a brute-force reference ---------------------------------------------------


class ReferenceGDSF:
    """GDSF as streams.policy.policies.GDSFCache states it, by brute force: priority
    ``L + (hits + 1) x cost / size``; the victim has the lowest priority and raises ``L``."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.L = 0.0
        self.items: dict[object, list[float]] = {}  # key -> [base, hits, cost, size]

    def h(self, key: object) -> float:
        base, hits, cost, size = self.items[key]
        return base + (hits + 1) * cost / size

    def put(self, key: object, cost: float, size: int) -> None:
        self.items.pop(key, None)
        self.items[key] = [self.L, 0, cost, size]

    def over(self) -> bool:
        return sum(it[3] for it in self.items.values()) > self.budget

    def evict(self, key: object) -> None:
        """The cache evicted ``key``: it must have had the lowest priority (ties allowed)."""
        lowest = min(self.h(k) for k in self.items)
        assert self.h(key) == pytest.approx(lowest, rel=1e-9, abs=1e-12)
        self.L = max(self.L, self.h(key))
        del self.items[key]

    def hit(self, key: object) -> None:
        it = self.items.get(key)
        if it is not None:
            it[1] += 1
            it[0] = self.L


ops = st.lists(
    st.tuples(
        st.sampled_from(["put", "put", "hit", "hit", "hit", "expire"]),
        st.integers(0, 9),  # which entry
        st.floats(0.05, 50.0),  # its cost (distinct floats: no ties in priority)
        st.integers(1, 8),  # its rows (its size)
    ),
    min_size=1,
    max_size=120,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, budget_entries=st.integers(2, 8))
def test_gdsf_keeps_exactly_what_the_reference_keeps(
    ops: list[tuple[str, int, float, int]], budget_entries: int
) -> None:
    budget = budget_entries * entry(0, hits=4).nbytes
    cache = ResultCache(budget)
    rec = Recorder()
    cache.add_removal_listener(rec)
    ref = ReferenceGDSF(budget)
    made: dict[int, CachedResult] = {}
    for op, i, cost, rows in ops:
        if op == "put":
            e = made[i] = entry(i, cost=round(cost, 6), hits=rows)
            before = len(rec.evicted())
            assert cache.put(e, 0).outcome in ("stored", "evicted")
            ref.put(e.key, e.compute_ms, e.nbytes)
            for key, _, _, priority in rec.evicted()[before:]:
                assert priority == pytest.approx(ref.h(key))
                ref.evict(key)
            assert not ref.over()
        elif op == "hit" and i in made:
            found = cache.hit(made[i].key)
            assert (found is not None) == (made[i].key in ref.items)
            ref.hit(made[i].key)
        elif op == "expire" and i in made and made[i].key in ref.items:
            stored = cache.hit(made[i].key, l0=False)
            assert stored is not None and cache.expire(stored[0])
            del ref.items[made[i].key]
        assert cache.stats().bytes <= budget
        assert {e.key for e in made.values() if e.key in cache} == set(ref.items)
        assert cache.inflation == pytest.approx(ref.L)


def test_a_hit_raises_an_entry_above_the_unhit_ones() -> None:
    size = entry(0).nbytes
    cache = ResultCache(2 * size)
    a, b = entry(0), entry(1)
    cache.put(a, 0)
    cache.put(b, 0)  # equal priorities: a, the older, would go first
    assert cache.hit(a.key) is not None
    cache.put(entry(2), 0)
    assert a.key in cache and b.key not in cache
    assert cache.inflation == pytest.approx(1.0 / size)  # b's priority: L=0 + 1 x 1 / size


def test_an_expensive_hot_entry_survives_a_scan_that_lru_would_let_through() -> None:
    """A scan of cheap one-off results pushes a hot, expensive entry out of an LRU cache;
    GDSF keeps it (the scan's entries are worth less per byte) and evicts the scan."""
    size = entry(0).nbytes
    kept = {}
    for name in ("gdsf", "lru"):
        cache = ResultCache(4 * size, eviction=name)  # type: ignore[arg-type]
        hot = entry(0, cost=40.0)
        cache.put(hot, 0)
        for _ in range(3):
            assert cache.hit(hot.key) is not None
        for i in range(1, 12):  # the scan: cheap, never hit again
            cache.put(entry(i, cost=0.5), 0)
        kept[name] = hot.key in cache
        assert cache.stats().evictions == 8 and cache.stats().eviction == name
    assert kept == {"gdsf": True, "lru": False}


def test_the_decisions_priority_counts_when_the_scorer_is_given_a_horizon() -> None:
    """With ``prior_s`` the admission's forecast (priority: rate x cost / size) adds to
    the value: of two equal entries the forecast one is kept. The default (0) ignores it:
    the older of two equal entries goes."""
    size = entry(0).nbytes
    hot = AdmissionDecision("admit", 1.0, "rules", "ttl300", 300_000, priority=1.0)
    score = GDSFScorer(prior_s=5.0)
    cache = ResultCache(size, eviction=score)
    cache.put(entry(0), 0, hot)
    assert cache.put(entry(1), 0).outcome == "evicted"  # lower H than the forecast one
    assert entry(0).key in cache and entry(1).key not in cache
    stored = cache.peek(entry(0).key)
    assert stored is not None
    assert cache.priority_of(entry(0).key) == pytest.approx(score.value(stored, 0, size))
    plain = ResultCache(size)
    plain.put(entry(0), 0, hot)
    assert plain.put(entry(1), 0).stored and entry(0).key not in plain


def test_the_heaps_stay_bounded_when_entries_leave_without_eviction() -> None:
    """Invalidated and replaced entries leave items in the heaps that no eviction pops;
    a put rebuilds a heap once they outnumber the live entries."""
    size = entry(0).nbytes
    cache = ResultCache(1 << 30, tenant_budget_bytes=50 * size)
    for i in range(60):  # the tenant's first evictions: its own heap exists from now on
        cache.put(entry(i), 0)
    for round_ in range(40):
        for i in range(100):
            cache.put(entry(1000 + i, cost=1.0 + round_), cache.get_seq("t/i"))
        cache.invalidate("t/i", (), ["id0"])  # every entry holds id0: all leave
    live = cache.stats().entries
    assert live == 0
    assert len(cache._heap) <= 2 * live + 1024 + 1
    assert all(len(h) <= 2 * 50 + 256 + 1 for h in cache._scope_heaps.values())


# -- budgets and scopes ------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(
        st.tuples(st.sampled_from("abc"), st.integers(0, 30), st.floats(0.1, 20.0), st.booleans()),
        min_size=1,
        max_size=100,
    ),
    eviction=st.sampled_from(["gdsf", "lru"]),
)
def test_a_tenant_over_its_budget_evicts_only_its_own_lowest_entries(
    ops: list[tuple[str, int, float, bool]], eviction: str
) -> None:
    size = entry(0).nbytes
    budgets = {"a": 3 * size, "b": 5 * size, "c": None}
    cache = ResultCache(12 * size, eviction=eviction)  # type: ignore[arg-type]
    for tenant, b in budgets.items():
        cache.set_tenant_budget(tenant, b)
    cache.set_index_budget("c/i", 2 * size)
    rec = Recorder()
    cache.add_removal_listener(rec)
    for tenant, i, cost, hit in ops:
        e = entry(i, tenant=tenant, cost=cost)
        if hit:
            cache.hit(e.key)
            continue
        global_before = cache.stats().bytes + e.nbytes > cache.budget_bytes
        before = len(rec.seen)
        cache.put(e, 0)
        evicted = [s for s in rec.seen[before:] if s[2] == "evicted"]
        if not global_before:  # only the tenant's (or its index's) budget was exceeded
            assert all(index_key == f"{tenant}/i" for _, index_key, _, _ in evicted)
        for t, b in budgets.items():
            assert b is None or cache.scope_bytes(f"t:{t}") <= b
        assert cache.scope_bytes("i:c/i") <= 2 * size
        assert cache.stats().bytes <= cache.budget_bytes


def test_a_tenants_victims_are_its_lowest_priority_entries() -> None:
    size = entry(0).nbytes
    cache = ResultCache(100 * size, tenant_budget_bytes=3 * size)
    for i, cost in enumerate((5.0, 0.2, 9.0)):
        cache.put(entry(i, tenant="a", cost=cost), 0)
    other = entry(50, tenant="b", cost=0.01)  # cheaper than all of a's: not a's to evict
    cache.put(other, 0)
    rec = Recorder()
    cache.add_removal_listener(rec)
    cache.put(entry(3, tenant="a", cost=3.0), 0)
    assert [k for k, *_ in rec.evicted()] == [entry(1, tenant="a").key]  # a's cheapest
    assert other.key in cache
    cache.set_tenant_budget("a", size)  # shrinking evicts a's lowest until it fits
    assert [k for k, *_ in rec.evicted()[1:]] == [
        entry(3, tenant="a").key,
        entry(0, tenant="a").key,
    ]
    assert entry(2, tenant="a").key in cache


# -- the setting, the scorer interface, the reasons --------------------------------------------


def test_the_eviction_setting_defaults_to_gdsf_and_refuses_unknown_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings().cache_eviction == "gdsf"
    monkeypatch.setenv("STREAMVEC_CACHE_EVICTION", "lru")
    assert Settings().cache_eviction == "lru"
    monkeypatch.setenv("STREAMVEC_CACHE_EVICTION", "random")
    with pytest.raises(ValidationError):
        Settings()
    with pytest.raises(ValueError, match="eviction"):
        ResultCache(1 << 20, eviction="random")  # type: ignore[arg-type]
    assert ResultCache(1 << 20).stats().as_dict()["eviction"] == "gdsf"


class TableScorer:
    """A learned eviction table's shape: value per byte by index (non-decreasing in hits)."""

    def __init__(self, table: Mapping[str, float]) -> None:
        self.table = table

    def value(self, entry: CachedResult, hits: int, nbytes: int) -> float:
        return self.table.get(entry.index_key, 0.0) * (hits + 1)


def test_a_scorer_plugs_in_and_orders_eviction() -> None:
    size = entry(0).nbytes
    cache = ResultCache(3 * size, eviction=TableScorer({"t/gold": 10.0, "t/tin": 1.0}))
    gold = [entry(i, index="gold", cost=0.1) for i in range(2)]
    tin = [entry(i, index="tin", cost=50.0) for i in range(2)]
    for e in (gold[0], tin[0], gold[1], tin[1]):
        cache.put(e, 0)
    assert tin[0].key not in cache  # the table values tin lowest, whatever its cost
    assert all(e.key in cache for e in gold) and tin[1].key in cache
    assert cache.stats().eviction == "gdsf"


def test_listeners_hear_why_each_entry_left() -> None:
    size = entry(0).nbytes
    cache = ResultCache(2 * size)
    rec = Recorder()
    cache.add_removal_listener(rec)
    e0, e1, e2 = entry(0), entry(1), entry(2)
    cache.put(e0, 0)
    cache.put(e0, 0)  # the same key again: the older one is replaced
    cache.put(e1, 0)
    cache.put(e2, 0)  # over budget: one goes
    stored = cache.hit(e2.key)
    assert stored is not None and cache.expire(stored[0])
    assert not cache.expire(stored[0])  # already gone: nothing to expire
    cache.invalidate("t/i", (), ["id0"])  # a delete of one of its rows
    assert cache.put(e0, cache.get_seq("t/i")).stored
    cache.reset_index("t/i")
    reasons = [r for _, _, r, _ in rec.seen]
    assert reasons == ["replaced", "evicted", "expired", "invalidated", "dropped"]
    assert set(reasons) <= set(REMOVAL_REASONS)
    assert rec.seen[1][3] > 0 and all(p == 0 for *_, r, p in rec.seen if r != "evicted")
    assert cache.stats().expirations == 1 and math.isfinite(cache.inflation)
