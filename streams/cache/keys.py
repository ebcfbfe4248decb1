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

import numpy as np

from streams.index.filters import Filter
from streams.index.model import Metric, Vector

__all__ = ["QueryKey", "query_key"]

DIGEST_BYTES = 16


@dataclass(frozen=True, slots=True)
class QueryKey:
    """A search's L0 key; ``str()`` is ``qk:<hex>`` (the query log's ``query_key``)."""

    digest: bytes

    def __post_init__(self) -> None:
        if len(self.digest) != DIGEST_BYTES:
            raise ValueError(f"a QueryKey is {DIGEST_BYTES} bytes, got {len(self.digest)}")

    def __str__(self) -> str:
        return "qk:" + self.digest.hex()


def query_key(
    index_key: str, metric: Metric, vector: Vector, k: int, filter: Filter | None
) -> QueryKey:
    """The key of searching ``index_key`` for the ``k`` best rows passing ``filter``."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES, person=b"streamvec.L0")
    raw = np.ascontiguousarray(vector, dtype="<f4").tobytes()
    for part in (index_key.encode(), Metric(metric).value.encode(), str(int(k)).encode(),
                 ("" if filter is None else str(filter)).encode(), raw):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return QueryKey(h.digest())
