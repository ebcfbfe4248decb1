"""What recording an IVF answer's probed lists costs a search (issue 4, item 2).

Run from the repository root::

    .venv/bin/python bench/ivf_depends_bench.py                     # 100k x 384, ~1-2 min
    .venv/bin/python bench/ivf_depends_bench.py --n 20000 --quick   # smoke run

One :class:`VectorIndex` per ``--recipes`` (default ``IVF1024,SQ8`` and ``IVF256,Flat``),
``--n`` clustered unit vectors of ``--dim`` dims sealed into one Tail segment (nothing in
the Head), FAISS on one thread. Every query is searched three ways, in a shuffled order
per query so that drift and the other workers' load fall on all arms alike:

* ``plain``: ``VectorIndex.search(q, 10)`` (what an uncached search does);
* ``record``: ``search(q, 10, record=True)`` (a search offered to the cache: the quantizer
  once, then ``search_preassigned``, plus the Probe tuple);
* ``naive``: what recording costs the simple way, asking the quantizer a second time
  (``quantizer.search(q, nprobe)``) beside a plain search.

Reported: p50/p99 latency per arm in microseconds, and the ratios record/plain and
naive/plain of the p50s. The hits of ``record`` are checked equal to ``plain``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import faiss
import numpy as np

from streams.index.model import IndexConfig
from streams.index.segment import default_nprobe, recipe_nlist
from streams.index.vector_index import VectorIndex


def data(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    rows = centres[rng.integers(0, clusters, n)]
    rows += 0.5 * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def build(recipe: str, vectors: np.ndarray) -> VectorIndex:
    n, dim = vectors.shape
    vi = VectorIndex(IndexConfig("bench", "ivf", dim, recipe=recipe), head_capacity=n + 1)
    vi.upsert_many(np.arange(n, dtype=np.int64), vectors)
    job = vi.begin_seal()
    assert job is not None
    job.build()
    vi.finish_seal(job)
    return vi


def pct(xs: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1e6, p))


def run(recipe: str, vectors: np.ndarray, queries: np.ndarray, seed: int) -> dict[str, Any]:
    t = time.perf_counter()
    vi = build(recipe, vectors)
    build_s = time.perf_counter() - t
    seg = vi._view.segments[0]
    ivf: Any = seg._ivf
    nlist = recipe_nlist(recipe) or 1
    nprobe = default_nprobe(nlist)

    def plain(q: np.ndarray) -> Any:
        return vi.search(q, 10)

    def record(q: np.ndarray) -> Any:
        return vi.search(q, 10, record=True)

    def naive(q: np.ndarray) -> Any:
        ivf.quantizer.search(q[None, :], nprobe)
        return vi.search(q, 10)

    arms = {"plain": plain, "record": record, "naive": naive}
    times: dict[str, list[float]] = {name: [] for name in arms}
    rng = np.random.default_rng(seed)
    for q in queries[:50]:  # warm-up
        for fn in arms.values():
            fn(q)
    for q in queries:
        a = plain(q)
        b = record(q)
        assert np.array_equal(a.labels, b.labels), "recording changed the hits"
        assert b.depends is not None and len(b.depends[0][1].lists) == nprobe
        for name in rng.permutation(list(arms)):
            fn = arms[str(name)]
            t0 = time.perf_counter()
            fn(q)
            times[str(name)].append(time.perf_counter() - t0)
    out: dict[str, Any] = {"recipe": recipe, "nprobe": nprobe, "build_s": round(build_s, 1)}
    for name, xs in times.items():
        out[name] = {"p50_us": round(pct(xs, 50), 1), "p99_us": round(pct(xs, 99), 1)}
    out["record/plain p50"] = round(out["record"]["p50_us"] / out["plain"]["p50_us"], 3)
    out["record/plain p99"] = round(out["record"]["p99_us"] / out["plain"]["p99_us"], 3)
    out["naive/plain p50"] = round(out["naive"]["p50_us"] / out["plain"]["p50_us"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--recipes", default="IVF1024,SQ8;IVF256,Flat", help="';'-separated")
    ap.add_argument("--quick", action="store_true", help="500 queries")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    faiss.omp_set_num_threads(1)
    nq = 500 if args.quick else args.queries
    rows = data(args.n + nq, args.dim, args.clusters, args.seed)  # held-out queries
    vectors, queries = rows[: args.n], rows[args.n :]
    results = [run(r, vectors, queries, args.seed) for r in args.recipes.split(";")]
    print(f"load average {os.getloadavg()}")
    for r in results:
        print(json.dumps(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
