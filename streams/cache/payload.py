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

Memory. A row costs :data:`ROW_BYTES` (the key tuple, the payload tuple, the LRU nodes of
the node's and its two scopes' LRUs, the strings' headers; measured) plus the characters
of its id and meta. Rows are
counted in the node's ``budget_bytes`` (LRU across all indexes) and in two scopes,
``t:<tenant>`` and ``i:<tenant>/<index>``, the scopes of the result cache's budgets. The
``room`` callback says how many bytes a scope may hold here (its budget less what the
other layers hold; the :class:`CacheController` answers it); a scope over its room evicts
its *own* least recently used rows, never another scope's. Callers that grow the other
layers call :meth:`trim` afterwards.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from functools import lru_cache

__all__ = ["ROW_BYTES", "PayloadCache"]

Payload = tuple[str, str | None]
# key tuple, payload tuple, three LRU nodes (node, tenant, index) and the two strings'
# object headers (tracemalloc: about 530 with the headers, bench/cache_memory_bench.py)
ROW_BYTES = 530
_Key = tuple[str, int]
_INF = float("inf")


def _unbounded(scope: str) -> float:
    return _INF


@lru_cache(maxsize=65536)
def scopes_of(index_key: str) -> tuple[str, str]:
    """The budget scopes of an index's rows: its tenant's and its own."""
    return "t:" + index_key.partition("/")[0], "i:" + index_key


class PayloadCache:
    """LRU of ``(index_key, label) -> (id, meta)`` within ``budget_bytes`` and each
    scope's ``room`` (module docstring; default: no scope bound)."""

    def __init__(self, budget_bytes: int, room: Callable[[str], float] | None = None) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes >= 0")
        self.budget_bytes = budget_bytes
        self.room: Callable[[str], float] = room or _unbounded
        self._lock = threading.Lock()
        self._rows: OrderedDict[_Key, tuple[Payload, int]] = OrderedDict()
        self._scopes: dict[str, OrderedDict[_Key, None]] = {}
        self._scope_bytes: dict[str, int] = {}
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(
        self, index_key: str, label: int, load: Callable[[str, int], Payload | None]
    ) -> tuple[Payload | None, bool]:
        """The payload of ``label`` and whether it came from the cache; on a miss
        ``load`` (the state store's lookup) is called outside the lock and a found payload
        is kept if its scopes have room."""
        key = (index_key, label)
        with self._lock:
            row = self._rows.get(key)
            if row is not None:
                self._rows.move_to_end(key)
                for scope in scopes_of(index_key):
                    self._scopes[scope].move_to_end(key)
                self.hits += 1
                return row[0], True
            self.misses += 1
        found = load(index_key, label)
        if found is not None:
            size = ROW_BYTES + len(found[0]) + len(found[1] or "")
            if size <= self.budget_bytes:
                self._keep(key, found, size)
        return found, False

    def _keep(self, key: _Key, found: Payload, size: int) -> None:
        scopes = scopes_of(key[0])
        with self._lock:
            # the room is asked under this lock: a trim after the other layers grew
            # (which takes it too) either runs after this row is in, or this sees its
            # growth; either way the scope ends within its budget
            rooms = [self.room(scope) for scope in scopes]
            if any(size > r for r in rooms):
                return
            self._pop(key)
            self._rows[key] = (found, size)
            self._bytes += size
            for scope in scopes:
                lru = self._scopes.get(scope)
                if lru is None:
                    lru = self._scopes[scope] = OrderedDict()
                lru[key] = None
                self._scope_bytes[scope] = self._scope_bytes.get(scope, 0) + size
            while self._bytes > self.budget_bytes:
                self._evict(next(iter(self._rows)))
            for scope, r in zip(scopes, rooms, strict=True):
                self._fit(scope, r)

    def _fit(self, scope: str, room: float) -> None:
        """Evict the scope's least recently used rows until it holds at most ``room``."""
        lru = self._scopes.get(scope)
        while lru and self._scope_bytes.get(scope, 0) > room:
            self._evict(next(iter(lru)))

    def _evict(self, key: _Key) -> None:
        if self._pop(key):
            self.evictions += 1

    def _pop(self, key: _Key) -> bool:
        row = self._rows.pop(key, None)
        if row is None:
            return False
        size = row[1]
        self._bytes -= size
        for scope in scopes_of(key[0]):
            lru = self._scopes[scope]
            del lru[key]
            self._scope_bytes[scope] -= size
            if not lru:
                del self._scopes[scope], self._scope_bytes[scope]
        return True

    def trim(self, scopes: Iterable[str]) -> None:
        """Fit each of ``scopes`` into its current ``room`` (after another layer grew or
        a budget shrank)."""
        held = self._scopes
        if not any(scope in held for scope in scopes):
            # nothing to trim (read without the lock: a row added meanwhile is added
            # under it, with its room asked after the growth that called this)
            return
        with self._lock:
            for scope in scopes:
                if scope in self._scopes:
                    self._fit(scope, max(0.0, self.room(scope)))

    def scope_bytes(self, scope: str) -> int:
        """Bytes held by ``t:<tenant>`` or ``i:<tenant>/<index>``."""
        with self._lock:
            return self._scope_bytes.get(scope, 0)

    def scope_rows(self, scope: str) -> frozenset[tuple[str, int]]:
        """The ``(index_key, label)`` rows a scope holds (tests, diagnostics)."""
        with self._lock:
            return frozenset(self._scopes.get(scope, ()))

    def drop_index(self, index_key: str) -> int:
        with self._lock:
            keys = list(self._scopes.get("i:" + index_key, ()))
            for k in keys:
                self._pop(k)
            return len(keys)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "rows": len(self._rows),
                "bytes": self._bytes,
                "budget_bytes": self.budget_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
            }
