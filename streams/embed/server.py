"""``POST /v1/embeddings`` in OpenAI's request and reply format, served from any
:class:`Embedder`, so that other tools (and other streamvec nodes, through
:class:`streams.embed.openai.OpenAIEmbedder`) can use this node's offline model.

Request ``{"model": str, "input": str | [str, ...], "encoding_format": "float" | "base64",
"dimensions": int?, "user": str?}``; reply ``{"object": "list", "data": [{"object":
"embedding", "index": i, "embedding": [...] or base64 of float32 LE}], "model": str, "usage":
{"prompt_tokens": n, "total_tokens": n}}``. ``model`` must name a served embedder (its
``name``, or an alias given to :func:`embeddings_router`). Token ids as input, empty strings,
an input longer than the model's ``max_tokens``, more than ``max_inputs`` inputs, and a
``dimensions`` other than the model's are refused with ``400 VEC_ERR_INVALID``; an unknown
model is ``404 VEC_ERR_NOT_FOUND``; a provider failure that a retry may fix is
``503 VEC_ERR_BUSY``. The errors are raised as :class:`VecError`, so an
app that mounts the router answers them in its own error shape; :func:`create_embeddings_app`
is a standalone app with the data plane's shape ``{"error": {"code", "message", "field"}}``.
The endpoint is a ``def`` endpoint: embedding runs in Starlette's thread pool, off the loop.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from streams.embed.port import Embedder, EmbedderError
from streams.index.exceptions import Busy, InvalidRequest, NotFound, VecError

__all__ = [
    "EmbeddingItem",
    "EmbeddingsReply",
    "EmbeddingsRequest",
    "Usage",
    "create_embeddings_app",
    "embeddings_router",
]

MAX_INPUTS = 2048  # OpenAI's own limit per request


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsReply(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: Usage


def _texts(raw: str | list[str] | list[int] | list[list[int]], max_inputs: int) -> list[str]:
    texts = [raw] if isinstance(raw, str) else raw
    if not texts:
        raise InvalidRequest("input must not be empty", field="input")
    if not all(isinstance(t, str) for t in texts):
        raise InvalidRequest("input must be text: token ids are not accepted", field="input")
    if len(texts) > max_inputs:
        raise InvalidRequest(f"at most {max_inputs} inputs per request", field="input")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t:  # isinstance again narrows the type for mypy
            raise InvalidRequest(f"input[{i}] is an empty string", field="input")
    return [t for t in texts if isinstance(t, str)]


def embeddings_router(
    embedder: Embedder,
    *,
    aliases: Mapping[str, Embedder] | None = None,
    max_inputs: int = MAX_INPUTS,
) -> APIRouter:
    """A router with ``POST /v1/embeddings`` serving ``embedder`` under its ``name`` and any
    ``aliases`` (extra names, e.g. ``{"wordllama": e}``, or more models). The caller owns the
    embedders and closes them."""
    served: dict[str, Embedder] = {embedder.name: embedder, **(aliases or {})}
    router = APIRouter(tags=["embeddings"])

    @router.post("/v1/embeddings", response_model=EmbeddingsReply)
    def create_embeddings(body: EmbeddingsRequest) -> EmbeddingsReply:
        model = served.get(body.model)
        if model is None:
            raise NotFound(f"model {body.model!r} is not served here; serving {sorted(served)}")
        texts = _texts(body.input, max_inputs)
        if body.dimensions is not None and body.dimensions != model.dim:
            raise InvalidRequest(
                f"model {body.model!r} has {model.dim} dimensions, asked for {body.dimensions}",
                field="dimensions",
            )
        counts = [len(model.token_spans(t)) for t in texts]
        for i, n in enumerate(counts):
            if n > model.max_tokens:  # as OpenAI does; also bounds the memory one request takes
                raise InvalidRequest(
                    f"input[{i}] has {n} tokens, model {body.model!r} reads at most "
                    f"{model.max_tokens}",
                    field="input",
                )
        try:
            vectors = model.embed(texts)
        except EmbedderError as exc:
            if exc.retryable:
                raise Busy(str(exc), retry_after_s=exc.retry_after_s) from exc
            raise InvalidRequest(str(exc), field="input") from exc
        tokens = sum(counts)
        data = [
            EmbeddingItem(
                index=i,
                embedding=(
                    base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
                    if body.encoding_format == "base64"
                    else row.tolist()
                ),
            )
            for i, row in enumerate(vectors)
        ]
        return EmbeddingsReply(
            data=data, model=body.model, usage=Usage(prompt_tokens=tokens, total_tokens=tokens)
        )

    return router


def _error(status: int, code: str, message: str, field: str | None) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message, "field": field}}, status_code=status
    )


def create_embeddings_app(
    embedder: Embedder, *, aliases: Mapping[str, Embedder] | None = None
) -> FastAPI:
    """A standalone app serving :func:`embeddings_router` with the data plane's error shape
    (``400`` rather than FastAPI's ``422`` for a body that does not validate)."""
    app = FastAPI(title="streamvec embeddings")

    @app.exception_handler(VecError)
    async def vec_error(request: Request, exc: VecError) -> JSONResponse:
        response = _error(exc.http_status, exc.code, str(exc), getattr(exc, "field", None))
        retry = getattr(exc, "retry_after_s", None)
        if retry is not None:
            response.headers["Retry-After"] = str(max(1, round(retry)))
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return _error(400, "VEC_ERR_INVALID", str(first.get("msg")), field)

    app.include_router(embeddings_router(embedder, aliases=aliases))
    return app
