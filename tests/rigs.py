"""A query node on an embedded log, reopenable on the same directory (tests)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streams.log.embedded import EmbeddedLog
from streams.schemas.codec import AvroCodec
from streams.schemas.log_registry import LogRegistry
from streams.service.query_node import QueryNode
from streams.topics import Topics

if TYPE_CHECKING:
    from streams.policy.join import JoinedDecision
    from streams.policy.learner import OnlineLearner

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


def spied_learner(
    log: EmbeddedLog, topics: Topics, codec: AvroCodec, index_key: str, **kw: Any
) -> tuple[OnlineLearner, list[JoinedDecision]]:
    """A real learner over the node's topics whose trained decisions (for ``index_key``)
    are also recorded: a spy on its VW learner's ``learn``. Close the learner."""
    from streams.policy.learner import OnlineLearner

    ol = OnlineLearner(log, topics, codec, **kw)
    seen: list[JoinedDecision] = []
    learner = ol._state(index_key).learner
    learn = learner.learn

    def spy(joined: Any) -> None:
        joined = list(joined)
        seen.extend(joined)
        learn(joined)

    learner.learn = spy  # type: ignore[method-assign]
    return ol, seen
