"""Server threads help the query log (``QueryLogEmitter.help``, querylog.py "Who encodes"):
what they encode is appended once, in the queue's order, and a RESP reply is followed by
its thread encoding the queued events."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis

from streams.cache.querylog import QueryLogEmitter, SearchObserver
from streams.index.model import IndexConfig, VectorUpsert
from streams.service.metrics import ServiceMetrics
from streams.service.resp import RespServer, serve_in_thread
from tests.rigs import Rig

TENANT = "acme"


def _event(i: int) -> dict[str, Any]:
    return {
        "tenant": TENANT,
        "index": "docs",
        "query_key": f"qk:{i:06d}",
        "top_k": 1,
        "action": "none",
        "action_probability": 1.0,
    }


def _logged(rig: Rig) -> list[dict[str, Any]]:
    out = []
    for partition, end in rig.log.end_offsets(rig.topics.query_log).items():
        for rec in rig.log.read(rig.topics.query_log, partition, 0, end):
            if rec.value is not None:
                out.append(rig.codec.decode(rec.value)[1])
    return out


def _started(emitter: QueryLogEmitter) -> QueryLogEmitter:
    """Started, with its writer resolved (server threads help only then)."""
    emitter.start()
    deadline = time.monotonic() + 10
    while emitter._writer is None and time.monotonic() < deadline:
        time.sleep(0.001)
    assert emitter._writer is not None
    return emitter


def test_help_encodes_the_oldest_and_the_log_keeps_the_queue_order(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    emitter = _started(QueryLogEmitter(rig.log, rig.topics, rig.codec, linger_s=30))
    try:
        for i in range(10):
            emitter.emit(_event(i))
        assert emitter.help(4) == 4
        assert emitter.help(4) == 4
        stats = emitter.stats()  # eight encoded, two not: all ten wait for the append
        assert (stats["queued"], stats["encoded_by_servers"]) == (10, 8)
        assert emitter.flush(10)
        assert emitter.stats()["appended"] == 10
        keys = [e["query_key"] for e in _logged(rig)]
        assert keys == [f"qk:{i:06d}" for i in range(10)]
        emitter.helped = False  # a bench's switch: help takes nothing
        emitter.emit(_event(10))
        assert emitter.help(4) == 0
    finally:
        emitter.close()
        rig.close()


def test_helpers_and_the_logging_thread_append_every_event_once_in_order(
    tmp_path: Path,
) -> None:
    """One thread emits 3,000 events while two others help as fast as they can and the
    logging thread takes batches of 50 every millisecond: every event is appended once,
    in the order emitted."""
    rig = Rig(tmp_path)
    emitter = _started(
        QueryLogEmitter(
            rig.log, rig.topics, rig.codec, linger_s=0.001, batch_size=50, capacity=100_000
        )
    )
    done = threading.Event()

    def helper() -> None:
        while not done.is_set():
            emitter.help(3)

    helpers = [threading.Thread(target=helper) for _ in range(2)]
    try:
        for t in helpers:
            t.start()
        for i in range(3000):
            assert emitter.emit(_event(i))
            if i % 50 == 0:
                time.sleep(0.001)  # let the others have the GIL
        done.set()
        for t in helpers:
            t.join(10)
        assert emitter.flush(20)
        stats = emitter.stats()
        assert (stats["appended"], stats["dropped"], stats["failed"]) == (3000, 0, 0)
        assert 0 < stats["encoded_by_servers"] < 3000  # both kinds of thread took some
        keys = [e["query_key"] for e in _logged(rig)]
        assert keys == [f"qk:{i:06d}" for i in range(3000)]
    finally:
        done.set()
        emitter.close()
        rig.close()


def test_a_resp_reply_is_followed_by_its_thread_encoding_the_query_log(tmp_path: Path) -> None:
    """A real node behind the RESP server, redis-py: with the logging thread waiting a
    minute between batches, the searches' events are encoded by the server's thread after
    each reply, and all reach query-log."""
    rig = Rig(tmp_path)
    svc = rig.node.service
    emitter = _started(QueryLogEmitter(rig.log, rig.topics, rig.codec, linger_s=60))
    svc.search_observer = SearchObserver(emitter=emitter)
    try:
        svc.create_index(IndexConfig(TENANT, "docs", 8, recipe="Flat"))
        rows = np.random.default_rng(3).standard_normal((12, 8)).astype(np.float32)
        token = ""
        for i, v in enumerate(rows):
            token = svc.upsert(VectorUpsert(TENANT, "docs", f"v{i}", v)).token
        with serve_in_thread(RespServer(svc, "127.0.0.1", 0, metrics=ServiceMetrics())) as s:
            r = redis.Redis(port=s.port, protocol=2, socket_timeout=10)
            try:
                for v in rows[:5]:
                    r.execute_command(
                        "VEC.SEARCH", TENANT, "docs", "TOPK", 3, "VECTOR", v.tobytes(),
                        "CONSISTENCY", "session", token,
                    )  # fmt: skip
                    r.ping()  # the search's reply was sent: its thread helped by now
            finally:
                r.close()
        assert emitter.stats()["encoded_by_servers"] == 5
        assert emitter.flush(10)
    finally:
        svc.search_observer = None
        emitter.close()
    searches = [e for e in _logged(rig) if e["removal"] is None]
    rig.close()
    assert len(searches) == 5


def test_an_event_a_server_thread_is_encoding_when_the_log_closes_is_appended(
    tmp_path: Path,
) -> None:
    """close() right as a helper takes an event (found by the session's review: the
    logging thread saw the queue and the ready list empty, left, and the event was lost)."""
    rig = Rig(tmp_path)
    emitter = _started(QueryLogEmitter(rig.log, rig.topics, rig.codec, linger_s=0.01))
    emitter.emit(_event(0))
    assert emitter.flush(5)
    real_encode, real_flush = emitter._encode_all, emitter.flush
    helping = threading.Event()

    def slow(items: Any, writer: Any = None) -> Any:
        if threading.current_thread().name == "helper":
            helping.set()
            time.sleep(0.3)  # descheduled mid-encode
        return real_encode(items, writer)

    helper = threading.Thread(target=emitter.help, name="helper")

    def flush_then_a_search(timeout_s: float = 10.0) -> bool:
        done = real_flush(timeout_s)  # close()'s flush: everything so far appended
        emitter.emit(_event(1))  # a search answered meanwhile
        helper.start()
        helping.wait(5)
        return done

    emitter._encode_all = slow  # type: ignore[method-assign]
    emitter.flush = flush_then_a_search  # type: ignore[method-assign]
    try:
        emitter.close(5)
        helper.join(5)
        assert [e["query_key"] for e in _logged(rig)] == ["qk:000000", "qk:000001"]
    finally:
        rig.close()


class _Registry:
    """The emitter's codec with a registry that cannot be reached."""

    def __init__(self, codec: Any) -> None:
        self.codec = codec
        self.calls = 0

    def writer(self, subject: str, schema: str) -> Any:
        self.calls += 1
        time.sleep(0.05)
        raise ConnectionError("registry down")


def test_a_server_thread_never_waits_for_the_registry(tmp_path: Path) -> None:
    """Without a resolved writer, help takes nothing (the logging thread keeps asking the
    registry; a server thread would stall every connection)."""
    rig = Rig(tmp_path)
    down = _Registry(rig.codec)
    emitter = QueryLogEmitter(rig.log, rig.topics, down, linger_s=0.01)  # type: ignore[arg-type]
    try:
        emitter.start()
        emitter.emit(_event(0))
        time.sleep(0.2)
        calls = down.calls
        assert calls >= 1
        emitter.emit(_event(1))
        t0 = time.monotonic()
        assert emitter.help(4) == 0 and time.monotonic() - t0 < 0.04
        assert down.calls - calls <= 1  # only the logging thread's own retries
    finally:
        emitter.close(1)
        rig.close()


def test_help_never_raises_and_counts_what_it_lost(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    emitter = _started(QueryLogEmitter(rig.log, rig.topics, rig.codec, linger_s=30))

    def broken(items: Any, writer: Any = None) -> Any:
        raise RuntimeError("a bug")

    try:
        emitter._encode_all = broken  # type: ignore[method-assign]
        emitter.emit(_event(0))
        emitter.emit(_event(1))
        assert emitter.help(4) == 2
        assert emitter.stats()["failed"] == 2 and emitter.stats()["queued"] == 0
    finally:
        emitter.close(1)
        rig.close()


def test_after_reply_work_that_raises_costs_no_connection(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    svc = rig.node.service

    def broken() -> None:
        raise RuntimeError("a bug")

    svc.after_reply = broken  # type: ignore[method-assign]
    with serve_in_thread(RespServer(svc, "127.0.0.1", 0, metrics=ServiceMetrics())) as s:
        r = redis.Redis(port=s.port, protocol=2, socket_timeout=10)
        try:
            assert r.ping() and r.ping() and r.ping()
        finally:
            r.close()
    rig.close()
