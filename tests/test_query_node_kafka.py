"""The Kafka write path: a plain confluent-kafka producer with Confluent's AvroSerializer
(schema registry over real HTTP) writes VectorRecords to the Tansu broker; a query node on
the Kafka transport indexes them and answers searches."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from streams.index.model import Consistency, IndexConfig
from streams.log.kafka import KafkaLog
from streams.schemas import catalog
from streams.schemas.codec import AvroCodec
from streams.schemas.log_registry import LogRegistry
from streams.schemas.rest import create_registry_app
from streams.service.api import SearchRequest
from streams.service.query_node import QueryNode
from streams.topics import Topics
from tests.registry_fixtures import serve

pytestmark = pytest.mark.kafka


def test_avro_records_produced_by_a_kafka_client_are_searchable(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topics = Topics(prefix=f"k{uuid.uuid4().hex[:6]}.", partitions=2)
    log = KafkaLog(kafka_bootstrap)
    try:
        log.ensure_topics(topics.specs())
        registry = LogRegistry(log, topics)
        with serve(create_registry_app(registry)) as url, QueryNode(
            log, topics, AvroCodec(registry), tmp_path / "node"
        ) as node:
            node.service.create_index(IndexConfig("acme", "kb", 8, recipe="Flat"))
            client = SchemaRegistryClient({"url": url})
            serializer = AvroSerializer(client, catalog.load_schema("VectorRecord"))
            producer = Producer({"bootstrap.servers": kafka_bootstrap,
                                 "partitioner": "murmur2_random", "acks": "all"})
            rng = np.random.default_rng(0)
            vectors = {f"id{i}": rng.standard_normal(8).astype(np.float32) for i in range(50)}
            ctx = SerializationContext(topics.vectors, MessageField.VALUE)
            for id, vec in vectors.items():
                value = serializer({
                    "tenant": "acme", "index": "kb", "id": id, "vector": vec.tobytes(),
                    "dtype": "fp32", "meta": f'{{"n": "{id}"}}', "tags": [], "numeric": {},
                    "version": 1, "timestamp": 0, "source_id": None, "chunk": None,
                    "ttl_ms": None,
                }, ctx)
                producer.produce(topics.vectors, value, f"acme/kb/{id}")
            assert producer.flush(10) == 0
            q = vectors["id7"]
            res = node.service.search(SearchRequest(
                "acme", "kb", q, 3, consistency=Consistency.STRONG, timeout_ms=20_000))
            assert res.hits[0].id == "id7"
            assert res.hits[0].meta == '{"n": "id7"}'
            assert node.service.info("acme", "kb")["stats"]["live"] == 50
    finally:
        log.close()
