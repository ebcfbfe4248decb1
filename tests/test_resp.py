"""The RESP server, driven by real clients: redis-py (RESP2 and RESP3), the ``redis-cli``
binary, and raw sockets for framing and fuzzing. No mocks: the server runs on a loopback
port in a thread with its own event loop, over a real :class:`DataPlane`.

To run these against another data plane, change the ``dataplane`` fixture (one line). The
tests only assume the port's contract: writes read back through ``session`` consistency
with the write's token, never through timing.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.log.port import LogPosition
from streams.service.api import DataPlane
from streams.service.metrics import ServiceMetrics
from streams.service.resp import RespServer, serve_in_thread
from streams.service.resp_wire import (
    ErrorReply,
    ParserLimits,
    ProtocolError,
    RespParser,
    encode_reply,
)
from tests.dataplane_memory import MemoryDataPlane

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
    client.execute_command("VEC.CREATE", TENANT, name, "DIM", DIM, "METRIC", "cosine",
                           "FIELDS", "lang", "tag", "price", "numeric")
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


def search(r: redis.Redis, index: str, q: np.ndarray, k: int, *extra: Any,
           after: str | None = None) -> tuple[list[tuple[str, float, Any]], dict[str, Any]]:
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
    token = add(client, index, "doc-1", v, "META", '{"title": "a"}', "TAGS", "lang:en,red",
                "NUM", "price", "9.5")
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


def test_upsert_bumps_the_version_and_replaces_the_vector(
    client: redis.Redis, index: str
) -> None:
    first = text(client.execute_command("VEC.UPSERT", TENANT, index, "a", "VECTOR", vec(*[1] * 8)))
    second = text(client.execute_command(
        "VEC.UPSERT", TENANT, index, "a", "VECTOR", vec(*[2] * 8), "IF_VERSION", 1))
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
    err = error_of(client, "VEC.SEARCH", TENANT, index, "TOPK", 3, "FILTER", "color:red",
                   "VECTOR", data[0].tobytes())
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
        (["VEC.ADD", TENANT, "{ix}", "a", "VECTOR", vec(*[1] * 8), "META", "{nope"],
         "VEC_ERR_INVALID"),
        (["VEC.ADD", TENANT, "{ix}", "a", "VECTOR", vec(*[1] * 8), "NUM", "weight", 1],
         "VEC_ERR_INVALID"),  # undeclared numeric field
        (["VEC.ADD", TENANT, "{ix}", "a", "VECTOR", vec(*[1] * 8), "IF_VERSION", 0],
         "VEC_ERR_INVALID"),  # IF_VERSION is an UPSERT option
        (["VEC.ADD", TENANT, "{ix}", "a", "VECTOR", vec(*[1] * 8), "BOGUS", 1],
         "VEC_ERR_INVALID"),
        (["VEC.SEARCH", TENANT, "{ix}", "TOPK", "x", "VECTOR", vec(*[1] * 8)], "VEC_ERR_INVALID"),
        (["VEC.SEARCH", TENANT, "{ix}", "TOPK", 0, "VECTOR", vec(*[1] * 8)], "VEC_ERR_INVALID"),
        (["VEC.SEARCH", TENANT, "{ix}", "VECTOR", vec(*[1] * 8), "CONSISTENCY", "psychic"],
         "VEC_ERR_INVALID"),
        (["VEC.SEARCH", TENANT, "{ix}", "CONSISTENCY", "session", "not-a-token",
          "VECTOR", vec(*[1] * 8)], "VEC_ERR_INVALID"),
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
        "VEC_ERR_CONFLICT ")
    err = error_of(client, "VEC.UPSERT", TENANT, index, "a", "VECTOR", vec(*[2] * 8),
                   "IF_VERSION", 5)
    assert err.startswith("VEC_ERR_CONFLICT ")
    err = error_of(client, "VEC.UPSERT", TENANT, index, "new", "VECTOR", vec(*[2] * 8),
                   "IF_VERSION", 1)
    assert err.startswith("VEC_ERR_CONFLICT ")
    got = get(client, index, "a", token)
    assert got["version"] == 1 and got["vector"] == np.ones(DIM, "<f4").tobytes()


def test_session_read_ahead_of_the_node_answers_busy(client: redis.Redis, index: str) -> None:
    token = LogPosition.parse(add(client, index, "a", np.ones(DIM, np.float32)))
    future = LogPosition(token.topic, token.partition, token.offset + 1_000_000).token
    err = error_of(client, "VEC.SEARCH", TENANT, index, "CONSISTENCY", "session", future,
                   "TIMEOUT", 50, "VECTOR", vec(*[1] * 8))
    assert err.startswith("VEC_ERR_BUSY ")
    assert client.ping() is True  # the connection is still usable


def test_pipeline_of_100_commands(client: redis.Redis, index: str) -> None:
    data = rand_vectors(50, seed=5)
    pipe = client.pipeline(transaction=False)
    for i, v in enumerate(data):
        pipe.execute_command("VEC.UPSERT", TENANT, index, f"p{i}", "VECTOR", v.tobytes())
        pipe.execute_command("VEC.UPSERT", TENANT, index, f"p{i}", "VECTOR", v.tobytes(),
                             "IF_VERSION", 1)
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
    assert sample("streamvec_requests_total",
                  {"transport": "resp", "command": "VEC.ADD", "code": "OK"}) == 1
    assert sample("streamvec_requests_total",
                  {"transport": "resp", "command": "VEC.ADD", "code": "VEC_ERR_DIM"}) == 1
    assert sample("streamvec_requests_total",
                  {"transport": "resp", "command": "UNKNOWN", "code": "ERR"}) == 1
    assert sample("streamvec_request_seconds_count",
                  {"transport": "resp", "command": "VEC.ADD"}) == 2


# -- redis-cli ----------------------------------------------------------------------------
REDIS_CLI = shutil.which("redis-cli")
needs_cli = pytest.mark.skipif(
    REDIS_CLI is None, reason="redis-cli not installed (Debian: apt-get install redis-tools)")


def cli(port: int, *args: str, stdin: bytes | None = None) -> list[str]:
    assert REDIS_CLI is not None
    cmd = [REDIS_CLI, "-h", "127.0.0.1", "-p", str(port), *(["-x"] if stdin is not None else []),
           *args]
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
        token = cli(server.port, "VEC.ADD", TENANT, name, f"v{i}", "VECTOR",
                    stdin=v.astype("<f4").tobytes())[0]
    out = cli(server.port, "VEC.SEARCH", TENANT, name, "TOPK", "3", "CONSISTENCY", "session",
              token, "VECTOR", stdin=data[4].astype("<f4").tobytes())
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
            pieces.append(data[at:at + size])
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


RESP_PIECES = st.sampled_from([
    b"*", b"$", b"\r\n", b"\n", b"\r", b"0", b"1", b"2", b"3", b"-1", b"-", b"99999999999999",
    b"PING", b"ECHO", b"ping", b" ", b"\x00", b"+", b"abcd", b"*1\r\n$4\r\nPING\r\n",
    b"*2\r\n", b"$4\r\n", b"$-1\r\n", b"$3\r\nabc\r\n", b"$3\r\nabcd", b"*1\r\n*1\r\n",
])
FUZZ = st.one_of(
    st.binary(max_size=300),
    st.lists(RESP_PIECES, max_size=40).map(b"".join),
    st.lists(st.one_of(RESP_PIECES, st.binary(max_size=8)), max_size=30).map(b"".join),
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


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
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
