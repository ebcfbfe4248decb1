"""Errors of the log port. Adapters translate their library's errors into these at the edge."""

from __future__ import annotations

from streams.exceptions import StreamvecError

__all__ = [
    "InvalidRecord",
    "LogClosed",
    "LogError",
    "TopicConflict",
    "TopicNotFound",
    "TransportError",
]


class LogError(StreamvecError):
    """Base of the log port's errors."""


class TopicNotFound(LogError):
    code = "VEC_ERR_NOT_FOUND"

    def __init__(self, topic: str) -> None:
        super().__init__(f"topic {topic!r} does not exist")
        self.topic = topic


class TopicConflict(LogError):
    """``create_topic`` was asked for a topic that exists with another spec."""

    code = "VEC_ERR_INVALID"


class InvalidRecord(LogError):
    """The log refuses this record; nothing of the batch it came in was appended."""

    code = "VEC_ERR_INVALID"


class LogClosed(LogError):
    code = "VEC_ERR_BUSY"


class TransportError(LogError):
    """The broker or the disk failed. ``retriable`` says whether the same call may succeed later."""

    code = "VEC_ERR_BUSY"

    def __init__(self, message: str, *, retriable: bool = True) -> None:
        super().__init__(message)
        self.retriable = retriable
