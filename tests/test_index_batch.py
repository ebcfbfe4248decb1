"""Batched writes and applies (issue 3): the Head's and the index's batch adds, the
indexer applying a poll as one batch (same-batch updates and deletes, poison records,
listener order, labels), back-pressure while a seal builds, ``upsert_many`` with per-item
errors over the data plane, RESP pipelines and ``VEC.MADD``, the HTTP batch endpoint,
and the per-request efSearch knob. Real parts: embedded log, RocksDB, FAISS, redis-py,
httpx against uvicorn."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis

from streams.index.exceptions import DimensionMismatch, InvalidRequest, VersionConflict
from streams.index.filters import parse_filter
from streams.index.head import HeadIndex
from streams.index.model import FieldKind, FilterField, IndexConfig, Metric, VectorUpsert
from streams.index.vector_index import VectorIndex
from streams.log.port import LogPosition, Record
from streams.service.api import SearchRequest
from streams.service.http import create_http_app
from streams.service.indexer import ChangeListener, label_of
from streams.service.metrics import ServiceMetrics
from streams.service.resp import RespServer, serve_in_thread
from tests.rigs import Rig
from tests.test_http_api import serve

DIM = 16
FIELDS = (FilterField("color", FieldKind.TAG), FilterField("price", FieldKind.NUMERIC))


def rand(n: int, dim: int = DIM, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def make_index(rig: Rig, recipe: str = "Flat", dim: int = DIM) -> IndexConfig:
    config = IndexConfig("acme", "docs", dim, recipe=recipe, fields=FIELDS)
    pos = rig.node.service.create_index(config)
    assert rig.node.applied.wait({(pos.topic, pos.partition): pos.offset + 1}, 10)
    return config


def wait_for(rig: Rig, pos: LogPosition) -> None:
    assert rig.node.applied.wait({(pos.topic, pos.partition): pos.offset + 1}, 30)


def encode(rig: Rig, id: str, vec: np.ndarray | None, **extra: Any) -> Record:
    key = f"acme/docs/{id}"
    if vec is None:
        return Record.of(rig.topics.vectors, key, None)
    value = rig.codec.encode(
        f"{rig.topics.vectors}-value",
        "VectorRecord",
        {
            "tenant": "acme",
            "index": "docs",
            "id": id,
            "vector": vec.astype("<f4").tobytes(),
            "dtype": "fp32",
            "version": 1,
            "timestamp": 0,
            **extra,
        },
    )
    return Record.of(rig.topics.vectors, key, value)


class Recorder:
    """A ChangeListener that records what it is told, then passes it on."""

    def __init__(self, inner: ChangeListener | None, rig: Rig | None = None) -> None:
        self.inner, self.rig = inner, rig
        self.events: list[tuple[str, str]] = []
        self.max_unsealed = 0

    def upserted(
        self,
        index_key: str,
        id: str,
        vector: Any,
        tags: Sequence[str],
        numeric: Mapping[str, float],
    ) -> None:
        self.events.append(("upserted", id))
        if self.inner is not None:
            self.inner.upserted(index_key, id, vector, tags, numeric)

    def deleted(self, index_key: str, id: str) -> None:
        self.events.append(("deleted", id))
        if self.inner is not None:
            self.inner.deleted(index_key, id)

    def reset(self, index_key: str) -> None:
        if self.inner is not None:
            self.inner.reset(index_key)

    def applied(self) -> None:
        if self.rig is not None and (vi := self.rig.node.indexer.indexes.get("acme/docs")):
            self.max_unsealed = max(self.max_unsealed, vi.unsealed_rows)
        if self.inner is not None:
            self.inner.applied()


# -- the Head and the index ---------------------------------------------------------------
def test_head_add_many_equals_adding_row_by_row() -> None:
    x = rand(300)
    tags = [(f"color:{['red', 'blue', 'green'][i % 3]}",) for i in range(300)]
    numeric = [{"price": float(i)} if i % 2 else {} for i in range(300)]
    one, many = (
        HeadIndex(DIM, Metric.COSINE, initial_capacity=8),
        HeadIndex(DIM, Metric.COSINE, initial_capacity=8),
    )
    for i in range(300):
        one.add(1000 + i, x[i], tags[i], numeric[i])
    many.add_many(np.arange(1000, 1100), x[:100], tags[:100], numeric[:100])
    many.add_many(np.arange(1100, 1300), x[100:], tags[100:], numeric[100:])
    assert len(many) == len(one) == many.n_rows == 300
    config = IndexConfig("acme", "docs", DIM, fields=FIELDS)
    for text in (None, "color:red", "price:[100 199]"):
        flt = parse_filter(text, config) if text else None
        for q in rand(5, seed=9):
            q = q / np.linalg.norm(q)
            a, b = one.search(q, 10, flt), many.search(q, 10, flt)
            assert a.labels.tolist() == b.labels.tolist() and a.matched == b.matched
            np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)
    assert many.delete(1150) and 1150 not in many
    assert one.export().labels.size == 300 and many.export().labels.size == 299


def test_head_add_many_refuses_the_whole_batch() -> None:
    head = HeadIndex(DIM, Metric.L2)
    head.add(5, rand(1)[0])
    for labels in ([1, 2, 2], [6, 5]):
        with pytest.raises(ValueError):
            head.add_many(np.array(labels), rand(len(labels)))
    with pytest.raises(DimensionMismatch):
        head.add_many(np.array([7]), rand(1, dim=DIM + 1))
    assert head.n_rows == 1 and 6 not in head
    head.freeze()
    with pytest.raises(ValueError):
        head.add_many(np.array([9]), rand(1))


def test_index_upsert_many_refuses_non_finite_and_live_labels() -> None:
    vi = VectorIndex(IndexConfig("acme", "docs", DIM, recipe="Flat"), head_capacity=50)
    vi.upsert_many(np.arange(60), rand(60))
    job = vi.begin_seal()
    assert job is not None
    job.build()
    vi.finish_seal(job)  # rows 0..59 now in a Tail segment
    bad = rand(3)
    bad[1, 4] = np.nan
    with pytest.raises(InvalidRequest):
        vi.upsert_many(np.array([100, 101, 102]), bad)
    with pytest.raises(ValueError):
        vi.upsert_many(np.array([100, 7]), rand(2))  # 7 is live in the segment
    assert len(vi) == 60 and 100 not in vi
    vi.upsert_many(np.array([100, 101]), rand(2, seed=4))
    assert len(vi) == 62 and vi.unsealed_rows == 2


# -- the indexer --------------------------------------------------------------------------
def test_one_batch_with_updates_deletes_and_a_poison_record(rig: Rig) -> None:
    make_index(rig)
    recorder = Recorder(rig.node.indexer.listener)
    rig.node.indexer.listener = recorder
    x = rand(5)
    positions = rig.log.append_batch(
        [
            encode(rig, "a", x[0]),
            encode(rig, "a", x[1], version=2),
            encode(rig, "b", x[2]),
            encode(rig, "b", None),
            encode(rig, "c", np.zeros(DIM - 1, np.float32)),  # poison: wrong dim
            encode(rig, "d", x[3], tags=["color:red"], numeric={"price": 3.0}),
            encode(rig, "e", x[4], version=1),
        ]
    )
    wait_for(rig, positions[-1])
    svc = rig.node.service
    a = svc.get("acme", "docs", "a")
    np.testing.assert_array_equal(a.vector, x[1])
    assert a.version == 2 and a.position == positions[1].token
    entry = rig.node.state.entry("acme/docs", "a")
    assert entry is not None and entry.label == label_of(0, positions[1].offset)
    vi = rig.node.indexer.indexes["acme/docs"]
    assert len(vi) == 3  # a (its second copy only), d, e
    assert label_of(0, positions[0].offset) not in vi
    assert label_of(0, positions[1].offset) in vi
    hits = svc.search(SearchRequest("acme", "docs", x[1], 10)).hits
    assert sorted(h.id for h in hits) == ["a", "d", "e"]
    red = svc.search(SearchRequest("acme", "docs", x[1], 10, "price:[0 3]")).hits
    assert [h.id for h in red] == ["d"]
    assert recorder.events == [
        ("upserted", "a"),
        ("upserted", "a"),
        ("upserted", "b"),
        ("deleted", "b"),
        ("upserted", "d"),
        ("upserted", "e"),
    ]
    dead = rig.log.read(rig.topics.dlq, 0, 0, 10)
    assert [dict(d.headers)["dlq.error_code"].decode() for d in dead] == ["VEC_ERR_DIM"]
    assert dict(dead[0].headers)["dlq.offset"].decode() == str(positions[4].offset)


def test_an_update_across_batches_masks_the_old_copy(rig: Rig) -> None:
    make_index(rig)
    x = rand(3)
    wait_for(rig, rig.log.append_batch([encode(rig, "a", x[0]), encode(rig, "b", x[1])])[-1])
    pos = rig.log.append_batch([encode(rig, "a", x[2], version=2)])[-1]
    wait_for(rig, pos)
    vi = rig.node.indexer.indexes["acme/docs"]
    assert len(vi) == 2
    hits = rig.node.service.search(SearchRequest("acme", "docs", x[0], 10)).hits
    assert sorted(h.id for h in hits) == ["a", "b"]
    np.testing.assert_array_equal(rig.node.service.get("acme", "docs", "a").vector, x[2])


def test_an_updated_row_stays_visible_while_its_batch_commits(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the index adds of a batch and its state commit, a replaced row's new label
    is not joinable yet, so its old copy must still be in the index: a search at that
    moment (run from the commit itself) still finds the row (it was invisible when the
    old copy left the index before the commit)."""
    make_index(rig)
    x = rand(3)
    wait_for(rig, rig.log.append_batch([encode(rig, "a", x[0]), encode(rig, "b", x[1])])[-1])
    state = rig.node.indexer.state
    real = state.commit
    seen: list[list[str]] = []

    def commit(batch: Any) -> None:
        if not seen:  # the next batch: the update of "a"
            hits = rig.node.service.search(SearchRequest("acme", "docs", x[0], 5, ef=64)).hits
            seen.append([h.id for h in hits])
        real(batch)

    monkeypatch.setattr(state, "commit", commit)
    wait_for(rig, rig.log.append_batch([encode(rig, "a", x[0], version=2)])[-1])
    assert seen and "a" in seen[0], seen
    hits = rig.node.service.search(SearchRequest("acme", "docs", x[0], 5)).hits
    assert [h.id for h in hits].count("a") == 1  # never both copies


@pytest.mark.slow  # waits on real HNSW builds by design: ~10 s idle, 30 s on a busy box
def test_back_pressure_bounds_the_unsealed_rows(tmp_path: Path) -> None:
    r = Rig(tmp_path, head_capacity=500)
    try:
        make_index(r, recipe="HNSW32", dim=128)
        ix = r.node.indexer
        ix.max_unsealed_rows, ix.batch_records = 1000, 250
        recorder = Recorder(ix.listener, r)
        ix.listener = recorder
        x = rand(6000, dim=128)
        records = [VectorUpsert("acme", "docs", str(i), x[i]) for i in range(6000)]
        last: Any = None
        for s in range(0, 6000, 1000):
            last = r.node.service.upsert_many(records[s : s + 1000])[-1]
        wait_for(r, last)
        ix.drain_builds()
        # at most one poll on top of the bound (the check runs before each poll)
        assert 1000 <= recorder.max_unsealed < 1000 + 250
        assert len(ix.indexes["acme/docs"]) == 6000
    finally:
        r.close()


# -- upsert_many, RESP, HTTP --------------------------------------------------------------
def test_upsert_many_answers_per_item_and_appends_the_rest_as_one_batch(rig: Rig) -> None:
    make_index(rig)
    svc = rig.node.service
    before = rig.log.end_offsets(rig.topics.vectors)[0]
    x = rand(4)
    out = svc.upsert_many(
        [
            VectorUpsert("acme", "docs", "a", x[0]),
            VectorUpsert("acme", "docs", "bad", x[1][:3]),
            VectorUpsert("acme", "docs", "a", x[2], tags=("color:red",)),
            VectorUpsert("acme", "docs", "b", x[3]),
            VectorUpsert("acme", "docs", "c", x[3], tags=("undeclared:x",)),
        ],
        [None, None, None, 5, None],
    )
    assert isinstance(out[1], DimensionMismatch) and isinstance(out[3], VersionConflict)
    assert isinstance(out[4], InvalidRequest)
    first, second = out[0], out[2]
    assert isinstance(first, LogPosition) and isinstance(second, LogPosition)
    assert (first.offset, second.offset) == (before, before + 1)
    assert rig.log.end_offsets(rig.topics.vectors)[0] == before + 2  # refused: nothing
    wait_for(rig, second)
    a = svc.get("acme", "docs", "a")
    assert a.version == 2 and a.tags == ("color:red",)
    with pytest.raises(Exception, match="not found"):
        svc.get("acme", "docs", "b")


@pytest.fixture
def resp(rig: Rig) -> Iterator[redis.Redis]:
    with serve_in_thread(
        RespServer(rig.node.service, "127.0.0.1", 0, metrics=ServiceMetrics())
    ) as server:
        client = redis.Redis(port=server.port, socket_timeout=10)
        yield client
        client.close()


def test_resp_pipelined_writes_are_one_batch_with_per_command_errors(
    rig: Rig, resp: redis.Redis
) -> None:
    make_index(rig)
    svc = rig.node.service
    calls: list[int] = []
    real = svc.upsert_many

    def counted(records: Any, if_versions: Any = None) -> Any:
        calls.append(len(records))
        return real(records, if_versions)

    svc.upsert_many = counted  # type: ignore[method-assign]
    x = rand(40)
    pipe = resp.pipeline(transaction=False)
    for i in range(40):
        if i == 10:
            pipe.execute_command("VEC.UPSERT", "acme", "docs", "bad", "VECTOR", b"\0" * 5)
        elif i == 20:
            pipe.execute_command("VEC.ADD", "acme", "docs", "0", "VECTOR", x[i].tobytes())
        else:
            pipe.execute_command("VEC.UPSERT", "acme", "docs", str(i), "VECTOR", x[i].tobytes())
    pipe.execute_command(
        "VEC.SEARCH", "acme", "docs", "TOPK", 3, "VECTOR", x[5].tobytes(), "CONSISTENCY", "strong"
    )
    replies = pipe.execute(raise_on_error=False)
    assert calls == [39]  # 39 well-formed writes in one call; the bad frame never reached it
    assert isinstance(replies[10], redis.ResponseError)
    assert "VEC_ERR_INVALID" in str(replies[10])
    assert isinstance(replies[20], redis.ResponseError)  # VEC.ADD of an id written before it
    assert "VEC_ERR_CONFLICT" in str(replies[20])
    tokens = [
        LogPosition.parse(r.decode() if isinstance(r, bytes) else r)
        for i, r in enumerate(replies[:40])
        if i not in (10, 20)
    ]
    offsets = [t.offset for t in tokens]
    assert offsets == list(range(offsets[0], offsets[0] + 38))
    hits = replies[40][0]
    assert hits[0][0] in (b"5", "5")


def test_vec_madd(rig: Rig, resp: redis.Redis) -> None:
    make_index(rig)
    x = rand(3)
    out = resp.execute_command(
        "VEC.MADD",
        "acme",
        "docs",
        "a",
        x[0].tobytes(),
        "b",
        b"\0" * 7,
        "c",
        x[2].tobytes(),
        "d",
        x[1][:4].tobytes(),
    )
    assert isinstance(out[1], redis.ResponseError) and isinstance(out[3], redis.ResponseError)
    assert "VEC_ERR_DIM" in str(out[3])
    pos = LogPosition.parse(out[2].decode() if isinstance(out[2], bytes) else out[2])
    wait_for(rig, pos)
    assert len(rig.node.indexer.indexes["acme/docs"]) == 2
    with pytest.raises(redis.ResponseError, match="VEC_ERR_INVALID"):
        resp.execute_command("VEC.MADD", "acme", "docs", "a")


def test_http_batch_upsert(rig: Rig) -> None:
    make_index(rig)
    x = rand(3)
    with (
        serve(create_http_app(rig.node.service, metrics=ServiceMetrics())) as url,
        httpx.Client(base_url=url, timeout=10) as http,
    ):
        r = http.post(
            "/v1/indexes/acme/docs/vectors:batch",
            json={
                "items": [
                    {"id": "a", "vector": x[0].tolist(), "meta": {"n": 1}, "tags": ["color:red"]},
                    {"id": "b", "vector": [1.0, 2.0]},
                    {"id": "c", "vector": x[2].tolist(), "if_version": 3},
                    {"id": "d", "vector": x[1].tolist(), "numeric": {"nope": 1.0}},
                    {"id": "e", "vector": x[1].tolist()},
                ]
            },
        )
        assert r.status_code == 200, r.text
        items = r.json()["items"]
        assert [i["error"]["code"] if i["error"] else None for i in items] == [
            None,
            "VEC_ERR_DIM",
            "VEC_ERR_CONFLICT",
            "VEC_ERR_INVALID",
            None,
        ]
        wait_for(rig, LogPosition.parse(items[4]["position"]))
        assert len(rig.node.indexer.indexes["acme/docs"]) == 2
        r = http.post("/v1/indexes/acme/docs/search", json={"vector": x[0].tolist(), "ef": 0})
        assert r.status_code == 400 and r.json()["error"]["code"] == "VEC_ERR_INVALID"
        r = http.post("/v1/indexes/acme/docs/search", json={"vector": x[0].tolist(), "ef": 50})
        assert r.status_code == 200 and r.json()["hits"][0]["id"] == "a"


@pytest.mark.slow  # 4,000 HNSW rows sealed, 80 searches
def test_ef_trades_recall_for_work(tmp_path: Path) -> None:
    r = Rig(tmp_path, head_capacity=4000)
    try:
        make_index(r, recipe="HNSW8", dim=32)
        x = rand(4000, dim=32, seed=11)
        out = r.node.service.upsert_many(
            [VectorUpsert("acme", "docs", str(i), x[i]) for i in range(4000)]
        )
        last = out[-1]
        assert isinstance(last, LogPosition)
        wait_for(r, last)
        vi = r.node.indexer.indexes["acme/docs"]
        deadline = time.monotonic() + 60
        while not vi.stats()["segments"] or vi.unsealed_rows:  # the applier seals it
            assert time.monotonic() < deadline
            time.sleep(0.05)
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        queries = rand(40, dim=32, seed=12)

        def recall(ef: int) -> float:
            found = 0
            for q in queries:
                truth = set(np.argsort(-(unit @ q))[:10].tolist())
                hits = r.node.service.search(SearchRequest("acme", "docs", q, 10, ef=ef)).hits
                found += len(truth & {int(h.id) for h in hits})
            return found / (10 * len(queries))

        low, high = recall(10), recall(400)
        assert high > low and high >= 0.98
        with pytest.raises(InvalidRequest):
            r.node.service.search(SearchRequest("acme", "docs", queries[0], 10, ef=0))
        with (
            pytest.raises(redis.ResponseError, match="VEC_ERR_INVALID"),
            serve_in_thread(
                RespServer(r.node.service, "127.0.0.1", 0, metrics=ServiceMetrics())
            ) as server,
        ):
            client = redis.Redis(port=server.port, socket_timeout=10)
            ok = client.execute_command(
                "VEC.SEARCH", "acme", "docs", "VECTOR", queries[0].tobytes(), "EF", 64
            )
            assert len(ok[0]) == 10
            client.execute_command(
                "VEC.SEARCH", "acme", "docs", "VECTOR", queries[0].tobytes(), "EF", 0
            )
    finally:
        r.close()


# -- exact re-ranking of quantised segments ----------------------------------------------
def test_exact_rerank_recovers_the_order_sq8_loses() -> None:
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((20, 64)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = (centres[rng.integers(0, 20, 4000)] + 0.06 * rng.standard_normal((4000, 64))).astype(
        np.float32
    )
    config = IndexConfig("acme", "docs", 64, recipe="Flat", dtype="int8")  # type: ignore[arg-type]
    vi = VectorIndex(config, head_capacity=4000)
    vi.upsert_many(np.arange(4000), x)
    job = vi.begin_seal()
    assert job is not None
    job.build()
    vi.finish_seal(job)
    assert vi.stats()["segments"][0]["recipe_used"] == "SQ8"
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    queries = (centres[rng.integers(0, 20, 50)] + 0.06 * rng.standard_normal((50, 64))).astype(
        np.float32
    )

    def recall() -> float:
        found = 0
        for q in queries:
            truth = set(np.argsort(-(unit @ q))[:10].tolist())
            found += len(truth & set(vi.search(q, 10).labels.tolist()))
        return found / (10 * len(queries))

    plain = recall()
    fetched: list[int] = []

    def exact(labels: list[int]) -> list[np.ndarray | None]:
        fetched.append(len(labels))
        return [None if label == 0 else x[label] for label in labels]  # 0: unknown

    vi.exact = exact
    refined = recall()
    assert refined >= 0.99 and refined > plain, (plain, refined)
    assert set(fetched) == {40}  # k * DEFAULT_REFINE_FACTOR candidates, one fetch a search
    vi.refine_factor = 1
    assert recall() == plain


def test_state_vectors_by_label_knows_only_current_copies(rig: Rig) -> None:
    make_index(rig)
    x = rand(3)
    x[2, 0] = 1e6  # beyond fp16: kept as fp32
    first = rig.log.append_batch([encode(rig, "a", x[0])])[-1]
    second = rig.log.append_batch([encode(rig, "a", x[1], version=2), encode(rig, "b", x[2])])
    wait_for(rig, second[-1])
    labels = [label_of(0, first.offset), label_of(0, second[0].offset), 12345]
    labels.append(label_of(0, second[1].offset))
    state = rig.node.state
    got = state.vectors_by_label("acme/docs", labels)
    assert got[0] is None and got[2] is None
    assert got[1] is not None and got[1].dtype == np.float16
    np.testing.assert_allclose(got[1], x[1], rtol=1e-3)
    assert got[3] is not None and got[3].dtype == np.float32
    np.testing.assert_array_equal(got[3], x[2])
    # a state written before the R keys existed: read from the entries, in fp32
    state._db.delete(b"R" + b"acme/docs\x00" + labels[1].to_bytes(8, "big", signed=True))
    again = state.vectors_by_label("acme/docs", labels[:2])
    assert again[0] is None and again[1] is not None and again[1].dtype == np.float32
    np.testing.assert_array_equal(again[1], x[1])


def test_idle_compaction_merges_small_segments_into_one() -> None:
    vi = VectorIndex(IndexConfig("acme", "docs", DIM, recipe="HNSW8"), head_capacity=100)
    x = rand(600)
    start = 0
    for size in (100, 300, 200):
        vi.upsert_many(np.arange(start, start + size), x[start : start + size])
        start += size
        job = vi.begin_seal()
        assert job is not None
        job.build()
        vi.finish_seal(job)
    assert [s["live"] for s in vi.stats()["segments"]] == [100, 300, 200]
    vi.compact_rows = 350  # 100 + 200 fit, the 300 does not
    assert vi.begin_merge() is None  # a busy writer: size tiers only (none is full)
    job = vi.begin_merge(idle=True)
    assert job is not None and sorted(len(s) for s in job.sources) == [100, 200]
    job.build()
    vi.finish_merge(job)
    assert sorted(s["live"] for s in vi.stats()["segments"]) == [300, 300]
    assert not vi.needs_merge(idle=True)  # 600 > compact_rows: stays two
    assert sorted(vi.search(x[5], 600).labels.tolist()) == list(range(600))
