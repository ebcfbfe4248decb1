"""The second stage of L2 on the text path: does the cached question *say the same* as the
new one? An order-aware, lexical check a candidate must pass on top of the embedding
distance (:mod:`streams.cache.semantic`).

Why: the default offline embedder is a static bag of tokens, so ``why do poles dislike
russians`` and ``why do russians dislike poles`` embed to the same point, as do questions
that differ only in a number or a ``not``. No distance threshold separates those; a look at
the words does.

:func:`features` is computed once per text (at ``add`` for a representative, once per
lookup for the query); :func:`agreement` compares two of them in a few microseconds:

* **guards** (any failure scores 0.0): the numbers (tokens holding a digit) are the same
  set; negation is present in both or in neither (``not``, ``no``, ``never``, ``n't`` ...);
  the same grammatical persons (``I``/``my`` vs ``you``/``your`` vs ``we``); ``this`` or
  ``these`` in both or in neither (they point outside the text); no word of an opposite
  pair on one side and its opposite on the other (``for``/``against``, ``best``/``worst``,
  ``buy``/``sell``, ``from``/``to`` ...); every named entity (a word capitalised inside
  the sentence, not ``I``; an acronym such as ``IT`` anywhere) of either text occurs in
  the other; the content words both texts share, each once, come in the same order
  (``poles ... russians`` vs ``russians ... poles`` fails); the same ``why``/``how``/
  ``when``/``where``/``who`` (``what`` and ``which`` are interchangeable).
* **score**: the smaller of the content-word Jaccard (content words with a plural ``s``
  dropped: ``delusion, allusion and illusion`` vs ``delusion and illusion`` is 0.67) and
  the longest-common-subsequence ratio of the two token sequences
  (``2 * LCS / (len a + len b)``, rapidfuzz's Indel similarity; 1.0 for equal sequences).

Tokens are the strict normal form of :class:`CanonicalKeyMap` (NFKC, case folded, prose
punctuation to spaces, no stop-word removal, no sorting). Pure functions, no state.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from rapidfuzz.distance import Indel

from streams.cache.canonical import STOP_WORDS, CanonicalKeyMap

__all__ = ["TextFeatures", "agreement", "features"]


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# "don't" normalises to "don t", "can't" to "can t"; "cannot" is one word.
_NEGATIONS = _words(
    "not no never nor none nobody nothing neither nowhere without cannot t nt "
    "dont doesnt didnt isnt arent wasnt werent cant couldnt wont wouldnt shouldnt"
)
# Question words and light verbs are not content: reordering them does not change the ask.
_FUNCTION = STOP_WORDS | _words(
    "what which who whom whose why how when where if than then so as about into over "
    "after before up down out get got make some any all more most much many very just "
    "also best good way ways s"
)
_NORMALISER = CanonicalKeyMap()
# Who is asking about whom: "how do I" and "how do you" are different questions on QQP.
_PERSONS = (
    _words("i me my mine myself"),
    _words("you your yours yourself yourselves"),
    _words("we us our ours ourselves"),
)
# "this"/"these" point at something outside the text (a picture, a sentence): the answer
# depends on it, so such a question matches only another that points the same way.
_DEICTIC = _words("this these")
# Words whose opposite flips the answer; a text holding one side and not the other must
# not be served the answer of a text holding only the other side.
_OPPOSITES = tuple(
    (frozenset(x.split("/")[0].split(",")), frozenset(x.split("/")[1].split(",")))
    for x in sorted(
        _words(
            "for/against best/worst better/worse good/bad before/after with/without "
            "more/less most/least increase,increases/decrease,decreases buy/sell "
            "pros,advantages,advantage/cons,disadvantages,disadvantage first/last "
            "men,man,male,boys,boy/women,woman,female,girls,girl positive/negative "
            "cheapest,cheap/expensive,costliest high,higher,highest/low,lower,lowest "
            "rich,richer,richest/poor,poorer,poorest old,older,oldest/young,younger,youngest "
            "start,starting/stop,stopping true/false right/wrong love/hate like/dislike "
            "win,won/lose,lost from/to"
        )
    )
)


# What kind of answer is asked for; "what" and "which" are used interchangeably.
_ASKS = _words("why how when where who")


def _stem(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def _marks() -> dict[str, tuple[tuple[str, int], ...]]:
    """word -> what it marks: ("neg", 0), ("person", class), ("deictic", 0),
    ("side", 2 * pair + side). One dict probe per token in :func:`features`."""
    out: dict[str, list[tuple[str, int]]] = {}
    for w in _NEGATIONS:
        out.setdefault(w, []).append(("neg", 0))
    for i, words in enumerate(_PERSONS):
        for w in words:
            out.setdefault(w, []).append(("person", i))
    for w in _DEICTIC:
        out.setdefault(w, []).append(("deictic", 0))
    for i, (left, right) in enumerate(_OPPOSITES):
        for side, words in enumerate((left, right)):
            for w in words:
                out.setdefault(w, []).append(("side", 2 * i + side))
    return {w: tuple(m) for w, m in out.items()}


_MARKS = _marks()


@dataclass(frozen=True, slots=True)
class TextFeatures:
    """What :func:`agreement` needs of one text (all case folded)."""

    tokens: tuple[str, ...]
    numbers: frozenset[str]
    negated: bool
    entities: frozenset[str]
    content: tuple[str, ...]  # content words that occur once, in order
    persons: frozenset[int]
    deictic: bool
    polar: frozenset[int]  # 2 * pair + side, for opposite pairs held on one side only
    asks: frozenset[str]  # why / how / when / where / who
    stems: frozenset[str]  # content words, a plural "s" dropped
    vocabulary: frozenset[str]


def _entities(text: str) -> frozenset[str]:
    """Words capitalised inside a sentence (not its first word, not ``I``, not a function
    word) and acronyms anywhere (``IT``, ``MBA``: all capitals, two letters or more), folded."""
    out: set[str] = set()
    start = True
    for w in unicodedata.normalize("NFKC", text).split():
        core = w.strip(".,;:!?\"'()[]{}")
        if len(core) >= 2 and core.isupper():
            out.update(_NORMALISER.normalise(core).split())
        elif core and not start and core[0].isupper() and core != "I":
            out.update(t for t in _NORMALISER.normalise(core).split() if t not in _FUNCTION)
        start = w.endswith((".", "?", "!"))
    return frozenset(out)


def features(text: str) -> TextFeatures:
    """The features of ``text`` (raw, as the user typed it: case is used for entities).
    Raises ``InvalidRequest`` for a non-string or over-long text, like the normaliser."""
    tokens = tuple(_NORMALISER.normalise(text).split())
    counts: dict[str, int] = {}
    for t in tokens:
        counts[t] = counts.get(t, 0) + 1
    numbers: set[str] = set()
    persons: set[int] = set()
    sides: set[int] = set()
    negated = deictic = False
    for t in counts:
        if not t.isalpha() and any(c.isdigit() for c in t):
            numbers.add(t)
        for kind, i in _MARKS.get(t, ()):
            if kind == "neg":
                negated = True
            elif kind == "person":
                persons.add(i)
            elif kind == "deictic":
                deictic = True
            else:
                sides.add(i)
    return TextFeatures(
        tokens=tokens,
        numbers=frozenset(numbers),
        negated=negated,
        entities=_entities(text),
        content=tuple(t for t in tokens if counts[t] == 1 and t not in _FUNCTION),
        persons=frozenset(persons),
        deictic=deictic,
        polar=frozenset(i for i in sides if i ^ 1 not in sides),
        asks=_ASKS.intersection(counts),
        stems=frozenset(_stem(t) for t in counts if t not in _FUNCTION),
        vocabulary=frozenset(counts),
    )


def _same_order(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """The content words in both, each once in each, come in the same order."""
    shared = set(a).intersection(b)
    if len(shared) < 2:
        return True
    return [t for t in a if t in shared] == [t for t in b if t in shared]


def agreement(a: TextFeatures, b: TextFeatures) -> float:
    """0.0 when a guard fails (module docstring), else min(content Jaccard, token LCS
    ratio) in [0, 1]."""
    if a.negated != b.negated or a.numbers != b.numbers:
        return 0.0
    if a.persons != b.persons or a.deictic != b.deictic or a.asks != b.asks:
        return 0.0
    if any(i ^ 1 in b.polar for i in a.polar):  # one holds a side, the other its opposite
        return 0.0
    if not a.entities <= b.vocabulary or not b.entities <= a.vocabulary:
        return 0.0
    if not _same_order(a.content, b.content):
        return 0.0
    union = len(a.stems | b.stems)
    content = len(a.stems & b.stems) / union if union else 1.0
    return min(content, float(Indel.normalized_similarity(a.tokens, b.tokens)))
