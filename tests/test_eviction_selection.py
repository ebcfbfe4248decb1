"""The production learned eviction runs the simulator's expert selection
(streams.policy.learner, streams.cache.learned_eviction): the learner replays every search
of a query log through an ExpertSelector with the candidates a node can apply, its periods
ending where the simulator's do whatever the learner's steps (and at window resets), and
publishes its picks, the same as the simulator's on the same log; a node ranks a ``rate``
table by each key's total count and refuses a table keyed by a count tau it does not keep
(GDSF decides for that index)."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from streams.cache.learned_eviction import (
    DEFAULT_TAU_S,
    LearnedEviction,
    eviction_payload,
    parse_eviction_payload,
)
from streams.cache.policy import AdmissionDecision
from streams.log.embedded import EmbeddedLog
from streams.policy.eviction import EvictionConfig, EvictionTable, ExpertSelector, period_ends
from streams.policy.learner import (
    NODE_EVICTION,
    OnlineLearner,
    policy_status,
    publish_policy,
)
from streams.policy.trace import Request, trace_footprint
from streams.policy.workloads import generate
from streams.schemas import catalog
from streams.schemas.codec import AvroCodec
from streams.schemas.log_registry import LogRegistry
from streams.topics import Topics
from tests.test_learned_eviction import (
    Clock,
    Evicted,
    LearnedRig,
    entry,
    evictions_of,
    learned_cache,
    random_ops,
    record,
)

INDEX = "acme/docs"
CFG = replace(NODE_EVICTION, update_every=2_000, warmup=1_000)  # smaller periods: a short log
N = 8_000
STEP = 700  # events per learner step: period ends fall inside steps
T0 = 1_700_000_000.0
ADMIT = AdmissionDecision("admit", 1.0, "test")


def write_searches(log: EmbeddedLog, topics: Topics, codec: AvroCodec, trace: list[Request]) -> int:
    """The trace's SearchEvents on ``query-log``, as a node logs them: hit or miss as an
    LRU cache of the trace's budget serves them, each miss admitted (``ttl300``). Returns
    the budget (5% of the footprint)."""
    budget = int(0.05 * trace_footprint(trace))
    schema = catalog.load_schema("SearchEvent")
    subject = catalog.subject_for(topics.query_log)
    lru: OrderedDict[str, int] = OrderedDict()
    used = 0
    for n, r in enumerate(trace):
        hit = r.key in lru
        if hit:
            lru.move_to_end(r.key)
        else:
            lru[r.key] = r.size
            used += r.size
            while used > budget:
                used -= lru.popitem(last=False)[1]
        ev = {
            "event_id": f"e{n}",
            "tenant": "acme",
            "index": "docs",
            "query_key": r.key,
            "top_k": 5,
            "features": {"size": float(r.size)},
            "bucket": None if hit else "f0.g0.s0.c0.x0.q0",
            "cache_layer": "L0" if hit else "NONE",
            "cache_hit": hit,
            "action": "none" if hit else "ttl300",
            "action_probability": 1.0,
            "proxy_cost": r.cost,
            "timestamp": int((T0 + r.time) * 1000),
        }
        log.append(topics.query_log, INDEX, codec.encode(subject, schema, ev))
    return budget


def logged_requests(log: EmbeddedLog, topics: Topics, codec: AvroCodec) -> list[Request]:
    """The searches on ``query-log`` read back as the learner reads them."""
    out = []
    for partition, end in sorted(log.end_offsets(topics.query_log).items()):
        offset = 0
        while offset < end:
            batch = log.read(topics.query_log, partition, offset, 500)
            for rec in batch:
                assert rec.value is not None
                ev = codec.decode(rec.value)[1]
                t = int(ev["timestamp"].timestamp() * 1000) / 1000
                size = max(1, int(ev["features"]["size"]))
                out.append(Request(t, ev["query_key"], size, float(ev["proxy_cost"])))
            offset = batch[-1].offset + 1
    return out


def simulator_picks(
    requests: list[Request], budget: int, resets: tuple[int, ...] = ()
) -> list[EvictionTable]:
    """What the simulator's selector picks on ``requests`` (as in
    ``replay_learned_eviction``: a warm-up period, then every ``update_every``; and at the
    end of the log, where the learner flushes), and where a window ``resets``."""
    selector = ExpertSelector(budget, CFG)
    picks, start = [], 0
    ends = sorted({*period_ends(len(requests), CFG.update_every, CFG.warmup), *resets})
    for stop in ends:
        for i in range(start, stop):
            selector.access(i, requests[i])
        table = selector.update(requests, start, stop, select=stop != CFG.warmup)
        if table is not None:
            picks.append(table)
        start = stop
    return picks


@dataclass
class QueryLog:
    log: EmbeddedLog
    topics: Topics
    codec: AvroCodec
    budget: int

    def learn(self, group: str, **kw: Any) -> list[dict[str, Any]]:
        """A real learner's versions, stepping ``STEP`` events at a time, then flushing."""
        ol = OnlineLearner(
            self.log,
            self.topics,
            self.codec,
            budget_bytes=self.budget,
            group=group,
            update_every=1,  # a version whenever a decision is trained
            eviction_config=CFG,
            **kw,
        )
        published: list[dict[str, Any]] = []
        while not ol.caught_up():
            published += ol.step(max_events=STEP)
        published += ol.step(flush=True)
        ol.close()
        return published


@pytest.fixture(scope="module")
def query_logs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, QueryLog]]:
    """A query log per workload: ``sessions`` (keys die: a rate table wins), ``latest``
    (popularity follows age: the density table wins)."""
    out = {}
    for name in ("sessions", "latest"):
        topics = Topics()
        log = EmbeddedLog(tmp_path_factory.mktemp(name) / "log", durability="none")
        log.ensure_topics(topics.specs())
        codec = AvroCodec(LogRegistry(log, topics))
        budget = write_searches(log, topics, codec, generate(name, N, 0))
        out[name] = QueryLog(log, topics, codec, budget)
    yield out
    for q in out.values():
        q.log.close()


def changes(published: list[dict[str, Any]]) -> list[str]:
    """The eviction tables of successive versions, each once."""
    out: list[str] = []
    for r in published:
        t = r["eviction_table"]
        if t is not None and (not out or out[-1] != t):
            out.append(t)
    return out


def in_order(sub: list[str], seq: list[str]) -> bool:
    it = iter(seq)
    return all(x in it for x in sub)


# -- the learner ----------------------------------------------------------------------------


def busy_long_ago(cache: Any, clock: Clock, a: Any, b: Any) -> None:
    """Key ``a`` hit 199 times, then 3,000 s pass; ``b`` and ``a`` are hit once each since:
    ``a`` has the larger total count, ``b`` the larger count decayed at 300 s."""
    for _ in range(199):
        cache.hit(a)
    clock.t += 3000.0
    cache.hit(b)
    clock.t += 1.0
    cache.hit(a)
    cache.hit(b)


@pytest.mark.parametrize(("workload", "winner"), [("sessions", "rate"), ("latest", "density")])
def test_the_learner_publishes_the_simulators_picks_which_follow_the_workload(
    query_logs: dict[str, QueryLog], workload: str, winner: str
) -> None:
    q = query_logs[workload]
    published = q.learn(f"sel-{workload}", eviction_min_requests=1_000)
    picks = simulator_picks(logged_requests(q.log, q.topics, q.codec), q.budget)
    assert len(picks) == N // CFG.update_every
    # the rule until the first pick, then picks of the simulator's selector, in order,
    # its last one last (it depends on every period: density sums, prior, scores)
    start = eviction_payload(EvictionTable.decayed(300.0))
    sent = changes(published)
    assert len(sent) >= 2 and in_order(sent, [start] + [eviction_payload(t) for t in picks])
    assert sent[-1] == eviction_payload(picks[-1])
    assert parse_eviction_payload(sent[-1]).table.kind == winner
    assert all(t.kind == "rate" or t.tau_s == 300.0 for t in picks)  # a node applies them


def test_window_resets_end_a_period_and_keep_the_selection(
    query_logs: dict[str, QueryLog],
) -> None:
    """A window of at most 2,000 searches, steps of 700: a window resets after 2,100
    searches (the step that reaches 2,000); each reset ends a period (its searches are
    dropped) and the selection goes on as the simulator's with those ends."""
    q = query_logs["sessions"]
    requests = logged_requests(q.log, q.topics, q.codec)
    reset = q.learn("sel-reset", eviction_min_requests=1_000, max_window=2_000)
    picks = simulator_picks(requests, q.budget, resets=(2_100, 4_200, 6_300))
    assert changes(reset)[-1] == eviction_payload(picks[-1])
    assert picks[-1] != simulator_picks(requests, q.budget)[-1]  # the resets mattered


def test_the_learners_candidates_are_the_nodes_and_others_are_refused_at_start(
    tmp_path: Path,
) -> None:
    node = LearnedEviction()  # a node's cache: cache_eviction learned
    assert NODE_EVICTION.taus_s == NODE_EVICTION.density_taus_s == (DEFAULT_TAU_S,)
    assert NODE_EVICTION.start_tau_s == node.tau_s == DEFAULT_TAU_S
    assert EvictionConfig() == NODE_EVICTION  # the simulator's learned row runs what a node runs
    shadows = ExpertSelector(1 << 20, NODE_EVICTION).shadows
    assert [s.name for s in shadows] == [
        "density300",
        "decayed300",
        "rate0.0001",
        "rate0.001",
        "rate0.004",
    ]
    assert all(node.can_apply(s.table) for s in shadows)
    topics = Topics()
    log = EmbeddedLog(tmp_path / "log", durability="none")
    log.ensure_topics(topics.specs())
    codec = AvroCodec(LogRegistry(log, topics))
    with pytest.raises(ValueError, match="taus_s"):
        OnlineLearner(
            log, topics, codec, budget_bytes=1 << 20, eviction_config=replace(CFG, taus_s=(100.0,))
        )
    log.close()


# -- the hot path ---------------------------------------------------------------------------


def test_a_rate_table_ranks_by_the_total_count_a_decayed_table_by_the_recent_one() -> None:
    """A and B: first seen together, a long pause (10 taus), then both requested now. A
    had 200 requests before the pause, B one; B has one more recent request than A. The
    rate table keeps A (total 201 vs 3), the decayed-count table keeps B (about 2 vs 1)."""
    victims = {}
    for t in (EvictionTable.rate(0.3, 30.0, 1e-3, version=1), EvictionTable.decayed(300.0, 1)):
        cache, tables, clock = learned_cache(2)
        tables.install("*", t)
        rec = Evicted()
        cache.add_removal_listener(rec)
        a, b = entry(0), entry(1)
        cache.put(a, 0)
        cache.put(b, 0)
        busy_long_ago(cache, clock, a.key, b.key)
        learned = cache.learned
        assert learned is not None
        sa, sb = learned.state(a.key), learned.state(b.key)
        assert sa is not None and sb is not None
        assert (sa.total, sb.total) == (201.0, 3.0) and sa.count < sb.count < 2.0
        cache.put(entry(2, cost=1e6), 0)  # worth keeping: one of A and B goes
        victims[t.kind] = rec.keys
        assert learned.counts["learned"] == 1
    assert victims == {"rate": [entry(1).key], "decayed": [entry(0).key]}


def test_a_table_keyed_by_another_tau_is_refused_and_gdsf_evicts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The cache keeps counts at tau 300 s: a decayed or density table at another tau is
    refused (logged once per version, counted) and the index evicts exactly as GDSF; a
    table at 300 s and a rate table apply."""
    from streams.cache import ResultCache

    ops = random_ops(5, 200)
    seen = []
    wrong = EvictionTable.decayed(100.0, version=7)
    with caplog.at_level(logging.WARNING, logger="streams.cache.learned_eviction"):
        for cache, tables in ((ResultCache(5 * entry(0).nbytes), None), learned_cache(5)[:2]):
            if tables is not None:
                tables.install("t/i", wrong)
            seen.append(evictions_of(cache, ops))
    assert seen[0] and seen[0] == seen[1]
    learned = cache.learned
    assert learned is not None
    assert learned.counts["learned"] == 0 and learned.counts["refused"] == len(seen[1])
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1 and "tau 100 s" in refusals[0].getMessage()
    assert not learned.can_apply(wrong)
    assert learned.can_apply(EvictionTable.decayed(300.0))
    assert learned.can_apply(EvictionTable.rate(0.3, 30.0, 1e-3))
    tables.install("t/i", EvictionTable.decayed(300.0))  # type: ignore[union-attr]
    cache.put(entry(20), 0)
    assert learned.counts["learned"] == 1


# -- end to end: log, learner, policy topic, node ----------------------------------------------


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[LearnedRig]:
    r = LearnedRig(tmp_path)
    yield r
    r.close()


def wait_version(rig: LearnedRig, version: int) -> None:
    holder = rig.node.policy_loop.holder  # type: ignore[union-attr]
    deadline = time.monotonic() + 10
    while (v := holder.current(INDEX)) is None or v.version != version:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_node_applies_the_rate_table_the_learner_picked_and_ranks_by_total_counts(
    rig: LearnedRig, caplog: pytest.LogCaptureFixture
) -> None:
    budget = write_searches(rig.log, rig.topics, rig.codec, generate("sessions", N, 0))
    learner = OnlineLearner(
        rig.log, rig.topics, rig.codec, budget_bytes=budget, eviction_config=CFG
    )
    published = learner.run_to_end()
    learner.close()
    sent = parse_eviction_payload(published[-1]["eviction_table"])
    assert sent.table.kind == "rate" and sent.table.tau_s == 1e9
    version = published[-1]["version"]
    wait_version(rig, version)

    cache = rig.node.cache
    assert cache is not None and cache.learned is not None
    learned = cache.learned
    installed = learned.source.table_for(INDEX)
    assert installed is not None and installed.table == sent.table
    status = policy_status(rig.node.service, "acme", "docs")["eviction_table"]
    assert status["kind"] == "rate" and status["applied"] is True

    # the node's cache ranks by it: A and B as in the hot-path test above
    clock = Clock()
    learned.clock = clock
    a, b = entry(0, tenant="acme", index="docs"), entry(1, tenant="acme", index="docs")
    cache.budget_bytes = int(2.5 * a.nbytes)
    rec = Evicted()
    cache.add_removal_listener(rec)
    cache.put(a, 0, ADMIT)
    cache.put(b, 0, ADMIT)
    busy_long_ago(cache, clock, a.key, b.key)
    before = dict(learned.counts)
    cache.put(entry(2, tenant="acme", index="docs", cost=1e6), 0, ADMIT)
    assert rec.keys == [b.key] and learned.counts["learned"] == before["learned"] + 1

    # a version whose table is keyed by another tau: refused, GDSF evicts for the index
    wrong = eviction_payload(EvictionTable.decayed(100.0, version=3))
    publish_policy(rig.log, rig.topics, rig.codec, record(version + 1, wrong))
    wait_version(rig, version + 1)
    status = policy_status(rig.node.service, "acme", "docs")["eviction_table"]
    assert status["tau_s"] == 100.0 and status["applied"] is False
    before = dict(learned.counts)
    with caplog.at_level(logging.WARNING, logger="streams.cache.learned_eviction"):
        cache.put(entry(3, tenant="acme", index="docs", cost=1e6), 0, ADMIT)
    assert learned.counts["refused"] == before["refused"] + 1
    assert learned.counts["learned"] == before["learned"]
    assert any("refused" in r.getMessage() for r in caplog.records)
