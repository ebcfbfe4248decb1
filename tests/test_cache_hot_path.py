"""The cache hot path's shortcuts keep behaviour: the QueryKey layout and identity, the
result cache's one-lock probe and stored copy, shared Hit objects on hits that a caller
cannot corrupt, layers that are off costing nothing, and RESP replies of a hit encoded
once per entry, ``k`` and protocol, equal to what a fresh search answers (real node, real
redis-py). Timing lives in bench/cache_bench.py, not here."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.cache import CachedResult, QueryKey, ResultCache
from streams.cache.controller import CacheController
from streams.cache.keys import query_key
from streams.cache.policy import AdmissionDecision
from streams.cache.querylog import QueryLogEmitter, SearchObserver
from streams.index.filters import parse_filter
from streams.index.model import (
    CacheSettings,
    FieldKind,
    FilterField,
    IndexConfig,
    Metric,
    VectorUpsert,
)
from streams.service.api import SearchRequest
from streams.service.resp import (
    RespServer,
    _encode_flat,
    _flat,
    _search_reply,
    serve_in_thread,
)
from streams.service.resp_wire import Encoded, encode_reply
from streams.service.vector_service import CachedHits
from tests.rigs import Rig

DIM = 8


def unit(seed: int, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    out: np.ndarray = v / np.linalg.norm(v)
    return out


def _reference_key(index_key: str, metric: str, v: np.ndarray, k: int, flt: str) -> bytes:
    """The documented layout (streams/cache/keys.py), hashed from scratch."""
    h = hashlib.blake2b(digest_size=16, person=b"streamvec.L0")
    for part in (
        index_key.encode(),
        metric.encode(),
        str(k).encode(),
        flt.encode(),
        np.ascontiguousarray(v, dtype="<f4").tobytes(),
    ):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


def test_query_key_layout_and_identity_are_unchanged() -> None:
    config = IndexConfig("t", "i", DIM, fields=(FilterField("lang", FieldKind.TAG),))
    flt = parse_filter("lang:en", config)
    for seed in range(20):
        v = unit(seed)
        for metric in (Metric.COSINE, Metric.IP, "l2"):
            for k, f in ((1, None), (10, flt), (10, None)):
                got = query_key("t/i", metric, v, k, f)
                want = _reference_key(
                    "t/i", str(Metric(metric).value), v, k, "" if f is None else str(f)
                )
                assert got.digest == want
                assert got == QueryKey(want) and hash(got) == hash(QueryKey(want))
    a, b = (
        query_key("t/i", Metric.COSINE, unit(1), 5, None),
        query_key("t/j", "cosine", unit(1), 5, None),
    )
    assert a != b and {a: 1}.get(QueryKey(a.digest)) == 1 and a != a.digest
    assert str(a) == "qk:" + a.digest.hex()
    with pytest.raises(ValueError):
        QueryKey(b"short")


def entry(key: QueryKey, index_key: str = "t/i", n: int = 3) -> CachedResult:
    return CachedResult(
        key,
        index_key,
        Metric.COSINE,
        unit(int.from_bytes(key.digest[:2])),
        5,
        None,
        tuple(range(n)),
        tuple(f"id{i}" for i in range(n)),
        tuple(1.0 - i / 10 for i in range(n)),
        (None, '{"a": 1}', None)[:n],
    )


def test_probe_is_seq_switch_and_l0_lookup_under_one_lock() -> None:
    cache = ResultCache(1 << 20)
    k1, k2 = QueryKey(b"\1" * 16), QueryKey(b"\2" * 16)
    assert cache.probe("t/i", k1) == (0, True, None)
    assert cache.stats().misses == 1
    e = entry(k1)
    assert cache.put(e, 0).stored
    seq, enabled, found = cache.probe("t/i", k1)
    assert (seq, enabled) == (0, True) and found is not None and found[1] == 1
    assert found[0].ids == e.ids and cache.stats().hits == 1
    assert cache.probe("t/i", None) == (0, True, None)  # no L0 lookup, nothing counted
    cache.invalidate_ids("t/i", ["id0"])  # drops the entry, advances the sequence
    assert cache.probe("t/i", k1) == (1, True, None)
    cache.set_enabled("t/i", False)
    assert cache.probe("t/i", k2) == (1, False, None)
    assert cache.stats().misses == 2  # a disabled index counts nothing


def test_put_stores_a_copy_with_the_decision_and_leaves_the_offer_alone() -> None:
    cache = ResultCache(1 << 20)
    e = entry(QueryKey(b"\3" * 16))
    assert cache.put(e, 0).stored
    assert e.admission is None and e.hit_count == 0
    stored = cache.peek(e.key)
    assert stored is not None and stored is not e
    for name in (
        "key",
        "index_key",
        "metric",
        "k",
        "filter",
        "labels",
        "ids",
        "scores",
        "metas",
        "applied",
        "compute_ms",
        "created_s",
    ):
        assert getattr(stored, name) == getattr(e, name), name
    assert np.array_equal(stored.vector, e.vector) and not stored.vector.flags.writeable
    assert isinstance(stored.admission, AdmissionDecision) and stored.admission.action == "admit"
    assert (
        stored.nbytes
        == e.nbytes
        == (320 + 12 * DIM + sum(len(i) for i in e.ids) + len('{"a": 1}') + 120 * 3)
    )


def test_an_index_with_no_layer_on_costs_the_cache_nothing() -> None:
    cache = ResultCache(1 << 20)
    ctl = CacheController(cache, default_layers=("L0", "L1", "L2"))
    off = IndexConfig("t", "off", DIM, cache=CacheSettings(("NONE",)))
    look = ctl.lookup(off, unit(1), 5, None)
    assert look.layer == "none" and look.layers == frozenset() and look.l1_key is None
    assert look.qkey == query_key("t/off", Metric.COSINE, unit(1), 5, None)
    assert ctl.offer(look, entry(look.qkey, "t/off")) is None
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries) == (0, 0, 0)
    assert ctl.stats()["l1_keys"] == 0 and ctl.stats()["l2_clusters"] == 0


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    svc = r.node.service
    svc.create_index(
        IndexConfig("acme", "docs", DIM, recipe="Flat", cache=CacheSettings(("L0", "L1")))
    )
    token = ""
    for i in range(40):
        token = svc.upsert(
            VectorUpsert("acme", "docs", f"v{i}", unit(100 + i), f'{{"n": {i}}}' if i % 2 else None)
        ).token
    assert r.node.catch_up(30) and token
    yield r
    r.close()


def test_hits_share_their_hit_objects_and_a_caller_cannot_corrupt_them(rig: Rig) -> None:
    svc = rig.node.service
    q = unit(7)
    fresh = svc.search(SearchRequest("acme", "docs", q, 5))
    assert not fresh.debug["cache_hit"]
    first = svc.search(SearchRequest("acme", "docs", q, 5))
    assert first.debug["cache_hit"] and first.debug["layer"] == "L0"
    assert isinstance(first.hits, CachedHits) and first.hits == fresh.hits
    assert first.debug["applied"] == fresh.debug["applied"]
    first.hits.clear()  # the caller's list: the cached entry is not touched
    first.debug["decision"]["action"] = "changed"
    second = svc.search(SearchRequest("acme", "docs", q, 5))
    assert second.hits == fresh.hits and second.debug["decision"]["action"] == "admit"
    third = svc.search(SearchRequest("acme", "docs", q, 5))
    assert all(a is b for a, b in zip(second.hits, third.hits, strict=True))  # built once
    # an L1 hit of the same entry serves its first k only
    scaled = svc.search(SearchRequest("acme", "docs", q * np.float32(3.0), 3))
    assert scaled.debug["layer"] == "L1" and scaled.hits == fresh.hits[:3]


def _rows(reply: Any) -> list[tuple[str, float, str | None]]:
    def text(x: Any) -> str:
        return x.decode() if isinstance(x, bytes) else str(x)

    return [(text(i), float(s), None if m is None else text(m)) for i, s, m in reply]


@pytest.mark.parametrize("proto", [2, 3])
def test_resp_hit_reply_is_encoded_once_and_equals_a_fresh_one(rig: Rig, proto: int) -> None:
    svc = rig.node.service
    with serve_in_thread(RespServer(svc, "127.0.0.1", 0)) as server:
        client = redis.Redis(port=server.port, protocol=proto, socket_timeout=10)
        try:
            q = unit(11).tobytes()
            args = ("VEC.SEARCH", "acme", "docs", "TOPK", 4, "VECTOR", q)
            miss = client.execute_command(*args)
            hit = client.execute_command(*args)
            again = client.execute_command(*args)
        finally:
            client.close()
    assert _rows(miss[0]) == _rows(hit[0]) == _rows(again[0]) and len(_rows(hit[0])) == 4
    assert any(m is not None for _, _, m in _rows(hit[0]))
    cached = (
        svc.cache.peek(query_key("acme/docs", Metric.COSINE, unit(11), 4, None))
        if svc.cache
        else None
    )
    assert cached is not None
    encoded = cached.derived[("resp", 4, proto)]
    assert isinstance(encoded, Encoded)
    rows = [[h.id, float(h.score), h.meta] for h in cached.derived[("hits", 4)]]
    assert encoded == encode_reply(rows, proto)  # what the uncached path writes


def test_encoded_parts_are_written_verbatim() -> None:
    part = Encoded(encode_reply([["a", 1.5, None]], 3))
    assert encode_reply([part, {"x": 1}], 3) == (
        b"*2\r\n" + bytes(part) + encode_reply({"x": 1}, 3)
    )
    assert encode_reply(b"raw", 2) == b"$3\r\nraw\r\n"  # plain bytes stay bulk strings


def test_a_hit_reply_is_taken_from_the_entrys_encoding(rig: Rig) -> None:
    """The shortcut is used, not only filled: a planted encoding is what the client reads."""
    svc = rig.node.service
    with serve_in_thread(RespServer(svc, "127.0.0.1", 0)) as server:
        client = redis.Redis(port=server.port, protocol=2, socket_timeout=10)
        try:
            args = ("VEC.SEARCH", "acme", "docs", "TOPK", 2, "VECTOR", unit(12).tobytes())
            client.execute_command(*args)  # miss: cached
            client.execute_command(*args)  # first hit: encoded and kept
            cached = svc.cache.peek(query_key("acme/docs", Metric.COSINE, unit(12), 2, None))
            assert cached is not None and ("resp", 2, 2) in cached.derived
            cached.derived[("resp", 2, 2)] = Encoded(encode_reply([["planted", 0.5, None]], 2))
            hits, _debug = client.execute_command(*args)
        finally:
            client.close()
    assert _rows(hits) == [("planted", 0.5, None)]


def test_the_query_log_event_is_built_later_from_what_the_search_answered(rig: Rig) -> None:
    svc = rig.node.service
    emitter = QueryLogEmitter(rig.log, rig.topics, rig.codec, linger_s=0.01).start()
    svc.search_observer = SearchObserver(emitter=emitter)
    try:
        q = unit(13)
        miss = svc.search(SearchRequest("acme", "docs", q, 3, session_id="s"))
        hit = svc.search(SearchRequest("acme", "docs", q, 3, session_id="s"))
        want = [h.id for h in miss.hits]
        miss.hits.clear()  # callers may change their lists once answered
        hit.hits.clear()
        assert emitter.flush(10)
    finally:
        svc.search_observer = None
        emitter.close()
    events = []
    for partition, end in rig.log.end_offsets(rig.topics.query_log).items():
        for r in rig.log.read(rig.topics.query_log, partition, 0, end):
            if r.value is not None:
                events.append(rig.codec.decode(r.value)[1])
    assert [e["cache_hit"] for e in events] == [False, True]
    assert all(e["result_ids"] == want and e["top_k"] == 3 for e in events)
    key = str(query_key("acme/docs", Metric.COSINE, q, 3, None))
    assert all(e["query_key"] == key and e["session_id"] == "s" for e in events)
    assert events[1]["cache_layer"] == "L0" and events[1]["features"]["size"] > 0
    assert events[0]["cache_layer"] == "NONE" and events[0]["timestamp"]


# -- the RESP search reply, encoded in one pass --------------------------------------------
@pytest.mark.parametrize("proto", [2, 3])
def test_search_reply_bytes_equal_the_general_encoders(rig: Rig, proto: int) -> None:
    """``_search_reply`` writes the debug map directly (``_encode_flat``) and keeps its
    entry's JSON as bytes: the bytes are those of ``encode_reply([rows, _flat(debug)])``,
    for a miss, a first and a repeated L0 hit, and an L1 hit, in RESP2 and RESP3."""
    svc = rig.node.service
    q = unit(21)
    answers = [
        svc.search(SearchRequest("acme", "docs", q, 4)),  # miss
        svc.search(SearchRequest("acme", "docs", q, 4)),  # L0
        svc.search(SearchRequest("acme", "docs", q, 4)),  # L0 again: memo filled
        svc.search(SearchRequest("acme", "docs", q * np.float32(2.0), 3)),  # L1
    ]
    assert [a.debug["layer"] for a in answers] == ["none", "L0", "L0", "L1"]
    for answer in answers:
        rows = [[h.id, float(h.score), h.meta] for h in answer.hits]
        want = encode_reply([rows, _flat(answer.debug)], proto)
        assert _search_reply(answer, proto) == want
        assert _search_reply(answer, proto) == want  # from the memo this time


_JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
_DEBUG_VALUE = (
    _JSON_VALUE
    | st.dictionaries(
        st.sampled_from(["validate", "cache", "é", "a b", 'x"y']),
        st.floats() | st.integers(),
        max_size=3,
    )
    | st.lists(st.text(max_size=6), max_size=20)
    | st.sampled_from([np.float32(0.25), np.int64(3), np.bool_(True)])
)


@settings(max_examples=300, deadline=None)
@given(
    d=st.dictionaries(
        st.sampled_from(["layer", "decision", "cached_at", "applied", "k", "é"])
        | st.text(max_size=6),
        _DEBUG_VALUE,
        max_size=8,
    ),
    proto=st.sampled_from([2, 3]),
    memo=st.booleans(),
)
def test_encode_flat_equals_encoding_the_flat_map(
    d: dict[str, Any], proto: int, memo: bool
) -> None:
    entry_memo: dict[Any, Any] | None = {} if memo else None
    want = encode_reply(_flat(d), proto)
    assert _encode_flat(d, proto, entry_memo) == want
    assert _encode_flat(d, proto, entry_memo) == want  # a filled memo answers the same
