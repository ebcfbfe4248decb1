"""The embedder port: text in, L2-normalised float32 vectors out.

Every provider (the offline default, optional local models, OpenAI-compatible HTTP services)
implements :class:`Embedder`. Chunking uses the provider's own tokenizer through
:meth:`Embedder.token_spans`, so a "token window" means the same thing to the chunker and to the
model that embeds the window.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from streams.exceptions import StreamvecError

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


class EmbedderError(StreamvecError):
    """An embedder failed (bad input, provider down, wrong reply). ``retryable`` says whether a
    retry with backoff can help; ``retry_after_s`` is the provider's own hint (HTTP
    ``Retry-After``), when it gave one."""

    def __init__(
        self, message: str, *, retryable: bool = False, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after_s = retry_after_s


class Embedder(ABC):
    """A text embedding provider.

    ``name`` identifies the model and its version (it is recorded on every index created with it,
    so a query is never embedded by a different model than the index was). ``dim`` is the output
    width. ``max_tokens`` is the longest window the model reads; longer text is truncated by the
    model, so chunkers keep windows at or under it.
    """

    name: str
    dim: int
    max_tokens: int

    @abstractmethod
    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Embed ``texts``: an array of shape ``(len(texts), dim)``, float32, rows of unit norm
        (a zero row for text with no known token). Raises :class:`EmbedderError`."""

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """Character spans ``(start, end)`` of the tokens of ``text``, in order. The default splits
        words and punctuation; providers with a tokenizer override it."""
        return [(m.start(), m.end()) for m in _WORD.finditer(text)]

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (HTTP clients, threads)."""


def check_texts(texts: Sequence[str]) -> list[str]:
    """``texts`` as a list, every item a ``str`` (:class:`EmbedderError` otherwise): the
    input check every provider's :meth:`Embedder.embed` starts with."""
    out = list(texts)
    for t in out:
        if not isinstance(t, str):
            raise EmbedderError(f"text must be str, got {type(t).__name__}")
    return out


def normalise(rows: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    """Rows scaled to unit L2 norm, float32; all-zero rows stay zero."""
    out = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out
