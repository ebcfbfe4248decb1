"""What the ingest path needs to know about indexes and embedders, as small ports.

:class:`IndexCatalog` answers an index's config (the processor and the ingest service need
its embedder and filter fields); :class:`NodeCatalog` adapts a :class:`QueryNode`.
:class:`Embedders` opens each embedder once by its registry name.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

from streams.embed import Embedder, open_embedder
from streams.index.model import IndexConfig
from streams.service.query_node import QueryNode

__all__ = ["Embedders", "IndexCatalog", "NodeCatalog"]


class IndexCatalog(Protocol):
    def config(self, index_key: str) -> IndexConfig | None:
        """The index's config (also one created but not yet applied), or None."""

    def sync(self, timeout_s: float) -> bool:
        """Wait until every config in the log at call time is known (after a restart
        the indexes topic is replayed concurrently); False on timeout."""


class NodeCatalog:
    """The configs a query node has applied or appended."""

    def __init__(self, node: QueryNode) -> None:
        self._node = node

    def config(self, index_key: str) -> IndexConfig | None:
        tenant, _, index = index_key.partition("/")
        for c in self._node.service.list_indexes(tenant):
            if c.index == index:
                return c
        return None

    def sync(self, timeout_s: float) -> bool:
        topic = self._node.indexer.topics.indexes
        targets = {(topic, p): end for p, end in self._node.indexer.log.end_offsets(topic).items()}
        return self._node.applied.wait(targets, timeout_s)


class Embedders:
    """Embedders by registry name, each opened once (``factory`` defaults to
    :func:`streams.embed.open_embedder`); thread-safe."""

    def __init__(self, factory: Callable[[str], Embedder] = open_embedder) -> None:
        self._factory = factory
        self._open: dict[str, Embedder] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Embedder:
        """Raises :class:`streams.embed.EmbedderError` for an unknown name."""
        with self._lock:
            found = self._open.get(name)
            if found is None:
                found = self._open[name] = self._factory(name)
            return found

    def close(self) -> None:
        with self._lock:
            for e in self._open.values():
                e.close()
            self._open.clear()
