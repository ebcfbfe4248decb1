"""The offline default embedder: WordLlama ``l2_supercat`` (256 dims), a static token-embedding
model whose weights (16 MB) and tokenizer ship inside the ``wordllama`` wheel.

No network, no torch: embedding is a tokenizer pass, a table lookup and an average (10-20k short
texts/s on one core; docs/benchmarks.md "Embedders").
The files are loaded from the package directory directly (wordllama 0.4's own ``load`` looks for
the tokenizer in a folder name that its wheel does not have and then tries to download it).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from streams.embed.port import Embedder, EmbedderError, normalise

_CONFIG = "l2_supercat"


class WordLlamaEmbedder(Embedder):
    """WordLlama l2_supercat, 256 dims (or a Matryoshka truncation to 64/128)."""

    max_tokens = 512

    def __init__(self, dim: int = 256, batch_size: int = 256, sort_by_length: bool = True) -> None:
        if dim not in (64, 128, 256):
            raise EmbedderError(f"wordllama dim must be 64, 128 or 256, got {dim}")
        try:
            import wordllama
            from safetensors import safe_open
            from wordllama.wordllama import WordLlama, WordLlamaInference
        except ImportError as exc:  # pragma: no cover - a core dependency
            raise EmbedderError("the wordllama package is not installed") from exc
        root = Path(wordllama.__file__).parent
        weights = root / "weights" / f"{_CONFIG}_256.safetensors"
        tokenizer_file = root / "tokenizers" / f"{_CONFIG}_tokenizer_config.json"
        if not weights.exists() or not tokenizer_file.exists():
            raise EmbedderError(f"wordllama files missing under {root}")
        tokenizer = WordLlama.load_tokenizer(tokenizer_file)
        with safe_open(str(weights), framework="np", device="cpu") as f:
            table = f.get_tensor("embedding.weight")[:, :dim]
        self._model: Any = WordLlamaInference(table, tokenizer, binary=False)
        self._tokenizer: Any = tokenizer
        self._batch_size = batch_size
        self._sort = sort_by_length  # False only to measure what the ordering saves
        self._lock = threading.Lock()  # the HF tokenizer object is not documented thread-safe
        self.dim = dim
        self.name = f"wordllama-{_CONFIG}-{dim}"

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        for t in texts:
            if not isinstance(t, str):
                raise EmbedderError(f"text must be str, got {type(t).__name__}")
        # wordllama pads each internal batch to its longest text; ordering by length first
        # keeps long summaries from padding short ones (docs/benchmarks.md "Embedders"), and the
        # mean pooling masks padding, so a row does not depend on its neighbours
        order = (
            np.argsort([len(t) for t in texts], kind="stable")
            if self._sort
            else np.arange(len(texts))
        )
        with self._lock:
            rows = self._model.embed(
                [texts[i] for i in order], norm=False, batch_size=self._batch_size
            )
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        out[order] = np.asarray(rows).reshape(len(texts), self.dim)
        return normalise(out)

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        with self._lock:
            enc = self._tokenizer.encode(text, add_special_tokens=False)
        return [(int(a), int(b)) for a, b in enc.offsets]
