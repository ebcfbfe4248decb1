"""kill -9 the node while its embedder processor is working through a stream of Sources
(appended, updated and deleted over RESP); after the restarts every Source is indexed
exactly once: for each Source the chunk ids in the index are exactly the chunker's output
for its last version, with that version's text, none missing, none extra. The child's
embedder journals every text before embedding it, so chunks embedded twice are counted."""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

from streams.embed import open_embedder
from streams.ingest import Chunker, Source
from tests.brokers import free_port

ROOT = Path(__file__).resolve().parents[1]
BATCH_SOURCES = 4


def start_child(data: Path, journal: Path, ports: dict[str, int]) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "STREAMVEC_HTTP_PORT": str(ports["http"]),
        "STREAMVEC_RESP_PORT": str(ports["resp"]),
        "STREAMVEC_REGISTRY_PORT": str(ports["registry"]),
        "STREAMVEC_HEAD_CAPACITY": "300",
        "STREAMVEC_SNAPSHOT_INTERVAL_S": "1",
        "STREAMVEC_INGEST_BATCH_SOURCES": str(BATCH_SOURCES),
    }
    with (data.parent / "child.log").open("ab") as err:  # read back when the test fails
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.ingest_crash_child", str(data), str(journal)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
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


def text_of(sid: str, serial: int, sentences: int) -> str:
    """Unique per (source, write): every chunk text of every version differs."""
    return " ".join(
        f"Note {sid} w{serial} s{i}: the embedder keeps {i} promises." for i in range(sentences)
    )


@pytest.mark.slow
def test_kill_9_embedder_mid_stream_indexes_every_source_once(tmp_path: Path) -> None:
    seed = int(os.environ.get("STREAMVEC_TEST_SEED") or int.from_bytes(os.urandom(4), "big"))
    rng = random.Random(seed)
    ports = {"http": free_port(), "resp": free_port(), "registry": free_port()}
    journal = tmp_path / "journal.jsonl"
    expected: dict[str, str] = {}  # source id -> text of its last acknowledged version
    gone: set[str] = set()  # deleted and not written since
    serial = 0
    rounds = 4
    for round_ in range(rounds):
        proc = start_child(tmp_path / "data", journal, ports)
        try:
            r = redis.Redis(port=ports["resp"], socket_timeout=60)
            if round_ == 0:
                r.execute_command(
                    "VEC.CREATE", "t", "kb", "EMBEDDER", "wordllama", "RECIPE", "HNSW32"
                )
            pipe = r.pipeline(transaction=False)
            for _ in range(rng.randrange(30, 70)):
                sid = f"s{rng.randrange(60)}"
                if sid in expected and rng.random() < 0.1:
                    pipe.execute_command("VEC.SOURCEDEL", "t", "kb", sid)
                    del expected[sid]
                    gone.add(sid)
                else:
                    serial += 1
                    text = text_of(sid, serial, rng.randrange(3, 120))
                    pipe.execute_command("VEC.SOURCE", "t", "kb", sid, "TEXT", text)
                    expected[sid] = text
                    gone.discard(sid)
            pipe.execute()  # every write acknowledged (durable on `documents`)
            time.sleep(rng.uniform(0.0, 0.6))  # the embedder is mid-stream
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    proc = start_child(tmp_path / "data", journal, ports)
    try:
        r = redis.Redis(port=ports["resp"], socket_timeout=120)
        try:
            r.execute_command(
                "VEC.QUERY",
                "t",
                "kb",
                "TEXT",
                "QUERY probe",
                "CONSISTENCY",
                "strong",
                "TIMEOUT",
                60_000,
            )
        except redis.ResponseError as exc:
            health = httpx.get(f"http://127.0.0.1:{ports['http']}/healthz").text
            log = (tmp_path / "child.log").read_text(errors="replace")[-3000:]
            raise AssertionError(f"seed {seed}: {exc}\nhealth: {health}\nlog: {log}") from exc
        embedder = open_embedder()
        chunker = Chunker()
        total = 0
        for sid, text in expected.items():
            chunks = chunker.chunk(Source("t", "kb", sid, text=text), embedder)
            total += len(chunks)
            for c in chunks:
                got = r.execute_command("VEC.GET", "t", "kb", c.id)
                got = dict(zip(got[::2], got[1::2], strict=True)) if isinstance(got, list) else got
                meta = json.loads(got[b"meta"])
                assert meta["text"] == c.text, f"seed {seed}: {c.id} has another text"
                assert meta["chunk"] == {"chunk_no": c.chunk_no, "start": c.start, "end": c.end}
            with pytest.raises(redis.ResponseError, match="VEC_ERR_NOT_FOUND"):
                r.execute_command("VEC.GET", "t", "kb", f"{sid}#{len(chunks)}")
        for sid in gone:
            with pytest.raises(redis.ResponseError, match="VEC_ERR_NOT_FOUND"):
                r.execute_command("VEC.GET", "t", "kb", f"{sid}#0")
        info = r.execute_command("VEC.INFO", "t", "kb")
        info = dict(zip(info[::2], info[1::2], strict=True)) if isinstance(info, list) else info
        assert json.loads(info[b"stats"])["live"] == total, f"seed {seed}: extra chunks"
    finally:
        proc.kill()
        proc.wait()
    counts = collections.Counter(
        json.loads(line) for line in journal.read_text(encoding="utf-8").splitlines()
    )
    twice = {t: n for t, n in counts.items() if n > 1 and not t.startswith("QUERY")}
    embedded = sum(n for t, n in counts.items() if not t.startswith("QUERY"))
    print(
        f"\nseed {seed}: {len(expected)} sources, {total} chunks live, {embedded} chunk "
        f"embeddings, {len(twice)} chunks embedded more than once after {rounds} kills"
    )
    # A chunk is embedded again only if the kill hit its batch before the batch's intent
    # was written: at most one batch (BATCH_SOURCES Sources) per kill.
    max_chunks = max(
        len(chunker.chunk(Source("t", "kb", "x", text=t), embedder)) for t in expected.values()
    )
    assert len(twice) <= rounds * BATCH_SOURCES * max_chunks
