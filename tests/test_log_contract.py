"""The log port's contract, run against every transport (``log`` is parametrized over the
embedded RocksDB log and Kafka on a real Tansu broker)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from streams.log.exceptions import InvalidRecord, TopicConflict, TopicNotFound
from streams.log.partitioner import default_partition
from streams.log.port import CleanupPolicy, Log, LogPosition, Record, TopicSpec

NewTopic = Callable[..., str]


def test_create_topic_is_idempotent_and_conflicts_on_other_shape(
    log: Log, new_topic: NewTopic
) -> None:
    name = new_topic(3, cleanup=CleanupPolicy.COMPACT)
    log.create_topic(TopicSpec(name, 3, CleanupPolicy.COMPACT))  # same spec: no-op
    with pytest.raises(TopicConflict):
        log.create_topic(TopicSpec(name, 2, CleanupPolicy.COMPACT))
    spec = log.describe(name)
    assert (spec.partitions, spec.cleanup) == (3, CleanupPolicy.COMPACT)
    assert name in log.list_topics()


def test_unknown_topic_is_refused(log: Log) -> None:
    with pytest.raises(TopicNotFound):
        log.append("no-such-topic-xyz", "k", b"v")


def test_append_returns_monotonic_offsets_and_read_returns_records_intact(
    log: Log, new_topic: NewTopic
) -> None:
    topic = new_topic(1)
    positions = [
        log.append(topic, f"k{i}", f"v{i}".encode(), [("h", f"{i}".encode())],
                   timestamp_ms=1_700_000_000_000 + i)
        for i in range(10)
    ]
    assert [p.offset for p in positions] == list(range(10))
    got = log.read(topic, 0, 0, max_records=100, timeout_s=5)
    assert [(r.offset, r.key, r.value, r.headers, r.timestamp_ms) for r in got] == [
        (i, f"k{i}".encode(), f"v{i}".encode(), (("h", f"{i}".encode()),),
         1_700_000_000_000 + i)
        for i in range(10)
    ]
    mid = log.read(topic, 0, 7, timeout_s=5)
    assert [r.offset for r in mid] == [7, 8, 9]
    assert log.end_offsets(topic) == {0: 10}
    assert log.start_offsets(topic) == {0: 0}


def test_tombstones_and_null_keys_round_trip(log: Log, new_topic: NewTopic) -> None:
    topic = new_topic(1)
    log.append(topic, "k", None)
    log.append(topic, None, b"v")
    got = log.read(topic, 0, 0, timeout_s=5)
    assert [(r.key, r.value, r.is_tombstone) for r in got] == [
        (b"k", None, True), (None, b"v", False)]


def test_key_partitioning_is_murmur2_and_stable(log: Log, new_topic: NewTopic) -> None:
    topic = new_topic(4)
    keys = [f"tenant/index/{i}" for i in range(40)]
    positions = log.append_batch([Record.of(topic, k, b"x") for k in keys])
    for k, pos in zip(keys, positions, strict=True):
        assert pos.partition == default_partition(k.encode(), 4)
    again = log.append(topic, keys[0], b"y")
    assert again.partition == positions[0].partition


def test_batch_keeps_call_order_with_consecutive_offsets(log: Log, new_topic: NewTopic) -> None:
    topic = new_topic(2)
    log.append(topic, "a", b"0", partition=1)
    batch = [Record.of(topic, "a", str(i).encode(), partition=1) for i in range(1, 50)]
    positions = log.append_batch(batch)
    assert [p.offset for p in positions] == list(range(1, 50))
    got = log.read(topic, 1, 0, max_records=100, timeout_s=5)
    assert [r.value for r in got] == [str(i).encode() for i in range(50)]


def test_invalid_records_are_refused_and_nothing_is_appended(
    log: Log, new_topic: NewTopic
) -> None:
    topic = new_topic(2)
    compacted = new_topic(1, cleanup=CleanupPolicy.COMPACT)
    with pytest.raises(InvalidRecord):
        log.append(topic, "k", b"v", partition=5)
    with pytest.raises(InvalidRecord):
        log.append(compacted, None, b"v")
    with pytest.raises(InvalidRecord):  # one bad record refuses the whole batch
        log.append_batch([Record.of(compacted, "ok", b"1"), Record.of(compacted, None, b"2")])
    assert log.end_offsets(topic) == {0: 0, 1: 0}
    assert log.end_offsets(compacted) == {0: 0}


def test_committed_offsets_are_per_group(log: Log, new_topic: NewTopic) -> None:
    topic = new_topic(2)
    assert log.committed("g1", topic) == {}
    log.commit("g1", {(topic, 0): 5, (topic, 1): 7})
    log.commit("g2", {(topic, 0): 1})
    assert log.committed("g1", topic) == {0: 5, 1: 7}
    assert log.committed("g2", topic) == {0: 1}
    log.commit("g1", {(topic, 0): 6})
    assert log.committed("g1", topic) == {0: 6, 1: 7}


def _drain(sub_poll: Callable[..., list], want: int, timeout_s: float = 10) -> list:  # type: ignore[type-arg]
    out: list = []  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout_s
    while len(out) < want and time.monotonic() < deadline:
        out += sub_poll(max_records=1000, timeout_s=0.5)
    return out


def test_subscription_reads_every_partition_and_resumes_from_commit(
    log: Log, new_topic: NewTopic
) -> None:
    topic = new_topic(3)
    log.append_batch([Record.of(topic, f"k{i}", str(i).encode()) for i in range(30)])
    with log.subscribe([topic], group="readers") as sub:
        got = _drain(sub.poll, 30)
        assert sorted(int(r.value) for r in got) == list(range(30))
        assert sum(sub.positions().values()) == 30
        sub.commit()
    log.append_batch([Record.of(topic, f"k{i}", str(i).encode()) for i in range(30, 40)])
    with log.subscribe([topic], group="readers") as sub:
        got = _drain(sub.poll, 10)
        assert sorted(int(r.value) for r in got) == list(range(30, 40))


def test_subscription_from_end_sees_only_new_records(log: Log, new_topic: NewTopic) -> None:
    topic = new_topic(2)
    log.append(topic, "old", b"old")
    with log.subscribe([topic], from_start=False) as sub:
        log.append(topic, "new", b"new")
        got = _drain(sub.poll, 1)
        assert [r.value for r in got] == [b"new"]


def test_blocked_reader_wakes_up_on_append(log: Log, new_topic: NewTopic) -> None:
    topic = new_topic(1)
    got: list[bytes | None] = []
    with log.subscribe([topic]) as sub:
        def reader() -> None:
            got.extend(r.value for r in sub.poll(timeout_s=20))

        t = threading.Thread(target=reader)
        t.start()
        time.sleep(0.2)
        log.append(topic, "k", b"wake")
        t.join(25)
    assert got == [b"wake"]


def test_seek_rereads(log: Log, new_topic: NewTopic) -> None:
    topic = new_topic(1)
    log.append_batch([Record.of(topic, "k", bytes([i])) for i in range(5)])
    with log.subscribe([topic]) as sub:
        assert len(_drain(sub.poll, 5)) == 5
        sub.seek(topic, 0, 3)
        assert [r.offset for r in _drain(sub.poll, 2)] == [3, 4]


def test_position_tokens_round_trip() -> None:
    pos = LogPosition("streamvec.vectors", 3, 42)
    assert LogPosition.parse(pos.token) == pos
    with pytest.raises(ValueError):
        LogPosition.parse("garbage")
