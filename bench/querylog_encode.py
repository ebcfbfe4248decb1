"""What one SearchEvent costs the query log's thread: fastavro vs the hand-written encoder
(``streams/cache/event_codec.py``), side by side in one process.

One query node as ``streamvec up`` runs it (the policy loop; the indexes of
``bench/cache_bench.py``). ``--queries`` unique queries are searched twice on the cached
index ``on`` (misses, then hits) and once on ``off`` (cache off); the events the node hands
its query log are kept (the emitter's ``emit`` is wrapped; nothing is appended meanwhile).
Then, alternating the encoders in rounds over the same events:

- ``encode``: build the event dict, complete it and encode its body (what the thread does
  per event, less the append);
- ``batch``: the emitter's whole ``_append`` of a batch of 500 (build, encode, frame,
  append to the embedded log): how long the thread holds the GIL per batch.

Prints microseconds per event (p50 over rounds) and the ratio fastavro / hand.

Run: ``OPENBLAS_NUM_THREADS=1 nice -n 10 .venv/bin/python -m bench.querylog_encode``
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.cache_bench import TENANT, K, build, unit_rows
from streams.cache import event_codec
from streams.cache.querylog import (
    _complete,
    _Removal,
    _removal_event,
    _search_event,
)
from streams.service.api import SearchRequest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    with tempfile.TemporaryDirectory() as tmp:
        log, node, _ = build(Path(tmp), 20_000, 128, 7, policy_loop=True)
        try:
            loop = node.policy_loop
            assert loop is not None
            emitter = loop.emitter
            kept: list[Any] = []

            def keep(item: Any) -> bool:
                kept.append(item)
                return True

            emitter.emit = keep  # type: ignore[method-assign]
            svc = node.service
            qs = unit_rows(np.random.default_rng(5), a.queries, 128)
            for index in ("on", "on", "off"):
                for v in qs:
                    svc.search(SearchRequest(TENANT, index, v, K))
            searches = [e for e in kept if isinstance(e, tuple)]
            hits = sum(1 for e in searches if e[5] is not None)
            print(
                f"{len(kept)} events: {hits} hits, {len(searches) - hits} misses, "
                f"{len(kept) - len(searches)} removals"
            )
            _, parsed = emitter.codec.writer(emitter._subject, emitter._schema)

            encoders = {
                "fastavro": event_codec.fastavro_encoder(parsed),
                "hand": event_codec.for_schema(emitter._schema),
            }
            assert encoders["hand"] is not None
            per: dict[tuple[str, str], list[float]] = {}
            pc = time.perf_counter
            for _ in range(a.rounds):
                for name, fn in encoders.items():
                    assert fn is not None
                    t0 = pc()
                    for item in kept:
                        if isinstance(item, _Removal):
                            e = _removal_event(item)
                        else:
                            e = _search_event(item)
                        fn(_complete(e))
                    per.setdefault(("encode", name), []).append((pc() - t0) / len(kept))
                    emitter.use_fastavro = name == "fastavro"
                    t0 = pc()
                    for i in range(0, len(kept), 500):
                        emitter._append(kept[i : i + 500])
                    per.setdefault(("batch", name), []).append((pc() - t0) / len(kept))
            assert emitter.failed == 0
            print("| step | fastavro us/event | hand us/event | fastavro / hand |")
            print("| --- | --- | --- | --- |")
            for step in ("encode", "batch"):
                slow_us = statistics.median(per[(step, "fastavro")]) * 1e6
                fast_us = statistics.median(per[(step, "hand")]) * 1e6
                print(f"| {step} | {slow_us:.1f} | {fast_us:.1f} | {slow_us / fast_us:.2f}x |")
            batch_ms = statistics.median(per[("batch", "hand")]) * 500 * 1e3
            print(f"GIL held per batch of 500 (hand): {batch_ms:.1f} ms")
        finally:
            node.close()
            log.close()


if __name__ == "__main__":
    main()
