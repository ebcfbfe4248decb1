"""L3: the payload cache. The payload join of a fresh search (index row label -> id and
meta, a RocksDB get and a JSON decode per hit) served from memory for hot rows.

Why no invalidation is needed: a row's label is the log position of the record that
wrote it (``partition << 40 | offset``), and that record never changes. An update or a
delete of the id writes a *new* record; the index stops returning the old label, so its
cached payload is never asked for again and ages out of the LRU. Dropping an index
(:meth:`PayloadCache.drop_index`) frees its rows at once.

A label whose state row is gone (a write in flight between the index and the state) is
answered from here if it is cached: the index returned it, so the search saw it live; the
result cache's put race check still refuses to store such a result when that write is
reported after the search began.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["PayloadCache"]

Payload = tuple[str, str | None]
_ROW_BYTES = 160  # the key tuple, the payload tuple and the LRU node, estimated


class PayloadCache:
    """LRU of ``(index_key, label) -> (id, meta)`` within ``budget_bytes``."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes >= 0")
        self.budget_bytes = budget_bytes
        self._lock = threading.Lock()
        self._rows: OrderedDict[tuple[str, int], tuple[Payload, int]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def get(
        self, index_key: str, label: int, load: Callable[[str, int], Payload | None]
    ) -> tuple[Payload | None, bool]:
        """The payload of ``label`` and whether it came from the cache; on a miss
        ``load`` (the state store's lookup) is called outside the lock and a found payload
        is kept."""
        key = (index_key, label)
        with self._lock:
            row = self._rows.get(key)
            if row is not None:
                self._rows.move_to_end(key)
                self.hits += 1
                return row[0], True
            self.misses += 1
        found = load(index_key, label)
        if found is not None:
            size = _ROW_BYTES + len(found[0]) + len(found[1] or "") + len(index_key)
            if size <= self.budget_bytes:
                with self._lock:
                    old = self._rows.pop(key, None)
                    if old is not None:
                        self._bytes -= old[1]
                    self._rows[key] = (found, size)
                    self._bytes += size
                    while self._bytes > self.budget_bytes:
                        _, (_, n) = self._rows.popitem(last=False)
                        self._bytes -= n
        return found, False

    def drop_index(self, index_key: str) -> int:
        with self._lock:
            keys = [k for k in self._rows if k[0] == index_key]
            for k in keys:
                self._bytes -= self._rows.pop(k)[1]
            return len(keys)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "rows": len(self._rows),
                "bytes": self._bytes,
                "budget_bytes": self.budget_bytes,
                "hits": self.hits,
                "misses": self.misses,
            }
