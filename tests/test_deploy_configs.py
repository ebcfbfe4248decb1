"""The deployment files agree with the code: Connect configs name real topics whose value
schemas the node registers (over the real embedded registry), fields they refer to exist, and the
compose file and Dockerfile use the node's real ports and health route."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from streams.config import Settings
from streams.node import open_node
from streams.schemas import catalog
from streams.topics import Topics

ROOT = Path(__file__).resolve().parents[1]
CONNECTORS = sorted((ROOT / "connectors").glob("*.json"))


def _schema_fields(topic: str, topics: Topics) -> set[str]:
    suffix = topic.removeprefix(topics.prefix)
    schema = json.loads(catalog.load_schema(catalog.TOPIC_VALUE_SCHEMA[suffix]))
    return {f["name"] for f in schema["fields"]}


def test_there_are_connector_configs() -> None:
    assert len(CONNECTORS) >= 3


@pytest.mark.parametrize("path", CONNECTORS, ids=lambda p: p.name)
def test_connector_config_matches_topics_and_schemas(path: Path, tmp_path: Path) -> None:
    doc = json.loads(path.read_text())
    config = doc["config"]
    assert doc["name"].startswith("streamvec-")
    topics = Topics()
    names = [t.strip() for t in config["topics"].split(",")]
    known = {s.name for s in topics.specs()}
    for name in names:
        assert name in known, f"{path.name}: unknown topic {name}"
    assert config["key.converter"] == "org.apache.kafka.connect.storage.StringConverter"
    assert config["value.converter"] == "io.confluent.connect.avro.AvroConverter"
    assert config["value.converter.schema.registry.url"].endswith(":8081")
    for name in names:
        fields = _schema_fields(name, topics)
        if "timestamp.field" in config:
            assert config["timestamp.field"] in fields
    # the node registers <topic>-value for every topic a sink reads, so AvroConverter resolves it
    settings = Settings(data_dir=tmp_path, registry_port=0, http_port=0, resp_port=0)
    with open_node(settings) as node:
        node.register_schemas()
        for name in names:
            subject = catalog.subject_for(name)
            assert node.registry.versions(subject), f"{subject} not registered"


def test_compose_uses_the_node_defaults() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    node = compose["services"]["streamvec"]
    s = Settings()
    published = {int(p.split(":")[1]) for p in node["ports"]}
    assert published == {s.http_port, s.registry_port, s.resp_port}
    assert node["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (ROOT / node["build"]["dockerfile"]).exists()
    connect = compose["services"]["connect"]["environment"]
    assert connect["CONNECT_VALUE_CONVERTER_SCHEMA_REGISTRY_URL"] == f"http://streamvec:{s.registry_port}"


def test_dockerfile_health_route_exists() -> None:
    from streams.service.http import create_http_app

    text = (ROOT / "deploy" / "Dockerfile").read_text()
    paths = {getattr(r, "path", None) for r in create_http_app(None).routes}  # type: ignore[arg-type]
    route = text.split("http://127.0.0.1:8080", 1)[1].split("'", 1)[0]
    assert route in paths
    assert "ENTRYPOINT [\"streamvec\", \"up\"]" in text
