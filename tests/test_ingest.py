"""The knowledge-ingestion path (streams.ingest): Sources on ``documents`` are chunked,
embedded with the real offline embedder and appended to ``vectors`` by the embedder
processor; searched by text over the service, RESP (redis-py) and HTTP (httpx); produced
as Avro by a plain Kafka client to the Tansu broker. Poison Sources end in ``dlq``."""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest
import redis

from streams.dlq import DEAD_LETTER_SCHEMA
from streams.embed import Embedder, EmbedderError, open_embedder
from streams.index.exceptions import Busy, InvalidRequest, NotFound, VersionConflict
from streams.index.model import LIMITS, Consistency, IndexConfig
from streams.ingest import (
    ChatMessage,
    ChatMode,
    Chunker,
    Embedders,
    IngestService,
    IngestState,
    QueryRequest,
    Source,
    SourceType,
    open_ingest,
)
from streams.ingest.chunker import content_text
from streams.ingest.source import source_to_avro
from streams.ingest.state import Outcome, SourceDone
from streams.log.port import Record
from streams.schemas import catalog
from streams.service.http import create_http_app
from streams.service.resp import RespServer, serve_in_thread
from tests.registry_fixtures import serve
from tests.rigs import Rig

WORDLLAMA = open_embedder()
ANIMALS = ["otter", "falcon", "badger", "heron", "lynx", "walrus", "gecko", "marmot"]


def long_text(topic: str, sentences: int) -> str:
    return " ".join(
        f"Sentence {i} is about the {topic} and its habits number {i}." for i in range(sentences)
    )


class BrokenEmbedder(Embedder):
    """A provider that is down: every call fails with a retryable error."""

    name = "broken"
    dim = WORDLLAMA.dim
    max_tokens = 512

    def __init__(self) -> None:
        self.calls = 0

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        self.calls += 1
        raise EmbedderError("provider unavailable (HTTP 503)", retryable=True)


class CountingEmbedder(Embedder):
    """The real offline embedder, counting the texts it embeds."""

    def __init__(self) -> None:
        self.inner = WORDLLAMA
        self.name, self.dim, self.max_tokens = WORDLLAMA.name, WORDLLAMA.dim, 512
        self.texts: list[str] = []

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        self.texts.extend(texts)
        return self.inner.embed(texts)

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        return self.inner.token_spans(text)


def factory(
    broken: BrokenEmbedder | None = None, counting: CountingEmbedder | None = None
) -> Embedders:
    def make(name: str) -> Embedder:
        if name == "broken" and broken is not None:
            return broken
        if name == "wordllama" and counting is not None:
            return counting
        return open_embedder(name)

    return Embedders(make)


class KB:
    """A rig (embedded log + query node) with an ingest service on it."""

    def __init__(self, root: Path, embedders: Embedders | None = None) -> None:
        self.root = root
        self.rig = Rig(root)
        self.svc = self.open(embedders)

    def open(self, embedders: Embedders | None = None) -> IngestService:
        self.svc = open_ingest(
            self.rig.node, self.root / "ingest", embedders=embedders or factory(), backoff_s=0.001
        )
        return self.svc

    def query(self, text: str, *tokens: str, k: int = 5, **kw: Any) -> list[Any]:
        res = self.svc.query(
            QueryRequest(
                "t",
                "kb",
                text,
                k,
                consistency=Consistency.SESSION if tokens else Consistency.STRONG,
                tokens=tokens,
                timeout_ms=20_000,
                **kw,
            )
        )
        return res.hits

    def chunk_ids(self, index: str = "kb") -> set[str]:
        return {id for id, _ in self.rig.node.state.entries(f"t/{index}")}

    def dead_letters(self) -> list[dict[str, Any]]:
        topic = self.rig.topics.dlq
        out = []
        for p in self.rig.log.end_offsets(topic):
            for rec in self.rig.log.read(topic, p, 0, 1000):
                assert rec.value is not None
                out.append(self.rig.codec.decode(rec.value, DEAD_LETTER_SCHEMA)[1])
        return out

    def close(self) -> None:
        self.svc.close()
        self.rig.close()


@pytest.fixture
def kb(tmp_path: Path) -> Iterator[KB]:
    k = KB(tmp_path / "kb")
    k.svc.create_text_index("t", "kb", "wordllama", recipe="Flat")
    yield k
    k.close()


# -- chunking and validation ------------------------------------------------------------
def test_token_windows_overlap_and_cover_the_text() -> None:
    text = long_text("otter", 60)
    chunker = Chunker(window_tokens=40, overlap_tokens=10)
    chunks = chunker.chunk(Source("t", "kb", "s", text=text), WORDLLAMA)
    assert len(chunks) > 5
    # tokens without the space some carry before their word (chunks start at the word)
    tokens = [
        (b - len(text[a:b].lstrip()), b)
        for a, b in WORDLLAMA.token_spans(text)
        if text[a:b].strip()
    ]
    assert chunks[0].start == tokens[0][0] and chunks[-1].end == tokens[-1][1]
    for n, c in enumerate(chunks):
        assert c.chunk_no == n and c.id == f"s#{n}" and c.text == text[c.start : c.end]
        inside = [t for t in tokens if c.start <= t[0] and t[1] <= c.end]
        assert len(inside) <= 40
    for prev, nxt in itertools.pairwise(chunks):
        shared = [t for t in tokens if nxt.start <= t[0] and t[1] <= prev.end]
        assert len(shared) == 10  # exactly the overlap
    # deterministic: the same Source always yields the same chunks (crash safety)
    assert chunker.chunk(Source("t", "kb", "s", text=text), WORDLLAMA) == chunks


def test_chat_chunks_by_message_or_by_turn_and_prechunked_as_given() -> None:
    msgs = (
        ChatMessage("user", "How do otters sleep?", 1),
        ChatMessage("assistant", "Floating.", 2),
        ChatMessage("assistant", "Holding hands.", 3),
        ChatMessage("user", "And heron?", 4),
        ChatMessage("assistant", "Standing.", 5),
    )
    chat = Source("t", "kb", "c", messages=msgs, type=SourceType.CHAT)
    by_msg = Chunker().chunk(chat, WORDLLAMA)
    assert [c.text for c in by_msg] == [m.text for m in msgs]
    turns = Chunker(chat_mode=ChatMode.TURN).chunk(chat, WORDLLAMA)
    assert [c.text for c in turns] == [
        "How do otters sleep?\n\nFloating.\n\nHolding hands.",
        "And heron?\n\nStanding.",
    ]
    for c in by_msg + turns:
        assert content_text(chat)[c.start : c.end] == c.text
    pre = Source("t", "kb", "p", chunks=("first part", "second part"))
    assert [(c.text, c.start) for c in Chunker().chunk(pre, WORDLLAMA)] == [
        ("first part", 0),
        ("second part", 12),
    ]


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"text": ""}, "text"),
        ({"text": " \n\t "}, "text"),
        ({"text": "x" * (LIMITS.max_source_bytes + 1)}, "text"),
        ({"text": "ok", "meta": "[1, 2]"}, "meta"),
        ({"text": "ok", "meta": "{bad"}, "meta"),
        ({"text": "ok", "channel_id": "a,b"}, "channel_id"),
        ({"text": "ok", "chunks": ("a",)}, "text"),
        ({"chunks": ("a", " ")}, "chunks"),
    ],
)
def test_bad_sources_are_refused_with_the_field(kw: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        Source("t", "kb", "s", **kw).validate()
    assert err.value.field == field and err.value.code == "VEC_ERR_INVALID"


def test_front_door_refuses_bad_sources_and_appends_nothing(kb: KB) -> None:
    docs = kb.rig.topics.documents
    before = kb.rig.log.end_offsets(docs)
    with pytest.raises(InvalidRequest, match="over the limit"):
        kb.svc.put_source(Source("t", "kb", "big", text="y" * (LIMITS.max_source_bytes + 1)))
    with pytest.raises(InvalidRequest, match="empty text"):
        kb.svc.put_source(Source("t", "kb", "empty", text="   "))
    with pytest.raises(NotFound):
        kb.svc.put_source(Source("t", "nope", "s", text="hello"))
    kb.rig.node.service.create_index(IndexConfig("t", "raw", 4))
    with pytest.raises(InvalidRequest, match="no embedder"):
        kb.svc.put_source(Source("t", "raw", "s", text="hello"))
    assert kb.rig.log.end_offsets(docs) == before


# -- the processor ----------------------------------------------------------------------
def test_a_source_is_searchable_once_embedded_with_its_source_and_location(kb: KB) -> None:
    texts = {f"doc-{a}": long_text(a, 40) for a in ANIMALS[:4]}
    tokens = [
        kb.svc.put_source(
            Source(
                "t",
                "kb",
                sid,
                text=t,
                type=SourceType.FILE,
                title=sid.upper(),
                uri=f"file:///{sid}.txt",
                user_id="u1",
                meta='{"lang": "en"}',
            )
        ).token
        for sid, t in texts.items()
    ]
    hits = kb.query("habits of the heron", *tokens)
    assert hits and hits[0].id.startswith("doc-heron#")
    meta = json.loads(hits[0].meta)
    sid, n = hits[0].id.split("#")
    assert meta["source_id"] == sid and meta["chunk"]["chunk_no"] == int(n)
    assert texts[sid][meta["chunk"]["start"] : meta["chunk"]["end"]] == meta["text"]
    assert (meta["title"], meta["uri"], meta["source_type"], meta["user_id"]) == (
        "DOC-HERON",
        "file:///doc-heron.txt",
        "file",
        "u1",
    )
    assert meta["source_meta"] == {"lang": "en"} and meta["source_version"] == 1
    # every chunk of every Source is indexed, none more
    chunker = Chunker()
    expected = {
        c.id
        for sid, t in texts.items()
        for c in chunker.chunk(Source("t", "kb", sid, text=t), WORDLLAMA)
    }
    assert kb.chunk_ids() == expected
    # the VectorRecords on `vectors` carry source_id and the chunk location
    vectors = kb.rig.topics.vectors
    rec = kb.rig.log.read(vectors, 0, 0, 1)[0]
    value = kb.rig.codec.decode(rec.value or b"", catalog.load_schema("VectorRecord"))[1]
    assert value["source_id"] == value["chunk"]["source_id"]
    assert value["id"] == f"{value['source_id']}#{value['chunk']['chunk_no']}"
    assert "source_type:file" in value["tags"] and "user_id:u1" in value["tags"]
    # filters on the declared source fields
    hits = kb.query("habits", *tokens, filter="user_id:u2")
    assert hits == []


def test_update_replaces_chunks_and_a_tombstone_removes_them(kb: KB) -> None:
    t1 = kb.svc.put_source(Source("t", "kb", "s", text=long_text("walrus", 60))).token
    kb.query("walrus", t1)
    n1 = len(kb.chunk_ids())
    assert n1 > 4
    t2 = kb.svc.put_source(Source("t", "kb", "s", text=long_text("gecko", 8))).token
    hits = kb.query("gecko", t2)
    n2 = len(Chunker().chunk(Source("t", "kb", "s", text=long_text("gecko", 8)), WORDLLAMA))
    assert kb.chunk_ids() == {f"s#{n}" for n in range(n2)} and n2 < n1
    assert all(json.loads(h.meta)["source_version"] == 2 for h in hits)
    assert all("walrus" not in json.loads(h.meta)["text"] for h in hits)
    t3 = kb.svc.delete_source("t", "kb", "s").token
    assert kb.query("gecko", t3) == []
    assert kb.chunk_ids() == set()
    with pytest.raises(NotFound):
        kb.svc.delete_source("t", "kb", "s")


def test_optimistic_concurrency_on_source_versions(kb: KB) -> None:
    kb.svc.put_source(Source("t", "kb", "s", text="first"), if_version=0)
    with pytest.raises(VersionConflict):
        kb.svc.put_source(Source("t", "kb", "s", text="second"), if_version=0)
    tok = kb.svc.put_source(Source("t", "kb", "s", text="second"), if_version=1).token
    assert json.loads(kb.query("second", tok)[0].meta)["source_version"] == 2
    # a producer writing an older version directly: dead-lettered, the newer one stays
    stale = Source("t", "kb", "s", text="stale", version=1, timestamp_ms=1)
    kb.rig.log.append(kb.rig.topics.documents, stale.key, encode_source(kb, stale))
    kb.svc.put_source(Source("t", "kb", "later", text="later"))
    kb.query("later", kb.svc.put_source(Source("t", "kb", "later2", text="x")).token)
    letters = kb.dead_letters()
    assert [d["error_code"] for d in letters] == ["VEC_ERR_CONFLICT"]
    assert kb.chunk_ids() >= {"s#0"}


def encode_source(kb: KB, source: Source) -> bytes:
    subject = catalog.subject_for(kb.rig.topics.documents)
    return kb.rig.codec.encode(subject, catalog.load_schema("Source"), source_to_avro(source))


def test_poison_sources_go_to_dlq_with_clear_errors_and_the_stream_goes_on(
    tmp_path: Path,
) -> None:
    broken = BrokenEmbedder()
    kb = KB(tmp_path / "kb", factory(broken=broken))
    try:
        kb.svc.create_text_index("t", "kb", "wordllama", recipe="Flat")
        kb.rig.node.service.create_index(
            IndexConfig("t", "down", WORDLLAMA.dim, recipe="Flat", embedder="broken")
        )
        docs = kb.rig.topics.documents
        # raw bytes that fail UTF-8 decoding inside an otherwise valid Avro Source
        good = encode_source(kb, Source("t", "kb", "utf8", text="PLACEHOLDER", timestamp_ms=1))
        bad_utf8 = good.replace(b"PLACEHOLDER", b"\xff\xfe\xfdPLACEHO")
        poison = [
            ("t/kb/utf8", bad_utf8),
            ("t/kb/empty", encode_source(kb, Source("t", "kb", "empty", text="", timestamp_ms=1))),
            (
                "t/kb/huge",
                encode_source(
                    kb,
                    Source(
                        "t",
                        "kb",
                        "huge",
                        text="z " * (LIMITS.max_source_bytes // 2 + 1),
                        timestamp_ms=1,
                    ),
                ),
            ),
            (
                "t/down/s",
                encode_source(kb, Source("t", "down", "s", text="hello provider", timestamp_ms=1)),
            ),
        ]
        positions = kb.rig.log.append_batch([Record.of(docs, k, v) for k, v in poison])
        tok = kb.svc.put_source(Source("t", "kb", "fine", text=long_text("lynx", 5))).token
        hits = kb.query("lynx habits", tok)
        assert hits and hits[0].id.startswith("fine#")
        letters = {d["key"].decode(): d for d in kb.dead_letters()}
        assert set(letters) == {k for k, _ in poison}
        for (key, _), pos in zip(poison, positions, strict=True):
            d = letters[key]
            assert (d["original_topic"], d["offset"]) == (docs, pos.offset)
            assert d["value"] == dict(poison)[key]  # the original bytes, untouched
        assert letters["t/kb/utf8"]["error_code"] == "VEC_ERR_INVALID"
        assert "utf-8" in letters["t/kb/utf8"]["error_message"].lower()
        assert "empty text" in letters["t/kb/empty"]["error_message"]
        assert "over the limit" in letters["t/kb/huge"]["error_message"]
        down = letters["t/down/s"]
        assert down["processor"] == "embedder" and down["attempts"] == 3
        assert "provider unavailable" in down["error_message"]
        assert "after 3 attempt(s)" in down["error_message"]
        assert broken.calls == 3
        assert kb.chunk_ids() == {
            c.id
            for c in Chunker().chunk(
                Source("t", "kb", "fine", text=long_text("lynx", 5)), WORDLLAMA
            )
        }
        assert kb.chunk_ids("down") == set()
    finally:
        kb.close()


def test_restart_resumes_from_the_committed_position_without_embedding_again(
    tmp_path: Path,
) -> None:
    counting = CountingEmbedder()
    kb = KB(tmp_path / "kb", factory(counting=counting))
    try:
        kb.svc.create_text_index("t", "kb", "wordllama", recipe="Flat")
        toks = [
            kb.svc.put_source(Source("t", "kb", f"s{i}", text=long_text(a, 20))).token
            for i, a in enumerate(ANIMALS)
        ]
        kb.query("otter", *toks)
        embedded = len(counting.texts)
        ids = kb.chunk_ids()
        assert embedded == len(ids) + 1  # every chunk once, plus the query
        kb.svc.close()  # graceful: everything committed
        counting.texts.clear()
        kb.open(factory(counting=counting))
        tok = kb.svc.put_source(Source("t", "kb", "new", text="a brand new marmot")).token
        kb.query("marmot", tok)
        assert sorted(counting.texts) == ["a brand new marmot", "marmot"]  # nothing again
        assert kb.svc.processor.stats.skipped_done == 0
        assert kb.chunk_ids() == ids | {"new#0"}
    finally:
        kb.close()


class SlowEmbedder(CountingEmbedder):
    """The real embedder behind a slow provider: each call takes ``delay_s``."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.started = threading.Event()

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        self.started.set()
        time.sleep(self.delay_s)
        return super().embed(texts)


def test_graceful_shutdown_drains_the_batch_in_flight(tmp_path: Path) -> None:
    slow = SlowEmbedder(0.3)
    kb = KB(tmp_path / "kb", factory(counting=slow))
    try:
        kb.svc.create_text_index("t", "kb", "wordllama", recipe="Flat")
        for i in range(3):
            kb.svc.put_source(Source("t", "kb", f"s{i}", text=long_text(ANIMALS[i], 15)))
        assert slow.started.wait(10)
        kb.svc.close()  # while the provider is working on the batch
        embedded = list(slow.texts)
        assert embedded  # the batch was finished, not dropped
        again = CountingEmbedder()
        kb.open(factory(counting=again))
        tok = kb.svc.put_source(Source("t", "kb", "last", text="the last marmot")).token
        kb.query("marmot", tok)
        # what was embedded before the shutdown was committed: nothing is embedded again
        assert not set(again.texts) & set(embedded)
        expected = {
            c.id
            for i in range(3)
            for c in Chunker().chunk(
                Source("t", "kb", f"s{i}", text=long_text(ANIMALS[i], 15)), WORDLLAMA
            )
        }
        assert kb.chunk_ids() == expected | {"last#0"}
    finally:
        kb.close()


def test_a_session_query_waits_for_the_embedder_and_answers_busy_on_timeout(
    tmp_path: Path,
) -> None:
    slow = SlowEmbedder(1.5)
    kb = KB(tmp_path / "kb", factory(counting=slow))
    try:
        kb.svc.create_text_index("t", "kb", "wordllama", recipe="Flat")
        tok = kb.svc.put_source(Source("t", "kb", "s", text="a heron in the reeds")).token
        with pytest.raises(Busy, match="not embedded within 100 ms"):
            kb.svc.query(
                QueryRequest(
                    "t",
                    "kb",
                    "heron",
                    3,
                    consistency=Consistency.SESSION,
                    tokens=(tok,),
                    timeout_ms=100,
                )
            )
        hits = kb.svc.query(
            QueryRequest(
                "t",
                "kb",
                "heron",
                3,
                consistency=Consistency.SESSION,
                tokens=(tok,),
                timeout_ms=20_000,
            )
        ).hits
        assert [h.id for h in hits] == ["s#0"]
        with pytest.raises(InvalidRequest, match="bad position token"):
            kb.svc.query(
                QueryRequest(
                    "t", "kb", "heron", consistency=Consistency.SESSION, tokens=("nonsense",)
                )
            )
    finally:
        kb.close()


def test_an_intent_left_by_a_crash_is_finished_on_start_without_embedding(
    tmp_path: Path,
) -> None:
    """A crash after step 1 (intent written) and before step 3: the next start appends the
    intent's records and commits them, embedding nothing."""
    kb = KB(tmp_path / "kb")
    try:
        kb.svc.create_text_index("t", "kb", "wordllama", recipe="Flat")
        tok = kb.svc.put_source(Source("t", "kb", "a", text="the heron waits")).token
        kb.query("heron", tok)
        kb.svc.close()
        # what a processor would have written for a Source at documents offset 1
        src = Source("t", "kb", "b", text="the lynx hunts", timestamp_ms=1)
        docs = kb.rig.topics.documents
        kb.rig.log.append(docs, src.key, encode_source(kb, src))
        vec = WORDLLAMA.embed(["the lynx hunts"])[0]
        value = kb.rig.codec.encode(
            catalog.subject_for(kb.rig.topics.vectors),
            catalog.load_schema("VectorRecord"),
            {
                "tenant": "t",
                "index": "kb",
                "id": "b#0",
                "vector": vec.tobytes(),
                "meta": '{"source_id": "b", "text": "the lynx hunts"}',
                "version": 1,
                "source_id": "b",
                "chunk": {"source_id": "b", "chunk_no": 0, "start": 0, "end": 14},
                "timestamp": 1,
            },
        )
        state = IngestState(tmp_path / "kb" / "ingest")
        state.write_intent(
            Outcome(
                [Record.of(kb.rig.topics.vectors, "t/kb/b#0", value)],
                {"t/kb/b": SourceDone(1, 1)},
                {(docs, 0): 2},
            )
        )
        state.close()
        counting = CountingEmbedder()
        kb.open(factory(counting=counting))
        assert kb.svc.processor.stats.recovered_intents == 1
        assert kb.svc.processor.state.intent() is None
        assert kb.svc.processor.state.positions()[(docs, 0)] == 2
        assert kb.query("lynx", tok)[0].id == "b#0"
        assert counting.texts == ["lynx"]  # only the query
    finally:
        kb.close()


# -- RESP and HTTP ----------------------------------------------------------------------
def test_resp_vec_create_embedder_source_and_query(kb: KB) -> None:
    server = RespServer(kb.rig.node.service, port=0, ingest=kb.svc)
    with serve_in_thread(server):
        r = redis.Redis(port=server.port, socket_timeout=30)
        r.execute_command("VEC.CREATE", "t", "docs", "EMBEDDER", "wordllama", "RECIPE", "Flat")
        info = r.execute_command("VEC.INFO", "t", "docs")
        info = dict(zip(info[::2], info[1::2], strict=True)) if isinstance(info, list) else info
        assert int(info[b"dim"]) == WORDLLAMA.dim
        with pytest.raises(redis.ResponseError, match=r"VEC_ERR_INVALID.*DIM 8"):
            r.execute_command("VEC.CREATE", "t", "d2", "EMBEDDER", "wordllama", "DIM", 8)
        with pytest.raises(redis.ResponseError, match=r"VEC_ERR_INVALID.*unknown embedder"):
            r.execute_command("VEC.CREATE", "t", "d3", "EMBEDDER", "nonesuch")
        with pytest.raises(redis.ResponseError, match=r"VEC_ERR_INVALID.*unknown embedder"):
            r.execute_command("VEC.CREATE", "t", "d3", "EMBEDDER", "nonesuch", "DIM", 8)
        tokens = [
            r.execute_command(
                "VEC.SOURCE",
                "t",
                "docs",
                f"d{i}",
                "TEXT",
                long_text(a, 10),
                "TYPE",
                "web",
                "CHANNEL",
                f"c{i % 2}",
                "META",
                json.dumps({"n": i}),
            ).decode()
            for i, a in enumerate(ANIMALS)
        ]
        assert all(t.startswith(kb.rig.topics.documents + ":") for t in tokens)
        hits, _debug = r.execute_command(
            "VEC.QUERY",
            "t",
            "docs",
            "TOPK",
            3,
            "TEXT",
            "the badger habits",
            "TIMEOUT",
            20_000,
            "CONSISTENCY",
            "session",
            *tokens,
        )
        assert hits[0][0].startswith(b"d2#")
        meta = json.loads(hits[0][2])
        assert meta["source_id"] == "d2" and "chunk" in meta and "badger" in meta["text"]
        hits, _ = r.execute_command(
            "VEC.QUERY", "t", "docs", "TOPK", 8, "TEXT", "habits", "FILTER", "channel_id:c1"
        )
        assert hits and all(int(h[0].split(b"#")[0][1:]) % 2 == 1 for h in hits)
        with pytest.raises(redis.ResponseError, match=r"VEC_ERR_INVALID.*empty text"):
            r.execute_command("VEC.SOURCE", "t", "docs", "e", "TEXT", "  ")
        with pytest.raises(redis.ResponseError, match=r"VEC_ERR_INVALID.*not UTF-8"):
            r.execute_command("VEC.SOURCE", "t", "docs", "e", "TEXT", b"\xff\xfe")
        with pytest.raises(redis.ResponseError, match=r"VEC_ERR_INVALID.*TEXT is required"):
            r.execute_command("VEC.QUERY", "t", "docs", "TOPK", 3)
        with pytest.raises(redis.ResponseError, match=r"VEC_ERR_INVALID.*MODE"):
            r.execute_command("VEC.QUERY", "t", "docs", "TEXT", "x", "MODE", "fuzzy")
        with pytest.raises(redis.ResponseError, match="VEC_ERR_NOT_FOUND"):
            r.execute_command("VEC.QUERY", "t", "nope", "TEXT", "x")
        tok = r.execute_command("VEC.SOURCEDEL", "t", "docs", "d2").decode()
        hits, _ = r.execute_command(
            "VEC.QUERY",
            "t",
            "docs",
            "TOPK",
            3,
            "TEXT",
            "the badger habits",
            "TIMEOUT",
            20_000,
            "CONSISTENCY",
            "session",
            tok,
        )
        assert all(not h[0].startswith(b"d2#") for h in hits)


def test_resp_keyword_and_hybrid_modes(kb: KB) -> None:
    if kb.svc.text is None:
        pytest.skip("this node has no keyword index (streams.text)")
    tok = kb.svc.put_source(
        Source("t", "kb", "k", text="zygomorphic flowers attract bees. " + long_text("otter", 5))
    ).token
    kb.query("flowers", tok)
    for mode in ("keyword", "hybrid"):
        hits = kb.query("zygomorphic", tok, mode=mode)
        assert hits and hits[0].id.startswith("k#")


def test_http_sources_and_query(kb: KB) -> None:
    app = create_http_app(kb.rig.node.service, ingest=kb.svc)
    with serve(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        r = http.post(
            "/v1/indexes",
            json={"tenant": "t", "index": "chat", "embedder": "wordllama", "recipe": "Flat"},
        )
        assert r.status_code == 201, r.text
        r = http.post("/v1/indexes", json={"tenant": "t", "index": "x", "embedder": "nonesuch"})
        assert r.status_code == 400 and r.json()["error"]["field"] == "embedder"
        r = http.post("/v1/indexes", json={"tenant": "t", "index": "x"})
        assert r.status_code == 400 and r.json()["error"]["field"] == "dim"
        body = {
            "id": "conv1",
            "type": "chat",
            "channel_id": "general",
            "messages": [
                {"role": "user", "text": "where do herons nest", "ts_ms": 1},
                {"role": "assistant", "text": "in tall trees near water", "ts_ms": 2},
            ],
            "meta": {"team": "birds"},
        }
        r = http.post("/v1/indexes/t/chat/sources", json=body)
        assert r.status_code == 201, r.text
        token = r.json()["position"]
        r = http.post(
            "/v1/indexes/t/chat/query",
            json={
                "text": "tall trees",
                "k": 2,
                "consistency": "session",
                "tokens": [token],
                "timeout_ms": 20_000,
            },
        )
        assert r.status_code == 200, r.text
        hits = r.json()["hits"]
        assert [h["id"] for h in hits] == ["conv1#1", "conv1#0"]
        assert hits[0]["meta"]["chunk"] == {"chunk_no": 1, "start": 22, "end": 46}
        assert hits[0]["meta"]["source_meta"] == {"team": "birds"}
        health = http.get("/healthz").json()
        assert health["ingest"]["sources"] == 1 and health["ingest"]["error"] is None
        r = http.post("/v1/indexes/t/chat/sources", json={"id": "x", "text": ""})
        assert r.status_code == 400 and r.json()["error"]["code"] == "VEC_ERR_INVALID"
        r = http.post(
            "/v1/indexes/t/chat/sources", json={"id": "conv1", "text": "hi", "if_version": 0}
        )
        assert r.status_code == 409 and r.json()["error"]["code"] == "VEC_ERR_CONFLICT"
        r = http.delete("/v1/indexes/t/chat/sources/conv1")
        assert r.status_code == 200
        r = http.post(
            "/v1/indexes/t/chat/query",
            json={
                "text": "tall trees",
                "consistency": "session",
                "tokens": [r.json()["position"]],
                "timeout_ms": 20_000,
            },
        )
        assert r.json()["hits"] == []


# -- the Kafka path ---------------------------------------------------------------------
@pytest.mark.kafka
def test_avro_sources_produced_by_a_kafka_client_are_found(
    kafka_bootstrap: str,
    tmp_path: Path,
) -> None:
    from confluent_kafka import Producer
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    from streams.log.kafka import KafkaLog
    from streams.schemas.codec import AvroCodec
    from streams.schemas.log_registry import LogRegistry
    from streams.schemas.rest import create_registry_app
    from streams.service.query_node import QueryNode
    from streams.topics import Topics

    topics = Topics(prefix=f"i{uuid.uuid4().hex[:6]}.", partitions=2)
    log = KafkaLog(kafka_bootstrap)
    try:
        log.ensure_topics(topics.specs())
        registry = LogRegistry(log, topics)
        with (
            serve(create_registry_app(registry)) as url,
            QueryNode(log, topics, AvroCodec(registry), tmp_path / "node") as node,
        ):
            svc = open_ingest(node, tmp_path / "ingest")
            try:
                svc.create_text_index("acme", "kb", "wordllama", recipe="Flat")
                serializer = AvroSerializer(
                    SchemaRegistryClient({"url": url}), catalog.load_schema("Source")
                )
                producer = Producer(
                    {
                        "bootstrap.servers": kafka_bootstrap,
                        "partitioner": "murmur2_random",
                        "acks": "all",
                    }
                )
                ctx = SerializationContext(topics.documents, MessageField.VALUE)
                for i, a in enumerate(ANIMALS):
                    value = serializer(
                        {
                            "tenant": "acme",
                            "index": "kb",
                            "id": f"src{i}",
                            "type": "web",
                            "channel_id": None,
                            "user_id": None,
                            "title": a,
                            "uri": None,
                            "meta": None,
                            "text": long_text(a, 12),
                            "chunks": None,
                            "messages": None,
                            "version": 1,
                            "timestamp": 0,
                        },
                        ctx,
                    )
                    producer.produce(topics.documents, value, f"acme/kb/src{i}")
                assert producer.flush(10) == 0
                res = svc.query(
                    QueryRequest(
                        "acme",
                        "kb",
                        "the falcon and its habits",
                        3,
                        consistency=Consistency.STRONG,
                        timeout_ms=30_000,
                    )
                )
                assert res.hits[0].id.startswith("src1#")
                assert json.loads(res.hits[0].meta)["title"] == "falcon"
            finally:
                svc.close()
    finally:
        log.close()


def test_node_serves_its_offline_model_in_openai_format(kb: KB) -> None:
    """The node's HTTP app serves ``POST /v1/embeddings``; the OpenAI-compatible provider
    pointed at it gets exactly the vectors of the local model."""
    from streams.embed import DEFAULT_EMBEDDER, open_embedder
    from streams.embed.openai import OpenAIEmbedder

    app = create_http_app(kb.rig.node.service, ingest=kb.svc)
    texts = ["how do I rotate the api key", "the build fails on arm64"]
    with serve(app) as url:
        remote = OpenAIEmbedder(DEFAULT_EMBEDDER, f"{url}/v1", api_key="")
        try:
            got = remote.embed(texts)
        finally:
            remote.close()
        with httpx.Client(base_url=url, timeout=30) as http:
            bad = http.post("/v1/embeddings", json={"model": "nope", "input": ["x"]})
    local = open_embedder(DEFAULT_EMBEDDER)
    assert remote.dim == local.dim
    assert np.allclose(got, local.embed(texts), atol=1e-5)
    assert bad.status_code == 404 and bad.json()["error"]["code"] == "VEC_ERR_NOT_FOUND"
