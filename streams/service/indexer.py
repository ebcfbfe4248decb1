"""The indexer: applies the ``indexes`` and ``vectors`` topics to the node's state.

One applier thread owns every mutation: it polls ``indexes`` then ``vectors``, decodes
(poison records go to the dead-letter topic with their error; the stream goes on),
applies each record to the in-memory :class:`VectorIndex` and to a :class:`StateBatch`,
and commits the batch together with the positions it reaches. Sealing and merging are
begun and finished by this thread; the FAISS builds run on a background executor, so
neither writes nor searches wait for them.

A record at (partition p, offset o) gets the label ``p << 40 | o``: labels are derived
from the log, so a replay rebuilds the very same labels.

A poll is applied as a batch: each record is decoded, checked and staged one by one (a bad
record goes to the dead-letter topic alone), its state change goes into the batch's one
:class:`StateBatch`, and the Head adds of each index are stacked and taken in one
:meth:`VectorIndex.upsert_many` at the end of the batch, followed by the staged deletes of
replaced or deleted rows (so a search during the batch finds the old copy, never both: a
new row's payload is joined only once the state commit has landed). A row replaced within
the same batch never reaches the index. The deletes are applied after the batch's state
commit: between the adds and the commit a replaced row's new label is in the index but its
payload is not yet joinable, so its old copy must still be there.

Back-pressure: while a seal is building, the next Head keeps taking rows; once an index
holds ``max_unsealed_rows`` rows in fp32 Heads (live and frozen), the applier waits for the
seal before polling more vectors, which bounds the memory of a replay or a bulk load.

A :class:`ChangeListener` (the L0 result cache's invalidator) is told every upsert and
delete (in log order) once the :class:`VectorIndex` has taken it, and that the batch is
applied after its state commit and before its positions advance (also when the batch
fails midway, for what the index took): a search that waits for a position finds derived
caches up to date with it. Catching up on ``indexes`` in the middle of a ``vectors`` batch
reports early, before that batch's state commit; the search path tolerates that (it never
caches a result whose payload join missed a row).
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Protocol

import faiss
import numpy as np

from streams.dlq import DeadLetterQueue, decode_or_dead_letter
from streams.exceptions import StreamvecError
from streams.index.exceptions import InvalidRequest, NotFound
from streams.index.model import (
    CacheSettings,
    Dtype,
    FieldKind,
    FilterField,
    IndexConfig,
    IndexQuotas,
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
        quotas=IndexQuotas(**d["quotas"]) if d.get("quotas") else None,
        embedder=d.get("embedder"),
        cache=CacheSettings.from_avro(d.get("cache")),
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


def _millis(ts: Any) -> int:
    """A timestamp-millis field as decoded (an int, or a datetime) -> epoch milliseconds."""
    return ts if isinstance(ts, int) else int(ts.timestamp() * 1000)


def _text_only(meta: str | None) -> bool:
    """Whether a payload marks its record text-only (``"text_only": true``)."""
    if meta is None or '"text_only"' not in meta:  # cheap pre-check on the hot path
        return False
    try:
        parsed = json.loads(meta)
    except ValueError:
        return False
    return isinstance(parsed, dict) and parsed.get("text_only") is True


class ChangeListener(Protocol):
    """Told what the applier changed (applier thread, under ``Indexer.lock``). A listener
    may also define ``text_only(index_key, id)``: ``id`` is now a text-only record (in the
    state, not in the vector index); the keyword index uses it."""

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
class _Staged:
    """Index changes of one index staged by a batch (see the module docstring)."""

    vi: VectorIndex
    labels: list[int] = field(default_factory=list)
    vectors: list[Vector] = field(default_factory=list)
    tags: list[tuple[str, ...]] = field(default_factory=list)
    numeric: list[Mapping[str, float]] = field(default_factory=list)
    staged: set[int] = field(default_factory=set)  # labels staged in this batch
    dropped: set[int] = field(default_factory=set)  # staged labels replaced in the batch
    deletes: dict[int, None] = field(default_factory=dict)  # labels in the index, in order

    def delete(self, label: int) -> bool:
        """Stage the delete of ``label``; whether it was a live row (staged or indexed)."""
        if label in self.staged:
            if label in self.dropped:
                return False
            self.dropped.add(label)  # it never reaches the index
            return True
        if label not in self.deletes and label in self.vi:
            self.deletes[label] = None
            return True
        return False


@dataclass
class _Stage:
    """What one batch staged: per index, and the listener's events in log order."""

    indexes: dict[str, _Staged] = field(default_factory=dict)
    events: list[tuple[str, str, Any]] = field(default_factory=list)
    # the flushed deletes, applied once the batch's state commit has landed (_apply)
    deletes: list[tuple[VectorIndex, list[int]]] = field(default_factory=list)

    def index(self, key: str, vi: VectorIndex) -> _Staged:
        st = self.indexes.get(key)
        if st is None or st.vi is not vi:
            st = self.indexes[key] = _Staged(vi)
        return st


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
        max_unsealed_rows: int | None = None,
    ) -> None:
        self.log = log
        self.topics = topics
        self.codec = codec
        self.dlq = dlq
        self.state = state
        self.indexes = indexes
        self.configs: dict[str, IndexConfig] = {k: v.config for k, v in indexes.items()}
        for key, vi in indexes.items():
            self._wire(key, vi)
        self.applied = applied
        self.head_capacity = head_capacity
        self.batch_records = batch_records
        self.listener = listener
        # fp32 rows (about 1.5 KB each at 384 dims) an index may hold outside its segments
        # before the applier waits for its seal: 5 Heads' worth by default.
        self.max_unsealed_rows = max_unsealed_rows or 5 * head_capacity
        # Held while a batch is applied; a snapshot takes it to see state, indexes and
        # positions that agree.
        self.lock = threading.RLock()
        # OpenMP's thread count is per thread: a new thread starts from the process default
        # (all cores), not from what QueryNode set (faiss_threads). Without this a seal's
        # HNSW add spins up one OpenMP thread per core and starves the applier.
        self._builder = ThreadPoolExecutor(
            1, thread_name_prefix="segment-builder",
            initializer=faiss.omp_set_num_threads, initargs=(faiss.omp_get_max_threads(),))
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
        self._wait_for_seals()
        recs = vec_sub.poll(self.batch_records, timeout_s)
        if recs:
            n += self._apply(recs, vec_sub)
        else:
            self.applied.advance({}, caught_up=True)
        self._start_builds(idle=n == 0)
        return n

    def _wire(self, key: str, vi: VectorIndex) -> VectorIndex:
        """Give ``vi`` the state's fp32 vectors to re-rank quantised candidates with."""
        vi.exact = functools.partial(self.state.vectors_by_label, key)
        return vi

    def _wait_for_seals(self) -> None:
        """Back-pressure (module docstring): wait while an index has
        ``max_unsealed_rows`` unsealed rows and a seal of it is building."""
        while not self._stop.is_set():
            with self.lock:
                busy = [fut for key, (_job, fut) in self._builds.seal.items()
                        if (vi := self.indexes.get(key)) is not None
                        and vi.unsealed_rows >= self.max_unsealed_rows]
            if not busy:
                return
            wait(busy, timeout=0.05, return_when=FIRST_COMPLETED)
            self._finish_builds()
            self._start_builds()

    def _apply(self, recs: list[StoredRecord], sub: Subscription) -> int:
        """Apply one polled batch: state and positions in one write, Head adds stacked.

        Steps: 1. decode (undecodable records are dead-lettered first); 2. stage each
        record into the StateBatch and the per-index staging (a bad record is
        dead-lettered alone); 3. hand each index its staged rows, then its staged
        deletes, and tell the listener in log order; 4. commit state and positions in one
        RocksDB write; 5. tell the listener the batch is applied; 6. advance the
        positions searches wait for."""
        decoded = decode_or_dead_letter(recs, self.codec, self.dlq, processor="indexer")
        with self.lock:
            batch = StateBatch()
            stage = _Stage()
            try:
                for rec, value in decoded:
                    try:
                        if rec.topic == self.topics.indexes:
                            self._flush(stage)
                            self._apply_index(rec, value, batch)
                        else:
                            self._apply_vector(rec, value, batch, stage)
                    except StreamvecError as exc:
                        self.dlq.send(rec, exc, exc.code, processor="indexer")
                self._flush(stage)
                for (t, p), off in sub.positions().items():
                    batch.advance(t, p, off)
                self.state.commit(batch)
                # a replaced row's old copy leaves the index only now: until the commit its
                # new copy's payload is not joinable, so deleting the old one earlier made
                # the row briefly invisible to searches (found in session 6)
                for vi, labels in stage.deletes:
                    for label in labels:
                        vi.delete(label)
                stage.deletes.clear()
            finally:  # the index took these changes, whether or not the batch completes
                if self.listener is not None:
                    self.listener.applied()
            self.applied.advance(batch.positions, caught_up=False)
            self.applied_records += len(recs)
        return len(recs)

    def _flush(self, stage: _Stage) -> None:
        """Step 3 of :meth:`_apply`: the staged changes go into the indexes."""
        for st in stage.indexes.values():
            keep = [i for i, label in enumerate(st.labels) if label not in st.dropped]
            if keep:
                if len(keep) < len(st.labels):
                    st.labels = [st.labels[i] for i in keep]
                    st.vectors = [st.vectors[i] for i in keep]
                    st.tags = [st.tags[i] for i in keep]
                    st.numeric = [st.numeric[i] for i in keep]
                st.vi.upsert_many(np.asarray(st.labels, dtype=np.int64), np.stack(st.vectors),
                                  st.tags, st.numeric)
            if st.deletes:  # after the state commit: see _apply
                stage.deletes.append((st.vi, list(st.deletes)))
        stage.indexes.clear()
        if self.listener is not None:
            for kind, key, args in stage.events:
                if kind == "upserted":
                    self.listener.upserted(key, *args)
                elif kind == "text_only":  # optional hook (the keyword index listens)
                    hook = getattr(self.listener, "text_only", None)
                    if hook is not None:
                        hook(key, args)
                else:
                    self.listener.deleted(key, args)
        stage.events.clear()

    def _catch_up_indexes(self, stage: _Stage) -> None:
        self._flush(stage)
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
            self.indexes[key] = self._wire(
                key, VectorIndex(config, head_capacity=self.head_capacity))
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
        self, rec: StoredRecord, value: dict[str, Any] | None, batch: StateBatch,
        stage: _Stage,
    ) -> None:
        key = (rec.key or b"").decode()
        tenant, _, rest = key.partition("/")
        index, _, id = rest.partition("/")
        index_key = f"{tenant}/{index}"
        vi = self.indexes.get(index_key)
        if vi is None:
            # Its IndexConfig may have landed on `indexes` after this loop polled it: the
            # two topics are not ordered against each other, so catch up before refusing.
            self._catch_up_indexes(stage)
            vi = self.indexes.get(index_key)
        if vi is None:
            raise NotFound(f"index {index_key} does not exist")
        old = batch.entry(self.state, index_key, id)
        if value is None:
            if old is not None:
                stage.index(index_key, vi).delete(old.label)
                batch.delete_entry(index_key, id, old)
                stage.events.append(("deleted", index_key, id))
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
        st = stage.index(index_key, vi)
        was_indexed = old is not None and st.delete(old.label)
        if _text_only(upsert.meta):
            # streams.ingest.vectorize's TextOnly: kept in the state (payload, keyword
            # search) but not in the vector index, so no vector search returns it.
            if was_indexed:
                stage.events.append(("deleted", index_key, id))
            stage.events.append(("text_only", index_key, id))
        else:
            if label in st.staged:
                raise ValueError(f"label {label} staged twice")  # a bug: stop loudly
            st.staged.add(label)
            st.labels.append(label)
            st.vectors.append(upsert.vector)
            st.tags.append(upsert.tags)
            st.numeric.append(upsert.numeric)
            stage.events.append(
                ("upserted", index_key, (id, upsert.vector, upsert.tags, upsert.numeric)))
        ttl = value.get("ttl_ms")
        entry = Entry(label, upsert.version, upsert.vector, upsert.meta, upsert.tags,
                      dict(upsert.numeric), rec.position.token,
                      None if ttl is None else _millis(value["timestamp"]) + int(ttl))
        batch.put_entry(index_key, id, entry, old)

    # -- background seal and merge ----------------------------------------------------
    def _start_builds(self, idle: bool = False) -> None:
        with self.lock:
            for key, vi in self.indexes.items():
                if key not in self._builds.seal and vi.needs_seal():
                    job = vi.begin_seal()
                    if job is not None:
                        self._builds.seal[key] = (job, self._builder.submit(job.build))
                if key not in self._builds.merge and key not in self._builds.seal:
                    mjob = vi.begin_merge(idle)
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
