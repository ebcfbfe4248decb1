"""Kafka's default partitioner, so a key lands on the same partition number in both
transports and in any Java or librdkafka (``partitioner=murmur2_random``) producer.

``murmur2`` is a port of ``org.apache.kafka.common.utils.Utils.murmur2`` (seed 0x9747b28c)
and ``to_positive`` of ``Utils.toPositive``; tests check Kafka's own test vectors.
"""

from __future__ import annotations

import itertools
import threading

__all__ = ["default_partition", "murmur2", "to_positive"]

_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """32-bit murmur2 of ``data`` as Kafka computes it, returned as a signed int."""
    length = len(data)
    h = (0x9747B28C ^ length) & _MASK
    n4 = length // 4
    for i in range(n4):
        j = i * 4
        k = data[j] | (data[j + 1] << 8) | (data[j + 2] << 16) | (data[j + 3] << 24)
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = (h * _M) & _MASK
        h ^= k
    rest = length % 4
    tail = n4 * 4
    if rest == 3:
        h ^= data[tail + 2] << 16
    if rest >= 2:
        h ^= data[tail + 1] << 8
    if rest >= 1:
        h ^= data[tail]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def to_positive(n: int) -> int:
    return n & 0x7FFFFFFF


_round_robin = itertools.count()
_rr_lock = threading.Lock()


def default_partition(key: bytes | None, partitions: int) -> int:
    """murmur2 of the key modulo the partition count; round robin for a ``None`` key."""
    if key is None:
        with _rr_lock:
            return next(_round_robin) % partitions
    return to_positive(murmur2(key)) % partitions
