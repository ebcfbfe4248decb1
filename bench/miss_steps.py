"""Where a cache miss's time goes, step by step, in process (helper E, session 3).

Each step is timed with ``perf_counter_ns`` right after a 10 MB Head scan of the same
index (as the search runs it, CPU caches flushed), over the cache bench's node
(``bench.cache_bench.build``): L2 ``nearest`` as a full scan and with the prefilter
(``within``), the L1 key, the L0 key and probe, the whole lookup, the entry, and the offer
(eager, and lazy for the L0-only index: the built entry parked, and helper I's
``park_fresh``, which parks the fresh result and builds nothing). p50/p90 in microseconds.

The node runs the policy loop (as ``streamvec up``; ``--no-policy-loop``: without it), so
the policy holder decides: the L0-only index's lazy misses are timed three ways, rotating
(``park_fresh``: decided on the search path; ``park_undecided`` and the debug's
``PendingDecision``: session 6's path, the decision left to the query log's thread, whose
``settle`` is timed too, on this thread after a scan: what the log's thread pays;
``defer``: session 7's default, nothing parked on the search path, the log's thread
parking and deciding, timed the same way).

Run: ``OPENBLAS_NUM_THREADS=1 nice -n 10 .venv/bin/python -m bench.miss_steps [--queries 1000]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.cache_bench import TENANT, build, unit_rows
from streams.cache.controller import PendingDecision
from streams.cache.entry import trusted_result
from streams.cache.keys import query_key
from streams.cache.semantic import SemanticIndex
from streams.cache.tolerant import tolerant_key
from streams.service.api import SearchRequest
from streams.service.vector_service import _columns

K = 10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=2000, help="L2 representatives to grow first")
    ap.add_argument("--policy-loop", action=argparse.BooleanOptionalAction, default=True)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        log, node, _ = build(Path(tmp), 20_000, 128, 7, a.policy_loop)
        try:
            svc = node.service
            ctl = svc.cache_layers
            assert ctl is not None
            rng = np.random.default_rng(3)
            for v in unit_rows(rng, a.reps, 128):
                svc.search(SearchRequest(TENANT, "on", v, K))
            t: dict[str, list[int]] = {}
            pc = time.perf_counter_ns

            def step(name: str, t0: int) -> None:
                t.setdefault(name, []).append(pc() - t0)

            for index in ("on", "l0"):
                cfg = svc.indexer.configs[f"{TENANT}/{index}"]
                vi = svc.indexer.indexes[cfg.key]
                group = SemanticIndex.group_of("vector", cfg.key, None, K)
                for i, v in enumerate(unit_rows(rng, a.queries, 128)):
                    if index == "on":
                        vi.search(v, K, None)
                        t0 = pc()
                        ctl._l2.nearest(group, v, cfg.metric)
                        step("L2 nearest, full scan", t0)
                        vi.search(v, K, None)
                        t0 = pc()
                        ctl._l2.nearest(group, v, cfg.metric, within=ctl.l2_threshold)
                        step("L2 nearest, prefilter", t0)
                        vi.search(v, K, None)
                        t0 = pc()
                        tolerant_key(cfg.key, cfg.metric, v, K, None, ctl.simhash_bits)
                        step("L1 key", t0)
                    vi.search(v, K, None)
                    t0 = pc()
                    query_key(cfg.key, cfg.metric, v, K, None)
                    step(f"{index}: L0 key", t0)
                    vi.search(v, K, None)
                    # l0: eager, lazy, lazy raw (decided here), lazy undecided, deferred
                    mode = i % 5 if index == "l0" else 0
                    ctl.lazy_offers = mode > 0
                    t0 = pc()
                    look = ctl.lookup(cfg, v, K, None)
                    step(f"{index}: lookup (miss)", t0)
                    fresh = svc._fresh(cfg, v, K, None, record=True)
                    applied = svc._applied_tokens()
                    vi.search(v, K, None)
                    if mode == 4:  # session 7: deferred whole, the log's thread parks too
                        hits = fresh.hits
                        t0 = pc()
                        pending = ctl.defer(
                            look, cfg.key, cfg.metric, v, K, None, fresh.labels,
                            tuple(hits), applied, 1.0, (), fresh.chars,
                        )  # fmt: skip
                        step(f"{index}: defer + tuple(hits) (the default since session 7)", t0)
                        assert pending is not None
                        vi.search(v, K, None)
                        t0 = pc()
                        pending.settle()
                        step(f"{index}: take_deferred + settle (the query log's thread)", t0)
                        continue
                    if mode == 3:  # session 6: park undecided, the log's thread decides
                        t0 = pc()
                        raw = ctl.fresh_raw(
                            look, cfg.key, cfg.metric, v, K, None, fresh.labels,
                            fresh.hits, applied, 1.0, (), fresh.chars,
                        )  # fmt: skip
                        assert ctl.park_undecided(look, raw)
                        step(f"{index}: fresh_raw + park_undecided", t0)
                        vi.search(v, K, None)
                        t0 = pc()
                        PendingDecision.of(ctl, raw)
                        step(f"{index}: PendingDecision.of (the debug's decision)", t0)
                        vi.search(v, K, None)
                        t0 = pc()
                        ctl.settle(raw)
                        step(f"{index}: settle (on the query log's thread)", t0)
                        continue
                    if mode == 2:  # helper I: park the fresh result, build nothing
                        t0 = pc()
                        ctl.park_fresh(
                            look,
                            ctl.fresh_raw(
                                look, cfg.key, cfg.metric, v, K, None, fresh.labels,
                                fresh.hits, applied, 1.0, (), fresh.chars,
                            ),
                        )  # fmt: skip
                        step(f"{index}: fresh_raw + park_fresh (no entry built; decided here)", t0)
                        continue
                    t0 = pc()
                    ids, scores, metas = _columns(fresh.hits)
                    e = trusted_result(
                        look.qkey, cfg.key, cfg.metric, v, K, None, fresh.labels,
                        ids, scores, metas, applied, 1.0, time.monotonic(),
                    )  # fmt: skip
                    step(f"{index}: entry and columns", t0)
                    t0 = pc()
                    ctl.offer(look, e)
                    step(f"{index}: offer" + (", lazy" if ctl.lazy_offers else ""), t0)
            ctl.lazy_offers = False
            print(f"L2 representatives: {len(ctl._l2)}")
            for name, xs in t.items():
                p50, p90 = np.percentile(xs, [50, 90]) / 1e3
                print(f"| {name} | {p50:.1f} | {p90:.1f} |")
        finally:
            node.close()
            log.close()


if __name__ == "__main__":
    main()
