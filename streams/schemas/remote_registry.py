"""A :class:`SchemaRegistry` backed by a Confluent-compatible registry server (production).

Wraps ``confluent_kafka.schema_registry.SchemaRegistryClient`` (its caches included) and
translates its ``SchemaRegistryError`` into :mod:`streams.schemas.exceptions` by Confluent
``error_code`` at this edge; errors with other codes, and transport errors, are re-raised
unchanged: they say the registry is unreachable or broken, not that a schema is wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from streams.schemas.compatibility import CompatibilityLevel
from streams.schemas.exceptions import (
    IncompatibleSchema,
    InvalidCompatibilityLevel,
    InvalidSchema,
    InvalidVersion,
    SchemaError,
    SchemaNotFound,
    SubjectNotFound,
    VersionNotFound,
)
from streams.schemas.registry import (
    AVRO,
    OperationNotPermitted,
    RegisteredSchema,
    SchemaRegistry,
    Version,
)

__all__ = ["RemoteRegistry", "translate_error"]

_SUBJECT_COMPAT_NOT_CONFIGURED = 40408


def translate_error(exc: SchemaRegistryError, subject: str = "", what: object = "") -> Exception:
    """Our exception for a Confluent error code; ``exc`` itself for codes we do not model."""
    code = getattr(exc, "error_code", None)
    message = str(getattr(exc, "error_message", "") or exc)
    table: dict[int, Callable[[], SchemaError]] = {
        40401: lambda: SubjectNotFound(subject),
        40402: lambda: VersionNotFound(subject, what),
        40403: lambda: SchemaNotFound(what),
        42201: lambda: InvalidSchema(message),
        42202: lambda: InvalidVersion(message),
        42203: lambda: InvalidCompatibilityLevel(message),
        42205: lambda: OperationNotPermitted(message),
        409: lambda: IncompatibleSchema([message]),
    }
    make = table.get(code) if isinstance(code, int) else None
    return make() if make is not None else exc


@contextmanager
def _translated(subject: str = "", what: object = "") -> Iterator[None]:
    try:
        yield
    except SchemaRegistryError as exc:
        mine = translate_error(exc, subject, what)
        if mine is exc:
            raise
        raise mine from exc


def _registered(rs: Any, subject: str) -> RegisteredSchema:
    return RegisteredSchema(
        subject=rs.subject or subject,
        version=int(rs.version),
        id=int(rs.schema_id),
        schema=str(rs.schema.schema_str),
        schema_type=str(rs.schema.schema_type or AVRO),
    )


class RemoteRegistry(SchemaRegistry):
    """The registry at ``url`` (comma-separated URLs allowed). ``config`` adds
    ``SchemaRegistryClient`` settings (auth, TLS, timeouts)."""

    def __init__(self, url: str, config: dict[str, Any] | None = None) -> None:
        self._client = SchemaRegistryClient({**(config or {}), "url": url})

    def register(self, subject: str, schema: str, schema_type: str = AVRO) -> int:
        with _translated(subject):
            return int(self._client.register_schema(subject, Schema(schema, schema_type)))

    def lookup(self, subject: str, schema: str, *, deleted: bool = False) -> RegisteredSchema:
        with _translated(subject, f"under subject '{subject}'"):
            rs = self._client.lookup_schema(subject, Schema(schema, AVRO), deleted=deleted)
        return _registered(rs, subject)

    def get_by_id(self, schema_id: int) -> str:
        with _translated(what=schema_id):
            return str(self._client.get_schema(schema_id).schema_str)

    def subjects(self, *, deleted: bool = False) -> list[str]:
        with _translated():
            return sorted(self._client.get_subjects(deleted=deleted))

    def versions(self, subject: str) -> list[int]:
        with _translated(subject):
            return sorted(int(v) for v in self._client.get_versions(subject))

    def get_version(self, subject: str, version: Version) -> RegisteredSchema:
        with _translated(subject, version):
            return _registered(self._client.get_version(subject, version), subject)

    def get_compatibility(self, subject: str | None = None) -> CompatibilityLevel:
        try:
            with _translated(subject or ""):
                return CompatibilityLevel(self._client.get_compatibility(subject))
        except SchemaRegistryError as exc:
            if subject is None or exc.error_code != _SUBJECT_COMPAT_NOT_CONFIGURED:
                raise
        return self.get_compatibility(None)  # the subject has no level of its own

    def set_compatibility(self, level: CompatibilityLevel, subject: str | None = None) -> None:
        with _translated(subject or ""):
            self._client.set_compatibility(subject, CompatibilityLevel(level).value)

    def test_compatibility(
        self, subject: str, schema: str, version: Version = "latest"
    ) -> tuple[bool, list[str]]:
        # The client's public call drops the messages; ask with verbose=true on its own
        # REST client (same auth, retries and base URLs).
        path = f"compatibility/subjects/{quote(subject, safe='')}/versions/{version}?verbose=true"
        with _translated(subject, version):
            reply = self._client._rest_client.post(path, body=Schema(schema, AVRO).to_dict())
        return bool(reply["is_compatible"]), [str(m) for m in reply.get("messages") or []]

    def delete_subject(self, subject: str, *, permanent: bool = False) -> list[int]:
        with _translated(subject):
            deleted = sorted(int(v) for v in self._client.delete_subject(subject, permanent))
        # The client's caches would otherwise still answer for the deleted versions.
        self._client.clear_caches()  # type: ignore[no-untyped-call]
        return deleted

    def close(self) -> None:
        self._client.close()
