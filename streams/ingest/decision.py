"""The smart-vectorization hook: one call per embedded chunk decides what is done with it.

The processor calls ``decision = vectorizer.decide(chunk, vector, context)`` for every chunk
it has embedded; :class:`IndexNow` (the default) indexes every chunk at once. Other
policies (importance, novelty, priorities, temporary vectors, text-only chunks) implement
:class:`Vectorizer` in ``streams.ingest.vectorize``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from streams.index.model import IndexConfig
from streams.ingest.chunker import Chunk
from streams.ingest.source import Source

__all__ = ["Decision", "IndexNow", "VectorizeContext", "Vectorizer"]


@dataclass(frozen=True, slots=True)
class Decision:
    """``index``: append the chunk's vector (False: the chunk is not searchable by vector;
    a previous copy of its id is deleted). ``ttl_ms``: a temporary vector. ``text_only``:
    mark the payload text-only. ``reason``: why, for logs and debug. ``defer``: hold the
    chunk back in the processor's queue with this priority (lower is appended first;
    ``None``: appended with its batch)."""

    index: bool = True
    ttl_ms: int | None = None
    text_only: bool = False
    reason: str = "index now"
    # payload fields written with the chunk (streams.ingest.vectorize: the decision and
    # its reasons under "vectorize", "duplicate_of")
    fields: Mapping[str, Any] | None = None
    defer: int | None = None


@dataclass(frozen=True, slots=True)
class VectorizeContext:
    config: IndexConfig
    source: Source
    chunk_count: int


class Vectorizer(Protocol):
    def decide(
        self, chunk: Chunk, vector: npt.NDArray[np.float32], context: VectorizeContext
    ) -> Decision: ...


class IndexNow:
    """Index every chunk now."""

    def decide(
        self, chunk: Chunk, vector: npt.NDArray[np.float32], context: VectorizeContext
    ) -> Decision:
        return Decision()
