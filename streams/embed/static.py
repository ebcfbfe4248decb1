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

from streams.embed.port import Embedder, EmbedderError, check_texts, normalise

_CONFIG = "l2_supercat"


class WordLlamaEmbedder(Embedder):
    """WordLlama l2_supercat, 256 dims (or a Matryoshka truncation to 64/128)."""

    max_tokens = 512

    def __init__(self, dim: int = 256, batch_size: int = 256) -> None:
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
        with safe_open(str(weights), framework="np", device="cpu") as f:
            table = f.get_tensor("embedding.weight")[:, :dim]
        self._model: Any = WordLlamaInference(
            table, WordLlama.load_tokenizer(tokenizer_file), binary=False
        )
        # the port's contract: the model reads the first max_tokens tokens (wordllama itself
        # reads everything, and pads a batch to its longest text, so one huge text would
        # take batch x length x dim floats); token_spans keeps its own, untruncated tokenizer
        self._model.tokenizer.enable_truncation(self.max_tokens)
        self._tokenizer: Any = WordLlama.load_tokenizer(tokenizer_file)
        self._batch_size = batch_size
        self._lock = threading.Lock()  # the HF tokenizer object is not documented thread-safe
        self.dim = dim
        self.name = f"wordllama-{_CONFIG}-{dim}"

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        texts = check_texts(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            rows = self._model.embed(list(texts), norm=False, batch_size=self._batch_size)
        return normalise(np.asarray(rows).reshape(len(texts), self.dim))

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        with self._lock:
            enc = self._tokenizer.encode(text, add_special_tokens=False)
        return [(int(a), int(b)) for a, b in enc.offsets]
