"""``CachedResult``: one search's answer as the L0 cache holds it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from streams.cache.keys import QueryKey
from streams.cache.policy import AdmissionDecision
from streams.index.filters import Filter
from streams.index.model import Metric, Vector

if TYPE_CHECKING:
    from streams.index.segment import Probe

__all__ = ["CachedResult", "estimate_nbytes", "trusted_result"]

_FIXED_BYTES = 320  # the record, its tuples and the cache's bookkeeping, estimated
_PER_HIT_BYTES = 120


@dataclass(frozen=True, slots=True)
class CachedResult:
    """The hits of searching ``index_key`` for the ``k`` best rows passing ``filter``,
    best first, as the node answered them (``labels`` the index rows, ``ids``/``metas``
    their payloads, ``scores`` in the metric's terms).

    ``applied``: the position tokens the node had applied when the search ran; the entry
    holds at every later position until the cache invalidates it. ``compute_ms``: what
    the fresh search cost (what a hit saves; for the admission policy). ``created_s``:
    ``time.monotonic()`` at creation. ``hit_count`` and ``admission`` are filled in by the
    cache (a :meth:`ResultCache.get` returns a copy with the current count). ``derived``:
    a memo of forms computed from the hits (they never change), shared by the copies.

    Raises ``ValueError`` when the hit tuples disagree in length or hold more than ``k``.
    The query vector is copied and made read-only.
    """

    key: QueryKey
    index_key: str
    metric: Metric
    vector: Vector
    k: int
    filter: Filter | None
    labels: tuple[int, ...]
    ids: tuple[str, ...]
    scores: tuple[float, ...]
    metas: tuple[str | None, ...]
    applied: tuple[str, ...] = ()
    compute_ms: float = 0.0
    created_s: float = 0.0
    hit_count: int = 0
    admission: AdmissionDecision | None = None
    # forms of the hits derived once and reused by every hit (the hot path's Hit
    # objects, a protocol's encoded reply): keyed by what they depend on (k, format)
    derived: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)
    # what an approximate answer depended on: (Tail segment name, IVF lists probed or
    # HNSW efSearch) per segment searched approximately (VectorIndex.search(record=True));
    # () for an exact one. Read by hits' debug maps and the query log, never by invalidation.
    depends: tuple[tuple[str, Probe], ...] = ()

    def __post_init__(self) -> None:
        n = len(self.ids)
        if not (len(self.labels) == len(self.scores) == len(self.metas) == n):
            raise ValueError("labels, ids, scores and metas must have one item per hit")
        if self.k < 1 or n > self.k:
            raise ValueError(f"k={self.k} with {n} hits")
        if not math.isfinite(sum(self.scores)) and any(  # sum: finite when all are (fast)
            not math.isfinite(s) for s in self.scores
        ):
            raise ValueError("scores must be finite")
        vec = self.vector
        if not (
            isinstance(vec, np.ndarray)
            and vec.dtype == np.float32
            and vec.ndim == 1
            and vec.flags.owndata
            and not vec.flags.writeable
        ):  # a copy made here
            vec = np.array(self.vector, dtype=np.float32, copy=True)
            if vec.ndim != 1:
                raise ValueError("the query vector must be one-dimensional")
            vec.flags.writeable = False
            object.__setattr__(self, "vector", vec)
        if not isinstance(self.metric, Metric):
            object.__setattr__(self, "metric", Metric(self.metric))

    @property
    def fewer_than_k(self) -> bool:
        """Fewer than ``k`` rows passed the filter: then any new row that passes it
        would enter this result."""
        return len(self.ids) < self.k

    @property
    def kth_score(self) -> float | None:
        """The score a new row must beat (or tie) to enter; None when :attr:`fewer_than_k`."""
        return None if self.fewer_than_k else self.scores[-1]

    @property
    def nbytes(self) -> int:
        """Estimated bytes this entry costs the cache: the query (fp32 here and float64 in
        the invalidation index), the hits with their payloads, and fixed overhead; plus,
        when the :class:`CacheController` offers it, its L1/L2 links (added to the memo)."""
        n = self.derived.get("nbytes")
        if n is None:  # asked by the policy, the cache and the query log: counted once
            hits = (
                sum(map(len, self.ids))
                + sum(map(len, filter(None, self.metas)))
                + _PER_HIT_BYTES * len(self.ids)
            )
            n = self.derived["nbytes"] = _FIXED_BYTES + 12 * int(self.vector.size) + hits
        return int(n)


def estimate_nbytes(dim: int, hits: int, chars: int) -> int:
    """:attr:`CachedResult.nbytes` (without link bytes) of an entry of a ``dim``-dimensional
    query with ``hits`` hits whose ids and metas hold ``chars`` characters together: what a
    lazy miss charges before the entry is built (:mod:`streams.cache.controller`)."""
    return _FIXED_BYTES + 12 * dim + chars + _PER_HIT_BYTES * hits


_FIELDS = tuple(f for f in CachedResult.__slots__ if f != "__weakref__")
_SETTERS = tuple(CachedResult.__dict__[name].__set__ for name in _FIELDS)


def trusted_result(
    key: QueryKey,
    index_key: str,
    metric: Metric,
    vector: Vector,
    k: int,
    flt: Filter | None,
    labels: tuple[int, ...],
    ids: tuple[str, ...],
    scores: tuple[float, ...],
    metas: tuple[str | None, ...],
    applied: tuple[str, ...],
    compute_ms: float,
    created_s: float,
    depends: tuple[tuple[str, Probe], ...] = (),
) -> CachedResult:
    """``CachedResult(...)`` for the search path, whose hits are its own: the fields set
    through their slots (a frozen dataclass's ``__init__`` pays ``object.__setattr__``
    per field, about two thirds of its cost). The cheap checks still run; input they
    refuse goes to the checked constructor, which raises as it always does. ``vector``
    must be a one-dimensional float32 row (it is copied read-only)."""
    n = len(ids)
    if (
        metric.__class__ is not Metric
        or not (len(labels) == len(scores) == len(metas) == n)
        or k < 1
        or n > k
        or not math.isfinite(sum(scores))
        or not isinstance(vector, np.ndarray)
        or vector.dtype != np.float32
        or vector.ndim != 1
    ):
        return CachedResult(
            key, index_key, metric, vector, k, flt, labels, ids, scores, metas, applied,
            compute_ms=compute_ms, created_s=created_s, depends=depends,
        )  # fmt: skip
    vec = vector.copy()
    vec.flags.writeable = False
    out = object.__new__(CachedResult)
    values: tuple[Any, ...] = (
        key, index_key, metric, vec, k, flt, labels, ids, scores, metas, applied,
        compute_ms, created_s, 0, None, {}, depends,
    )  # fmt: skip
    for set_field, value in zip(_SETTERS, values, strict=True):
        set_field(out, value)
    return out
