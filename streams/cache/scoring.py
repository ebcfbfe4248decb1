"""Scores as L0 invalidation computes them, and the margin that makes them safe.

The index ranks rows by fp32 scores of prepared vectors (unit length for cosine) and
breaks ties by label. Invalidation recomputes scores in float64 and counts a vector as
entering a result when it comes within a margin of the result's k-th score:
``score_margin(dim) * |q||v|`` for cosine and inner product, ``score_margin(dim) *
(|q| + |v|)**2`` for squared L2 (prepared vectors). The margin is twice a bound on the
rounding error of the index's fp32 scoring, so every vector the index would rank at or
above the k-th hit (ties included) is counted as entering; a vector within the margin but
truly below costs one needless invalidation.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from streams.index.model import Metric, Vector

__all__ = [
    "F64",
    "Bools",
    "pair_test",
    "prepare64",
    "score_margin",
    "threshold_of",
    "would_enter",
]

F64 = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]

_FP32_UNIT = 2.0**-24


def score_margin(dim: int) -> float:
    """g: twice a bound on the relative rounding error of an fp32 score over ``dim``
    dimensions (dot product ~dim units, preparing both vectors ~dim/2 + 3 units each)."""
    return 4.0 * (dim + 8) * _FP32_UNIT


def prepare64(vectors: npt.ArrayLike, metric: Metric) -> F64:
    """``vectors`` (n x dim) in float64 as the metric scores them: unit rows for cosine
    (a zero row stays zero), unchanged otherwise."""
    out = np.array(vectors, dtype=np.float64, ndmin=2, copy=True)
    if metric is Metric.COSINE:
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
    return out


def threshold_of(kth: float | None, metric: Metric) -> float:
    """The k-th score a new row must reach; +-inf when the entry has fewer than k hits."""
    if kth is None:
        return -math.inf if metric.higher_is_better else math.inf
    return float(kth)


def pair_test(metric: Metric, g: float, dots: F64, qsq: F64, vsq: F64, thr: F64) -> Bools:
    """``dots[i, j] = q_i . v_j`` (prepared) -> whether v_j would enter entry i."""
    if metric.higher_is_better:
        margin = g * np.sqrt(qsq)[:, None] * np.sqrt(vsq)[None, :]
        out: Bools = dots + margin >= thr[:, None]
        return out
    dist = qsq[:, None] - 2.0 * dots + vsq[None, :]
    margin = g * (np.sqrt(qsq)[:, None] + np.sqrt(vsq)[None, :]) ** 2
    out = dist - margin <= thr[:, None]
    return out


def would_enter(
    metric: Metric, query: Vector, kth: float | None, vectors: npt.ArrayLike
) -> Bools:
    """Per row of ``vectors`` (raw, n x dim): whether it scores well enough to enter the
    result of ``query`` whose k-th score is ``kth`` (None: fewer than k hits). The score
    test only (rule (b) of :mod:`streams.cache.invalidation`); the filter is the caller's."""
    q = prepare64(query, metric)
    v = prepare64(vectors, metric)
    if q.shape[1] != v.shape[1]:
        raise ValueError(f"dims differ: query {q.shape[1]}, vectors {v.shape[1]}")
    thr = np.array([threshold_of(kth, metric)])
    g = score_margin(q.shape[1])
    qsq = np.einsum("ij,ij->i", q, q)
    vsq = np.einsum("ij,ij->i", v, v)
    out: Bools = pair_test(metric, g, q @ v.T, qsq, vsq, thr)[0]
    return out
