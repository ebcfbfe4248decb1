"""The L0 exact result cache: invalidation against a brute-force model, the put race, the
cache against fresh searches of a real index and of a query node, and hit rates under a
write load far from the cached queries."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.cache import (
    AdmissionDecision,
    CachedResult,
    InvalidationIndex,
    QueryKey,
    ResultCache,
    UpsertRow,
    query_key,
    score_margin,
)
from streams.index.filters import Filter, parse_filter
from streams.index.model import (
    Consistency,
    FieldKind,
    FilterField,
    IndexConfig,
    Metric,
    VectorUpsert,
)
from streams.index.vector_index import VectorIndex
from streams.service.api import SearchRequest
from tests.rigs import Rig

METRICS = [Metric.COSINE, Metric.IP, Metric.L2]
FIELDS = (FilterField("color", FieldKind.TAG), FilterField("price", FieldKind.NUMERIC))
FILTERS = [None, "color:red", "color:red|blue", "-color:red", "price>=5", "price:[2 6]",
           "color:blue price<4"]
TAGS = [(), ("color:red",), ("color:blue",), ("color:red", "color:green"), ("plain",)]
NUMERICS: list[dict[str, float]] = [{}, {"price": 1.0}, {"price": 5.0}, {"price": 7.5}]
KEY = "t/i"


def config(dim: int, metric: Metric) -> IndexConfig:
    return IndexConfig("t", "i", dim, metric=metric, recipe="Flat", fields=FIELDS)


def flt_of(text: str | None, cfg: IndexConfig) -> Filter | None:
    return None if text is None else parse_filter(text, cfg)


def qkey(i: int) -> QueryKey:
    return QueryKey(int(i).to_bytes(16, "little"))


# -- the brute-force model ----------------------------------------------------------------

def _prep(x: np.ndarray, metric: Metric) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    n = np.linalg.norm(x)
    return x / n if metric is Metric.COSINE and n > 0 else x


def model_enters(metric: Metric, q: np.ndarray, kth: float | None, v: np.ndarray) -> bool:
    """The documented rule (b), one pair at a time, distances by direct differences."""
    if kth is None:
        return True
    qq, vv = _prep(q, metric), _prep(v, metric)
    g = score_margin(q.size)
    if metric is Metric.L2:
        d = float(((qq - vv) ** 2).sum())
        return bool(d - g * (np.linalg.norm(qq) + np.linalg.norm(vv)) ** 2 <= kth)
    return bool(float(qq @ vv) + g * np.linalg.norm(qq) * np.linalg.norm(vv) >= kth)


def full_scan(metric: Metric, entries: dict[QueryKey, Any], rows: list[UpsertRow],
              deleted: set[str]) -> set[QueryKey]:
    out = set()
    for key, (q, kth, flt, ids) in entries.items():
        if (deleted | {r.id for r in rows}) & set(ids) or any(
            model_enters(metric, q, kth, r.vector)
            and (flt is None or flt.matches(r.tags, r.numeric)) for r in rows
        ):
            out.add(key)
    return out


def kth_of(metric: Metric, q: np.ndarray, ref: np.ndarray) -> float:
    qq, rr = _prep(q, metric), _prep(ref, metric)
    return float(((qq - rr) ** 2).sum()) if metric is Metric.L2 else float(qq @ rr)


# -- invalidation exactness -----------------------------------------------------------------

@pytest.mark.parametrize("metric", METRICS)
@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    dim=st.integers(2, 6),
    n_entries=st.integers(0, 200),
    spread=st.sampled_from([0.05, 0.5, 3.0]),
    batches=st.lists(st.tuples(st.integers(0, 12), st.integers(0, 3), st.floats(0, 1)),
                     min_size=1, max_size=5),
)
def test_pruned_index_finds_exactly_what_a_full_scan_finds(
    metric: Metric, seed: int, dim: int, n_entries: int, spread: float,
    batches: list[tuple[int, int, float]],
) -> None:
    rng = np.random.default_rng(seed)
    cfg = config(dim, metric)
    centres = rng.standard_normal((4, dim)) * 3
    index = InvalidationIndex(metric, dim, max_clusters=8)
    entries: dict[QueryKey, Any] = {}
    ids = [f"x{i}" for i in range(30)]

    def random_vector(c: int | None = None) -> np.ndarray:
        centre = centres[rng.integers(4) if c is None else c]
        out: np.ndarray = (centre + rng.standard_normal(dim) * spread).astype(np.float32)
        return out

    for i in range(n_entries):
        c = int(rng.integers(4))
        q = random_vector(c)  # its k-th hit from its own group: writes there hit the boundary
        kth = None if rng.random() < 0.15 else kth_of(metric, q, random_vector(c))
        flt = flt_of(FILTERS[rng.integers(len(FILTERS))], cfg)
        hit_ids = tuple(rng.choice(ids, size=rng.integers(0, 4), replace=False).tolist())
        index.add(qkey(i), q, kth, flt, hit_ids)
        entries[qkey(i)] = (q, kth, flt, hit_ids)
    for n_rows, n_deleted, drop in batches:
        for key in [k for k in entries if rng.random() < drop * 0.3]:  # removals: stale bounds
            assert index.remove(key)
            del entries[key]
        rows = []
        for _ in range(n_rows):
            v = random_vector()
            if entries and rng.random() < 0.2:  # exactly a cached query: ties enter
                v = next(iter(entries.values()))[0].copy()
            rows.append(UpsertRow(str(rng.choice(ids)), v, TAGS[rng.integers(len(TAGS))],
                                  NUMERICS[rng.integers(len(NUMERICS))]))
        deleted = set(rng.choice(ids, size=n_deleted, replace=False).tolist())
        want = full_scan(metric, entries, rows, deleted)
        got = index.affected_by_ids(deleted | {r.id for r in rows})
        if rows:
            got |= index.affected_by_upserts(np.stack([r.vector for r in rows]),
                                             [r.tags for r in rows], [r.numeric for r in rows])
        assert got == want
    assert len(index) == len(entries)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("spread", [0.1, 0.4, 1.5])
def test_pruning_is_lossless_at_scale(metric: Metric, spread: float) -> None:
    """Many entries near the decision boundary, clusters of every width: vectorised full
    scan against the pruned index, write by write."""
    rng = np.random.default_rng(int(spread * 10))
    dim, n = 12, 1500
    centres = rng.standard_normal((10, dim)) * 2
    group = rng.integers(10, size=n)
    queries = (centres[group] + rng.standard_normal((n, dim)) * spread).astype(np.float32)
    refs = centres[group] + rng.standard_normal((n, dim)) * spread
    index = InvalidationIndex(metric, dim, max_clusters=32)
    kths = np.array([kth_of(metric, q, r) for q, r in zip(queries, refs, strict=True)])
    for i in range(n):
        index.add(qkey(i), queries[i], float(kths[i]), None, ())
    shells = rng.uniform(0.5, 4.0, size=(300, 1))  # inside, at and beyond the clusters' rims
    writes = (centres[rng.integers(10, size=300)]
              + rng.standard_normal((300, dim)) * spread * shells).astype(np.float32)
    qp = np.array([_prep(q, metric) for q in queries])
    g = score_margin(dim)
    for v in writes:
        vp = _prep(v, metric)
        if metric is Metric.L2:
            d = ((qp - vp) ** 2).sum(axis=1)
            hit = d - g * (np.linalg.norm(qp, axis=1) + np.linalg.norm(vp)) ** 2 <= kths
        else:
            hit = qp @ vp + g * np.linalg.norm(qp, axis=1) * np.linalg.norm(vp) >= kths
        want = {qkey(int(i)) for i in np.flatnonzero(hit)}
        assert index.affected_by_upserts(v[None, :], [()], [{}]) == want
    assert 0 < index.checked_pairs < index.scanned_pairs


@pytest.mark.parametrize("metric", METRICS)
def test_writes_far_from_the_cached_queries_are_pruned_without_exact_checks(
    metric: Metric,
) -> None:
    rng = np.random.default_rng(7)
    dim = 16
    index = InvalidationIndex(metric, dim)
    hot = rng.standard_normal((8, dim)) * 4
    for i in range(800):
        q = hot[i % 8] + rng.standard_normal(dim) * 0.05
        index.add(qkey(i), q.astype(np.float32), kth_of(metric, q, hot[i % 8] * 1.02), None, ())
    far = (-hot[rng.integers(8, size=200)] + rng.standard_normal((200, dim)) * 0.05)
    assert index.affected_by_upserts(far.astype(np.float32), [()] * 200, [{}] * 200) == set()
    assert index.checked_pairs < 0.05 * index.scanned_pairs
    near = (hot[:1] * 1.02).astype(np.float32)  # ties the k-th hit of hot[0]'s entries
    assert len(index.affected_by_upserts(near, [()], [{}])) >= 100


# -- the index-level congruence: what survives equals a fresh search ------------------------

@pytest.mark.parametrize("metric", METRICS)
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1),
       ops=st.lists(st.sampled_from(["new", "near", "update", "delete", "search", "search",
                                     "search", "seal"]), min_size=5, max_size=60))
def test_entries_that_survive_equal_fresh_searches_of_the_index(
    metric: Metric, seed: int, ops: list[str]
) -> None:
    rng = np.random.default_rng(seed)
    dim = 6
    cfg = config(dim, metric)
    vi = VectorIndex(cfg, head_capacity=64)
    cache = ResultCache(1 << 30)
    hot = [rng.standard_normal(dim).astype(np.float32) for _ in range(3)]
    rows: dict[str, tuple[int, UpsertRow]] = {}
    next_label = iter(range(1, 10**6))
    hits = 0

    def write(row: UpsertRow) -> None:
        old = rows.get(row.id)
        if old is not None:
            vi.delete(old[0])
        label = next(next_label)
        vi.upsert(label, row.vector, row.tags, row.numeric)
        rows[row.id] = (label, row)

    def row(id: str, v: np.ndarray) -> UpsertRow:
        return UpsertRow(id, v.astype(np.float32), TAGS[rng.integers(len(TAGS))],
                         NUMERICS[rng.integers(len(NUMERICS))])

    for i in range(20):
        write(row(f"x{i}", rng.standard_normal(dim)))
    id_of = {label: id for id, (label, _) in rows.items()}
    for op in ops:
        if op in ("new", "near", "update"):
            if op == "update" and rows:
                id = str(rng.choice(sorted(rows)))
            else:
                id = f"n{rng.integers(10**6)}"
            base = hot[rng.integers(3)] if op == "near" else rng.standard_normal(dim)
            batch = [row(id, base + rng.standard_normal(dim) * 0.1)]
            write(batch[0])
            id_of[rows[id][0]] = id
            cache.invalidate(KEY, batch)
        elif op == "delete" and rows:
            id = str(rng.choice(sorted(rows)))
            vi.delete(rows.pop(id)[0])
            cache.invalidate(KEY, (), [id])
        elif op == "seal":
            job = vi.begin_seal()
            if job is not None:
                job.build()
                vi.finish_seal(job)
        elif op == "search":
            q, k = hot[rng.integers(3)], int(rng.integers(1, 6))
            flt = flt_of(FILTERS[rng.integers(len(FILTERS))], cfg)
            key = query_key(KEY, metric, q, k, flt)
            seq = cache.get_seq(KEY)
            out = vi.search(q, k, flt)
            fresh_ids = tuple(id_of[int(label)] for label in out.labels)
            cached = cache.get(key)
            if cached is not None:
                hits += 1
                assert cached.ids == fresh_ids
                np.testing.assert_allclose(cached.scores, out.scores, rtol=1e-5, atol=1e-5)
            else:
                cache.put(CachedResult(key, KEY, metric, q, k, flt,
                                       tuple(int(x) for x in out.labels), fresh_ids,
                                       tuple(float(s) for s in out.scores),
                                       (None,) * len(fresh_ids)), seq)
    assert cache.stats().hits == hits


# -- the put race -----------------------------------------------------------------------

def _entry(q: np.ndarray, ids: tuple[str, ...], scores: tuple[float, ...], k: int = 2,
           metric: Metric = Metric.IP, index_key: str = KEY) -> CachedResult:
    return CachedResult(query_key(index_key, metric, q, k, None), index_key, metric, q, k,
                        None, tuple(range(len(ids))), ids, scores, (None,) * len(ids))


def test_race_a_write_reported_between_search_and_put_keeps_the_stale_result_out() -> None:
    cache = ResultCache(1 << 20, ring_rows=4)
    q = np.array([1, 0, 0], dtype=np.float32)
    result = _entry(q, ("a", "b"), (0.9, 0.8))  # a search's result at seq 0
    seq = cache.get_seq(KEY)
    cache.invalidate(KEY, [UpsertRow("c", np.array([0.85, 0, 0], np.float32))])  # enters
    out = cache.put(result, seq)
    assert (out.stored, out.outcome) == (False, "stale")
    assert cache.get(result.key) is None

    seq = cache.get_seq(KEY)
    cache.invalidate(KEY, (), ["b"])  # deletes one of its hits
    assert cache.put(result, seq).outcome == "stale"

    seq = cache.get_seq(KEY)
    cache.invalidate(KEY, [UpsertRow("z", np.array([0.1, 1, 0], np.float32))])  # scores 0.1
    cache.invalidate(KEY, (), ["y"])  # not one of its hits
    assert cache.put(result, seq).stored  # checked against both, changed by neither
    assert cache.get(result.key) is not None

    seq = cache.get_seq(KEY)
    for i in range(6):  # more than the ring keeps
        cache.invalidate(KEY, (), [f"far{i}"])
    assert cache.put(_entry(-q, ("a", "b"), (-0.9, -1.0)), seq).outcome == "unverifiable"

    seq = cache.get_seq(KEY)
    cache.reset_index(KEY)
    assert cache.put(_entry(-q, ("a", "b"), (-0.9, -1.0)), seq).outcome == "stale"
    assert cache.get(result.key) is None  # the reset dropped it
    with pytest.raises(ValueError):
        cache.put(result, cache.get_seq(KEY) + 1)


def test_budget_lru_switch_and_policy() -> None:
    q = [np.array([i, 1, 0], dtype=np.float32) for i in range(5)]
    size = _entry(q[0], ("a", "b"), (2.0, 1.0)).nbytes
    cache = ResultCache(3 * size)
    for i in range(3):
        assert cache.put(_entry(q[i], ("a", "b"), (2.0, 1.0)), 0).stored
    assert cache.get(_entry(q[0], (), ()).key) is not None  # q0 is now the most recent
    cache.put(_entry(q[3], ("a", "b"), (2.0, 1.0)), 0)
    assert cache.peek(_entry(q[1], (), ()).key) is None  # the least recent went
    assert cache.peek(_entry(q[0], (), ()).key) is not None
    s = cache.stats()
    assert (s.entries, s.evictions, s.hits, s.bytes <= s.budget_bytes) == (3, 1, 1, True)

    cache.set_enabled(KEY, False)
    assert cache.stats().entries == 0 and not cache.enabled(KEY)
    assert cache.put(_entry(q[4], ("a", "b"), (2.0, 1.0)), 0).outcome == "disabled"
    assert cache.enabled("t/other")

    class RejectAll:
        def decide(self, entry: CachedResult) -> AdmissionDecision:
            return AdmissionDecision("reject", 0.25, "test")

    picky = ResultCache(1 << 20, policy=RejectAll())
    out = picky.put(_entry(q[0], ("a", "b"), (2.0, 1.0)), 0)
    got = out.as_dict()
    assert {k: got[k] for k in ("action", "probability", "reason", "outcome")} == {
        "action": "reject", "probability": 0.25, "reason": "test", "outcome": "rejected"}
    assert picky.stats().rejected == 1 and picky.stats().entries == 0


def test_fewer_than_k_is_invalidated_by_any_insert_passing_its_filter() -> None:
    cfg = config(3, Metric.IP)
    cache = ResultCache(1 << 20)
    q = np.array([1, 0, 0], dtype=np.float32)
    flt = parse_filter("color:red", cfg)
    e = CachedResult(query_key(KEY, Metric.IP, q, 5, flt), KEY, Metric.IP, q, 5, flt,
                     (1,), ("a",), (0.9,), (None,))
    assert e.fewer_than_k and e.kth_score is None
    cache.put(e, 0)
    far = np.array([-100, 0, 0], dtype=np.float32)
    assert cache.invalidate(KEY, [UpsertRow("b", far, ("color:blue",))]) == 0
    assert cache.invalidate(KEY, [UpsertRow("c", far, ("color:red",))]) == 1


def test_query_key_covers_every_part() -> None:
    cfg = config(3, Metric.COSINE)
    v = np.array([1, 2, 3], dtype=np.float32)
    base = query_key(KEY, Metric.COSINE, v, 5, None)
    assert base == query_key(KEY, Metric.COSINE, v.copy(), 5, None)
    assert str(base).startswith("qk:") and len(str(base)) == 3 + 32
    others = [query_key("t/j", Metric.COSINE, v, 5, None), query_key(KEY, Metric.IP, v, 5, None),
              query_key(KEY, Metric.COSINE, v + 1, 5, None),
              query_key(KEY, Metric.COSINE, v, 6, None),
              query_key(KEY, Metric.COSINE, v, 5, parse_filter("color:red", cfg))]
    assert len({base, *others}) == 6


# -- the query node -----------------------------------------------------------------------

NODE_DIM = 8
HOT = np.random.default_rng(11).standard_normal((3, NODE_DIM)).astype(np.float32)
NODE_FILTERS = [None, "color:red", "price>=5", "-color:blue price:[2 8]"]


def _fresh(rig: Rig, q: np.ndarray, k: int, flt: str | None) -> tuple[list[str], list[float]]:
    """What the same search returns with the cache out of the way, from the index itself."""
    cfg = rig.node.indexer.configs[KEY_NODE]
    out = rig.node.indexer.indexes[KEY_NODE].search(q, k, flt_of(flt, cfg))
    found = [rig.node.state.hit(KEY_NODE, int(label)) for label in out.labels]
    assert all(f is not None for f in found)
    return [f[0] for f in found if f is not None], out.scores.tolist()


KEY_NODE = "acme/docs"
OPS = st.lists(st.tuples(st.sampled_from(["upsert", "near", "update", "delete", "search",
                                          "search", "repeat"]),
                         st.integers(0, 2**31)), min_size=10, max_size=40)


@pytest.mark.parametrize("policy_loop", [False, True], ids=["no-loop", "policy-loop"])
def test_node_cache_hits_equal_fresh_searches(
    tmp_path_factory: pytest.TempPathFactory, policy_loop: bool
) -> None:
    """Every hit equals the index's fresh answer, under random writes and searches at
    session consistency; with the policy loop (``streamvec up``'s default) lazy misses are
    deferred whole and parked by the query log's thread or their repeat, whichever is
    first (streams/cache/controller.py, "Decisions off the search path")."""
    from tests.test_policy_online import LoopRig

    counts: Counter[str] = Counter()
    rig_class = LoopRig if policy_loop else Rig

    @settings(max_examples=25, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(metric=st.sampled_from(["cosine", "ip", "l2"]), ops=OPS)
    def run(metric: str, ops: list[tuple[str, int]]) -> None:
        rig = rig_class(tmp_path_factory.mktemp("rig"), head_capacity=16)
        try:
            svc = rig.node.service
            token = svc.create_index(IndexConfig("acme", "docs", NODE_DIM, metric=metric,  # type: ignore[arg-type]
                                                 recipe="Flat", fields=FIELDS)).token
            live: list[str] = []
            last = 0
            for i in range(20):
                token = svc.upsert(VectorUpsert(
                    "acme", "docs", f"v{i}", np.random.default_rng(i).standard_normal(
                        NODE_DIM).astype(np.float32), None, TAGS[i % 3], NUMERICS[i % 4])).token
                live.append(f"v{i}")
            for op, seed in ops:
                rng = np.random.default_rng(seed)
                if op == "repeat":  # the last search again: a hit unless a write changed it
                    op, seed = "search", last
                if op in ("upsert", "near", "update"):
                    id = str(rng.choice(live)) if op == "update" and live else f"v{seed % 50}"
                    base = HOT[seed % 3] if op == "near" else rng.standard_normal(NODE_DIM) * 2
                    vec = (base + rng.standard_normal(NODE_DIM) * 0.2).astype(np.float32)
                    rec = VectorUpsert("acme", "docs", id, vec, f'{{"s": {seed}}}',
                                       TAGS[seed % 3], NUMERICS[seed % 4])
                    token = svc.upsert(rec).token
                    live = sorted({*live, id})
                elif op == "delete" and live:
                    id = live[seed % len(live)]
                    token = svc.delete("acme", "docs", id).token
                    live.remove(id)
                elif op == "search":
                    last = seed
                    q, k, flt = HOT[seed % 3], 1 + seed % 5, NODE_FILTERS[seed % 4]
                    out = svc.search(SearchRequest("acme", "docs", q, k, flt,
                                                   Consistency.SESSION, (token,),
                                                   timeout_ms=10_000))
                    ids, scores = _fresh(rig, q, k, flt)
                    assert [h.id for h in out.hits] == ids
                    np.testing.assert_allclose([h.score for h in out.hits], scores,
                                               rtol=1e-5, atol=1e-5)
                    counts["hits" if out.debug["cache_hit"] else "misses"] += 1
                    if out.debug["cache_hit"]:
                        assert out.debug["layer"] == "L0"
                        assert out.debug["decision"]["action"] == "admit"
            stats = rig.node.cache.stats() if rig.node.cache else None
            assert stats is not None and stats.false_hits == 0
            counts["invalidations"] += stats.invalidations
            layers = rig.node.service.cache_layers
            assert layers is not None
            counts["deferred"] += layers.stats()["parked"]["parked"] if policy_loop else 0
        finally:
            rig.close()

    run()
    assert counts["hits"] > 0 and counts["misses"] > 0 and counts["invalidations"] > 0
    assert counts["deferred"] > 0 or not policy_loop


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path, head_capacity=100)
    r.node.service.create_index(IndexConfig("acme", "docs", 16, recipe="Flat", fields=FIELDS))
    yield r
    r.close()


def _upsert(rig: Rig, id: str, v: np.ndarray) -> str:
    return rig.node.service.upsert(VectorUpsert("acme", "docs", id, v.astype(np.float32))).token


def _search(rig: Rig, q: np.ndarray, token: str, k: int = 5) -> Any:
    return rig.node.service.search(SearchRequest("acme", "docs", q, k, None, Consistency.SESSION,
                                                 (token,), timeout_ms=10_000))


def test_hot_entries_stay_cached_under_writes_elsewhere(rig: Rig) -> None:
    """Hot queries live in dims 0-7, the write load in dims 8-15 (cosine 0 with them)."""
    rng = np.random.default_rng(5)
    token = ""
    for i in range(200):
        token = _upsert(rig, f"b{i}", rng.standard_normal(16))
    hot = [np.concatenate([rng.standard_normal(8), np.zeros(8)]) for _ in range(5)]

    def far() -> np.ndarray:
        return np.concatenate([np.zeros(8), rng.standard_normal(8)])

    top = {i: [h.id for h in _search(rig, q, token).hits] for i, q in enumerate(hot)}
    before = rig.node.cache.stats() if rig.node.cache else None
    assert before is not None
    searches = 0
    for w in range(300):
        if w % 3 == 2:  # update a row outside every hot result, moving it far away
            victim = next(f"b{i}" for i in rng.integers(200, size=50)
                          if all(f"b{i}" not in t for t in top.values()))
            token = _upsert(rig, victim, far())
        else:
            token = _upsert(rig, f"w{w}", far())
        for i, q in enumerate(hot):
            assert [h.id for h in _search(rig, q, token).hits] == top[i]
            searches += 1
    after = rig.node.cache.stats() if rig.node.cache else None
    assert after is not None
    hit_rate = (after.hits - before.hits) / searches
    print(f"\nL0 hit rate under a far write load: {hit_rate:.4f} "
          f"({after.hits - before.hits}/{searches}), invalidations {after.invalidations}")
    assert hit_rate >= 0.99
    near = hot[0] + rng.standard_normal(16) * 0.01  # a write next to a hot query invalidates
    token = _upsert(rig, "near", near)
    out = _search(rig, hot[0], token)
    assert not out.debug["cache_hit"] and out.hits[0].id == "near"


def test_deleting_a_cached_hit_misses_then_caches_again(rig: Rig) -> None:
    rng = np.random.default_rng(6)
    token = ""
    for i in range(50):
        token = _upsert(rig, f"v{i}", rng.standard_normal(16))
    q = rng.standard_normal(16)
    first = _search(rig, q, token)
    second = _search(rig, q, token)
    assert not first.debug["cache_hit"] and second.debug["cache_hit"]
    assert [h.id for h in first.hits] == [h.id for h in second.hits]
    assert second.debug["cache_hit_count"] == 1 and second.debug["cached_at"]
    token = rig.node.service.delete("acme", "docs", first.hits[2].id).token
    third = _search(rig, q, token)
    assert not third.debug["cache_hit"] and first.hits[2].id not in [h.id for h in third.hits]
    assert _search(rig, q, token).debug["cache_hit"]


def test_race_at_the_node_a_write_applied_before_the_put_is_not_cached(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The applier applies a write that changes the result after the search computed it
    and before it is offered to the cache."""
    # the eager put's race (the lazy put's, at the repeat: test_cache_miss_offers.py,
    # test_node_lazy_offer_serves_the_repeat_and_never_a_stale_result)
    assert rig.node.service.cache_layers is not None
    rig.node.service.cache_layers.lazy_offers = False
    rng = np.random.default_rng(9)
    token = ""
    for i in range(50):
        token = _upsert(rig, f"v{i}", rng.standard_normal(16))
    q = rng.standard_normal(16)
    cache = rig.node.cache
    assert cache is not None
    real_put = cache.put
    raced: list[str] = []

    def racing_put(entry: CachedResult, seen_seq: int) -> Any:
        if not raced:
            raced.append(_upsert(rig, "intruder", q))  # the best hit from now on
            assert rig.node.catch_up(10)
        return real_put(entry, seen_seq)

    monkeypatch.setattr(cache, "put", racing_put)
    first = _search(rig, q, token)
    assert "intruder" not in [h.id for h in first.hits]
    assert first.debug["decision"]["outcome"] == "stale"
    second = _search(rig, q, raced[0])
    assert not second.debug["cache_hit"] and second.hits[0].id == "intruder"
    assert _search(rig, q, raced[0]).debug["cache_hit"]


def test_a_result_whose_payload_join_missed_a_row_is_not_cached(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row in the index whose state is not committed yet (a write in flight) must not
    leave a short result in the cache."""
    rng = np.random.default_rng(10)
    token = ""
    for i in range(30):
        token = _upsert(rig, f"v{i}", rng.standard_normal(16))
    q = rng.standard_normal(16)
    real_hit = rig.node.state.hit
    calls: list[int] = []

    def first_hit_missing(index_key: str, label: int) -> Any:
        calls.append(label)
        return None if len(calls) == 1 else real_hit(index_key, label)

    monkeypatch.setattr(rig.node.state, "hit", first_hit_missing)
    short = _search(rig, q, token)
    assert len(short.hits) == 4 and short.debug["decision"] == "none"
    full = _search(rig, q, token)
    assert not full.debug["cache_hit"] and len(full.hits) == 5
    assert _search(rig, q, token).debug["cache_hit"]


def test_concurrent_searches_and_writes_measure_no_false_hits(tmp_path: Path) -> None:
    """Searchers race the applier (eventual consistency); every sampled hit is re-checked
    with the applier paused, and every entry left at the end equals a fresh search."""
    rig = Rig(tmp_path, head_capacity=64)
    rig.node.service.verify_rate = 1.0
    try:
        rig.node.service.create_index(IndexConfig("acme", "docs", NODE_DIM, recipe="Flat",
                                                  fields=FIELDS))
        rng = np.random.default_rng(8)
        for i in range(40):
            _upsert(rig, f"b{i}", rng.standard_normal(NODE_DIM))
        assert rig.node.catch_up(30)
        stop = threading.Event()
        errors: list[BaseException] = []

        def searcher(seed: int) -> None:
            r = np.random.default_rng(seed)
            try:
                while not stop.is_set():
                    q = HOT[r.integers(3)]
                    rig.node.service.search(SearchRequest("acme", "docs", q, 3))
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=searcher, args=(s,)) for s in range(2)]
        for t in threads:
            t.start()
        for w in range(150):
            base = HOT[w % 3] if w % 4 == 0 else rng.standard_normal(NODE_DIM) * 3
            _upsert(rig, f"w{w % 60}", base + rng.standard_normal(NODE_DIM) * 0.3)
        stop.set()
        for t in threads:
            t.join()
        assert not errors
        assert rig.node.catch_up(30)
        stats = rig.node.cache.stats() if rig.node.cache else None
        assert stats is not None and stats.verified > 0 and stats.false_hits == 0
        cache = rig.node.cache
        assert cache is not None
        for q in HOT:
            cached = cache.peek(query_key(KEY_NODE, Metric.COSINE, q, 3, None))
            if cached is not None:
                assert list(cached.ids) == _fresh(rig, q, 3, None)[0]
    finally:
        rig.close()
