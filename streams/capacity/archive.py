"""The ``archive`` topic: vectors moved out of ``vectors`` by the capacity manager, and
the ``audit`` records of what it did.

``archive`` is compacted and keyed like ``vectors`` (``tenant/index/id``); its values are
full VectorRecords (the ``vectors`` schema), so a restore re-appends exactly what was
archived. Order of effects, so that nothing acknowledged is ever only in memory:

1. archive: the VectorRecord is appended to ``archive`` and durable, then the delete is
   appended to ``vectors`` (a crash between the two leaves the vector in both: restorable
   and still searchable, never lost);
2. restore: the record is re-appended to ``vectors`` and durable, then the ``archive`` key
   is tombstoned (a crash between leaves it in both; restoring again is harmless).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from streams.log.port import Log, LogPosition, Record, now_ms
from streams.schemas import catalog
from streams.schemas.codec import AvroCodec
from streams.service.state import Entry
from streams.topics import Topics

__all__ = ["Archive", "ArchivedRecord", "AuditLog"]


@dataclass(frozen=True, slots=True)
class ArchivedRecord:
    """A vector as archived (what a restore writes back)."""

    tenant: str
    index: str
    id: str
    vector: bytes  # fp32 little-endian
    meta: str | None
    tags: tuple[str, ...]
    numeric: dict[str, float]
    version: int
    ttl_ms: int | None
    position: LogPosition


class Archive:
    """Reads and writes ``topics.archive`` (created if missing)."""

    def __init__(self, log: Log, topics: Topics, codec: AvroCodec) -> None:
        self.log = log
        self.topic = topics.archive
        self.codec = codec
        self._subject = catalog.subject_for(self.topic)
        self._schema = catalog.load_schema(catalog.TOPIC_VALUE_SCHEMA["archive"])
        log.ensure_topics([topics.spec("archive")])

    def put(self, tenant: str, index: str, id: str, entry: Entry, reason: str) -> LogPosition:
        """Append ``entry`` (the current copy of ``id``); durable when this returns."""
        return self.put_many([(tenant, index, id, entry, reason)])[-1]

    def put_many(self, items: list[tuple[str, str, str, Entry, str]]) -> list[LogPosition]:
        """Append each ``(tenant, index, id, entry, reason)`` in one batch; all durable
        when this returns."""
        return self.log.append_batch([self._record(*item) for item in items])

    def _record(self, tenant: str, index: str, id: str, entry: Entry, reason: str) -> Record:
        ttl = None
        if entry.expires_ms is not None:
            ttl = max(1, entry.expires_ms - now_ms())
        value = self.codec.encode(
            self._subject,
            self._schema,
            {
                "tenant": tenant,
                "index": index,
                "id": id,
                "vector": entry.vector.astype("<f4").tobytes(),
                "dtype": "fp32",
                "meta": entry.meta,
                "tags": list(entry.tags),
                "numeric": {k: float(v) for k, v in entry.numeric.items()},
                "version": entry.version,
                "ttl_ms": ttl,
                "timestamp": now_ms(),
            },
        )
        return Record.of(
            self.topic, f"{tenant}/{index}/{id}", value, [("archive.reason", reason.encode())]
        )

    def records(self, tenant: str, index: str) -> dict[str, ArchivedRecord]:
        """Every archived vector of ``tenant/index`` still in the archive, by id: the latest
        record per key, tombstoned keys left out. Reads the topic from its start (the
        archive is compacted, so it holds about one record per archived id)."""
        prefix = f"{tenant}/{index}/".encode()
        out: dict[str, ArchivedRecord] = {}
        ends = self.log.end_offsets(self.topic)
        for partition, start in self.log.start_offsets(self.topic).items():
            offset, end = start, ends.get(partition, 0)
            while offset < end:
                batch = self.log.read(self.topic, partition, offset, 1000)
                if not batch:
                    break
                for rec in batch:
                    offset = rec.offset + 1
                    if rec.offset >= end or rec.key is None or not rec.key.startswith(prefix):
                        continue
                    id = rec.key[len(prefix) :].decode()
                    if rec.value is None:
                        out.pop(id, None)
                        continue
                    _, v = self.codec.decode(rec.value)
                    out[id] = _archived(v, rec.position)
        return out

    def tombstone(self, tenant: str, index: str, id: str) -> LogPosition:
        return self.log.append(self.topic, f"{tenant}/{index}/{id}", None)


def _archived(v: dict[str, Any], position: LogPosition) -> ArchivedRecord:
    return ArchivedRecord(
        v["tenant"],
        v["index"],
        v["id"],
        v["vector"],
        v.get("meta"),
        tuple(v.get("tags") or ()),
        dict(v.get("numeric") or {}),
        int(v["version"]),
        v.get("ttl_ms"),
        position,
    )


class AuditLog:
    """Appends AuditEvents to ``topics.audit`` (keyed by tenant); durable on return."""

    def __init__(self, log: Log, topics: Topics, codec: AvroCodec, actor: str) -> None:
        self.log = log
        self.topic = topics.audit
        self.codec = codec
        self.actor = actor
        self._subject = catalog.subject_for(self.topic)
        self._schema = catalog.load_schema(catalog.TOPIC_VALUE_SCHEMA["audit"])
        log.ensure_topics([topics.spec("audit")])

    def append(
        self, tenant: str, operation: str, target: str, details: dict[str, Any], outcome: str = "ok"
    ) -> LogPosition:
        value = self.codec.encode(
            self._subject,
            self._schema,
            {
                "tenant": tenant,
                "actor": self.actor,
                "operation": operation,
                "target": target,
                "details": json.dumps(details, sort_keys=True),
                "outcome": outcome,
                "ts": now_ms(),
            },
        )
        return self.log.append(self.topic, tenant, value)
