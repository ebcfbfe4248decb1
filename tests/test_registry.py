"""The embedded schema registry, driven over real HTTP by Confluent's own client.

Everything is real: an EmbeddedLog in ``tmp_path``, a LogRegistry on its ``_schemas`` topic,
the REST app under uvicorn on a loopback port, ``confluent_kafka.schema_registry``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

from streams.log.embedded import EmbeddedLog
from streams.schemas.codec import AvroCodec
from streams.schemas.compatibility import CompatibilityLevel
from streams.schemas.log_registry import LogRegistry
from streams.schemas.rest import CONTENT_TYPE
from streams.topics import Topics
from tests.registry_fixtures import avro_record, served_log_registry

V1 = avro_record("User", ("name", "string"))
V2 = avro_record("User", ("name", "string"), ("age", "int", 0))  # BACKWARD compatible
BAD = avro_record("User", ("name", "string"), ("email", "string"))  # new field, no default


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, LogRegistry, EmbeddedLog]]:
    with served_log_registry(tmp_path / "log") as s:
        yield s


@pytest.fixture
def client(server: tuple[str, LogRegistry, EmbeddedLog]) -> SchemaRegistryClient:
    return SchemaRegistryClient({"url": server[0]})


def avro(text: str) -> Schema:
    return Schema(text, "AVRO")


def reply_of(value: object) -> object:
    return value


def same_schema(a: str | None, b: str) -> bool:
    return a is not None and bool(json.loads(a) == json.loads(b))


def test_register_is_idempotent_and_ids_are_shared_across_subjects(
    client: SchemaRegistryClient,
) -> None:
    first = client.register_schema("users-value", avro(V1))
    # Same schema, other whitespace: same id, no new version.
    pretty = json.dumps(json.loads(V1), indent=4)
    assert SchemaRegistryClient({"url": client._rest_client.base_urls[0]}).register_schema(
        "users-value", avro(pretty)
    ) == first
    assert client.get_versions("users-value") == [1]
    # The same canonical schema under another subject shares the id.
    assert client.register_schema("other-value", avro(V1)) == first
    second = client.register_schema("users-value", avro(V2))
    assert second == first + 1
    assert client.get_versions("users-value") == [1, 2]
    assert client.get_subjects() == ["other-value", "users-value"]


def test_lookup_get_schema_and_versions(client: SchemaRegistryClient) -> None:
    sid1 = client.register_schema("users-value", avro(V1))
    sid2 = client.register_schema("users-value", avro(V2))
    found = client.lookup_schema("users-value", avro(V1))
    assert (found.schema_id, found.version, found.subject) == (sid1, 1, "users-value")
    assert same_schema(client.get_schema(sid2).schema_str, V2)
    latest = client.get_latest_version("users-value")
    assert (latest.schema_id, latest.version) == (sid2, 2)
    assert same_schema(latest.schema.schema_str, V2)
    v1 = client.get_version("users-value", 1)
    assert (v1.schema_id, v1.version) == (sid1, 1)
    assert same_schema(v1.schema.schema_str, V1)


def test_compatibility_config_and_test(client: SchemaRegistryClient) -> None:
    client.register_schema("users-value", avro(V1))
    assert client.get_compatibility() == "BACKWARD"
    assert client.get_compatibility("users-value") == "BACKWARD"  # falls back to global
    assert client.test_compatibility("users-value", avro(V2)) is True
    assert client.test_compatibility("users-value", avro(BAD)) is False
    # The client hands back the reply body (its docstring says str).
    assert reply_of(client.set_compatibility("users-value", "NONE")) == {"compatibility": "NONE"}
    assert client.get_compatibility("users-value") == "NONE"
    assert client.get_compatibility() == "BACKWARD"
    assert client.test_compatibility("users-value", avro(BAD), version=1) is True
    # Under NONE the incompatible schema registers.
    assert client.register_schema("users-value", avro(BAD)) > 0
    assert reply_of(client.set_compatibility(level="FULL")) == {"compatibility": "FULL"}
    assert client.get_compatibility() == "FULL"
    assert client.get_compatibility("other") == "FULL"


def test_incompatible_registration_is_refused_with_409(client: SchemaRegistryClient) -> None:
    client.register_schema("users-value", avro(V1))
    with pytest.raises(SchemaRegistryError) as err:
        client.register_schema("users-value", avro(BAD))
    assert err.value.http_status_code == 409
    assert err.value.error_code == 409
    assert "email" in err.value.error_message
    assert client.get_versions("users-value") == [1]  # nothing registered


def test_avro_serializer_round_trip_and_our_codec_agree(
    server: tuple[str, LogRegistry, EmbeddedLog], client: SchemaRegistryClient
) -> None:
    url, registry, _ = server
    ctx = SerializationContext("users", MessageField.VALUE)
    record = {"name": "ada", "age": 36}
    data = AvroSerializer(client, V2)(record, ctx)
    assert data is not None and data[0] == 0
    assert AvroDeserializer(SchemaRegistryClient({"url": url}))(data, ctx) == record
    # Congruence: our codec writes the same bytes and reads Confluent's.
    codec = AvroCodec(registry)
    assert codec.encode("users-value", V2, record) == data
    assert codec.decode(data) == (int.from_bytes(data[1:5], "big"), record)
    # ... and Confluent's deserializer reads ours.
    assert AvroDeserializer(client)(codec.encode("users-value", V2, record), ctx) == record


def test_restart_keeps_ids_versions_and_config(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with served_log_registry(path) as (url, _, _):
        c = SchemaRegistryClient({"url": url})
        ids = [c.register_schema("a-value", avro(V1)), c.register_schema("a-value", avro(V2))]
        ids.append(c.register_schema("b-value", avro(avro_record("B", ("x", "long")))))
        c.set_compatibility("b-value", "FULL_TRANSITIVE")
        c.delete_subject("b-value")
        # A fresh client: Confluent's caches the id and would not ask again.
        c = SchemaRegistryClient({"url": url})
        ids.append(c.register_schema("b-value", avro(avro_record("B", ("x", "long")))))
        before = {
            s: [(c.get_version(s, v).schema_id, v) for v in c.get_versions(s)]
            for s in c.get_subjects()
        }
    assert ids == [1, 2, 3, 3]
    with served_log_registry(path) as (url, registry, _):
        c = SchemaRegistryClient({"url": url})
        after = {
            s: [(c.get_version(s, v).schema_id, v) for v in c.get_versions(s)]
            for s in c.get_subjects()
        }
        assert after == before == {"a-value": [(1, 1), (2, 2)], "b-value": [(3, 2)]}
        assert c.get_compatibility("b-value") == "FULL_TRANSITIVE"
        assert same_schema(c.get_schema(2).schema_str, V2)
        # Ids go on from where they were.
        assert c.register_schema("c-value", avro(avro_record("C", ("y", "int")))) == 4
        assert registry.get_compatibility("a-value") is CompatibilityLevel.BACKWARD


def test_soft_delete_keeps_ids_and_never_reuses_versions(client: SchemaRegistryClient) -> None:
    sid = client.register_schema("users-value", avro(V1))
    assert client.delete_subject("users-value") == [1]
    assert client.get_subjects() == []
    assert same_schema(client.get_schema(sid).schema_str, V1)  # old records still decode
    with pytest.raises(SchemaRegistryError) as err:
        client.get_versions("users-value")
    assert err.value.error_code == 40401
    # A fresh client: Confluent's caches the id and would not ask again.
    fresh = SchemaRegistryClient({"url": client._rest_client.base_urls[0]})
    assert fresh.register_schema("users-value", avro(V1)) == sid
    assert fresh.get_versions("users-value") == [2]


def test_concurrent_registrations_get_unique_consecutive_ids(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path / "log")
    try:
        registry = LogRegistry(log, Topics())
        registry.set_compatibility(CompatibilityLevel.NONE)
        got: dict[int, int] = {}

        def work(i: int) -> None:
            got[i] = registry.register("s-value", avro_record(f"R{i}", ("f", "int")))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(got.values()) == list(range(1, 25))
        assert registry.versions("s-value") == list(range(1, 25))
        by_version = {registry.get_version("s-value", v).id for v in range(1, 25)}
        assert by_version == set(range(1, 25))
        replayed = LogRegistry(log, Topics())
        assert [replayed.get_version("s-value", v) for v in range(1, 25)] == [
            registry.get_version("s-value", v) for v in range(1, 25)
        ]
    finally:
        log.close()


# -- the REST surface, raw ------------------------------------------------------------------
def _post(url: str, body: object, content_type: str = CONTENT_TYPE) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url, content=raw, headers={"Content-Type": content_type})


def _error(resp: httpx.Response, status: int, code: int) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(CONTENT_TYPE)
    body = resp.json()
    assert body["error_code"] == code
    assert isinstance(body["message"], str) and body["message"]


def test_rest_error_codes_and_content_type(
    server: tuple[str, LogRegistry, EmbeddedLog],
) -> None:
    url = server[0]
    ok = _post(f"{url}/subjects/users-value/versions", {"schema": V1})
    assert ok.status_code == 200
    assert ok.headers["content-type"].startswith(CONTENT_TYPE)
    assert ok.json() == {"id": 1}
    _error(httpx.get(f"{url}/subjects/nope/versions"), 404, 40401)
    _error(httpx.get(f"{url}/subjects/nope/versions/latest"), 404, 40401)
    _error(httpx.get(f"{url}/subjects/users-value/versions/7"), 404, 40402)
    _error(httpx.get(f"{url}/subjects/users-value/versions/abc"), 422, 42202)
    _error(httpx.get(f"{url}/subjects/users-value/versions/0"), 422, 42202)
    _error(httpx.get(f"{url}/schemas/ids/999"), 404, 40403)
    _error(_post(f"{url}/subjects/users-value", {"schema": V2}), 404, 40403)
    _error(_post(f"{url}/subjects/users-value/versions", b"{not json"), 422, 42201)
    _error(_post(f"{url}/subjects/users-value/versions", {"schema": "{\"type\": \"nope\"}"}),
           422, 42201)
    _error(_post(f"{url}/subjects/users-value/versions", {"schemaType": "AVRO"}), 422, 42201)
    _error(_post(f"{url}/subjects/users-value/versions", {"schema": BAD}), 409, 409)
    _error(httpx.put(f"{url}/config", json={"compatibility": "SIDEWAYS"}), 422, 42203)
    _error(httpx.get(f"{url}/no/such/route"), 404, 404)


@pytest.mark.parametrize(
    "content_type",
    [CONTENT_TYPE, "application/vnd.schemaregistry+json", "application/json"],
)
def test_rest_accepts_confluent_content_types(
    server: tuple[str, LogRegistry, EmbeddedLog], content_type: str
) -> None:
    url = server[0]
    assert _post(f"{url}/subjects/s/versions", {"schema": V1}, content_type).json() == {"id": 1}
    found = _post(f"{url}/subjects/s", {"schema": V1}, content_type).json()
    assert found == {"subject": "s", "id": 1, "version": 1, "schema": json.dumps(
        json.loads(V1), separators=(",", ":"))}


def test_rest_reads_config_and_verbose_compatibility(
    server: tuple[str, LogRegistry, EmbeddedLog],
) -> None:
    url = server[0]
    _post(f"{url}/subjects/s/versions", {"schema": V1})
    assert httpx.get(f"{url}/schemas/ids/1").json() == {"schema": json.dumps(
        json.loads(V1), separators=(",", ":"))}
    assert json.loads(httpx.get(f"{url}/schemas/ids/1/schema").text) == json.loads(V1)
    assert httpx.get(f"{url}/subjects/s/versions/latest").json()["version"] == 1
    assert httpx.get(f"{url}/subjects").json() == ["s"]
    assert httpx.get(f"{url}/config").json() == {"compatibilityLevel": "BACKWARD"}
    put = httpx.put(f"{url}/config/s", json={"compatibility": "forward"})
    assert put.json() == {"compatibility": "FORWARD"}
    assert put.headers["content-type"].startswith(CONTENT_TYPE)
    assert httpx.get(f"{url}/config/s").json() == {"compatibilityLevel": "FORWARD"}
    # FORWARD: the old schema must read the new one's data; dropping a field without a
    # default breaks it.
    httpx.put(f"{url}/config/s", json={"compatibility": "BACKWARD"})
    quiet = _post(f"{url}/compatibility/subjects/s/versions/latest", {"schema": BAD}).json()
    assert quiet == {"is_compatible": False}
    verbose = _post(
        f"{url}/compatibility/subjects/s/versions/latest?verbose=true", {"schema": BAD}
    ).json()
    assert verbose["is_compatible"] is False
    assert any("email" in m for m in verbose["messages"])
    good = _post(f"{url}/compatibility/subjects/s/versions/1?verbose=true", {"schema": V2})
    assert good.json() == {"is_compatible": True, "messages": []}
    _error(_post(f"{url}/compatibility/subjects/s/versions/9", {"schema": V2}), 404, 40402)
    fresh = _post(f"{url}/compatibility/subjects/new/versions/latest", {"schema": V2})
    assert fresh.json() == {"is_compatible": True}
