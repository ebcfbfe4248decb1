"""A transport-agnostic :class:`Subscription` built on ``Log.read``: positions per
partition, round-robin over partitions, committed offsets per group.

The embedded log wakes it the moment an append lands (``wait_for_data``); any other log
is polled with ``read(timeout_s=...)`` on one partition at a time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from streams.log.port import Log, StoredRecord, Subscription

__all__ = ["PollingSubscription", "PositionTracking"]


@runtime_checkable
class _Wakeable(Protocol):
    def wait_for_data(
        self, timeout_s: float, since: dict[tuple[str, int], int]
    ) -> bool: ...


class PositionTracking(Subscription):
    """Positions per (topic, partition) and group commits, shared by the subscriptions of
    every transport. Subclasses fill ``_pos`` and implement ``poll`` and ``close``."""

    _log: Log
    _group: str | None
    _pos: dict[tuple[str, int], int]

    def positions(self) -> dict[tuple[str, int], int]:
        return dict(self._pos)

    def seek(self, topic: str, partition: int, offset: int) -> None:
        if (topic, partition) not in self._pos:
            raise KeyError(f"not subscribed to {topic}[{partition}]")
        self._pos[(topic, partition)] = offset

    def commit(self) -> None:
        if self._group is None:
            raise ValueError("a subscription without a group has nothing to commit to")
        self._log.commit(self._group, self._pos)


class PollingSubscription(PositionTracking):
    def __init__(
        self, log: Log, topics: Sequence[str], group: str | None, *, from_start: bool = True
    ) -> None:
        self._log = log
        self._group = group
        self._pos: dict[tuple[str, int], int] = {}
        for topic in topics:
            committed = log.committed(group, topic) if group else {}
            start = log.start_offsets(topic) if from_start else log.end_offsets(topic)
            for p, off in start.items():
                self._pos[(topic, p)] = committed.get(p, off)
        self._order = list(self._pos)
        self._next = 0

    def poll(self, max_records: int = 500, timeout_s: float = 0.0) -> list[StoredRecord]:
        deadline = time.monotonic() + timeout_s
        while True:
            out = self._poll_once(max_records)
            left = deadline - time.monotonic()
            if out or left <= 0:
                return out
            if isinstance(self._log, _Wakeable):
                self._log.wait_for_data(left, dict(self._pos))
            else:
                tp = self._order[self._next % len(self._order)]
                recs = self._log.read(tp[0], tp[1], self._pos[tp], max_records, min(left, 0.1))
                if recs:
                    self._pos[tp] = recs[-1].offset + 1
                    return recs

    def _poll_once(self, max_records: int) -> list[StoredRecord]:
        out: list[StoredRecord] = []
        n = len(self._order)
        for i in range(n):
            tp = self._order[(self._next + i) % n]
            recs = self._log.read(tp[0], tp[1], self._pos[tp], max_records - len(out))
            if recs:
                out.extend(recs)
                self._pos[tp] = recs[-1].offset + 1
                if len(out) >= max_records:
                    self._next = (self._next + i + 1) % n
                    break
        return out

    def close(self) -> None:
        self._pos.clear()
        self._order = []
