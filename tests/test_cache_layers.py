"""The cache layers: L1 tolerant keys, L2 semantic clusters, the controller's consistency
rules, per-tenant and per-index budgets, the canonical text map, and the layers on a real
query node (hits checked against fresh searches)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.cache import (
    CacheController,
    CachedResult,
    CanonicalKeyMap,
    ResultCache,
    UpsertRow,
    query_key,
)
from streams.cache.agreement import agreement, features
from streams.cache.controller import L1_LINK_BYTES, CacheLookup, l2_rep_bytes
from streams.cache.semantic import (
    DEFAULT_L2_AGREEMENT,
    DEFAULT_L2_THRESHOLD,
    SemanticIndex,
    serves,
    verified,
)
from streams.cache.tolerant import K_BUCKETS, _planes, k_bucket, simhash, tolerant_key
from streams.embed import Embedder, open_embedder
from streams.index.exceptions import InvalidRequest
from streams.index.filters import Filter, parse_filter
from streams.index.model import (
    CacheSettings,
    Consistency,
    FieldKind,
    FilterField,
    IndexConfig,
    Metric,
    Vector,
    VectorUpsert,
)
from streams.service.api import SearchRequest
from tests.rigs import Rig

FIELDS = (FilterField("color", FieldKind.TAG),)
ALL = CacheSettings(("L0", "L1", "L2"))
DIM = 8


def cfg(
    tenant: str = "t",
    index: str = "i",
    metric: Metric = Metric.COSINE,
    cache: CacheSettings | None = ALL,
    dim: int = DIM,
) -> IndexConfig:
    return IndexConfig(tenant, index, dim, metric=metric, recipe="Flat", fields=FIELDS, cache=cache)


def vec(*xs: float) -> Vector:
    return np.array(xs, dtype=np.float32)


def unit(seed: int, dim: int = DIM) -> Vector:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    out: Vector = v / np.linalg.norm(v)
    return out


def result(
    c: IndexConfig,
    q: Vector,
    k: int,
    ids: Sequence[str],
    flt: Filter | None = None,
    scores: Sequence[float] | None = None,
) -> CachedResult:
    sc = tuple(scores) if scores is not None else tuple(1.0 - 0.1 * i for i in range(len(ids)))
    return CachedResult(
        query_key(c.key, c.metric, q, k, flt),
        c.key,
        c.metric,
        q,
        k,
        flt,
        tuple(range(len(ids))),
        tuple(ids),
        sc,
        (None,) * len(ids),
        created_s=time.monotonic(),
    )


def miss_then_offer(
    ctl: CacheController,
    c: IndexConfig,
    q: Vector,
    k: int,
    ids: Sequence[str],
    flt: Filter | None = None,
) -> CacheLookup:
    look = ctl.lookup(c, q, k, flt)
    assert look.layer == "none"
    out = ctl.offer(look, result(c, q, k, ids, flt))
    assert out is not None and out.stored, out
    return look


# -- L1: the tolerant key ---------------------------------------------------------------

FINITE = st.floats(-1e3, 1e3, allow_nan=False, width=32)


def test_k_buckets() -> None:
    assert [k_bucket(k) for k in (1, 5, 6, 10, 11, 20, 21, 50, 51, 100, 101, 1000)] == [
        5,
        5,
        10,
        10,
        20,
        20,
        50,
        50,
        100,
        100,
        101,
        1000,
    ]
    assert K_BUCKETS == (5, 10, 20, 50, 100)
    with pytest.raises(ValueError):
        k_bucket(0)


@settings(max_examples=200, deadline=None)
@given(
    v=st.lists(FINITE, min_size=DIM, max_size=DIM),
    scale=st.floats(1e-3, 1e3, allow_nan=False),
    k=st.integers(1, 120),
)
def test_tolerant_key_edge_cases(v: list[float], scale: float, k: int) -> None:
    q = np.array(v, dtype=np.float32)
    key = tolerant_key("t/i", Metric.COSINE, q, k, None)
    # -0.0 and 0.0 differ in bytes (and in the L0 key) but not in the tolerant key
    flipped = np.where(q == 0, np.float32(-0.0), q).astype(np.float32)
    assert tolerant_key("t/i", Metric.COSINE, flipped, k, None) == key
    # cosine ranks a positively scaled query the same: it keeps its key (unless the
    # scaled vector rounds a projection across zero, which fp32 can do near a plane)
    scaled = (q * np.float32(scale)).astype(np.float32)
    norm = float(np.linalg.norm(q))
    if norm > 0 and np.all(np.abs(_planes(DIM, 64) @ (q / norm)) > 1e-4):
        assert tolerant_key("t/i", Metric.COSINE, scaled, k, None) == key
    # every k of a bucket shares the key; the next bucket does not
    assert tolerant_key("t/i", Metric.COSINE, q, k_bucket(k), None) == key
    if k_bucket(k) < 1000:
        assert tolerant_key("t/i", Metric.COSINE, q, k_bucket(k) + 1, None) != key
    # index, metric and filter are part of the key
    assert tolerant_key("t/j", Metric.COSINE, q, k, None) != key
    assert tolerant_key("t/i", Metric.IP, q, k, None) != key
    flt = parse_filter("color:red", cfg())
    assert tolerant_key("t/i", Metric.COSINE, q, k, flt) != key


def test_tolerant_key_norm_matters_for_ip_and_l2() -> None:
    q = unit(1)
    for metric in (Metric.IP, Metric.L2):
        assert tolerant_key("t/i", metric, q, 10, None) != tolerant_key(
            "t/i", metric, 2 * q, 10, None
        )
    assert tolerant_key("t/i", Metric.COSINE, q, 10, None) == tolerant_key(
        "t/i", Metric.COSINE, 2 * q, 10, None
    )
    assert simhash(np.zeros(DIM, np.float32)) == b"\xff" * 8  # zero: all projections >= 0


# -- the controller's layers, on a result cache ---------------------------------------


def test_l1_serves_first_k_only_where_consistency_allows() -> None:
    ctl = CacheController(ResultCache(1 << 20))
    c = cfg()
    q = unit(2)
    miss_then_offer(ctl, c, q, 10, [f"v{i}" for i in range(10)])
    near = (q * np.float32(3.0)).astype(np.float32)  # another L0 key, same L1 key
    hit = ctl.lookup(c, near, 7, None)
    assert (
        hit.layer == "L1" and hit.entry is not None and hit.distance == pytest.approx(0.0, abs=1e-6)
    )
    assert hit.entry.ids[:7] == tuple(f"v{i}" for i in range(7))
    assert ctl.lookup(c, near, 11, None).layer == "none"  # needs more hits than cached
    for level in (Consistency.SESSION, Consistency.STRONG):
        look = ctl.lookup(c, near, 7, None, level)
        assert (look.layer, look.skipped) == ("none", ("L1", "L2"))
        assert ctl.lookup(c, q, 10, None, level).layer == "L0"  # exact: served at any level
    assert ctl.lookup(c, near, 7, None, Consistency.BOUNDED, 60_000).layer == "L1"
    assert ctl.lookup(c, near, 7, None, Consistency.BOUNDED, 0).layer == "none"  # too old
    assert ctl.stats()["layers"]["L1"]["hits"] == 2


def test_l2_reuses_a_cluster_within_the_threshold() -> None:
    ctl = CacheController(ResultCache(1 << 20), l2_threshold=0.05)
    c = cfg(cache=CacheSettings(("L2",)))
    q = unit(3)
    miss_then_offer(ctl, c, q, 5, ["a", "b", "c"])
    rng = np.random.default_rng(0)
    for eps, served in ((0.05, True), (0.5, False)):
        p = q + eps * rng.standard_normal(DIM).astype(np.float32) / np.sqrt(DIM)
        dist = 1.0 - float(p @ q) / float(np.linalg.norm(p))
        look = ctl.lookup(c, p.astype(np.float32), 5, None)
        assert (look.layer == "L2") == served == bool(serves(dist, 0.05)), (dist, look)
        if served:
            assert look.distance == pytest.approx(dist, abs=1e-5)
    # another filter or a larger k: another group, a miss
    assert ctl.lookup(c, q, 5, parse_filter("color:red", c)).layer == "none"
    assert ctl.lookup(c, q, 6, None).layer == "none"
    # per-index threshold overrides the node's
    tight = cfg(index="j", cache=CacheSettings(("L2",), l2_threshold=0.0))
    miss_then_offer(ctl, tight, q, 5, ["a"])
    p = (q + 0.01 * unit(9)).astype(np.float32)
    assert ctl.lookup(tight, p, 5, None).layer == "none"
    assert ctl.settings(tight).threshold == 0.0 and ctl.settings(c).threshold == 0.05


def test_layers_switch_per_index_and_default_is_l0_and_l3() -> None:
    ctl = CacheController(ResultCache(1 << 20))
    q = unit(4)
    plain = cfg(index="plain", cache=None)
    look = miss_then_offer(ctl, plain, q, 5, ["a"])
    assert look.layers == {"L0", "L3"}  # exact results and payloads, no tolerant layer
    assert ctl.lookup(plain, q, 5, None).layer == "L0"
    assert ctl.lookup(plain, 2 * q, 5, None).layer == "none"  # no tolerant layer
    off = cfg(index="off", cache=CacheSettings(("NONE",)))
    look = ctl.lookup(off, q, 5, None)
    assert look.layers == frozenset() and ctl.offer(look, result(off, q, 5, ["a"])) is None
    assert len(ctl.cache.stats().as_dict()) and ctl.cache.stats().entries == 1


def test_tolerant_entries_are_invalidated_exactly_like_l0() -> None:
    cache = ResultCache(1 << 20)
    ctl = CacheController(cache)
    c = cfg()
    q = vec(1, 0, 0, 0, 0, 0, 0, 0)
    miss_then_offer(ctl, c, q, 2, ["a", "b"])
    near = (q * 2).astype(np.float32)
    assert ctl.lookup(c, near, 2, None).layer == "L1"
    # a write far away leaves it; one that enters the top 2 drops it from every layer
    assert cache.invalidate(c.key, [UpsertRow("far", vec(-1, 0, 0, 0, 0, 0, 0, 0))]) == 0
    assert ctl.lookup(c, near, 2, None).layer == "L1"
    assert cache.invalidate(c.key, [UpsertRow("close", q.copy())]) == 1
    assert ctl.lookup(c, near, 2, None).layer == "none"
    assert ctl.lookup(c, q, 2, None).layer == "none"
    assert ctl.stats()["l1_keys"] == 0 and ctl.stats()["l2_clusters"] == 0
    # deleting an id held by the result drops it as well
    miss_then_offer(ctl, c, q, 2, ["a", "b"])
    assert cache.invalidate(c.key, (), ["b"]) == 1
    assert ctl.lookup(c, near, 2, None).layer == "none"


def test_tenant_and_index_budgets_evict_only_their_own() -> None:
    # an entry of an index with L1 and L2 on costs its own bytes and its two links'
    one = result(cfg(), unit(0), 5, ["a", "b"]).nbytes + L1_LINK_BYTES + l2_rep_bytes(DIM)
    cache = ResultCache(100 * one, tenant_budget_bytes=3 * one)
    ctl = CacheController(cache)
    a, b = cfg(tenant="a"), cfg(tenant="b")
    for i in range(3):
        miss_then_offer(ctl, b, unit(100 + i), 5, ["a", "b"])
    for i in range(10):
        miss_then_offer(ctl, a, unit(i), 5, ["a", "b"])
    assert cache.scope_bytes("t:a") <= 3 * one and cache.scope_bytes("t:b") == 3 * one
    assert all(ctl.lookup(b, unit(100 + i), 5, None).layer == "L0" for i in range(3))
    assert ctl.lookup(a, unit(9), 5, None).layer == "L0"  # the newest of a stays
    assert ctl.lookup(a, unit(0), 5, None).layer == "none"  # the oldest went
    cache.set_tenant_budget("b", one)  # shrinking evicts at once
    assert cache.scope_bytes("t:b") <= one
    small = cfg(tenant="c", cache=CacheSettings(("L0",), memory_budget_bytes=2 * one))
    for i in range(5):
        miss_then_offer(ctl, small, unit(200 + i), 5, ["a", "b"])
    assert cache.scope_bytes("i:c/i") <= 2 * one
    assert cache.stats().bytes <= cache.budget_bytes
    huge = cfg(tenant="d", cache=CacheSettings(("L0",), memory_budget_bytes=10))
    look = ctl.lookup(huge, unit(1), 5, None)
    out = ctl.offer(look, result(huge, unit(1), 5, ["a"]))
    assert out is not None and out.outcome == "too-large"


def test_background_offers_store_later_and_keep_the_race_check() -> None:
    cache = ResultCache(1 << 20)
    ctl = CacheController(cache, background_offers=True)
    c = cfg()
    q = vec(1, 0, 0, 0, 0, 0, 0, 0)
    look = ctl.lookup(c, q, 2, None)
    out = ctl.offer(look, result(c, q, 2, ["a", "b"]))
    assert out is not None and out.outcome == "queued" and out.decision.action == "admit"
    ctl.flush()
    assert ctl.lookup(c, q, 2, None).layer == "L0"
    assert ctl.lookup(c, (2 * q).astype(np.float32), 2, None).layer == "L1"
    # a write that changes the result lands between the search and the deferred store
    p = vec(0, 1, 0, 0, 0, 0, 0, 0)
    look = ctl.lookup(c, p, 2, None)
    cache.invalidate(c.key, [UpsertRow("new", p.copy())])
    assert ctl.offer(look, result(c, p, 2, ["x", "y"])) is not None
    ctl.flush()
    assert ctl.lookup(c, p, 2, None).layer == "none"
    assert cache.stats().stale_puts == 1 and ctl.stats()["offer_errors"] == 0
    ctl.close()


def test_semantic_index_remove_keeps_rows_consistent() -> None:
    idx = SemanticIndex(max_per_group=3)
    g = SemanticIndex.group_of("vector", "t/i", None, 5)
    keys = [query_key("t/i", Metric.COSINE, unit(i), 5, None) for i in range(4)]
    assert [idx.add(g, unit(i), keys[i]) for i in range(4)] == [True, True, True, False]
    assert idx.remove(keys[0]) and not idx.remove(keys[0])
    for i in (1, 2):
        m = idx.nearest(g, unit(i), Metric.COSINE)
        assert m is not None and m.key == keys[i] and m.distance == pytest.approx(0, abs=1e-6)
    assert not idx.add(g, np.zeros(DIM, np.float32), keys[3])  # a zero point has no angle
    assert idx.drop_index("t/i") == 2 and len(idx) == 0


def test_cache_settings_validate() -> None:
    assert CacheSettings(("L0", "NONE", "L0")).layers == ("L0",)
    for bad in ({"layers": ("L9",)}, {"memory_budget_bytes": -1}, {"l2_threshold": 3.0}):
        with pytest.raises(InvalidRequest) as err:
            CacheSettings(**bad)  # type: ignore[arg-type]
        assert err.value.code == "VEC_ERR_INVALID"
    s = CacheSettings(("L1",), 1024, 0.1)
    assert CacheSettings.from_avro(s.as_avro()) == s and CacheSettings.from_avro(None) is None


# -- the canonical text map -----------------------------------------------------------


def test_canonical_rules() -> None:
    m = CanonicalKeyMap()
    assert m.normalise("  What\u2019s   the BEST way\u2014to learn Python?? ") == (
        "what s the best way to learn python"
    )
    assert m.normalise("".join(chr(0xFF41 + ord(c) - 97) for c in "fullwidth")) == "fullwidth"
    assert m.normalise("Straße") == m.normalise("STRASSE")  # case folding
    assert m.normalise("# vs ##") != m.normalise("() vs (,)")  # symbols are kept
    assert m.normalise("dog bites man") != m.normalise("man bites dog")  # order kept
    bag = CanonicalKeyMap(stop_words=True, sort_words=True)
    assert bag.normalise("The dog bites a man") == bag.normalise("man bites dog")
    assert bag.normalise("is it") == "is it"  # only stop words: kept
    with pytest.raises(InvalidRequest):
        m.normalise("x" * 10_000)


def test_aliases_chain_refuse_cycles_and_hook_is_off_the_hot_path() -> None:
    m = CanonicalKeyMap(aliases={"How to learn py": "how do I learn python"})
    assert m.canonical("how to learn PY?") == "how do i learn python"
    m.add_alias("learn python how", "How to learn py")  # resolves through the chain
    assert m.canonical("learn python how") == "how do i learn python"
    m.add_alias("how do i learn python", "python learning")  # target moves: aliases follow
    assert m.canonical("how to learn py") == "python learning"
    with pytest.raises(InvalidRequest):
        m.add_alias("python learning", "how to learn py")  # a cycle
    assert m.canonical("python learning") == "python learning"
    assert m.remove_alias("how to learn py") and not m.remove_alias("how to learn py")

    calls: list[Sequence[str]] = []

    class Hook:
        def propose_aliases(self, texts: Sequence[str]) -> Iterable[tuple[str, str]]:
            calls.append(texts)
            return [("Whats up", "what is up"), ("x", "x")]

    m.canonical("whats up")
    assert calls == []  # lookups never call a model
    dry = m.propose(Hook(), ["whats up"])
    assert [p.added for p in dry] == [False, False] and m.canonical("whats up") == "whats up"
    wet = m.propose(Hook(), ["whats up"], apply=True)
    assert [p.added for p in wet] == [True, False] and m.canonical("Whats up!") == "what is up"


def test_text_l2_with_the_offline_embedder() -> None:
    from streams.embed import open_embedder

    emb = open_embedder()
    canon = CanonicalKeyMap()
    ctl = CacheController(ResultCache(1 << 20))
    c = cfg(dim=emb.dim, cache=CacheSettings(("L0", "L2")))
    a, b, other = (
        emb.embed([canon.canonical(t)])[0]
        for t in (
            "How do I learn Python?",
            "how do i  learn python",
            "What is the capital of France?",
        )
    )
    look = ctl.lookup_text(c, a, 5, None)
    assert look.layer == "none" and look.l2_leader
    out = ctl.offer_text(look, a, result(c, a, 5, ["doc1", "doc2"]))
    assert out is not None and out.stored
    hit = ctl.lookup_text(c, b, 3, None)
    assert hit.layer == "L2" and hit.entry is not None and hit.distance is not None
    assert hit.distance <= DEFAULT_L2_THRESHOLD and hit.entry.ids == ("doc1", "doc2")
    assert ctl.lookup_text(c, other, 3, None).layer == "none"
    assert ctl.lookup_text(c, b, 3, None, Consistency.STRONG).skipped == ("L2",)


# -- on a real query node -------------------------------------------------------------

NODE_DIM = 12


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path, head_capacity=64)
    yield r
    r.close()


def _fresh_ids(rig: Rig, c: IndexConfig, q: Vector, k: int, flt: str | None) -> list[str]:
    vi = rig.node.indexer.indexes[c.key]
    parsed = None if flt is None else parse_filter(flt, c)
    out = vi.search(q, k, parsed)
    hits = [rig.node.state.hit(c.key, int(label)) for label in out.labels.tolist()]
    return [h[0] for h in hits if h is not None]


def test_node_serves_layers_with_debug_and_counts_false_hits(rig: Rig) -> None:
    svc = rig.node.service
    svc.verify_rate = 1.0
    c = IndexConfig("acme", "docs", NODE_DIM, recipe="Flat", fields=FIELDS, cache=ALL)
    token = svc.create_index(c).token
    rng = np.random.default_rng(7)
    for i in range(40):
        token = svc.upsert(
            VectorUpsert(
                "acme",
                "docs",
                f"v{i}",
                rng.standard_normal(NODE_DIM).astype(np.float32),
                tags=("color:red",) if i % 2 else (),
            )
        ).token
    assert rig.node.catch_up(30)
    stored = svc.indexer.configs[c.key]
    assert stored.cache == ALL  # the settings went through the log and back

    q = unit(11, NODE_DIM)
    first = svc.search(SearchRequest("acme", "docs", q, 10, None, Consistency.SESSION, (token,)))
    assert first.debug["layer"] == "none"
    same = svc.search(SearchRequest("acme", "docs", q, 10))
    assert same.debug["layer"] == "L0" and same.debug["distance"] == 0.0
    scaled = (q * np.float32(2.5)).astype(np.float32)
    l1 = svc.search(SearchRequest("acme", "docs", scaled, 7))
    assert l1.debug["layer"] == "L1" and l1.debug["cache_hit"]
    assert [h.id for h in l1.hits] == _fresh_ids(rig, c, scaled, 7, None)  # cosine: exact
    strong = svc.search(SearchRequest("acme", "docs", scaled, 7, None, Consistency.STRONG))
    assert strong.debug["layer"] == "none"
    assert strong.debug["tolerant_skipped"] == ["L1", "L2"]
    near = (q + 0.05 * unit(12, NODE_DIM)).astype(np.float32)
    tol = svc.search(SearchRequest("acme", "docs", near, 10))
    assert tol.debug["layer"] in ("L1", "L2"), tol.debug
    info = svc.info("acme", "docs")["cache_layers"]["layers"]
    assert info["L1"]["verified"] >= 1 and info["L0"]["verified"] >= 1
    assert info["L0"]["false_hits"] == 0
    fresh_near = _fresh_ids(rig, c, near, 10, None)
    layer = tol.debug["layer"]
    assert info[layer]["false_hits"] == int([h.id for h in tol.hits] != fresh_near)
    # the other tolerant layer counted none (the rescaled L1 hit above is exact for cosine;
    # the k-7 miss at strong stored its bucket's 10 hits, so L1 may serve `near` too)
    assert info["L2" if layer == "L1" else "L1"]["false_hits"] == 0

    # a write that enters the cached top-k invalidates every layer's link to it
    token = svc.upsert(VectorUpsert("acme", "docs", "hot", q.copy())).token
    assert rig.node.catch_up(30)
    again = svc.search(SearchRequest("acme", "docs", scaled, 7))
    assert again.debug["layer"] == "none" and again.hits[0].id == "hot"


OPS = st.lists(
    st.tuples(
        st.sampled_from(["search", "search", "near", "upsert", "delete"]), st.integers(0, 10_000)
    ),
    min_size=4,
    max_size=14,
)


def test_session_and_strong_hits_equal_fresh_searches_with_all_layers_on(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Whatever L1/L2 hold, a search at ``session``/``strong`` answers what a fresh search
    of the node returns (L0 hits are exact; tolerant layers are skipped there)."""
    layers_seen: set[str] = set()

    @settings(
        max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(metric=st.sampled_from(["cosine", "ip", "l2"]), ops=OPS)
    def run(metric: str, ops: list[tuple[str, int]]) -> None:
        rig = Rig(tmp_path_factory.mktemp("rig"), head_capacity=16)
        try:
            svc = rig.node.service
            c = IndexConfig(
                "acme",
                "docs",
                NODE_DIM,
                metric=Metric(metric),
                recipe="Flat",
                fields=FIELDS,
                cache=CacheSettings(("L0", "L1", "L2"), None, 1.0),
            )
            token = svc.create_index(c).token
            hot = [unit(s, NODE_DIM) for s in range(3)]
            for i in range(12):
                token = svc.upsert(
                    VectorUpsert(
                        "acme",
                        "docs",
                        f"v{i}",
                        unit(50 + i, NODE_DIM),
                        tags=("color:red",) if i % 2 else (),
                    )
                ).token
            live = {f"v{i}" for i in range(12)}
            for op, seed in ops:
                rng = np.random.default_rng(seed)
                if op == "upsert":
                    id = f"v{seed % 20}"
                    token = svc.upsert(
                        VectorUpsert(
                            "acme",
                            "docs",
                            id,
                            (hot[seed % 3] + 0.3 * rng.standard_normal(NODE_DIM)).astype(
                                np.float32
                            ),
                        )
                    ).token
                    live.add(id)
                elif op == "delete" and live:
                    id = sorted(live)[seed % len(live)]
                    token = svc.delete("acme", "docs", id).token
                    live.discard(id)
                else:
                    q = (
                        hot[seed % 3]
                        if op == "search"
                        else (hot[seed % 3] + 0.02 * rng.standard_normal(NODE_DIM)).astype(
                            np.float32
                        )
                    )
                    k, flt = 1 + seed % 6, ("color:red" if seed % 4 == 0 else None)
                    # an eventual search first fills the tolerant layers
                    svc.search(SearchRequest("acme", "docs", q, k, flt))
                    level = Consistency.SESSION if seed % 2 else Consistency.STRONG
                    out = svc.search(
                        SearchRequest("acme", "docs", q, k, flt, level, (token,), timeout_ms=10_000)
                    )
                    assert out.debug["layer"] in ("L0", "none")
                    layers_seen.add(out.debug["layer"])
                    assert [h.id for h in out.hits] == _fresh_ids(rig, c, q, k, flt)
        finally:
            rig.close()

    run()
    assert layers_seen == {"L0", "none"}


def test_node_settings_default_to_exact_only_and_the_tuned_threshold() -> None:
    from streams.config import Settings

    s = Settings()
    assert s.cache_layers == ("L0", "L3") and s.cache_l2_threshold == 0.003  # vector queries
    assert s.cache_l2_text_threshold == DEFAULT_L2_THRESHOLD  # the QQP-tuned one: text path
    assert not s.cache_background_offers


def test_l3_payloads_never_serve_an_old_meta(rig: Rig) -> None:
    svc = rig.node.service
    c = IndexConfig("acme", "docs", NODE_DIM, recipe="Flat", cache=CacheSettings(("L0", "L3")))
    off = IndexConfig("acme", "plain", NODE_DIM, recipe="Flat", cache=CacheSettings(()))
    svc.create_index(c)
    svc.create_index(off)
    base = unit(21, NODE_DIM)
    for i in range(5):  # k = 5: every search returns every row
        v = (base + 0.01 * unit(30 + i, NODE_DIM)).astype(np.float32)
        for name in ("docs", "plain"):
            svc.upsert(VectorUpsert("acme", name, f"v{i}", v, f'{{"n": {i}}}'))
    assert rig.node.catch_up(30)
    first = svc.search(SearchRequest("acme", "docs", base, 5))
    assert first.debug["payload_cached"] == 0
    other = (base + 0.02 * unit(40, NODE_DIM)).astype(np.float32)  # a miss, same rows
    second = svc.search(SearchRequest("acme", "docs", other, 5))
    assert second.debug["layer"] == "none" and second.debug["payload_cached"] == 5
    assert [(h.id, h.meta) for h in second.hits] == [
        (h.id, h.meta) for h in svc.search(SearchRequest("acme", "plain", other, 5)).hits
    ]
    top = second.hits[0].id
    v = svc.get("acme", "docs", top).vector
    svc.upsert(VectorUpsert("acme", "docs", top, v, '{"n": "new"}'))  # a new label
    assert rig.node.catch_up(30)
    third = svc.search(SearchRequest("acme", "docs", (other + 1e-3).astype(np.float32), 5))
    assert {h.id: h.meta for h in third.hits}[top] == '{"n": "new"}'
    plain = svc.search(SearchRequest("acme", "plain", other, 5))
    assert plain.debug["payload_cached"] == 0  # no layer on: no L3 either


def test_resp_debug_names_the_layer_and_distance(rig: Rig) -> None:
    import redis

    from streams.service.resp import RespServer, serve_in_thread

    svc = rig.node.service
    svc.create_index(IndexConfig("acme", "docs", NODE_DIM, recipe="Flat", cache=ALL))
    for i in range(8):
        svc.upsert(VectorUpsert("acme", "docs", f"v{i}", unit(60 + i, NODE_DIM)))
    assert rig.node.catch_up(30)
    q = unit(70, NODE_DIM)

    def debug_of(vec: Vector, *extra: str) -> dict[str, str]:
        _hits, debug = client.execute_command(  # type: ignore[no-untyped-call]
            "VEC.SEARCH", "acme", "docs", "TOPK", 5, "VECTOR", vec.astype("<f4").tobytes(), *extra
        )
        pairs = (
            debug.items() if isinstance(debug, dict) else zip(debug[::2], debug[1::2], strict=True)
        )
        return {
            (k.decode() if isinstance(k, bytes) else k): (
                v.decode() if isinstance(v, bytes) else str(v)
            )
            for k, v in pairs
        }

    with serve_in_thread(RespServer(svc, "127.0.0.1", 0)) as server:
        client = redis.Redis(host="127.0.0.1", port=server.port)
        try:
            assert debug_of(q)["layer"] == "none"
            assert debug_of(q)["layer"] == "L0"
            tolerant = debug_of((q * np.float32(4)).astype(np.float32))
            assert tolerant["layer"] == "L1" and float(tolerant["distance"]) < 1e-6
            strong = debug_of((q * np.float32(4)).astype(np.float32), "CONSISTENCY", "strong")
            assert strong["layer"] == "none" and "L1" in strong["tolerant_skipped"]
        finally:
            client.close()


def test_http_create_index_takes_cache_settings_and_refuses_bad_ones(rig: Rig) -> None:
    import httpx

    from streams.service.http import create_http_app
    from tests.test_http_api import serve

    svc = rig.node.service
    with serve(create_http_app(svc)) as url, httpx.Client(base_url=url, timeout=10) as http:
        bad = http.post(
            "/v1/indexes",
            json={"tenant": "acme", "index": "bad", "dim": 4, "cache": {"layers": ["L7"]}},
        )
        assert bad.status_code == 400 and "VEC_ERR_INVALID" in bad.text
        assert (
            http.post(
                "/v1/indexes",
                json={"tenant": "acme", "index": "bad2", "dim": 4, "cache": {"l2_threshold": 5}},
            ).status_code
            == 400
        )
        assert [c.key for c in svc.list_indexes("acme")] == []  # nothing appended
        body = {
            "tenant": "acme",
            "index": "docs",
            "dim": 4,
            "cache": {"layers": ["L0", "L1"], "memory_budget_bytes": 1 << 20},
        }
        assert http.post("/v1/indexes", json=body).status_code == 201
        r = http.post("/v1/indexes/acme/docs/vectors", json={"id": "a", "vector": [1, 0, 0, 0]})
        assert r.status_code in (200, 201), r.text
        assert rig.node.catch_up(30)
        listed = http.get("/v1/indexes", params={"tenant": "acme"}).json()["indexes"]
        assert listed[0]["cache"]["layers"] == ["L0", "L1"]

        def layer(v: list[float]) -> str:
            r = http.post("/v1/indexes/acme/docs/search", json={"vector": v, "k": 1})
            assert r.status_code == 200, r.text
            return str(r.json()["debug"]["layer"])

        assert [layer([1, 1, 0, 0]), layer([1, 1, 0, 0]), layer([2, 2, 0, 0])] == [
            "none",
            "L0",
            "L1",
        ]


# -- L2's text stage (order-aware agreement on top of the embedding distance) ----------


def _text_l2(texts_cached: Sequence[str]) -> tuple[CacheController, IndexConfig, Embedder]:
    """A controller with L2 on and ``texts_cached`` each stored as a text cluster (with
    their texts), on the real offline embedder."""
    emb = open_embedder()
    ctl = CacheController(ResultCache(1 << 20))
    c = cfg(dim=emb.dim, cache=CacheSettings(("L0", "L2")))
    for i, t in enumerate(texts_cached):
        e = _embed(emb, t)
        look = ctl.lookup_text(c, e, 5, None, text=t)
        assert look.layer == "none"
        out = ctl.offer_text(look, e, result(c, e, 5, [f"doc{i}"]), text=t)
        assert out is not None and out.stored
    return ctl, c, emb


def _embed(emb: Embedder, text: str) -> Vector:
    out: Vector = emb.embed([CanonicalKeyMap().canonical(text)])[0]
    return out


def _ask(
    ctl: CacheController, c: IndexConfig, emb: Embedder, text: str, with_text: bool = True
) -> CacheLookup:
    return ctl.lookup_text(c, _embed(emb, text), 5, None, text=text if with_text else None)


def test_text_l2_word_order_swap_is_not_served() -> None:
    """The bag-of-tokens embedder puts the swap within the distance threshold; the text
    stage refuses it."""
    cached, swapped = "Why do Poles dislike Russians?", "Why do Russians dislike Poles?"
    ctl, c, emb = _text_l2([cached])
    assert 1.0 - float(_embed(emb, cached) @ _embed(emb, swapped)) <= DEFAULT_L2_THRESHOLD
    look = _ask(ctl, c, emb, swapped)
    assert look.layer == "none" and look.entry is None
    assert _ask(ctl, c, emb, cached).layer == "L2"  # the cluster itself still serves


@pytest.mark.parametrize(
    ("cached", "asked"),
    [
        ("Is coffee good for your health?", "Is coffee not good for your health?"),
        ("How can I lose 5 kg in a month?", "How can I lose 10 kg in a month?"),
        ("What are arguments for virtue ethics?", "What are arguments against virtue ethics?"),
        ("How do I become a dentist?", "How do you become a dentist?"),
        ("What is the best IT company in Pune?", "What is the best company in Pune?"),
    ],
)
def test_text_l2_negation_number_and_entity_mismatch_not_served(cached: str, asked: str) -> None:
    ctl, c, emb = _text_l2([cached])
    assert _ask(ctl, c, emb, asked).layer == "none"
    assert agreement(features(cached), features(asked)) == 0.0  # a guard, not the bar
    assert _ask(ctl, c, emb, cached).layer == "L2"  # the cluster itself still serves


def test_text_l2_paraphrase_within_threshold_is_served() -> None:
    ctl, c, emb = _text_l2(
        ["How do I learn Python?", "How can I improve my English speaking skills?"]
    )
    for asked, doc in (
        ("how do i  learn python", "doc0"),
        ("How do I improve my English speaking skills?", "doc1"),  # distance 0.012, agreement 0.875
    ):
        look = _ask(ctl, c, emb, asked)
        assert look.layer == "L2" and look.entry is not None, asked
        assert look.entry.ids == (doc,) and look.distance is not None
        assert look.distance <= DEFAULT_L2_THRESHOLD
    # without the query text a text cluster is never served (it cannot be verified)
    assert _ask(ctl, c, emb, "how do i  learn python", with_text=False).layer == "none"


def test_text_stage_takes_the_nearest_candidate_that_agrees() -> None:
    idx = SemanticIndex(min_agreement=DEFAULT_L2_AGREEMENT)
    g = SemanticIndex.group_of("text", "t/i", None, 5)
    ka, kb, kc = (query_key("t/i", Metric.COSINE, unit(s), 5, None) for s in (1, 2, 3))
    q = unit(7)
    assert idx.add(g, q, ka, "Why do Poles dislike Russians?")  # nearest, disagrees
    assert idx.add(g, (q + 0.02 * unit(8)).astype(np.float32), kb, "why do poles dislike russians")
    assert idx.add(g, unit(9), kc)  # no text: never taken by a text query
    m = idx.nearest(g, q, Metric.COSINE, "Why do Russians dislike Poles")
    assert m is None
    m = idx.nearest(g, q, Metric.COSINE, "Why do poles dislike Russians")
    assert m is not None and m.key == ka and m.agreement == 1.0
    # within: candidates farther than the threshold are not even compared
    far = idx.nearest(g, unit(9), Metric.COSINE, "Why do poles dislike Russians", within=1e-6)
    assert far is None
    # without text only the text-less representative can answer
    m = idx.nearest(g, q, Metric.COSINE)
    assert m is not None and m.key == kc and m.agreement is None
    # a text the normaliser refuses: the lookup raises, add adds nothing
    with pytest.raises(InvalidRequest):
        idx.nearest(g, q, Metric.COSINE, "x" * 10_000)
    assert not idx.add(g, q, query_key("t/i", Metric.COSINE, unit(4), 5, None), "x" * 10_000)
    assert len(idx) == 3
    with pytest.raises(ValueError):
        SemanticIndex(min_agreement=1.5)


def test_verified_matches_the_index_rule() -> None:
    scores = np.array([0.0, 0.5, 0.8, 0.95, 1.0])
    assert verified(scores, 0.8).tolist() == [False, False, True, True, True]
    assert verified(scores, 0.0).tolist() == [False, True, True, True, True]  # 0: a guard failed


@given(st.text(alphabet=st.characters(codec="ascii"), max_size=60) | st.text(max_size=30))
@settings(max_examples=300, deadline=None)
def test_strict_normaliser_fast_path_matches_the_rule(text: str) -> None:
    import unicodedata

    from streams.cache.canonical import _is_punct

    folded = unicodedata.normalize("NFKC", text).casefold()
    slow = "".join(" " if ch.isspace() or _is_punct(ch) else ch for ch in folded)
    assert CanonicalKeyMap().normalise(text) == " ".join(slow.split())


def test_strict_normaliser_keeps_order_and_stop_words() -> None:
    canon = CanonicalKeyMap()
    assert canon.normalise("Why do Poles dislike Russians?") != canon.normalise(
        "Why do Russians dislike Poles?"
    )
    assert canon.normalise("What is the purpose of life ?") == "what is the purpose of life"
    assert canon.normalise("What is the purpose of life?") == "what is the purpose of life"
