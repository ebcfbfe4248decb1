"""The schema registry port: subjects, versions and globally unique schema ids.

Semantics are the Confluent Schema Registry's, so that Confluent's clients, Kafka Connect's
``AvroConverter`` and our own codec see one behaviour whichever adapter serves them:

* A *subject* (``{topic}-value`` under Confluent's TopicNameStrategy) holds versions 1, 2, ...
  of a schema. Version numbers are never reused, not even after a soft delete.
* A schema *id* names one canonical schema across the whole registry: registering the same
  schema under two subjects yields one id; registering a schema already live under the
  subject returns its id and creates no version (``register`` is idempotent).
* Identity is by canonical text (:func:`canonical_schema`): JSON whitespace and key order do
  not matter, field order and every attribute do.
* Registering a new schema is checked against the subject's live versions under its
  compatibility level (the subject's own, else the global one, default ``BACKWARD``);
  :class:`IncompatibleSchema` (409) if it fails, and nothing is registered.

Adapters: :class:`streams.schemas.log_registry.LogRegistry` (event-sourced on ``_schemas``)
and :class:`streams.schemas.remote_registry.RemoteRegistry` (a Confluent-compatible server).
"""

from __future__ import annotations

import abc
import json
from dataclasses import dataclass
from typing import Literal

from streams.schemas.compatibility import CompatibilityLevel
from streams.schemas.exceptions import InvalidSchema, SchemaError

__all__ = [
    "AVRO",
    "DEFAULT_COMPATIBILITY",
    "OperationNotPermitted",
    "RegisteredSchema",
    "SchemaRegistry",
    "Version",
    "canonical_schema",
    "compact_schema",
]

AVRO = "AVRO"
DEFAULT_COMPATIBILITY = CompatibilityLevel.BACKWARD

Version = int | Literal["latest"]


class OperationNotPermitted(SchemaError):
    """The registry refuses the operation (Confluent's 42205), e.g. a permanent delete on the
    embedded registry, whose ids must stay unique after compaction."""

    code = "VEC_ERR_INVALID"
    http_status = 422
    error_code = 42205


@dataclass(frozen=True, slots=True)
class RegisteredSchema:
    """One version of a subject: its schema text and the schema's global id."""

    subject: str
    version: int
    id: int
    schema: str
    schema_type: str = AVRO


def _load_json(schema: str) -> object:
    try:
        return json.loads(schema)
    except (ValueError, TypeError) as exc:
        raise InvalidSchema(f"Invalid schema: not JSON: {exc}") from None


def compact_schema(schema: str) -> str:
    """``schema`` as compact JSON, keys in the author's order: the form the registry stores
    and serves (Confluent likewise stores the parsed schema's compact form)."""
    return json.dumps(_load_json(schema), separators=(",", ":"), ensure_ascii=False)


def canonical_schema(schema: str) -> str:
    """The identity of ``schema``: compact JSON with sorted keys. Two texts that differ only
    in whitespace or key order are one schema; anything else (field order, defaults, docs)
    makes another. :class:`InvalidSchema` if ``schema`` is not JSON."""
    return json.dumps(
        _load_json(schema), separators=(",", ":"), sort_keys=True, ensure_ascii=False
    )


class SchemaRegistry(abc.ABC):
    """The registry port. Every method is thread-safe. Errors are those of
    :mod:`streams.schemas.exceptions` (each carrying Confluent's ``error_code``)."""

    @abc.abstractmethod
    def register(self, subject: str, schema: str, schema_type: str = AVRO) -> int:
        """Register ``schema`` under ``subject`` and return its id.

        Idempotent: a schema already live under ``subject`` returns its id and changes
        nothing. Otherwise it is checked against the subject's compatibility level
        (:class:`IncompatibleSchema` if it fails) and becomes the subject's next version,
        reusing the id the same canonical schema has under any subject. Durable when it
        returns. :class:`InvalidSchema` for text that is not a schema of ``schema_type``."""

    @abc.abstractmethod
    def lookup(self, subject: str, schema: str, *, deleted: bool = False) -> RegisteredSchema:
        """The version of ``subject`` holding ``schema`` (the newest, if several).
        :class:`SubjectNotFound` / :class:`SchemaNotFound` (40401 / 40403). ``deleted``
        also searches soft-deleted versions."""

    @abc.abstractmethod
    def get_by_id(self, schema_id: int) -> str:
        """The schema text with id ``schema_id``; :class:`SchemaNotFound` (40403)."""

    @abc.abstractmethod
    def subjects(self, *, deleted: bool = False) -> list[str]:
        """Subjects with at least one live version (``deleted``: all), sorted."""

    @abc.abstractmethod
    def versions(self, subject: str) -> list[int]:
        """The live versions of ``subject``, ascending; :class:`SubjectNotFound` if none."""

    @abc.abstractmethod
    def get_version(self, subject: str, version: Version) -> RegisteredSchema:
        """One live version (``"latest"`` or ``-1``: the newest). :class:`SubjectNotFound`
        (40401) if the subject has no live versions, :class:`VersionNotFound` (40402)."""

    @abc.abstractmethod
    def get_compatibility(self, subject: str | None = None) -> CompatibilityLevel:
        """The level that applies to ``subject`` (its own, else the global one); the global
        level for ``None``."""

    @abc.abstractmethod
    def set_compatibility(self, level: CompatibilityLevel, subject: str | None = None) -> None:
        """Set ``subject``'s level (``None``: the global one). Durable when it returns."""

    @abc.abstractmethod
    def test_compatibility(
        self, subject: str, schema: str, version: Version = "latest"
    ) -> tuple[bool, list[str]]:
        """Whether ``schema`` may follow ``version`` of ``subject`` under the subject's level,
        and why not. ``"latest"`` on a subject without versions is compatible (as Confluent);
        a missing numbered version raises 40401/40402. Changes nothing."""

    def delete_subject(self, subject: str, *, permanent: bool = False) -> list[int]:
        """Soft-delete every live version of ``subject`` and return their numbers. Ids stay
        resolvable (old records still decode); numbers are not reused. Optional."""
        raise OperationNotPermitted("deleting subjects is not supported by this registry")

    def close(self) -> None:  # noqa: B027 - optional hook, most adapters hold nothing
        """Release resources (idempotent)."""

    def __enter__(self) -> SchemaRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
