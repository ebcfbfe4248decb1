"""``IngestService``: the knowledge-base façade behind ``VEC.SOURCE``, ``VEC.QUERY`` and
``VEC.CREATE ... EMBEDDER`` (and their HTTP routes).

Writes append a validated Source to ``documents`` and return its position once durable;
the embedder processor makes it searchable later. Versions: the service assigns version =
current + 1 (current: the newest version it appended and the processor has not done yet,
else the processor's done version); ``if_version`` refuses with ``VEC_ERR_CONFLICT``
unless the current version is that. Exact among writes through this node; producers
writing ``documents`` directly carry their own versions, and the processor dead-letters one
older than the version it has done.

Reads embed the query text with the index's embedder (never another model) and search the
index. ``session`` tokens may be ``documents`` positions (what ``VEC.SOURCE`` returns): the
query then waits until the processor has done them and the query node has applied what the
processor appended, so a Source acknowledged before the query is found by it; ``strong``
waits for the processor to do every Source in the log at request time, then searches with
``strong``.
"""

from __future__ import annotations

import json
import threading
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from streams.embed import Embedder
from streams.index.exceptions import Busy, InvalidRequest, NotFound, VersionConflict
from streams.index.model import (
    Consistency,
    Dtype,
    FieldKind,
    FilterField,
    IndexConfig,
    Metric,
    Vector,
)
from streams.ingest.catalog import Embedders, IndexCatalog, NodeCatalog
from streams.ingest.chunker import Chunker
from streams.ingest.decision import Vectorizer
from streams.ingest.processor import EmbedderProcessor
from streams.ingest.source import Source, source_to_avro
from streams.ingest.state import IngestState
from streams.log.port import Log, LogPosition, now_ms
from streams.schemas import catalog
from streams.schemas.codec import AvroCodec
from streams.service.api import DataPlane, SearchRequest, SearchResponse
from streams.service.query_node import QueryNode
from streams.topics import Topics

__all__ = [
    "TEXT_FIELDS",
    "IngestService",
    "QueryRequest",
    "TextSearcher",
    "hit_source",
    "open_ingest",
]

TEXT_FIELDS = (
    FilterField("source_type", FieldKind.TAG),
    FilterField("channel_id", FieldKind.TAG),
    FilterField("user_id", FieldKind.TAG),
)
"""Filter fields every text index declares (the tags of its chunks)."""

Mode = Literal["dense", "keyword", "hybrid"]
_STRIPES = 64


@dataclass(frozen=True, slots=True)
class QueryRequest:
    tenant: str
    index: str
    text: str
    k: int = 10
    mode: Mode = "dense"
    filter: str | None = None
    consistency: Consistency = Consistency.EVENTUAL
    tokens: tuple[str, ...] = ()
    bound_ms: int | None = None
    timeout_ms: int = 1000
    alpha: float | None = None  # hybrid: weight of dense in alpha fusion; None: RRF
    # client session: its dense search carries it to the query log and the prefetcher
    session_id: str | None = None


class TextSearcher(Protocol):
    """Keyword and hybrid search (``streams.text.TextSearch``)."""

    def search(
        self,
        tenant: str,
        index: str,
        text: str,
        k: int = 10,
        *,
        mode: str = "hybrid",
        filter: str | None = None,
        alpha: float | None = None,
        consistency: Consistency = Consistency.EVENTUAL,
        tokens: tuple[str, ...] = (),
        bound_ms: int | None = None,
        timeout_ms: int = 1000,
        vector: Vector | None = None,
        session_id: str | None = None,
    ) -> SearchResponse: ...


class IngestService:
    def __init__(
        self,
        log: Log,
        topics: Topics,
        codec: AvroCodec,
        dataplane: DataPlane,
        catalog_: IndexCatalog,
        processor: EmbedderProcessor,
        embedders: Embedders | None = None,
        text: TextSearcher | None = None,
    ) -> None:
        self.text = text
        self.log = log
        self.topics = topics
        self.codec = codec
        self.dataplane = dataplane
        self.catalog = catalog_
        self.processor = processor
        self.embedders = embedders or processor.embedders
        self._subject = catalog.subject_for(topics.documents)
        self._schema = catalog.load_schema(catalog.TOPIC_VALUE_SCHEMA["documents"])
        self._pending: dict[str, tuple[int, LogPosition]] = {}  # key -> (version, position)
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        # Sources appended before this service opened (a restart's backlog): their versions
        # are known only once the processor has done them.
        self._backlog = {
            (topics.documents, p): end for p, end in log.end_offsets(topics.documents).items()
        }

    # -- indexes --------------------------------------------------------------------------
    def embedder(self, name: str) -> Embedder:
        """The embedder registered as ``name``; ``VEC_ERR_INVALID`` if there is none."""
        try:
            return self.embedders.get(name)
        except Exception as exc:  # EmbedderError, or a provider that cannot start
            raise InvalidRequest(f"embedder {name!r}: {exc}", field="embedder") from None

    def create_text_index(
        self,
        tenant: str,
        index: str,
        embedder: str,
        *,
        metric: Metric = Metric.COSINE,
        dtype: Dtype = Dtype.FP32,
        recipe: str = "HNSW32",
        fields: tuple[FilterField, ...] = (),
    ) -> LogPosition:
        """Create an index whose dim is the embedder's, declaring :data:`TEXT_FIELDS`
        besides ``fields``. Unknown embedder: ``VEC_ERR_INVALID``."""
        model = self.embedder(embedder)
        names = {f.name for f in fields}
        declared = tuple(fields) + tuple(f for f in TEXT_FIELDS if f.name not in names)
        config = IndexConfig(
            tenant, index, model.dim, metric, dtype, recipe, declared, embedder=embedder
        )
        return self.dataplane.create_index(config)

    def _text_config(self, tenant: str, index: str) -> IndexConfig:
        config = self.catalog.config(f"{tenant}/{index}")
        if config is None:
            raise NotFound(f"index {tenant}/{index} does not exist")
        if config.embedder is None:
            raise InvalidRequest(
                f"index {config.key} has no embedder (create it with "
                "EMBEDDER to add Sources and query by text)",
                field="index",
            )
        return config

    # -- writes ---------------------------------------------------------------------------
    def _current_version(self, key: str) -> int:
        if self._backlog:
            if not self.processor.processed.wait(self._backlog, 30.0):
                raise Busy(
                    "Sources from before the restart are still being embedded", retry_after_s=1.0
                )
            self._backlog = {}
        pending = self._pending.get(key)
        if pending is not None:
            version, pos = pending
            if not self.processor.processed.reached({(pos.topic, pos.partition): pos.offset + 1}):
                return version
            del self._pending[key]
        done = self.processor.state.source(key)
        return done.version if done is not None else 0

    def put_source(self, source: Source, *, if_version: int | None = None) -> LogPosition:
        """Validate and append ``source`` (its ``version`` is assigned here); durable on
        return. Nothing is appended when validation fails."""
        self._text_config(source.tenant, source.index)
        key = source.key
        with self._stripes[zlib.crc32(key.encode()) % _STRIPES]:
            current = self._current_version(key)
            if if_version is not None and current != if_version:
                raise VersionConflict(source.id, if_version, current)
            stamped = replace(
                source, version=current + 1, timestamp_ms=source.timestamp_ms or now_ms()
            ).validate()
            value = self.codec.encode(self._subject, self._schema, source_to_avro(stamped))
            pos = self.log.append(self.topics.documents, key, value)
            self._pending[key] = (stamped.version, pos)
            return pos

    def delete_source(self, tenant: str, index: str, source_id: str) -> LogPosition:
        """Append a tombstone: the processor deletes every chunk of the Source."""
        self._text_config(tenant, index)
        key = f"{tenant}/{index}/{source_id}"
        with self._stripes[zlib.crc32(key.encode()) % _STRIPES]:
            if self._current_version(key) == 0:
                raise NotFound(f"source {source_id!r} does not exist in {tenant}/{index}")
            pos = self.log.append(self.topics.documents, key, None)
            self._pending[key] = (0, pos)
            return pos

    # -- reads ----------------------------------------------------------------------------
    def _vector_tokens(self, request: QueryRequest) -> tuple[Consistency, tuple[str, ...]]:
        """Wait for the processor as the consistency level asks; the level and tokens the
        search of the vectors then waits for."""
        timeout_s = request.timeout_ms / 1000
        docs = self.topics.documents
        if request.consistency is Consistency.STRONG:
            targets = {(docs, p): end for p, end in self.log.end_offsets(docs).items()}
        elif request.consistency is Consistency.SESSION:
            targets = {}
            for token in request.tokens:
                try:
                    pos = LogPosition.parse(token)
                except ValueError:
                    raise InvalidRequest(f"bad position token {token!r}", field="token") from None
                if pos.topic == docs:
                    tp = (pos.topic, pos.partition)
                    targets[tp] = max(targets.get(tp, 0), pos.offset + 1)
        else:
            return request.consistency, request.tokens
        if not self.processor.processed.wait(targets, timeout_s):
            raise Busy(
                f"{request.consistency.value} query: Sources not embedded within "
                f"{request.timeout_ms} ms",
                retry_after_s=0.1,
            )
        tokens = tuple(t for t in request.tokens if not t.startswith(docs + ":"))
        if targets:
            tokens += tuple(self.processor.appended.tokens())
        consistency: Consistency = request.consistency
        if consistency is Consistency.SESSION and not tokens:
            consistency = Consistency.EVENTUAL
        return consistency, tokens

    def query(self, request: QueryRequest) -> SearchResponse:
        """Embed ``request.text`` with the index's embedder and search; hits carry the
        chunk's source id, location and text in their meta."""
        config = self._text_config(request.tenant, request.index)
        if not request.text.strip():
            raise InvalidRequest("query text is empty", field="text")
        if request.mode not in ("dense", "keyword", "hybrid"):
            raise InvalidRequest("MODE must be dense|keyword|hybrid", field="mode")
        if request.mode != "dense":
            if self.text is None:
                raise InvalidRequest(f"{request.mode} mode not available", field="mode")
            consistency, tokens = self._vector_tokens(request)
            return self.text.search(
                request.tenant,
                request.index,
                request.text,
                request.k,
                mode=request.mode,
                filter=request.filter,
                alpha=request.alpha,
                consistency=consistency,
                tokens=tokens,
                bound_ms=request.bound_ms,
                timeout_ms=request.timeout_ms,
                session_id=request.session_id,
            )
        assert config.embedder is not None
        consistency, tokens = self._vector_tokens(request)  # first: it bounds the wait
        vector = self.embedders.get(config.embedder).embed([request.text])[0]
        if self.text is not None:  # through the text search: L2 on the query text
            response = self.text.search(
                request.tenant,
                request.index,
                request.text,
                request.k,
                mode="dense",
                filter=request.filter,
                consistency=consistency,
                tokens=tokens,
                bound_ms=request.bound_ms,
                timeout_ms=request.timeout_ms,
                vector=np.asarray(vector, np.float32),
                session_id=request.session_id,
            )
            response.debug["embedder"] = config.embedder
            return response
        response = self.dataplane.search(
            SearchRequest(
                request.tenant,
                request.index,
                np.asarray(vector, np.float32),
                request.k,
                request.filter,
                consistency,
                tokens,
                request.bound_ms,
                request.timeout_ms,
                session_id=request.session_id,
            )
        )
        response.debug["mode"] = request.mode
        response.debug["embedder"] = config.embedder
        return response

    def close(self) -> None:
        """Stop the processor gracefully (its batch in flight is committed), then close its
        state."""
        self.processor.stop()
        self.processor.state.close()

    def stats(self) -> dict[str, object]:
        return {
            **self.processor.stats.__dict__,
            "processed": self.processor.processed.tokens(),
            "error": None if self.processor.error is None else repr(self.processor.error),
        }


def hit_source(meta: str | None) -> tuple[str | None, dict[str, int] | None]:
    """The source id and chunk location in a hit's meta (``None`` for other vectors)."""
    if not meta:
        return None, None
    try:
        d = json.loads(meta)
    except ValueError:
        return None, None
    if not isinstance(d, dict):
        return None, None
    return d.get("source_id"), d.get("chunk")


def open_ingest(
    node: QueryNode,
    state_dir: str | Path,
    *,
    embedders: Embedders | None = None,
    chunker: Chunker | None = None,
    vectorizer: Vectorizer | None = None,
    text: TextSearcher | None = None,
    batch_sources: int = 32,
    attempts: int = 3,
    backoff_s: float = 0.05,
    hold_idle_ms: int = 50,
    hold_max_age_ms: int = 5_000,
    hold_max_pending: int = 10_000,
) -> IngestService:
    """An embedder processor (started) on ``node``'s log, with its state at ``state_dir``,
    and the service over both (``text``: keyword/hybrid search, default the node's
    ``text``). ``hold_*``: when chunks the vectorizer queued at medium/low priority are
    released (see :mod:`streams.ingest.processor`). ``close()`` the service to stop it."""
    indexer = node.indexer
    state = IngestState(state_dir)
    catalog_ = NodeCatalog(node)
    processor = EmbedderProcessor(
        indexer.log,
        indexer.topics,
        indexer.codec,
        node.dlq,
        state,
        catalog_,
        embedders=embedders,
        chunker=chunker,
        vectorizer=vectorizer,
        batch_sources=batch_sources,
        attempts=attempts,
        backoff_s=backoff_s,
        hold_idle_ms=hold_idle_ms,
        hold_max_age_ms=hold_max_age_ms,
        hold_max_pending=hold_max_pending,
        writer=node.service,  # the node's service knows each chunk's newest version
    ).start()
    if text is None:  # the node's keyword/hybrid search, where it has one
        text = getattr(node, "text", None)
    return IngestService(
        indexer.log, indexer.topics, indexer.codec, node.service, catalog_, processor, text=text
    )
