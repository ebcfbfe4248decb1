"""An OpenAI-compatible HTTP embedding provider: ``POST {base_url}/embeddings``.

Works with OpenAI itself and with every server that speaks its embeddings API (vLLM, Ollama,
LM Studio, text-embeddings-inference, LiteLLM, and a streamvec node's own
``/v1/embeddings``, see :mod:`streams.embed.server`).

Errors are translated here, at the adapter edge, into :class:`EmbedderError`:

========================================  =========================================
what happened                              ``retryable``
========================================  =========================================
429, 408, any 5xx                          yes (``retry_after_s`` from ``Retry-After``)
connect/read/write timeout, reset, DNS     yes
any other 4xx (bad key, bad input, model)  no
a 2xx whose body is not the documented     no (a server that answers the wrong shape
shape, wrong count, wrong or changing dim  answers it again)
========================================  =========================================

This class does not retry: :class:`streams.embed.resilient.EmbedQueue` owns retries, so that
one policy (backoff, jitter, dead letters) covers every provider.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt

from streams.embed.port import Embedder, EmbedderError, check_texts, normalise

__all__ = ["DEFAULT_BASE_URL", "OpenAIEmbedder", "parse_openai_name"]

DEFAULT_BASE_URL = "https://api.openai.com/v1"
_NAME = re.compile(r"^openai:(?P<model>[^@\s]+?)(?:@(?P<url>https?://\S+))?$")
_RETRYABLE_STATUS = frozenset({408, 425, 429})


def parse_openai_name(name: str) -> tuple[str, str]:
    """``openai:<model>[@<base_url>]`` -> ``(model, base_url)``; the base URL defaults to
    OpenAI's. Raises :class:`EmbedderError` for anything else."""
    m = _NAME.match(name)
    if m is None:
        raise EmbedderError(
            f"bad embedder name {name!r}: expected openai:<model> or openai:<model>@<http(s) url>"
        )
    return m["model"], (m["url"] or DEFAULT_BASE_URL).rstrip("/")


def _configured_key() -> str | None:
    """``STREAMVEC_EMBED_API_KEY`` (or ``embed_api_key`` in ``.env``), else ``OPENAI_API_KEY``."""
    from streams.config import Settings

    secret = Settings().embed_api_key
    return secret.get_secret_value() if secret else os.environ.get("OPENAI_API_KEY") or None


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: rare for APIs; the backoff policy decides instead
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


class OpenAIEmbedder(Embedder):
    """Embeddings from an OpenAI-compatible server.

    ``api_key``: sent as ``Authorization: Bearer``; when ``None`` it is the settings'
    ``embed_api_key`` (``STREAMVEC_EMBED_API_KEY``), then ``OPENAI_API_KEY``; no header when
    neither is set or the key is ``""`` (local servers). ``dim``: the expected width; when
    ``None`` one probe request at construction learns it (so a wrong URL or key fails at
    start, not mid-stream).
    ``max_batch``: inputs per request (larger calls are split). ``name`` is
    ``openai:<model>``: where the model is served does not change its vectors.
    """

    def __init__(
        self,
        model: str,
        base_url: str = DEFAULT_BASE_URL,
        *,
        api_key: str | None = None,
        dim: int | None = None,
        max_tokens: int = 8191,
        max_batch: int = 256,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        max_connections: int = 8,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not model:
            raise EmbedderError("model must not be empty")
        if max_batch < 1:
            raise EmbedderError(f"max_batch must be >= 1, got {max_batch}")
        key = api_key if api_key is not None else _configured_key()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=max_connections),
            transport=transport,
        )
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.name = f"openai:{model}"
        self.max_tokens = max_tokens
        self._max_batch = max_batch
        self.dim = 0
        if dim is None:
            try:
                dim = int(self._request(["dimension probe"]).shape[1])
            except BaseException:
                self._client.close()
                raise
        if dim < 1:
            raise EmbedderError(f"dim must be >= 1, got {dim}")
        self.dim = dim

    @classmethod
    def from_name(cls, name: str, **kwargs: Any) -> OpenAIEmbedder:
        """From ``openai:<model>[@<base_url>]`` (see :func:`parse_openai_name`)."""
        model, url = parse_openai_name(name)
        return cls(model, url, **kwargs)

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        texts = check_texts(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        parts = [
            self._request(list(texts[i : i + self._max_batch]))
            for i in range(0, len(texts), self._max_batch)
        ]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def close(self) -> None:
        self._client.close()

    def _request(self, texts: list[str]) -> npt.NDArray[np.float32]:
        where = f"{self.base_url}/embeddings"
        try:
            response = self._client.post(
                "/embeddings",
                json={"model": self.model, "input": texts, "encoding_format": "float"},
            )
        except httpx.TransportError as exc:  # timeouts, refused, reset, DNS, protocol errors
            raise EmbedderError(f"{where}: {type(exc).__name__}: {exc}", retryable=True) from exc
        status = response.status_code
        if status >= 400:
            detail = response.text[:300].replace("\n", " ")
            raise EmbedderError(
                f"{where}: HTTP {status}: {detail}",
                retryable=status >= 500 or status in _RETRYABLE_STATUS,
                retry_after_s=_retry_after(response),
            )
        return self._parse(response, len(texts), where)

    def _parse(self, response: httpx.Response, n: int, where: str) -> npt.NDArray[np.float32]:
        try:
            data = response.json()["data"]
            rows = sorted(data, key=lambda d: int(d["index"]))
            if [int(d["index"]) for d in rows] != list(range(n)):
                raise ValueError(f"indexes {[d['index'] for d in rows][:10]} for {n} inputs")
            matrix = np.asarray([d["embedding"] for d in rows], dtype=np.float64)
        except (ValueError, KeyError, TypeError) as exc:  # bad JSON, missing keys, ragged rows
            raise EmbedderError(f"{where}: reply is not an embeddings list: {exc}") from exc
        if matrix.ndim != 2 or matrix.shape[0] != n or matrix.shape[1] < 1:
            raise EmbedderError(f"{where}: reply has shape {matrix.shape} for {n} inputs")
        if self.dim and matrix.shape[1] != self.dim:
            raise EmbedderError(f"{where}: reply has dim {matrix.shape[1]}, expected {self.dim}")
        if not np.isfinite(matrix).all():
            raise EmbedderError(f"{where}: reply holds NaN or infinite values")
        return normalise(matrix)
