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

Cost split. ``add`` and ``remove`` run on the search path (a miss's offer, an eviction)
and do O(1) work with no numpy arithmetic: ``add`` records the key, the query array as
given (read-only, as the cache's entries hold it), the threshold, filter and ids in
preallocated slots (doubling growth). The next write-side call (``affected_by_ids`` or
``affected_by_upserts``, on the indexer thread, under the cache's lock as every call)
converts the recorded queries in one pass, indexes their ids, and settles them into
clusters: each joins its nearest centre (one matrix product for all; outliers open new
clusters). After as many changes as there were entries at the last fit
(at least 32), new centres are fitted (k-means++ on a sample, a few Lloyd steps) on a
thread from a copy of the queries; the thread also assigns that snapshot's entries and
computes each new cluster's bounds over them. The next write after it finishes swaps them
in: snapshot entries still tracked (same slot, same add) keep their fitted cluster, whose
bounds cover every snapshot member (one removed since only loosens them); entries added
since join like pending ones. So neither the k-means nor the centre search is ever paid
by a search, and the cache's lock is held for the swap (O(entries), no product over
them), not the fit.

Not thread-safe: :class:`ResultCache` holds its lock around every call.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from streams.cache.keys import QueryKey
from streams.cache.scoring import F64, Bools, pair_test, prepare64, score_margin, threshold_of
from streams.index.filters import Filter
from streams.index.model import Metric, Vector

__all__ = ["InvalidationIndex", "UpsertRow"]

log = logging.getLogger(__name__)

I64 = npt.NDArray[np.int64]

_SLACK = 1e-9  # relative slack on bounds against float64 rounding
_TINY = 1e-30
_MIN_REBUILD = 32
_OUTLIER = 2.0  # farther than this many cluster radii from the nearest centre: new cluster
_KMEANS_STEPS = 5
_KMEANS_SAMPLE = 4096
_SEED_SAMPLE = 1024  # k-means++ seeds from at most this many points


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
    squared distance from the nearest centre so far (separated groups all get one).
    Distances by one matvec per centre (``|p|^2 - 2 p.c + |c|^2``)."""
    psq = np.einsum("ij,ij->i", points, points)
    first = points[rng.integers(points.shape[0])]
    centres = [first]
    dsq = np.maximum(psq - 2.0 * (points @ first) + float(first @ first), 0.0)
    for _ in range(1, min(k, points.shape[0])):
        total = float(dsq.sum())
        if total <= 0.0:
            break
        nxt = points[rng.choice(points.shape[0], p=dsq / total)]
        centres.append(nxt)
        d = np.maximum(psq - 2.0 * (points @ nxt) + float(nxt @ nxt), 0.0)
        np.minimum(dsq, d, out=dsq)
    return np.array(centres, dtype=np.float64)


def _nearest(points: F64, centres: F64) -> I64:
    """Index of the nearest centre of each point (squared distance, one product)."""
    dsq = np.einsum("ij,ij->i", centres, centres)[None, :] - 2.0 * points @ centres.T
    return np.asarray(np.argmin(dsq, axis=1), dtype=np.int64)


def _fit_centres(points: F64, k: int, seed: int) -> F64:
    """Cluster centres for ``points``: k-means++ seeds from a sample, then a few Lloyd
    steps on a larger sample (sums by ``np.add.reduceat``). Pure: runs off the cache's lock."""
    rng = np.random.default_rng(seed)
    n = points.shape[0]
    sample = points[rng.choice(n, min(n, _KMEANS_SAMPLE), replace=False)]
    centres = _kmeans_pp(sample[: min(sample.shape[0], _SEED_SAMPLE)], k, rng)
    for _ in range(_KMEANS_STEPS):
        near = _nearest(sample, centres)
        order = np.argsort(near, kind="stable")
        sorted_near = near[order]
        starts = np.flatnonzero(np.r_[True, sorted_near[1:] != sorted_near[:-1]])
        sums = np.add.reduceat(sample[order], starts, axis=0)
        counts = np.diff(np.r_[starts, sorted_near.size])
        centres[sorted_near[starts]] = sums / counts[:, None]
    return centres


class _Fit:
    """A cluster fit running on a thread over a snapshot of the entries (``slots`` and
    their add ``gens``): the centres, each snapshot entry's cluster and every cluster's
    bounds over its snapshot members, all set (``centres`` None on failure) before
    ``done``."""

    __slots__ = ("centres", "cluster", "done", "gens", "maxnorm", "radius", "slots", "weakest")

    def __init__(self, slots: I64, gens: I64) -> None:
        self.slots = slots
        self.gens = gens
        self.centres: F64 | None = None
        self.cluster: I64 | None = None
        self.radius: F64 | None = None
        self.maxnorm: F64 | None = None
        self.weakest: F64 | None = None
        self.done = threading.Event()

    def run(self, points: F64, qsq: F64, thr: F64, k: int, higher: bool) -> None:
        """The thread's work: centres, assignment and exact bounds (what
        :meth:`InvalidationIndex._apply` computes under the lock, done here off it)."""
        centres = _fit_centres(points, k, points.shape[0])
        near = _nearest(points, centres)
        used = np.unique(near)
        renumber = np.full(centres.shape[0], -1, dtype=np.int64)
        renumber[used] = np.arange(used.size)
        cluster = renumber[near]
        centres = centres[used]
        order = np.argsort(cluster, kind="stable")
        starts = np.searchsorted(cluster[order], np.arange(used.size))
        dist = np.sqrt(((points - centres[cluster]) ** 2).sum(axis=1))
        self.radius = np.maximum.reduceat(dist[order], starts) * (1 + _SLACK) + _TINY
        self.maxnorm = np.sqrt(np.maximum.reduceat(qsq[order], starts)) * (1 + _SLACK) + _TINY
        reduce = np.minimum if higher else np.maximum
        self.weakest = reduce.reduceat(thr[order], starts)
        self.cluster = cluster
        self.centres = centres


class InvalidationIndex:
    """The cached queries of one index (all of one metric and dim), answering which of
    them a batch of writes changes (see the module docstring for the argument).

    ``add``/``remove`` keep it in step with the cache (O(1), for the search path);
    ``affected_by_upserts`` settles pending entries into clusters, then returns keys;
    ``affected_by_ids`` changes nothing. ``checked_pairs`` counts the (entry, vector)
    pairs tested exactly, ``scanned_pairs`` those a full scan would have.
    """

    def __init__(
        self, metric: Metric, dim: int, *, max_clusters: int = 64, background: bool = True
    ) -> None:
        if dim < 1 or max_clusters < 1:
            raise ValueError("dim >= 1 and max_clusters >= 1")
        self.metric = Metric(metric)
        self._higher = self.metric.higher_is_better
        self._cosine = self.metric is Metric.COSINE
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
        self._cluster_of: list[int] = [-1] * cap  # -1: pending (or free)
        self._gen: list[int] = [0] * cap  # adds into each slot (a fit's snapshot check)
        self._slot: dict[QueryKey, int] = {}
        self._free: list[int] = list(range(cap - 1, -1, -1))
        self._by_id: dict[str, set[QueryKey]] = {}
        self._raw: dict[int, npt.NDArray[Any]] = {}  # slot -> query as added (not absorbed)
        self._pending: dict[int, None] = {}  # absorbed slots not yet in a cluster
        self._set_clusters(np.zeros((0, dim)))
        self._changes = 0
        self._rebuilt_at = 0  # entries at the last rebuild
        self.background = background  # re-fit the clusters on a thread (module docstring)
        self._fit: _Fit | None = None
        self.rebuilds = 0
        self.checked_pairs = 0
        self.scanned_pairs = 0

    # -- membership (the search path: O(1), no clustering) -----------------------------

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
        and hit ids. Replaces an entry of the same key. Only recorded here: the next
        write-side call converts the query and indexes the ids (module docstring). A
        writeable ``query`` is copied (a read-only one, as :class:`CachedResult` holds,
        is kept as it is)."""
        q = np.asarray(query)
        if q.size != self.dim:
            raise ValueError(f"query of dim {q.size}, index dim {self.dim}")
        if q.flags.writeable:
            q = q.copy()
        if key in self._slot:
            self.remove(key)
        if not self._free:
            self._grow()
        slot = self._free.pop()
        self._thr[slot] = threshold_of(kth, self.metric)
        self._keys[slot] = key
        self._filters[slot] = filter
        self._ids[slot] = tuple(ids)
        self._gen[slot] += 1
        self._slot[key] = slot
        self._raw[slot] = q
        self._changes += 1

    def remove(self, key: QueryKey) -> bool:
        """Stop tracking ``key``; False if it was not tracked. The cluster's bounds are
        left as they were (only looser)."""
        slot = self._slot.pop(key, None)
        if slot is None:
            return False
        if self._raw.pop(slot, None) is None:  # its ids were indexed
            for id in self._ids[slot]:
                keys = self._by_id.get(id)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del self._by_id[id]
            c = self._cluster_of[slot]
            if c < 0:
                del self._pending[slot]
            else:
                self._members[c].discard(slot)
                self._member_arrays[c] = None
                self._cluster_of[slot] = -1
        self._keys[slot] = None
        self._filters[slot] = None
        self._ids[slot] = ()
        self._free.append(slot)
        self._changes += 1
        return True

    def _absorb(self) -> None:
        """The write side's first step: the queries recorded by :meth:`add` into the
        float64 buffers (unit rows for cosine, one pass for all) and their hit ids into
        the id index; they become pending (unclustered)."""
        if not self._raw:
            return
        slots = np.fromiter(self._raw, dtype=np.int64, count=len(self._raw))
        q = prepare64(np.stack([v.reshape(self.dim) for v in self._raw.values()]), self.metric)
        self._q[slots] = q
        self._qsq[slots] = np.einsum("ij,ij->i", q, q)
        by_id = self._by_id
        for slot in slots.tolist():
            key = self._keys[slot]
            assert key is not None
            for id in self._ids[slot]:
                keys = by_id.get(id)
                if keys is None:
                    by_id[id] = {key}
                else:
                    keys.add(key)
            self._pending[slot] = None
        self._raw.clear()

    # -- queries -----------------------------------------------------------------------

    def affected_by_ids(self, ids: Iterable[str]) -> set[QueryKey]:
        """Entries whose result holds any of ``ids`` (rule (a)); absorbs added entries."""
        self._absorb()
        out: set[QueryKey] = set()
        for id in ids:
            keys = self._by_id.get(id)
            if keys:
                out |= keys
        return out

    def affected_by_upserts(
        self,
        vectors: npt.ArrayLike,
        tags: Sequence[Sequence[str]],
        numerics: Sequence[Mapping[str, float]],
    ) -> set[QueryKey]:
        """Entries that any of the upserted rows would enter (rule (b)); ``vectors`` is
        n x dim raw, ``tags``/``numerics`` one per row. The caller adds rule (a) for the
        rows' ids (:meth:`affected_by_ids`). Settles pending entries first."""
        v = prepare64(vectors, self.metric)
        n = v.shape[0]
        if v.shape[1] != self.dim or len(tags) != n or len(numerics) != n:
            raise ValueError("vectors, tags and numerics must have one row each, of dim")
        out: set[QueryKey] = set()
        if n == 0 or not self._slot:
            return out
        self.settle()
        self.scanned_pairs += n * len(self._slot)
        vsq = np.einsum("ij,ij->i", v, v)
        active = [c for c in range(len(self._members)) if self._members[c]]
        cand = self._candidates(np.array(active, dtype=np.int64), v, vsq)
        memo: dict[tuple[Filter, int], bool] = {}
        for row, c in enumerate(active):
            cols = np.flatnonzero(cand[row])
            if cols.size:
                self._test(self._member_array(c), cols, v, vsq, tags, numerics, memo, out)
        return out

    def _test(
        self,
        members: I64,
        cols: I64,
        v: F64,
        vsq: F64,
        tags: Sequence[Sequence[str]],
        numerics: Sequence[Mapping[str, float]],
        memo: dict[tuple[Filter, int], bool],
        out: set[QueryKey],
    ) -> None:
        """Exact test of entries ``members`` against rows ``cols``; adds the keys hit."""
        self.checked_pairs += members.size * cols.size
        ok = pair_test(
            self.metric,
            self._g,
            self._q[members] @ v[cols].T,
            self._qsq[members],
            vsq[cols],
            self._thr[members],
        )
        for i in np.flatnonzero(ok.any(axis=1)).tolist():
            key = self._keys[int(members[i])]
            assert key is not None
            if key in out:
                continue
            flt = self._filters[int(members[i])]
            for j in cols[ok[i]].tolist():
                if flt is None or _passes(flt, j, tags, numerics, memo):
                    out.add(key)
                    break

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

    # -- clusters (the write side) -------------------------------------------------------

    def settle(self) -> None:
        """Put every pending entry into a cluster (the write side; the search path never
        calls it). First, clusters fitted on a thread since the last call are swapped in
        (:meth:`_swap`). When the clusters are stale (as many changes as entries at the
        last fit, at least ``_MIN_REBUILD``) a new fit starts on a snapshot of the queries
        (``background``; else at once), or at once when there are no clusters yet. The
        rest join their nearest centre in one matrix product; an outlier (farther than
        ``_OUTLIER`` times the larger of that cluster's radius and the median radius) opens
        a new cluster while there are fewer than ``max_clusters``. Called by
        :meth:`affected_by_upserts`; callable on its own to take the work off the next
        write."""
        self._absorb()
        fit = self._fit
        if fit is not None and fit.done.is_set():
            self._fit = None
            if fit.centres is not None and self._slot:
                self._swap(fit)
        if not self._slot:
            return
        stale = self._changes > max(_MIN_REBUILD, self._rebuilt_at)
        if not self._centres.shape[0] or (stale and not self.background):
            self.rebuild()
            return
        if stale and self._fit is None:
            self._start_fit()
        if not self._pending:
            return
        slots = np.fromiter(self._pending, dtype=np.int64, count=len(self._pending))
        self._pending.clear()
        points = self._q[slots]
        cen = self._centres
        dsq = np.einsum("ij,ij->i", cen, cen)[None, :] - 2.0 * points @ cen.T
        near = np.argmin(dsq, axis=1)
        psq = np.einsum("ij,ij->i", points, points)
        dist = np.sqrt(np.maximum(dsq[np.arange(slots.size), near] + psq, 0.0))
        typical = float(np.median(self._radius))
        outlier = dist > _OUTLIER * np.maximum(self._radius[near], typical)
        if cen.shape[0] >= self.max_clusters:
            outlier[:] = False
        for c in np.unique(near[~outlier]).tolist():
            self._join(c, slots[(near == c) & ~outlier])
        for s in slots[outlier].tolist():  # rare: one by one, each may open a cluster
            self._assign_one(s)

    def _start_fit(self) -> None:
        """Fit new clusters on a thread, from a copy of the entries now tracked (all
        absorbed: :meth:`settle` absorbs first)."""
        slots = np.fromiter(self._slot.values(), dtype=np.int64, count=len(self._slot))
        gens = np.array([self._gen[s] for s in slots.tolist()], dtype=np.int64)
        # copies: the thread never reads the live buffers
        points, qsq, thr = self._q[slots], self._qsq[slots], self._thr[slots]
        self._changes = 0
        self._rebuilt_at = slots.size
        fit = self._fit = _Fit(slots, gens)
        k, higher = self._target_clusters(), self._higher

        def work() -> None:
            try:
                fit.run(points, qsq, thr, k, higher)
            except Exception:  # the old clusters stay, sound; the next stale settle retries
                fit.centres = None
                log.exception("invalidation index: cluster fit failed")
            finally:
                fit.done.set()

        threading.Thread(target=work, name="cache-invalidation-fit", daemon=True).start()

    def _swap(self, fit: _Fit) -> None:
        """Make a finished fit the clusters, under the caller's lock: its snapshot entries
        still tracked (same slot, same add) take their fitted cluster, whose bounds cover
        every snapshot member (removed ones only loosen them); entries added since are
        left pending for :meth:`settle` to join. O(entries), no product over them."""
        assert fit.centres is not None and fit.cluster is not None
        assert fit.radius is not None and fit.maxnorm is not None and fit.weakest is not None
        self.rebuilds += 1
        self._set_clusters(fit.centres)
        self._radius, self._maxnorm, self._weakest = fit.radius, fit.maxnorm, fit.weakest
        gen, keys, cluster_of, members = self._gen, self._keys, self._cluster_of, self._members
        kept: set[int] = set()
        for s, g, c in zip(
            fit.slots.tolist(), fit.gens.tolist(), fit.cluster.tolist(), strict=True
        ):
            if gen[s] == g and keys[s] is not None:  # not removed (nor re-added) since
                members[c].add(s)
                cluster_of[s] = c
                kept.add(s)
        self._pending = {s: None for s in self._slot.values() if s not in kept}
        for s in self._pending:  # their old clusters are gone; settle joins them next
            cluster_of[s] = -1

    def wait_fit(self, timeout: float | None = None) -> bool:
        """Wait for a background fit to finish (tests); True if none is running. The
        next :meth:`settle` swaps it in."""
        fit = self._fit
        return fit is None or fit.done.wait(timeout)

    def _assign_one(self, slot: int) -> None:
        q = self._q[slot]
        n = self._centres.shape[0]
        d = np.linalg.norm(self._centres - q, axis=1)
        c = int(np.argmin(d))
        if n < self.max_clusters and d[c] > _OUTLIER * max(
            float(self._radius[c]), float(np.median(self._radius))
        ):
            self._add_cluster(q)
            c = n
        self._join(c, np.array([slot], dtype=np.int64))

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

    def _add_cluster(self, centre: F64) -> None:
        self._centres = np.vstack([self._centres, centre[None, :]])
        self._radius = np.append(self._radius, 0.0)
        self._maxnorm = np.append(self._maxnorm, 0.0)
        worst = math.inf if self._higher else -math.inf
        self._weakest = np.append(self._weakest, worst)
        self._members.append(set())
        self._member_arrays.append(None)

    def _join(self, c: int, slots: I64) -> None:
        """Add ``slots`` to cluster ``c``, widening its bounds to cover them."""
        q = self._q[slots]
        radius = float(np.sqrt(((q - self._centres[c]) ** 2).sum(axis=1).max()))
        norm = float(np.sqrt(self._qsq[slots].max()))
        thr = self._thr[slots]
        self._radius[c] = max(self._radius[c], radius * (1 + _SLACK) + _TINY)
        self._maxnorm[c] = max(self._maxnorm[c], norm * (1 + _SLACK) + _TINY)
        if self._higher:
            self._weakest[c] = min(self._weakest[c], float(thr.min()))
        else:
            self._weakest[c] = max(self._weakest[c], float(thr.max()))
        members = slots.tolist()
        self._members[c].update(members)
        self._member_arrays[c] = None
        for s in members:
            self._cluster_of[s] = c

    def _member_array(self, c: int) -> I64:
        arr = self._member_arrays[c]
        if arr is None:
            arr = self._member_arrays[c] = np.fromiter(self._members[c], dtype=np.int64)
        return arr

    def rebuild(self) -> None:
        """Re-fit the clusters (k-means, a few steps on a sample) over every entry,
        pending ones included, and recompute every bound exactly, at once (a fit running
        on a thread is dropped). :meth:`settle` calls it for the first clusters, and when
        stale with ``background`` off."""
        self._absorb()
        self._fit = None
        self._changes = 0
        self._rebuilt_at = len(self._slot)
        if not self._slot:
            self._pending.clear()
            self._set_clusters(np.zeros((0, self.dim)))
            return
        slots = np.fromiter(self._slot.values(), dtype=np.int64, count=len(self._slot))
        self._apply(_fit_centres(self._q[slots], self._target_clusters(), slots.size))

    def _apply(self, centres: F64) -> None:
        """Make ``centres`` the clusters: every tracked entry (pending ones included) to
        its nearest, empty ones dropped, bounds recomputed exactly."""
        self.rebuilds += 1
        self._pending.clear()
        slots = np.fromiter(self._slot.values(), dtype=np.int64, count=len(self._slot))
        near = _nearest(self._q[slots], centres)
        used = np.unique(near)
        self._set_clusters(centres[used])
        renumber = np.full(centres.shape[0], -1, dtype=np.int64)
        renumber[used] = np.arange(used.size)
        mine = renumber[near]
        order = np.argsort(mine, kind="stable")
        bounds = np.searchsorted(mine[order], np.arange(used.size + 1))
        for c in range(used.size):
            self._join(c, slots[order[bounds[c] : bounds[c + 1]]])

    def _grow(self) -> None:
        old = self._q.shape[0]
        cap = 2 * old
        q = np.zeros((cap, self.dim), dtype=np.float64)
        q[:old] = self._q
        self._q = q
        self._qsq = np.concatenate([self._qsq, np.zeros(old)])
        self._thr = np.concatenate([self._thr, np.zeros(old)])
        self._keys += [None] * old
        self._filters += [None] * old
        self._ids += [()] * old
        self._cluster_of += [-1] * old
        self._gen += [0] * old
        self._free.extend(range(cap - 1, old - 1, -1))

    def clusters(self) -> int:
        """Clusters with at least one member (introspection, tests)."""
        return sum(1 for m in self._members if m)

    def pending(self) -> int:
        """Entries not yet in a cluster (introspection, tests)."""
        return len(self._pending) + len(self._raw)
