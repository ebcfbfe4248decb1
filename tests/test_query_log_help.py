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


def test_help_encodes_the_oldest_and_the_log_keeps_the_queue_order(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    emitter = QueryLogEmitter(rig.log, rig.topics, rig.codec, linger_s=30).start()
    try:
        for i in range(10):
            emitter.emit(_event(i))
        assert emitter.help(4) == 4
        assert emitter.help(4) == 4
        assert emitter.stats()["queued"] == 2  # the two newest wait for the logging thread
        assert emitter.stats()["encoded_by_servers"] == 8
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
    emitter = QueryLogEmitter(
        rig.log, rig.topics, rig.codec, linger_s=0.001, batch_size=50, capacity=100_000
    ).start()
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
    emitter = QueryLogEmitter(rig.log, rig.topics, rig.codec, linger_s=60).start()
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
