"""Which cached results a write changes: L0's exact, result-aware invalidation.

An entry caches R, the top-k of the rows passing its filter F for its query q. A write
changes R only if:

* **(a)** it deletes, updates or re-upserts an id X that R holds (the old copy leaves), or
* **(b)** it upserts a vector v that would enter R: F passes v's tags and numeric fields,
  and v scores at least as well as R's k-th hit (cosine similarity and inner product:
  higher is better; squared L2: lower is better). When R holds fewer than k hits, every
  row passing F is in R, so any v that passes F enters.

Exactness: if no write of a batch meets (a) or (b), R is still the top-k afterwards. Every
row of R is still there (a); every other row passing F is either old (not better than R's
k-th before, and the k-th is unchanged) or new (not better, by (b)); with fewer than k hits
no new row passes F. Nothing else (sealing, merging) changes which rows exist. With an
exact recipe (Flat, fp32) that makes a hit equal a fresh search; with an approximate one
(HNSW, IVF, fp16/int8 storage) the fresh search is itself an approximation that sealing
may change without a write, and a hit returns the answer as it was computed.

Scores are float64 with a margin for the index's fp32 rounding
(:mod:`streams.cache.scoring`): ties and near-ties count as entering, so a false
invalidation costs one miss where a missed one would be a wrong answer.

Pruning, so that a write does not scan every entry: cached queries are grouped into
clusters, each with a fixed centre c, a radius r >= |q - c| over its members, a norm bound
M >= |q| and the weakest k-th score w of its members (the lowest similarity, or the
largest L2 distance). For every member q:

* IP/cosine (Cauchy-Schwarz): ``q.v = c.v + (q - c).v <= c.v + r|v|``, so
  ``q.v + margin <= c.v + r|v| + g M|v|``. If that is below w, no member can be entered.
* L2 (triangle inequality): ``|q - v| >= max(0, |c - v| - r)``, so
  ``|q - v|^2 - margin >= max(0, |c - v| - r)^2 - g (M + |v|)^2``. If that is above w,
  none can.

The filter is ignored by the bound (dropping a condition only keeps more candidates).
Candidates of the surviving clusters are then tested exactly with numpy. Bounds are
inflated by a relative 1e-9 against float64 rounding of the bound itself. After a removal
r, M and w are left as they were: only looser, so pruning stays sound until the next
rebuild (after as many changes as there were entries at the last one) re-fits the
clusters with a few k-means steps and recomputes them exactly.

Not thread-safe: :class:`ResultCache` holds its lock around every call.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from streams.cache.keys import QueryKey
from streams.cache.scoring import F64, Bools, pair_test, prepare64, score_margin, threshold_of
from streams.index.filters import Filter
from streams.index.model import Metric, Vector

__all__ = ["InvalidationIndex", "UpsertRow"]

I64 = npt.NDArray[np.int64]

_SLACK = 1e-9  # relative slack on bounds against float64 rounding
_TINY = 1e-30
_MIN_REBUILD = 32
_KMEANS_STEPS = 5
_KMEANS_SAMPLE = 4096


@dataclass(frozen=True, slots=True)
class UpsertRow:
    """One applied upsert as invalidation sees it: the raw vector (as written, fp32),
    the id, and the tags and numeric fields a filter tests."""

    id: str
    vector: Vector
    tags: tuple[str, ...] = ()
    numeric: Mapping[str, float] = field(default_factory=dict)


def _passes(
    flt: Filter,
    row: int,
    tags: Sequence[Sequence[str]],
    numerics: Sequence[Mapping[str, float]],
    memo: dict[tuple[Filter, int], bool],
) -> bool:
    """``flt.matches`` of upserted row ``row``, memoised per batch (entries share filters)."""
    passed = memo.get((flt, row))
    if passed is None:
        passed = memo[(flt, row)] = flt.matches(tags[row], numerics[row])
    return passed


def _kmeans_pp(points: F64, k: int, rng: np.random.Generator) -> F64:
    """k-means++ seeding: each next centre drawn with probability proportional to its
    squared distance from the nearest centre so far (separated groups all get one)."""
    centres = [points[rng.integers(points.shape[0])]]
    dsq = ((points - centres[0]) ** 2).sum(axis=1)
    for _ in range(1, min(k, points.shape[0])):
        total = float(dsq.sum())
        if total <= 0.0:
            break
        nxt = points[rng.choice(points.shape[0], p=dsq / total)]
        centres.append(nxt)
        dsq = np.minimum(dsq, ((points - nxt) ** 2).sum(axis=1))
    return np.array(centres, dtype=np.float64)


class InvalidationIndex:
    """The cached queries of one index (all of one metric and dim), answering which of
    them a batch of writes changes (see the module docstring for the argument).

    ``add``/``remove`` keep it in step with the cache; ``affected_by_upserts`` and
    ``affected_by_ids`` return keys and change nothing. ``checked_pairs`` counts the
    (entry, vector) pairs tested exactly, ``scanned_pairs`` those a full scan would have.
    """

    def __init__(self, metric: Metric, dim: int, *, max_clusters: int = 64) -> None:
        if dim < 1 or max_clusters < 1:
            raise ValueError("dim >= 1 and max_clusters >= 1")
        self.metric = Metric(metric)
        self._higher = self.metric.higher_is_better
        self.dim = dim
        self.max_clusters = max_clusters
        self._g = score_margin(dim)
        cap = 16
        self._q = np.zeros((cap, dim), dtype=np.float64)
        self._qsq = np.zeros(cap, dtype=np.float64)
        self._thr = np.zeros(cap, dtype=np.float64)
        self._keys: list[QueryKey | None] = [None] * cap
        self._filters: list[Filter | None] = [None] * cap
        self._ids: list[tuple[str, ...]] = [()] * cap
        self._cluster_of: list[int] = [-1] * cap
        self._slot: dict[QueryKey, int] = {}
        self._free: list[int] = list(range(cap - 1, -1, -1))
        self._by_id: dict[str, set[QueryKey]] = {}
        self._set_clusters(np.zeros((0, dim)))
        self._changes = 0
        self.checked_pairs = 0
        self.scanned_pairs = 0

    # -- membership --------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, key: object) -> bool:
        return key in self._slot

    def add(
        self,
        key: QueryKey,
        query: Vector,
        kth: float | None,
        filter: Filter | None,
        ids: Iterable[str],
    ) -> None:
        """Track an entry: its raw query, k-th score (None: fewer than k hits), filter
        and hit ids. Replaces an entry of the same key."""
        q = prepare64(query, self.metric)[0]
        if q.shape != (self.dim,):
            raise ValueError(f"query of dim {q.shape[0]}, index dim {self.dim}")
        if key in self._slot:
            self.remove(key)
        if not self._free:
            self._grow()
        slot = self._free.pop()
        self._q[slot] = q
        self._qsq[slot] = float(q @ q)
        self._thr[slot] = threshold_of(kth, self.metric)
        self._keys[slot] = key
        self._filters[slot] = filter
        self._ids[slot] = tuple(ids)
        self._slot[key] = slot
        for id in self._ids[slot]:
            self._by_id.setdefault(id, set()).add(key)
        self._assign(slot)
        self._changed()

    def remove(self, key: QueryKey) -> bool:
        """Stop tracking ``key``; False if it was not tracked."""
        slot = self._slot.pop(key, None)
        if slot is None:
            return False
        for id in self._ids[slot]:
            keys = self._by_id.get(id)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_id[id]
        c = self._cluster_of[slot]
        self._members[c].discard(slot)
        self._member_arrays[c] = None
        self._cluster_of[slot] = -1
        self._keys[slot] = None
        self._filters[slot] = None
        self._ids[slot] = ()
        self._free.append(slot)
        self._changed()
        return True

    # -- queries -----------------------------------------------------------------------

    def affected_by_ids(self, ids: Iterable[str]) -> set[QueryKey]:
        """Entries whose result holds any of ``ids`` (rule (a))."""
        out: set[QueryKey] = set()
        for id in ids:
            out |= self._by_id.get(id, set())
        return out

    def affected_by_upserts(
        self,
        vectors: npt.ArrayLike,
        tags: Sequence[Sequence[str]],
        numerics: Sequence[Mapping[str, float]],
    ) -> set[QueryKey]:
        """Entries that any of the upserted rows would enter (rule (b)); ``vectors`` is
        n x dim raw, ``tags``/``numerics`` one per row. The caller adds rule (a) for the
        rows' ids (:meth:`affected_by_ids`)."""
        v = prepare64(vectors, self.metric)
        n = v.shape[0]
        if v.shape[1] != self.dim or len(tags) != n or len(numerics) != n:
            raise ValueError("vectors, tags and numerics must have one row each, of dim")
        out: set[QueryKey] = set()
        if n == 0 or not self._slot:
            return out
        self.scanned_pairs += n * len(self._slot)
        vsq = np.einsum("ij,ij->i", v, v)
        active = [c for c in range(len(self._members)) if self._members[c]]
        cand = self._candidates(np.array(active, dtype=np.int64), v, vsq)
        memo: dict[tuple[Filter, int], bool] = {}
        for row, c in enumerate(active):
            cols = np.flatnonzero(cand[row])
            if cols.size == 0:
                continue
            members = self._member_array(c)
            self.checked_pairs += members.size * cols.size
            ok = pair_test(self.metric, self._g, self._q[members] @ v[cols].T,
                            self._qsq[members], vsq[cols], self._thr[members])
            for i in np.flatnonzero(ok.any(axis=1)).tolist():
                slot = int(members[i])
                key = self._keys[slot]
                assert key is not None
                if key in out:
                    continue
                flt = self._filters[slot]
                for j in cols[ok[i]].tolist():
                    if flt is None or _passes(flt, j, tags, numerics, memo):
                        out.add(key)
                        break
        return out

    def _candidates(self, active: I64, v: F64, vsq: F64) -> Bools:
        """(clusters x rows): False where the cluster's bound rules the row out."""
        cen = self._centres[active]
        r = self._radius[active][:, None]
        m = self._maxnorm[active][:, None]
        w = self._weakest[active][:, None]
        cn = np.linalg.norm(cen, axis=1)[:, None]
        vn = np.sqrt(vsq)[None, :]
        cv = cen @ v.T
        if self._higher:
            bound = cv + r * vn + self._g * m * vn
            slack = _SLACK * (cn + r + m) * vn + _TINY
            out: Bools = bound + slack >= w
            return out
        dsq = cn * cn - 2.0 * cv + vsq[None, :]
        dist_lo = np.sqrt(np.maximum(dsq - (_SLACK * (cn + vn) ** 2 + _TINY), 0.0))
        gap = np.maximum(dist_lo - r, 0.0)
        bound = gap * gap - self._g * (m + vn) ** 2
        slack = _SLACK * (m + vn + r) ** 2 + _TINY
        out = bound - slack <= w
        return out

    # -- clusters ----------------------------------------------------------------------

    def _set_clusters(self, centres: F64) -> None:
        c = centres.shape[0]
        self._centres = np.array(centres, dtype=np.float64).reshape(c, self.dim)
        self._radius = np.zeros(c, dtype=np.float64)
        self._maxnorm = np.zeros(c, dtype=np.float64)
        worst = math.inf if self._higher else -math.inf
        self._weakest = np.full(c, worst, dtype=np.float64)
        self._members: list[set[int]] = [set() for _ in range(c)]
        self._member_arrays: list[I64 | None] = [None] * c

    def _target_clusters(self) -> int:
        return max(1, min(self.max_clusters, math.isqrt(max(len(self._slot), 1))))

    def _nearest(self, points: F64, centres: F64) -> I64:
        dsq = (np.einsum("ij,ij->i", centres, centres)[None, :] - 2.0 * points @ centres.T)
        return np.asarray(np.argmin(dsq, axis=1), dtype=np.int64)

    def _assign(self, slot: int) -> None:
        """Put ``slot`` into the nearest cluster and widen that cluster's bounds to cover
        it, or start a new cluster at it: while there are fewer clusters than the target,
        or (up to ``max_clusters``) when it lies well outside the nearest one and the
        typical cluster, which would loosen that cluster's bound for every write."""
        q = self._q[slot]
        n = len(self._members)
        if n == 0 or n < self._target_clusters():
            self._add_cluster(q)
            self._join(n, [slot])
            return
        c = int(self._nearest(q[None, :], self._centres)[0])
        if n < self.max_clusters:
            dist = float(np.linalg.norm(q - self._centres[c]))
            typical = float(np.median(self._radius))
            if dist > 2.0 * max(float(self._radius[c]), typical):
                self._add_cluster(q)
                c = n
        self._join(c, [slot])

    def _add_cluster(self, centre: F64) -> None:
        self._centres = np.vstack([self._centres, centre[None, :]])
        self._radius = np.append(self._radius, 0.0)
        self._maxnorm = np.append(self._maxnorm, 0.0)
        worst = math.inf if self._higher else -math.inf
        self._weakest = np.append(self._weakest, worst)
        self._members.append(set())
        self._member_arrays.append(None)

    def _join(self, c: int, slots: list[int]) -> None:
        if len(slots) == 1:  # the search path's add: scalar arithmetic, no reductions
            s = slots[0]
            d = self._q[s] - self._centres[c]
            radius = math.sqrt(float(d @ d))
            norm = math.sqrt(float(self._qsq[s]))
            low = high = float(self._thr[s])
        else:
            idx = np.array(slots, dtype=np.int64)
            q = self._q[idx]
            radius = float(np.linalg.norm(q - self._centres[c], axis=1).max())
            norm = float(np.sqrt(self._qsq[idx]).max())
            thr = self._thr[idx]
            low, high = float(thr.min()), float(thr.max())
        self._radius[c] = max(self._radius[c], radius * (1 + _SLACK) + _TINY)
        self._maxnorm[c] = max(self._maxnorm[c], norm * (1 + _SLACK) + _TINY)
        if self._higher:
            self._weakest[c] = min(self._weakest[c], low)
        else:
            self._weakest[c] = max(self._weakest[c], high)
        self._members[c].update(slots)
        self._member_arrays[c] = None
        for s in slots:
            self._cluster_of[s] = c

    def _member_array(self, c: int) -> I64:
        arr = self._member_arrays[c]
        if arr is None:
            arr = self._member_arrays[c] = np.fromiter(self._members[c], dtype=np.int64)
        return arr

    def _changed(self) -> None:
        self._changes += 1
        if self._changes > max(_MIN_REBUILD, len(self._slot)):
            self.rebuild()

    def rebuild(self) -> None:
        """Re-fit the clusters (k-means, a few steps on a sample) and recompute every
        bound exactly. Amortised O(clusters x dim) per add/remove."""
        self._changes = 0
        slots = np.fromiter(self._slot.values(), dtype=np.int64)
        n = slots.size
        k = self._target_clusters()
        if n == 0:
            self._set_clusters(np.zeros((0, self.dim)))
            return
        rng = np.random.default_rng(n)  # deterministic for a given size: reproducible
        points = self._q[slots]
        sample = points[rng.choice(n, min(n, _KMEANS_SAMPLE), replace=False)]
        centres = _kmeans_pp(sample, k, rng)
        for _ in range(_KMEANS_STEPS):
            near = self._nearest(sample, centres)
            for c in range(centres.shape[0]):
                mine = sample[near == c]
                if mine.shape[0]:
                    centres[c] = mine.mean(axis=0)
        near = self._nearest(points, centres)
        used = np.unique(near)
        self._set_clusters(centres[used])
        renumber = np.full(centres.shape[0], -1, dtype=np.int64)
        renumber[used] = np.arange(used.size)
        for c in range(used.size):
            self._join(c, slots[renumber[near] == c].tolist())

    def _grow(self) -> None:
        old = self._q.shape[0]
        cap = 2 * old
        self._q = np.vstack([self._q, np.zeros((old, self.dim))])
        self._qsq = np.append(self._qsq, np.zeros(old))
        self._thr = np.append(self._thr, np.zeros(old))
        self._keys += [None] * old
        self._filters += [None] * old
        self._ids += [()] * old
        self._cluster_of += [-1] * old
        self._free.extend(range(cap - 1, old - 1, -1))

    def clusters(self) -> int:
        """Clusters with at least one member (introspection, tests)."""
        return sum(1 for m in self._members if m)
