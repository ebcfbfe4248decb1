"""L0 hit rate under a steady write load (issue 4, item 2: "writes elsewhere in the vector
space must leave hot entries cached: report the hit rate under a steady write load").

One query node (embedded log, durability ``none``) holds three indexes with the same
vectors (a mixture of 50 Gaussian clusters on the unit sphere, noise ``SPREAD``, cosine,
every row in the exact Head) and takes the same writes:

* ``exact``: the node's L0 cache with its result-aware invalidation (a write drops only
  the entries it would enter, or whose hits it updates or deletes);
* ``flush`` (the baseline): the same cache, but every applied write to the index drops
  all of the index's entries, which is what a result cache without result-aware
  invalidation must do to never serve a stale answer at ``session`` consistency (a
  wrapper around the indexer's change listener turns each upsert/delete into an index
  reset, under the applier's lock, before positions advance: the same timing);
* ``off``: cache layers ``NONE`` (search latency without a cache).

Workload, per row of the report: hot queries (``--hot``, points of the first half of the
clusters plus noise) asked with Zipf(1.0) popularity, ``k`` 10, at ``session``
consistency with the token of the index's last write (so every search sees every write
before it), interleaved with writes at ``--rates`` writes per search. A write is an insert
of a new id (80%) or an update of a random existing id (20%), its vector drawn from

* ``far``: the other half of the clusters (no hot query there; updates move rows of
  those clusters only), or
* ``anywhere``: every cluster, hot ones included (some writes do enter hot results).

Each row: a warm-up pass over the hot queries, then ``--searches`` searches per index in
the same interleaved order. Reported: hit rate of ``exact`` and ``flush`` and their
ratio, entries invalidated per write, search latency p50/p99 of the three indexes, and
false hits: a sample of ``exact`` hits (``--verify``) re-checked against a fresh search
(``cache_verify_rate``); every one must be 0.

Run: ``nice -n 10 .venv/bin/python -m bench.write_load_bench [--json out.json]`` (about a
minute on 2 cores). Prints a Markdown report with ``uptime``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from streams.index.model import CacheSettings, Consistency, IndexConfig, Metric, VectorUpsert
from streams.log.embedded import EmbeddedLog
from streams.schemas.codec import AvroCodec
from streams.schemas.log_registry import LogRegistry
from streams.service.api import SearchRequest
from streams.service.indexer import ChangeListener
from streams.service.query_node import QueryNode
from streams.topics import Topics

TENANT, K = "bench", 10
INDEXES = {"exact": ("L0",), "flush": ("L0",), "off": ("NONE",)}
Matrix = npt.NDArray[np.float32]
# per-dimension noise around a cluster centre (unit): at dim 64 a point is about 0.45 from
# its centre, so rows of one cluster have cosine ~0.8 and of two clusters ~0
SPREAD = 0.06


class FlushOnWrite:
    """The baseline's invalidation: the wrapped listener is told everything, and every
    upsert or delete of ``index_key`` also resets that index (the cache drops all of its
    entries and refuses puts of searches that began before)."""

    def __init__(self, inner: ChangeListener, index_key: str) -> None:
        self.inner, self.index_key = inner, index_key

    def upserted(
        self,
        index_key: str,
        id: str,
        vector: Any,
        tags: Sequence[str],
        numeric: Mapping[str, float],
    ) -> None:
        self.inner.upserted(index_key, id, vector, tags, numeric)
        if index_key == self.index_key:
            self.inner.reset(index_key)

    def deleted(self, index_key: str, id: str) -> None:
        self.inner.deleted(index_key, id)
        if index_key == self.index_key:
            self.inner.reset(index_key)

    def reset(self, index_key: str) -> None:
        self.inner.reset(index_key)

    def applied(self) -> None:
        self.inner.applied()


def unit(x: npt.NDArray[Any]) -> Matrix:
    out: Matrix = (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
    return out


def build(
    root: Path, n: int, dim: int, seed: int
) -> tuple[EmbeddedLog, QueryNode, Matrix, npt.NDArray[np.int64]]:
    """The node, the cluster centres and each row's cluster."""
    topics = Topics()
    log = EmbeddedLog(root / "log", durability="none")
    log.ensure_topics(topics.specs())
    codec = AvroCodec(LogRegistry(log, topics))
    node = QueryNode(
        log, topics, codec, root / "node", head_capacity=10 * n, faiss_threads=1
    ).start()
    inner = node.indexer.listener
    assert inner is not None
    node.indexer.listener = FlushOnWrite(inner, f"{TENANT}/flush")
    svc = node.service
    for name, layers in INDEXES.items():
        svc.create_index(
            IndexConfig(
                TENANT, name, dim, metric=Metric.COSINE, recipe="Flat", cache=CacheSettings(layers)
            )
        )
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((50, dim)))
    cluster = rng.integers(0, 50, n)
    data = unit(centres[cluster] + SPREAD * rng.standard_normal((n, dim)))
    for name in INDEXES:
        for start in range(0, n, 2000):
            svc.upsert_many(
                [
                    VectorUpsert(TENANT, name, f"d{i}", data[i])
                    for i in range(start, min(n, start + 2000))
                ]
            )
    assert node.catch_up(600)
    return log, node, centres, cluster


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if xs else 0.0


def run_row(
    node: QueryNode,
    centres: Matrix,
    cluster: npt.NDArray[np.int64],
    *,
    mode: str,
    rate: float,
    hot: int,
    searches: int,
    seed: int,
) -> dict[str, Any]:
    """One row of the report (module docstring)."""
    svc, cache = node.service, node.cache
    assert cache is not None
    rng = np.random.default_rng(seed)
    half = centres.shape[0] // 2
    # rows an update may move: far mode, rows of the far clusters only (in no hot result)
    movable = np.flatnonzero(cluster >= half) if mode == "far" else np.arange(cluster.size)
    hot_q = unit(
        centres[rng.integers(0, half, hot)] + SPREAD * rng.standard_normal((hot, centres.shape[1]))
    )
    ranks = np.arange(1, hot + 1, dtype=np.float64)
    popularity = (1 / ranks) / (1 / ranks).sum()
    for name in INDEXES:
        cache.reset_index(f"{TENANT}/{name}")
    tokens = {name: "" for name in INDEXES}
    lat: dict[str, list[float]] = {name: [] for name in INDEXES}
    hits = {name: 0 for name in INDEXES}
    new_ids = 0

    def search(name: str, q: Matrix, record: bool) -> None:
        t0 = time.perf_counter_ns()
        out = svc.search(
            SearchRequest(
                TENANT,
                name,
                q,
                K,
                None,
                Consistency.SESSION,
                (tokens[name],) if tokens[name] else (),
                timeout_ms=30_000,
            )
        )
        if record:
            lat[name].append((time.perf_counter_ns() - t0) / 1e6)
            hits[name] += bool(out.debug.get("cache_hit"))

    def write() -> None:
        nonlocal new_ids
        lo, hi = (half, centres.shape[0]) if mode == "far" else (0, centres.shape[0])
        v = unit(centres[rng.integers(lo, hi)] + SPREAD * rng.standard_normal(centres.shape[1]))
        if rng.random() < 0.2:
            id = f"d{rng.choice(movable)}"  # an update of an existing row
        else:
            id, new_ids = f"w{seed}.{new_ids}", new_ids + 1
        for name in INDEXES:
            tokens[name] = svc.upsert(VectorUpsert(TENANT, name, id, v)).token

    for i in range(hot):  # warm-up: every hot query cached once
        for name in INDEXES:
            search(name, hot_q[i], record=False)
    before = cache.stats()
    inv_before = {name: _invalidated(node, name) for name in INDEXES}
    owed = 0.0
    writes = 0
    order = rng.choice(hot, size=searches, p=popularity)
    for step in range(searches):
        owed += rate
        while owed >= 1.0:
            write()
            writes += 1
            owed -= 1.0
        q = hot_q[int(order[step])]
        for name in rng.permutation(list(INDEXES)):
            search(str(name), q, record=True)
    after = cache.stats()
    row: dict[str, Any] = {
        "mode": mode,
        "writes_per_search": rate,
        "writes": writes,
        "searches": searches,
        "hot": hot,
    }
    for name in INDEXES:
        row[name] = {
            "hit_rate": round(hits[name] / searches, 4),
            "p50_ms": round(pct(lat[name], 50), 3),
            "p99_ms": round(pct(lat[name], 99), 3),
        }
    for name in ("exact", "flush"):
        dropped = _invalidated(node, name) - inv_before[name]
        row[name]["dropped_per_write"] = round(dropped / max(1, writes), 3)
    flush = row["flush"]["hit_rate"]
    row["hit_rate_ratio"] = round(row["exact"]["hit_rate"] / flush, 2) if flush else None
    row["verified"] = after.verified - before.verified
    row["false_hits"] = after.false_hits - before.false_hits
    return row


def _invalidated(node: QueryNode, name: str) -> int:
    """Entries of one index dropped by writes so far (the removal listener counts them)."""
    return int(_DROPS.get(f"{TENANT}/{name}", 0))


_DROPS: dict[str, int] = {}


def _count_drops(node: QueryNode) -> None:
    assert node.cache is not None

    def listener(slot: Any, reason: str) -> None:
        if reason in ("invalidated", "dropped"):
            key = slot.entry.index_key
            _DROPS[key] = _DROPS.get(key, 0) + 1

    node.cache.add_removal_listener(listener)


def render(r: dict[str, Any]) -> str:
    lines = [
        f"{r['n']:,} vectors, dim {r['dim']}, k {K}, {r['rows'][0]['hot']} hot queries "
        f"(Zipf 1.0), session consistency; {r['uptime']}",
        "",
        "| writes land | writes / search | hit rate exact | hit rate flush-on-write | ratio "
        "| dropped / write exact | dropped / write flush | p50 / p99 ms exact | p50 / p99 ms "
        "flush | p50 / p99 ms off | hits verified (false) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in r["rows"]:
        e, f, o = row["exact"], row["flush"], row["off"]
        ratio = "-" if row["hit_rate_ratio"] is None else f"{row['hit_rate_ratio']:.1f}x"
        lines.append(
            f"| {row['mode']} | {row['writes_per_search']:g} | {e['hit_rate']:.3f} | "
            f"{f['hit_rate']:.3f} | {ratio} | {e['dropped_per_write']:.2f} | "
            f"{f['dropped_per_write']:.2f} | {e['p50_ms']:.2f} / {e['p99_ms']:.2f} | "
            f"{f['p50_ms']:.2f} / {f['p99_ms']:.2f} | {o['p50_ms']:.2f} / {o['p99_ms']:.2f} | "
            f"{row['verified']} ({row['false_hits']}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--hot", type=int, default=200)
    ap.add_argument("--searches", type=int, default=1500)
    ap.add_argument("--rates", default="0.1,0.5,1", help="writes per search, comma-separated")
    ap.add_argument("--verify", type=float, default=0.2, help="share of hits re-checked")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="write-load-"))
    try:
        log, node, centres, cluster = build(root, args.n, args.dim, args.seed)
        try:
            _count_drops(node)
            node.service.verify_rate = args.verify
            uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
            rows = [
                run_row(
                    node,
                    centres,
                    cluster,
                    mode=mode,
                    rate=float(rate),
                    hot=args.hot,
                    searches=args.searches,
                    seed=args.seed + 1 + i,
                )
                for i, (mode, rate) in enumerate(
                    (m, r) for m in ("far", "anywhere") for r in args.rates.split(",")
                )
            ]
        finally:
            node.close()
            log.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report = {"n": args.n, "dim": args.dim, "uptime": uptime, "rows": rows}
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
