"""Held (queued) chunks in the embedder processor (issue 5): what holding medium/low chunks
costs and what it buys, beside the baseline that appends every chunk with its batch.

Run from the repository root::

    nice -n 10 .venv/bin/python bench/ingest_queue_bench.py            # about a minute
    nice -n 10 .venv/bin/python bench/ingest_queue_bench.py --n 200    # smoke run

Each round opens a fresh embedded log, query node and embedder processor with the
``SmartVectorizer`` (real offline embedder), and feeds ``--n`` Sources (one chunk each,
the mix of ``bench/capacity_bench.py``: tracebacks, action items, repeats, plain text) in
bursts of 20 every 20 ms over ``VEC.SOURCE``'s path (``IngestService.put_source``), so the
processor is under continuous load. A reader subscribed to ``vectors`` notes when each
chunk appears. Modes, alternated ``--rounds`` times each: ``hold`` (medium/low chunks held,
appended when idle or after ``hold_max_age_ms``) and ``baseline`` (the same decisions with
``defer`` cleared: every chunk appended with its batch). Reported: time until every chunk
is in ``vectors`` (Sources/s), and put-to-append latency percentiles by decision and
priority.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.capacity_bench import chunk_texts
from streams.ingest import Source
from streams.ingest.catalog import NodeCatalog
from streams.ingest.chunker import Chunk
from streams.ingest.decision import VectorizeContext
from streams.ingest.processor import EmbedderProcessor
from streams.ingest.service import IngestService
from streams.ingest.state import IngestState
from streams.ingest.vectorize import SmartVectorizer, VectorizeDecision
from streams.log.embedded import EmbeddedLog
from streams.schemas.codec import AvroCodec
from streams.schemas.log_registry import LogRegistry
from streams.service.query_node import QueryNode
from streams.topics import Topics


class NoHold:
    """The same decisions, appended with their batch (the baseline)."""

    def __init__(self, inner: SmartVectorizer) -> None:
        self.inner = inner

    def decide(
        self, chunk: Chunk, vector: npt.NDArray[np.float32], context: VectorizeContext
    ) -> VectorizeDecision:
        return dataclasses.replace(self.inner.decide(chunk, vector, context), defer=None)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def one_round(root: Path, texts: list[str], hold: bool, max_age_ms: int) -> dict[str, Any]:
    topics = Topics()
    log = EmbeddedLog(root / "log", durability="none")
    log.ensure_topics(topics.specs())
    codec = AvroCodec(LogRegistry(log, topics))
    node = QueryNode(log, topics, codec, root / "node", head_capacity=2000).start()
    catalog_ = NodeCatalog(node)
    smart = SmartVectorizer()
    processor = EmbedderProcessor(
        log,
        topics,
        codec,
        node.dlq,
        IngestState(root / "ingest"),
        catalog_,
        vectorizer=smart if hold else NoHold(smart),
        hold_max_age_ms=max_age_ms,
    ).start()
    svc = IngestService(log, topics, codec, node.service, catalog_, processor)
    svc.create_text_index("t", "kb", "wordllama", recipe="Flat")
    seen: dict[str, tuple[float, str]] = {}
    stop = threading.Event()

    def read() -> None:
        sub = log.subscribe([topics.vectors])
        while not stop.is_set() or len(seen) < len(texts):
            for rec in sub.poll(500, 0.01):
                if rec.value is None:
                    continue
                meta = json.loads(codec.decode(rec.value)[1]["meta"] or "{}")
                sid = meta.get("source_id", "")
                vz = meta["vectorize"]
                label = f"{vz['decision']}:{vz.get('priority', '-')}"
                seen.setdefault(sid, (time.perf_counter(), label))
            if stop.is_set() and time.perf_counter() > deadline:
                break
        sub.close()

    deadline = float("inf")
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    put_at: dict[str, float] = {}
    start = time.perf_counter()
    for i, text in enumerate(texts):
        sid = f"s{i}"
        put_at[sid] = time.perf_counter()
        svc.put_source(Source("t", "kb", sid, text=text))
        if i % 20 == 19:
            time.sleep(0.02)
    deadline = time.perf_counter() + 60
    stop.set()
    reader.join()
    end = max(t for t, _ in seen.values())
    lat: dict[str, list[float]] = defaultdict(list)  # by decision:priority
    for sid, (t, label) in seen.items():
        lat[label].append((t - put_at[sid]) * 1000)
    out = {
        "sources_per_s": len(texts) / (end - start),
        "seen": len(seen),
        "held": processor.stats.held_chunks,
        "latency_ms": {
            p: {"n": len(xs), "p50": pct(xs, 50), "p99": pct(xs, 99)} for p, xs in lat.items()
        },
    }
    svc.close()
    node.close()
    log.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-age-ms", type=int, default=5_000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    print("load", os.getloadavg())
    texts = [t for t, _ in chunk_texts(args.n, np.random.default_rng(7))]
    results: dict[str, list[dict[str, Any]]] = {"hold": [], "baseline": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for mode in ("hold", "baseline"):
                res = one_round(Path(tmp) / f"{mode}{r}", texts, mode == "hold", args.max_age_ms)
                results[mode].append(res)
                print(mode, r, json.dumps(res))
    for mode, runs in results.items():
        print(mode, "sources/s", [round(x["sources_per_s"], 1) for x in runs])
    print("load", os.getloadavg())
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
