"""What the query log's thread does to RESP hit latency, side by side in one run.

One query node as ``streamvec up`` runs it (the policy loop: policy holder and query log;
the indexes of ``bench/cache_bench.py``), ``--queries`` unique queries cached on ``on``;
then the RESP step of the cache bench (a client process per client kind: ``PING`` and a
``VEC.SEARCH`` hit, redis-py with hiredis) repeated in phases, alternated:

- ``--compare encoder`` (default): ``fastavro`` (the events' bodies written by
  ``fastavro.schemaless_writer``, the encoder before session 7) against ``hand`` (the
  default: ``streams/cache/event_codec.py``), then ``linger 10 ms`` (hand, the thread
  gathering a batch for 10 ms instead of the emitter's 50 ms); server threads do not
  help in these phases (the logging thread alone: the encoders compared as such);
- ``--compare yield`` (session 6): ``yield``, the query log's thread letting a waiting
  thread have the GIL after each millisecond of encoding
  (``streams.cache.querylog.YIELD_GIL``, off by default) against ``no yield``, then
  ``linger 10 ms``;
- ``--compare switch``: the interpreter's GIL switch interval (``sys.setswitchinterval``:
  how long a thread waiting for the GIL lets the holder run before asking it to drop)
  at Python's default 5 ms against 0.5 ms, hand encoder;
- last, ``no query log``: the emitter stopped (events dropped at once): the floor.

Prints p50/p99 at the client per phase (``PING``, a hit, and an uncached search of the
cache-off index), with ``uptime``.

Run: ``OPENBLAS_NUM_THREADS=1 nice -n 10 .venv/bin/python -m bench.querylog_tail``
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import streams.cache.querylog as querylog
from bench.cache_bench import TENANT, K, build, run_resp, unit_rows
from streams.service.api import SearchRequest

CLIENT = "redis-py+hiredis"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2, help="pairs of the compared phases")
    ap.add_argument(
        "--compare", choices=("encoder", "yield", "switch", "help"), default="encoder"
    )
    a = ap.parse_args()
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        log, node, _ = build(root, 20_000, 128, 7, policy_loop=True)
        try:
            svc = node.service
            qs = unit_rows(np.random.default_rng(5), a.queries, 128)
            for v in qs:
                svc.search(SearchRequest(TENANT, "on", v, K))
            loop = node.policy_loop
            assert loop is not None
            emitter = loop.emitter
            linger = emitter.linger_s
            hand, slow = False, True  # QueryLogEmitter.use_fastavro
            # (name, yield the GIL, linger, fastavro encoder, switch interval s, help)
            switch = sys.getswitchinterval()
            phases: list[tuple[str, bool, float, bool, float, bool]]
            if a.compare == "help":
                phases = [
                    ("logging thread alone", False, linger, hand, switch, False),
                    ("RESP thread helps", False, linger, hand, switch, True),
                ]
            elif a.compare == "yield":
                phases = [
                    ("yield", True, linger, hand, switch, False),
                    ("no yield", False, linger, hand, switch, False),
                ]
            elif a.compare == "switch":
                phases = [
                    ("switch 5 ms", False, linger, hand, 0.005, False),
                    ("switch 0.5 ms", False, linger, hand, 0.0005, False),
                ]
            else:
                phases = [
                    ("fastavro", False, linger, slow, switch, False),
                    ("hand", False, linger, hand, switch, False),
                ]
            phases *= a.rounds
            if a.compare in ("encoder", "yield"):
                phases += [("linger 10 ms", False, 0.01, hand, switch, False)] * a.rounds
            print("| phase | PING p50 / p99 ms | hit p50 / p99 ms | uncached p50 / p99 ms |")
            print("| --- | --- | --- | --- |")
            last = [*phases, ("no query log", False, linger, hand, switch, False)]
            for i, (name, flag, wait_s, encode, interval, helped) in enumerate(last):
                emitter.helped = helped
                sys.setswitchinterval(interval)
                querylog.YIELD_GIL = flag
                emitter.linger_s = wait_s
                emitter.use_fastavro = encode
                if name == "no query log":
                    loop.emitter.close()
                    loop.emitter.capacity = 0  # every event dropped at emit
                c = run_resp(node, root, qs, 7 + i)["client"]
                ping, hit, off = c[f"{CLIENT}/ping"], c[f"{CLIENT}/hit"], c[f"{CLIENT}/off"]
                print(
                    f"| {name} | {ping['p50_ms']} / {ping['p99_ms']} | "
                    f"{hit['p50_ms']} / {hit['p99_ms']} | {off['p50_ms']} / {off['p99_ms']} |"
                )
        finally:
            querylog.YIELD_GIL = False
            node.close()
            log.close()


if __name__ == "__main__":
    main()
