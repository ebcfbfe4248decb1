"""The root of streamvec's exception tree.

::

    StreamvecError                      every error this package raises on purpose
    ├── ConfigError                     settings that cannot work together
    ├── log.exceptions.LogError         the log port (both transports)
    │   ├── TopicNotFound
    │   ├── TopicConflict               create_topic with a different spec
    │   ├── InvalidRecord               a record the log refuses (bad partition, oversize)
    │   ├── LogClosed
    │   └── TransportError              broker/disk failures, translated at the adapter edge
    └── schemas.exceptions.SchemaError  Avro schemas, codec and registry
        ├── SchemaNotFound / SubjectNotFound / VersionNotFound
        ├── IncompatibleSchema          carries the checker's messages
        ├── InvalidSchema
        └── DecodeError                 bytes that are not a record we can read (goes to dlq)

Each error carries a stable ``code`` so that callers (HTTP, RESP, DLQ) can answer with it.
"""

from __future__ import annotations

__all__ = ["ConfigError", "StreamvecError"]


class StreamvecError(Exception):
    """Base class of every error raised on purpose by streamvec."""

    code: str = "VEC_ERR_INTERNAL"


class ConfigError(StreamvecError):
    """Settings that cannot work together (raised at start, never mid-flight)."""

    code = "VEC_ERR_INVALID"
