"""``cache_eviction: learned`` on the real L0 cache: ``ResultCache`` with LRU, GDSF and the
learned table at equal budget, one run, side by side (issue 4, item 3).

Run from the repository root::

    .venv/bin/python bench/learned_eviction_bench.py            # ~1-2 minutes on 2 cores
    .venv/bin/python bench/learned_eviction_bench.py --quick    # smoke run
    .venv/bin/python bench/learned_eviction_bench.py --json out.json

What is measured:

* **hit ratio and cost saved**, per workload of ``streams.policy.workloads`` (``--n``
  requests, seed ``--seed``) and budget share of its footprint: every request is a
  ``ResultCache.hit``; a miss ``put``\\ s (admit-all) an entry of the request's size and
  cost (``bench/eviction_bench.py``'s ``entry_for``). The table is trained as the policy
  learner would: a ``DensityLearner`` reads the first ``--train`` share of the trace
  (without filter kinds: the query log does not carry them) and the idle ages of the
  entries the cache evicted meanwhile (the cache runs GDSF until then: no table yet);
  at the split it is installed (``learned``), and retrained on what the log has shown
  since every ``--update-every`` requests after it, as the learner republishes.
  ``learned-decayed``: the decayed-count table (tau 300 s) installed at the same point.
  Every mode replays the whole trace; hit ratio and cost saved are counted on the
  requests after the split only.
* **hit path**: ``ResultCache.hit`` of a cache of ``--entries`` entries with GDSF and with
  learned (table installed), Zipf(1.2) keys, each call timed with ``perf_counter_ns``, in
  alternating blocks of 20k calls; p50/p99 in microseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eviction_bench import entry_for

from streams.cache import CachedResult, ResultCache
from streams.cache.eviction import Slot
from streams.cache.learned_eviction import LearnedEviction, StaticTables
from streams.policy.eviction import DensityLearner, EvictionConfig, EvictionTable
from streams.policy.trace import Request, trace_footprint
from streams.policy.workloads import generate

MODES = ("lru", "gdsf", "learned", "learned-decayed")


def run(
    mode: str, requests: Sequence[Request], budget: int, split: int, every: int
) -> dict[str, Any]:
    now = [requests[0].time]
    tables = StaticTables()
    learned = LearnedEviction(tables, clock=lambda: now[0]) if mode.startswith("learned") else None
    cache = ResultCache(budget, eviction=learned or mode)  # type: ignore[arg-type]
    learner = DensityLearner(EvictionConfig(), 300.0)
    last: dict[str, float] = {}
    evictions: list[tuple[int, str, float]] = []
    names: dict[object, str] = {}

    def evicted(slot: Slot, reason: str) -> None:
        if reason == "evicted" and len(evictions) < 1_000_000:
            k = names[slot.key]
            evictions.append((0, k, now[0] - last.get(k, now[0])))

    cache.add_removal_listener(evicted)
    entries: dict[str, CachedResult] = {}
    hits, saved, total = 0, 0.0, 0.0
    plain = [replace(r, ctx={}) for r in requests]  # the query log has no filter kinds
    read = 0
    t0 = time.perf_counter()
    for i, req in enumerate(requests):
        now[0] = req.time
        if learned is not None and i >= split and (i - split) % every == 0:
            if mode == "learned":  # what the learner has read so far, as it would publish
                learner.observe(plain, evictions, read, i)
                evictions.clear()
                read = i
                tables.install("*", learner.export(requests[i - 1].time))
            else:
                tables.install("*", EvictionTable.decayed(300.0))
        e = entries.get(req.key)
        if e is None:
            e = entries[req.key] = entry_for(len(entries), req.size, req.cost)
            names[e.key] = req.key
        found = cache.hit(e.key)
        last[req.key] = req.time
        if i >= split:
            total += req.cost
            if found is not None:
                hits += 1
                saved += req.cost
        if found is None:
            cache.put(e, 0)
    wall = time.perf_counter() - t0
    s = cache.stats()
    assert s.bytes <= budget
    n = len(requests) - split
    out = {
        "hit_ratio": hits / n,
        "saved_share": saved / total if total else 0.0,
        "evictions": s.evictions,
        "us_per_request": wall / len(requests) * 1e6,
    }
    if learned is not None:
        out["victims"] = dict(learned.counts)
    return out


def quality(
    workloads: list[str], n: int, seed: int, shares: list[float], train: float, every: int
) -> list[dict[str, Any]]:
    rows = []
    for name in workloads:
        requests = generate(name, n, seed)
        footprint = trace_footprint(requests)
        split = int(len(requests) * train)
        for share in shares:
            budget = int(footprint * share)
            row: dict[str, Any] = {"workload": name, "budget_share": share, "split": split}
            for mode in MODES:
                row[mode] = run(mode, requests, budget, split, every)
            base = row["gdsf"]
            for mode in MODES:
                r = row[mode]
                r["hit_vs_gdsf"] = r["hit_ratio"] / base["hit_ratio"] if base["hit_ratio"] else 0
                r["saved_vs_gdsf"] = (
                    r["saved_share"] / base["saved_share"] if base["saved_share"] else 0
                )
            rows.append(row)
            print(
                f"{name:7s} budget {share:.2f}: "
                + "  ".join(
                    f"{m} {row[m]['hit_ratio']:.3f}/{row[m]['saved_share']:.3f}" for m in MODES
                ),
                flush=True,
            )
    return rows


def hit_path(entries: int, calls: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    caches: dict[str, tuple[ResultCache, list[CachedResult]]] = {}
    for mode in ("gdsf", "learned"):
        tables = StaticTables()
        tables.install("*", EvictionTable.decayed(300.0))
        ev = LearnedEviction(tables) if mode == "learned" else "gdsf"
        cache = ResultCache(1 << 40, eviction=ev)  # type: ignore[arg-type]
        es = [entry_for(i, 600, 1.0) for i in range(entries)]
        for e in es:
            cache.put(e, 0)
        caches[mode] = (cache, es)
    ranks = rng.zipf(1.2, size=calls)
    picks = np.minimum(ranks - 1, entries - 1)
    times: dict[str, list[int]] = {m: [] for m in caches}
    block = 20_000
    for start in range(0, calls, block):
        for mode, (cache, es) in caches.items():
            out = times[mode]
            hit = cache.hit
            for j in picks[start : start + block]:
                key = es[int(j)].key
                t = time.perf_counter_ns()
                hit(key)
                out.append(time.perf_counter_ns() - t)
    res: dict[str, Any] = {}
    for mode, ts in times.items():
        a = np.array(ts) / 1000
        res[mode] = {"p50_us": float(np.percentile(a, 50)), "p99_us": float(np.percentile(a, 99))}
    res["learned_vs_gdsf_p50"] = res["learned"]["p50_us"] / res["gdsf"]["p50_us"]
    res["learned_vs_gdsf_p99"] = res["learned"]["p99_us"] / res["gdsf"]["p99_us"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", default="zipf,latest")
    ap.add_argument("--n", type=int, default=60_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budgets", default="0.05,0.2")
    ap.add_argument("--train", type=float, default=0.3)
    ap.add_argument("--update-every", type=int, default=10_000)
    ap.add_argument("--entries", type=int, default=20_000)
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.quick:
        args.n, args.entries, args.calls = 8_000, 2_000, 40_000
    load = os.getloadavg()
    shares = [float(s) for s in args.budgets.split(",")]
    rows = quality(
        args.workloads.split(","), args.n, args.seed, shares, args.train, args.update_every
    )
    hp = hit_path(args.entries, args.calls, args.seed)
    print(
        f"hit path ({args.entries} entries): "
        + "  ".join(
            f"{m} p50 {hp[m]['p50_us']:.2f} us p99 {hp[m]['p99_us']:.2f} us"
            for m in ("gdsf", "learned")
        )
        + f"  learned/gdsf p50 x{hp['learned_vs_gdsf_p50']:.2f}"
        + f" p99 x{hp['learned_vs_gdsf_p99']:.2f}"
    )
    print(f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"args": vars(args), "load": load, "quality": rows, "hit_path": hp}, indent=1
            )
        )


if __name__ == "__main__":
    main()
