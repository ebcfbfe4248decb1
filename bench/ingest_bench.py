"""Ingest benchmark: the embedder processor end to end against the bare embedder, side by
side in one run.

Run from the repository root::

    .venv/bin/python bench/ingest_bench.py                 # 2,000 wiki articles
    .venv/bin/python bench/ingest_bench.py --docs 500      # quicker

Corpus: :func:`bench.corpus.load_wiki` article extracts as Sources (type ``web``).

* **baseline**: chunk every article with the same :class:`Chunker` and embed the chunks
  with ``WordLlamaEmbedder.embed`` in batches of 64, in this thread: no log, no index.
* **pipeline**: every article appended to ``documents`` as an Avro Source in batches of 500
  (the bulk path, as a Kafka producer would) on an embedded log (``group`` durability),
  then one ``strong`` query waits until every Source is embedded, appended and applied
  by the query node. chunks/s over the whole span; the ratio to the
  baseline is what the log, the processor, the index and the payloads cost.
* **time to searchable**: one Source at a time, ``put_source`` then a ``session`` query
  with its token that returns once the chunk is searchable; p50/p95/p99 over ``--probes``.
  Baseline: the same query at ``eventual`` on the indexed data (the query alone).
* **recall@10** of description queries by source id (hits of ``TOPK 30`` folded to their
  first 10 distinct sources), against exact cosine over whole-article embeddings (no
  chunking) in numpy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.corpus import load_wiki  # noqa: E402
from streams.embed import open_embedder  # noqa: E402
from streams.index.model import Consistency  # noqa: E402
from streams.ingest import Chunker, QueryRequest, Source, SourceType, open_ingest  # noqa: E402
from streams.ingest.service import hit_source  # noqa: E402
from streams.ingest.source import source_to_avro  # noqa: E402
from streams.log.embedded import EmbeddedLog  # noqa: E402
from streams.log.port import Record  # noqa: E402
from streams.schemas import catalog  # noqa: E402
from streams.schemas.codec import AvroCodec  # noqa: E402
from streams.schemas.log_registry import LogRegistry  # noqa: E402
from streams.service.query_node import QueryNode  # noqa: E402
from streams.topics import Topics  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--probes", type=int, default=200)
    ap.add_argument("--queries", type=int, default=300)
    args = ap.parse_args()
    corpus = load_wiki(args.docs, download=False)
    docs = corpus.documents
    embedder = open_embedder()
    chunker = Chunker()
    print(
        f"load average: {os.getloadavg()}, {len(docs)} articles, "
        f"median {statistics.median(len(d.text) for d in docs):.0f} chars"
    )

    # -- baseline: chunk + embed in this thread --------------------------------------------
    t0 = time.perf_counter()
    chunks = [c for d in docs for c in chunker.chunk(Source("b", "b", d.id, text=d.text), embedder)]
    texts = [c.text for c in chunks]
    for i in range(0, len(texts), 64):
        embedder.embed(texts[i : i + 64])
    base_s = time.perf_counter() - t0
    print(
        f"baseline: {len(chunks)} chunks in {base_s:.2f} s = {len(chunks) / base_s:,.0f} "
        f"chunks/s ({len(docs) / base_s:,.0f} sources/s)"
    )

    # -- the pipeline ---------------------------------------------------------------------
    root = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    log = EmbeddedLog(root / "log", durability="group")
    topics = Topics()
    log.ensure_topics(topics.specs())
    node = QueryNode(log, topics, AvroCodec(LogRegistry(log, topics)), root / "node").start()
    svc = open_ingest(node, root / "ingest")
    try:
        svc.create_text_index("b", "wiki", "wordllama")
        # the bulk path (what a Kafka producer does): records appended in batches of 500
        subject = catalog.subject_for(topics.documents)
        schema = catalog.load_schema("Source")
        records = [
            Record.of(
                topics.documents,
                f"b/wiki/{d.id}",
                node.service.codec.encode(
                    subject,
                    schema,
                    source_to_avro(
                        Source(
                            "b",
                            "wiki",
                            d.id,
                            text=d.text,
                            title=d.title,
                            type=SourceType.WEB,
                            timestamp_ms=1,
                        )
                    ),
                ),
            )
            for d in docs
        ]
        t0 = time.perf_counter()
        for i in range(0, len(records), 500):
            log.append_batch(records[i : i + 500])
        t_append = time.perf_counter() - t0
        ends = {(topics.documents, p): e for p, e in log.end_offsets(topics.documents).items()}
        assert svc.processor.processed.wait(ends, 600)
        t_proc = time.perf_counter() - t0
        svc.query(
            QueryRequest(
                "b", "wiki", "anything", 1, consistency=Consistency.STRONG, timeout_ms=600_000
            )
        )
        pipe_s = time.perf_counter() - t0
        live = node.service.info("b", "wiki")["stats"]["live"]
        print(
            f"pipeline: {live} chunks live in {pipe_s:.2f} s = {live / pipe_s:,.0f} chunks/s "
            f"({len(docs) / pipe_s:,.0f} sources/s; appends took {t_append:.2f} s, the "
            f"processor was done at {t_proc:.2f} s = {live / t_proc:,.0f} chunks/s); "
            f"ratio to baseline {(live / pipe_s) / (len(chunks) / base_s):.2f}"
        )

        # -- time to searchable -----------------------------------------------------------
        fresh, alone = [], []
        for i in range(args.probes):
            d = docs[i % len(docs)]
            t0 = time.perf_counter()
            tok = svc.put_source(Source("b", "wiki", f"probe{i}", text=d.text)).token
            hits = svc.query(
                QueryRequest(
                    "b",
                    "wiki",
                    d.title,
                    1,
                    consistency=Consistency.SESSION,
                    tokens=(tok,),
                    timeout_ms=60_000,
                )
            ).hits
            fresh.append((time.perf_counter() - t0) * 1000)
            assert hits
            t0 = time.perf_counter()
            svc.query(QueryRequest("b", "wiki", d.title, 1))
            alone.append((time.perf_counter() - t0) * 1000)
        print(
            "time to searchable (put + session query), ms: "
            f"p50 {pct(fresh, 50):.2f} p95 {pct(fresh, 95):.2f} p99 {pct(fresh, 99):.2f}; "
            f"query alone p50 {pct(alone, 50):.2f} p99 {pct(alone, 99):.2f}"
        )

        # -- recall@10 by source ----------------------------------------------------------
        queries = [q for q in corpus.queries if q.kind == "description"][: args.queries]
        whole = embedder.embed([d.text for d in docs])
        ids = [d.id for d in docs]
        qv = embedder.embed([q.text for q in queries])
        base_hit = pipe_hit = 0
        for q, v in zip(queries, qv, strict=True):
            top = np.argsort(-(whole @ v))[:10]
            base_hit += q.doc_id in {ids[j] for j in top}
            res = svc.query(QueryRequest("b", "wiki", q.text, 30))
            seen: list[str] = []
            for h in res.hits:
                sid, _ = hit_source(h.meta)
                if sid and not sid.startswith("probe") and sid not in seen:
                    seen.append(sid)
            pipe_hit += q.doc_id in seen[:10]
        print(
            f"recall@10 over {len(queries)} description queries: chunks via VEC.QUERY "
            f"{pipe_hit / len(queries):.3f}, whole articles exact {base_hit / len(queries):.3f}"
        )
    finally:
        svc.close()
        node.close()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
