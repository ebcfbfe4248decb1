"""Sources: the documents of the knowledge-base path (``schemas/Source.avsc``).

A :class:`Source` is what a client appends to ``documents`` (keyed ``tenant/index/id``):
full ``text``, or ``chunks`` already cut by the producer, or the ``messages`` of a chat.
:meth:`Source.validate` is the one check every path runs (``VEC.SOURCE``, HTTP, and the
embedder processor for records produced by any Kafka client), so a Source that the front
door refuses is exactly one that the processor dead-letters.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

from streams.index.exceptions import InvalidRequest
from streams.index.model import LIMITS, check_id, check_name

__all__ = [
    "MAX_SOURCE_META_BYTES",
    "ChatMessage",
    "Source",
    "SourceType",
    "source_from_avro",
    "source_to_avro",
]

MAX_SOURCE_META_BYTES = 16 * 1024
"""The user's metadata is copied into every chunk's payload, which has its own limit."""

_MAX_FIELD_BYTES = 100  # channel and user ids become tags (``channel_id:<c>``), max 128 bytes


class SourceType(enum.StrEnum):
    FILE = "file"
    WEB = "web"
    CHAT = "chat"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    text: str
    ts_ms: int
    user_id: str | None = None


@dataclass(frozen=True, slots=True)
class Source:
    """One document. Exactly one of ``text``, ``chunks``, ``messages`` carries content."""

    tenant: str
    index: str
    id: str
    text: str | None = None
    type: SourceType = SourceType.OTHER
    channel_id: str | None = None
    user_id: str | None = None
    title: str | None = None
    uri: str | None = None
    meta: str | None = None  # a JSON object as text
    chunks: tuple[str, ...] | None = None
    messages: tuple[ChatMessage, ...] | None = None
    version: int = 1
    timestamp_ms: int = 0

    @property
    def key(self) -> str:
        return f"{self.tenant}/{self.index}/{self.id}"

    @property
    def index_key(self) -> str:
        return f"{self.tenant}/{self.index}"

    def content_bytes(self) -> int:
        if self.text is not None:
            return len(self.text.encode())
        if self.chunks is not None:
            return sum(len(c.encode()) for c in self.chunks)
        return sum(len(m.text.encode()) for m in self.messages or ())

    def validate(self) -> Source:
        """Raise :class:`InvalidRequest` (naming the field) unless this Source can be
        chunked and embedded. Checks: names and id, one content field that is not empty
        (nor only whitespace), at most ``LIMITS.max_source_bytes`` of content, ``meta`` a
        JSON object of at most :data:`MAX_SOURCE_META_BYTES`, channel and user ids usable
        as tags, a positive version."""
        check_name(self.tenant, "tenant")
        check_name(self.index, "index")
        check_id(self.id)
        if "#" in self.id:
            raise InvalidRequest(
                "source id must not contain '#' (chunk ids are id#n)", field="source_id"
            )
        given = [f for f in ("text", "chunks", "messages") if getattr(self, f) is not None]
        if len(given) != 1:
            raise InvalidRequest(
                "a Source needs exactly one of text, chunks, messages", field="text"
            )
        if self.text is not None and not self.text.strip():
            raise InvalidRequest("empty text: nothing to embed", field="text")
        if self.chunks is not None:
            if not self.chunks:
                raise InvalidRequest("empty chunks: nothing to embed", field="chunks")
            for i, c in enumerate(self.chunks):
                if not c.strip():
                    raise InvalidRequest(f"chunk {i} is empty", field="chunks")
        if self.messages is not None:
            if not self.messages:
                raise InvalidRequest("empty messages: nothing to embed", field="messages")
            if all(not m.text.strip() for m in self.messages):
                raise InvalidRequest("every message is empty", field="messages")
        size = self.content_bytes()
        if size > LIMITS.max_source_bytes:
            raise InvalidRequest(
                f"source text is {size} bytes, over the limit of {LIMITS.max_source_bytes}",
                field="text",
            )
        if self.meta is not None:
            if len(self.meta.encode()) > MAX_SOURCE_META_BYTES:
                raise InvalidRequest(f"meta exceeds {MAX_SOURCE_META_BYTES} bytes", field="meta")
            try:
                parsed = json.loads(self.meta)
            except ValueError:
                raise InvalidRequest("meta must be JSON", field="meta") from None
            if not isinstance(parsed, dict):
                raise InvalidRequest("meta must be a JSON object", field="meta")
        for name in ("channel_id", "user_id"):
            value = getattr(self, name)
            if value is not None and (
                not value or "," in value or len(value.encode()) > _MAX_FIELD_BYTES
            ):
                raise InvalidRequest(
                    f"{name} must be 1..{_MAX_FIELD_BYTES} bytes without commas", field=name
                )
        if self.version < 1:
            raise InvalidRequest("version must be >= 1", field="version")
        return self


def _millis(ts: Any) -> int:
    return ts if isinstance(ts, int) else int(ts.timestamp() * 1000)


def source_from_avro(d: dict[str, Any]) -> Source:
    """A decoded ``Source`` record -> :class:`Source` (not yet validated)."""
    try:
        kind = SourceType(d.get("type") or "other")
    except ValueError:  # a symbol this reader does not know: the schema says map to other
        kind = SourceType.OTHER
    messages = d.get("messages")
    chunks = d.get("chunks")
    return Source(
        tenant=d["tenant"],
        index=d["index"],
        id=d["id"],
        text=d.get("text"),
        type=kind,
        channel_id=d.get("channel_id"),
        user_id=d.get("user_id"),
        title=d.get("title"),
        uri=d.get("uri"),
        meta=d.get("meta"),
        chunks=None if chunks is None else tuple(chunks),
        messages=None
        if messages is None
        else tuple(
            ChatMessage(m["role"], m["text"], _millis(m["ts"]), m.get("user_id")) for m in messages
        ),
        version=int(d["version"]),
        timestamp_ms=_millis(d["timestamp"]),
    )


def source_to_avro(s: Source) -> dict[str, Any]:
    return {
        "tenant": s.tenant,
        "index": s.index,
        "id": s.id,
        "type": s.type.value,
        "channel_id": s.channel_id,
        "user_id": s.user_id,
        "title": s.title,
        "uri": s.uri,
        "meta": s.meta,
        "text": s.text,
        "chunks": None if s.chunks is None else list(s.chunks),
        "messages": None
        if s.messages is None
        else [
            {"role": m.role, "user_id": m.user_id, "text": m.text, "ts": m.ts_ms}
            for m in s.messages
        ],
        "version": s.version,
        "timestamp": s.timestamp_ms,
    }
