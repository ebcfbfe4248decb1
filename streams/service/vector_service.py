"""``VectorService``: the data plane of a query node (the :class:`DataPlane` port).

Writes: validate against the index's config, assign the next version, encode the Avro
record and append it; return once durable with its position. Nothing is appended when
validation fails. Version checks (``IF_VERSION``, ``add``) are exact among writes through
this node: the node remembers the versions it appended until the indexer has applied them,
and those of the records another writer in this process appends through
:meth:`VectorService.append_versioned` (the embedder processor's chunks). Producers writing
to the ``vectors`` topic directly bypass that check (last write in log order wins).

Reads: wait for the requested consistency, then look the search up in the L0 result
cache (when the node has one and the index is enabled); on a miss search the node's
indexes, join the payloads and offer the result to the cache. A hit is what a fresh search
would return at the node's applied position (``streams.cache``), so any consistency level
may be served from it after its own wait. A fresh result is not offered when its payload
join lost a hit (a write in flight between the index and the state). With ``verify_rate``
a sample of hits is re-checked against a fresh search while the applier is paused, which
measures the cache's false-hit rate (``false_hits`` in its stats).
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

from streams.cache import CachedResult, ResultCache
from streams.cache.controller import CacheController, CacheLookup, PendingDecision
from streams.cache.doorkeeper import FIRST_SEEN
from streams.cache.entry import trusted_result
from streams.cache.payload import PayloadCache
from streams.cache.querylog import SearchObserver
from streams.cache.tolerant import k_bucket
from streams.index.exceptions import Busy, InvalidRequest, NotFound, VecError, VersionConflict
from streams.index.filters import Filter, parse_filter
from streams.index.model import (
    LIMITS,
    Consistency,
    Hit,
    IndexConfig,
    Vector,
    VectorUpsert,
    check_id,
    check_name,
    parse_vector,
)
from streams.index.segment import Probe
from streams.log.port import Log, LogPosition, Record, now_ms
from streams.schemas import catalog
from streams.schemas.codec import AvroCodec
from streams.service.api import DataPlane, SearchRequest, SearchResponse, StoredVector
from streams.service.applied import AppliedPositions
from streams.service.indexer import Indexer
from streams.service.snapshot import Snapshots
from streams.service.state import StateStore
from streams.topics import Topics

__all__ = ["CachedHits", "VectorService", "WriteAdmission"]

_STRIPES = 256
_TOLERANT = frozenset(("L1", "L2"))  # the layers that group entries by topK bucket
MAX_EF = 4096  # SearchRequest.ef


@dataclass(frozen=True, slots=True)
class _Fresh:
    """A search of the index: ``complete`` unless the index is not there yet or the
    payload join missed a row (then it must not be cached)."""

    hits: list[Hit]
    labels: tuple[int, ...]
    widened: int
    exhausted: bool
    complete: bool
    index_ms: float = 0.0
    payload_ms: float = 0.0
    payload_cached: int = 0  # hits whose payload came from L3
    # (segment, Probe) the answer depended on, when recorded (SearchOutcome.depends)
    depends: tuple[tuple[str, Probe], ...] | None = None
    chars: int = 0  # recorded searches: the characters of the hits' ids and metas


class WriteAdmission(Protocol):
    """Decides whether a write may be appended (``streams.capacity``). Both calls run
    under the id's lock, before and after the append; ``is_new``: the id has no live
    copy, so the write grows the index."""

    def check(self, config: IndexConfig, record: VectorUpsert, *, is_new: bool) -> None:
        """Raise :class:`QuotaExceeded` to refuse the write; nothing is appended then."""

    def appended(self, config: IndexConfig, record: VectorUpsert, pos: LogPosition, *,
                 is_new: bool) -> None:
        """The write is durable at ``pos``."""


class VectorService(DataPlane):
    def __init__(
        self,
        log: Log,
        topics: Topics,
        codec: AvroCodec,
        state: StateStore,
        indexer: Indexer,
        applied: AppliedPositions,
        snapshots: Snapshots,
        *,
        cache: ResultCache | None = None,
        verify_rate: float = 0.0,
        cache_layers: CacheController | None = None,
    ) -> None:
        if not 0.0 <= verify_rate <= 1.0:
            raise ValueError("verify_rate must be in [0, 1]")
        self.log = log
        self.topics = topics
        self.codec = codec
        self.state = state
        self.indexer = indexer
        self.applied = applied
        self.snapshots = snapshots
        self.cache = cache
        # the cache layers L0/L1/L2 over ``cache`` (streams.cache.controller)
        self.cache_layers = cache_layers or (CacheController(cache) if cache else None)
        self.verify_rate = verify_rate
        self._sampler = random.Random()
        self._pending_configs: dict[str, IndexConfig] = {}
        # versions appended by this node and not yet applied: (version, position); 0 = deleted
        self._pending_versions: dict[tuple[str, str], tuple[int, LogPosition]] = {}
        # every _pending_versions entry in append order, dropped once applied
        # (_forget_applied; appended to under stripe locks, popped only under _tracked_lock)
        self._tracked: deque[tuple[LogPosition, tuple[str, str]]] = deque()
        self._tracked_lock = threading.Lock()
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        self._config_lock = threading.Lock()
        self._vsubject = catalog.subject_for(topics.vectors)
        self._isubject = catalog.subject_for(topics.indexes)
        self._vschema = catalog.load_schema(catalog.TOPIC_VALUE_SCHEMA["vectors"])
        self._ischema = catalog.load_schema(catalog.TOPIC_VALUE_SCHEMA["indexes"])
        self._record_codec = AvroCodec(codec.registry, validate=False)  # see upsert_many
        # streams.capacity: admission of writes, hits seen by searches, extra VEC.INFO
        # sections (name -> provider of that index's section); all optional.
        self.admission: WriteAdmission | None = None
        self.hit_observers: list[Callable[[str, list[Hit]], None]] = []
        self.info_sections: dict[str, Callable[[str], Any]] = {}
        # query log, policy feedback and prefetch (streams.cache.querylog); optional
        self.search_observer: SearchObserver | None = None
        # the applied positions last turned into tokens, and the tokens (_applied_tokens)
        self._tokens_memo: tuple[dict[tuple[str, int], int], tuple[str, ...]] | None = None

    # -- helpers ---------------------------------------------------------------------------
    def _config(self, tenant: str, index: str) -> IndexConfig:
        check_name(tenant, "tenant")
        check_name(index, "index")
        key = f"{tenant}/{index}"
        config = self.indexer.configs.get(key) or self._pending_configs.get(key)
        if config is None:
            raise NotFound(f"index {key} does not exist")
        return config

    def _stripe(self, key: str, id: str) -> threading.Lock:
        return self._stripes[zlib.crc32(f"{key}/{id}".encode()) % _STRIPES]

    def _newest(self, key: str, id: str) -> tuple[int, str | None]:
        """The version and position token of the newest write of ``id``: ours if not yet
        applied, else the applied copy; (0, None) when deleted or absent (caller holds the
        id's stripe lock)."""
        pending = self._pending_versions.get((key, id))
        if pending is not None:
            version, pos = pending
            if not self.applied.reached({(pos.topic, pos.partition): pos.offset + 1}):
                return (version, pos.token) if version else (0, None)
            del self._pending_versions[(key, id)]  # the indexer caught up
        entry = self.state.entry(key, id)
        return (entry.version, entry.position) if entry is not None else (0, None)

    def _current_version(self, key: str, id: str) -> int:
        return self._newest(key, id)[0]

    def _newest_copy(self, key: str, id: str) -> str | None:
        return self._newest(key, id)[1]

    # -- writes ----------------------------------------------------------------------------
    def create_index(self, config: IndexConfig) -> LogPosition:
        with self._config_lock:
            old = self.indexer.configs.get(config.key) or self._pending_configs.get(config.key)
            if old is not None and (old.dim, old.metric, old.dtype, old.recipe) != (
                config.dim, config.metric, config.dtype, config.recipe,
            ):
                raise InvalidRequest(
                    f"index {config.key} exists with dim={old.dim} metric={old.metric} "
                    f"dtype={old.dtype} recipe={old.recipe}", field="index")
            value = self.codec.encode(self._isubject, self._ischema, {
                "tenant": config.tenant, "index": config.index, "dim": config.dim,
                "metric": config.metric.value, "dtype": config.dtype.value,
                "recipe": config.recipe, "version": config.version,
                "filter_fields": [{"name": f.name, "type": f.kind.value} for f in config.fields],
                "quotas": None if config.quotas is None else {
                    "max_vectors": config.quotas.max_vectors,
                    "max_bytes": config.quotas.max_bytes, "qps": config.quotas.qps},
                "created_ms": config.created_ms or now_ms(),
                "embedder": config.embedder,
                "cache": None if config.cache is None else config.cache.as_avro(),
            })
            pos = self.log.append(self.topics.indexes, config.key, value)
            self._pending_configs[config.key] = config
            return pos

    def upsert(self, record: VectorUpsert, *, if_version: int | None = None) -> LogPosition:
        return self._write(record, if_version)

    def add(self, record: VectorUpsert) -> LogPosition:
        return self._write(record, 0)

    def _write(self, record: VectorUpsert, if_version: int | None) -> LogPosition:
        config = self._config(record.tenant, record.index)
        record.validate(config)
        key = config.key
        self._forget_applied()
        with self._stripe(key, record.id):
            current = self._current_version(key, record.id)
            if if_version is not None and current != if_version:
                raise VersionConflict(record.id, if_version, current)
            if self.admission is not None:  # capacity budgets (streams.capacity)
                self.admission.check(config, record, is_new=current == 0)
            version = current + 1
            value = self._encode_upsert(record, version)
            pos = self.log.append(self.topics.vectors, f"{key}/{record.id}", value)
            self._remember((key, record.id), version, pos)
            if self.admission is not None:
                self.admission.appended(config, record, pos, is_new=current == 0)
            return pos

    def delete(self, tenant: str, index: str, id: str) -> LogPosition:
        config = self._config(tenant, index)
        check_id(id)
        self._forget_applied()
        with self._stripe(config.key, id):
            if self._current_version(config.key, id) == 0:
                raise NotFound(f"id {id!r} does not exist in {config.key}")
            pos = self.log.append(self.topics.vectors, f"{config.key}/{id}", None)
            self._remember((config.key, id), 0, pos)
            return pos

    def append_raw(self, records: list[Record]) -> list[LogPosition]:
        """Bulk path for tools and benchmarks: records already encoded."""
        return self.log.append_batch(records)

    def upsert_many(
        self, records: Sequence[VectorUpsert], if_versions: Sequence[int | None] | None = None
    ) -> list[LogPosition | VecError]:
        """Validate each record, then append the valid ones with one ``append_batch`` (one
        group commit): per item its position, or the error that refused it (nothing of a
        refused item is appended; the others are). ``if_versions[i]`` is ``upsert``'s
        ``if_version`` (0: ``add``). An id written twice in one call gets consecutive
        versions, in order. The records are built here from validated upserts, so they
        are encoded without fastavro's own check (3/4 of the encode time)."""
        conds = list(if_versions) if if_versions is not None else [None] * len(records)
        if len(conds) != len(records):
            raise ValueError("one if_version per record")
        out: list[LogPosition | VecError | None] = []
        valid: list[tuple[int, VectorUpsert, IndexConfig]] = []
        for i, record in enumerate(records):
            try:
                config = self._config(record.tenant, record.index)
                record.validate(config)
            except VecError as exc:
                out.append(exc)
                continue
            out.append(None)  # its position, once appended
            valid.append((i, record, config))
        self._forget_applied()
        locks = {id(lk): lk for lk in (self._stripe(c.key, r.id) for _, r, c in valid)}
        with contextlib.ExitStack() as held:
            for _, lock in sorted(locks.items()):  # a fixed order: batches never deadlock
                held.enter_context(lock)
            versions: dict[tuple[str, str], int] = {}
            batch: list[tuple[int, VectorUpsert, IndexConfig, int, bool]] = []
            encoded: list[Record] = []
            for i, record, config in valid:
                key = (config.key, record.id)
                current = versions.get(key)
                if current is None:
                    current = self._current_version(config.key, record.id)
                cond = conds[i]
                try:
                    if cond is not None and current != cond:
                        raise VersionConflict(record.id, cond, current)
                    if self.admission is not None:  # capacity budgets (streams.capacity)
                        self.admission.check(config, record, is_new=current == 0)
                except VecError as exc:
                    out[i] = exc
                    continue
                versions[key] = current + 1
                batch.append((i, record, config, current + 1, current == 0))
                encoded.append(Record.of(self.topics.vectors, f"{config.key}/{record.id}",
                                         self._encode_upsert(record, current + 1)))
            positions = self.log.append_batch(encoded) if encoded else []
            for (i, record, config, version, is_new), pos in zip(batch, positions, strict=True):
                self._remember((config.key, record.id), version, pos)
                if self.admission is not None:
                    self.admission.appended(config, record, pos, is_new=is_new)
                out[i] = pos
        return [x for x in out if x is not None]  # every item was answered

    def delete_unchanged(
        self, tenant: str, index: str, copies: Mapping[str, str]
    ) -> tuple[list[str], LogPosition | None]:
        """Delete each id whose newest write (applied, or appended through this service and
        not applied yet: its own writes and :meth:`append_versioned`'s) is still the copy
        at ``copies[id]`` (a position token: the scanned ``Entry.position``), in one
        durable batch; ids written since are left alone. Holds the ids' stripe locks across
        the check and the append, so an acknowledged write through this service never races
        a housekeeping delete (the capacity manager's archive and expiry use it). A copy is
        named by its position, not its version: versions repeat (an id deleted and written
        again, or a Source put again, starts again at 1; a Source chunk's rewrite keeps
        its version). Returns the ids deleted and the last position appended."""
        config = self._config(tenant, index)
        locks = {id(lk): lk for lk in (self._stripe(config.key, i) for i in copies)}
        with contextlib.ExitStack() as held:
            for _, lock in sorted(locks.items()):  # the same fixed order as batch upserts
                held.enter_context(lock)
            gone = [i for i, at in copies.items() if self._newest_copy(config.key, i) == at]
            if not gone:
                return [], None
            topic = self.topics.vectors
            positions = self.log.append_batch(
                [Record.of(topic, f"{config.key}/{i}", None) for i in gone])
            for i, pos in zip(gone, positions, strict=True):
                self._remember((config.key, i), 0, pos)
            return gone, positions[-1]

    def rewrite_unchanged(
        self, tenant: str, index: str, id: str, position: str, *, meta: str | None,
        keep_ttl: bool = False,
    ) -> LogPosition | None:
        """Append the copy of ``id`` at ``position`` (an ``Entry.position``) again with
        ``meta`` and without its TTL (``keep_ttl``: with it, expiring when it did), if it
        is still the newest write of the id (as :meth:`delete_unchanged` decides, under
        the id's stripe lock); returns its position, or None when the id changed since
        (nothing appended). Every other field is read back from the record: a Source
        chunk (the record names its ``source_id``) keeps its version, its Source's, so the
        Source's next version never goes down in ``vectors``; any other vector gets the
        next version, as an upsert would."""
        config = self._config(tenant, index)
        check_id(id)
        key = config.key
        # the record at a position never changes: read it before taking the id's lock (a
        # read may wait on the broker; the lock holds up every write of the stripe)
        at = LogPosition.parse(position)
        found = self.log.read(at.topic, at.partition, at.offset, 1)
        if not found or found[0].offset != at.offset or found[0].value is None:
            return None  # compacted away: a newer record of the id exists
        with self._stripe(key, id):
            if self._newest_copy(key, id) != position:
                return None
            _, value = self.codec.decode(found[0].value, self._vschema)
            value["meta"] = meta
            if value.get("source_id") is None:
                value["version"] += 1
            if not keep_ttl:
                value["ttl_ms"], value["timestamp"] = None, now_ms()
            data = self.codec.encode(self._vsubject, self._vschema, value)
            pos = self.log.append(self.topics.vectors, f"{key}/{id}", data)
            self._remember((key, id), int(value["version"]), pos)
            return pos

    def append_versioned(
        self, records: Sequence[Record], versions: Sequence[int]
    ) -> list[LogPosition]:
        """Append ``vectors`` records built elsewhere in this process (the embedder
        processor's chunks and their deletes; ``versions[i]`` is the version in
        ``records[i]``, ignored for a delete) in one durable batch, under their ids' stripe
        locks, and remember each id's newest version and position as for this service's
        own writes, until the indexer applies them. So :meth:`delete_unchanged`,
        :meth:`rewrite_unchanged` and ``IF_VERSION`` see the newest copy written, not the
        applied one: a housekeeping delete that scanned an older copy leaves the newer one
        alone. Nothing is validated (the caller built the records); writes of these ids
        through this service wait for the append (they would wait for durability anyway)."""
        if len(versions) != len(records):
            raise ValueError("one version per record")
        self._forget_applied()
        ids: list[tuple[str, str]] = []
        for r in records:
            if r.topic != self.topics.vectors or r.key is None:
                raise ValueError(f"not a {self.topics.vectors} record with a key: {r.key!r}")
            tenant, _, rest = r.key.decode().partition("/")
            index, _, vector_id = rest.partition("/")
            ids.append((f"{tenant}/{index}", vector_id))
        locks = {id(lk): lk for lk in (self._stripe(k, i) for k, i in ids)}
        with contextlib.ExitStack() as held:
            for _, lock in sorted(locks.items()):  # the same fixed order as batch upserts
                held.enter_context(lock)
            positions = self.log.append_batch(records)
            for k, r, version, pos in zip(ids, records, versions, positions, strict=True):
                self._remember(k, 0 if r.value is None else version, pos)
        return positions

    def _remember(self, k: tuple[str, str], version: int, pos: LogPosition) -> None:
        """Record ``k``'s newest write (0: a delete) until the indexer applies it (caller
        holds the id's stripe lock)."""
        self._pending_versions[k] = (version, pos)
        self._tracked.append((pos, k))

    def _forget_applied(self) -> None:
        """Drop the entries of :attr:`_pending_versions` the indexer has applied, oldest
        first (``_current_version`` drops an entry only when its id is written again: the
        map would otherwise hold every id ever written). Called before a write takes its
        stripe locks; amortised O(1) per write. Never waits: when another writer sweeps,
        or holds the stripe of the oldest entry (a durable append in progress), the entry
        stays for a later write (an applied leftover is harmless: ``_current_version``
        and ``_newest_copy`` see through it)."""
        try:
            pos, _ = self._tracked[0]
        except IndexError:
            return
        if not self.applied.reached({(pos.topic, pos.partition): pos.offset + 1}):
            return  # the oldest is not applied yet (nor, mostly, what follows)
        if not self._tracked_lock.acquire(blocking=False):
            return  # another writer is sweeping
        try:
            applied = self.applied.snapshot()
            while self._tracked:
                pos, k = self._tracked[0]
                if applied.get((pos.topic, pos.partition), 0) <= pos.offset:
                    return
                stripe = self._stripe(*k)
                if not stripe.acquire(blocking=False):
                    return  # its writer is appending: a later write sweeps it
                try:
                    self._tracked.popleft()
                    pending = self._pending_versions.get(k)
                    if pending is not None and pending[1] == pos:
                        del self._pending_versions[k]
                finally:
                    stripe.release()
        finally:
            self._tracked_lock.release()

    def _encode_upsert(self, record: VectorUpsert, version: int) -> bytes:
        """The VectorRecord of a validated upsert (``_write`` and ``upsert_many``)."""
        return self._record_codec.encode(self._vsubject, self._vschema, {
            "tenant": record.tenant, "index": record.index, "id": record.id,
            "vector": record.vector.astype("<f4").tobytes(), "dtype": "fp32",
            "meta": record.meta, "tags": list(record.tags),
            "numeric": {k: float(v) for k, v in record.numeric.items()},
            "version": version, "timestamp": now_ms(), "ttl_ms": record.ttl_ms,
        })

    # -- reads -----------------------------------------------------------------------------
    def wait_for(self, consistency: Consistency, tokens: tuple[str, ...] = (),
                 bound_ms: int | None = None, timeout_ms: int = 1000) -> None:
        """Block until a read at ``consistency`` may be served (``Busy`` after
        ``timeout_ms``); for reads of other derived indexes (``streams.text`` keyword)."""
        self._wait(consistency, tokens, bound_ms, timeout_ms)

    def _wait(self, consistency: Consistency, tokens: tuple[str, ...], bound_ms: int | None,
              timeout_ms: int) -> None:
        timeout_s = max(0.0, timeout_ms / 1000)
        if consistency is Consistency.EVENTUAL:
            return
        if consistency is Consistency.SESSION:
            targets: dict[tuple[str, int], int] = {}
            for token in tokens:
                try:
                    pos = LogPosition.parse(token)
                except ValueError:
                    raise InvalidRequest(f"bad position token {token!r}",
                                         field="token") from None
                tp = (pos.topic, pos.partition)
                targets[tp] = max(targets.get(tp, 0), pos.offset + 1)
            ok = self.applied.wait(targets, timeout_s)
        elif consistency is Consistency.STRONG:
            targets = {}
            for topic in (self.topics.indexes, self.topics.vectors):
                for p, end in self.log.end_offsets(topic).items():
                    targets[(topic, p)] = end
            ok = self.applied.wait(targets, timeout_s)
        else:
            ok = self.applied.wait_fresh(float(bound_ms or 0), timeout_s)
        if not ok:
            raise Busy(f"{consistency.value} read not satisfied within {timeout_ms} ms",
                       retry_after_s=0.1)

    def get(
        self, tenant: str, index: str, id: str, *,
        consistency: Consistency = Consistency.EVENTUAL, tokens: tuple[str, ...] = (),
    ) -> StoredVector:
        config = self._config(tenant, index)
        check_id(id)
        self._wait(consistency, tokens, None, 1000)
        entry = self.state.entry(config.key, id)
        if entry is None:
            raise NotFound(f"id {id!r} not found in {config.key}")
        return StoredVector(id, entry.vector, entry.meta, entry.tags, dict(entry.numeric),
                            entry.version, entry.position)

    def after_reply(self) -> None:
        """What a server's thread does once it has sent a reply: encode a few of the query
        log's queued events (:meth:`QueryLogEmitter.help`), so that the logging thread
        does not take the GIL from the next request to do it."""
        observer = self.search_observer
        if observer is not None and observer.emitter is not None:
            observer.emitter.help()

    def search(self, request: SearchRequest) -> SearchResponse:
        t0 = time.perf_counter()
        config = self._config(request.tenant, request.index)
        query = parse_vector(request.vector, config.dim)
        if not 1 <= request.k <= LIMITS.max_k:
            raise InvalidRequest(f"TOPK must be 1..{LIMITS.max_k}", field="k")
        flt = _parse_filter_cached(request.filter, config) if request.filter else None
        if request.ef is not None and not 1 <= request.ef <= MAX_EF:
            raise InvalidRequest(f"EF must be 1..{MAX_EF}", field="ef")
        t1 = time.perf_counter()
        self._wait(request.consistency, request.tokens, request.bound_ms, request.timeout_ms)
        t2 = time.perf_counter()
        layers = self.cache_layers if request.ef is None else None  # see SearchRequest.ef
        lookup = None if layers is None else layers.lookup(
            config, query, request.k, flt, request.consistency, request.bound_ms)
        observer = self.search_observer
        if lookup is not None:
            cached = lookup.entry
            if cached is not None and observer is not None and observer.expired(cached):
                cached = None  # its admission TTL has passed: answer as a miss
            if cached is not None:
                if self.verify_rate and self._sampler.random() < self.verify_rate:
                    self._verify(lookup, config, query, request.k, flt)
                response = self._cached_response(cached, t0, t1, t2, lookup, request.k)
                if self.hit_observers:
                    self._observe(config.key, response.hits)
                if observer is not None:  # logged under the served entry's key (an L1/L2
                    # hit's is its cached sibling's): the learner's join credits its admission
                    observer.searched(request, config.key, cached.key, response, cached)
                return response
        t3 = time.perf_counter()
        applied = self._applied_tokens()
        caching = layers is not None and lookup is not None and bool(lookup.layers)
        l3 = (layers.payloads if caching and layers is not None and lookup is not None
              and "L3" in lookup.layers else None)  # L3 payloads, where switched on
        # L1/L2 group entries by topK bucket (5/10/20/50/100): a miss there searches the
        # bucket's k and stores that, so every k of the bucket can reuse it (first k)
        search_k = request.k
        if (caching and lookup is not None and lookup.offer
                and not lookup.layers.isdisjoint(_TOLERANT)):
            search_k = k_bucket(request.k)
        record = caching and lookup is not None and lookup.offer  # it may be stored
        fresh = self._fresh(config, query, search_k, flt, request.ef, l3, record=record)
        hits = fresh.hits if search_k == request.k else fresh.hits[: request.k]
        t4 = time.perf_counter()
        decision: Any = "none"
        if caching and lookup is not None and not lookup.offer:
            decision = FIRST_SEEN  # the doorkeeper held the key's first miss: no entry
        elif caching and fresh.complete and layers is not None and lookup is not None \
                and lookup.lazy:  # parked as returned: the entry is built if it repeats
            # where the query log runs, the result is parked and its admission decided off
            # the search path: by the log's thread as it logs this miss, or by the repeat
            # if that is first (CacheController.defer)
            pending = None
            deferring = observer is not None and observer.emitter is not None \
                and observer.emitter.running and layers.defer_decisions
            if deferring:
                pending = layers.defer(
                    lookup, config.key, config.metric,
                    # parse_vector's own array, or a copy (the caller's array, or a view of
                    # someone's buffer, may change after the search)
                    query if query is not request.vector and query.flags.owndata
                    else query.copy(),
                    search_k, flt, fresh.labels, tuple(fresh.hits), applied,
                    (t4 - t3) * 1000, fresh.depends or (), fresh.chars)
            if pending is not None:
                decision = pending  # {"outcome": "parked", "action": "pending"}
            else:  # not deferrable (a large result; another policy): parked here
                raw = layers.fresh_raw(
                    lookup, config.key, config.metric, query, search_k, flt, fresh.labels,
                    fresh.hits, applied, (t4 - t3) * 1000, fresh.depends or (), fresh.chars)
                decision = (PendingDecision.of(layers, raw)
                            if deferring and layers.park_undecided(lookup, raw)
                            else layers.park_fresh(lookup, raw).as_dict())
        elif caching and fresh.complete and layers is not None and lookup is not None:
            ids, scores, metas = _columns(fresh.hits)
            entry = trusted_result(
                lookup.qkey, config.key, config.metric, query, search_k, flt, fresh.labels,
                ids, scores, metas, applied, (t4 - t3) * 1000, time.monotonic(),
                fresh.depends or ())
            outcome = layers.offer(lookup, entry)
            decision = "none" if outcome is None else outcome.as_dict()
        t5 = time.perf_counter()
        debug: dict[str, Any] = {
            "cache_hit": False,
            "layer": "none",
            "distance": None,
            "tolerant_skipped": [] if lookup is None else list(lookup.skipped),
            "payload_cached": fresh.payload_cached,
            "decision": decision,
            "latency_ms": round((t5 - t0) * 1000, 3),
            "latency_breakdown_ms": {
                "validate": round((t1 - t0) * 1000, 3), "consistency": round((t2 - t1) * 1000, 3),
                "cache": round((t3 - t2 + t5 - t4) * 1000, 3),
                "index": round(fresh.index_ms, 3), "payload": round(fresh.payload_ms, 3),
            },
            "widened": fresh.widened,
            "filter_exhausted": fresh.exhausted and len(hits) < request.k,
            "applied": list(applied),
        }
        if fresh.depends is not None:  # recorded for the cache: what the answer depended on
            debug["depends"] = _depends_map(fresh.depends)
        if self.hit_observers:
            self._observe(config.key, hits)
        response = SearchResponse(hits, debug)
        if observer is not None:
            observer.searched(request, config.key, "" if lookup is None else lookup.qkey,
                              response, None)
        return response

    def _applied_tokens(self) -> tuple[str, ...]:
        """``applied.tokens()``, rebuilt only when the applied positions moved (a search
        between two applied batches reuses the tuple)."""
        snap = self.applied.snapshot()
        memo = self._tokens_memo
        if memo is not None and memo[0] == snap:
            return memo[1]
        tokens = tuple(LogPosition(t, p, off - 1).token for (t, p), off in sorted(snap.items())
                       if off > 0)
        self._tokens_memo = (snap, tokens)
        return tokens

    def _observe(self, index_key: str, hits: list[Hit]) -> None:
        for observer in self.hit_observers:
            observer(index_key, hits)

    def _fresh(self, config: IndexConfig, query: Vector, k: int, flt: Filter | None,
               ef: int | None = None, payloads: PayloadCache | None = None, *,
               record: bool = False) -> _Fresh:
        """Search the index (``ef``: its efSearch) and join the payloads from the state
        (through the L3 ``payloads`` cache when given)."""
        t0 = time.perf_counter()
        vi = self.indexer.indexes.get(config.key)
        if vi is None:  # created but not applied yet: nothing is searchable
            return _Fresh([], (), 0, True, False)
        out = vi.search(query, k, flt, ef_search=ef, record=True) if record else vi.search(
            query, k, flt, ef_search=ef)
        t1 = time.perf_counter()
        hits: list[Hit] = []
        labels: list[int] = []
        cached = chars = 0
        for label, score in zip(out.labels.tolist(), out.scores.tolist(), strict=True):
            if payloads is None:
                found = self.state.hit(config.key, label)
            else:
                found, from_l3 = payloads.get(config.key, label, self.state.hit)
                cached += from_l3
            if found is not None:
                hits.append(Hit(found[0], score, found[1]))
                labels.append(label)
                if record:  # the entry's size estimate (CacheController.fresh_raw)
                    chars += len(found[0]) if found[1] is None else len(found[0]) + len(found[1])
        t2 = time.perf_counter()
        return _Fresh(hits, tuple(labels), out.widened, out.exhausted,
                      len(hits) == out.labels.size, (t1 - t0) * 1000, (t2 - t1) * 1000, cached,
                      out.depends, chars)

    def _cached_response(
        self, entry: CachedResult, t0: float, t1: float, t2: float, lookup: CacheLookup, k: int
    ) -> SearchResponse:
        derived = entry.derived
        shared = derived.get(("hits", k))
        if shared is None:  # the entry never changes: its Hit objects are built once
            shared = derived[("hits", k)] = tuple(
                Hit(i, s, m) for i, s, m in zip(entry.ids[:k], entry.scores[:k],
                                                entry.metas[:k], strict=True))
        hits = CachedHits(shared, derived, k)
        decision = derived.get("decision")
        if decision is None:
            decision = derived["decision"] = (
                entry.admission.as_dict() if entry.admission else "none")
        t3 = time.perf_counter()
        debug: dict[str, Any] = {
            "cache_hit": True,
            "layer": lookup.layer,
            "distance": lookup.distance,
            "decision": dict(decision) if type(decision) is dict else decision,
            "latency_ms": round((t3 - t0) * 1000, 3),
            "latency_breakdown_ms": {
                "validate": round((t1 - t0) * 1000, 3), "consistency": round((t2 - t1) * 1000, 3),
                "cache": round((t3 - t2) * 1000, 3),
            },
            "widened": 0,
            "filter_exhausted": len(entry.ids) < k,  # the entry may hold more than k
            "applied": list(self._applied_tokens()),
            "cached_at": list(entry.applied),
            "cache_hit_count": lookup.hit_count,
            "query_key": str(entry.key),
        }
        if entry.depends:  # an approximate answer: the IVF lists / efSearch it depended on
            debug["depends"] = _depends_map(entry.depends)  # the caller's own copy
        return SearchResponse(hits, debug)

    def _verify(self, lookup: CacheLookup, config: IndexConfig, query: Vector,
                k: int, flt: Filter | None) -> None:
        """Re-check the served entry against a fresh search of *this* query while the
        applier is paused (so every applied write has been reported); a difference in
        the first ``k`` ids is a false hit of the layer that served it."""
        if self.cache is None or self.cache_layers is None or lookup.entry is None:
            return
        with self.indexer.lock:
            entry = self.cache.peek(lookup.entry.key)
            if entry is None:
                return
            fresh = self._fresh(config, query, k, flt)
            if fresh.complete:
                self.cache_layers.record_verification(
                    lookup.layer, tuple(h.id for h in fresh.hits) != entry.ids[:k])

    # -- control ---------------------------------------------------------------------------
    def info(self, tenant: str, index: str) -> dict[str, Any]:
        config = self._config(tenant, index)
        vi = self.indexer.indexes.get(config.key)
        return {
            "tenant": config.tenant, "index": config.index, "dim": config.dim,
            "metric": config.metric.value, "dtype": config.dtype.value, "recipe": config.recipe,
            "fields": {f.name: f.kind.value for f in config.fields},
            "stats": vi.stats() if vi is not None else {"live": 0},
            "applied": self.applied.tokens(),
            "cache": self.cache.stats().as_dict() if self.cache is not None else None,
            "cache_layers": self.cache_layers.stats() if self.cache_layers else None,
            # this tenant's cache bytes per layer, their total and its budget
            "cache_memory": (self.cache_layers.memory(config.tenant)
                             if self.cache_layers else None),
            **{name: section(config.key) for name, section in self.info_sections.items()},
        }

    def list_indexes(self, tenant: str | None = None) -> list[IndexConfig]:
        configs = {**self._pending_configs, **self.indexer.configs}
        return sorted((c for c in configs.values() if tenant is None or c.tenant == tenant),
                      key=lambda c: c.key)

    def snapshot(self) -> dict[str, Any]:
        info = self.snapshots.write(self.indexer)
        return {"snapshot": info.name, "indexes": info.indexes,
                "positions": [f"{t}:{p}:{off}" for (t, p), off in sorted(info.positions.items())]}

    def health(self) -> dict[str, Any]:
        error = self.indexer.error
        return {
            "status": "ok" if error is None else "failed",
            "indexer_error": None if error is None else repr(error),
            "applied": self.applied.tokens(),
            "indexes": len(self.indexer.indexes),
        }


@lru_cache(maxsize=4096)
def _parse_filter_cached(text: str, config: IndexConfig) -> Filter:
    return parse_filter(text, config)


class CachedHits(list[Hit]):
    """The hits of a cache hit: a fresh list (the caller may change it) over the entry's
    shared Hit objects, with the entry's ``derived`` memo, where a protocol may keep its
    encoding of these ``k`` hits (:mod:`streams.service.resp` does) for the next hit. The
    response's ``decision`` and ``cached_at`` come from the entry too (resp keeps their
    JSON there)."""

    __slots__ = ("derived", "k")

    def __init__(self, hits: tuple[Hit, ...], derived: dict[Any, Any], k: int) -> None:
        super().__init__(hits)
        self.derived = derived
        self.k = k


def _columns(hits: list[Hit]) -> tuple[tuple[str, ...], tuple[float, ...], tuple[str | None, ...]]:
    """ids, scores and metas of ``hits`` as the cache entry keeps them."""
    return (tuple([h.id for h in hits]), tuple([h.score for h in hits]),
            tuple([h.meta for h in hits]))


def _depends_map(depends: tuple[tuple[str, Probe], ...]) -> dict[str, dict[str, Any]]:
    """A debug map's ``depends``: segment name -> ``{"lists": [...]}`` (IVF lists probed,
    nearest centroid first) or ``{"ef": n}`` (HNSW efSearch); exact parts are not listed."""
    return {name: probe.as_dict() for name, probe in depends}
