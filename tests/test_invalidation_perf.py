"""The invalidation index's cheap search-side path (O(1) add/remove, clusters settled and
re-fitted on the write side, fits on a thread swapped in later) against a brute-force scan,
and the L1 key's fast path against its definition."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.cache import InvalidationIndex, QueryKey, UpsertRow
from streams.cache.tolerant import SIMHASH_BITS, _planes, k_bucket, simhash, tolerant_key
from streams.index.model import Metric
from tests.test_result_cache import (
    FILTERS,
    METRICS,
    NUMERICS,
    TAGS,
    config,
    flt_of,
    full_scan,
    kth_of,
    qkey,
)

OPS = st.lists(
    st.tuples(
        st.sampled_from(["add", "add", "add", "remove", "write", "rebuild", "settle", "wait"]),
        st.integers(0, 40),  # how many (adds, removals, rows)
        st.integers(0, 3),  # deleted ids of a write
    ),
    min_size=1,
    max_size=14,
)


@pytest.mark.parametrize("background", [True, False])
@pytest.mark.parametrize("metric", METRICS)
@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    dim=st.integers(2, 6),
    ops=OPS,
    spread=st.sampled_from([0.05, 0.5, 3.0]),
)
def test_pruned_answer_equals_a_full_scan_over_random_adds_removes_and_rebuilds(
    metric: Metric,
    background: bool,
    seed: int,
    dim: int,
    ops: list[tuple[str, int, int]],
    spread: float,
) -> None:
    """Any interleaving of adds (new keys and replaced ones), removals (pending or
    clustered entries), writes, forced rebuilds, settles and finished background fits:
    every write's answer is exactly the brute-force one."""
    rng = np.random.default_rng(seed)
    cfg = config(dim, metric)
    centres = rng.standard_normal((4, dim)) * 3
    index = InvalidationIndex(metric, dim, max_clusters=6, background=background)
    entries: dict[QueryKey, Any] = {}
    ids = [f"x{i}" for i in range(30)]
    next_key = 0

    def vec(c: int) -> np.ndarray:
        centre = centres[c]
        out: np.ndarray = (centre + rng.standard_normal(dim) * spread).astype(np.float32)
        return out

    for op, n, n_deleted in ops:
        if op == "add":
            for _ in range(n):
                if entries and rng.random() < 0.1:  # replace an entry of the same key
                    key = list(entries)[rng.integers(len(entries))]
                else:
                    key, next_key = qkey(next_key), next_key + 1
                c = int(rng.integers(4))
                q = vec(c)
                # a k-th hit from its group, or a tight one (close to q: bounds that prune)
                ref = vec(c) if rng.random() < 0.5 else q + rng.standard_normal(dim) * spread * 0.2
                # fewer than k hits (no bound) only in group 3: the other groups' prune
                kth = None if c == 3 and rng.random() < 0.3 else kth_of(metric, q, ref)
                flt = flt_of(FILTERS[rng.integers(len(FILTERS))], cfg)
                hit = tuple(rng.choice(ids, size=rng.integers(0, 4), replace=False).tolist())
                index.add(key, q, kth, flt, hit)
                entries[key] = (q, kth, flt, hit)
        elif op == "remove":
            for key in list(entries)[: n // 2]:
                assert index.remove(key)
                del entries[key]
            assert not index.remove(qkey(10**9))
        elif op == "rebuild":
            index.rebuild()
        elif op == "settle":
            index.settle()
        elif op == "wait":
            assert index.wait_fit(10)
        else:
            rows = []
            for _ in range(n):
                c = int(rng.integers(4))  # inside, at and beyond the clusters' rims
                v = centres[c] + rng.standard_normal(dim) * spread * rng.uniform(0.3, 4.0)
                v = v.astype(np.float32)
                if entries and rng.random() < 0.2:  # exactly a cached query: ties enter
                    v = list(entries.values())[rng.integers(len(entries))][0].copy()
                rows.append(
                    UpsertRow(
                        str(rng.choice(ids)),
                        v,
                        TAGS[rng.integers(len(TAGS))],
                        NUMERICS[rng.integers(len(NUMERICS))],
                    )
                )
            deleted = set(rng.choice(ids, size=n_deleted, replace=False).tolist())
            want = full_scan(metric, entries, rows, deleted)
            got = index.affected_by_ids(deleted | {r.id for r in rows})
            if rows:
                got |= index.affected_by_upserts(
                    np.stack([r.vector for r in rows]),
                    [r.tags for r in rows],
                    [r.numeric for r in rows],
                )
            assert got == want
            assert not rows or index.pending() == 0  # an upsert settles every pending entry
        assert len(index) == len(entries)
    index.wait_fit(10)


def _clustered(metric: Metric, n: int, background: bool = True) -> InvalidationIndex:
    rng = np.random.default_rng(5)
    dim = 8
    index = InvalidationIndex(metric, dim, max_clusters=16, background=background)
    hot = rng.standard_normal((4, dim)) * 4
    for i in range(n):
        q = (hot[i % 4] + rng.standard_normal(dim) * 0.05).astype(np.float32)
        index.add(qkey(i), q, kth_of(metric, q, hot[i % 4] * 1.02), None, (f"id{i}",))
    return index


@pytest.mark.parametrize("metric", METRICS)
def test_search_side_adds_and_removes_never_cluster_or_fit(metric: Metric) -> None:
    """add/remove (the search path) only append to the pending set: no cluster is opened,
    joined or re-fitted, however many changes; the next write settles them."""
    index = _clustered(metric, 200)
    far = np.full((1, 8), 50.0, dtype=np.float32)
    index.affected_by_upserts(far, [()], [{}])  # the first write fits the first clusters
    assert index.rebuilds == 1 and index.pending() == 0
    clusters = index.clusters()
    rng = np.random.default_rng(9)
    clustered = 200
    for i in range(200, 1200):  # five times the entries at the fit: stale many times over
        index.add(qkey(i), rng.standard_normal(8).astype(np.float32), 0.0, None, ())
        if i % 3 == 0:
            assert index.remove(qkey(i - 150))
            clustered -= i - 150 < 200
    assert index.rebuilds == 1 and index.clusters() <= clusters  # removals may empty one
    assert index.wait_fit(0)  # no fit was started by the search side
    assert index.pending() == len(index) - clustered
    index.affected_by_upserts(far, [()], [{}])
    assert index.pending() == 0


@pytest.mark.parametrize("metric", METRICS)
def test_a_background_fit_is_swapped_in_by_a_later_write_and_stays_exact(
    metric: Metric,
) -> None:
    index = _clustered(metric, 64)
    near = np.full((1, 8), 0.0, dtype=np.float32)
    index.affected_by_upserts(near, [()], [{}])
    assert index.rebuilds == 1
    rng = np.random.default_rng(11)
    extra = {}
    for i in range(64, 400):  # stale: the next write starts a fit on a thread
        q = (rng.standard_normal(8) * 4).astype(np.float32)
        index.add(qkey(i), q, 0.5 if metric is not Metric.L2 else 1.0, None, ())
        extra[qkey(i)] = q
    index.affected_by_upserts(near, [()], [{}])
    assert index.rebuilds == 1  # the write itself did not wait for the fit
    assert index.wait_fit(30)
    index.affected_by_upserts(near, [()], [{}])
    assert index.rebuilds == 2  # swapped in
    # and the swapped-in clusters still find every entry a vector enters
    probe = next(iter(extra.values()))[None, :]
    assert qkey(64) in index.affected_by_upserts(probe, [()], [{}])


def test_without_background_a_stale_index_refits_on_the_write() -> None:
    index = _clustered(Metric.COSINE, 64, background=False)
    v = np.ones((1, 8), dtype=np.float32)
    index.affected_by_upserts(v, [()], [{}])
    for i in range(64, 200):
        index.add(qkey(i), np.ones(8, dtype=np.float32), 0.5, None, ())
    index.affected_by_upserts(v, [()], [{}])
    assert index.rebuilds == 2 and index.wait_fit(0)


def test_add_rejects_a_query_of_another_dim_and_keeps_the_old_entry() -> None:
    index = InvalidationIndex(Metric.COSINE, 4)
    index.add(qkey(1), np.ones(4, dtype=np.float32), 0.9, None, ("a",))
    with pytest.raises(ValueError, match="dim"):
        index.add(qkey(1), np.ones(5, dtype=np.float32), 0.9, None, ("b",))
    assert qkey(1) in index and index.affected_by_ids(["a"]) == {qkey(1)}
    assert index.affected_by_ids(["b"]) == set()


# -- L1: the SimHash and the key against their definitions --------------------------------

FINITE = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=60, deadline=None)
@given(v=st.lists(FINITE, min_size=16, max_size=16))
def test_simhash_is_the_sign_of_each_projection(v: list[float]) -> None:
    q = np.array(v, dtype=np.float32)
    proj = _planes(16, SIMHASH_BITS).astype(np.float64) @ q.astype(np.float64)
    norm = float(np.linalg.norm(q))
    # away from a plane, and above fp32's underflow (simhash projects in fp32: a
    # subnormal input's products round to 0): there fp32 agrees with the exact sign
    clear = np.abs(proj) > max(1e-3 * norm, 1e-30)
    got = np.unpackbits(np.frombuffer(simhash(q), dtype=np.uint8)).astype(bool)
    want = proj >= 0.0 if norm > 0 else np.ones(SIMHASH_BITS, dtype=bool)
    assert got.shape == (SIMHASH_BITS,)
    assert np.array_equal(got[clear], want[clear]) if norm > 0 else got.all()


def _reference_key(index_key: str, metric: Metric, v: np.ndarray, k: int, flt: Any) -> bytes:
    """The key as the module docstring defines it, every part hashed afresh."""
    h = hashlib.blake2b(digest_size=16, person=b"streamvec.L1")
    parts = [
        index_key.encode(),
        metric.value.encode(),
        str(k_bucket(k)).encode(),
        ("" if flt is None else str(flt)).encode(),
        simhash(v),
    ]
    if metric is not Metric.COSINE:
        import math

        norm = math.sqrt(float(v @ v))
        parts.append(str(math.floor(math.log2(norm) * 16)).encode())
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


@pytest.mark.parametrize("metric", METRICS)
def test_tolerant_key_with_a_cached_prefix_equals_the_definition(metric: Metric) -> None:
    """The per-(index, metric, bucket, filter) digest state is copied, never updated in
    place: keys interleaved over indexes, filters and buckets match a fresh hash."""
    rng = np.random.default_rng(3)
    cfg = config(16, metric)
    for i in range(300):
        v = rng.standard_normal(16).astype(np.float32)
        index_key = f"t/i{i % 3}"
        flt = flt_of(FILTERS[i % len(FILTERS)], cfg)
        k = int(rng.integers(1, 120))
        assert tolerant_key(index_key, metric, v, k, flt) == _reference_key(
            index_key, metric, v, k, flt
        )


@pytest.mark.parametrize("metric", METRICS)
def test_an_entry_replaced_while_a_fit_runs_is_not_taken_from_the_snapshot(
    metric: Metric,
) -> None:
    """The fit's snapshot holds slot s for key A; A is removed and B added into the same
    slot (the free list is last-in first-out) with a far query before the swap. B must
    join a cluster that covers it, not A's fitted one."""
    index = _clustered(metric, 64)
    origin = np.zeros((1, 8), dtype=np.float32)
    index.affected_by_upserts(origin, [()], [{}])
    rng = np.random.default_rng(2)
    for i in range(64, 200):
        q = (rng.standard_normal(8) * 0.05 + 4).astype(np.float32)
        index.add(qkey(i), q, kth_of(metric, q, q * 1.01), None, ())
    index.affected_by_upserts(origin, [()], [{}])  # stale: the fit starts, snapshot taken
    assert index.rebuilds == 1  # the fit is not swapped in before the next write
    assert index.remove(qkey(5))
    far = np.full(8, -40.0, dtype=np.float32)
    index.add(qkey(10_000), far, kth_of(metric, far, far * 0.999), None, ())
    assert index.wait_fit(30)
    got = index.affected_by_upserts(far[None, :], [()], [{}])
    assert index.rebuilds == 2
    assert qkey(10_000) in got and qkey(5) not in got
