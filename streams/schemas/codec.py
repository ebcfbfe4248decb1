"""Avro values in the Confluent wire format: ``0x00 | schema id (4 bytes, big endian) | body``.

The body is Avro binary without a container header (fastavro's schemaless writer/reader),
exactly what Confluent's serializers, Kafka Connect's ``AvroConverter`` and ksqlDB write and
read, so our topics are readable by their tools and theirs by ours.

Contracts:

* ``encode`` registers (or finds) the writer schema under the subject once per
  ``(subject, schema)`` and caches the id; the record is validated against the schema first
  (:class:`EncodeError`), so nothing unreadable is ever produced.
* ``decode`` raises only :class:`DecodeError` for bad bytes: too short, wrong magic byte,
  unknown schema id, a body that is truncated, corrupt, not a record, or followed by trailing
  bytes. Registry failures other than "no such id" (a remote registry that is down) are
  re-raised as they are: the record may be fine, so it must not be dead-lettered for them.
* Parsed schemas are cached per id, per writer and per reader schema; one codec may be used
  from any number of threads.
"""

from __future__ import annotations

import io
import json
import struct
import threading
from collections.abc import Callable
from typing import Any

import fastavro
import fastavro.validation
from fastavro.read import SchemaResolutionError
from fastavro.validation import ValidationError

from streams.schemas import catalog
from streams.schemas.exceptions import DecodeError, InvalidSchema, SchemaError, SchemaNotFound
from streams.schemas.registry import SchemaRegistry

__all__ = ["MAGIC_BYTE", "AvroCodec", "EncodeError"]

MAGIC_BYTE = 0
_HEADER = struct.Struct(">BI")

Parsed = Any  # fastavro's parsed schema (a dict, list or str)

# What fastavro raises on bytes that are not valid for the writer schema.
_BODY_ERRORS = (
    EOFError,
    ValueError,  # also UnicodeDecodeError
    TypeError,
    IndexError,
    KeyError,
    OverflowError,
    MemoryError,
    RecursionError,
    struct.error,
    SchemaResolutionError,
)
# What fastavro raises on a record that does not match the schema.
_RECORD_ERRORS = (
    ValidationError, ValueError, TypeError, AttributeError, KeyError, OverflowError,
)


class EncodeError(SchemaError):
    """A record that does not match the schema it is to be written with. Nothing was written."""

    code = "VEC_ERR_INVALID"
    http_status = 422


def _parse(text: str) -> Parsed:
    try:
        return fastavro.parse_schema(json.loads(text))
    except (ValueError, TypeError, KeyError, fastavro.schema.SchemaParseException) as exc:
        raise InvalidSchema(f"Invalid schema: {exc}") from None


class AvroCodec:
    """Encode and decode Avro values in the Confluent wire format against ``registry``.

    ``schema`` arguments are either Avro JSON text or the name of a schema of the catalogue
    (``"VectorRecord"``: ``schemas/VectorRecord.avsc``), looked up with ``resolve``.
    ``validate=False`` skips the record check in :meth:`encode` (fastavro then writes what
    it can, e.g. truncates floats given for ints): for callers that built the record from
    the schema themselves."""

    def __init__(
        self,
        registry: SchemaRegistry,
        *,
        resolve: Callable[[str], str] = catalog.load_schema,
        validate: bool = True,
    ) -> None:
        self._registry = registry
        self._resolve = resolve
        self._validate = validate
        self._lock = threading.Lock()
        self._writers: dict[tuple[str, str], tuple[bytes, Parsed]] = {}
        self._by_id: dict[int, Parsed] = {}
        self._readers: dict[str, Parsed] = {}

    @property
    def registry(self) -> SchemaRegistry:
        return self._registry

    def _text(self, schema: str) -> str:
        s = schema.lstrip()
        return schema if s.startswith(("{", "[", '"')) else self._resolve(schema)

    # -- writing ------------------------------------------------------------------------
    def writer(self, subject: str, schema: str) -> tuple[int, Parsed]:
        """The id of ``schema`` under ``subject`` (registered on first use) and its parsed
        form. Raises the registry's errors (e.g. :class:`IncompatibleSchema`)."""
        header, parsed = self._writer(subject, schema)
        return _HEADER.unpack(header)[1], parsed

    def _writer(self, subject: str, schema: str) -> tuple[bytes, Parsed]:
        key = (subject, schema)
        found = self._writers.get(key)
        if found is not None:
            return found
        text = self._text(schema)
        parsed = _parse(text)
        schema_id = self._registry.register(subject, text)
        entry = (_HEADER.pack(MAGIC_BYTE, schema_id), parsed)
        with self._lock:
            self._writers[key] = entry
            self._by_id.setdefault(schema_id, parsed)
        return entry

    def encode(self, subject: str, schema: str, record: dict[str, Any]) -> bytes:
        """``record`` as wire-format bytes written with ``schema`` registered under
        ``subject``. :class:`EncodeError` if the record does not match the schema."""
        header, parsed = self._writer(subject, schema)
        buf = io.BytesIO()
        buf.write(header)
        try:
            if self._validate:
                fastavro.validation.validate(record, parsed, raise_errors=True)
            fastavro.schemaless_writer(buf, parsed, record)
        except _RECORD_ERRORS as exc:
            raise EncodeError(f"record does not match schema for {subject}: {exc}") from None
        return buf.getvalue()

    # -- reading ------------------------------------------------------------------------
    def _writer_schema(self, schema_id: int) -> Parsed:
        found = self._by_id.get(schema_id)
        if found is not None:
            return found
        try:
            text = self._registry.get_by_id(schema_id)
        except SchemaNotFound:
            raise DecodeError(f"unknown schema id {schema_id}") from None
        parsed = _parse(text)
        with self._lock:
            return self._by_id.setdefault(schema_id, parsed)

    def _reader_schema(self, schema: str) -> Parsed:
        found = self._readers.get(schema)
        if found is not None:
            return found
        parsed = _parse(self._text(schema))
        with self._lock:
            return self._readers.setdefault(schema, parsed)

    def decode(self, data: bytes, reader_schema: str | None = None) -> tuple[int, dict[str, Any]]:
        """``(writer schema id, record)`` of wire-format ``data``, resolved to
        ``reader_schema`` (JSON text or catalogue name) when given. :class:`DecodeError` for
        anything that is not one complete record (see the module docstring)."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise DecodeError(f"expected bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) < _HEADER.size:
            raise DecodeError(
                f"{len(data)} bytes is too short for the Confluent wire format "
                f"(magic byte, 4-byte schema id, Avro body)"
            )
        magic, schema_id = _HEADER.unpack_from(data)
        if magic != MAGIC_BYTE:
            raise DecodeError(f"wrong magic byte {data[0]:#04x}; the wire format starts with 0x00")
        writer = self._writer_schema(schema_id)
        reader = None if reader_schema is None else self._reader_schema(reader_schema)
        body = io.BytesIO(data)
        body.seek(_HEADER.size)
        try:
            value = fastavro.schemaless_reader(body, writer, reader)
        except _BODY_ERRORS as exc:
            raise DecodeError(
                f"corrupt or truncated Avro body for schema id {schema_id} "
                f"({len(data) - _HEADER.size} bytes): {type(exc).__name__}: {exc}"
            ) from None
        left = len(data) - body.tell()
        if left:
            raise DecodeError(
                f"{left} trailing bytes after the Avro body for schema id {schema_id}"
            )
        if not isinstance(value, dict):
            raise DecodeError(f"schema id {schema_id} is not a record schema")
        return schema_id, value
