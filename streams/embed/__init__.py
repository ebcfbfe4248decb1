"""Embedders: the port, the offline default and the registry of names."""

from __future__ import annotations

from streams.embed.port import Embedder, EmbedderError, normalise

DEFAULT_EMBEDDER = "wordllama"


def open_embedder(name: str = DEFAULT_EMBEDDER) -> Embedder:
    """An embedder by name: ``wordllama`` (default, offline, 256 dims), ``wordllama-128``,
    ``wordllama-64``. Raises :class:`EmbedderError` for an unknown name."""
    if name in ("wordllama", "wordllama-256"):
        from streams.embed.static import WordLlamaEmbedder

        return WordLlamaEmbedder(256)
    if name in ("wordllama-128", "wordllama-64"):
        from streams.embed.static import WordLlamaEmbedder

        return WordLlamaEmbedder(int(name.rsplit("-", 1)[1]))
    raise EmbedderError(f"unknown embedder {name!r}")


__all__ = ["DEFAULT_EMBEDDER", "Embedder", "EmbedderError", "normalise", "open_embedder"]
