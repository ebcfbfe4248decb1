"""``QueryKey``: the L0 cache's key of one search.

The key is a 16-byte BLAKE2b digest of, each length-prefixed so that no two different
inputs concatenate to the same bytes: the index key (``tenant/index``), the metric, ``k``,
the filter's canonical string (``""`` without one, see :class:`Filter`) and the query
vector's fp32 little-endian bytes. Equal keys mean the same search of the same index;
two vectors that compare equal but differ in bytes (``0.0`` and ``-0.0``) get different
keys, which costs a miss, never a wrong hit.

Consistency is deliberately not part of the key. An entry records the applied positions
it saw, and it stays valid at every applied position from that one on until a write that
would change it is applied: the applier invalidates it before it advances its positions
(:mod:`streams.cache.result_cache`). So a search at any level first waits for its own
level, then may be answered from the entry.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from streams.index.filters import Filter
from streams.index.model import Metric, Vector

__all__ = ["QueryKey", "query_key"]

DIGEST_BYTES = 16


@dataclass(frozen=True, slots=True)
class QueryKey:
    """A search's L0 key; ``str()`` is ``qk:<hex>`` (the query log's ``query_key``).

    ``__hash__``/``__eq__`` are written out: the generated ones build a one-item tuple per
    call, and a miss hashes its key about twenty times (the cache's maps, the
    invalidation index's id sets, the L1/L2 links)."""

    digest: bytes

    def __post_init__(self) -> None:
        if len(self.digest) != DIGEST_BYTES:
            raise ValueError(f"a QueryKey is {DIGEST_BYTES} bytes, got {len(self.digest)}")

    def __hash__(self) -> int:
        return hash(self.digest)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is QueryKey:
            return self.digest == other.digest
        return NotImplemented

    def __str__(self) -> str:
        return "qk:" + self.digest.hex()


def _part(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little") + data


@lru_cache(maxsize=4096)
def _prefix(index_key: str, metric: str, k: int, filter: Filter | None) -> Any:
    """The hasher fed with everything but the vector (searches of one index, ``k`` and
    filter share it; :func:`query_key` copies it)."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES, person=b"streamvec.L0")
    h.update(
        _part(index_key.encode())
        + _part(Metric(metric).value.encode())
        + _part(str(int(k)).encode())
        + _part(("" if filter is None else str(filter)).encode())
    )
    return h


def query_key(
    index_key: str, metric: Metric, vector: Vector, k: int, filter: Filter | None
) -> QueryKey:
    """The key of searching ``index_key`` for the ``k`` best rows passing ``filter``."""
    # ``metric`` as given (a Metric is a str): equal values share one cache line
    h = _prefix(index_key, metric, k, filter).copy()
    raw = np.ascontiguousarray(vector, dtype="<f4").tobytes()
    h.update(len(raw).to_bytes(8, "little"))
    h.update(raw)
    key = object.__new__(QueryKey)  # a blake2b digest of DIGEST_BYTES: no check needed
    object.__setattr__(key, "digest", h.digest())
    return key
