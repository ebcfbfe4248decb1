"""kill -9 the node (``streamvec up``) while a redis-py client streams upserts and deletes
over RESP; after a restart every acknowledged write is visible with ``session``
consistency and no acknowledged delete comes back. The same test runs on both transports:
``embedded`` (the log in the data dir) and ``kafka`` (the log on the Tansu broker, which
outlives every restart of the node; state and snapshots stay in the data dir)."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis

from tests.brokers import free_port

ROOT = Path(__file__).resolve().parents[1]
DIM = 8


def start_node(data: Path, ports: dict[str, int], kafka: str | None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "STREAMVEC_HTTP_PORT": str(ports["http"]),
           "STREAMVEC_RESP_PORT": str(ports["resp"]),
           "STREAMVEC_REGISTRY_PORT": str(ports["registry"]),
           "STREAMVEC_HEAD_CAPACITY": "300", "STREAMVEC_SNAPSHOT_INTERVAL_S": "1"}
    args = ["up", "--data-dir", str(data)]
    if kafka is not None:
        # The broker is shared by the test session: topics of this test only.
        env["STREAMVEC_TOPIC_PREFIX"] = f"{data.name}."
        args += ["--kafka", kafka]
    with (data.parent / "node.log").open("ab") as err:  # read back when the test fails
        proc = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", *args],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err,
        )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", ports["resp"]), 0.2).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("node did not start: " + node_log(data)) from None
            time.sleep(0.1)


def node_log(data: Path) -> str:
    path = data.parent / "node.log"
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


@pytest.fixture(params=["embedded", pytest.param("kafka", marks=pytest.mark.kafka)])
def transport(request: pytest.FixtureRequest) -> str | None:
    """None for the embedded log, else the bootstrap address of the session's broker (a
    mark given in ``params`` is seen by ``-m`` at collection; one applied later is not)."""
    if request.param == "embedded":
        return None
    bootstrap: str = request.getfixturevalue("kafka_bootstrap")
    return bootstrap


@pytest.mark.slow
def test_kill_9_node_loses_no_acknowledged_write(tmp_path: Path, transport: str | None) -> None:
    seed = int(os.environ.get("STREAMVEC_TEST_SEED") or int.from_bytes(os.urandom(4), "big"))
    print(f"\nSTREAMVEC_TEST_SEED={seed}")
    rng = random.Random(seed)
    nrng = np.random.default_rng(rng.randrange(1 << 30))
    data = tmp_path / f"crash{uuid.uuid4().hex[:8]}"
    ports = {"http": free_port(), "resp": free_port(), "registry": free_port()}
    acked: dict[str, tuple[np.ndarray | None, str]] = {}  # id -> (vector or deleted, token)
    uncertain: set[str] = set()
    for round_ in range(3):
        proc = start_node(data, ports, transport)
        try:
            r = redis.Redis(port=ports["resp"], socket_timeout=30)
            if round_ == 0:
                r.execute_command("VEC.CREATE", "t", "crash", "DIM", DIM, "RECIPE", "HNSW32")
            kill_after = rng.randrange(50, 600)
            for i in range(kill_after):
                id = f"id{rng.randrange(400)}"
                if id in acked and acked[id][0] is not None and rng.random() < 0.3:
                    token = r.execute_command("VEC.DEL", "t", "crash", id)
                    acked[id] = (None, token.decode())
                else:
                    vec = nrng.standard_normal(DIM).astype("<f4")
                    token = r.execute_command("VEC.UPSERT", "t", "crash", id,
                                              "VECTOR", vec.tobytes())
                    acked[id] = (vec, token.decode())
                uncertain.discard(id)
                if i == kill_after - 1:
                    # one more write in flight while the node dies: its outcome is unknown
                    doomed = f"id{rng.randrange(400)}"
                    r.connection_pool.get_connection().send_command(
                        "VEC.UPSERT", "t", "crash", doomed, "VECTOR",
                        nrng.standard_normal(DIM).astype("<f4").tobytes())
                    uncertain.add(doomed)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
        proc = start_node(data, ports, transport)
        try:
            r = redis.Redis(port=ports["resp"], socket_timeout=30)
            check_acknowledged(r, acked, uncertain, rng, nrng, f"seed {seed} round {round_}")
        finally:
            proc.kill()
            proc.wait()


def check_acknowledged(
    r: redis.Redis, acked: dict[str, tuple[np.ndarray | None, str]], uncertain: set[str],
    rng: random.Random, nrng: np.random.Generator, where: str,
) -> None:
    """Every acknowledged write is read back (``session`` at its own token), no acknowledged
    delete is found by GET or SEARCH, and an acknowledged vector is its own nearest hit."""
    last = max((tok for _v, tok in acked.values()), key=lambda t: int(t.rsplit(":", 1)[1]))
    # Replay done (VEC.GET waits only 1 s for its token; a slow CI box may need more): a
    # node that never reaches the last acknowledged position fails here, after 30 s.
    r.execute_command("VEC.SEARCH", "t", "crash", "TOPK", 1, "VECTOR",
                      np.zeros(DIM, "<f4").tobytes(), "CONSISTENCY", "session", last,
                      "TIMEOUT", 30_000)
    for id, (vec, token) in acked.items():
        if id in uncertain:
            continue
        if vec is None:
            with pytest.raises(redis.ResponseError, match="VEC_ERR_NOT_FOUND"):
                r.execute_command("VEC.GET", "t", "crash", id, "CONSISTENCY", "session", last)
            hits, _debug = r.execute_command(
                "VEC.SEARCH", "t", "crash", "TOPK", 10, "VECTOR",
                nrng.standard_normal(DIM).astype("<f4").tobytes(),
                "CONSISTENCY", "session", last)
            assert id.encode() not in [h[0] for h in hits], f"{where}: deleted {id} is back"
        else:
            got = r.execute_command("VEC.GET", "t", "crash", id,
                                    "CONSISTENCY", "session", token)
            stored = got[1] if isinstance(got, list) else got[b"vector"]
            assert stored == vec.tobytes(), f"{where}: {id} lost its write"
    live = [(i, v) for i, (v, _t) in acked.items() if v is not None and i not in uncertain]
    for id, vec in rng.sample(live, min(20, len(live))):
        hits, _debug = r.execute_command(
            "VEC.SEARCH", "t", "crash", "TOPK", 1, "VECTOR", vec.tobytes(),
            "CONSISTENCY", "session", last)
        assert hits[0][0] == id.encode(), f"{where}: {id} is not its own nearest neighbour"
