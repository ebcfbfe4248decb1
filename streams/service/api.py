"""The data-plane port that the RESP and HTTP servers call.

Every write is validated, then appended to the log; the call returns once the record is
durable, with its position (the token a ``session`` search waits for). Reads are served
from the node's derived state at the requested consistency. All methods are thread-safe
and synchronous; ``search``/``get`` may block up to the request's timeout while waiting
for consistency (servers call them off the event loop when they may wait) and then raise
:class:`streams.index.exceptions.Busy`. Errors are :class:`streams.index.exceptions.VecError`.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from streams.index.exceptions import VecError
from streams.index.model import Consistency, Hit, IndexConfig, Vector, VectorUpsert
from streams.log.port import LogPosition

__all__ = ["DataPlane", "SearchRequest", "SearchResponse", "StoredVector"]


@dataclass(frozen=True, slots=True)
class SearchRequest:
    tenant: str
    index: str
    vector: Vector
    k: int = 10
    filter: str | None = None  # see streams/index/filters.py for the grammar
    consistency: Consistency = Consistency.EVENTUAL
    tokens: tuple[str, ...] = ()  # position tokens a ``session`` search waits for
    bound_ms: int | None = None  # ``bounded``: maximum applied lag
    timeout_ms: int = 1000
    session_id: str | None = None  # client session: the query log and prefetch read it
    # HNSW efSearch of this search (1..MAX_EF; None: the segment default): recall against
    # latency. A search that sets it bypasses the result cache (it would mix answers).
    ef: int | None = None


@dataclass(frozen=True, slots=True)
class SearchResponse:
    """Hits best first, and debug info: at least ``cache_hit``, ``layer``, ``latency_ms``,
    ``decision`` and ``applied`` (the positions the node had applied, as tokens)."""

    hits: list[Hit]
    debug: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StoredVector:
    id: str
    vector: Vector
    meta: str | None
    tags: tuple[str, ...]
    numeric: dict[str, float]
    version: int
    position: str  # the token of the record that wrote it


class DataPlane(abc.ABC):
    @abc.abstractmethod
    def create_index(self, config: IndexConfig) -> LogPosition: ...

    @abc.abstractmethod
    def upsert(self, record: VectorUpsert, *, if_version: int | None = None) -> LogPosition:
        """Append an upsert. ``record.version`` is ignored: the node assigns stored
        version + 1. ``if_version``: refuse with VersionConflict unless the stored version
        is that (0 = the id must not exist)."""

    @abc.abstractmethod
    def add(self, record: VectorUpsert) -> LogPosition:
        """Like upsert, but the id must not exist (VEC.ADD)."""

    def upsert_many(
        self, records: Sequence[VectorUpsert], if_versions: Sequence[int | None] | None = None
    ) -> list[LogPosition | VecError]:
        """Many upserts (``if_versions[i]`` as ``upsert``'s ``if_version``; 0 = ``add``):
        per item its position or the error that refused it. This default writes them one
        by one; a data plane on a log appends the valid ones as one batch."""
        conds = list(if_versions) if if_versions is not None else [None] * len(records)
        out: list[LogPosition | VecError] = []
        for record, cond in zip(records, conds, strict=True):
            try:
                out.append(self.upsert(record, if_version=cond))
            except VecError as exc:
                out.append(exc)
        return out

    @abc.abstractmethod
    def delete(self, tenant: str, index: str, id: str) -> LogPosition: ...

    @abc.abstractmethod
    def get(
        self, tenant: str, index: str, id: str, *,
        consistency: Consistency = Consistency.EVENTUAL, tokens: tuple[str, ...] = (),
    ) -> StoredVector: ...

    @abc.abstractmethod
    def search(self, request: SearchRequest) -> SearchResponse: ...

    @abc.abstractmethod
    def info(self, tenant: str, index: str) -> dict[str, Any]:
        """Stats of one index: config, counts (live, head, tail segments), applied
        position, memory."""

    @abc.abstractmethod
    def list_indexes(self, tenant: str | None = None) -> list[IndexConfig]: ...

    @abc.abstractmethod
    def snapshot(self) -> dict[str, Any]:
        """Write a snapshot now; returns its id and the positions it covers."""

    @abc.abstractmethod
    def health(self) -> dict[str, Any]: ...
