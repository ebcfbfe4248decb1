"""The capacity manager on a real query node over the embedded log: an index driven past
95 % of its budget by real writes, each action in order on the ``audit`` topic, archived
vectors restored and found again by search; admission (VEC_ERR_QUOTA) over RESP-free
Python, over HTTP, and temporaries (TTL expiry, promotion on a hit)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from streams.capacity import CapacityManager, Thresholds
from streams.index.exceptions import InvalidRequest, NotFound, QuotaExceeded, VersionConflict
from streams.index.model import Consistency, IndexConfig, IndexQuotas, VectorUpsert
from streams.log.port import LogPosition
from streams.schemas.catalog import TOPIC_VALUE_SCHEMA
from streams.service.api import SearchRequest
from streams.service.http import create_http_app
from streams.service.metrics import ServiceMetrics
from tests.rigs import Rig
from tests.test_http_api import serve

DIM = 16
STRONG = Consistency.STRONG


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def create(rig: Rig, quotas: IndexQuotas, index: str = "kb") -> IndexConfig:
    config = IndexConfig("acme", index, DIM, recipe="Flat", quotas=quotas)
    rig.node.service.create_index(config)
    assert rig.node.catch_up(10)
    return config


def put(
    rig: Rig,
    id: str,
    vec: np.ndarray,
    importance: float,
    *,
    ttl_ms: int | None = None,
    index: str = "kb",
    **meta: Any,
) -> LogPosition:
    body = json.dumps({"vectorize": {"importance": importance}, **meta})
    return rig.node.service.upsert(
        VectorUpsert("acme", index, id, vec.astype(np.float32), body, ttl_ms=ttl_ms)
    )


def top_ids(rig: Rig, vec: np.ndarray, k: int = 1, index: str = "kb") -> list[str]:
    req = SearchRequest(
        "acme", index, vec.astype(np.float32), k, None, STRONG, (), timeout_ms=10_000
    )
    return [h.id for h in rig.node.service.search(req).hits]


def audit_events(rig: Rig) -> list[dict[str, Any]]:
    out = []
    topic = rig.topics.audit
    for rec in rig.log.read(topic, 0, 0, 10_000):
        _, value = rig.codec.decode(rec.value or b"")
        if value["operation"].startswith("capacity."):
            out.append({**value, "details": json.loads(value["details"])})
    return out


def test_archive_topic_is_compacted_and_holds_vector_records(rig: Rig) -> None:
    spec = rig.log.describe(rig.topics.archive)
    assert spec.cleanup.value == "compact"
    assert TOPIC_VALUE_SCHEMA["archive"] == "VectorRecord"


def test_quotas_survive_the_log_and_a_restart(rig: Rig) -> None:
    create(rig, IndexQuotas(max_vectors=7, max_bytes=9000))
    assert rig.node.indexer.configs["acme/kb"].quotas == IndexQuotas(7, 9000)
    rig.restart_node(drop_snapshots=True)
    assert rig.node.indexer.configs["acme/kb"].quotas == IndexQuotas(7, 9000)


def test_index_past_95_percent_acts_in_order_logs_each_action_and_restores(rig: Rig) -> None:
    create(rig, IndexQuotas(max_vectors=50))
    manager = rig.node.capacity
    rng = np.random.default_rng(7)
    important = {f"doc{i}": rng.standard_normal(DIM) for i in range(30)}
    for id, v in important.items():
        put(rig, id, v, 0.9)
    dups = {f"dup{i}": important[f"doc{i}"] + 1e-3 * rng.standard_normal(DIM) for i in range(3)}
    for id, v in dups.items():
        put(rig, id, v, 0.3)
    temps = {f"tmp{i}": rng.standard_normal(DIM) for i in range(6)}
    put(rig, "tmp0", temps["tmp0"], 0.2, ttl_ms=1)  # expires at once
    for i in range(1, 6):
        put(rig, f"tmp{i}", temps[f"tmp{i}"], 0.2, ttl_ms=3_600_000)
    cold = {f"cold{i}": rng.standard_normal(DIM) for i in range(9)}
    for i, (id, v) in enumerate(cold.items()):
        put(rig, id, v, 0.01 * (i + 1))  # cold0 is the least important
    # 30 + 3 + 6 + 9 = 48 of 50 vectors: 96 %
    assert manager.usage("acme", "kb").vectors == 48

    # tightened admission: a new id is refused with a clear message, nothing appended
    end = rig.log.end_offsets(rig.topics.vectors)
    with pytest.raises(QuotaExceeded) as err:
        put(rig, "new0", rng.standard_normal(DIM), 0.9)
    assert err.value.code == "VEC_ERR_QUOTA"
    assert "96.0% of its budget" in str(err.value) and "48/50 vectors" in str(err.value)
    assert rig.log.end_offsets(rig.topics.vectors) == end
    put(rig, "doc5", important["doc5"], 0.9, note="updates of existing ids pass")

    # searches hit tmp1 (promoted) and cold0 (warm: archived after the colder ones)
    assert top_ids(rig, temps["tmp1"]) == ["tmp1"]
    assert top_ids(rig, cold["cold0"]) == ["cold0"]

    actions = manager.tick()
    ops = [(a.operation, a.ids) for a in actions]
    assert ops[0] == ("promote", ("tmp1",))
    assert ops[1] == ("expire", ("tmp0",))
    compress = [a for a in actions if a.operation == "compress"]
    assert sorted((a.details["representative"], a.ids) for a in compress) == [
        ("doc0", ("dup0",)),
        ("doc1", ("dup1",)),
        ("doc2", ("dup2",)),
    ]
    assert [o for o, _ in ops[2:5]] == ["compress"] * 3
    assert ops[5] == ("expire", ("tmp2", "tmp3", "tmp4", "tmp5"))
    # 48 - 1 - 3 - 4 = 40 (80 %); archived down to 70 %: the 5 coldest, least important
    assert ops[6] == ("archive", ("cold1", "cold2", "cold3", "cold4", "cold5"))
    assert ops[7] == ("relax", ())
    assert len(ops) == 8

    # every action is on `audit`, in order, after the refusal that tightened admission
    events = audit_events(rig)
    assert [e["operation"] for e in events] == [
        "capacity.tighten",
        "capacity.promote",
        "capacity.expire",
        "capacity.compress",
        "capacity.compress",
        "capacity.compress",
        "capacity.expire",
        "capacity.archive",
        "capacity.relax",
    ]
    assert events[7]["details"]["ids"] == ["cold1", "cold2", "cold3", "cold4", "cold5"]
    assert all(e["target"] == "acme/kb" and e["actor"] == "capacity-manager" for e in events)

    # the state agrees: promoted has no TTL, representatives list members, removed are gone
    state = rig.node.state
    promoted = state.entry("acme/kb", "tmp1")
    assert promoted is not None and promoted.expires_ms is None
    rep = state.entry("acme/kb", "doc0")
    assert rep is not None and json.loads(rep.meta or "{}")["members"] == ["dup0"]
    for gone in ("tmp0", "tmp2", "dup0", "cold1", "cold5"):
        assert state.entry("acme/kb", gone) is None
    assert top_ids(rig, cold["cold3"], k=3).count("cold3") == 0
    assert manager.usage("acme", "kb").vectors == 35
    assert manager.archived_ids("acme", "kb") == sorted(
        ["dup0", "dup1", "dup2", "cold1", "cold2", "cold3", "cold4", "cold5"]
    )
    info = rig.node.service.info("acme", "kb")["capacity"]
    assert info["utilisation"] == 0.7 and info["admission"] == "open"
    assert info["actions"] == {
        "tighten": 1,
        "promote": 1,
        "expire": 2,
        "compress": 3,
        "archive": 1,
        "relax": 1,
    }

    # fill to 96 % again: tightened, yet restores are accepted
    for i in range(13):
        put(rig, f"more{i}", rng.standard_normal(DIM), 0.9)
    with pytest.raises(QuotaExceeded):
        put(rig, "more-refused", rng.standard_normal(DIM), 0.9)
    restored = manager.restore("acme", "kb", ["cold3", "dup1"])
    assert set(restored) == {"cold3", "dup1"}
    assert top_ids(rig, cold["cold3"]) == ["cold3"]
    assert top_ids(rig, dups["dup1"], k=2)[0] in ("dup1", "doc1")
    got = rig.node.service.get("acme", "kb", "cold3", consistency=STRONG)
    assert json.loads(got.meta or "{}")["vectorize"]["importance"] == 0.04
    assert "cold3" not in manager.archived_ids("acme", "kb")
    assert audit_events(rig)[-1]["operation"] == "capacity.restore"
    assert audit_events(rig)[-1]["details"]["ids"] == ["cold3", "dup1"]

    # bad restores write nothing
    end = rig.log.end_offsets(rig.topics.vectors)
    with pytest.raises(NotFound):
        manager.restore("acme", "kb", ["cold4", "never-archived"])
    with pytest.raises(InvalidRequest):
        manager.restore("acme", "kb", [])
    with pytest.raises(NotFound):
        manager.restore("acme", "nope", ["cold4"])
    assert rig.log.end_offsets(rig.topics.vectors) == end
    assert "cold4" in manager.archived_ids("acme", "kb")


def test_archived_records_restore_after_a_node_restart(rig: Rig) -> None:
    create(rig, IndexQuotas(max_vectors=9))
    rng = np.random.default_rng(3)
    vecs = {f"v{i}": rng.standard_normal(DIM) for i in range(9)}
    for i, (id, v) in enumerate(vecs.items()):
        put(rig, id, v, 0.1 * (i + 1))
    rig.node.capacity.thresholds = Thresholds(archive_target=0.5)
    actions = rig.node.capacity.tick()  # 100 %: archive the least important down to 50 %
    assert [(a.operation, a.ids) for a in actions] == [("archive", ("v0", "v1", "v2", "v3", "v4"))]
    rig.restart_node(drop_snapshots=True)
    assert rig.node.capacity.archived_ids("acme", "kb") == ["v0", "v1", "v2", "v3", "v4"]
    assert rig.node.capacity.usage("acme", "kb").vectors == 4
    rig.node.capacity.restore("acme", "kb", ["v0"])
    assert top_ids(rig, vecs["v0"]) == ["v0"]
    assert rig.node.capacity.archived_ids("acme", "kb") == ["v1", "v2", "v3", "v4"]
    put(rig, "v1", vecs["v1"], 0.9)  # written again meanwhile: its restore must not clobber it
    end = rig.log.end_offsets(rig.topics.vectors)
    with pytest.raises(VersionConflict):
        rig.node.capacity.restore("acme", "kb", ["v2", "v1"])
    assert rig.log.end_offsets(rig.topics.vectors) == end
    assert rig.node.capacity.archived_ids("acme", "kb") == ["v1", "v2", "v3", "v4"]


def test_byte_budget_refuses_a_write_that_would_overflow(rig: Rig) -> None:
    create(rig, IndexQuotas(max_bytes=4000))
    rng = np.random.default_rng(4)
    put(rig, "a", rng.standard_normal(DIM), 0.5, text="x" * 1000)
    end = rig.log.end_offsets(rig.topics.vectors)
    with pytest.raises(QuotaExceeded, match=r"full: .*/4000 bytes"):
        put(rig, "b", rng.standard_normal(DIM), 0.5, text="y" * 3000)
    assert rig.log.end_offsets(rig.topics.vectors) == end
    put(rig, "c", rng.standard_normal(DIM), 0.5, text="small")


def test_indexes_without_quotas_are_never_refused_but_ttls_still_expire(rig: Rig) -> None:
    rig.node.service.create_index(IndexConfig("acme", "free", DIM, recipe="Flat"))
    assert rig.node.catch_up(10)
    rng = np.random.default_rng(5)
    for i in range(30):
        put(rig, f"v{i}", rng.standard_normal(DIM), 0.5, index="free")
    short = rng.standard_normal(DIM)
    put(rig, "short", short, 0.5, ttl_ms=50, index="free")
    assert top_ids(rig, short, index="free") == ["short"]  # hit before it expires ...
    rig.node.capacity.tick()  # ... so it is promoted, not expired
    put(rig, "short2", short, 0.5, ttl_ms=1, index="free")
    rig.restart_node(drop_snapshots=True)  # the expiry is rebuilt from the log
    actions = rig.node.capacity.tick()
    assert [(a.operation, a.ids) for a in actions] == [("expire", ("short2",))]
    assert top_ids(rig, short, index="free") == ["short"]
    # the expiry is a delete on `vectors`, not a silent drop from the state
    last = rig.log.read(rig.topics.vectors, 0, rig.log.end_offsets(rig.topics.vectors)[0] - 1)
    assert [(r.key, r.value) for r in last] == [(b"acme/free/short2", None)]
    assert rig.node.service.info("acme", "free")["capacity"]["budget"] is None


def test_http_creates_budgets_and_temporaries_stats_show_capacity_and_vec_err_quota(
    rig: Rig,
) -> None:
    rng = np.random.default_rng(6)
    with (
        serve(create_http_app(rig.node.service, metrics=ServiceMetrics())) as url,
        httpx.Client(base_url=url, timeout=10) as http,
    ):
        r = http.post(
            "/v1/indexes",
            json={
                "tenant": "acme",
                "index": "kb",
                "dim": DIM,
                "recipe": "Flat",
                "quotas": {"max_vectors": 4},
            },
        )
        assert r.status_code == 201, r.text
        assert rig.node.catch_up(10)
        listed = http.get("/v1/indexes", params={"tenant": "acme"}).json()["indexes"]
        assert listed[0]["quotas"] == {"max_vectors": 4, "max_bytes": None, "qps": None}
        for i in range(4):
            body: dict[str, Any] = {"vector": rng.standard_normal(DIM).tolist()}
            if i == 3:
                body["ttl_ms"] = 60_000
            r = http.put(f"/v1/indexes/acme/kb/vectors/v{i}", json=body)
            assert r.status_code == 200, r.text
        r = http.put(
            "/v1/indexes/acme/kb/vectors/v9", json={"vector": rng.standard_normal(DIM).tolist()}
        )
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "VEC_ERR_QUOTA"
        bad = http.put(
            "/v1/indexes/acme/kb/vectors/v0",
            json={"vector": rng.standard_normal(DIM).tolist(), "ttl_ms": 0},
        )
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "VEC_ERR_INVALID"
        stats = http.get("/v1/indexes/acme/kb").json()
        assert rig.node.catch_up(10)
        temp = rig.node.state.entry("acme/kb", "v3")
        assert temp is not None and temp.expires_ms is not None
        assert temp.expires_ms - int(time.time() * 1000) in range(50_000, 60_001)
        # the archive over HTTP: a tick expires v3 (a temporary never hit) and archives
        # down to 70 %; the archived ids restore
        assert [a.operation for a in rig.node.capacity.tick()] == ["expire", "archive", "relax"]
        archived = http.get("/v1/indexes/acme/kb/archive").json()["ids"]
        assert len(archived) == 1
        r = http.post("/v1/indexes/acme/kb/archive:restore", json={"ids": archived})
        assert r.status_code == 200, r.text
        assert set(r.json()["positions"]) == set(archived)
        assert http.get("/v1/indexes/acme/kb/archive").json() == {"ids": []}
        r = http.post("/v1/indexes/acme/kb/archive:restore", json={"ids": archived})
        assert r.status_code == 404 and r.json()["error"]["code"] == "VEC_ERR_NOT_FOUND"
        r = http.post("/v1/indexes/acme/kb/archive:restore", json={"ids": []})
        assert r.status_code == 400 and r.json()["error"]["code"] == "VEC_ERR_INVALID"
    cap = stats["capacity"]
    assert cap["budget"] == {"max_vectors": 4, "max_bytes": None}
    assert cap["usage"]["vectors"] == 4 and cap["admission"] == "tightened"
    assert cap["refused"] == 1 and cap["actions"] == {"tighten": 1}


def test_a_manager_of_its_own_registers_on_the_service(rig: Rig) -> None:
    manager = CapacityManager(
        rig.node.service, thresholds=Thresholds(compress=0.5, archive_target=0.4)
    )
    assert rig.node.service.admission is manager
    with pytest.raises(ValueError):
        Thresholds(compress=0.9, expire=0.8)


def test_vec_info_over_resp_shows_the_capacity_state_and_vec_err_quota(rig: Rig) -> None:
    import redis

    from streams.service.resp import RespServer, serve_in_thread

    create(rig, IndexQuotas(max_vectors=2))
    rng = np.random.default_rng(8)
    server = RespServer(rig.node.service, "127.0.0.1", 0, metrics=ServiceMetrics())
    with serve_in_thread(server) as s:
        client = redis.Redis(port=s.port)
        vecs = [rng.standard_normal(DIM).astype("<f4").tobytes() for _ in range(3)]
        for i in range(2):
            client.execute_command("VEC.UPSERT", "acme", "kb", f"v{i}", "VECTOR", vecs[i])
        with pytest.raises(redis.ResponseError, match=r"^VEC_ERR_QUOTA index acme/kb is full"):
            client.execute_command("VEC.UPSERT", "acme", "kb", "v2", "VECTOR", vecs[2])
        info = client.execute_command("VEC.INFO", "acme", "kb")
        rig.node.capacity.tick()  # 100 %: one of the two is archived (down to 50 %)
        archived = client.execute_command("VEC.ARCHIVED", "acme", "kb")
        assert len(archived) == 1
        tokens = client.execute_command("VEC.RESTORE", "acme", "kb", archived[0])
        assert len(tokens) == 1 and tokens[0].startswith(rig.topics.vectors.encode())
        assert client.execute_command("VEC.ARCHIVED", "acme", "kb") == []
        with pytest.raises(redis.ResponseError, match=r"^VEC_ERR_NOT_FOUND"):
            client.execute_command("VEC.RESTORE", "acme", "kb", archived[0])
        with pytest.raises(redis.ResponseError, match=r"^VEC_ERR_INVALID"):
            client.execute_command("VEC.RESTORE", "acme", "kb")
        client.close()
    pairs = dict(zip(info[::2], info[1::2], strict=True)) if isinstance(info, list) else info
    cap = json.loads(pairs[b"capacity"])
    assert cap["usage"]["vectors"] == 2 and cap["refused"] == 1
    assert cap["admission"] == "tightened" and cap["level"] == "archive"


def test_duplicate_groups_all_pairs_and_through_the_neighbours_above_the_limit() -> None:
    from streams.capacity.duplicates import duplicate_groups
    from streams.capacity.ledger import Row
    from streams.service.state import Entry

    rng = np.random.default_rng(9)
    base = rng.standard_normal((4, DIM)).astype(np.float32)
    vecs = [base[0], base[0] * 2, base[1], base[0] + 1e-4, base[2], base[3]]
    importance = [0.2, 0.9, 0.5, 0.2, 0.5, 0.5]
    rows = [
        Row(f"r{i}", Entry(i, 1, v, None, (), {}, "t:0:0"), importance[i], False, 0)
        for i, v in enumerate(vecs)
    ]
    groups = duplicate_groups(rows, 0.97, limit=100)
    # r1 is the most important of {r0, r1, r3}; the others are singletons
    assert [(g.id, [m.id for m in ms]) for g, ms in groups] == [("r1", ["r0", "r3"])]

    def nearest(row: Row) -> list[str]:  # a brute-force stand-in for the index's k-NN
        sims = [
            float(np.dot(row.entry.vector, r.entry.vector))
            / (np.linalg.norm(row.entry.vector) * np.linalg.norm(r.entry.vector))
            for r in rows
        ]
        return [rows[i].id for i in np.argsort(sims)[::-1][:3]]

    assert duplicate_groups(rows, 0.97, limit=2) == []  # no neighbours: nothing compared
    groups = duplicate_groups(rows, 0.97, limit=2, neighbours=nearest)  # r0, r1 asked
    assert [(g.id, sorted(m.id for m in ms)) for g, ms in groups] == [("r1", ["r0", "r3"])]


def test_records_produced_straight_to_vectors_count_against_the_budget(rig: Rig) -> None:
    from streams.log.port import Record
    from streams.schemas import catalog

    create(rig, IndexQuotas(max_vectors=10))
    manager = rig.node.capacity
    assert manager.usage("acme", "kb").vectors == 0  # counted before the producer wrote
    rng = np.random.default_rng(10)
    subject = catalog.subject_for(rig.topics.vectors)
    schema = catalog.load_schema("VectorRecord")
    records = []
    for i in range(10):  # a Kafka producer's writes: no admission on the way in
        value = rig.codec.encode(
            subject,
            schema,
            {
                "tenant": "acme",
                "index": "kb",
                "id": f"p{i}",
                "vector": rng.standard_normal(DIM).astype("<f4").tobytes(),
                "dtype": "fp32",
                "meta": json.dumps({"importance": i / 10}),
                "version": 1,
                "timestamp": 0,
            },
        )
        records.append(Record.of(rig.topics.vectors, f"acme/kb/p{i}", value))
    rig.node.service.append_raw(records)
    assert rig.node.catch_up(10)
    assert manager.usage("acme", "kb").vectors == 10  # the live count raises the estimate
    with pytest.raises(QuotaExceeded, match="full: 10/10 vectors"):
        put(rig, "mine", rng.standard_normal(DIM), 0.9)
    actions = manager.tick()
    assert [a.operation for a in actions] == ["archive", "relax"]
    assert actions[0].ids == ("p0", "p1", "p2")  # least important first, down to 70 %


def test_housekeeping_delete_never_swallows_a_newer_acknowledged_write(rig: Rig) -> None:
    """The race the capacity manager must not lose: it scanned ``id``'s copy at version v, a
    client then wrote v+1 (acknowledged, maybe not yet applied), or deleted the id and
    added it again (version 1 again: the same version, another copy); the archive/expiry
    delete of the copy scanned must leave the id alone, while an unchanged id is deleted."""
    create(rig, IndexQuotas(None, None))
    svc = rig.node.service
    rng = np.random.default_rng(7)
    for id in ("raced", "again", "still"):
        svc.upsert(VectorUpsert("acme", "kb", id, rng.standard_normal(DIM).astype(np.float32)))
    assert rig.node.catch_up(10)
    scanned = {}
    for id in ("raced", "again", "still"):
        entry = svc.state.entry("acme/kb", id)
        assert entry is not None and entry.version == 1
        scanned[id] = entry.position
    newer = rng.standard_normal(DIM).astype(np.float32)
    svc.upsert(VectorUpsert("acme", "kb", "raced", newer))  # after the scan, before the delete
    svc.delete("acme", "kb", "again")
    svc.add(VectorUpsert("acme", "kb", "again", newer))  # version 1 again
    gone, pos = svc.delete_unchanged("acme", "kb", scanned)
    assert gone == ["still"] and pos is not None
    assert rig.node.catch_up(10)
    for id in ("raced", "again"):
        got = svc.get("acme", "kb", id, consistency=STRONG)
        assert np.allclose(got.vector, newer)
    with pytest.raises(NotFound):
        svc.get("acme", "kb", "still", consistency=STRONG)
