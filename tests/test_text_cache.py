"""L2 on the text query path (``VEC.QUERY`` / ``TextSearch``), on a real node: the real
offline embedder, the embedded log, the embedder processor, the keyword index, and RESP
through redis-py. A paraphrase is served from L2 at ``eventual``; a word-order swap or a
negation is not; ``session``/``strong`` never are; a write that changes a cached answer
invalidates it (dense: result-aware; hybrid: any write to the index)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import pytest
import redis

from streams.cache.canonical import CanonicalKeyMap
from streams.cache.controller import CacheController
from streams.cache.entry import CachedResult
from streams.cache.keys import query_key
from streams.cache.result_cache import ResultCache
from streams.cache.semantic import DEFAULT_L2_TEXT_THRESHOLD, DEFAULT_L2_VECTOR_THRESHOLD
from streams.config import Settings
from streams.embed import open_embedder
from streams.index.exceptions import InvalidRequest
from streams.index.model import CacheSettings, Consistency, IndexConfig
from streams.ingest import TEXT_FIELDS, QueryRequest, Source
from streams.schemas import catalog
from streams.service.resp import RespServer, serve_in_thread
from tests.test_ingest import KB

EMB = open_embedder()
CANON = CanonicalKeyMap()

CACHED = "How can I improve my English speaking skills?"
PARAPHRASE = "How do I improve my English speaking skills?"  # distance 0.012, agreement 0.875
SWAP = ("Why do Poles dislike Russians?", "Why do Russians dislike Poles?")
NEGATION = (
    "Why do sea otters hold hands while they sleep?",
    "Why do sea otters not hold hands while they sleep?",
)

DOCS = {
    "english": "Practise speaking English every day with native speakers to improve your "
    "English speaking skills and your pronunciation.",
    "english2": "Improve your English speaking skills by recording yourself speaking English.",
    "english3": "English speaking skills improve when you speak English with friends.",
    "otters": "Sea otters hold hands while they sleep so that they do not drift apart; "
    "otters sleep floating on their backs.",
    "poles": "Relations between Poles and Russians have a long and difficult history.",
    "coffee": "Coffee contains caffeine, which many people drink in the morning.",
    "python": "Python is a programming language that is easy to learn for beginners.",
}


def distance(a: str, b: str) -> float:
    va, vb = EMB.embed([CANON.canonical(a), CANON.canonical(b)])
    return 1.0 - float(va @ vb) / float(np.linalg.norm(va) * np.linalg.norm(vb))


class TextKB:
    """A KB whose index ``t/kb`` has L0 and L2 on, with :data:`DOCS` ingested."""

    def __init__(self, root: Path) -> None:
        self.kb = KB(root)
        config = IndexConfig(
            "t",
            "kb",
            EMB.dim,
            recipe="Flat",
            fields=TEXT_FIELDS,
            embedder="wordllama",
            cache=CacheSettings(("L0", "L2")),
        )
        self.kb.svc.dataplane.create_index(config)
        # L2 by distance alone (no cost-aware reuse, semantic.reuses): these tests are about
        # the text stage and consistency, and a tiny test search's cost is timing noise
        layers = self.kb.rig.node.service.cache_layers
        assert layers is not None
        layers.l2_text_penalty_ms = layers.l2_penalty_ms = 0.0
        self.tokens = [self.put(sid, text) for sid, text in DOCS.items()]
        self.settle(*self.tokens)

    def put(self, sid: str, text: str) -> str:
        return self.kb.svc.put_source(Source("t", "kb", sid, text=text)).token

    def delete(self, sid: str) -> str:
        return self.kb.svc.delete_source("t", "kb", sid).token

    def settle(self, *tokens: str) -> None:
        """Wait until the writes are embedded and applied, through an uncached query."""
        self.kb.svc.query(
            QueryRequest(
                "t",
                "kb",
                "settle",
                1,
                mode="keyword",
                consistency=Consistency.SESSION,
                tokens=tokens,
                timeout_ms=30_000,
            )
        )

    def query(
        self, text: str, level: Consistency = Consistency.EVENTUAL, **kw: Any
    ) -> tuple[list[str], dict[str, Any]]:
        tokens = tuple(self.tokens) if level is Consistency.SESSION else ()
        res = self.kb.svc.query(
            QueryRequest(
                "t", "kb", text, 3, consistency=level, tokens=tokens, timeout_ms=30_000, **kw
            )
        )
        return [h.id for h in res.hits], res.debug

    def fresh(self, text: str, **kw: Any) -> list[str]:
        """What a search computes for ``text``, bypassing every cache layer."""
        text_search = self.kb.rig.node.text
        ctl = self.kb.rig.node.service.cache_layers
        assert ctl is not None
        self.kb.rig.node.service.cache_layers = None
        try:
            res = text_search.search("t", "kb", text, 3, **kw)
        finally:
            self.kb.rig.node.service.cache_layers = ctl
        return [h.id for h in res.hits]


@pytest.fixture
def tkb(tmp_path: Path) -> Iterator[TextKB]:
    t = TextKB(tmp_path / "kb")
    yield t
    t.kb.close()


def _debug(raw: Any) -> dict[str, Any]:
    """VEC.QUERY's debug reply (RESP2: a flat list of pairs) as a dict."""
    if isinstance(raw, dict):
        items = list(raw.items())
    else:
        items = list(zip(raw[::2], raw[1::2], strict=True))
    out: dict[str, Any] = {}
    for k, v in items:
        key = k.decode() if isinstance(k, bytes) else k
        out[key] = v.decode() if isinstance(v, bytes) else v
    return out


# -- the thresholds ----------------------------------------------------------------------


def test_vector_and_text_thresholds_are_separate_settings() -> None:
    s = Settings()
    assert s.cache_l2_threshold == DEFAULT_L2_VECTOR_THRESHOLD == 0.003
    assert s.cache_l2_text_threshold == DEFAULT_L2_TEXT_THRESHOLD == 0.02
    ctl = CacheController(ResultCache(1 << 20))
    node_default = IndexConfig("t", "a", 4, cache=CacheSettings(("L2",)))
    st = ctl.settings(node_default)
    assert (st.threshold, st.text_threshold) == (0.003, 0.02)
    own = IndexConfig(
        "t", "b", 4, cache=CacheSettings(("L2",), l2_threshold=0.001, l2_text_threshold=0.05)
    )
    st = ctl.settings(own)
    assert (st.threshold, st.text_threshold) == (0.001, 0.05)
    with pytest.raises(InvalidRequest) as err:
        CacheSettings(("L2",), l2_text_threshold=3.0)
    assert err.value.field == "cache.l2_text_threshold"


def test_the_per_index_text_threshold_goes_through_the_log(tkb: TextKB) -> None:
    node = tkb.kb.rig.node
    config = IndexConfig(
        "t",
        "own",
        EMB.dim,
        fields=TEXT_FIELDS,
        embedder="wordllama",
        cache=CacheSettings(("L0", "L2"), l2_text_threshold=0.015),
    )
    node.service.create_index(config)
    assert node.catch_up(30)
    applied = node.indexer.configs["t/own"]  # decoded from the Avro record on `indexes`
    assert applied.cache is not None and applied.cache.l2_text_threshold == 0.015
    assert applied.cache.l2_threshold is None
    ctl = node.service.cache_layers
    assert ctl is not None and ctl.settings(applied).text_threshold == 0.015


def test_records_written_before_the_field_read_it_as_unset() -> None:
    """BACKWARD: an IndexConfig written with v1 (no l2_text_threshold) reads with the
    current schema, the new field taking its default (the node's threshold)."""
    v1 = fastavro.parse_schema(json.loads(catalog.history("IndexConfig")[0]))
    current = fastavro.parse_schema(json.loads(catalog.load_schema("IndexConfig")))
    record = {
        "tenant": "t",
        "index": "kb",
        "dim": 4,
        "metric": "cosine",
        "dtype": "fp32",
        "recipe": "Flat",
        "filter_fields": [],
        "quotas": None,
        "cache": {"layers": ["L0", "L2"], "memory_budget_bytes": None, "l2_threshold": 0.004},
        "embedder": "wordllama",
        "created_ms": 1,
        "version": 1,
    }
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, v1, record)
    buf.seek(0)
    read = fastavro.schemaless_reader(buf, v1, current)
    assert isinstance(read, dict)
    cs = CacheSettings.from_avro(read["cache"])
    assert cs is not None and cs.l2_text_threshold is None and cs.l2_threshold == 0.004
    assert catalog.history("IndexConfig")[-1] == catalog.load_schema("IndexConfig")  # released


def test_an_any_write_entry_is_stale_after_a_write_or_a_generation_change() -> None:
    ctl = CacheController(ResultCache(1 << 20))
    c = IndexConfig("t", "i", EMB.dim, cache=CacheSettings(("L2",)))
    text = "How do I learn Python?"
    e = EMB.embed([CANON.canonical(text)])[0]

    def offer(generation: int) -> None:
        look = ctl.lookup_text(c, e, 5, None, text=text, variant="hybrid", generation=generation)
        assert look.layer == "none"
        entry = _entry(c, e, ["doc1"])
        out = ctl.offer_text(
            look, e, entry, text, any_write=True, variant="hybrid", generation=generation
        )
        assert out is not None and out.stored

    def layer(generation: int, variant: str = "hybrid") -> str:
        return ctl.lookup_text(
            c, e, 5, None, text=text, variant=variant, generation=generation
        ).layer

    offer(1)
    assert layer(1) == "L2" and layer(1, "dense") == "none"
    assert layer(2) == "none"  # the keyword index changed since: stale, and unlinked
    assert layer(1) == "none" and ctl.stats()["l2_clusters"] == 0
    offer(2)
    assert layer(2) == "L2"
    # a write to the index that the result-aware rule would not have matched
    ctl.cache.invalidate("t/i", (), ["some-other-id"])
    assert layer(2) == "none"


def _entry(c: IndexConfig, v: Any, ids: list[str]) -> CachedResult:
    n = len(ids)
    return CachedResult(
        query_key(c.key, c.metric, v, 5, None),
        c.key,
        c.metric,
        v,
        5,
        None,
        (-1,) * n,
        tuple(ids),
        tuple(1.0 - 0.1 * i for i in range(n)),
        (None,) * n,
    )


# -- served and refused ------------------------------------------------------------------


def test_a_paraphrase_vec_query_is_served_from_text_l2_at_eventual(tkb: TextKB) -> None:
    server = RespServer(tkb.kb.rig.node.service, port=0, ingest=tkb.kb.svc)
    with serve_in_thread(server):
        r = redis.Redis(port=server.port, socket_timeout=30)
        first, dbg = r.execute_command("VEC.QUERY", "t", "kb", "TOPK", 3, "TEXT", CACHED)
        d = _debug(dbg)
        assert d["layer"] != "L2" and json.loads(d["text_cache"])["decision"]["outcome"] == (
            "stored"
        )
        assert distance(CACHED, PARAPHRASE) <= DEFAULT_L2_TEXT_THRESHOLD
        hits, dbg = r.execute_command("VEC.QUERY", "t", "kb", "TOPK", 3, "TEXT", PARAPHRASE)
        d = _debug(dbg)
        assert d["layer"] == "L2" and d["cache_hit"] in (1, "1", True)
        assert 0.0 < float(d["distance"]) <= DEFAULT_L2_TEXT_THRESHOLD
        assert float(d["agreement"]) >= 0.8
        assert [h[0] for h in hits] == [h[0] for h in first]  # the cached answer
        assert hits[0][0].startswith(b"english#")
        # a smaller k is served from the same entry; the vector distance alone (0.003)
        # would not have served it
        hits2, dbg = r.execute_command("VEC.QUERY", "t", "kb", "TOPK", 2, "TEXT", PARAPHRASE)
        assert _debug(dbg)["layer"] == "L2" and [h[0] for h in hits2] == [h[0] for h in first][:2]
        assert float(_debug(dbg)["distance"]) > DEFAULT_L2_VECTOR_THRESHOLD
    stats = tkb.kb.rig.node.service.cache_layers.stats()  # type: ignore[union-attr]
    assert stats["layers"]["L2"]["hits"] == 2


@pytest.mark.parametrize("pair", [SWAP, NEGATION], ids=["word-order-swap", "negation"])
def test_a_word_order_swap_or_a_negation_is_not_served(tkb: TextKB, pair: tuple[str, str]) -> None:
    cached, asked = pair
    # the embedder puts both within the text threshold: only the text stage refuses them
    assert distance(cached, asked) <= DEFAULT_L2_TEXT_THRESHOLD
    _, dbg = tkb.query(cached)
    assert dbg["text_cache"]["decision"]["outcome"] == "stored"
    ids, dbg = tkb.query(asked)
    # not from text L2 (the swap embeds to the very same search vector, so the vector
    # path's exact L0 may answer it: that is what a fresh dense search returns)
    assert dbg["layer"] != "L2" and dbg["text_cache"]["layer"] == "none"
    assert ids == tkb.fresh(asked, mode="dense")
    stats = tkb.kb.rig.node.service.cache_layers.stats()  # type: ignore[union-attr]
    assert stats["layers"]["L2"]["hits"] == 0


@pytest.mark.parametrize("level", [Consistency.SESSION, Consistency.STRONG])
def test_session_and_strong_never_serve_text_l2(tkb: TextKB, level: Consistency) -> None:
    tkb.query(CACHED)
    ids, dbg = tkb.query(PARAPHRASE, level)
    assert dbg["layer"] != "L2" and dbg["text_cache"]["tolerant_skipped"] == ["L2"]
    assert ids == tkb.fresh(PARAPHRASE, mode="dense")
    for mode in ("hybrid", "dense"):
        tkb.query(CACHED, mode=mode)
        assert tkb.query(PARAPHRASE, level, mode=mode)[1]["layer"] != "L2"
    # bounded: served while the entry is younger than the bound
    assert tkb.query(PARAPHRASE, Consistency.BOUNDED, bound_ms=60_000)[1]["layer"] == "L2"
    time.sleep(0.3)
    assert tkb.query(PARAPHRASE, Consistency.BOUNDED, bound_ms=200)[1]["layer"] != "L2"


def test_keyword_mode_is_not_cached(tkb: TextKB) -> None:
    for _ in range(2):
        _, dbg = tkb.query(CACHED, mode="keyword")
        assert dbg["layer"] == "none" and "text_cache" not in dbg


# -- invalidation ------------------------------------------------------------------------


def test_a_write_that_enters_a_cached_dense_answer_invalidates_it(tkb: TextKB) -> None:
    before, _ = tkb.query(CACHED)
    assert tkb.query(PARAPHRASE)[1]["layer"] == "L2"
    tkb.settle(tkb.put("new", "How can I improve my English speaking skills quickly?"))
    ids, dbg = tkb.query(PARAPHRASE)
    assert dbg["layer"] != "L2" and not dbg["cache_hit"]
    assert "new#0" in ids and "new#0" not in before
    assert ids == tkb.fresh(PARAPHRASE, mode="dense")
    # and a delete of a chunk the cached answer holds
    tkb.query(CACHED)
    assert tkb.query(PARAPHRASE)[1]["layer"] == "L2"
    tkb.settle(tkb.delete("new"))
    ids, dbg = tkb.query(PARAPHRASE)
    assert dbg["layer"] != "L2" and "new#0" not in ids


def test_a_write_elsewhere_leaves_dense_cached_but_invalidates_hybrid(tkb: TextKB) -> None:
    """Dense answers are invalidated result-aware; hybrid ones by any write to the index
    (a chunk outside the answer can still move keyword ranks and BM25 statistics)."""

    def cache_both() -> None:
        tkb.query(CACHED)
        tkb.query(CACHED, mode="hybrid")
        assert tkb.query(PARAPHRASE)[1]["layer"] == "L2"
        ids, dbg = tkb.query(PARAPHRASE, mode="hybrid")
        assert dbg["layer"] == "L2" and dbg["mode"] == "hybrid"
        assert ids == tkb.fresh(CACHED, mode="hybrid")

    cache_both()
    # a delete of a chunk neither answer holds (it was a hybrid candidate all the same)
    assert "coffee#0" not in tkb.fresh(CACHED, mode="hybrid")
    tkb.settle(tkb.delete("coffee"))
    assert tkb.query(PARAPHRASE)[1]["layer"] == "L2"  # dense: untouched
    ids, dbg = tkb.query(PARAPHRASE, mode="hybrid")
    assert dbg["layer"] != "L2" and ids == tkb.fresh(PARAPHRASE, mode="hybrid")
    assert dbg["text_cache"]["decision"]["outcome"] == "stored"  # cached again, fresh
    assert tkb.query(PARAPHRASE, mode="hybrid")[1]["layer"] == "L2"
    # a far-away chunk that shares a keyword with the query
    cache_both()
    tkb.settle(tkb.put("far", "Skills of walruses: diving, improving their blubber."))
    assert tkb.query(PARAPHRASE)[1]["layer"] == "L2"
    ids, dbg = tkb.query(PARAPHRASE, mode="hybrid")
    assert dbg["layer"] != "L2" and ids == tkb.fresh(PARAPHRASE, mode="hybrid")


def test_dense_and_hybrid_answers_never_serve_each_other(tkb: TextKB) -> None:
    tkb.query(CACHED, mode="hybrid")
    _, dbg = tkb.query(PARAPHRASE)  # dense
    assert dbg["layer"] != "L2"
    _, dbg = tkb.query(PARAPHRASE, mode="hybrid", alpha=0.5)  # another fusion
    assert dbg["layer"] != "L2"
