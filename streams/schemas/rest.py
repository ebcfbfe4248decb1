"""The Confluent Schema Registry REST API, the subset Confluent's clients and Kafka Connect's
``AvroConverter`` call, served over any :class:`SchemaRegistry`.

Routes: ``POST /subjects/{s}/versions`` (register), ``POST /subjects/{s}`` (lookup),
``DELETE /subjects/{s}`` (soft delete), ``GET /subjects``, ``GET /subjects/{s}/versions``,
``GET /subjects/{s}/versions/{v}[/schema]``, ``GET /schemas/ids/{id}[/schema]``,
``GET /schemas/types``, ``GET|PUT /config[/{s}]``, ``GET /mode[/{s}]``,
``POST /compatibility/subjects/{s}/versions[/{v}]``.

Every reply, errors included, has content type ``application/vnd.schemaregistry.v1+json``;
errors are ``{"error_code": n, "message": "..."}`` with Confluent's codes and statuses.
Request bodies are JSON whatever their declared content type (Confluent's clients send
``application/vnd.schemaregistry.v1+json``). Registry calls may block on the log, so they
run in the threadpool, never on the event loop.

Deviation: ``GET /config/{s}`` answers the level in force for the subject (its own, else the
global one) where Confluent answers 40408 unless ``defaultToGlobal=true``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from streams.schemas.compatibility import CompatibilityLevel
from streams.schemas.exceptions import (
    InvalidCompatibilityLevel,
    InvalidSchema,
    InvalidVersion,
    SchemaError,
)
from streams.schemas.registry import AVRO, RegisteredSchema, SchemaRegistry, Version

__all__ = ["CONTENT_TYPE", "SchemaRegistryResponse", "create_registry_app"]

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"

T = TypeVar("T")


class SchemaRegistryResponse(JSONResponse):
    media_type = CONTENT_TYPE


def _error(status: int, code: int, message: str) -> SchemaRegistryResponse:
    return SchemaRegistryResponse({"error_code": code, "message": message}, status_code=status)


def _flag(request: Request, name: str) -> bool:
    return request.query_params.get(name, "false").strip().lower() in ("true", "1", "yes")


def _version(text: str) -> Version:
    if text == "latest":
        return "latest"
    try:
        return int(text)
    except ValueError:
        raise InvalidVersion(
            f"The specified version '{text}' is not a valid version id. Allowed values are "
            'between [1, 2^31-1] and the string "latest"'
        ) from None


def _schema_id(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InvalidSchema(f"Invalid schema id '{text}'") from None


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidSchema(f"Invalid JSON in request body: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidSchema("The request body must be a JSON object")
    return body


async def _schema_body(request: Request) -> tuple[str, str]:
    """``(schema, schemaType)`` of a register/lookup/compatibility body."""
    body = await _body(request)
    schema = body.get("schema")
    if not isinstance(schema, str):
        raise InvalidSchema("Invalid schema: the body needs a 'schema' string")
    if body.get("references"):
        raise InvalidSchema("Invalid schema: schema references are not supported")
    schema_type = body.get("schemaType") or AVRO
    if not isinstance(schema_type, str):
        raise InvalidSchema("Invalid schema: 'schemaType' must be a string")
    return schema, schema_type


def _level(body: dict[str, Any]) -> CompatibilityLevel:
    value = body.get("compatibility", body.get("compatibilityLevel"))
    try:
        return CompatibilityLevel(str(value).upper())
    except ValueError:
        raise InvalidCompatibilityLevel(f"Invalid compatibility level: {value}") from None


def _version_reply(rs: RegisteredSchema) -> dict[str, Any]:
    out: dict[str, Any] = {
        "subject": rs.subject, "version": rs.version, "id": rs.id, "schema": rs.schema,
    }
    if rs.schema_type != AVRO:
        out["schemaType"] = rs.schema_type
    return out


def create_registry_app(registry: SchemaRegistry) -> FastAPI:
    """A FastAPI app serving ``registry`` over the Confluent REST API subset above."""
    app = FastAPI(
        title="streamvec schema registry",
        default_response_class=SchemaRegistryResponse,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )

    async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await run_in_threadpool(fn, *args, **kwargs)

    @app.exception_handler(SchemaError)
    async def schema_error(_: Request, exc: SchemaError) -> Response:
        return _error(exc.http_status, exc.error_code, str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> Response:
        return _error(exc.status_code, exc.status_code, f"HTTP {exc.status_code} {exc.detail}")

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> Response:
        return _error(500, 50001, f"Error in the backend data store: {type(exc).__name__}")

    @app.get("/")
    async def root() -> dict[str, Any]:
        return {}

    # -- schemas by id --------------------------------------------------------------------
    @app.get("/schemas/types")
    async def schema_types() -> list[str]:
        return [AVRO]

    @app.get("/schemas/ids/{schema_id}")
    async def schema_by_id(schema_id: str) -> dict[str, Any]:
        return {"schema": await call(registry.get_by_id, _schema_id(schema_id))}

    @app.get("/schemas/ids/{schema_id}/schema")
    async def raw_schema_by_id(schema_id: str) -> Response:
        text = await call(registry.get_by_id, _schema_id(schema_id))
        return Response(text, media_type=CONTENT_TYPE)

    # -- subjects -------------------------------------------------------------------------
    @app.get("/subjects")
    async def list_subjects(request: Request) -> list[str]:
        return await call(registry.subjects, deleted=_flag(request, "deleted"))

    @app.post("/subjects/{subject}/versions")
    async def register(subject: str, request: Request) -> dict[str, Any]:
        schema, schema_type = await _schema_body(request)
        return {"id": await call(registry.register, subject, schema, schema_type)}

    @app.post("/subjects/{subject}")
    async def lookup(subject: str, request: Request) -> dict[str, Any]:
        schema, _ = await _schema_body(request)
        rs = await call(registry.lookup, subject, schema, deleted=_flag(request, "deleted"))
        return _version_reply(rs)

    @app.delete("/subjects/{subject}")
    async def delete_subject(subject: str, request: Request) -> list[int]:
        permanent = _flag(request, "permanent")
        return await call(registry.delete_subject, subject, permanent=permanent)

    @app.get("/subjects/{subject}/versions")
    async def list_versions(subject: str) -> list[int]:
        return await call(registry.versions, subject)

    @app.get("/subjects/{subject}/versions/{version}")
    async def get_version(subject: str, version: str) -> dict[str, Any]:
        return _version_reply(await call(registry.get_version, subject, _version(version)))

    @app.get("/subjects/{subject}/versions/{version}/schema")
    async def get_version_schema(subject: str, version: str) -> Response:
        rs = await call(registry.get_version, subject, _version(version))
        return Response(rs.schema, media_type=CONTENT_TYPE)

    # -- config and mode ------------------------------------------------------------------
    @app.get("/config")
    async def get_global_config() -> dict[str, Any]:
        return {"compatibilityLevel": (await call(registry.get_compatibility, None)).value}

    @app.put("/config")
    async def put_global_config(request: Request) -> dict[str, Any]:
        level = _level(await _body(request))
        await call(registry.set_compatibility, level, None)
        return {"compatibility": level.value}

    @app.get("/config/{subject}")
    async def get_config(subject: str) -> dict[str, Any]:
        return {"compatibilityLevel": (await call(registry.get_compatibility, subject)).value}

    @app.put("/config/{subject}")
    async def put_config(subject: str, request: Request) -> dict[str, Any]:
        level = _level(await _body(request))
        await call(registry.set_compatibility, level, subject)
        return {"compatibility": level.value}

    @app.get("/mode")
    async def get_mode() -> dict[str, Any]:
        return {"mode": "READWRITE"}

    @app.get("/mode/{subject}")
    async def get_subject_mode(subject: str) -> dict[str, Any]:
        return {"mode": "READWRITE"}

    # -- compatibility --------------------------------------------------------------------
    def _compat_reply(ok: bool, messages: list[str], verbose: bool) -> dict[str, Any]:
        return {"is_compatible": ok, "messages": messages} if verbose else {"is_compatible": ok}

    @app.post("/compatibility/subjects/{subject}/versions/{version}")
    async def test_version(subject: str, version: str, request: Request) -> dict[str, Any]:
        schema, _ = await _schema_body(request)
        ok, messages = await call(registry.test_compatibility, subject, schema, _version(version))
        return _compat_reply(ok, messages, _flag(request, "verbose"))

    @app.post("/compatibility/subjects/{subject}/versions")
    async def test_all(subject: str, request: Request) -> dict[str, Any]:
        schema, _ = await _schema_body(request)
        ok, messages = await call(_test_all, registry, subject, schema)
        return _compat_reply(ok, messages, _flag(request, "verbose"))

    return app


def _test_all(registry: SchemaRegistry, subject: str, schema: str) -> tuple[bool, list[str]]:
    """Against every live version for transitive levels, else against the latest."""
    if subject not in registry.subjects():
        return True, []
    level = registry.get_compatibility(subject)
    against: list[Version] = (
        list(registry.versions(subject)) if level.name.endswith("TRANSITIVE") else ["latest"]
    )
    messages: list[str] = []
    for v in against:
        messages += registry.test_compatibility(subject, schema, v)[1]
    return not messages, messages
