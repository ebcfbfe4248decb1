"""Text-path L2 benchmark: ``VEC.QUERY`` (dense and hybrid) on an index with L2 on against
the same data on an index with the exact L0 only (the behaviour before), side by side in
one run.

Run from the repository root::

    .venv/bin/python bench/text_cache_bench.py                # 300 articles, 1,000 pairs
    .venv/bin/python bench/text_cache_bench.py --pairs 300    # quicker

Corpus: :func:`bench.corpus.load_wiki` articles, ingested into two indexes of one node
(``b/l2``: cache layers L0+L2 at the node's defaults; ``b/base``: L0 only). Queries: QQP
question pairs (``../shared/data/semantic-pairs``), the first ``--pairs`` duplicates
(label 1) and as many non-duplicates (label 0), shuffled. For each pair and mode, both
indexes answer ``text_a`` (the earlier question) then ``text_b`` (the one measured), at
``eventual``, ``TOPK 10``, alternating which index goes first.

Reported for ``text_b``: L2 hit rate (by label), latency p50/p95/p99 on each index and
the ratio, the latency of L2 hits alone, and how often a served answer equals what a fresh
search of ``text_b`` returns (``b/base``'s answer: same data, exact) -- the price of reuse
in retrieval terms (ids equal in order; mean top-10 overlap).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.corpus import load_wiki  # noqa: E402
from bench.qqp_distances import load_pairs  # noqa: E402
from streams.embed import open_embedder  # noqa: E402
from streams.index.model import CacheSettings, Consistency, IndexConfig  # noqa: E402
from streams.ingest import TEXT_FIELDS, QueryRequest, Source, SourceType, open_ingest  # noqa: E402
from streams.log.embedded import EmbeddedLog  # noqa: E402
from streams.schemas.codec import AvroCodec  # noqa: E402
from streams.schemas.log_registry import LogRegistry  # noqa: E402
from streams.service.query_node import QueryNode  # noqa: E402
from streams.topics import Topics  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--pairs", type=int, default=1000, help="duplicates (and as many others)")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    rows = load_pairs()
    dup = [r for r in rows if r["label"] == 1][: args.pairs]
    other = [r for r in rows if r["label"] == 0][: args.pairs]
    pairs = dup + other
    random.Random(args.seed).shuffle(pairs)
    docs = load_wiki(args.docs, download=False).documents
    emb = open_embedder()
    print(f"uptime load average: {os.getloadavg()}; {len(docs)} articles, {len(pairs)} pairs")

    root = Path(tempfile.mkdtemp(prefix="textcache-"))
    topics = Topics()
    log = EmbeddedLog(root / "log", durability="none")
    log.ensure_topics(topics.specs())
    codec = AvroCodec(LogRegistry(log, topics))
    node = QueryNode(log, topics, codec, root / "node", cache_budget_bytes=256 << 20).start()
    ingest = open_ingest(node, root / "ingest")
    try:
        for name, layers in (("l2", ("L0", "L2")), ("base", ("L0",))):
            node.service.create_index(
                IndexConfig(
                    "b",
                    name,
                    emb.dim,
                    recipe="Flat",
                    fields=TEXT_FIELDS,
                    embedder="wordllama",
                    cache=CacheSettings(layers),
                )
            )
        tokens: list[str] = []
        for name in ("l2", "base"):
            for d in docs:
                src = Source("b", name, d.id, text=d.text, type=SourceType.WEB)
                tokens.append(ingest.put_source(src).token)
        t0 = time.perf_counter()
        ingest.query(
            QueryRequest(
                "b",
                "l2",
                "x",
                1,
                mode="keyword",
                consistency=Consistency.SESSION,
                tokens=tuple(tokens),
                timeout_ms=600_000,
            )
        )
        print(f"ingested {len(tokens)} sources in {time.perf_counter() - t0:.1f} s")

        def ask(index: str, text: str, mode: str) -> tuple[float, list[str], dict[str, Any]]:
            t = time.perf_counter()
            res = ingest.query(QueryRequest("b", index, text, 10, mode=mode))  # type: ignore[arg-type]
            return (time.perf_counter() - t) * 1000, [h.id for h in res.hits], res.debug

        for mode in ("dense", "hybrid"):
            lat: dict[str, list[float]] = {"l2": [], "base": []}
            hit_ms: list[float] = []
            hits = {0: 0, 1: 0}
            equal = 0
            overlap: list[float] = []
            for i, r in enumerate(pairs):
                order = ("l2", "base") if i % 2 == 0 else ("base", "l2")
                for index in order:
                    ask(index, r["text_a"], mode)
                out: dict[str, tuple[float, list[str], dict[str, Any]]] = {}
                for index in order:
                    out[index] = ask(index, r["text_b"], mode)
                    lat[index].append(out[index][0])
                ms, ids, dbg = out["l2"]
                if dbg.get("layer") == "L2":
                    hits[r["label"]] += 1
                    hit_ms.append(ms)
                    fresh = out["base"][1]
                    equal += ids == fresh
                    overlap.append(len(set(ids) & set(fresh)) / max(1, len(fresh)))
            n_hit = hits[0] + hits[1]
            print(f"\n== {mode} ==")
            print(
                f"L2 hit rate: duplicates {hits[1] / len(dup):.4f}, "
                f"non-duplicates {hits[0] / len(other):.4f} ({n_hit} hits)"
            )
            for index in ("base", "l2"):
                xs = lat[index]
                print(
                    f"{index:>5}: p50 {pct(xs, 50):.3f} ms  p95 {pct(xs, 95):.3f}  "
                    f"p99 {pct(xs, 99):.3f}  mean {np.mean(xs):.3f}"
                )
            print(
                "ratio l2/base: p50 "
                f"{pct(lat['l2'], 50) / pct(lat['base'], 50):.3f}  p95 "
                f"{pct(lat['l2'], 95) / pct(lat['base'], 95):.3f}  mean "
                f"{np.mean(lat['l2']) / np.mean(lat['base']):.3f}"
            )
            if hit_ms:
                print(
                    f"L2 hits alone: p50 {pct(hit_ms, 50):.3f} ms  p95 {pct(hit_ms, 95):.3f}; "
                    f"answer equal to fresh {equal / n_hit:.3f}, "
                    f"mean top-10 overlap {np.mean(overlap):.3f}"
                )
        print(f"\ncache layers: {node.service.cache_layers.stats()['layers']}")  # type: ignore[union-attr]
    finally:
        ingest.close()
        node.close()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
