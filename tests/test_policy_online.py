"""The online cache-policy loop on an embedded log: searches -> query-log events with the
action and its probability -> the learner publishes a PolicyUpdate -> the node applies it
without a restart -> a restarted node loads the newest version; guardrails, rollback,
canary, the bounded query-log queue, prefetch."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from streams.cache import CachedResult, query_key
from streams.cache.controller import settled_decision
from streams.cache.policy import (
    ARMS,
    GuardConfig,
    PolicyHolder,
    in_canary,
)
from streams.cache.prefetch import NextQueryTable, Prefetcher
from streams.cache.querylog import QueryLogEmitter, SearchObserver, register_metrics
from streams.index.model import IndexConfig, Metric, VectorUpsert
from streams.log.port import Log
from streams.policy.learner import (
    OnlineLearner,
    publish_policy,
    read_policies,
)
from streams.schemas.codec import AvroCodec
from streams.service.api import SearchRequest
from streams.service.query_node import QueryNode
from streams.topics import Topics
from tests.rigs import Rig

DIM = 8
KEY = "acme/docs"
ARM_NAMES = {name for name, _ in ARMS}
RELAXED = GuardConfig(decision_budget_us=1e9)  # a loaded test machine must not trip "slow"


class LoopRig(Rig):
    """A Rig whose node runs the policy loop (and optionally prefetch)."""

    prefetch = False

    def node_options(self) -> dict[str, Any]:
        """QueryNode keyword arguments beyond the policy loop (subclasses add theirs)."""
        return {"prefetch": self.prefetch}

    def _node(self) -> QueryNode:
        node = QueryNode(
            self.log,
            self.topics,
            self.codec,
            self.root / "node",
            head_capacity=self.head_capacity,
            policy_loop=True,
            **self.node_options(),
        )
        assert node.policy_loop is not None
        node.policy_loop.holder.guard = RELAXED
        return node.start()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[LoopRig]:
    r = LoopRig(tmp_path)
    yield r
    r.close()


def fill(rig: Rig, n: int = 200, seed: int = 0) -> str:
    rig.node.service.create_index(IndexConfig("acme", "docs", DIM, recipe="Flat"))
    rng = np.random.default_rng(seed)
    token = ""
    for i in range(n):
        token = rig.node.service.upsert(
            VectorUpsert("acme", "docs", f"v{i}", rng.standard_normal(DIM).astype(np.float32))
        ).token
    assert rig.node.catch_up(30)
    return token


def queries(n: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(DIM).astype(np.float32) for _ in range(n)]


def run_searches(
    rig: Rig, pool: list[np.ndarray], n: int, seed: int = 2, session: str | None = None
) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, len(pool) + 1, dtype=float)
    p = (1 / ranks) / (1 / ranks).sum()
    out = []
    for i in rng.choice(len(pool), size=n, p=p):
        req = SearchRequest("acme", "docs", pool[int(i)], 5, session_id=session)
        out.append(rig.node.service.search(req).debug)
    return out


def read_topic(log: Log, codec: AvroCodec, topic: str) -> list[dict[str, Any]]:
    out = []
    for partition, end in log.end_offsets(topic).items():
        offset = 0
        while offset < end:
            batch = log.read(topic, partition, offset, 500)
            out += [codec.decode(r.value)[1] for r in batch if r.value is not None]
            offset = batch[-1].offset + 1
    return out


def flush(rig: Rig) -> None:
    loop = rig.node.policy_loop
    assert loop is not None
    assert loop.emitter.flush(10)


def wait_for(pred: Any, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return bool(pred())


# -- the loop end to end --------------------------------------------------------------------


def test_every_search_is_logged_with_its_action_and_probability(rig: LoopRig) -> None:
    fill(rig)
    debugs = run_searches(rig, queries(20), 120, session="s1")
    flush(rig)
    events = read_topic(rig.log, rig.codec, rig.topics.query_log)
    assert len(events) == 120
    hits = [e for e in events if e["cache_hit"]]
    misses = [e for e in events if not e["cache_hit"]]
    assert len(hits) == sum(d["cache_hit"] for d in debugs) > 0
    assert all(e["cache_layer"] == "L0" and e["proxy_cost"] > 0 for e in hits)
    for e in misses:  # every miss carries the hot path's decision
        assert e["action"] in ARM_NAMES
        assert 0.0 < e["action_probability"] <= 1.0
        assert e["bucket"] and e["features"]["size"] > 0
        assert (e["ttl_ms"] is None) == (e["action"] == "bypass")
    assert all(e["session_id"] == "s1" and e["tenant"] == "acme" for e in events)
    assert all(e["index_positions"] for e in events)
    assert {e["query_key"] for e in events} <= {
        str(query_key(KEY, Metric.COSINE, q, 5, None)) for q in queries(20)
    }


def test_learner_publishes_node_applies_live_and_restart_loads_newest(rig: LoopRig) -> None:
    fill(rig)
    pool = queries(30)
    run_searches(rig, pool, 300)
    flush(rig)
    learner = OnlineLearner(rig.log, rig.topics, rig.codec, budget_bytes=64 << 20)
    published = learner.run_to_end()
    assert [p["version"] for p in published] == [1]
    v1 = published[0]
    assert v1["table"] and v1["model_format"] == "vowpal-wabbit" and v1["parent_version"] is None
    assert learner.stats()["events"] == 300 and learner.decisions > 0
    learner.close()

    holder = rig.node.policy_loop.holder  # type: ignore[union-attr]
    assert wait_for(lambda: (v := holder.current(KEY)) is not None and v.version == 1)
    node_before = rig.node
    # decisions now come from version 1 (its table, or the rules for unseen buckets)
    fresh = queries(40, seed=9)
    decisions = [
        settled_decision(
            rig.node.service.search(SearchRequest("acme", "docs", q, 5)).debug["decision"]
        )
        for q in fresh
    ]
    assert {d["version"] for d in decisions} == {1}
    assert rig.node is node_before  # no restart

    # a second learner run (new events only: the group's offsets) publishes version 2
    run_searches(rig, pool, 200, seed=5)
    flush(rig)
    learner = OnlineLearner(rig.log, rig.topics, rig.codec, budget_bytes=64 << 20)
    v2 = learner.run_to_end()
    learner.close()
    assert [(p["version"], p["parent_version"]) for p in v2] == [(2, 1)]
    assert wait_for(lambda: holder.current(KEY).version == 2)  # type: ignore[union-attr]

    rig.restart_node()  # start() returns with the newest policy in force
    loaded = rig.node.policy_loop.holder.current(KEY)  # type: ignore[union-attr]
    assert loaded is not None and loaded.version == 2


def test_rollback_restores_a_named_version_as_a_new_one_and_survives_restart(rig: LoopRig) -> None:
    fill(rig)
    holder = rig.node.policy_loop.holder  # type: ignore[union-attr]
    v1 = update(1, {"f0.g0.s0.c0.x0.q0": (True, 30_000)})
    v2 = update(2, {"f0.g0.s0.c0.x0.q0": (False, 0)})
    for rec in (v1, v2):
        publish_policy(rig.log, rig.topics, rig.codec, rec)
    assert wait_for(lambda: (v := holder.current(KEY)) is not None and v.version == 2)
    record = holder.rollback(KEY, 1)
    assert (record["version"], record["parent_version"]) == (3, 1)
    assert record["table"] == v1["table"] and "rollback" in record["reason"]
    assert holder.current(KEY).table == holder.version_of(KEY, 1).table  # type: ignore
    with pytest.raises(KeyError):
        holder.rollback(KEY, 7)
    publish_policy(rig.log, rig.topics, rig.codec, record)
    rig.restart_node()
    loaded = rig.node.policy_loop.holder.current(KEY)  # type: ignore[union-attr]
    assert loaded is not None and loaded.version == 3 and loaded.parent_version == 1
    assert [r["version"] for r in read_policies(rig.log, rig.topics, rig.codec)] == [1, 2, 3]


# -- the holder: guardrails and canary ------------------------------------------------------


def update(
    version: int,
    table: dict[str, tuple[bool, int]],
    *,
    tenant: str = "acme",
    created_ms: int | None = None,
    canary: float = 1.0,
    min_hit_rate: float = 0.0,
    probability: float = 1.0,
) -> dict[str, Any]:
    return {
        "tenant": tenant,
        "index": "docs",
        "version": version,
        "kind": "table",
        "table": [
            {"bucket": b, "admit": a, "ttl_ms": t, "probability": probability}
            for b, (a, t) in table.items()
        ],
        "model": None,
        "model_format": None,
        "guardrails": {
            "max_staleness_ms": 300_000,
            "p99_budget_ms": 0.0,
            "min_hit_rate": min_hit_rate,
            "canary_share": canary,
        },
        "parent_version": None,
        "reason": "test",
        "created_ms": int(time.time() * 1000) if created_ms is None else created_ms,
    }


def entry(i: int, tenant: str = "acme") -> CachedResult:
    q = np.full(DIM, float(i + 1), dtype=np.float32)
    key = f"{tenant}/docs"
    return CachedResult(
        query_key(key, Metric.COSINE, q, 3, None),
        key,
        Metric.COSINE,
        q,
        3,
        None,
        (1, 2, 3),
        ("a", "b", "c"),
        (0.9, 0.8, 0.7),
        (None,) * 3,
        compute_ms=2.0,
        created_s=time.monotonic(),
    )


ALL_BYPASS = {f"f0.g0.s{s}.c{c}.x0.q0": (False, 0) for s in range(4) for c in range(4)}


def test_a_version_decides_with_its_table_and_exploration_logs_true_propensities() -> None:
    holder = PolicyHolder(1 << 20, seed=3, guard=RELAXED)
    holder.apply(update(1, ALL_BYPASS, probability=0.8))
    ds = [holder.decide(entry(i)) for i in range(400)]
    assert {d.version for d in ds} == {1}
    greedy = [d for d in ds if d.arm == "bypass"]
    assert all(d.probability == 0.8 and d.action == "reject" for d in greedy)
    explored = [d for d in ds if d.arm != "bypass"]
    assert explored and all(d.probability == pytest.approx(0.2 / 3) for d in explored)
    assert all(d.action == "admit" and d.ttl_ms for d in explored)
    assert 0.7 < len(greedy) / len(ds) < 0.9


def test_a_stale_version_falls_back_to_the_rules_and_says_why() -> None:
    now = [1_000_000.0]
    holder = PolicyHolder(
        1 << 20, guard=GuardConfig(max_age_s=60, decision_budget_us=1e9), clock=lambda: now[0]
    )
    holder.apply(update(1, ALL_BYPASS, created_ms=int((now[0] - 30) * 1000)))
    assert holder.decide(entry(0)).version == 1
    now[0] += 31  # the version is now 61 s old
    d = holder.decide(entry(1))
    assert d.version is None and d.reason == "rules"
    status = holder.status()
    assert not status["indexes"][KEY]["in_force"]
    assert "stale" in status["indexes"][KEY]["fallback_reason"]
    assert status["fallbacks"][0]["version"] == 1 and status["fallbacks"][0]["to"] == "rules"
    holder.apply(update(2, ALL_BYPASS, created_ms=int(now[0] * 1000)))  # a fresh version
    assert holder.decide(entry(2)).version == 2


def test_a_slow_version_falls_back_and_lru_fallback_admits_everything() -> None:
    guard = GuardConfig(decision_budget_us=0.0, latency_window=16, fallback="lru")
    holder = PolicyHolder(1 << 20, guard=guard)
    holder.apply(update(1, ALL_BYPASS))
    first = [holder.decide(entry(i)) for i in range(16)]
    assert {d.version for d in first} == {1}
    assert "slow" in holder.status()["indexes"][KEY]["fallback_reason"]
    after = holder.decide(entry(99))
    assert (after.action, after.reason, after.version) == ("admit", "admit-all", None)


def test_a_replaced_versions_late_decisions_do_not_trip_the_latency_guard() -> None:
    """A lazy miss is decided by the version in force at its search (captured with
    ``route``), maybe after a newer version replaced it: those late decisions must not
    judge (and record a fallback of) a version no longer in force."""
    guard = GuardConfig(decision_budget_us=0.0, latency_window=4)
    holder = PolicyHolder(1 << 20, guard=guard)
    holder.apply(update(1, ALL_BYPASS))
    old = holder.route(KEY)
    assert old is not None
    holder.apply(update(2, ALL_BYPASS))
    late = [holder.decide_routed(entry(i), old) for i in range(8)]
    assert {d.version for d in late} == {1}
    assert holder.status()["fallbacks"] == [] and holder.counts["fallback_count"] == 0
    for i in range(4):  # the version in force is still judged
        holder.decide(entry(100 + i))
    assert [f["version"] for f in holder.status()["fallbacks"]] == [2]


def tenants(share: float, inside: bool, n: int) -> list[str]:
    out = [f"t{i}" for i in range(10_000) if in_canary(f"t{i}", share) == inside]
    return out[:n]


def test_canary_selection_is_a_stable_nested_share_of_tenants() -> None:
    names = [f"t{i}" for i in range(4000)]
    small = {t for t in names if in_canary(t, 0.1)}
    large = {t for t in names if in_canary(t, 0.5)}
    assert small <= large
    assert 0.08 < len(small) / len(names) < 0.12 and 0.46 < len(large) / len(names) < 0.54
    assert {t for t in names if in_canary(t, 0.1)} == small  # stable
    assert not any(in_canary(t, 0.0) for t in names) and all(in_canary(t, 1.0) for t in names)
    # the holder gives the version to canary tenants only
    holder = PolicyHolder(1 << 20, guard=RELAXED)
    inside, outside = tenants(0.3, True, 1)[0], tenants(0.3, False, 1)[0]
    for t in (inside, outside):
        holder.apply(update(1, ALL_BYPASS, tenant=t, canary=0.3))
    assert holder.decide(entry(0, inside)).version == 1
    assert holder.decide(entry(0, outside)).version is None


def test_a_canary_worse_than_the_rules_baseline_falls_back() -> None:
    holder = PolicyHolder(1 << 20, guard=GuardConfig(min_searches=50, decision_budget_us=1e9))
    canary, control = tenants(0.5, True, 1)[0], tenants(0.5, False, 1)[0]
    holder.apply(update(1, ALL_BYPASS, tenant=canary, canary=0.5))
    for i in range(60):  # control: the rules, 80% hits
        holder.record_search(control, f"{control}/docs", i % 5 != 0, 1.0)
    for i in range(49):  # canary: 20% hits; nothing is judged before min_searches
        holder.record_search(canary, f"{canary}/docs", i % 5 == 0, 1.0)
    assert holder.status()["indexes"][f"{canary}/docs"]["in_force"]
    holder.record_search(canary, f"{canary}/docs", False, 1.0)
    reason = holder.status()["indexes"][f"{canary}/docs"]["fallback_reason"]
    assert reason is not None and "hit rate regression" in reason
    assert holder.decide(entry(0, canary)).version is None


def test_a_canary_with_a_worse_search_p99_falls_back() -> None:
    holder = PolicyHolder(1 << 20, guard=GuardConfig(min_searches=50, decision_budget_us=1e9))
    canary, control = tenants(0.5, True, 1)[0], tenants(0.5, False, 1)[0]
    holder.apply(update(1, ALL_BYPASS, tenant=canary, canary=0.5))
    for _ in range(60):
        holder.record_search(control, f"{control}/docs", True, 1.0)
    for i in range(50):  # same hit rate, but 10% of searches take 5 ms
        holder.record_search(canary, f"{canary}/docs", True, 5.0 if i % 10 == 0 else 1.0)
    reason = holder.status()["indexes"][f"{canary}/docs"]["fallback_reason"]
    assert reason is not None and reason.startswith("p99 regression")


def test_min_hit_rate_guardrail_of_the_version_itself() -> None:
    holder = PolicyHolder(1 << 20, guard=GuardConfig(min_searches=20, decision_budget_us=1e9))
    holder.apply(update(1, ALL_BYPASS, min_hit_rate=0.5))
    for _ in range(20):
        holder.record_search("acme", KEY, False, 1.0)
    assert "min_hit_rate" in holder.status()["indexes"][KEY]["fallback_reason"]


def test_an_entry_expires_after_its_idle_ttl_and_a_hit_renews_it() -> None:
    now = [1_000.0]
    guard = GuardConfig(decision_budget_us=1e9)
    holder = PolicyHolder(1 << 20, guard=guard, clock=lambda: now[0])
    holder.apply(update(1, {b: (True, 5_000) for b in ALL_BYPASS}, created_ms=1_000_000))
    e = entry(0)
    d = holder.decide(e)  # the miss: the key's last request is now
    assert d.ttl_ms == 5_000
    admitted = CachedResult(
        e.key,
        e.index_key,
        e.metric,
        e.vector,
        e.k,
        None,
        e.labels,
        e.ids,
        e.scores,
        e.metas,
        created_s=100.0,
        admission=d,
    )
    now[0] += 4.9
    assert not holder.expired(admitted)
    holder.on_hit(admitted)  # a hit renews it
    now[0] += 4.9
    assert not holder.expired(admitted)
    now[0] += 0.2  # 5.1 s without a request
    assert holder.expired(admitted)
    # a key the context no longer tracks counts from the entry's creation
    other = CachedResult(
        entry(1).key,
        e.index_key,
        e.metric,
        e.vector,
        e.k,
        None,
        e.labels,
        e.ids,
        e.scores,
        e.metas,
        created_s=100.0,
        admission=d,
    )
    assert not holder.expired(other, now_s=104.9) and holder.expired(other, now_s=105.1)


# -- the query log never blocks ---------------------------------------------------------------


def test_a_full_query_log_queue_drops_and_counts_instead_of_blocking(rig: LoopRig) -> None:
    emitter = QueryLogEmitter(rig.log, rig.topics, rig.codec, capacity=3)  # not started
    event = {
        "tenant": "acme",
        "index": "docs",
        "query_key": "qk:00",
        "top_k": 1,
        "action": "none",
        "action_probability": 1.0,
    }
    accepted = [emitter.emit(dict(event)) for _ in range(10)]
    assert accepted == [True] * 3 + [False] * 7
    assert emitter.stats()["dropped"] == 7 and emitter.stats()["queued"] == 3
    gc.collect()
    registry = CollectorRegistry()
    register_metrics(registry)
    register_metrics(registry)  # idempotent
    text = generate_latest(registry).decode()
    assert "streamvec_query_log_dropped_total 7.0" in text
    before = len(read_topic(rig.log, rig.codec, rig.topics.query_log))
    emitter.start()
    assert emitter.flush(10)
    emitter.close()
    assert len(read_topic(rig.log, rig.codec, rig.topics.query_log)) == before + 3
    assert emitter.stats()["appended"] == 3


def test_searches_go_on_while_the_query_log_is_full(rig: LoopRig) -> None:
    fill(rig)
    loop = rig.node.policy_loop
    assert loop is not None
    loop.emitter.close()  # the appender is gone: nothing drains the queue
    loop.emitter.capacity = 5
    debugs = run_searches(rig, queries(10), 40)
    assert len(debugs) == 40
    assert loop.emitter.stats()["dropped"] == 35
    info = rig.node.service.info("acme", "docs")
    assert info["policy"]["query_log"]["dropped"] == 35


# -- prefetch -----------------------------------------------------------------------------------


def test_next_query_table_learns_session_sequences_and_stays_bounded() -> None:
    table = NextQueryTable(max_keys=3, max_next=2)
    for s in range(3):
        for key in ("a", "b", "c"):
            table.observe(f"s{s}", key)
    table.observe("s9", "a")
    table.observe("s9", "x")
    assert table.predict("a") == ["b"]  # 3 of 4 sessions went on to b
    assert table.predict("b") == ["c"]
    assert table.predict("c") == []
    for i in range(10):
        table.observe("s", f"k{i}")
    assert len(table) <= 3
    for i in range(5):
        table.observe(f"z{i}", "q")
        table.observe(f"z{i}", f"n{i}")
    assert len(table._next.get("q", {})) <= 2


def test_prefetch_searches_predicted_queries_and_the_cache_admits_them(tmp_path: Path) -> None:
    rig = Rig(tmp_path)  # AdmitAll: what is offered is stored
    try:
        fill(rig)
        svc = rig.node.service
        prefetcher = Prefetcher(svc, min_count=2)
        svc.search_observer = SearchObserver(None, None, prefetcher)
        a, b, c = queries(3, seed=11)
        for s in range(3):
            for q in (a, b):
                svc.search(SearchRequest("acme", "docs", q, 5, session_id=f"s{s}"))
        assert rig.node.cache is not None
        rig.node.cache.reset_index(KEY)  # empty the cache: B is not cached any more
        prefetcher.run_pending()  # (queued before the reset: searched again now)
        rig.node.cache.reset_index(KEY)
        svc.search(SearchRequest("acme", "docs", a, 5, session_id="s9"))
        assert prefetcher.stats()["queued"] == 1
        assert prefetcher.run_pending() == 1
        hit = svc.search(SearchRequest("acme", "docs", b, 5, session_id="s9"))
        assert hit.debug["cache_hit"] is True
        miss = svc.search(SearchRequest("acme", "docs", c, 5, session_id="s9"))
        assert miss.debug["cache_hit"] is False
        # prefetch searches are not observed as queries
        assert prefetcher.stats()["observed"] == 9
    finally:
        rig.close()


# -- the CLI ------------------------------------------------------------------------------------


def test_cli_learns_from_the_query_log_and_rolls_back(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from streams.cli import app

    rig = LoopRig(tmp_path)  # the node's data under tmp_path: log/ as `streamvec` opens it
    fill(rig)
    run_searches(rig, queries(20), 150)
    flush(rig)
    rig.close()
    runner = CliRunner()
    learned = runner.invoke(app, ["policy", "learn", "--data-dir", str(tmp_path)])
    assert learned.exit_code == 0, learned.output
    assert "published acme/docs v1" in learned.output and "150 events" in learned.output
    again = runner.invoke(app, ["policy", "learn", "--data-dir", str(tmp_path)])
    assert "0 events" in again.output and "published" not in again.output  # group offsets
    back = runner.invoke(
        app, ["policy", "rollback", "acme", "docs", "1", "--data-dir", str(tmp_path)]
    )
    assert back.exit_code == 0 and "v2 restores v1" in back.output
    missing = runner.invoke(
        app, ["policy", "rollback", "acme", "docs", "9", "--data-dir", str(tmp_path)]
    )
    assert missing.exit_code == 2 and "VEC_ERR_NOT_FOUND" in missing.output
    rig = LoopRig(tmp_path)  # a restarted node loads the rollback
    try:
        loaded = rig.node.policy_loop.holder.current(KEY)  # type: ignore[union-attr]
        assert loaded is not None and (loaded.version, loaded.parent_version) == (2, 1)
    finally:
        rig.close()


def test_an_event_that_does_not_encode_is_counted_alone(rig: LoopRig) -> None:
    emitter = QueryLogEmitter(rig.log, rig.topics, rig.codec)
    good = {
        "tenant": "acme",
        "index": "docs",
        "query_key": "qk:01",
        "top_k": 1,
        "action": "none",
        "action_probability": 1.0,
    }
    emitter.emit(dict(good))
    emitter.emit(dict(good, top_k="ten"))  # not an int
    emitter.emit(dict(good))
    emitter.start()
    assert emitter.flush(10)
    emitter.close()
    assert (emitter.stats()["appended"], emitter.stats()["failed"]) == (2, 1)
    assert len(read_topic(rig.log, rig.codec, rig.topics.query_log)) == 2


def test_a_published_table_decides_on_the_hot_path_as_the_simulator_does() -> None:
    """Congruence: the learner's PolicyTable, through the PolicyUpdate record, decides in
    the node's LearnedTablePolicy exactly as the simulator's TablePolicy (no exploration)."""
    from streams.cache.policy import LearnedTablePolicy, PolicyVersion, RulesPolicy
    from streams.policy.context import ContextTracker
    from streams.policy.learned import TablePolicy, replay_learned
    from streams.policy.learner import policy_record
    from streams.policy.policies import CacheState
    from streams.policy.trace import trace_footprint
    from streams.policy.workloads import generate

    trace = generate("zipf", 8_000, seed=4)
    run = replay_learned(trace, trace_footprint(trace) // 20)
    assert run.table is not None and run.table.entries
    record = policy_record(run.table, "acme", "docs", version=1, parent_version=None)
    for rule in record["table"]:
        rule["probability"] = 1.0  # greedy: compare the arms, not the dice
    online = LearnedTablePolicy(PolicyVersion.from_record(record), RulesPolicy())
    offline = TablePolicy(epsilon=0.0)
    offline.table = run.table
    tracker = ContextTracker()
    compared = seen = 0
    for i, req in enumerate(trace):
        ctx = tracker.observe(req)
        state = CacheState(req.time, 0, 1 << 20, 1e-7 * (i % 7))
        a, b = online.decide_ctx(req, ctx, state), offline.decide(i, req, ctx, state)
        assert (a.arm, a.bucket) == (b.action, b.bucket)
        assert (a.ttl_ms is None) == (b.ttl_s is None)
        compared += 1
        seen += a.reason == "table"
    assert compared == len(trace) and seen > len(trace) // 2


def test_the_nodes_prefetcher_runs_predictions_in_idle_time(tmp_path: Path) -> None:
    class PrefetchRig(LoopRig):
        prefetch = True

    rig = PrefetchRig(tmp_path)
    try:
        fill(rig)
        loop = rig.node.policy_loop
        assert loop is not None and loop.prefetcher is not None
        a, b = queries(2, seed=12)
        for s in range(3):
            for q in (a, b):
                rig.node.service.search(SearchRequest("acme", "docs", q, 5, session_id=f"s{s}"))
        assert wait_for(lambda: loop.prefetcher.stats()["prefetched"] >= 1)  # type: ignore
        flush(rig)
        logged = read_topic(rig.log, rig.codec, rig.topics.query_log)
        assert len(logged) == 6  # the prefetch searches are not query-log events
    finally:
        rig.close()


def test_the_node_of_streamvec_up_closes_the_loop_in_one_process(tmp_path: Path) -> None:
    """``streamvec up``'s wiring: the query node with the policy loop and the learner's
    thread; a version is trained from the node's own searches and applied live."""
    from streams.config import Settings
    from streams.node import open_node

    settings = Settings(
        data_dir=tmp_path,
        registry_port=0,
        http_port=0,
        resp_port=0,
        policy_update_every=5,
        ingest_enabled=False,
        durability="none",
    )
    with open_node(settings) as node:
        query = node.start_query_node()
        assert query.policy_loop is not None
        query.policy_loop.holder.guard = RELAXED
        learner = node.start_policy_learner()
        svc = query.service
        svc.create_index(IndexConfig("acme", "docs", DIM, recipe="Flat"))
        rng = np.random.default_rng(0)
        for i in range(100):
            svc.upsert(
                VectorUpsert("acme", "docs", f"v{i}", rng.standard_normal(DIM).astype(np.float32))
            )
        assert query.catch_up(30)
        pool = queries(8)
        holder = query.policy_loop.holder
        deadline = time.monotonic() + 30
        while holder.current(KEY) is None and time.monotonic() < deadline:
            for q in pool * 4:  # a few keys, each asked often: decisions resolve quickly
                svc.search(SearchRequest("acme", "docs", q, 3))
            time.sleep(0.05)
        current = holder.current(KEY)
        assert current is not None and current.version >= 1, learner.stats()
        assert learner.error is None and learner.stats()["published"] >= 1
        # the node evicts by GDSF (the default): its learner learns no eviction table
        assert learner.eviction_tables is False

    learned = settings.model_copy(update={"cache_eviction": "learned"})
    with open_node(learned) as node:
        node.start_query_node()
        assert node.start_policy_learner().eviction_tables is True


def test_http_shows_the_policy_and_rolls_it_back_on_a_running_node(rig: LoopRig) -> None:
    import httpx

    from streams.service.http import create_http_app
    from streams.service.metrics import ServiceMetrics
    from tests.test_http_api import serve

    fill(rig)
    holder = rig.node.policy_loop.holder  # type: ignore[union-attr]
    for v, admit in ((1, True), (2, False)):
        publish_policy(
            rig.log,
            rig.topics,
            rig.codec,
            update(v, {"f0.g0.s0.c0.x0.q0": (admit, 30_000 if admit else 0)}),
        )
    assert wait_for(lambda: (c := holder.current(KEY)) is not None and c.version == 2)
    app = create_http_app(rig.node.service, metrics=ServiceMetrics())
    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        got = http.get("/v1/indexes/acme/docs/policy").json()
        assert got["versions"] == [1, 2] and got["in_force"]["version"] == 2
        r = http.post("/v1/indexes/acme/docs/policy:rollback", json={"version": 1})
        assert r.status_code == 200, r.text
        assert (r.json()["version"], r.json()["parent_version"]) == (3, 1)
        assert holder.current(KEY).version == 3  # type: ignore[union-attr]
        assert holder.current(KEY).table == holder.version_of(KEY, 1).table  # type: ignore
        missing = http.post("/v1/indexes/acme/docs/policy:rollback", json={"version": 9})
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "VEC_ERR_NOT_FOUND"
        bad = http.post("/v1/indexes/acme/docs/policy:rollback", json={"version": 0})
        assert bad.status_code == 400
    assert [r["version"] for r in read_policies(rig.log, rig.topics, rig.codec)] == [1, 2, 3]
    plain = Rig(rig.root / "plain")  # a node without the loop says so
    try:
        with serve(create_http_app(plain.node.service, metrics=ServiceMetrics())) as url:
            r = httpx.get(f"{url}/v1/indexes/acme/docs/policy", timeout=10)
            assert r.status_code == 400 and r.json()["error"]["code"] == "VEC_ERR_INVALID"
    finally:
        plain.close()


@pytest.mark.kafka
def test_on_kafka_a_restarted_node_loads_the_newest_policy(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The same restart acceptance on the Kafka transport (Tansu: no compaction, so every
    version is still there; the holder keeps the highest)."""
    import uuid

    from streams.log.kafka import KafkaLog
    from streams.schemas.log_registry import LogRegistry

    topics = Topics(prefix=f"p{uuid.uuid4().hex[:6]}.")
    log = KafkaLog(kafka_bootstrap)
    try:
        log.ensure_topics(topics.specs())
        codec = AvroCodec(LogRegistry(log, topics))
        for v in (1, 2, 3):
            publish_policy(log, topics, codec, update(v, {"f0.g0.s0.c0.x0.q0": (True, 5_000)}))
        node = QueryNode(log, topics, codec, tmp_path / "node", policy_loop=True).start()
        try:
            loaded = node.policy_loop.holder.current(KEY)  # type: ignore[union-attr]
            assert loaded is not None and loaded.version == 3
            publish_policy(log, topics, codec, update(4, {"f0.g0.s0.c0.x0.q0": (False, 0)}))
            holder = node.policy_loop.holder  # type: ignore[union-attr]
            assert wait_for(lambda: holder.current(KEY).version == 4, 30)  # type: ignore
        finally:
            node.close()
    finally:
        log.close()


def test_a_malformed_update_is_refused_and_the_version_in_force_stays(rig: LoopRig) -> None:
    loop = rig.node.policy_loop
    assert loop is not None
    publish_policy(rig.log, rig.topics, rig.codec, update(1, ALL_BYPASS))
    bad = update(2, ALL_BYPASS, probability=1.5)  # not a probability
    publish_policy(rig.log, rig.topics, rig.codec, bad)
    assert wait_for(lambda: loop.feed.rejected == 1)
    assert loop.holder.current(KEY).version == 1  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="probability"):
        loop.holder.apply(bad)


def test_the_learner_thread_keeps_to_its_cpu_share(rig: LoopRig) -> None:
    """A learner inside a node pauses c x (1/share - 1) after each step that used c s of
    CPU: at a share of 0.2 it sleeps four times the CPU it used, and still learns it all."""
    fill(rig)
    run_searches(rig, queries(30), 1500)
    flush(rig)
    learner = OnlineLearner(
        rig.log, rig.topics, rig.codec, budget_bytes=64 << 20, update_every=10**9
    )
    with pytest.raises(ValueError, match="cpu_share"):
        learner.start(cpu_share=0.0)
    t0 = time.monotonic()
    learner.start(poll_s=0.05, cpu_share=0.2, max_events=100)
    try:
        assert wait_for(lambda: learner.events >= 1500, timeout_s=120)
        wall = time.monotonic() - t0
    finally:
        learner.close()
    assert learner.error is None
    assert learner.cpu_s > 0
    assert learner.paused_s == pytest.approx(4 * learner.cpu_s, rel=1e-6)
    # 15 steps of 100 events, each followed by its pause: the wall time holds the
    # pauses of all but the last
    assert wall >= learner.paused_s * 0.5, (wall, learner.paused_s, learner.cpu_s)
