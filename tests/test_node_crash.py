"""kill -9 the node (``streamvec up``) while a redis-py client streams upserts and deletes
over RESP; after a restart every acknowledged write is visible with ``session``
consistency and no acknowledged delete comes back."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from tests.brokers import free_port

ROOT = Path(__file__).resolve().parents[1]
DIM = 8


def start_node(data: Path, ports: dict[str, int]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "STREAMVEC_HTTP_PORT": str(ports["http"]),
           "STREAMVEC_RESP_PORT": str(ports["resp"]),
           "STREAMVEC_REGISTRY_PORT": str(ports["registry"]),
           "STREAMVEC_HEAD_CAPACITY": "300", "STREAMVEC_SNAPSHOT_INTERVAL_S": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streams.cli", "up", "--data-dir", str(data)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", ports["resp"]), 0.2).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("node did not start") from None
            time.sleep(0.1)


@pytest.mark.slow
def test_kill_9_node_loses_no_acknowledged_write(tmp_path: Path) -> None:
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    nrng = np.random.default_rng(rng.randrange(1 << 30))
    ports = {"http": free_port(), "resp": free_port(), "registry": free_port()}
    acked: dict[str, tuple[np.ndarray | None, str]] = {}  # id -> (vector or deleted, token)
    uncertain: set[str] = set()
    for round_ in range(3):
        proc = start_node(tmp_path, ports)
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
        proc = start_node(tmp_path, ports)
        try:
            r = redis.Redis(port=ports["resp"], socket_timeout=30)
            last = max((tok for _v, tok in acked.values()), key=lambda t: int(t.rsplit(":", 1)[1]))
            for id, (vec, token) in acked.items():
                if id in uncertain:
                    continue
                if vec is None:
                    with pytest.raises(redis.ResponseError, match="VEC_ERR_NOT_FOUND"):
                        r.execute_command("VEC.GET", "t", "crash", id,
                                          "CONSISTENCY", "session", last)
                    hits, _debug = r.execute_command(
                        "VEC.SEARCH", "t", "crash", "TOPK", 10, "VECTOR",
                        nrng.standard_normal(DIM).astype("<f4").tobytes(),
                        "CONSISTENCY", "session", last)
                    assert id.encode() not in [h[0] for h in hits]
                else:
                    got = r.execute_command("VEC.GET", "t", "crash", id,
                                            "CONSISTENCY", "session", token)
                    stored = got[1] if isinstance(got, list) else got[b"vector"]
                    assert stored == vec.tobytes(), f"round {round_}: {id} lost its write"
            # the nearest neighbour of an acknowledged vector is itself
            live = [(i, v) for i, (v, _t) in acked.items() if v is not None and i not in uncertain]
            for id, vec in rng.sample(live, min(20, len(live))):
                hits, _debug = r.execute_command(
                    "VEC.SEARCH", "t", "crash", "TOPK", 1, "VECTOR", vec.tobytes(),
                    "CONSISTENCY", "session", last)
                assert hits[0][0] == id.encode()
        finally:
            proc.kill()
            proc.wait()
