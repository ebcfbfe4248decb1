"""Avro schema compatibility, with the Confluent Schema Registry's levels.

BACKWARD: a reader using the new schema reads data written with the previous one.
FORWARD: a reader using the previous schema reads data written with the new one.
FULL: both. ``*_TRANSITIVE``: against every earlier version, not just the latest.
The checking itself is Apache Avro's ``ReaderWriterCompatibilityChecker`` (the reference
implementation's rules, the same the Java registry applies); fastavro has none.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence

import avro.errors
import avro.schema
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType

from streams.schemas.exceptions import InvalidSchema

__all__ = ["CompatibilityLevel", "incompatibilities", "parse_schema"]


class CompatibilityLevel(enum.StrEnum):
    NONE = "NONE"
    BACKWARD = "BACKWARD"
    BACKWARD_TRANSITIVE = "BACKWARD_TRANSITIVE"
    FORWARD = "FORWARD"
    FORWARD_TRANSITIVE = "FORWARD_TRANSITIVE"
    FULL = "FULL"
    FULL_TRANSITIVE = "FULL_TRANSITIVE"


def parse_schema(schema: str) -> avro.schema.Schema:
    """Parse an Avro schema given as JSON text; :class:`InvalidSchema` if it is not one."""
    try:
        json.loads(schema)
        return avro.schema.parse(schema)
    except (ValueError, avro.errors.AvroException, TypeError) as exc:
        raise InvalidSchema(f"Invalid schema: {exc}") from None


def _check(reader: avro.schema.Schema, writer: avro.schema.Schema, what: str) -> list[str]:
    checker = ReaderWriterCompatibilityChecker()  # type: ignore[no-untyped-call]
    result = checker.get_compatibility(reader, writer)
    if result.compatibility is SchemaCompatibilityType.compatible:
        return []
    kinds = ", ".join(sorted(i.value for i in result.incompatibilities))
    where = ", ".join(sorted(result.locations))
    names = ", ".join(sorted(str(m) for m in result.messages))
    return [f"{what}: {kinds} at {where} ({names})"]


def incompatibilities(
    new: str, previous: Sequence[str], level: CompatibilityLevel
) -> list[str]:
    """Why ``new`` may not follow ``previous`` (oldest first) under ``level``; empty if it may."""
    if level is CompatibilityLevel.NONE or not previous:
        return []
    new_s = parse_schema(new)
    transitive = level.name.endswith("TRANSITIVE")
    against = list(previous) if transitive else [previous[-1]]
    backward = level.name.startswith(("BACKWARD", "FULL"))
    forward = level.name.startswith(("FORWARD", "FULL"))
    out: list[str] = []
    for i, old in enumerate(against):
        old_s = parse_schema(old)
        label = f"version {i + 1}" if transitive else "the latest version"
        if backward:
            out += _check(new_s, old_s, f"new schema cannot read data written with {label}")
        if forward:
            out += _check(old_s, new_s, f"{label} cannot read data written with the new schema")
    return out
