"""Capacity manager and smart vectorization (issue 5, deliverables 3 and 4), one run.

Run from the repository root::

    nice -n 10 .venv/bin/python bench/capacity_bench.py            # about a minute, 2 cores
    nice -n 10 .venv/bin/python bench/capacity_bench.py --n 1000   # smoke run

Three measurements, each beside its baseline in the same run:

* **write path**: ``VectorService.upsert`` (durability ``none``) into an index with a
  budget (admission runs on every new id, never refusing: the budget is 10x the data)
  against an index without one, interleaved in rounds of 100 so both see the same load;
  writes/s and per-write latency percentiles; and the admission check alone (µs/call).
* **tick**: one ``CapacityManager.tick`` on an index just over 95 % of ``max_vectors`` (scan,
  duplicate pass, expiry, archive down to 70 %) against a tick of the same index below
  80 % (scan and TTL expiry only); seconds, and what was done.
* **decisions**: ``SmartVectorizer.decide`` (importance regexes, novelty against the
  index's search and the in-process window) against the processor's default
  ``IndexNow`` on the same embedded chunks, and against the embedding of those chunks
  (the step the processor runs anyway); chunks/s, latency and the mix of decisions.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from streams.embed import open_embedder
from streams.index.model import IndexConfig, IndexQuotas, VectorUpsert
from streams.ingest.chunker import Chunk
from streams.ingest.decision import IndexNow, VectorizeContext
from streams.ingest.source import Source, SourceType
from streams.ingest.vectorize import IndexNeighbours, SmartVectorizer
from streams.log.embedded import EmbeddedLog
from streams.schemas.codec import AvroCodec
from streams.schemas.log_registry import LogRegistry
from streams.service.query_node import QueryNode
from streams.topics import Topics

DIM = 64


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def open_node(root: Path) -> tuple[EmbeddedLog, QueryNode]:
    topics = Topics()
    log = EmbeddedLog(root / "log", durability="none")
    log.ensure_topics(topics.specs())
    codec = AvroCodec(LogRegistry(log, topics))
    return log, QueryNode(log, topics, codec, root / "node", head_capacity=2000).start()


def bench_writes(node: QueryNode, n: int, rng: np.random.Generator) -> dict[str, Any]:
    svc = node.service
    svc.create_index(IndexConfig("b", "free", DIM, recipe="Flat"))
    svc.create_index(
        IndexConfig("b", "budget", DIM, recipe="Flat", quotas=IndexQuotas(max_vectors=10 * n))
    )
    assert node.catch_up(30)
    lat: dict[str, list[float]] = {"free": [], "budget": []}
    wall = {"free": 0.0, "budget": 0.0}
    vecs = rng.standard_normal((n, DIM)).astype(np.float32)
    for start in range(0, n, 100):
        for index in ("free", "budget") if start % 200 == 0 else ("budget", "free"):
            t0 = time.perf_counter()
            for i in range(start, min(n, start + 100)):
                t = time.perf_counter()
                svc.upsert(VectorUpsert("b", index, f"v{i}", vecs[i], '{"importance": 0.5}'))
                lat[index].append((time.perf_counter() - t) * 1e6)
            wall[index] += time.perf_counter() - t0
    out: dict[str, Any] = {}
    for index in ("free", "budget"):
        out[index] = {
            "writes_per_s": round(n / wall[index]),
            "p50_us": round(pct(lat[index], 50), 1),
            "p99_us": round(pct(lat[index], 99), 1),
        }
    out["ratio_budget_over_free"] = round(
        out["budget"]["writes_per_s"] / out["free"]["writes_per_s"], 3
    )
    # the admission check alone, on the same index (what the budget adds to a write)
    config = node.indexer.configs["b/budget"]
    record = VectorUpsert("b", "budget", "probe", vecs[0], '{"importance": 0.5}')
    t0 = time.perf_counter()
    for _ in range(n):
        node.capacity.check(config, record, is_new=True)
    out["admission_check_us"] = round((time.perf_counter() - t0) / n * 1e6, 2)
    return out


def fill(node: QueryNode, index: str, n: int, max_vectors: int, rng: np.random.Generator) -> None:
    svc = node.service
    svc.create_index(
        IndexConfig("b", index, DIM, recipe="Flat", quotas=IndexQuotas(max_vectors=max_vectors))
    )
    assert node.catch_up(30)
    base = rng.standard_normal((n, DIM)).astype(np.float32)
    for i in range(n):
        vec, meta, ttl = base[i], {"vectorize": {"importance": float(rng.random())}}, None
        if i % 20 == 1:  # 5 % near-duplicates of the previous vector
            vec = base[i - 1] + 1e-3 * rng.standard_normal(DIM).astype(np.float32)
        elif i % 20 == 2:  # 5 % temporaries
            ttl = 3_600_000
        svc.upsert(VectorUpsert("b", index, f"v{i}", vec, json.dumps(meta), ttl_ms=ttl))
    assert node.catch_up(60)


def bench_tick(node: QueryNode, n: int, rng: np.random.Generator) -> dict[str, Any]:
    fill(node, "full", n, int(n / 0.95), rng)  # just over 95 %: the last id admitted
    fill(node, "calm", n, int(n / 0.5), rng)  # 50 %
    configs = node.indexer.configs
    out: dict[str, Any] = {}
    for index in ("calm", "full"):
        t0 = time.perf_counter()
        actions = node.capacity.tick_index(configs[f"b/{index}"])
        seconds = time.perf_counter() - t0
        done = Counter()
        for a in actions:
            done[a.operation] += len(a.ids) or 1
        out[index] = {
            "vectors": n,
            "seconds": round(seconds, 3),
            "done": dict(done),
            "utilisation_after": node.capacity.info(f"b/{index}")["utilisation"],
        }
    out["ratio_full_over_calm"] = round(out["full"]["seconds"] / out["calm"]["seconds"], 1)
    return out


_WORDS = (
    "billing service deploy customer invoice otter heron lake meeting design budget garden "
    "release review gateway card payment report quarter region team plan note lunch"
)
WORDS = _WORDS.split()


def chunk_texts(n: int, rng: np.random.Generator) -> list[tuple[str, SourceType]]:
    out = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 40))))
        kind = i % 10
        if kind == 0:
            text = (
                f'Traceback (most recent call last):\n  File "x.py", line {i}\nValueError: {words}'
            )
        elif kind == 1:
            text = f"Action items: deploy the hotfix before the deadline. {words}"
        elif kind == 2 and i > 10:
            text = out[i - 10][0]  # an exact repeat
        else:
            text = words.capitalize() + "."
        out.append((text, SourceType.CHAT if kind in (3, 4) else SourceType.FILE))
    return out


def bench_decisions(node: QueryNode, n: int, rng: np.random.Generator) -> dict[str, Any]:
    embedder = open_embedder()
    config = IndexConfig("b", "kb", embedder.dim, recipe="Flat")
    node.service.create_index(config)
    assert node.catch_up(30)
    # an index already holding n chunks, so novelty asks a real search
    seed = chunk_texts(n, rng)
    seed_vecs = embedder.embed([t for t, _ in seed])
    for i, v in enumerate(seed_vecs):
        node.service.upsert(VectorUpsert("b", "kb", f"seed{i}", v))
    assert node.catch_up(60)
    texts = chunk_texts(n, rng)
    vecs = embedder.embed([t for t, _ in texts])
    items = []
    for i, ((text, kind), v) in enumerate(zip(texts, vecs, strict=True)):
        src = Source("b", "kb", f"s{i}", text=text, type=kind)
        items.append((Chunk(f"s{i}", 0, 0, len(text), text), v, VectorizeContext(config, src, 1)))
    out: dict[str, Any] = {}
    t0 = time.perf_counter()  # the step the processor runs anyway, per chunk
    for start in range(0, n, 64):
        embedder.embed([t for t, _ in texts[start : start + 64]])
    out["embed_per_chunk_us"] = round((time.perf_counter() - t0) / n * 1e6, 1)
    smart = SmartVectorizer(neighbours=IndexNeighbours(node.service))
    for name, vz in (("index_now", IndexNow()), ("smart", smart)):
        lat = []
        t0 = time.perf_counter()
        for chunk, v, ctx in items:
            t = time.perf_counter()
            vz.decide(chunk, v, ctx)
            lat.append((time.perf_counter() - t) * 1e6)
        wall = time.perf_counter() - t0
        out[name] = {
            "chunks_per_s": round(n / wall),
            "p50_us": round(pct(lat, 50), 1),
            "p99_us": round(pct(lat, 99), 1),
        }
    out["smart"]["decisions"] = smart.stats("b/kb")["decisions"]
    out["smart_decide_over_embed"] = round(
        1e6 / out["smart"]["chunks_per_s"] / out["embed_per_chunk_us"], 3
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=5000, help="vectors / chunks per measurement")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rng = np.random.default_rng(42)
    with tempfile.TemporaryDirectory() as tmp:
        log, node = open_node(Path(tmp))
        try:
            result = {
                "n": args.n,
                "loadavg_before": os.getloadavg(),
                "writes": bench_writes(node, args.n, rng),
                "tick": bench_tick(node, args.n, rng),
                "decisions": bench_decisions(node, min(args.n, 2000), rng),
                "loadavg_after": os.getloadavg(),
            }
        finally:
            node.close()
            log.close()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
