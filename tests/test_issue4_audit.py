"""Issue 4 clauses the audit (``/tmp/briefs3/audit4.md``) found without a test of their own:

* sealing and merging change no result, so they invalidate nothing (a node-level check:
  an entry cached while its hits sat in the Head is still served, equal to a fresh
  search, after they were sealed into segments and those merged into one);
* the guardrails are wired on a running node: a PolicyUpdate read from the ``policy``
  topic whose own floor (``min_hit_rate``) is broken by the searches the node answers
  falls back to the rules, says why in ``VEC.INFO``, and stops deciding;
* prefetched results are admitted like any other result: the node's admission policy
  decides them (a policy that refuses leaves the predicted query uncached);
* the QQP acceptance (slow): L2 at its default setting, tuned on the even rows, serves
  ``text_a``'s answer to ``text_b`` with precision >= 0.95 on the odd rows.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streams.cache import AdmissionDecision, CachedResult
from streams.cache.controller import settled_decision
from streams.cache.policy import GuardConfig, PolicyHolder
from streams.cache.prefetch import Prefetcher
from streams.cache.querylog import SearchObserver
from streams.index.model import Consistency, IndexConfig, VectorUpsert
from streams.policy.learner import publish_policy
from streams.service.api import SearchRequest
from streams.service.query_node import QueryNode
from tests.rigs import Rig

DIM = 8
KEY = "acme/docs"


def wait_for(pred: Any, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return bool(pred())


def upsert(rig: Rig, id: str, v: np.ndarray) -> str:
    rec = VectorUpsert("acme", "docs", id, np.asarray(v, dtype=np.float32))
    return rig.node.service.upsert(rec).token


def search(rig: Rig, q: np.ndarray, token: str, k: int = 5) -> Any:
    return rig.node.service.search(
        SearchRequest("acme", "docs", q, k, None, Consistency.SESSION, (token,), timeout_ms=10_000)
    )


def fresh_ids(rig: Rig, q: np.ndarray, k: int) -> list[str]:
    """The same search with the cache out of the way: the index itself, then the state."""
    out = rig.node.indexer.indexes[KEY].search(q, k, None)
    found = [rig.node.state.hit(KEY, int(label)) for label in out.labels]
    return [f[0] for f in found if f is not None]


# -- sealing and merging invalidate nothing ------------------------------------------------


def test_an_entry_survives_the_seal_and_merge_of_its_hits_and_equals_a_fresh_search(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path, head_capacity=16)
    try:
        rig.node.service.create_index(IndexConfig("acme", "docs", DIM, recipe="Flat"))
        rng = np.random.default_rng(3)
        q = rng.standard_normal(DIM).astype(np.float32)
        token = ""
        for i in range(12):  # fewer than a Head: every hit of the entry is in the Head
            token = upsert(rig, f"v{i}", rng.standard_normal(DIM))
        first = search(rig, q, token)
        assert not first.debug["cache_hit"] and first.debug["decision"]["outcome"] == "parked"
        stored = search(rig, q, token)  # lazy offers (the default): stored by the repeat
        assert stored.debug["cache_hit"] and [h.id for h in stored.hits] == [
            h.id for h in first.hits
        ]
        vi = rig.node.indexer.indexes[KEY]
        assert vi.stats()["segments"] == []
        cache = rig.node.cache
        assert cache is not None
        before = cache.stats()
        # rounds of writes opposite the query (cosine about -1: none enters the entry's
        # top 5); each round of 17 fills the Head at least once, so it is sealed at least
        # once per round (the first seal takes the entry's hits out of the Head), and the
        # segments are merged (tiered, then idle) until one holds them all
        for r in range(5):
            for i in range(17):
                token = upsert(rig, f"far{r}.{i}", -q + rng.standard_normal(DIM) * 0.05)
            assert rig.node.catch_up(30)
            assert wait_for(
                lambda: (st := vi.stats())["head_rows"] < 16 and st["frozen_head_rows"] == 0
            )

        def merged() -> bool:
            st = vi.stats()
            segs = st["segments"]
            return len(segs) == 1 and segs[0]["rows"] + st["head_rows"] == 12 + 5 * 17

        assert wait_for(merged), vi.stats()  # five or more seals, merged into one segment
        again = search(rig, q, token)
        assert again.debug["cache_hit"] and again.debug["layer"] == "L0"
        assert [h.id for h in again.hits] == [h.id for h in first.hits] == fresh_ids(rig, q, 5)
        after = cache.stats()
        assert after.invalidations == before.invalidations  # the seals and merges dropped none
        # the check above can fail: a write that enters the result drops it at once
        token = upsert(rig, "near", q)
        near = search(rig, q, token)
        assert not near.debug["cache_hit"] and near.hits[0].id == "near"
    finally:
        rig.close()


# -- guardrails on a running node -------------------------------------------------------------


class GuardedRig(Rig):
    """A Rig whose node runs the policy loop with a short comparison window."""

    def _node(self) -> QueryNode:
        node = QueryNode(
            self.log,
            self.topics,
            self.codec,
            self.root / "node",
            head_capacity=self.head_capacity,
            policy_loop=True,
        )
        assert node.policy_loop is not None
        node.policy_loop.holder.guard = GuardConfig(decision_budget_us=1e9, min_searches=20)
        return node.start()


def policy_update(
    version: int, *, min_hit_rate: float, created_ms: int | None = None
) -> dict[str, Any]:
    """A PolicyUpdate with the version's own hit-rate floor; its table admits a few
    first-request buckets with a 30 s TTL (the rules answer the others, still as the
    version: what matters here is which version is in force)."""
    buckets = [f"f0.g0.s{s}.c{c}.x0.q0" for s in range(4) for c in range(4)]
    return {
        "tenant": "acme",
        "index": "docs",
        "version": version,
        "kind": "table",
        "table": [
            {"bucket": b, "admit": True, "ttl_ms": 30_000, "probability": 1.0} for b in buckets
        ],
        "model": None,
        "model_format": None,
        "guardrails": {
            "max_staleness_ms": 300_000,
            "p99_budget_ms": 0.0,
            "min_hit_rate": min_hit_rate,
            "canary_share": 1.0,
        },
        "parent_version": None,
        "reason": "audit test",
        "created_ms": int(time.time() * 1000) if created_ms is None else created_ms,
    }


def test_a_version_that_breaks_its_hit_rate_floor_on_the_node_falls_back_to_the_rules(
    tmp_path: Path,
) -> None:
    rig = GuardedRig(tmp_path)
    try:
        rig.node.service.create_index(IndexConfig("acme", "docs", DIM, recipe="Flat"))
        rng = np.random.default_rng(4)
        token = ""
        for i in range(50):
            token = upsert(rig, f"v{i}", rng.standard_normal(DIM))
        loop = rig.node.policy_loop
        assert loop is not None
        publish_policy(rig.log, rig.topics, rig.codec, policy_update(1, min_hit_rate=0.9))
        assert wait_for(lambda: (v := loop.holder.current(KEY)) is not None and v.version == 1)
        # distinct queries: every search misses, so the version's hit rate is 0 < 0.9
        searched = [search(rig, rng.standard_normal(DIM), token) for _ in range(25)]
        # lazy misses: the query log's thread decides, by the policy in force at the search
        decisions = [settled_decision(r.debug["decision"]) for r in searched]
        assert decisions[0]["version"] == 1  # in force until the window of 20 is judged
        policy = rig.node.service.info("acme", "docs")["policy"]["policy"]
        state = policy["indexes"][KEY]
        assert not state["in_force"] and "min_hit_rate" in state["fallback_reason"]
        assert policy["fallbacks"][-1]["to"] == "rules"
        assert {d["version"] for d in decisions[20:]} == {None}  # the rules decide now
        assert decisions[-1]["reason"] != "admit-all"
    finally:
        rig.close()


# -- prefetch goes through admission ------------------------------------------------------------


class RecordingRefusal:
    """An admission policy that refuses everything and remembers what it was asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def decide(self, entry: CachedResult) -> AdmissionDecision:
        self.asked.append(str(entry.key))
        return AdmissionDecision("reject", 1.0, "audit-refusal")


@pytest.fixture
def filled(tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(tmp_path)
    rig.node.service.create_index(IndexConfig("acme", "docs", DIM, recipe="Flat"))
    rng = np.random.default_rng(5)
    for i in range(60):
        upsert(rig, f"v{i}", rng.standard_normal(DIM))
    assert rig.node.catch_up(30)
    yield rig
    rig.close()


def test_a_prefetched_result_is_decided_by_the_admission_policy(filled: Rig) -> None:
    svc = filled.node.service
    cache = filled.node.cache
    assert cache is not None
    prefetcher = Prefetcher(svc, min_count=2)
    svc.search_observer = SearchObserver(None, None, prefetcher)
    rng = np.random.default_rng(6)
    a, b = (rng.standard_normal(DIM).astype(np.float32) for _ in range(2))
    for s in range(3):  # sessions ask a, then b
        for q in (a, b):
            svc.search(SearchRequest("acme", "docs", q, 5, session_id=f"s{s}"))
    prefetcher.run_pending()
    cache.reset_index(KEY)  # nothing cached; the table stays
    refusal = RecordingRefusal()
    cache.policy = refusal
    svc.search(SearchRequest("acme", "docs", a, 5, session_id="s9"))  # predicts b
    asked_before = len(refusal.asked)
    rejected_before = cache.stats().rejected
    assert prefetcher.run_pending() == 1
    assert len(refusal.asked) == asked_before + 1  # the prefetch's offer was decided
    assert cache.stats().rejected == rejected_before + 1
    out = svc.search(SearchRequest("acme", "docs", b, 5, session_id="s9"))
    assert out.debug["cache_hit"] is False  # refused like any other result


# -- QQP: the false-hit acceptance (slow: embeds 161,708 texts) --------------------------------


@pytest.mark.slow
def test_qqp_l2_defaults_are_the_even_rows_tuning_and_reach_095_on_the_odd_rows() -> None:
    from bench.qqp_distances import DATA, load_pairs
    from bench.semantic_eval import GRID_V, embed_texts, scores, served_mask, tune
    from streams.cache.agreement import agreement, features
    from streams.cache.canonical import CanonicalKeyMap
    from streams.cache.semantic import DEFAULT_L2_AGREEMENT, DEFAULT_L2_THRESHOLD

    if not DATA.exists():
        pytest.skip(f"{DATA} is not here")
    rows = load_pairs()
    n = len(rows)
    canon = CanonicalKeyMap()
    emb = embed_texts(
        [canon.canonical(r["text_a"]) for r in rows] + [canon.canonical(r["text_b"]) for r in rows]
    ).astype(np.float64)
    dist = 1.0 - np.einsum("ij,ij->i", emb[:n], emb[n:])
    score = np.array([agreement(features(r["text_a"]), features(r["text_b"])) for r in rows])
    labels = np.array([int(r["label"]) for r in rows], dtype=np.int64)
    even, odd = np.arange(0, n, 2), np.arange(1, n, 2)
    # the defaults are what the documented procedure picks on the even rows
    assert tune(dist[even], score[even], labels[even], 0.96, 100, GRID_V) == (
        DEFAULT_L2_THRESHOLD,
        DEFAULT_L2_AGREEMENT,
    )
    odd_scores = scores(
        served_mask(dist[odd], score[odd], DEFAULT_L2_THRESHOLD, DEFAULT_L2_AGREEMENT), labels[odd]
    )
    assert odd_scores["precision"] >= 0.95 and odd_scores["served"] >= 300, odd_scores
    # cost-aware reuse (helper J): the stored false-hit curves are what the documented
    # calibration gives on the even rows; at the reference cost the default penalty serves
    # exactly what the tuned threshold does, and at no cost level does the default cap let
    # precision fall below 0.95 on the odd rows
    from bench.semantic_eval import calibrate, cost_aware
    from streams.cache.semantic import REFERENCE_COST_MS, TEXT_CURVE, VECTOR_CURVE

    ok_text = (score > 0.0) & (score >= DEFAULT_L2_AGREEMENT)
    assert calibrate(dist[even], ok_text[even], labels[even]) == TEXT_CURVE
    assert calibrate(dist[even], np.ones(even.size, dtype=bool), labels[even]) == VECTOR_CURVE
    text_rows = [
        x for x in cost_aware(dist[odd], score[odd], labels[odd])
        if x["path"] == "text" and x["cap"] == DEFAULT_L2_THRESHOLD
    ]  # fmt: skip
    at_ref = [x for x in text_rows if x["cost_ms"] == REFERENCE_COST_MS]
    assert len(at_ref) == 1 and at_ref[0]["served"] == odd_scores["served"]
    assert all(x["precision"] >= 0.95 for x in text_rows), text_rows


# -- the simulator's four workload families have their defining shape ----------------------


def test_zipf_drift_hands_ranks_to_new_keys_every_window() -> None:
    from streams.policy.workloads import zipf_drift

    trace = zipf_drift(20_000, 0)  # 20,000 keys; 10% of the ranks move every 5,000 requests
    born = [
        sum(int(r.key[1:]) >= 20_000 for r in trace[w : w + 5_000]) for w in range(0, 20_000, 5_000)
    ]
    assert born[0] == 0 and born[1] > 0 and born[1] < born[2] < born[3]  # the hot set drifts
    top = Counter(r.key for r in trace[:5_000]).most_common(10)
    assert sum(n for _, n in top) > 0.1 * 5_000  # Zipf: ten keys of 20,000 take > 10%


def test_latest_asks_for_new_keys_and_mostly_for_recent_ones() -> None:
    from streams.policy.workloads import latest

    trace = latest(20_000, 0)
    seen: set[str] = set()
    newest, new, recent = 99, 0, 0
    for r in trace:
        i = int(r.key[1:])
        new += r.key not in seen and i > 99
        seen.add(r.key)
        newest = max(newest, i)
        recent += newest - i < 10
    assert 0.03 < new / len(trace) < 0.07  # p_new = 0.05
    assert recent / len(trace) > 0.25  # the ten newest of ~1,100 keys take > 25%


def test_sessions_follow_chains_and_personal_queries_never_repeat() -> None:
    from streams.policy.workloads import sessions

    trace = sessions(20_000, 0)
    personal = Counter(r.key for r in trace if r.key.startswith("u"))
    assert 0.25 < sum(personal.values()) / len(trace) < 0.35 and max(personal.values()) == 1
    asked: set[str] = set()
    later_steps = followed = 0
    for r in trace:
        if not r.key.startswith("u"):
            chain, step = r.key[1:].split(".")
            assert r.ctx["session_step"] == int(step)
            if int(step) > 0:  # its previous step was asked before, unless it was replaced
                later_steps += 1  # by a personal query (30%): most steps follow their chain
                followed += f"s{chain}.{int(step) - 1}" in asked
            asked.add(r.key)
    assert followed > 0.65 * later_steps


def test_neardup_variants_share_a_cluster_and_paraphrases_are_seen_once() -> None:
    from streams.policy.workloads import neardup

    trace = neardup(20_000, 0)
    fresh = Counter(r.key for r in trace if ".x" in r.key)
    assert 0.2 < sum(fresh.values()) / len(trace) < 0.3 and max(fresh.values()) == 1
    variants: dict[str, set[str]] = {}
    profile: dict[str, tuple[Any, ...]] = {}
    for r in trace:
        cluster = r.key.split(".")[0]
        assert r.ctx["cluster"] == "c" + cluster[1:]
        # variants of one cluster are the same query: same k, filter, size, base cost
        assert profile.setdefault(cluster, (r.ctx["k"], r.ctx["filter"], r.size)) == (
            r.ctx["k"],
            r.ctx["filter"],
            r.size,
        )
        if ".x" not in r.key:
            variants.setdefault(cluster, set()).add(r.key)
    assert max(map(len, variants.values())) <= 8
    assert sum(len(v) > 1 for v in variants.values()) > 0.3 * len(variants)


# -- the guardrails' control window ----------------------------------------------------------


def test_the_control_window_stays_bounded_while_no_version_is_in_force() -> None:
    holder = PolicyHolder(1 << 20, guard=GuardConfig(decision_budget_us=1e9, control_window=1000))
    for i in range(10_500):  # no version: every search is the rules' (the control)
        holder.record_search("acme", KEY, i % 2 == 0, 1.0)
    assert holder._control.lookups == 500 and len(holder._control.latencies) == 500
    assert holder._baseline is not None and holder._baseline.lookups == 1000


def test_a_version_for_every_tenant_is_judged_against_the_rules_window_before_it() -> None:
    guard = GuardConfig(decision_budget_us=1e9, min_searches=50)
    holder = PolicyHolder(1 << 20, guard=guard)
    for i in range(60):  # the rules, before any version: 80% hits
        holder.record_search("acme", KEY, i % 5 != 0, 1.0)
    holder.apply(policy_update(1, min_hit_rate=0.0))  # canary share 1.0: no control tenants
    for i in range(50):  # first window as good as the rules
        holder.record_search("acme", KEY, i % 5 != 0, 1.0)
    assert holder.status()["indexes"][KEY]["in_force"]
    for i in range(50):  # second window: 20% hits, judged against the same baseline
        holder.record_search("acme", KEY, i % 5 == 0, 1.0)
    reason = holder.status()["indexes"][KEY]["fallback_reason"]
    assert reason is not None and reason.startswith("hit rate regression")


# -- an entry records the position it saw ------------------------------------------------------


def test_a_hit_says_the_position_its_entry_was_computed_at(filled: Rig) -> None:
    svc = filled.node.service
    rng = np.random.default_rng(7)
    token = upsert(filled, "last", rng.standard_normal(DIM))
    q = rng.standard_normal(DIM).astype(np.float32)
    miss = search(filled, q, token)
    assert not miss.debug["cache_hit"] and token in miss.debug["applied"]
    hit = search(filled, q, token)
    assert hit.debug["cache_hit"] and hit.debug["cached_at"] == miss.debug["applied"]
    svc.create_index(IndexConfig("acme", "other", DIM, recipe="Flat"))
    other = svc.upsert(VectorUpsert("acme", "other", "x", q)).token  # moves the node on
    later = search(filled, q, other)
    assert later.debug["cache_hit"] and other in later.debug["applied"]
    assert later.debug["cached_at"] == miss.debug["applied"] != later.debug["applied"]


# -- the guardrails are node settings ---------------------------------------------------------


def test_the_guardrail_settings_reach_the_node_and_a_stale_version_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydantic import ValidationError

    from streams.config import Settings
    from streams.node import open_node

    monkeypatch.setenv("STREAMVEC_POLICY_MAX_AGE_S", "60")
    monkeypatch.setenv("STREAMVEC_POLICY_FALLBACK", "lru")
    monkeypatch.setenv("STREAMVEC_POLICY_MIN_SEARCHES", "30")
    settings = Settings(
        data_dir=tmp_path,
        registry_port=0,
        http_port=0,
        resp_port=0,
        ingest_enabled=False,
        durability="none",
    )
    with open_node(settings) as node:
        query = node.start_query_node()
        assert query.policy_loop is not None
        holder = query.policy_loop.holder
        guard = holder.guard
        assert (guard.max_age_s, guard.fallback, guard.min_searches) == (60.0, "lru", 30)
        svc = query.service
        svc.create_index(IndexConfig("acme", "docs", DIM, recipe="Flat"))
        token = svc.upsert(VectorUpsert("acme", "docs", "a", np.ones(DIM, np.float32))).token
        two_minutes_ago = int((time.time() - 120) * 1000)
        publish_policy(
            node.log,
            node.topics,
            node.codec,
            policy_update(1, min_hit_rate=0.0, created_ms=two_minutes_ago),
        )
        assert wait_for(lambda: (v := holder.current(KEY)) is not None and v.version == 1)
        out = svc.search(
            SearchRequest(
                "acme",
                "docs",
                np.ones(DIM, np.float32),
                1,
                None,
                Consistency.SESSION,
                (token,),
                timeout_ms=10_000,
            )
        )
        decision = settled_decision(out.debug["decision"])
        assert decision["version"] is None and decision["reason"] == "admit-all"  # lru
        assert "stale" in holder.status()["indexes"][KEY]["fallback_reason"]
    monkeypatch.setenv("STREAMVEC_POLICY_FALLBACK", "nope")
    with pytest.raises(ValidationError):
        Settings(data_dir=tmp_path)


# -- L1: a miss stores its topK bucket, so every k of the bucket reuses it ----------------------


def test_an_l1_entry_of_a_small_k_serves_every_k_of_its_bucket(tmp_path: Path) -> None:
    from streams.index.model import CacheSettings

    rig = Rig(tmp_path)
    try:
        svc = rig.node.service
        svc.create_index(
            IndexConfig("acme", "docs", DIM, recipe="Flat", cache=CacheSettings(("L0", "L1")))
        )
        rng = np.random.default_rng(8)
        token = ""
        for i in range(60):
            token = upsert(rig, f"v{i}", rng.standard_normal(DIM))
        assert rig.node.catch_up(30)
        q = rng.standard_normal(DIM).astype(np.float32)
        miss = svc.search(SearchRequest("acme", "docs", q, 3, None, Consistency.SESSION, (token,)))
        assert not miss.debug["cache_hit"] and len(miss.hits) == 3
        assert not miss.debug["filter_exhausted"]
        assert [h.id for h in miss.hits] == fresh_ids(rig, q, 3)
        scaled = (q * np.float32(2.5)).astype(np.float32)  # another L0 key, the same L1 key
        for k in (5, 4, 2):  # k 5 needs more hits than the k-3 search answered
            out = svc.search(SearchRequest("acme", "docs", scaled, k))
            assert out.debug["cache_hit"] and out.debug["layer"] == "L1", k
            assert [h.id for h in out.hits] == fresh_ids(rig, scaled, k)
            assert not out.debug["filter_exhausted"]
        again = svc.search(SearchRequest("acme", "docs", q, 3, None, Consistency.SESSION, (token,)))
        assert again.debug["layer"] == "L0" and [h.id for h in again.hits] == fresh_ids(rig, q, 3)
        assert svc.search(SearchRequest("acme", "docs", scaled, 6)).debug["layer"] == "none"
    finally:
        rig.close()
