"""RESP cache-hit path, this ``streams/service/resp.py`` against a baseline copy, side by side.

One query node (the indexes of ``bench/cache_bench.py``), ``--queries`` unique queries
cached on ``on`` (L0 hits), and two RESP servers over the same node in this process: the
current module and the baseline file (load it with ``--baseline``, e.g. the last commit's:
``git show HEAD:streams/service/resp.py > /tmp/resp_head.py``, and with
``--baseline-wire`` its ``resp_wire.py``, the parser and encoder). Measured, per query in a
seeded random order:

1. **in process**: ``_execute`` of the ``VEC.SEARCH`` plus the reply's encoding, on the
   server's own session object (no socket), for each server, and ``VectorService.search``
   of the same query alone (the data plane's share);
2. **over a socket**: a client process (raw socket + hiredis, the lowest-overhead Python
   client) asks each server the same hit; p50/p99 at the client.

Prints p50/p99 per server and the ratios (current / baseline), with ``uptime``.

Run: ``nice -n 10 .venv/bin/python -m bench.resp_hit_ab --baseline /tmp/resp_head.py
--baseline-wire /tmp/resp_wire_head.py``
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.cache_bench import TENANT, K, RawClient, build, pack, summary_ms, unit_rows
from streams.service import resp as current
from streams.service.api import SearchRequest
from streams.service.resp_wire import encode_reply


def load_module(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def load_baseline(path: Path, wire: Path | None) -> Any:
    """The baseline ``resp.py``; with ``wire``, importing that ``resp_wire.py`` (its
    parser and encoder) instead of the current one."""
    if wire is None:
        return load_module("streams.service._resp_baseline", path)
    current_wire = sys.modules["streams.service.resp_wire"]
    sys.modules["streams.service.resp_wire"] = load_module(
        "streams.service._resp_wire_baseline", wire
    )
    try:
        return load_module("streams.service._resp_baseline", path)
    finally:
        sys.modules["streams.service.resp_wire"] = current_wire


def client(ports: list[int], queries_path: str, out_path: str, seed: int) -> None:
    q = np.load(queries_path)
    conns = [RawClient(port, f"ab-{i}") for i, port in enumerate(ports)]
    times: list[list[int]] = [[] for _ in ports]
    rng = np.random.default_rng(seed)

    def ask(i: int, v: np.ndarray) -> int:
        packed = pack(
            b"VEC.SEARCH",
            TENANT.encode(),
            b"on",
            b"TOPK",
            b"%d" % K,
            b"VECTOR",
            v.astype("<f4").tobytes(),
        )
        t = time.perf_counter_ns()
        conns[i].call(packed)
        return time.perf_counter_ns() - t

    for v in q[:50]:
        for i in range(len(ports)):
            ask(i, v)
    for v in q:
        for i in rng.permutation(len(ports)):
            times[int(i)].append(ask(int(i), v))
    for c in conns:
        c.close()
    Path(out_path).write_text(json.dumps(times))


def run(n: int, queries: int, seed: int, baseline: Path, wire: Path | None) -> dict[str, Any]:
    base_mod = load_baseline(baseline, wire)
    with tempfile.TemporaryDirectory(prefix="resp_ab_") as tmp:
        root = Path(tmp)
        log, node, _data = build(root, n, 128, seed)
        try:
            svc = node.service
            qs = unit_rows(np.random.default_rng(seed + 1), queries, 128)
            for v in qs:  # cached: every measured search is an L0 hit
                svc.search(SearchRequest(TENANT, "on", v, K))
            servers = {
                "current": current.RespServer(svc, "127.0.0.1", 0),
                "baseline": base_mod.RespServer(svc, "127.0.0.1", 0),
            }
            names = list(servers)
            # 1. in process
            sessions = {
                "current": current._Session(1, proto=3),
                "baseline": base_mod._Session(1, proto=3),
            }
            cmds = [
                [
                    b"VEC.SEARCH",
                    TENANT.encode(),
                    b"on",
                    b"TOPK",
                    b"%d" % K,
                    b"VECTOR",
                    v.astype("<f4").tobytes(),
                ]
                for v in qs
            ]
            inproc: dict[str, list[int]] = {name: [] for name in [*names, "search"]}
            rng = np.random.default_rng(seed + 2)
            requests = {
                args[-1]: SearchRequest(TENANT, "on", v, K)
                for args, v in zip(cmds, qs, strict=True)
            }

            async def one(name: str, args: list[bytes]) -> int:
                if name == "search":  # the data plane's part: VectorService.search alone
                    t = time.perf_counter_ns()
                    svc.search(requests[args[-1]])
                    return time.perf_counter_ns() - t
                srv, s = servers[name], sessions[name]
                t = time.perf_counter_ns()
                encode_reply(await srv._execute(s, args), 3)
                return time.perf_counter_ns() - t

            async def loop() -> None:
                for args in cmds[:50]:
                    for name in names:
                        await one(name, args)
                sides = list(inproc)
                for args in cmds:
                    for j in rng.permutation(len(sides)):
                        name = sides[int(j)]
                        inproc[name].append(await one(name, args))

            asyncio.run(loop())
            # 2. over a socket, from another process
            qpath, opath = root / "q.npy", root / "out.json"
            np.save(qpath, qs)
            with (
                current.serve_in_thread(servers["current"]) as a,
                base_mod.serve_in_thread(servers["baseline"]) as b,
            ):
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "bench.resp_hit_ab",
                        "--client",
                        str(a.port),
                        str(b.port),
                        str(qpath),
                        str(opath),
                        str(seed + 3),
                    ],
                    check=True,
                    cwd=Path(__file__).resolve().parents[1],
                )
            socket_times = dict(zip(names, json.loads(opath.read_text()), strict=True))
        finally:
            node.close()
            log.close()
    out: dict[str, Any] = {"queries": queries, "n": n}
    for what, data in (("in_process", inproc), ("socket", socket_times)):
        out[what] = {name: summary_ms(ns) for name, ns in data.items()}
        cur, base = out[what]["current"], out[what]["baseline"]
        out[what]["ratio_p50"] = round(cur["p50_ms"] / base["p50_ms"], 3)
        out[what]["ratio_p99"] = round(cur["p99_ms"] / base["p99_ms"], 3)
    out["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return out


def main() -> None:
    argv = sys.argv[1:]
    if os.environ.get("OPENBLAS_NUM_THREADS") != "1":  # as bench/cache_bench.py
        env = os.environ | {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        os.execve(sys.executable, [sys.executable, "-m", "bench.resp_hit_ab", *argv], env)
    if argv and argv[0] == "--client":
        client([int(argv[1]), int(argv[2])], argv[3], argv[4], int(argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", type=Path, required=True, help="a resp.py to compare with")
    ap.add_argument("--baseline-wire", type=Path, help="a resp_wire.py for the baseline")
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    r = run(args.n, args.queries, args.seed, args.baseline, args.baseline_wire)
    print(f"{r['queries']} L0 hits per server, {r['n']} vectors; {r['uptime']}\n")
    print("| VEC.SEARCH hit | current p50 / p99 ms | baseline p50 / p99 ms | ratio p50 | p99 |")
    print("| --- | --- | --- | --- | --- |")
    for what in ("in_process", "socket"):
        x = r[what]
        print(
            f"| {what.replace('_', ' ')} | {x['current']['p50_ms']} / {x['current']['p99_ms']}"
            f" | {x['baseline']['p50_ms']} / {x['baseline']['p99_ms']} | {x['ratio_p50']} | "
            f"{x['ratio_p99']} |"
        )
    search = r["in_process"]["search"]
    print(
        f"\nVectorService.search alone (the same hits, in the same rounds): p50 "
        f"{search['p50_ms']} / p99 {search['p99_ms']} ms"
    )


if __name__ == "__main__":
    main()
