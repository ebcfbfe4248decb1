"""The query log: one SearchEvent per answered search, appended to ``query-log`` off the
hot path.

:class:`QueryLogEmitter` holds a bounded in-memory queue and a background thread that
encodes events (Avro, the registry's codec) and appends them in batches. :meth:`emit`
never blocks and never raises: when the queue is full the event is dropped and counted
(``dropped``, also ``streamvec_query_log_dropped_total`` in Prometheus), so a slow or
failing log costs searches nothing. A batch the log refuses is counted as ``failed`` and
logged; events are telemetry, so nothing retries them (the learner tolerates gaps).

:class:`SearchObserver` is what ``VectorService.search`` calls once per answered search:
it feeds the policy holder (hit counts, the canary comparison), the prefetcher's
next-query table, and the emitter. Searches the prefetcher runs itself are not logged.

Who encodes. The logging thread, and any server thread that has just sent a reply
(:meth:`QueryLogEmitter.help`, called by the RESP server through
``VectorService.after_reply``): it encodes up to four of the oldest queued events while its
client reads the answer, so that the logging thread does not take the GIL from the next
request to do it (side by side, RESP hit p99 0.60-0.70 ms against 0.89-1.01 ms with the
logging thread alone; ``bench/querylog_tail.py --compare help``, docs/benchmarks.md
"Session 7"). What it encodes waits for the logging thread's next append, ahead of what that
thread takes next: the log keeps the queue's order. Bodies are written by
:mod:`streams.cache.event_codec` (fastavro for a schema it was not written for).

Removal events. :meth:`SearchObserver.removed` is the cache's removal listener
(``ResultCache.add_removal_listener``): each admitted entry that leaves the cache
(evicted, expired, invalidated, replaced, dropped) becomes a SearchEvent whose ``removal``
says why and when, with its hits and bytes, under the entry's own admission (key, arm,
bucket, version). The listener runs under the cache's lock, so it only queues the slot;
the event is built on the logging thread. An expired hit is removed from the cache at
once (:meth:`SearchObserver.expired`), so its bytes are freed and its event says so.

Text queries (``VEC.QUERY`` on the text cache, :mod:`streams.text.search`). A hit of the text
cache (L2 on the query text) is one search event (:meth:`SearchObserver.text_hit`): layer
``L2``, the served entry's key as ``query_key`` and its ``compute_ms`` as proxy cost, so the
learner's join credits the admission that stored it. On a miss the inner dense search logs
as any search, and :class:`TextQueryLog` logs the admission decision of the text cache's
offer once, keyed by the text entry's key, in an event timestamped after its put:

- dense, inner search a miss of the same key (the text entry replaces the entry the inner
  search had just stored under it): one event, the inner search's, carrying the text
  offer's decision; the inner search's own admission is superseded (its entry lived for
  the rest of the request, never hit) and is not logged, nor is that entry's ``replaced``
  removal (it would end the text admission in the join).
- otherwise (hybrid: the dense part is its own key, at the fusion's candidate depth; dense
  whose inner search was a cache hit): the inner event as is, then a second event for the
  text entry's key with its decision: the request took two cache decisions, and each
  entry's hits and removal join its own admission.

The node's own counters (:meth:`PolicyHolder.record_search`) see one search per request.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from streams.cache import event_codec
from streams.log.port import Log, LogPosition, Record
from streams.schemas import catalog
from streams.schemas.codec import AvroCodec
from streams.topics import Topics

if TYPE_CHECKING:
    from streams.cache.entry import CachedResult
    from streams.cache.eviction import Slot
    from streams.cache.keys import QueryKey
    from streams.cache.policy import PolicyHolder
    from streams.cache.prefetch import Prefetcher
    from streams.cache.result_cache import ResultCache
    from streams.service.api import SearchRequest, SearchResponse

__all__ = ["QueryLogEmitter", "SearchObserver", "TextQueryLog", "register_metrics"]

log = logging.getLogger(__name__)

_WIRE_HEADER = struct.Struct(">bI")  # Confluent wire format: magic byte, schema id


class QueryLogEmitter:
    """Bounded queue + batching appender (module docstring). ``capacity``: events held
    at most; ``batch_size``: events per append; ``linger_s``: how long the thread waits
    for a batch to fill. Start with :meth:`start`; :meth:`close` drains what is queued."""

    def __init__(
        self,
        log: Log,
        topics: Topics,
        codec: AvroCodec,
        *,
        capacity: int = 10_000,
        batch_size: int = 500,
        linger_s: float = 0.05,
    ) -> None:
        if capacity < 1 or batch_size < 1:
            raise ValueError("capacity and batch_size must be >= 1")
        self.log = log
        self.topic = topics.query_log
        self.codec = codec
        self.capacity = capacity
        self.batch_size = batch_size
        self.linger_s = linger_s
        self._subject = catalog.subject_for(self.topic)
        self._schema = catalog.load_schema(catalog.TOPIC_VALUE_SCHEMA["query-log"])
        self._queue: deque[dict[str, Any] | _Search | _Removal] = deque()
        self._wake = threading.Event()
        self._hurry = threading.Event()  # set while a flush waits: no lingering
        self._flushing = 0
        self._stop = threading.Event()
        self._idle = threading.Condition()
        self._busy = 0  # events taken off the queue and not yet appended
        self._ready: list[Record] = []  # events help() encoded, not yet appended
        self._drop_lock = threading.Lock()
        self.dropped = 0
        self.appended = 0
        self.failed = 0
        self._thread: threading.Thread | None = None
        self._encode: tuple[Any, Callable[[Mapping[str, Any]], bytes], bool] | None = None
        #: write with fastavro even where the hand encoder could (benches compare them)
        self.use_fastavro = False
        #: whether :meth:`help` takes work (benches compare with the logging thread alone)
        self.helped = True
        self.helped_events = 0  # events help() encoded
        # the schema id and parsed schema the logging thread last resolved (help uses it)
        self._writer: tuple[int, Any] | None = None
        _EMITTERS.add(self)

    def emit(self, event: dict[str, Any] | _Search | _Removal) -> bool:
        """Queue one SearchEvent (a dict in the schema's shape; ``event_id`` and
        ``timestamp`` are filled in when missing; or what :class:`SearchObserver` hands
        over, turned into one on the logging thread). Returns False if it was dropped."""
        if len(self._queue) + len(self._ready) >= self.capacity:
            with self._drop_lock:
                self.dropped += 1
            return False
        self._queue.append(event)
        if not self._wake.is_set():
            self._wake.set()
        return True

    @property
    def running(self) -> bool:
        """Whether its thread takes events (started, not closed)."""
        return self._thread is not None and not self._stop.is_set()

    def start(self) -> QueryLogEmitter:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="query-log", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        try:  # resolve the schema's writer now: server threads help only once it is known
            self._writer = self.codec.writer(self._subject, self._schema)
        except Exception:  # the registry is unreachable: the first batch tries again
            log.warning("query-log: no schema id yet", exc_info=True)
        while True:
            self._wake.wait(self.linger_s)
            if self._stop.is_set():
                with self._idle:  # a helper holds what it took under this lock
                    if not self._queue and not self._ready:
                        return
            if len(self._queue) < self.batch_size and not self._stop.is_set():
                self._hurry.wait(self.linger_s)  # let a batch gather (flush cuts it short)
            self._wake.clear()
            while self._queue or self._ready:
                batch: list[dict[str, Any] | _Search | _Removal] = []
                with self._idle:
                    ready, self._ready = self._ready, []  # encoded by help(): older
                    while self._queue and len(batch) < self.batch_size:
                        batch.append(self._queue.popleft())
                    self._busy = len(batch) + len(ready)
                try:
                    self._append(batch, ready)
                except Exception:  # telemetry: count and log the loss, never stop logging
                    self._lost(len(batch) + len(ready))
                    log.exception(
                        "query-log: a batch of %d events failed", len(batch) + len(ready)
                    )
                with self._idle:
                    self._busy = 0
                    self._idle.notify_all()

    def help(self, most: int = 4) -> int:
        """Encode up to ``most`` of the oldest queued events on the calling thread, for the
        logging thread to append (module docstring, "Who encodes"). Returns how many it
        took. Only with the schema's writer already resolved by the logging thread (a
        helper never waits for the registry), and never raising (a server calls it)."""
        writer = self._writer
        if not self._queue or not self.helped or writer is None or not self.running:
            return 0
        with self._idle:  # the logging thread takes its batches under the same lock
            if self._stop.is_set():  # closing: the logging thread appends the rest
                return 0
            items: list[dict[str, Any] | _Search | _Removal] = []
            while self._queue and len(items) < most:
                items.append(self._queue.popleft())
            if not items:
                return 0
            try:
                records = self._encode_all(items, writer)
            except Exception:  # telemetry: count and log the loss, never fail the server
                self._lost(len(items))
                log.exception("query-log: %d events a server thread took failed", len(items))
                _settle_all(items)
                return len(items)
            self._ready.extend(records)
            self.helped_events += len(records)
        return len(items)

    def _append(
        self, events: list[dict[str, Any] | _Search | _Removal], ready: list[Record] | None = None
    ) -> None:
        """Encode one batch (:meth:`_encode_all`) and append it after ``ready`` (events
        :meth:`help` encoded, older)."""
        records = self._encode_all(events)
        if ready:
            records = ready + records
        if not records:
            return
        try:
            self.log.append_batch(records)
            self.appended += len(records)
        except Exception:  # telemetry: count and log the loss, never stop searches
            self._lost(len(records))
            log.warning("query-log: %d events not appended", len(records), exc_info=True)

    def _encode_all(
        self,
        events: list[dict[str, Any] | _Search | _Removal],
        writer: tuple[int, Any] | None = None,
    ) -> list[Record]:
        """The records of ``events``. The events are built by :class:`SearchObserver`,
        so they are written without the codec's per-record validation (3x the cost of
        the write itself, measured), by :meth:`_encoder`; an event it cannot write is
        counted as failed alone. Wire format as :meth:`AvroCodec.encode`: magic 0, schema
        id, Avro body. ``writer``: the schema id and parsed schema, when known (a
        helper's); else asked of the codec (the registry, on first use)."""
        if writer is None:
            try:
                writer = self._writer = self.codec.writer(self._subject, self._schema)
            except Exception:  # the registry is unreachable: count the loss, keep searching
                self._lost(len(events))
                log.warning(
                    "query-log: no schema id; %d events lost", len(events), exc_info=True
                )
                _settle_all(events)  # the events are lost, their parked misses' decisions not
                return []
        schema_id, parsed = writer
        header = _WIRE_HEADER.pack(0, schema_id)
        encode = self._encoder(parsed)
        records = []
        # YIELD_GIL (off): sleep(0) between events, to let a waiting search or RESP thread
        # have the GIL; measured both ways in docs/benchmarks.md ("Session 6"): no steady
        # gain, and beside a busy thread it starved this one
        pc = time.perf_counter
        since = pc()
        for item in events:
            if YIELD_GIL and pc() - since > _YIELD_AFTER_S:
                time.sleep(0)
                since = pc()
            e: Any = item
            try:
                if isinstance(item, dict):
                    e = item
                elif isinstance(item, _Removal):
                    e = _removal_event(item)
                else:
                    e = _search_event(item)
                value = header + encode(_complete(e))
            except (ValueError, TypeError, KeyError, AttributeError, OverflowError):
                self._lost(1)
                log.warning("query-log: event not encodable: %r", e, exc_info=True)
                continue
            records.append(Record.of(self.topic, f"{e['tenant']}/{e['index']}", value))
        return records

    def _lost(self, n: int) -> None:
        """Count ``n`` failed events (two threads encode: :meth:`help`'s and the logging
        thread)."""
        with self._drop_lock:
            self.failed += n

    def _encoder(self, parsed: Any) -> Callable[[Mapping[str, Any]], bytes]:
        """The SearchEvent body encoder for the registry's parsed schema: the hand-written
        one (:mod:`streams.cache.event_codec`, ~2.6x cheaper) when it is the schema that
        module writes, else fastavro's."""
        slow = self.use_fastavro
        if self._encode is None or self._encode[0] is not parsed or self._encode[2] != slow:
            fast = None if slow else event_codec.for_schema(self._schema)
            if fast is None:
                if not slow:
                    log.warning("query-log: not the schema event_codec writes; using fastavro")
                fast = event_codec.fastavro_encoder(parsed)
            self._encode = (parsed, fast, slow)
        return self._encode[1]

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything queued so far is appended (or failed)."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            self._flushing += 1
            self._hurry.set()
            self._wake.set()
            try:
                while self._queue or self._ready or self._busy:
                    left = deadline - time.monotonic()
                    if left <= 0 or self._thread is None:
                        return False
                    self._wake.set()
                    self._idle.wait(min(left, 0.05))
            finally:
                self._flushing -= 1
                if not self._flushing:
                    self._hurry.clear()
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        """Append what is queued (up to ``timeout_s``), then stop the thread."""
        if self._thread is not None:
            self.flush(timeout_s)
            self._stop.set()
            self._wake.set()
            self._thread.join(timeout_s)
            self._thread = None

    def stats(self) -> dict[str, int]:
        return {
            "queued": len(self._queue) + len(self._ready),
            "appended": self.appended,
            "dropped": self.dropped,
            "failed": self.failed,
            "encoded_by_servers": self.helped_events,
            "capacity": self.capacity,
        }


# QueryLogEmitter._append: yield the GIL after each _YIELD_AFTER_S of encoding (off: see
# _append; bench/querylog_tail.py runs both side by side)
YIELD_GIL = False
_YIELD_AFTER_S = 0.001

# what SearchObserver.searched queues: request, index key, query key, hits, debug,
# the cached entry on a hit (None on a miss), wall-clock seconds
_Search = tuple[
    "SearchRequest",
    str,
    "str | QueryKey",
    tuple[Any, ...],
    dict[str, Any],
    "CachedResult | None",
    float,
]


def _settled(decision: Any) -> Any:
    """A search's debug ``decision``, with a lazy miss's pending one (``settle``:
    streams.cache.controller.PendingDecision) taken now; ``"none"`` if the policy raised
    (it must not: the miss is then logged undecided)."""
    settle = getattr(decision, "settle", None)
    if settle is None:
        return decision
    try:
        return settle()
    except Exception:
        log.exception("query-log: a parked miss's decision failed")
        return "none"


def _settle_all(events: list[dict[str, Any] | _Search | _Removal]) -> None:
    """Take the pending decisions of lazy misses among ``events`` (a batch that will not
    be written), so their parked results are still admitted or rejected."""
    for item in events:
        if isinstance(item, tuple):
            _settled(item[4].get("decision"))


def _search_event(item: _Search) -> dict[str, Any]:
    """The SearchEvent of one answered search (built on the logging thread)."""
    request, index_key, query_key, hits, debug, cached, at = item
    hit = cached is not None
    latency_ms = float(debug.get("latency_ms", 0.0))
    tenant, _, index = index_key.partition("/")
    breakdown: Mapping[str, float] = (
        debug.get("latency_breakdown_ms") or debug.get("text_latency_breakdown_ms") or {}
    )
    decision = _settled(debug.get("decision"))  # a parked miss's is taken here
    if cached is not None:
        cost = cached.compute_ms
        features: Mapping[str, float] = {"size": float(cached.nbytes)}
    else:
        logged = debug.get("proxy_cost")  # a text miss: what a hit of its entry will save
        cost = (
            float(breakdown.get("index", 0.0)) + float(breakdown.get("payload", 0.0))
            if logged is None
            else float(logged)
        )
        features = {}
    layer = debug.get("layer")
    event: dict[str, Any] = {
        "tenant": tenant,
        "index": index,
        "query_key": str(query_key),
        "top_k": request.k,
        "cache_layer": layer if hit and layer in _LAYERS else ("L0" if hit else "NONE"),
        "cache_hit": hit,
        "action": "none",
        "action_probability": 1.0,
        "proxy_cost": cost,
        "latency_ms": {**breakdown, "total": latency_ms},
        "result_ids": [h.id for h in hits],
        "consistency": request.consistency.value,
        "session_id": request.session_id,
        "applied": debug.get("applied", ()),
        "timestamp": int(at * 1000),
        "depends": _depends_records(cached, debug),
    }
    if not hit and isinstance(decision, dict) and "arm" in decision:
        features = decision.get("features") or {}
        event.update(
            action=decision["arm"],
            action_probability=decision["probability"],
            bucket=decision.get("bucket"),
            policy_version=decision.get("version"),
            ttl_ms=decision.get("ttl_ms") if decision["action"] == "admit" else None,
        )
    event["features"] = dict(features)
    if not hit and isinstance(decision, dict) and decision.get("outcome") == "parked":
        event["features"]["parked"] = 1.0  # a lazy offer: stored only if the key repeats
    return event


def _depends_records(cached: CachedResult | None, debug: Mapping[str, Any]) -> Any:
    """The SearchEvent's ``depends``: a hit's entry's record, a miss's debug ``depends``
    (there when the search was recorded for the cache), else None."""
    if cached is not None:
        return [
            {"segment": name, "lists": list(p.lists), "ef": p.ef} for name, p in cached.depends
        ]
    recorded = debug.get("depends")
    if recorded is None:
        return None
    return [
        {"segment": name, "lists": list(p.get("lists", ())), "ef": int(p.get("ef", 0))}
        for name, p in recorded.items()
    ]


class _Removal:
    """What :meth:`SearchObserver.removed` queues (under the cache's lock: no work)."""

    __slots__ = ("at", "reason", "slot")

    def __init__(self, slot: Slot, reason: str, at: float) -> None:
        self.slot, self.reason, self.at = slot, reason, at


_REASONS = frozenset(("evicted", "expired", "invalidated", "replaced", "dropped"))


def _removal_event(item: _Removal) -> dict[str, Any]:
    """The SearchEvent of an entry that left the cache (module docstring)."""
    slot = item.slot
    entry = slot.entry
    d = entry.admission
    tenant, _, index = entry.index_key.partition("/")
    return {
        "tenant": tenant,
        "index": index,
        "query_key": str(entry.key),
        "top_k": entry.k,
        "cache_layer": "NONE",
        "cache_hit": False,
        "action": "admit" if d is None else d.arm,
        "action_probability": 1.0 if d is None else d.probability,
        "bucket": None if d is None else d.bucket,
        "policy_version": None if d is None else d.version,
        "ttl_ms": None if d is None else d.ttl_ms,
        "proxy_cost": entry.compute_ms,
        "features": {"size": float(slot.nbytes)},
        "latency_ms": {},
        "result_ids": list(entry.ids),
        "consistency": "eventual",
        "session_id": None,
        "applied": entry.applied,
        "timestamp": int(item.at * 1000),
        "removal": {
            "reason": item.reason if item.reason in _REASONS else "other",
            "hits": slot.hits,
            "bytes": slot.nbytes,
            "stored_ms": int(slot.stored_s * 1000),
            "priority": slot.priority,
        },
    }


def _complete(e: dict[str, Any]) -> dict[str, Any]:
    """The SearchEvent record of a queued event (work kept off the search thread). The
    event id is 128 random bits in hex (a uuid4's worth; ``os.urandom`` is 4x cheaper);
    consecutive events mostly carry the same applied positions, parsed and encoded once
    (:data:`event_codec.POSITIONS_AVRO`; the memo is one tuple, rebound whole: the logging
    thread and helping server threads call this; the list is only read by the encoder)."""
    if "event_id" not in e:
        e["event_id"] = os.urandom(16).hex()
    if "timestamp" not in e:
        e["timestamp"] = int(time.time() * 1000)
    global _POSITIONS
    tokens = tuple(e.pop("applied", ()))
    last = _POSITIONS  # one tuple, rebound whole (two nodes' logging threads may race)
    if last[0] != tokens:
        parsed = [
            {"topic": p.topic, "partition": p.partition, "offset": p.offset}
            for p in map(LogPosition.parse, tokens)
        ]
        last = _POSITIONS = (tokens, parsed, event_codec.positions(parsed))
    e["index_positions"] = last[1]
    e[event_codec.POSITIONS_AVRO] = last[2]
    return e


# the applied tokens _complete parsed last, their parsed positions and their encoding
_POSITIONS: tuple[tuple[str, ...] | None, list[dict[str, Any]], bytes] = (
    None,
    [],
    event_codec.positions([]),
)


# -- Prometheus ---------------------------------------------------------------------------

_EMITTERS: weakref.WeakSet[QueryLogEmitter] = weakref.WeakSet()
_REGISTERED: weakref.WeakSet[CollectorRegistry] = weakref.WeakSet()


class _QueryLogCollector(Collector):
    """Sums over the live emitters of the process (a node has one)."""

    def collect(self) -> Iterable[Any]:
        emitters = list(_EMITTERS)
        dropped = CounterMetricFamily(
            "streamvec_query_log_dropped", "SearchEvents dropped because the queue was full."
        )
        dropped.add_metric([], sum(e.dropped for e in emitters))
        appended = CounterMetricFamily(
            "streamvec_query_log_appended", "SearchEvents appended to query-log."
        )
        appended.add_metric([], sum(e.appended for e in emitters))
        failed = CounterMetricFamily(
            "streamvec_query_log_failed", "SearchEvents lost because the log refused the append."
        )
        failed.add_metric([], sum(e.failed for e in emitters))
        queued = GaugeMetricFamily("streamvec_query_log_queued", "SearchEvents waiting.")
        queued.add_metric([], sum(len(e._queue) for e in emitters))
        return [dropped, appended, failed, queued]


def register_metrics(registry: CollectorRegistry) -> None:
    """Expose the query-log counters in ``registry`` (idempotent)."""
    if registry not in _REGISTERED:
        registry.register(_QueryLogCollector())
        _REGISTERED.add(registry)


# -- the search hook ----------------------------------------------------------------------

_prefetching = threading.local()
_LAYERS = ("L0", "L1", "L2")


class SearchObserver:
    """The one object ``VectorService.search`` calls (module docstring). Every part is
    optional: a node without an emitter still runs the policy and prefetch."""

    def __init__(
        self,
        emitter: QueryLogEmitter | None = None,
        holder: PolicyHolder | None = None,
        prefetcher: Prefetcher | None = None,
        cache: ResultCache | None = None,
    ) -> None:
        self.emitter = emitter
        self.holder = holder
        self.prefetcher = prefetcher
        self.cache = cache
        self.removals = 0

    def expired(self, entry: CachedResult) -> bool:
        """A cache hit whose TTL has passed: answer it as a miss, and (with ``cache``)
        remove it now, so that it frees its bytes and its removal is logged as expired."""
        if self.holder is None or not self.holder.expired(entry):
            return False
        if self.cache is not None:
            self.cache.expire(entry)
        return True

    def removed(self, slot: Slot, reason: str) -> None:
        """The cache's removal listener: queue the entry's removal event (runs under the
        cache's lock: an append to the emitter's deque, nothing else). The entry a text
        query's inner search stored and its own text offer replaced is not logged
        (:class:`TextQueryLog`)."""
        if self.emitter is not None:
            if reason == "replaced":
                text = getattr(_text, "log", None)
                if text is not None and text.supersedes(slot):
                    return
            self.removals += 1
            self.emitter.emit(_Removal(slot, reason, time.time()))

    def searched(
        self,
        request: SearchRequest,
        index_key: str,
        query_key: str | QueryKey,
        response: SearchResponse,
        cached: CachedResult | None,
    ) -> None:
        """One answered search: ``cached`` is the entry on a cache hit, None on a miss.

        On the search thread: the policy's counters (its next decision depends on them)
        and the prefetcher's table. The SearchEvent itself is built on the logging thread
        from a tuple of what it needs (:func:`_search_event`): the response's hits are
        copied here; its debug dict is read there, so a caller must not change it."""
        if getattr(_prefetching, "on", False):
            return
        hit = cached is not None
        debug = response.debug
        if self.holder is not None:
            if cached is not None:
                self.holder.on_hit(cached)
            latency_ms = float(debug.get("latency_ms", 0.0))
            self.holder.record_search(index_key.partition("/")[0], index_key, hit, latency_ms)
        if self.prefetcher is not None:  # every search delays idle-time prefetch
            self.prefetcher.observe(request, str(query_key))
        if self.emitter is not None:
            item = (request, index_key, query_key, tuple(response.hits), debug, cached, time.time())
            text = getattr(_text, "log", None)
            if text is not None and text.inner is None:  # a text query's inner search
                text.inner = item
                return
            self.emitter.emit(item)

    def text_hit(
        self,
        request: SearchRequest,
        index_key: str,
        response: SearchResponse,
        entry: CachedResult,
    ) -> None:
        """A hit of the text cache (``VEC.QUERY``, L2 on the query text; module docstring):
        logged as a hit of the served entry's key (layer ``L2`` from the debug, proxy cost
        its ``compute_ms``); the policy counts the hit (which renews the entry's idle TTL)
        and the search. The prefetcher only learns that the node is busy: it replays
        vector searches, and a text answer is not one."""
        debug = response.debug
        if self.holder is not None:
            self.holder.on_hit(entry)
            latency_ms = float(debug.get("latency_ms", 0.0))
            self.holder.record_search(index_key.partition("/")[0], index_key, True, latency_ms)
        if self.prefetcher is not None:
            self.prefetcher.observe(replace(request, session_id=None), "")
        if self.emitter is not None:
            self.emitter.emit(
                (request, index_key, entry.key, tuple(response.hits), debug, entry, time.time())
            )

    def stats(self) -> dict[str, Any]:
        return {
            "query_log": self.emitter.stats() if self.emitter else None,
            "policy": self.holder.status() if self.holder else None,
            "prefetch": self.prefetcher.stats() if self.prefetcher else None,
        }


# -- text queries -------------------------------------------------------------------------

_text = threading.local()  # .log: the TextQueryLog whose search runs on this thread


class TextQueryLog:
    """The query log's part of one ``VEC.QUERY`` that missed the text cache (module
    docstring, "Text queries"). :meth:`hold` and :meth:`held` go around the inner dense
    search (its event is held back on this thread); :meth:`offering` and :meth:`offered`
    around the text cache's offer (:meth:`CacheController.offer_text`). Made only where the
    node logs (an emitter): a node without one pays nothing."""

    __slots__ = ("emitter", "index_key", "inner", "key", "request")

    def __init__(self, emitter: QueryLogEmitter, request: SearchRequest, index_key: str) -> None:
        self.emitter = emitter
        self.request = request  # the text query (its k, consistency, session)
        self.index_key = index_key
        self.inner: _Search | None = None
        self.key: QueryKey | None = None  # set: the held inner miss carries the decision

    def hold(self) -> None:
        """Hold back the event of the next search on this thread (the inner search)."""
        _text.log = self

    def held(self, key: QueryKey | None) -> None:
        """After the inner search (also when it raised). ``key``: the text entry's key when
        the inner event may carry the text offer's decision (dense), else None. A miss of
        that key stays held for :meth:`offered`; any other event is queued now, before the
        offer's put (whose removal of an entry it hit must come after the hit)."""
        _text.log = None
        inner = self.inner
        if inner is None:
            return
        if key is not None and inner[5] is None and inner[2] == key:
            self.key = key
            return
        self.inner = None
        self.emitter.emit(inner)

    def offering(self) -> None:
        """The text offer's put is next: the held inner miss's entry that it replaces is
        not logged as removed (:meth:`supersedes`)."""
        if self.key is not None:
            _text.log = self

    def supersedes(self, slot: Slot) -> bool:
        """Whether ``slot`` (being replaced) is the entry the held inner miss stored: its
        key, never hit, admitted by the held decision."""
        inner = self.inner
        entry = slot.entry
        if inner is None or self.key is None or slot.hits or entry.key != self.key:
            return False
        d = inner[4].get("decision")
        a = entry.admission
        return (
            isinstance(d, dict)
            and a is not None
            and d.get("arm") == a.arm
            and d.get("bucket") == a.bucket
            and d.get("probability") == a.probability
        )

    def offered(
        self,
        decision: Any,
        key: QueryKey | None,
        hits: Sequence[Any],
        compute_ms: float,
        latency_ms: float,
        applied: Sequence[str],
    ) -> None:
        """After the text offer (also when it raised, or nothing was offered: ``decision``
        not a policy decision). Queues the held inner event, carrying ``decision`` (proxy
        cost: ``compute_ms``, the text entry's) when the text put stored its entry over the
        inner one, else as it was; with no held event, when ``decision`` is one, an event
        of its own for the text entry's ``key``. Timestamped now: after the
        put, as the join matches the entry's removal with its decision."""
        _text.log = None
        inner, self.inner = self.inner, None
        decided = isinstance(decision, dict) and "arm" in decision
        if inner is not None:
            # only a put that replaced the inner search's entry takes over its event: any
            # other outcome (rejected, stale, too large...) left that entry, and its own
            # admission, in the cache (found by the session's review)
            if decided and decision.get("outcome") in ("stored", "evicted"):
                request, index_key, query_key, inner_hits, debug, _, _ = inner
                debug = {
                    **debug,
                    "decision": decision,
                    "proxy_cost": compute_ms,
                    "latency_ms": latency_ms,  # the text query's, as its hits log
                }
                inner = (request, index_key, query_key, inner_hits, debug, None, time.time())
            self.emitter.emit(inner)
        elif decided and key is not None:
            debug = {
                "layer": "none",
                "decision": decision,
                "proxy_cost": compute_ms,
                "latency_ms": latency_ms,
                "applied": tuple(applied),
            }
            self.emitter.emit(
                (self.request, self.index_key, key, tuple(hits), debug, None, time.time())
            )
