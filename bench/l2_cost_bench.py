"""What L2's cost-aware reuse costs on the hot path: :meth:`CacheController.lookup` on an
L2-only index, p50/p99 per call in process, the rule before (``serves(d, threshold)``, a
fixed distance) and after (:func:`streams.cache.semantic.reuses` with the default penalty)
side by side, interleaved rounds in one process (docs/benchmarks.md, "Cost-aware reuse").

Setup: ``--reps`` cached results (dim ``--dim``, cost 10 ms each, so the cost rule serves
what the fixed one does) as L2 representatives of one group, threshold 0.01. Queries:
**hit**, at cosine distance 0.002 from a representative (served by both rules); **miss**,
a random direction (no representative within the threshold: the projected prefilter
answers, the rule is never asked); **refused**, near a representative whose result cost
0.1 ms (the fixed rule serves it, the cost rule does not: a miss after the rule).

Run: ``nice -n 10 env OPENBLAS_NUM_THREADS=1 .venv/bin/python -m bench.l2_cost_bench``.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import streams.cache.controller as controller_module
from streams.cache import CacheController, CachedResult, ResultCache, query_key
from streams.cache.semantic import DEFAULT_L2_PENALTY_MS, FalseHitCurve, reuses, serves
from streams.index.model import CacheSettings, IndexConfig, Vector

THRESHOLD = 0.01


def _unit(rng: np.random.Generator, dim: int) -> Vector:
    v = rng.standard_normal(dim).astype(np.float32)
    out: Vector = v / np.linalg.norm(v)
    return out


def _near(q: Vector, d: float, rng: np.random.Generator) -> Vector:
    o = _unit(rng, q.size)
    o = o - float(o @ q) * q
    o /= np.linalg.norm(o)
    c = 1.0 - d
    out: Vector = (c * q + math.sqrt(1.0 - c * c) * o).astype(np.float32)
    return out


def _fixed(d: float, cost_ms: float, cap: float, penalty_ms: float, curve: FalseHitCurve) -> bool:
    """The rule before: distance alone (what the controller called until now)."""
    return bool(serves(d, cap))


def build(reps: int, dim: int, seed: int) -> tuple[CacheController, IndexConfig, list[Vector]]:
    rng = np.random.default_rng(seed)
    ctl = CacheController(
        ResultCache(1 << 30), l2_threshold=THRESHOLD, l2_penalty_ms=DEFAULT_L2_PENALTY_MS
    )
    c = IndexConfig("b", "l2", dim, recipe="Flat", cache=CacheSettings(("L2",)))
    points = []
    for i in range(reps):
        q = _unit(rng, dim)
        look = ctl.lookup(c, q, 10, None)
        cost = 0.1 if i % 2 else 10.0  # odd representatives: cheap ones
        ids = tuple(f"v{j}" for j in range(10))
        entry = CachedResult(
            query_key(c.key, c.metric, q, 10, None), c.key, c.metric, q, 10, None,
            tuple(range(10)), ids, tuple(1.0 - 0.01 * j for j in range(10)), (None,) * 10,
            compute_ms=cost, created_s=time.monotonic(),
        )  # fmt: skip
        ctl.offer(look, entry)
        points.append(q)
    return ctl, c, points


def measure(
    ctl: CacheController, c: IndexConfig, queries: list[Vector], rule: Callable[..., bool]
) -> tuple[list[int], list[str]]:
    setattr(controller_module, "reuses", rule)  # noqa: B010  # the A/B switch
    try:
        out, layers = [], []
        for q in queries:
            t0 = time.perf_counter_ns()
            look = ctl.lookup(c, q, 10, None)
            out.append(time.perf_counter_ns() - t0)
            layers.append(look.layer)
        return out, layers
    finally:
        setattr(controller_module, "reuses", reuses)  # noqa: B010


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    ctl, c, points = build(args.reps, args.dim, 0)
    rng = np.random.default_rng(1)
    n = args.queries
    kinds = {
        "hit": [_near(points[2 * (i % (len(points) // 2))], 0.002, rng) for i in range(n)],
        "miss": [_unit(rng, args.dim) for _ in range(n)],
        "refused": [_near(points[2 * (i % (len(points) // 2)) + 1], 0.002, rng) for i in range(n)],
    }
    rules: dict[str, Callable[..., bool]] = {"before (fixed)": _fixed, "after (cost)": reuses}
    times: dict[tuple[str, str], list[int]] = {(k, r): [] for k in kinds for r in rules}
    layers: dict[tuple[str, str], str] = {}
    for _ in range(args.rounds):  # interleaved: the shared machine's load hits both alike
        for kind, qs in kinds.items():
            for name, rule in rules.items():
                t, lay = measure(ctl, c, qs, rule)
                times[kind, name] += t
                layers[kind, name] = max(set(lay), key=lay.count)
    report: dict[str, Any] = {"reps": args.reps, "dim": args.dim, "rows": []}
    print(f"CacheController.lookup, L2 only, {args.reps} representatives of {args.dim} dims")
    print("| query | rule | layer | p50 µs | p99 µs | p50 after / before |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind in kinds:
        p50_before = float(np.percentile(times[kind, "before (fixed)"], 50)) / 1e3
        for name in rules:
            us = np.array(times[kind, name]) / 1e3
            p50, p99 = float(np.percentile(us, 50)), float(np.percentile(us, 99))
            ratio = p50 / p50_before
            report["rows"].append({"query": kind, "rule": name, "layer": layers[kind, name],
                                   "p50_us": p50, "p99_us": p99, "ratio": ratio})  # fmt: skip
            print(f"| {kind} | {name} | {layers[kind, name]} | {p50:.1f} | {p99:.1f} | "
                  f"{ratio:.2f} |")  # fmt: skip
    t0 = time.perf_counter()
    from streams.cache.semantic import VECTOR_CURVE

    for i in range(100_000):
        reuses(0.002 + i * 1e-9, 10.0, THRESHOLD, DEFAULT_L2_PENALTY_MS, VECTOR_CURVE)
    report["reuses_us"] = (time.perf_counter() - t0) / 100_000 * 1e6
    t0 = time.perf_counter()
    for i in range(100_000):
        bool(serves(0.002 + i * 1e-9, THRESHOLD))
    report["serves_us"] = (time.perf_counter() - t0) / 100_000 * 1e6
    print(f"per call: reuses() {report['reuses_us']:.2f} µs, "
          f"bool(serves()) {report['serves_us']:.2f} µs")  # fmt: skip
    return report


if __name__ == "__main__":
    main()
