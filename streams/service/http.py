"""The data plane over HTTP/JSON, with an OpenAPI document at ``/openapi.json`` (``/docs``).

Routes (all JSON)::

    POST   /v1/indexes                                          create an index -> 201 position
    GET    /v1/indexes[?tenant=]                                list configs
    GET    /v1/indexes/{tenant}/{index}                         stats (the port's ``info``)
    PUT    /v1/indexes/{tenant}/{index}/vectors/{id}            upsert [if_version] -> position
    POST   /v1/indexes/{tenant}/{index}/vectors/{id}:add        add (id must be new) -> 201
    POST   /v1/indexes/{tenant}/{index}/vectors                 add, id in the body -> 201
    DELETE /v1/indexes/{tenant}/{index}/vectors/{id}            delete -> position
    GET    /v1/indexes/{tenant}/{index}/vectors/{id}[?consistency=&token=...]
    POST   /v1/indexes/{tenant}/{index}/search                  {"hits": [...], "debug": {...}}
    POST   /v1/snapshot                                         write a snapshot now
    GET    /healthz                                             200, or 503 unless status is ok
    GET    /metrics                                             Prometheus exposition

Ids may contain ``/`` (the ``{id}`` segment takes the rest of the path). A vector is either
``vector`` (a list of numbers) or ``vector_b64`` (base64 of fp32 little-endian bytes, as on
the RESP port); ``meta`` is any JSON value, stored as its JSON text and returned parsed.

Every error is ``{"error": {"code": "VEC_ERR_*", "message": ..., "field": ...}}`` with the
error's ``http_status`` (and ``Retry-After`` when the error carries ``retry_after_s``); a body
or parameter that does not validate is ``400 VEC_ERR_INVALID``, never FastAPI's 422 shape.
Endpoints that call the data plane are ``def`` endpoints: Starlette runs them in its thread
pool, so consistency waits and durable appends never block the event loop.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, JsonValue
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from streams import __version__
from streams.index.exceptions import InvalidRequest, VecError
from streams.index.model import (
    Consistency,
    Dtype,
    FieldKind,
    FilterField,
    IndexConfig,
    Metric,
    Vector,
    VectorUpsert,
)
from streams.service.api import DataPlane, SearchRequest, StoredVector
from streams.service.metrics import METRICS, OK, ServiceMetrics

__all__ = [
    "CreateIndexBody",
    "ErrorBody",
    "ErrorDetail",
    "FieldSpec",
    "HitReply",
    "NewVectorBody",
    "PositionReply",
    "RecordBody",
    "SearchBody",
    "SearchReply",
    "UpsertBody",
    "VectorReply",
    "create_http_app",
]

log = logging.getLogger(__name__)

_NUMPY = {np.generic: lambda x: x.item(), np.ndarray: lambda a: a.tolist()}


# -- bodies -------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FieldSpec(_Body):
    name: str
    kind: FieldKind


class CreateIndexBody(_Body):
    tenant: str
    index: str
    dim: int
    metric: Metric = Metric.COSINE
    dtype: Dtype = Dtype.FP32
    recipe: str = "HNSW32"
    fields: list[FieldSpec] = []


class _VectorIn(_Body):
    vector: list[float] | None = Field(None, description="the vector, one number per dim")
    vector_b64: str | None = Field(None, description="base64 of fp32 little-endian bytes")


class RecordBody(_VectorIn):
    meta: JsonValue = Field(None, description="any JSON value; stored as its JSON text")
    tags: list[str] = []
    numeric: dict[str, float] = {}


class UpsertBody(RecordBody):
    if_version: int | None = Field(
        None, ge=0, description="refuse unless the stored version is this (0: must not exist)"
    )


class NewVectorBody(RecordBody):
    id: str


class SearchBody(_VectorIn):
    k: int = 10
    filter: str | None = None
    consistency: Consistency = Consistency.EVENTUAL
    tokens: list[str] = []
    bound_ms: int | None = Field(None, ge=0)
    timeout_ms: int = Field(1000, ge=1)


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class PositionReply(BaseModel):
    position: str


class HitReply(BaseModel):
    id: str
    score: float
    meta: JsonValue = None


class SearchReply(BaseModel):
    hits: list[HitReply]
    debug: dict[str, Any]


class VectorReply(BaseModel):
    id: str
    vector: list[float]
    meta: JsonValue = None
    tags: list[str]
    numeric: dict[str, float]
    version: int
    position: str


# -- conversions --------------------------------------------------------------------------
def _vector(body: _VectorIn) -> Vector:
    if (body.vector is None) == (body.vector_b64 is None):
        raise InvalidRequest("give exactly one of vector, vector_b64", field="vector")
    if body.vector is not None:
        with np.errstate(over="ignore"):  # out of fp32 range becomes inf: refused by the port
            return np.asarray(body.vector, dtype=np.float32)
    try:
        raw = base64.b64decode(body.vector_b64 or "", validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("vector_b64 is not base64", field="vector_b64") from None
    if len(raw) % 4:
        raise InvalidRequest("vector_b64 must hold fp32 values (4 bytes each)", field="vector_b64")
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


def _record(tenant: str, index: str, id: str, body: RecordBody) -> VectorUpsert:
    meta = None
    if body.meta is not None:
        try:
            meta = json.dumps(body.meta, allow_nan=False, separators=(",", ":"))
        except ValueError:
            raise InvalidRequest("meta must be JSON (no NaN or infinity)", field="meta") from None
    return VectorUpsert(tenant, index, id, _vector(body), meta, tuple(body.tags),
                        dict(body.numeric))


def _meta(text: str | None) -> JsonValue:
    if text is None:
        return None
    try:
        value: JsonValue = json.loads(text)
    except ValueError:  # written by a producer that bypassed validation: hand it back as is
        return text
    return value


def _config_json(c: IndexConfig) -> dict[str, Any]:
    return {"tenant": c.tenant, "index": c.index, "dim": c.dim, "metric": c.metric.value,
            "dtype": c.dtype.value, "recipe": c.recipe, "version": c.version,
            "created_ms": c.created_ms,
            "fields": [{"name": f.name, "kind": f.kind.value} for f in c.fields]}


def _stored_json(v: StoredVector) -> VectorReply:
    return VectorReply(id=v.id, vector=np.asarray(v.vector, np.float32).tolist(),
                       meta=_meta(v.meta), tags=list(v.tags),
                       numeric={k: float(x) for k, x in v.numeric.items()},
                       version=int(v.version), position=v.position)


def _error(status: int, code: str, message: str, field: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "field": field}}
    return JSONResponse(body, status_code=status, headers=headers)


class _RequestMetrics:
    """Counts every request by route name and result code (pure ASGI, so it also sees the
    errors that the exception handlers answered and the ones nobody handled). A request is
    counted before the last byte of its response is sent, so a client that has its answer
    sees it counted."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500
        counted = False

        def count() -> None:
            nonlocal counted
            counted = True
            route = getattr(scope.get("route"), "name", None) or "unmatched"
            code = (scope.get("state") or {}).get("vec_code")
            if code is None:
                code = OK if status < 400 else "VEC_ERR_INTERNAL" if status >= 500 else "ERR"
            self.metrics.observe("http", route, code, time.perf_counter() - t0)

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                count()
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            if not counted:
                count()


def _set_code(request: Request, code: str) -> None:
    request.state.vec_code = code


# -- the app ------------------------------------------------------------------------------
def create_http_app(dataplane: DataPlane, *, metrics: ServiceMetrics = METRICS) -> FastAPI:
    """A FastAPI app serving ``dataplane``; ``metrics`` is what ``/metrics`` exposes (share
    it with the RESP server so both are counted)."""
    app = FastAPI(title="streamvec data plane", version=__version__,
                  description="Vector search whose source of truth is a log.")
    errors: dict[int | str, dict[str, Any]] = {
        s: {"model": ErrorBody} for s in (400, 404, 409, 429, 503)
    }
    v1 = APIRouter(prefix="/v1", responses=errors)

    @app.exception_handler(VecError)
    async def vec_error(request: Request, exc: VecError) -> Response:
        _set_code(request, exc.code)
        retry = getattr(exc, "retry_after_s", None)
        headers = {"Retry-After": str(max(1, round(retry)))} if retry is not None else None
        return _error(exc.http_status, exc.code, str(exc), getattr(exc, "field", None), headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        _set_code(request, "VEC_ERR_INVALID")
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        field = ".".join(loc) or None
        message = f"{field}: {first.get('msg')}" if field else str(first.get("msg"))
        return _error(400, "VEC_ERR_INVALID", message, field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = "VEC_ERR_NOT_FOUND" if exc.status_code == 404 else "VEC_ERR_INVALID"
        _set_code(request, code)
        return _error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        log.error("HTTP %s %s failed", request.method, request.url.path, exc_info=exc)
        _set_code(request, "VEC_ERR_INTERNAL")
        return _error(500, "VEC_ERR_INTERNAL", f"internal error: {type(exc).__name__}")

    # -- indexes --------------------------------------------------------------------------
    @v1.post("/indexes", status_code=201, name="create_index")
    def create_index(body: CreateIndexBody) -> PositionReply:
        config = IndexConfig(
            body.tenant, body.index, body.dim, body.metric, body.dtype, body.recipe,
            tuple(FilterField(f.name, f.kind) for f in body.fields),
        )
        return PositionReply(position=dataplane.create_index(config).token)

    @v1.get("/indexes", name="list_indexes")
    def list_indexes(tenant: str | None = None) -> dict[str, list[dict[str, Any]]]:
        return {"indexes": [_config_json(c) for c in dataplane.list_indexes(tenant)]}

    @v1.get("/indexes/{tenant}/{index}", name="info")
    def info(tenant: str, index: str) -> dict[str, Any]:
        out: dict[str, Any] = jsonable_encoder(dataplane.info(tenant, index),
                                               custom_encoder=_NUMPY)
        return out

    # -- vectors --------------------------------------------------------------------------
    @v1.put("/indexes/{tenant}/{index}/vectors/{id:path}", name="upsert")
    def upsert(tenant: str, index: str, id: str, body: UpsertBody) -> PositionReply:
        record = _record(tenant, index, id, body)
        return PositionReply(position=dataplane.upsert(record, if_version=body.if_version).token)

    @v1.post("/indexes/{tenant}/{index}/vectors/{id:path}:add", status_code=201, name="add")
    def add(tenant: str, index: str, id: str, body: RecordBody) -> PositionReply:
        return PositionReply(position=dataplane.add(_record(tenant, index, id, body)).token)

    @v1.post("/indexes/{tenant}/{index}/vectors", status_code=201, name="add")
    def add_with_id(tenant: str, index: str, body: NewVectorBody) -> PositionReply:
        record = _record(tenant, index, body.id, body)
        return PositionReply(position=dataplane.add(record).token)

    @v1.delete("/indexes/{tenant}/{index}/vectors/{id:path}", name="delete")
    def delete(tenant: str, index: str, id: str) -> PositionReply:
        return PositionReply(position=dataplane.delete(tenant, index, id).token)

    @v1.get("/indexes/{tenant}/{index}/vectors/{id:path}", name="get")
    def get(
        tenant: str, index: str, id: str,
        consistency: Consistency = Consistency.EVENTUAL,
        token: Annotated[list[str], Query(description="positions a session read waits for")] = [],  # noqa: B006
    ) -> VectorReply:
        found = dataplane.get(tenant, index, id, consistency=consistency, tokens=tuple(token))
        return _stored_json(found)

    @v1.post("/indexes/{tenant}/{index}/search", name="search")
    def search(tenant: str, index: str, body: SearchBody) -> SearchReply:
        request = SearchRequest(
            tenant, index, _vector(body), body.k, body.filter, body.consistency,
            tuple(body.tokens), body.bound_ms, body.timeout_ms,
        )
        response = dataplane.search(request)
        hits = [HitReply(id=h.id, score=float(h.score), meta=_meta(h.meta))
                for h in response.hits]
        return SearchReply(hits=hits, debug=jsonable_encoder(response.debug,
                                                             custom_encoder=_NUMPY))

    # -- operations -----------------------------------------------------------------------
    @v1.post("/snapshot", name="snapshot")
    def snapshot() -> dict[str, Any]:
        out: dict[str, Any] = jsonable_encoder(dataplane.snapshot(), custom_encoder=_NUMPY)
        return out

    @app.get("/healthz", name="health")
    def health() -> Response:
        report = jsonable_encoder(dataplane.health(), custom_encoder=_NUMPY)
        return JSONResponse(report, status_code=200 if report.get("status") == "ok" else 503)

    @app.get("/metrics", name="metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    app.include_router(v1)
    app.add_middleware(_RequestMetrics, metrics=metrics)
    _without_422(app)
    return app


def _without_422(app: FastAPI) -> None:
    """Drop FastAPI's generated 422 responses from the OpenAPI document: validation errors
    are answered 400 with :class:`ErrorBody` (documented on every ``/v1`` route)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
