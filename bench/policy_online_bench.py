"""Online cache-policy loop benchmark (issue 4): decision latency, query-log overhead on
search, learner throughput; one run, baselines beside each figure.

Run from the repository root::

    .venv/bin/python bench/policy_online_bench.py            # ~1-2 minutes on 2 cores
    .venv/bin/python bench/policy_online_bench.py --quick    # smoke run
    .venv/bin/python bench/policy_online_bench.py --json out.json

What is measured:

* **decision latency**: ``PolicyHolder.decide(entry)`` (what ``ResultCache.put`` calls on a
  miss; the context update included) per call, ``--decisions`` calls over entries whose
  keys follow a Zipf(1) law over ``--keys`` distinct queries: with no version (the rules),
  and with a learned table applied (a PolicyUpdate exported by the VW learner trained on a
  ``zipf`` workload trace: every bucket it saw). ``AdmitAll`` is the floor (a constant).
  p50/p99 in microseconds from ``time.perf_counter_ns`` around each call (wall time:
  preemption on a loaded machine included), and the thread's CPU time per call
  (``time.thread_time_ns`` over the whole loop, timer calls included: load-independent).
* **query-log overhead**: a query node on an embedded log (``--n`` vectors of ``--dim``,
  Flat index, L0 cache and the policy loop on) serves ``--searches`` single searches
  (Zipf over ``--pool`` query vectors: hits and misses), after a warm-up of half as many
  (logged, not measured), in alternating blocks of 500 with
  the query log on (the node's ``SearchObserver``) and off (the same observer without its
  emitter: policy, TTL and context work unchanged, only the logging differs). Per-search
  latency p50/p99 and the on/off ratios; the emitter's dropped count (0 expected).
* **learner throughput**: :class:`OnlineLearner` reading the SearchEvents the run above
  appended (decode, join, VW training, publish): events per second of busy time; beside
  it the offline replay (``replay_learned``) of the same number of requests of a
  generated trace, which trains the same VW model without the log or Avro. Per event and
  per decision (a miss with its logged action): the VW training is per decision.
* **a learner beside searches** (``--beside``, after the above, same node): blocks of
  ``--beside-block`` searches alternate between no learner and a learner thread at each
  of ``--beside-shares`` (``cpu_share`` 1: unthrottled; 0.25: ``streamvec up``'s
  default). Each learner block starts a learner with a fresh group (it reads the query
  log from the start: a backlog, as after a restart or a burst) and a small budget
  (``--learner-budget``: its shadow caches evict, the costly case), waits ``--ramp-s``
  and then times the block's searches. Per mode: search p50/p99/mean and their ratio to
  no learner; the events the learner read per second of the block (how far behind it
  falls).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from streams.cache import CachedResult, query_key
from streams.cache.policy import AdmitAll, GuardConfig, PolicyHolder
from streams.cache.querylog import SearchObserver
from streams.index.model import IndexConfig, Metric, VectorUpsert
from streams.log.embedded import EmbeddedLog
from streams.policy.learned import replay_learned
from streams.policy.learner import OnlineLearner, policy_record
from streams.policy.trace import trace_footprint
from streams.policy.workloads import generate
from streams.schemas.codec import AvroCodec
from streams.schemas.log_registry import LogRegistry
from streams.service.api import SearchRequest
from streams.service.query_node import QueryNode
from streams.topics import Topics


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def entries(n_keys: int, dim: int = 16) -> list[CachedResult]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n_keys):
        q = rng.standard_normal(dim).astype(np.float32)
        k = 10
        out.append(
            CachedResult(
                query_key("acme/docs", Metric.COSINE, q, k, None),
                "acme/docs",
                Metric.COSINE,
                q,
                k,
                None,
                tuple(range(k)),
                tuple(f"id{j}" for j in range(k)),
                tuple(1.0 - j / 100 for j in range(k)),
                (None,) * k,
                compute_ms=float(rng.uniform(0.5, 5.0)),
                created_s=time.monotonic(),
            )
        )
    return out


def zipf_order(n_keys: int, n: int, seed: int = 1) -> np.ndarray:
    ranks = np.arange(1, n_keys + 1, dtype=float)
    p = (1 / ranks) / (1 / ranks).sum()
    return np.random.default_rng(seed).choice(n_keys, size=n, p=p)


def time_decisions(policy: Any, es: list[CachedResult], order: np.ndarray) -> list[float]:
    out = []
    for i in order.tolist():
        e = es[i]
        t0 = time.perf_counter_ns()
        policy.decide(e)
        out.append((time.perf_counter_ns() - t0) / 1000)
    return out


def bench_decisions(args: argparse.Namespace) -> dict[str, Any]:
    es = entries(args.keys)
    order = zipf_order(args.keys, args.decisions)
    trace = generate("zipf", args.train_requests, seed=0)
    run = replay_learned(trace, trace_footprint(trace) // 20)
    assert run.table is not None
    record = policy_record(run.table, "acme", "docs", version=1, parent_version=None)
    guard = GuardConfig(decision_budget_us=1e9)  # measure, never fall back
    rules = PolicyHolder(64 << 20, guard=guard)
    table = PolicyHolder(64 << 20, guard=guard)
    table.apply(record)
    out: dict[str, Any] = {"table_buckets": len(record["table"])}
    for name, policy in (("admit_all", AdmitAll()), ("rules", rules), ("table", table)):
        time_decisions(policy, es, order[: len(order) // 10])  # warm-up
        cpu0 = time.thread_time_ns()
        lat = time_decisions(policy, es, order)
        cpu_us = (time.thread_time_ns() - cpu0) / 1000 / len(order)
        out[name] = {
            "p50_us": pct(lat, 50),
            "p99_us": pct(lat, 99),
            "mean_us": float(np.mean(lat)),
            "cpu_us_per_call": cpu_us,
        }
    assert table.status()["learned"] > 0
    return out


def bench_search(args: argparse.Namespace, root: Path) -> tuple[dict[str, Any], Any]:
    topics = Topics()
    log = EmbeddedLog(root / "log", durability="none")
    log.ensure_topics(topics.specs())
    codec = AvroCodec(LogRegistry(log, topics))
    node = QueryNode(
        log, topics, codec, root / "node", head_capacity=max(args.n, 1000), policy_loop=True
    ).start()
    assert node.policy_loop is not None
    node.policy_loop.holder.guard = GuardConfig(decision_budget_us=1e9)
    svc = node.service
    svc.create_index(IndexConfig("acme", "docs", args.dim, recipe="Flat"))
    rng = np.random.default_rng(0)
    for i in range(args.n):
        svc.upsert(
            VectorUpsert("acme", "docs", f"v{i}", rng.standard_normal(args.dim).astype(np.float32))
        )
    assert node.catch_up(120)
    pool = [rng.standard_normal(args.dim).astype(np.float32) for _ in range(args.pool)]
    order = zipf_order(args.pool, args.searches, seed=3).tolist()
    on = svc.search_observer
    assert on is not None
    off = SearchObserver(None, on.holder, None)
    for i in order[: len(order) // 2]:  # warm-up (logged): the cache fills
        svc.search(SearchRequest("acme", "docs", pool[i], 10))
    lat: dict[str, list[float]] = {"on": [], "off": []}
    hits = {"on": 0, "off": 0}
    for b in range(0, len(order), 500):
        mode = "on" if (b // 500) % 2 == 0 else "off"
        svc.search_observer = on if mode == "on" else off
        for i in order[b : b + 500]:
            t0 = time.perf_counter_ns()
            r = svc.search(SearchRequest("acme", "docs", pool[i], 10))
            lat[mode].append((time.perf_counter_ns() - t0) / 1000)
            hits[mode] += bool(r.debug["cache_hit"])
    svc.search_observer = on
    emitter = node.policy_loop.emitter
    assert emitter.flush(60)
    out: dict[str, Any] = {}
    for mode in ("on", "off"):
        xs = lat[mode]
        out[mode] = {
            "searches": len(xs),
            "hit_rate": hits[mode] / len(xs),
            "p50_us": pct(xs, 50),
            "p99_us": pct(xs, 99),
            "mean_us": float(np.mean(xs)),
        }
    out["ratio_p50"] = out["on"]["p50_us"] / out["off"]["p50_us"]
    out["ratio_p99"] = out["on"]["p99_us"] / out["off"]["p99_us"]
    out["ratio_mean"] = out["on"]["mean_us"] / out["off"]["mean_us"]
    out["query_log"] = emitter.stats()
    return out, (node, log, topics, codec)


def bench_learner(args: argparse.Namespace, handles: Any) -> dict[str, Any]:
    node, log, topics, codec = handles
    learner = OnlineLearner(log, topics, codec, budget_bytes=64 << 20, update_every=10**9)
    t0 = time.perf_counter()
    published = learner.run_to_end()
    wall = time.perf_counter() - t0
    stats = learner.stats()
    learner.close()
    n = stats["events"]
    trace = generate("zipf", n, seed=0)
    t1 = time.perf_counter()
    sim = replay_learned(trace, trace_footprint(trace) // 20).result
    offline = time.perf_counter() - t1
    offline_decisions = sim.admitted + sim.bypassed
    node.close()
    log.close()
    return {
        "events": n,
        "decisions": stats["decisions"],
        "published": len(published),
        "wall_s": wall,
        "events_per_s": n / wall,
        "decisions_per_s": stats["decisions"] / wall,
        "offline_replay_requests_per_s": n / offline,
        "offline_decisions_per_s": offline_decisions / offline,
        "ratio_online_offline_decisions": (stats["decisions"] / wall)
        / (offline_decisions / offline),
    }


def bench_beside(args: argparse.Namespace, handles: Any) -> dict[str, Any]:
    node, log, topics, codec = handles
    svc = node.service
    rng = np.random.default_rng(7)
    pool = [rng.standard_normal(args.dim).astype(np.float32) for _ in range(args.pool)]
    order = zipf_order(args.pool, args.beside, seed=11).tolist()
    modes = ("none", *(f"share {float(x)}" for x in args.beside_shares.split(",")))
    lat: dict[str, list[float]] = {m: [] for m in modes}
    learned: dict[str, list[float]] = {m: [] for m in modes}
    block = args.beside_block
    for b in range(0, len(order), block):
        mode = modes[(b // block) % len(modes)]
        learner = None
        if mode != "none":
            learner = OnlineLearner(log, topics, codec, budget_bytes=args.learner_budget,
                                    group=f"bench-{b}", update_every=10**9)
            learner.start(cpu_share=float(mode.split()[1]))  # the node's step size
            time.sleep(args.ramp_s)
        e0, t_block = (learner.events if learner else 0), time.perf_counter()
        for i in order[b : b + block]:
            t0 = time.perf_counter_ns()
            svc.search(SearchRequest("acme", "docs", pool[i], 10))
            lat[mode].append((time.perf_counter_ns() - t0) / 1000)
        if learner is not None:
            learned[mode].append((learner.events - e0) / (time.perf_counter() - t_block))
            learner.close()
            if learner.error is not None:
                raise learner.error
    out: dict[str, Any] = {}
    for mode in modes:
        xs = lat[mode]
        out[mode] = {
            "searches": len(xs),
            "p50_us": pct(xs, 50),
            "p99_us": pct(xs, 99),
            "mean_us": float(np.mean(xs)),
            "learner_events_per_s": float(np.median(learned[mode])) if learned[mode] else 0.0,
        }
    for mode in modes[1:]:
        for q in ("p50_us", "p99_us", "mean_us"):
            out[mode][f"ratio_{q[:-3]}"] = out[mode][q] / out["none"][q]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--keys", type=int, default=20_000)
    ap.add_argument("--decisions", type=int, default=100_000)
    ap.add_argument("--train-requests", type=int, default=50_000)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--pool", type=int, default=3_000)
    ap.add_argument("--searches", type=int, default=20_000)
    ap.add_argument("--beside", type=int, default=0,
                    help="searches of the learner-beside-searches part (0: skip it)")
    ap.add_argument("--beside-block", type=int, default=2_000)
    ap.add_argument("--beside-shares", default="1.0,0.5,0.25",
                    help="the learner's cpu_share in each learner mode")
    ap.add_argument("--learner-budget", type=int, default=256 << 10)
    ap.add_argument("--ramp-s", type=float, default=0.3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.quick:
        args.keys, args.decisions, args.train_requests = 2_000, 10_000, 10_000
        args.n, args.pool, args.searches = 2_000, 500, 4_000
    machine = {"nproc": os.cpu_count(), "loadavg_at_start": os.getloadavg()}
    report: dict[str, Any] = {"args": vars(args) | {"json": str(args.json)}, "machine": machine}
    report["decisions"] = bench_decisions(args)
    print(json.dumps({"decisions": report["decisions"]}, indent=2), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        report["search"], handles = bench_search(args, Path(tmp))
        print(json.dumps({"search": report["search"]}, indent=2), flush=True)
        if args.beside:
            report["beside"] = bench_beside(args, handles)
            print(json.dumps({"beside": report["beside"]}, indent=2), flush=True)
        report["learner"] = bench_learner(args, handles)
    machine["loadavg_at_end"] = os.getloadavg()
    print(json.dumps({"learner": report["learner"], "machine": machine}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
