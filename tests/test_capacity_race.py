"""The capacity manager racing the embedder processor on a Source's chunk ids, on a real
query node, the real processor (as ``open_ingest`` wires it) and the real offline
embedder. The node lags the processor (its applier paused): the processor has appended a
newer version of ``s1#0`` that the node has not applied when a tick acts on the older
copy it scanned. The newer chunk is an acknowledged Source's: the tick's expiry must not
delete it and its promotion must not put the older copy back after it. Also: a
promotion keeps a Source chunk's version (a node-assigned ``stored + 1`` made the
Source's next version go down in ``vectors``), and a Source deleted and put again (its
chunks start again at version 1) is not mistaken for the copy scanned."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from streams.index.exceptions import Busy
from streams.index.model import Consistency, IndexConfig, VectorUpsert
from streams.ingest.chunker import Chunk
from streams.ingest.decision import Decision, VectorizeContext
from streams.ingest.service import IngestService, open_ingest
from streams.log.port import LogPosition, Record
from streams.schemas import catalog
from streams.service.api import SearchRequest
from tests.rigs import Rig
from tests.test_ingest_queue import copies, put, vectors, wait_for

FLEETING = "A fleeting note about the heron that waits in the reeds by the lake."
DURABLE = "The durable runbook: roll back the billing deploy before the deadline."
HOUR = 3_600_000


class FleetingIsTemporary:
    """The vectorizer hook: a chunk whose text says "fleeting" is a temporary vector
    (``ttl_ms``), any other is indexed for good."""

    def __init__(self, ttl_ms: int) -> None:
        self.ttl_ms = ttl_ms

    def decide(self, chunk: Chunk, vector: np.ndarray, context: VectorizeContext) -> Decision:
        return Decision(ttl_ms=self.ttl_ms) if "fleeting" in chunk.text else Decision()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path / "rig")
    yield r
    r.close()


def ingest(rig: Rig, tmp_path: Path, ttl_ms: int) -> IngestService:
    svc = open_ingest(rig.node, tmp_path / "ingest", vectorizer=FleetingIsTemporary(ttl_ms))
    svc.create_text_index("t", "kb", "wordllama", recipe="Flat")
    return svc


def applied(rig: Rig, svc: IngestService, token: str) -> None:
    """Wait until the processor has done the Source at ``token`` and the node has applied
    its chunks (without a search: a search hit makes the manager promote a temporary)."""
    pos = LogPosition.parse(token)
    assert svc.processor.processed.wait({(pos.topic, pos.partition): pos.offset + 1}, 20)
    assert rig.node.catch_up(20)


def last_record(rig: Rig, id: str) -> dict[str, object] | None:
    """The newest record of ``id`` in ``vectors`` (None: a delete)."""
    return [v for k, v in vectors(rig) if k == f"t/kb/{id}"][-1]


def assert_durable_v(rig: Rig, version: int) -> None:
    """``s1#0`` holds the DURABLE Source's chunk at ``version``, in the log and the state."""
    newest = last_record(rig, "s1#0")
    assert newest is not None, "the acknowledged chunk was deleted"
    assert newest["version"] == version and DURABLE in json.loads(str(newest["meta"]))["text"]
    entry = rig.node.state.entry("t/kb", "s1#0")
    assert entry is not None and entry.version == version and entry.expires_ms is None
    assert DURABLE in json.loads(entry.meta or "{}")["text"]


def test_an_expiry_behind_the_processor_keeps_its_newer_chunk(rig: Rig, tmp_path: Path) -> None:
    svc = ingest(rig, tmp_path, ttl_ms=1)
    try:
        applied(rig, svc, put(svc, "s1", FLEETING))  # v1: a temporary, its TTL passed
        config = rig.node.indexer.configs["t/kb"]
        with rig.node.indexer.lock:  # the node applies nothing meanwhile
            put(svc, "s1", DURABLE)  # v2: no TTL, appended by the processor
            wait_for(lambda: len(copies(rig, "s1#0")) == 2)
            actions = rig.node.capacity.tick_index(config)  # the tick sees v1, expired
        assert rig.node.catch_up(20)
        assert_durable_v(rig, 2)
        assert [v["version"] for v in copies(rig, "s1#0")] == [1, 2]
        assert [a.operation for a in actions] == []  # nothing expired: v1 is not the newest
    finally:
        svc.close()


def hit(rig: Rig, id: str) -> None:
    """A search that hits ``id`` (the manager promotes a temporary a search has hit)."""
    entry = rig.node.state.entry("t/kb", id)
    assert entry is not None
    req = SearchRequest("t", "kb", entry.vector, 1, None, Consistency.STRONG, (), 10_000)
    assert [h.id for h in rig.node.service.search(req).hits] == [id]


def test_a_promotion_behind_the_processor_writes_no_stale_copy(rig: Rig, tmp_path: Path) -> None:
    svc = ingest(rig, tmp_path, ttl_ms=HOUR)
    try:
        applied(rig, svc, put(svc, "s1", FLEETING))  # v1: a temporary
        hit(rig, "s1#0")
        config = rig.node.indexer.configs["t/kb"]
        with rig.node.indexer.lock:
            put(svc, "s1", DURABLE)  # v2
            wait_for(lambda: len(copies(rig, "s1#0")) == 2)
            actions = rig.node.capacity.tick_index(config)  # would promote v1
        assert rig.node.catch_up(20)
        assert_durable_v(rig, 2)
        assert [v["version"] for v in copies(rig, "s1#0")] == [1, 2]  # no v1 copy after v2
        assert [a.operation for a in actions] == []
    finally:
        svc.close()


def test_a_promoted_source_chunk_keeps_its_version_and_source_fields(
    rig: Rig, tmp_path: Path
) -> None:
    svc = ingest(rig, tmp_path, ttl_ms=HOUR)
    try:
        applied(rig, svc, put(svc, "s1", FLEETING))
        hit(rig, "s1#0")
        actions = rig.node.capacity.tick()
        assert [(a.operation, a.ids) for a in actions] == [("promote", ("s1#0",))]
        applied(rig, svc, put(svc, "s1", DURABLE))
        got = copies(rig, "s1#0")
        assert [v["version"] for v in got] == [1, 1, 2]  # never down
        assert [v["ttl_ms"] for v in got] == [HOUR, None, None]
        assert [v["source_id"] for v in got] == ["s1"] * 3
        assert got[1]["chunk"] == got[0]["chunk"]
        assert_durable_v(rig, 2)
    finally:
        svc.close()


def test_a_source_put_again_after_a_delete_is_not_the_copy_scanned(
    rig: Rig, tmp_path: Path
) -> None:
    """The same version is not the same copy: deleted and put again, ``s1``'s chunk is at
    version 1 again; an expiry of the first version 1 must leave it alone."""
    svc = ingest(rig, tmp_path, ttl_ms=1)
    try:
        applied(rig, svc, put(svc, "s1", FLEETING))  # v1, expired
        config = rig.node.indexer.configs["t/kb"]
        with rig.node.indexer.lock:
            svc.delete_source("t", "kb", "s1")
            wait_for(lambda: last_record(rig, "s1#0") is None)
            put(svc, "s1", DURABLE)  # v1 again, no TTL
            wait_for(lambda: len(copies(rig, "s1#0")) == 2)
            actions = rig.node.capacity.tick_index(config)
        assert rig.node.catch_up(20)
        assert_durable_v(rig, 1)
        assert [a.operation for a in actions] == []
    finally:
        svc.close()


def test_the_processors_versions_are_forgotten_once_applied(rig: Rig, tmp_path: Path) -> None:
    """The service remembers each chunk id the processor appended only until its indexer
    has applied it (the map does not grow with every chunk ever ingested)."""
    svc = ingest(rig, tmp_path, ttl_ms=HOUR)
    try:
        applied(rig, svc, put(svc, "s1", DURABLE))
        pending = rig.node.service._pending_versions  # the bookkeeping itself
        assert ("t/kb", "s1#0") in pending  # not swept yet: swept on the next append
        applied(rig, svc, put(svc, "s2", DURABLE))
        assert ("t/kb", "s1#0") not in pending
    finally:
        svc.close()


def test_the_services_own_writes_are_forgotten_once_applied(rig: Rig) -> None:
    """Upserts and deletes through the service are remembered (IF_VERSION, housekeeping)
    only until applied: 300 distinct ids leave no entry behind once the node has applied
    them and one more write sweeps."""
    service = rig.node.service
    service.create_index(IndexConfig("t", "plain", 4, recipe="Flat"))
    rng = np.random.default_rng(0)
    for i in range(200):
        service.upsert(VectorUpsert("t", "plain", f"u{i}", rng.standard_normal(4).astype("f4")))
    service.upsert_many([VectorUpsert("t", "plain", f"m{i}", rng.standard_normal(4).astype("f4"))
                         for i in range(100)])
    service.delete("t", "plain", "u0")
    assert len(service._pending_versions) > 0
    assert rig.node.catch_up(20)
    service.upsert(VectorUpsert("t", "plain", "last", rng.standard_normal(4).astype("f4")))
    assert set(service._pending_versions) <= {("t/plain", "last")}
    assert service.upsert(  # what it remembered still decides IF_VERSION
        VectorUpsert("t", "plain", "last", rng.standard_normal(4).astype("f4")), if_version=1)


def test_forgetting_applied_versions_never_waits_for_another_writers_stripe(rig: Rig) -> None:
    """The sweep before a write skips an entry whose stripe another writer holds (a
    durable append in progress) instead of waiting for it: a write of an id on another
    stripe goes through while that stripe is held."""
    service = rig.node.service
    service.create_index(IndexConfig("t", "plain", 4, recipe="Flat"))
    v = np.ones(4, dtype="f4")
    service.upsert(VectorUpsert("t", "plain", "a", v))
    assert rig.node.catch_up(20)  # "a" is applied: the next write's sweep visits it
    held = service._stripe("t/plain", "a")
    other = next(f"b{i}" for i in range(1000)
                 if service._stripe("t/plain", f"b{i}") is not held)
    taken, done = threading.Event(), threading.Event()

    def hold() -> None:
        with held:
            taken.set()
            done.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert taken.wait(5)
        service.upsert(VectorUpsert("t", "plain", other, v))
        assert held.locked(), "the write waited for another id's stripe"
    finally:
        done.set()
        holder.join()
    service.upsert(VectorUpsert("t", "plain", "c", v))  # now the sweep gets it
    assert ("t/plain", "a") not in service._pending_versions


def test_a_tick_while_the_node_is_behind_the_log_does_nothing(rig: Rig, tmp_path: Path) -> None:
    """A newer copy no bookkeeping of this process knows of (a previous run's write that
    a restarted node is still replaying; here a producer's, appended while the applier is
    paused): the tick waits for the node to apply what was appended before it, and does
    nothing when it has not (the next tick decides), rather than expire the older copy."""
    svc = ingest(rig, tmp_path, ttl_ms=1)
    try:
        applied(rig, svc, put(svc, "s1", FLEETING))  # v1, expired
        v1 = rig.node.state.entry("t/kb", "s1#0")
        assert v1 is not None
        found = rig.log.read(rig.topics.vectors, 0, 0, 1)[0]
        _, value = rig.codec.decode(found.value or b"")
        value["meta"] = json.dumps({"text": DURABLE})
        value["version"], value["ttl_ms"] = 2, None  # v2 of the chunk, for good
        schema = catalog.load_schema("VectorRecord")
        data = rig.codec.encode(catalog.subject_for(rig.topics.vectors), schema, value)
        v2 = Record.of(rig.topics.vectors, found.key, data)
        manager = rig.node.capacity
        manager.catch_up_timeout_s = 0.3
        with rig.node.indexer.lock:
            rig.node.service.append_raw([v2])
            assert manager.tick() == []
            assert manager.ticks_skipped == 1
            with pytest.raises(Busy):  # a restore's "exists again?" check would be blind too
                manager.restore("t", "kb", ["s1#0"])
        assert rig.node.catch_up(20)
        assert_durable_v(rig, 2)
        assert [(a.operation, a.ids) for a in manager.tick()] == []  # v2 has no TTL
    finally:
        svc.close()
