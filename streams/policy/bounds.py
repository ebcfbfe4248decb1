"""Offline bounds: what no on-demand cache of the same byte budget can beat.

Model. A cache sees requests ``0..n-1`` in order; after serving request ``t`` it holds a set
of results of total size <= ``budget``. A request is a hit iff its key was held after the
previous request for that key and at every step in between (results enter only when they are
requested: no prefetching). Every simulator in :mod:`streams.policy.policies`, TTLs and
admission filters included, is such a cache.

Reuse intervals. Each pair of consecutive requests ``i < j`` for the same key is an interval
``e`` of size ``s_e`` (the result's size at ``i``) and gain ``g_e`` (the proxy cost of ``j``).
A schedule chooses ``x_e`` in {0, 1} (held across ``e``, so ``j`` hits); it is feasible iff for
every step ``t``: ``sum(s_e * x_e for e covering t) <= budget``, where ``e = (i, j)`` covers
``i <= t < j``. The optimum maximises ``sum(g_e * x_e)``.

:func:`lp_bound` -- the LP relaxation (``0 <= x_e <= 1``), the "FOO" bound of Berger,
Beckmann and Harchol-Balter, *Practical Bounds on Optimal Caching with Variable Object
Sizes* (SIGMETRICS 2018). Any real schedule is a feasible 0/1 point, so the LP optimum is an
upper bound on the savings of every policy. We solve it in its min-cost-flow form (a central
path of capacity ``budget`` through the requests carrying the held bytes; conservation at
each request), which keeps the constraint matrix sparse: ~2 nonzeros per interval and per
step, so HiGHS handles 10^5-request traces in seconds. For unit sizes the constraint matrix
is an interval matrix (totally unimodular), so the LP is integral and equals Belady.

:func:`knapsack_bound` -- the cheaper relaxation: add up all step constraints into one
byte-step budget ``budget * (n - 1)`` and solve the fractional knapsack (greedy on
``g_e / (s_e * (j - i))``). It relaxes the LP further, so it is >= the LP bound; looser, but
needs no solver and is O(n log n).

:func:`belady_hits` -- Belady's MIN with bypass for unit sizes and costs: on a miss with a
full cache, drop whichever of the cached keys and the requested key is next used farthest in
the future. Optimal for unit sizes (the exchange argument of MIN).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from streams.policy.exceptions import BoundUnavailable
from streams.policy.trace import Request

__all__ = ["Bound", "Intervals", "belady_hits", "knapsack_bound", "lp_bound", "reuse_intervals"]


@dataclass(frozen=True, slots=True)
class Intervals:
    """Reuse intervals of a trace as parallel arrays (start, end request index, size, gain)."""

    start: np.ndarray
    end: np.ndarray
    size: np.ndarray
    gain: np.ndarray
    n_requests: int


@dataclass(frozen=True, slots=True)
class Bound:
    """An upper bound on proxy cost saved (``savings``) and how it was computed."""

    method: str  # "lp" or "knapsack"
    savings: float
    total_cost: float
    seconds: float


def reuse_intervals(requests: Sequence[Request], budget_bytes: int) -> Intervals:
    """Every (previous request, request) pair of one key whose result fits in the budget."""
    last: dict[str, int] = {}
    st: list[int] = []
    en: list[int] = []
    sz: list[int] = []
    gn: list[float] = []
    for j, r in enumerate(requests):
        i = last.get(r.key)
        if i is not None and requests[i].size <= budget_bytes:
            st.append(i)
            en.append(j)
            sz.append(requests[i].size)
            gn.append(r.cost)
        last[r.key] = j
    return Intervals(
        np.array(st, dtype=np.int64),
        np.array(en, dtype=np.int64),
        np.array(sz, dtype=np.float64),
        np.array(gn, dtype=np.float64),
        len(requests),
    )


def knapsack_bound(requests: Sequence[Request], budget_bytes: int) -> Bound:
    """The fractional-knapsack relaxation over reuse intervals (see the module docstring)."""
    import time

    t0 = time.perf_counter()
    iv = reuse_intervals(requests, budget_bytes)
    total = float(sum(r.cost for r in requests))
    capacity = float(budget_bytes) * max(iv.n_requests - 1, 0)
    weight = iv.size * (iv.end - iv.start)
    order = np.argsort(-(iv.gain / weight), kind="stable")
    filled = np.cumsum(weight[order])
    full = int(np.searchsorted(filled, capacity, side="right"))
    savings = float(iv.gain[order[:full]].sum())
    if full < len(order):
        room = capacity - (float(filled[full - 1]) if full else 0.0)
        savings += float(iv.gain[order[full]]) * room / float(weight[order[full]])
    return Bound("knapsack", savings, total, time.perf_counter() - t0)


def lp_bound(
    requests: Sequence[Request], budget_bytes: int, *, max_requests: int = 400_000
) -> Bound:
    """The LP relaxation of the interval formulation (FOO), solved by HiGHS via scipy.

    Raises :class:`BoundUnavailable` without scipy, above ``max_requests``, or if the solver
    does not report an optimum (the caller falls back to :func:`knapsack_bound`).
    """
    import time

    t0 = time.perf_counter()
    if len(requests) > max_requests:
        raise BoundUnavailable(f"{len(requests)} requests > max_requests={max_requests}")
    try:
        from scipy.optimize import linprog
        from scipy.sparse import csr_matrix
    except ImportError as exc:  # scipy is a dependency; this guards stripped installs
        raise BoundUnavailable(f"scipy unavailable: {exc}") from None
    iv = reuse_intervals(requests, budget_bytes)
    total = float(sum(r.cost for r in requests))
    m = len(iv.start)
    if m == 0:
        return Bound("lp", 0.0, total, time.perf_counter() - t0)
    # Nodes: the requests where some interval starts or ends, in time order.
    nodes, inv = np.unique(np.concatenate((iv.start, iv.end)), return_inverse=True)
    u_start, u_end = inv[:m], inv[m:]
    n_nodes = len(nodes)
    n_flow = n_nodes - 1  # central edge u -> u+1 carries the bytes held across it
    scale = 1.0 / float(budget_bytes)  # flows in units of the budget: better conditioned
    w = iv.size * scale
    # Row u: f_u - f_{u-1} - sum_{e starts at u} w_e x_e + sum_{e ends at u} w_e x_e = 0.
    flow_idx = np.arange(n_flow)
    rows = np.concatenate((u_start, u_end, flow_idx, flow_idx + 1))
    cols = np.concatenate((np.arange(m), np.arange(m), m + flow_idx, m + flow_idx))
    vals = np.concatenate((-w, w, np.ones(n_flow), -np.ones(n_flow)))
    a_eq = csr_matrix((vals, (rows, cols)), shape=(n_nodes, m + n_flow))
    c = np.concatenate((-iv.gain, np.zeros(n_flow)))
    bounds = np.concatenate((np.tile([0.0, 1.0], (m, 1)), np.tile([0.0, 1.0], (n_flow, 1))))
    res = linprog(c, A_eq=a_eq, b_eq=np.zeros(n_nodes), bounds=bounds, method="highs")
    if res.status != 0 or res.x is None:
        raise BoundUnavailable(f"LP solver: {res.message}")
    x = np.clip(res.x[:m], 0.0, 1.0)
    savings = float(iv.gain @ x)
    return Bound("lp", savings, total, time.perf_counter() - t0)


def belady_hits(keys: Sequence[str], capacity: int) -> int:
    """Hits of Belady's MIN with bypass: unit sizes, ``capacity`` results (see module doc)."""
    if capacity <= 0:
        return 0
    n = len(keys)
    nxt = [math.inf] * n
    seen: dict[str, int] = {}
    for i in range(n - 1, -1, -1):
        nxt[i] = seen.get(keys[i], math.inf)
        seen[keys[i]] = i
    held: dict[str, float] = {}  # key -> its next use
    heap: list[tuple[float, str]] = []  # (-next use, key), lazily cleaned
    hits = 0
    for i, k in enumerate(keys):
        if k in held:
            hits += 1  # still held; its next use moves on
        elif len(held) >= capacity:
            while -heap[0][0] != held.get(heap[0][1]):
                heapq.heappop(heap)
            far_next, far_key = -heap[0][0], heap[0][1]
            if nxt[i] >= far_next:
                continue  # bypass: the requested key is the one needed last
            heapq.heappop(heap)
            del held[far_key]
        held[k] = nxt[i]
        heapq.heappush(heap, (-nxt[i], k))
    return hits
