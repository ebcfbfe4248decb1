"""Cutting a Source into chunks: token windows with overlap, or chat messages and turns.

Windows are counted in the embedder's own tokens (:meth:`Embedder.token_spans`), so a
window never exceeds what the model reads. Every chunk records where it lies in the
Source's *content text*: the ``text`` itself; for pre-cut ``chunks`` and for chat
``messages``, their texts joined with a blank line (``"\\n\\n"``). ``content[start:end]``
is the chunk's text, and the chunker is a pure function of (Source, embedder tokenizer,
settings): the same Source always yields the same chunks, which is what makes chunk ids
``{source_id}#{chunk_no}`` safe to re-append after a crash.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from streams.embed.port import Embedder
from streams.ingest.source import Source

__all__ = ["ChatMode", "Chunk", "Chunker", "content_text"]

SEPARATOR = "\n\n"


class ChatMode(enum.StrEnum):
    MESSAGE = "message"  # one chunk per message (windowed if a message is long)
    TURN = "turn"  # one chunk per turn: a user message and the replies up to the next one


@dataclass(frozen=True, slots=True)
class Chunk:
    source_id: str
    chunk_no: int
    start: int
    end: int
    text: str

    @property
    def id(self) -> str:
        return f"{self.source_id}#{self.chunk_no}"


def content_text(source: Source) -> str:
    """The text that chunk offsets refer to."""
    if source.text is not None:
        return source.text
    if source.chunks is not None:
        return SEPARATOR.join(source.chunks)
    return SEPARATOR.join(m.text for m in source.messages or ())


class Chunker:
    """``window_tokens`` per chunk (capped at the model's ``max_tokens``), consecutive
    windows sharing ``overlap_tokens``."""

    def __init__(
        self,
        window_tokens: int = 128,
        overlap_tokens: int = 32,
        chat_mode: ChatMode = ChatMode.MESSAGE,
    ) -> None:
        if window_tokens < 1 or not 0 <= overlap_tokens < window_tokens:
            raise ValueError("need window_tokens >= 1 and 0 <= overlap_tokens < window_tokens")
        self.window_tokens = window_tokens
        self.overlap_tokens = overlap_tokens
        self.chat_mode = ChatMode(chat_mode)

    def chunk(self, source: Source, embedder: Embedder) -> list[Chunk]:
        """The chunks of ``source`` in order, numbered from 0 (``source`` is validated)."""
        spans: list[tuple[int, int]] = []  # (start, end) in content_text
        if source.text is not None:
            spans = self._windows(source.text, 0, embedder)
        else:
            parts = (
                list(source.chunks)
                if source.chunks is not None
                else [m.text for m in source.messages or ()]
            )
            offsets = []
            at = 0
            for part in parts:
                offsets.append((at, at + len(part)))
                at += len(part) + len(SEPARATOR)
            if source.chunks is not None:
                spans = offsets  # as given by the producer
            elif self.chat_mode is ChatMode.MESSAGE:
                for (a, _b), part in zip(offsets, parts, strict=True):
                    spans.extend(self._windows(part, a, embedder))
            else:
                roles = [m.role for m in source.messages or ()]
                turn_start = 0
                for i in range(1, len(parts) + 1):
                    if i == len(parts) or roles[i] == "user":
                        a, b = offsets[turn_start][0], offsets[i - 1][1]
                        spans.extend(self._windows(content_text(source)[a:b], a, embedder))
                        turn_start = i
        content = content_text(source)
        return [Chunk(source.id, n, a, b, content[a:b]) for n, (a, b) in enumerate(spans)]

    def _windows(self, text: str, base: int, embedder: Embedder) -> list[tuple[int, int]]:
        tokens = [(a, b) for a, b in embedder.token_spans(text) if text[a:b].strip()]
        if not tokens:
            return []
        window = min(self.window_tokens, embedder.max_tokens)
        stride = window - min(self.overlap_tokens, window - 1)
        out = []
        i = 0
        while True:
            last = min(i + window, len(tokens)) - 1
            a = tokens[i][0]
            while text[a].isspace():  # tokens may carry the space before a word
                a += 1
            out.append((base + a, base + tokens[last][1]))
            if last == len(tokens) - 1:
                return out
            i += stride
