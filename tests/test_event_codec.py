"""The query log's hand-written SearchEvent encoder (streams/cache/event_codec.py) writes
fastavro's bytes, refuses what fastavro refuses, and is used only for the schema it was
written for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.cache import event_codec
from streams.cache.querylog import QueryLogEmitter
from streams.schemas import catalog
from streams.schemas.codec import AvroCodec
from tests.rigs import Rig

PARSED = fastavro.parse_schema(json.loads(catalog.load_schema("SearchEvent")))

INT = st.integers(-(1 << 31), (1 << 31) - 1)
LONG = st.integers(-(1 << 63), (1 << 63) - 1)
# small numbers, and around the varint's byte boundaries
NEAR = st.sampled_from([0, 1, 63, 64, 127, 128, 8191, 8192, (1 << 31) - 1, -1, -64, -65])
DOUBLE = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(1 << 53), 1 << 53)
TEXT = st.text(max_size=80) | st.sampled_from(["acme", "docs", "L0", "é", "x" * 64, "漢" * 22])
NAMES = st.sampled_from(["validate", "cache", "index", "payload", "total", "size", "parked"])


def _opt(s: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | s


POSITION = st.fixed_dictionaries(
    {"topic": TEXT, "partition": INT | NEAR, "offset": LONG | NEAR}
)
PROBE = st.fixed_dictionaries(
    {"segment": TEXT},
    optional={"lists": st.lists(INT | NEAR, max_size=70), "ef": INT | NEAR},
)
REMOVAL = st.fixed_dictionaries(
    {"stored_ms": LONG},
    optional={
        "reason": st.sampled_from(
            ["evicted", "expired", "invalidated", "replaced", "dropped", "other"]
        ),
        "hits": LONG | NEAR,
        "bytes": LONG | NEAR,
        "priority": DOUBLE,
    },
)
EVENT = st.fixed_dictionaries(
    {
        "event_id": TEXT,
        "tenant": TEXT,
        "index": TEXT,
        "query_key": TEXT,
        "top_k": INT | NEAR,
        "action": TEXT,
        "action_probability": DOUBLE,
        "timestamp": LONG | NEAR | st.integers(1_700_000_000_000, 1_900_000_000_000),
    },
    optional={
        "features": st.dictionaries(NAMES | TEXT, DOUBLE, max_size=5),
        "bucket": _opt(TEXT),
        "cache_layer": st.sampled_from(["NONE", "L0", "L1", "L2"]),
        "cache_hit": st.booleans(),
        "policy_version": _opt(LONG | NEAR),
        "ttl_ms": _opt(LONG | NEAR),
        "proxy_cost": DOUBLE,
        "latency_ms": st.dictionaries(NAMES, DOUBLE, max_size=5)
        | st.dictionaries(TEXT, DOUBLE, min_size=60, max_size=70),
        "result_ids": st.lists(TEXT, max_size=12) | st.lists(TEXT, min_size=63, max_size=66),
        "index_positions": st.lists(POSITION, max_size=5),
        "consistency": st.sampled_from(["eventual", "session", "bounded", "strong"]),
        "session_id": _opt(TEXT),
        "removal": _opt(REMOVAL),
        "depends": _opt(st.lists(PROBE, max_size=4)),
    },
)


reference = event_codec.fastavro_encoder(PARSED)


def test_it_is_the_encoder_of_the_current_schema() -> None:
    """Fails when schemas/SearchEvent.avsc changes: event_codec must follow it (then set
    SCHEMA_FINGERPRINT to the new fingerprint)."""
    assert event_codec.for_schema(catalog.load_schema("SearchEvent")) is event_codec.encode


def test_another_schema_gets_no_hand_encoder() -> None:
    """A field less, or a changed default (which the parsing canonical form would not
    show, and which encode writes for a missing field): no hand encoder. Docs may change."""
    other = json.loads(catalog.load_schema("SearchEvent"))
    other["fields"] = [f for f in other["fields"] if f["name"] != "depends"]
    assert event_codec.for_schema(json.dumps(other)) is None
    changed = json.loads(catalog.load_schema("SearchEvent"))
    for f in changed["fields"]:
        if f["name"] == "proxy_cost":
            f["default"] = 1.5
    assert event_codec.for_schema(json.dumps(changed)) is None
    documented = json.loads(catalog.load_schema("SearchEvent"))
    documented["doc"] = "another text"
    assert event_codec.for_schema(json.dumps(documented)) is event_codec.encode
    assert event_codec.for_schema("not a schema") is None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(EVENT, st.booleans())
def test_bytes_equal_fastavros(e: dict[str, Any], preencoded: bool) -> None:
    if preencoded:  # as the query log's thread passes the shared positions
        e[event_codec.POSITIONS_AVRO] = event_codec.positions(e.get("index_positions") or [])
    expected = reference(e)
    assert event_codec.encode(e) == expected
    assert event_codec.encode(e) == expected  # again: now from the memo tables


WRONG = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 70), 1 << 70),
    st.floats(),
    st.text(max_size=5),
    st.binary(max_size=5),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(0, 3), max_size=2),
    st.tuples(st.text(max_size=3)),
)
FIELDS = [f["name"] for f in json.loads(catalog.load_schema("SearchEvent"))["fields"]]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(EVENT, st.sampled_from(FIELDS), WRONG, st.sampled_from(["value", "item", "key"]))
def test_what_fastavro_refuses_is_refused(
    e: dict[str, Any], field: str, wrong: Any, where: str
) -> None:
    """A wrong value in any field (or inside a list or map field): where fastavro raises,
    so does encode; where both write, they write the same bytes (encode may be stricter,
    e.g. a bool for a double)."""
    current = e.get(field)
    if where == "item" and isinstance(current, list) and current:
        e[field] = [wrong, *current[1:]]
    elif where == "key" and isinstance(current, dict):
        e[field] = {wrong: 1.0} if _hashable(wrong) else current
    else:
        e[field] = wrong
    _agrees(e, f"{field}={wrong!r}")


def _agrees(e: dict[str, Any], what: str) -> None:
    """Where fastavro refuses ``e``, encode refuses it; where both write, the same bytes
    (encode may be stricter, e.g. a bool for a double)."""
    try:
        expected: bytes | None = reference(e)
    except Exception:
        expected = None
    try:
        got: bytes | None = event_codec.encode(e)
    except (TypeError, ValueError, KeyError, OverflowError, AttributeError):
        got = None
    if expected is None:
        assert got is None, f"fastavro refuses {what}, encode wrote {got!r}"
    elif got is not None:
        assert got == expected, what


def _hashable(v: Any) -> bool:
    try:
        hash(v)
    except TypeError:
        return False
    return True


BASE = {
    "event_id": "e",
    "tenant": "acme",
    "index": "docs",
    "query_key": "q",
    "top_k": 1,
    "action": "none",
    "action_probability": 1.0,
    "timestamp": 5,
}
WRONGS = [None, True, 1, 1.5, "x", b"x", [], [None], {}, {"x": None}, ("x",), object()]


@pytest.mark.parametrize("field", FIELDS)
def test_each_field_refuses_what_fastavro_refuses(field: str) -> None:
    """Every field against a fixed set of wrong values (the generated test above samples
    them; this one tries each): where fastavro raises, encode raises."""
    for wrong in WRONGS:
        _agrees({**BASE, field: wrong}, f"{field}={wrong!r}")


NESTED = {
    "depends": {"segment": "s", "lists": [1], "ef": 0},
    "removal": {"reason": "evicted", "hits": 1, "bytes": 2, "stored_ms": 3, "priority": 0.5},
    "index_positions": {"topic": "t", "partition": 0, "offset": 1},
}


@pytest.mark.parametrize(
    ("field", "inner"), [(f, name) for f, rec in NESTED.items() for name in rec]
)
def test_each_nested_field_refuses_what_fastavro_refuses(field: str, inner: str) -> None:
    for wrong in WRONGS:
        record = {**NESTED[field], inner: wrong}
        e = {**BASE, field: record if field == "removal" else [record]}
        _agrees(e, f"{field}.{inner}={wrong!r}")


def test_the_query_log_falls_back_to_fastavro_for_another_schema(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the hand encoder disowning the schema, events are still written (fastavro)
    and read back whole."""
    monkeypatch.setattr(event_codec, "SCHEMA_FINGERPRINT", "0" * 16)
    rig = Rig(tmp_path)
    try:
        emitter = QueryLogEmitter(rig.log, rig.topics, rig.codec, linger_s=0.01)
        _two_events_read_back(rig, emitter, fast=False)
    finally:
        rig.close()


def test_the_query_log_writes_with_the_hand_encoder(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    try:
        emitter = QueryLogEmitter(rig.log, rig.topics, rig.codec, linger_s=0.01)
        _two_events_read_back(rig, emitter, fast=True)
    finally:
        rig.close()


def _two_events_read_back(rig: Rig, emitter: QueryLogEmitter, *, fast: bool) -> None:
    event = {
        "tenant": "acme",
        "index": "docs",
        "query_key": "qk:01",
        "top_k": 3,
        "action": "admit",
        "action_probability": 0.5,
        "result_ids": ["a", "b", "c"],
        "latency_ms": {"index": 1.5, "total": 2.0},
        "applied": ("vectors:0:7", "vectors:1:9"),
        "depends": [{"segment": "s1", "lists": [3, 1], "ef": 0}],
    }
    emitter.emit(dict(event))
    emitter.emit(dict(event, query_key="qk:02", applied=()))
    emitter.start()
    assert emitter.flush(10)
    emitter.close()
    assert emitter.stats()["appended"] == 2
    assert emitter._encode is not None
    assert (emitter._encode[1] is event_codec.encode) is fast
    records = rig.log.read(rig.topics.query_log, _partition(rig), 0, 10)
    assert len(records) == 2
    codec: AvroCodec = rig.codec
    first, second = (codec.decode(r.value)[1] for r in records)
    assert first["query_key"] == "qk:01" and second["query_key"] == "qk:02"
    assert first["index_positions"] == [
        {"topic": "vectors", "partition": 0, "offset": 7},
        {"topic": "vectors", "partition": 1, "offset": 9},
    ]
    assert second["index_positions"] == []
    assert first["depends"] == [{"segment": "s1", "lists": [3, 1], "ef": 0}]
    assert first["latency_ms"] == {"index": 1.5, "total": 2.0}
    assert event_codec.POSITIONS_AVRO not in first


def _partition(rig: Rig) -> int:
    from streams.log.partitioner import default_partition

    parts = rig.log.describe(rig.topics.query_log).partitions
    return default_partition(b"acme/docs", parts)
