"""The embedded log: Kafka's log semantics on one RocksDB database (rocksdict).

Durability (``Durability``):

* ``SYNC``: each ``submit`` call is one RocksDB write batch written with ``sync=True`` in
  the caller's thread; the call returns after the fsync of its own batch.
* ``GROUP`` (default): calls are queued to one writer thread that takes everything queued,
  writes it as one batch with ``sync=True`` and then resolves every call's future: while one
  fsync runs, the next batch gathers (leader/follower group commit, as RocksDB and
  PostgreSQL do). ``group_commit_ms > 0`` additionally waits that long for more calls
  before each write (PostgreSQL's ``commit_delay``): more throughput, more latency.
* ``NONE``: batches are written without fsync. Survives a process crash (the data is in
  the OS page cache and RocksDB's WAL) but not a power loss. For tests and benchmarks.

In every mode a record is readable only after its batch was written, and offsets,
end-offset markers and retained-size counters go into the same atomic batch as the
records, so a crash never leaves a position that disagrees with the data.
"""

from __future__ import annotations

import enum
import json
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from rocksdict import Options, Rdict, ReadOptions, WriteBatch, WriteOptions

from streams.log import codec
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
    now_ms,
)

__all__ = ["CleanerReport", "Durability", "EmbeddedLog"]

MAX_RECORD_BYTES = 8 * 1024 * 1024


class Durability(enum.StrEnum):
    SYNC = "sync"
    GROUP = "group"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class _Topic:
    id: int
    spec: TopicSpec


@dataclass(slots=True)
class _Pending:
    records: Sequence[Record]
    future: Future[list[LogPosition]]


@dataclass(frozen=True, slots=True)
class CleanerReport:
    """What one cleaner pass removed, per topic: records deleted by compaction (superseded
    values and expired tombstones) and by retention (time or size)."""

    compacted: dict[str, int]
    expired: dict[str, int]


def _spec_to_json(spec: TopicSpec, topic_id: int) -> bytes:
    return json.dumps(
        {
            "id": topic_id,
            "partitions": spec.partitions,
            "cleanup": spec.cleanup.value,
            "retention_ms": spec.retention_ms,
            "retention_bytes": spec.retention_bytes,
            "tombstone_retention_ms": spec.tombstone_retention_ms,
        }
    ).encode()


class EmbeddedLog(Log):
    """A durable, single-process log in one RocksDB directory. See the module docstring
    for what is durable when. Two processes cannot open the same directory (RocksDB's
    LOCK file); the second gets :class:`TransportError`."""

    def __init__(
        self,
        path: str | Path,
        *,
        durability: Durability | str = Durability.GROUP,
        group_commit_ms: float = 0.0,
        max_batch_records: int = 10_000,
        cleaner_interval_s: float | None = None,
    ) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.durability = Durability(durability)
        self.group_commit_ms = group_commit_ms
        self.max_batch_records = max_batch_records
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        try:
            self._db = Rdict(str(self.path), opts)
        except Exception as exc:  # rocksdict raises plain Exception on open errors
            raise TransportError(f"cannot open embedded log at {self.path}: {exc}") from exc
        self._wo = WriteOptions()
        self._wo.sync = self.durability is not Durability.NONE
        self._meta_lock = threading.Lock()  # topics, commits, cleaner
        self._write_lock = threading.Lock()  # offset assignment + batch write
        self._appended = threading.Condition()
        self._topics: dict[str, _Topic] = {}
        self._by_id: dict[int, _Topic] = {}
        self._end: dict[tuple[int, int], int] = {}
        self._size: dict[tuple[int, int], int] = {}
        self._closed = False
        self._load()
        self._queue: list[_Pending] = []
        self._queue_cv = threading.Condition()
        self._writer: threading.Thread | None = None
        if self.durability is not Durability.SYNC:
            self._writer = threading.Thread(
                target=self._writer_loop, name="embedded-log-writer", daemon=True
            )
            self._writer.start()
        self._cleaner_stop = threading.Event()
        self._cleaner: threading.Thread | None = None
        if cleaner_interval_s:
            self._cleaner = threading.Thread(
                target=self._cleaner_loop, args=(cleaner_interval_s,), daemon=True,
                name="embedded-log-cleaner",
            )
            self._cleaner.start()

    # -- state rebuilt from disk ---------------------------------------------------------
    def _load(self) -> None:
        for k, v in self._items(b"T", None):
            if not k.startswith(b"T"):
                break
            meta = json.loads(v)
            spec = TopicSpec(
                name=k[1:].decode(),
                partitions=meta["partitions"],
                cleanup=CleanupPolicy(meta["cleanup"]),
                retention_ms=meta["retention_ms"],
                retention_bytes=meta["retention_bytes"],
                tombstone_retention_ms=meta["tombstone_retention_ms"],
            )
            t = _Topic(meta["id"], spec)
            self._topics[spec.name] = t
            self._by_id[t.id] = t
            for p in range(spec.partitions):
                e = self._db.get(codec.end_key(t.id, p))
                z = self._db.get(codec.size_key(t.id, p))
                self._end[(t.id, p)] = codec.U64.unpack(e)[0] if e else 0
                self._size[(t.id, p)] = codec.U64.unpack(z)[0] if z else 0

    def _items(self, start: bytes, ro: ReadOptions | None) -> Iterator[tuple[bytes, bytes]]:
        """Raw-mode iteration (rocksdict's stubs type keys and values as any scalar)."""
        it = self._db.items(from_key=start, read_opt=ro) if ro else self._db.items(from_key=start)
        return cast(Iterator[tuple[bytes, bytes]], iter(it))

    # -- topics --------------------------------------------------------------------------
    def create_topic(self, spec: TopicSpec) -> None:
        self._check_open()
        with self._meta_lock:
            existing = self._topics.get(spec.name)
            if existing is not None:
                old = existing.spec
                if old.partitions != spec.partitions or old.cleanup != spec.cleanup:
                    raise TopicConflict(
                        f"topic {spec.name!r} exists with {old.partitions} partitions and "
                        f"cleanup={old.cleanup}; asked for {spec.partitions}/{spec.cleanup}"
                    )
                return
            topic_id = max(self._by_id, default=0) + 1
            self._db.put(codec.topic_key(spec.name), _spec_to_json(spec, topic_id), self._wo)
            t = _Topic(topic_id, spec)
            for p in range(spec.partitions):
                self._end[(topic_id, p)] = 0
                self._size[(topic_id, p)] = 0
            self._by_id[topic_id] = t
            self._topics[spec.name] = t

    def describe(self, topic: str) -> TopicSpec:
        return self._topic(topic).spec

    def list_topics(self) -> list[str]:
        return sorted(self._topics)

    def _topic(self, name: str) -> _Topic:
        t = self._topics.get(name)
        if t is None:
            raise TopicNotFound(name)
        return t

    # -- writes --------------------------------------------------------------------------
    def submit(self, records: Sequence[Record]) -> Future[list[LogPosition]]:
        self._check_open()
        fut: Future[list[LogPosition]] = Future()
        if not records:
            fut.set_result([])
            return fut
        self._validate(records)
        if self.durability is Durability.SYNC:
            with self._write_lock:
                try:
                    fut.set_result(self._write([records])[0])
                except BaseException as exc:
                    fut.set_exception(exc)
            self._notify()
            return fut
        with self._queue_cv:
            if self._closed:
                raise LogClosed("log is closed")
            self._queue.append(_Pending(records, fut))
            self._queue_cv.notify()
        return fut

    def _validate(self, records: Sequence[Record]) -> None:
        for r in records:
            t = self._topic(r.topic)
            if r.partition is not None and not 0 <= r.partition < t.spec.partitions:
                raise InvalidRecord(
                    f"partition {r.partition} out of range for {r.topic!r} "
                    f"({t.spec.partitions} partitions)"
                )
            if t.spec.cleanup is CleanupPolicy.COMPACT and r.key is None:
                raise InvalidRecord(f"compacted topic {r.topic!r} needs a key on every record")
            size = len(r.key or b"") + len(r.value or b"")
            if size > MAX_RECORD_BYTES:
                raise InvalidRecord(f"record of {size} bytes exceeds {MAX_RECORD_BYTES}")

    def _write(self, calls: Sequence[Sequence[Record]]) -> list[list[LogPosition]]:
        """Assign offsets to ``calls`` and write them as one atomic batch (caller holds
        ``_write_lock``). In-memory end offsets advance only after the write succeeded."""
        wb = WriteBatch(raw_mode=True)
        end = dict[tuple[int, int], int]()
        size = dict[tuple[int, int], int]()
        out: list[list[LogPosition]] = []
        now = now_ms()
        for records in calls:
            positions = []
            for r in records:
                t = self._topics[r.topic]
                p = r.partition
                if p is None:
                    p = default_partition(r.key, t.spec.partitions)
                tp = (t.id, p)
                off = end.get(tp)
                if off is None:
                    off = self._end[tp]
                raw = codec.encode_record(
                    r.key, r.value, now if r.timestamp_ms is None else r.timestamp_ms, r.headers
                )
                wb.put(codec.record_key(t.id, p, off), raw)
                end[tp] = off + 1
                size[tp] = size.get(tp, self._size[tp]) + len(raw)
                positions.append(LogPosition(r.topic, p, off))
            out.append(positions)
        for tp, off in end.items():
            wb.put(codec.end_key(*tp), codec.U64.pack(off))
            wb.put(codec.size_key(*tp), codec.U64.pack(size[tp]))
        try:
            self._db.write(wb, self._wo)
        except Exception as exc:
            raise TransportError(f"embedded log write failed: {exc}") from exc
        self._end.update(end)
        self._size.update(size)
        return out

    def _writer_loop(self) -> None:
        while True:
            with self._queue_cv:
                while not self._queue and not self._closed:
                    self._queue_cv.wait()
                if not self._queue and self._closed:
                    return
            if self.group_commit_ms > 0:
                time.sleep(self.group_commit_ms / 1000)
            with self._queue_cv:
                i, n = 0, 0
                while i < len(self._queue) and n < self.max_batch_records:
                    n += len(self._queue[i].records)
                    i += 1
                batch = self._queue[:i]
                del self._queue[:i]
            self._commit_batch(batch)

    def _commit_batch(self, batch: list[_Pending]) -> None:
        with self._write_lock:
            try:
                results = self._write([p.records for p in batch])
            except BaseException as exc:
                for p in batch:
                    p.future.set_exception(exc)
                return
        self._notify()
        for p, positions in zip(batch, results, strict=True):
            p.future.set_result(positions)

    def _notify(self) -> None:
        with self._appended:
            self._appended.notify_all()

    # -- reads ---------------------------------------------------------------------------
    def read(
        self, topic: str, partition: int, offset: int, max_records: int = 500,
        timeout_s: float = 0.0,
    ) -> list[StoredRecord]:
        self._check_open()
        t = self._topic(topic)
        if not 0 <= partition < t.spec.partitions:
            raise InvalidRecord(f"partition {partition} out of range for {topic!r}")
        tp = (t.id, partition)
        if timeout_s > 0 and self._end[tp] <= offset:
            deadline = time.monotonic() + timeout_s
            with self._appended:
                while self._end[tp] <= offset and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._appended.wait(left)
        return self._scan(t, partition, max(offset, 0), max_records)

    def _scan(self, t: _Topic, partition: int, offset: int, limit: int) -> list[StoredRecord]:
        ro = ReadOptions()
        ro.set_iterate_upper_bound(codec.partition_prefix(t.id, partition + 1))
        out: list[StoredRecord] = []
        name = t.spec.name
        decode = codec.decode_record
        for k, raw in self._items(codec.record_key(t.id, partition, offset), ro):
            key, value, ts, headers = decode(raw)
            out.append(
                StoredRecord(name, partition, codec.offset_of(k), key, value, ts, headers)
            )
            if len(out) >= limit:
                break
        return out

    def end_offsets(self, topic: str) -> dict[int, int]:
        t = self._topic(topic)
        return {p: self._end[(t.id, p)] for p in range(t.spec.partitions)}

    def start_offsets(self, topic: str) -> dict[int, int]:
        t = self._topic(topic)
        out = {}
        for p in range(t.spec.partitions):
            first = self._scan_keys(t, p, 0, 1)
            out[p] = first[0] if first else self._end[(t.id, p)]
        return out

    def _scan_keys(self, t: _Topic, partition: int, offset: int, limit: int) -> list[int]:
        ro = ReadOptions()
        ro.set_iterate_upper_bound(codec.partition_prefix(t.id, partition + 1))
        out = []
        for k in self._db.keys(from_key=codec.record_key(t.id, partition, offset), read_opt=ro):
            out.append(codec.offset_of(cast(bytes, k)))
            if len(out) >= limit:
                break
        return out

    def wait_for_data(self, timeout_s: float, since: Mapping[tuple[str, int], int]) -> bool:
        """Block until some partition in ``since`` has data at or after its offset."""
        deadline = time.monotonic() + timeout_s

        def ready() -> bool:
            return any(
                self._end[(self._topics[tp[0]].id, tp[1])] > off for tp, off in since.items()
            )

        with self._appended:
            while not ready():
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return False
                self._appended.wait(left)
            return True

    def subscribe(
        self, topics: Sequence[str], group: str | None = None, *, from_start: bool = True
    ) -> Subscription:
        from streams.log.subscription import PollingSubscription

        return PollingSubscription(self, topics, group, from_start=from_start)

    # -- groups --------------------------------------------------------------------------
    def commit(self, group: str, offsets: Mapping[tuple[str, int], int]) -> None:
        self._check_open()
        wb = WriteBatch(raw_mode=True)
        for (topic, p), off in offsets.items():
            t = self._topic(topic)
            wb.put(codec.committed_key(group, t.id, p), codec.U64.pack(off))
        with self._meta_lock:
            self._db.write(wb, self._wo)

    def committed(self, group: str, topic: str) -> dict[int, int]:
        t = self._topic(topic)
        out = {}
        for p in range(t.spec.partitions):
            v = self._db.get(codec.committed_key(group, t.id, p))
            if v is not None:
                out[p] = codec.U64.unpack(v)[0]
        return out

    # -- cleaner: compaction and retention ----------------------------------------------
    def run_cleaner(self, now: int | None = None) -> CleanerReport:
        """One pass over every topic: compact ``compact`` topics (keep the latest record
        per key; drop tombstones older than ``tombstone_retention_ms``) and apply time/size
        retention to ``delete`` topics. Offsets never change; readers see gaps."""
        now = now_ms() if now is None else now
        compacted: dict[str, int] = defaultdict(int)
        expired: dict[str, int] = defaultdict(int)
        for t in list(self._topics.values()):
            for p in range(t.spec.partitions):
                with self._meta_lock:
                    if t.spec.cleanup is CleanupPolicy.COMPACT:
                        compacted[t.spec.name] += self._compact(t, p, now)
                    else:
                        expired[t.spec.name] += self._expire(t, p, now)
        return CleanerReport(dict(compacted), dict(expired))

    def _compact(self, t: _Topic, p: int, now: int) -> int:
        tp = (t.id, p)
        dirty_end = self._end[tp]
        latest: dict[bytes | None, int] = {}
        records = self._iter_partition(t, p, dirty_end)
        for off, key, _value, _ts, _raw_len in records:
            latest[key] = off
        horizon = now - t.spec.tombstone_retention_ms
        doomed = [
            (off, raw_len)
            for off, key, value, ts, raw_len in records
            if latest[key] != off or (value is None and ts < horizon)
        ]
        return self._delete(t, p, doomed)

    def _expire(self, t: _Topic, p: int, now: int) -> int:
        spec = t.spec
        tp = (t.id, p)
        doomed: list[tuple[int, int]] = []
        size = self._size[tp]
        for off, _key, _value, ts, raw_len in self._iter_partition(t, p, self._end[tp]):
            too_old = spec.retention_ms is not None and ts < now - spec.retention_ms
            too_big = spec.retention_bytes is not None and size > spec.retention_bytes
            if not (too_old or too_big):
                break
            doomed.append((off, raw_len))
            size -= raw_len
        return self._delete(t, p, doomed)

    def _iter_partition(
        self, t: _Topic, p: int, end: int
    ) -> list[tuple[int, bytes | None, bytes | None, int, int]]:
        ro = ReadOptions()
        ro.set_iterate_upper_bound(codec.record_key(t.id, p, end))
        out = []
        for k, raw in self._items(codec.record_key(t.id, p, 0), ro):
            key, value, ts, _h = codec.decode_record(raw)
            out.append((codec.offset_of(k), key, value, ts, len(raw)))
        return out

    def _delete(self, t: _Topic, p: int, doomed: list[tuple[int, int]]) -> int:
        if not doomed:
            return 0
        tp = (t.id, p)
        with self._write_lock:  # the size counter is shared with appends
            wb = WriteBatch(raw_mode=True)
            freed = 0
            for off, raw_len in doomed:
                wb.delete(codec.record_key(t.id, p, off))
                freed += raw_len
            size = max(0, self._size[tp] - freed)
            wb.put(codec.size_key(*tp), codec.U64.pack(size))
            self._db.write(wb, self._wo)
            self._size[tp] = size
        return len(doomed)

    def _cleaner_loop(self, interval_s: float) -> None:
        while not self._cleaner_stop.wait(interval_s):
            if self._closed:
                return
            self.run_cleaner()

    def retained_bytes(self, topic: str) -> dict[int, int]:
        t = self._topic(topic)
        return {p: self._size[(t.id, p)] for p in range(t.spec.partitions)}

    # -- lifecycle -----------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise LogClosed("log is closed")

    def close(self) -> None:
        if self._closed:
            return
        with self._queue_cv:
            self._closed = True
            self._queue_cv.notify_all()
        if self._writer is not None:
            self._writer.join()
        self._cleaner_stop.set()
        if self._cleaner is not None:
            self._cleaner.join(timeout=5)
        self._notify()
        with self._meta_lock, self._write_lock:
            self._db.close()
