from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from streams.log.embedded import EmbeddedLog
from streams.log.kafka import KafkaLog
from streams.log.port import Log, TopicSpec
from streams.service.api import DataPlane
from tests.brokers import tansu_broker
from tests.dataplane_memory import MemoryDataPlane
from tests.rigs import Rig

# the kafka variant is marked in its param, so ``-m kafka`` / ``-m "not kafka"`` select it at
# collection (a mark applied in the fixture's body comes too late for -m)
TRANSPORTS = ["embedded", pytest.param("kafka", marks=pytest.mark.kafka)]

# Property tests check behaviour, not speed (speed is measured in bench/): no per-example
# deadline, which on a shared 2-core CI box only turns a slow scheduler tick into a failure.
settings.register_profile("streamvec", deadline=None)
settings.load_profile("streamvec")


@pytest.fixture(params=["memory", "node"])
def dataplane(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DataPlane]:
    """The protocol suites run against the exact in-memory reference and the real node."""
    if request.param == "memory":
        yield MemoryDataPlane()
        return
    rig = Rig(tmp_path / "rig")
    yield rig.node.service
    rig.close()


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    with tansu_broker() as bootstrap:
        yield bootstrap


@pytest.fixture
def embedded_log(tmp_path: Path) -> Iterator[EmbeddedLog]:
    log = EmbeddedLog(tmp_path / "log")
    yield log
    log.close()


@pytest.fixture
def kafka_log(kafka_bootstrap: str) -> Iterator[KafkaLog]:
    log = KafkaLog(kafka_bootstrap, client_id=f"test-{uuid.uuid4().hex[:6]}")
    yield log
    log.close()


@pytest.fixture(params=TRANSPORTS)
def log(request: pytest.FixtureRequest) -> Log:
    """The contract suite's log: every test that takes it runs against both transports."""
    fixture = "embedded_log" if request.param == "embedded" else "kafka_log"
    result: Log = request.getfixturevalue(fixture)
    return result


@pytest.fixture
def new_topic(log: Log) -> Callable[..., str]:
    """Create a topic with a unique name (the broker is shared across the session)."""

    def make(partitions: int = 1, **kw: object) -> str:
        name = f"t-{uuid.uuid4().hex[:10]}"
        log.create_topic(TopicSpec(name, partitions, **kw))  # type: ignore[arg-type]
        return name

    return make
