"""What an approximate answer depended on (issue 4, item 2: exact invalidation).

* the index: ``TailSegment.search_recorded`` returns the same hits as ``search`` and the
  IVF lists it probed, which are the ``nprobe`` centroids nearest the query (checked
  against numpy over the quantizer's centroids) and hold every hit; widening records the
  wider level's lists, an exhaustive search records nothing, HNSW records its efSearch;
  ``VectorIndex.search(record=True)`` names the approximate segments only;
* the node, on an IVF recipe: (a) a cached entry's recorded lists equal those a fresh
  search probes at the same position, in the hit's debug map and in the query log's
  SearchEvent; (b) an insert that enters the answer still invalidates it (the Head is
  exact); (c) sealing and merging invalidate nothing: the entry is still served, and the
  segment its lists name no longer exists (docs/design.md says what such a hit guarantees).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from streams.cache.querylog import QueryLogEmitter, SearchObserver
from streams.index.filters import parse_filter
from streams.index.head import HeadIndex, prepare
from streams.index.model import (
    Consistency,
    Dtype,
    FieldKind,
    FilterField,
    IndexConfig,
    Metric,
    VectorUpsert,
)
from streams.index.segment import Probe, TailSegment, default_nprobe
from streams.index.vector_index import VectorIndex
from streams.service.api import SearchRequest
from tests.rigs import Rig

DIM = 16
KEY = "acme/docs"


def clustered(n: int, seed: int, centres: int = 24) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, DIM)).astype(np.float32) * 3
    return (c[rng.integers(0, centres, n)] + rng.standard_normal((n, DIM))).astype(np.float32)


def segment(recipe: str, n: int = 3000, metric: Metric = Metric.COSINE) -> TailSegment:
    """A segment of ``n`` clustered rows (labels ``3i``; every 50th row tagged ``color:red``),
    sealed from a Head as the index does."""
    head = HeadIndex(DIM, metric)
    tags = [("color:red",) if i % 50 == 0 else ("color:blue",) for i in range(n)]
    head.add_many(np.arange(n, dtype=np.int64) * 3, clustered(n, 1), tags)
    return TailSegment.build(head.freeze(), recipe=recipe, dtype=Dtype.FP32, metric=metric)


def nearest_lists(seg: TailSegment, q: np.ndarray, nprobe: int) -> list[int]:
    """The ``nprobe`` lists whose centroids are nearest ``q``, by numpy (not FAISS's search)."""
    ivf = faiss.extract_index_ivf(seg.index)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    if isinstance(seg.index, faiss.IndexPreTransform):  # OPQ: the rotated query
        q = seg.index.chain.at(0).apply(q[None, :])[0]
    l2 = seg.metric is Metric.L2
    key = ((centroids - q) ** 2).sum(axis=1) if l2 else -(centroids @ q)
    return [int(i) for i in np.argsort(key, kind="stable")[:nprobe]]


def rows_of_lists(seg: TailSegment, lists: tuple[int, ...]) -> set[int]:
    invlists = faiss.extract_index_ivf(seg.index).invlists
    out: set[int] = set()
    for lst in lists:
        size = invlists.list_size(lst)
        out |= {int(i) for i in faiss.rev_swig_ptr(invlists.get_ids(lst), size)}
    return out


@pytest.mark.parametrize(
    ("recipe", "metric"),
    [
        *((r, m) for r in ("IVF32,Flat", "IVF32,SQ8", "IVF32,PQ4x4") for m in Metric),
        ("OPQ4,IVF16,PQ4x4", Metric.COSINE),  # the IVF sees the rotated query
    ],
)
def test_a_recorded_ivf_search_returns_the_same_hits_and_the_lists_that_hold_them(
    recipe: str, metric: Metric
) -> None:
    nlist = 32 if recipe.startswith("IVF32") else 16
    seg = segment(recipe, n=3000 if nlist == 32 else 1000, metric=metric)
    assert seg.recipe_used == recipe  # not shrunk: 39+ rows per list and PQ centroid
    nprobe = default_nprobe(nlist)
    for i, raw in enumerate(clustered(5, 9)):
        q = prepare(raw[None, :], metric)[0]
        plain = seg.search(q, 10)
        found, probe = seg.search_recorded(q, 10)
        np.testing.assert_array_equal(found.labels, plain.labels)
        np.testing.assert_array_equal(found.scores, plain.scores)
        assert probe is not None and probe.ef == 0 and len(probe.lists) == nprobe
        assert list(probe.lists) == nearest_lists(seg, q, nprobe), i
        # the answer depends on those lists only: every hit's row is in one of them
        rows = np.searchsorted(seg.labels, found.labels)
        assert set(rows.tolist()) <= rows_of_lists(seg, probe.lists)


def test_widening_records_the_wider_lists_and_an_exhaustive_search_records_none() -> None:
    seg = segment("IVF32,Flat")
    q = prepare(clustered(1, 4), Metric.COSINE)[0]
    # one probed list holds fewer than 200 rows: the search widens (nprobe x4)
    found, probe = seg.search_recorded(q, 200, nprobe=1)
    assert found.level >= 1 and found.labels.size == 200
    assert probe is not None and list(probe.lists) == nearest_lists(seg, q, 4**found.level)
    plain = seg.search(q, 200, nprobe=1)
    np.testing.assert_array_equal(found.labels, plain.labels)
    # nprobe >= nlist, or a filter passing few rows: exhaustive, exact over the segment
    assert seg.search_recorded(q, 10, nprobe=32)[1] is None
    config = IndexConfig("acme", "docs", DIM, fields=(FilterField("color", FieldKind.TAG),))
    red = parse_filter("color:red", config)
    found, probe = seg.search_recorded(q, 10, red)
    assert probe is None and found.labels.size == 10
    np.testing.assert_array_equal(found.labels, seg.search(q, 10, red).labels)


def test_hnsw_records_its_ef_and_the_index_names_only_approximate_segments() -> None:
    hnsw = segment("HNSW16", n=500)
    q = prepare(clustered(1, 4), Metric.COSINE)[0]
    found, probe = hnsw.search_recorded(q, 10, ef_search=40)
    assert probe == Probe(ef=40) and probe.as_dict() == {"ef": 40}
    np.testing.assert_array_equal(found.labels, hnsw.search(q, 10, ef_search=40).labels)
    assert segment("Flat", n=500).search_recorded(q, 10)[1] is None

    vi = VectorIndex(IndexConfig("acme", "docs", DIM, recipe="IVF16,Flat"), head_capacity=800)
    data = clustered(2000, 5)
    vi.upsert_many(np.arange(2000, dtype=np.int64), data)
    job = vi.begin_seal()
    assert job is not None
    job.build()
    vi.finish_seal(job)
    names = [s["name"] for s in vi.stats()["segments"]]
    assert len(names) == 1 and vi.stats()["head_rows"] == 0
    vi.upsert(5000, data[0])  # the Head: exact, never listed
    plain = vi.search(data[0], 10)
    assert plain.depends is None
    recorded = vi.search(data[0], 10, record=True)
    np.testing.assert_array_equal(recorded.labels, plain.labels)
    assert recorded.depends is not None
    assert [name for name, _ in recorded.depends] == names
    ((_, p),) = recorded.depends
    assert len(p.lists) == default_nprobe(16) and p.ef == 0


# -- the node ------------------------------------------------------------------------------


def read_events(rig: Rig) -> list[dict[str, Any]]:
    out = []
    for partition, end in rig.log.end_offsets(rig.topics.query_log).items():
        offset = 0
        while offset < end:
            batch = rig.log.read(rig.topics.query_log, partition, offset, 500)
            out += [rig.codec.decode(r.value)[1] for r in batch if r.value is not None]
            offset = batch[-1].offset + 1
    return out


def wait_for(pred: Any, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return bool(pred())


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path, head_capacity=1500)
    emitter = QueryLogEmitter(r.log, r.topics, r.codec, linger_s=0.01).start()
    r.node.service.search_observer = SearchObserver(emitter)
    yield r
    emitter.close()
    r.close()


def write(rig: Rig, prefix: str, vectors: np.ndarray) -> str:
    records = [VectorUpsert("acme", "docs", f"{prefix}{i}", v) for i, v in enumerate(vectors)]
    token = ""
    for start in range(0, len(records), 500):
        out = rig.node.service.upsert_many(records[start : start + 500])
        token = out[-1].token  # type: ignore[union-attr]
    return token


def search(rig: Rig, q: np.ndarray, token: str, ef: int | None = None) -> Any:
    return rig.node.service.search(
        SearchRequest(
            "acme", "docs", q, 10, None, Consistency.SESSION, (token,), timeout_ms=10_000, ef=ef
        )
    )


def one_segment(rig: Rig, rows: int) -> str:
    vi = rig.node.indexer.indexes[KEY]

    def merged() -> bool:
        # a full Head is sealed at the indexer's next poll (into a second segment), so the
        # state is settled only when the Head is below capacity and nothing is frozen
        st = vi.stats()
        segs = st["segments"]
        return (
            len(segs) == 1
            and segs[0]["rows"] + st["head_rows"] == rows
            and st["head_rows"] < vi.head_capacity
            and st["frozen_head_rows"] == 0
        )

    assert wait_for(merged), vi.stats()
    return str(vi.stats()["segments"][0]["name"])


def test_a_cached_ivf_answer_records_its_lists_and_keeps_the_invalidation_guarantee(
    rig: Rig,
) -> None:
    rig.node.service.create_index(IndexConfig("acme", "docs", DIM, recipe="IVF32,Flat"))
    data = clustered(3000, 7)
    token = write(rig, "v", data)
    assert rig.node.catch_up(30)
    name = one_segment(rig, 3000)  # two sealed Heads, merged once the writer is idle
    vi = rig.node.indexer.indexes[KEY]
    q = data[11] + np.float32(0.3)

    # (a) the miss records the lists, the hit serves them, a fresh search probes the same
    miss = search(rig, q, token)
    # lazy offers (the default): parked, stored by the repeat below, which it serves
    assert not miss.debug["cache_hit"] and miss.debug["decision"]["outcome"] == "parked"
    fresh = vi.search(q, 10, record=True)
    assert fresh.depends is not None and [n for n, _ in fresh.depends] == [name]
    lists = list(fresh.depends[0][1].lists)
    assert len(lists) == default_nprobe(32)
    assert miss.debug["depends"] == {name: {"lists": lists}}
    hit = search(rig, q, token)
    assert hit.debug["cache_hit"] and hit.debug["depends"] == {name: {"lists": lists}}
    assert [h.id for h in hit.hits] == [h.id for h in miss.hits]
    hit.debug["depends"][name]["lists"].append(-1)  # a caller's copy, not the entry's
    assert search(rig, q, token).debug["depends"] == {name: {"lists": lists}}
    uncached = search(rig, q, token, ef=64)  # EF bypasses the cache: nothing recorded
    assert "depends" not in uncached.debug

    # (b) an insert that would enter the answer invalidates it: the Head is exact
    cache = rig.node.cache
    assert cache is not None
    token = write(rig, "near", q[None, :])
    again = search(rig, q, token)
    assert not again.debug["cache_hit"] and again.hits[0].id == "near0"
    assert again.debug["depends"] == {name: {"lists": lists}}  # near0 is in the Head
    assert search(rig, q, token).debug["cache_hit"]

    # (c) seals and merges invalidate nothing: the entry is still served, as computed,
    # and the segment its lists name is gone (replaced by one over all the rows)
    before = cache.stats().invalidations
    token = write(rig, "far", -q + clustered(3000, 8) * np.float32(0.01))
    assert rig.node.catch_up(30)
    merged = one_segment(rig, 6001)
    assert merged != name and name not in [s["name"] for s in vi.stats()["segments"]]
    served = search(rig, q, token)
    assert served.debug["cache_hit"] and cache.stats().invalidations == before
    assert [h.id for h in served.hits] == [h.id for h in again.hits]
    assert served.debug["depends"] == {name: {"lists": lists}}  # as computed, then
    now = vi.search(q, 10, record=True).depends
    assert now is not None and [n for n, _ in now] == [merged]

    # the query log carries it: misses and hits that involved the cache, null otherwise
    loop = rig.node.service.search_observer
    assert loop is not None and loop.emitter is not None and loop.emitter.flush(10)
    events = [e for e in read_events(rig) if e.get("removal") is None]
    expected = [{"segment": name, "lists": lists, "ef": 0}]
    assert events[0]["depends"] == expected and not events[0]["cache_hit"]
    assert events[1]["depends"] == expected and events[1]["cache_hit"]
    assert events[3]["depends"] is None  # the EF search
    assert events[-1]["depends"] == expected and events[-1]["cache_hit"]
