"""Keyword (BM25) search, fusion and graph neighbours (streams.text), end to end on a real
query node: embedded log, RocksDB state, tantivy, the offline embedder, HTTP and RESP."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.embed import open_embedder
from streams.index.exceptions import InvalidRequest, NotFound
from streams.index.filters import parse_filter
from streams.index.model import (
    Consistency,
    FieldKind,
    FilterField,
    IndexConfig,
    VectorUpsert,
)
from streams.service.api import DataPlane, SearchRequest, SearchResponse
from streams.service.http import create_http_app
from streams.service.resp import RespServer, serve_in_thread
from streams.text import (
    RRF_K,
    KeywordDoc,
    KeywordIndex,
    alpha_fusion,
    min_max,
    neighbors,
    rrf,
)
from tests.rigs import Rig
from tests.test_http_api import serve

SESSION = Consistency.SESSION
FIELDS = (
    FilterField("source_type", FieldKind.TAG),
    FilterField("channel_id", FieldKind.TAG),
    FilterField("user_id", FieldKind.TAG),
    FilterField("year", FieldKind.NUMERIC),
)
KW_CONFIG = IndexConfig("acme", "kb", 4, fields=FIELDS)

DOCS = [
    (
        "a#0",
        "The river Seine flows through Paris and past the Louvre museum.",
        "file",
        "c1",
        "u1",
        2001,
    ),
    ("b#0", "Paris is the capital of France; its museums draw millions.", "web", "c1", "u2", 2010),
    ("c#0", "Running dogs chase cats along the river bank.", "chat", "c2", "u1", 2015),
    (
        "d#0",
        "Photosynthesis converts light into chemical energy in plants.",
        "file",
        "c2",
        "u3",
        1999,
    ),
    ("e#0", "The Louvre is the most visited museum in the world.", "chat", "c3", "u2", 2020),
]


def _tags(st_: str, ch: str, user: str) -> tuple[str, ...]:
    return (f"source_type:{st_}", f"channel_id:{ch}", f"user_id:{user}")


@pytest.fixture
def kw(tmp_path: Path) -> Iterator[KeywordIndex]:
    ki = KeywordIndex(tmp_path / "kw")
    ki.apply([KeywordDoc(i, t, _tags(s, c, u), {"year": y}) for i, t, s, c, u, y in DOCS])
    yield ki
    ki.close()


def ids(hits: Any) -> list[str]:
    return [h.id for h in hits]


# -- keyword index ------------------------------------------------------------------------
def test_bm25_ranks_matching_chunks_and_stems(kw: KeywordIndex) -> None:
    hits = kw.search("louvre museums", 10)
    assert set(ids(hits)) == {"a#0", "b#0", "e#0"}  # "museums" stems to "museum"
    assert ids(hits)[0] == "e#0"  # both terms, shortest document
    assert all(a.score >= b.score > 0 for a, b in itertools.pairwise(hits))
    assert ids(kw.search("RUNNING dog", 10)) == ["c#0"]  # case and stemming
    assert kw.search("zeppelin", 10) == []
    assert len(kw.search("the", 2)) == 2


def test_filters_on_source_type_channel_user_and_numeric(kw: KeywordIndex) -> None:
    def q(text: str, flt: str) -> set[str]:
        return set(ids(kw.search(text, 10, parse_filter(flt, KW_CONFIG))))

    assert q("museum", "source_type:chat") == {"e#0"}
    assert q("museum", "source_type:file|web") == {"a#0", "b#0"}
    assert q("museum paris river", "channel_id:c1 user_id:u2") == {"b#0"}
    assert q("museum paris river", "-user_id:u1") == {"b#0", "e#0"}
    assert q("museum paris river", "year>=2010") == {"b#0", "c#0", "e#0"}
    assert q("museum paris river", "year:[2000 2012] source_type:file") == {"a#0"}
    with pytest.raises(InvalidRequest) as err:  # the allow-list of the data plane
        parse_filter("colour:red", KW_CONFIG)
    assert err.value.field == "filter"


NASTY = [
    "title:x AND (",
    '"unbalanced',
    "*",
    "a~2^3",
    "[a TO",
    "\\",
    "NOT",
    "-",
    ":",
    "id:a#0",
    "text:paris OR",
    "((((",
    "museum)",
    '+-&&||!(){}[]^"~*?:\\/',
    "💥 é",
    "x" * 5000,
]


@pytest.mark.parametrize("text", NASTY)
def test_query_syntax_cannot_be_injected(kw: KeywordIndex, text: str) -> None:
    kw.search(text, 10)  # never raises
    # field syntax is just words: "id:a#0" is the tokens id, a, 0 (no document has them)
    assert kw.search("id:a#0", 10) == []
    assert ids(kw.search("text:paris OR", 10)) == ids(kw.search("paris", 10))


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_any_text_is_a_safe_query(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    ki = _shared_index(tmp_path_factory)
    hits = ki.search(text, 5)
    assert len(hits) <= 5 and all(h.score > 0 for h in hits)


_SHARED: dict[str, KeywordIndex] = {}


def _shared_index(factory: pytest.TempPathFactory) -> KeywordIndex:
    if "ki" not in _SHARED:
        ki = KeywordIndex(factory.mktemp("kw-shared"))
        ki.apply([KeywordDoc(i, t) for i, t, *_ in DOCS])
        _SHARED["ki"] = ki
    return _SHARED["ki"]


def test_replace_and_delete(kw: KeywordIndex) -> None:
    kw.apply([KeywordDoc("a#0", "Now about volcanoes only.")])
    assert "a#0" not in ids(kw.search("seine", 10))
    assert ids(kw.search("volcano", 10)) == ["a#0"]
    kw.apply([], ["a#0", "missing#9"])
    assert kw.search("volcano", 10) == [] and len(kw) == len(DOCS) - 1
    # an id in both: the upsert wins
    kw.apply([KeywordDoc("d#0", "Glaciers carve valleys.")], ["d#0"])
    assert ids(kw.search("glacier", 10)) == ["d#0"]
    kw.clear()
    assert len(kw) == 0


# -- fusion -------------------------------------------------------------------------------
ranked_lists = st.lists(
    st.sampled_from([f"d{i}" for i in range(12)]), unique=True, max_size=12
).map(lambda xs: [(x, float(len(xs) - i)) for i, x in enumerate(xs)])


@given(st.lists(ranked_lists, min_size=1, max_size=4))
def test_rrf_properties(lists: list[list[tuple[str, float]]]) -> None:
    fused = rrf(lists)
    assert {i for i, _ in fused} == {i for lst in lists for i, _ in lst}
    scores = [s for _, s in fused]
    assert scores == sorted(scores, reverse=True)
    assert all(0 < s <= len(lists) / (RRF_K + 1) for s in scores)
    assert rrf(list(reversed(lists))) == fused  # the order of the lists does not matter
    # exact value for each id
    for id, s in fused:
        want = sum(
            1 / (RRF_K + 1 + [x for x, _ in lst].index(id))
            for lst in lists
            if id in [x for x, _ in lst]
        )
        assert s == pytest.approx(want)
    # an id first in every list is first overall
    firsts = {lst[0][0] for lst in lists if lst}
    if len(firsts) == 1 and all(lists):
        assert fused[0][0] == firsts.pop()


@given(ranked_lists, ranked_lists, st.floats(0, 1))
def test_alpha_fusion_properties(
    dense: list[tuple[str, float]], keyword: list[tuple[str, float]], alpha: float
) -> None:
    fused = alpha_fusion(dense, keyword, alpha)
    assert {i for i, _ in fused} == {i for i, _ in dense} | {i for i, _ in keyword}
    assert all(-1e-9 <= s <= 1 + 1e-9 for _, s in fused)
    only_dense = [i for i, _ in alpha_fusion(dense, keyword, 1.0) if i in dict(dense)]
    assert only_dense == [i for i, _ in sorted(dense, key=lambda x: (-x[1], x[0]))]
    by_kw = [i for i, _ in alpha_fusion(dense, keyword, 0.0)][: len(keyword)]
    assert by_kw == [i for i, _ in sorted(keyword, key=lambda x: (-x[1], x[0]))]
    by_dense = [i for i, _ in alpha_fusion(dense, keyword, 1.0)][: len(dense)]
    assert by_dense == [i for i, _ in sorted(dense, key=lambda x: (-x[1], x[0]))]
    assert alpha_fusion(dense, keyword, alpha, limit=3) == fused[:3]


def test_fusion_rejects_bad_input() -> None:
    assert min_max([("a", 3.0), ("b", 3.0)]) == {"a": 1.0, "b": 1.0}
    with pytest.raises(ValueError):
        alpha_fusion([], [], 1.5)
    with pytest.raises(ValueError):
        min_max([("a", float("nan"))])


# -- on a real query node -----------------------------------------------------------------
@pytest.fixture(scope="module")
def embedder() -> Any:
    return open_embedder()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def _meta(id: str, text: str, source_type: str, **extra: Any) -> str:
    return json.dumps(
        {
            "text": text,
            "source_type": source_type,
            "channel_id": "c",
            "user_id": "u",
            "title": id,
            **extra,
        }
    )


def load_docs(rig: Rig, embedder: Any) -> tuple[IndexConfig, str]:
    config = IndexConfig(
        "acme", "kb", embedder.dim, fields=FIELDS, recipe="Flat", embedder="wordllama"
    )
    token = rig.node.service.create_index(config).token
    vecs = embedder.embed([t for _, t, *_ in DOCS])
    for (id, text, s, c, u, y), v in zip(DOCS, vecs, strict=True):
        token = rig.node.service.upsert(
            VectorUpsert("acme", "kb", id, v, _meta(id, text, s), _tags(s, c, u), {"year": y})
        ).token
    return config, token


def tsearch(rig: Rig, text: str, mode: str, token: str, k: int = 5, **kw: Any) -> list[str]:
    resp = rig.node.text.search(
        "acme",
        "kb",
        text,
        k,
        mode=mode,
        consistency=SESSION,
        tokens=(token,),
        timeout_ms=10_000,
        **kw,
    )
    return ids(resp.hits)


def test_listener_feeds_keyword_index_from_real_records(rig: Rig, embedder: Any) -> None:
    _, token = load_docs(rig, embedder)
    assert tsearch(rig, "louvre museum", "keyword", token)[0] == "e#0"
    hits = rig.node.text.search(
        "acme", "kb", "louvre", 5, mode="keyword", consistency=SESSION, tokens=(token,)
    ).hits
    assert json.loads(hits[0].meta or "")["source_type"] in ("chat", "file")  # payload joined
    assert tsearch(rig, "museum", "keyword", token, filter="source_type:web") == ["b#0"]
    # an update replaces the text; a delete removes it
    v = embedder.embed(["volcanoes"])[0]
    token = rig.node.service.upsert(
        VectorUpsert(
            "acme",
            "kb",
            "e#0",
            v,
            _meta("e#0", "Volcanoes erupt lava.", "chat"),
            _tags("chat", "c3", "u2"),
        )
    ).token
    assert "e#0" not in tsearch(rig, "louvre", "keyword", token)
    assert tsearch(rig, "volcano", "keyword", token) == ["e#0"]
    token = rig.node.service.delete("acme", "kb", "e#0").token
    assert tsearch(rig, "volcano", "keyword", token) == []
    # a text-only chunk: keyword-searchable, never returned by a vector search
    v = embedder.embed(["glacier"])[0]
    token = rig.node.service.upsert(
        VectorUpsert(
            "acme",
            "kb",
            "g#0",
            v,
            _meta("g#0", "Glaciers carve valleys.", "file", text_only=True),
            _tags("file", "c", "u"),
        )
    ).token
    assert tsearch(rig, "glaciers valleys", "keyword", token) == ["g#0"]
    assert "g#0" not in tsearch(rig, "glaciers valleys", "dense", token)
    assert "g#0" in tsearch(rig, "glaciers valleys", "hybrid", token)[:2]  # RRF tie at 1/61
    assert len(rig.node.keyword.index("acme/kb")) == len(DOCS)  # 4 of DOCS + g#0


def test_plain_vector_indexes_are_not_keyword_indexed(rig: Rig) -> None:
    rig.node.service.create_index(IndexConfig("acme", "plain", 2, recipe="Flat"))
    token = rig.node.service.upsert(
        VectorUpsert("acme", "plain", "x", np.ones(2, np.float32), json.dumps({"text": "paris"}))
    ).token
    assert (
        rig.node.text.search(
            "acme", "plain", "paris", 3, mode="keyword", consistency=SESSION, tokens=(token,),
            timeout_ms=10_000,
        ).hits
        == []
    )
    assert rig.node.keyword.get("acme/plain") is None  # no tantivy index, no state reads


def test_dense_keyword_hybrid_modes(rig: Rig, embedder: Any) -> None:
    _, token = load_docs(rig, embedder)
    dense = tsearch(rig, "photosynthesis in plants", "dense", token)
    assert dense[0] == "d#0" and len(dense) == 5
    assert tsearch(rig, "photosynthesis in plants", "keyword", token)[0] == "d#0"
    rrf_ids = tsearch(rig, "photosynthesis in plants", "hybrid", token)
    assert rrf_ids[0] == "d#0"
    resp = rig.node.text.search("acme", "kb", "paris museum", 3, mode="hybrid", alpha=0.0)
    assert resp.debug["fusion"] == "alpha"
    kw_only = ids(rig.node.text.search("acme", "kb", "paris museum", 3, mode="keyword").hits)
    assert ids(resp.hits) == kw_only  # alpha 0 = the keyword ranking
    assert set(tsearch(rig, "museum", "dense", token, filter="source_type:chat")) == {"c#0", "e#0"}
    hyb = set(tsearch(rig, "museum paris river", "hybrid", token, filter="channel_id:c1"))
    assert hyb == {"a#0", "b#0"}  # the filter holds for both lists of the fusion
    debug = rig.node.text.search("acme", "kb", "paris", 3, mode="keyword").debug
    assert debug["mode"] == "keyword" and debug["applied"] and debug["cache_hit"] is False
    for bad in ({"mode": "fuzzy"}, {"alpha": 2.0}, {"filter": "nope:x"}):
        with pytest.raises(InvalidRequest):
            rig.node.text.search("acme", "kb", "x", 3, **bad)
    with pytest.raises(InvalidRequest):
        rig.node.text.search("acme", "kb", "   ", 3, mode="keyword")
    with pytest.raises(NotFound):
        rig.node.text.search("acme", "nope", "x", 3)


def test_keyword_results_equal_after_restart(rig: Rig, embedder: Any) -> None:
    _, token = load_docs(rig, embedder)
    token = rig.node.service.delete("acme", "kb", "c#0").token
    queries = ["louvre museum", "paris", "river dogs", "energy light", "the"]

    def results() -> list[list[tuple[str, float]]]:
        return [
            [
                (h.id, round(h.score, 5))
                for h in rig.node.text.search(
                    "acme", "kb", q, 5, mode="keyword", consistency=SESSION, tokens=(token,),
                    timeout_ms=10_000,  # each applied batch is a tantivy commit (20-160 ms)
                ).hits
            ]
            for q in queries
        ]

    before = results()
    assert before[0] and all(before)
    rig.node.service.snapshot()
    rig.restart_node()  # from the snapshot (the keyword index rebuilt from its state)
    assert rig.node.keyword_docs == len(DOCS) - 1
    assert results() == before
    rig.restart_node(drop_snapshots=True)  # full replay
    assert results() == before


# -- neighbours ---------------------------------------------------------------------------
class CountingPlane:
    """The node's data plane, counting reads (to check the fan-out bound)."""

    def __init__(self, inner: DataPlane) -> None:
        self.inner, self.searches, self.gets = inner, 0, 0

    def search(self, request: SearchRequest) -> SearchResponse:
        self.searches += 1
        return self.inner.search(request)

    def get(self, *a: Any, **kw: Any) -> Any:
        self.gets += 1
        return self.inner.get(*a, **kw)


def line_index(rig: Rig, n: int = 12) -> str:
    """Points on a line, p0..p{n-1}, L2: each point's nearest are its neighbours."""
    rig.node.service.create_index(
        IndexConfig(
            "acme",
            "line",
            2,
            metric="l2",  # type: ignore[arg-type]
            recipe="Flat",
        )
    )
    token = ""
    for i in range(n):
        token = rig.node.service.upsert(
            VectorUpsert("acme", "line", f"p{i}", np.array([i * 1.0, 0.0], np.float32))
        ).token
    assert rig.node.catch_up(30)
    return token


def test_neighbors_bfs_over_hops(rig: Rig) -> None:
    token = line_index(rig)
    plane = rig.node.service
    one = neighbors(plane, "acme", "line", "p0", hops=1, k=2, consistency=SESSION, tokens=(token,))
    assert [(n.id, n.hop, n.via) for n in one] == [("p1", 1, "p0"), ("p2", 1, "p0")]
    assert one[0].score == pytest.approx(1.0)  # squared L2 to p0
    two = neighbors(plane, "acme", "line", "p0", hops=2, k=2)
    # the 2-NN graph: p1 -> {p0, p2}, p2 -> {p1, p3}: only p3 is new at hop 2
    assert [(n.id, n.hop, n.via) for n in two] == [
        ("p1", 1, "p0"),
        ("p2", 1, "p0"),
        ("p3", 2, "p2"),
    ]
    mid = neighbors(plane, "acme", "line", "p6", hops=2, k=2)
    assert {n.id for n in mid if n.hop == 1} == {"p5", "p7"}
    assert {n.id for n in mid if n.hop == 2} == {"p4", "p8"}
    assert "p6" not in {n.id for n in mid}  # never itself, never twice


def test_neighbors_fanout_bound_and_errors(rig: Rig) -> None:
    line_index(rig, 40)
    counting = CountingPlane(rig.node.service)
    found = neighbors(counting, "acme", "line", "p20", hops=3, k=4, fanout=2)  # type: ignore[arg-type]
    # 1 origin search, then at most fanout per later hop; reads: origin + fanout per hop
    assert counting.searches <= 1 + 2 * 2 and counting.gets <= 1 + 2 * 2
    assert len({n.id for n in found}) == len(found) <= 4 * counting.searches
    with pytest.raises(NotFound):
        neighbors(rig.node.service, "acme", "line", "nope")
    for bad in ({"hops": 0}, {"hops": 4}, {"k": 0}, {"k": 101}):
        with pytest.raises(InvalidRequest):
            neighbors(rig.node.service, "acme", "line", "p0", **bad)


def test_neighbors_over_http_and_resp(rig: Rig) -> None:
    token = line_index(rig)
    with serve(create_http_app(rig.node.service)) as url:
        r = httpx.get(
            f"{url}/v1/indexes/acme/line/vectors/p0/neighbors",
            params={"hops": 2, "k": 2, "consistency": "session", "token": token},
        )
        assert r.status_code == 200, r.text
        assert [n["id"] for n in r.json()["neighbors"]] == ["p1", "p2", "p3"]
        r = httpx.get(f"{url}/v1/indexes/acme/line/vectors/p0/neighbors", params={"hops": 9})
        assert r.status_code == 400 and r.json()["error"]["code"] == "VEC_ERR_INVALID"
        r = httpx.get(f"{url}/v1/indexes/acme/line/vectors/zz/neighbors")
        assert r.status_code == 404 and r.json()["error"]["code"] == "VEC_ERR_NOT_FOUND"
        assert httpx.get(f"{url}/v1/indexes/acme/line/vectors/p0").status_code == 200
    with serve_in_thread(RespServer(rig.node.service, port=0)) as server:
        client = redis.Redis(port=server.port, socket_timeout=10)
        reply = client.execute_command("VEC.NEIGHBORS", "acme", "line", "p3", "HOPS", "1", "K", "2")
        assert sorted(x[0] for x in reply) == [b"p2", b"p4"]
        with pytest.raises(redis.ResponseError, match="VEC_ERR_INVALID"):
            client.execute_command("VEC.NEIGHBORS", "acme", "line", "p3", "HOPS", "0")
        with pytest.raises(redis.ResponseError, match="VEC_ERR_NOT_FOUND"):
            client.execute_command("VEC.NEIGHBORS", "acme", "line", "zz")
        client.close()


def test_listener_waits_for_the_state_commit_of_an_early_report(tmp_path: Path) -> None:
    """The indexer may say ``applied`` before the batch's state commit (catching up
    ``indexes`` mid-batch): the listener must not index the old copy, nor drop the change."""
    from streams.service.state import Entry, StateBatch, StateStore
    from streams.text import KeywordIndexes, KeywordListener

    state = StateStore(tmp_path / "state")
    config = IndexConfig("acme", "kb", 2, recipe="Flat", embedder="wordllama")
    listener = KeywordListener(KeywordIndexes(tmp_path / "kw"), state, {config.key: config})

    def entry(label: int, vec: list[float], text: str) -> Entry:
        return Entry(
            label,
            label,
            np.array(vec, np.float32),
            json.dumps({"text": text}),
            ("source_type:file",),
            {},
            f"v:0:{label}",
        )

    def commit(id: str, e: Entry, old: Entry | None) -> None:
        batch = StateBatch()
        batch.put_config(config)
        batch.put_entry(config.key, id, e, old)
        state.commit(batch)

    old = entry(1, [1, 0], "old walrus")
    commit("x", old, None)
    listener.upserted(config.key, "x", old.vector, old.tags, {})
    listener.applied()
    assert ids(listener.indexes.search(config.key, "walrus", 5)) == ["x"]
    new = entry(2, [0, 1], "new gecko")
    listener.upserted(config.key, "x", new.vector, new.tags, {})
    listener.applied()  # early: the state still holds the old copy
    assert ids(listener.indexes.search(config.key, "walrus", 5)) == ["x"]
    assert listener.indexes.search(config.key, "gecko", 5) == []
    commit("x", new, old)
    listener.applied()  # the batch's own report, after its commit
    assert listener.indexes.search(config.key, "walrus", 5) == []
    assert ids(listener.indexes.search(config.key, "gecko", 5)) == ["x"]
    # a plain vector index is not followed at all
    plain = IndexConfig("acme", "plain", 2, recipe="Flat")
    listener.configs = {**listener.configs, plain.key: plain}  # type: ignore[dict-item]
    listener.upserted(plain.key, "y", new.vector, (), {})
    listener.applied()
    assert listener.indexes.get(plain.key) is None
    listener.indexes.close()
    state.close()
