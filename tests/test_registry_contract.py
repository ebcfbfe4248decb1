"""The SchemaRegistry port's contract, run against both adapters: LogRegistry directly, and
RemoteRegistry talking to a LogRegistry served over real HTTP (so the REST layer and the
error translation at both edges are in the loop)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from streams.log.embedded import EmbeddedLog
from streams.schemas.codec import AvroCodec
from streams.schemas.compatibility import CompatibilityLevel
from streams.schemas.exceptions import (
    IncompatibleSchema,
    InvalidSchema,
    InvalidVersion,
    SchemaNotFound,
    SubjectNotFound,
    VersionNotFound,
)
from streams.schemas.log_registry import LogRegistry
from streams.schemas.registry import OperationNotPermitted, SchemaRegistry
from streams.schemas.remote_registry import RemoteRegistry
from streams.topics import Topics
from tests.registry_fixtures import avro_record, served_log_registry

V1 = avro_record("User", ("name", "string"))
V2 = avro_record("User", ("name", "string"), ("age", "int", 0))
BAD = avro_record("User", ("name", "string"), ("email", "string"))


@pytest.fixture(params=["log", "remote"])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SchemaRegistry]:
    if request.param == "log":
        log = EmbeddedLog(tmp_path / "log")
        yield LogRegistry(log, Topics())
        log.close()
    else:
        with served_log_registry(tmp_path / "log") as (url, _, _):
            remote = RemoteRegistry(url)
            yield remote
            remote.close()


def test_register_lookup_versions(registry: SchemaRegistry) -> None:
    assert registry.register("s", V1) == 1
    assert registry.register("s", V1) == 1
    assert registry.register("t", V1) == 1
    assert registry.register("s", V2) == 2
    assert registry.subjects() == ["s", "t"]
    assert registry.versions("s") == [1, 2]
    found = registry.lookup("s", V1)
    assert (found.subject, found.version, found.id) == ("s", 1, 1)
    latest = registry.get_version("s", "latest")
    assert (latest.version, latest.id) == (2, 2)
    assert registry.get_version("s", 1).id == 1
    assert AvroCodec(registry).decode(AvroCodec(registry).encode("s", V2, {"name": "a",
                                                                       "age": 3})) == (
        2, {"name": "a", "age": 3})


def test_errors(registry: SchemaRegistry) -> None:
    registry.register("s", V1)
    with pytest.raises(SubjectNotFound):
        registry.versions("nope")
    with pytest.raises(SubjectNotFound):
        registry.get_version("nope", "latest")
    with pytest.raises(VersionNotFound):
        registry.get_version("s", 5)
    with pytest.raises(InvalidVersion):
        registry.get_version("s", 0)
    with pytest.raises(SchemaNotFound):
        registry.get_by_id(42)
    with pytest.raises(SchemaNotFound):
        registry.lookup("s", V2)
    with pytest.raises(InvalidSchema):
        registry.register("s", "{not json")
    with pytest.raises(InvalidSchema):
        registry.register("s", '{"type": "record", "name": "X"}')
    with pytest.raises(IncompatibleSchema) as err:
        registry.register("s", BAD)
    assert err.value.http_status == 409 and "email" in str(err.value)
    assert registry.versions("s") == [1]


def test_compatibility(registry: SchemaRegistry) -> None:
    registry.register("s", V1)
    assert registry.get_compatibility() is CompatibilityLevel.BACKWARD
    assert registry.test_compatibility("s", V2) == (True, [])
    ok, messages = registry.test_compatibility("s", BAD, 1)
    assert not ok and any("email" in m for m in messages)
    assert registry.test_compatibility("fresh", BAD) == (True, [])
    registry.set_compatibility(CompatibilityLevel.NONE, "s")
    assert registry.get_compatibility("s") is CompatibilityLevel.NONE
    assert registry.get_compatibility("other") is CompatibilityLevel.BACKWARD
    assert registry.register("s", BAD) == 2
    registry.set_compatibility(CompatibilityLevel.FORWARD_TRANSITIVE)
    assert registry.get_compatibility() is CompatibilityLevel.FORWARD_TRANSITIVE
    assert registry.get_compatibility("other") is CompatibilityLevel.FORWARD_TRANSITIVE


def test_soft_delete(registry: SchemaRegistry) -> None:
    registry.register("s", V1)
    registry.register("s", V2)
    assert registry.delete_subject("s") == [1, 2]
    assert registry.subjects() == []
    assert registry.subjects(deleted=True) == ["s"]
    with pytest.raises(SubjectNotFound):
        registry.versions("s")
    assert registry.get_by_id(1)  # still resolvable: old records must decode
    assert registry.lookup("s", V1, deleted=True).version == 1
    assert registry.register("s", V2) == 2
    assert registry.versions("s") == [3]
    with pytest.raises(OperationNotPermitted):
        registry.delete_subject("s", permanent=True)
