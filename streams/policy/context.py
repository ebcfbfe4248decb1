"""What the hot path knows about a request when it decides: online estimates and buckets.

:class:`ContextTracker` keeps, per key and per near-duplicate cluster, a frequency estimate
that halves every ``half_life`` requests (lazily: each count carries the epoch it was last
aged to, as a TinyLFU reset would), plus the key's last access time. It reads the request's
own context features (``k``, ``filter``, ``cluster``) and normalises size and cost against
running means. :meth:`ContextTracker.observe` returns the :class:`Context` *before* counting
the request, so a first request has ``freq == 0``.

:func:`bucket` maps a context to a short string key such as ``f2.g3.s1.c2.x0.q4``: the key of
the lookup table the learner exports. Its fields and edges:

==== ============================== =====================================================
f    decayed key frequency          0 | 1 | 2-3 | 4-7 | 8+
g    seconds since last access      never | <2 | <10 | <60 | <300 | >=300
s    result size in bytes           <1 KiB | <4 KiB | <16 KiB | >=16 KiB
c    cost / running mean cost       <0.5 | <1 | <2 | >=2
x    filter kind                    none | tag | range | user (| other)
q    decayed cluster frequency      no cluster | 0 | 1-3 | 4-15 | 16+
==== ============================== =====================================================
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from streams.policy.trace import Request

__all__ = ["BUCKET_FIELDS", "Context", "ContextTracker", "bucket"]

BUCKET_FIELDS = ("f", "g", "s", "c", "x", "q")
_F_EDGES = (1, 2, 4, 8)
_G_EDGES = (2.0, 10.0, 60.0, 300.0)
_S_EDGES = (1024, 4096, 16384)
_C_EDGES = (0.5, 1.0, 2.0)
_Q_EDGES = (1, 4, 16)
_FILTERS = {"none": 0, "tag": 1, "range": 2, "user": 3}
_LN2 = math.log(2)


@dataclass(frozen=True, slots=True)
class Context:
    """The hot path's view of one request, before it is counted."""

    freq: float  # decayed count of earlier requests for the key
    gap_s: float  # seconds since the key's last request (inf: never seen)
    size: int
    cost: float
    rel_cost: float  # cost / running mean cost
    filter_kind: int  # index into none, tag, range, user; 4 = other
    cluster_freq: float  # decayed count of earlier requests in the key's cluster; -1: none
    window_s: float  # seconds the decayed counts cover: a count / window_s is a rate


class ContextTracker:
    """Online per-key and per-cluster statistics (see the module docstring).

    ``half_life``: requests after which counts halve. Memory grows with the distinct keys
    seen; production bounds it with a count-min sketch, which changes no decision logic.
    """

    def __init__(self, half_life: int = 20_000) -> None:
        self.half_life = half_life
        self._n = 0
        self._key: dict[str, tuple[float, int]] = {}  # key -> (count, epoch)
        self._cluster: dict[str, tuple[float, int]] = {}
        self._last: dict[str, float] = {}
        self._mean_cost = 0.0
        self._t0: float | None = None
        self._t = 0.0

    def _aged(self, table: dict[str, tuple[float, int]], name: str) -> float:
        count, epoch = table.get(name, (0.0, self._epoch))
        return count * 0.5 ** (self._epoch - epoch)

    @property
    def _epoch(self) -> int:
        return self._n // self.half_life

    def observe(self, req: Request) -> Context:
        """The context of ``req`` from what came before; then count ``req``."""
        ctx = self.peek(req)
        epoch = self._n // self.half_life
        self._key[req.key] = (ctx.freq + 1.0, epoch)
        cluster = req.ctx.get("cluster")
        if cluster is not None and isinstance(cluster, str):
            self._cluster[cluster] = (ctx.cluster_freq + 1.0, epoch)
        self._last[req.key] = req.time
        if self._t0 is None:
            self._t0 = req.time
        self._t = req.time
        self._n += 1
        self._mean_cost += (req.cost - self._mean_cost) / min(self._n, 10_000)
        return ctx

    def peek(self, req: Request) -> Context:
        """The context of ``req`` without counting it."""
        # the hot path (a cache miss): the epoch once, the aged counts inline
        key = req.key
        last = self._last.get(key)
        extra = req.ctx
        cluster = extra.get("cluster")
        filt = extra.get("filter", "none")
        mean = self._mean_cost if self._mean_cost > 0 else max(req.cost, 1e-9)
        # A count that halves every half_life requests sums a rate over half_life / ln 2
        # requests' worth of time (1 s per request until the clock has moved).
        t0 = self._t0
        per_request = (self._t - t0) / self._n if t0 is not None and self._t > t0 else 1.0
        epoch = self._n // self.half_life
        seen = self._key.get(key)
        freq = 0.0 if seen is None else seen[0] * 0.5 ** (epoch - seen[1])
        if isinstance(cluster, str):
            seen = self._cluster.get(cluster)
            cluster_freq = 0.0 if seen is None else seen[0] * 0.5 ** (epoch - seen[1])
        else:
            cluster_freq = -1.0
        return Context(
            freq,
            math.inf if last is None else req.time - last,
            req.size,
            req.cost,
            req.cost / mean,
            _FILTERS.get(filt, 4) if isinstance(filt, str) else 4,
            cluster_freq,
            self.half_life / _LN2 * per_request,
        )


def bucket(ctx: Context) -> str:
    """The lookup-table key of ``ctx`` (fields and edges in the module docstring)."""
    f = bisect.bisect_right(_F_EDGES, ctx.freq + 1e-9)
    g = 0 if math.isinf(ctx.gap_s) else 1 + bisect.bisect_right(_G_EDGES, ctx.gap_s)
    s = bisect.bisect_right(_S_EDGES, ctx.size)
    c = bisect.bisect_right(_C_EDGES, ctx.rel_cost)
    q = 0 if ctx.cluster_freq < 0 else 1 + bisect.bisect_right(_Q_EDGES, ctx.cluster_freq + 1e-9)
    return f"f{f}.g{g}.s{s}.c{c}.x{ctx.filter_kind}.q{q}"
