"""Ingest pass 3: the state's hot-path encodings and the seal builder's OpenMP threads.

The state encodings were rewritten for speed; these tests pin them to the bytes the old
``json.dumps`` spelling wrote (stores written before must read the same, and the reverse),
and check that a row replaced within one batch leaves no re-rank (``R``) value behind.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import pytest

from streams.service.state import (
    _ENTRY_HEAD,
    Entry,
    StateBatch,
    StateStore,
    _rvalue,
    _rvalues,
    hit_value,
)
from tests.rigs import Rig

KEY = "acme/docs"
VEC = np.arange(8, dtype=np.float32) / 7


def old_tail(e: Entry) -> bytes:
    """The JSON tail of an entry as Entry.encode wrote it before pass 3."""
    fields: list[object] = [e.meta, list(e.tags), e.numeric, e.position]
    if e.expires_ms is not None:
        fields.append(e.expires_ms)
    return json.dumps(fields).encode()


@pytest.mark.parametrize(
    "entry",
    [
        Entry(1, 2, VEC, None, (), {}, "0:5"),
        Entry(1 << 40 | 9, 3, VEC, '{"t": "é\\u0001\\"x"}', (), {}, "1:9", 1_700_000_000_000),
        Entry(7, 1, VEC, "{}", ("a", "lang:fr"), {"price": 1.5}, "0:1"),
        Entry(7, 1, VEC, None, (), {"n": 2}, "0:1", 5),
    ],
)
def test_entry_encoding_is_the_json_dumps_spelling(entry: Entry) -> None:
    raw = entry.encode()
    head = _ENTRY_HEAD.size + VEC.nbytes
    assert raw[head:] == old_tail(entry)
    back = Entry.decode(raw)
    assert (
        back.label,
        back.version,
        back.meta,
        back.tags,
        back.numeric,
        back.position,
        back.expires_ms,
    ) == (
        entry.label,
        entry.version,
        entry.meta,
        entry.tags,
        entry.numeric,
        entry.position,
        entry.expires_ms,
    )
    assert np.array_equal(back.vector, entry.vector)


@pytest.mark.parametrize("id,meta", [("x", None), ('é"\n\\', '{"a": [1, "ü"]}'), ("a/b", "{}")])
def test_hit_value_is_the_json_dumps_spelling(id: str, meta: str | None) -> None:
    assert hit_value(id, meta) == json.dumps([id, meta]).encode()


def test_batched_rerank_values_match_one_by_one() -> None:
    big = np.full(8, 1e6, dtype=np.float32)  # overflows fp16: stored as fp32
    vectors = [VEC, big, -VEC]
    assert _rvalues(vectors) == [_rvalue(v) for v in vectors]
    assert _rvalues(vectors)[1][0] == 4
    mixed = [VEC, np.ones(3, dtype=np.float32)]  # two indexes of different dims
    assert _rvalues(mixed) == [_rvalue(v) for v in mixed]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    s = StateStore(tmp_path / "state")
    yield s
    s.close()


def test_replaced_within_a_batch_leaves_only_the_new_rerank_value(store: StateStore) -> None:
    first = Entry(10, 1, VEC, None, (), {}, "0:10")
    second = Entry(11, 2, -VEC, None, (), {}, "0:11")
    batch = StateBatch()
    batch.put_entry(KEY, "a", first, None)
    batch.put_entry(KEY, "a", second, batch.entry(store, KEY, "a"))
    batch.put_entry(KEY, "b", Entry(12, 1, VEC, None, (), {}, "0:12"), None)
    gone = batch.entry(store, KEY, "b")
    assert gone is not None
    batch.delete_entry(KEY, "b", gone)
    store.commit(batch)
    got = store.vectors_by_label(KEY, [10, 11, 12])
    assert got[0] is None and got[2] is None
    assert got[1] is not None
    assert np.allclose(got[1], -VEC, atol=1e-3)
    assert store.hit(KEY, 11) == ("a", None)
    assert store.hit(KEY, 10) is None


def test_seal_builder_uses_the_nodes_faiss_threads(tmp_path: Path) -> None:
    """A new thread's OpenMP default is every core; the builder must use faiss_threads."""
    rig = Rig(tmp_path)
    try:
        main = faiss.omp_get_max_threads()
        builder = rig.node.indexer._builder.submit(faiss.omp_get_max_threads).result(10)
        assert builder == main == 1  # QueryNode's default faiss_threads
    finally:
        rig.close()
