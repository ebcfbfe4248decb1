"""The indexer: applies the ``indexes`` and ``vectors`` topics to the node's state.

One applier thread owns every mutation: it polls ``indexes`` then ``vectors``, decodes
(poison records go to the dead-letter topic with their error; the stream goes on),
applies each record to the in-memory :class:`VectorIndex` and to a :class:`StateBatch`,
and commits the batch together with the positions it reaches. Sealing and merging are
begun and finished by this thread; the FAISS builds run on a background executor, so
neither writes nor searches wait for them.

A record at (partition p, offset o) gets the label ``p << 40 | o``: labels are derived
from the log, so a replay rebuilds the very same labels.

A :class:`ChangeListener` (the L0 result cache's invalidator) is told every upsert and
delete once the :class:`VectorIndex` has taken it, and that the batch is applied after its
state commit and before its positions advance (also when the batch fails midway, for what
the index took): a search that waits for a position finds derived caches up to date with
it. Catching up on ``indexes`` in the middle of a ``vectors`` batch reports early, before
that batch's state commit; the search path tolerates that (it never caches a result whose
payload join missed a row).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from streams.dlq import DeadLetterQueue, decode_or_dead_letter
from streams.exceptions import StreamvecError
from streams.index.exceptions import InvalidRequest, NotFound
from streams.index.model import (
    Dtype,
    FieldKind,
    FilterField,
    IndexConfig,
    Metric,
    Vector,
    VectorUpsert,
)
from streams.index.vector_index import VectorIndex
from streams.log.port import Log, StoredRecord, Subscription
from streams.schemas.codec import AvroCodec
from streams.service.applied import AppliedPositions
from streams.service.state import Entry, StateBatch, StateStore
from streams.topics import Topics

__all__ = ["ChangeListener", "Indexer", "config_from_avro", "label_of", "vector_from_avro"]

log = logging.getLogger(__name__)

PARTITION_SHIFT = 40


def label_of(partition: int, offset: int) -> int:
    return (partition << PARTITION_SHIFT) | offset


def config_from_avro(d: dict[str, Any]) -> IndexConfig:
    created = d.get("created_ms", 0)
    if not isinstance(created, int):  # timestamp-millis decodes as datetime
        created = int(created.timestamp() * 1000)
    return IndexConfig(
        tenant=d["tenant"], index=d["index"], dim=d["dim"], metric=Metric(d["metric"]),
        dtype=Dtype(d["dtype"]), recipe=d["recipe"], version=d["version"], created_ms=created,
        fields=tuple(FilterField(f["name"], FieldKind(f["type"]))
                     for f in d.get("filter_fields") or []),
    )


def vector_from_avro(raw: bytes, dtype: str, dim: int) -> Vector:
    """Vector bytes as written on the topic (fp32 or fp16 little-endian) -> float32."""
    if dtype == "fp16":
        if len(raw) != 2 * dim:
            raise InvalidRequest(f"fp16 vector of {len(raw)} bytes, expected {2 * dim}",
                                 field="vector")
        return np.frombuffer(raw, dtype="<f2").astype(np.float32)
    if dtype != "fp32":
        raise InvalidRequest(f"vector dtype {dtype} cannot be written, use fp32 or fp16",
                             field="dtype")
    if len(raw) % 4:
        raise InvalidRequest("fp32 vector bytes must be a multiple of 4", field="vector")
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


class ChangeListener(Protocol):
    """Told what the applier changed (applier thread, under ``Indexer.lock``)."""

    def upserted(self, index_key: str, id: str, vector: Vector, tags: Sequence[str],
                 numeric: Mapping[str, float]) -> None:
        """``id`` now has this vector (a new id, or an update of an existing one)."""

    def deleted(self, index_key: str, id: str) -> None:
        """``id`` (which existed) is gone."""

    def reset(self, index_key: str) -> None:
        """The index was created, recreated or dropped."""

    def applied(self) -> None:
        """Everything reported so far is in the index (and, but for the early report of
        the module docstring, in the state); positions advance only after this returns."""


@dataclass
class _Builds:
    """Seal/merge jobs in flight per index (at most one of each)."""

    seal: dict[str, tuple[Any, Future[Any]]] = field(default_factory=dict)
    merge: dict[str, tuple[Any, Future[Any]]] = field(default_factory=dict)


class Indexer:
    def __init__(
        self,
        log: Log,
        topics: Topics,
        codec: AvroCodec,
        dlq: DeadLetterQueue,
        state: StateStore,
        indexes: dict[str, VectorIndex],
        applied: AppliedPositions,
        *,
        head_capacity: int = 20_000,
        batch_records: int = 2000,
        listener: ChangeListener | None = None,
    ) -> None:
        self.log = log
        self.topics = topics
        self.codec = codec
        self.dlq = dlq
        self.state = state
        self.indexes = indexes
        self.configs: dict[str, IndexConfig] = {k: v.config for k, v in indexes.items()}
        self.applied = applied
        self.head_capacity = head_capacity
        self.batch_records = batch_records
        self.listener = listener
        # Held while a batch is applied; a snapshot takes it to see state, indexes and
        # positions that agree.
        self.lock = threading.RLock()
        self._builder = ThreadPoolExecutor(1, thread_name_prefix="segment-builder")
        self._builds = _Builds()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._subs: list[Subscription] = []
        self.error: BaseException | None = None
        self.applied_records = 0

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        start = self.applied.snapshot()
        for topic in (self.topics.indexes, self.topics.vectors):
            sub = self.log.subscribe([topic])
            for (t, p), off in start.items():
                if t == topic:
                    sub.seek(t, p, off)
            self._subs.append(sub)
        self._thread = threading.Thread(target=self._run, name="indexer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        for sub in self._subs:
            sub.close()
        self._builder.shutdown(wait=True, cancel_futures=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.run_once(timeout_s=0.05)
        except BaseException as exc:  # the node reports it on health; never silently
            log.exception("indexer stopped")
            self.error = exc

    # -- one step -------------------------------------------------------------------------
    def run_once(self, timeout_s: float = 0.0) -> int:
        """Apply what is available (waiting up to ``timeout_s`` for vectors); returns the
        number of records applied."""
        self._finish_builds()
        n = 0
        idx_sub, vec_sub = self._subs
        recs = idx_sub.poll(self.batch_records, 0)
        if recs:
            n += self._apply(recs, idx_sub)
        recs = vec_sub.poll(self.batch_records, timeout_s)
        if recs:
            n += self._apply(recs, vec_sub)
        else:
            self.applied.advance({}, caught_up=True)
        self._start_builds()
        return n

    def _apply(self, recs: list[StoredRecord], sub: Subscription) -> int:
        decoded = decode_or_dead_letter(recs, self.codec, self.dlq, processor="indexer")
        with self.lock:
            batch = StateBatch()
            try:
                for rec, value in decoded:
                    try:
                        if rec.topic == self.topics.indexes:
                            self._apply_index(rec, value, batch)
                        else:
                            self._apply_vector(rec, value, batch)
                    except StreamvecError as exc:
                        self.dlq.send(rec, exc, exc.code, processor="indexer")
                for (t, p), off in sub.positions().items():
                    batch.advance(t, p, off)
                self.state.commit(batch)
            finally:  # the index took these changes, whether or not the batch completes
                if self.listener is not None:
                    self.listener.applied()
            self.applied.advance(batch.positions, caught_up=False)
            self.applied_records += len(recs)
        return len(recs)

    def _catch_up_indexes(self) -> None:
        idx_sub = self._subs[0]
        while recs := idx_sub.poll(self.batch_records, 0):
            self._apply(recs, idx_sub)

    def _apply_index(
        self, rec: StoredRecord, value: dict[str, Any] | None, batch: StateBatch
    ) -> None:
        key = (rec.key or b"").decode()
        if value is None:
            self._drop_index(key, batch)
            return
        config = config_from_avro(value)
        if config.key != key:
            raise InvalidRequest(f"record key {key!r} does not match {config.key!r}", field="key")
        old = self.configs.get(key)
        if old is not None:
            if (old.dim, old.metric, old.dtype, old.recipe) != (
                config.dim, config.metric, config.dtype, config.recipe,
            ):
                raise InvalidRequest(
                    f"index {key} exists with another dim/metric/dtype/recipe", field="index")
            # Only the filter-field allow-list may change; the VectorIndex keeps its columns.
            self.indexes[key].config = config
        else:
            self.indexes[key] = VectorIndex(config, head_capacity=self.head_capacity)
            if self.listener is not None:
                self.listener.reset(key)
        self.configs[key] = config
        batch.put_config(config)

    def _drop_index(self, key: str, batch: StateBatch) -> None:
        self.indexes.pop(key, None)
        self.configs.pop(key, None)
        if self.listener is not None:
            self.listener.reset(key)
        for id, entry in list(self.state.entries(key)):
            batch.delete_entry(key, id, entry)
        batch._wb.delete(b"I" + key.encode())

    def _apply_vector(
        self, rec: StoredRecord, value: dict[str, Any] | None, batch: StateBatch
    ) -> None:
        key = (rec.key or b"").decode()
        tenant, _, rest = key.partition("/")
        index, _, id = rest.partition("/")
        index_key = f"{tenant}/{index}"
        vi = self.indexes.get(index_key)
        if vi is None:
            # Its IndexConfig may have landed on `indexes` after this loop polled it: the
            # two topics are not ordered against each other, so catch up before refusing.
            self._catch_up_indexes()
            vi = self.indexes.get(index_key)
        if vi is None:
            raise NotFound(f"index {index_key} does not exist")
        old = batch.entry(self.state, index_key, id)
        if value is None:
            if old is not None:
                vi.delete(old.label)
                batch.delete_entry(index_key, id, old)
                if self.listener is not None:
                    self.listener.deleted(index_key, id)
            return
        if (value["tenant"], value["index"], value["id"]) != (tenant, index, id):
            raise InvalidRequest(f"record key {key!r} does not match its value", field="key")
        config = self.configs[index_key]
        vec = vector_from_avro(value["vector"], value["dtype"], config.dim)
        upsert = VectorUpsert(
            tenant, index, id, vec, value.get("meta"), tuple(value.get("tags") or ()),
            dict(value.get("numeric") or {}), int(value["version"]),
        ).validate(config)
        label = label_of(rec.partition, rec.offset)
        if old is not None:
            vi.delete(old.label)
        vi.upsert(label, upsert.vector, upsert.tags, upsert.numeric)
        if self.listener is not None:
            self.listener.upserted(index_key, id, upsert.vector, upsert.tags, upsert.numeric)
        entry = Entry(label, upsert.version, upsert.vector, upsert.meta, upsert.tags,
                      dict(upsert.numeric), rec.position.token)
        batch.put_entry(index_key, id, entry, old)

    # -- background seal and merge ----------------------------------------------------
    def _start_builds(self) -> None:
        with self.lock:
            for key, vi in self.indexes.items():
                if key not in self._builds.seal and vi.needs_seal():
                    job = vi.begin_seal()
                    if job is not None:
                        self._builds.seal[key] = (job, self._builder.submit(job.build))
                if key not in self._builds.merge and key not in self._builds.seal:
                    mjob = vi.begin_merge()
                    if mjob is not None:
                        self._builds.merge[key] = (mjob, self._builder.submit(mjob.build))

    def _finish_builds(self) -> None:
        with self.lock:
            for kind, jobs in (("seal", self._builds.seal), ("merge", self._builds.merge)):
                for key, (job, fut) in list(jobs.items()):
                    if not fut.done():
                        continue
                    del jobs[key]
                    fut.result()  # a failed build stops the indexer loudly (see _run)
                    vi = self.indexes.get(key)
                    if vi is None:
                        continue
                    if kind == "seal":
                        vi.finish_seal(job)
                    else:
                        vi.finish_merge(job)

    def drain_builds(self, timeout_s: float = 60.0) -> None:
        """Wait for in-flight seal/merge builds and install them (tests, snapshots)."""
        deadline = time.monotonic() + timeout_s
        while (self._builds.seal or self._builds.merge) and time.monotonic() < deadline:
            for _job, fut in [*self._builds.seal.values(), *self._builds.merge.values()]:
                fut.result(max(0.0, deadline - time.monotonic()))
            self._finish_builds()
