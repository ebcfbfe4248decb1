"""``VectorService``: the data plane of a query node (the :class:`DataPlane` port).

Writes: validate against the index's config, assign the next version, encode the Avro
record and append it; return once durable with its position. Nothing is appended when
validation fails. Version checks (``IF_VERSION``, ``add``) are exact among writes through
this node: the node remembers the versions it appended until the indexer has applied them.
Producers writing to the ``vectors`` topic directly bypass that check (last write in log
order wins).

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

import random
import threading
import time
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from streams.cache import CachedResult, QueryKey, ResultCache, query_key
from streams.index.exceptions import Busy, InvalidRequest, NotFound, VersionConflict
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
from streams.log.port import Log, LogPosition, Record, now_ms
from streams.schemas import catalog
from streams.schemas.codec import AvroCodec
from streams.service.api import DataPlane, SearchRequest, SearchResponse, StoredVector
from streams.service.applied import AppliedPositions
from streams.service.indexer import Indexer
from streams.service.snapshot import Snapshots
from streams.service.state import StateStore
from streams.topics import Topics

__all__ = ["VectorService"]

_STRIPES = 256


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
        self.verify_rate = verify_rate
        self._sampler = random.Random()
        self._pending_configs: dict[str, IndexConfig] = {}
        # versions appended by this node and not yet applied: (version, position); 0 = deleted
        self._pending_versions: dict[tuple[str, str], tuple[int, LogPosition]] = {}
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        self._config_lock = threading.Lock()
        self._vsubject = catalog.subject_for(topics.vectors)
        self._isubject = catalog.subject_for(topics.indexes)
        self._vschema = catalog.load_schema(catalog.TOPIC_VALUE_SCHEMA["vectors"])
        self._ischema = catalog.load_schema(catalog.TOPIC_VALUE_SCHEMA["indexes"])

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

    def _current_version(self, key: str, id: str) -> int:
        """The version of the newest write of ``id``: ours if not yet applied (caller
        holds the id's stripe lock)."""
        pending = self._pending_versions.get((key, id))
        if pending is not None:
            version, pos = pending
            if not self.applied.reached({(pos.topic, pos.partition): pos.offset + 1}):
                return version
            del self._pending_versions[(key, id)]  # the indexer caught up
        entry = self.state.entry(key, id)
        return entry.version if entry is not None else 0

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
                "created_ms": config.created_ms or now_ms(),
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
        with self._stripe(key, record.id):
            current = self._current_version(key, record.id)
            if if_version is not None and current != if_version:
                raise VersionConflict(record.id, if_version, current)
            version = current + 1
            value = self.codec.encode(self._vsubject, self._vschema, {
                "tenant": record.tenant, "index": record.index, "id": record.id,
                "vector": record.vector.astype("<f4").tobytes(), "dtype": "fp32",
                "meta": record.meta, "tags": list(record.tags),
                "numeric": {k: float(v) for k, v in record.numeric.items()},
                "version": version, "timestamp": now_ms(),
            })
            pos = self.log.append(self.topics.vectors, f"{key}/{record.id}", value)
            self._pending_versions[(key, record.id)] = (version, pos)
            return pos

    def delete(self, tenant: str, index: str, id: str) -> LogPosition:
        config = self._config(tenant, index)
        check_id(id)
        with self._stripe(config.key, id):
            if self._current_version(config.key, id) == 0:
                raise NotFound(f"id {id!r} does not exist in {config.key}")
            pos = self.log.append(self.topics.vectors, f"{config.key}/{id}", None)
            self._pending_versions[(config.key, id)] = (0, pos)
            return pos

    def append_raw(self, records: list[Record]) -> list[LogPosition]:
        """Bulk path for tools and benchmarks: records already encoded."""
        return self.log.append_batch(records)

    # -- reads -----------------------------------------------------------------------------
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

    def search(self, request: SearchRequest) -> SearchResponse:
        t0 = time.perf_counter()
        config = self._config(request.tenant, request.index)
        query = parse_vector(request.vector, config.dim)
        if not 1 <= request.k <= LIMITS.max_k:
            raise InvalidRequest(f"TOPK must be 1..{LIMITS.max_k}", field="k")
        flt = _parse_filter_cached(request.filter, config) if request.filter else None
        t1 = time.perf_counter()
        self._wait(request.consistency, request.tokens, request.bound_ms, request.timeout_ms)
        t2 = time.perf_counter()
        cache = self.cache if self.cache is not None and self.cache.enabled(config.key) else None
        qkey: QueryKey | None = None
        seen_seq = 0
        if cache is not None:
            qkey = query_key(config.key, config.metric, query, request.k, flt)
            seen_seq = cache.get_seq(config.key)  # before the search reads the index
            cached = cache.get(qkey)
            if cached is not None:
                if self.verify_rate and self._sampler.random() < self.verify_rate:
                    self._verify(cache, qkey, config, query, request.k, flt)
                return self._cached_response(cached, t0, t1, t2)
        t3 = time.perf_counter()
        applied = tuple(self.applied.tokens())
        fresh = self._fresh(config, query, request.k, flt)
        t4 = time.perf_counter()
        decision: Any = "none"
        if cache is not None and qkey is not None and fresh.complete:
            entry = CachedResult(
                qkey, config.key, config.metric, query, request.k, flt, fresh.labels,
                tuple(h.id for h in fresh.hits), tuple(h.score for h in fresh.hits),
                tuple(h.meta for h in fresh.hits), applied,
                compute_ms=(t4 - t3) * 1000, created_s=time.monotonic())
            decision = cache.put(entry, seen_seq).as_dict()
        t5 = time.perf_counter()
        debug: dict[str, Any] = {
            "cache_hit": False,
            "layer": "none",
            "decision": decision,
            "latency_ms": round((t5 - t0) * 1000, 3),
            "latency_breakdown_ms": {
                "validate": round((t1 - t0) * 1000, 3), "consistency": round((t2 - t1) * 1000, 3),
                "cache": round((t3 - t2 + t5 - t4) * 1000, 3),
                "index": round(fresh.index_ms, 3), "payload": round(fresh.payload_ms, 3),
            },
            "widened": fresh.widened,
            "filter_exhausted": fresh.exhausted,
            "applied": self.applied.tokens(),
        }
        return SearchResponse(fresh.hits, debug)

    def _fresh(self, config: IndexConfig, query: Vector, k: int, flt: Filter | None) -> _Fresh:
        """Search the index and join the payloads from the state."""
        t0 = time.perf_counter()
        vi = self.indexer.indexes.get(config.key)
        if vi is None:  # created but not applied yet: nothing is searchable
            return _Fresh([], (), 0, True, False)
        out = vi.search(query, k, flt)
        t1 = time.perf_counter()
        hits: list[Hit] = []
        labels: list[int] = []
        for label, score in zip(out.labels.tolist(), out.scores.tolist(), strict=True):
            found = self.state.hit(config.key, label)
            if found is not None:
                hits.append(Hit(found[0], score, found[1]))
                labels.append(label)
        t2 = time.perf_counter()
        return _Fresh(hits, tuple(labels), out.widened, out.exhausted,
                      len(hits) == out.labels.size, (t1 - t0) * 1000, (t2 - t1) * 1000)

    def _cached_response(
        self, entry: CachedResult, t0: float, t1: float, t2: float
    ) -> SearchResponse:
        hits = [Hit(i, s, m) for i, s, m in zip(entry.ids, entry.scores, entry.metas,
                                                strict=True)]
        t3 = time.perf_counter()
        debug: dict[str, Any] = {
            "cache_hit": True,
            "layer": "L0",
            "decision": entry.admission.as_dict() if entry.admission else "none",
            "latency_ms": round((t3 - t0) * 1000, 3),
            "latency_breakdown_ms": {
                "validate": round((t1 - t0) * 1000, 3), "consistency": round((t2 - t1) * 1000, 3),
                "cache": round((t3 - t2) * 1000, 3),
            },
            "widened": 0,
            "filter_exhausted": entry.fewer_than_k,
            "applied": self.applied.tokens(),
            "cached_at": list(entry.applied),
            "cache_hit_count": entry.hit_count,
            "query_key": str(entry.key),
        }
        return SearchResponse(hits, debug)

    def _verify(self, cache: ResultCache, qkey: QueryKey, config: IndexConfig, query: Vector,
                k: int, flt: Filter | None) -> None:
        """Re-check the cached entry against a fresh search while the applier is paused
        (so every applied write has been reported); a difference is a false hit."""
        with self.indexer.lock:
            entry = cache.peek(qkey)
            if entry is None:
                return
            fresh = self._fresh(config, query, k, flt)
            if fresh.complete:
                cache.record_verification(tuple(h.id for h in fresh.hits) != entry.ids)

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
