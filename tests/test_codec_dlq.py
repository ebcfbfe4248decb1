"""The Confluent wire-format codec and dead-letter handling, on a real EmbeddedLog."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.dlq import DeadLetterQueue, DecodingReader, decode_or_dead_letter
from streams.log.embedded import Durability, EmbeddedLog
from streams.log.port import StoredRecord, TopicSpec
from streams.schemas.codec import AvroCodec, EncodeError
from streams.schemas.exceptions import DecodeError
from streams.schemas.log_registry import LogRegistry
from streams.topics import Topics

SUBJECT = "things-value"
THING = json.dumps({
    "type": "record", "name": "Thing", "namespace": "test",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "n", "type": "long"},
        {"name": "score", "type": "double"},
        {"name": "blob", "type": "bytes"},
        {"name": "note", "type": ["null", "string"], "default": None},
        {"name": "vec", "type": {"type": "array", "items": "float"}},
        {"name": "tags", "type": {"type": "map", "values": "string"}},
        {"name": "kind", "type": {"type": "enum", "name": "Kind", "symbols": ["A", "B", "C"]}},
    ],
})
# THING plus a field with a default: a BACKWARD-compatible reader.
THING_V2 = json.dumps({
    **json.loads(THING),
    "fields": [*json.loads(THING)["fields"], {"name": "extra", "type": "int", "default": 7}],
})

texts = st.text(max_size=20)
things = st.fixed_dictionaries({
    "id": texts,
    "n": st.integers(-(2**63), 2**63 - 1),
    "score": st.floats(allow_nan=False),
    "blob": st.binary(max_size=64),
    "note": st.none() | texts,
    "vec": st.lists(st.floats(width=32, allow_nan=False), max_size=8),
    "tags": st.dictionaries(texts, texts, max_size=4),
    "kind": st.sampled_from(["A", "B", "C"]),
})


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmbeddedLog, AvroCodec]]:
    log = EmbeddedLog(tmp_path_factory.mktemp("codec") / "log", durability=Durability.NONE)
    codec = AvroCodec(LogRegistry(log, Topics()))
    yield log, codec
    log.close()


@settings(max_examples=200, deadline=None)
@given(thing=things)
def test_wire_format_round_trip(env: tuple[EmbeddedLog, AvroCodec], thing: dict[str, Any]) -> None:
    _, codec = env
    data = codec.encode(SUBJECT, THING, thing)
    schema_id = codec.registry.lookup(SUBJECT, THING).id
    assert data[0] == 0 and int.from_bytes(data[1:5], "big") == schema_id
    assert codec.decode(data) == (schema_id, thing)
    # Resolved to a newer reader schema, the new field takes its default.
    assert codec.decode(data, THING_V2) == (schema_id, {**thing, "extra": 7})


def test_encode_rejects_records_that_do_not_match(env: tuple[EmbeddedLog, AvroCodec]) -> None:
    _, codec = env
    good: dict[str, Any] = {"id": "x", "n": 1, "score": 0.5, "blob": b"", "vec": [],
                            "tags": {}, "kind": "A"}
    codec.encode(SUBJECT, THING, good)
    for bad in ({**good, "n": 1.5}, {**good, "kind": "Z"}, {**good, "id": None},
                {k: v for k, v in good.items() if k != "score"}):
        with pytest.raises(EncodeError):
            codec.encode(SUBJECT, THING, bad)


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=64))
def test_decode_of_arbitrary_bytes_raises_only_decode_error(
    env: tuple[EmbeddedLog, AvroCodec], data: bytes
) -> None:
    _, codec = env
    with contextlib.suppress(DecodeError):
        codec.decode(data)


@settings(max_examples=1000, deadline=None)
@given(body=st.binary(max_size=64), valid=things)
def test_decode_of_corrupt_bodies_raises_only_decode_error(
    env: tuple[EmbeddedLog, AvroCodec], body: bytes, valid: dict[str, Any]
) -> None:
    """Real header, random or mangled body: the hard case for the Avro reader."""
    _, codec = env
    good = codec.encode(SUBJECT, THING, valid)
    for data in (good[:5] + body, good[: len(body) % len(good)], good + body[:1],
                 good[:5] + body + good[5:]):
        try:
            schema_id, value = codec.decode(data)
        except DecodeError:
            continue
        assert schema_id == int.from_bytes(good[1:5], "big")
        assert isinstance(value, dict)


def _thing(i: int) -> dict[str, Any]:
    return {"id": f"t{i}", "n": i, "score": i / 2, "blob": bytes([i]), "note": None,
            "vec": [float(i)], "tags": {"i": str(i)}, "kind": "B"}


def test_poison_records_go_to_the_dlq_and_the_stream_goes_on(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path / "log")
    try:
        topics = Topics()
        codec = AvroCodec(LogRegistry(log, topics))
        dlq = DeadLetterQueue(log, topics, codec)
        source = "things"
        log.create_topic(TopicSpec(source))
        good = codec.encode(SUBJECT, THING, _thing(1))
        poison = {
            "wrong magic byte": b"\x01" + good[1:],
            "unknown schema id": b"\x00\x00\x00\x03\xe7" + good[5:],
            "truncated body": good[:-3],
            "empty": b"",
            "trailing garbage": good + b"\x00\x01",
        }
        values: list[bytes | None] = [good]
        for i, v in enumerate(poison.values()):
            values += [v, codec.encode(SUBJECT, THING, _thing(10 + i))]
        values.append(None)  # a tombstone passes through
        for i, value in enumerate(values):
            log.append(source, f"key-{i}", value, [("h", str(i).encode())])
        before = log.read(source, 0, 0, max_records=100)
        assert len(before) == len(values)

        decoded = decode_or_dead_letter(before, codec, dlq)

        # The good records and the tombstone, in order, decoded.
        expected = [(r, None if r.value is None else codec.decode(r.value)[1])
                    for r in before if r.value is None or r.value not in poison.values()]
        assert decoded == expected
        assert [d[1]["id"] for d in decoded if d[1] is not None] == [
            "t1", "t10", "t11", "t12", "t13", "t14"]
        assert decoded[-1] == (before[-1], None)
        # Each poison record is in the dlq, with its position, bytes and error.
        letters = log.read(topics.dlq, 0, 0, max_records=100)
        assert len(letters) == len(poison)
        bad_records = [r for r in before if r.value in poison.values()]
        for letter, original, (kind, value) in zip(
            letters, bad_records, poison.items(), strict=True
        ):
            assert original.value == value
            assert letter.key == original.key
            headers = dict(letter.headers)
            assert headers["dlq.topic"] == source.encode()
            assert headers["dlq.partition"] == b"0"
            assert headers["dlq.offset"] == str(original.offset).encode()
            assert headers["dlq.error_code"] == b"VEC_ERR_INVALID"
            _, dead = codec.decode(letter.value or b"")
            assert (dead["original_topic"], dead["partition"], dead["offset"]) == (
                source, 0, original.offset)
            assert (dead["key"], dead["value"]) == (original.key, original.value)
            assert dead["headers"] == [{"key": "h", "value": original.headers[0][1]}]
            assert dead["error_code"] == "VEC_ERR_INVALID"
            assert headers["dlq.error"].decode() == dead["error_message"]
            assert dead["attempts"] == 1
            words = {"wrong magic byte": "magic byte", "unknown schema id": "unknown schema id",
                     "truncated body": "truncated", "empty": "too short",
                     "trailing garbage": "trailing"}
            assert words[kind] in dead["error_message"], (kind, dead["error_message"])
        # Nothing already stored changed.
        assert log.read(source, 0, 0, max_records=100) == before
    finally:
        log.close()


def test_decoding_reader_dead_letters_and_commits(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path / "log")
    try:
        topics = Topics()
        codec = AvroCodec(LogRegistry(log, topics))
        dlq = DeadLetterQueue(log, topics, codec)
        log.create_topic(TopicSpec("things", partitions=2))
        for i in range(6):
            value = codec.encode(SUBJECT, THING, _thing(i)) if i % 3 else b"\xff junk"
            log.append("things", f"k{i}", value)
        reader = DecodingReader(log.subscribe(["things"], "g"), codec, dlq, processor="test")
        got: list[tuple[StoredRecord, dict[str, Any] | None]] = []
        for _ in range(10):
            got += reader.poll(timeout_s=0.1)
        reader.commit()
        reader.close()
        assert sorted(v["n"] for _, v in got if v is not None) == [1, 2, 4, 5]
        letters = log.read(topics.dlq, 0, 0) + (
            log.read(topics.dlq, 1, 0) if log.describe(topics.dlq).partitions > 1 else [])
        assert sorted(r.key or b"" for r in letters) == [b"k0", b"k3"]
        assert all(codec.decode(r.value or b"")[1]["processor"] == "test" for r in letters)
        assert sum(log.committed("g", "things").values()) == 6
    finally:
        log.close()


def test_floats_survive_as_float32(env: tuple[EmbeddedLog, AvroCodec]) -> None:
    _, codec = env
    thing = {**_thing(3), "vec": [0.1, math.inf]}
    _, back = codec.decode(codec.encode(SUBJECT, THING, thing))
    assert back["vec"][0] == pytest.approx(0.1, rel=1e-7) and back["vec"][1] == math.inf
