"""The node ``streamvec up`` runs: the log (embedded or Kafka), the topics of
ARCHITECTURE §2, the schema registry (served on ``registry_port`` when no remote registry
is configured) with every topic's value schema registered under ``<topic>-value``, and a
query node (indexer + search) served over RESP and HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import uvicorn

from streams.cache.policy import GuardConfig
from streams.config import Settings
from streams.ingest import ChatMode, Chunker, Embedders, IngestService, open_ingest
from streams.ingest.service import TextSearcher
from streams.log import Log, open_log
from streams.schemas import catalog
from streams.schemas.codec import AvroCodec
from streams.schemas.log_registry import LogRegistry
from streams.schemas.registry import SchemaRegistry
from streams.schemas.rest import create_registry_app
from streams.service.http import create_http_app
from streams.service.query_node import QueryNode
from streams.service.resp import RespServer
from streams.topics import Topics

if TYPE_CHECKING:
    from streams.policy.learner import OnlineLearner

__all__ = ["Node", "open_node"]


@dataclass
class Node:
    settings: Settings
    log: Log
    topics: Topics
    registry: SchemaRegistry
    codec: AvroCodec
    query: QueryNode | None = None
    ingest: IngestService | None = None
    learner: OnlineLearner | None = None

    def register_schemas(self) -> dict[str, int]:
        """Register each topic's value schema (idempotent); subject -> schema id."""
        ids = {}
        for suffix, name in catalog.TOPIC_VALUE_SCHEMA.items():
            subject = catalog.subject_for(self.topics.name(suffix))
            ids[subject] = self.registry.register(subject, catalog.load_schema(name))
        return ids

    def encode(self, suffix: str, record: dict[str, object]) -> bytes:
        """Encode ``record`` with the value schema of topic ``suffix`` (wire format)."""
        name = catalog.TOPIC_VALUE_SCHEMA[suffix]
        subject = catalog.subject_for(self.topics.name(suffix))
        return self.codec.encode(subject, catalog.load_schema(name), dict(record))

    def start_query_node(self) -> QueryNode:
        """Restore from the newest snapshot, replay the log, start indexing."""
        self.query = QueryNode(
            self.log, self.topics, self.codec, self.settings.data_dir / "node",
            head_capacity=self.settings.head_capacity,
            snapshot_interval_s=self.settings.snapshot_interval_s,
            cache_enabled=self.settings.cache_enabled,
            cache_budget_bytes=self.settings.cache_budget_bytes,
            cache_verify_rate=self.settings.cache_verify_rate,
            cache_layers=self.settings.cache_layers,
            cache_l2_threshold=self.settings.cache_l2_threshold,
            cache_l2_text_threshold=self.settings.cache_l2_text_threshold,
            cache_l2_penalty_ms=self.settings.cache_l2_penalty_ms,
            cache_l2_text_penalty_ms=self.settings.cache_l2_text_penalty_ms,
            cache_tenant_budget_bytes=self.settings.cache_tenant_budget_bytes,
            cache_background_offers=self.settings.cache_background_offers,
            cache_eviction=self.settings.cache_eviction,
            cache_admit_after=self.settings.cache_admit_after,
            cache_lazy_offers=self.settings.cache_lazy_offers,
            policy_loop=self.settings.policy_enabled,
            prefetch=self.settings.prefetch_enabled,
            capacity_interval_s=self.settings.capacity_interval_s or None,
            policy_guard=GuardConfig(
                max_age_s=self.settings.policy_max_age_s,
                fallback=self.settings.policy_fallback,
                min_searches=self.settings.policy_min_searches,
            ),
        ).start()
        return self.query

    def start_policy_learner(self) -> OnlineLearner:
        """Run the policy learner (``query-log`` -> ``policy``) on a thread of this node."""
        from streams.policy.learner import OnlineLearner

        self.learner = OnlineLearner(
            self.log, self.topics, self.codec, budget_bytes=self.settings.cache_budget_bytes,
            update_every=self.settings.policy_update_every,
            # the eviction tables' shadow caches cost most of the learner's CPU: only for a
            # node that evicts by them
            eviction_tables=self.settings.cache_eviction == "learned",
        ).start(cpu_share=self.settings.policy_learner_cpu_share)
        return self.learner

    def start_ingest(
        self, *, embedders: Embedders | None = None, text: TextSearcher | None = None,
    ) -> IngestService:
        """Start the embedder processor (``documents`` -> ``vectors``) on the query node,
        finishing a batch a crash left in flight; Sources, text queries and
        ``VEC.CREATE ... EMBEDDER`` are then served."""
        assert self.query is not None, "start_query_node() first"
        s = self.settings
        vectorizer = None
        if s.smart_vectorize:  # decisions shown in VEC.INFO; tightened by the budgets
            from streams.ingest.vectorize import IndexNeighbours, SmartVectorizer

            vectorizer = SmartVectorizer(
                neighbours=IndexNeighbours(self.query.service),
                utilisation=self.query.capacity.utilisation,
            ).attach(self.query.service)
        self.ingest = open_ingest(
            self.query, s.data_dir / "ingest", embedders=embedders, text=text,
            vectorizer=vectorizer,
            chunker=Chunker(s.chunk_tokens, s.chunk_overlap_tokens, ChatMode(s.chat_chunking)),
            batch_sources=s.ingest_batch_sources, attempts=s.embed_attempts,
            backoff_s=s.embed_backoff_s, hold_idle_ms=s.hold_idle_ms,
            hold_max_age_ms=s.hold_max_age_ms, hold_max_pending=s.hold_max_pending)
        return self.ingest

    async def serve(self) -> None:
        """Serve the registry, the HTTP API and RESP until cancelled."""
        s = self.settings
        apps = []
        if s.schema_registry_url is None:
            apps.append((create_registry_app(self.registry), s.registry_port))
        if self.query is not None:
            apps.append((create_http_app(self.query.service, ingest=self.ingest), s.http_port))
        tasks: list[Coroutine[Any, Any, None]] = [
            uvicorn.Server(uvicorn.Config(app, host=s.host, port=port, log_level="warning",
                                          lifespan="off")).serve()
            for app, port in apps
        ]
        if self.query is not None:
            tasks.append(RespServer(self.query.service, s.host, s.resp_port,
                                    ingest=self.ingest).serve())
        await asyncio.gather(*tasks)


@contextlib.contextmanager
def open_node(settings: Settings) -> Iterator[Node]:
    """Open the log, create the topics, open the registry; on exit stop the query node
    (if one was started) and close the log."""
    log = open_log(settings)
    try:
        topics = Topics(settings.topic_prefix, settings.partitions)
        log.ensure_topics(topics.specs())
        registry: SchemaRegistry
        if settings.schema_registry_url is not None:
            from streams.schemas.remote_registry import RemoteRegistry

            registry = RemoteRegistry(settings.schema_registry_url)
        else:
            registry = LogRegistry(log, topics)
        node = Node(settings, log, topics, registry, AvroCodec(registry))
        node.register_schemas()
        try:
            yield node
        finally:
            if node.learner is not None:
                node.learner.close()
            if node.ingest is not None:  # before the query node: it reads the node's state
                node.ingest.close()
            if node.query is not None:
                node.query.close()
    finally:
        log.close()
