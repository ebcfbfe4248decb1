"""How much of the offline bound a cache can reach with a given knowledge of key rates.

For the "Against the targets" part of docs/benchmarks.md (cache policy, issue 4): next to
LRU and the learned policy, on the same trace and budget, it replays caches that rank
entries by ``rate x cost / size`` (sampled eviction, 32 candidates, a miss ranked below the
victim is bypassed, as :class:`streams.policy.eviction.EvictingCache` does) with the rate
taken from:

- ``past W``: the exact number of requests for the key among the last ``W`` requests (what
  an online policy could know at best with a sliding window of that length);
- ``window +-W``: the requests for the key among the ``W`` before and the ``W`` after
  (reads the future: not an online policy, a ceiling for rate estimation);
- ``rate x alive, hazard H``: :func:`streams.policy.eviction.rate_alive` (a key's
  Gamma-posterior rate since it was first seen x the chance it has not died, hazard ``H``
  per second), the prior refitted every 5,000 requests by
  :func:`~streams.policy.eviction.fit_rate_prior` from the requests so far (past only: one
  ``learned`` candidate on its own, without the selection);
- ``hit density T, hazard H``: the same posterior, ranked by its hit density over ``T``
  seconds (:func:`streams.policy.eviction.rate_hit_density`; the selector's rate tables
  set T from their evictions, here it is fixed);
- ``belady``: the next request's time itself (``cost / (size x time to next request)``;
  clairvoyant, a lower bound on the 0/1 optimum, so it shows how tight the LP bound is).

Usage::

    .venv/bin/python bench/policy_ceiling.py --workload zipf --requests 100000

Prints one line per cache: share of proxy cost saved, share of the LP bound, ratio to LRU.
"""

from __future__ import annotations

import argparse
import bisect
import math
import random
import time
from collections.abc import Callable, Sequence

import numpy as np

from streams.policy import (
    LRUCache,
    default_budget,
    generate,
    lp_bound,
    replay,
    replay_learned_eviction,
)
from streams.policy.eviction import fit_rate_prior, rate_alive, rate_hit_density
from streams.policy.simulator import ADMIT, CacheSimulator, Decision
from streams.policy.trace import Request

HAZARDS = (1e-4, 1e-3, 4e-3)  # EvictionConfig.rate_hazards_per_s
HORIZONS_S = (10.0, 30.0, 100.0)  # T of the hit-density rows (hazard 0.004/s)


class RateCache(CacheSimulator):
    """Sampled eviction by ``value(key, i) x cost / size``; ``value`` may read the trace."""

    def __init__(self, budget: int, name: str, value: Callable[[str, int], float]) -> None:
        super().__init__(budget)
        self.name = name
        self._value = value
        self._rng = random.Random(0)
        self._keys: list[str] = []
        self._pos: dict[str, int] = {}
        self._ent: dict[str, tuple[int, float]] = {}

    def _lookup(self, index: int, req: Request) -> bool:
        if req.key in self._ent:
            self._ent[req.key] = (req.size, req.cost)
            return True
        return False

    def _prio(self, key: str, i: int) -> float:
        size, cost = self._ent[key]
        return self._value(key, i) * cost / size

    def _on_miss(self, index: int, req: Request) -> Decision:
        mine = self._value(req.key, index) * req.cost / req.size
        while self.used_bytes + req.size > self.budget_bytes:
            n = len(self._keys)
            victim, low = "", math.inf
            for _ in range(min(32, n)):
                k = self._keys[int(self._rng.random() * n)]
                p = self._prio(k, index)
                if p < low:
                    victim, low = k, p
            if low > mine:
                return Decision("bypass", False)
            self.used_bytes -= self._ent.pop(victim)[0]
            j = self._pos.pop(victim)
            last = self._keys.pop()
            if last != victim:
                self._keys[j] = last
                self._pos[last] = j
        self._ent[req.key] = (req.size, req.cost)
        self._pos[req.key] = len(self._keys)
        self._keys.append(req.key)
        self.used_bytes += req.size
        return ADMIT


class RateAlive:
    """``rate x alive`` (module docstring): reads requests up to ``i`` only."""

    def __init__(self, trace: Sequence[Request], hazard_per_s: float, refit: int = 5_000) -> None:
        self.trace, self.hazard, self.refit = trace, hazard_per_s, refit
        self.keys: dict[str, list[float]] = {}  # key -> [first time, count, last time]
        self.seen = -1
        self.a, self.b = 0.3, 30.0

    def __call__(self, key: str, i: int) -> float:
        while self.seen < i:
            self.seen += 1
            r = self.trace[self.seen]
            k = self.keys.get(r.key)
            if k is None:
                self.keys[r.key] = [r.time, 1.0, r.time]
            else:
                k[1] += 1.0
                k[2] = r.time
            if (self.seen + 1) % self.refit == 0:
                now = r.time
                self.a, self.b = fit_rate_prior(
                    np.array([v[1] - 1.0 for v in self.keys.values()]),
                    np.array([now - v[0] for v in self.keys.values()]),
                )
        first, count, last = self.keys[key]
        now = self.trace[i].time
        return rate_alive(count, now - last, now - first, self.a, self.b, self.hazard)


class HitDensity(RateAlive):
    """``hit density T`` (module docstring): reads requests up to ``i`` only."""

    def __init__(self, trace: Sequence[Request], hazard_per_s: float, horizon_s: float) -> None:
        super().__init__(trace, hazard_per_s)
        self.horizon = horizon_s

    def __call__(self, key: str, i: int) -> float:
        super().__call__(key, i)  # reads up to i, refits the prior
        first, count, last = self.keys[key]
        now = self.trace[i].time
        return rate_hit_density(
            count, now - last, now - first, self.a, self.b, self.hazard, self.horizon
        )


def caches(trace: Sequence[Request], budget: int, windows: Sequence[int]) -> list[RateCache]:
    where: dict[str, list[int]] = {}
    for i, r in enumerate(trace):
        where.setdefault(r.key, []).append(i)

    def past(w: int) -> Callable[[str, int], float]:  # requests i - w .. i, this one included
        return lambda k, i: bisect.bisect_right(where[k], i) - bisect.bisect_left(where[k], i - w)

    def around(w: int) -> Callable[[str, int], float]:  # i - w .. i + w, this one excluded
        return lambda k, i: (
            bisect.bisect_right(where[k], i + w) - bisect.bisect_left(where[k], i - w) - 1
        )

    def belady(k: str, i: int) -> float:  # 1 / seconds to the key's next request after i
        pos = where[k]
        j = bisect.bisect_right(pos, i)
        if j == len(pos):
            return 0.0
        return 1.0 / (trace[pos[j]].time - trace[i].time + 1e-6)

    out = [RateCache(budget, f"past {w}", past(w)) for w in windows]
    out += [RateCache(budget, f"window +-{w}", around(w)) for w in windows[:1]]
    out += [RateCache(budget, f"rate x alive {h:g}", RateAlive(trace, h)) for h in HAZARDS]
    out += [
        RateCache(budget, f"hit density {t:g}s 0.004", HitDensity(trace, 4e-3, t))
        for t in HORIZONS_S
    ]
    out.append(RateCache(budget, "belady", belady))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", default="zipf")
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--budget-fraction", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--windows", default="10000,20000,40000")
    args = ap.parse_args()
    trace = generate(args.workload, args.requests, args.seed)
    budget = default_budget(trace, args.budget_fraction)
    t0 = time.perf_counter()
    bound = lp_bound(trace, budget)
    print(
        f"{args.workload}: {len(trace):,} requests, budget {budget:,} B; LP bound saves "
        f"{bound.savings / bound.total_cost:.1%} ({time.perf_counter() - t0:.0f} s)"
    )
    lru = replay(LRUCache(budget), trace).saved_cost
    rows = [("lru", lru), ("learned", replay_learned_eviction(trace, budget).result.saved_cost)]
    windows = [int(w) for w in args.windows.split(",")]
    rows += [(c.name, replay(c, trace).saved_cost) for c in caches(trace, budget, windows)]
    for name, saved in rows:
        print(
            f"  {name:22s} saved {saved / bound.total_cost:6.1%}  of bound "
            f"{saved / bound.savings:6.1%}  vs LRU {saved / lru:5.3f}x"
        )


if __name__ == "__main__":
    main()
