"""The Head: the small, mutable, exact part of one index (ARCHITECTURE §3).

Every write lands here first. Rows live in preallocated fp32 buffers that double when full
(the Head is sealed into a Tail segment at ``head_capacity`` rows, so they stay small);
a search is one numpy matrix-vector product over the rows that pass the alive flags and the
filter, which for a few tens of thousands of rows beats any index.

Concurrency: one writer (``add``/``delete``/``freeze``) and any number of searchers. A
searcher reads the row count before the buffers, and the writer fills a row before it
bumps the count (and swaps in a grown buffer before that), so a search sees a consistent
prefix of rows without a lock. A delete flips an alive flag in place: a search that
started before it may still return the row, one that starts after it never does.

Vectors are stored as the metric scores them (unit length for cosine, see
:func:`prepare`), so a frozen Head's rows go straight into a Tail segment.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from streams.index.exceptions import DimensionMismatch
from streams.index.filters import Filter, RowColumns, Rows, tag_term
from streams.index.model import Metric, Vector

__all__ = ["Candidates", "HeadIndex", "SegmentRows", "prepare", "top_k"]

Labels = npt.NDArray[np.int64]
Scores = npt.NDArray[np.float32]
Matrix = npt.NDArray[np.float32]


def prepare(vectors: Matrix, metric: Metric) -> Matrix:
    """``vectors`` (n x dim) as stored and queried: L2-normalised rows for cosine (a zero
    row stays zero), unchanged otherwise. Always a fresh C-contiguous float32 array."""
    out = np.array(vectors, dtype=np.float32, order="C", copy=True)
    if metric is Metric.COSINE:
        norms = np.linalg.norm(out, axis=-1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
    return out


@dataclass(frozen=True, slots=True)
class Candidates:
    """Hits of one part of an index, best first; ``matched`` counts the rows that passed
    the alive flags and the filter, ``level`` the widening steps it took."""

    labels: Labels
    scores: Scores
    matched: int
    level: int = 0


def top_k(labels: Labels, scores: Scores, k: int, metric: Metric) -> tuple[Labels, Scores]:
    """The best ``k`` of ``(labels, scores)``: by score in the metric's order, ties by label."""
    key = -scores if metric.higher_is_better else scores
    if labels.size > k:
        part = np.argpartition(key, k - 1)[:k]
        labels, scores, key = labels[part], scores[part], key[part]
    order = np.lexsort((labels, key))
    return labels[order], scores[order]


@dataclass(frozen=True, slots=True)
class SegmentRows:
    """Rows to build a Tail segment from: ``labels`` sorted ascending and unique,
    ``vectors`` prepared for the metric, ``columns`` over the same rows."""

    labels: Labels
    vectors: Matrix
    columns: RowColumns

    def __len__(self) -> int:
        return int(self.labels.shape[0])


_T = TypeVar("_T", bound=np.generic)


def _grown(a: npt.NDArray[_T], cap: int, n: int, fill: float) -> npt.NDArray[_T]:
    out = np.full((cap, *a.shape[1:]), fill, dtype=a.dtype)
    out[:n] = a[:n]
    return out


class _RowList:
    """An append-only, growing int32 array of row numbers (ascending, as rows are added).
    ``n`` moves only after the row is written, so ``buf[:n]`` read in that order is safe."""

    __slots__ = ("buf", "n")

    def __init__(self, rows: Rows | None = None) -> None:
        self.buf: Rows = np.empty(8, np.int32) if rows is None else rows.astype(np.int32)
        self.n = 0 if rows is None else int(rows.size)

    def append(self, row: int) -> None:
        if self.n == self.buf.size:
            self.buf = _grown(self.buf, 2 * self.buf.size, self.n, 0)
        self.buf[self.n] = row
        self.n += 1

    def upto(self, n_rows: int) -> Rows:
        count = self.n
        rows = self.buf[:count]
        return rows[: int(np.searchsorted(rows, n_rows))]


class _HeadColumns:
    """The filter columns of the first ``n_rows`` rows of a live Head."""

    __slots__ = ("_head", "n_rows")

    def __init__(self, head: HeadIndex, n_rows: int) -> None:
        self._head = head
        self.n_rows = n_rows

    def tag_rows(self, term: str) -> Rows | None:
        rows = self._head._tags.get(term)
        return None if rows is None else rows.upto(self.n_rows)

    def numeric_column(self, field: str) -> npt.NDArray[np.float64] | None:
        col = self._head._numeric.get(field)
        return None if col is None else col[: self.n_rows]


class HeadIndex:
    """Exact, mutable fp32 rows of one index, each with a caller-chosen int64 ``label``.

    Tags and numeric fields are stored as given (the caller has checked them against the
    index's declared fields), so a field declared later filters rows written before.
    After :meth:`freeze` the Head takes no more adds but still takes deletes.
    """

    def __init__(
        self,
        dim: int,
        metric: Metric,
        *,
        initial_capacity: int = 1024,
    ) -> None:
        self.dim = dim
        self.metric = metric
        self._n = 0
        self._live = 0
        self._frozen = False
        cap = max(1, initial_capacity)
        self._labels = np.zeros(cap, dtype=np.int64)
        self._vectors = np.zeros((cap, dim), dtype=np.float32)
        self._sqnorms = np.zeros(cap, dtype=np.float32)
        self._alive = np.zeros(cap, dtype=np.bool_)
        self._numeric: dict[str, npt.NDArray[np.float64]] = {}
        self._tags: dict[str, _RowList] = {}
        self._row_of: dict[int, int] = {}

    def __len__(self) -> int:
        """Live rows."""
        return self._live

    def __contains__(self, label: object) -> bool:
        return label in self._row_of

    @property
    def n_rows(self) -> int:
        """Rows written, deleted ones included (what fills the buffers)."""
        return self._n

    @property
    def frozen(self) -> bool:
        return self._frozen

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers (capacity, not rows), tag lists and label map estimated."""
        arrays: list[npt.NDArray[Any]] = [self._labels, self._vectors, self._sqnorms, self._alive]
        arrays += self._numeric.values()
        tags = sum(rows.buf.nbytes + 100 for rows in self._tags.values())
        return sum(a.nbytes for a in arrays) + tags + 100 * len(self._row_of)

    def _grow(self) -> None:
        cap = 2 * self._labels.shape[0]
        # A row must be written before _n passes it; growing ahead of a batch is fine.
        # Buffers are swapped before _n moves past their old size, so readers holding
        # an old buffer only ever index rows it has.
        self._vectors = _grown(self._vectors, cap, self._n, 0.0)
        self._sqnorms = _grown(self._sqnorms, cap, self._n, 0.0)
        self._labels = _grown(self._labels, cap, self._n, 0)
        self._alive = _grown(self._alive, cap, self._n, False)
        for name, col in list(self._numeric.items()):
            self._numeric[name] = _grown(col, cap, self._n, np.nan)

    def add(
        self,
        label: int,
        vector: Vector,
        tags: Iterable[str] = (),
        numeric: Mapping[str, float] | None = None,
    ) -> None:
        """Append one row. ``vector`` is raw (it is prepared for the metric here).

        Raises :class:`DimensionMismatch`, or ``ValueError`` if the Head is frozen or
        already holds ``label`` (labels are unique by the caller's contract)."""
        if self._frozen:
            raise ValueError("the Head is frozen")
        if label in self._row_of:
            raise ValueError(f"label {label} is already in the Head")
        vec = np.asarray(vector, dtype=np.float32)
        if vec.shape != (self.dim,):
            raise DimensionMismatch(self.dim, int(vec.size))
        row = self._n
        if row == self._labels.shape[0]:
            self._grow()
        v = prepare(vec[None, :], self.metric)[0]
        self._vectors[row] = v
        self._sqnorms[row] = float(v @ v)
        self._labels[row] = label
        for name, value in (numeric or {}).items():
            col = self._numeric.get(name)
            if col is None:
                col = np.full(self._labels.shape[0], np.nan, dtype=np.float64)
                self._numeric[name] = col
            col[row] = value
        for term in {tag_term(t) for t in tags}:
            rows = self._tags.get(term)
            if rows is None:
                rows = self._tags[term] = _RowList()
            rows.append(row)
        self._alive[row] = True
        self._row_of[int(label)] = row
        self._n = row + 1
        self._live += 1

    def add_many(
        self,
        labels: Labels,
        vectors: Matrix,
        tags: Sequence[Iterable[str]] | None = None,
        numeric: Sequence[Mapping[str, float] | None] | None = None,
    ) -> None:
        """Append ``len(labels)`` rows at once: the batch form of :meth:`add` (one
        normalisation and one store per buffer instead of one per row). ``vectors`` are raw
        (n x dim); ``tags``/``numeric`` are per row. Searchers see no row of the batch
        until all are written. Raises as :meth:`add`, before changing anything."""
        labels = np.asarray(labels, dtype=np.int64)
        n = int(labels.shape[0])
        if self._frozen:
            raise ValueError("the Head is frozen")
        mat = np.asarray(vectors, dtype=np.float32)
        if mat.ndim != 2 or mat.shape[1] != self.dim or mat.shape[0] != n:
            raise DimensionMismatch(self.dim, int(mat.shape[-1]) if mat.ndim else 0)
        if n == 0:
            return
        label_list = labels.tolist()
        if len(set(label_list)) != n or any(label in self._row_of for label in label_list):
            raise ValueError("labels must be unique and new to the Head")
        start = self._n
        while start + n > self._labels.shape[0]:
            self._grow()
        end = start + n
        v = prepare(mat, self.metric)
        self._vectors[start:end] = v
        self._sqnorms[start:end] = np.einsum("ij,ij->i", v, v)
        self._labels[start:end] = labels
        for i, values in enumerate(numeric or ()):
            for name, value in (values or {}).items():
                col = self._numeric.get(name)
                if col is None:
                    col = np.full(self._labels.shape[0], np.nan, dtype=np.float64)
                    self._numeric[name] = col
                col[start + i] = value
        for i, row_tags in enumerate(tags or ()):
            for term in {tag_term(t) for t in row_tags}:
                rows = self._tags.get(term)
                if rows is None:
                    rows = self._tags[term] = _RowList()
                rows.append(start + i)
        self._alive[start:end] = True
        self._row_of.update(zip(label_list, range(start, end), strict=True))
        self._n = end
        self._live += n

    def delete(self, label: int) -> bool:
        """Mark ``label`` deleted; False if the Head has no live row with it."""
        row = self._row_of.pop(int(label), None)
        if row is None:
            return False
        self._alive[row] = False
        self._live -= 1
        return True

    def dead_labels(self) -> Labels:
        """Labels of the deleted rows (a frozen Head's deletes, to replay on its segment)."""
        n = self._n
        return self._labels[:n][~self._alive[:n]]

    def search(self, query: Vector, k: int, flt: Filter | None = None) -> Candidates:
        """Exact top ``k`` of the live rows passing ``flt``; ``query`` must be prepared."""
        n = self._n  # read before the buffers: see the module docstring
        vectors, sqnorms, labels = self._vectors, self._sqnorms, self._labels
        alive = self._alive[:n].copy()
        if flt is not None:
            alive &= flt.mask(_HeadColumns(self, n))
        rows = np.flatnonzero(alive)
        if rows.size == 0:
            return Candidates(np.empty(0, np.int64), np.empty(0, np.float32), 0)
        if rows.size * 2 < n:
            mat, norms = vectors[rows], sqnorms[rows]
        else:
            mat, norms = vectors[:n], sqnorms[:n]
        scores = mat @ query
        if self.metric is Metric.L2:
            scores = np.maximum(norms - 2.0 * scores + float(query @ query), 0.0)
        if mat.shape[0] != rows.size:
            scores = scores[rows]
        best, best_scores = top_k(labels[rows], scores.astype(np.float32), k, self.metric)
        return Candidates(best, best_scores, int(rows.size))

    def freeze(self) -> SegmentRows:
        """Stop taking adds and return the live rows, sorted by label, to seal.

        Deletes may go on concurrently (the Head keeps serving searches until its segment
        is installed); those that land after this snapshot are in :meth:`dead_labels`."""
        self._frozen = True
        return self.export()

    def export(self) -> SegmentRows:
        """A copy of the live rows, sorted by label (what :meth:`freeze` seals and what a
        snapshot saves); the Head is left as it is."""
        n = self._n
        rows = np.flatnonzero(self._alive[:n])
        order = rows[np.argsort(self._labels[rows], kind="stable")]
        new_of_old = np.full(n, -1, dtype=np.int64)
        new_of_old[order] = np.arange(order.size)
        source = RowColumns(
            n,
            {t: r.upto(n) for t, r in list(self._tags.items())},
            {f: c[:n] for f, c in self._numeric.items()},
        )
        columns = RowColumns.gather([(source, new_of_old)], int(order.size))
        return SegmentRows(self._labels[order], self._vectors[order], columns)

    @classmethod
    def from_rows(cls, rows: SegmentRows, metric: Metric) -> HeadIndex:
        """A Head holding ``rows`` (already prepared, e.g. from :meth:`export`), all live."""
        n, dim = rows.vectors.shape
        head = cls(int(dim), metric, initial_capacity=max(1024, int(n)))
        head._vectors[:n] = rows.vectors
        head._sqnorms[:n] = np.einsum("ij,ij->i", rows.vectors, rows.vectors)
        head._labels[:n] = rows.labels
        head._alive[:n] = True
        for name, src in rows.columns.numeric.items():
            head._numeric[name] = col = np.full(head._labels.shape[0], np.nan, np.float64)
            col[:n] = src
        head._tags = {t: _RowList(r) for t, r in rows.columns.tags.items()}
        head._row_of = {int(label): i for i, label in enumerate(rows.labels.tolist())}
        if len(head._row_of) != n:
            raise ValueError("duplicate labels in rows")
        head._n = head._live = int(n)
        return head
