"""What the capacity manager knows of one index between scans (``Ledger``) and of one
record during a tick (``Row``)."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from streams.capacity.budget import Usage
from streams.log.port import LogPosition
from streams.service.state import Entry

__all__ = ["Ledger", "Row"]


@dataclass(slots=True)
class Row:
    """One record of an index as a tick sees it."""

    id: str
    entry: Entry
    importance: float
    text_only: bool
    nbytes: int

    @property
    def vectors(self) -> int:
        return 0 if self.text_only else 1


@dataclass(slots=True)
class Ledger:
    """What the manager knows of one index's usage: an exact scan of the state as of the
    applied positions ``at`` plus the new ids admitted since (not yet in the scan)."""

    scanned: Usage = field(default_factory=Usage)
    at: dict[tuple[str, int], int] = field(default_factory=dict)
    scanned_s: float = 0.0
    pending: list[tuple[LogPosition, int, int]] = field(default_factory=list)
    pending_usage: Usage = field(default_factory=Usage)  # the sum over ``pending``
    tightened: bool = False
    refused: int = 0
    actions: Counter[str] = field(default_factory=Counter)
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=20))

    def estimate(self) -> Usage:
        return self.scanned.plus(self.pending_usage.vectors, self.pending_usage.bytes)

    def add_pending(self, pos: LogPosition, vectors: int, nbytes: int) -> None:
        self.pending.append((pos, vectors, nbytes))
        self.pending_usage = self.pending_usage.plus(vectors, nbytes)

    def set_pending(self, pending: list[tuple[LogPosition, int, int]]) -> None:
        self.pending = pending
        self.pending_usage = Usage(sum(p[1] for p in pending), sum(p[2] for p in pending))
