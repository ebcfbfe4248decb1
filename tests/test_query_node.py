"""The query node end to end on the embedded log: writes through the log, the indexer,
searches at each consistency, snapshots and replay, poison records."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from streams.index.exceptions import (
    DimensionMismatch,
    InvalidRequest,
    NotFound,
    VersionConflict,
)
from streams.index.model import Consistency, FieldKind, FilterField, IndexConfig, VectorUpsert
from streams.log.port import Record
from streams.service.api import SearchRequest
from tests.rigs import Rig

DIM = 16
SESSION = Consistency.SESSION
STRONG = Consistency.STRONG


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def make_index(rig: Rig, recipe: str = "Flat", metric: str = "cosine") -> IndexConfig:
    config = IndexConfig("acme", "docs", DIM, metric=metric, recipe=recipe,  # type: ignore[arg-type]
                         fields=(FilterField("color", FieldKind.TAG),
                                 FilterField("price", FieldKind.NUMERIC)))
    rig.node.service.create_index(config)
    return config


def brute_force(vectors: dict[str, np.ndarray], q: np.ndarray, k: int) -> list[str]:
    ids = sorted(vectors)
    m = np.stack([vectors[i] for i in ids])
    m = m / np.linalg.norm(m, axis=1, keepdims=True)
    scores = m @ (q / np.linalg.norm(q))
    order = np.argsort(-scores, kind="stable")[:k]
    return [ids[i] for i in order]


def search(rig: Rig, q: np.ndarray, k: int = 10, token: str | None = None,
           flt: str | None = None, consistency: Consistency = SESSION) -> list[str]:
    req = SearchRequest("acme", "docs", q, k, flt, consistency,
                        (token,) if token else (), timeout_ms=10_000)
    return [h.id for h in rig.node.service.search(req).hits]


def upsert(rig: Rig, id: str, vec: np.ndarray, **kw: object) -> str:
    rec = VectorUpsert("acme", "docs", id, vec.astype(np.float32), **kw)  # type: ignore[arg-type]
    return rig.node.service.upsert(rec).token


def test_writes_are_searchable_at_session_consistency_and_match_brute_force(rig: Rig) -> None:
    make_index(rig)
    rng = np.random.default_rng(1)
    vectors = {f"v{i}": rng.standard_normal(DIM).astype(np.float32) for i in range(500)}
    token = ""
    for id, v in vectors.items():
        token = upsert(rig, id, v)
    for _ in range(20):
        q = rng.standard_normal(DIM).astype(np.float32)
        assert search(rig, q, 10, token) == brute_force(vectors, q, 10)
    info = rig.node.service.info("acme", "docs")
    assert info["stats"]["live"] == 500


def test_deletes_and_updates_are_never_returned_after_their_token(rig: Rig) -> None:
    make_index(rig)
    rng = np.random.default_rng(2)
    vectors = {f"v{i}": rng.standard_normal(DIM).astype(np.float32) for i in range(300)}
    for id, v in vectors.items():
        upsert(rig, id, v)
    q = rng.standard_normal(DIM).astype(np.float32)
    for round_ in range(20):
        top = search(rig, q, 5, consistency=STRONG)
        victim = top[0]
        if round_ % 2:
            token = rig.node.service.delete("acme", "docs", victim).token
            del vectors[victim]
        else:  # move it far away
            vectors[victim] = -q
            token = upsert(rig, victim, -q)
        assert victim not in search(rig, q, 5, token)
        assert search(rig, q, 10, token) == brute_force(vectors, q, 10)


def test_versions_add_and_if_version(rig: Rig) -> None:
    make_index(rig)
    v = np.ones(DIM, dtype=np.float32)
    svc = rig.node.service
    t1 = svc.add(VectorUpsert("acme", "docs", "a", v)).token
    with pytest.raises(VersionConflict):
        svc.add(VectorUpsert("acme", "docs", "a", v))
    svc.upsert(VectorUpsert("acme", "docs", "a", v), if_version=1)
    with pytest.raises(VersionConflict):
        svc.upsert(VectorUpsert("acme", "docs", "a", v), if_version=1)
    got = svc.get("acme", "docs", "a", consistency=STRONG)
    assert got.version == 2
    assert t1 != got.position
    with pytest.raises(NotFound):
        svc.delete("acme", "docs", "missing")


def test_invalid_writes_append_nothing(rig: Rig) -> None:
    make_index(rig)
    svc = rig.node.service
    before = rig.log.end_offsets(rig.topics.vectors)
    bad = [
        (VectorUpsert("acme", "docs", "a", np.ones(DIM + 1, dtype=np.float32)), DimensionMismatch),
        (VectorUpsert("acme", "docs", "a", np.full(DIM, np.nan, dtype=np.float32)), InvalidRequest),
        (VectorUpsert("acme", "docs", "", np.ones(DIM, dtype=np.float32)), InvalidRequest),
        (VectorUpsert("acme", "docs", "a", np.ones(DIM, dtype=np.float32), meta="{not json"),
         InvalidRequest),
        (VectorUpsert("acme", "docs", "a", np.ones(DIM, dtype=np.float32), tags=("size:xl",)),
         InvalidRequest),  # undeclared tag field
        (VectorUpsert("acme", "docs", "a", np.ones(DIM, dtype=np.float32), numeric={"w": 1.0}),
         InvalidRequest),  # undeclared numeric field
        (VectorUpsert("acme", "nope", "a", np.ones(DIM, dtype=np.float32)), NotFound),
        (VectorUpsert("ac me", "docs", "a", np.ones(DIM, dtype=np.float32)), InvalidRequest),
    ]
    for rec, exc in bad:
        with pytest.raises(exc):
            svc.upsert(rec)
    assert rig.log.end_offsets(rig.topics.vectors) == before
    with pytest.raises(InvalidRequest):
        search(rig, np.ones(DIM, dtype=np.float32), flt="size:xl")


def test_filters_and_widening(rig: Rig) -> None:
    make_index(rig)
    rng = np.random.default_rng(3)
    vectors = {}
    for i in range(400):
        v = rng.standard_normal(DIM).astype(np.float32)
        color = "red" if i % 10 == 0 else "blue"
        vectors[f"v{i}"] = (v, color, float(i))
        token = upsert(rig, f"v{i}", v, tags=(f"color:{color}",), numeric={"price": float(i)})
    q = rng.standard_normal(DIM).astype(np.float32)
    red = {k: v for k, (v, c, _p) in vectors.items() if c == "red"}
    assert search(rig, q, 10, token, "color:red") == brute_force(red, q, 10)
    cheap_blue = {k: v for k, (v, c, p) in vectors.items() if c == "blue" and p < 50}
    assert search(rig, q, 10, token, "color:blue price<50") == brute_force(cheap_blue, q, 10)
    # fewer matches than k: all of them, not fewer
    few = {k: v for k, (v, c, p) in vectors.items() if c == "red" and p < 35}
    assert search(rig, q, 10, token, "color:red price<35") == brute_force(few, q, 10)


def _populate(rig: Rig, rng: np.random.Generator, n: int, vectors: dict[str, np.ndarray]) -> str:
    token = ""
    for i in range(n):
        id = f"v{rng.integers(0, n * 2)}"
        if id in vectors and rng.random() < 0.2:
            token = rig.node.service.delete("acme", "docs", id).token
            del vectors[id]
        else:
            vectors[id] = rng.standard_normal(DIM).astype(np.float32)
            token = upsert(rig, id, vectors[id], numeric={"price": float(i)})
    return token


def test_snapshot_then_replay_equals_full_replay(tmp_path: Path) -> None:
    rig = Rig(tmp_path, head_capacity=150)
    try:
        make_index(rig)
        rng = np.random.default_rng(4)
        vectors: dict[str, np.ndarray] = {}
        token = _populate(rig, rng, 900, vectors)
        search(rig, np.ones(DIM, dtype=np.float32), 1, token)
        rig.node.indexer.drain_builds()
        snap = rig.node.service.snapshot()
        assert snap["indexes"] == ["acme/docs"]
        token = _populate(rig, rng, 400, vectors)  # after the snapshot
        queries = [rng.standard_normal(DIM).astype(np.float32) for _ in range(15)]
        before = [search(rig, q, 10, token) for q in queries]
        assert before == [brute_force(vectors, q, 10) for q in queries]
        rig.restart_node()
        assert rig.node.restored_from == snap["snapshot"]
        from_snapshot = [search(rig, q, 10, token) for q in queries]
        rig.restart_node(drop_snapshots=True)
        assert rig.node.restored_from is None
        full_replay = [search(rig, q, 10, token) for q in queries]
        assert before == from_snapshot == full_replay
    finally:
        rig.close()


def test_poison_records_go_to_the_dlq_and_the_stream_goes_on(rig: Rig) -> None:
    make_index(rig)
    good = rig.node.service.upsert(
        VectorUpsert("acme", "docs", "ok1", np.ones(DIM, dtype=np.float32)))
    vt = rig.topics.vectors
    wrong_dim = rig.codec.encode(f"{vt}-value", "VectorRecord", {
        "tenant": "acme", "index": "docs", "id": "bad", "vector": b"\0" * 12, "dtype": "fp32",
        "version": 1, "timestamp": 0})
    no_index = rig.codec.encode(f"{vt}-value", "VectorRecord", {
        "tenant": "acme", "index": "ghost", "id": "x", "vector": b"\0" * 4 * DIM,
        "dtype": "fp32", "version": 1, "timestamp": 0})
    rig.log.append_batch([
        Record.of(vt, "acme/docs/bad", wrong_dim),
        Record.of(vt, "acme/docs/garbage", b"\x07not avro"),
        Record.of(vt, "acme/ghost/x", no_index),
    ])
    last = rig.node.service.upsert(
        VectorUpsert("acme", "docs", "ok2", np.ones(DIM, dtype=np.float32)))
    hits = search(rig, np.ones(DIM, dtype=np.float32), 10, last.token)
    assert sorted(hits) == ["ok1", "ok2"]
    assert good.offset < last.offset
    dead = rig.log.read(rig.topics.dlq, 0, 0, 100)
    assert len(dead) == 3
    codes = sorted(dict(d.headers)["dlq.error_code"].decode() for d in dead)
    assert codes == ["VEC_ERR_DIM", "VEC_ERR_INVALID", "VEC_ERR_NOT_FOUND"]
