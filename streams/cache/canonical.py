"""``CanonicalKeyMap``: query text -> its canonical form, so that spellings of one
question share one cache key (ARCHITECTURE §4, "alias resolution").

Two steps, both on the hot path and both pure string work (microseconds):

1. **Rules** (:meth:`CanonicalKeyMap.normalise`): Unicode NFKC, case folding, prose
   punctuation (sentence marks, quotes, apostrophes, dashes) turned into spaces, whitespace
   collapsed: ``What's  up?`` -> ``what s up``. Symbols (``#``, ``@``, brackets) stay.
   Optionally stop words dropped and the remaining words sorted (``stop_words=True`` /
   ``sort_words=True``): off by default, because word order carries meaning (``dog bites
   man``) and a key that merges two questions serves a wrong answer.
2. **Aliases** (:meth:`CanonicalKeyMap.canonical`): a table from a normalised text to the
   normalised text it stands for. Chains are resolved when an alias is added (lookups are one
   dict probe) and cycles are refused.

A language model may *propose* aliases (:class:`LanguageModelHook`), never on the hot path:
:meth:`CanonicalKeyMap.propose` is called by an operator or a background job with a batch of
recent query texts, and proposals are only added when the caller says so. There is no hook by
default. Readers see the alias table through one reference swapped on change (copy on
write), so lookups take no lock.
"""

from __future__ import annotations

import threading
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from streams.index.exceptions import InvalidRequest

__all__ = ["STOP_WORDS", "AliasProposal", "CanonicalKeyMap", "LanguageModelHook"]

_STOP_TEXT = (
    "a an the is are was were be been am do does did of to in on at for by with from and or "
    "i you he she it we they me my your its our their this that these those there here "
    "can could should would will shall may might must"
)
STOP_WORDS = frozenset(_STOP_TEXT.split())

MAX_TEXT_CHARS = 8192


@dataclass(frozen=True, slots=True)
class AliasProposal:
    """An alias a hook proposed (both sides normalised) and whether it was added."""

    alias: str
    target: str
    added: bool


class LanguageModelHook(Protocol):
    """Proposes ``(alias, target)`` text pairs meaning the same question. Called only by
    :meth:`CanonicalKeyMap.propose`, off the hot path; may be slow, may raise."""

    def propose_aliases(self, texts: Sequence[str]) -> Iterable[tuple[str, str]]: ...


_PROSE = frozenset(".,;:!?'\"¿¡…·")


def _is_punct(ch: str) -> bool:
    """Prose punctuation: sentence marks, quotes and dashes. Other marks (``#``, ``@``,
    ``/``, brackets) are kept: ``# vs ##`` and ``() vs (,)`` are different questions."""
    return ch in _PROSE or unicodedata.category(ch) in ("Pd", "Pi", "Pf")


# The same rule for ASCII text as one str.translate (most queries; ~10x faster than the
# per-character loop). Whitespace is left to str.split.
_ASCII_PUNCT = {c: " " for c in range(128) if _is_punct(chr(c))}


class CanonicalKeyMap:
    """Rule-based normaliser plus alias table (module docstring). ``max_aliases`` bounds
    the table; adding beyond it raises ``InvalidRequest`` (VEC_ERR_INVALID)."""

    def __init__(
        self,
        *,
        stop_words: bool = False,
        sort_words: bool = False,
        aliases: Mapping[str, str] | None = None,
        max_aliases: int = 100_000,
    ) -> None:
        self.stop_words = stop_words
        self.sort_words = sort_words
        self.max_aliases = max_aliases
        self._aliases: dict[str, str] = {}
        self._write_lock = threading.Lock()
        for alias, target in (aliases or {}).items():
            self.add_alias(alias, target)

    def normalise(self, text: str) -> str:
        """The rule-based form of ``text`` (step 1 of the module docstring)."""
        if not isinstance(text, str):
            raise InvalidRequest("query text must be a string", field="text")
        if len(text) > MAX_TEXT_CHARS:
            raise InvalidRequest(f"query text over {MAX_TEXT_CHARS} characters", field="text")
        folded = unicodedata.normalize("NFKC", text).casefold()
        if folded.isascii():
            kept = folded.translate(_ASCII_PUNCT)
        else:
            kept = "".join(" " if ch.isspace() or _is_punct(ch) else ch for ch in folded)
        words = kept.split()
        if self.stop_words:
            content = [w for w in words if w not in STOP_WORDS]
            words = content or words  # a text of stop words only keeps them
        if self.sort_words:
            words.sort()
        return " ".join(words)

    def canonical(self, text: str) -> str:
        """``text`` normalised, then resolved through the alias table."""
        norm = self.normalise(text)
        return self._aliases.get(norm, norm)

    def add_alias(self, alias: str, target: str) -> None:
        """Make ``alias`` stand for ``target`` (both normalised first). Texts that were
        aliases of ``alias`` follow it to the new target. Raises ``InvalidRequest`` for an
        empty side, a cycle, or a full table; the table is then unchanged."""
        a, t = self.normalise(alias), self.normalise(target)
        if not a or not t:
            raise InvalidRequest("an alias and its target must not be empty", field="alias")
        with self._write_lock:
            table = dict(self._aliases)
            t = table.get(t, t)
            if t == a:
                raise InvalidRequest(f"alias {a!r} -> {t!r} would make a cycle", field="alias")
            if a not in table and len(table) >= self.max_aliases:
                raise InvalidRequest(f"alias table full ({self.max_aliases})", field="alias")
            table[a] = t
            for k, v in table.items():
                if v == a:
                    table[k] = t
            self._aliases = table

    def remove_alias(self, alias: str) -> bool:
        """Drop ``alias``; False if it was not there."""
        a = self.normalise(alias)
        with self._write_lock:
            if a not in self._aliases:
                return False
            table = dict(self._aliases)
            del table[a]
            self._aliases = table
            return True

    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def propose(
        self, hook: LanguageModelHook, texts: Sequence[str], *, apply: bool = False
    ) -> list[AliasProposal]:
        """Ask ``hook`` for aliases among ``texts`` (off the hot path). With ``apply`` the
        proposals that are valid are added; invalid ones (cycles, empty) are reported with
        ``added=False``. Errors of the hook propagate; the table is then unchanged."""
        out: list[AliasProposal] = []
        for alias, target in list(hook.propose_aliases(texts)):
            a, t = self.normalise(alias), self.normalise(target)
            added = False
            if apply and a and t and a != t:
                try:
                    self.add_alias(a, t)
                    added = True
                except InvalidRequest:
                    added = False
            out.append(AliasProposal(a, t, added))
        return out
