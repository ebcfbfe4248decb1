"""Prefetch: a next-query table learned from session sequences, searched in idle time.

:class:`NextQueryTable` counts, per query key, which query key the same session asked
next (``SearchRequest.session_id``). It is bounded: at most ``max_keys`` keys (least
recently updated forgotten first), ``max_next`` successors each (the rarest dropped), and
``max_sessions`` open sessions. :meth:`NextQueryTable.predict` returns the successors seen
at least ``min_count`` times with a share of at least ``min_share``.

:class:`Prefetcher` observes each logged search, queues the predicted next searches (the
request of a key is remembered from when it was last asked, bounded likewise) and runs
them on a background thread once the node has been idle for ``idle_s`` (no search
observed). It calls the service's ordinary ``search``: the result is offered to the cache
and admitted by the policy like any other result, so prefetch needs no cache API of its
own; searches it runs are not logged as queries and do not feed the table.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from streams.cache.querylog import _prefetching
from streams.index.exceptions import VecError

if TYPE_CHECKING:
    from streams.service.api import DataPlane, SearchRequest

__all__ = ["NextQueryTable", "Prefetcher"]


class NextQueryTable:
    """Session sequences -> next-query counts (module docstring). Not thread-safe: the
    :class:`Prefetcher` guards it."""

    def __init__(
        self, *, max_keys: int = 50_000, max_next: int = 8, max_sessions: int = 50_000
    ) -> None:
        self.max_keys, self.max_next, self.max_sessions = max_keys, max_next, max_sessions
        self._next: OrderedDict[str, dict[str, int]] = OrderedDict()
        self._last: OrderedDict[str, str] = OrderedDict()  # session -> its last key

    def observe(self, session_id: str, key: str) -> None:
        prev = self._last.pop(session_id, None)
        self._last[session_id] = key
        if len(self._last) > self.max_sessions:
            self._last.popitem(last=False)
        if prev is None or prev == key:
            return
        succ = self._next.pop(prev, None) or {}
        succ[key] = succ.get(key, 0) + 1
        if len(succ) > self.max_next:
            del succ[min(succ, key=succ.__getitem__)]
        self._next[prev] = succ
        if len(self._next) > self.max_keys:
            self._next.popitem(last=False)

    def predict(self, key: str, *, min_count: int = 2, min_share: float = 0.3) -> list[str]:
        """Likely next keys after ``key``, most likely first."""
        succ = self._next.get(key)
        if not succ:
            return []
        total = sum(succ.values())
        ranked = sorted(succ.items(), key=lambda kv: -kv[1])
        return [k for k, n in ranked if n >= min_count and n / total >= min_share]

    def __len__(self) -> int:
        return len(self._next)


class Prefetcher:
    """Idle-time searches of predicted next queries (module docstring). ``max_queue``:
    predicted searches waiting at most (the oldest dropped); ``max_requests``: query keys
    whose request is remembered."""

    def __init__(
        self,
        service: DataPlane,
        *,
        table: NextQueryTable | None = None,
        idle_s: float = 0.05,
        max_queue: int = 256,
        max_requests: int = 50_000,
        min_count: int = 2,
        min_share: float = 0.3,
    ) -> None:
        self.service = service
        self.table = table or NextQueryTable()
        self.idle_s = idle_s
        self.min_count, self.min_share = min_count, min_share
        self.max_requests = max_requests
        self._requests: OrderedDict[str, SearchRequest] = OrderedDict()
        self._queue: deque[str] = deque(maxlen=max_queue)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._last_search = time.monotonic()
        self._thread: threading.Thread | None = None
        self.counts = {"observed": 0, "predicted": 0, "prefetched": 0, "failed": 0}

    def observe(self, request: SearchRequest, key: str) -> None:
        """A logged search of ``key`` (the node is not idle); learned from when it has a
        ``session_id``."""
        self._last_search = time.monotonic()
        if not request.session_id:
            return
        with self._lock:
            self.counts["observed"] += 1
            self.table.observe(request.session_id, key)
            self._requests.pop(key, None)
            self._requests[key] = replace(request, session_id=None, tokens=())
            if len(self._requests) > self.max_requests:
                self._requests.popitem(last=False)
            predicted = self.table.predict(key, min_count=self.min_count, min_share=self.min_share)
            for nxt in predicted:
                if nxt in self._requests and nxt not in self._queue:
                    self._queue.append(nxt)
                    self.counts["predicted"] += 1
        if predicted:
            self._wake.set()

    def run_pending(self) -> int:
        """Search every queued prediction now (the thread's step; tests call it)."""
        done = 0
        while True:
            with self._lock:
                if not self._queue:
                    return done
                request = self._requests.get(self._queue.popleft())
            if request is None:
                continue
            _prefetching.on = True  # the SearchObserver skips searches of this thread
            try:
                self.service.search(request)
                self.counts["prefetched"] += 1
                done += 1
            except VecError:  # the index went away or is busy: a prediction, not a request
                self.counts["failed"] += 1
            finally:
                _prefetching.on = False

    def start(self) -> Prefetcher:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            while not self._stop.is_set():
                idle = time.monotonic() - self._last_search
                if idle >= self.idle_s:
                    break
                self._stop.wait(self.idle_s - idle)
            if not self._stop.is_set():
                self.run_pending()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self.counts, "queued": len(self._queue), "keys": len(self.table)}
