"""The Avro schemas of every topic: well formed, documented, readable by both Avro
implementations, and BACKWARD_TRANSITIVE compatible with every released version.

The evolution guard (``evolution_problems``) is itself tested on known breaking and known
safe changes, so that it cannot pass by accident.
"""

from __future__ import annotations

import copy
import io
import json
import re
import struct
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import avro.io
import avro.schema
import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.schemas import catalog
from streams.schemas.compatibility import CompatibilityLevel, incompatibilities
from streams.schemas.exceptions import SchemaNotFound
from streams.topics import DEFAULT_PREFIX, Topics

NAMESPACE = "io.streamvec.v1"
NAMES = catalog.schema_names()
TIMESTAMP = {"type": "long", "logicalType": "timestamp-millis"}

Json = Any  # a decoded JSON value


def ms(text: str) -> datetime:
    """An ISO time as the aware UTC datetime both Avro libraries decode timestamp-millis to."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def fp32(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


# One realistic record per schema, as a producer would write it.
EXAMPLES: dict[str, dict[str, Any]] = {
    "IndexConfig": {
        "tenant": "acme",
        "index": "support-kb",
        "dim": 384,
        "metric": "cosine",
        "dtype": "fp16",
        "recipe": "IVF1024,PQ32",
        "filter_fields": [
            {"name": "lang", "type": "tag"},
            {"name": "price", "type": "numeric"},
        ],
        "quotas": {"max_vectors": 1_000_000, "max_bytes": None, "qps": 200.0},
        "cache": {
            "layers": ["L0", "L1"],
            "memory_budget_bytes": 64 << 20,
            "l2_threshold": None,
            "l2_text_threshold": 0.02,
            "l3": True,
        },
        "embedder": "all-MiniLM-L6-v2",
        "created_ms": ms("2024-05-01T12:00:00.123"),
        "version": 3,
    },
    "VectorRecord": {
        "tenant": "acme",
        "index": "support-kb",
        "id": "doc-17#2",
        "vector": fp32(0.25, -1.5, 3.0, 0.0),
        "dtype": "fp32",
        "meta": json.dumps({"title": "Resetting a password", "lang": "en"}),
        "tags": ["lang:en", "faq"],
        "numeric": {"price": 9.99, "year": 2024.0},
        "version": 5,
        "source_id": "doc-17",
        "chunk": {"source_id": "doc-17", "chunk_no": 2, "start": 1024, "end": 1536},
        "ttl_ms": None,
        "timestamp": ms("2024-05-01T12:00:01.500"),
    },
    "Source": {
        "tenant": "acme",
        "index": "support-kb",
        "id": "slack-C042-1714564800",
        "type": "chat",
        "channel_id": "C042",
        "user_id": "U7",
        "title": "#support thread",
        "uri": "https://acme.slack.com/archives/C042/p1714564800",
        "meta": json.dumps({"team": "support"}),
        "text": None,
        "chunks": None,
        "messages": [
            {
                "role": "user",
                "user_id": "U7",
                "text": "How do I reset?",
                "ts": ms("2024-05-01T12:00:00"),
            },
            {
                "role": "assistant",
                "user_id": None,
                "text": "Settings, then Security.",
                "ts": ms("2024-05-01T12:00:05.250"),
            },
        ],
        "version": 1,
        "timestamp": ms("2024-05-01T12:00:06"),
    },
    "SearchEvent": {
        "event_id": "6f1c0e7e-9a0b-4f7e-8f2e-1d2c3b4a5f60",
        "tenant": "acme",
        "index": "support-kb",
        "query_key": "qk:9f86d081884c7d65",
        "top_k": 10,
        "features": {"reuse_rate_1h": 0.4, "cost": 12.5, "k": 10.0},
        "bucket": "cost=high|reuse=mid",
        "cache_layer": "NONE",
        "cache_hit": False,
        "action": "admit",
        "action_probability": 0.9,
        "policy_version": 7,
        "ttl_ms": 60_000,
        "proxy_cost": 12.5,
        "latency_ms": {"validate": 0.02, "cache": 0.05, "search": 1.8, "total": 2.1},
        "result_ids": ["doc-17#2", "doc-3#0"],
        "index_positions": [{"topic": "streamvec.vectors", "partition": 0, "offset": 4242}],
        "consistency": "session",
        "session_id": "s-81",
        "timestamp": ms("2024-05-01T12:00:02.002"),
        "removal": None,  # a search, not an entry leaving the cache
        # an IVF answer: the lists its search probed in each approximate Tail segment
        "depends": [{"segment": "seg-000003-9f1c2d3e4a5b", "lists": [17, 4, 52], "ef": 0}],
    },
    "Feedback": {
        "tenant": "acme",
        "index": "support-kb",
        "event_id": "6f1c0e7e-9a0b-4f7e-8f2e-1d2c3b4a5f60",
        "query_key": None,
        "result_id": "doc-3#0",
        "kind": "stale",
        "session_id": "s-81",
        "comment": "this page moved",
        "timestamp": ms("2024-05-01T12:01:00"),
    },
    "PolicyUpdate": {
        "tenant": "acme",
        "index": "support-kb",
        "version": 8,
        "kind": "table",
        "table": [
            {"bucket": "cost=high|reuse=mid", "admit": True, "ttl_ms": 60_000, "probability": 0.9},
            {"bucket": "cost=low|reuse=low", "admit": False, "ttl_ms": 0, "probability": 0.95},
        ],
        "model": None,
        "model_format": None,
        "guardrails": {
            "max_staleness_ms": 5_000,
            "p99_budget_ms": 20.0,
            "min_hit_rate": 0.2,
            "canary_share": 0.1,
        },
        "parent_version": 7,
        "reason": "trained on query-log up to offset 90210",
        "eviction_table": None,  # no learned eviction table in this version
        "created_ms": ms("2024-05-01T13:00:00"),
    },
    "UsageRollup": {
        "tenant": "acme",
        "window_start_ms": ms("2024-05-01T12:00:00"),
        "window_end_ms": ms("2024-05-01T12:01:00"),
        "requests": 1200,
        "cache_hits": 800,
        "proxy_cost": 4567.25,
        "cache_bytes": 12 << 20,
    },
    "AuditEvent": {
        "tenant": "acme",
        "actor": "key-admin-01",
        "operation": "policy.rollback",
        "target": "acme/support-kb",
        "details": json.dumps({"to_version": 7}),
        "outcome": "ok",
        "ts": ms("2024-05-01T14:00:00"),
    },
    "DeadLetter": {
        "original_topic": "streamvec.vectors",
        "partition": 3,
        "offset": 77,
        "key": b"acme/support-kb/doc-9",
        "value": b"\x00\x00\x00\x00\x01garbage",
        "headers": [{"key": "trace-id", "value": b"abc"}, {"key": "empty", "value": None}],
        "original_timestamp_ms": ms("2024-05-01T12:00:00"),
        "processor": "indexer",
        "error_code": "VEC_ERR_DIM",
        "error_message": "vector has 3 dimensions, index acme/support-kb has 384",
        "timestamp_ms": ms("2024-05-01T12:00:00.010"),
        "attempts": 3,
    },
}


# --- helpers -------------------------------------------------------------------------------


def schema_json(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(catalog.load_schema(name))
    return loaded


def fastavro_bytes(schema: Any, record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, record)
    return buf.getvalue()


def fastavro_read(writer: Any, payload: bytes, reader: Any = None) -> Any:
    return fastavro.schemaless_reader(io.BytesIO(payload), writer, reader)


def avro_bytes(schema_text: str, record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    avro.io.DatumWriter(avro.schema.parse(schema_text)).write(record, avro.io.BinaryEncoder(buf))
    return buf.getvalue()


def avro_read(writer_text: str, payload: bytes, reader_text: str | None = None) -> Any:
    writer = avro.schema.parse(writer_text)
    reader = avro.schema.parse(reader_text) if reader_text else writer
    return avro.io.DatumReader(writer, reader).read(avro.io.BinaryDecoder(io.BytesIO(payload)))


def walk_fields(schema: Json, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every field of every record in ``schema``, with a dotted path for messages."""
    if isinstance(schema, list):
        for branch in schema:
            yield from walk_fields(branch, path)
    elif isinstance(schema, dict):
        kind = schema.get("type")
        if kind == "record":
            for field in schema["fields"]:
                where = f"{path}.{field['name']}" if path else field["name"]
                yield where, field
                yield from walk_fields(field["type"], where)
        elif kind == "array":
            yield from walk_fields(schema["items"], path + "[]")
        elif kind == "map":
            yield from walk_fields(schema["values"], path + "{}")


def named_types(schema: Json) -> Iterator[dict[str, Any]]:
    """Every record, enum and fixed defined in ``schema``."""
    if isinstance(schema, list):
        for branch in schema:
            yield from named_types(branch)
    elif isinstance(schema, dict):
        if schema.get("type") in ("record", "enum", "fixed"):
            yield schema
        for field in schema.get("fields", []):
            yield from named_types(field["type"])
        for key in ("items", "values"):
            if key in schema:
                yield from named_types(schema[key])


def evolution_problems(current: str, released: list[str]) -> list[str]:
    """Why ``current`` may not be the next version after ``released`` (oldest first).

    The rule of schemas/README.md: a schema must have been released (history/<Name>/v1.avsc),
    and a current file that differs from the latest release must read data written with
    every release (BACKWARD_TRANSITIVE).
    """
    if not released:
        return ["never released: freeze it as schemas/history/<Name>/v1.avsc"]
    if json.loads(current) == json.loads(released[-1]):
        return []
    return incompatibilities(current, released, CompatibilityLevel.BACKWARD_TRANSITIVE)


# --- the catalogue -------------------------------------------------------------------------


def test_every_topic_but_the_registry_store_has_a_value_schema() -> None:
    suffixes = {spec.name.removeprefix(DEFAULT_PREFIX) for spec in Topics().specs()}
    assert suffixes - {"_schemas"} == set(catalog.TOPIC_VALUE_SCHEMA)


def test_topic_schemas_and_schema_files_match_one_to_one() -> None:
    assert sorted(set(catalog.TOPIC_VALUE_SCHEMA.values())) == NAMES
    # one schema per topic, except `archive`: it holds `vectors` records (streams.capacity)
    assert catalog.TOPIC_VALUE_SCHEMA["archive"] == catalog.TOPIC_VALUE_SCHEMA["vectors"]
    assert len(NAMES) == len(catalog.TOPIC_VALUE_SCHEMA) - 1
    history_dirs = sorted(p.name for p in (catalog.SCHEMA_DIR / "history").iterdir())
    assert history_dirs == NAMES


def test_subject_is_the_topic_name_strategy() -> None:
    topics = Topics(prefix="prod.")
    assert catalog.subject_for(topics.vectors) == "prod.vectors-value"
    assert catalog.subject_for(topics.query_log) == "prod.query-log-value"


@pytest.mark.parametrize("name", ["../pyproject", "history/VectorRecord/v1", "", "NoSuchThing"])
def test_load_schema_refuses_names_that_are_not_schemas(name: str) -> None:
    with pytest.raises(SchemaNotFound):
        catalog.load_schema(name)


def test_examples_cover_every_schema() -> None:
    assert sorted(EXAMPLES) == NAMES


# --- well formed and documented ------------------------------------------------------------


def all_versions() -> list[tuple[str, str]]:
    out = [(f"{n}.avsc", catalog.load_schema(n)) for n in NAMES]
    for n in NAMES:
        out += [(f"history/{n}/v{i}.avsc", t) for i, t in enumerate(catalog.history(n), 1)]
    return out


@pytest.mark.parametrize(("where", "text"), all_versions(), ids=[w for w, _ in all_versions()])
def test_parses_with_fastavro_and_avro(where: str, text: str) -> None:
    fastavro.parse_schema(json.loads(text))
    avro.schema.parse(text)


@pytest.mark.parametrize("name", NAMES)
def test_is_a_record_named_like_its_file(name: str) -> None:
    schema = schema_json(name)
    assert schema["type"] == "record"
    assert schema["name"] == name
    assert schema["namespace"] == NAMESPACE
    assert catalog.parsed(name)["name"] == f"{NAMESPACE}.{name}"


@pytest.mark.parametrize("name", NAMES)
def test_every_field_and_type_is_documented(name: str) -> None:
    schema = schema_json(name)
    undocumented = [p for p, f in walk_fields(schema) if not str(f.get("doc", "")).strip()]
    undocumented += [t["name"] for t in named_types(schema) if not str(t.get("doc", "")).strip()]
    assert undocumented == []


@pytest.mark.parametrize("name", NAMES)
def test_optional_fields_are_null_first_with_null_default(name: str) -> None:
    """Unions are only ``["null", T]`` with default null: the one shape every Avro tool,
    Kafka Connect converter and code generator maps to an optional value."""
    wrong = [
        p
        for p, f in walk_fields(schema_json(name))
        if isinstance(f["type"], list)
        and (len(f["type"]) != 2 or f["type"][0] != "null" or f.get("default", ...) is not None)
    ]
    assert wrong == []


@pytest.mark.parametrize("name", NAMES)
def test_times_are_timestamp_millis(name: str) -> None:
    """Fields named as instants carry the logical type, so Connect sinks see timestamps."""
    instant = re.compile(r"(^|_)(ts|timestamp|timestamp_ms|created_ms|window_(start|end)_ms)$")
    wrong = []
    for path, field in walk_fields(schema_json(name)):
        if instant.search(field["name"]):
            branches = field["type"] if isinstance(field["type"], list) else [field["type"]]
            if TIMESTAMP not in branches:
                wrong.append(path)
    assert wrong == []


@pytest.mark.parametrize("name", NAMES)
def test_defaults_are_values_of_their_type(name: str) -> None:
    """Neither library checks defaults when parsing; a bad one only fails when a reader
    first needs it, on another team's data."""

    def fields(s: avro.schema.Schema) -> Iterator[avro.schema.Field]:
        if isinstance(s, avro.schema.RecordSchema):
            for f in s.fields:
                yield f
                yield from fields(f.type)
        elif isinstance(s, avro.schema.UnionSchema):
            for b in s.schemas:
                yield from fields(b)
        elif isinstance(s, avro.schema.ArraySchema):
            yield from fields(s.items)
        elif isinstance(s, avro.schema.MapSchema):
            yield from fields(s.values)

    bad = []
    for f in fields(avro.schema.parse(catalog.load_schema(name))):
        if f.has_default:
            t = f.type.schemas[0] if isinstance(f.type, avro.schema.UnionSchema) else f.type
            if not avro.io.validate(t, f.default):
                bad.append((f.name, f.default))
    assert bad == []


def test_named_types_shared_between_schemas_are_identical() -> None:
    """``io.streamvec.v1.Dtype`` must mean one thing, whichever file it is read from."""
    seen: dict[str, tuple[str, dict[str, Any]]] = {}
    for name in NAMES:
        for t in named_types(schema_json(name)):
            full = f"{t.get('namespace', NAMESPACE)}.{t['name']}"
            if full in seen:
                first, definition = seen[full]
                assert t == definition, f"{full} differs between {first} and {name}"
            else:
                seen[full] = (name, t)


# --- encoding ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_example_round_trips_through_fastavro(name: str) -> None:
    record = EXAMPLES[name]
    schema = catalog.parsed(name)
    assert fastavro_read(schema, fastavro_bytes(schema, record)) == record


@pytest.mark.parametrize("name", NAMES)
def test_both_implementations_write_the_same_bytes(name: str) -> None:
    """fastavro (our hot path) and Apache Avro (the reference, as Java clients behave) agree."""
    record, text = EXAMPLES[name], catalog.load_schema(name)
    ours = fastavro_bytes(catalog.parsed(name), record)
    assert ours == avro_bytes(text, record)
    assert avro_read(text, ours) == record


@pytest.mark.parametrize("name", NAMES)
def test_a_writer_without_the_defaulted_fields_is_read_with_defaults(name: str) -> None:
    """What an older producer looks like after a field is added: every field with a
    default can be missing from the writer's schema, and the reader fills it in."""
    full = schema_json(name)
    writer = dict(full, fields=[f for f in full["fields"] if "default" not in f])
    written = {f["name"]: EXAMPLES[name][f["name"]] for f in writer["fields"]}
    expected = written | {f["name"]: f["default"] for f in full["fields"] if "default" in f}
    parsed_writer = fastavro.parse_schema(copy.deepcopy(writer))
    payload = fastavro_bytes(parsed_writer, written)

    assert fastavro_read(parsed_writer, payload, catalog.parsed(name)) == expected
    assert avro_read(json.dumps(writer), payload, catalog.load_schema(name)) == expected


def strategy_for(schema: Json, named: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Values of an Avro schema (as JSON), for property tests. ``named``: types seen so far."""
    if isinstance(schema, list):
        return st.one_of([strategy_for(b, named) for b in schema])
    if isinstance(schema, str):
        primitive: dict[str, Callable[[], st.SearchStrategy[Any]]] = {
            "null": st.none,
            "boolean": st.booleans,
            "int": lambda: st.integers(-(2**31), 2**31 - 1),
            "long": lambda: st.integers(-(2**63), 2**63 - 1),
            "float": lambda: st.floats(width=32, allow_nan=False),
            "double": lambda: st.floats(allow_nan=False),
            "bytes": lambda: st.binary(max_size=32),
            "string": lambda: st.text(max_size=16),
        }
        return primitive[schema]() if schema in primitive else named[schema]
    if schema.get("logicalType") == "timestamp-millis":
        return st.datetimes(datetime(1970, 1, 1), datetime(2200, 1, 1), timezones=st.just(UTC)).map(
            lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000)
        )
    kind = schema["type"]
    if kind == "array":
        return st.lists(strategy_for(schema["items"], named), max_size=3)
    if kind == "map":
        return st.dictionaries(
            st.text(max_size=8), strategy_for(schema["values"], named), max_size=3
        )
    if kind == "enum":
        named[schema["name"]] = st.sampled_from(schema["symbols"])
        return named[schema["name"]]
    if kind == "record":
        fields = {f["name"]: strategy_for(f["type"], named) for f in schema["fields"]}
        named[schema["name"]] = st.fixed_dictionaries(fields)
        return named[schema["name"]]
    return strategy_for(kind, named)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_valid_record_round_trips_in_both_implementations(
    name: str, data: st.DataObject
) -> None:
    record = data.draw(strategy_for(schema_json(name), {}))
    payload = fastavro_bytes(catalog.parsed(name), record)
    assert fastavro_read(catalog.parsed(name), payload) == record
    assert avro_read(catalog.load_schema(name), payload) == record


# --- evolution -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_history_is_numbered_v1_to_vn(name: str) -> None:
    files = sorted(p.name for p in (catalog.SCHEMA_DIR / "history" / name).iterdir())
    assert files == sorted(f"v{i}.avsc" for i in range(1, len(files) + 1))
    assert files, "every schema is released at least once"


@pytest.mark.parametrize("name", NAMES)
def test_each_release_was_compatible_with_the_releases_before_it(name: str) -> None:
    released = catalog.history(name)
    for n in range(1, len(released)):
        assert evolution_problems(released[n], released[:n]) == [], f"history/{name}/v{n + 1}"


@pytest.mark.parametrize("name", NAMES)
def test_current_schema_is_backward_transitive_with_its_history(name: str) -> None:
    """A reader with ``schemas/<name>.avsc`` must read everything ever written on the topic.
    If this fails, the change breaks old data: add a default, or see schemas/README.md."""
    assert evolution_problems(catalog.load_schema(name), catalog.history(name)) == []


def _latest_vector_record() -> dict[str, Any]:
    """The latest release, not the current file: the guard's own tests must not depend on
    whatever unreleased change the current file holds."""
    latest: dict[str, Any] = json.loads(catalog.history("VectorRecord")[-1])
    return latest


def _vector_record_with(change: Callable[[dict[str, Any]], None]) -> str:
    schema = _latest_vector_record()
    change(schema)
    return json.dumps(schema)


def _field(schema: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(f for f in schema["fields"] if f["name"] == name)
    return found


BREAKING: dict[str, Callable[[dict[str, Any]], None]] = {
    "add a field without default": lambda s: s["fields"].append(
        {"name": "owner", "type": "string", "doc": "new"}
    ),
    "change a field's type": lambda s: _field(s, "version").update(type="string"),
    "rename a field without alias": lambda s: _field(s, "id").update(name="vector_id"),
    "drop an enum symbol": lambda s: _field(s, "dtype")["type"].update(symbols=["fp32", "fp16"]),
    "narrow long to int": lambda s: _field(s, "version").update(type="int"),
    "make an optional field required": lambda s: _field(s, "meta").update(type="string"),
    "rename the record": lambda s: s.update(name="Vector"),
}

SAFE: dict[str, Callable[[dict[str, Any]], None]] = {
    "add an optional field": lambda s: s["fields"].append(
        {"name": "owner", "type": ["null", "string"], "default": None, "doc": "new"}
    ),
    "add a field with a default": lambda s: s["fields"].append(
        {"name": "weight", "type": "double", "default": 1.0, "doc": "new"}
    ),
    "remove a field": lambda s: s["fields"].remove(_field(s, "ttl_ms")),
    "add an enum symbol": lambda s: _field(s, "dtype")["type"]["symbols"].append("bf16"),
    "rename a field with an alias": lambda s: _field(s, "tags").update(
        name="labels", aliases=["tags"]
    ),
    "change only a doc": lambda s: _field(s, "id").update(doc="changed"),
}


@pytest.mark.parametrize("change", BREAKING, ids=list(BREAKING))
def test_guard_catches_a_breaking_change(change: str) -> None:
    broken = _vector_record_with(BREAKING[change])
    assert evolution_problems(broken, catalog.history("VectorRecord")) != []


@pytest.mark.parametrize("change", SAFE, ids=list(SAFE))
def test_guard_lets_a_compatible_change_through(change: str) -> None:
    evolved = _vector_record_with(SAFE[change])
    assert evolution_problems(evolved, catalog.history("VectorRecord")) == []


def test_guard_checks_every_release_not_only_the_latest() -> None:
    """v2 dropped ``version``; a current schema that brings it back as a string with a
    default reads v2 data (default) but not v1 data (long is not string). Checking only
    the latest release would let it through."""
    v1 = _latest_vector_record()
    v2 = copy.deepcopy(v1)
    v2["fields"].remove(_field(v2, "version"))
    current = copy.deepcopy(v1)
    _field(current, "version").update(type="string", default="")
    released = [json.dumps(v1), json.dumps(v2)]

    assert incompatibilities(json.dumps(current), released, CompatibilityLevel.BACKWARD) == []
    assert evolution_problems(json.dumps(current), released) != []
