"""The data plane over HTTP/JSON, with an OpenAPI document at ``/openapi.json`` (``/docs``).

Routes (all JSON)::

    POST   /v1/indexes                                          create an index -> 201 position
    GET    /v1/indexes[?tenant=]                                list configs
    GET    /v1/indexes/{tenant}/{index}                         stats (the port's ``info``)
    GET    /v1/indexes/{tenant}/{index}/archive                 ids the capacity manager archived
    POST   /v1/indexes/{tenant}/{index}/archive:restore         {"ids": [...]} -> positions
    PUT    /v1/indexes/{tenant}/{index}/vectors/{id}            upsert [if_version] -> position
    POST   /v1/indexes/{tenant}/{index}/vectors/{id}:add        add (id must be new) -> 201
    POST   /v1/indexes/{tenant}/{index}/vectors                 add, id in the body -> 201
    POST   /v1/indexes/{tenant}/{index}/vectors:batch           upsert many, one log append
                                                                -> per item position or error
    DELETE /v1/indexes/{tenant}/{index}/vectors/{id}            delete -> position
    GET    /v1/indexes/{tenant}/{index}/vectors/{id}[?consistency=&token=...]
    POST   /v1/indexes/{tenant}/{index}/search                  {"hits": [...], "debug": {...}}
    POST   /v1/indexes/{tenant}/{index}/sources                 append a Source -> 201 position
    DELETE /v1/indexes/{tenant}/{index}/sources/{source_id}     tombstone a Source -> position
    POST   /v1/indexes/{tenant}/{index}/query                   search by text (hits carry
                                                                source_id, chunk, text)
    POST   /v1/snapshot                                         write a snapshot now
    POST   /v1/embeddings                                       OpenAI-format embeddings from
                                                                the node's offline model
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
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, JsonValue
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from streams import __version__
from streams.capacity import CapacityManager
from streams.index.exceptions import InvalidRequest, NotFound, VecError
from streams.index.model import (
    CacheSettings,
    Consistency,
    Dtype,
    FieldKind,
    FilterField,
    IndexConfig,
    IndexQuotas,
    Metric,
    Vector,
    VectorUpsert,
)
from streams.ingest.service import IngestService, QueryRequest
from streams.ingest.source import ChatMessage, Source, SourceType
from streams.service.api import DataPlane, SearchRequest, StoredVector
from streams.service.metrics import METRICS, OK, ServiceMetrics
from streams.text.neighbors import neighbors as graph_neighbors

__all__ = [
    "ChatMessageBody",
    "CreateIndexBody",
    "ErrorBody",
    "ErrorDetail",
    "FieldSpec",
    "HitReply",
    "NewVectorBody",
    "PositionReply",
    "QueryBody",
    "RecordBody",
    "SearchBody",
    "SearchReply",
    "SourceBody",
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


class QuotasBody(_Body):
    """Capacity budgets of an index (streams.capacity); null: no limit."""

    max_vectors: int | None = Field(None, ge=1)
    max_bytes: int | None = Field(None, ge=1)
    qps: float | None = Field(None, gt=0)


class CacheBody(_Body):
    """Search-cache settings of an index (IndexConfig.cache); null fields: node defaults."""

    layers: list[Literal["NONE", "L0", "L1", "L2", "L3"]] = ["L0", "L1", "L2", "L3"]
    memory_budget_bytes: int | None = Field(None, ge=0)
    l2_threshold: float | None = Field(None, ge=0.0, le=2.0)
    l2_text_threshold: float | None = Field(None, ge=0.0, le=2.0)  # VEC.QUERY's L2


class RestoreBody(_Body):
    ids: list[str] = Field(min_length=1, max_length=10_000)


class CreateIndexBody(_Body):
    tenant: str
    index: str
    dim: int | None = Field(None, description="required unless embedder is given")
    metric: Metric = Metric.COSINE
    dtype: Dtype = Dtype.FP32
    recipe: str = "HNSW32"
    fields: list[FieldSpec] = []
    embedder: str | None = Field(
        None, description="a text index: dim from this embedder (e.g. wordllama)")
    quotas: QuotasBody | None = None
    cache: CacheBody | None = None


class ChatMessageBody(_Body):
    role: str
    text: str
    ts_ms: int
    user_id: str | None = None


class SourceBody(_Body):
    """A Source (schemas/Source.avsc): exactly one of text, chunks, messages."""

    id: str
    text: str | None = None
    chunks: list[str] | None = None
    messages: list[ChatMessageBody] | None = None
    type: SourceType = SourceType.OTHER
    title: str | None = None
    uri: str | None = None
    channel_id: str | None = None
    user_id: str | None = None
    meta: dict[str, JsonValue] | None = None
    if_version: int | None = Field(None, ge=0, description="refuse unless the current "
                                   "version is this (0: must not exist)")


class QueryBody(_Body):
    text: str
    k: int = 10
    mode: Literal["dense", "keyword", "hybrid"] = "dense"
    alpha: float | None = Field(None, ge=0, le=1)
    filter: str | None = None
    consistency: Consistency = Consistency.EVENTUAL
    tokens: list[str] = Field([], description="positions to wait for, documents or vectors")
    bound_ms: int | None = Field(None, ge=0)
    timeout_ms: int = Field(1000, ge=1)
    session_id: str | None = Field(None, min_length=1, max_length=128,
                                   description="client session (query log, prefetch)")


class _VectorIn(_Body):
    vector: list[float] | None = Field(None, description="the vector, one number per dim")
    vector_b64: str | None = Field(None, description="base64 of fp32 little-endian bytes")


class RecordBody(_VectorIn):
    meta: JsonValue = Field(None, description="any JSON value; stored as its JSON text")
    tags: list[str] = []
    numeric: dict[str, float] = {}
    ttl_ms: int | None = Field(None, ge=1, description="a temporary vector: expires after this")


class UpsertBody(RecordBody):
    if_version: int | None = Field(
        None, ge=0, description="refuse unless the stored version is this (0: must not exist)"
    )


class NewVectorBody(RecordBody):
    id: str


class BatchItemBody(NewVectorBody):
    if_version: int | None = Field(
        None, ge=0, description="refuse unless the stored version is this (0: must not exist)"
    )


class BatchBody(_Body):
    items: list[BatchItemBody] = Field(..., max_length=10_000)


class SearchBody(_VectorIn):
    k: int = 10
    filter: str | None = None
    consistency: Consistency = Consistency.EVENTUAL
    tokens: list[str] = []
    bound_ms: int | None = Field(None, ge=0)
    timeout_ms: int = Field(1000, ge=1)
    ef: int | None = Field(None, ge=1, description="HNSW efSearch of this search (uncached)")
    session_id: str | None = Field(None, min_length=1, max_length=128,
                                   description="client session (query log, prefetch)")


class RollbackBody(_Body):
    version: int = Field(ge=1, description="the policy version to restore")


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class BatchItemReply(BaseModel):
    position: str | None = None
    error: ErrorDetail | None = None


class BatchReply(BaseModel):
    items: list[BatchItemReply]


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
                        dict(body.numeric), ttl_ms=body.ttl_ms)


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
            "fields": [{"name": f.name, "kind": f.kind.value} for f in c.fields],
            "quotas": None if c.quotas is None else {
                "max_vectors": c.quotas.max_vectors, "max_bytes": c.quotas.max_bytes,
                "qps": c.quotas.qps},
            "cache": None if c.cache is None else {  # the model's layers: L3 included
                **c.cache.as_avro(), "layers": list(c.cache.layers)}}


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
def create_http_app(dataplane: DataPlane, *, metrics: ServiceMetrics = METRICS,
                    ingest: IngestService | None = None) -> FastAPI:
    """A FastAPI app serving ``dataplane``; ``metrics`` is what ``/metrics`` exposes (share
    it with the RESP server so both are counted). ``ingest``: serve Sources and text
    queries (without it those routes answer VEC_ERR_INVALID)."""
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
        if body.embedder is not None:
            svc = _ingest()
            if body.dim is not None and body.dim != svc.embedder(body.embedder).dim:
                raise InvalidRequest(f"dim {body.dim} differs from embedder {body.embedder}",
                                     field="dim")
            return PositionReply(position=svc.create_text_index(
                body.tenant, body.index, body.embedder, metric=body.metric, dtype=body.dtype,
                recipe=body.recipe,
                fields=tuple(FilterField(f.name, f.kind) for f in body.fields)).token)
        if body.dim is None:
            raise InvalidRequest("dim is required (or embedder)", field="dim")
        config = IndexConfig(
            body.tenant, body.index, body.dim, body.metric, body.dtype, body.recipe,
            tuple(FilterField(f.name, f.kind) for f in body.fields),
            quotas=None if body.quotas is None else IndexQuotas(
                body.quotas.max_vectors, body.quotas.max_bytes, body.quotas.qps),
            cache=None if body.cache is None else CacheSettings(
                tuple(body.cache.layers), body.cache.memory_budget_bytes,
                body.cache.l2_threshold, body.cache.l2_text_threshold),
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

    # -- the capacity manager's archive (streams.capacity) ---------------------------------
    def _capacity() -> CapacityManager:
        manager = getattr(dataplane, "admission", None)
        if not isinstance(manager, CapacityManager):
            raise NotFound("this node has no capacity manager (no archive)")
        return manager

    @v1.get("/indexes/{tenant}/{index}/archive", name="archived")
    def archived(tenant: str, index: str) -> dict[str, list[str]]:
        """Ids the capacity manager archived from this index (restorable)."""
        return {"ids": _capacity().archived_ids(tenant, index)}

    @v1.post("/indexes/{tenant}/{index}/archive:restore", name="restore")
    def restore(tenant: str, index: str, body: RestoreBody) -> dict[str, dict[str, str]]:
        """Re-append archived vectors (accepted over the budget); nothing is written when
        an id is not archived (404) or exists again (409)."""
        done = _capacity().restore(tenant, index, body.ids)
        return {"positions": {id: pos.token for id, pos in done.items()}}

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

    @v1.post("/indexes/{tenant}/{index}/vectors:batch", name="upsert_batch")
    def upsert_batch(tenant: str, index: str, body: BatchBody) -> BatchReply:
        """Upsert many vectors as one log append; per item its position or its error (a
        refused item writes nothing; the others are written)."""
        replies: list[BatchItemReply | None] = []
        records: list[VectorUpsert] = []
        conds: list[int | None] = []
        for item in body.items:
            try:
                records.append(_record(tenant, index, item.id, item))
            except VecError as exc:
                replies.append(BatchItemReply(error=ErrorDetail(
                    code=exc.code, message=str(exc), field=getattr(exc, "field", None))))
                continue
            conds.append(item.if_version)
            replies.append(None)
        results = iter(dataplane.upsert_many(records, conds))
        out: list[BatchItemReply] = []
        for reply in replies:
            if reply is None:
                result = next(results)
                reply = (BatchItemReply(error=ErrorDetail(
                    code=result.code, message=str(result), field=getattr(result, "field", None)))
                    if isinstance(result, VecError) else BatchItemReply(position=result.token))
            out.append(reply)
        return BatchReply(items=out)

    @v1.delete("/indexes/{tenant}/{index}/vectors/{id:path}", name="delete")
    def delete(tenant: str, index: str, id: str) -> PositionReply:
        return PositionReply(position=dataplane.delete(tenant, index, id).token)

    # registered before ``get``: its ``{id:path}`` would take ".../neighbors" as an id
    @v1.get("/indexes/{tenant}/{index}/vectors/{id:path}/neighbors", name="neighbors")
    def neighbors(
        tenant: str, index: str, id: str, hops: int = 1, k: int = 10,
        consistency: Consistency = Consistency.EVENTUAL,
        token: Annotated[list[str], Query(description="positions a session read waits for")] = [],  # noqa: B006
    ) -> dict[str, Any]:
        """The k nearest of a stored vector, expanded over ``hops`` (streams.text.neighbors)."""
        found = graph_neighbors(dataplane, tenant, index, id, hops, k,
                                consistency=consistency, tokens=tuple(token))
        return {"neighbors": [{"id": n.id, "score": float(n.score), "hop": n.hop,
                               "via": n.via, "meta": _meta(n.meta)} for n in found]}

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
            tuple(body.tokens), body.bound_ms, body.timeout_ms, ef=body.ef,
            session_id=body.session_id,
        )
        response = dataplane.search(request)
        hits = [HitReply(id=h.id, score=float(h.score), meta=_meta(h.meta))
                for h in response.hits]
        return SearchReply(hits=hits, debug=jsonable_encoder(response.debug,
                                                             custom_encoder=_NUMPY))

    # -- the knowledge-base path ----------------------------------------------------------
    def _ingest() -> IngestService:
        if ingest is None:
            raise InvalidRequest("this node runs no embedder processor")
        return ingest

    @v1.post("/indexes/{tenant}/{index}/sources", status_code=201, name="put_source")
    def put_source(tenant: str, index: str, body: SourceBody) -> PositionReply:
        """Append a Source to ``documents``; its chunks become searchable once embedded
        (query with ``consistency=session`` and this position to wait for them)."""
        svc = _ingest()
        source = Source(
            tenant, index, body.id, body.text, body.type, body.channel_id, body.user_id,
            body.title, body.uri,
            None if body.meta is None else json.dumps(body.meta, separators=(",", ":")),
            None if body.chunks is None else tuple(body.chunks),
            None if body.messages is None else tuple(
                ChatMessage(m.role, m.text, m.ts_ms, m.user_id) for m in body.messages),
        ).validate()
        return PositionReply(position=svc.put_source(source, if_version=body.if_version).token)

    @v1.delete("/indexes/{tenant}/{index}/sources/{source_id:path}", name="delete_source")
    def delete_source(tenant: str, index: str, source_id: str) -> PositionReply:
        return PositionReply(position=_ingest().delete_source(tenant, index, source_id).token)

    @v1.post("/indexes/{tenant}/{index}/query", name="query")
    def query(tenant: str, index: str, body: QueryBody) -> SearchReply:
        """Search by text; each hit's meta carries ``source_id``, ``chunk`` and ``text``."""
        response = _ingest().query(QueryRequest(
            tenant, index, body.text, body.k, body.mode, body.filter, body.consistency,
            tuple(body.tokens), body.bound_ms, body.timeout_ms, body.alpha,
            session_id=body.session_id))
        hits = [HitReply(id=h.id, score=float(h.score), meta=_meta(h.meta))
                for h in response.hits]
        return SearchReply(hits=hits, debug=jsonable_encoder(response.debug,
                                                             custom_encoder=_NUMPY))

    # -- operations -----------------------------------------------------------------------
    @v1.post("/snapshot", name="snapshot")
    def snapshot() -> dict[str, Any]:
        out: dict[str, Any] = jsonable_encoder(dataplane.snapshot(), custom_encoder=_NUMPY)
        return out

    # -- the cache policy (streams.policy.learner) -------------------------------------------
    @v1.get("/indexes/{tenant}/{index}/policy", name="policy")
    def policy(tenant: str, index: str) -> dict[str, Any]:
        from streams.policy.learner import policy_status

        out: dict[str, Any] = jsonable_encoder(policy_status(dataplane, tenant, index))
        return out

    @v1.post("/indexes/{tenant}/{index}/policy:rollback", name="policy_rollback")
    def policy_rollback(tenant: str, index: str, body: RollbackBody) -> dict[str, Any]:
        from streams.policy.learner import rollback_policy

        return rollback_policy(dataplane, tenant, index, body.version)

    @app.get("/healthz", name="health")
    def health() -> Response:
        report = jsonable_encoder(dataplane.health(), custom_encoder=_NUMPY)
        if ingest is not None:  # the embedder processor: counters, and whether it stopped
            report["ingest"] = jsonable_encoder(ingest.stats())
            if report["ingest"].get("error") is not None:
                report["status"] = "failed"
        return JSONResponse(report, status_code=200 if report.get("status") == "ok" else 503)

    @app.get("/metrics", name="metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    app.include_router(v1)
    if ingest is not None:  # the node's offline model, for other tools (OpenAI's format)
        from streams.embed import DEFAULT_EMBEDDER
        from streams.embed.server import embeddings_router

        default = ingest.embedders.get(DEFAULT_EMBEDDER)
        app.include_router(embeddings_router(default, aliases={DEFAULT_EMBEDDER: default}))
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
