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
default. :class:`AliasProposer` is that background job: it makes the map keep its recent
normalised texts (a bounded deque append per lookup, only while a proposer is attached;
none by default) and, in its own thread, hands them to the hook and installs the valid
proposals as aliases. A lookup never waits for the hook. Readers see the alias table
through one reference swapped on change (copy on write), so lookups take no lock.
"""

from __future__ import annotations

import logging
import threading
import unicodedata
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from streams.index.exceptions import InvalidRequest

__all__ = ["STOP_WORDS", "AliasProposal", "AliasProposer", "CanonicalKeyMap", "LanguageModelHook"]

log = logging.getLogger(__name__)

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
        # recent normalised texts for an AliasProposer; None (the default): none are kept
        self._recent: deque[str] | None = None
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
        recent = self._recent
        if recent is not None:  # an AliasProposer is attached: one deque append
            recent.append(norm)
        return self._aliases.get(norm, norm)

    def keep_recent(self, n: int | None) -> None:
        """Keep the last ``n`` normalised texts :meth:`canonical` saw for
        :meth:`take_recent` (None: keep none, the default)."""
        self._recent = None if n is None else deque(maxlen=n)

    def take_recent(self) -> list[str]:
        """The texts kept since the last call, distinct, oldest first, and forget them."""
        recent = self._recent
        if recent is None:
            return []
        out: list[str] = []
        while True:
            try:
                out.append(recent.popleft())
            except IndexError:
                return list(dict.fromkeys(out))

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


class AliasProposer:
    """Runs a :class:`LanguageModelHook` off the search thread (module docstring).

    Every ``interval_s`` (after :meth:`start`), or on :meth:`run_once`, takes the texts
    ``keys`` saw since the last round (at most ``batch``, the most recent) and installs
    the hook's valid proposals as aliases (:meth:`CanonicalKeyMap.propose` with
    ``apply=True``). A hook that raises loses that round's texts, is logged and counted
    (``errors``, ``last_error``), and the next round runs; the table is unchanged by a
    failed round. :meth:`close` stops the thread and makes ``keys`` keep no texts."""

    def __init__(
        self,
        keys: CanonicalKeyMap,
        hook: LanguageModelHook,
        *,
        interval_s: float = 60.0,
        batch: int = 256,
    ) -> None:
        if interval_s <= 0 or batch < 1:
            raise ValueError("interval_s > 0 and batch >= 1")
        self.keys = keys
        self.hook = hook
        self.interval_s = interval_s
        self.rounds = 0
        self.added = 0
        self.errors = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        keys.keep_recent(batch)

    def run_once(self) -> list[AliasProposal]:
        """One round in the calling thread: the proposals, each marked ``added`` or not."""
        texts = self.keys.take_recent()
        if not texts:
            return []
        try:
            out = self.keys.propose(self.hook, texts, apply=True)
        except Exception as exc:  # the hook's: counted and logged, the next round runs
            self.errors += 1
            self.last_error = repr(exc)
            log.exception("alias proposer: the language model hook failed")
            return []
        self.rounds += 1
        self.added += sum(p.added for p in out)
        return out

    def start(self) -> AliasProposer:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="alias-proposer", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.run_once()

    def close(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        self.keys.keep_recent(None)
