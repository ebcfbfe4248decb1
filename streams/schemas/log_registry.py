"""The embedded schema registry: event-sourced on the ``_schemas`` topic.

``_schemas`` (compact, one partition) holds, like Confluent's own store, one record per
subject version and one per compatibility setting; the latest record per key is the truth,
so compaction never changes what a replay builds:

=====================================  =====================================================
key (UTF-8)                            value (JSON)
=====================================  =====================================================
``schema/{subject}/{version}``         ``{"subject", "version", "id", "schema",
                                       "schemaType", "deleted"}``; a soft delete rewrites the
                                       record with ``"deleted": true``
``config`` / ``config/{subject}``      ``{"subject": str | null, "compatibilityLevel": L}``;
                                       a tombstone removes a subject's own level
=====================================  =====================================================

Contract:

1. All state is derived from the log: the constructor replays ``_schemas`` from its start,
   and every change is applied by reading back what was appended, so what a restarted
   registry rebuilds is exactly what this one served.
2. A change is appended and durable before it is visible: ``register`` returns (and any
   reader sees the id) only after the log acknowledged the record.
3. Writers are serialised by one lock, and each write first catches up with the topic, so
   ids are unique and increase by one, and versions per subject likewise. One registry
   writes a given ``_schemas`` topic at a time (Confluent's single leader); other instances
   may read and call :meth:`LogRegistry.refresh` (done automatically on an unknown id).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

from streams.log.port import Log, Record, StoredRecord
from streams.schemas.compatibility import CompatibilityLevel, incompatibilities, parse_schema
from streams.schemas.exceptions import (
    IncompatibleSchema,
    InvalidSchema,
    InvalidVersion,
    SchemaError,
    SchemaNotFound,
    SubjectNotFound,
    VersionNotFound,
)
from streams.schemas.registry import (
    AVRO,
    DEFAULT_COMPATIBILITY,
    OperationNotPermitted,
    RegisteredSchema,
    SchemaRegistry,
    Version,
    canonical_schema,
    compact_schema,
)
from streams.topics import Topics

__all__ = ["LogRegistry"]

_MAX_VERSION = 2**31 - 1


@dataclass(frozen=True, slots=True)
class _Entry:
    id: int
    schema: str
    schema_type: str
    deleted: bool


@dataclass(slots=True)
class _State:
    """What a replay of ``_schemas`` builds. Mutated only by :meth:`apply`."""

    subjects: dict[str, dict[int, _Entry]] = field(default_factory=dict)
    schemas: dict[int, tuple[str, str]] = field(default_factory=dict)  # id -> (text, type)
    ids: dict[tuple[str, str], int] = field(default_factory=dict)  # (type, canonical) -> id
    config: dict[str | None, CompatibilityLevel] = field(default_factory=dict)
    max_id: int = 0

    def apply(self, rec: StoredRecord) -> None:
        key = (rec.key or b"").decode("utf-8", errors="replace")
        try:
            if key.startswith("schema/"):
                self._apply_schema(key, rec.value)
            elif key == "config" or key.startswith("config/"):
                self._apply_config(key, rec.value)
            # other keys (Confluent's NOOP, future record kinds) carry no state for us
        except (ValueError, KeyError, TypeError) as exc:
            raise SchemaError(
                f"unreadable {rec.topic} record at offset {rec.offset} (key {key!r}): {exc}"
            ) from exc

    def _apply_schema(self, key: str, value: bytes | None) -> None:
        if value is None:  # a permanent delete written by another tool
            subject, _, version = key.removeprefix("schema/").rpartition("/")
            self.subjects.get(subject, {}).pop(int(version), None)
            return
        v: dict[str, Any] = json.loads(value)
        schema_type = str(v.get("schemaType") or AVRO)
        sid = int(v["id"])
        text = str(v["schema"])
        entry = _Entry(sid, text, schema_type, bool(v.get("deleted", False)))
        self.subjects.setdefault(str(v["subject"]), {})[int(v["version"])] = entry
        if sid not in self.schemas:
            self.schemas[sid] = (text, schema_type)
            self.ids[(schema_type, canonical_schema(text))] = sid
        self.max_id = max(self.max_id, sid)

    def _apply_config(self, key: str, value: bytes | None) -> None:
        subject = key.removeprefix("config/") if key != "config" else None
        if value is None:
            self.config.pop(subject, None)
            return
        self.config[subject] = CompatibilityLevel(json.loads(value)["compatibilityLevel"])

    def live(self, subject: str) -> dict[int, _Entry]:
        return {n: e for n, e in self.subjects.get(subject, {}).items() if not e.deleted}


def _version_number(version: Version) -> int | None:
    """``None`` for latest; :class:`InvalidVersion` (42202) for what is no version number."""
    if version == "latest" or version == -1:
        return None
    valid = isinstance(version, int) and not isinstance(version, bool)
    if not valid or not 1 <= int(version) <= _MAX_VERSION:
        raise InvalidVersion(
            f"The specified version '{version}' is not a valid version id. Allowed values are "
            f"between [1, {_MAX_VERSION}] and the string \"latest\""
        )
    return version


class LogRegistry(SchemaRegistry):
    """A :class:`SchemaRegistry` whose store is the ``_schemas`` topic of ``log`` (created if
    missing). See the module docstring for the contract."""

    def __init__(self, log: Log, topics: Topics | None = None) -> None:
        topics = topics or Topics()
        self._log = log
        self._topic = topics.schemas
        log.create_topic(topics.spec("_schemas"))
        self._lock = threading.RLock()
        self._state = _State()
        self._next_offset = 0
        self.refresh()

    # -- the log ----------------------------------------------------------------------
    def refresh(self) -> None:
        """Apply every ``_schemas`` record appended since the last call (or since start)."""
        with self._lock:
            end = self._log.end_offsets(self._topic)[0]
            while self._next_offset < end:
                batch = self._log.read(self._topic, 0, self._next_offset, max_records=1000)
                if not batch:  # the rest was compacted away
                    break
                for rec in batch:
                    self._state.apply(rec)
                self._next_offset = batch[-1].offset + 1
            self._next_offset = max(self._next_offset, end)

    def _append(self, entries: list[tuple[str, dict[str, Any] | None]]) -> None:
        """Append ``entries`` (one durable batch) and apply them by reading them back."""
        records = [
            Record.of(
                self._topic,
                key,
                None if value is None else json.dumps(value, separators=(",", ":")).encode(),
                partition=0,
            )
            for key, value in entries
        ]
        self._log.append_batch(records)
        self.refresh()

    # -- writes -----------------------------------------------------------------------
    def register(self, subject: str, schema: str, schema_type: str = AVRO) -> int:
        schema_type = (schema_type or AVRO).upper()
        if schema_type != AVRO:
            raise InvalidSchema(f"Invalid schema: schema type {schema_type} is not supported")
        if not subject:
            raise InvalidSchema("Invalid schema: the subject name is empty")
        parse_schema(schema)
        canonical = canonical_schema(schema)
        with self._lock:
            self.refresh()
            st = self._state
            live = st.live(subject)
            for entry in live.values():
                if st.ids.get((entry.schema_type, canonical)) == entry.id:
                    return entry.id
            previous = [live[n].schema for n in sorted(live)]
            problems = incompatibilities(schema, previous, self._level(subject))
            if problems:
                raise IncompatibleSchema(problems)
            sid = st.ids.get((schema_type, canonical))
            text = st.schemas[sid][0] if sid is not None else compact_schema(schema)
            if sid is None:
                sid = st.max_id + 1
            version = max(st.subjects.get(subject, {}), default=0) + 1
            value = {
                "subject": subject, "version": version, "id": sid, "schema": text,
                "schemaType": schema_type, "deleted": False,
            }
            self._append([(f"schema/{subject}/{version}", value)])
            return sid

    def set_compatibility(self, level: CompatibilityLevel, subject: str | None = None) -> None:
        level = CompatibilityLevel(level)
        key = "config" if subject is None else f"config/{subject}"
        with self._lock:
            self._append([(key, {"subject": subject, "compatibilityLevel": level.value})])

    def delete_subject(self, subject: str, *, permanent: bool = False) -> list[int]:
        """Soft delete (see the port). ``permanent`` is refused (42205): tombstones would let
        compaction forget ids, and a later registration could then reuse one."""
        if permanent:
            raise OperationNotPermitted("permanent deletes are not supported by this registry")
        with self._lock:
            self.refresh()
            live = self._state.live(subject)
            if not live:
                raise SubjectNotFound(subject)
            entries: list[tuple[str, dict[str, Any] | None]] = [
                (f"schema/{subject}/{n}", {
                    "subject": subject, "version": n, "id": e.id, "schema": e.schema,
                    "schemaType": e.schema_type, "deleted": True,
                })
                for n, e in sorted(live.items())
            ]
            self._append(entries)
            return sorted(live)

    # -- reads ------------------------------------------------------------------------
    def _level(self, subject: str | None) -> CompatibilityLevel:
        cfg = self._state.config
        return cfg.get(subject) or cfg.get(None) or DEFAULT_COMPATIBILITY

    def _registered(self, subject: str, version: int, entry: _Entry) -> RegisteredSchema:
        return RegisteredSchema(subject, version, entry.id, entry.schema, entry.schema_type)

    def lookup(self, subject: str, schema: str, *, deleted: bool = False) -> RegisteredSchema:
        canonical = canonical_schema(schema)
        with self._lock:
            st = self._state
            versions = dict(st.subjects.get(subject, {})) if deleted else st.live(subject)
            if not versions:
                raise SubjectNotFound(subject)
            for n in sorted(versions, reverse=True):
                e = versions[n]
                if st.ids.get((e.schema_type, canonical)) == e.id:
                    return self._registered(subject, n, e)
        raise SchemaNotFound(f"under subject '{subject}'")

    def get_by_id(self, schema_id: int) -> str:
        with self._lock:
            found = self._state.schemas.get(schema_id)
            if found is None:
                self.refresh()  # another instance may have registered it since
                found = self._state.schemas.get(schema_id)
        if found is None:
            raise SchemaNotFound(schema_id)
        return found[0]

    def subjects(self, *, deleted: bool = False) -> list[str]:
        with self._lock:
            st = self._state
            return sorted(s for s in st.subjects if st.subjects[s] and (deleted or st.live(s)))

    def versions(self, subject: str) -> list[int]:
        with self._lock:
            live = self._state.live(subject)
        if not live:
            raise SubjectNotFound(subject)
        return sorted(live)

    def get_version(self, subject: str, version: Version) -> RegisteredSchema:
        number = _version_number(version)
        with self._lock:
            live = self._state.live(subject)
        if not live:
            raise SubjectNotFound(subject)
        n = max(live) if number is None else number
        if n not in live:
            raise VersionNotFound(subject, version)
        return self._registered(subject, n, live[n])

    def get_compatibility(self, subject: str | None = None) -> CompatibilityLevel:
        with self._lock:
            return self._level(subject)

    def test_compatibility(
        self, subject: str, schema: str, version: Version = "latest"
    ) -> tuple[bool, list[str]]:
        number = _version_number(version)
        parse_schema(schema)
        with self._lock:
            live = self._state.live(subject)
            level = self._level(subject)
        if not live:
            if number is None:
                return True, []
            raise SubjectNotFound(subject)
        n = max(live) if number is None else number
        if n not in live:
            raise VersionNotFound(subject, version)
        # Against the one version asked for, as Confluent does, whatever the transitivity.
        problems = incompatibilities(schema, [live[n].schema], level)
        return not problems, problems

    def __repr__(self) -> str:
        return f"LogRegistry(topic={self._topic!r}, ids={self._state.max_id})"

