"""Cost-aware eviction of the real L0 cache (issue 4): ``ResultCache`` with GDSF against
the same cache with LRU at equal budget, one run, side by side.

Run from the repository root::

    .venv/bin/python bench/eviction_bench.py              # ~1 minute on 2 cores
    .venv/bin/python bench/eviction_bench.py --quick      # smoke run
    .venv/bin/python bench/eviction_bench.py --json out.json

What is measured:

* **hit ratio and cost saved**: each request of a ``streams.policy.workloads`` trace
  (``--workloads``, ``--n`` requests, seed ``--seed``) is a lookup of the real
  ``ResultCache`` (``hit``); a miss offers a ``CachedResult`` whose ``nbytes`` is the
  request's size and whose ``compute_ms`` is its proxy cost (``put``, admit-all). Budgets
  are shares (``--budgets``) of the trace's footprint (every distinct key at once). Cost
  saved = proxy cost of the hits / proxy cost of every request. ``rules+lru`` and
  ``rules+gdsf``: the same with the node's admission policy in front (``PolicyHolder``
  without a learned version, i.e. the rules: admit or bypass, idle TTL expiry as on the
  node); ``rules+gdsf-prior5`` adds the decision's forecast (priority x 5 s) to GDSF's
  value (``GDSFScorer(prior_s=5)``; the default is ``prior_s=0``). Beside them, the
  simulator's ``LRUCache``/``GDSFCache`` on the same trace (the reference: the real cache
  must agree with them closely; entry sizes differ by a few bytes of rounding).
* **hit path**: ``ResultCache.hit`` on a cache of ``--entries`` entries, Zipf(1.2) keys,
  per call with ``time.perf_counter_ns`` (the timer's own ~0.1 us included), in
  alternating blocks of 20k calls per mode; p50/p99 in microseconds.
* **miss path under pressure**: ``ResultCache.put`` of new entries into a full cache (one
  eviction each), p50/p99 per call.
* **doorkeeper and lazy offers** (``--doorkeeper 65536,4096``; ``--doorkeeper-only`` skips
  the rest): GDSF, admit-all and the rules, each as is, behind a ``Doorkeeper`` of each
  window (first-seen and seen-before misses counted apart) and with lazy offers (4,096
  parked entries: a miss parks, the key's next request stores and is served it).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from streams.cache import CachedResult, ResultCache, query_key
from streams.cache.doorkeeper import Doorkeeper
from streams.cache.eviction import GDSFScorer
from streams.cache.policy import PolicyHolder
from streams.index.model import Metric
from streams.policy.policies import GDSFCache, LRUCache
from streams.policy.simulator import replay
from streams.policy.trace import Request, trace_footprint
from streams.policy.workloads import generate

MODES = ("lru", "gdsf")
RULES = ("rules+lru", "rules+gdsf", "rules+gdsf-prior5")  # the node's admission rules in front


def entry_for(i: int, size: int, cost: float) -> CachedResult:
    """A one-hit result of ``nbytes`` close to ``size`` (its meta pads it) costing ``cost``."""
    q = np.array([float(i), 1.0, 0.0, 0.0], dtype=np.float32)
    base = CachedResult(
        query_key("bench/i", Metric.COSINE, q, 1, None),
        "bench/i",
        Metric.COSINE,
        q,
        1,
        None,
        (i,),
        ("x",),
        (1.0,),
        (None,),
        compute_ms=cost,
    ).nbytes
    meta = "m" * max(0, size - base)
    return CachedResult(
        query_key("bench/i", Metric.COSINE, q, 1, None),
        "bench/i",
        Metric.COSINE,
        q,
        1,
        None,
        (i,),
        ("x",),
        (1.0,),
        (meta,),
        compute_ms=cost,
    )


def run_real(
    mode: str | GDSFScorer,
    requests: Sequence[Request],
    budget: int,
    *,
    rules: bool = False,
    doorkeeper: int | None = None,
    lazy: int | None = None,
) -> dict[str, Any]:
    """``rules``: the node's admission policy decides each miss (``PolicyHolder`` with no
    version: the rules, whose decisions carry the priority GDSF adds) and idle TTLs expire
    entries as on the node (``SearchObserver.expired``); else admit-all, no TTL.
    ``doorkeeper``: a :class:`Doorkeeper` of that many keys in front of the puts (a miss
    offers its entry only if its key missed within the window before, as
    ``cache_admit_after 2`` does on the node); its first-seen and seen-before misses are
    counted apart. ``lazy``: lazy offers with that many parked entries (a miss takes the
    decision and parks an admitted entry; the key's next request stores it, as
    ``CacheController`` does with ``lazy_offers``, and is served it)."""
    dk = None if doorkeeper is None else Doorkeeper(doorkeeper)
    parked: OrderedDict[Any, Any] = OrderedDict()
    promoted = 0
    offered = 0
    now = [requests[0].time if requests else 0.0]
    holder = PolicyHolder(budget, clock=lambda: now[0]) if rules else None
    cache = ResultCache(budget, eviction=mode, policy=holder)  # type: ignore[arg-type]
    entries: dict[str, CachedResult] = {}
    hits, saved, total = 0, 0.0, 0.0
    t0 = time.perf_counter()
    for req in requests:
        now[0] = req.time
        total += req.cost
        e = entries.get(req.key)
        if e is None:
            e = entries[req.key] = entry_for(len(entries), req.size, req.cost)
        if lazy is not None and e.key in parked:  # the repeat stores the parked entry
            promoted += cache.put(e, 0, decision=parked.pop(e.key)).stored
        found = cache.hit(e.key)
        if found is not None and holder is not None and holder.expired(found[0]):
            cache.expire(found[0])
            found = None
        if found is not None:
            hits += 1
            saved += req.cost
            if holder is not None:
                holder.on_hit(found[0])
        elif lazy is not None:
            decision = cache.policy.decide(e)
            offered += 1
            if decision.action == "admit":
                parked[e.key] = decision
                if len(parked) > lazy:
                    parked.popitem(last=False)
            else:
                cache.put(e, 0, decision=decision)
        elif dk is None or dk.admit(e.key):
            offered += 1
            cache.put(e, 0)
    wall = time.perf_counter() - t0
    s = cache.stats()
    assert s.bytes <= budget
    out = {
        "hit_ratio": hits / len(requests),
        "saved_share": saved / total if total else 0.0,
        "evictions": s.evictions,
        "us_per_request": wall / len(requests) * 1e6,
        "offered_share": offered / len(requests),  # misses that built and offered an entry
    }
    if lazy is not None:
        out["stored_share"] = promoted / len(requests)  # parked entries stored on a repeat
    if dk is not None:
        out["first_seen_misses"] = dk.first_seen
        out["seen_before_misses"] = dk.seen_before
    return out


def doorkeeper_quality(
    workloads: list[str], n: int, seed: int, shares: list[float], windows: list[int]
) -> list[dict[str, Any]]:
    """The doorkeeper's price in hit ratio and cost saved (GDSF, admit-all and the rules in
    front), per workload and budget, beside the same cache without one, one run."""
    rows = []
    for name in workloads:
        requests = generate(name, n, seed)
        distinct = len({r.key for r in requests})
        footprint = trace_footprint(requests)
        for share in shares:
            budget = int(footprint * share)
            row: dict[str, Any] = {
                "workload": name,
                "budget_share": share,
                "distinct_keys": distinct,
                "requests": len(requests),
            }
            for rules in (False, True):
                label = "rules+gdsf" if rules else "gdsf"
                row[label] = run_real("gdsf", requests, budget, rules=rules)
                for w in windows:
                    row[f"{label}+dk{w}"] = run_real(
                        "gdsf", requests, budget, rules=rules, doorkeeper=w
                    )
                row[f"{label}+lazy"] = run_real("gdsf", requests, budget, rules=rules, lazy=4096)
            rows.append(row)
            cells = []
            for label in ("gdsf", "rules+gdsf"):
                base = row[label]
                cells.append(
                    f"{label} {base['hit_ratio']:.3f}/{base['saved_share']:.3f} "
                    f"(offers {base['offered_share']:.3f})"
                )
                for w in windows:
                    x = row[f"{label}+dk{w}"]
                    cells.append(
                        f"+dk{w} {x['hit_ratio']:.3f}/{x['saved_share']:.3f} "
                        f"(offers {x['offered_share']:.3f}, first-seen "
                        f"{x['first_seen_misses']}, seen-before {x['seen_before_misses']})"
                    )
                x = row[f"{label}+lazy"]
                cells.append(
                    f"+lazy {x['hit_ratio']:.3f}/{x['saved_share']:.3f} "
                    f"(stored {x['stored_share']:.3f})"
                )
            print(f"doorkeeper {name:8s} {share:>4.0%}: " + "; ".join(cells), flush=True)
    return rows


def run_sim(mode: str, requests: Sequence[Request], budget: int) -> dict[str, Any]:
    sim = LRUCache(budget) if mode == "lru" else GDSFCache(budget)
    r = replay(sim, requests)
    return {"hit_ratio": r.hit_ratio, "saved_share": r.saved_cost / r.total_cost}


def quality(workloads: list[str], n: int, seed: int, shares: list[float]) -> list[dict[str, Any]]:
    rows = []
    for name in workloads:
        requests = generate(name, n, seed)
        footprint = trace_footprint(requests)
        for share in shares:
            budget = int(footprint * share)
            row: dict[str, Any] = {"workload": name, "budget_share": share, "budget": budget}
            for mode in MODES:
                row[mode] = run_real(mode, requests, budget)
                row["sim_" + mode] = run_sim(mode, requests, budget)
                row["rules+" + mode] = run_real(mode, requests, budget, rules=True)
            row["rules+gdsf-prior5"] = run_real(
                GDSFScorer(prior_s=5.0), requests, budget, rules=True
            )
            row["hit_ratio_gdsf_over_lru"] = row["gdsf"]["hit_ratio"] / max(
                row["lru"]["hit_ratio"], 1e-12
            )
            row["saved_gdsf_over_lru"] = row["gdsf"]["saved_share"] / max(
                row["lru"]["saved_share"], 1e-12
            )
            rows.append(row)
            print(
                f"{name:7s} budget {share:>4.0%}: hit ratio lru {row['lru']['hit_ratio']:.3f} "
                f"gdsf {row['gdsf']['hit_ratio']:.3f} (x{row['hit_ratio_gdsf_over_lru']:.2f}); "
                f"cost saved lru {row['lru']['saved_share']:.3f} gdsf "
                f"{row['gdsf']['saved_share']:.3f} (x{row['saved_gdsf_over_lru']:.2f}); "
                f"sim lru {row['sim_lru']['hit_ratio']:.3f}/{row['sim_lru']['saved_share']:.3f} "
                f"gdsf {row['sim_gdsf']['hit_ratio']:.3f}/{row['sim_gdsf']['saved_share']:.3f}; "
                + "; ".join(
                    f"{m} {row[m]['hit_ratio']:.3f}/{row[m]['saved_share']:.3f}" for m in RULES
                ),
                flush=True,
            )
    return rows


def pct(xs: list[int], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) / 1000


def hit_path(entries: int, calls: int, seed: int) -> dict[str, Any]:
    es = [entry_for(i, 900, 1.0 + i % 7) for i in range(entries)]
    caches = {m: ResultCache(1 << 34, eviction=m) for m in MODES}  # type: ignore[arg-type]
    for c in caches.values():
        for e in es:
            c.put(e, 0)
    rng = np.random.default_rng(seed)
    keys = [es[int(i)].key for i in rng.zipf(1.2, calls) % entries]
    times: dict[str, list[int]] = {m: [] for m in MODES}
    pc = time.perf_counter_ns
    block = 20_000
    for start in range(0, calls, block):
        for m in MODES:
            hit = caches[m].hit
            out = times[m]
            for k in keys[start : start + block]:
                t = pc()
                hit(k)
                out.append(pc() - t)
    return {m: {"p50_us": pct(times[m], 50), "p99_us": pct(times[m], 99)} for m in MODES}


def put_path(entries: int, puts: int, seed: int) -> dict[str, Any]:
    """Puts of new entries into full caches (one eviction each), modes in alternating
    blocks of 2,000."""
    size = entry_for(0, 900, 1.0).nbytes
    rng = np.random.default_rng(seed)
    costs = rng.lognormal(size=entries + puts)
    es = [entry_for(i, 900, float(costs[i])) for i in range(entries + puts)]
    caches = {m: ResultCache(entries * size, eviction=m) for m in MODES}  # type: ignore[arg-type]
    for c in caches.values():
        for e in es[:entries]:
            c.put(e, 0)
    times: dict[str, list[int]] = {m: [] for m in MODES}
    pc = time.perf_counter_ns
    for start in range(entries, entries + puts, 2_000):
        for m in MODES:
            put, out = caches[m].put, times[m]
            for e in es[start : start + 2_000]:
                t = pc()
                put(e, 0)
                out.append(pc() - t)
    return {m: {"p50_us": pct(times[m], 50), "p99_us": pct(times[m], 99)} for m in MODES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", default="zipf,latest")
    ap.add_argument("--n", type=int, default=60_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budgets", default="0.02,0.05,0.2")
    ap.add_argument("--entries", type=int, default=5_000)
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--doorkeeper",
        default="",
        help="doorkeeper windows (keys) to replay against none and lazy offers, e.g. "
        "65536,4096; empty (default): skip",
    )
    ap.add_argument("--doorkeeper-workloads", default="zipf,latest,sessions,neardup")
    ap.add_argument("--doorkeeper-only", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.n, a.calls = 5_000, 20_000
    out: dict[str, Any] = {"load_before": os.getloadavg()}
    if a.doorkeeper:
        out["doorkeeper"] = doorkeeper_quality(
            a.doorkeeper_workloads.split(","),
            a.n,
            a.seed,
            [float(s) for s in a.budgets.split(",")],
            [int(w) for w in a.doorkeeper.split(",")],
        )
    if a.doorkeeper_only:
        print("load average before/after:", out["load_before"], os.getloadavg())
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=2)
        return
    out["quality"] = quality(
        a.workloads.split(","), a.n, a.seed, [float(s) for s in a.budgets.split(",")]
    )
    out["hit_path"] = hit_path(a.entries, a.calls, a.seed)
    print("hit path (us):", json.dumps(out["hit_path"]))
    out["put_path"] = put_path(a.entries, min(a.calls, 20_000), a.seed)
    print("put with one eviction (us):", json.dumps(out["put_path"]))
    out["load_after"] = os.getloadavg()
    print("load average before/after:", out["load_before"], out["load_after"])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
