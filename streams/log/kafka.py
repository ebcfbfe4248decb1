"""The Kafka adapter of the log port (confluent-kafka / librdkafka).

Writes use an idempotent producer with ``acks=all``; ``submit``'s future resolves from the
delivery reports, so a returned position is acknowledged by every in-sync replica. The
partition is computed here with Kafka's murmur2 (the same function the embedded log uses);
the producer is also configured with ``partitioner=murmur2_random`` so that records our
code does not route land where a Java client would put them.

Reads never join a consumer group (group joins are slow on some brokers and we need every
partition anyway): readers ``assign()`` partitions and commit offsets for a group id
without membership, which Kafka allows.

Broker quirk handled here: Tansu (the test broker) reports the high watermark as the base
offset of the last batch + 1. ``end_offsets`` therefore takes the larger of the broker's
answer and the highest offset this client has produced or read, + 1.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import Any, cast

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    ConfigResource,
    NewTopic,
)

from streams.log.exceptions import (
    InvalidRecord,
    LogClosed,
    TopicConflict,
    TopicNotFound,
    TransportError,
)
from streams.log.partitioner import default_partition
from streams.log.port import (
    CleanupPolicy,
    Log,
    LogPosition,
    Record,
    StoredRecord,
    Subscription,
    TopicSpec,
)
from streams.log.subscription import PositionTracking

__all__ = ["KafkaLog"]

_FETCH_WAIT_S = 5.0


def _translate(exc: BaseException, what: str) -> TransportError:
    err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
    retriable = bool(err.retriable()) if err is not None else True
    return TransportError(f"{what}: {exc}", retriable=retriable)


def _consume(consumer: Consumer, max_records: int, timeout_s: float) -> list[Message]:
    """Wait up to ``timeout_s`` for the first message only, then take what is already
    fetched (``Consumer.consume`` alone waits for ``max_records`` or the whole timeout)."""
    first = consumer.poll(max(timeout_s, 0.001))
    if first is None:
        return []
    rest: list[Message] = consumer.consume(max_records - 1, timeout=0) if max_records > 1 else []
    return [first, *rest]


def _stored(msg: Message) -> StoredRecord:
    raw_headers = cast(list[tuple[str, bytes | str | None]], msg.headers() or [])
    headers = tuple(
        (k, v.encode() if isinstance(v, str) else (v or b"")) for k, v in raw_headers
    )
    key, value = msg.key(), msg.value()
    return StoredRecord(
        cast(str, msg.topic()), cast(int, msg.partition()), cast(int, msg.offset()),
        key.encode() if isinstance(key, str) else key,
        value.encode() if isinstance(value, str) else value,
        msg.timestamp()[1], headers,
    )


def _position(msg: Message) -> LogPosition:
    return LogPosition(cast(str, msg.topic()), cast(int, msg.partition()), cast(int, msg.offset()))


def _message_error(msg: Message, what: str) -> TransportError | None:
    err = msg.error()
    if err is None:
        return None
    return TransportError(f"{what}: {err.str()}", retriable=bool(err.retriable()))


class _Delivery:
    """Collects the delivery reports of one ``submit`` call and resolves its future."""

    def __init__(self, topics: list[str], fut: Future[list[LogPosition]], on_done: Any) -> None:
        self.positions: list[LogPosition | None] = [None] * len(topics)
        self.remaining = len(topics)
        self.error: BaseException | None = None
        self.fut = fut
        self.on_done = on_done
        self.lock = threading.Lock()

    def callback(self, i: int) -> Any:
        def cb(err: KafkaError | None, msg: Message) -> None:
            with self.lock:
                if err is not None:
                    self.error = self.error or TransportError(
                        f"delivery failed: {err.str()}", retriable=bool(err.retriable())
                    )
                else:
                    pos = _position(msg)
                    self.positions[i] = pos
                    self.on_done(pos.topic, pos.partition, pos.offset)
                self.remaining -= 1
                done = self.remaining == 0
            if done:
                if self.error is not None:
                    self.fut.set_exception(self.error)
                else:
                    self.fut.set_result([p for p in self.positions if p is not None])

        return cb


class KafkaLog(Log):
    """The log on a Kafka cluster. ``config`` adds librdkafka settings (security etc.) to
    every client. ``replication_factor`` applies to topics this adapter creates."""

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        client_id: str = "streamvec",
        config: Mapping[str, Any] | None = None,
        replication_factor: int = 1,
        linger_ms: int = 5,
    ) -> None:
        self._base: dict[str, Any] = {"bootstrap.servers": bootstrap_servers, **(config or {})}
        self._client_id = client_id
        self._rf = replication_factor
        self._admin = AdminClient({**self._base, "client.id": f"{client_id}-admin"})
        self._producer = Producer(
            {
                **self._base,
                "client.id": f"{client_id}-producer",
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": linger_ms,
                "partitioner": "murmur2_random",
            }
        )
        self._specs: dict[str, TopicSpec] = {}
        self._seen: dict[tuple[str, int], int] = {}
        self._seen_lock = threading.Lock()
        self._reader_lock = threading.Lock()
        self._reader: Consumer | None = None
        self._group_clients: dict[str, Consumer] = {}
        self._closed = False
        self._poller = threading.Thread(target=self._poll_loop, name="kafka-log-poll", daemon=True)
        self._poller.start()

    # -- clients ---------------------------------------------------------------------------
    def _consumer(self, group: str | None) -> Consumer:
        return Consumer(
            {
                **self._base,
                "client.id": f"{self._client_id}-reader",
                "group.id": group or f"{self._client_id}-reader-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "enable.partition.eof": False,
                "fetch.wait.max.ms": 50,
            }
        )

    def check_client_config(self) -> None:
        """Build (and close) a reader: librdkafka checks some consumer properties only
        there (``KafkaException``, ``TypeError`` or ``ValueError`` on a bad one)."""
        self._consumer(None).close()

    def _poll_loop(self) -> None:
        while not self._closed:
            self._producer.poll(0.05)

    def _note(self, topic: str, partition: int, offset: int) -> None:
        with self._seen_lock:
            if offset >= self._seen.get((topic, partition), -1):
                self._seen[(topic, partition)] = offset

    # -- topics ----------------------------------------------------------------------------
    def create_topic(self, spec: TopicSpec) -> None:
        self._check_open()
        cfg = {"cleanup.policy": spec.cleanup.value,
               "delete.retention.ms": str(spec.tombstone_retention_ms)}
        if spec.cleanup is CleanupPolicy.DELETE:
            cfg["retention.ms"] = str(spec.retention_ms if spec.retention_ms is not None else -1)
            cfg["retention.bytes"] = str(
                spec.retention_bytes if spec.retention_bytes is not None else -1
            )
        new = NewTopic(spec.name, num_partitions=spec.partitions,
                       replication_factor=self._rf, config=cfg)
        try:
            self._admin.create_topics([new])[spec.name].result(timeout=30)
        except TimeoutError:
            raise TransportError(
                f"create topic {spec.name}: no answer from {self._base['bootstrap.servers']} "
                "in 30 s (is kafka_bootstrap right, and kafka_config's security settings?)"
            ) from None
        except KafkaException as exc:
            err = exc.args[0]
            if err.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise _translate(exc, f"create topic {spec.name}") from exc
            old = self.describe(spec.name)
            if old.partitions != spec.partitions or old.cleanup != spec.cleanup:
                raise TopicConflict(
                    f"topic {spec.name!r} exists with {old.partitions} partitions and "
                    f"cleanup={old.cleanup}; asked for {spec.partitions}/{spec.cleanup}"
                ) from None
            return
        self._specs[spec.name] = spec

    def describe(self, topic: str) -> TopicSpec:
        spec = self._specs.get(topic)
        if spec is not None:
            return spec
        try:
            # Ask for all topics: a metadata request naming one auto-creates it on brokers
            # with auto.create.topics.enable (Tansu, many dev clusters).
            md = self._admin.list_topics(timeout=10)
        except KafkaException as exc:
            raise _translate(exc, f"describe {topic}") from exc
        tmd = md.topics.get(topic)
        if tmd is None or tmd.error is not None or not tmd.partitions:
            raise TopicNotFound(topic)
        cleanup = CleanupPolicy.DELETE
        try:
            res = self._admin.describe_configs([ConfigResource("topic", topic)])
            for fut in res.values():
                entries = fut.result(timeout=10)
                policy = entries.get("cleanup.policy")
                if policy is not None and policy.value and "compact" in policy.value:
                    cleanup = CleanupPolicy.COMPACT
        except KafkaException as exc:
            raise _translate(exc, f"describe configs of {topic}") from exc
        spec = TopicSpec(topic, len(tmd.partitions), cleanup)
        self._specs[topic] = spec
        return spec

    def list_topics(self) -> list[str]:
        try:
            md = self._admin.list_topics(timeout=10)
        except KafkaException as exc:
            raise _translate(exc, "list topics") from exc
        return sorted(t for t in md.topics if not t.startswith("__"))

    # -- writes ----------------------------------------------------------------------------
    def submit(self, records: Sequence[Record]) -> Future[list[LogPosition]]:
        self._check_open()
        fut: Future[list[LogPosition]] = Future()
        if not records:
            fut.set_result([])
            return fut
        routed = []
        for r in records:
            spec = self.describe(r.topic)
            if r.partition is not None and not 0 <= r.partition < spec.partitions:
                raise InvalidRecord(f"partition {r.partition} out of range for {r.topic!r}")
            if spec.cleanup is CleanupPolicy.COMPACT and r.key is None:
                raise InvalidRecord(f"compacted topic {r.topic!r} needs a key on every record")
            p = r.partition if r.partition is not None else default_partition(
                r.key, spec.partitions)
            routed.append((r, p))
        delivery = _Delivery([r.topic for r in records], fut, self._note)
        for i, (r, p) in enumerate(routed):
            kwargs: dict[str, Any] = {"partition": p, "on_delivery": delivery.callback(i)}
            if r.timestamp_ms is not None:
                kwargs["timestamp"] = r.timestamp_ms
            if r.headers:
                kwargs["headers"] = list(r.headers)
            while True:
                try:
                    self._producer.produce(r.topic, r.value, r.key, **kwargs)
                    break
                except BufferError:
                    self._producer.poll(0.01)  # local queue full: let deliveries drain
                except KafkaException as exc:
                    raise _translate(exc, f"produce to {r.topic}") from exc
        self._producer.poll(0)
        return fut

    # -- reads -----------------------------------------------------------------------------
    def read(
        self, topic: str, partition: int, offset: int, max_records: int = 500,
        timeout_s: float = 0.0,
    ) -> list[StoredRecord]:
        self._check_open()
        spec = self.describe(topic)
        if not 0 <= partition < spec.partitions:
            raise InvalidRecord(f"partition {partition} out of range for {topic!r}")
        # Data known to exist: wait for the fetch; otherwise wait only as long as asked.
        # What this client produced or read already proves data exists without a broker
        # round trip (a watermark query costs a fetch-wait, ~150 ms on Tansu, per call).
        with self._seen_lock:
            known_end = self._seen.get((topic, partition), -1) + 1
        if offset >= known_end and timeout_s <= 0:
            known_end = self._partition_end(topic, partition)
        wait = max(timeout_s, _FETCH_WAIT_S if offset < known_end else 0.0)
        if wait <= 0:
            return []
        with self._reader_lock:
            if self._reader is None:
                self._reader = self._consumer(None)
            c = self._reader
            try:
                c.assign([TopicPartition(topic, partition, max(offset, 0))])
                msgs = _consume(c, max_records, wait)
            except KafkaException as exc:
                raise _translate(exc, f"read {topic}[{partition}]") from exc
        out = []
        for m in msgs:
            error = _message_error(m, f"read {topic}[{partition}]")
            if error is not None:
                raise error
            out.append(_stored(m))
        if out:
            self._note(topic, partition, out[-1].offset)
        return out

    def _watermarks(self, topic: str) -> dict[int, tuple[int, int]]:
        spec = self.describe(topic)
        with self._reader_lock:
            if self._reader is None:
                self._reader = self._consumer(None)
            try:
                return {
                    p: self._reader.get_watermark_offsets(
                        TopicPartition(topic, p), timeout=10, cached=False)
                    for p in range(spec.partitions)
                }
            except KafkaException as exc:
                raise _translate(exc, f"watermarks of {topic}") from exc

    def _partition_end(self, topic: str, partition: int) -> int:
        with self._reader_lock:
            if self._reader is None:
                self._reader = self._consumer(None)
            try:
                _lo, hi = self._reader.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=10, cached=False)
            except KafkaException as exc:
                raise _translate(exc, f"watermarks of {topic}[{partition}]") from exc
        with self._seen_lock:
            return max(int(hi), self._seen.get((topic, partition), -1) + 1)

    def end_offsets(self, topic: str) -> dict[int, int]:
        wm = self._watermarks(topic)
        with self._seen_lock:
            return {p: max(hi, self._seen.get((topic, p), -1) + 1) for p, (_lo, hi) in wm.items()}

    def start_offsets(self, topic: str) -> dict[int, int]:
        return {p: lo for p, (lo, _hi) in self._watermarks(topic).items()}

    def subscribe(
        self, topics: Sequence[str], group: str | None = None, *, from_start: bool = True
    ) -> Subscription:
        return _KafkaSubscription(self, topics, group, from_start)

    # -- groups ----------------------------------------------------------------------------
    def _group_client(self, group: str) -> Consumer:
        c = self._group_clients.get(group)
        if c is None:
            c = self._group_clients[group] = self._consumer(group)
        return c

    def commit(self, group: str, offsets: Mapping[tuple[str, int], int]) -> None:
        self._check_open()
        tps = [TopicPartition(t, p, off) for (t, p), off in offsets.items()]
        with self._reader_lock:
            try:
                res = self._group_client(group).commit(offsets=tps, asynchronous=False)
            except KafkaException as exc:
                raise _translate(exc, f"commit for {group}") from exc
        for tp in res or []:
            if tp.error is not None:
                raise TransportError(f"commit for {group}: {tp.error}")

    def committed(self, group: str, topic: str) -> dict[int, int]:
        spec = self.describe(topic)
        with self._reader_lock:
            try:
                res = self._group_client(group).committed(
                    [TopicPartition(topic, p) for p in range(spec.partitions)], timeout=10)
            except KafkaException as exc:
                raise _translate(exc, f"committed of {group}") from exc
        return {tp.partition: tp.offset for tp in res if tp.offset >= 0}

    # -- lifecycle -------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise LogClosed("log is closed")

    def close(self) -> None:
        if self._closed:
            return
        self._producer.flush(30)
        self._closed = True
        self._poller.join(timeout=5)
        with self._reader_lock:
            for c in [self._reader, *self._group_clients.values()]:
                if c is not None:
                    c.close()
            self._reader = None
            self._group_clients.clear()
        # Destroy the librdkafka handles now, not at garbage collection: a handle that
        # outlives its broker keeps reconnecting and logging to stderr.
        self._producer.close()
        del self._admin


class _KafkaSubscription(PositionTracking):
    """Every partition of ``topics`` assigned to one consumer; no group membership."""

    _log: KafkaLog

    def __init__(
        self, log: KafkaLog, topics: Sequence[str], group: str | None, from_start: bool
    ) -> None:
        self._log = log
        self._group = group
        self._consumer = log._consumer(group)
        self._pos: dict[tuple[str, int], int] = {}
        for topic in topics:
            committed = log.committed(group, topic) if group else {}
            # Explicit offsets, resolved now: OFFSET_END would be resolved at the first
            # fetch and skip whatever is appended in between.
            base = log.start_offsets(topic) if from_start else log.end_offsets(topic)
            for p, off in base.items():
                self._pos[(topic, p)] = committed.get(p, off)
        assign = [TopicPartition(t, p, o) for (t, p), o in self._pos.items()]
        self._consumer.assign(assign)

    def poll(self, max_records: int = 500, timeout_s: float = 0.0) -> list[StoredRecord]:
        try:
            msgs = _consume(self._consumer, max_records, timeout_s)
        except KafkaException as exc:
            raise _translate(exc, "poll") from exc
        out = []
        for m in msgs:
            error = _message_error(m, "poll")
            if error is not None:
                raise error
            rec = _stored(m)
            self._pos[(rec.topic, rec.partition)] = rec.offset + 1
            self._log._note(rec.topic, rec.partition, rec.offset)
            out.append(rec)
        return out

    def seek(self, topic: str, partition: int, offset: int) -> None:
        super().seek(topic, partition, offset)
        # Re-assigning is valid in every consumer state (seek is not, before the first fetch).
        self._consumer.assign([TopicPartition(t, p, o) for (t, p), o in self._pos.items()])

    def close(self) -> None:
        self._consumer.close()
