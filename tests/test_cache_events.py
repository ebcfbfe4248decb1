"""Cache removal events in ``query-log``, the learner's join on them and on ``feedback``,
and policy rollback after the ``policy`` topic is compacted. Real embedded log (RocksDB)
and a real query node throughout."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streams.index.exceptions import NotFound
from streams.index.model import VectorUpsert
from streams.log.embedded import EmbeddedLog
from streams.policy.join import JoinedDecision
from streams.policy.learned import ACTIONS
from streams.policy.learner import (
    OnlineLearner,
    policy_key,
    publish_policy,
    read_policies,
    rollback_policy,
)
from streams.schemas import catalog
from streams.schemas.codec import AvroCodec
from streams.schemas.log_registry import LogRegistry
from streams.service.api import SearchRequest
from streams.topics import Topics
from tests.rigs import spied_learner
from tests.test_policy_online import (
    KEY,
    LoopRig,
    fill,
    queries,
    read_topic,
    update,
    wait_for,
)


class SmallCacheRig(LoopRig):
    """A LoopRig whose node's cache holds a handful of entries (evictions happen)."""

    budget = 6_000

    def node_options(self) -> dict[str, Any]:
        return {**super().node_options(), "cache_budget_bytes": self.budget}


@pytest.fixture
def small(tmp_path: Path) -> Iterator[SmallCacheRig]:
    r = SmallCacheRig(tmp_path)
    yield r
    r.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[LoopRig]:
    r = LoopRig(tmp_path)
    yield r
    r.close()


def search(rig: LoopRig, q: np.ndarray) -> dict[str, Any]:
    return rig.node.service.search(SearchRequest("acme", "docs", q, 5)).debug


# -- removal events on the query log -------------------------------------------------------


def test_each_admitted_entry_that_leaves_is_logged_with_why_and_its_hits(
    small: SmallCacheRig,
) -> None:
    fill(small)
    pool = queries(24)
    rng = np.random.default_rng(3)
    for i in rng.zipf(1.3, 400) % len(pool):
        search(small, pool[int(i)])
    loop = small.node.policy_loop
    assert loop is not None
    # a write that enters a cached query's result invalidates it
    hot = next(q for q in pool if search(small, q)["cache_hit"])  # a cached one
    small.node.service.upsert(VectorUpsert("acme", "docs", "near-hot", hot))
    assert small.node.catch_up(30)
    # an entry whose TTL has passed is removed when it is next looked up
    cached = next(q for q in pool if q is not hot and search(small, q)["cache_hit"])
    loop.holder.clock = lambda: time.time() + 10_000
    assert not search(small, cached)["cache_hit"]
    loop.holder.clock = time.time
    assert loop.emitter.flush(10)

    events = read_topic(small.log, small.codec, small.topics.query_log)
    removals = [e for e in events if e.get("removal") is not None]
    reasons = {e["removal"]["reason"] for e in removals}
    assert {"evicted", "invalidated", "expired"} <= reasons
    assert small.node.cache is not None
    stats = small.node.cache.stats()
    assert sum(e["removal"]["reason"] == "evicted" for e in removals) == stats.evictions
    assert stats.expirations >= 1
    # in log order (one search thread): an entry's hits are the key's L0 hits between the
    # miss that stored it and its removal
    hits_since: dict[str, int] = {}
    for e in events:
        key = e["query_key"]
        if e.get("removal") is not None:
            r = e["removal"]
            if key not in hits_since:  # GDSF valued it lowest at its own put: logged first
                assert (r["hits"], r["reason"]) == (0, "evicted")
                continue
            assert r["hits"] == hits_since.pop(key), e
            assert r["stored_ms"] <= e["timestamp"] and r["bytes"] > 0
            assert e["action"].startswith("ttl") and e["bucket"]  # its admission
            assert (r["priority"] > 0) == (r["reason"] == "evicted")
        elif e["cache_hit"]:
            hits_since[key] += 1
        elif e["action"].startswith("ttl"):  # a miss the policy admitted
            hits_since[key] = 0


def test_the_learner_joins_the_real_logs_removals_with_their_decisions(
    small: SmallCacheRig,
) -> None:
    fill(small)
    pool = queries(24)
    rng = np.random.default_rng(4)
    for i in rng.zipf(1.3, 300) % len(pool):
        search(small, pool[int(i)])
    loop = small.node.policy_loop
    assert loop is not None and loop.emitter.flush(10)
    learner = OnlineLearner(small.log, small.topics, small.codec, budget_bytes=small.budget)
    learner.run_to_end()
    s = learner.stats()
    joined = s["removals_joined"]
    assert s["removals"] > 0 and joined["unmatched"] == 0
    assert joined["matched"] + joined["late"] == s["removals"]
    assert joined["matched"] > joined["late"]
    assert s["decisions"] > 0
    learner.close()


# -- the learner's join, event by event -----------------------------------------------------

T0 = 1_700_000_000.0
TTL300 = next(i for i, (n, _) in enumerate(ACTIONS) if n == "ttl300")


class EventLog:
    """Writes SearchEvents and Feedback to a real embedded log, as the node would."""

    def __init__(self, root: Path) -> None:
        self.topics = Topics()
        self.log = EmbeddedLog(root / "log", durability="none")
        self.log.ensure_topics(self.topics.specs())
        self.codec = AvroCodec(LogRegistry(self.log, self.topics))
        self.n = 0

    def _append(self, topic: str, schema: str, rec: dict[str, Any]) -> None:
        value = self.codec.encode(catalog.subject_for(topic), catalog.load_schema(schema), rec)
        self.log.append(topic, KEY, value)

    def search(
        self, key: str, t: float, *, hit: bool = False, arm: str = "ttl300", cost: float = 2.0
    ) -> str:
        self.n += 1
        event_id = f"e{self.n}"
        self._append(
            self.topics.query_log,
            "SearchEvent",
            {
                "event_id": event_id,
                "tenant": "acme",
                "index": "docs",
                "query_key": key,
                "top_k": 5,
                "features": {"size": 1000.0},
                "bucket": None if hit else "f0.g0.s0.c0.x0.q0",
                "cache_layer": "L0" if hit else "NONE",
                "cache_hit": hit,
                "action": "none" if hit else arm,
                "action_probability": 1.0,
                "proxy_cost": cost,
                "timestamp": int(t * 1000),
            },
        )
        return event_id

    def removal(self, key: str, t: float, stored: float, reason: str, hits: int) -> None:
        self.n += 1
        self._append(
            self.topics.query_log,
            "SearchEvent",
            {
                "event_id": f"e{self.n}",
                "tenant": "acme",
                "index": "docs",
                "query_key": key,
                "top_k": 5,
                "bucket": "f0.g0.s0.c0.x0.q0",
                "action": "ttl300",
                "action_probability": 1.0,
                "proxy_cost": 2.0,
                "timestamp": int(t * 1000),
                "removal": {
                    "reason": reason,
                    "hits": hits,
                    "bytes": 1000,
                    "stored_ms": int(stored * 1000),
                    "priority": 0.0,
                },
            },
        )

    def feedback(self, kind: str, *, event_id: str | None = None, key: str | None = None) -> None:
        self._append(
            self.topics.feedback,
            "Feedback",
            {
                "tenant": "acme",
                "index": "docs",
                "event_id": event_id,
                "query_key": key,
                "kind": kind,
                "timestamp": int(time.time() * 1000),
            },
        )

    def learner(self, **kw: Any) -> tuple[OnlineLearner, list[JoinedDecision]]:
        """A real learner whose trained decisions are also recorded (a spy on learn)."""
        return spied_learner(self.log, self.topics, self.codec, KEY, budget_bytes=1 << 20, **kw)

    def close(self) -> None:
        self.log.close()


@pytest.fixture
def events(tmp_path: Path) -> Iterator[EventLog]:
    e = EventLog(tmp_path)
    yield e
    e.close()


def observed(seen: list[JoinedDecision], t: float) -> tuple[float, float]:
    j = next(j for j in seen if j.time == pytest.approx(t, rel=0, abs=1e-3))
    o = j.outcomes[j.action]
    assert o.observed
    return o.saved, o.held_s


def test_a_removal_event_ends_the_admission_when_the_entry_really_left(
    events: EventLog,
) -> None:
    for with_removal, key in ((True, "k1"), (False, "k2")):
        t = T0 if with_removal else T0 + 1000
        events.search(key, t)  # the miss that admits it (ttl300)
        events.search(key, t + 1, hit=True)
        events.search(key, t + 2, hit=True)
        if with_removal:
            events.removal(key, t + 10, t - 0.001, "evicted", 2)
    events.search("filler", T0 + 2000, arm="bypass")
    ol, seen = events.learner()
    ol.run_to_end()
    assert observed(seen, T0) == (pytest.approx(4.0), pytest.approx(10.0))  # left at +10 s
    saved, held = observed(seen, T0 + 1000)  # the same story, no event: the estimate
    assert saved == pytest.approx(4.0) and held != pytest.approx(10.0)
    assert ol.stats()["removals_joined"] == {"matched": 1, "late": 0, "unmatched": 0}
    ol.close()


def test_an_expiry_event_ends_it_at_the_last_hit_plus_its_ttl(events: EventLog) -> None:
    events.search("k1", T0, arm="ttl5")
    events.search("k1", T0 + 1, hit=True)
    events.removal("k1", T0 + 60, T0 - 0.001, "expired", 1)  # seen expired at +60 s
    events.search("filler", T0 + 2000, arm="bypass")
    ol, seen = events.learner()
    ol.run_to_end()
    assert observed(seen, T0) == (pytest.approx(2.0), pytest.approx(6.0))
    ol.close()


def test_wrong_and_stale_feedback_count_against_the_admission_clicked_confirms(
    events: EventLog,
) -> None:
    events.search("k1", T0)
    h1 = events.search("k1", T0 + 1, hit=True)
    h2 = events.search("k1", T0 + 2, hit=True)
    events.search("k3", T0 + 10)
    events.search("k3", T0 + 11, hit=True)
    events.search("k4", T0 + 20)
    events.search("k4", T0 + 21, hit=True)
    events.feedback("clicked", event_id=h1)
    events.feedback("wrong", event_id=h2)
    events.feedback("stale", key="k3")  # by query key: its latest cache hit
    events.feedback("wrong", event_id="never-logged")
    events.search("filler", T0 + 2000, arm="bypass")
    ol, seen = events.learner()
    ol.run_to_end()
    # k1: two hits of 2.0 saved 4.0; the wrong one is taken back and charged once more
    assert observed(seen, T0)[0] == pytest.approx(4.0 - 2 * 2.0)
    assert observed(seen, T0 + 10)[0] == pytest.approx(2.0 - 2 * 2.0)
    assert observed(seen, T0 + 20)[0] == pytest.approx(2.0)  # no feedback: unchanged
    fb = ol.stats()["feedback"]
    assert (fb["clicked"], fb["wrong"], fb["stale"]) == (1, 1, 1)
    ol.close()


def test_feedback_after_the_decision_was_trained_is_counted_late(events: EventLog) -> None:
    events.search("k1", T0)
    h1 = events.search("k1", T0 + 1, hit=True)
    for i in range(5):  # past the largest TTL: the decision resolves and is trained
        events.search(f"f{i}", T0 + 400 + i, arm="bypass")
    ol, seen = events.learner(feedback_grace_s=0.0)
    ol.step()
    assert any(j.time == pytest.approx(T0, rel=0, abs=1e-3) for j in seen)
    events.feedback("wrong", event_id=h1)
    ol.step()
    assert ol.stats()["feedback"]["late"] == 1
    ol.close()


# -- rollback after compaction ---------------------------------------------------------------


def test_rollback_works_after_the_policy_topic_is_compacted_and_the_node_restarts(
    rig: LoopRig,
) -> None:
    tables = {v: {"f0.g0.s0.c0.x0.q0": (v % 2 == 1, 5_000 * v)} for v in range(1, 5)}
    for v in (1, 2, 3):
        publish_policy(rig.log, rig.topics, rig.codec, update(v, tables[v]))
    publish_policy(rig.log, rig.topics, rig.codec, update(4, tables[4]), keep=3)  # drops v1
    holder = rig.node.policy_loop.holder  # type: ignore[union-attr]
    assert wait_for(lambda: (v := holder.current(KEY)) is not None and v.version == 4)
    log = rig.log
    assert isinstance(log, EmbeddedLog)
    report = log.run_cleaner(now=int(time.time() * 1000) + 10 * 24 * 3600 * 1000)
    assert report.compacted.get(rig.topics.policy, 0) >= 2  # v1 and then its tombstone
    assert [r["version"] for r in read_policies(rig.log, rig.topics, rig.codec)] == [2, 3, 4]
    rig.restart_node()

    holder = rig.node.policy_loop.holder  # type: ignore[union-attr]
    assert holder.versions(KEY) == [2, 3, 4] and holder.current(KEY).version == 4  # type: ignore
    out = rollback_policy(rig.node.service, "acme", "docs", 2)
    assert (out["version"], out["parent_version"]) == (5, 2)
    assert holder.current(KEY).table == holder.version_of(KEY, 2).table  # type: ignore
    with pytest.raises(NotFound, match="no version 1"):
        rollback_policy(rig.node.service, "acme", "docs", 1)
    # every version has its own key, so compaction keeps each one a node may roll back to
    keys = {
        r.key
        for p, end in rig.log.end_offsets(rig.topics.policy).items()
        for r in rig.log.read(rig.topics.policy, p, 0, 100)
        if r.value is not None
    }
    assert {policy_key("acme", "docs", v).encode() for v in (2, 3, 4, 5)} == keys
