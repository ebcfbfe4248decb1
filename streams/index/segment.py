"""Tail segments: immutable FAISS indexes built from sealed Heads and merged LSM-style.

A segment holds ``n`` rows. FAISS ids are the local row numbers ``0..n-1``, and rows are
sorted by label, so ``labels`` (int64, ascending) maps row -> label and a delete finds its
row with one binary search. Deletes flip ``alive`` and never touch the FAISS index; every
search hands FAISS a bitmap selector of ``alive & filter`` so that deleted and filtered
rows are excluded inside the search, not after it.

**Recipe and dtype.** The index's recipe is a FAISS factory string; ``dtype`` picks the
storage where the recipe stores raw vectors (``Flat``, ``HNSW{M}``, ``IVF{n},Flat``):
fp16 -> ``SQfp16``, int8 -> ``SQ8``; a recipe that already quantises (``SQ8``, ``PQ{m}``)
keeps its own storage. Training needs data, so :func:`plan_recipe` shrinks ``IVF{n}`` to
the largest power of two with >= 39 training rows per list (or drops IVF below 4 lists)
and replaces ``PQ`` by ``SQ8`` below 39 rows per PQ centroid; ``recipe_used`` records it.

**Vectors for merges: the index is the copy.** Merging needs the rows' vectors. Keeping an
fp32 copy would cost 4*dim bytes per vector (1.5 KB at 384 dims, 1.5 GB per 1M vectors) and
even fp16 would double a quantised index, so segments keep no copy: a merge reconstructs
vectors from the FAISS storage (``reconstruct_batch``; IVF indexes get a direct map, 8
bytes per vector, to allow it). This is lossless for ``Flat`` and ``SQfp16`` (fp16 values
re-encode to themselves) and lossy for ``SQ8`` and ``PQ``: each merge re-quantises
already-quantised vectors, adding one more rounding (SQ8: at most half a step of the new
per-dimension range; PQ: a fresh codebook's error). Scores were computed on the quantised
vectors all along, so this shows as a small recall change, never as wrong labels.

Memory per vector at dim d (FAISS part; plus 9 bytes of label and alive flag, 4 bytes per
tag and 8 per numeric field): storage ``Flat`` 4d, ``SQfp16`` 2d, ``SQ8`` d, ``PQ{m}`` m;
``HNSW{M}`` adds ~(2M + 2.5) * 4 bytes of links; ``IVF{n},X`` adds 16 (id and direct map)
plus slack in FAISS's growing lists. Measured at d=384, 200k vectors (estimate/RSS):
``HNSW32,SQ8`` 665/670 B, ``HNSW16,SQ8`` 537/541 B, ``HNSW32,SQfp16`` 1049/1051 B,
``IVF1024,SQ8`` 417/576 B, ``IVF1024,PQ48`` 81/107 B. So 1M x 384 fits in ~0.7 GB with
``HNSW32`` + int8 (recall@10 0.975 at the default efSearch on clustered data).

**Search.** ``efSearch``/``nprobe`` are per-search knobs (``nprobe`` counts the recipe's
lists and is scaled to a segment whose nlist was shrunk). With a selector, HNSW's efSearch
is divided by the selectivity (at most x16), as the walk visits about efSearch rows
whether or not they pass. A filter passing fewer than ``FULL_SCAN_BYTES`` of fp32 rows,
``max(4k, ...)`` rows, or under 2% of the segment, is searched exhaustively at once. If a
segment still returns fewer hits than ``min(k, rows passing)``, it widens: efSearch and
nprobe x4, twice, then exhaustive over the passing rows (IVF: every list; HNSW: its
storage, scanned with the selector, or by reconstruction where FAISS has no selector
support, e.g. ``IndexPQ``).

**What an answer depended on** (:meth:`TailSegment.search_recorded`, for the result
cache). An IVF search scores only the rows of the ``nprobe`` lists whose centroids are
nearest the query, so its answer depends on which lists those were; an HNSW search on its
efSearch. ``search_recorded`` returns a :class:`Probe` with the lists of the final
widening level (nearest centroid first; a wider level's lists contain the narrower's) or
the efSearch, and None where the segment was searched exhaustively (exact over its
rows). It does not search twice: the quantizer is asked once and the lists are scanned
with ``search_preassigned`` (the two halves of FAISS's own ``IndexIVF.search``, same
parameters and selector, so the same hits). Only an IVF under a wrapper other than a
pre-transform (e.g. ``IndexRefine``) asks the quantizer a second time. :meth:`search` records
nothing and costs nothing extra.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from streams.exceptions import StreamvecError
from streams.index.exceptions import InvalidRequest
from streams.index.filters import Filter, RowColumns
from streams.index.head import Candidates, SegmentRows, top_k
from streams.index.model import Dtype, Metric, Vector

__all__ = [
    "DEFAULT_EF_SEARCH",
    "Probe",
    "SegmentCorrupt",
    "TailSegment",
    "check_recipe",
    "default_nprobe",
    "fsync_path",
    "merge",
    "plan_recipe",
    "recipe_nlist",
]

DEFAULT_EF_SEARCH = 64
EF_CONSTRUCTION = 80
MIN_ROWS_PER_CENTROID = 39  # below this FAISS's k-means warns and clusters poorly
TRAIN_ROWS_PER_CENTROID = 40
MIN_TRAIN_ROWS = 10_000
FULL_SCAN_BYTES = 4 << 20  # a filter passing fewer rows' worth of fp32 is scanned, not walked
FULL_SCAN_FRACTION = 0.02
MAX_EF_SCALE = 16
WIDEN_FACTOR = 4
WIDEN_STEPS = 2  # then exhaustive
CHUNK_ROWS = 16_384
FORMAT = 1

Labels = npt.NDArray[np.int64]
Matrix = npt.NDArray[np.float32]
RowSource = Callable[[npt.NDArray[np.int64]], Matrix]

_IVF_RE = re.compile(r"IVF(\d+)")
_PQ_RE = re.compile(r"PQ(\d+)(?:x(\d+))?(?:fs|np)?$")
_SCALAR = {Dtype.FP16: "SQfp16", Dtype.INT8: "SQ8"}
_LOSSY_RE = re.compile(r"SQ[468]|PQ\d.*|RQ\d.*|LSQ\d.*")


@dataclass(frozen=True, slots=True)
class Probe:
    """What one approximate segment search depended on (module docstring): ``lists``, the
    IVF lists probed, nearest centroid first (empty for HNSW); ``ef``, the HNSW efSearch
    used (0 for IVF). A search that was exhaustive over a segment has no Probe."""

    lists: tuple[int, ...] = ()
    ef: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"lists": list(self.lists)} if self.lists else {"ef": self.ef}


class SegmentCorrupt(StreamvecError):
    """A saved segment or index that cannot be read back (missing file, wrong format or
    shape, or saved for a different dim/metric)."""

    code = "VEC_ERR_INTERNAL"


def _faiss_metric(metric: Metric) -> int:
    return int(faiss.METRIC_L2 if metric is Metric.L2 else faiss.METRIC_INNER_PRODUCT)


def recipe_nlist(recipe: str) -> int | None:
    """The ``n`` of ``IVF{n}`` in ``recipe``, or None if it has no IVF level."""
    m = _IVF_RE.search(recipe)
    return int(m.group(1)) if m else None


def default_nprobe(nlist: int) -> int:
    """Lists probed by default: 1/32 of them, at least 8 (or all, if fewer). IVF4096,SQ8
    at d=384 reaches its recall ceiling (0.989 on clustered data) by nprobe 64."""
    return min(nlist, max(8, nlist // 32))


def plan_recipe(recipe: str, dtype: Dtype, n_rows: int) -> str:
    """The factory string to build ``n_rows`` rows with (see the module docstring)."""
    parts = recipe.split(",")
    if dtype in _SCALAR:
        if re.fullmatch(r"HNSW\d+", parts[-1]):
            parts.append(_SCALAR[dtype])
        elif parts[-1] == "Flat":
            parts[-1] = _SCALAR[dtype]
    if n_rows == 0:
        return "Flat"
    nlist = recipe_nlist(recipe)
    if nlist is not None and n_rows < MIN_ROWS_PER_CENTROID * nlist:
        fit = n_rows // MIN_ROWS_PER_CENTROID
        if fit >= 4:
            shrunk = 1 << (fit.bit_length() - 1)
            parts = [_IVF_RE.sub(f"IVF{shrunk}", p) for p in parts]
        else:
            parts = [parts[-1]]  # exhaustive over the same storage
    pq = _PQ_RE.fullmatch(parts[-1])
    if pq is not None and n_rows < MIN_ROWS_PER_CENTROID * (1 << int(pq.group(2) or 8)):
        parts = [p for p in parts[:-1] if not p.startswith("OPQ")] + ["SQ8"]
    return ",".join(parts)


def check_recipe(recipe: str, dtype: Dtype, dim: int, metric: Metric) -> None:
    """Raise :class:`InvalidRequest` (``field="recipe"``) unless FAISS can build
    ``recipe`` at ``dim`` (checked on the full-size plan, without training)."""
    if "IDMap" in recipe:
        raise InvalidRequest("recipes must not contain IDMap: row ids are ours", field="recipe")
    if recipe_nlist(recipe) == 0:
        raise InvalidRequest(f"recipe {recipe!r}: IVF needs at least one list", field="recipe")
    if re.search(r"PQ\d+(x\d+)?fs", recipe):
        # faiss-cpu 1.15 segfaults reconstructing a fast-scan IVF read back from disk, and
        # merges after a restart need to reconstruct.
        raise InvalidRequest(
            f"recipe {recipe!r}: fast-scan PQ cannot be merged after a reload; "
            "use PQ{m}x4 or PQ{m}",
            field="recipe",
        )
    try:
        faiss.index_factory(dim, plan_recipe(recipe, dtype, 1 << 40), _faiss_metric(metric))
    except RuntimeError as exc:  # FAISS's factory reports unparsable strings this way
        text = str(exc).strip()
        reason = text.rsplit("Error: ", 1)[-1] if "Error: " in text else text.rsplit(": ", 1)[-1]
        raise InvalidRequest(f"recipe {recipe!r}: {reason[:200]}", field="recipe") from None


# faiss-cpu's bundled stubs lack SearchParametersHNSW and the keyword constructors.
_faiss: Any = faiss


def _inner(index: Any) -> Any:
    """The index under an ``IndexPreTransform`` (OPQ, PCA), or ``index`` itself."""
    if isinstance(index, faiss.IndexPreTransform):
        return faiss.downcast_index(index.index)
    return index


def _plain_params(sel: Any) -> Any:
    params = faiss.SearchParameters()
    params.sel = sel
    return params


def _params(index: Any, inner: Any, base: Any) -> Any:
    if inner is index:
        return base
    wrapped = faiss.SearchParametersPreTransform()
    wrapped.index_params = base
    return wrapped


def _selector_works(index: Any, params: Any, dim: int) -> bool:
    try:
        index.search(np.zeros((1, dim), dtype=np.float32), 1, params=params)
    except RuntimeError:  # FAISS raises for indexes without SearchParameters/selector support
        return False
    return True


def _faiss_bytes(index: Any) -> int:
    inner = _inner(index)
    n = int(index.ntotal)
    if hasattr(inner, "hnsw"):
        storage = faiss.downcast_index(inner.storage)
        graph = 4 * int(inner.hnsw.neighbors.size()) + 12 * n
        return graph + _faiss_bytes(storage)
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        return n * (int(ivf.code_size) + 16) + int(ivf.nlist) * int(ivf.d) * 4
    return n * int(getattr(inner, "code_size", 4 * index.d))


def _build_index(n: int, dim: int, fetch: RowSource, recipe_used: str, metric: Metric) -> Any:
    index = faiss.index_factory(dim, recipe_used, _faiss_metric(metric))
    inner = _inner(index)
    if hasattr(inner, "hnsw"):
        inner.hnsw.efConstruction = EF_CONSTRUCTION
    if hasattr(inner, "do_polysemous_training"):
        inner.do_polysemous_training = False  # costs ~20x the PQ training; we never use it
    if not index.is_trained:
        pq = _PQ_RE.fullmatch(recipe_used.split(",")[-1])
        centroids = max(recipe_nlist(recipe_used) or 0, 1 << int(pq.group(2) or 8) if pq else 0)
        want = max(MIN_TRAIN_ROWS, TRAIN_ROWS_PER_CENTROID * centroids)
        if n > want:
            rows = np.sort(np.random.default_rng(n).choice(n, size=want, replace=False))
        else:
            rows = np.arange(n, dtype=np.int64)
        index.train(fetch(rows))
    for start in range(0, n, CHUNK_ROWS):
        index.add(fetch(np.arange(start, min(n, start + CHUNK_ROWS), dtype=np.int64)))
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        ivf.make_direct_map()  # for reconstruct_batch in merges
        # Inverted lists grow one row at a time, leaving up to 2x slack in each; a
        # serialisation round trip allocates them at their exact sizes (~30% less RSS).
        index = faiss.deserialize_index(faiss.serialize_index(index))
    return index


class TailSegment:
    """An immutable FAISS index over rows sorted by label, with alive flags and columns.

    Build with :meth:`build` or :func:`merge`, read back with :meth:`load`. Thread-safety:
    searches run concurrently with each other and with :meth:`delete` (one writer); a
    search that starts after a delete returned never sees that row."""

    def __init__(
        self,
        index: Any,
        labels: Labels,
        alive: npt.NDArray[np.bool_],
        columns: RowColumns,
        *,
        recipe: str,
        recipe_used: str,
        metric: Metric,
    ) -> None:
        self.index = index
        self.labels = labels
        self.alive = alive
        self.columns = columns
        self.recipe = recipe
        self.recipe_used = recipe_used
        self.metric = metric
        self.name = ""  # set once by the VectorIndex that installs it
        self.dim = int(index.d)
        self._live = int(np.count_nonzero(alive))
        self._alive_bits: tuple[int, npt.NDArray[np.uint8]] | None = None
        inner = _inner(index)
        self._inner = inner
        self._ivf = faiss.try_extract_index_ivf(inner)
        self._hnsw = hasattr(inner, "hnsw")
        probe = faiss.IDSelectorRange(0, 1)
        self._sel_ok = _selector_works(
            index, _params(index, inner, self._base_params(DEFAULT_EF_SEARCH, 1, probe)), self.dim
        )
        self._storage = faiss.downcast_index(inner.storage) if self._hnsw else None
        self._storage_sel_ok = self._storage is not None and _selector_works(
            self._storage, _plain_params(probe), self.dim
        )
        self.faiss_bytes = _faiss_bytes(index)
        # storage that loses order between near neighbours: worth an exact re-rank
        self.lossy = bool(_LOSSY_RE.fullmatch(recipe_used.split(",")[-1]))

    # -- building ---------------------------------------------------------------------

    @classmethod
    def build(cls, rows: SegmentRows, *, recipe: str, dtype: Dtype, metric: Metric) -> TailSegment:
        """Index ``rows`` (prepared for ``metric``, sorted by label) with ``recipe``."""
        n = len(rows)
        used = plan_recipe(recipe, dtype, n)
        dim = int(rows.vectors.shape[1])
        index = _build_index(n, dim, lambda r: rows.vectors[r], used, metric)
        alive = np.ones(n, dtype=np.bool_)
        return cls(
            index,
            rows.labels.copy(),
            alive,
            rows.columns,
            recipe=recipe,
            recipe_used=used,
            metric=metric,
        )

    # -- rows and deletes -------------------------------------------------------------

    def __len__(self) -> int:
        """Live rows."""
        return self._live

    @property
    def n_rows(self) -> int:
        return int(self.labels.shape[0])

    @property
    def nbytes(self) -> int:
        """Estimated resident bytes: FAISS structures plus labels, flags and columns."""
        tags = sum(r.nbytes + 100 for r in self.columns.tags.values())
        numeric = sum(c.nbytes for c in self.columns.numeric.values())
        return self.faiss_bytes + self.labels.nbytes + self.alive.nbytes + tags + numeric

    def _row(self, label: int) -> int:
        labels = self.labels
        if labels.size == 0 or label < labels[0] or label > labels[-1]:
            return -1
        i = int(np.searchsorted(labels, label))
        return i if labels[i] == label else -1

    def __contains__(self, label: object) -> bool:
        if not isinstance(label, (int, np.integer)):
            return False
        row = self._row(int(label))
        return row >= 0 and bool(self.alive[row])

    def contains_any(self, labels: Labels) -> bool:
        """Whether any of ``labels`` is a live row here."""
        if labels.size == 0 or self.labels.size == 0:
            return False
        pos = np.searchsorted(self.labels, labels).clip(0, self.labels.size - 1)
        hit = self.labels[pos] == labels
        return bool(np.any(self.alive[pos[hit]]))

    def delete(self, label: int) -> bool:
        """Mark ``label`` deleted; False if no live row has it."""
        row = self._row(int(label))
        if row < 0 or not self.alive[row]:
            return False
        self.alive[row] = False
        self._live -= 1
        return True

    def delete_many(self, labels: Labels) -> int:
        """Delete every label of ``labels`` present here; returns how many were live."""
        if labels.size == 0 or self.labels.size == 0:
            return 0
        pos = np.searchsorted(self.labels, labels).clip(0, self.labels.size - 1)
        rows = pos[self.labels[pos] == labels]
        rows = np.unique(rows[self.alive[rows]])
        self.alive[rows] = False
        self._live -= int(rows.size)
        return int(rows.size)

    def live_mask(self, flt: Filter | None = None) -> npt.NDArray[np.bool_]:
        mask = self.alive.copy()
        if flt is not None:
            mask &= flt.mask(self.columns)
        return mask

    def reconstruct(self, rows: npt.NDArray[np.int64]) -> Matrix:
        """The stored (possibly quantised) vectors of local ``rows``."""
        if rows.size == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        out: Matrix = self.index.reconstruct_batch(np.ascontiguousarray(rows, dtype=np.int64))
        return out

    # -- search -----------------------------------------------------------------------

    def _selection(self, flt: Filter | None) -> tuple[npt.NDArray[np.uint8] | None, int]:
        """The packed bitmap of rows to consider (None: all) and how many there are."""
        if flt is None:
            if self._live == self.n_rows:
                return None, self._live
            cached = self._alive_bits
            live = self._live
            if cached is None or cached[0] != live:
                cached = (live, np.packbits(self.alive, bitorder="little"))
                self._alive_bits = cached
            return cached[1], live
        mask = self.live_mask(flt)
        return np.packbits(mask, bitorder="little"), int(np.count_nonzero(mask))

    def _base_params(self, ef: int, nprobe: int, sel: Any) -> Any:
        if self._hnsw:
            return _faiss.SearchParametersHNSW(efSearch=ef, sel=sel)
        if self._ivf is not None:
            return _faiss.SearchParametersIVF(nprobe=nprobe, sel=sel)
        return _plain_params(sel)

    def _faiss_search(self, index: Any, query: Vector, k: int, params: Any) -> tuple[Labels, Any]:
        dist, ids = index.search(query[None, :], k, params=params)
        keep = ids[0] >= 0
        return ids[0][keep].astype(np.int64), dist[0][keep].astype(np.float32)

    def _probed_search(
        self, query: Vector, k: int, nprobe: int, sel: Any
    ) -> tuple[Labels, Any, tuple[int, ...]]:
        """An IVF search of ``nprobe`` lists that also returns them: the quantizer is asked
        once and the lists scanned with ``search_preassigned`` (what ``IndexIVF.search``
        does inside), so the hits equal :meth:`_faiss_search`'s."""
        ivf: Any = self._ivf  # the stubs lack search_preassigned_c
        x = np.ascontiguousarray(query[None, :], dtype=np.float32)  # swig_ptr reads it raw
        if self._inner is not self.index:  # a pre-transform (OPQ, PCA): the IVF sees its output
            for i in range(self.index.chain.size()):
                x = np.ascontiguousarray(self.index.chain.at(i).apply_py(x), dtype=np.float32)
        coarse = np.empty((1, nprobe), dtype=np.float32)
        lists = np.empty((1, nprobe), dtype=np.int64)
        ivf.quantizer.search_c(
            1, faiss.swig_ptr(x), nprobe, faiss.swig_ptr(coarse), faiss.swig_ptr(lists)
        )
        params = _faiss.SearchParametersIVF(nprobe=nprobe, sel=sel)
        if isinstance(self._inner, faiss.IndexIVF):
            dist = np.empty((1, k), dtype=np.float32)
            ids = np.empty((1, k), dtype=np.int64)
            ivf.search_preassigned_c(
                1,
                faiss.swig_ptr(x),
                k,
                faiss.swig_ptr(lists),
                faiss.swig_ptr(coarse),
                faiss.swig_ptr(dist),
                faiss.swig_ptr(ids),
                False,
                params,
            )
            keep = ids[0] >= 0
            rows, scores = ids[0][keep].astype(np.int64), dist[0][keep].astype(np.float32)
        else:  # a wrapper FAISS searches as a whole (IndexRefine): ask it separately
            rows, scores = self._faiss_search(
                self.index, query, k, _params(self.index, self._inner, params)
            )
        got = lists[0].tolist()  # -1 (no list) only at the end, never with nprobe <= nlist
        return rows, scores, tuple(got if not got or got[-1] >= 0 else (i for i in got if i >= 0))

    def _scan(
        self, query: Vector, k: int, bits: npt.NDArray[np.uint8] | None
    ) -> tuple[Labels, Any]:
        """Exhaustive scoring of the selected rows from reconstructed vectors."""
        if bits is None:
            rows = np.arange(self.n_rows, dtype=np.int64)
        else:
            rows = np.flatnonzero(np.unpackbits(bits, count=self.n_rows, bitorder="little"))
        best_rows = np.empty(0, np.int64)
        best = np.empty(0, np.float32)
        for start in range(0, rows.size, CHUNK_ROWS):
            chunk = rows[start : start + CHUNK_ROWS]
            vecs = self.reconstruct(chunk)
            if self.metric is Metric.L2:
                scores = ((vecs - query) ** 2).sum(axis=1, dtype=np.float32)
            else:
                scores = vecs @ query
            best_rows, best = top_k(
                np.concatenate([best_rows, chunk]), np.concatenate([best, scores]), k, self.metric
            )
        return best_rows, best

    def _search_level(
        self,
        query: Vector,
        k: int,
        bits: npt.NDArray[np.uint8] | None,
        ef: int,
        nprobe: int,
        exhaustive: bool,
        record: bool = False,
    ) -> tuple[Labels, Any, Probe | None]:
        # The selector points into ``bits``; both stay referenced until the search returns.
        sel = None if bits is None else _faiss.IDSelectorBitmap(self.n_rows, faiss.swig_ptr(bits))
        if exhaustive and self._hnsw:
            if self._storage_sel_ok or sel is None:
                params = _plain_params(sel) if sel is not None else None
                return (*self._faiss_search(self._storage, query, k, params), None)
            return (*self._scan(query, k, bits), None)
        if exhaustive and self._ivf is not None:
            nprobe = int(self._ivf.nlist)
        if sel is not None and not self._sel_ok:
            return (*self._scan(query, k, bits), None)
        used: Probe | None = None  # exhaustive, or not recording
        if record and not exhaustive:
            if self._ivf is not None:
                rows, scores, lists = self._probed_search(query, k, nprobe, sel)
                return rows, scores, Probe(lists=lists)
            if self._hnsw:
                used = Probe(ef=ef)
        params = _params(self.index, self._inner, self._base_params(ef, nprobe, sel))
        return (*self._faiss_search(self.index, query, k, params), used)

    def search(
        self,
        query: Vector,
        k: int,
        flt: Filter | None = None,
        *,
        ef_search: int | None = None,
        nprobe: int | None = None,
    ) -> Candidates:
        """Top ``k`` live rows passing ``flt`` for a prepared ``query``, widening until it
        returns ``min(k, rows passing)`` hits (``Candidates.level`` = widening steps)."""
        return self._search(query, k, flt, ef_search, nprobe, False)[0]

    def search_recorded(
        self,
        query: Vector,
        k: int,
        flt: Filter | None = None,
        *,
        ef_search: int | None = None,
        nprobe: int | None = None,
    ) -> tuple[Candidates, Probe | None]:
        """:meth:`search`, plus what its answer depended on: the IVF lists probed or the
        efSearch of the final widening level, None where the search was exhaustive
        (module docstring)."""
        return self._search(query, k, flt, ef_search, nprobe, True)

    def _search(
        self,
        query: Vector,
        k: int,
        flt: Filter | None,
        ef_search: int | None,
        nprobe: int | None,
        record: bool,
    ) -> tuple[Candidates, Probe | None]:
        bits, matched = self._selection(flt)
        if matched == 0:
            return Candidates(np.empty(0, np.int64), np.empty(0, np.float32), 0), None
        want = min(k, matched)
        ef = max(ef_search or DEFAULT_EF_SEARCH, k)
        if bits is not None and self._hnsw:
            # The walk visits about ef rows near the query whatever the filter passes, so
            # keep the expected number of passing rows among them: ef / selectivity.
            ef = min(ef * MAX_EF_SCALE, math.ceil(ef * self.n_rows / matched))
        probe = 1
        if self._ivf is not None:
            nlist = int(self._ivf.nlist)
            recipe_lists = recipe_nlist(self.recipe) or nlist
            asked = nprobe if nprobe is not None else default_nprobe(recipe_lists)
            probe = min(nlist, max(1, math.ceil(asked * nlist / recipe_lists)))
        approximate = self._hnsw or (self._ivf is not None and probe < int(self._ivf.nlist))
        few = (
            matched <= max(4 * k, FULL_SCAN_BYTES // (4 * self.dim))
            or matched < FULL_SCAN_FRACTION * self.n_rows
        )
        exhaustive = not approximate or (few and bits is not None)
        steps = 0
        while True:
            rows, scores, used = self._search_level(query, k, bits, ef, probe, exhaustive, record)
            if rows.size >= want or exhaustive:
                break
            steps += 1
            ef *= WIDEN_FACTOR
            probe *= WIDEN_FACTOR
            full_ivf = self._ivf is not None and probe >= int(self._ivf.nlist)
            exhaustive = steps > WIDEN_STEPS or full_ivf
        return Candidates(self.labels[rows], scores, matched, steps), used

    # -- persistence ------------------------------------------------------------------

    def save(
        self,
        directory: Path,
        *,
        alive: npt.NDArray[np.bool_] | None = None,
        link_index_from: Path | None = None,
    ) -> None:
        """Write ``index.faiss``, ``rows.npz`` and ``meta.json`` into ``directory``
        (created if missing) and fsync them. ``alive`` overrides the flags saved (a
        snapshot taken under the writer's lock); ``index.faiss`` is hard-linked from
        ``link_index_from`` where that file exists (the index never changes). Not atomic:
        callers write into a fresh directory and publish it (``VectorIndex.save``)."""
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / "index.faiss"
        try:
            if link_index_from is None:
                raise FileNotFoundError
            os.link(link_index_from, target)
        except OSError:  # no previous copy, or a filesystem without hard links
            faiss.write_index(self.index, str(target))
        arrays: dict[str, Any] = {
            "labels": self.labels,
            "alive": self.alive.copy() if alive is None else alive,
            **self.columns.to_arrays(),
        }
        with open(directory / "rows.npz", "wb") as f:
            np.savez(f, **arrays)
        meta = {
            "format": FORMAT,
            "recipe": self.recipe,
            "recipe_used": self.recipe_used,
            "metric": self.metric.value,
            "dim": self.dim,
            "rows": self.n_rows,
        }
        (directory / "meta.json").write_text(json.dumps(meta))
        for name in ("index.faiss", "rows.npz", "meta.json"):
            fsync_path(directory / name)

    @classmethod
    def load(cls, directory: Path) -> TailSegment:
        """Read a segment written by :meth:`save`; raises :class:`SegmentCorrupt`."""
        try:
            meta = json.loads((directory / "meta.json").read_text())
            if meta.get("format") != FORMAT:
                raise SegmentCorrupt(f"{directory}: unknown segment format {meta.get('format')}")
            index = faiss.read_index(str(directory / "index.faiss"))
            with np.load(directory / "rows.npz", allow_pickle=False) as z:
                labels = z["labels"].astype(np.int64)
                alive = z["alive"].astype(np.bool_)
                n = int(labels.shape[0])
                columns = RowColumns.from_arrays(n, z)
            metric = Metric(meta["metric"])
            recipe, recipe_used = str(meta["recipe"]), str(meta["recipe_used"])
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise SegmentCorrupt(f"{directory}: {exc}") from exc
        if int(index.ntotal) != n or alive.shape != (n,) or int(meta["rows"]) != n:
            raise SegmentCorrupt(f"{directory}: row counts disagree")
        if n and np.any(np.diff(labels) <= 0):
            raise SegmentCorrupt(f"{directory}: labels are not strictly increasing")
        return cls(
            index, labels, alive, columns, recipe=recipe, recipe_used=recipe_used, metric=metric
        )


def fsync_path(path: Path) -> None:
    """fsync a file or directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def merge(
    segments: Sequence[TailSegment], recipe: str, dtype: Dtype, metric: Metric
) -> TailSegment:
    """One segment holding the live rows of ``segments`` (as of the call), re-indexed with
    ``recipe``. Vectors are reconstructed from each segment's storage, chunk by chunk, so
    the transient memory is the new index plus one chunk (see the module docstring)."""
    alive = [s.alive.copy() for s in segments]
    live_rows = [np.flatnonzero(a) for a in alive]
    labels = np.concatenate([s.labels[r] for s, r in zip(segments, live_rows, strict=True)])
    source = np.concatenate(
        [np.full(r.size, i, dtype=np.int64) for i, r in enumerate(live_rows)]
        or [np.empty(0, np.int64)]
    )
    local = np.concatenate(live_rows or [np.empty(0, np.int64)])
    order = np.argsort(labels, kind="stable")
    labels, source, local = labels[order], source[order], local[order]
    n = int(labels.size)
    dim = segments[0].dim

    def fetch(rows: npt.NDArray[np.int64]) -> Matrix:
        out = np.empty((rows.size, dim), dtype=np.float32)
        src = source[rows]
        for i, seg in enumerate(segments):
            pick = np.flatnonzero(src == i)
            if pick.size:
                out[pick] = seg.reconstruct(local[rows[pick]])
        return out

    used = plan_recipe(recipe, dtype, n)
    index = _build_index(n, dim, fetch, used, metric)
    parts = []
    for i, (seg, rows) in enumerate(zip(segments, live_rows, strict=True)):
        new_of_old = np.full(seg.n_rows, -1, dtype=np.int64)
        new_of_old[rows] = np.flatnonzero(source == i)[np.argsort(local[source == i])]
        parts.append((seg.columns, new_of_old))
    columns = RowColumns.gather(parts, n)
    return TailSegment(
        index,
        labels,
        np.ones(n, dtype=np.bool_),
        columns,
        recipe=recipe,
        recipe_used=used,
        metric=metric,
    )
