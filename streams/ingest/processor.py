"""The embedder processor: ``documents`` -> chunks -> embeddings -> ``vectors``.

One thread reads ``documents`` from the positions in its own RocksDB state
(:class:`IngestState`), a batch of up to ``batch_sources`` records at a time, and for
each Source: validates it, chunks it, embeds the chunks (through one
:class:`streams.embed.resilient.EmbedQueue` per embedder: batching, bounded concurrency,
retries with backoff), asks the vectorizer what to do with each chunk, and builds
the VectorRecords: an upsert ``{source_id}#{chunk_no}`` per chunk and a delete for every
chunk id of the previous version beyond the new chunk count. A tombstone deletes all of
a Source's chunks.

Commit order of one batch (what makes a crash lose nothing and embed nothing twice):

1. write the batch's :class:`Outcome` (its records, the Sources done, the positions
   reached) to the state as an intent;
2. append the records to ``vectors`` (and dead letters to ``dlq``); durable on return;
3. commit the Sources done and the positions, deleting the intent, in one write batch.

On start an intent left by a crash is finished by repeating steps 2 and 3 with the stored
records, so a chunk embedded before the crash is not embedded again; a crash before step
1 loses only the embedding work of the batch in flight, which is redone. Records appended
twice (a crash between 2 and 3) carry the same ids and bytes, so the index ends the same.

Step 2 goes through the query node's service when the processor is given one (``writer``,
as ``open_ingest`` wires it): :meth:`VectorService.append_versioned` appends under the
chunk ids' locks and remembers each id's newest version and position until the node has
applied it. The capacity manager's housekeeping (expiry, archive, promotion, which act on
the copy the node has applied) then never deletes or rewrites a chunk over a newer one
the processor has appended but the node not yet applied. (Chosen over having the manager
skip indexes whose processor is ahead of the node: that check and the manager's append
would still race the processor's next append without a lock they share.)

Held chunks (smart vectorization): a chunk whose decision carries ``defer`` (a medium/low
Queue) is not appended with its batch. Its encoded record is held in the state, put in the
same write batch as the position of its Source (step 3), so a crash neither loses nor
doubles it. Held chunks are appended later, lowest priority value first (critical, high,
medium, low), FIFO within one, in a release batch of their own (steps 1-3 with no
position): all of them once the processor is idle (no ``documents`` record for
``hold_idle_ms``), and under continuous load those held longer than ``hold_max_age_ms``
and, in priority order, those beyond ``hold_max_pending`` (nothing waits forever). A newer
version or a tombstone of a Source releases its held chunks without appending them
(superseded) before it is built, so a stale chunk is never appended after a newer one.
``processed`` does not pass a Source whose chunks are still held, so a ``session`` query
with its token (and ``strong``) waits until its held chunks are appended too.

Poison Sources are data: one that does not decode, does not validate (empty, oversized,
bad meta), names an index that does not exist or has no embedder, is older than the
version already done, or whose embedding still fails after the last retry goes to ``dlq``
with its error; the stream goes on. A Source whose version is already done is skipped.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from streams.dlq import DeadLetterQueue, decode_or_dead_letter
from streams.embed import Embedder, EmbedderError
from streams.embed.resilient import Embedded, EmbedQueue, RetryPolicy
from streams.exceptions import StreamvecError
from streams.index.exceptions import InvalidRequest, NotFound, VersionConflict
from streams.ingest.catalog import Embedders, IndexCatalog
from streams.ingest.chunker import Chunk, Chunker
from streams.ingest.decision import IndexNow, VectorizeContext, Vectorizer
from streams.ingest.source import Source, source_from_avro
from streams.ingest.state import Held, IngestState, Outcome, SourceDone
from streams.log.port import Log, LogPosition, Record, StoredRecord, Subscription, now_ms
from streams.schemas import catalog
from streams.schemas.codec import AvroCodec
from streams.service.applied import AppliedPositions
from streams.topics import Topics

__all__ = ["ChunkWriter", "EmbedderProcessor", "EmbeddingFailed", "ProcessorStats", "chunk_tags"]

log = logging.getLogger(__name__)

PROCESSOR = "embedder"


class EmbeddingFailed(StreamvecError):
    """The provider still failed after the last retry (the Source goes to ``dlq``)."""

    code = "VEC_ERR_INTERNAL"

    def __init__(self, message: str, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


class ChunkWriter(Protocol):
    """Where step 2 appends (``VectorService.append_versioned``): ``versions[i]`` is the
    version in ``records[i]`` (0 for a delete); durable on return, positions in order."""

    def append_versioned(
        self, records: Sequence[Record], versions: Sequence[int]
    ) -> list[LogPosition]: ...


@dataclass
class ProcessorStats:
    sources: int = 0
    chunks_embedded: int = 0
    tombstones: int = 0
    skipped_done: int = 0
    dead_letters: int = 0
    batches: int = 0
    recovered_intents: int = 0
    held_chunks: int = 0  # chunks held back by a deferred (medium/low Queue) decision
    released_chunks: int = 0  # held chunks appended later
    superseded_chunks: int = 0  # held chunks dropped: a newer version or a tombstone
    # held chunks now, per priority (replaced, never mutated: read from other threads)
    pending: dict[str, int] = field(default_factory=dict)


_PRIORITIES = ("critical", "high", "medium", "low")


def _pending_counts(held: dict[str, dict[int, Held]]) -> dict[str, int]:
    out = dict.fromkeys(_PRIORITIES, 0)
    for chunks in held.values():
        for h in chunks.values():
            name = _PRIORITIES[h.priority] if 0 <= h.priority < len(_PRIORITIES) else "low"
            out[name] += 1
    return out


def chunk_tags(source: Source) -> tuple[str, ...]:
    """The filter tags of a Source's chunks (declared by text indexes)."""
    tags = [f"source_type:{source.type.value}"]
    if source.channel_id:
        tags.append(f"channel_id:{source.channel_id}")
    if source.user_id:
        tags.append(f"user_id:{source.user_id}")
    return tuple(tags)


@dataclass
class _Work:
    """One record of a batch: a Source between chunking and building its records, or a
    tombstone (``source is None``)."""

    rec: StoredRecord
    key: str
    source: Source | None = None
    embedder: Embedder | None = None
    chunks: list[Chunk] = field(default_factory=list)
    vectors: npt.NDArray[np.float32] | None = None
    error: StreamvecError | None = None
    attempts: int = 1


class EmbedderProcessor:
    """See the module docstring. ``start``/``stop`` run it on a thread; ``run_once``
    processes one batch (tests). ``processed`` tracks the ``documents`` positions done
    (their records durable in ``vectors``); ``appended`` the ``vectors`` positions the
    processor has written (a reader that waits for both sees a Source's chunks)."""

    def __init__(
        self,
        log: Log,
        topics: Topics,
        codec: AvroCodec,
        dlq: DeadLetterQueue,
        state: IngestState,
        catalog_: IndexCatalog,
        *,
        embedders: Embedders | None = None,
        chunker: Chunker | None = None,
        vectorizer: Vectorizer | None = None,
        batch_sources: int = 32,
        attempts: int = 3,
        backoff_s: float = 0.05,
        embed_batch: int = 64,
        max_in_flight: int = 2,
        hold_idle_ms: int = 50,
        hold_max_age_ms: int = 5_000,
        hold_max_pending: int = 10_000,
        release_batch: int = 512,
        writer: ChunkWriter | None = None,
    ) -> None:
        self.log = log
        self.writer = writer  # None: straight to the log (no node in this process)
        self.topics = topics
        self.codec = codec
        # chunk records are built here field by field from the schema: skip the per-record
        # validation pass (a third of the encode cost, profiled)
        self._writer = AvroCodec(codec.registry, validate=False)
        self.dlq = dlq
        self.state = state
        self.catalog = catalog_
        self.embedders = embedders or Embedders()
        self.chunker = chunker or Chunker()
        self.vectorizer: Vectorizer = vectorizer or IndexNow()
        self.batch_sources = batch_sources
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.embed_batch = embed_batch
        self.max_in_flight = max_in_flight
        if hold_idle_ms < 0 or hold_max_age_ms < 0 or hold_max_pending < 0 or release_batch < 1:
            raise InvalidRequest("hold limits must be >= 0 and release_batch >= 1")
        self.hold_idle_ms = hold_idle_ms
        self.hold_max_age_ms = hold_max_age_ms
        self.hold_max_pending = hold_max_pending
        self.release_batch = release_batch
        self._queues: dict[int, EmbedQueue] = {}
        self.stats = ProcessorStats()
        # held chunks by Source key and chunk number (mirrors the state's H keys)
        self._held: dict[str, dict[int, Held]] = {}
        self._committed = state.positions()
        self._last_source_ms = now_ms()
        self._load_held()
        self.processed = AppliedPositions(self._visible())
        self.appended = AppliedPositions()
        self.error: BaseException | None = None
        self._vsubject = catalog.subject_for(topics.vectors)
        self._vschema = catalog.load_schema(catalog.TOPIC_VALUE_SCHEMA["vectors"])
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sub: Subscription | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def open(self) -> EmbedderProcessor:
        """Finish an intent left by a crash, then subscribe from the committed positions."""
        intent = self.state.intent()
        if intent is not None:
            self._finish(intent)
            self.stats.recovered_intents += 1
        self._load_held()
        # Everything appended before this start counts as the processor's output.
        self.appended.advance(
            {
                (self.topics.vectors, p): end
                for p, end in self.log.end_offsets(self.topics.vectors).items()
            },
            caught_up=True,
        )
        sub = self.log.subscribe([self.topics.documents])
        for (t, p), off in self.state.positions().items():
            if t == self.topics.documents:
                sub.seek(t, p, off)
        self._sub = sub
        # the committed positions, held back to the first Source with a held chunk (not
        # the subscription's: those pass the held Sources)
        self.processed.advance(self._visible(), caught_up=False)
        return self

    def start(self) -> EmbedderProcessor:
        if self._sub is None:
            self.open()
        self._thread = threading.Thread(target=self._run, name="embedder", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Graceful: the batch in flight is finished and committed, then the thread ends."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._sub is not None:
            self._sub.close()
        for q in self._queues.values():
            q.close(drain=True)
        self.embedders.close()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.run_once(timeout_s=0.05)
        except BaseException as exc:  # reported on health; never silently
            log.exception("embedder processor stopped")
            self.error = exc

    # -- one batch ------------------------------------------------------------------------
    def run_once(self, timeout_s: float = 0.0) -> int:
        """Process one batch of ``documents`` (waiting up to ``timeout_s`` for the first
        record); returns the number of records read."""
        assert self._sub is not None, "open() first"
        recs = self._sub.poll(self.batch_sources, timeout_s)
        if not recs:
            self._release(idle=now_ms() - self._last_source_ms >= self.hold_idle_ms)
            self.processed.advance({}, caught_up=True)
            return 0
        self._last_source_ms = now_ms()
        self._release(idle=False)
        decoded = decode_or_dead_letter(recs, self.codec, self.dlq, processor=PROCESSOR)
        outcome = Outcome(positions=self._sub.positions())
        versions: dict[bytes | None, int] = {}  # record key -> version of its last upsert
        planned: dict[str, int] = {}  # key -> version planned in this batch (0: tombstone)
        work: list[_Work] = []
        for rec, value in decoded:
            try:
                w = self._plan(rec, value, planned)
            except StreamvecError as exc:
                self._dead_letter(rec, exc)
                continue
            if w is not None:
                work.append(w)
        self._embed([w for w in work if w.source is not None])
        for w in work:  # in log order, so a tombstone after an update wins, and the reverse
            if w.error is not None:
                self._dead_letter(w.rec, w.error, w.attempts)
                continue
            try:
                self._build(w, outcome, versions)  # appends nothing when it raises
            except StreamvecError as exc:
                self._dead_letter(w.rec, exc)
        self._finish(outcome, versions)
        self.stats.batches += 1
        return len(recs)

    def _dead_letter(self, rec: StoredRecord, exc: StreamvecError, attempts: int = 1) -> None:
        self.dlq.send(rec, exc, exc.code, processor=PROCESSOR, attempts=attempts)
        self.stats.dead_letters += 1

    def _plan(
        self, rec: StoredRecord, value: dict[str, Any] | None, planned: dict[str, int]
    ) -> _Work | None:
        key = (rec.key or b"").decode("utf-8", "replace")
        if value is None:
            _split_key(key)
            planned[key] = 0
            return _Work(rec, key)
        try:
            source = source_from_avro(value)
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRequest(f"not a Source: {exc}") from None
        if source.key != key:
            raise InvalidRequest(f"record key {key!r} does not match {source.key!r}", field="key")
        source.validate()
        if key in planned:
            done = planned[key]
        else:
            prev = self.state.source(key)
            done = prev.version if prev is not None else 0
        if source.version == done:
            self.stats.skipped_done += 1  # already embedded and appended (a replay)
            return None
        if source.version < done:
            raise VersionConflict(source.id, source.version, done)
        config = self.catalog.config(source.index_key)
        if config is None and self.catalog.sync(10.0):  # the indexes topic may lag behind
            config = self.catalog.config(source.index_key)
        if config is None:
            raise NotFound(f"index {source.index_key} does not exist")
        if config.embedder is None:
            raise InvalidRequest(
                f"index {source.index_key} has no embedder (create it with EMBEDDER)", field="index"
            )
        try:
            embedder = self.embedders.get(config.embedder)
        except EmbedderError as exc:
            raise InvalidRequest(str(exc), field="embedder") from None
        if embedder.dim != config.dim:
            raise InvalidRequest(
                f"embedder {config.embedder} has dim {embedder.dim}, index "
                f"{source.index_key} has {config.dim}",
                field="embedder",
            )
        chunks = self.chunker.chunk(source, embedder)
        if not chunks:
            raise InvalidRequest("no tokens to embed", field="text")
        planned[key] = source.version
        return _Work(rec, key, source, embedder, chunks)

    def _queue(self, embedder: Embedder) -> EmbedQueue:
        found = self._queues.get(id(embedder))
        if found is None:
            found = self._queues[id(embedder)] = EmbedQueue(
                embedder,
                max_batch=self.embed_batch,
                max_wait_s=0.001,  # a batch's texts are submitted together, in a tight loop
                max_in_flight=self.max_in_flight,
                policy=RetryPolicy(max_attempts=self.attempts, base_delay_s=self.backoff_s),
            )
        return found

    def _embed(self, work: list[_Work]) -> None:
        """Every chunk of the batch through the embedder's :class:`EmbedQueue` (batching,
        bounded concurrency, retries with backoff, a failing batch split so that a poison
        text fails alone); a Source with a chunk that still failed gets its error."""
        futures = [
            [self._queue(w.embedder).submit(c.text) for c in w.chunks]
            for w in work
            if w.embedder is not None
        ]
        for w, fs in zip(work, futures, strict=True):
            rows: list[npt.NDArray[np.float32]] = []
            for f in fs:
                outcome = f.result()
                if isinstance(outcome, Embedded):
                    rows.append(outcome.vector)
                elif w.error is None:
                    assert w.embedder is not None
                    w.error = EmbeddingFailed(
                        f"embedder {w.embedder.name} failed after {outcome.attempts} "
                        f"attempt(s): {outcome.error}",
                        outcome.attempts,
                    )
                    w.attempts = outcome.attempts
            if w.error is None:
                w.vectors = np.stack(rows).astype(np.float32, copy=False)

    def _build(self, w: _Work, outcome: Outcome, versions: dict[bytes | None, int]) -> None:
        """Append ``w``'s records to ``outcome`` (after those of earlier records), each
        upsert's version to ``versions``."""
        prev = outcome.sources[w.key] if w.key in outcome.sources else self.state.source(w.key)
        old = prev.chunks if prev is not None else 0
        self._supersede(w.key, outcome)
        s = w.source
        if s is None:  # tombstone
            tenant, index, source_id = _split_key(w.key)
            for n in range(old):
                outcome.records.append(self._delete(tenant, index, f"{source_id}#{n}"))
            outcome.sources[w.key] = None
            self.stats.tombstones += 1
            return
        assert w.vectors is not None
        config = self.catalog.config(s.index_key)
        if config is None:
            raise NotFound(f"index {s.index_key} disappeared")
        context = VectorizeContext(config, s, len(w.chunks))
        tags = chunk_tags(s)
        base = {
            "source_id": s.id,
            "source_type": s.type.value,
            "channel_id": s.channel_id,
            "user_id": s.user_id,
            "title": s.title,
            "uri": s.uri,
            "source_version": s.version,
            "source_meta": json.loads(s.meta) if s.meta else None,
        }
        ts = now_ms()
        for chunk, vector in zip(w.chunks, w.vectors, strict=True):
            decision = self.vectorizer.decide(chunk, vector, context)
            if not decision.index:
                outcome.records.append(self._delete(s.tenant, s.index, chunk.id))
                continue
            meta: dict[str, Any] = {
                **base,
                "text": chunk.text,
                "chunk": {"chunk_no": chunk.chunk_no, "start": chunk.start, "end": chunk.end},
            }
            if decision.text_only:
                meta["text_only"] = True
            if decision.fields:  # the vectorizer's decision and reasons
                meta.update(decision.fields)
            value = self._writer.encode(
                self._vsubject,
                self._vschema,
                {
                    "tenant": s.tenant,
                    "index": s.index,
                    "id": chunk.id,
                    "vector": np.asarray(vector, "<f4").tobytes(),
                    "dtype": "fp32",
                    "meta": json.dumps(meta, separators=(",", ":")),
                    "tags": list(tags),
                    "numeric": {},
                    "version": s.version,
                    "source_id": s.id,
                    "chunk": {
                        "source_id": s.id,
                        "chunk_no": chunk.chunk_no,
                        "start": chunk.start,
                        "end": chunk.end,
                    },
                    "ttl_ms": decision.ttl_ms,
                    "timestamp": ts,
                },
            )
            record = Record.of(
                self.topics.vectors, f"{s.index_key}/{chunk.id}", value, timestamp_ms=ts
            )
            if decision.defer is not None:
                r = w.rec
                outcome.held[(w.key, chunk.chunk_no)] = Held(
                    w.key,
                    chunk.chunk_no,
                    decision.defer,
                    s.version,
                    record,
                    ts,
                    (r.topic, r.partition, r.offset),
                )
                continue
            outcome.records.append(record)
            versions[record.key] = s.version
        for n in range(len(w.chunks), old):
            outcome.records.append(self._delete(s.tenant, s.index, f"{s.id}#{n}"))
        outcome.sources[w.key] = SourceDone(s.version, len(w.chunks))
        self.stats.sources += 1
        self.stats.chunks_embedded += len(w.chunks)

    def _delete(self, tenant: str, index: str, id: str) -> Record:
        return Record.of(self.topics.vectors, f"{tenant}/{index}/{id}", None)

    def _finish(self, outcome: Outcome, versions: Mapping[bytes | None, int] | None = None) -> None:
        """Steps 1-3 of the module docstring (``versions``: record key -> the version of
        its last upsert in ``outcome``; None: read from the records, for an intent)."""
        if outcome.records:
            self.state.write_intent(outcome)  # 1
            positions = self._append(outcome.records, versions)  # 2
            reached: dict[tuple[str, int], int] = {}
            for pos in positions:
                tp = (pos.topic, pos.partition)
                reached[tp] = max(reached.get(tp, 0), pos.offset + 1)
            self.appended.advance(reached, caught_up=False)
        self.state.commit(outcome)  # 3
        self._committed.update(outcome.positions)
        if outcome.held or outcome.released:
            for key, n in outcome.released:
                chunks = self._held.get(key)
                if chunks is not None:
                    chunks.pop(n, None)
                    if not chunks:
                        del self._held[key]
            for h in outcome.held.values():
                self._held.setdefault(h.key, {})[h.chunk_no] = h
            self.stats.held_chunks += len(outcome.held)
            self.stats.pending = _pending_counts(self._held)
        self.processed.advance(self._visible(), caught_up=False)

    def _append(
        self, records: list[Record], versions: Mapping[bytes | None, int] | None
    ) -> list[LogPosition]:
        """Step 2: through ``writer`` when there is one, else straight to the log."""
        if self.writer is None:
            return self.log.append_batch(records)
        if versions is None:  # an intent left by a crash (once per start)
            versions = {
                r.key: int(self.codec.decode(r.value)[1]["version"])
                for r in records
                if r.value is not None
            }
        return self.writer.append_versioned(
            records, [0 if r.value is None else versions[r.key] for r in records]
        )

    # -- held chunks ----------------------------------------------------------------------
    def _load_held(self) -> None:
        self._held = {}
        for h in self.state.held():
            self._held.setdefault(h.key, {})[h.chunk_no] = h
        self.stats.pending = _pending_counts(self._held)

    def _visible(self) -> dict[tuple[str, int], int]:
        """The committed positions, held back to the first Source with a held chunk."""
        out = dict(self._committed)
        for chunks in self._held.values():
            for h in chunks.values():
                t, p, off = h.position
                if off < out.get((t, p), 0):
                    out[(t, p)] = off
        return out

    def _supersede(self, key: str, outcome: Outcome) -> None:
        """A newer version or a tombstone of ``key`` is built: its held chunks (committed,
        or held earlier in this batch) are dropped, never appended."""
        for k in [k for k in outcome.held if k[0] == key]:
            del outcome.held[k]
        dropped = [(key, n) for n in self._held.get(key, {}) if (key, n) not in outcome.released]
        outcome.released.update(dropped)
        self.stats.superseded_chunks += len(dropped)

    def _release(self, *, idle: bool) -> None:
        """Append held chunks in one release batch each (up to ``release_batch``): all of
        them when ``idle``, else those older than ``hold_max_age_ms`` and, by priority,
        those beyond ``hold_max_pending``."""
        if not idle:  # the common case under load: nothing due, no sort
            cutoff = now_ms() - self.hold_max_age_ms
            count = sum(len(chunks) for chunks in self._held.values())
            if count <= self.hold_max_pending and all(
                h.held_ms > cutoff for chunks in self._held.values() for h in chunks.values()
            ):
                return
        while self._held:
            held = sorted(
                (h for chunks in self._held.values() for h in chunks.values()),
                key=lambda h: (h.priority, h.held_ms, h.key, h.chunk_no),
            )
            if idle:
                due = held
            else:
                cutoff = now_ms() - self.hold_max_age_ms
                excess = len(held) - self.hold_max_pending
                due = [h for i, h in enumerate(held) if i < excess or h.held_ms <= cutoff]
            due = due[: self.release_batch]
            if not due:
                return
            outcome = Outcome()
            versions: dict[bytes | None, int] = {}
            for h in due:
                done = self.state.source(h.key)
                if done is not None and done.version == h.version:  # else stale: drop it
                    outcome.records.append(h.record)
                    versions[h.record.key] = h.version
                    self.stats.released_chunks += 1
                else:
                    self.stats.superseded_chunks += 1
                outcome.released.add((h.key, h.chunk_no))
            self._finish(outcome, versions)


def _split_key(key: str) -> tuple[str, str, str]:
    tenant, _, rest = key.partition("/")
    index, _, source_id = rest.partition("/")
    if not tenant or not index or not source_id:
        raise InvalidRequest(f"documents key {key!r} is not tenant/index/source_id", field="key")
    return tenant, index, source_id
