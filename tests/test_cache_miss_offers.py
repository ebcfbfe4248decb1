"""The cheaper miss paths (docs/benchmarks.md, "Miss path, session 3 (helper E)"): the
doorkeeper (``cache_admit_after 2``), lazy offers (``cache_lazy_offers``) and L2's
projected prefilter keep the cache's guarantees: nothing stale is ever served, a parked
entry goes through the put's race check, the query log records the decisions, and the
prefilter finds exactly what the full scan finds within the threshold."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.cache import CachedResult, ResultCache
from streams.cache.controller import CacheController, CacheLookup
from streams.cache.doorkeeper import FIRST_SEEN, Doorkeeper
from streams.cache.eviction import Slot
from streams.cache.invalidation import UpsertRow
from streams.cache.keys import QueryKey
from streams.cache.semantic import PROJ_DIMS, SemanticIndex
from streams.index.model import (
    CacheSettings,
    Consistency,
    Hit,
    IndexConfig,
    Metric,
    VectorUpsert,
)
from streams.service.api import SearchRequest
from tests.rigs import Rig

DIM = 16


def _config(index: str = "i", layers: tuple[str, ...] | None = None) -> IndexConfig:
    cache = None if layers is None else CacheSettings(layers)
    return IndexConfig("t", index, DIM, metric=Metric.COSINE, recipe="Flat", cache=cache)


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def _entry(look: CacheLookup, c: IndexConfig, q: np.ndarray, ids: tuple[str, ...]) -> CachedResult:
    scores = tuple(1.0 - 0.1 * i for i in range(len(ids)))
    return CachedResult(
        look.qkey,
        c.key,
        c.metric,
        q,
        5,
        None,
        tuple(range(len(ids))),
        ids,
        scores,
        (None,) * len(ids),
        ("tok",),
        compute_ms=1.0,
    )


# -- the doorkeeper ------------------------------------------------------------------------


def test_doorkeeper_lets_a_key_through_on_its_second_miss_and_stays_bounded() -> None:
    dk = Doorkeeper(8)
    assert dk.admit("a") is False and "a" in dk
    assert dk.admit("a") is True and dk.admit("a") is True
    for i in range(100):  # many first misses: two generations of at most 4 keys
        dk.admit(f"k{i}")
        assert len(dk) <= 8
    assert "a" not in dk and dk.admit("a") is False  # forgotten: a first miss again
    assert dk.stats()["first_seen"] == 102 and dk.stats()["seen_before"] == 2
    with pytest.raises(ValueError):
        Doorkeeper(1)


def test_doorkeeper_keeps_a_repeating_key_across_rotations() -> None:
    dk = Doorkeeper(8)
    dk.admit("hot")
    for i in range(40):
        dk.admit(f"k{i}")
        if i % 3 == 0:
            assert dk.admit("hot") is True  # copied into the new generation each time


def test_controller_with_doorkeeper_offers_on_the_second_miss_only() -> None:
    with pytest.raises(ValueError):
        CacheController(ResultCache(1 << 20), admit_after=3)
    ctl = CacheController(ResultCache(1 << 20), admit_after=2)
    c = _config()
    q = _unit(np.random.default_rng(1))
    first = ctl.lookup(c, q, 5, None)
    assert first.layer == "none" and first.offer is False
    assert ctl.offer(first, _entry(first, c, q, ("a", "b"))) is None  # held: nothing stored
    assert first.qkey not in ctl.cache
    second = ctl.lookup(c, q, 5, None)
    assert second.layer == "none" and second.offer is True
    out = ctl.offer(second, _entry(second, c, q, ("a", "b")))
    assert out is not None and out.stored
    assert ctl.lookup(c, q, 5, None).layer == "L0"
    assert ctl.stats()["doorkeeper"]["first_seen"] == 1


def test_doorkeeper_keys_an_l1_index_by_its_tolerant_key() -> None:
    ctl = CacheController(ResultCache(1 << 20), admit_after=2)
    c = _config("tol", ("L0", "L1"))
    q = _unit(np.random.default_rng(2))
    assert ctl.lookup(c, q, 5, None).offer is False
    scaled = ctl.lookup(c, q * np.float32(3.0), 5, None)  # a new L0 key, the same L1 key
    assert scaled.offer is True


# -- lazy offers ---------------------------------------------------------------------------


def _lazy() -> tuple[CacheController, IndexConfig]:
    return CacheController(ResultCache(1 << 20), lazy_offers=True), _config()


def test_a_lazy_offer_parks_and_the_repeat_stores_it_and_hits() -> None:
    ctl, c = _lazy()
    removed: list[Slot] = []
    ctl.cache.add_removal_listener(lambda slot, reason: removed.append(slot))
    q = _unit(np.random.default_rng(3))
    look = ctl.lookup(c, q, 5, None)
    out = ctl.offer(look, _entry(look, c, q, ("a", "b")))
    assert out is not None and out.outcome == "parked" and out.decision.action == "admit"
    assert look.qkey not in ctl.cache and ctl.cache.stats().puts == 0
    again = ctl.lookup(c, q, 5, None)
    assert again.layer == "L0" and again.entry is not None and again.entry.ids == ("a", "b")
    assert ctl.stats()["parked"]["promoted"] == 1 and ctl.stats()["parked"]["entries"] == 0
    # the slot's stored time is the park time (the learner joins removals with it)
    ctl.cache.invalidate_ids(c.key, ["a"])
    assert len(removed) == 1 and removed[0].stored_s > 0
    assert ctl.lookup(c, q, 5, None).layer == "none"


def test_a_parked_entry_is_checked_against_the_writes_since_its_search() -> None:
    ctl, c = _lazy()
    q = _unit(np.random.default_rng(4))
    look = ctl.lookup(c, q, 5, None)
    entry = _entry(look, c, q, ("a", "b", "c", "d", "e"))
    assert ctl.offer(look, entry) is not None
    # a write that enters its top 5 is reported while it is parked
    ctl.cache.invalidate(c.key, [UpsertRow("new", q, (), {})])
    again = ctl.lookup(c, q, 5, None)
    assert again.layer == "none"  # stale: refused by the late put, never served
    assert ctl.stats()["parked"]["not_stored"] == 1 and look.qkey not in ctl.cache


def test_a_parked_entry_of_a_reset_index_is_never_served() -> None:
    ctl, c = _lazy()
    q = _unit(np.random.default_rng(5))
    look = ctl.lookup(c, q, 5, None)
    ctl.offer(look, _entry(look, c, q, ("a",)))
    ctl.cache.reset_index(c.key)
    assert ctl.lookup(c, q, 5, None).layer == "none"


def test_parked_entries_are_bounded_oldest_dropped_first() -> None:
    ctl = CacheController(ResultCache(1 << 20), lazy_offers=True, parked_entries=3)
    c = _config()
    rng = np.random.default_rng(6)
    qs = [_unit(rng) for _ in range(5)]
    for q in qs:
        look = ctl.lookup(c, q, 5, None)
        ctl.offer(look, _entry(look, c, q, ("a",)))
    s = ctl.stats()["parked"]
    assert s["entries"] == 3 and s["dropped"] == 2 and s["bytes"] > 0
    assert ctl.lookup(c, qs[0], 5, None).layer == "none"  # dropped: a miss
    assert ctl.lookup(c, qs[4], 5, None).layer == "L0"
    tiny = CacheController(ResultCache(1 << 20), lazy_offers=True, parked_bytes=10)
    look = tiny.lookup(c, qs[0], 5, None)
    out = tiny.offer(look, _entry(look, c, qs[0], ("a",)))  # over the limit: stored at once
    assert out is not None and out.stored


def test_lazy_offers_leave_tolerant_indexes_eager() -> None:
    ctl = CacheController(ResultCache(1 << 20), lazy_offers=True, l2_threshold=0.01)
    c = _config("sem", ("L0", "L2"))
    q = _unit(np.random.default_rng(7))
    look = ctl.lookup(c, q, 5, None)
    out = ctl.offer(look, _entry(look, c, q, ("a",)))
    assert out is not None and out.stored
    near = q + np.float32(1e-3) * _unit(np.random.default_rng(8))
    assert ctl.lookup(c, near, 5, None).layer == "L2"


def test_a_rejected_lazy_offer_is_not_parked() -> None:
    class RejectAll:
        def decide(self, entry: CachedResult) -> Any:
            from streams.cache.policy import AdmissionDecision

            return AdmissionDecision("reject", 1.0, "test", arm="bypass")

    ctl = CacheController(ResultCache(1 << 20, policy=RejectAll()), lazy_offers=True)
    c = _config()
    q = _unit(np.random.default_rng(9))
    look = ctl.lookup(c, q, 5, None)
    out = ctl.offer(look, _entry(look, c, q, ("a",)))
    assert out is not None and out.outcome == "rejected"
    assert ctl.stats()["parked"]["entries"] == 0


# -- parking the fresh result as returned (helper I) ----------------------------------------


def _hits(ids: tuple[str, ...], metas: tuple[str | None, ...] | None = None) -> list[Hit]:
    metas = metas or (None,) * len(ids)
    return [Hit(i, 1.0 - 0.1 * n, m) for n, (i, m) in enumerate(zip(ids, metas, strict=True))]


def _park(ctl: CacheController, look: CacheLookup, c: IndexConfig, q: np.ndarray,
          hits: list[Hit]) -> Any:  # fmt: skip
    labels = tuple(range(len(hits)))
    raw = ctl.fresh_raw(look, c.key, c.metric, q, 5, None, labels, hits, ("tok",), 1.0)
    return ctl.park_fresh(look, raw)


def test_park_fresh_builds_no_entry_until_the_repeat_which_gets_the_eager_entry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import streams.cache.controller as controller

    built: list[CachedResult] = []
    real = controller.trusted_result

    def counting(*args: Any, **kw: Any) -> CachedResult:
        built.append(real(*args, **kw))
        return built[-1]

    monkeypatch.setattr(controller, "trusted_result", counting)
    ctl, c = _lazy()
    q = _unit(np.random.default_rng(21))
    look = ctl.lookup(c, q, 5, None)
    assert look.lazy and look.offer
    hits = _hits(("a", "bb", "c"), (None, "meta", ""))
    out = _park(ctl, look, c, q, hits)
    assert out.outcome == "parked" and out.decision.action == "admit"
    assert built == [] and ctl.cache.stats().puts == 0 and look.qkey not in ctl.cache
    assert ctl.stats()["parked"]["entries"] == 1
    again = ctl.lookup(c, q, 5, None)
    assert len(built) == 1 and again.layer == "L0" and again.entry is not None
    got = again.entry
    eager = CachedResult(
        look.qkey, c.key, c.metric, q, 5, None, (0, 1, 2), ("a", "bb", "c"),
        tuple(h.score for h in hits), (None, "meta", ""), ("tok",), compute_ms=1.0,
    )  # fmt: skip
    for name in ("key", "index_key", "metric", "k", "filter", "labels", "ids", "scores",
                 "metas", "applied", "compute_ms"):  # fmt: skip
        assert getattr(got, name) == getattr(eager, name), name
    assert np.array_equal(got.vector, eager.vector)
    assert got.nbytes == eager.nbytes  # the estimate the decision charged is the entry's


def test_park_fresh_keeps_its_own_copy_of_the_query() -> None:
    ctl, c = _lazy()
    q = _unit(np.random.default_rng(22))
    look = ctl.lookup(c, q, 5, None)
    _park(ctl, look, c, q, _hits(("a",)))
    want = q.copy()
    q[:] = 0.0  # the caller reuses its buffer
    found = ctl.lookup(c, want, 5, None)
    assert found.layer == "L0" and found.entry is not None
    assert np.array_equal(found.entry.vector, want)


@given(
    ids=st.lists(st.text(max_size=12), min_size=0, max_size=6),
    metas=st.lists(st.none() | st.text(max_size=30), min_size=6, max_size=6),
    dim=st.integers(1, 300),
)
@settings(max_examples=60, deadline=None)
def test_estimate_nbytes_is_the_entrys_own(ids: list[str], metas: list[str | None],
                                          dim: int) -> None:  # fmt: skip
    from streams.cache.entry import estimate_nbytes
    from streams.cache.keys import query_key

    n = len(ids)
    q = np.ones(dim, dtype=np.float32)
    e = CachedResult(
        query_key("t/i", Metric.IP, q, 6, None), "t/i", Metric.IP, q, 6, None,
        tuple(range(n)), tuple(ids), (1.0,) * n, tuple(metas[:n]),
    )  # fmt: skip
    chars = sum(map(len, ids)) + sum(len(m) for m in metas[:n] if m)
    assert estimate_nbytes(dim, n, chars) == e.nbytes


def test_the_node_policy_decides_a_parked_result_as_it_decides_its_entry() -> None:
    """``park_fresh`` hands :class:`PolicyHolder` the parked result instead of an entry:
    the decisions (arm, bucket, TTL, size and cost features) must be those the entry
    would get, miss for miss."""
    from streams.cache.policy import PolicyHolder

    c = _config()
    rng = np.random.default_rng(27)
    qs = [_unit(rng) for _ in range(6)]
    got: list[list[Any]] = []
    for lazy in (True, False):
        clock = iter(np.arange(1_000.0, 1_100.0))
        policy = PolicyHolder(1 << 14, clock=lambda it=clock: float(next(it)))
        ctl = CacheController(ResultCache(1 << 20, policy=policy), lazy_offers=lazy)
        out = []
        for n, q in enumerate(qs):
            look = ctl.lookup(c, q, 5, None)
            ids, metas = ("a", "b" * n), ("m" * 40 * n, None)
            if lazy:
                out.append(_park(ctl, look, c, q, _hits(ids, metas)).decision)
            else:
                e = CachedResult(look.qkey, c.key, c.metric, q, 5, None, (0, 1), ids,
                                 (1.0, 0.9), metas, ("tok",), compute_ms=1.0)  # fmt: skip
                out.append(policy.decide(e))
        got.append(out)
    assert got[0] == got[1]
    assert len({d.features["size"] for d in got[0]}) == len(qs)  # sizes differ: compared


def test_park_fresh_with_another_policy_decides_on_the_built_entry() -> None:
    from streams.cache.policy import AdmissionDecision

    seen: list[Any] = []

    class Picky:
        def decide(self, entry: CachedResult) -> AdmissionDecision:
            seen.append(entry)
            return AdmissionDecision("reject", 1.0, "picky")

    ctl = CacheController(ResultCache(1 << 20, policy=Picky()), lazy_offers=True)
    c = _config()
    q = _unit(np.random.default_rng(23))
    look = ctl.lookup(c, q, 5, None)
    out = _park(ctl, look, c, q, _hits(("a", "b")))
    assert out.outcome == "rejected" and ctl.stats()["parked"]["entries"] == 0
    assert len(seen) == 1 and isinstance(seen[0], CachedResult) and seen[0].ids == ("a", "b")


def test_a_fresh_result_parked_raw_is_checked_against_the_writes_since_its_search() -> None:
    ctl, c = _lazy()
    q = _unit(np.random.default_rng(24))
    look = ctl.lookup(c, q, 5, None)
    _park(ctl, look, c, q, _hits(("a", "b", "c", "d", "e")))
    ctl.cache.invalidate(c.key, [UpsertRow("new", q, (), {})])  # enters its top 5
    assert ctl.lookup(c, q, 5, None).layer == "none"
    assert ctl.stats()["parked"]["not_stored"] == 1 and look.qkey not in ctl.cache
    # a write elsewhere in the space leaves a parked result storable
    q2 = _unit(np.random.default_rng(25))
    look2 = ctl.lookup(c, q2, 5, None)
    _park(ctl, look2, c, q2, _hits(("a", "b", "c", "d", "e")))
    ctl.cache.invalidate(c.key, [UpsertRow("far", -q2, (), {})])
    assert ctl.lookup(c, q2, 5, None).layer == "L0"


def test_parked_raw_results_are_bounded_by_their_estimated_bytes() -> None:
    from streams.cache.entry import estimate_nbytes

    one = estimate_nbytes(DIM, 1, 1)
    ctl = CacheController(ResultCache(1 << 20), lazy_offers=True, parked_bytes=2 * one)
    c = _config()
    rng = np.random.default_rng(26)
    qs = [_unit(rng) for _ in range(3)]
    for q in qs:
        _park(ctl, ctl.lookup(c, q, 5, None), c, q, _hits(("a",)))
    s = ctl.stats()["parked"]
    assert s["entries"] == 2 and s["bytes"] == 2 * one and s["dropped"] == 1
    assert ctl.lookup(c, qs[0], 5, None).layer == "none"  # the oldest was dropped
    assert ctl.lookup(c, qs[2], 5, None).layer == "L0"


# -- through the node's search path --------------------------------------------------------


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path, head_capacity=100)
    r.node.service.create_index(IndexConfig("acme", "docs", DIM, recipe="Flat"))
    yield r
    r.close()


def _upsert(rig: Rig, id: str, v: np.ndarray) -> str:
    return rig.node.service.upsert(VectorUpsert("acme", "docs", id, v.astype(np.float32))).token


def _search(rig: Rig, q: np.ndarray, token: str) -> Any:
    return rig.node.service.search(
        SearchRequest("acme", "docs", q, 5, None, Consistency.SESSION, (token,), timeout_ms=10_000)
    )


def _fill(rig: Rig, seed: int) -> tuple[np.random.Generator, str]:
    rng = np.random.default_rng(seed)
    token = ""
    for i in range(40):
        token = _upsert(rig, f"v{i}", rng.standard_normal(DIM))
    return rng, token


def test_node_doorkeeper_first_miss_offers_nothing_and_says_so(rig: Rig) -> None:
    ctl = rig.node.service.cache_layers
    assert ctl is not None
    ctl.doorkeeper = Doorkeeper()
    rng, token = _fill(rig, 10)
    q = rng.standard_normal(DIM)
    first = _search(rig, q, token)
    assert not first.debug["cache_hit"] and first.debug["decision"] == FIRST_SEEN
    assert len(ctl.cache.stats().as_dict()) and ctl.cache.stats().puts == 0
    second = _search(rig, q, token)
    # the second miss offers (lazy by default: parked, stored by the third, which it serves)
    assert not second.debug["cache_hit"] and second.debug["decision"]["outcome"] == "parked"
    third = _search(rig, q, token)
    assert third.debug["cache_hit"] and [h.id for h in third.hits] == [h.id for h in first.hits]


def test_node_lazy_offer_serves_the_repeat_and_never_a_stale_result(rig: Rig) -> None:
    ctl = rig.node.service.cache_layers
    assert ctl is not None
    ctl.lazy_offers = True
    rng, token = _fill(rig, 11)
    q = rng.standard_normal(DIM)
    first = _search(rig, q, token)
    assert not first.debug["cache_hit"] and first.debug["decision"]["outcome"] == "parked"
    assert first.debug["decision"]["arm"]  # the query log gets the policy's decision
    assert ctl.cache.stats().puts == 0 and ctl.stats()["parked"]["entries"] == 1
    second = _search(rig, q, token)
    assert second.debug["cache_hit"] and [h.id for h in second.hits] == [h.id for h in first.hits]
    # parked again, then a write that becomes the best hit is applied: the repeat must
    # not be served the parked (now stale) result
    q2 = rng.standard_normal(DIM)
    parked = _search(rig, q2, token)
    assert parked.debug["decision"]["outcome"] == "parked"
    token = _upsert(rig, "intruder", q2)
    after = _search(rig, q2, token)
    assert not after.debug["cache_hit"] and after.hits[0].id == "intruder"
    assert ctl.stats()["parked"]["not_stored"] == 1


def test_node_lazy_offers_log_every_decision_and_the_learner_joins_every_removal(
    tmp_path: Path,
) -> None:
    """Lazy offers on the small-cache rig of tests/test_cache_events.py (evictions happen):
    each miss logs its decision, a parked result's repeat is served from the cache, and
    every removal event joins a decision (matched, or late: its decision was resolved by
    the learner's estimate before the entry, stored at its repeat, left)."""
    from streams.policy.learner import OnlineLearner
    from tests.test_cache_events import SmallCacheRig, search
    from tests.test_policy_online import fill, queries, read_topic

    small = SmallCacheRig(tmp_path)
    try:
        ctl = small.node.service.cache_layers
        assert ctl is not None and small.node.cache is not None
        ctl.lazy_offers = True
        fill(small)
        pool = queries(24)
        first = search(small, pool[0])
        # the query log runs: the decision is taken off the search path (by its thread)
        assert first["decision"] == {"outcome": "parked", "action": "pending"}
        assert search(small, pool[0])["cache_hit"]  # the first repeat is served
        rng = np.random.default_rng(4)
        for i in rng.zipf(1.3, 300) % len(pool):
            search(small, pool[int(i)])
        loop = small.node.policy_loop
        assert loop is not None and loop.emitter.flush(10)
        learner = OnlineLearner(small.log, small.topics, small.codec, budget_bytes=small.budget)
        try:
            learner.run_to_end()
            s = learner.stats()
        finally:
            learner.close()
        parked = ctl.stats()["parked"]
        assert parked["promoted"] > 0 and small.node.cache.stats().evictions > 0
        joined = s["removals_joined"]
        assert s["removals"] > 0 and joined["unmatched"] == 0
        assert joined["matched"] + joined["late"] == s["removals"] and joined["matched"] > 0
        # parked admissions wait for their repeat in the join (streams/policy/join.py): it
        # reads them about as well as eager offers (before that fix: 58 matched / 76 late)
        assert joined["matched"] > 3 * joined["late"], joined
        assert s["decisions"] >= parked["parked"]  # every parked decision was logged
        logged = read_topic(small.log, small.codec, small.topics.query_log)
        flagged = [e for e in logged if (e.get("features") or {}).get("parked")]
        # every result parked (undecided: the query log's thread decided), less those its
        # decision then rejected (they left the parked map, their event says "bypass")
        assert len(flagged) == parked["parked"] - parked["rejected"]
        assert all(not e["cache_hit"] and e["action"].startswith("ttl") for e in flagged)
    finally:
        small.close()


# -- L2's projected prefilter ----------------------------------------------------------------


@pytest.mark.parametrize("metric", [Metric.COSINE, Metric.IP])
@pytest.mark.parametrize("dim", [8, 64, 200])
def test_prefiltered_nearest_matches_the_full_scan_within_the_threshold(
    metric: Metric, dim: int
) -> None:
    rng = np.random.default_rng(dim)
    idx = SemanticIndex()
    group = ("vector", "t/i", "", 10)
    reps = rng.standard_normal((300, dim)).astype(np.float32)
    keys = [QueryKey(i.to_bytes(16, "little")) for i in range(len(reps))]
    for rep, key in zip(reps, keys, strict=True):  # grows the arrays past their start
        assert idx.add(group, rep * np.float32(rng.uniform(0.5, 2.0)), key)
    for key in keys[::7]:  # removals move the last row into the hole
        idx.remove(key)
    base = reps[rng.integers(0, len(reps), 400)]
    scale = rng.uniform(0.0, 0.12, (400, 1)).astype(np.float32)
    queries = base + scale * rng.standard_normal((400, dim)).astype(np.float32)
    served = 0
    for within in (0.003, 0.02, 0.3):
        for q in queries:
            full = idx.nearest(group, q, metric)
            got = idx.nearest(group, q, metric, within=within)
            assert full is not None
            if full.distance <= within:
                assert got is not None and got.key == full.key
                assert got.distance == pytest.approx(full.distance, abs=1e-6)
                served += 1
            else:
                assert got is None
    assert served > 100  # the thresholds were reached, not only missed
    if dim > PROJ_DIMS:
        assert idx._groups[group].projection is not None


@pytest.mark.parametrize("within", [0.003, 0.05])
def test_prefilter_keeps_a_match_whose_whole_difference_the_projection_sees(
    within: float,
) -> None:
    """The bound is tight: a query whose difference from a representative lies in the
    projection's row space keeps its full distance there, and must still be found at
    90% of the threshold."""
    dim = 96
    rng = np.random.default_rng(12)
    idx = SemanticIndex()
    group = ("vector", "t/i", "", 10)
    for i in range(50):
        idx.add(group, rng.standard_normal(dim), QueryKey(i.to_bytes(16, "little")))
    projection = idx._groups[group].projection
    assert projection is not None
    r = rng.standard_normal(dim)
    r /= np.linalg.norm(r)
    target = QueryKey(b"\xff" * 16)
    idx.add(group, r, target)
    u = projection[0].astype(np.float64)
    u -= (u @ r) * r
    u /= np.linalg.norm(u)
    theta = np.arccos(1.0 - 0.9 * within)
    q = np.cos(theta) * r + np.sin(theta) * u
    got = idx.nearest(group, q, Metric.COSINE, within=within)
    assert got is not None and got.key == target
    assert got.distance == pytest.approx(0.9 * within, rel=1e-3)


def test_trusted_result_equals_the_checked_constructor_and_falls_back_on_bad_input() -> None:
    from dataclasses import fields

    from streams.cache.entry import trusted_result
    from streams.cache.keys import query_key

    q = np.array([1.0, 2.0, 0.5], dtype=np.float32)
    key = query_key("t/i", Metric.IP, q, 3, None)
    args = (key, "t/i", Metric.IP, q, 3, None, (4, 5), ("a", "b"), (2.0, 1.0), (None, "m"))
    fast = trusted_result(*args, ("tok",), 1.5, 2.5)
    slow = CachedResult(*args, ("tok",), compute_ms=1.5, created_s=2.5)
    for f in fields(CachedResult):
        a, b = getattr(fast, f.name), getattr(slow, f.name)
        if f.name == "vector":
            assert np.array_equal(a, b) and a is not q and not a.flags.writeable
        else:
            assert a == b, f.name
    q[0] = 9.0  # the caller's array changes: the entry's copy does not
    assert fast.vector[0] == 1.0
    with pytest.raises(ValueError):  # more hits than k: the checked constructor refuses
        trusted_result(key, "t/i", Metric.IP, q, 1, None, (4, 5), ("a", "b"), (2.0, 1.0),
                       (None, "m"), (), 0.0, 0.0)  # fmt: skip
    with pytest.raises(ValueError):
        trusted_result(key, "t/i", Metric.IP, q, 3, None, (4,), ("a",), (float("nan"),),
                       (None,), (), 0.0, 0.0)  # fmt: skip


def test_the_settings_default_to_lazy_offers_and_reach_the_node(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from pydantic import ValidationError

    from streams.config import Settings

    s = Settings()
    assert s.cache_admit_after == 1 and s.cache_lazy_offers is True
    monkeypatch.setenv("STREAMVEC_CACHE_ADMIT_AFTER", "2")
    monkeypatch.setenv("STREAMVEC_CACHE_LAZY_OFFERS", "false")
    s = Settings()
    assert s.cache_admit_after == 2 and s.cache_lazy_offers is False
    monkeypatch.setenv("STREAMVEC_CACHE_ADMIT_AFTER", "3")
    with pytest.raises(ValidationError):
        Settings()

    class Tuned(Rig):
        def _node(self) -> Any:
            from streams.service.query_node import QueryNode

            return QueryNode(
                self.log, self.topics, self.codec, self.root / "node",
                cache_admit_after=2, cache_lazy_offers=False,
            ).start()  # fmt: skip

    r = Tuned(tmp_path)
    try:
        ctl = r.node.service.cache_layers
        assert ctl is not None and ctl.doorkeeper is not None and not ctl.lazy_offers
    finally:
        r.close()


# -- decisions off the search path (a lazy miss where the query log runs) ------------------


def _undecided(policy: Any = None, **kw: Any) -> tuple[CacheController, IndexConfig, Any]:
    from streams.cache.policy import PolicyHolder

    clock = iter(np.arange(1_000.0, 2_000.0))
    holder = policy or PolicyHolder(1 << 14, clock=lambda: float(next(clock)))
    ctl = CacheController(ResultCache(1 << 20, policy=holder), lazy_offers=True, **kw)
    return ctl, _config(), holder


def _park_undecided(ctl: CacheController, c: IndexConfig, q: np.ndarray) -> Any:
    look = ctl.lookup(c, q, 5, None)
    hits = _hits(("a", "b"))
    raw = ctl.fresh_raw(look, c.key, c.metric, q, 5, None, (0, 1), hits, ("t",), 1.0)
    return look, raw if ctl.park_undecided(look, raw) else None


def test_an_undecided_park_is_decided_once_by_whoever_settles_it_first() -> None:
    """The search path parks without deciding; the query log's thread (``settle`` through
    the debug's PendingDecision) decides once; the repeat is stored with that decision."""
    from streams.cache.controller import PendingDecision, settled_decision

    ctl, c, holder = _undecided()
    q = _unit(np.random.default_rng(31))
    _, raw = _park_undecided(ctl, c, q)
    assert raw is not None and holder.counts["decisions"] == 0  # nothing decided yet
    pending = PendingDecision.of(ctl, raw)
    assert pending == {"outcome": "parked", "action": "pending"}  # what a client sees
    logged = settled_decision(pending)
    assert logged["outcome"] == "parked" and logged["arm"].startswith("ttl")
    assert logged["probability"] == 1.0 and holder.counts["decisions"] == 1
    assert settled_decision(pending) == logged and holder.counts["decisions"] == 1  # once
    again = ctl.lookup(c, q, 5, None)
    assert again.layer == "L0" and again.entry is not None
    assert again.entry.admission == raw.decision and holder.counts["decisions"] == 1


def test_a_repeat_before_the_log_decides_it_and_the_log_then_records_that_decision() -> None:
    from streams.cache.controller import PendingDecision

    ctl, c, holder = _undecided()
    q = _unit(np.random.default_rng(32))
    _, raw = _park_undecided(ctl, c, q)
    again = ctl.lookup(c, q, 5, None)  # the repeat settles (decides) and stores it
    assert again.layer == "L0" and holder.counts["decisions"] == 1
    logged = PendingDecision.of(ctl, raw).settle()
    assert logged["arm"] == raw.decision.arm and holder.counts["decisions"] == 1
    assert ctl.stats()["parked"]["promoted"] == 1


def test_an_undecided_park_its_decision_rejects_leaves_and_its_repeat_misses() -> None:
    from streams.cache.controller import PendingDecision
    from streams.cache.policy import PolicyHolder, RulesPolicy

    holder = PolicyHolder(1 << 14, rules=RulesPolicy(stale_per_s=1e12))  # rejects all
    ctl, c, _ = _undecided(holder)
    q = _unit(np.random.default_rng(33))
    _, raw = _park_undecided(ctl, c, q)
    assert ctl.stats()["parked"]["entries"] == 1
    logged = PendingDecision.of(ctl, raw).settle()
    assert logged["action"] == "reject" and logged["outcome"] == "rejected"
    parked = ctl.stats()["parked"]
    assert parked["entries"] == 0 and parked["bytes"] == 0 and parked["rejected"] == 1
    assert ctl.lookup(c, q, 5, None).layer == "none" and ctl.cache.stats().puts == 0
    # rejected at the repeat, before the log: not stored either, counted once
    _, raw2 = _park_undecided(ctl, c, _unit(np.random.default_rng(34)))
    assert ctl.lookup(c, raw2.vector, 5, None).layer == "none"
    assert ctl.stats()["parked"]["rejected"] == 2 and ctl.cache.stats().puts == 0


def test_undecided_parks_leave_their_drops_to_settle_within_twice_the_bound() -> None:
    from streams.cache.controller import PendingDecision

    ctl, c, _ = _undecided(parked_entries=4)
    rng = np.random.default_rng(35)
    raws = [_park_undecided(ctl, c, _unit(rng))[1] for _ in range(8)]
    assert ctl.stats()["parked"]["entries"] == 8  # over the bound, up to twice it
    PendingDecision.of(ctl, raws[-1]).settle()  # the log's thread trims
    parked = ctl.stats()["parked"]
    assert parked["entries"] == 4 and parked["dropped"] == 4
    later = [_park_undecided(ctl, c, _unit(rng))[1] for _ in range(5)]
    # nobody settled these: past twice the bound the search path drops the oldest, one a
    # park (never a sweep back to the bound: that took 3 ms on a search, the review found)
    parked = ctl.stats()["parked"]
    assert parked["entries"] == 8 and parked["dropped"] == 5
    assert ctl.lookup(c, raws[4].vector, 5, None).layer == "none"  # the oldest went
    assert ctl.lookup(c, later[-1].vector, 5, None).layer == "L0"  # the newest stayed
    assert ctl.stats()["parked"]["entries"] == 7
    ctl._parked.trim(most=2)  # the log's thread trims a bounded number at a time
    assert ctl.stats()["parked"]["entries"] == 5


def test_concurrent_settles_and_repeats_decide_each_parked_result_once() -> None:

    from streams.cache.controller import PendingDecision

    ctl, c, holder = _undecided()
    rng = np.random.default_rng(36)
    qs = [_unit(rng) for _ in range(200)]
    raws = [_park_undecided(ctl, c, q)[1] for q in qs]
    logged: list[list[str]] = [[], []]

    def log_thread(i: int) -> None:  # what the query log's thread does for each miss
        for raw in raws:
            logged[i].append(PendingDecision.of(ctl, raw).settle()["arm"])

    def repeats() -> None:
        for q in qs:
            assert ctl.lookup(c, q, 5, None).layer == "L0"

    _race(lambda: log_thread(0), lambda: log_thread(1), repeats)
    assert holder.counts["decisions"] == len(qs)  # one each, whoever came first
    assert logged[0] == logged[1] == [r.decision.arm for r in raws]


def _race(*targets: Any) -> None:
    """Run ``targets`` on threads at once, switching as often as the interpreter can."""
    import sys
    import threading

    threads = [threading.Thread(target=t) for t in targets]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)


def test_a_tolerant_hit_is_logged_under_the_served_entrys_key_and_credits_its_admission(
    tmp_path: Path,
) -> None:
    """An L1 hit (the same SimHash, another L0 key) is a query-log event of the entry that
    served it, so the learner's join credits the hit to that entry's admission decision."""
    from streams.cache.keys import query_key
    from tests.rigs import spied_learner
    from tests.test_policy_online import LoopRig, read_topic

    rig = LoopRig(tmp_path)
    try:
        svc = rig.node.service
        svc.create_index(
            IndexConfig(
                "acme", "docs", DIM, metric=Metric.COSINE, recipe="Flat",
                cache=CacheSettings(("L0", "L1")),
            )
        )  # fmt: skip
        rng = np.random.default_rng(41)
        token = ""
        for i in range(60):
            token = svc.upsert(VectorUpsert("acme", "docs", f"v{i}", _unit(rng))).token
        q = _unit(rng)
        # a miss (stored eagerly), then an L1 hit (tolerant layers serve at eventual)
        svc.search(SearchRequest("acme", "docs", q, 5, None, Consistency.SESSION, (token,)))
        svc.search(SearchRequest("acme", "docs", q * np.float32(2.5), 5))
        loop = rig.node.policy_loop
        assert loop is not None and loop.emitter.flush(10)
        events = [
            e
            for e in read_topic(rig.log, rig.codec, rig.topics.query_log)
            if e.get("removal") is None and e["index"] == "docs"
        ]
        miss, hit = events[-2:]
        entry_key = str(query_key("acme/docs", Metric.COSINE, q, 5, None))
        assert not miss["cache_hit"] and miss["query_key"] == entry_key
        assert hit["cache_hit"] and hit["cache_layer"] == "L1"
        assert hit["query_key"] == entry_key  # the entry's, not the scaled query's own key
        learner, credited = spied_learner(
            rig.log, rig.topics, rig.codec, "acme/docs", budget_bytes=1 << 26
        )
        try:
            learner.run_to_end()
            learner.step()
        finally:
            learner.close()
        mine = [j for j in credited if j.bucket == miss["bucket"]]
        assert mine and max(o.saved for o in mine[-1].outcomes) > 0  # the L1 hit saved
    finally:
        rig.close()


def test_each_parked_result_ends_in_exactly_one_count() -> None:
    """parked = promoted + not_stored + dropped + rejected + entries, whatever the order of
    parks (some replacing their own key), settles by the log, repeats and drops, with a
    policy that rejects a third of the keys; the result cache counts every rejection."""
    from streams.cache.controller import PendingDecision
    from streams.cache.policy import AdmissionDecision

    ctl, c, holder = _undecided(parked_entries=6)
    real = holder.decide_routed

    def decide(entry: Any, a: Any) -> Any:
        d = real(entry, a)
        if entry.key.digest[0] % 3 == 0:
            return AdmissionDecision("reject", 1.0, "test", arm="bypass", bucket=d.bucket)
        return d

    holder.decide_routed = decide  # type: ignore[method-assign]
    rng = np.random.default_rng(37)
    pool = [_unit(rng) for _ in range(12)]
    pending: list[Any] = []
    rejected = 0
    for _ in range(400):
        op = rng.integers(0, 3)
        q = pool[int(rng.integers(0, len(pool)))]
        if op == 0:  # a miss parks (or the query's entry is cached: a hit)
            look = ctl.lookup(c, q, 5, None)
            if look.entry is None:
                hits = _hits(("a", "b"))
                raw = ctl.fresh_raw(look, c.key, c.metric, q, 5, None, (0, 1), hits, (), 1.0)
                assert ctl.park_undecided(look, raw)
                pending.append(raw)
        elif op == 1 and pending:  # the log's thread settles the oldest pending miss
            raw = pending.pop(0)
            rejected += PendingDecision.of(ctl, raw).settle()["action"] == "reject"
        else:  # a repeat (promotes a parked result of its key, if any)
            ctl.lookup(c, q, 5, None)
        n = ctl.stats()["parked"]
        ends = n["promoted"] + n["not_stored"] + n["dropped"] + n["rejected"] + n["entries"]
        assert n["parked"] == ends, n
    decided = [r for r in ctl._parked.items.values()]
    assert ctl.stats()["parked"]["rejected"] > 0 and ctl.stats()["parked"]["promoted"] > 0
    assert ctl.cache.stats().rejected >= rejected > 0
    assert all(item[1].decision is None or item[1].decision.action == "admit" for item in decided)


@pytest.fixture
def logging_node(tmp_path: Path) -> Iterator[Any]:
    """A filled node that runs the policy loop (its query log's thread settles decisions)."""
    from tests.test_policy_online import LoopRig, fill

    rig = LoopRig(tmp_path)
    fill(rig)
    assert rig.node.policy_loop is not None
    yield rig
    rig.close()


def test_the_query_log_thread_survives_a_policy_that_raises(logging_node: Any) -> None:
    from tests.test_policy_online import queries

    rig = logging_node
    loop = rig.node.policy_loop
    holder = loop.holder
    calls = [0]
    real = holder.decide_routed

    def flaky(entry: Any, a: Any) -> Any:
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("a broken policy")
        return real(entry, a)

    holder.decide_routed = flaky
    before = loop.emitter.appended
    for q in queries(10, seed=8):
        rig.node.service.search(SearchRequest("acme", "docs", q, 5))
    assert loop.emitter.flush(10) and loop.emitter.running
    assert loop.emitter.appended - before == 10 and calls[0] == 10
    for q in queries(3, seed=9):  # and it goes on logging
        rig.node.service.search(SearchRequest("acme", "docs", q, 5))
    assert loop.emitter.flush(10) and loop.emitter.appended - before == 13


def test_a_node_whose_query_log_stopped_decides_on_the_search_path(logging_node: Any) -> None:
    from tests.test_policy_online import queries

    svc = logging_node.node.service
    q = queries(1, seed=10)[0]
    assert svc.search(SearchRequest("acme", "docs", q, 5)).debug["decision"]["action"] == "pending"
    logging_node.node.policy_loop.emitter.close()  # nobody would settle a pending decision now
    q = queries(1, seed=11)[0]
    decision = svc.search(SearchRequest("acme", "docs", q, 5)).debug["decision"]
    assert decision["outcome"] == "parked" and decision["arm"].startswith("ttl")


def test_a_batch_that_cannot_be_written_still_decides_its_parked_misses(
    logging_node: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_policy_online import queries

    loop = logging_node.node.policy_loop

    def unreachable(*_: Any) -> Any:
        raise ConnectionError("the schema registry is down")

    monkeypatch.setattr(loop.emitter.codec, "writer", unreachable)
    before = loop.holder.counts["decisions"]
    q = queries(1, seed=12)[0]
    out = logging_node.node.service.search(SearchRequest("acme", "docs", q, 5))
    assert out.debug["decision"]["action"] == "pending"
    assert loop.emitter.flush(10) and loop.emitter.failed >= 1  # the event is lost
    assert loop.holder.counts["decisions"] == before + 1  # its decision is not
    assert out.debug["decision"]._raw.decision is not None


def test_query_log_events_carry_their_own_positions_and_unique_ids() -> None:
    """``_complete`` parses the applied tokens once for consecutive events that share them
    (the logging thread's memo), and never hands an event another's positions."""
    from streams.cache.querylog import _complete

    a = ("streamvec.indexes:0:0", "streamvec.vectors:0:999")
    b = ("streamvec.indexes:0:0", "streamvec.vectors:1:5")
    events = [_complete({"applied": tokens}) for tokens in (a, a, b, a, ())]
    offsets = [[p["offset"] for p in e["index_positions"]] for e in events]
    assert offsets == [[0, 999], [0, 999], [0, 5], [0, 999], []]
    assert [p["partition"] for p in events[2]["index_positions"]] == [0, 1]
    ids = [e["event_id"] for e in events]
    assert len(set(ids)) == len(ids) and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert _complete({"applied": a, "event_id": "mine"})["event_id"] == "mine"


# -- deferred whole (session 7: nothing parked on the search path) -------------------------


def _defer(
    ctl: CacheController, c: IndexConfig, q: np.ndarray, ids: tuple[str, ...] = ("a", "b")
) -> Any:
    look = ctl.lookup(c, q, 5, None)
    assert look.entry is None
    hits = tuple(_hits(ids))
    chars = sum(len(i) for i in ids)
    labels = tuple(range(len(ids)))
    return ctl.defer(look, c.key, c.metric, q, 5, None, labels, hits, ("t",), 1.0, (), chars)


def _counted(ctl: CacheController) -> None:
    n = ctl.stats()["parked"]
    ends = n["promoted"] + n["not_stored"] + n["dropped"] + n["rejected"] + n["entries"]
    assert n["parked"] == ends, n


def test_a_deferred_miss_parks_nothing_until_its_repeat_takes_and_stores_it() -> None:
    """``defer`` builds and parks nothing; the query's repeat takes it (parks it, decides
    it, stores it) and is served; the log's settle later records the repeat's decision."""
    from streams.cache.controller import settled_decision

    ctl, c, holder = _undecided()
    q = _unit(np.random.default_rng(41))
    pending = _defer(ctl, c, q)
    assert pending == {"outcome": "parked", "action": "pending"}
    assert not ctl._parked.items and len(ctl._deferred) == 1
    assert holder.counts["decisions"] == 0 and ctl.stats()["parked"]["parked"] == 0
    again = ctl.lookup(c, q, 5, None)
    assert again.layer == "L0" and again.entry is not None and again.entry.ids == ("a", "b")
    assert not ctl._deferred and holder.counts["decisions"] == 1
    logged = settled_decision(pending)
    assert logged["arm"] == again.entry.admission.arm and holder.counts["decisions"] == 1
    _counted(ctl)
    assert ctl.stats()["parked"]["promoted"] == 1


def test_a_deferred_miss_the_log_takes_first_is_parked_decided_and_then_served() -> None:
    ctl, c, holder = _undecided()
    q = _unit(np.random.default_rng(42))
    pending = _defer(ctl, c, q)
    logged = pending.settle()
    assert logged["outcome"] == "parked" and logged["arm"].startswith("ttl")
    assert not ctl._deferred and len(ctl._parked.items) == 1
    assert pending._raw.decision is not None and holder.counts["decisions"] == 1
    assert ctl.lookup(c, q, 5, None).layer == "L0" and holder.counts["decisions"] == 1
    _counted(ctl)


def test_a_newer_miss_of_the_query_supersedes_a_deferred_one() -> None:
    """Two misses of one query before either is taken (concurrent searches): the older is
    decided for its event but never parked (counted parked and dropped), the newer is
    parked; the repeat is served the newer."""
    ctl, c, holder = _undecided()
    q = _unit(np.random.default_rng(43))
    first, second = ctl.lookup(c, q, 5, None), ctl.lookup(c, q, 5, None)  # both miss
    older, newer = (
        ctl.defer(look, c.key, c.metric, q, 5, None, (0,), tuple(_hits((i,))), (), 1.0, (), 3)
        for look, i in ((first, "old"), (second, "new"))
    )
    assert len(ctl._deferred) == 1
    older.settle()
    assert not ctl._parked.items and ctl.stats()["parked"]["dropped"] == 1
    newer.settle()
    hit = ctl.lookup(c, q, 5, None)
    assert hit.entry is not None and hit.entry.ids == ("new",)
    assert holder.counts["decisions"] == 2
    _counted(ctl)


def test_deferred_results_are_bounded_and_each_still_ends_in_one_count() -> None:
    ctl, c, _ = _undecided(parked_entries=64)  # the deferred map holds a quarter: 16
    rng = np.random.default_rng(44)
    pending = [_defer(ctl, c, _unit(rng)) for _ in range(40)]
    n = ctl.stats()["parked"]
    assert (n["deferred"], n["deferred_trimmed"], n["parked"]) == (16, 24, 0)
    for p in pending:
        p.settle()
    assert not ctl._deferred
    n = ctl.stats()["parked"]
    assert (n["parked"], n["dropped"]) == (40, 24)
    _counted(ctl)


def test_a_large_result_is_not_deferred_and_the_map_is_bounded_by_bytes() -> None:
    """A result estimated over 1/64 of the parked bytes is not deferred (the search path
    parks it as before); the deferred map holds at most a quarter of the parked bytes."""
    from streams.cache.entry import estimate_nbytes

    ctl, c, _ = _undecided(parked_bytes=64 * 1024)  # items up to 1 KiB, 16 KiB in all
    q = _unit(np.random.default_rng(45))
    fixed = estimate_nbytes(DIM, 1, 0)
    assert _defer(ctl, c, q, ("x" * (1024 - fixed + 1),)) is None
    assert _defer(ctl, c, q, ("y" * (1024 - fixed),)) is not None
    rng = np.random.default_rng(49)
    for _ in range(40):
        assert _defer(ctl, c, _unit(rng), ("z" * (1024 - fixed),)) is not None
    n = ctl.stats()["parked"]
    assert n["deferred_bytes"] <= 16 * 1024 and n["deferred"] == 16
    assert n["deferred_bytes"] == 16 * 1024 and n["deferred_trimmed"] == 25


def test_a_deferred_miss_keeps_its_search_time() -> None:
    """What a bounded-staleness read measures an entry's age from is the search's time,
    not when the log's thread took it."""
    import time

    ctl, c, _ = _undecided()
    q = _unit(np.random.default_rng(46))
    before = time.monotonic()
    pending = _defer(ctl, c, q)
    time.sleep(0.05)
    pending.settle()
    assert before <= pending._raw.created_s < before + 0.04


def test_deferred_misses_settles_and_repeats_in_random_order_each_end_in_one_count() -> None:
    """Defers (some replacing their own query's), log settles in event order, repeats:
    every deferred result is decided exactly once by whoever takes it first, and the
    counts add up after every step."""
    ctl, c, holder = _undecided(parked_entries=24)
    rng = np.random.default_rng(47)
    pool = [_unit(rng) for _ in range(10)]
    events: list[Any] = []
    for _ in range(600):
        op = rng.integers(0, 3)
        q = pool[int(rng.integers(0, len(pool)))]
        if op == 0:
            look = ctl.lookup(c, q, 5, None)
            if look.entry is None:
                hits = tuple(_hits(("a", "b")))
                events.append(
                    ctl.defer(look, c.key, c.metric, q, 5, None, (0, 1), hits, (), 1.0, (), 2)
                )
        elif op == 1 and events:
            events.pop(0).settle()
        else:
            ctl.lookup(c, q, 5, None)
        _counted(ctl)
    for p in events:
        p.settle()
    _counted(ctl)
    n = ctl.stats()["parked"]
    assert n["promoted"] > 0 and n["dropped"] >= 0
    assert holder.counts["decisions"] == n["parked"]  # each decided once


def test_concurrent_log_settles_and_repeats_take_each_deferred_miss_once() -> None:

    ctl, c, holder = _undecided()
    rng = np.random.default_rng(48)
    qs = [_unit(rng) for _ in range(200)]
    pending = [_defer(ctl, c, q) for q in qs]
    logged: list[list[str]] = [[], []]

    def log_thread(i: int) -> None:
        for p in pending:
            logged[i].append(p.settle()["arm"])

    def repeats() -> None:
        for q in qs:
            assert ctl.lookup(c, q, 5, None).layer == "L0"

    _race(lambda: log_thread(0), lambda: log_thread(1), repeats)
    assert holder.counts["decisions"] == len(qs)
    assert logged[0] == logged[1] == [p._raw.decision.arm for p in pending]
    assert not ctl._deferred
    _counted(ctl)


def test_a_node_copies_a_query_that_views_the_callers_buffer(logging_node: Any) -> None:
    """An ``array.array`` (or an ndarray subclass's view) parses to an array over the
    caller's memory: changed after the search, it must not change the cached query (which
    result-aware invalidation compares writes with: found by the session's review)."""
    import array

    from tests.test_policy_online import queries

    svc = logging_node.node.service
    ctl = svc.cache_layers
    original = np.array(queries(1, seed=13)[0], dtype=np.float32)
    buffer = array.array("f", original.tolist())
    first = svc.search(SearchRequest("acme", "docs", buffer, 5))  # type: ignore[arg-type]
    assert first.debug["decision"]["action"] == "pending"
    for i in range(len(buffer)):
        buffer[i] = -buffer[i]  # the caller's buffer, changed after its search
    again = svc.search(SearchRequest("acme", "docs", original, 5))
    assert again.debug["cache_hit"]
    served = ctl.lookup(svc.indexer.configs["acme/docs"], original, 5, None).entry
    assert served is not None and np.array_equal(served.vector, original)


def test_a_node_defers_a_lazy_miss_and_serves_its_repeat_before_the_log_runs(
    logging_node: Any,
) -> None:
    """The node (policy loop on): a lazy miss leaves nothing parked on the search path, a
    caller's own vector may change after the search, the repeat (before the log's thread
    has run) is served the search's result, and the miss's event carries the decision."""
    from tests.test_policy_online import queries

    rig = logging_node
    svc = rig.node.service
    ctl = svc.cache_layers
    emitter = rig.node.policy_loop.emitter
    assert emitter.flush(10)
    emitter.linger_s = 30  # the log's thread waits (flush cuts it short)
    q = np.array(queries(1, seed=12)[0], dtype=np.float32)
    original = q.copy()
    first = svc.search(SearchRequest("acme", "docs", q, 5))
    assert first.debug["decision"]["action"] == "pending"
    assert len(ctl._deferred) == 1 and not ctl._parked.items
    q[:] = 0.5  # the caller's array, changed after its search
    again = svc.search(SearchRequest("acme", "docs", original, 5))
    assert again.debug["cache_hit"] and [h.id for h in again.hits] == [h.id for h in first.hits]
    served = ctl.lookup(svc.indexer.configs["acme/docs"], original, 5, None).entry
    assert served is not None and np.array_equal(served.vector, original)
    assert emitter.flush(10)
    n = ctl.stats()["parked"]
    assert (n["parked"], n["promoted"]) == (1, 1)
