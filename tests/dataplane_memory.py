"""An in-memory :class:`DataPlane`: exact brute-force search over a dict.

A second adapter of the port, not a mock: it validates exactly as the port says (the domain's
own ``VectorUpsert.validate``, ``parse_vector`` and ``parse_filter``), assigns versions,
refuses ``IF_VERSION`` conflicts, hands out position tokens and honours ``session`` reads
(it waits for positions it has not applied; a token it never issued times out with
``VEC_ERR_BUSY``). Every write is applied before it returns, so ``eventual`` reads already
see it. Scores follow ``streams.index.model``: cosine similarity and inner product
descending, squared L2 distance ascending; ties break by id.

Useful for protocol tests of the servers and as the reference in congruence tests.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import numpy as np

from streams.index.exceptions import Busy, InvalidRequest, NotFound, VersionConflict
from streams.index.filters import parse_filter
from streams.index.model import (
    LIMITS,
    Consistency,
    Hit,
    IndexConfig,
    Metric,
    VectorUpsert,
    check_id,
    check_name,
    parse_vector,
)
from streams.log.port import LogPosition
from streams.service.api import DataPlane, SearchRequest, SearchResponse, StoredVector

__all__ = ["MemoryDataPlane"]

INDEXES_TOPIC = "memory.indexes"
VECTORS_TOPIC = "memory.vectors"


@dataclasses.dataclass
class _Index:
    config: IndexConfig
    rows: dict[str, StoredVector] = dataclasses.field(default_factory=dict)


class MemoryDataPlane(DataPlane):
    def __init__(self) -> None:
        self._indexes: dict[str, _Index] = {}
        self._ends = {INDEXES_TOPIC: 0, VECTORS_TOPIC: 0}  # next offset per topic (1 partition)
        self._cond = threading.Condition()
        self._snapshots = 0

    # -- helpers ---------------------------------------------------------------------------
    def _index(self, tenant: str, index: str) -> _Index:
        check_name(tenant, "tenant")
        check_name(index, "index")
        found = self._indexes.get(f"{tenant}/{index}")
        if found is None:
            raise NotFound(f"index {tenant}/{index} does not exist")
        return found

    def _append(self, topic: str) -> LogPosition:
        pos = LogPosition(topic, 0, self._ends[topic])
        self._ends[topic] += 1
        self._cond.notify_all()
        return pos

    def _applied(self) -> list[str]:
        return [LogPosition(t, 0, end - 1).token for t, end in self._ends.items() if end]

    def _wait(self, consistency: Consistency, tokens: tuple[str, ...],
              bound_ms: int | None, timeout_ms: int) -> None:
        """Writes are applied when they return, so only ``session`` tokens can be ahead."""
        if consistency is Consistency.BOUNDED and bound_ms is None:
            raise InvalidRequest("bounded consistency needs a bound (ms)", field="bound_ms")
        if consistency is not Consistency.SESSION:
            return
        targets = []
        for token in tokens:
            try:
                targets.append(LogPosition.parse(token))
            except ValueError:
                raise InvalidRequest(f"bad position token {token!r}", field="token") from None
        deadline = time.monotonic() + timeout_ms / 1000

        def reached() -> bool:
            return all(p.offset < self._ends.get(p.topic, 0) and p.partition == 0
                       for p in targets)

        if not self._cond.wait_for(reached, max(0.0, deadline - time.monotonic())):
            raise Busy(f"session read not satisfied within {timeout_ms} ms", retry_after_s=0.1)

    # -- writes ----------------------------------------------------------------------------
    def create_index(self, config: IndexConfig) -> LogPosition:
        with self._cond:
            old = self._indexes.get(config.key)
            if old is not None:
                shape = (config.dim, config.metric, config.dtype, config.recipe, config.fields)
                if shape != (old.config.dim, old.config.metric, old.config.dtype,
                             old.config.recipe, old.config.fields):
                    raise InvalidRequest(f"index {config.key} exists with another config",
                                         field="index")
                return self._append(INDEXES_TOPIC)
            if not config.created_ms:
                config = dataclasses.replace(config, created_ms=time.time_ns() // 1_000_000)
            self._indexes[config.key] = _Index(config)
            return self._append(INDEXES_TOPIC)

    def upsert(self, record: VectorUpsert, *, if_version: int | None = None) -> LogPosition:
        with self._cond:
            idx = self._index(record.tenant, record.index)
            record.validate(idx.config)
            current = idx.rows[record.id].version if record.id in idx.rows else 0
            if if_version is not None and current != if_version:
                raise VersionConflict(record.id, if_version, current)
            version = current + 1  # a delete resets the version, as in VectorService
            pos = self._append(VECTORS_TOPIC)
            idx.rows[record.id] = StoredVector(
                record.id, parse_vector(record.vector, idx.config.dim).copy(), record.meta,
                tuple(record.tags), {k: float(v) for k, v in record.numeric.items()},
                version, pos.token)
            return pos

    def add(self, record: VectorUpsert) -> LogPosition:
        return self.upsert(record, if_version=0)

    def delete(self, tenant: str, index: str, id: str) -> LogPosition:
        with self._cond:
            idx = self._index(tenant, index)
            check_id(id)
            if id not in idx.rows:
                raise NotFound(f"id {id!r} does not exist in {idx.config.key}")
            del idx.rows[id]
            return self._append(VECTORS_TOPIC)

    # -- reads -----------------------------------------------------------------------------
    def get(
        self, tenant: str, index: str, id: str, *,
        consistency: Consistency = Consistency.EVENTUAL, tokens: tuple[str, ...] = (),
    ) -> StoredVector:
        with self._cond:
            idx = self._index(tenant, index)
            check_id(id)
            self._wait(consistency, tokens, 0, 1000)
            row = idx.rows.get(id)
            if row is None:
                raise NotFound(f"id {id!r} not found in {idx.config.key}")
            return row

    def search(self, request: SearchRequest) -> SearchResponse:
        t0 = time.perf_counter()
        with self._cond:
            idx = self._index(request.tenant, request.index)
            config = idx.config
            query = parse_vector(request.vector, config.dim)
            if not 1 <= request.k <= LIMITS.max_k:
                raise InvalidRequest(f"TOPK must be 1..{LIMITS.max_k}", field="k")
            flt = parse_filter(request.filter, config) if request.filter else None
            self._wait(request.consistency, request.tokens, request.bound_ms,
                       request.timeout_ms)
            rows = [r for r in idx.rows.values()
                    if flt is None or flt.matches(r.tags, r.numeric)]
            applied = self._applied()
        hits: list[Hit] = []
        if rows:
            matrix = np.stack([r.vector for r in rows])
            if config.metric is Metric.L2:
                scores = ((matrix - query) ** 2).sum(axis=1)
            elif config.metric is Metric.IP:
                scores = matrix @ query
            else:
                norms = np.linalg.norm(matrix, axis=1) * np.linalg.norm(query)
                scores = (matrix @ query) / np.where(norms == 0, 1.0, norms)
            sign = 1.0 if config.metric is Metric.L2 else -1.0
            order = sorted(range(len(rows)), key=lambda i: (sign * float(scores[i]), rows[i].id))
            hits = [Hit(rows[i].id, float(scores[i]), rows[i].meta) for i in order[:request.k]]
        debug: dict[str, Any] = {
            "cache_hit": False,
            "layer": "none",
            "decision": "none",
            "latency_ms": round((time.perf_counter() - t0) * 1000, 3),
            "candidates": len(rows),
            "widened": 0,
            "filter_exhausted": flt is not None and len(hits) < request.k,
            "applied": applied,
        }
        return SearchResponse(hits, debug)

    # -- control ---------------------------------------------------------------------------
    def info(self, tenant: str, index: str) -> dict[str, Any]:
        with self._cond:
            idx = self._index(tenant, index)
            c = idx.config
            return {
                "tenant": c.tenant, "index": c.index, "dim": c.dim, "metric": c.metric.value,
                "dtype": c.dtype.value, "recipe": c.recipe,
                "fields": {f.name: f.kind.value for f in c.fields},
                "stats": {"live": len(idx.rows), "head": len(idx.rows), "tail_segments": 0,
                          "memory_bytes": sum(r.vector.nbytes for r in idx.rows.values())},
                "applied": self._applied(),
            }

    def list_indexes(self, tenant: str | None = None) -> list[IndexConfig]:
        if tenant is not None:
            check_name(tenant, "tenant")
        with self._cond:
            return sorted((i.config for i in self._indexes.values()
                           if tenant is None or i.config.tenant == tenant), key=lambda c: c.key)

    def snapshot(self) -> dict[str, Any]:
        with self._cond:
            self._snapshots += 1
            return {"snapshot": f"memory-{self._snapshots}", "indexes": len(self._indexes),
                    "positions": self._applied()}

    def health(self) -> dict[str, Any]:
        with self._cond:
            return {"status": "ok", "indexes": len(self._indexes), "applied": self._applied()}
