"""Kafka-transport specifics, on the real Tansu broker."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import Producer

from streams.log.kafka import KafkaLog
from streams.log.partitioner import default_partition
from streams.log.port import TopicSpec

pytestmark = pytest.mark.kafka


def test_java_compatible_partitioner_agrees_with_ours(
    kafka_log: KafkaLog, kafka_bootstrap: str
) -> None:
    """A plain librdkafka producer with partitioner=murmur2_random (Java's default) and no
    explicit partition puts each key where our log would."""
    topic = f"p-{uuid.uuid4().hex[:8]}"
    kafka_log.create_topic(TopicSpec(topic, 6))
    landed: dict[bytes, int] = {}
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "partitioner": "murmur2_random"})
    keys = [f"tenant/index/{i}".encode() for i in range(60)]

    def record(err: object, msg: object) -> None:
        landed[msg.key()] = msg.partition()  # type: ignore[attr-defined]

    for k in keys:
        producer.produce(topic, b"v", k, on_delivery=record)
    producer.flush(10)
    assert landed == {k: default_partition(k, 6) for k in keys}


def test_end_offsets_account_for_multi_record_batches(kafka_log: KafkaLog) -> None:
    """Tansu reports the high watermark as the last batch's base offset + 1; the adapter
    must still answer the true end after a batched append."""
    topic = f"e-{uuid.uuid4().hex[:8]}"
    kafka_log.create_topic(TopicSpec(topic, 1))
    from streams.log.port import Record

    kafka_log.append_batch([Record.of(topic, "k", b"%d" % i) for i in range(25)])
    assert kafka_log.end_offsets(topic) == {0: 25}
