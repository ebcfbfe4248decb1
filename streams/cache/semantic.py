"""L2: the semantic layer. Queries are clustered online and a cluster's cached result is
reused for a query close enough to the cluster's representative.

Online leader clustering: a query that finds no representative within the threshold is
searched fresh, and its point becomes the representative of a new cluster holding its
result; a later query within the threshold of it joins that cluster (is served its result).
Points are compared by cosine distance ``1 - cos``; for spaces whose metric is not cosine
(inner product, L2) the log of the norm ratio is added, since there a scaled query ranks or
scores differently. The rule is :func:`serves`: distance at most the threshold.

Clusters are grouped by (space, index, filter, topK bucket): a query is only served a
result of the same filter, from a cluster whose result holds at least its ``k`` hits.
``space`` is ``"vector"`` (the query vector itself) or ``"text"`` (an embedding of the
query text, for the text path). Each representative points at a :class:`QueryKey` of the
result cache; the cached entry itself lives in :class:`ResultCache` and is invalidated
there exactly like an L0 entry. This class is the index of representatives only: no lock
(the :class:`CacheController` holds one), no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from streams.cache.keys import QueryKey
from streams.cache.tolerant import k_bucket
from streams.index.filters import Filter
from streams.index.model import Metric

__all__ = ["DEFAULT_L2_THRESHOLD", "SemanticIndex", "SemanticMatch", "serves"]

# Tuned on the even rows of QQP with the default offline embedder (bench/semantic_eval.py;
# docs/benchmarks.md "Semantic cache (QQP)"): no threshold reaches precision 0.95 there, so
# this is the one with the highest precision (0.907 even, 0.904 odd, 0.9% of pairs served).
DEFAULT_L2_THRESHOLD = 0.003

F32 = npt.NDArray[np.float32]
Group = tuple[str, str, str, int]


def serves(distance: npt.ArrayLike, threshold: float) -> npt.NDArray[np.bool_]:
    """Whether L2 reuses a cluster's result at ``distance`` from its representative."""
    out: npt.NDArray[np.bool_] = np.asarray(distance, dtype=np.float64) <= threshold
    return out


@dataclass(frozen=True, slots=True)
class SemanticMatch:
    key: QueryKey
    distance: float


class _Group:
    __slots__ = ("keys", "lognorm", "points", "rows", "size")

    def __init__(self, dim: int) -> None:
        self.points = np.zeros((8, dim), dtype=np.float32)
        self.lognorm = np.zeros(8, dtype=np.float64)
        self.keys: list[QueryKey | None] = [None] * 8
        self.rows: dict[QueryKey, int] = {}
        self.size = 0  # rows in use are [0, size); removal swaps the last row in


class SemanticIndex:
    """Representatives per group (module docstring). ``max_per_group`` bounds each group:
    a full group takes no new clusters until one is removed (eviction in the result cache
    removes its representative)."""

    def __init__(self, *, max_per_group: int = 4096) -> None:
        self.max_per_group = max_per_group
        self._groups: dict[Group, _Group] = {}
        self._where: dict[QueryKey, Group] = {}

    def __len__(self) -> int:
        return len(self._where)

    @staticmethod
    def group_of(space: str, index_key: str, flt: Filter | None, k: int) -> Group:
        return (space, index_key, "" if flt is None else str(flt), k_bucket(k))

    @staticmethod
    def _unit(point: npt.ArrayLike) -> tuple[F32, float]:
        p = np.asarray(point, dtype=np.float32).ravel()
        norm = float(np.linalg.norm(p))
        if norm > 0.0:
            p = p / norm
        return p, (math.log(norm) if norm > 0.0 else -math.inf)

    def nearest(self, group: Group, point: npt.ArrayLike, metric: Metric) -> SemanticMatch | None:
        """The representative of ``group`` closest to ``point`` with its distance."""
        g = self._groups.get(group)
        if g is None or g.size == 0:
            return None
        p, lognorm = self._unit(point)
        if p.size != g.points.shape[1]:
            return None
        sims = g.points[: g.size] @ p
        dist = 1.0 - sims.astype(np.float64)
        if metric is not Metric.COSINE:
            dist = dist + np.abs(g.lognorm[: g.size] - lognorm)
        i = int(np.argmin(dist))
        key = g.keys[i]
        assert key is not None
        return SemanticMatch(key, max(0.0, float(dist[i])))

    def add(self, group: Group, point: npt.ArrayLike, key: QueryKey) -> bool:
        """Make ``point`` the representative of a new cluster holding ``key``'s result;
        False when the group is full or the point is zero or of another dim."""
        p, lognorm = self._unit(point)
        if not math.isfinite(lognorm):
            return False
        if key in self._where:
            self.remove(key)
        g = self._groups.get(group)
        if g is None:
            g = self._groups[group] = _Group(p.size)
        if p.size != g.points.shape[1] or g.size >= self.max_per_group:
            return False
        if g.size == g.points.shape[0]:
            cap = 2 * g.size
            g.points = np.vstack([g.points, np.zeros_like(g.points)])[:cap]
            g.lognorm = np.append(g.lognorm, np.zeros(g.size))
            g.keys += [None] * g.size
        i = g.size
        g.points[i] = p
        g.lognorm[i] = lognorm
        g.keys[i] = key
        g.rows[key] = i
        g.size += 1
        self._where[key] = group
        return True

    def remove(self, key: QueryKey) -> bool:
        group = self._where.pop(key, None)
        if group is None:
            return False
        g = self._groups[group]
        i = g.rows.pop(key)
        last = g.size - 1
        if i != last:
            moved = g.keys[last]
            assert moved is not None
            g.points[i] = g.points[last]
            g.lognorm[i] = g.lognorm[last]
            g.keys[i] = moved
            g.rows[moved] = i
        g.keys[last] = None
        g.size -= 1
        if g.size == 0:
            del self._groups[group]
        return True

    def drop_index(self, index_key: str) -> int:
        keys = [k for k, grp in self._where.items() if grp[1] == index_key]
        for key in keys:
            self.remove(key)
        return len(keys)
