"""Dead-letter handling: bad records are data, not crashes.

A record a processor cannot handle goes to the ``dlq`` topic, keyed by its original key,
with a ``DeadLetter`` value (``schemas/DeadLetter.avsc``) that carries its original topic,
partition, offset, key, value, headers and timestamp, the error code and message, and when
and after how many attempts it was given up; headers ``dlq.topic``, ``dlq.partition``,
``dlq.offset``, ``dlq.error_code`` and ``dlq.error`` repeat the essentials for tools that
do not decode Avro (kcat, the Kafka UI). The source topic is never touched: a dead letter is
a copy, and can be replayed from it.

Order of effects, for a reader that commits offsets after processing a batch:

1. each undecodable record is appended to ``dlq`` and is durable before
   :func:`decode_or_dead_letter` returns;
2. only then may the caller commit the batch's offsets,

so a crash between the two re-reads the batch and dead-letters the same record again (at
least once, never zero times).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from streams.exceptions import StreamvecError
from streams.log.port import Log, LogPosition, StoredRecord, Subscription, now_ms
from streams.schemas.catalog import subject_for
from streams.schemas.codec import AvroCodec
from streams.schemas.exceptions import DecodeError
from streams.topics import Topics

__all__ = ["DEAD_LETTER_SCHEMA", "DeadLetterQueue", "Decoded", "DecodingReader",
           "decode_or_dead_letter"]

DEAD_LETTER_SCHEMA = "DeadLetter"

Decoded = tuple[StoredRecord, dict[str, Any] | None]
"""A record read and its decoded value (``None`` for a tombstone)."""


def _message(error: BaseException | str) -> str:
    if isinstance(error, str):
        return error
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class DeadLetterQueue:
    """Writes dead letters to ``topics.dlq`` (created if missing) with ``codec``."""

    def __init__(self, log: Log, topics: Topics, codec: AvroCodec) -> None:
        self._log = log
        self._topic = topics.dlq
        self._subject = subject_for(topics.dlq)
        self._codec = codec
        log.create_topic(topics.spec("dlq"))

    @property
    def topic(self) -> str:
        return self._topic

    def send(
        self,
        record: StoredRecord,
        error: BaseException | str,
        code: str | None = None,
        *,
        processor: str | None = None,
        attempts: int = 1,
    ) -> LogPosition:
        """Append a dead letter for ``record`` and return its position once durable.

        ``code`` defaults to the error's stable code (``VEC_ERR_*``) for streamvec errors,
        else ``VEC_ERR_INTERNAL``. If this raises, the dead letter may not have been
        written: the caller must not commit past ``record``."""
        if code is None:
            code = error.code if isinstance(error, StreamvecError) else "VEC_ERR_INTERNAL"
        message = _message(error)
        value = self._codec.encode(self._subject, DEAD_LETTER_SCHEMA, {
            "original_topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
            "key": record.key,
            "value": record.value,
            "headers": [{"key": k, "value": v} for k, v in record.headers],
            "original_timestamp_ms": record.timestamp_ms,
            "processor": processor,
            "error_code": code,
            "error_message": message,
            "timestamp_ms": now_ms(),
            "attempts": attempts,
        })
        headers = [
            ("dlq.topic", record.topic.encode()),
            ("dlq.partition", str(record.partition).encode()),
            ("dlq.offset", str(record.offset).encode()),
            ("dlq.error_code", code.encode()),
            ("dlq.error", message.encode()),
        ]
        return self._log.append(self._topic, record.key, value, headers)


def decode_or_dead_letter(
    records: Iterable[StoredRecord],
    codec: AvroCodec,
    dlq: DeadLetterQueue,
    *,
    reader_schema: str | None = None,
    processor: str | None = None,
) -> list[Decoded]:
    """Decode ``records`` in order. Tombstones pass as ``(record, None)``; a record that is
    not decodable (:class:`DecodeError`) is dead-lettered and left out; every other error
    (the registry unreachable, the log failing) is raised, since the record may be fine.
    Every dead letter is durable when this returns (see the module docstring)."""
    out: list[Decoded] = []
    for rec in records:
        if rec.value is None:
            out.append((rec, None))
            continue
        try:
            _, value = codec.decode(rec.value, reader_schema)
        except DecodeError as exc:
            dlq.send(rec, exc, exc.code, processor=processor)
            continue
        out.append((rec, value))
    return out


class DecodingReader:
    """A :class:`Subscription` whose ``poll`` decodes, dead-lettering what it cannot.
    Positions and commits are the subscription's: commit after handling a poll's results."""

    def __init__(
        self,
        subscription: Subscription,
        codec: AvroCodec,
        dlq: DeadLetterQueue,
        *,
        reader_schema: str | None = None,
        processor: str | None = None,
    ) -> None:
        self.subscription = subscription
        self._codec = codec
        self._dlq = dlq
        self._reader_schema = reader_schema
        self._processor = processor

    def poll(self, max_records: int = 500, timeout_s: float = 0.0) -> list[Decoded]:
        records = self.subscription.poll(max_records, timeout_s)
        return decode_or_dead_letter(
            records, self._codec, self._dlq,
            reader_schema=self._reader_schema, processor=self._processor,
        )

    def commit(self) -> None:
        self.subscription.commit()

    def close(self) -> None:
        self.subscription.close()
