"""The topic catalogue of ARCHITECTURE §2: one place for names, keys and cleanup policies.

Names take a configurable prefix (default ``streamvec.``). No other module spells a topic
name; they ask a :class:`Topics` for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from streams.log.port import DAY_MS, CleanupPolicy, TopicSpec

__all__ = ["DEFAULT_PREFIX", "Topics"]

DEFAULT_PREFIX = "streamvec."

_COMPACT = CleanupPolicy.COMPACT
_DELETE = CleanupPolicy.DELETE

# suffix -> (cleanup, retention_ms for delete topics)
_CATALOGUE: dict[str, tuple[CleanupPolicy, int | None]] = {
    "indexes": (_COMPACT, None),
    "vectors": (_COMPACT, None),
    "documents": (_COMPACT, None),
    "query-log": (_DELETE, 7 * DAY_MS),
    "feedback": (_DELETE, 7 * DAY_MS),
    "policy": (_COMPACT, None),
    "usage": (_COMPACT, None),
    "audit": (_DELETE, 365 * DAY_MS),
    "dlq": (_DELETE, 30 * DAY_MS),
    # vectors the capacity manager moved out of `vectors`, keyed tenant/index/id like
    # `vectors`; a restore re-appends them there and tombstones the key here
    "archive": (_COMPACT, None),
    "_schemas": (_COMPACT, None),
}


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names under one prefix. ``partitions`` applies to the data topics; the
    single-writer topics (``_schemas``, ``audit``, ``policy``, ``indexes``) keep one
    partition so their total order is the log order."""

    prefix: str = DEFAULT_PREFIX
    partitions: int = 1

    def name(self, suffix: str) -> str:
        if suffix not in _CATALOGUE:
            raise KeyError(f"unknown topic {suffix!r}; known: {sorted(_CATALOGUE)}")
        return self.prefix + suffix

    @property
    def indexes(self) -> str:
        return self.name("indexes")

    @property
    def vectors(self) -> str:
        return self.name("vectors")

    @property
    def documents(self) -> str:
        return self.name("documents")

    @property
    def query_log(self) -> str:
        return self.name("query-log")

    @property
    def feedback(self) -> str:
        return self.name("feedback")

    @property
    def policy(self) -> str:
        return self.name("policy")

    @property
    def usage(self) -> str:
        return self.name("usage")

    @property
    def audit(self) -> str:
        return self.name("audit")

    @property
    def dlq(self) -> str:
        return self.name("dlq")

    @property
    def archive(self) -> str:
        return self.name("archive")

    @property
    def schemas(self) -> str:
        return self.name("_schemas")

    def spec(self, suffix: str) -> TopicSpec:
        cleanup, retention = _CATALOGUE[suffix]
        single = suffix in ("_schemas", "audit", "policy", "indexes")
        return TopicSpec(
            name=self.name(suffix),
            partitions=1 if single else self.partitions,
            cleanup=cleanup,
            retention_ms=retention,
        )

    def specs(self) -> list[TopicSpec]:
        return [self.spec(s) for s in _CATALOGUE]
