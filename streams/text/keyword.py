"""Keyword (BM25) search over chunk text: one tantivy index per tenant/index.

Why tantivy: a maintained Lucene-class engine (BM25, segment merges, deletes by term) with
Python bindings, so the scoring is the standard one and not ours to get wrong.

**Query safety.** A user's text is never given to tantivy's query parser. It is run through
the same analyzer the ``text`` field is indexed with (:data:`ANALYZER`: split on
non-alphanumerics, drop tokens over 40 bytes, lowercase, ASCII folding, English stemming)
and the tokens become term queries OR-ed together. There is no syntax to inject:
``title:x AND (y`` is just the tokens ``titl``, ``x``, ``and``, ``y``.

**Filters** use the data plane's grammar (:func:`streams.index.filters.parse_filter`, same
allow-list and errors as ``VEC.SEARCH``). Tag clauses become term queries on the ``tag``
field inside tantivy, so the top k is exact; numeric clauses are checked on the candidates
(numeric fields are stored with each document) and the candidate list doubles until k pass
or the matches run out.

**What is indexed**: the records of text indexes (:func:`is_text_index`) whose meta has a
``text`` string, text-only chunks included.

**Where it lives and how it recovers.** Each index is a directory under the node's data
directory, rebuilt from the node's RocksDB state when the node starts
(:meth:`KeywordIndexes.rebuild`) and then kept up to date by
:class:`streams.text.listener.KeywordListener`. Rebuilding, rather than saving the tantivy
files with each snapshot, means the keyword index describes exactly the positions the
state describes after a restore (snapshot checkpoint or full replay) with no second
artefact to keep in step; it costs one pass over the state at start (measured in
``bench/retrieval_bench.py``). The directory is scratch: it is wiped at start.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tantivy

from streams.index.exceptions import InvalidRequest
from streams.index.filters import Filter, NumericClause, TagClause, tag_term
from streams.index.model import IndexConfig

if TYPE_CHECKING:
    from streams.service.state import Entry, StateStore

__all__ = [
    "ANALYZER",
    "MAX_QUERY_CHARS",
    "KeywordDoc",
    "KeywordHit",
    "KeywordIndex",
    "KeywordIndexes",
    "doc_from_entry",
    "is_text_index",
]

MAX_QUERY_CHARS = 8192
MAX_QUERY_TERMS = 256
_TOKENIZER = "sv_text"
# 15 MB is tantivy's minimum writer arena; one writer thread per index keeps memory flat.
_WRITER_HEAP = 15_000_000

ANALYZER = (
    tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
    .filter(tantivy.Filter.remove_long(40))
    .filter(tantivy.Filter.lowercase())
    .filter(tantivy.Filter.ascii_fold())
    .filter(tantivy.Filter.stemmer("english"))
    .build()
)


def _schema() -> tantivy.Schema:
    sb = tantivy.SchemaBuilder()
    sb.add_text_field("id", stored=True, tokenizer_name="raw")
    sb.add_text_field("text", tokenizer_name=_TOKENIZER, index_option="freq")
    sb.add_text_field("tag", tokenizer_name="raw", index_option="basic")
    sb.add_bytes_field("num", stored=True, indexed=False)
    return sb.build()


@dataclass(frozen=True, slots=True)
class KeywordDoc:
    """One searchable chunk: its id, text, tags (``field:value`` or plain) and numeric
    fields (for filters)."""

    id: str
    text: str
    tags: tuple[str, ...] = ()
    numeric: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class KeywordHit:
    id: str
    score: float  # BM25, higher is better


def is_text_index(config: IndexConfig) -> bool:
    """Whether ``config``'s records are keyword-indexed: text indexes, those created with
    an embedder (``VEC.CREATE ... EMBEDDER``). Plain vector indexes are not, so they pay
    nothing for this (no state reads per write, no pass at start)."""
    return config.embedder is not None


def doc_from_entry(id: str, entry: Entry) -> KeywordDoc | None:
    """The keyword document of a stored record: its meta's ``text`` (None when the meta
    has no text, e.g. a plain vector)."""
    if not entry.meta:
        return None
    try:
        meta = json.loads(entry.meta)
    except ValueError:
        return None
    text = meta.get("text") if isinstance(meta, dict) else None
    if not isinstance(text, str) or not text:
        return None
    return KeywordDoc(id, text, tuple(entry.tags), dict(entry.numeric))


def query_terms(text: str) -> list[str]:
    """The analysed, de-duplicated terms of a user's query (order kept)."""
    if not isinstance(text, str):
        raise InvalidRequest("query text must be a string", field="text")
    if len(text) > MAX_QUERY_CHARS:
        raise InvalidRequest(f"query text over {MAX_QUERY_CHARS} characters", field="text")
    return list(dict.fromkeys(ANALYZER.analyze(text)))[:MAX_QUERY_TERMS]


class KeywordIndex:
    """The keyword index of one tenant/index in ``path`` (created empty; an existing
    directory is wiped). Writes are serialised by an internal lock; searches run
    concurrently and see every :meth:`apply` that has returned."""

    def __init__(self, path: Path) -> None:
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        self.path = path
        self._schema = _schema()
        self._index = tantivy.Index(self._schema, path=str(path), reuse=False)
        self._index.register_tokenizer(_TOKENIZER, ANALYZER)
        self._index.config_reader(reload_policy="manual")
        self._writer = self._index.writer(heap_size=_WRITER_HEAP, num_threads=1)
        self._lock = threading.Lock()
        # bumped after every change is visible: a result read at one generation is
        # current while it is unchanged (the text cache's hybrid entries)
        self.generation = 0

    def apply(self, upserts: Iterable[KeywordDoc], deletes: Iterable[str] = ()) -> None:
        """Delete ``deletes``, then add or replace ``upserts`` (an id present in both ends
        up as its upsert), in one commit; visible to searches when this returns."""
        with self._lock:
            for id in deletes:
                self._writer.delete_documents_by_term("id", id)
            for doc in upserts:
                self._writer.delete_documents_by_term("id", doc.id)
                tdoc = tantivy.Document()
                tdoc.add_text("id", doc.id)
                tdoc.add_text("text", doc.text)
                for tag in doc.tags:
                    tdoc.add_text("tag", tag_term(tag))
                if doc.numeric:
                    tdoc.add_bytes("num", json.dumps(dict(doc.numeric)).encode())
                self._writer.add_document(tdoc)
            self._writer.commit()
            self._index.reload()
            self.generation += 1

    def clear(self) -> None:
        with self._lock:
            self._writer.delete_all_documents()
            self._writer.commit()
            self._index.reload()
            self.generation += 1

    def __len__(self) -> int:
        return int(self._index.searcher().num_docs)

    def search(self, text: str, k: int, flt: Filter | None = None) -> list[KeywordHit]:
        """The ``k`` best chunks for ``text`` by BM25 that pass ``flt``, best first
        (ties by id). A text with no indexable term matches nothing."""
        terms = query_terms(text)
        if not terms or k <= 0:
            return []
        schema = self._schema
        text_q = tantivy.Query.boolean_query(
            [(tantivy.Occur.Should, tantivy.Query.term_query(schema, "text", t)) for t in terms]
        )
        clauses: list[tuple[tantivy.Occur, tantivy.Query]] = [(tantivy.Occur.Must, text_q)]
        numeric: list[NumericClause] = []
        for clause in flt.clauses if flt is not None else ():
            if isinstance(clause, TagClause):
                any_of = tantivy.Query.boolean_query(
                    [
                        (
                            tantivy.Occur.Should,
                            tantivy.Query.term_query(schema, "tag", f"{clause.field}:{v}"),
                        )
                        for v in clause.values
                    ]
                )
                occur = tantivy.Occur.MustNot if clause.negated else tantivy.Occur.Must
                clauses.append((occur, any_of))
            else:
                numeric.append(clause)
        query = tantivy.Query.boolean_query(clauses)
        searcher = self._index.searcher()
        limit = k if not numeric else max(4 * k, 64)
        while True:
            raw = searcher.search(query, limit, count=False).hits
            hits = list(self._hits(searcher, raw, numeric))
            if len(hits) >= k or len(raw) < limit:
                break
            limit *= 4
        hits.sort(key=lambda h: (-h.score, h.id))
        return hits[:k]

    @staticmethod
    def _hits(
        searcher: tantivy.Searcher,
        raw: list[tuple[Any, tantivy.DocAddress]],
        numeric: list[NumericClause],
    ) -> Iterator[KeywordHit]:
        for score, addr in raw:
            doc = searcher.doc(addr)
            if numeric:
                blob = doc.get_first("num")
                values = json.loads(blob) if blob else {}
                if not all(c.matches(frozenset(), values) for c in numeric):
                    continue
            yield KeywordHit(str(doc.get_first("id")), float(score))

    def close(self) -> None:
        with self._lock:
            self._writer.wait_merging_threads()


class KeywordIndexes:
    """The node's keyword indexes, one per tenant/index, under ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._indexes: dict[str, KeywordIndex] = {}
        self._lock = threading.Lock()

    def _path(self, key: str) -> Path:
        tenant, _, index = key.partition("/")
        return self.root / tenant / index

    def index(self, key: str) -> KeywordIndex:
        """The index of ``key`` (created empty when absent)."""
        with self._lock:
            ki = self._indexes.get(key)
            if ki is None:
                ki = self._indexes[key] = KeywordIndex(self._path(key))
            return ki

    def get(self, key: str) -> KeywordIndex | None:
        return self._indexes.get(key)

    def rebuild(self, state: StateStore, batch: int = 5000) -> int:
        """Wipe ``root`` and index every stored record with text; returns how many."""
        with self._lock:
            self._indexes.clear()
        if self.root.exists():
            shutil.rmtree(self.root)
        n = 0
        for config in state.configs():
            if not is_text_index(config):
                continue
            ki = self.index(config.key)
            docs: list[KeywordDoc] = []
            for id, entry in state.entries(config.key):
                doc = doc_from_entry(id, entry)
                if doc is not None:
                    docs.append(doc)
                if len(docs) >= batch:
                    ki.apply(docs)
                    n += len(docs)
                    docs = []
            ki.apply(docs)
            n += len(docs)
        return n

    def reset(self, key: str) -> None:
        """The index was created, recreated or dropped: forget its documents."""
        ki = self._indexes.get(key)
        if ki is not None:
            ki.clear()

    def generation(self, key: str) -> int:
        """:attr:`KeywordIndex.generation` of ``key`` (0 while it has none); read it
        before searching."""
        ki = self._indexes.get(key)
        return 0 if ki is None else ki.generation

    def search(self, key: str, text: str, k: int, flt: Filter | None = None) -> list[KeywordHit]:
        ki = self._indexes.get(key)
        return [] if ki is None else ki.search(text, k, flt)

    def close(self) -> None:
        with self._lock:
            for ki in self._indexes.values():
                ki.close()
