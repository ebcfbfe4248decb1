"""The operator commands against a real node: ``streamvec search`` and ``streamvec snapshot``
talk to a running ``streamvec up --demo`` over HTTP; ``streamvec replay`` rebuilds the stopped
node from the log alone, keeps the old node directory, and gives the same search results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.brokers import free_port

ROOT = Path(__file__).resolve().parents[1]
QUERY = "0.1,0.2,-0.3,0.4,0.5,-0.6,0.7,0.8"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def _up(data: Path, ports: dict[str, int], *, demo: bool = True) -> subprocess.Popen[bytes]:
    env = {**os.environ, "STREAMVEC_HTTP_PORT": str(ports["http"]),
           "STREAMVEC_RESP_PORT": str(ports["resp"]),
           "STREAMVEC_REGISTRY_PORT": str(ports["registry"])}
    args = ["up", "--data-dir", str(data)] + (["--demo"] if demo else [])
    proc = subprocess.Popen([sys.executable, "-m", "streams.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{ports['http']}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("node did not start")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _search(url: str) -> list[str]:
    out = _cli("search", "demo", "products", "--vector", QUERY, "-k", "5",
               "--consistency", "strong", "--url", url, "--json")
    assert out.returncode == 0, out.stderr
    return [h["id"] for h in json.loads(out.stdout)["hits"]]


def test_search_snapshot_and_replay(tmp_path: Path) -> None:
    ports = {"http": free_port(), "resp": free_port(), "registry": free_port()}
    url = f"http://127.0.0.1:{ports['http']}"
    proc = _up(tmp_path, ports)
    try:
        before = _search(url)
        assert len(before) == 5
        table = _cli("search", "demo", "products", "--vector", QUERY, "--url", url)
        assert table.returncode == 0 and before[0] in table.stdout
        snap = _cli("snapshot", "--url", url)
        assert snap.returncode == 0, snap.stderr
        assert json.loads(snap.stdout)["snapshot"].startswith("snap-")
        bad = _cli("search", "demo", "products", "--vector", "1,2", "--url", url)
        assert bad.returncode == 2 and "VEC_ERR_DIM" in bad.stderr
    finally:
        _stop(proc)
    down = _cli("search", "demo", "products", "--vector", QUERY, "--url", url)
    assert down.returncode == 2 and "cannot reach" in down.stderr

    rebuilt = _cli("replay", "--data-dir", str(tmp_path))
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "replayed" in rebuilt.stdout
    kept = [p.name for p in tmp_path.iterdir() if p.name.startswith("node.replaced-")]
    assert len(kept) == 1
    proc = _up(tmp_path, ports, demo=False)  # only what replay rebuilt
    try:
        assert _search(url) == before
    finally:
        _stop(proc)
