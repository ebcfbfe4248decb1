"""Embedders: the port, the offline default and the registry of names.

============================================  ==============================================
name                                          provider
============================================  ==============================================
``wordllama`` (default), ``wordllama-256``     WordLlama l2_supercat, 256 dims, offline, in
``wordllama-128``, ``wordllama-64``            the core install (:mod:`.static`)
``minilm``                                    all-MiniLM-L6-v2, 384 dims, offline; the
                                              optional ``minilm`` extra (torch) (:mod:`.minilm`)
``openai:<model>[@<base_url>]``               any OpenAI-compatible server (:mod:`.openai`);
                                              key from ``STREAMVEC_EMBED_API_KEY`` or
                                              ``OPENAI_API_KEY``
============================================  ==============================================

Wrap any of them in :class:`streams.embed.resilient.EmbedQueue` for batching, bounded
concurrency, retries and dead-letter outcomes.
"""

from __future__ import annotations

from streams.embed.port import Embedder, EmbedderError, normalise

DEFAULT_EMBEDDER = "wordllama"


def open_embedder(name: str = DEFAULT_EMBEDDER) -> Embedder:
    """An embedder by name (see the table above). Raises :class:`EmbedderError` for an unknown
    name, a missing optional extra, or an OpenAI-compatible server that does not answer the
    dimension probe."""
    if name in ("wordllama", "wordllama-256"):
        from streams.embed.static import WordLlamaEmbedder

        return WordLlamaEmbedder(256)
    if name in ("wordllama-128", "wordllama-64"):
        from streams.embed.static import WordLlamaEmbedder

        return WordLlamaEmbedder(int(name.rsplit("-", 1)[1]))
    if name == "minilm":
        from streams.embed.minilm import MiniLMEmbedder

        return MiniLMEmbedder()
    if name.startswith("openai:"):
        from streams.embed.openai import OpenAIEmbedder

        return OpenAIEmbedder.from_name(name)
    raise EmbedderError(f"unknown embedder {name!r}")


__all__ = ["DEFAULT_EMBEDDER", "Embedder", "EmbedderError", "normalise", "open_embedder"]
