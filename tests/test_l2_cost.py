"""L2's cost-aware reuse (streams/cache/semantic.py, "Cost-aware reuse"): a cluster's result
is served when the expected saving beats the expected cost of a wrong answer, never beyond
the threshold (the cap). Real ResultCache, real embedder, a real query node."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from streams.cache import CacheController, CachedResult, ResultCache, query_key
from streams.cache.canonical import CanonicalKeyMap
from streams.cache.semantic import (
    DEFAULT_L2_PENALTY_MS,
    DEFAULT_L2_TEXT_PENALTY_MS,
    DEFAULT_L2_TEXT_THRESHOLD,
    DEFAULT_L2_VECTOR_THRESHOLD,
    REFERENCE_COST_MS,
    TEXT_CURVE,
    VECTOR_CURVE,
    FalseHitCurve,
    SemanticIndex,
    reuses,
)
from streams.config import Settings
from streams.embed import open_embedder
from streams.index.model import (
    CacheSettings,
    Consistency,
    IndexConfig,
    Metric,
    Vector,
    VectorUpsert,
)
from streams.service.api import SearchRequest
from streams.service.query_node import QueryNode
from tests.rigs import Rig

DIM = 16
L2_ONLY = CacheSettings(("L2",))


def cfg(index: str = "i", cache: CacheSettings = L2_ONLY, dim: int = DIM) -> IndexConfig:
    return IndexConfig("t", index, dim, recipe="Flat", cache=cache)


def unit(seed: int, dim: int = DIM) -> Vector:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    out: Vector = v / np.linalg.norm(v)
    return out


def at_distance(q: Vector, d: float, seed: int) -> Vector:
    """A unit vector at cosine distance ``d`` from the unit ``q``."""
    o = unit(seed, q.size)
    o = o - float(o @ q) * q
    o /= np.linalg.norm(o)
    cos = 1.0 - d
    out: Vector = (cos * q + math.sqrt(1.0 - cos * cos) * o).astype(np.float32)
    return out


def entry(c: IndexConfig, q: Vector, ids: Sequence[str], cost_ms: float) -> CachedResult:
    k = len(ids)
    return CachedResult(
        query_key(c.key, c.metric, q, k, None), c.key, c.metric, q, k, None,
        tuple(range(k)), tuple(ids), tuple(1.0 - 0.1 * i for i in range(k)), (None,) * k,
        compute_ms=cost_ms, created_s=time.monotonic(),
    )  # fmt: skip


def cached(ctl: CacheController, c: IndexConfig, q: Vector, cost_ms: float) -> None:
    look = ctl.lookup(c, q, 3, None)
    assert look.layer == "none"
    out = ctl.offer(look, entry(c, q, ["a", "b", "c"], cost_ms))
    assert out is not None and out.stored


# -- the rule ---------------------------------------------------------------------------


def test_defaults_reproduce_the_tuned_thresholds_at_the_reference_cost() -> None:
    assert VECTOR_CURVE.max_distance(REFERENCE_COST_MS, DEFAULT_L2_PENALTY_MS) == (
        DEFAULT_L2_VECTOR_THRESHOLD
    )
    assert TEXT_CURVE.max_distance(REFERENCE_COST_MS, DEFAULT_L2_TEXT_PENALTY_MS) == (
        DEFAULT_L2_TEXT_THRESHOLD
    )
    # cheaper: tighter (here: none at all); costlier: looser
    for curve, pen, thr in (
        (VECTOR_CURVE, DEFAULT_L2_PENALTY_MS, DEFAULT_L2_VECTOR_THRESHOLD),
        (TEXT_CURVE, DEFAULT_L2_TEXT_PENALTY_MS, DEFAULT_L2_TEXT_THRESHOLD),
    ):
        assert curve.max_distance(0.3, pen) < thr < curve.max_distance(10.0, pen)
    # the node's settings default to the same
    s = Settings()
    assert s.cache_l2_penalty_ms == DEFAULT_L2_PENALTY_MS
    assert s.cache_l2_text_penalty_ms == DEFAULT_L2_TEXT_PENALTY_MS


def test_the_stored_curves_are_nondecreasing_and_bad_curves_are_refused() -> None:
    for curve in (TEXT_CURVE, VECTOR_CURVE):
        assert list(curve.rates) == sorted(curve.rates) and curve.rates[-1] < 1.0
        assert curve.p_wrong(curve.edges[-1] + 1e-9) == 1.0  # beyond the measured range
    with pytest.raises(ValueError, match="rates"):
        FalseHitCurve((0.01, 0.02), (0.2, 0.1))
    with pytest.raises(ValueError, match="edges"):
        FalseHitCurve((0.02, 0.01), (0.1, 0.2))
    with pytest.raises(ValueError, match="one rate per edge"):
        FalseHitCurve((0.01,), (0.1, 0.2))


COST = st.floats(0.0, 1e4, allow_nan=False)
DIST = st.floats(0.0, 0.3, allow_nan=False)


@given(d=DIST, d2=DIST, c=COST, c2=COST, pen=st.floats(0.0, 1e4), cap=st.floats(0.0, 0.3))
def test_reuse_is_monotone_in_cost_and_distance_and_never_beyond_the_cap(
    d: float, d2: float, c: float, c2: float, pen: float, cap: float
) -> None:
    for curve in (TEXT_CURVE, VECTOR_CURVE):
        ok = reuses(d, c, cap, pen, curve)
        if d > cap:
            assert not ok
        if ok:  # closer or costlier: served too
            assert reuses(min(d, d2), max(c, c2), cap, pen, curve)
        # the closed form agrees with the distance bar
        assert ok == (d <= min(cap, curve.max_distance(c, pen)))


# -- the controller: vector path ------------------------------------------------------------


def test_an_expensive_representative_is_reused_where_a_cheap_one_is_not() -> None:
    ctl = CacheController(ResultCache(1 << 20), l2_threshold=0.05, l2_penalty_ms=12.0)
    d = 0.008  # p_wrong 0.127: served when c / (c + 12) >= 0.127, i.e. c >= 1.75 ms
    for index, cost, served in (("cheap", 0.3, False), ("dear", 10.0, True)):
        c = cfg(index)
        q = unit(1)
        cached(ctl, c, q, cost)
        look = ctl.lookup(c, at_distance(q, d, 2), 3, None)
        assert (look.layer == "L2") == served, (index, look)
        if served:
            assert look.entry is not None and look.entry.ids == ("a", "b", "c")
            assert look.distance == pytest.approx(d, abs=1e-4)
        # the query at distance 0.0004 (p_wrong 0.096): the cheap one is still too cheap
        near = ctl.lookup(c, at_distance(q, 0.0004, 3), 3, None)
        assert (near.layer == "L2") == served


def test_the_cap_holds_however_expensive_the_search() -> None:
    ctl = CacheController(ResultCache(1 << 20), l2_threshold=0.01, l2_penalty_ms=1.0)
    c = cfg()
    q = unit(4)
    cached(ctl, c, q, 1e6)  # reuse pays at any distance the curve knows
    assert VECTOR_CURVE.max_distance(1e6, 1.0) > 0.1
    assert ctl.lookup(c, at_distance(q, 0.009, 5), 3, None).layer == "L2"
    assert ctl.lookup(c, at_distance(q, 0.02, 6), 3, None).layer == "none"
    # the per-index threshold is a cap too
    tight = cfg("tight", CacheSettings(("L2",), l2_threshold=0.002))
    cached(ctl, tight, q, 1e6)
    assert ctl.lookup(tight, at_distance(q, 0.001, 7), 3, None).layer == "L2"
    assert ctl.lookup(tight, at_distance(q, 0.004, 8), 3, None).layer == "none"


@pytest.mark.parametrize(
    ("penalty", "served"), [(0.0, True), (5.0, True), (12.0, False), (1e9, False)]
)
def test_the_penalty_setting_changes_the_decision(penalty: float, served: bool) -> None:
    # cost 1 ms at distance 0.004 (p_wrong 0.127): pays while 0.127 * (1 + P) <= 1
    ctl = CacheController(ResultCache(1 << 20), l2_threshold=0.05, l2_penalty_ms=penalty)
    c = cfg()
    q = unit(9)
    cached(ctl, c, q, 1.0)
    look = ctl.lookup(c, at_distance(q, 0.004, 10), 3, None)
    assert (look.layer == "L2") == served
    assert ctl.stats()["layers"]["L2"]["hits"] == int(served)


def test_bad_penalties_are_refused() -> None:
    for bad in (-1.0, math.nan):
        with pytest.raises(ValueError, match="penalty"):
            CacheController(ResultCache(1 << 20), l2_penalty_ms=bad)
        with pytest.raises(ValueError, match="penalty"):
            CacheController(ResultCache(1 << 20), l2_text_penalty_ms=bad)
    with pytest.raises(ValidationError):
        Settings(cache_l2_penalty_ms=-1.0)


def test_a_removed_representative_leaves_the_right_cost_with_the_moved_one() -> None:
    idx = SemanticIndex()
    grp = SemanticIndex.group_of("vector", "t/i", None, 3)
    keys = [query_key("t/i", Metric.COSINE, unit(s), 3, None) for s in range(3)]
    for s, (key, cost) in enumerate(zip(keys, (1.0, 2.0, 3.0), strict=True)):
        assert idx.add(grp, unit(s), key, cost_ms=cost)
    assert idx.remove(keys[0])  # the last row moves into row 0
    m = idx.nearest(grp, unit(2), Metric.COSINE)
    assert m is not None and m.key == keys[2] and m.cost_ms == 3.0
    m = idx.nearest(grp, unit(1), Metric.COSINE, within=0.01)
    assert m is not None and m.key == keys[1] and m.cost_ms == 2.0


# -- the text path, with the offline embedder ------------------------------------------------


def test_text_path_reuses_a_costly_answer_and_not_a_cheap_one() -> None:
    emb = open_embedder()
    canon = CanonicalKeyMap()
    cached_q = "How can I improve my English speaking skills?"
    asked = "How do I improve my English speaking skills?"
    a, b = (emb.embed([canon.canonical(t)])[0] for t in (cached_q, asked))
    d = 1.0 - float(a @ b) / float(np.linalg.norm(a) * np.linalg.norm(b))
    assert 0.003 < d <= DEFAULT_L2_TEXT_THRESHOLD, d  # 0.012: p_wrong 0.050
    ctl = CacheController(ResultCache(1 << 20), l2_text_penalty_ms=DEFAULT_L2_TEXT_PENALTY_MS)
    for index, cost, served in (("cheap", 0.3, False), ("dear", 10.0, True)):
        c = cfg(index, CacheSettings(("L0", "L2")), emb.dim)
        look = ctl.lookup_text(c, a, 3, None, text=cached_q)
        assert look.layer == "none"
        out = ctl.offer_text(look, a, entry(c, a, ["x", "y", "z"], cost), cached_q)
        assert out is not None and out.stored
        hit = ctl.lookup_text(c, b, 3, None, text=asked)
        assert (hit.layer == "L2") == served, (index, d, hit)


# -- a real query node ------------------------------------------------------------------------


@pytest.mark.parametrize(("penalty", "served"), [(0.0, True), (1e9, False)])
def test_a_real_node_takes_the_penalty_setting(
    tmp_path: Path, penalty: float, served: bool
) -> None:
    rig = Rig(tmp_path, head_capacity=64)
    rig.node.close()
    rig.node = QueryNode(
        rig.log, rig.topics, rig.codec, tmp_path / "node2", head_capacity=64,
        cache_l2_threshold=0.05, cache_l2_penalty_ms=penalty,
    ).start()  # fmt: skip
    try:
        svc = rig.node.service
        c = IndexConfig("acme", "docs", DIM, recipe="Flat", cache=CacheSettings(("L0", "L2")))
        token = svc.create_index(c).token
        rng = np.random.default_rng(5)
        for i in range(20):
            vec = rng.standard_normal(DIM).astype(np.float32)
            token = svc.upsert(VectorUpsert("acme", "docs", f"v{i}", vec)).token
        q = unit(11)
        session = Consistency.SESSION
        first = svc.search(
            SearchRequest("acme", "docs", q, 5, consistency=session, tokens=(token,))
        )
        assert first.debug["layer"] == "none"
        near = svc.search(SearchRequest("acme", "docs", at_distance(q, 0.004, 12), 5))
        assert (near.debug["layer"] == "L2") == served, near.debug
        layers = svc.cache_layers
        assert layers is not None and layers.l2_penalty_ms == penalty
    finally:
        rig.close()


def test_the_env_settings_reach_the_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from streams.node import open_node

    monkeypatch.setenv("STREAMVEC_CACHE_L2_PENALTY_MS", "7.5")
    monkeypatch.setenv("STREAMVEC_CACHE_L2_TEXT_PENALTY_MS", "0")
    settings = Settings(
        data_dir=tmp_path, registry_port=0, http_port=0, resp_port=0, ingest_enabled=False,
        durability="none",
    )  # fmt: skip
    assert (settings.cache_l2_penalty_ms, settings.cache_l2_text_penalty_ms) == (7.5, 0.0)
    with open_node(settings) as node:
        layers = node.start_query_node().service.cache_layers
        assert layers is not None
        assert (layers.l2_penalty_ms, layers.l2_text_penalty_ms) == (7.5, 0.0)
    monkeypatch.setenv("STREAMVEC_CACHE_L2_PENALTY_MS", "-1")
    with pytest.raises(ValidationError):
        Settings(data_dir=tmp_path)
