"""Retrieval quality of dense, keyword (BM25) and hybrid text search, end to end, on the
Wikipedia summaries of ``bench/corpus.py`` (10,033 articles nobody here wrote), with the
ingest throughput from ``documents`` to searchable.

Path measured: each article is a Source (its summary) appended to ``documents`` through
``IngestService.put_source``; the embedder processor chunks (128-token windows, 32
overlap), embeds with the default offline embedder and appends VectorRecords; the query
node applies them to RocksDB, FAISS and the keyword index. Searches go through
``QueryNode.text`` (``streams.text.TextSearch``), the API behind ``VEC.QUERY``.

Queries (one relevant article each): the Wikidata short description (semantic set) and
the title (keyword-friendly set). A chunk hit counts for its article; ranked chunk ids are
collapsed to articles (first occurrence) and cut at 10.

Side by side, in the same run:
- ``numpy cosine``: brute force over the very chunk vectors the node stored (the dense
  upper bound for this embedder and chunking);
- ``tantivy alone``: one document per article, tantivy's default ``en_stem`` analyzer and
  its lenient query parser, nothing of ours in between;
- ``embed only``: the embedder over the same chunk texts, no log, no index (the floor of
  ingest cost).

Alpha for ``hybrid alpha`` is tuned on the even-numbered queries of each set (grid 0..1
step 0.1, by MRR, offline from the dense and keyword candidate lists, which is what the
service fuses) and reported on the odd-numbered ones; every other figure is on the odd
half too.

Run::

    nice -n 10 .venv/bin/python -m bench.retrieval_bench [--limit N] [--queries N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tantivy

from bench.corpus import Corpus, Query, load_wiki, mrr, recall_at_k
from streams.embed import open_embedder
from streams.index.model import Consistency
from streams.ingest.service import QueryRequest, open_ingest
from streams.ingest.source import Source, SourceType
from streams.log.embedded import EmbeddedLog
from streams.schemas.codec import AvroCodec
from streams.schemas.log_registry import LogRegistry
from streams.service.query_node import QueryNode
from streams.text import KeywordIndexes, alpha_fusion
from streams.topics import Topics

TENANT, INDEX, K, DEPTH = "bench", "wiki", 10, 50
ALPHAS = [round(0.1 * i, 1) for i in range(11)]


def article_of(chunk_id: str) -> str:
    return chunk_id.rsplit("#", 1)[0]


def collapse(chunk_ids: Sequence[str], k: int = K) -> list[str]:
    out: list[str] = []
    for cid in chunk_ids:
        a = article_of(cid)
        if a not in out:
            out.append(a)
            if len(out) == k:
                break
    return out


def pct(xs: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(xs), p)) if xs else float("nan")


class Setup:
    """Log, node and ingest service in a scratch directory."""

    def __init__(self, root: Path) -> None:
        self.topics = Topics()
        self.log = EmbeddedLog(root / "log", durability="none")
        self.log.ensure_topics(self.topics.specs())
        self.codec = AvroCodec(LogRegistry(self.log, self.topics))
        # no result cache: every search is measured uncached
        self.node = QueryNode(
            self.log, self.topics, self.codec, root / "node", cache_enabled=False
        ).start()
        self.ingest = open_ingest(self.node, root / "ingest")

    def close(self) -> None:
        self.ingest.close()
        self.node.close()
        self.log.close()


def ingest(setup: Setup, corpus: Corpus, ids: dict[str, str]) -> dict[str, Any]:
    svc = setup.ingest
    svc.create_text_index(TENANT, INDEX, "wordllama", recipe="HNSW32")
    assert setup.node.catch_up(60)
    t0 = time.perf_counter()
    for d in corpus.documents:
        svc.put_source(
            Source(
                TENANT,
                INDEX,
                ids[d.id],
                text=d.text,
                type=SourceType.WEB,
                channel_id="wiki",
                title=d.title,
            )
        )
    t1 = time.perf_counter()
    # strong: waits until the processor has embedded every Source in the log and the node
    # has applied everything it appended, then searches
    svc.query(
        QueryRequest(TENANT, INDEX, "warmup", 1, consistency=Consistency.STRONG, timeout_ms=600_000)
    )
    t2 = time.perf_counter()
    chunks = sum(1 for _ in setup.node.state.entries(f"{TENANT}/{INDEX}"))
    return {
        "sources": len(corpus.documents),
        "chunks": chunks,
        "append_s": t1 - t0,
        "searchable_s": t2 - t0,
        "chunks_per_s": chunks / (t2 - t0),
        "sources_per_s": len(corpus.documents) / (t2 - t0),
    }


def stored_chunks(node: QueryNode) -> tuple[list[str], np.ndarray, list[str]]:
    ids, vecs, texts = [], [], []
    for id, entry in node.state.entries(f"{TENANT}/{INDEX}"):
        ids.append(id)
        vecs.append(entry.vector)
        texts.append(json.loads(entry.meta or "{}").get("text", ""))
    return ids, np.stack(vecs), texts


def tantivy_alone(corpus: Corpus, ids: dict[str, str], root: Path) -> Callable[[str], list[str]]:
    sb = tantivy.SchemaBuilder()
    sb.add_text_field("id", stored=True, tokenizer_name="raw")
    sb.add_text_field("text", tokenizer_name="en_stem")
    schema = sb.build()
    (root / "tantivy").mkdir()
    index = tantivy.Index(schema, path=str(root / "tantivy"))
    writer = index.writer(heap_size=50_000_000, num_threads=1)
    for d in corpus.documents:
        writer.add_document(tantivy.Document(id=ids[d.id], text=d.text))
    writer.commit()
    index.reload()
    searcher = index.searcher()

    def search(text: str) -> list[str]:
        query, _errors = index.parse_query_lenient(text, ["text"])
        return [searcher.doc(a)["id"][0] for _, a in searcher.search(query, K).hits]

    return search


def evaluate(
    name: str, ranked: list[list[str]], queries: list[Query], lat: list[float] | None
) -> dict[str, Any]:
    return {
        "system": name,
        "recall@10": recall_at_k(ranked, queries, K),
        "mrr@10": mrr(ranked, queries, K),
        "p50_ms": pct(lat, 50) if lat else None,
        "p99_ms": pct(lat, 99) if lat else None,
    }


def run(limit: int | None, max_queries: int | None, root: Path) -> dict[str, Any]:
    load = os.getloadavg()
    corpus = load_wiki(limit)
    ids = {d.id: f"w{i}" for i, d in enumerate(corpus.documents)}
    queries = [Query(q.id, q.text, q.kind, ids[q.doc_id]) for q in corpus.queries]
    setup = Setup(root)
    try:
        out: dict[str, Any] = {
            "corpus": corpus.source,
            "documents": len(corpus.documents),
            "loadavg_start": load,
        }
        out["ingest"] = ingest(setup, corpus, ids)
        node = setup.node
        # baselines built from what the node stored
        cids, matrix, texts = stored_chunks(node)
        embedder = open_embedder()
        t0 = time.perf_counter()
        embedder.embed(texts)
        embed_s = time.perf_counter() - t0
        out["ingest"]["embed_only_chunks_per_s"] = len(texts) / embed_s
        out["ingest"]["ratio_to_embed_only"] = out["ingest"]["chunks_per_s"] / (
            len(texts) / embed_s
        )
        t0 = time.perf_counter()
        rebuilt = KeywordIndexes(root / "rebuild").rebuild(node.state)
        out["keyword_rebuild"] = {"chunks": rebuilt, "s": time.perf_counter() - t0}
        lone = tantivy_alone(corpus, ids, root)
        text = node.text
        results: dict[str, Any] = {}
        for kind in ("description", "title"):
            qs = [q for q in queries if q.kind == kind]
            if max_queries is not None and len(qs) > max_queries:
                step = len(qs) / max_queries
                qs = [qs[int(i * step)] for i in range(max_queries)]
            tune, test = qs[0::2], qs[1::2]

            def lists(q: Query) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
                d = text.search(TENANT, INDEX, q.text, DEPTH, mode="dense").hits
                kw = text.search(TENANT, INDEX, q.text, DEPTH, mode="keyword").hits
                return [(h.id, h.score) for h in d], [(h.id, h.score) for h in kw]

            cand = [lists(q) for q in tune]
            best = max(
                ALPHAS,
                key=lambda a: mrr(
                    [collapse([i for i, _ in alpha_fusion(d, kw, a)]) for d, kw in cand], tune, K
                ),
            )
            tuned = {
                a: mrr(
                    [collapse([i for i, _ in alpha_fusion(d, kw, a)]) for d, kw in cand], tune, K
                )
                for a in ALPHAS
            }
            rows = []
            ranked, lat = [], []
            for q in test:
                t0 = time.perf_counter()  # embedding included, as in the node's dense mode
                v = embedder.embed([q.text])[0]
                order = np.argsort(-(matrix @ v))[:DEPTH]
                lat.append((time.perf_counter() - t0) * 1000)
                ranked.append(collapse([cids[i] for i in order]))
            rows.append(evaluate("numpy cosine (exact, same vectors)", ranked, test, lat))
            ranked, lat = [], []
            for q in test:
                t0 = time.perf_counter()
                ranked.append(lone(q.text))
                lat.append((time.perf_counter() - t0) * 1000)
            rows.append(evaluate("tantivy alone (en_stem, query parser)", ranked, test, lat))
            for label, mode, alpha in (
                ("dense", "dense", None),
                ("keyword", "keyword", None),
                ("hybrid RRF (k=60)", "hybrid", None),
                (f"hybrid alpha={best}", "hybrid", best),
            ):
                ranked, lat = [], []
                for q in test:
                    t0 = time.perf_counter()
                    hits = text.search(TENANT, INDEX, q.text, 3 * K, mode=mode, alpha=alpha).hits
                    lat.append((time.perf_counter() - t0) * 1000)
                    ranked.append(collapse([h.id for h in hits]))
                rows.append(evaluate(label, ranked, test, lat))
            results[kind] = {
                "tune_queries": len(tune),
                "test_queries": len(test),
                "best_alpha": best,
                "tune_mrr_by_alpha": tuned,
                "rows": rows,
            }
        out["results"] = results
        out["loadavg_end"] = os.getloadavg()
        return out
    finally:
        setup.close()


def report(out: dict[str, Any]) -> str:
    ing = out["ingest"]
    lines = [
        f"documents {out['documents']}, chunks {ing['chunks']}; load average "
        f"{out['loadavg_start'][0]:.2f} at start, {out['loadavg_end'][0]:.2f} at end",
        f"ingest documents -> searchable: {ing['searchable_s']:.1f} s, "
        f"{ing['chunks_per_s']:.0f} chunks/s ({ing['sources_per_s']:.0f} sources/s); "
        f"embedder alone {ing['embed_only_chunks_per_s']:.0f} chunks/s "
        f"(pipeline = {ing['ratio_to_embed_only']:.2f}x of it)",
        f"keyword index rebuild from state: {out['keyword_rebuild']['chunks']} chunks in "
        f"{out['keyword_rebuild']['s']:.2f} s",
    ]
    for kind, r in out["results"].items():
        lines.append(
            f"\n{kind} queries: tuned alpha on {r['tune_queries']}, "
            f"report on {r['test_queries']}; best alpha {r['best_alpha']}"
        )
        lines.append("| system | recall@10 | MRR@10 | p50 ms | p99 ms |")
        lines.append("| --- | ---: | ---: | ---: | ---: |")
        for row in r["rows"]:
            lat = (
                f"{row['p50_ms']:.2f} | {row['p99_ms']:.2f}"
                if row["p50_ms"] is not None
                else "- | -"
            )
            lines.append(
                f"| {row['system']} | {row['recall@10']:.3f} | {row['mrr@10']:.3f} | {lat} |"
            )
        lines.append(
            "tune MRR by alpha: "
            + ", ".join(f"{a}: {m:.3f}" for a, m in r["tune_mrr_by_alpha"].items())
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="articles (default: all)")
    ap.add_argument("--queries", type=int, default=None, help="queries per set (default all)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="retrieval-bench-"))
    try:
        out = run(args.limit, args.queries, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    print(report(out))


if __name__ == "__main__":
    main()
