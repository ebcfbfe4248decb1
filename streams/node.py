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
from typing import Any

import uvicorn

from streams.config import Settings
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

__all__ = ["Node", "open_node"]


@dataclass
class Node:
    settings: Settings
    log: Log
    topics: Topics
    registry: SchemaRegistry
    codec: AvroCodec
    query: QueryNode | None = None

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
        ).start()
        return self.query

    async def serve(self) -> None:
        """Serve the registry, the HTTP API and RESP until cancelled."""
        s = self.settings
        apps = []
        if s.schema_registry_url is None:
            apps.append((create_registry_app(self.registry), s.registry_port))
        if self.query is not None:
            apps.append((create_http_app(self.query.service), s.http_port))
        tasks: list[Coroutine[Any, Any, None]] = [
            uvicorn.Server(uvicorn.Config(app, host=s.host, port=port, log_level="warning",
                                          lifespan="off")).serve()
            for app, port in apps
        ]
        if self.query is not None:
            tasks.append(RespServer(self.query.service, s.host, s.resp_port).serve())
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
            if node.query is not None:
                node.query.close()
    finally:
        log.close()
