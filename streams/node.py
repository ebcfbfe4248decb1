"""The node ``streamvec up`` runs: the log (embedded or Kafka), the topics of
ARCHITECTURE §2, the schema registry (served on ``registry_port`` when no remote registry
is configured) with every topic's value schema registered under ``<topic>-value``.

The index service (indexer, search, RESP and HTTP data plane) joins this node in the
issue that builds it; this module is the host it plugs into.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn

from streams.config import Settings
from streams.log import Log, open_log
from streams.schemas import catalog
from streams.schemas.codec import AvroCodec
from streams.schemas.log_registry import LogRegistry
from streams.schemas.registry import SchemaRegistry
from streams.schemas.rest import create_registry_app
from streams.topics import Topics

__all__ = ["Node", "open_node"]


@dataclass
class Node:
    settings: Settings
    log: Log
    topics: Topics
    registry: SchemaRegistry
    codec: AvroCodec

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

    async def serve(self) -> None:
        """Serve the HTTP endpoints until cancelled."""
        servers = []
        if self.settings.schema_registry_url is None:
            app = create_registry_app(self.registry)
            cfg = uvicorn.Config(
                app,
                host=self.settings.host,
                port=self.settings.registry_port,
                log_level="warning",
                lifespan="off",
            )
            servers.append(uvicorn.Server(cfg))
        await asyncio.gather(*(s.serve() for s in servers))


@contextlib.contextmanager
def open_node(settings: Settings) -> Iterator[Node]:
    """Open the log, create the topics, open the registry; close the log on exit."""
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
        yield node
    finally:
        log.close()
