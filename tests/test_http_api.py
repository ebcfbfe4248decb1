"""The HTTP/JSON data plane over real HTTP: the app under uvicorn on a loopback port, driven
by httpx. No mocks: a real :class:`DataPlane` behind it.

To run these against another data plane, change the ``dataplane`` fixture (one line). Writes
are read back through ``session`` consistency with the write's token, never through timing.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI

from streams.log.port import LogPosition
from streams.service.api import DataPlane
from streams.service.http import create_http_app
from streams.service.metrics import ServiceMetrics

DIM = 8
TENANT = "acme"


@pytest.fixture
def metrics() -> ServiceMetrics:
    return ServiceMetrics()


@contextlib.contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yield its URL.

    The socket is made with ``IPPROTO_TCP`` explicitly: asyncio sets TCP_NODELAY only on
    sockets whose ``proto`` says TCP, and without it each response (headers and body are
    two writes) waits ~40 ms for a delayed ACK."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def http(dataplane: DataPlane, metrics: ServiceMetrics) -> Iterator[httpx.Client]:
    with serve(create_http_app(dataplane, metrics=metrics)) as url, \
            httpx.Client(base_url=url, timeout=10) as client:
        yield client


@pytest.fixture
def index(http: httpx.Client) -> str:
    """A fresh index: DIM 8, cosine, tag field ``lang``, numeric field ``price``."""
    name = f"ix-{uuid.uuid4().hex[:8]}"
    r = http.post("/v1/indexes", json={
        "tenant": TENANT, "index": name, "dim": DIM,
        "fields": [{"name": "lang", "kind": "tag"}, {"name": "price", "kind": "numeric"}],
    })
    assert r.status_code == 201, r.text
    LogPosition.parse(r.json()["position"])
    return name


def base(index: str) -> str:
    return f"/v1/indexes/{TENANT}/{index}"


def rand_vectors(n: int, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def put(http: httpx.Client, index: str, id: str, v: Any, **body: Any) -> str:
    r = http.put(f"{base(index)}/vectors/{id}", json={"vector": np.asarray(v).tolist(), **body})
    assert r.status_code == 200, r.text
    token: str = r.json()["position"]
    return token


def get(http: httpx.Client, index: str, id: str, after: str) -> httpx.Response:
    return http.get(f"{base(index)}/vectors/{id}",
                    params={"consistency": "session", "token": after})


def search(http: httpx.Client, index: str, q: np.ndarray, k: int, after: str,
           **body: Any) -> dict[str, Any]:
    r = http.post(f"{base(index)}/search", json={
        "vector": q.tolist(), "k": k, "consistency": "session", "tokens": [after], **body})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def assert_error(r: httpx.Response, status: int, code: str, field: str | None = None) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    if field is not None:
        assert error["field"] == field, error


# -- indexes ------------------------------------------------------------------------------
def test_list_and_stats(http: httpx.Client, index: str) -> None:
    listed = http.get("/v1/indexes", params={"tenant": TENANT}).json()["indexes"]
    assert [(c["tenant"], c["index"], c["dim"]) for c in listed] == [(TENANT, index, DIM)]
    assert listed[0]["fields"] == [{"name": "lang", "kind": "tag"},
                                   {"name": "price", "kind": "numeric"}]
    assert http.get("/v1/indexes", params={"tenant": "nobody"}).json() == {"indexes": []}
    assert index in [c["index"] for c in http.get("/v1/indexes").json()["indexes"]]
    stats = http.get(base(index)).json()
    assert stats["dim"] == DIM and stats["metric"] == "cosine"


def test_create_index_validation(http: httpx.Client) -> None:
    r = http.post("/v1/indexes", json={"tenant": "bad tenant", "index": "x", "dim": 4})
    assert_error(r, 400, "VEC_ERR_INVALID", "tenant")
    r = http.post("/v1/indexes", json={"tenant": TENANT, "index": "x", "dim": 4,
                                       "metric": "hamming"})
    assert_error(r, 400, "VEC_ERR_INVALID", "metric")
    r = http.post("/v1/indexes", json={"tenant": TENANT, "index": "x"})
    assert_error(r, 400, "VEC_ERR_INVALID", "dim")
    assert_error(http.get(base("missing")), 404, "VEC_ERR_NOT_FOUND")


# -- vectors ------------------------------------------------------------------------------
def test_upsert_and_get_round_trip(http: httpx.Client, index: str) -> None:
    v = np.array([0.5, -1, 2, 0, 1e-30, 3.25, -7, 1], np.float32)
    meta = {"title": "a", "n": [1, 2]}
    token = put(http, index, "doc-1", v, meta=meta, tags=["lang:en", "red"],
                numeric={"price": 9.5})
    r = get(http, index, "doc-1", token)
    assert r.status_code == 200, r.text
    got = r.json()
    assert np.array_equal(np.asarray(got["vector"], np.float32), v)
    assert got["meta"] == meta and sorted(got["tags"]) == ["lang:en", "red"]
    assert got["numeric"] == {"price": 9.5}
    assert (got["id"], got["version"], got["position"]) == ("doc-1", 1, token)
    token = put(http, index, "doc-1", v * 2, if_version=1)
    assert get(http, index, "doc-1", token).json()["version"] == 2


def test_vector_b64_and_ids_with_slashes(http: httpx.Client, index: str) -> None:
    v = rand_vectors(1)[0]
    b64 = base64.b64encode(v.astype("<f4").tobytes()).decode()
    r = http.put(f"{base(index)}/vectors/docs/a b/1", json={"vector_b64": b64})
    assert r.status_code == 200, r.text
    got = get(http, index, "docs/a b/1", r.json()["position"]).json()
    assert got["id"] == "docs/a b/1"
    assert np.array_equal(np.asarray(got["vector"], np.float32), v)


def test_add_refuses_existing_ids(http: httpx.Client, index: str) -> None:
    v = np.ones(DIM).tolist()
    r = http.post(f"{base(index)}/vectors/a:add", json={"vector": v})
    assert r.status_code == 201, r.text
    assert_error(http.post(f"{base(index)}/vectors/a:add", json={"vector": v}),
                 409, "VEC_ERR_CONFLICT")
    r = http.post(f"{base(index)}/vectors", json={"id": "b", "vector": v, "meta": "text"})
    assert r.status_code == 201, r.text
    assert get(http, index, "b", r.json()["position"]).json()["meta"] == "text"
    assert_error(http.post(f"{base(index)}/vectors", json={"id": "b", "vector": v}),
                 409, "VEC_ERR_CONFLICT")


def test_if_version_conflict_leaves_the_record(http: httpx.Client, index: str) -> None:
    token = put(http, index, "a", np.ones(DIM))
    r = http.put(f"{base(index)}/vectors/a", json={"vector": [2.0] * DIM, "if_version": 7})
    assert_error(r, 409, "VEC_ERR_CONFLICT")
    got = get(http, index, "a", token).json()
    assert got["version"] == 1 and got["vector"] == [1.0] * DIM


def test_delete_then_search_does_not_return_it(http: httpx.Client, index: str) -> None:
    data = rand_vectors(5, seed=11)
    for i, v in enumerate(data):
        put(http, index, f"v{i}", v)
    r = http.delete(f"{base(index)}/vectors/v0")
    assert r.status_code == 200, r.text
    token = r.json()["position"]
    hits = search(http, index, data[0], 5, token)["hits"]
    assert [h["id"] for h in hits if h["id"] == "v0"] == [] and len(hits) == 4
    assert_error(get(http, index, "v0", token), 404, "VEC_ERR_NOT_FOUND")
    assert_error(http.delete(f"{base(index)}/vectors/v0"), 404, "VEC_ERR_NOT_FOUND")


# -- search -------------------------------------------------------------------------------
def test_search_matches_numpy_brute_force_with_filters(http: httpx.Client, index: str) -> None:
    data = rand_vectors(40, seed=3)
    token = ""
    for i, v in enumerate(data):
        token = put(http, index, f"v{i}", v, meta={"i": i},
                    tags=[f"lang:{'en' if i % 2 else 'fr'}"], numeric={"price": i})
    q = rand_vectors(1, seed=99)[0]
    scores = data @ q / (np.linalg.norm(data, axis=1) * np.linalg.norm(q))
    order = sorted(range(len(data)), key=lambda i: -scores[i])
    out = search(http, index, q, 10, token)
    assert [h["id"] for h in out["hits"]] == [f"v{i}" for i in order[:10]]
    for h, i in zip(out["hits"], order[:10], strict=True):
        assert h["score"] == pytest.approx(float(scores[i]), abs=1e-4)
        assert h["meta"] == {"i": i}
    assert {"cache_hit", "layer", "latency_ms", "decision", "applied"} <= out["debug"].keys()
    out = search(http, index, q, 40, token, filter="lang:en price>=10")
    assert [h["id"] for h in out["hits"]] == [
        f"v{i}" for i in order if i % 2 and i >= 10]
    b64 = base64.b64encode(q.astype("<f4").tobytes()).decode()
    r = http.post(f"{base(index)}/search", json={"vector_b64": b64, "k": 3,
                                                  "consistency": "session", "tokens": [token]})
    assert [h["id"] for h in r.json()["hits"]] == [f"v{i}" for i in order[:3]]


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ({"vector": [1.0, 2.0]}, 400, "VEC_ERR_DIM", "vector"),
        ({"vector": [1e39] * DIM}, 400, "VEC_ERR_INVALID", "vector"),  # inf in fp32
        ({"vector_b64": "not base64!"}, 400, "VEC_ERR_INVALID", "vector_b64"),
        ({"vector_b64": base64.b64encode(b"12345").decode()}, 400, "VEC_ERR_INVALID",
         "vector_b64"),
        ({}, 400, "VEC_ERR_INVALID", "vector"),
        ({"vector": [1.0] * DIM, "vector_b64": ""}, 400, "VEC_ERR_INVALID", "vector"),
        ({"vector": [1.0] * DIM, "k": "x"}, 400, "VEC_ERR_INVALID", "k"),
        ({"vector": [1.0] * DIM, "k": 0}, 400, "VEC_ERR_INVALID", "k"),
        ({"vector": ["a"] * DIM}, 400, "VEC_ERR_INVALID", None),
        ({"vector": [1.0] * DIM, "filter": "color:red"}, 400, "VEC_ERR_INVALID", "filter"),
        ({"vector": [1.0] * DIM, "consistency": "psychic"}, 400, "VEC_ERR_INVALID",
         "consistency"),
        ({"vector": [1.0] * DIM, "surprise": 1}, 400, "VEC_ERR_INVALID", "surprise"),
        ({"vector": [1.0] * DIM, "consistency": "session", "tokens": ["nope"]}, 400,
         "VEC_ERR_INVALID", None),
    ],
)
def test_search_errors(http: httpx.Client, index: str, body: dict[str, Any], status: int,
                       code: str, field: str | None) -> None:
    assert_error(http.post(f"{base(index)}/search", json=body), status, code, field)


def test_write_errors_append_nothing(http: httpx.Client, index: str) -> None:
    url = f"{base(index)}/vectors/a"
    nan_body = '{"vector": [NaN, 1, 1, 1, 1, 1, 1, 1]}'  # not strict JSON; Python reads it
    headers = {"content-type": "application/json"}
    assert_error(http.put(url, content=nan_body, headers=headers), 400, "VEC_ERR_INVALID")
    assert_error(http.put(url, content="{not json", headers=headers), 400, "VEC_ERR_INVALID")
    assert_error(http.put(url, json={"vector": [1.0] * 3}), 400, "VEC_ERR_DIM", "vector")
    assert_error(http.put(url, json={"vector": [1.0] * DIM, "numeric": {"weight": 1}}),
                 400, "VEC_ERR_INVALID", "numeric")
    assert_error(http.put(url, json={"vector": [1.0] * DIM, "tags": ["color:red"]}),
                 400, "VEC_ERR_INVALID", "tags")
    assert_error(http.put(url, json={"vector": [1.0] * DIM, "if_version": -1}),
                 400, "VEC_ERR_INVALID", "if_version")
    assert_error(http.put(f"{base('missing')}/vectors/a", json={"vector": [1.0] * DIM}),
                 404, "VEC_ERR_NOT_FOUND")
    assert http.get(base(index)).json()["stats"]["live"] == 0


def test_session_read_ahead_of_the_node_is_busy(http: httpx.Client, index: str) -> None:
    pos = LogPosition.parse(put(http, index, "a", np.ones(DIM)))
    future = LogPosition(pos.topic, pos.partition, pos.offset + 1_000_000).token
    r = http.post(f"{base(index)}/search", json={
        "vector": [1.0] * DIM, "consistency": "session", "tokens": [future], "timeout_ms": 50})
    assert_error(r, 503, "VEC_ERR_BUSY")
    assert int(r.headers["retry-after"]) >= 1


# -- operations, metrics, OpenAPI ---------------------------------------------------------
def test_snapshot_and_health(http: httpx.Client, index: str) -> None:
    r = http.post("/v1/snapshot")
    assert r.status_code == 200 and isinstance(r.json(), dict)
    r = http.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_unknown_routes_and_methods_use_the_error_shape(http: httpx.Client) -> None:
    assert_error(http.get("/v2/nothing"), 404, "VEC_ERR_NOT_FOUND")
    assert_error(http.patch("/v1/indexes"), 405, "VEC_ERR_INVALID")


def test_metrics_count_requests_by_route_and_code(
    http: httpx.Client, index: str, metrics: ServiceMetrics
) -> None:
    put(http, index, "a", np.ones(DIM))
    http.put(f"{base(index)}/vectors/b", json={"vector": [1.0]})
    http.post(f"{base(index)}/search", json={"vector": [1.0] * DIM, "k": "x"})
    sample = metrics.registry.get_sample_value
    labels = {"transport": "http", "command": "upsert"}
    assert sample("streamvec_requests_total", {**labels, "code": "OK"}) == 1
    assert sample("streamvec_requests_total", {**labels, "code": "VEC_ERR_DIM"}) == 1
    assert sample("streamvec_requests_total",
                  {"transport": "http", "command": "search", "code": "VEC_ERR_INVALID"}) == 1
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert ('streamvec_requests_total{code="VEC_ERR_DIM",command="upsert",transport="http"} 1.0'
            in r.text)
    assert "streamvec_request_seconds_bucket" in r.text


def test_openapi_lists_every_endpoint(http: httpx.Client) -> None:
    doc = http.get("/openapi.json").json()
    paths = doc["paths"]
    expected = {
        "/v1/indexes": {"get", "post"},
        "/v1/indexes/{tenant}/{index}": {"get"},
        "/v1/indexes/{tenant}/{index}/vectors": {"post"},
        "/v1/indexes/{tenant}/{index}/vectors/{id}": {"get", "put", "delete"},
        "/v1/indexes/{tenant}/{index}/vectors/{id}:add": {"post"},
        "/v1/indexes/{tenant}/{index}/search": {"post"},
        "/v1/snapshot": {"post"},
        "/healthz": {"get"},
        "/metrics": {"get"},
    }
    for path, methods in expected.items():
        assert methods <= set(paths[path]), path
    search_op = paths["/v1/indexes/{tenant}/{index}/search"]["post"]
    assert "422" not in search_op["responses"]
    assert search_op["responses"]["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"}
    assert http.get("/docs").status_code == 200
