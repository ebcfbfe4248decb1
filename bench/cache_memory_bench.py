"""``CacheController.lookup`` in process: this tree against the committed one, same run.

Issue 4 item 1 (per-index L3 switch, per-layer memory accounting) touches the controller's
settings, its offer and the payload cache. This measures what the search path pays for it:
``lookup`` p50/p99 (microseconds) for an L0 hit, an L1 hit, an L2 hit and a miss, and the
miss path's ``offer``, for the controller of this working tree ("new") and the controller
of ``git HEAD`` ("base", loaded from ``git show HEAD:streams/cache/controller.py``),
interleaved in rounds so both see the same machine load. Both run over the same
``ResultCache`` class (this tree's), with a tenant budget set (the accounting path runs).

Second table: the per-structure byte estimates the budgets use (``L1_LINK_BYTES``,
``l2_rep_bytes``, ``ROW_BYTES``) against what ``tracemalloc`` measures for 4,000 of each.

Run: ``.venv/bin/python -m bench.cache_memory_bench [--queries 2000] [--rounds 5]``.
Prints Markdown tables with ``uptime``.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
import tracemalloc
import types
from pathlib import Path
from typing import Any

import numpy as np

from streams.cache import CachedResult, ResultCache
from streams.cache.controller import L1_LINK_BYTES, CacheController, l2_rep_bytes
from streams.cache.payload import ROW_BYTES, PayloadCache
from streams.index.model import CacheSettings, IndexConfig

ROOT = Path(__file__).resolve().parent.parent
DIM = 128


def _baseline() -> types.ModuleType:
    src = subprocess.run(
        ["git", "show", "HEAD:streams/cache/controller.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    spec = importlib.util.spec_from_loader("baseline_controller", loader=None)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["baseline_controller"] = mod
    exec(compile(src, "baseline_controller.py", "exec"), mod.__dict__)
    return mod


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    out: np.ndarray = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def _entry(c: IndexConfig, lookup: Any, q: np.ndarray, k: int) -> CachedResult:
    ids = tuple(f"d{i}" for i in range(k))
    return CachedResult(
        lookup.qkey,
        c.key,
        c.metric,
        q,
        k,
        None,
        tuple(range(k)),
        ids,
        tuple(1.0 - 0.01 * i for i in range(k)),
        (None,) * k,
        created_s=time.monotonic(),
    )


def _pct(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs) * 1e6
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def run(cls: Any, queries: np.ndarray, k: int) -> dict[str, list[float]]:
    cache = ResultCache(1 << 30, tenant_budget_bytes=1 << 28)
    ctl = cls(cache, l2_threshold=0.05)
    c = IndexConfig("t", "i", DIM, recipe="Flat", cache=CacheSettings(("L0", "L1", "L2", "L3")))
    out: dict[str, list[float]] = {"miss": [], "offer": [], "L0": [], "L1": [], "L2": []}
    pc = time.perf_counter
    for q in queries:
        t0 = pc()
        look = ctl.lookup(c, q, k, None)
        t1 = pc()
        e = _entry(c, look, q, k)
        t2 = pc()
        ctl.offer(look, e)
        t3 = pc()
        out["miss"].append(t1 - t0)
        out["offer"].append(t3 - t2)
    scaled = [(q * np.float32(2.0)).astype(np.float32) for q in queries]
    rng = np.random.default_rng(5)
    near = [(q + 0.02 * _unit(rng, 1)[0]).astype(np.float32) for q in queries]
    for q, s, n in zip(queries, scaled, near, strict=True):
        t0 = pc()
        a = ctl.lookup(c, q, k, None)
        t1 = pc()
        b = ctl.lookup(c, s, k, None)
        t2 = pc()
        d = ctl.lookup(c, n, k, None)
        t3 = pc()
        assert a.layer == "L0", a.layer
        out["L0"].append(t1 - t0)
        if b.layer == "L1":
            out["L1"].append(t2 - t1)
        if d.layer == "L2":
            out["L2"].append(t3 - t2)
    return out


def _traced(fn: Any) -> int:
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    fn()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    return sum(d.size_diff for d in after.compare_to(before, "filename"))


def _offers_bytes(layers: tuple[str, ...], dim: int, n: int) -> float:
    """Bytes allocated by offering ``n`` misses to a controller with ``layers`` on."""
    ctl = CacheController(ResultCache(1 << 34), l2_threshold=0.0)
    c = IndexConfig("t", "i", dim, recipe="Flat", cache=CacheSettings(layers))
    queries = (
        _unit(np.random.default_rng(0), n)
        if dim == DIM
        else np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    )
    pending = [
        (look, _entry(c, look, q, 10)) for q in queries for look in (ctl.lookup(c, q, 10, None),)
    ]

    def offer_all() -> None:
        for look, e in pending:
            ctl.offer(look, e)

    return _traced(offer_all) / n


def memory_table(n: int = 4000) -> None:
    print()
    print("| structure | dim | estimate (bytes) | tracemalloc (bytes) |")
    print("| --- | --- | --- | --- |")
    for dim in (8, 128, 384):
        l0 = _offers_bytes(("L0",), dim, n)
        l1 = _offers_bytes(("L0", "L1"), dim, n) - l0
        l2 = _offers_bytes(("L0", "L2"), dim, n) - l0
        print(f"| L1 link | {dim} | {L1_LINK_BYTES} | {l1:.0f} |")
        print(f"| L2 representative | {dim} | {l2_rep_bytes(dim)} | {l2:.0f} |")
    pc = PayloadCache(1 << 34)
    rows = {i: (f"id-{i:06d}", f'{{"n": {i}}}') for i in range(n)}  # made before: not counted

    def fill() -> None:
        for i in range(n):
            pc.get("acme/docs", i, lambda _k, label: rows[label])

    real = _traced(fill) / n
    est = pc.stats()["bytes"] / n
    strings = sum(len(a) + len(b) + 98 for a, b in rows.values()) / n  # + 2 str headers
    print(
        f"| L3 row (ROW_BYTES {ROW_BYTES} + id + meta) | - | {est:.0f} | "
        f"{real + strings:.0f} (with its two strings) |"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()
    base = _baseline()
    sides = {"base": base.CacheController, "new": CacheController}
    # per round and side: p50 and p99 of each call; a shared machine's noise moves whole
    # rounds, so the report is the median over rounds (and the per-round ratio's median)
    per: dict[str, dict[str, list[tuple[float, float]]]] = {s: {} for s in sides}
    counts: dict[str, int] = {}
    for r in range(args.rounds):
        queries = _unit(np.random.default_rng(r), args.queries)
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for side in order:
            for name, xs in run(sides[side], queries, args.k).items():
                if xs:
                    per[side].setdefault(name, []).append(_pct(xs))
                    counts[name] = counts.get(name, 0) + len(xs) * (side == "new")
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"`uptime`: {up}")
    print()
    print(
        f"{args.rounds} rounds of {args.queries} queries, dim {DIM}, k {args.k}; "
        "medians over rounds (us); ratio: median of the per-round new/base ratios"
    )
    print()
    print("| call | base p50 | new p50 | ratio p50 | base p99 | new p99 | ratio p99 | n |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in ("L0", "L1", "L2", "miss", "offer"):
        b, n = per["base"].get(name, []), per["new"].get(name, [])
        if not b or not n:
            continue
        m = min(len(b), len(n))
        r50 = float(np.median([n[i][0] / b[i][0] for i in range(m)]))
        r99 = float(np.median([n[i][1] / b[i][1] for i in range(m)]))
        label = "offer (after a miss)" if name == "offer" else f"lookup {name}"
        print(
            f"| {label} | {np.median([x[0] for x in b]):.1f} | "
            f"{np.median([x[0] for x in n]):.1f} | {r50:.2f} | "
            f"{np.median([x[1] for x in b]):.1f} | {np.median([x[1] for x in n]):.1f} | "
            f"{r99:.2f} | {counts[name]} |"
        )
    memory_table()


if __name__ == "__main__":
    main()
