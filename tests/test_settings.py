"""Settings: every field documented in the README; the Kafka transport's client properties
(security etc.), SASL password and replication factor of created topics; clear errors for
settings that cannot work, against the real Tansu broker and the real ``streamvec`` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from streams.config import Settings
from streams.exceptions import ConfigError
from streams.log import Record, TopicSpec, open_log
from streams.log.kafka import KafkaLog

CLI = [sys.executable, "-m", "streams.cli"]


def _kafka(bootstrap: str, **over: object) -> Settings:
    return Settings(transport="kafka", kafka_bootstrap=bootstrap, **over)  # type: ignore[arg-type]


@pytest.mark.kafka
def test_kafka_config_reaches_every_client_and_topics_use_the_brokers_replication_default(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "STREAMVEC_KAFKA_CONFIG",
        json.dumps(
            {"client.rack": "rack-a", "socket.keepalive.enable": True, "message.max.bytes": 2000000}
        ),
    )
    settings = Settings(transport="kafka", kafka_bootstrap=kafka_bootstrap)
    assert settings.kafka_config["client.rack"] == "rack-a"
    assert settings.kafka_replication_factor == -1  # the broker's default.replication.factor
    log = open_log(settings)
    try:
        assert isinstance(log, KafkaLog)
        assert log._base["client.rack"] == "rack-a"  # what Producer/Consumer/Admin are built from
        assert log._rf == -1
        log.create_topic(TopicSpec("settings-t", partitions=2))
        pos = log.append_batch([Record.of("settings-t", "k", b"v")])
        assert pos[0].topic == "settings-t"
        assert log.end_offsets("settings-t")[pos[0].partition] == pos[0].offset + 1
    finally:
        log.close()


def test_the_sasl_password_becomes_a_client_property_and_is_never_printed() -> None:
    settings = _kafka(
        "localhost:9092",
        kafka_config={
            "security.protocol": "SASL_SSL",
            "sasl.mechanisms": "PLAIN",
            "sasl.username": "svc",
        },
        kafka_sasl_password="s3cret-pw",
    )
    props = settings.kafka_client_config()
    assert props["sasl.password"] == "s3cret-pw"
    assert props["sasl.username"] == "svc"
    assert "s3cret-pw" not in repr(settings) and "s3cret-pw" not in str(settings)
    assert "sasl.password" not in settings.kafka_config  # the setting itself holds no secret


@pytest.mark.parametrize(
    "prop",
    ["acks", "enable.idempotence", "bootstrap.servers", "sasl.password", "group.id",
     "linger.ms", "error_cb"],
)
def test_kafka_config_may_not_weaken_what_the_adapter_relies_on(prop: str) -> None:
    with pytest.raises(ConfigError, match=prop.replace(".", r"\.")):
        _kafka("localhost:9092", kafka_config={prop: "1"}).check()


def test_an_unknown_client_property_is_a_config_error_naming_it() -> None:
    settings = _kafka("127.0.0.1:1", kafka_config={"no.such.property": "1"})
    with pytest.raises(ConfigError, match=r"no\.such\.property"):
        open_log(settings)


def test_a_bad_consumer_only_property_is_refused_at_start_not_at_the_first_read() -> None:
    # Admin and producer accept it; librdkafka checks it only when a consumer is built
    settings = _kafka("127.0.0.1:1", kafka_config={"fetch.max.bytes": 1000})
    with pytest.raises(ConfigError, match=r"fetch\.max\.bytes"):
        open_log(settings)


def test_replication_factor_zero_is_refused() -> None:
    with pytest.raises(ConfigError, match="replication_factor"):
        _kafka("localhost:9092", kafka_replication_factor=0).check()


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"STREAMVEC_PARTITIONS": "many"}, "STREAMVEC_PARTITIONS"),
        ({"STREAMVEC_KAFKA_CONFIG": "not json"}, "STREAMVEC_KAFKA_CONFIG"),
        ({"STREAMVEC_KAFKA_CONFIG": '{"acks": "0"}'}, "may not set acks"),
        ({"STREAMVEC_KAFKA_CONFIG": '{"no.such.property": 1}'}, "no.such.property"),
        ({"STREAMVEC_KAFKA_CONFIG": '{"error_cb": "x"}'}, "error_cb"),
        ({"STREAMVEC_KAFKA_CONFIG": '{"a.b": [1]}'}, "STREAMVEC_KAFKA_CONFIG ('a.b')"),
    ],
)
def test_the_cli_answers_bad_settings_with_a_code_not_a_traceback(
    tmp_path: Path, env: dict[str, str], says: str
) -> None:
    run = subprocess.run(
        [*CLI, "topics", "--kafka", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        env={**os.environ, **env, "COLUMNS": "300"},
        timeout=60,
        cwd=tmp_path,
    )
    assert run.returncode == 2, run.stderr
    assert "VEC_ERR_INVALID" in run.stderr and says in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def test_every_setting_is_documented_in_the_readme_with_its_environment_variable() -> None:
    """The README's configuration table names every field of :class:`Settings` (rows may
    group several, ``a / b``) and its ``STREAMVEC_*`` variable (the first of a group)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    documented: set[str] = set()
    for line in readme.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 3 and cells[2].startswith("`STREAMVEC_"):
            names = [n.strip() for n in cells[1].split("/")]
            assert cells[2].strip("`").rstrip(" .").startswith(f"STREAMVEC_{names[0].upper()}")
            documented.update(names)
    assert set(Settings.model_fields) - documented == set()
    assert documented - set(Settings.model_fields) == set()
