"""L1: the tolerant key. Near-identical query vectors share one key, so one cached
result answers all of them.

The key is a BLAKE2b digest (person ``streamvec.L1``) of the index key, metric, filter,
the topK *bucket* (``k`` rounded up to 5, 10, 20, 50, 100; above 100 ``k`` itself) and the
query's SimHash: the signs of ``bits`` fixed random projections of the vector (unit length
first). Two vectors at angle ``t`` get the same SimHash with probability ``(1 - t/pi)**bits``
(64 bits: 0.82 at 0.01 rad, 0.13 at 0.1 rad). For cosine a positive rescaling of the query
keeps its key, as it keeps its result; for inner product and L2, where it does not, the key
also holds the norm rounded to a sixteenth of an octave (``log2`` quantised).

An L1 key points at a cached result (its :class:`QueryKey`) holding ``k_e`` hits; a query
of the same bucket with ``k <= k_e`` is served the first ``k``. The result was computed for
another vector, so L1 is tolerant: the node serves it only where the consistency level
allows an approximate answer (:class:`CacheController`).

The projections depend only on ``(dim, bits, seed)``, so every node and every restart maps a
vector to the same key. Pure numpy, no state beyond the cached projection matrices.
"""

from __future__ import annotations

import hashlib
import math
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from streams.index.filters import Filter
from streams.index.model import Metric

__all__ = ["K_BUCKETS", "SIMHASH_BITS", "TolerantKey", "k_bucket", "simhash", "tolerant_key"]

K_BUCKETS = (5, 10, 20, 50, 100)
SIMHASH_BITS = 64
_SEED = 0x5EC7
_NORM_STEPS_PER_OCTAVE = 16

TolerantKey = bytes


def k_bucket(k: int) -> int:
    """``k`` rounded up to the next of :data:`K_BUCKETS`; ``k`` itself above 100."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    for b in K_BUCKETS:
        if k <= b:
            return b
    return k


@lru_cache(maxsize=64)
def _planes(dim: int, bits: int) -> npt.NDArray[np.float32]:
    rng = np.random.default_rng([_SEED, dim, bits])
    planes = rng.standard_normal((bits, dim)).astype(np.float32)
    planes.flags.writeable = False
    return planes


def _unit32(vector: npt.ArrayLike) -> tuple[npt.NDArray[np.float32], float]:
    """``vector`` as a flat fp32 row scaled to unit length (when its norm is positive and
    finite), and that norm."""
    v = np.asarray(vector, dtype=np.float32).ravel()
    norm = math.sqrt(float(v @ v))  # what np.linalg.norm computes, without its checks
    if norm > 0.0 and math.isfinite(norm):
        v = v / np.float32(norm)
    return v, norm


def _bits(unit: npt.NDArray[np.float32], bits: int) -> bytes:
    """The signs of the projections of a unit row: one matvec and ``np.packbits``."""
    proj = _planes(unit.size, bits) @ unit
    return np.packbits(proj >= 0.0).tobytes()


def simhash(vector: npt.ArrayLike, bits: int = SIMHASH_BITS) -> bytes:
    """The SimHash of ``vector``: bit i is set when projection i is >= 0 (a zero vector
    hashes to all ones). Invariant under positive scaling and under ``-0.0`` vs ``0.0``."""
    return _bits(_unit32(vector)[0], bits)


@lru_cache(maxsize=4096)
def _prefix(index_key: str, metric: Metric, bucket: int, flt: Filter | None) -> hashlib.blake2b:
    """The digest state after the key's fixed parts; a key copies it and adds the
    SimHash (and the norm step), so the filter's text and the rest are hashed once."""
    h = hashlib.blake2b(digest_size=16, person=b"streamvec.L1")
    for part in (
        index_key.encode(),
        metric.value.encode(),
        str(bucket).encode(),
        ("" if flt is None else str(flt)).encode(),
    ):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h


def tolerant_key(
    index_key: str,
    metric: Metric,
    vector: npt.ArrayLike,
    k: int,
    flt: Filter | None,
    bits: int = SIMHASH_BITS,
) -> TolerantKey:
    """The L1 key of a search (module docstring). Cost: one fp32 matvec of ``bits`` x
    dim, a copy of a cached digest state and one or two updates."""
    metric = Metric(metric)
    unit, norm = _unit32(vector)
    h = _prefix(index_key, metric, k_bucket(k), flt).copy()
    parts = [_bits(unit, bits)]
    if metric is not Metric.COSINE:
        step = -(2**31) if norm == 0.0 else math.floor(math.log2(norm) * _NORM_STEPS_PER_OCTAVE)
        parts.append(str(step).encode())
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()
