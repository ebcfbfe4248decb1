"""The Avro value schema of every topic, read from ``schemas/*.avsc``.

The ``.avsc`` files in the repository's top-level ``schemas/`` directory are the contract;
this module only finds and parses them. ``schemas/history/<Name>/v<N>.avsc`` holds the
released versions, oldest ``v1``; every change to ``schemas/<Name>.avsc`` must stay
BACKWARD_TRANSITIVE compatible with all of them (tests/test_schemas.py enforces it).

The directory is ``STREAMVEC_SCHEMA_DIR`` when that is set (an installed package, a
container image), else ``schemas/`` next to the ``streams`` package in a source checkout.
It is read once, at import.

Keys are plain UTF-8 strings (ARCHITECTURE §2), so only values have subjects.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import fastavro

from streams.schemas.exceptions import InvalidSchema, SchemaNotFound

__all__ = [
    "SCHEMA_DIR",
    "TOPIC_VALUE_SCHEMA",
    "history",
    "load_schema",
    "parsed",
    "schema_names",
    "subject_for",
]

SCHEMA_DIR: Final[Path] = Path(
    os.environ.get("STREAMVEC_SCHEMA_DIR") or Path(__file__).resolve().parents[2] / "schemas"
)

# topic suffix (as in streams.topics) -> value schema name. ``_schemas`` holds the
# registry's own store and has no Avro value.
TOPIC_VALUE_SCHEMA: Final[Mapping[str, str]] = MappingProxyType(
    {
        "indexes": "IndexConfig",
        "vectors": "VectorRecord",
        "documents": "Source",
        "query-log": "SearchEvent",
        "feedback": "Feedback",
        "policy": "PolicyUpdate",
        "usage": "UsageRollup",
        "audit": "AuditEvent",
        "dlq": "DeadLetter",
        "archive": "VectorRecord",
    }
)

# A schema name is a file name under SCHEMA_DIR, never a path.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_VERSION_FILE = re.compile(r"v([1-9][0-9]*)\.avsc")


def _checked(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise SchemaNotFound(repr(name))
    return name


def schema_names() -> list[str]:
    """Names of the current schemas (``schemas/<Name>.avsc``), sorted."""
    return sorted(p.stem for p in SCHEMA_DIR.glob("*.avsc"))


@functools.cache
def load_schema(name: str) -> str:
    """The JSON text of the current schema ``name``, e.g. ``"VectorRecord"``.

    :class:`SchemaNotFound` if there is no ``schemas/<name>.avsc``.
    """
    path = SCHEMA_DIR / f"{_checked(name)}.avsc"
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SchemaNotFound(f"{name!r} (looked in {SCHEMA_DIR})") from None


@functools.cache
def parsed(name: str) -> dict[str, Any]:
    """The current schema ``name`` parsed by fastavro, for its readers and writers.

    Cached: callers share one object and must not change it. :class:`InvalidSchema` if the
    file is not an Avro record schema.
    """
    try:
        schema = fastavro.parse_schema(json.loads(load_schema(name)))
    except (ValueError, TypeError, fastavro.schema.SchemaParseException) as exc:
        raise InvalidSchema(f"Invalid schema {name}: {exc}") from None
    if not isinstance(schema, dict) or schema.get("type") != "record":
        raise InvalidSchema(f"Invalid schema {name}: a topic value schema must be a record")
    return schema


def history(name: str) -> list[str]:
    """JSON texts of the released versions of ``name``, oldest first (``v1``, ``v2``, ...).

    Empty if ``name`` was never released. The list is what
    :func:`streams.schemas.compatibility.incompatibilities` takes as ``previous``.
    """
    folder = SCHEMA_DIR / "history" / _checked(name)
    numbered: list[tuple[int, Path]] = []
    for path in folder.glob("*.avsc"):
        match = _VERSION_FILE.fullmatch(path.name)
        if match is None:
            raise InvalidSchema(f"unexpected file {path}; history files are named v<N>.avsc")
        numbered.append((int(match.group(1)), path))
    numbered.sort()
    return [path.read_text(encoding="utf-8") for _, path in numbered]


def subject_for(topic_name: str) -> str:
    """The registry subject of a topic's values (Confluent TopicNameStrategy):
    ``streamvec.vectors`` -> ``streamvec.vectors-value``. Takes the full topic name, with
    its prefix."""
    return f"{topic_name}-value"
