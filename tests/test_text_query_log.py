"""The text cache (``VEC.QUERY``, L2 on the query text) in ``query-log``, on a real node: the
policy loop's emitter, the embedded log, the default offline embedder, the ingest service,
and the production learner reading the topic back.

A text-cache hit is a search event of the served entry's key (layer L2, proxy cost its
``compute_ms``); the text offer's admission decision is logged once per request, keyed by
the entry's key, so the learner's join credits the hits to it (streams/cache/querylog.py,
"Text queries")."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tests.test_text_cache as text_cache_tests
from streams.cache.keys import QueryKey
from streams.index.model import Consistency
from streams.policy.join import JoinedDecision
from tests.rigs import spied_learner
from tests.test_ingest import KB
from tests.test_policy_online import LoopRig, read_topic
from tests.test_text_cache import CACHED, PARAPHRASE, TextKB

KEY = "t/kb"


class LoopKB(KB):
    """The ingest rig over a node that runs the policy loop (so it logs its searches)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.rig = LoopRig(root)
        self.svc = self.open()


class Rig:
    """:class:`TextKB` (L0 + L2, the text cache on) over a logging node."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        with monkeypatch.context() as m:
            m.setattr(text_cache_tests, "KB", LoopKB)
            self.tkb = TextKB(root)
        self.node = self.tkb.kb.rig.node
        self.mark = len(self.events())  # what the setup logged
        self.counted = (self.control.lookups, self.control.hits)

    @property
    def control(self) -> Any:
        """The policy holder's control window (searches and hits it has counted)."""
        loop = self.node.policy_loop
        assert loop is not None
        return loop.holder._control

    def query(
        self, text: str, level: Consistency = Consistency.EVENTUAL, **kw: Any
    ) -> dict[str, Any]:
        return self.tkb.query(text, level, **kw)[1]

    def events(self) -> list[dict[str, Any]]:
        """The query-log events so far (after what the setup logged)."""
        loop = self.node.policy_loop
        assert loop is not None and loop.emitter.flush(10)
        rig = self.tkb.kb.rig
        return read_topic(rig.log, rig.codec, rig.topics.query_log)[getattr(self, "mark", 0) :]

    def entry_cost(self, key: str) -> float:
        """The cached entry's ``compute_ms`` (what its hits save)."""
        assert self.node.cache is not None
        entry = self.node.cache.peek(QueryKey(bytes.fromhex(key.removeprefix("qk:"))))
        assert entry is not None
        return entry.compute_ms

    def learn(self) -> tuple[dict[str, Any], list[JoinedDecision]]:
        """Run the production learner over the topic; its stats and every decision it
        trained (a spy on ``learn``)."""
        rig = self.tkb.kb.rig
        ol, seen = spied_learner(rig.log, rig.topics, rig.codec, KEY, budget_bytes=1 << 26)
        try:
            while not ol.caught_up():  # one event a step, as a live learner may see them
                ol.step(max_events=1)
            ol.run_to_end()
            return ol.stats(), seen
        finally:
            ol.close()

    def close(self) -> None:
        self.tkb.kb.close()


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    r = Rig(tmp_path / "kb", monkeypatch)
    yield r
    r.close()


def searches(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("removal") is None]


def decided(event: dict[str, Any], decision: dict[str, Any]) -> bool:
    """The event carries ``decision`` (the policy's, as the debug shows it)."""
    return (
        not event["cache_hit"]
        and event["action"] == decision["arm"]
        and event["bucket"] == decision["bucket"]
        and event["action_probability"] == decision["probability"]
        and event["ttl_ms"] == decision["ttl_ms"]
    )


def credited(seen: list[JoinedDecision], event: dict[str, Any], *, held: bool = True) -> float:
    """The observed saving the join gave the decision ``event`` logged; ``held``: its entry
    held its bytes for a while (the join did not end it at its own put)."""
    t = event["timestamp"].timestamp()
    (j,) = [j for j in seen if j.time == pytest.approx(t, abs=1e-3) and j.bucket == event["bucket"]]
    o = j.outcomes[j.action]
    assert o.observed and (o.held_s > 0 or not held)
    return o.saved


@pytest.mark.parametrize("mode", ["dense", "hybrid"])
def test_a_text_cache_hit_is_logged_and_joined_with_the_text_offers_decision(
    rig: Rig, mode: str
) -> None:
    miss = rig.query(CACHED, mode=mode)
    decision = miss["text_cache"]["decision"]
    assert decision["outcome"] == "stored" and decision["action"] == "admit"
    hits = [rig.query(CACHED, mode=mode), rig.query(PARAPHRASE, mode=mode)]
    assert all(h["layer"] == "L2" and h["cache_hit"] for h in hits)
    key = hits[0]["query_key"]  # the served entry's
    assert hits[1]["query_key"] == key
    events = rig.events()
    found = searches(events)
    if mode == "dense":
        # the inner search's miss of the same key carries the text offer's decision; its
        # own admission (an entry replaced by the text offer before the request ended) is
        # neither logged nor is that entry's removal
        assert [e["query_key"] for e in found] == [key] * 3
        assert not [e for e in events if e.get("removal") is not None]
    else:
        # the dense candidates (their own key, at the fusion's depth) log their own miss and
        # decision; the fused answer's decision follows, keyed by its entry
        assert len(found) == 4 and found[0]["query_key"] != key
        assert found[0]["top_k"] == 50 and found[0]["action"].startswith("ttl")
        assert [e["query_key"] for e in found[1:]] == [key] * 3
        found = found[1:]
    text_miss, *text_hits = found
    assert decided(text_miss, decision) and text_miss["top_k"] == 3
    cost = rig.entry_cost(key)
    assert cost > 0 and text_miss["proxy_cost"] == pytest.approx(cost)
    for e, h in zip(text_hits, hits, strict=True):
        assert e["cache_hit"] and e["cache_layer"] == "L2" and e["action"] == "none"
        assert e["proxy_cost"] == pytest.approx(cost)
        assert e["top_k"] == 3 and e["result_ids"] == text_miss["result_ids"]
        assert e["latency_ms"]["total"] == pytest.approx(h["latency_ms"])
    # the node's own counters (the canary comparison): one search per request, 2 hits
    assert (rig.control.lookups, rig.control.hits) == (rig.counted[0] + 3, rig.counted[1] + 2)

    stats, seen = rig.learn()
    assert credited(seen, text_miss) == pytest.approx(2 * cost)  # both hits, to this decision
    assert stats["removals_joined"]["unmatched"] == 0


def test_the_text_entrys_removal_joins_its_decision(rig: Rig) -> None:
    """A write that enters the cached dense answer invalidates the text entry: its removal
    event matches the decision the text offer logged (timestamped after its put)."""
    miss = rig.query(CACHED)
    hit = rig.query(PARAPHRASE)
    assert hit["layer"] == "L2"
    rig.tkb.settle(rig.tkb.put("new", "How can I improve my English speaking skills quickly?"))
    assert rig.query(PARAPHRASE)["layer"] != "L2"
    events = rig.events()
    removals = [e for e in events if e.get("removal") is not None]
    assert [(e["query_key"], e["removal"]["reason"], e["removal"]["hits"]) for e in removals][
        :1
    ] == [(hit["query_key"], "invalidated", 1)]
    text_miss = searches(events)[0]
    assert decided(text_miss, miss["text_cache"]["decision"])
    stats, seen = rig.learn()
    assert stats["removals_joined"]["unmatched"] == 0
    assert stats["removals_joined"]["matched"] >= 1
    assert credited(seen, text_miss) == pytest.approx(searches(events)[1]["proxy_cost"])


def test_a_dense_text_miss_after_an_inner_hit_logs_the_hit_then_the_new_decision(
    rig: Rig,
) -> None:
    """At ``session`` the text cache is skipped: a repeat is the inner search's exact L0 hit
    (credited to the entry's admission), and the text offer then stores the fresh answer
    anew under the same key: its removal of the hit entry, then its own decision, follow."""
    first = rig.query(CACHED, Consistency.SESSION)
    again = rig.query(CACHED, Consistency.SESSION)
    assert again["layer"] == "L0" and again["cache_hit"]
    events = rig.events()
    seq = [
        ("removal", e["removal"]["reason"]) if e.get("removal") else ("hit", e["cache_layer"])
        if e["cache_hit"] else ("miss", e["action"])
        for e in events
    ]  # fmt: skip
    d1, d2 = first["text_cache"]["decision"], again["text_cache"]["decision"]
    assert seq == [("miss", d1["arm"]), ("hit", "L0"), ("removal", "replaced"), ("miss", d2["arm"])]
    assert len({e["query_key"] for e in events}) == 1
    stats, seen = rig.learn()
    # (replaced by the next request, maybe within the same millisecond: held_s may be 0)
    assert credited(seen, events[0], held=False) == pytest.approx(events[1]["proxy_cost"])
    assert stats["removals_joined"] == {"matched": 1, "late": 0, "unmatched": 0}


def test_a_rejected_text_offer_leaves_the_inner_entrys_decision_in_its_event(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dense: the policy rejects the text entry, so the inner search's entry (same key)
    stays cached; the held inner event keeps its own decision, which the repeat's hit
    credits (before the review's fix it carried the rejected text decision)."""
    import threading

    from streams.cache import AdmissionDecision
    from streams.cache.controller import CacheController

    offering = threading.local()
    real_offer = CacheController.offer_text

    def offer_text(self: Any, *a: Any, **kw: Any) -> Any:
        offering.on = True
        try:
            return real_offer(self, *a, **kw)
        finally:
            offering.on = False

    monkeypatch.setattr(CacheController, "offer_text", offer_text)
    loop = rig.node.policy_loop
    assert loop is not None
    holder = loop.holder
    real_decide = type(holder).decide

    def decide(self: Any, entry: Any) -> Any:
        d = real_decide(self, entry)
        if getattr(offering, "on", False):  # the text entry only
            return AdmissionDecision("reject", 1.0, "test", arm="bypass", bucket=d.bucket)
        return d

    monkeypatch.setattr(type(holder), "decide", decide)
    miss = rig.query(CACHED)
    assert miss["text_cache"]["decision"]["outcome"] == "rejected"
    inner = miss["decision"]
    assert inner["outcome"] == "stored" and inner["arm"].startswith("ttl")
    again = rig.query(CACHED, Consistency.SESSION)  # the inner entry serves it (L0)
    assert again["cache_hit"] and again["layer"] == "L0"
    first = searches(rig.events())[0]
    assert not first["cache_hit"] and first["action"] == inner["arm"]
    assert first["bucket"] == inner["bucket"]
    _, seen = rig.learn()
    mine = [j for j in seen if j.bucket == inner["bucket"]]
    assert mine and max(o.saved for o in mine[0].outcomes) > 0  # the L0 hit credited it
