"""Vector index benchmark (issue 3): the query node beside raw FAISS and Chroma, one run.

Run from the repository root::

    .venv/bin/python bench/index_bench.py                  # 100k x 384 (3-7 minutes, 2 cores)
    .venv/bin/python bench/index_bench.py --quick          # smoke run (15 seconds)
    .venv/bin/python bench/index_bench.py --million        # 1M x 384: memory + start (12-21 min)
    .venv/bin/python bench/index_bench.py --scale-n 300000 # the same figures at 300k (~3 min)
    .venv/bin/python bench/index_bench.py --json out.json

Chroma comes from the optional ``bench`` extra (``pip install -e '.[bench]'``); without it
the Chroma rows are skipped (``--no-chroma`` skips them on purpose).

Data. ``--n`` (100,000) vectors of ``--dim`` (384) dims around ``--clusters`` (1000) unit
gaussian centres (``centre + spread * N(0, I/dim)``, ``--spread`` 0.5, normalised), seeded;
``--queries`` (1000) held-out queries drawn the same way; ground truth by exact brute force
(``faiss.IndexFlatIP``). The index metric is cosine (inner product on unit vectors).

Recipe. ``HNSW32`` with each ``--dtypes`` (default ``int8,fp32``): streamvec stores int8 as
``HNSW32,SQ8`` (``streams.index.segment.plan_recipe``). Raw FAISS gets the same factory
string, the same ``efConstruction`` (``segment.EF_CONSTRUCTION``) and SQ8 training on the
same number of sample rows. ``faiss.omp_set_num_threads(1)`` for every process here: the
query node runs FAISS on one thread by default, and raw FAISS is given the same.

What is measured, per dtype:

* **raw FAISS** (in a subprocess, so its memory is its own): build rate (adds/s), peak RSS
  added by the index; then in this process the efSearch curve (``--ef-values``): recall@10
  and single-query latency, ``index.search(q[None], 10)``.
* **ingest through the log until searchable**: Avro VectorRecords encoded as
  ``VectorService.upsert_many`` encodes them (the node's codec without fastavro's record
  check: the records are built from the schema) and appended with ``log.append_batch``
  (``--batch`` records per call, the producer path), while a running query node applies
  them; the clock stops when
  ``QueryNode.catch_up()`` returns (every record applied, so searchable) and, separately,
  when the background seals/merges into HNSW Tail segments have settled.
* **search**, uncached (the node's L0 result cache is off: the curve repeats every query):
  ``VectorService.search`` (eventual) in-process, and ``VEC.SEARCH ... TOPK 10 VECTOR
  <bytes>`` over RESP (a :class:`RespServer` on a free loopback port, its own event loop
  thread; the redis-py client in a subprocess, as a client in this process would share its
  GIL), with ``ECHO`` of a vector-sized payload as the transport's floor; one query at a
  time after warm-up queries that are not measured; the efSearch curve
  in-process; at the chosen efSearch (per dtype, the smallest of ``--ef-values`` giving
  streamvec recall@10 >= 0.99, else the smallest on the recall plateau; or ``--ef``)
  p50/p99, recall@10 and the ratio to raw FAISS and to Chroma. The bench sets
  ``segment.DEFAULT_EF_SEARCH`` (what a search without ``EF n`` uses) rather than the
  per-request knob, so RESP requests stay the plain ``VEC.SEARCH`` a client sends. For int8
  (SQ8) the node re-ranks 4 x k candidates with the fp32 vectors of its state store
  (``VectorIndex.refine_factor``); raw FAISS has no such step. The Head is about empty
  after ingest, so its exact scan, which every search pays while it fills, is timed apart
  on a ``HeadIndex`` of 1/4, 1/2 and all of ``--head-capacity`` rows.
* **freshness** (first dtype): one ``VectorService.upsert`` at a time on the loaded node
  (idle, then with one thread searching continuously); ack latency, and ack -> searchable
  (``applied.wait`` for the write's position, then eventual searches until the id is
  returned).
* **start**: the node is closed after a snapshot and reopened in a subprocess, once from
  the snapshot and once with the snapshots deleted (full replay of the log): seconds from
  the constructor until ``catch_up()``, and until seals/merges settled (replay).
* **memory**: ``VmHWM`` (peak RSS, ``/proc/self/status``) of those subprocesses minus their
  baseline (interpreter, imports and the open log), per million vectors, against raw FAISS
  with the same recipe (its vectors are read from a file in chunks, not held); and the RSS
  still held at the end after ``malloc_trim(0)`` (live memory, not allocator slack).

Once (first dtype's data): ``VectorService.upsert`` from ``--upsert-threads`` (8) threads
(group commit) on a fresh log; ``VectorService.upsert_many`` (``--batch`` per call: validate,
encode, one ``append_batch``) from one thread on another fresh log, all ``--n`` vectors,
until searchable; and Chroma (``chromadb``, ``PersistentClient``, HNSW space
cosine, its defaults otherwise): batched ``collection.add`` rate, single-query p50/p99 and
recall@10.

``--million`` (or ``--scale-n N``) runs only the memory and start figures at 1M (N)
vectors of the first dtype: records are appended to the log, then a subprocess replays them
into a node (peak RSS, recall at each efSearch, snapshot), another starts from the snapshot
and runs the same queries (peak RSS with the searches' state reads included), and raw FAISS
builds the same recipe in a third. "Settled" waits for the merges an idle node runs too
(``VectorIndex.compact_rows``).

The machine must be otherwise idle: the run prints a warning when the load average is high,
and records the commit (and changed files under ``streams/``) it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:  # run as a script: make `streams` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import faiss
import numpy as np
import numpy.typing as npt
from rich.console import Console, JustifyMethod
from rich.table import Table

import streams.index.segment as segment
from bench.log_bench import Reporter, fdatasync_probe, filesystem_of, percentile
from streams.index.head import HeadIndex, prepare
from streams.index.model import Dtype, IndexConfig, Metric, VectorUpsert
from streams.log.embedded import EmbeddedLog
from streams.log.port import LogPosition, Record, now_ms
from streams.schemas import catalog
from streams.schemas.codec import AvroCodec
from streams.schemas.log_registry import LogRegistry
from streams.service.api import SearchRequest
from streams.service.metrics import ServiceMetrics
from streams.service.query_node import QueryNode
from streams.service.resp import RespServer, serve_in_thread
from streams.topics import Topics

__all__ = ["BenchConfig", "main", "run"]

TENANT, INDEX, RECIPE = "bench", "vectors", "HNSW32"
KEY = f"{TENANT}/{INDEX}"
K = 10
FAISS_THREADS = 1
WARMUP_QUERIES = 50
RECALL_GOAL = 0.99

# issue 3's targets
FRESHNESS_P99_MS = 50.0
SEARCH_P99_MS = 2.0
INGEST_PER_S = 20_000
SNAPSHOT_START_S = 5.0
RSS_PER_MILLION_MB = 1000.0
RSS_RECALL = 0.95

Matrix = npt.NDArray[np.float32]


# -- configuration ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BenchConfig:
    n: int = 100_000
    dim: int = 384
    clusters: int = 1000
    spread: float = 0.5
    queries: int = 1000
    dtypes: tuple[str, ...] = ("int8", "fp32")
    ef_values: tuple[int, ...] = (32, 64, 128)
    ef: int | None = None  # None: per dtype, see choose_ef
    batch: int = 1000
    head_capacity: int = 20_000
    durability: str = "group"
    freshness: int = 200
    upsert_vectors: int = 20_000
    upsert_threads: int = 8
    chroma: bool = True
    chroma_batch: int = 5000
    resp: bool = True
    scale_n: int | None = None  # --million / --scale-n: memory and start figures only
    data_dir: str | None = None
    seed: int = 42
    progress: bool = True


# -- data ---------------------------------------------------------------------------------
@dataclass(slots=True)
class Dataset:
    base: Matrix  # (n, dim), unit rows
    queries: Matrix  # held out, same distribution
    warmup: Matrix  # held out too: warm-up searches never repeat a measured query
    extra: Matrix  # more held-out rows for the freshness writes
    truth: npt.NDArray[np.int64]  # (queries, K) exact top-K rows of base


def _unit(x: Matrix) -> Matrix:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def make_dataset(cfg: BenchConfig, n: int, rep: Reporter) -> Dataset:
    rng = np.random.default_rng(cfg.seed)
    centres = _unit(rng.standard_normal((cfg.clusters, cfg.dim), dtype=np.float32))
    scale = np.float32(cfg.spread / math.sqrt(cfg.dim))
    extra = max(cfg.freshness * 2, 1)
    total = n + cfg.queries + WARMUP_QUERIES + extra
    out = np.empty((total, cfg.dim), dtype=np.float32)
    chunk = 65_536
    with rep.task(f"data: {n:,} x {cfg.dim} + {cfg.queries} queries", total) as (tick, done):
        for s in range(0, total, chunk):
            e = min(total, s + chunk)
            rows = out[s:e]
            rows[:] = rng.standard_normal((e - s, cfg.dim), dtype=np.float32)
            rows *= scale
            rows += centres[rng.integers(cfg.clusters, size=e - s)]
            _unit(rows)
            tick(e - s)
        done("")
    base, queries = out[:n], out[n : n + cfg.queries]
    warm, more = (
        out[n + cfg.queries : n + cfg.queries + WARMUP_QUERIES],
        out[n + cfg.queries + WARMUP_QUERIES :],
    )
    with rep.task("ground truth (exact, IndexFlatIP)", 1) as (_tick, done):
        faiss.omp_set_num_threads(len(os.sched_getaffinity(0)))  # brute force: all cores
        flat = faiss.IndexFlatIP(cfg.dim)
        flat.add(base)
        _, truth = flat.search(queries, K)
        del flat
        faiss.omp_set_num_threads(FAISS_THREADS)
        done("")
    return Dataset(base, queries, warm, more, truth.astype(np.int64))


def recall_at_k(found: Sequence[Sequence[int]], truth: npt.NDArray[np.int64]) -> float:
    hits = sum(len(set(f) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return hits / (K * len(truth))


def latency_ms(lat_ns: list[int]) -> dict[str, float]:
    s = sorted(lat_ns)
    return {
        "p50_ms": percentile(s, 0.50) / 1000,
        "p99_ms": percentile(s, 0.99) / 1000,
        "mean_ms": sum(s) / len(s) / 1e6 if s else math.nan,
    }


def timed_queries(
    search: Callable[[Matrix], list[int]],
    queries: Matrix,
    truth: npt.NDArray[np.int64],
    warmup: Matrix | None = None,
) -> dict[str, Any]:
    """One query at a time after a warm-up (``warmup`` queries, else the last
    WARMUP_QUERIES reversed): latency percentiles and recall@K."""
    for q in queries[::-1][:WARMUP_QUERIES] if warmup is None else warmup:
        search(q)
    clock = time.perf_counter_ns
    lat: list[int] = []
    found: list[list[int]] = []
    gc.collect()
    for q in queries:
        t0 = clock()
        ids = search(q)
        lat.append(clock() - t0)
        found.append(ids)
    return {**latency_ms(lat), "recall": recall_at_k(found, truth), "queries": len(queries)}


def measure(search: Callable[[Matrix], list[int]], data: Dataset) -> dict[str, Any]:
    return timed_queries(search, data.queries, data.truth, data.warmup)


def raw_search(index: Any) -> Callable[[Matrix], list[int]]:
    """Raw FAISS, one query: ``index.search(q[None], K)``."""

    def run(q: Matrix) -> list[int]:
        return [int(i) for i in index.search(q[None], K)[1][0]]

    return run


# -- /proc ----------------------------------------------------------------------------------
def malloc_trim() -> None:
    """Return free heap pages to the OS (glibc), so that VmRSS shows live memory."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def vm_status() -> dict[str, float]:
    """VmHWM (peak RSS) and VmRSS of this process, MiB."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            name, _, rest = line.partition(":")
            if name in ("VmHWM", "VmRSS"):
                out[name] = int(rest.split()[0]) / 1024
    return out


# -- streamvec wiring (as tests/rigs.py) ------------------------------------------------------
class Stack:
    """An embedded log with the topics, a log-backed schema registry and the codec."""

    def __init__(self, path: Path, durability: str) -> None:
        self.topics = Topics()
        self.log = EmbeddedLog(path, durability=durability)
        self.log.ensure_topics(self.topics.specs())
        self.codec = AvroCodec(LogRegistry(self.log, self.topics))
        # records built field by field from the schema, as VectorService.upsert_many encodes
        # them: without fastavro's own record check (3/4 of the encode time)
        self.record_codec = AvroCodec(self.codec.registry, validate=False)
        self.subject = catalog.subject_for(self.topics.vectors)
        self.schema = catalog.load_schema(catalog.TOPIC_VALUE_SCHEMA["vectors"])

    def node(self, path: Path, head_capacity: int) -> QueryNode:
        # Searches are measured uncached: the curve repeats each query at every efSearch,
        # which the L0 result cache would answer.
        return QueryNode(
            self.log,
            self.topics,
            self.codec,
            path,
            head_capacity=head_capacity,
            faiss_threads=FAISS_THREADS,
            cache_enabled=False,
        ).start()

    def records(self, start: int, vectors: Matrix) -> list[Record]:
        """VectorRecords for ids ``start..``, encoded as VectorService.upsert_many does."""
        topic, encode, subject, schema = (
            self.topics.vectors,
            self.record_codec.encode,
            self.subject,
            self.schema,
        )
        ts = now_ms()
        out = []
        for i, vec in enumerate(vectors, start):
            value = encode(
                subject,
                schema,
                {
                    "tenant": TENANT,
                    "index": INDEX,
                    "id": str(i),
                    "vector": vec.tobytes(),
                    "dtype": "fp32",
                    "meta": None,
                    "tags": [],
                    "numeric": {},
                    "version": 1,
                    "timestamp": ts,
                },
            )
            out.append(Record.of(topic, f"{KEY}/{i}", value))
        return out

    def close(self) -> None:
        self.log.close()


def create_index(node: QueryNode, dim: int, dtype: str) -> None:
    node.service.create_index(
        IndexConfig(TENANT, INDEX, dim, metric=Metric.COSINE, dtype=Dtype(dtype), recipe=RECIPE)
    )
    wait_caught_up(node)


def wait_caught_up(node: QueryNode, timeout_s: float = 3600.0) -> None:
    if not node.catch_up(timeout_s):
        raise RuntimeError(f"query node not caught up after {timeout_s} s: {node.service.health()}")


def settle(node: QueryNode, timeout_s: float = 3600.0) -> None:
    """Wait until no seal or merge is due or running (the Head's rows are in HNSW Tail
    segments as far as ``head_capacity`` allows)."""
    ix = node.indexer
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ix.error is not None:
            raise RuntimeError(f"indexer failed: {ix.error!r}")
        vi = ix.indexes.get(KEY)
        builds = ix._builds  # no public "builds in flight" accessor
        if vi is not None and not (
            builds.seal or builds.merge or vi.needs_seal() or vi.needs_merge(idle=True)
        ):
            return
        time.sleep(0.05)
    raise RuntimeError(f"seals/merges not settled after {timeout_s} s")


def index_shape(node: QueryNode) -> dict[str, Any]:
    stats = node.indexer.indexes[KEY].stats()
    return {
        "live": stats["live"],
        "head_rows": stats["head_rows"],
        "segments": [s["rows"] for s in stats["segments"]],
        "recipes": sorted({s["recipe_used"] for s in stats["segments"]}),
        "bytes_estimate": stats["bytes"],
    }


def service_search(node: QueryNode) -> Callable[[Matrix], list[int]]:
    search = node.service.search

    def run(q: Matrix) -> list[int]:
        hits = search(SearchRequest(TENANT, INDEX, q, K)).hits
        return [int(h.id) if h.id.isdigit() else -1 for h in hits]  # -1: a freshness write

    return run


@contextlib.contextmanager
def ef_search(ef: int) -> Iterator[None]:
    """Every node search uses ``segment.DEFAULT_EF_SEARCH`` (there is no per-index or
    per-request knob on the data plane); set it for the block."""
    old = segment.DEFAULT_EF_SEARCH
    segment.DEFAULT_EF_SEARCH = ef
    try:
        yield
    finally:
        segment.DEFAULT_EF_SEARCH = old


@contextlib.contextmanager
def resp_server(node: QueryNode) -> Iterator[RespServer]:
    """A RespServer on a free loopback port, in a thread with its own event loop."""
    with serve_in_thread(
        RespServer(node.service, "127.0.0.1", 0, metrics=ServiceMetrics())
    ) as server:
        yield server


def child_resp_client(spec: dict[str, Any]) -> dict[str, Any]:
    """redis-py in its own process (a client in the server's process would share its GIL):
    ``VEC.SEARCH`` one query at a time, and ``ECHO`` of a vector-sized payload for the
    round trip that transport and redis-py cost alone."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=spec["port"])
    queries, truth = _child_queries(spec)
    assert queries is not None and truth is not None

    def search(q: Matrix) -> list[int]:
        hits, _debug = client.execute_command(
            "VEC.SEARCH", TENANT, INDEX, "TOPK", K, "VECTOR", q.astype("<f4").tobytes()
        )
        return [int(h[0]) for h in hits]

    payload = queries[0].astype("<f4").tobytes()

    def echo(q: Matrix) -> list[int]:
        client.execute_command("ECHO", payload)
        return []

    out = {
        "search": timed_queries(search, queries, truth),
        "echo": timed_queries(echo, queries, truth),
        "protocol": client.get_connection_kwargs().get("protocol", "default"),
    }
    client.close()
    return out


# -- subprocesses: memory and start ------------------------------------------------------------
def run_child(spec: dict[str, Any], root: Path) -> dict[str, Any]:
    """Run ``spec`` in a fresh interpreter (this file with ``--child``); its JSON result."""
    spec_path = root / f"child-{spec['kind']}-{time.monotonic_ns()}.json"
    out_path = spec_path.with_suffix(".out.json")
    spec_path.write_text(json.dumps(spec))
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        str(spec_path),
        "--child-out",
        str(out_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"child {spec['kind']} failed ({proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    result: dict[str, Any] = json.loads(out_path.read_text())
    return result


def _child_queries(spec: dict[str, Any]) -> tuple[Matrix | None, npt.NDArray[np.int64] | None]:
    if not spec.get("queries_file"):
        return None, None
    return np.load(spec["queries_file"]), np.load(spec["truth_file"])


def child_node(spec: dict[str, Any]) -> dict[str, Any]:
    """Open the log, then build a query node from it (a snapshot in ``node_dir`` if there
    is one, else a full replay); times and peak RSS over the baseline."""
    stack = Stack(Path(spec["log_dir"]), spec["durability"])
    queries, truth = _child_queries(spec)
    gc.collect()
    base = vm_status()
    t0 = time.perf_counter()
    node = stack.node(Path(spec["node_dir"]), spec["head_capacity"])
    t_open = time.perf_counter()
    wait_caught_up(node)
    t_searchable = time.perf_counter()
    out: dict[str, Any] = {
        "restored_from": node.restored_from,
        "restore_s": node.restore_s,
        "open_s": t_open - t0,
        "searchable_s": t_searchable - t0,
    }
    out["vm_searchable"] = vm_status()
    if spec.get("settle"):
        settle(node)
        out["settled_s"] = time.perf_counter() - t0
    gc.collect()
    out["vm_after"] = vm_status()
    out["vm_base"] = base
    malloc_trim()
    out["vm_trimmed"] = vm_status()
    out["shape"] = index_shape(node)
    if queries is not None and truth is not None:
        out["curve"] = {}
        for ef in spec["ef_values"]:
            with ef_search(ef):
                out["curve"][str(ef)] = timed_queries(service_search(node), queries, truth)
        out["vm_end"] = vm_status()  # after the searches (re-ranking reads the state)
    if spec.get("snapshot"):
        t = time.perf_counter()
        node.service.snapshot()
        out["snapshot_write_s"] = time.perf_counter() - t
    node.close()
    stack.close()
    return out


def _raw_index(dim: int, recipe_used: str) -> Any:
    index = faiss.index_factory(dim, recipe_used, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = segment.EF_CONSTRUCTION
    return index


def child_faiss(spec: dict[str, Any]) -> dict[str, Any]:
    """Raw FAISS with the node's recipe, vectors streamed from a file in chunks."""
    n, dim = spec["n"], spec["dim"]
    path = spec["vectors_file"]
    row_bytes = 4 * dim
    queries, truth = _child_queries(spec)

    def rows(start: int, count: int) -> Matrix:
        return np.fromfile(
            path, dtype=np.float32, count=count * dim, offset=start * row_bytes
        ).reshape(count, dim)

    gc.collect()
    base = vm_status()
    index = _raw_index(dim, spec["recipe_used"])
    t0 = time.perf_counter()
    if not index.is_trained:  # SQ8: as segment._build_index, a sample of MIN_TRAIN_ROWS
        index.train(rows(0, min(n, segment.MIN_TRAIN_ROWS)))
    for s in range(0, n, segment.CHUNK_ROWS):
        index.add(rows(s, min(segment.CHUNK_ROWS, n - s)))
    build_s = time.perf_counter() - t0
    gc.collect()
    out: dict[str, Any] = {
        "vm_base": base,
        "vm_after": vm_status(),
        "build_s": build_s,
        "adds_per_s": n / build_s,
    }
    malloc_trim()
    out["vm_trimmed"] = vm_status()
    if queries is not None and truth is not None:
        out["curve"] = {}
        for ef in spec["ef_values"]:
            index.hnsw.efSearch = ef
            out["curve"][str(ef)] = timed_queries(raw_search(index), queries, truth)
    if spec.get("index_file"):
        faiss.write_index(index, spec["index_file"])
    return out


def child_main(spec_path: str, out_path: str) -> int:
    faiss.omp_set_num_threads(FAISS_THREADS)
    spec = json.loads(Path(spec_path).read_text())
    kinds = {"node": child_node, "faiss": child_faiss, "resp-client": child_resp_client}
    result = kinds[spec["kind"]](spec)
    Path(out_path).write_text(json.dumps(result))
    return 0


def peak_mb(child: dict[str, Any]) -> float:
    return float(child["vm_after"]["VmHWM"] - child["vm_base"]["VmHWM"])


def peak_end_mb(child: dict[str, Any]) -> float:
    """Peak RSS over the baseline including the searches the child ran."""
    return float(child.get("vm_end", child["vm_after"])["VmHWM"] - child["vm_base"]["VmHWM"])


def steady_mb(child: dict[str, Any]) -> float:
    """RSS added and still held at the end, after ``malloc_trim``."""
    return float(child["vm_trimmed"]["VmRSS"] - child["vm_base"]["VmRSS"])


# -- the phases ------------------------------------------------------------------------------
def write_files(data: Dataset, root: Path) -> dict[str, str]:
    files = {
        "vectors_file": str(root / "base.f32"),
        "queries_file": str(root / "queries.npy"),
        "truth_file": str(root / "truth.npy"),
    }
    data.base.tofile(files["vectors_file"])
    np.save(files["queries_file"], data.queries)
    np.save(files["truth_file"], data.truth)
    return files


def bench_raw_faiss(
    cfg: BenchConfig,
    dtype: str,
    n: int,
    files: dict[str, str],
    root: Path,
    rep: Reporter,
    *,
    curve: bool = False,
) -> tuple[dict[str, Any], Any]:
    """Build in a subprocess: adds/s, memory, and with ``curve`` the efSearch curve there
    (the index is then dropped); else the built index is read back for this process."""
    used = segment.plan_recipe(RECIPE, Dtype(dtype), n)
    index_file = root / f"raw-{dtype}.faiss"
    spec: dict[str, Any] = {
        "kind": "faiss",
        "n": n,
        "dim": cfg.dim,
        "recipe_used": used,
        "vectors_file": files["vectors_file"],
    }
    if curve:
        spec.update(
            ef_values=list(cfg.ef_values),
            queries_file=files["queries_file"],
            truth_file=files["truth_file"],
        )
    else:
        spec["index_file"] = str(index_file)
    with rep.task(f"raw FAISS {used}: build {n:,} (subprocess)", 1) as (_t, done):
        child = run_child(spec, root)
        done(f"{child['adds_per_s']:,.0f} adds/s")
    index = None
    if not curve:
        index = faiss.read_index(str(index_file))
        index_file.unlink()
    return {"recipe_used": used, **child}, index


def ingest_log(
    stack: Stack, node: QueryNode, data: Matrix, batch: int, rep: Reporter, label: str
) -> dict[str, Any]:
    n = len(data)
    gc.collect()
    with rep.task(label, n) as (tick, done):
        t0 = time.perf_counter()
        encode_s = 0.0
        for s in range(0, n, batch):
            e = time.perf_counter()
            recs = stack.records(s, data[s : s + batch])
            encode_s += time.perf_counter() - e
            stack.log.append_batch(recs)
            tick(len(recs))
        t_appended = time.perf_counter()
        wait_caught_up(node)
        t_searchable = time.perf_counter()
        done(f"{n / (t_searchable - t0):,.0f}/s")
    with rep.task("  seals/merges settling", 1) as (_t, done):
        settle(node)
        t_settled = time.perf_counter()
        done(f"{t_settled - t_searchable:.1f} s")
    return {
        "vectors": n,
        "batch": batch,
        "append_s": t_appended - t0,
        "encode_s": encode_s,
        "searchable_s": t_searchable - t0,
        "settled_s": t_settled - t0,
        "append_per_s": n / (t_appended - t0),
        "searchable_per_s": n / (t_searchable - t0),
        "settled_per_s": n / (t_settled - t0),
    }


def bench_upsert_threads(
    cfg: BenchConfig, data: Matrix, dtype: str, root: Path, rep: Reporter
) -> dict[str, Any]:
    """``VectorService.upsert`` from several threads on a fresh log and node."""
    stack = Stack(root / "log-upsert", cfg.durability)
    node = stack.node(root / "node-upsert", cfg.head_capacity)
    try:
        create_index(node, cfg.dim, dtype)
        upsert = node.service.upsert
        for i in range(100):  # warm-up: codec, registry, RocksDB
            upsert(VectorUpsert(TENANT, INDEX, f"warm{i}", data[i]))
        wait_caught_up(node)
        count = min(cfg.upsert_vectors, len(data))
        nthreads = cfg.upsert_threads
        barrier = threading.Barrier(nthreads + 1)
        errors: list[BaseException] = []
        lats: list[list[int]] = [[] for _ in range(nthreads)]
        clock = time.perf_counter_ns

        def worker(t: int, tick: Callable[[int], None]) -> None:
            barrier.wait()
            try:
                for j, i in enumerate(range(t, count, nthreads), 1):
                    s = clock()
                    upsert(VectorUpsert(TENANT, INDEX, str(i), data[i]))
                    lats[t].append(clock() - s)
                    if j % 256 == 0:
                        tick(256)
            except BaseException as exc:
                errors.append(exc)

        with rep.task(f"upsert x{nthreads} threads (group commit)", count) as (tick, done):
            workers = [
                threading.Thread(target=worker, args=(t, tick), daemon=True)
                for t in range(nthreads)
            ]
            for w in workers:
                w.start()
            gc.collect()
            barrier.wait()
            t0 = time.perf_counter()
            for w in workers:
                w.join()
            t_acked = time.perf_counter()
            if errors:
                raise errors[0]
            wait_caught_up(node)
            t_searchable = time.perf_counter()
            done(f"{count / (t_searchable - t0):,.0f}/s")
        ack = latency_ms([x for lat in lats for x in lat])
        return {
            "vectors": count,
            "threads": nthreads,
            "acked_s": t_acked - t0,
            "searchable_s": t_searchable - t0,
            "acked_per_s": count / (t_acked - t0),
            "searchable_per_s": count / (t_searchable - t0),
            "ack_p50_ms": ack["p50_ms"],
            "ack_p99_ms": ack["p99_ms"],
        }
    finally:
        node.close()
        stack.close()
        shutil.rmtree(root / "log-upsert", ignore_errors=True)
        shutil.rmtree(root / "node-upsert", ignore_errors=True)


def bench_upsert_many(
    cfg: BenchConfig, data: Matrix, dtype: str, root: Path, rep: Reporter
) -> dict[str, Any]:
    """``VectorService.upsert_many`` (validate, encode, one ``append_batch``) from one
    thread on a fresh log and node, ``cfg.batch`` records a call, until searchable."""
    stack = Stack(root / "log-many", cfg.durability)
    node = stack.node(root / "node-many", cfg.head_capacity)
    try:
        create_index(node, cfg.dim, dtype)
        many = node.service.upsert_many
        many([VectorUpsert(TENANT, INDEX, f"warm{i}", data[i]) for i in range(100)])
        wait_caught_up(node)
        n = len(data)
        gc.collect()
        with rep.task(f"upsert_many({cfg.batch}) -> searchable", n) as (tick, done):
            t0 = time.perf_counter()
            for s in range(0, n, cfg.batch):
                out = many(
                    [
                        VectorUpsert(TENANT, INDEX, str(i), data[i])
                        for i in range(s, min(n, s + cfg.batch))
                    ]
                )
                if not all(isinstance(p, LogPosition) for p in out):
                    raise RuntimeError(f"upsert_many refused: {out[:3]}")
                tick(len(out))
            t_acked = time.perf_counter()
            wait_caught_up(node)
            t_searchable = time.perf_counter()
            done(f"{n / (t_searchable - t0):,.0f}/s")
        return {
            "vectors": n,
            "batch": cfg.batch,
            "acked_s": t_acked - t0,
            "searchable_s": t_searchable - t0,
            "acked_per_s": n / (t_acked - t0),
            "searchable_per_s": n / (t_searchable - t0),
        }
    finally:
        node.close()
        stack.close()
        shutil.rmtree(root / "log-many", ignore_errors=True)
        shutil.rmtree(root / "node-many", ignore_errors=True)


def bench_freshness(
    node: QueryNode, vectors: Matrix, prefix: str, loaded_by: Matrix | None, rep: Reporter
) -> dict[str, Any]:
    """One upsert at a time: ack latency and ack -> searchable (id returned by an eventual
    search). ``loaded_by``: queries one background thread searches with meanwhile."""
    service, applied = node.service, node.applied
    clock = time.perf_counter_ns
    acks: list[int] = []
    visible: list[int] = []
    extra_polls = 0
    stop = threading.Event()
    searches = [0]

    def load() -> None:
        assert loaded_by is not None
        search = service_search(node)
        i = 0
        while not stop.is_set():
            search(loaded_by[i % len(loaded_by)])
            i += 1
        searches[0] = i

    loader = threading.Thread(target=load, daemon=True) if loaded_by is not None else None
    if loader is not None:
        loader.start()
    label = "freshness" + (" (1 thread searching)" if loader else " (idle)")
    t_start = time.perf_counter()
    try:
        with rep.task(label, len(vectors)) as (tick, done):
            for j, vec in enumerate(vectors):
                id = f"{prefix}{j}"
                t0 = clock()
                pos = service.upsert(VectorUpsert(TENANT, INDEX, id, vec))
                t_ack = clock()
                if not applied.wait({(pos.topic, pos.partition): pos.offset + 1}, 10):
                    raise RuntimeError(f"write {pos.token} not applied within 10 s")
                while True:
                    hits = service.search(SearchRequest(TENANT, INDEX, vec, K)).hits
                    if any(h.id == id for h in hits):
                        break
                    extra_polls += 1
                    time.sleep(0.0002)
                t_vis = clock()
                acks.append(t_ack - t0)
                visible.append(t_vis - t_ack)
                tick(1)
                time.sleep(0.002)  # one at a time, not back to back
            done("")
    finally:
        stop.set()
        if loader is not None:
            loader.join()
    ack, vis = latency_ms(acks), latency_ms(visible)
    out = {
        "writes": len(vectors),
        "ack_p50_ms": ack["p50_ms"],
        "ack_p99_ms": ack["p99_ms"],
        "visible_p50_ms": vis["p50_ms"],
        "visible_p99_ms": vis["p99_ms"],
        "visible_max_ms": max(visible) / 1e6,
        "extra_polls": extra_polls,
        "loaded": loader is not None,
    }
    if loader is not None:
        out["background_searches_per_s"] = searches[0] / (time.perf_counter() - t_start)
    return out


def bench_head_scan(cfg: BenchConfig, data: Dataset, rep: Reporter) -> list[dict[str, Any]]:
    """What the Head adds to every search: its exact fp32 scan at a quarter, half and all
    of ``head_capacity`` rows (the benchmark's searches run with the Head about empty)."""
    head = HeadIndex(cfg.dim, Metric.COSINE)
    out = []
    sizes = [cfg.head_capacity // 4, cfg.head_capacity // 2, cfg.head_capacity]
    queries = data.queries[:200]
    with rep.task("Head scan cost", len(sizes)) as (tick, done):
        for size in sizes:
            for i in range(head.n_rows, min(size, len(data.base))):
                head.add(i, data.base[i])
            q = prepare(queries, Metric.COSINE)

            def scan(v: Matrix) -> list[int]:
                return head.search(v, K).labels.tolist()

            lat = timed_queries(scan, q, data.truth[:200])
            out.append({"rows": head.n_rows, "p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"]})
            tick(1)
        done("")
    return out


def debug_breakdown(node: QueryNode, queries: Matrix) -> dict[str, float]:
    """Mean of the search's own latency breakdown (debug ``latency_breakdown_ms``)."""
    sums: dict[str, float] = {}
    for q in queries:
        debug = node.service.search(SearchRequest(TENANT, INDEX, q, K)).debug
        for name, ms in debug["latency_breakdown_ms"].items():
            sums[name] = sums.get(name, 0.0) + ms
        sums["total"] = sums.get("total", 0.0) + debug["latency_ms"]
    return {name: v / len(queries) for name, v in sums.items()}


def choose_ef(cfg: BenchConfig, curve: dict[str, dict[str, Any]]) -> int:
    """``--ef``, else the smallest efSearch of the curve reaching RECALL_GOAL, else the
    smallest within 0.002 of the best recall (the recipe's plateau: SQ8 storage caps recall
    whatever efSearch)."""
    if cfg.ef is not None:
        return cfg.ef
    efs = sorted(cfg.ef_values)
    for ef in efs:
        if curve[str(ef)]["recall"] >= RECALL_GOAL:
            return ef
    best = max(curve[str(ef)]["recall"] for ef in efs)
    return next(ef for ef in efs if curve[str(ef)]["recall"] >= best - 0.002)


def bench_streamvec(
    cfg: BenchConfig,
    dtype: str,
    data: Dataset,
    files: dict[str, str],
    raw_index: Any,
    root: Path,
    rep: Reporter,
    *,
    primary: bool,
) -> dict[str, Any]:
    out: dict[str, Any] = {"dtype": dtype}
    log_dir, node_dir = root / f"log-{dtype}", root / f"node-{dtype}"
    stack = Stack(log_dir, cfg.durability)
    node = stack.node(node_dir, cfg.head_capacity)
    try:
        create_index(node, cfg.dim, dtype)
        out["ingest"] = ingest_log(
            stack, node, data.base, cfg.batch, rep, f"streamvec {dtype}: append_batch -> searchable"
        )
        out["shape"] = index_shape(node)
        # the efSearch curve, streamvec and raw FAISS side by side
        curve: dict[str, Any] = {}
        with rep.task(f"efSearch curve ({dtype})", len(cfg.ef_values)) as (tick, done):
            for e in cfg.ef_values:
                with ef_search(e):
                    node_q = measure(service_search(node), data)
                raw_index.hnsw.efSearch = e
                raw_q = measure(raw_search(raw_index), data)
                curve[str(e)] = {"streamvec": node_q, "faiss": raw_q}
                tick(1)
            done("")
        out["curve"] = curve
        ef = choose_ef(cfg, {k: v["streamvec"] for k, v in curve.items()})
        out["ef"] = ef
        raw_index.hnsw.efSearch = ef
        if str(ef) not in curve:  # --ef outside the curve
            with ef_search(ef):
                curve[str(ef)] = {
                    "streamvec": measure(service_search(node), data),
                    "faiss": measure(raw_search(raw_index), data),
                }
        out["search"] = {"faiss": curve[str(ef)]["faiss"], "inproc": curve[str(ef)]["streamvec"]}
        with ef_search(ef):
            out["breakdown_ms"] = debug_breakdown(node, data.queries[:200])
            if cfg.resp:
                with (
                    rep.task(f"RESP VEC.SEARCH ({dtype}, ef {ef})", 1) as (_t, done),
                    resp_server(node) as server,
                ):
                    client = run_child(
                        {
                            "kind": "resp-client",
                            "port": server.port,
                            "queries_file": files["queries_file"],
                            "truth_file": files["truth_file"],
                        },
                        root,
                    )
                    out["search"]["resp"] = client["search"]
                    out["resp_echo"] = client["echo"]
                    done(f"p99 {out['search']['resp']['p99_ms']:.2f} ms")
            if primary and cfg.freshness > 0:
                half = cfg.freshness
                out["freshness"] = [
                    bench_freshness(node, data.extra[:half], "fresh", None, rep),
                    bench_freshness(
                        node, data.extra[half : 2 * half], "fresh-load", data.queries, rep
                    ),
                ]
        with rep.task("snapshot", 1) as (_t, done):
            t = time.perf_counter()
            node.service.snapshot()
            out["snapshot_write_s"] = time.perf_counter() - t
            out["snapshot_mb"] = dir_mb(node_dir / "snapshots")
            done(f"{out['snapshot_write_s']:.1f} s")
    finally:
        node.close()
        stack.close()
    out["log_mb"] = dir_mb(log_dir)
    spec = {
        "kind": "node",
        "log_dir": str(log_dir),
        "node_dir": str(node_dir),
        "durability": cfg.durability,
        "head_capacity": cfg.head_capacity,
    }
    with rep.task(f"start from snapshot ({dtype}, subprocess)", 1) as (_t, done):
        out["start_snapshot"] = run_child(spec, root)
        done(f"{out['start_snapshot']['searchable_s']:.2f} s")
    shutil.rmtree(node_dir / "snapshots")
    with rep.task(f"start by full replay ({dtype}, subprocess)", 1) as (_t, done):
        out["start_replay"] = run_child({**spec, "settle": True}, root)
        done(f"{out['start_replay']['searchable_s']:.1f} s")
    shutil.rmtree(log_dir, ignore_errors=True)
    shutil.rmtree(node_dir, ignore_errors=True)
    return out


def bench_chroma(cfg: BenchConfig, data: Dataset, root: Path, rep: Reporter) -> dict[str, Any]:
    import chromadb
    from chromadb.config import Settings as ChromaSettings

    path = root / "chroma"
    client = chromadb.PersistentClient(
        path=str(path), settings=ChromaSettings(anonymized_telemetry=False)
    )
    col = client.create_collection(
        "bench", configuration={"hnsw": {"space": "cosine"}}, embedding_function=None
    )
    n = len(data.base)
    batch = min(cfg.chroma_batch, client.get_max_batch_size())
    gc.collect()
    with rep.task(f"chroma {chromadb.__version__}: add (batches of {batch})", n) as (tick, done):
        t0 = time.perf_counter()
        for s in range(0, n, batch):
            e = min(n, s + batch)
            col.add(ids=[str(i) for i in range(s, e)], embeddings=data.base[s:e])
            tick(e - s)
        t_added = time.perf_counter()
        col.query(query_embeddings=data.queries[:1], n_results=K, include=[])
        t_searchable = time.perf_counter()
        done(f"{n / (t_added - t0):,.0f}/s")

    def search(q: Matrix) -> list[int]:
        res = col.query(query_embeddings=q[None], n_results=K, include=["distances"])
        return [int(i) for i in res["ids"][0]]

    with rep.task("chroma query", 1) as (_t, done):
        q = measure(search, data)
        done(f"p99 {q['p99_ms']:.2f} ms")
    config = col.configuration_json.get("hnsw") if hasattr(col, "configuration_json") else None
    out = {
        "version": chromadb.__version__,
        "vectors": n,
        "batch": batch,
        "add_s": t_added - t0,
        "add_per_s": n / (t_added - t0),
        "first_query_s": t_searchable - t_added,
        "search": q,
        "hnsw": config,
    }
    with contextlib.suppress(Exception):  # releasing the client is best effort
        client.clear_system_cache()
    shutil.rmtree(path, ignore_errors=True)
    return out


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def bench_scale(cfg: BenchConfig, n: int, root: Path, rep: Reporter) -> dict[str, Any]:
    """Memory and start figures only, at ``n`` vectors of the first dtype."""
    dtype = cfg.dtypes[0]
    data = make_dataset(cfg, n, rep)
    files = write_files(data, root)
    out: dict[str, Any] = {"n": n, "dtype": dtype}
    log_dir, node_dir = root / "log-scale", root / "node-scale"
    stack = Stack(log_dir, cfg.durability)
    try:
        with rep.task(f"append {n:,} VectorRecords (no node)", n) as (tick, done):
            t0 = time.perf_counter()
            _append_config(
                stack,
                IndexConfig(
                    TENANT, INDEX, cfg.dim, metric=Metric.COSINE, dtype=Dtype(dtype), recipe=RECIPE
                ),
            )
            for s in range(0, n, cfg.batch):
                recs = stack.records(s, data.base[s : s + cfg.batch])
                stack.log.append_batch(recs)
                tick(len(recs))
            out["append_per_s"] = n / (time.perf_counter() - t0)
            done(f"{out['append_per_s']:,.0f}/s")
    finally:
        stack.close()
    del data
    gc.collect()
    out["log_mb"] = dir_mb(log_dir)
    spec = {
        "kind": "node",
        "log_dir": str(log_dir),
        "node_dir": str(node_dir),
        "durability": cfg.durability,
        "head_capacity": cfg.head_capacity,
        "ef_values": list(cfg.ef_values),
    }
    with rep.task(f"replay {n:,} into a node (subprocess)", 1) as (_t, done):
        out["start_replay"] = run_child({**spec, "settle": True, "snapshot": True, **files}, root)
        done(
            f"searchable {out['start_replay']['searchable_s']:.0f} s, settled "
            f"{out['start_replay']['settled_s']:.0f} s"
        )
    out["snapshot_mb"] = dir_mb(node_dir / "snapshots")
    with rep.task("start from snapshot, then the queries (subprocess)", 1) as (_t, done):
        out["start_snapshot"] = run_child({**spec, **files}, root)
        done(f"{out['start_snapshot']['searchable_s']:.2f} s")
    shutil.rmtree(log_dir, ignore_errors=True)
    shutil.rmtree(node_dir, ignore_errors=True)
    out["faiss"], _ = bench_raw_faiss(cfg, dtype, n, files, root, rep, curve=True)
    return out


def _append_config(stack: Stack, config: IndexConfig) -> None:
    """The IndexConfig record, encoded as VectorService.create_index encodes it."""
    subject = catalog.subject_for(stack.topics.indexes)
    schema = catalog.load_schema(catalog.TOPIC_VALUE_SCHEMA["indexes"])
    value = stack.codec.encode(
        subject,
        schema,
        {
            "tenant": config.tenant,
            "index": config.index,
            "dim": config.dim,
            "metric": config.metric.value,
            "dtype": config.dtype.value,
            "recipe": config.recipe,
            "version": config.version,
            "filter_fields": [],
            "created_ms": now_ms(),
        },
    )
    stack.log.append(stack.topics.indexes, config.key, value)


# -- machine ---------------------------------------------------------------------------------
def machine_info(root: Path) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    def ver(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "-"

    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "mem_gb": round(mem_gb, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": os.getloadavg()[0],
        "data_dir": str(root),
        "filesystem": filesystem_of(root),
        "fdatasync_1k": fdatasync_probe(root),
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "chromadb": ver("chromadb"),
        "redis_py": ver("redis"),
        "rocksdict": ver("rocksdict"),
        "faiss_threads": FAISS_THREADS,
        "result_cache": "off",
        "git": git_state(),
    }


def git_state() -> dict[str, Any]:
    """The commit measured and the files changed on top of it (the tree may be dirty)."""
    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=repo, capture_output=True, text=True, check=False, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [
        line[3:]
        for line in git("status", "--porcelain").splitlines()
        if line[3:].startswith("streams/")
    ]
    return {"commit": git("rev-parse", "--short", "HEAD"), "streams_changed": dirty}


# -- driver ----------------------------------------------------------------------------------
def run(cfg: BenchConfig, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    faiss.omp_set_num_threads(FAISS_THREADS)
    with tempfile.TemporaryDirectory(prefix="streamvec-index-bench-", dir=cfg.data_dir) as tmp:
        root = Path(tmp)
        machine = machine_info(root)
        console.print(
            f"[bold]machine[/]: {machine['nproc']} CPUs ({machine['cpu']}), "
            f"{machine['mem_gb']} GiB, Python {machine['python']}, faiss {machine['faiss']} "
            f"(omp threads {FAISS_THREADS} everywhere), chromadb {machine['chromadb']}; data dir "
            f"on {machine['filesystem']}; fdatasync p50 "
            f"{machine['fdatasync_1k']['p50_us']:.0f} µs; commit {machine['git']['commit']}"
            + (
                f" + uncommitted {', '.join(machine['git']['streams_changed'])}"
                if machine["git"]["streams_changed"]
                else ""
            )
        )
        if machine["loadavg_at_start"] > 0.25 * machine["nproc"]:
            console.print(
                f"[yellow]warning[/]: 1-minute load average "
                f"{machine['loadavg_at_start']:.2f} on {machine['nproc']} CPUs: other "
                "work is running, numbers will be low/noisy"
            )
        out: dict[str, Any] = {"machine": machine, "config": asdict(cfg)}
        with Reporter(console, cfg.progress) as rep:
            if cfg.scale_n:
                out["scale"] = bench_scale(cfg, cfg.scale_n, root, rep)
            else:
                data = make_dataset(cfg, cfg.n, rep)
                files = write_files(data, root)
                out["runs"] = []
                for i, dtype in enumerate(cfg.dtypes):
                    raw, index = bench_raw_faiss(cfg, dtype, cfg.n, files, root, rep)
                    sv = bench_streamvec(cfg, dtype, data, files, index, root, rep, primary=i == 0)
                    out["runs"].append({"faiss": raw, **sv})
                    del index
                out["head_scan"] = bench_head_scan(cfg, data, rep)
                if cfg.upsert_vectors > 0:
                    out["upsert_threads"] = bench_upsert_threads(
                        cfg, data.base, cfg.dtypes[0], root, rep
                    )
                    out["upsert_many"] = bench_upsert_many(cfg, data.base, cfg.dtypes[0], root, rep)
                if cfg.chroma:
                    try:
                        out["chroma"] = bench_chroma(cfg, data, root, rep)
                    except ImportError:
                        rep.log(
                            "chromadb is not installed (pip install -e '.[bench]'): skipping Chroma"
                        )
    machine["loadavg_at_end"] = os.getloadavg()[0]
    return out


# -- report ----------------------------------------------------------------------------------
def _f(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}"


def _table(title: str, columns: Sequence[tuple[str, JustifyMethod]]) -> Table:
    t = Table(title=title, title_justify="left")
    for name, just in columns:
        t.add_column(name, justify=just)
    return t


def per_million(mb: float, n: int) -> float:
    return mb * 1_000_000 / n


def report(out: dict[str, Any], console: Console) -> None:
    if "scale" in out:
        report_scale(out["scale"], console)
        return
    cfg = out["config"]
    n = cfg["n"]
    runs: list[dict[str, Any]] = out["runs"]
    chroma = out.get("chroma")

    t = _table(
        f"Ingest, {n:,} x {cfg['dim']} (vectors/s)",
        [
            ("system", "left"),
            ("path", "left"),
            ("vectors/s", "right"),
            ("seconds", "right"),
            ("note", "left"),
        ],
    )
    for r in runs:
        ing, d = r["ingest"], r["dtype"]
        t.add_row(
            f"streamvec {d}",
            f"encode + append_batch({ing['batch']})",
            _f(ing["append_per_s"], 0),
            _f(ing["append_s"], 1),
            f"encode {ing['encode_s']:.1f} s of it; node applying meanwhile",
        )
        t.add_row(
            f"streamvec {d}",
            "... until searchable (catch_up)",
            _f(ing["searchable_per_s"], 0),
            _f(ing["searchable_s"], 1),
            "Head + Tail",
        )
        t.add_row(
            f"streamvec {d}",
            "... until seals/merges settled",
            _f(ing["settled_per_s"], 0),
            _f(ing["settled_s"], 1),
            str(r["shape"]["segments"]),
        )
        t.add_row(
            f"raw FAISS {d}",
            f"index.add ({r['faiss']['recipe_used']})",
            _f(r["faiss"]["adds_per_s"], 0),
            _f(r["faiss"]["build_s"], 1),
            "1 thread, efConstruction " + str(segment.EF_CONSTRUCTION),
        )
    up = out.get("upsert_threads")
    if up:
        t.add_row(
            f"streamvec {cfg['dtypes'][0]}",
            f"VectorService.upsert x{up['threads']} threads, until acked",
            _f(up["acked_per_s"], 0),
            _f(up["acked_s"], 1),
            f"{up['vectors']:,} vectors; ack p50 {up['ack_p50_ms']:.2f} ms, "
            f"p99 {up['ack_p99_ms']:.2f} ms",
        )
        t.add_row(
            "", "... until searchable", _f(up["searchable_per_s"], 0), _f(up["searchable_s"], 1), ""
        )
    um = out.get("upsert_many")
    if um:
        t.add_row(
            f"streamvec {cfg['dtypes'][0]}",
            f"VectorService.upsert_many({um['batch']}), 1 thread, until acked",
            _f(um["acked_per_s"], 0),
            _f(um["acked_s"], 1),
            f"{um['vectors']:,} vectors, fresh node",
        )
        t.add_row(
            "", "... until searchable", _f(um["searchable_per_s"], 0), _f(um["searchable_s"], 1), ""
        )
    if chroma:
        t.add_row(
            f"Chroma {chroma['version']}",
            f"collection.add({chroma['batch']})",
            _f(chroma["add_per_s"], 0),
            _f(chroma["add_s"], 1),
            f"first query after: {chroma['first_query_s']:.2f} s",
        )
    console.print(t)

    t = _table(
        "efSearch curve: recall@10 and single-query latency (in-process)",
        [
            ("dtype", "left"),
            ("efSearch", "right"),
            ("streamvec recall", "right"),
            ("p50 ms", "right"),
            ("p99 ms", "right"),
            ("raw FAISS recall", "right"),
            ("p50 ms", "right"),
            ("p99 ms", "right"),
        ],
    )
    for r in runs:
        for ef, c in r["curve"].items():
            s, f = c["streamvec"], c["faiss"]
            t.add_row(
                r["dtype"],
                ef,
                _f(s["recall"], 4),
                _f(s["p50_ms"], 3),
                _f(s["p99_ms"], 3),
                _f(f["recall"], 4),
                _f(f["p50_ms"], 3),
                _f(f["p99_ms"], 3),
            )
    console.print(t)

    t = _table(
        "Search at the chosen efSearch, one query at a time",
        [
            ("system", "left"),
            ("efSearch", "right"),
            ("recall@10", "right"),
            ("p50 ms", "right"),
            ("p99 ms", "right"),
            ("p50 x FAISS", "right"),
            ("p99 x FAISS", "right"),
            ("p99 x Chroma", "right"),
        ],
    )
    cp99 = chroma["search"]["p99_ms"] if chroma else None
    for r in runs:
        f = r["search"]["faiss"]
        for name, label in (
            ("faiss", "raw FAISS"),
            ("inproc", "streamvec in-process"),
            ("resp", "streamvec RESP"),
        ):
            s = r["search"].get(name)
            if s is None:
                continue
            t.add_row(
                f"{label} {r['dtype']}",
                str(r["ef"]),
                _f(s["recall"], 4),
                _f(s["p50_ms"], 3),
                _f(s["p99_ms"], 3),
                _f(s["p50_ms"] / f["p50_ms"], 1),
                _f(s["p99_ms"] / f["p99_ms"], 1),
                _f(s["p99_ms"] / cp99, 2) if cp99 else "-",
            )
    if chroma:
        s = chroma["search"]
        f = runs[0]["search"]["faiss"]
        t.add_row(
            f"Chroma {chroma['version']}",
            str((chroma.get("hnsw") or {}).get("ef_search", "default")),
            _f(s["recall"], 4),
            _f(s["p50_ms"], 3),
            _f(s["p99_ms"], 3),
            _f(s["p50_ms"] / f["p50_ms"], 1),
            _f(s["p99_ms"] / f["p99_ms"], 1),
            "1.00",
        )
    console.print(t)
    for r in runs:
        b = r["breakdown_ms"]
        console.print(
            f"  streamvec {r['dtype']} in-process breakdown (mean ms): "
            + ", ".join(f"{k} {v:.3f}" for k, v in b.items())
        )

    for h in out.get("head_scan", []):
        console.print(
            f"  Head scan (exact fp32, added to every search): {h['rows']:,} rows p50 "
            f"{h['p50_ms']:.3f} ms, p99 {h['p99_ms']:.3f} ms"
        )
    for r in runs:
        if "resp_echo" in r:
            e = r["resp_echo"]
            console.print(
                f"  RESP floor ({r['dtype']} run): ECHO of 1.5 KB from redis-py p50 "
                f"{e['p50_ms']:.3f} ms, p99 {e['p99_ms']:.3f} ms"
            )
    for r in runs:
        for fr in r.get("freshness", []):
            console.print(
                f"freshness {r['dtype']} ({'1 thread searching' if fr['loaded'] else 'idle'}, "
                f"{fr['writes']} writes): ack p50 {fr['ack_p50_ms']:.2f} / p99 "
                f"{fr['ack_p99_ms']:.2f} ms; ack -> searchable p50 {fr['visible_p50_ms']:.2f} / "
                f"p99 {fr['visible_p99_ms']:.2f} / max {fr['visible_max_ms']:.2f} ms"
            )

    t = _table(
        f"Start and memory, {n:,} x {cfg['dim']}",
        [
            ("system", "left"),
            ("start", "left"),
            ("searchable s", "right"),
            ("settled s", "right"),
            ("peak RSS MiB", "right"),
            ("MiB / 1M vectors", "right"),
            ("held MiB (trimmed)", "right"),
        ],
    )
    for r in runs:
        for key, label in (("start_snapshot", "from snapshot"), ("start_replay", "full replay")):
            c = r[key]
            t.add_row(
                f"streamvec {r['dtype']}",
                label,
                _f(c["searchable_s"]),
                _f(c.get("settled_s")),
                _f(peak_mb(c), 0),
                _f(per_million(peak_mb(c), n), 0),
                _f(steady_mb(c), 0),
            )
        f = r["faiss"]
        t.add_row(
            f"raw FAISS {r['dtype']}",
            "build",
            _f(f["build_s"]),
            "-",
            _f(peak_mb(f), 0),
            _f(per_million(peak_mb(f), n), 0),
            _f(steady_mb(f), 0),
        )
    console.print(t)
    for line in target_lines(out):
        console.print("  " + line)


def report_scale(s: dict[str, Any], console: Console) -> None:
    n = s["n"]
    t = _table(
        f"Memory and start at {n:,} vectors ({s['dtype']})",
        [
            ("system", "left"),
            ("what", "left"),
            ("seconds", "right"),
            ("peak RSS MiB", "right"),
            ("MiB / 1M", "right"),
            ("held MiB (trimmed)", "right"),
        ],
    )
    rep, snap, f = s["start_replay"], s["start_snapshot"], s["faiss"]
    t.add_row("streamvec", "append to log (no node)", _f(n / s["append_per_s"], 1), "-", "-", "-")
    t.add_row("streamvec", "full replay: searchable", _f(rep["searchable_s"], 1), "-", "-", "-")
    t.add_row(
        "streamvec",
        "full replay: settled",
        _f(rep["settled_s"], 1),
        _f(peak_mb(rep), 0),
        _f(per_million(peak_mb(rep), n), 0),
        _f(steady_mb(rep), 0),
    )
    t.add_row(
        "streamvec",
        "start from snapshot",
        _f(snap["searchable_s"], 2),
        _f(peak_mb(snap), 0),
        _f(per_million(peak_mb(snap), n), 0),
        _f(steady_mb(snap), 0),
    )
    if "curve" in snap:
        t.add_row(
            "streamvec",
            "... then the queries below",
            "-",
            _f(peak_end_mb(snap), 0),
            _f(per_million(peak_end_mb(snap), n), 0),
            "-",
        )
    t.add_row(
        "raw FAISS",
        f"build {f['recipe_used']}",
        _f(f["build_s"], 1),
        _f(peak_mb(f), 0),
        _f(per_million(peak_mb(f), n), 0),
        _f(steady_mb(f), 0),
    )
    console.print(t)
    t = _table(
        "recall@10 by efSearch",
        [
            ("efSearch", "right"),
            ("streamvec", "right"),
            ("p50 ms", "right"),
            ("p99 ms", "right"),
            ("from snapshot", "right"),
            ("raw FAISS", "right"),
            ("p50 ms", "right"),
            ("p99 ms", "right"),
        ],
    )
    for ef, c in rep["curve"].items():
        fc = f["curve"][ef]
        sc = snap.get("curve", {}).get(ef)
        t.add_row(
            ef,
            _f(c["recall"], 4),
            _f(c["p50_ms"], 3),
            _f(c["p99_ms"], 3),
            _f(sc["recall"], 4) if sc else "-",
            _f(fc["recall"], 4),
            _f(fc["p50_ms"], 3),
            _f(fc["p99_ms"], 3),
        )
    console.print(t)
    console.print(
        f"  segments {rep['shape']['segments']}, snapshot {s['snapshot_mb']:.0f} MiB, "
        f"log {s['log_mb']:.0f} MiB"
    )


def target_lines(out: dict[str, Any]) -> list[str]:
    """Each of issue 3's targets that the default run measures, met or missed."""
    lines = []
    n = out["config"]["n"]
    first = out["runs"][0]

    def verdict(ok: bool, gap: str) -> str:
        return "met" if ok else f"missed ({gap})"

    for fr in first.get("freshness", []):
        p99 = fr["visible_p99_ms"]
        lines.append(
            f"freshness p99 < {FRESHNESS_P99_MS:.0f} ms "
            f"({'loaded' if fr['loaded'] else 'idle'}): {p99:.1f} ms: "
            + verdict(p99 < FRESHNESS_P99_MS, f"x{p99 / FRESHNESS_P99_MS:.1f}")
        )
    for r in out["runs"]:
        s = r["search"].get("resp")
        if s is not None:
            ok = s["p99_ms"] < SEARCH_P99_MS and s["recall"] >= RECALL_GOAL
            lines.append(
                f"search p99 < {SEARCH_P99_MS} ms over RESP at recall >= {RECALL_GOAL} "
                f"({r['dtype']}, {n:,}): {s['p99_ms']:.2f} ms at recall "
                f"{s['recall']:.3f}: "
                + verdict(
                    ok,
                    f"x{s['p99_ms'] / SEARCH_P99_MS:.1f} the latency"
                    if s["recall"] >= RECALL_GOAL
                    else "recall short",
                )
            )
        rate = r["ingest"]["searchable_per_s"]
        lines.append(
            f"ingest through the log >= {INGEST_PER_S:,}/s ({r['dtype']}): "
            f"{rate:,.0f}/s: " + verdict(rate >= INGEST_PER_S, f"{rate / INGEST_PER_S:.0%} of it")
        )
        if r is out["runs"][0] and out.get("upsert_many"):
            rate = out["upsert_many"]["searchable_per_s"]
            lines.append(
                f"ingest via upsert_many >= {INGEST_PER_S:,}/s ({r['dtype']}): "
                f"{rate:,.0f}/s: "
                + verdict(rate >= INGEST_PER_S, f"{rate / INGEST_PER_S:.0%} of it")
            )
        snap = r["start_snapshot"]["searchable_s"]
        lines.append(
            f"start from snapshot < {SNAPSHOT_START_S:.0f} s at 1M ({r['dtype']}): "
            f"{snap:.2f} s at {n:,} (x{1_000_000 / n:.0f} linear: "
            f"{snap * 1_000_000 / n:.1f} s)"
        )
        mb = per_million(peak_mb(r["start_replay"]), n)
        lines.append(
            f"< {RSS_PER_MILLION_MB:.0f} MB per 1M x 384 ({r['dtype']}): replay peak "
            f"{mb:,.0f} MiB/1M, from snapshot "
            f"{per_million(peak_mb(r['start_snapshot']), n):,.0f} MiB/1M (linear "
            "extrapolation from this run)"
        )
    return lines


# -- command line ----------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> tuple[BenchConfig, str | None, Any]:
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--n", type=int, default=d.n, help="vectors (%(default)s)")
    p.add_argument("--dim", type=int, default=d.dim)
    p.add_argument("--clusters", type=int, default=d.clusters)
    p.add_argument(
        "--spread",
        type=float,
        default=d.spread,
        help="cluster spread (noise norm relative to the unit centre)",
    )
    p.add_argument("--queries", type=int, default=d.queries)
    p.add_argument(
        "--dtypes",
        default=",".join(d.dtypes),
        help="int8,fp16,fp32 (first: freshness, upserts, --million)",
    )
    p.add_argument(
        "--ef-values", default=",".join(map(str, d.ef_values)), help="efSearch values of the curve"
    )
    p.add_argument(
        "--ef",
        type=int,
        default=None,
        help="efSearch for the comparisons (default: smallest reaching recall 0.99)",
    )
    p.add_argument("--batch", type=int, default=d.batch, help="records per append_batch")
    p.add_argument("--head-capacity", type=int, default=d.head_capacity)
    p.add_argument("--durability", default=d.durability, choices=("sync", "group", "none"))
    p.add_argument(
        "--freshness", type=int, default=d.freshness, help="writes per freshness scenario"
    )
    p.add_argument("--upsert-vectors", type=int, default=d.upsert_vectors)
    p.add_argument("--upsert-threads", type=int, default=d.upsert_threads)
    p.add_argument("--no-chroma", action="store_true")
    p.add_argument("--chroma-batch", type=int, default=d.chroma_batch)
    p.add_argument("--no-resp", action="store_true")
    p.add_argument(
        "--million",
        action="store_true",
        help="memory and snapshot-start figures only, at 1M vectors",
    )
    p.add_argument("--scale-n", type=int, default=None, help="like --million at this many vectors")
    p.add_argument("--dir", default=None, help="parent of the temporary data dir (system tmp)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--quick", action="store_true", help="small smoke run")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", dest="json_path", default=None, help="write results to this file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    dtypes = tuple(x.strip() for x in a.dtypes.split(",") if x.strip())
    for x in dtypes:
        if x not in {m.value for m in Dtype}:
            p.error(f"unknown dtype {x!r}")
    cfg = BenchConfig(
        n=a.n,
        dim=a.dim,
        clusters=a.clusters,
        spread=a.spread,
        queries=a.queries,
        dtypes=dtypes,
        ef_values=tuple(int(x) for x in a.ef_values.split(",")),
        ef=a.ef,
        batch=a.batch,
        head_capacity=a.head_capacity,
        durability=a.durability,
        freshness=a.freshness,
        upsert_vectors=a.upsert_vectors,
        upsert_threads=a.upsert_threads,
        chroma=not a.no_chroma,
        chroma_batch=a.chroma_batch,
        resp=not a.no_resp,
        scale_n=1_000_000 if a.million else a.scale_n,
        data_dir=a.dir,
        seed=a.seed,
        progress=not a.no_progress,
    )
    if a.quick:
        cfg = replace(
            cfg,
            n=min(cfg.n, 10_000),
            queries=min(cfg.queries, 200),
            clusters=min(cfg.clusters, 100),
            head_capacity=min(cfg.head_capacity, 2000),
            freshness=min(cfg.freshness, 30),
            upsert_vectors=min(cfg.upsert_vectors, 2000),
            scale_n=min(cfg.scale_n, 20_000) if cfg.scale_n else None,
        )
    return cfg, a.json_path, a


def main(argv: Sequence[str] | None = None) -> int:
    cfg, json_path, a = parse_args(argv)
    if a.child:
        return child_main(a.child, a.child_out)
    console = Console(width=None if sys.stdout.isatty() else 150)
    started = time.monotonic()
    out = run(cfg, console)
    report(out, console)
    console.print(f"total wall time {time.monotonic() - started:.0f} s")
    if json_path:
        Path(json_path).write_text(json.dumps(out, indent=2, default=str) + "\n")
        console.print(f"results written to {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
