"""The RESP server, driven by real clients: redis-py (RESP2 and RESP3), the ``redis-cli``
binary, and raw sockets for framing and fuzzing. No mocks: the server runs on a loopback
port in a thread with its own event loop, over a real :class:`DataPlane`.

To run these against another data plane, change the ``dataplane`` fixture (one line). The
tests only assume the port's contract: writes read back through ``session`` consistency
with the write's token, never through timing.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.cache.keys import query_key
from streams.cache.prefetch import Prefetcher
from streams.cache.querylog import QueryLogEmitter, SearchObserver
from streams.index.model import IndexConfig, Metric, VectorUpsert
from streams.ingest import Source, open_ingest
from streams.log.port import LogPosition
from streams.service.api import DataPlane
from streams.service.http import create_http_app
from streams.service.metrics import ServiceMetrics
from streams.service.resp import MAX_SESSION_ID, RespServer, serve_in_thread
from streams.service.resp_wire import (
    CRLF,
    ErrorReply,
    ParserLimits,
    ProtocolError,
    RespParser,
    encode_reply,
    printable,
)
from tests.dataplane_memory import MemoryDataPlane
from tests.registry_fixtures import serve
from tests.rigs import Rig

DIM = 8
TENANT = "acme"


# -- fixtures -----------------------------------------------------------------------------
running = serve_in_thread


@pytest.fixture
def server(dataplane: DataPlane) -> Iterator[RespServer]:
    with running(RespServer(dataplane, "127.0.0.1", 0, metrics=ServiceMetrics())) as s:
        yield s


@pytest.fixture(params=[2, 3], ids=["resp2", "resp3"])
def client(server: RespServer, request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    r = redis.Redis(port=server.port, protocol=request.param, socket_timeout=10)
    yield r
    r.close()


@pytest.fixture
def index(client: redis.Redis) -> str:
    """A fresh index: DIM 8, cosine, tag field ``lang``, numeric field ``price``."""
    name = f"ix-{uuid.uuid4().hex[:8]}"
    client.execute_command(
        "VEC.CREATE",
        TENANT,
        name,
        "DIM",
        DIM,
        "METRIC",
        "cosine",
        "FIELDS",
        "lang",
        "tag",
        "price",
        "numeric",
    )
    return name


# -- helpers ------------------------------------------------------------------------------
def text(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def as_map(reply: Any) -> dict[str, Any]:
    """A RESP3 map or a RESP2 flat key/value array, as a dict with str keys."""
    if isinstance(reply, dict):
        return {text(k): v for k, v in reply.items()}
    assert isinstance(reply, list) and len(reply) % 2 == 0, reply
    return {text(reply[i]): reply[i + 1] for i in range(0, len(reply), 2)}


def vec(*values: float) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


def rand_vectors(n: int, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def add(r: redis.Redis, index: str, id: str, v: np.ndarray | bytes, *extra: Any) -> str:
    data = v if isinstance(v, bytes) else np.asarray(v, "<f4").tobytes()
    return text(r.execute_command("VEC.ADD", TENANT, index, id, "VECTOR", data, *extra))


def search(
    r: redis.Redis, index: str, q: np.ndarray, k: int, *extra: Any, after: str | None = None
) -> tuple[list[tuple[str, float, Any]], dict[str, Any]]:
    """Hits as (id, score, meta) and the debug map; ``after``: a session token to wait for."""
    args: list[Any] = ["VEC.SEARCH", TENANT, index, "TOPK", k, *extra]
    if after is not None:
        args += ["CONSISTENCY", "session", after]
    args += ["VECTOR", np.asarray(q, "<f4").tobytes()]
    hits, debug = r.execute_command(*args)
    return [(text(h[0]), float(h[1]), h[2]) for h in hits], as_map(debug)


def get(r: redis.Redis, index: str, id: str, after: str) -> dict[str, Any]:
    return as_map(r.execute_command("VEC.GET", TENANT, index, id, "CONSISTENCY", "session", after))


def error_of(r: redis.Redis, *args: Any) -> str:
    with pytest.raises(redis.ResponseError) as info:
        r.execute_command(*args)
    return str(info.value)


def cosine_ranking(data: np.ndarray, q: np.ndarray) -> tuple[list[int], np.ndarray]:
    scores = data @ q / (np.linalg.norm(data, axis=1) * np.linalg.norm(q))
    return sorted(range(len(data)), key=lambda i: -scores[i]), scores


def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Send ``data``, half-close, read until the server closes: (reply bytes, was reset)."""
    chunks: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            return b"".join(chunks), True
    return b"".join(chunks), False


# -- Redis housekeeping -------------------------------------------------------------------
def test_ping_echo_select_client_info_command(client: redis.Redis) -> None:
    assert client.ping() is True
    assert client.echo(b"he\r\nllo\x00") == b"he\r\nllo\x00"
    assert client.execute_command("SELECT", 0) in (b"OK", "OK", True)
    assert text(client.execute_command("CLIENT", "SETNAME", "me")) == "OK"
    assert text(client.execute_command("CLIENT", "GETNAME")) == "me"
    assert client.info()["server"] == "streamvec"  # redis-py parses our INFO text
    assert client.execute_command("COMMAND", "DOCS") in ([], {})
    assert "out of range" in error_of(client, "SELECT", 1)
    assert "unknown command" in error_of(client, "FLUSHALL")


def test_default_redis_py_client_negotiates_resp3(server: RespServer) -> None:
    r = redis.Redis(port=server.port)  # default settings: redis-py >= 8 sends HELLO 3
    try:
        name = f"ix-{uuid.uuid4().hex[:8]}"
        r.execute_command("VEC.CREATE", TENANT, name, "DIM", DIM)
        info = r.execute_command("VEC.INFO", TENANT, name)
        assert isinstance(info, dict) and info[b"dim"] == DIM  # a real RESP3 map
    finally:
        r.close()


def test_hello_switches_protocol_and_refuses_unknown_versions(server: RespServer) -> None:
    out, _ = raw_exchange(server.port, b"HELLO 3\r\nPING\r\nHELLO 2\r\nHELLO 4\r\nQUIT\r\n")
    assert out.startswith(b"%7\r\n$6\r\nserver\r\n$9\r\nstreamvec\r\n")
    assert b"+PONG\r\n*14\r\n" in out  # HELLO 2 answers a flat array
    assert out.endswith(b"-NOPROTO unsupported protocol version\r\n+OK\r\n")


# -- the data plane -----------------------------------------------------------------------
def test_create_add_get_round_trips_every_field(client: redis.Redis, index: str) -> None:
    v = np.array([0.5, -1, 2, 0, 1e-30, 3.25, -7, 1], np.float32)
    token = add(
        client,
        index,
        "doc-1",
        v,
        "META",
        '{"title": "a"}',
        "TAGS",
        "lang:en,red",
        "NUM",
        "price",
        "9.5",
    )
    LogPosition.parse(token)  # a position token
    got = get(client, index, "doc-1", token)
    assert text(got["id"]) == "doc-1"
    assert got["vector"] == v.astype("<f4").tobytes()
    assert text(got["meta"]) == '{"title": "a"}'
    assert sorted(text(t) for t in got["tags"]) == ["lang:en", "red"]
    assert {text(k): float(x) for k, x in as_map(got["numeric"]).items()} == {"price": 9.5}
    assert got["version"] == 1
    assert text(got["position"]) == token


def test_vectors_are_binary_safe(client: redis.Redis, index: str) -> None:
    raw = b"\r\n\x00\x00" + b"$5\r\n" + b"*1\r\n" + b"\n\n\x00\x00" + b"\x00" * 16  # 8 floats
    assert np.isfinite(np.frombuffer(raw, "<f4")).all()
    token = add(client, index, "bin", raw)
    assert get(client, index, "bin", token)["vector"] == raw


def test_upsert_bumps_the_version_and_replaces_the_vector(client: redis.Redis, index: str) -> None:
    first = text(client.execute_command("VEC.UPSERT", TENANT, index, "a", "VECTOR", vec(*[1] * 8)))
    second = text(
        client.execute_command(
            "VEC.UPSERT", TENANT, index, "a", "VECTOR", vec(*[2] * 8), "IF_VERSION", 1
        )
    )
    assert first != second
    got = get(client, index, "a", second)
    assert got["version"] == 2
    assert got["vector"] == vec(*[2] * 8)


def test_search_matches_numpy_brute_force(client: redis.Redis, index: str) -> None:
    data = rand_vectors(60)
    token = ""
    for i, v in enumerate(data):
        token = add(client, index, f"v{i}", v, "META", f'{{"i": {i}}}')
    q = rand_vectors(1, seed=99)[0]
    hits, debug = search(client, index, q, 10, after=token)
    order, scores = cosine_ranking(data, q)
    assert [h[0] for h in hits] == [f"v{i}" for i in order[:10]]
    for (_, score, meta), i in zip(hits, order[:10], strict=True):
        assert score == pytest.approx(float(scores[i]), abs=1e-4)
        assert text(meta) == f'{{"i": {i}}}'
    for key in ("cache_hit", "layer", "latency_ms", "decision", "applied"):
        assert key in debug


def test_filters_by_tag_and_numeric_range(client: redis.Redis, index: str) -> None:
    data = rand_vectors(30, seed=3)
    token = ""
    for i, v in enumerate(data):
        lang = "en" if i % 2 else "fr"
        token = add(client, index, f"v{i}", v, "TAGS", f"lang:{lang}", "NUM", "price", i)
    q = data[0]
    hits, _ = search(client, index, q, 30, "FILTER", "lang:en price>=10", after=token)
    expected = {f"v{i}" for i in range(30) if i % 2 and i >= 10}
    assert {h[0] for h in hits} == expected
    order, _ = cosine_ranking(data, q)
    assert [h[0] for h in hits] == [f"v{i}" for i in order if f"v{i}" in expected]
    err = error_of(
        client,
        "VEC.SEARCH",
        TENANT,
        index,
        "TOPK",
        3,
        "FILTER",
        "color:red",
        "VECTOR",
        data[0].tobytes(),
    )
    assert err.startswith("VEC_ERR_INVALID")


def test_deleted_vector_is_not_returned(client: redis.Redis, index: str) -> None:
    data = rand_vectors(5, seed=11)
    for i, v in enumerate(data):
        add(client, index, f"v{i}", v)
    token = text(client.execute_command("VEC.DEL", TENANT, index, "v0"))
    hits, _ = search(client, index, data[0], 5, after=token)
    assert "v0" not in [h[0] for h in hits] and len(hits) == 4
    err = error_of(client, "VEC.GET", TENANT, index, "v0", "CONSISTENCY", "session", token)
    assert err.startswith("VEC_ERR_NOT_FOUND")


def test_info_and_list(client: redis.Redis, index: str) -> None:
    info = as_map(client.execute_command("VEC.INFO", TENANT, index))
    assert info["dim"] == DIM and text(info["metric"]) == "cosine"
    assert f"{TENANT}/{index}" in [text(x) for x in client.execute_command("VEC.LIST", TENANT)]


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["VEC.ADD", TENANT, "{ix}", "a", "VECTOR", vec(1, 2, 3)], "VEC_ERR_DIM"),
        (["VEC.SEARCH", TENANT, "{ix}", "TOPK", 1, "VECTOR", vec(1)], "VEC_ERR_DIM"),
        (["VEC.ADD", TENANT, "{ix}", "a", "VECTOR", vec(*[float("nan")] * 8)], "VEC_ERR_INVALID"),
        (["VEC.SEARCH", TENANT, "{ix}", "VECTOR", vec(*[float("inf")] * 8)], "VEC_ERR_INVALID"),
        (["VEC.ADD", TENANT, "{ix}", "a", "VECTOR", b"\x00" * 7], "VEC_ERR_INVALID"),
        (["VEC.ADD", TENANT, "{ix}", "a", "META", "{}"], "VEC_ERR_INVALID"),  # no VECTOR
        (
            ["VEC.ADD", TENANT, "{ix}", "a", "VECTOR", vec(*[1] * 8), "META", "{nope"],
            "VEC_ERR_INVALID",
        ),
        (
            ["VEC.ADD", TENANT, "{ix}", "a", "VECTOR", vec(*[1] * 8), "NUM", "weight", 1],
            "VEC_ERR_INVALID",
        ),  # undeclared numeric field
        (
            ["VEC.ADD", TENANT, "{ix}", "a", "VECTOR", vec(*[1] * 8), "IF_VERSION", 0],
            "VEC_ERR_INVALID",
        ),  # IF_VERSION is an UPSERT option
        (["VEC.ADD", TENANT, "{ix}", "a", "VECTOR", vec(*[1] * 8), "BOGUS", 1], "VEC_ERR_INVALID"),
        (["VEC.SEARCH", TENANT, "{ix}", "TOPK", "x", "VECTOR", vec(*[1] * 8)], "VEC_ERR_INVALID"),
        (["VEC.SEARCH", TENANT, "{ix}", "TOPK", 0, "VECTOR", vec(*[1] * 8)], "VEC_ERR_INVALID"),
        (
            ["VEC.SEARCH", TENANT, "{ix}", "VECTOR", vec(*[1] * 8), "CONSISTENCY", "psychic"],
            "VEC_ERR_INVALID",
        ),
        (
            [
                "VEC.SEARCH",
                TENANT,
                "{ix}",
                "CONSISTENCY",
                "session",
                "not-a-token",
                "VECTOR",
                vec(*[1] * 8),
            ],
            "VEC_ERR_INVALID",
        ),
        (["VEC.DEL", TENANT, "{ix}"], "VEC_ERR_INVALID"),
        (["VEC.DEL", TENANT, "{ix}", "a", "extra"], "VEC_ERR_INVALID"),
        (["VEC.CREATE", TENANT, "other"], "VEC_ERR_INVALID"),  # no DIM
        (["VEC.CREATE", TENANT, "other", "DIM", 4, "METRIC", "hamming"], "VEC_ERR_INVALID"),
        (["VEC.CREATE", "bad tenant!", "other", "DIM", 4], "VEC_ERR_INVALID"),
        (["VEC.INFO", TENANT, "missing"], "VEC_ERR_NOT_FOUND"),
        (["VEC.ADD", TENANT, "missing", "a", "VECTOR", vec(*[1] * 8)], "VEC_ERR_NOT_FOUND"),
        (["VEC.SEARCH", TENANT, "missing", "VECTOR", vec(*[1] * 8)], "VEC_ERR_NOT_FOUND"),
        (["VEC.GET", TENANT, "{ix}", "nobody"], "VEC_ERR_NOT_FOUND"),
        # commands added with batching, neighbours, archives and text indexes
        (["VEC.MADD", TENANT, "{ix}", "a"], "VEC_ERR_INVALID"),  # id without its vector
        (["VEC.MADD", TENANT, "{ix}"], "VEC_ERR_INVALID"),
        (["VEC.SEARCH", TENANT, "{ix}", "EF", 0, "VECTOR", vec(*[1] * 8)], "VEC_ERR_INVALID"),
        # SESSION: 1 to 128 characters, as HTTP's session_id
        (["VEC.SEARCH", TENANT, "{ix}", "SESSION", "", "VECTOR", vec(*[1] * 8)], "VEC_ERR_INVALID"),
        (
            ["VEC.SEARCH", TENANT, "{ix}", "SESSION", "s" * 129, "VECTOR", vec(*[1] * 8)],
            "VEC_ERR_INVALID",
        ),
        (["VEC.SEARCH", TENANT, "{ix}", "VECTOR", vec(*[1] * 8), "SESSION"], "VEC_ERR_INVALID"),
        (
            ["VEC.SEARCH", TENANT, "{ix}", "SESSION", b"\xff", "VECTOR", vec(*[1] * 8)],
            "VEC_ERR_INVALID",
        ),
        (
            ["VEC.SEARCH", TENANT, "{ix}", "SESSION", "a", "session", "b", "VECTOR", vec(*[1] * 8)],
            "VEC_ERR_INVALID",
        ),
        (["VEC.NEIGHBORS", TENANT, "{ix}", "a", "HOPS", 0], "VEC_ERR_INVALID"),
        (["VEC.NEIGHBORS", TENANT, "{ix}", "a", "K", "x"], "VEC_ERR_INVALID"),
        (["VEC.NEIGHBORS", TENANT, "{ix}", "nobody"], "VEC_ERR_NOT_FOUND"),
        (["VEC.RESTORE", TENANT, "{ix}"], "VEC_ERR_INVALID"),
        # no embedder processor on this server (TEXT checks: tests/test_ingest.py)
        (["VEC.SOURCE", TENANT, "{ix}", "s1", "TEXT", "hello"], "VEC_ERR_INVALID"),
        (["VEC.QUERY", TENANT, "{ix}", "TOPK", 3, "TEXT", "hello"], "VEC_ERR_INVALID"),
    ],
)
def test_error_codes_and_nothing_is_appended(
    client: redis.Redis, index: str, args: list[Any], code: str
) -> None:
    token = add(client, index, "a", np.ones(DIM, np.float32))
    args = [index if a == "{ix}" else a for a in args]
    assert error_of(client, *args).startswith(code + " ")
    got = get(client, index, "a", token)  # the existing record is untouched
    assert got["version"] == 1 and got["vector"] == np.ones(DIM, "<f4").tobytes()
    info = as_map(client.execute_command("VEC.INFO", TENANT, index))
    assert '"live": 1' in text(info["stats"])


def test_add_of_an_existing_id_and_if_version_conflicts(client: redis.Redis, index: str) -> None:
    token = add(client, index, "a", np.ones(DIM, np.float32))
    assert error_of(client, "VEC.ADD", TENANT, index, "a", "VECTOR", vec(*[2] * 8)).startswith(
        "VEC_ERR_CONFLICT "
    )
    err = error_of(
        client, "VEC.UPSERT", TENANT, index, "a", "VECTOR", vec(*[2] * 8), "IF_VERSION", 5
    )
    assert err.startswith("VEC_ERR_CONFLICT ")
    err = error_of(
        client, "VEC.UPSERT", TENANT, index, "new", "VECTOR", vec(*[2] * 8), "IF_VERSION", 1
    )
    assert err.startswith("VEC_ERR_CONFLICT ")
    got = get(client, index, "a", token)
    assert got["version"] == 1 and got["vector"] == np.ones(DIM, "<f4").tobytes()


def test_session_read_ahead_of_the_node_answers_busy(client: redis.Redis, index: str) -> None:
    token = LogPosition.parse(add(client, index, "a", np.ones(DIM, np.float32)))
    future = LogPosition(token.topic, token.partition, token.offset + 1_000_000).token
    err = error_of(
        client,
        "VEC.SEARCH",
        TENANT,
        index,
        "CONSISTENCY",
        "session",
        future,
        "TIMEOUT",
        50,
        "VECTOR",
        vec(*[1] * 8),
    )
    assert err.startswith("VEC_ERR_BUSY ")
    assert client.ping() is True  # the connection is still usable


def test_search_session_reaches_the_query_log_and_the_prefetcher(tmp_path: Path) -> None:
    """``SESSION id`` is what HTTP's ``session_id`` is: each search's query-log event
    carries it and the prefetcher learns the session's next query from it (a real node,
    its query-log emitter and prefetcher, redis-py over RESP2 and RESP3)."""
    rig = Rig(tmp_path / "rig")
    svc = rig.node.service
    emitter = QueryLogEmitter(rig.log, rig.topics, rig.codec, linger_s=0.01).start()
    prefetcher = Prefetcher(svc, idle_s=3600)  # learns; never runs during the test
    svc.search_observer = SearchObserver(emitter=emitter, prefetcher=prefetcher)
    try:
        svc.create_index(IndexConfig(TENANT, "docs", DIM, recipe="Flat"))
        token = ""
        for i, v in enumerate(rand_vectors(20)):
            token = svc.upsert(VectorUpsert(TENANT, "docs", f"v{i}", v)).token
        a, b, c = rand_vectors(3, seed=11)
        long_id = "é" * MAX_SESSION_ID  # 128 characters (256 bytes), as HTTP allows
        with running(RespServer(svc, "127.0.0.1", 0, metrics=ServiceMetrics())) as server:
            for proto in (2, 3):
                r = redis.Redis(port=server.port, protocol=proto, socket_timeout=10)
                try:
                    for q in (a, b, a, b):  # the session asks b after a twice: learned
                        search(r, "docs", q, 3, "SESSION", f"s{proto}", after=token)
                    search(r, "docs", c, 3, after=token)  # no session
                    search(r, "docs", c, 3, "SESSION", long_id, after=token)
                finally:
                    r.close()
        assert emitter.flush(10)
    finally:
        svc.search_observer = None
        emitter.close()
    events = []
    for partition, end in rig.log.end_offsets(rig.topics.query_log).items():
        for rec in rig.log.read(rig.topics.query_log, partition, 0, end):
            if rec.value is not None:
                events.append(rig.codec.decode(rec.value)[1])
    rig.close()
    searches = [e for e in events if "session_id" in e]
    sessions = [e["session_id"] for e in searches]
    assert sorted(sessions, key=str) == sorted(
        ["s2"] * 4 + ["s3"] * 4 + [None, None] + [long_id] * 2, key=str
    )
    key_a = str(query_key(f"{TENANT}/docs", Metric.COSINE, a, 3, None))
    key_b = str(query_key(f"{TENANT}/docs", Metric.COSINE, b, 3, None))
    assert {e["query_key"] for e in searches if e["session_id"] == "s2"} == {key_a, key_b}
    assert prefetcher.counts["observed"] == 10  # every search with a session, none without
    assert prefetcher.table.predict(key_a) == [key_b]


def test_query_session_reaches_the_query_log_through_its_dense_search(tmp_path: Path) -> None:
    """``VEC.QUERY ... SESSION id``: the query's dense search (dense and hybrid modes)
    is logged with the session and teaches the prefetcher (a real node, its embedder
    processor with the offline model, redis-py); HTTP's ``session_id`` likewise."""
    rig = Rig(tmp_path / "rig")
    ingest = open_ingest(rig.node, tmp_path / "ingest", backoff_s=0.001)
    svc = rig.node.service
    emitter = QueryLogEmitter(rig.log, rig.topics, rig.codec, linger_s=0.01).start()
    prefetcher = Prefetcher(svc, idle_s=3600)
    svc.search_observer = SearchObserver(emitter=emitter, prefetcher=prefetcher)
    try:
        ingest.create_text_index(TENANT, "kb", "wordllama", recipe="Flat")
        token = ""
        for i, words in enumerate(
            ("badgers dig setts", "otters swim in rivers", "owls hunt at night")
        ):
            token = ingest.put_source(Source(TENANT, "kb", f"s{i}", text=words)).token
        with running(
            RespServer(svc, "127.0.0.1", 0, metrics=ServiceMetrics(), ingest=ingest)
        ) as server:
            r = redis.Redis(port=server.port, socket_timeout=30)
            try:
                for mode in ("dense", "hybrid"):
                    hits, _debug = r.execute_command(
                        "VEC.QUERY",
                        TENANT,
                        "kb",
                        "TOPK",
                        2,
                        "TEXT",
                        "where do otters swim",
                        "MODE",
                        mode,
                        "SESSION",
                        f"q-{mode}",
                        "CONSISTENCY",
                        "session",
                        token,
                        "TIMEOUT",
                        20_000,
                    )
                    assert hits
                assert "VEC_ERR_INVALID" in error_of(
                    r, "VEC.QUERY", TENANT, "kb", "TEXT", "x", "SESSION", "s" * 129
                )
            finally:
                r.close()
        app = create_http_app(svc, ingest=ingest)  # HTTP: "session_id" in the query body
        with serve(app) as url, httpx.Client(base_url=url, timeout=30) as http:
            body = {
                "text": "owls at night",
                "k": 2,
                "session_id": "q-http",
                "consistency": "session",
                "tokens": [token],
                "timeout_ms": 20_000,
            }
            assert http.post(f"/v1/indexes/{TENANT}/kb/query", json=body).status_code == 200
            bad = http.post(f"/v1/indexes/{TENANT}/kb/query", json={**body, "session_id": ""})
            assert bad.status_code == 400, bad.text
        assert emitter.flush(10)
    finally:
        svc.search_observer = None
        emitter.close()
        ingest.close()
    events = []
    for partition, end in rig.log.end_offsets(rig.topics.query_log).items():
        for rec in rig.log.read(rig.topics.query_log, partition, 0, end):
            if rec.value is not None:
                events.append(rig.codec.decode(rec.value)[1])
    rig.close()
    sessions = {e.get("session_id") for e in events if e.get("index") == "kb"}
    assert {"q-dense", "q-hybrid", "q-http"} <= sessions
    assert prefetcher.counts["observed"] >= 3


def test_pipeline_of_100_commands(client: redis.Redis, index: str) -> None:
    data = rand_vectors(50, seed=5)
    pipe = client.pipeline(transaction=False)
    for i, v in enumerate(data):
        pipe.execute_command("VEC.UPSERT", TENANT, index, f"p{i}", "VECTOR", v.tobytes())
        pipe.execute_command(
            "VEC.UPSERT", TENANT, index, f"p{i}", "VECTOR", v.tobytes(), "IF_VERSION", 1
        )
    replies = pipe.execute()
    assert len(replies) == 100
    positions = [LogPosition.parse(text(t)) for t in replies]
    assert len(set(positions)) == 100
    got = get(client, index, "p49", text(replies[-1]))
    assert got["version"] == 2 and got["vector"] == data[49].astype("<f4").tobytes()


def test_many_commands_in_one_read_are_answered_in_order(server: RespServer) -> None:
    frames = b"".join(encode_reply([b"ECHO", str(i).encode()]) for i in range(500))
    out, reset = raw_exchange(server.port, frames + b"PING\r\n")
    expected = b"".join(encode_reply(str(i)) for i in range(500)) + b"+PONG\r\n"
    assert out == expected and not reset


def test_quit_answers_ok_and_closes(server: RespServer) -> None:
    out, _ = raw_exchange(server.port, b"PING\r\nQUIT\r\nPING\r\n")
    assert out == b"+PONG\r\n+OK\r\n"


def test_protocol_error_closes_and_the_server_lives_on(server: RespServer) -> None:
    out, _ = raw_exchange(server.port, b"PING\r\n*1\r\n$abc\r\n")
    assert out == b"+PONG\r\n-ERR Protocol error: invalid bulk length\r\n"
    out, _ = raw_exchange(server.port, b"*2\r\n*1\r\n")
    assert out == b"-ERR Protocol error: expected '$', got '*'\r\n"
    assert raw_exchange(server.port, b"PING\r\n")[0] == b"+PONG\r\n"


def test_limits_are_protocol_errors(dataplane: DataPlane) -> None:
    limits = ParserLimits(max_elements=4, max_bulk_bytes=16, max_inline_bytes=32)
    rs = RespServer(dataplane, "127.0.0.1", 0, metrics=ServiceMetrics(), limits=limits)
    with running(rs) as s:
        error = b"-ERR Protocol error: "
        assert raw_exchange(s.port, b"*5\r\n")[0] == error + b"invalid multibulk length\r\n"
        assert raw_exchange(s.port, b"*1\r\n$17\r\n")[0] == error + b"invalid bulk length\r\n"
        assert raw_exchange(s.port, b"P" * 40)[0] == error + b"too big inline request\r\n"
        echo = encode_reply([b"ECHO", b"x" * 16])  # exactly at the limits: fine
        assert raw_exchange(s.port, echo)[0] == encode_reply(b"x" * 16)
        assert s.metrics.registry.get_sample_value("streamvec_resp_protocol_errors_total") == 3


def test_metrics_count_commands_by_code(
    server: RespServer, client: redis.Redis, index: str
) -> None:
    add(client, index, "a", np.ones(DIM, np.float32))
    error_of(client, "VEC.ADD", TENANT, index, "b", "VECTOR", vec(1))
    error_of(client, "NOPE")
    sample = server.metrics.registry.get_sample_value
    assert (
        sample(
            "streamvec_requests_total", {"transport": "resp", "command": "VEC.ADD", "code": "OK"}
        )
        == 1
    )
    assert (
        sample(
            "streamvec_requests_total",
            {"transport": "resp", "command": "VEC.ADD", "code": "VEC_ERR_DIM"},
        )
        == 1
    )
    assert (
        sample(
            "streamvec_requests_total", {"transport": "resp", "command": "UNKNOWN", "code": "ERR"}
        )
        == 1
    )
    assert (
        sample("streamvec_request_seconds_count", {"transport": "resp", "command": "VEC.ADD"}) == 2
    )


# -- redis-cli ----------------------------------------------------------------------------
REDIS_CLI = shutil.which("redis-cli")
needs_cli = pytest.mark.skipif(
    REDIS_CLI is None, reason="redis-cli not installed (Debian: apt-get install redis-tools)"
)


def cli(port: int, *args: str, stdin: bytes | None = None) -> list[str]:
    assert REDIS_CLI is not None
    cmd = [
        REDIS_CLI,
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        *(["-x"] if stdin is not None else []),
        *args,
    ]
    done = subprocess.run(cmd, input=stdin, capture_output=True, timeout=20, check=True)
    return done.stdout.decode().splitlines()


@needs_cli
def test_redis_cli_ping_create_info_and_search_from_stdin(server: RespServer) -> None:
    name = f"ix-{uuid.uuid4().hex[:8]}"
    assert cli(server.port, "PING") == ["PONG"]
    LogPosition.parse(cli(server.port, "VEC.CREATE", TENANT, name, "DIM", str(DIM))[0])
    info = cli(server.port, "VEC.INFO", TENANT, name)
    assert info[info.index("dim") + 1] == str(DIM)
    data = rand_vectors(10, seed=21)
    token = ""
    for i, v in enumerate(data):  # the vector is the last argument, read from stdin
        token = cli(
            server.port, "VEC.ADD", TENANT, name, f"v{i}", "VECTOR", stdin=v.astype("<f4").tobytes()
        )[0]
    out = cli(
        server.port,
        "VEC.SEARCH",
        TENANT,
        name,
        "TOPK",
        "3",
        "CONSISTENCY",
        "session",
        token,
        "VECTOR",
        stdin=data[4].astype("<f4").tobytes(),
    )
    order, _ = cosine_ranking(data, data[4])
    assert out[0] == "v4" and out[3] == f"v{order[1]}"  # [id, score, meta] per hit
    assert float(out[1]) == pytest.approx(1.0, abs=1e-5)


# -- fuzzing ------------------------------------------------------------------------------
def parse_all(data: bytes, chunks: list[int] | None = None) -> tuple[list[list[bytes]], str | None]:
    """Commands parsed from ``data`` (fed in ``chunks`` sizes), and the protocol error."""
    parser = RespParser()
    commands: list[list[bytes]] = []
    pieces = [data] if chunks is None else []
    if chunks is not None:
        at = 0
        for size in chunks:
            pieces.append(data[at : at + size])
            at += size
        pieces.append(data[at:])
    try:
        for piece in pieces:
            parser.feed(piece)
            while (command := parser.next_command()) is not None:
                commands.append(command)
    except ProtocolError as exc:
        return commands, str(exc)
    return commands, None


RESP_PIECES = st.sampled_from(
    [
        b"*",
        b"$",
        b"\r\n",
        b"\n",
        b"\r",
        b"0",
        b"1",
        b"2",
        b"3",
        b"-1",
        b"-",
        b"99999999999999",
        b"PING",
        b"ECHO",
        b"ping",
        b" ",
        b"\x00",
        b"+",
        b"abcd",
        b"*1\r\n$4\r\nPING\r\n",
        b"*2\r\n",
        b"$4\r\n",
        b"$-1\r\n",
        b"$3\r\nabc\r\n",
        b"$3\r\nabcd",
        b"*1\r\n*1\r\n",
    ]
)
FUZZ = st.one_of(
    st.binary(max_size=300),
    st.lists(RESP_PIECES, max_size=40).map(b"".join),
    st.lists(st.one_of(RESP_PIECES, st.binary(max_size=8)), max_size=30).map(b"".join),
)


# The parser before its header lines were read inline (commit 58444fa), kept as the oracle
# the current one must agree with, command for command and error for error.
_REF_INT_RE = re.compile(rb"-?[0-9]{1,18}")


class _ReferenceParser:
    """Incremental parser of client requests: :meth:`feed` bytes as they arrive, then call
    :meth:`next_command` until it returns ``None`` (a partial command stays buffered).

    Once it has raised :class:`ProtocolError` it raises the same error forever. A large bulk
    string is never rescanned: the parser remembers how many bytes it is waiting for."""

    def __init__(self, limits: ParserLimits | None = None) -> None:
        self.limits = limits or ParserLimits()
        self._buf = bytearray()
        self._pos = 0
        self._args: list[bytes] | None = None  # the array being read
        self._remaining = 0  # its elements still to read
        self._bulk = -1  # length of the bulk string being read; -1: its header is next
        self._failed: ProtocolError | None = None

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_command(self) -> list[bytes] | None:
        if self._failed is not None:
            raise self._failed
        try:
            command = self._parse()
        except ProtocolError as exc:
            self._failed = exc
            raise
        if self._pos and (self._pos == len(self._buf) or self._pos > 1 << 16):
            del self._buf[: self._pos]
            self._pos = 0
        return command

    def _line(self, sep: bytes, what: str) -> bytes | None:
        end = self._buf.find(sep, self._pos)
        if end < 0:
            if len(self._buf) - self._pos > self.limits.max_inline_bytes:
                raise ProtocolError(f"too big {what}")
            return None
        line = bytes(self._buf[self._pos : end])
        self._pos = end + len(sep)
        return line

    def _int(self, text: bytes, what: str) -> int:
        if not _REF_INT_RE.fullmatch(text):
            raise ProtocolError(f"invalid {what}")
        return int(text)

    def _parse(self) -> list[bytes] | None:
        buf = self._buf
        while self._args is None:
            if self._pos >= len(buf):
                return None
            if buf[self._pos] != ord("*"):
                line = self._line(b"\n", "inline request")
                if line is None:
                    return None
                args = line.removesuffix(b"\r").split()
                if args:
                    return args
                continue  # an empty line, as Redis: ignored
            line = self._line(CRLF, "mbulk count string")
            if line is None:
                return None
            n = self._int(line[1:], "multibulk length")
            if n > self.limits.max_elements:
                raise ProtocolError("invalid multibulk length")
            if n > 0:  # *0 and *-1 are ignored
                self._args, self._remaining, self._bulk = [], n, -1
        while self._remaining:
            if self._bulk < 0:
                if self._pos >= len(buf):
                    return None
                if buf[self._pos] != ord("$"):
                    got = printable(bytes(buf[self._pos : self._pos + 1]))
                    raise ProtocolError(f"expected '$', got {got!r}")
                line = self._line(CRLF, "bulk count string")
                if line is None:
                    return None
                n = self._int(line[1:], "bulk length")
                if not 0 <= n <= self.limits.max_bulk_bytes:
                    raise ProtocolError("invalid bulk length")
                self._bulk = n
            end = self._pos + self._bulk
            if len(buf) < end + 2:
                return None
            if buf[end : end + 2] != CRLF:
                raise ProtocolError("bulk string not terminated by CRLF")
            self._args.append(bytes(buf[self._pos : end]))
            self._pos, self._bulk, self._remaining = end + 2, -1, self._remaining - 1
        command, self._args = self._args, None
        return command


def parse_all_with(
    parser: Any, data: bytes, chunks: list[int]
) -> tuple[list[list[bytes]], str | None]:
    commands: list[list[bytes]] = []
    pieces, at = [], 0
    for size in chunks:
        pieces.append(data[at : at + size])
        at += size
    pieces.append(data[at:])
    try:
        for piece in pieces:
            parser.feed(piece)
            while (command := parser.next_command()) is not None:
                commands.append(command)
    except ProtocolError as exc:
        return commands, str(exc)
    return commands, None


@st.composite
def _near_limit_commands(draw: st.DrawFn) -> bytes:
    """Well-formed commands around the small limits (4 elements, 16-byte bulks, 12-byte
    lines), inline ones, then maybe one byte changed or the tail cut."""
    parts = draw(
        st.lists(
            st.lists(
                st.binary(max_size=20) | st.binary(min_size=15, max_size=18), min_size=1, max_size=6
            ).map(encode_reply)
            | st.sampled_from(
                [b"PING\r\n", b"\r\n", b"*0\r\n", b"*-1\r\n", b"ECHO a b c d e f\r\n"]
            ),
            min_size=1,
            max_size=4,
        )
    )
    data = bytearray(b"".join(parts))
    if draw(st.booleans()) and data:
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.sampled_from(b"*$\r\n-+0919ab "))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


_AT_LIMITS = [  # the small limits' edges, each on both sides
    encode_reply([b"a" * 16]),
    encode_reply([b"a" * 17]),
    encode_reply([b"a"] * 4),
    encode_reply([b"a"] * 5),
    b"ECHO abcdefg\r\n",
    b"ECHO abcdefgh\r\n" + b"x" * 12,
    b"*1\r\n$" + b"9" * 18 + b"\r\n",
    b"*1\r\n$" + b"1" * 19 + b"\r\n",
    b"*" + b"0" * 18 + b"1\r\n",
    b"*1\r\n$-0\r\n\r\n",
    b"*1\r\n$+1\r\na\r\n",
    b"*1\r\n$ 1\r\na\r\n",
    b"*1\r\n$1\r\nab\r\n",
    b"*\r\n",
    b"*1\r\n$\r\n",
    b"*1\r\n$" + b"1" * 14,
    b"*" + b"1" * 14,
    b"x" * 14,
]


_SMALL = ParserLimits(max_elements=4, max_bulk_bytes=16, max_inline_bytes=12)


@pytest.mark.parametrize("data", _AT_LIMITS)
def test_parser_agrees_with_the_parser_it_replaced_at_the_limits(data: bytes) -> None:
    for limits in (_SMALL, ParserLimits()):
        for chunks in ([], [1] * len(data), [3, 5]):
            assert parse_all_with(RespParser(limits), data, chunks) == parse_all_with(
                _ReferenceParser(limits), data, chunks
            )


@settings(max_examples=800, deadline=None)
@given(
    data=FUZZ | _near_limit_commands(),
    chunks=st.lists(st.integers(0, 40), max_size=20),
    small=st.booleans(),
)
def test_parser_agrees_with_the_parser_it_replaced(
    data: bytes, chunks: list[int], small: bool
) -> None:
    limits = _SMALL if small else ParserLimits()
    assert parse_all_with(RespParser(limits), data, chunks) == parse_all_with(
        _ReferenceParser(limits), data, chunks
    )


@settings(max_examples=500, deadline=None)
@given(data=FUZZ, chunks=st.lists(st.integers(0, 40), max_size=20))
def test_parser_is_incremental_and_fails_only_with_protocol_errors(
    data: bytes, chunks: list[int]
) -> None:
    assert parse_all(data, chunks) == parse_all(data)


@settings(max_examples=200, deadline=None)
@given(args=st.lists(st.binary(max_size=50), min_size=1, max_size=10))
def test_parser_reads_back_any_encoded_command(args: list[bytes]) -> None:
    assert parse_all(encode_reply(args) * 3) == ([args] * 3, None)


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[RespServer]:
    with running(RespServer(MemoryDataPlane(), "127.0.0.1", 0, metrics=ServiceMetrics())) as s:
        yield s


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=FUZZ)
def test_arbitrary_bytes_never_crash_the_server(fuzz_server: RespServer, data: bytes) -> None:
    commands, error = parse_all(data)
    quits = any(c[0].upper() == b"QUIT" for c in commands)
    out, reset = raw_exchange(fuzz_server.port, data)
    if error is not None and not quits:
        tail = encode_reply(ErrorReply(f"ERR Protocol error: {error}"))
        assert reset or out.endswith(tail)
    else:
        assert not reset and b"Protocol error" not in out[-200:]
    # a fresh connection still works
    assert raw_exchange(fuzz_server.port, b"*1\r\n$4\r\nPING\r\n")[0] == b"+PONG\r\n"
