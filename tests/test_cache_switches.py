"""Per-index cache switches end to end: L0, L1, L2 and L3 (the payload cache) switched by
``IndexConfig.cache.layers``, through a real query node over HTTP (a served app, httpx)
and RESP (redis-py). An index with [L0] never answers from L1/L2/L3, one with [NONE]
never caches, and a new IndexConfig version switches the layers without a restart.
Records written before IndexConfig v3 (no ``l3`` field) keep their payload cache on."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastavro
import httpx
import numpy as np
import pytest

from streams.cache.controller import L1_LINK_BYTES
from streams.index.model import CacheSettings
from streams.schemas import catalog
from streams.service.http import create_http_app
from streams.service.indexer import config_from_avro
from streams.service.state import config_from_json, config_to_json
from tests.rigs import Rig
from tests.test_http_api import serve

DIM = 8
BASE = np.array([1, 0.2, 0, 0, 0.1, 0, 0, 0], dtype=np.float32)


class Node:
    """A query node with its HTTP app served on a free port."""

    def __init__(self, root: Path) -> None:
        self.rig = Rig(root, head_capacity=64)
        self._serve = serve(create_http_app(self.rig.node.service))
        self.http = httpx.Client(base_url=self._serve.__enter__(), timeout=30)

    def close(self) -> None:
        self.http.close()
        self._serve.__exit__(None, None, None)
        self.rig.close()

    def create(self, index: str, layers: list[str] | None, tenant: str = "acme") -> None:
        body: dict[str, Any] = {"tenant": tenant, "index": index, "dim": DIM, "recipe": "Flat"}
        if layers is not None:
            body["cache"] = {"layers": layers, "l2_threshold": 0.05}
        r = self.http.post("/v1/indexes", json=body)
        assert r.status_code == 201, r.text
        assert self.rig.node.catch_up(30)

    def fill(self, index: str, tenant: str = "acme") -> None:
        rng = np.random.default_rng(3)
        for i in range(5):  # k = 5: every search returns every row
            v = (BASE + 0.05 * rng.standard_normal(DIM)).astype(np.float32)
            r = self.http.put(
                f"/v1/indexes/{tenant}/{index}/vectors/v{i}",
                json={"vector": v.tolist(), "meta": json.dumps({"n": i})},
            )
            assert r.status_code in (200, 201), r.text
        assert self.rig.node.catch_up(30)

    def search(self, index: str, v: np.ndarray, tenant: str = "acme") -> dict[str, Any]:
        r = self.http.post(
            f"/v1/indexes/{tenant}/{index}/search", json={"vector": v.tolist(), "k": 5}
        )
        assert r.status_code == 200, r.text
        debug: dict[str, Any] = r.json()["debug"]
        return debug

    def info(self, index: str, tenant: str = "acme") -> dict[str, Any]:
        r = self.http.get(f"/v1/indexes/{tenant}/{index}")
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    yield n
    n.close()


Q = BASE.copy()
SCALED = (BASE * np.float32(3)).astype(np.float32)  # cosine: another L0 key, the same L1 key
NEAR = (BASE + np.float32(0.01) * np.array([0, 0, 1, 0, 0, 0, 0, 0], np.float32)).astype(
    np.float32
)  # another L1 key (most likely), within L2's 0.05


def moved(i: int) -> np.ndarray:
    """A query far from every other (axis ``i``, negated): a miss of every result layer
    that reads the same five rows, L3's case."""
    v = np.zeros(DIM, np.float32)
    v[i] = -1.0
    return v


def _probe(node: Node, index: str) -> list[tuple[str, int]]:
    """(layer, payload_cached) of: the query, again, scaled, near, and a query that no
    result layer answers but whose rows the first search read."""
    out = []
    for v in (Q, Q, SCALED, NEAR):
        d = node.search(index, v)
        out.append((d["layer"], int(d.get("payload_cached", 0))))
    return out


def test_l0_only_never_answers_from_l1_l2_or_l3(node: Node) -> None:
    node.create("exact", ["L0"])
    node.fill("exact")
    layers = _probe(node, "exact")
    assert [x[0] for x in layers] == ["none", "L0", "none", "none"]
    assert all(cached == 0 for _, cached in layers)  # no payload from L3
    listed = node.http.get("/v1/indexes", params={"tenant": "acme"}).json()["indexes"]
    assert listed[0]["cache"]["layers"] == ["L0"] and listed[0]["cache"]["l3"] is False
    mem = node.info("exact")["cache_memory"]
    assert mem["L0"] > 0 and mem["L1"] == mem["L2"] == mem["L3"] == 0


def test_none_never_caches(node: Node) -> None:
    node.create("off", ["NONE"], tenant="quiet")
    node.fill("off", tenant="quiet")
    for _ in range(3):
        for v in (Q, SCALED, NEAR, moved(3)):
            d = node.search("off", v, tenant="quiet")
            assert d["layer"] == "none" and d["decision"] == "none"
            assert d.get("payload_cached", 0) == 0
    mem = node.info("off", tenant="quiet")["cache_memory"]
    assert mem["total"] == 0


def test_each_layer_answers_only_where_switched_on(node: Node) -> None:
    node.create("all", ["L0", "L1", "L2", "L3"])
    node.create("l3", ["L3"])
    for name in ("all", "l3"):
        node.fill(name)
    layers = _probe(node, "all")
    assert [x[0] for x in layers[:3]] == ["none", "L0", "L1"]
    assert layers[3][0] in ("L1", "L2")
    assert node.search("all", moved(3))["payload_cached"] == 5  # L3: same rows, fresh search
    # L3 only: payloads cached, results never
    first, again = node.search("l3", Q), node.search("l3", Q)
    assert first["layer"] == again["layer"] == "none"
    assert first["payload_cached"] == 0 and again["payload_cached"] == 5
    assert again["decision"] == "none"  # nothing offered to the result cache
    mem = node.info("all")["cache_memory"]
    assert mem["L1"] > 0 and mem["L2"] > 0 and mem["L3"] > 0
    assert mem["total"] == mem["L0"] + mem["L1"] + mem["L2"] + mem["L3"]


def test_a_new_config_version_switches_layers_without_a_restart(node: Node) -> None:
    node.create("docs", ["L0"])
    node.fill("docs")
    assert [x[0] for x in _probe(node, "docs")] == ["none", "L0", "none", "none"]
    assert node.search("docs", moved(3))["payload_cached"] == 0

    node.create("docs", ["L0", "L1", "L3"])  # the next IndexConfig record of the index
    assert node.search("docs", Q)["layer"] == "L0"  # L0 entries survive the change
    assert node.search("docs", moved(4))["payload_cached"] == 0  # L3 on now: fills it
    assert node.search("docs", moved(5))["payload_cached"] == 5  # and serves it
    node.search("docs", np.array([0, 1, 0, 0, 0, 0, 0, 0], np.float32))  # a miss: links L1
    d = node.search("docs", np.array([0, 2, 0, 0, 0, 0, 0, 0], np.float32))
    assert d["layer"] == "L1"
    assert node.info("docs")["cache_memory"]["L1"] > 0

    node.create("docs", ["L0"])  # L1 and L3 off again: their state is dropped
    assert node.search("docs", np.array([0, 3, 0, 0, 0, 0, 0, 0], np.float32))["layer"] == "none"
    assert node.search("docs", moved(6))["payload_cached"] == 0
    mem = node.info("docs")["cache_memory"]
    assert mem["L3"] == 0

    node.create("docs", ["NONE"])  # no layer: the index's cached results are dropped
    assert node.search("docs", Q)["layer"] == "none"
    assert node.info("docs")["cache_memory"]["total"] == 0
    assert node.search("docs", Q)["layer"] == "none"


def test_resp_search_follows_the_switches(node: Node) -> None:
    import redis

    from streams.service.resp import RespServer, serve_in_thread

    node.create("exact", ["L0"])
    node.create("tolerant", ["L0", "L1"])
    for name in ("exact", "tolerant"):
        node.fill(name)

    def layer(client: redis.Redis, index: str, v: np.ndarray) -> str:
        _hits, debug = client.execute_command(  # type: ignore[no-untyped-call]
            "VEC.SEARCH", "acme", index, "TOPK", 5, "VECTOR", v.astype("<f4").tobytes()
        )
        pairs = (
            debug.items() if isinstance(debug, dict) else zip(debug[::2], debug[1::2], strict=True)
        )
        d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in pairs}
        out = d["layer"]
        return out.decode() if isinstance(out, bytes) else str(out)

    with serve_in_thread(RespServer(node.rig.node.service, "127.0.0.1", 0)) as server:
        client = redis.Redis(host="127.0.0.1", port=server.port)
        try:
            assert [layer(client, "exact", v) for v in (Q, Q, SCALED)] == ["none", "L0", "none"]
            assert [layer(client, "tolerant", v) for v in (Q, Q, SCALED)] == ["none", "L0", "L1"]
            raw = client.execute_command("VEC.INFO", "acme", "tolerant")  # type: ignore[no-untyped-call]
            pairs = raw.items() if isinstance(raw, dict) else zip(raw[::2], raw[1::2], strict=True)
            info = {(k.decode() if isinstance(k, bytes) else k): v for k, v in pairs}
            mem = json.loads(info["cache_memory"])  # this tenant's bytes per layer
            assert mem["L1"] == L1_LINK_BYTES  # one entry (the query), one link
            assert mem["L0"] > 0 and mem["L2"] == mem["L3"] == 0 and mem["budget"] is None
            assert mem["total"] == mem["L0"] + mem["L1"]
        finally:
            client.close()


# -- records written before IndexConfig v3 ---------------------------------------------


def _v2_record(layers: list[str]) -> dict[str, Any]:
    return {
        "tenant": "t",
        "index": "i",
        "dim": 4,
        "metric": "cosine",
        "dtype": "fp32",
        "recipe": "Flat",
        "filter_fields": [],
        "quotas": None,
        "cache": {
            "layers": layers,
            "memory_budget_bytes": None,
            "l2_threshold": None,
            "l2_text_threshold": None,
        },
        "embedder": None,
        "created_ms": 1,
        "version": 1,
    }


@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        (["L0"], ("L0", "L3")),  # L3 was on whenever another layer was
        (["L0", "L1", "L2"], ("L0", "L1", "L2", "L3")),
        (["NONE"], ()),  # and off with none
        ([], ()),
    ],
)
def test_records_written_before_v3_keep_their_payload_cache(
    layers: list[str], expected: tuple[str, ...]
) -> None:
    v2 = fastavro.parse_schema(json.loads(catalog.history("IndexConfig")[1]))
    current = fastavro.parse_schema(json.loads(catalog.load_schema("IndexConfig")))
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, v2, _v2_record(layers))
    buf.seek(0)
    read = fastavro.schemaless_reader(buf, v2, current)
    assert isinstance(read, dict) and read["cache"]["l3"] is None
    config = config_from_avro(read)  # what the indexer applies
    assert config.cache is not None and config.cache.layers == expected
    # the node's state (JSON) written before v3 has no "l3" either
    raw = json.loads(config_to_json(config))
    del raw["cache"]["l3"]
    restored = config_from_json(json.dumps(raw).encode())
    assert restored.cache is not None and restored.cache.layers == expected


def test_v3_records_say_l3_explicitly() -> None:
    for layers in (("L0",), ("L0", "L3"), ("L3",), ("L1", "L2", "L3")):
        cs = CacheSettings(layers)
        avro = cs.as_avro()
        assert "L3" not in avro["layers"]  # type: ignore[operator]
        assert avro["l3"] is ("L3" in layers)
        back = CacheSettings.from_avro(avro)
        assert back is not None and set(back.layers) == set(layers)
    only = CacheSettings.from_avro({"layers": ["L3"]})  # a JSON form naming L3, no "l3"
    assert only is not None and only.layers == ("L3",)
    off = CacheSettings.from_avro({"layers": ["L0"], "l3": False})
    assert off is not None and off.layers == ("L0",)


def test_a_tenant_budget_bounds_every_layer_on_a_real_node(tmp_path: Path) -> None:
    """On a node with ``cache_tenant_budget_bytes``: searches of one tenant keep its L0, L1,
    L2 and L3 bytes within the budget and never evict the other tenant's entries."""
    from streams.service.query_node import QueryNode

    rig = Rig(tmp_path, head_capacity=64)
    rig.node.close()
    budget = 20_000
    rig.node = QueryNode(
        rig.log, rig.topics, rig.codec, tmp_path / "node2", head_capacity=64,
        cache_tenant_budget_bytes=budget, cache_l2_threshold=0.05,
    ).start()  # fmt: skip
    try:
        svc = rig.node.service
        layers = svc.cache_layers
        assert layers is not None
        app = serve(create_http_app(svc))
        with app as url, httpx.Client(base_url=url, timeout=30) as http:
            for tenant in ("big", "small"):
                r = http.post(
                    "/v1/indexes",
                    json={"tenant": tenant, "index": "docs", "dim": DIM, "recipe": "Flat"}
                    | {"cache": {"layers": ["L0", "L1", "L2", "L3"]}},
                )
                assert r.status_code == 201, r.text
                for i in range(5):
                    v = (BASE + 0.05 * np.random.default_rng(i).standard_normal(DIM)).tolist()
                    body = {"vector": v, "meta": json.dumps({"text": "x" * 200})}
                    assert http.put(f"/v1/indexes/{tenant}/docs/vectors/v{i}", json=body).is_success
            assert rig.node.catch_up(30)

            def search(tenant: str, v: np.ndarray) -> str:
                r = http.post(
                    f"/v1/indexes/{tenant}/docs/search", json={"vector": v.tolist(), "k": 5}
                )
                assert r.status_code == 200, r.text
                return str(r.json()["debug"]["layer"])

            small_qs = [
                np.random.default_rng(100 + i).standard_normal(DIM).astype(np.float32)
                for i in range(2)
            ]
            assert [search("small", q) for q in small_qs] == ["none", "none"]
            small_before = layers.memory("small")
            assert 0 < small_before["total"] <= budget
            rng = np.random.default_rng(7)
            for _ in range(60):
                search("big", rng.standard_normal(DIM).astype(np.float32))
                mem = layers.memory("big")
                assert mem["total"] <= budget, mem
            assert mem["L1"] > 0 and mem["L2"] > 0 and mem["L3"] > 0 and mem["budget"] == budget
            assert svc.cache is not None and svc.cache.stats().evictions > 0  # big was over
            assert layers.memory("small") == small_before  # untouched by big's load
            assert [search("small", q) for q in small_qs] == ["L0", "L0"]
            info = http.get("/v1/indexes/big/docs").json()["cache_memory"]
            assert info["total"] <= budget and info["budget"] == budget
    finally:
        rig.close()
