"""Memory budgets over every cache layer: L0 entries, L1 links, L2 representatives and L3
payload rows are counted against their tenant's (and index's) budget, a tenant over budget
evicts only its own state, and the bytes per layer are reported. The language-model alias
hook is off by default and never runs on the search thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.cache import CacheController, CachedResult, ResultCache
from streams.cache.canonical import AliasProposer, CanonicalKeyMap
from streams.cache.controller import L1_LINK_BYTES, l2_rep_bytes
from streams.cache.keys import QueryKey
from streams.cache.payload import ROW_BYTES, PayloadCache
from streams.index.model import CacheSettings, IndexConfig, Metric, Vector

DIM = 8
ALL = CacheSettings(("L0", "L1", "L2", "L3"))


def cfg(tenant: str, index: str = "i", cache: CacheSettings | None = ALL) -> IndexConfig:
    return IndexConfig(tenant, index, DIM, recipe="Flat", cache=cache)


def unit(seed: int) -> Vector:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    out: Vector = v / np.linalg.norm(v)
    return out


def offer(ctl: CacheController, c: IndexConfig, q: Vector, k: int = 5) -> QueryKey | None:
    """Search ``q`` through the layers; on a miss offer a result of ``k`` hits. The key
    stored, or None (a hit, or not stored)."""
    look = ctl.lookup(c, q, k, None)
    if look.hit:
        return None
    ids = tuple(f"d{i}" for i in range(k))
    entry = CachedResult(
        look.qkey, c.key, c.metric, q, k, None, tuple(range(k)), ids,
        tuple(1.0 - 0.01 * i for i in range(k)), (None,) * k, created_s=time.monotonic(),
    )  # fmt: skip
    out = ctl.offer(look, entry)
    return look.qkey if out is not None and out.stored else None


def payloads(ctl: CacheController, c: IndexConfig, labels: Iterable[int]) -> None:
    """The payload join of a fresh search of ``c`` returning ``labels`` (through L3)."""
    for label in labels:
        ctl.payloads.get(c.key, label, lambda _k, lb: (f"id{lb}", '{"m": 1}'))


def test_each_layer_is_charged_and_reported_per_tenant() -> None:
    cache = ResultCache(1 << 30)
    ctl = CacheController(cache, l2_threshold=0.0)
    a, b = cfg("a"), cfg("b", cache=CacheSettings(("L0", "L3")))
    keys = [offer(ctl, a, unit(i)) for i in range(4)]
    assert all(keys)
    assert keys[0] is not None
    entry = cache.peek(keys[0])
    assert entry is not None
    payloads(ctl, a, range(3))
    offer(ctl, b, unit(99))
    mem = ctl.memory("a")
    assert mem["L1"] == 4 * L1_LINK_BYTES and mem["L2"] == 4 * l2_rep_bytes(DIM)
    assert mem["L3"] == 3 * (ROW_BYTES + len("id0") + len('{"m": 1}'))
    assert mem["L0"] == cache.scope_bytes("t:a") - mem["L1"] - mem["L2"]
    assert mem["L0"] == 4 * (entry.nbytes - L1_LINK_BYTES - l2_rep_bytes(DIM))
    assert mem["total"] == mem["L0"] + mem["L1"] + mem["L2"] + mem["L3"]
    assert ctl.memory("b")["L1"] == ctl.memory("b")["L2"] == 0  # its layers are L0 and L3
    node = ctl.stats()["memory"]
    assert node["L1"] == mem["L1"] and node["L3"] == mem["L3"]
    # a dropped entry takes its links' bytes with it
    cache.invalidate_ids(a.key, ["d0"])
    assert ctl.memory("a")["L1"] == ctl.memory("a")["L2"] == 0


def test_l3_gets_the_room_the_entries_leave_and_is_trimmed_when_they_grow() -> None:
    one = CachedResult(  # the bytes of one entry of `offer`
        QueryKey(b"\0" * 16), "x/i", Metric.COSINE, unit(0), 5, None, tuple(range(5)),
        tuple(f"d{i}" for i in range(5)), (1.0,) * 5, (None,) * 5,
    ).nbytes + L1_LINK_BYTES + l2_rep_bytes(DIM)  # fmt: skip
    budget = 4 * one
    cache = ResultCache(1 << 30, tenant_budget_bytes=budget)
    ctl = CacheController(cache, l2_threshold=0.0)
    a, b = cfg("a"), cfg("b")
    payloads(ctl, b, range(200))
    b_rows = ctl.payloads.scope_rows("t:b")
    payloads(ctl, a, range(10_000))  # far more rows than fit: a keeps its newest
    assert ctl.memory("a")["total"] <= budget
    assert ctl.payloads.scope_rows("t:b") == b_rows  # b's rows stay
    assert ctl.payloads.stats()["evictions"] > 0
    for i in range(3):
        offer(ctl, a, unit(i))
    mem = ctl.memory("a")
    assert mem["L0"] > 0 and mem["total"] <= budget
    assert 0 < mem["L3"] <= budget - 3 * one
    ctl.set_tenant_budget("a", 2 * one)  # shrinking evicts a's entries and rows at once
    assert ctl.memory("a")["total"] <= 2 * one
    assert ctl.payloads.scope_rows("t:b") == b_rows


def test_an_index_budget_bounds_its_layers_too() -> None:
    cache = ResultCache(1 << 30)
    ctl = CacheController(cache, l2_threshold=0.0)
    small = cfg("a", "small", CacheSettings(("L0", "L1", "L2", "L3"), memory_budget_bytes=20_000))
    other = cfg("a", "other")
    payloads(ctl, other, range(50))
    for i in range(40):
        offer(ctl, small, unit(i))
        payloads(ctl, small, range(i * 5, i * 5 + 5))
        held = cache.scope_bytes("i:a/small") + ctl.payloads.scope_bytes("i:a/small")
        assert held <= 20_000
    assert len(ctl.payloads.scope_rows("i:a/other")) == 50


# -- the invariant, on random loads ------------------------------------------------------

TENANTS = ("t0", "t1", "t2")
BUDGETS = {"t0": 6_000, "t1": 15_000, "t2": 40_000}
INDEX_LAYERS = {
    "all": ("L0", "L1", "L2", "L3"),
    "tol": ("L1", "L2"),
    "exact": ("L0", "L3"),
}

OPS = st.lists(
    st.tuples(
        st.sampled_from(TENANTS),
        st.sampled_from(sorted(INDEX_LAYERS)),
        st.sampled_from(["offer", "offer", "near", "payloads", "budget"]),
        st.integers(0, 50),
    ),
    min_size=1,
    max_size=60,
)


def _state(ctl: CacheController, tenant: str, keys: set[QueryKey]) -> tuple[object, ...]:
    """Everything of ``tenant`` in the cache: its entries present, its bytes per layer,
    its L3 rows."""
    present = frozenset(k for k in keys if k in ctl.cache)
    mem = ctl.memory(tenant)
    return present, mem["L0"], mem["L1"], mem["L2"], ctl.payloads.scope_rows("t:" + tenant)


@settings(max_examples=60, deadline=None)
@given(ops=OPS)
def test_random_loads_never_exceed_a_budget_nor_evict_another_tenant(
    ops: Sequence[tuple[str, str, str, int]],
) -> None:
    cache = ResultCache(1 << 30)  # the node's budget never binds here
    ctl = CacheController(cache, l2_threshold=0.05)
    budgets = dict(BUDGETS)
    for t, b in budgets.items():
        ctl.set_tenant_budget(t, b)
    keys: dict[str, set[QueryKey]] = {t: set() for t in TENANTS}
    for tenant, index, op, seed in ops:
        c = cfg(tenant, index, CacheSettings(INDEX_LAYERS[index]))
        others = {t: _state(ctl, t, keys[t]) for t in TENANTS if t != tenant}
        if op == "offer":
            key = offer(ctl, c, unit(seed), k=1 + seed % 10)
        elif op == "near":  # a neighbour of a query seen: L1/L2 may answer, or a new entry
            q = (unit(seed % 5) + 0.01 * unit(1000 + seed)).astype(np.float32)
            key = offer(ctl, c, q)
        elif op == "payloads":
            key = None
            if "L3" in INDEX_LAYERS[index]:
                payloads(ctl, c, range(seed, seed + 8))
        else:  # the tenant's budget changes
            key = None
            budgets[tenant] = 2_000 + 1_000 * seed
            ctl.set_tenant_budget(tenant, budgets[tenant])
        if key is not None:
            keys[tenant].add(key)
        for t in TENANTS:
            mem = ctl.memory(t)
            assert mem["total"] <= budgets[t], (t, mem)
            assert min(mem["L0"], mem["L1"], mem["L2"], mem["L3"]) >= 0, mem
        after = {t: _state(ctl, t, keys[t]) for t in TENANTS if t != tenant}
        assert after == others, f"{tenant} {op} changed another tenant's cache"


# -- the language-model alias hook ---------------------------------------------------------


class RecordingHook:
    """Proposes ``whats up -> what is up``; records the thread of every call."""

    def __init__(self, fail: bool = False) -> None:
        self.threads: list[int] = []
        self.fail = fail

    def propose_aliases(self, texts: Sequence[str]) -> Iterable[tuple[str, str]]:
        self.threads.append(threading.get_ident())
        if self.fail:
            raise RuntimeError("model down")
        return [("whats up", "what is up")] if "whats up" in texts else []


def test_the_hook_is_off_by_default_and_the_text_path_keeps_no_texts() -> None:
    from streams.text import search as text_search

    keys = CanonicalKeyMap()
    keys.canonical("whats up")
    assert keys.take_recent() == []  # nothing kept without a proposer
    # the text query path's map: no proposer attached, so its lookups keep nothing
    assert text_search._canonical("Whats up?") == "whats up"
    assert text_search._CANON.take_recent() == []


def test_the_hook_runs_off_the_search_thread_and_installs_aliases() -> None:
    keys = CanonicalKeyMap()
    hook = RecordingHook()
    proposer = AliasProposer(keys, hook, interval_s=0.01).start()
    try:
        me = threading.get_ident()
        deadline = time.monotonic() + 20
        while keys.canonical("Whats up?") != "what is up":  # the search thread's lookups
            assert time.monotonic() < deadline, "the proposer never installed the alias"
            time.sleep(0.005)
        assert hook.threads and me not in hook.threads  # never on the calling thread
        assert proposer.added == 1 and proposer.errors == 0
    finally:
        proposer.close()
    assert keys.take_recent() == []  # closed: the map keeps no texts again


def test_a_failing_hook_is_counted_and_leaves_the_table() -> None:
    keys = CanonicalKeyMap(aliases={"hi there": "hello"})
    proposer = AliasProposer(keys, RecordingHook(fail=True))
    keys.canonical("whats up")
    assert proposer.run_once() == [] and proposer.errors == 1
    assert "model down" in (proposer.last_error or "")
    assert keys.aliases() == {"hi there": "hello"}
    assert proposer.run_once() == []  # its texts went with the failed round


def test_lookups_never_call_the_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a proposer attached but not running, lookups only record texts."""
    hook = RecordingHook()
    keys = CanonicalKeyMap()
    AliasProposer(keys, hook)
    monkeypatch.setattr(
        CanonicalKeyMap, "propose", lambda *a, **k: pytest.fail("propose on a lookup")
    )
    for _ in range(100):
        keys.canonical("whats up")
    assert hook.threads == [] and keys.take_recent() == ["whats up"]


def test_payload_cache_scopes_are_consistent() -> None:
    rooms = {"t:a": 2_000.0}
    pc = PayloadCache(10_000, lambda scope: rooms.get(scope, float("inf")))
    for i in range(50):
        pc.get("a/x" if i % 2 else "a/y", i, lambda _k, lb: (f"id{lb}", None))
        pc.get("b/x", i, lambda _k, lb: (f"id{lb}", None))
    assert pc.scope_bytes("t:a") <= 2_000
    assert pc.scope_bytes("t:a") == pc.scope_bytes("i:a/x") + pc.scope_bytes("i:a/y")
    assert pc.stats()["bytes"] == pc.scope_bytes("t:a") + pc.scope_bytes("t:b") <= 10_000
    rows = pc.scope_rows("i:a/x")
    assert pc.drop_index("a/x") == len(rows) > 0
    assert pc.scope_bytes("i:a/x") == 0 and not pc.scope_rows("i:a/x")
    assert pc.scope_bytes("t:a") == pc.scope_bytes("i:a/y")
