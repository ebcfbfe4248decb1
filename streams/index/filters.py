"""Search filters: the grammar, its AST, and its evaluation over row columns.

Grammar (whitespace separates clauses, all of which must hold)::

    filter  := clause (WS clause)*
    clause  := ["-"] field ":" value ("|" value)*     tag field: has any of the values
             | ["-"] field (">=" | "<=" | ">" | "<" | "=") number
             | ["-"] field ":[" number (WS | ",") number "]"     inclusive range
    value   := bare | '"' (any char, with \\" and \\\\ escaped) '"'
    number  := decimal or scientific notation, or [+-]inf

``-`` negates a clause as a set complement: ``-color:red`` and ``-price>=10`` both match
rows that have no ``color`` / ``price`` at all. A record's tag ``name:value`` belongs to
field ``name``; a tag without a colon belongs to the pseudo field ``tag`` (``tag:foo``
matches the plain tag ``foo``), which needs no declaration.

Every field must be declared in :attr:`IndexConfig.fields` with the kind its clause needs,
else :class:`InvalidRequest` (``field="filter"``): that is the allow-list. Values are only
ever compared, never interpolated into anything.

A :class:`Filter` is frozen and hashable with a canonical ``str()`` (clauses sorted and
de-duplicated, values sorted), and ``parse_filter(str(f), config) == f``, so caches can key
on it. It evaluates two ways that agree: :meth:`Filter.mask` over a segment's columns
(vectorised) and :meth:`Filter.matches` over one record.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from streams.index.exceptions import InvalidRequest
from streams.index.model import FieldKind, IndexConfig

__all__ = [
    "PLAIN_TAG_FIELD",
    "Filter",
    "FilterColumns",
    "NumericClause",
    "NumericOp",
    "RowColumns",
    "TagClause",
    "parse_filter",
    "tag_term",
]

PLAIN_TAG_FIELD = "tag"
MAX_FILTER_CHARS = 4096
MAX_CLAUSES = 64
MAX_VALUES = 256

NumericOp = Literal["<", "<=", ">", ">=", "=", "range"]
Mask = npt.NDArray[np.bool_]
Rows = npt.NDArray[np.int32]

_CLAUSE_RE = re.compile(r"(-?)([A-Za-z0-9_-]+?)(>=|<=|>|<|=|:)(.*)", re.DOTALL)
_NUMBER_RE = re.compile(r"[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|inf)")
_BARE_RE = re.compile(r'[^\s|"\[\]\\]+')


def tag_term(tag: str) -> str:
    """The column key of a record's tag: ``color:red`` stays, plain ``foo`` is ``tag:foo``."""
    return tag if ":" in tag else f"{PLAIN_TAG_FIELD}:{tag}"


class FilterColumns(Protocol):
    """Row columns a filter evaluates over (a Head or a Tail segment; rows ``0..n_rows-1``)."""

    @property
    def n_rows(self) -> int: ...

    def tag_rows(self, term: str) -> Rows | None:
        """Rows (< ``n_rows``) that carry ``term`` (``field:value``), or None if none do."""
        ...

    def numeric_column(self, field: str) -> npt.NDArray[np.float64] | None:
        """``field``'s values for rows ``0..n_rows-1`` (NaN where missing), or None."""
        ...


def _fmt_number(x: float) -> str:
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(x)


def _fmt_value(v: str) -> str:
    if _BARE_RE.fullmatch(v):
        return v
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True, slots=True)
class TagClause:
    """Rows carrying at least one of ``field:value`` for ``values`` (sorted, unique)."""

    field: str
    values: tuple[str, ...]
    negated: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", tuple(sorted(set(self.values))))

    def __str__(self) -> str:
        neg = "-" if self.negated else ""
        return f"{neg}{self.field}:" + "|".join(_fmt_value(v) for v in self.values)

    def mask(self, columns: FilterColumns) -> Mask:
        out = np.zeros(columns.n_rows, dtype=np.bool_)
        for value in self.values:
            rows = columns.tag_rows(f"{self.field}:{value}")
            if rows is not None:
                out[rows] = True
        return ~out if self.negated else out

    def matches(self, terms: frozenset[str], numeric: Mapping[str, float]) -> bool:
        hit = any(f"{self.field}:{v}" in terms for v in self.values)
        return hit != self.negated


@dataclass(frozen=True, slots=True)
class NumericClause:
    """``field op value`` (``hi`` is used by ``range`` only, inclusive on both ends).

    A row without the field (NaN) fails every comparison, so it passes the negation."""

    field: str
    op: NumericOp
    value: float
    hi: float | None = None
    negated: bool = False

    def __str__(self) -> str:
        neg = "-" if self.negated else ""
        if self.op == "range":
            hi = self.value if self.hi is None else self.hi
            return f"{neg}{self.field}:[{_fmt_number(self.value)} {_fmt_number(hi)}]"
        return f"{neg}{self.field}{self.op}{_fmt_number(self.value)}"

    def _test(self, x: npt.NDArray[np.float64]) -> Mask:
        v = self.value
        out: Mask
        if self.op == "<":
            out = x < v
        elif self.op == "<=":
            out = x <= v
        elif self.op == ">":
            out = x > v
        elif self.op == ">=":
            out = x >= v
        elif self.op == "=":
            out = x == v
        else:
            out = (x >= v) & (x <= (v if self.hi is None else self.hi))
        return out

    def mask(self, columns: FilterColumns) -> Mask:
        col = columns.numeric_column(self.field)
        out = np.zeros(columns.n_rows, dtype=np.bool_) if col is None else self._test(col)
        return ~out if self.negated else out

    def matches(self, terms: frozenset[str], numeric: Mapping[str, float]) -> bool:
        x = np.array([numeric.get(self.field, math.nan)], dtype=np.float64)
        return bool(self._test(x)[0]) != self.negated


Clause = TagClause | NumericClause


@dataclass(frozen=True, slots=True, eq=False)
class RowColumns:
    """Immutable filter columns of ``n_rows`` rows: for each tag term (``field:value``)
    the sorted row numbers carrying it; for each numeric field a float64 column, NaN where
    a row lacks it. Memory: 4 bytes per (row, tag) plus 8 bytes per (row, numeric field)."""

    n_rows: int
    tags: Mapping[str, Rows]
    numeric: Mapping[str, npt.NDArray[np.float64]]

    def tag_rows(self, term: str) -> Rows | None:
        return self.tags.get(term)

    def numeric_column(self, field: str) -> npt.NDArray[np.float64] | None:
        return self.numeric.get(field)

    def to_arrays(self) -> dict[str, npt.NDArray[Any]]:
        """Plain arrays for ``np.savez`` (no pickles); inverse of :meth:`from_arrays`."""
        terms = list(self.tags)
        blobs = [t.encode() for t in terms]
        out: dict[str, npt.NDArray[Any]] = {
            "col.term_bytes": np.frombuffer(b"".join(blobs), dtype=np.uint8),
            "col.term_ends": np.cumsum([len(b) for b in blobs], dtype=np.int64),
            "col.tag_ends": np.cumsum([self.tags[t].size for t in terms], dtype=np.int64),
            "col.tag_rows": np.concatenate(
                [self.tags[t] for t in terms] or [np.empty(0, np.int32)]
            ).astype(np.int32),
        }
        for name, col in self.numeric.items():
            out[f"num.{name}"] = col
        return out

    @classmethod
    def from_arrays(cls, n_rows: int, arrays: Mapping[str, npt.NDArray[Any]]) -> RowColumns:
        """Columns from :meth:`to_arrays`'s output; raises ``ValueError`` if inconsistent."""
        text = arrays["col.term_bytes"].tobytes()
        term_ends = arrays["col.term_ends"].tolist()
        tag_ends = arrays["col.tag_ends"].tolist()
        tag_rows = arrays["col.tag_rows"].astype(np.int32)
        if len(term_ends) != len(tag_ends) or (tag_rows.size and tag_rows.max() >= n_rows):
            raise ValueError("tag columns disagree with the row count")
        tags: dict[str, Rows] = {}
        t0 = r0 = 0
        for t1, r1 in zip(term_ends, tag_ends, strict=True):
            tags[text[t0:t1].decode()] = tag_rows[r0:r1]
            t0, r0 = t1, r1
        numeric = {
            key[4:]: np.asarray(arrays[key], dtype=np.float64)
            for key in arrays
            if key.startswith("num.")
        }
        if any(c.shape != (n_rows,) for c in numeric.values()):
            raise ValueError("numeric columns disagree with the row count")
        return cls(n_rows, tags, numeric)

    @classmethod
    def gather(
        cls, parts: Iterable[tuple[RowColumns, npt.NDArray[np.int64]]], n_rows: int
    ) -> RowColumns:
        """Columns of a new row set: ``parts`` pairs each source with ``new_of_old``, the new
        row number of each of its rows (-1 where the row is dropped)."""
        tag_parts: dict[str, list[Rows]] = {}
        numeric: dict[str, npt.NDArray[np.float64]] = {}
        for columns, new_of_old in parts:
            for term, rows in columns.tags.items():
                new = new_of_old[rows]
                new = new[new >= 0]
                if new.size:
                    tag_parts.setdefault(term, []).append(new.astype(np.int32))
            for name, col in columns.numeric.items():
                out = numeric.get(name)
                if out is None:
                    out = numeric[name] = np.full(n_rows, np.nan, dtype=np.float64)
                keep = new_of_old >= 0
                out[new_of_old[keep]] = col[keep]
        tags = {t: np.sort(np.concatenate(p)) for t, p in tag_parts.items()}
        return cls(n_rows, tags, numeric)


@dataclass(frozen=True, slots=True)
class Filter:
    """A conjunction of clauses, canonically ordered (build it with :func:`parse_filter`)."""

    clauses: tuple[Clause, ...]

    def __post_init__(self) -> None:
        canonical = tuple(sorted(set(self.clauses), key=lambda c: (c.field, str(c))))
        object.__setattr__(self, "clauses", canonical)

    def __str__(self) -> str:
        return " ".join(str(c) for c in self.clauses)

    @property
    def fields(self) -> frozenset[str]:
        return frozenset(c.field for c in self.clauses)

    def mask(self, columns: FilterColumns) -> Mask:
        """A bool per row ``0..columns.n_rows-1``: True where every clause holds."""
        out = np.ones(columns.n_rows, dtype=np.bool_)
        for clause in self.clauses:
            out &= clause.mask(columns)
        return out

    def matches(self, tags: Iterable[str], numeric: Mapping[str, float]) -> bool:
        """Whether one record (its raw tags and numeric fields) passes; agrees with
        :meth:`mask`."""
        terms = frozenset(tag_term(t) for t in tags)
        return all(c.matches(terms, numeric) for c in self.clauses)


def _bad(message: str) -> InvalidRequest:
    return InvalidRequest(f"filter: {message}", field="filter")


def _split_clauses(text: str) -> list[str]:
    """Split at whitespace outside quotes and brackets."""
    out: list[str] = []
    cur: list[str] = []
    in_quote = in_bracket = escaped = False
    for ch in text:
        if in_quote:
            cur.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_quote = False
            continue
        if ch == '"':
            in_quote = True
        elif ch == "[":
            in_bracket = True
        elif ch == "]":
            in_bracket = False
        elif ch.isspace() and not in_bracket:
            if cur:
                out.append("".join(cur))
                cur = []
            continue
        cur.append(ch)
    if in_quote:
        raise _bad("unterminated quote")
    if in_bracket:
        raise _bad("unterminated range")
    if cur:
        out.append("".join(cur))
    return out


def _parse_values(text: str) -> tuple[str, ...]:
    values: list[str] = []
    i, n = 0, len(text)
    while True:
        if i < n and text[i] == '"':
            buf: list[str] = []
            i += 1
            while i < n and text[i] != '"':
                if text[i] == "\\" and i + 1 < n:
                    i += 1
                buf.append(text[i])
                i += 1
            if i >= n:
                raise _bad("unterminated quote")
            i += 1
            values.append("".join(buf))
        else:
            m = _BARE_RE.match(text, i)
            if m is None:
                raise _bad(f"expected a value at {text[i:i + 20]!r}")
            values.append(m.group())
            i = m.end()
        if i == n:
            break
        if text[i] != "|":
            raise _bad(f"unexpected {text[i]!r} in values")
        i += 1
    if len(values) > MAX_VALUES:
        raise _bad(f"more than {MAX_VALUES} values in one clause")
    return tuple(sorted(set(values)))


def _parse_number(text: str) -> float:
    if not _NUMBER_RE.fullmatch(text):
        raise _bad(f"{text[:40]!r} is not a number")
    return float(text)


def _check_kind(field: str, want: FieldKind, config: IndexConfig) -> None:
    kind = config.field_kind(field)
    if kind is None and field == PLAIN_TAG_FIELD:
        kind = FieldKind.TAG
    if kind is None:
        raise _bad(f"field {field!r} is not declared on the index")
    if kind is not want:
        raise _bad(f"field {field!r} is a {kind.value} field, not {want.value}")


def _parse_clause(token: str, config: IndexConfig) -> Clause:
    m = _CLAUSE_RE.fullmatch(token)
    if m is None:
        raise _bad(f"cannot parse {token[:40]!r}")
    neg, field, op, rest = m.group(1) == "-", m.group(2), m.group(3), m.group(4)
    if op == ":" and rest.startswith("["):
        _check_kind(field, FieldKind.NUMERIC, config)
        if not rest.endswith("]"):
            raise _bad(f"range in {token[:40]!r} must end with ']'")
        bounds = rest[1:-1].replace(",", " ").split()
        if len(bounds) != 2:
            raise _bad("a range needs two bounds: field:[lo hi]")
        lo, hi = _parse_number(bounds[0]), _parse_number(bounds[1])
        if lo > hi:
            raise _bad(f"empty range [{bounds[0]} {bounds[1]}]")
        return NumericClause(field, "range", lo, hi, negated=neg)
    if op == ":":
        _check_kind(field, FieldKind.TAG, config)
        return TagClause(field, _parse_values(rest), negated=neg)
    _check_kind(field, FieldKind.NUMERIC, config)
    numeric_op: NumericOp = op  # type: ignore[assignment]  # the regex admits only these
    return NumericClause(field, numeric_op, _parse_number(rest), negated=neg)


def parse_filter(text: str, config: IndexConfig) -> Filter:
    """Parse ``text`` against ``config``'s declared fields.

    Raises :class:`InvalidRequest` (``field="filter"``) for anything malformed, an
    undeclared field, a clause of the wrong kind for its field, an empty filter (pass no
    filter instead), or more than 4096 characters / 64 clauses / 256 values in a clause.
    """
    if not isinstance(text, str):
        raise _bad("must be a string")
    if len(text) > MAX_FILTER_CHARS:
        raise _bad(f"longer than {MAX_FILTER_CHARS} characters")
    tokens = _split_clauses(text)
    if not tokens:
        raise _bad("empty")
    if len(tokens) > MAX_CLAUSES:
        raise _bad(f"more than {MAX_CLAUSES} clauses")
    return Filter(tuple(_parse_clause(t, config) for t in tokens))
