"""Congruence of the index core with a brute-force numpy reference (STYLE: congruence tests).

Every recipe and metric is compared with exact float64 search over the live rows: the exact
recipe (``Flat``) must agree rank by rank, approximate ones must reach a stated recall@10,
through every stage of a row's life (Head, sealed, merged, saved and loaded), with and
without filters, after deletes and updates. A property test drives random interleavings of
writes, deletes, seals and merges (with jobs left pending while writes go on) against a dict
model. Data: a mixture of 40 Gaussian clusters in a 12-dim latent space, projected to
32 dims plus noise (real embeddings have a low intrinsic dimension too).
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.index import segment as segment_module
from streams.index.exceptions import DimensionMismatch, InvalidRequest
from streams.index.filters import Filter, parse_filter
from streams.index.model import Dtype, FieldKind, FilterField, IndexConfig, Metric
from streams.index.segment import SegmentCorrupt, plan_recipe
from streams.index.vector_index import MergeJob, SealJob, SearchOutcome, VectorIndex

DIM = 32
N = 3000
K = 10
FIELDS = (FilterField("color", FieldKind.TAG), FilterField("price", FieldKind.NUMERIC))
METRICS = [Metric.COSINE, Metric.IP, Metric.L2]

Matrix = npt.NDArray[np.float32]


def clustered(rng: np.random.Generator, n: int, dim: int = DIM) -> Matrix:
    centers = np.random.default_rng(7).standard_normal((40, 12)) * 3
    lift = np.random.default_rng(8).standard_normal((12, dim)) / 3
    latent = centers[rng.integers(0, 40, n)] + rng.standard_normal((n, 12))
    return (latent @ lift + 0.1 * rng.standard_normal((n, dim))).astype(np.float32)


def config(recipe: str = "Flat", metric: Metric = Metric.COSINE, dtype: Dtype = Dtype.FP32,
           dim: int = DIM) -> IndexConfig:
    return IndexConfig("t", "i", dim, metric, dtype, recipe, FIELDS)


@dataclass
class Row:
    vector: Matrix
    tags: tuple[str, ...]
    price: float | None


class Model:
    """The reference: live rows by label, searched exactly in float64."""

    def __init__(self, metric: Metric) -> None:
        self.metric = metric
        self.rows: dict[int, Row] = {}
        self._cache: tuple[object, ...] | None = None
        self._masks: dict[Filter, npt.NDArray[np.bool_]] = {}

    def _matrix(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        key = tuple(self.rows)  # a label's row never changes, so its labels identify the set
        if not self.rows:
            return np.empty(0, np.int64), np.empty((0, 0))
        if self._cache is None or self._cache[0] != key:
            labels = np.array(sorted(self.rows), dtype=np.int64)
            x = np.array([self.rows[int(lb)].vector for lb in labels], dtype=np.float64)
            if self.metric is Metric.COSINE:
                x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
            self._cache = (key, labels, x)
            self._masks = {}
        return self._cache[1], self._cache[2]  # type: ignore[return-value]

    def passes(self, flt: Filter) -> npt.NDArray[np.bool_]:
        labels, _ = self._matrix()
        if flt not in self._masks:
            rows = [self.rows[int(lb)] for lb in labels]
            self._masks[flt] = np.array(
                [flt.matches(r.tags, {} if r.price is None else {"price": r.price}) for r in rows],
                dtype=bool,
            )
        return self._masks[flt]

    def search(self, query: Matrix, k: int, flt: Filter | None = None
               ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], dict[int, float]]:
        labels, x = self._matrix()
        if labels.size == 0:
            return labels, np.empty(0), {}
        q = query.astype(np.float64)
        if self.metric is Metric.COSINE:
            q = q / max(float(np.linalg.norm(q)), 1e-30)
        scores = ((x - q) ** 2).sum(axis=1) if self.metric is Metric.L2 else x @ q
        if flt is not None:
            keep = self.passes(flt)
            labels, scores = labels[keep], scores[keep]
        order = np.argsort(scores if self.metric is Metric.L2 else -scores, kind="stable")[:k]
        every = dict(zip(labels.tolist(), scores.tolist(), strict=True))
        return labels[order], scores[order], every


def assert_exact(out: SearchOutcome, model: Model, query: Matrix, k: int,
                 flt: Filter | None = None) -> None:
    """Rank by rank: each hit's true score equals the reference's score at that rank (so
    labels agree except between rows whose scores tie within float32 error), and the
    reported score is that score."""
    ref_labels, ref_scores, all_scores = model.search(query, k, flt)
    assert len(out.labels) == len(ref_labels)
    assert len(set(out.labels.tolist())) == len(out.labels)
    for label, score, ref in zip(out.labels.tolist(), out.scores.tolist(), ref_scores, strict=True):
        assert label in all_scores, f"label {label} is deleted or filtered out"
        tol = 1e-4 * max(1.0, abs(ref))
        assert abs(all_scores[label] - ref) <= tol
        assert abs(score - ref) <= tol


def recall(outs: list[SearchOutcome], model: Model, queries: Matrix,
           flt: Filter | None = None) -> float:
    found = 0
    total = 0
    for out, q in zip(outs, queries, strict=True):
        ref, _, alive = model.search(q, K, flt)
        assert all(lb in alive for lb in out.labels.tolist()), "deleted or filtered row returned"
        found += len(set(out.labels.tolist()) & set(ref.tolist()))
        total += len(ref)
    return found / total


@pytest.fixture(autouse=True)
def one_openmp_thread() -> Iterator[None]:
    """FAISS's OpenMP teams spin-wait at barriers; on two shared cores that turns
    millisecond builds into seconds. Tests need no parallelism, so run them on one."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def data() -> tuple[Matrix, Matrix, npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    rng = np.random.default_rng(1)
    prices = rng.uniform(0, 100, N)
    prices[rng.random(N) < 0.1] = np.nan  # rows without a price
    return clustered(rng, N), clustered(rng, 40), rng.integers(0, 4, N), prices


def load_rows(index: VectorIndex, model: Model, vectors: Matrix, colors: npt.NDArray[np.int64],
              prices: npt.NDArray[np.float64], *, seal: bool) -> None:
    for i, vec in enumerate(vectors):
        tags = (f"color:c{colors[i]}",) + (("hot",) if i % 7 == 0 else ())
        price = None if math.isnan(prices[i]) else float(prices[i])
        index.upsert(i, vec, tags, {} if price is None else {"price": price})
        model.rows[i] = Row(vec, tags, price)
        if seal and index.needs_seal():
            job = index.begin_seal()
            assert job is not None
            job.build()
            index.finish_seal(job)


def churn(index: VectorIndex, model: Model, rng: np.random.Generator) -> None:
    """Delete 10% of the rows and update 5% (delete + upsert under a new label)."""
    labels = sorted(model.rows)
    for label in rng.choice(labels, size=len(labels) // 10, replace=False).tolist():
        assert index.delete(label)
        del model.rows[label]
    next_label = max(labels) + 1
    for label in rng.choice(sorted(model.rows), size=len(labels) // 20, replace=False).tolist():
        row = model.rows.pop(label)
        assert index.delete(label)
        moved = (row.vector + 0.05 * rng.standard_normal(DIM)).astype(np.float32)
        index.upsert(next_label, moved, row.tags, {} if row.price is None else {"price": row.price})
        model.rows[next_label] = Row(moved, row.tags, row.price)
        next_label += 1
    assert not index.delete(labels[0] if labels[0] not in model.rows else -1)


FILTERS = ["color:c1|c2 price>=20", "-color:c0 price:[10 60] tag:hot"]

# (recipe, dtype, recall@10 floor unfiltered, floor filtered). Measured on this data
# (sealed / merged, worst metric): HNSW32 1.00/0.995, IVF32,Flat 1.00/0.983 (filtered
# walk 0.955), HNSW32 int8 0.970/0.973, HNSW32 fp16 1.00/0.995, IVF32,PQ32x4 0.785/0.733.
RECIPES = [
    ("Flat", Dtype.FP32, 1.0, 1.0),
    ("HNSW32", Dtype.FP32, 0.95, 0.95),
    ("IVF32,Flat", Dtype.FP32, 0.95, 0.9),
    ("HNSW32", Dtype.INT8, 0.93, 0.93),
    ("HNSW32,SQ8", Dtype.FP32, 0.93, 0.93),
    ("HNSW32", Dtype.FP16, 0.95, 0.95),
    ("IVF32,PQ32x4", Dtype.FP32, 0.65, 0.7),
]


@pytest.mark.parametrize("metric", METRICS, ids=str)
@pytest.mark.parametrize(("recipe", "dtype", "floor", "filtered_floor"), RECIPES,
                         ids=[f"{r}-{d}" for r, d, _, _ in RECIPES])
def test_congruence_through_the_lifecycle(
    data: tuple[Matrix, Matrix, npt.NDArray[np.int64], npt.NDArray[np.float64]],
    recipe: str, dtype: Dtype, floor: float, filtered_floor: float, metric: Metric,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    vectors, queries, colors, prices = data
    cfg = config(recipe, metric, dtype)
    index = VectorIndex(cfg, head_capacity=N // 4, merge_factor=4)
    model = Model(metric)
    load_rows(index, model, vectors, colors, prices, seal=True)
    churn(index, model, np.random.default_rng(2))
    filters = [parse_filter(f, cfg) for f in FILTERS]

    def check(stage: str) -> list[SearchOutcome]:
        outs = [index.search(q, K) for q in queries]
        if recipe == "Flat":
            for out, q in zip(outs, queries, strict=True):
                assert_exact(out, model, q, K)
        got = recall(outs, model, queries)
        assert got >= floor, f"{stage}: recall {got:.3f} < {floor}"
        for flt in filters:
            # Filtered searches run exhaustively over few passing rows by default; with the
            # threshold at zero they walk the graph / probe lists with the selector instead.
            for full_scan in (segment_module.FULL_SCAN_BYTES, 0):
                monkeypatch.setattr(segment_module, "FULL_SCAN_BYTES", full_scan)
                fouts = [index.search(q, K, flt) for q in queries]
                if recipe == "Flat":
                    for out, q in zip(fouts, queries, strict=True):
                        assert_exact(out, model, q, K, flt)
                got = recall(fouts, model, queries, flt)
                assert got >= filtered_floor, f"{stage} {flt}: recall {got:.3f}"
                assert all(len(o.labels) == K and not o.exhausted for o in fouts)
        return outs

    assert len(index.stats()["segments"]) == 4
    check("sealed")
    job = index.begin_merge()
    assert job is not None and len(job.sources) == 4
    job.build()
    index.finish_merge(job)
    assert index.begin_merge() is None
    assert len(index) == len(model.rows)
    before = check("merged")
    before_filtered = [index.search(q, K, filters[1]) for q in queries]
    index.save(tmp_path / "snap")
    loaded = VectorIndex.load(cfg, tmp_path / "snap", head_capacity=N // 4)
    assert len(loaded) == len(model.rows)
    assert loaded.stats()["segments"] == index.stats()["segments"]
    for q, out, fout in zip(queries, before, before_filtered, strict=True):
        for again, was in ((loaded.search(q, K), out), (loaded.search(q, K, filters[1]), fout)):
            assert again.labels.tolist() == was.labels.tolist()
            np.testing.assert_allclose(again.scores, was.scores, rtol=1e-5, atol=1e-5)
    # A loaded segment still gives its vectors back, as the next merge needs.
    (saved,), (restored,) = index._view.segments, loaded._view.segments
    rows = np.arange(0, saved.n_rows, 97)
    np.testing.assert_array_equal(restored.reconstruct(rows), saved.reconstruct(rows))


@pytest.mark.parametrize("metric", METRICS, ids=str)
def test_head_is_exact(
    data: tuple[Matrix, Matrix, npt.NDArray[np.int64], npt.NDArray[np.float64]], metric: Metric
) -> None:
    vectors, queries, colors, prices = data
    cfg = config("HNSW32", metric)
    index = VectorIndex(cfg, head_capacity=10 * N)
    model = Model(metric)
    load_rows(index, model, vectors, colors, prices, seal=False)
    churn(index, model, np.random.default_rng(3))
    assert index.stats()["segments"] == []
    for flt in [None, *(parse_filter(f, cfg) for f in FILTERS)]:
        for q in queries:
            assert_exact(index.search(q, K, flt), model, q, K, flt)


def test_seal_and_merge_do_not_change_exact_results(
    data: tuple[Matrix, Matrix, npt.NDArray[np.int64], npt.NDArray[np.float64]],
) -> None:
    vectors, queries, colors, prices = data
    index = VectorIndex(config("Flat", Metric.L2), head_capacity=500, merge_factor=2)
    model = Model(Metric.L2)
    load_rows(index, model, vectors[:1000], colors, prices, seal=False)
    flt = parse_filter(FILTERS[0], index.config)
    baseline = [index.search(q, K, flt) for q in queries]
    job = index.begin_seal()
    assert job is not None
    during = [index.search(q, K, flt) for q in queries]  # frozen Head still answers
    job.build()
    index.finish_seal(job)
    after = [index.search(q, K, flt) for q in queries]
    for a, b, c in zip(baseline, during, after, strict=True):
        assert a.labels.tolist() == b.labels.tolist() == c.labels.tolist()
        np.testing.assert_allclose(a.scores, c.scores, rtol=1e-5, atol=1e-4)


# -- widening --------------------------------------------------------------------------


@pytest.mark.parametrize(("recipe", "knobs", "floor"), [("HNSW32", {"ef_search": 10}, 0.75),
                                                        ("IVF32,Flat", {"nprobe": 1}, 0.75)])
def test_widening_returns_k_hits_when_k_match(
    data: tuple[Matrix, Matrix, npt.NDArray[np.int64], npt.NDArray[np.float64]],
    recipe: str, knobs: dict[str, int], floor: float, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A narrow filter (2.7% of the rows) with the smallest efSearch/nprobe: the graph walk
    or the probed lists find fewer than k passing rows, so the search widens until it has
    k; recall is then that of the widened search (IVF: wider nprobe, not exhaustive)."""
    vectors, queries, colors, prices = data
    monkeypatch.setattr(segment_module, "FULL_SCAN_BYTES", 0)
    monkeypatch.setattr(segment_module, "FULL_SCAN_FRACTION", 0.0)
    cfg = config(recipe, Metric.L2)
    index = VectorIndex(cfg, head_capacity=N)
    model = Model(Metric.L2)
    load_rows(index, model, vectors, colors, prices, seal=True)
    assert index.stats()["head_rows"] == 0
    flt = parse_filter("color:c3 price<12", cfg)  # about 2.7% of the rows
    matching = int(model.passes(flt).sum())
    assert K < matching < N // 20
    outs = [index.search(q, K, flt, **knobs) for q in queries]  # type: ignore[arg-type]
    assert all(len(o.labels) == K and not o.exhausted and o.matched == matching for o in outs)
    assert max(o.widened for o in outs) >= 1
    assert recall(outs, model, queries, flt) >= floor


def test_exhausted_when_fewer_than_k_match(
    data: tuple[Matrix, Matrix, npt.NDArray[np.int64], npt.NDArray[np.float64]],
) -> None:
    vectors, queries, colors, prices = data
    cfg = config("HNSW32", Metric.COSINE)
    index = VectorIndex(cfg, head_capacity=N // 2)
    model = Model(Metric.COSINE)
    load_rows(index, model, vectors, colors, prices, seal=True)
    sixth = float(np.sort(prices[~np.isnan(prices)])[5])
    flt = parse_filter(f"price<{sixth!r}", cfg)
    matching = int(model.passes(flt).sum())
    assert matching == 5
    out = index.search(queries[0], K, flt)
    assert out.exhausted and out.matched == matching
    assert_exact(out, model, queries[0], K, flt)
    none = index.search(queries[0], K, parse_filter("price<-1", cfg))
    assert none.exhausted and none.matched == 0 and none.labels.size == 0


# -- random interleavings against a dict model ---------------------------------------------

OPS = ["upsert"] * 4 + ["delete"] * 3 + ["begin_seal", "begin_merge", "build", "build",
                                          "finish", "search", "save_load"]
ops = st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 12), st.integers(0, 3)),
               min_size=20, max_size=60)


@settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(ops=ops, metric=st.sampled_from(METRICS))
def test_random_interleavings_match_the_model(
    ops: list[tuple[str, int, int]], metric: Metric, tmp_path: Path
) -> None:
    """Ids map to labels like the indexer's: an update deletes the old label and upserts a
    new one. Jobs may stay pending across writes; finishing them must keep every delete."""
    rng = np.random.default_rng(len(ops))
    cfg = config("Flat", metric, dim=8)
    index = VectorIndex(cfg, head_capacity=4, merge_factor=2, max_tail_segments=3)
    model = Model(metric)
    label_of: dict[int, int] = {}
    next_label = 0
    jobs: list[SealJob | MergeJob] = []
    for op, a, b in ops:
        if op == "upsert":
            if a in label_of:
                assert index.delete(label_of[a])
                del model.rows[label_of.pop(a)]
            vec = rng.standard_normal(8).astype(np.float32)
            tags = (f"color:c{b}",)
            index.upsert(next_label, vec, tags, {"price": float(b)})
            model.rows[next_label] = Row(vec, tags, float(b))
            label_of[a] = next_label
            next_label += 1
        elif op == "delete":
            assert index.delete(label_of[a]) if a in label_of else not index.delete(10**9)
            if a in label_of:
                del model.rows[label_of.pop(a)]
        elif op == "begin_seal":
            if (job := index.begin_seal()) is not None:
                jobs.append(job)
        elif op == "begin_merge":
            if (job := index.begin_merge()) is not None:
                jobs.append(job)
        elif op == "build" and jobs:
            jobs[a % len(jobs)].build()
        elif op == "finish" and jobs:
            job = jobs.pop(a % len(jobs))
            if not job.built:
                job.build()
            finish(index, job)
        elif op == "save_load":
            index.save(tmp_path / "snap")
            index = VectorIndex.load(cfg, tmp_path / "snap", head_capacity=4, merge_factor=2,
                                     max_tail_segments=3)
            jobs.clear()
        assert len(index) == len(model.rows)
        q = rng.standard_normal(8).astype(np.float32)
        flt = parse_filter(f"color:c{b}|c{(b + 1) % 4} price>=1", cfg) if op == "search" else None
        assert_exact(index.search(q, 5, flt), model, q, 5, flt)
    while jobs:
        job = jobs.pop()
        job.build()
        finish(index, job)
    for label in range(next_label):
        assert (label in index) == (label in model.rows)


def test_deletes_during_builds_reach_the_new_segments() -> None:
    cfg = config("Flat", Metric.IP, dim=8)
    index = VectorIndex(cfg, head_capacity=4, merge_factor=2)
    rng = np.random.default_rng(4)
    for label in range(8):
        index.upsert(label, rng.standard_normal(8).astype(np.float32))
    seal = index.begin_seal()
    assert seal is not None
    seal.build()
    assert index.delete(1) and index.delete(6)  # rows of the frozen Head, after its snapshot
    index.finish_seal(seal)
    assert 1 not in index and 6 not in index and len(index) == 6
    for label in range(8, 12):
        index.upsert(label, rng.standard_normal(8).astype(np.float32))
    seal = index.begin_seal()
    assert seal is not None
    seal.build()
    index.finish_seal(seal)
    merge_job = index.begin_merge()
    assert merge_job is not None and len(merge_job.sources) == 2
    merge_job.build()
    assert index.delete(0) and index.delete(9)  # rows of the sources, after the merge read them
    index.finish_merge(merge_job)
    assert [s["live"] for s in index.stats()["segments"]] == [8]
    out = index.search(np.ones(8, dtype=np.float32), 20)
    assert sorted(out.labels.tolist()) == [2, 3, 4, 5, 7, 8, 10, 11]


def test_snapshots_link_unchanged_segments(tmp_path: Path) -> None:
    cfg = config("HNSW16", Metric.L2)
    index = VectorIndex(cfg, head_capacity=50)
    rng = np.random.default_rng(0)
    for label in range(120):
        index.upsert(label, rng.standard_normal(DIM).astype(np.float32))
        if index.needs_seal() and (job := index.begin_seal()) is not None:
            job.build()
            index.finish_seal(job)
    index.save(tmp_path / "a")
    index.delete(3)
    index.save(tmp_path / "b", link_from=tmp_path / "a")
    index.save(tmp_path / "b")
    files = [next(tmp_path.glob(f"{snap}/gen-*/{seg['name']}/index.faiss"))
             for snap in ("a", "b") for seg in index.stats()["segments"]]
    assert all(f.stat().st_nlink == 2 for f in files)  # one inode, in a/ and in b/
    assert 3 not in VectorIndex.load(cfg, tmp_path / "b")
    assert 3 in VectorIndex.load(cfg, tmp_path / "a")


# -- threads ---------------------------------------------------------------------------


def test_concurrent_search_never_sees_an_acknowledged_delete() -> None:
    """One writer, one builder, four searchers: a label deleted before a search started
    is never returned, and every search answers."""
    dim = 16
    cfg = config("HNSW16", Metric.L2, dim=dim)
    index = VectorIndex(cfg, head_capacity=300, merge_factor=2, max_tail_segments=4)
    rng = np.random.default_rng(5)
    deleted: set[int] = set()
    stop = threading.Event()
    errors: list[BaseException] = []
    todo: queue.Queue[SealJob | MergeJob] = queue.Queue()
    done: queue.Queue[SealJob | MergeJob] = queue.Queue()

    def builder() -> None:
        while not stop.is_set():
            try:
                job = todo.get(timeout=0.01)
            except queue.Empty:
                continue
            job.build()
            done.put(job)

    def searcher(seed: int) -> None:
        r = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                gone = set(deleted)  # acknowledged before this search starts
                out = index.search(r.standard_normal(dim).astype(np.float32), 20)
                assert len(out.labels) == 20 or out.exhausted
                assert not gone & set(out.labels.tolist())
        except BaseException as exc:
            errors.append(exc)
            raise

    threads = [threading.Thread(target=builder)] + [
        threading.Thread(target=searcher, args=(s,)) for s in range(4)
    ]
    for t in threads:
        t.start()
    pending = 0
    try:
        for label in range(3000):
            index.upsert(label, rng.standard_normal(dim).astype(np.float32))
            if label % 3 == 1:
                assert index.delete(label - 1)
                deleted.add(label - 1)
            while not done.empty():
                finish(index, done.get())
                pending -= 1
            if index.needs_seal() and (seal := index.begin_seal()) is not None:
                todo.put(seal)
                pending += 1
            if (merge_job := index.begin_merge()) is not None:
                todo.put(merge_job)
                pending += 1
        while pending:
            finish(index, done.get(timeout=30))
            pending -= 1
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors
    assert len(index) == 2000
    assert index.stats()["frozen_head_rows"] == 0


def finish(index: VectorIndex, job: SealJob | MergeJob) -> None:
    if isinstance(job, SealJob):
        index.finish_seal(job)
    else:
        index.finish_merge(job)


# -- recipes, persistence, contracts -----------------------------------------------------


def test_plan_recipe_maps_dtype_and_shrinks_to_the_data() -> None:
    assert plan_recipe("HNSW32", Dtype.FP16, 10**6) == "HNSW32,SQfp16"
    assert plan_recipe("HNSW32,Flat", Dtype.INT8, 10**6) == "HNSW32,SQ8"
    assert plan_recipe("Flat", Dtype.INT8, 10) == "SQ8"
    assert plan_recipe("HNSW32", Dtype.FP32, 10**6) == "HNSW32"
    assert plan_recipe("HNSW32,SQ8", Dtype.FP16, 10**6) == "HNSW32,SQ8"
    assert plan_recipe("IVF4096,Flat", Dtype.INT8, 20_000) == "IVF512,SQ8"  # 39 rows a list
    assert plan_recipe("IVF4096,PQ48", Dtype.FP32, 10**6) == "IVF4096,PQ48"
    assert plan_recipe("IVF4096,PQ48", Dtype.FP32, 5000) == "IVF128,SQ8"
    assert plan_recipe("OPQ16,IVF64,PQ16", Dtype.FP32, 3000) == "IVF64,SQ8"
    assert plan_recipe("IVF64,PQ16x4", Dtype.FP32, 3000) == "IVF64,PQ16x4"
    assert plan_recipe("IVF64,SQfp16", Dtype.FP32, 100) == "SQfp16"
    assert plan_recipe("HNSW32", Dtype.FP32, 0) == "Flat"


@pytest.mark.parametrize(
    "recipe", ["HNSW32,Bogus", "IVF64,PQ7", "IVF0,Flat", "IDMap,Flat", "RFlat", "IVF64,PQ8x4fs"]
)
def test_bad_recipes_are_invalid_requests(recipe: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        VectorIndex(config(recipe))
    assert info.value.field == "recipe"


def test_input_contracts() -> None:
    index = VectorIndex(config())
    vec = np.ones(DIM, dtype=np.float32)
    index.upsert(1, vec)
    with pytest.raises(ValueError):
        index.upsert(1, vec)  # labels are unique
    with pytest.raises(DimensionMismatch):
        index.upsert(2, np.ones(DIM + 1, dtype=np.float32))
    with pytest.raises(InvalidRequest):
        index.upsert(2, np.full(DIM, np.nan, dtype=np.float32))
    with pytest.raises(DimensionMismatch):
        index.search(np.ones(3, dtype=np.float32), 1)
    with pytest.raises(InvalidRequest):
        index.search(vec, 0)
    assert index.search(vec, 5).labels.tolist() == [1]
    assert index.search(np.zeros(DIM, dtype=np.float32), 1).labels.tolist() == [1]


def test_stats_describe_the_parts() -> None:
    index = VectorIndex(config("HNSW16", Metric.L2), head_capacity=100)
    rng = np.random.default_rng(0)
    for label in range(250):
        index.upsert(label, rng.standard_normal(DIM).astype(np.float32))
        if index.needs_seal() and (job := index.begin_seal()) is not None:
            job.build()
            index.finish_seal(job)
    stats = index.stats()
    assert stats["live"] == 250 and stats["head_rows"] == 50
    assert [(s["rows"], s["recipe_used"]) for s in stats["segments"]] == [(100, "HNSW16")] * 2
    assert stats["bytes"] > sum(s["bytes"] for s in stats["segments"]) > 200 * DIM * 4


def test_save_is_atomic_and_load_rejects_bad_snapshots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config("HNSW16", Metric.L2)
    index = VectorIndex(cfg, head_capacity=50)
    rng = np.random.default_rng(0)
    for label in range(120):
        index.upsert(label, rng.standard_normal(DIM).astype(np.float32))
        if index.needs_seal() and (job := index.begin_seal()) is not None:
            job.build()
            index.finish_seal(job)
    snap = tmp_path / "snap"
    with pytest.raises(SegmentCorrupt):
        VectorIndex.load(cfg, snap)
    index.save(snap)
    assert index.delete(0)

    def crash(*args: object) -> None:
        raise OSError("power cut")

    monkeypatch.setattr("streams.index.vector_index.os.replace", crash)
    with pytest.raises(OSError):
        index.save(snap)
    monkeypatch.undo()
    assert 0 in VectorIndex.load(cfg, snap)  # the previous snapshot, whole
    index.save(snap)
    assert 0 not in VectorIndex.load(cfg, snap)
    assert sorted(p.name for p in snap.iterdir() if p.name.startswith("gen-")) == ["gen-00000001"]
    with pytest.raises(SegmentCorrupt):
        VectorIndex.load(config("HNSW16", Metric.COSINE), snap)
    with pytest.raises(SegmentCorrupt):
        VectorIndex.load(config("HNSW16", Metric.L2, dim=DIM * 2), snap)
    segment_dir = next((snap / "gen-00000001").glob("seg-*"))
    (segment_dir / "rows.npz").write_bytes(b"not a zip")
    with pytest.raises(SegmentCorrupt):
        VectorIndex.load(cfg, snap)
