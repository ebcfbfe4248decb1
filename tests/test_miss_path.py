"""The cache's miss-path shortcuts keep their behaviour (docs/benchmarks.md, "Miss path,
pass 3"): the stored copy of an entry, the per-index budget scopes made once, the lazy
decision features and the inlined context counts."""

from __future__ import annotations

import json
import math
from dataclasses import fields, replace

import numpy as np

from streams.cache import CachedResult, ResultCache
from streams.cache.keys import query_key
from streams.cache.policy import AdmissionDecision, OnlineContext, PolicyHolder, RulesPolicy
from streams.index.model import Metric
from streams.policy.context import ContextTracker
from streams.policy.trace import Request

KEY = "t/i"


def _entry(i: int, index_key: str = KEY, ms: float = 5.0) -> CachedResult:
    q = np.array([i, 1, 0], dtype=np.float32)
    return CachedResult(
        query_key(index_key, Metric.IP, q, 2, None),
        index_key,
        Metric.IP,
        q,
        2,
        None,
        (0, 1),
        ("a", "b"),
        (2.0, 1.0),
        (None, "m"),
        ("tok",),
        compute_ms=ms,
        created_s=1.5,
    )


def test_the_stored_entry_is_a_field_for_field_copy_with_the_decision() -> None:
    policy = PolicyHolder(1 << 20)
    cache = ResultCache(1 << 20, policy=policy)
    e = _entry(1)
    out = cache.put(e, 0)
    assert out.stored
    held = cache.peek(e.key)
    assert held is not None and held is not e and e.admission is None
    for f in fields(CachedResult):
        if f.name not in ("admission", "hit_count"):
            assert getattr(held, f.name) is getattr(e, f.name), f.name
    assert held.admission == out.decision and held.hit_count == 0
    assert held == replace(e, admission=out.decision)


def test_budgets_set_after_an_index_was_cached_still_bound_it() -> None:
    size = _entry(0).nbytes
    cache = ResultCache(1 << 20)
    for i in range(4):  # no budget but the node's: the fast path
        assert cache.put(_entry(i), 0).stored
    assert cache.scope_bytes("i:" + KEY) == 4 * size
    cache.set_index_budget(KEY, 2 * size)  # the index's state (and scopes) exist already
    assert cache.stats().entries == 2 and cache.scope_bytes("i:" + KEY) == 2 * size
    assert cache.put(_entry(9), 0).stored
    assert cache.stats().entries == 2 and cache.peek(_entry(9).key) is not None
    assert cache.put(_entry(0, "t/other"), 0).stored  # another index: not bounded by it
    cache.set_tenant_budget("t", size)
    assert cache.scope_bytes("t:t") == size and cache.stats().entries == 1
    big = ResultCache(1 << 20, tenant_budget_bytes=size - 1)
    assert big.put(_entry(0), 0).outcome == "too-large"
    assert ResultCache(size - 1).put(_entry(0), 0).outcome == "too-large"


def test_decision_features_are_built_when_read_and_equal_the_context() -> None:
    ctxs = OnlineContext(1 << 20, clock=lambda: 100.0)
    req, ctx, state = ctxs.observe(_entry(3), hit=False)
    d = RulesPolicy().decide_ctx(req, ctx, state)
    want = {"freq": 0.0, "gap_s": 1e9, "size": float(ctx.size), "rel_cost": 1.0}
    assert d.features == want and want == d.features
    assert dict(d.features) == want and len(d.features) == 4 and sorted(d.features) == sorted(want)
    assert d.as_dict()["features"] == want
    json.dumps(d.as_dict())  # the query log's record stays plain JSON
    assert d == AdmissionDecision(
        d.action, 1.0, "rules", d.arm, d.ttl_ms, d.bucket, None, d.priority, want
    )


def _reference(t: ContextTracker, req: Request) -> tuple[float, float, float]:
    """freq, cluster_freq, window_s as the tracker's formulas state them."""
    epoch = t._n // t.half_life

    def aged(table: dict[str, tuple[float, int]], name: str) -> float:
        count, at = table.get(name, (0.0, epoch))
        return count * 0.5 ** (epoch - at)

    cluster = req.ctx.get("cluster")
    per = (t._t - t._t0) / t._n if t._t0 is not None and t._t > t._t0 else 1.0
    return (
        aged(t._key, req.key),
        aged(t._cluster, cluster) if isinstance(cluster, str) else -1.0,
        t.half_life / math.log(2) * per,
    )


def test_context_counts_decay_by_epoch_as_the_formulas_say() -> None:
    t = ContextTracker(half_life=3)
    rng = np.random.default_rng(7)
    for n in range(200):
        key = f"k{rng.integers(0, 6)}"
        extra: dict[str, str] = {"filter": ["none", "tag", "odd"][n % 3]}
        if n % 2:
            extra["cluster"] = f"c{rng.integers(0, 3)}"
        req = Request(float(n) * 0.5, key, 100 + n, 1.0 + n % 4, extra)
        freq, cluster_freq, window = _reference(t, req)
        ctx = t.observe(req)
        assert (ctx.freq, ctx.cluster_freq, ctx.window_s) == (freq, cluster_freq, window)
        assert ctx.filter_kind == {"none": 0, "tag": 1}.get(extra["filter"], 4)
    assert t.peek(req).freq > 0
