"""Smart vectorization (streams.ingest.vectorize): importance and novelty scored on real
text with the real offline embedder, each decision with its reasons; then end to end
through the embedder processor on a real query node: the decisions recorded with the
chunks, text-only and duplicate chunks kept out of vector search (and in keyword search),
a temporary promoted by a hit, representatives listing their members, counters in
VEC.INFO."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streams.capacity import Thresholds
from streams.embed import open_embedder
from streams.index.model import Consistency, IndexConfig, IndexQuotas
from streams.ingest import Chunk, QueryRequest, Source, SourceType, open_ingest
from streams.ingest.decision import VectorizeContext
from streams.ingest.vectorize import (
    DecisionQueue,
    IndexNeighbours,
    Priority,
    SmartVectorizer,
    VectorizeDecision,
    VectorizePolicy,
)
from streams.service.api import SearchRequest
from tests.rigs import Rig

WORDLLAMA = open_embedder()
CONFIG = IndexConfig("t", "kb", WORDLLAMA.dim, recipe="Flat")
POLICY = VectorizePolicy(weights={"source_type:chat": -0.2, "channel_id:incidents": 0.3})

TRACEBACK = (
    'Traceback (most recent call last):\n  File "billing.py", line 42, in charge\n'
    "ValueError: card number rejected by the gateway"
)
HERON = "The heron waits in the reeds by the lake for fish."
HERON_NEAR = "The heron stands in the reeds by the lake waiting for fish."  # cosine ~0.89
WORKFLOW = (
    "Action items from the review: deploy the hotfix to the billing service before "
    "the deadline and update the runbook."
)


def decide(vz: SmartVectorizer, sid: str, text: str, **source: Any) -> VectorizeDecision:
    src = Source("t", "kb", sid, text=text, **source)
    chunk = Chunk(sid, 0, 0, len(text), text)
    return vz.decide(chunk, WORDLLAMA.embed([text])[0], VectorizeContext(CONFIG, src, 1))


def codes(d: VectorizeDecision) -> list[str]:
    return [r.partition(":")[0] for r in d.reasons]


def test_each_decision_follows_from_importance_and_novelty_with_its_reasons() -> None:
    vz = SmartVectorizer(policies={"t/kb": POLICY})
    err = decide(vz, "err", TRACEBACK, channel_id="incidents")
    assert err.kind == "index_now" and err.priority is Priority.CRITICAL and err.index
    assert codes(err)[:2] == ["weight", "error_pattern"] and "critical" in codes(err)

    chat = decide(vz, "chat", "ok thanks!", type=SourceType.CHAT)
    assert chat.kind == "text_only" and chat.text_only and chat.index
    assert {"weight", "short", "low_importance"} <= set(codes(chat))

    plain = decide(vz, "heron", HERON)
    assert plain.kind == "queue" and plain.priority is Priority.LOW and plain.novelty > 0.5

    work = decide(vz, "work", WORKFLOW)
    assert work.kind == "queue" and work.priority is Priority.MEDIUM
    assert "workflow" in codes(work)

    dup = decide(vz, "heron-again", HERON)  # same text, in the window of this batch
    assert dup.kind == "duplicate" and dup.of == "heron#0" and dup.text_only
    assert dup.novelty < 0.05 and "near_duplicate" in codes(dup)

    near = decide(vz, "heron-near", HERON_NEAR)
    assert near.kind == "temporary" and near.ttl_ms == POLICY.temporary_ttl_ms
    assert 0 < near.novelty < POLICY.temporary_novelty and "low_novelty" in codes(near)

    # the fields the processor writes with the chunk
    assert dup.fields == {"duplicate_of": "heron#0", "vectorize": dup.record()}
    assert dup.record()["decision"] == "duplicate" and dup.record()["reasons"] == list(dup.reasons)

    stats = vz.stats("t/kb")
    assert stats["decisions"] == {
        "index_now": 1,
        "text_only": 1,
        "queue": 2,
        "duplicate": 1,
        "temporary": 1,
    }
    assert stats["reasons"]["near_duplicate"] == 1 and stats["reasons"]["error_pattern"] == 1
    assert [r["id"] for r in stats["recent"]] == [
        "err#0",
        "chat#0",
        "heron#0",
        "work#0",
        "heron-again#0",
        "heron-near#0",
    ]
    assert vz.members("t/kb") == {"heron#0": ["heron-again#0"]}


def test_a_full_index_tightens_decisions() -> None:
    vz = SmartVectorizer(policies={"t/kb": POLICY}, utilisation=lambda config: 0.93)
    low = decide(vz, "heron", HERON)
    assert low.kind == "text_only" and "capacity" in codes(low)
    medium = decide(vz, "work", WORKFLOW)
    assert medium.kind == "temporary" and "capacity" in codes(medium)
    high = decide(vz, "err", TRACEBACK)  # 0.3 base + 0.4 error pattern
    assert high.kind == "queue" and high.priority is Priority.HIGH  # not held back
    fresh = SmartVectorizer(policies={"t/kb": POLICY}, utilisation=lambda config: 0.99)
    assert decide(fresh, "inc", TRACEBACK, channel_id="incidents").kind == "index_now"


def test_stack_frames_without_the_word_error_still_count_as_errors() -> None:
    vz = SmartVectorizer()
    java = (
        "Request failed while charging the customer card\n"
        "    at com.acme.billing.Gateway.charge(Gateway.java:88)\n"
        "    at com.acme.billing.Api.handle(Api.java:12)"
    )
    assert "error_pattern" in codes(decide(vz, "java", java))
    assert "error_pattern" not in codes(decide(vz, "calm", "A calm note about lunch plans."))


def test_the_queue_drains_critical_first_and_in_order_within_a_priority() -> None:
    q: DecisionQueue[str] = DecisionQueue()
    for priority, item in [
        (Priority.LOW, "l1"),
        (Priority.HIGH, "h1"),
        (Priority.LOW, "l2"),
        (Priority.CRITICAL, "c1"),
        (Priority.MEDIUM, "m1"),
        (Priority.HIGH, "h2"),
    ]:
        q.push(priority, item)
    assert q.sizes() == {"critical": 1, "high": 2, "medium": 1, "low": 2}
    assert [i for _, i in q.drain(3)] == ["c1", "h1", "h2"]
    assert [i for _, i in q.drain()] == ["m1", "l1", "l2"]
    assert len(q) == 0


def test_submit_queues_only_queue_decisions_and_drains_by_priority() -> None:
    vz = SmartVectorizer(policies={"t/kb": POLICY})
    other_error = (
        'Traceback (most recent call last):\n  File "invoice.py", line 7\n'
        "KeyError: 'customer' is missing from the invoice payload"
    )
    for sid, text, channel in [
        ("a", WORKFLOW, None),
        ("b", TRACEBACK, "incidents"),
        ("c", HERON, None),
        ("d", other_error, None),
    ]:
        src = Source("t", "kb", sid, text=text, channel_id=channel)
        vz.submit(
            Chunk(sid, 0, 0, len(text), text),
            WORDLLAMA.embed([text])[0],
            VectorizeContext(CONFIG, src, 1),
        )
    drained = vz.queue.drain()  # b was critical: indexed now, never queued
    assert [(p, item[0].id) for p, item in drained] == [
        (Priority.HIGH, "d#0"),
        (Priority.MEDIUM, "a#0"),
        (Priority.LOW, "c#0"),
    ]


def test_bad_policies_are_refused() -> None:
    with pytest.raises(ValueError):
        VectorizePolicy(critical=0.3, high=0.6)
    with pytest.raises(ValueError):
        VectorizePolicy(duplicate_similarity=0)


# -- end to end ------------------------------------------------------------------------


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path / "rig")
    yield r
    r.close()


def vector_ids(rig: Rig, vec: np.ndarray, k: int = 20) -> list[str]:
    req = SearchRequest(
        "t", "kb", vec.astype(np.float32), k, None, Consistency.STRONG, (), timeout_ms=10_000
    )
    return [h.id for h in rig.node.service.search(req).hits]


def meta_of(rig: Rig, id: str) -> dict[str, Any]:
    entry = rig.node.state.entry("t/kb", id)
    assert entry is not None, id
    return dict(json.loads(entry.meta or "{}"))


def test_decisions_end_to_end_through_the_embedder_processor(rig: Rig, tmp_path: Path) -> None:
    node = rig.node
    vz = SmartVectorizer(
        policies={"t/kb": POLICY},
        neighbours=IndexNeighbours(node.service),
        utilisation=node.capacity.utilisation,
    ).attach(node.service)
    svc = open_ingest(node, tmp_path / "ingest", vectorizer=vz, backoff_s=0.001)
    try:
        svc.create_text_index("t", "kb", "wordllama", recipe="Flat")

        def put(sid: str, text: str, **kw: Any) -> str:
            return svc.put_source(Source("t", "kb", sid, text=text, **kw)).token

        def settle(*tokens: str) -> None:
            svc.query(
                QueryRequest(
                    "t",
                    "kb",
                    "heron",
                    1,
                    consistency=Consistency.SESSION,
                    tokens=tokens,
                    timeout_ms=20_000,
                )
            )

        settle(
            put("err", TRACEBACK, channel_id="incidents"),
            put("heron", HERON),
            put("chat", "ok thanks!", type=SourceType.CHAT),
            put("work", WORKFLOW),
        )
        # later Sources see the earlier chunks through the index's own search
        vz2 = SmartVectorizer(policies={"t/kb": POLICY}, neighbours=IndexNeighbours(node.service))
        svc.processor.vectorizer = vz2  # a fresh process: no in-memory window
        vz2.attach(node.service)
        settle(put("heron-copy", HERON), put("heron-near", HERON_NEAR))

        decisions = {
            id: meta_of(rig, id)["vectorize"]["decision"]
            for id in ("err#0", "heron#0", "chat#0", "work#0", "heron-copy#0", "heron-near#0")
        }
        assert decisions == {
            "err#0": "index_now",
            "heron#0": "queue",
            "chat#0": "text_only",
            "work#0": "queue",
            "heron-copy#0": "duplicate",
            "heron-near#0": "temporary",
        }
        assert any(
            r.startswith("error_pattern") for r in meta_of(rig, "err#0")["vectorize"]["reasons"]
        )
        assert meta_of(rig, "heron-copy#0")["duplicate_of"] == "heron#0"

        # text-only and duplicate chunks are stored but never returned by vector search ...
        for id, text in (("chat#0", "ok thanks!"), ("heron-copy#0", HERON)):
            assert meta_of(rig, id)["text_only"] is True
            assert id not in vector_ids(rig, WORDLLAMA.embed([text])[0])
        assert vector_ids(rig, WORDLLAMA.embed([TRACEBACK])[0], 1) == ["err#0"]
        # ... and stay searchable by keyword
        if node.text is not None:
            hits = svc.query(
                QueryRequest(
                    "t",
                    "kb",
                    "thanks",
                    5,
                    mode="keyword",
                    consistency=Consistency.STRONG,
                    timeout_ms=20_000,
                )
            )
            assert "chat#0" in [h.id for h in hits.hits]

        # the temporary carries its expiry; a hit promotes it on the next capacity tick
        temp = node.state.entry("t/kb", "heron-near#0")
        assert temp is not None and temp.expires_ms is not None
        assert vector_ids(rig, WORDLLAMA.embed([HERON_NEAR])[0], 1) == ["heron-near#0"]
        node.capacity.thresholds = Thresholds()
        actions = node.capacity.tick()
        assert [(a.operation, a.ids) for a in actions] == [("promote", ("heron-near#0",))]
        promoted = node.state.entry("t/kb", "heron-near#0")
        assert promoted is not None and promoted.expires_ms is None

        # the representative lists the member that collapsed into it (written as decisions
        # go, once attached; collapse() writes what is still pending)
        assert vz2.collapse(node.service, "t", "kb") in ({"heron#0": ["heron-copy#0"]}, {})
        node.catch_up(10)
        assert meta_of(rig, "heron#0")["members"] == ["heron-copy#0"]
        assert vz2.members("t/kb") == {}

        info = node.service.info("t", "kb")
        assert info["vectorize"]["decisions"] == {"duplicate": 1, "temporary": 1}
        assert info["vectorize"]["reasons"]["near_duplicate"] == 1
        assert info["capacity"]["actions"] == {"promote": 1}
        assert vz.stats("t/kb")["decisions"] == {"index_now": 1, "queue": 2, "text_only": 1}
    finally:
        svc.close()


def test_a_budgeted_index_reports_its_utilisation_to_the_vectorizer(rig: Rig) -> None:
    node = rig.node
    config = IndexConfig("t", "kb", 4, recipe="Flat", quotas=IndexQuotas(max_vectors=10))
    node.service.create_index(config)
    assert node.catch_up(10)
    from streams.index.model import VectorUpsert

    for i in range(9):
        node.service.upsert(
            VectorUpsert("t", "kb", f"v{i}", np.eye(4, dtype=np.float32)[i % 4] + i)
        )
    assert node.capacity.utilisation(node.indexer.configs["t/kb"]) == pytest.approx(0.9)


def test_a_representative_not_indexed_yet_gets_its_members_once_it_is(rig: Rig) -> None:
    from streams.index.model import VectorUpsert

    node = rig.node
    node.service.create_index(CONFIG)
    assert node.catch_up(10)
    vz = SmartVectorizer(collapse_interval_s=3600).attach(node.service)
    assert decide(vz, "heron", HERON).kind == "queue"
    assert decide(vz, "heron-again", HERON).of == "heron#0"
    assert vz.collapse(node.service, "t", "kb") == {}  # heron#0 is not written yet
    assert vz.members("t/kb") == {"heron#0": ["heron-again#0"]}
    node.service.upsert(
        VectorUpsert("t", "kb", "heron#0", WORDLLAMA.embed([HERON])[0], '{"text": "heron"}')
    )
    assert node.catch_up(10)
    assert vz.collapse(node.service, "t", "kb") == {"heron#0": ["heron-again#0"]}
    assert node.catch_up(10)
    assert meta_of(rig, "heron#0") == {"text": "heron", "members": ["heron-again#0"]}
    assert vz.members("t/kb") == {}
    assert node.service.info("t", "kb")["vectorize"]["decisions"] == {
        "queue": 1,
        "duplicate": 1,
    }


def test_a_node_with_smart_vectorize_decides_and_reports_in_vec_info(tmp_path: Path) -> None:
    from streams.config import Settings
    from streams.node import open_node

    settings = Settings(
        data_dir=tmp_path / "node", smart_vectorize=True, capacity_interval_s=0.2, durability="none"
    ).check()
    with open_node(settings) as node:
        query = node.start_query_node()
        ingest = node.start_ingest()
        ingest.create_text_index("t", "kb", "wordllama", recipe="Flat")
        token = ingest.put_source(Source("t", "kb", "err", text=TRACEBACK)).token
        ingest.query(
            QueryRequest(
                "t",
                "kb",
                "gateway",
                1,
                consistency=Consistency.SESSION,
                tokens=(token,),
                timeout_ms=20_000,
            )
        )
        info = query.service.info("t", "kb")
        assert info["vectorize"]["decisions"] == {"queue": 1}
        assert info["vectorize"]["recent"][0]["priority"] == "high"
        assert info["capacity"]["budget"] is None
        assert query.capacity._thread is not None and query.capacity._thread.is_alive()
