"""A query node on an embedded log, reopenable on the same directory (tests)."""

from __future__ import annotations

import shutil
from pathlib import Path

from streams.log.embedded import EmbeddedLog
from streams.schemas.codec import AvroCodec
from streams.schemas.log_registry import LogRegistry
from streams.service.query_node import QueryNode
from streams.topics import Topics

__all__ = ["Rig"]


class Rig:
    """A log, a registry and a query node over them, reopenable on the same directory."""

    def __init__(self, root: Path, head_capacity: int = 200) -> None:
        self.root = root
        self.head_capacity = head_capacity
        self.topics = Topics()
        self.log = EmbeddedLog(root / "log", durability="none")
        self.log.ensure_topics(self.topics.specs())
        self.codec = AvroCodec(LogRegistry(self.log, self.topics))
        self.node = self._node()

    def _node(self) -> QueryNode:
        return QueryNode(self.log, self.topics, self.codec, self.root / "node",
                         head_capacity=self.head_capacity).start()

    def restart_node(self, *, drop_snapshots: bool = False) -> None:
        self.node.close()
        if drop_snapshots:
            shutil.rmtree(self.root / "node" / "snapshots")
        self.node = self._node()
        assert self.node.catch_up(30)

    def close(self) -> None:
        self.node.close()
        self.log.close()
