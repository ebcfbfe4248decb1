"""How far the node has applied the log, and waiting for it (the consistency levels).

``positions`` maps (topic, partition) to the next offset to apply. A write's token
``topic:partition:offset`` is applied once ``positions[(topic, partition)] > offset``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

from streams.log.port import LogPosition

__all__ = ["AppliedPositions"]


class AppliedPositions:
    def __init__(self, initial: Mapping[tuple[str, int], int] | None = None) -> None:
        self._pos: dict[tuple[str, int], int] = dict(initial or {})
        self._cv = threading.Condition()
        self.caught_up_at: float = 0.0  # monotonic time the applier last saw no backlog

    def snapshot(self) -> dict[tuple[str, int], int]:
        with self._cv:
            return dict(self._pos)

    def tokens(self) -> list[str]:
        """The applied positions as tokens of the last applied offset per partition."""
        return [LogPosition(t, p, off - 1).token for (t, p), off in sorted(self.snapshot().items())
                if off > 0]

    def advance(self, positions: Mapping[tuple[str, int], int], *, caught_up: bool) -> None:
        with self._cv:
            for tp, off in positions.items():
                if off > self._pos.get(tp, 0):
                    self._pos[tp] = off
            if caught_up:
                self.caught_up_at = time.monotonic()
            self._cv.notify_all()

    def reached(self, targets: Mapping[tuple[str, int], int]) -> bool:
        """Whether every (topic, partition) has applied at least up to ``targets`` (next
        offsets, exclusive)."""
        return all(self._pos.get(tp, 0) >= off for tp, off in targets.items())

    def wait(self, targets: Mapping[tuple[str, int], int], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while not self.reached(targets):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
            return True

    def wait_fresh(self, bound_ms: float, timeout_s: float) -> bool:
        """Wait until the applier was caught up within the last ``bound_ms``."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while time.monotonic() - self.caught_up_at > bound_ms / 1000:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.01))
            return True
