"""One tenant/index in memory: a mutable Head, frozen Heads being sealed, Tail segments.

Rows are identified by caller-chosen, unique int64 labels (the indexer derives them from
log positions). An update is ``delete(old_label)`` + ``upsert(new_label, ...)``.

Threads: one writer (``upsert``, ``delete``, ``begin_*``/``finish_*``, ``save``), one
background builder (``SealJob.build``/``MergeJob.build``, no lock held) and any number of
searchers (no lock). The parts of the index form an immutable :class:`_View` that the
writer replaces under ``_lock`` (copy-on-write); a search reads the view once, so it sees
each row in exactly one part, and sealing or merging never changes what it finds (beyond
the recall of an approximate recipe).

Seal: ``begin_seal`` moves the Head to the frozen list (still searched) and installs an
empty one; ``SealJob.build`` builds its segment; ``finish_seal`` replays the deletes the
frozen Head took meanwhile onto the segment, then swaps the segment in for the Head in one
step. Merges (size-tiered, LSM-style) have the same shape.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from streams.index.exceptions import DimensionMismatch, InvalidRequest
from streams.index.filters import Filter, RowColumns
from streams.index.head import Candidates, HeadIndex, SegmentRows, prepare, top_k
from streams.index.model import IndexConfig, Metric, Vector
from streams.index.segment import (
    Probe,
    SegmentCorrupt,
    TailSegment,
    check_recipe,
    fsync_path,
    merge,
)

__all__ = [
    "DEFAULT_REFINE_FACTOR",
    "ExactVectors",
    "MergeJob",
    "SealJob",
    "SearchOutcome",
    "SegmentCorrupt",
    "VectorIndex",
]

FORMAT = 1
# A search of a quantised segment (SQ8, PQ) takes this many times k candidates from it and
# re-scores them exactly when the index has an ``exact`` source: SQ8 codes cannot order
# neighbours whose cosines differ by ~0.002, the fp32 vectors can (recall@10 0.94 -> 0.99
# at 1M x 384 in docs/benchmarks.md). 0 or 1: no re-ranking.
DEFAULT_REFINE_FACTOR = 4

ExactVectors = Callable[[list[int]], list[Vector | None]]
"""labels -> their stored fp32 vectors (``None`` where unknown)."""
_CURRENT = "CURRENT"


@dataclass(frozen=True, slots=True)
class SearchOutcome:
    """Hits best first (scores in the metric's terms). ``widened``: widening steps the
    slowest part needed; ``matched``: live rows passing the filter; ``exhausted``: fewer
    than ``k`` rows match at all (so fewer than ``k`` hits is the full answer).
    ``depends``: with ``record=True``, what the answer depended on: (segment name,
    :class:`Probe`) for each Tail segment searched approximately (the IVF lists probed or
    the HNSW efSearch), in the view's order; the Head, frozen Heads and segments searched
    exhaustively are exact and not listed. None when not recorded."""

    labels: npt.NDArray[np.int64]
    scores: npt.NDArray[np.float32]
    widened: int
    exhausted: bool
    matched: int
    depends: tuple[tuple[str, Probe], ...] | None = None


@dataclass(frozen=True, slots=True)
class _View:
    head: HeadIndex
    frozen: tuple[HeadIndex, ...]
    segments: tuple[TailSegment, ...]


@dataclass(eq=False)
class SealJob:
    """Seals one frozen Head. ``build`` is the heavy part: call it without locks."""

    head: HeadIndex
    config: IndexConfig
    segment: TailSegment | None = field(default=None, init=False)
    built: bool = field(default=False, init=False)

    def build(self) -> None:
        """Build the segment (may be retried if it raised; the Head keeps serving)."""
        rows = self.head.freeze()
        c = self.config
        self.segment = (
            TailSegment.build(rows, recipe=c.recipe, dtype=c.dtype, metric=c.metric)
            if len(rows)
            else None
        )
        self.built = True


@dataclass(eq=False)
class MergeJob:
    """Merges ``sources`` into one segment. ``build`` is the heavy part: call it without
    locks."""

    sources: tuple[TailSegment, ...]
    config: IndexConfig
    segment: TailSegment | None = field(default=None, init=False)
    built: bool = field(default=False, init=False)

    def build(self) -> None:
        c = self.config
        self.segment = merge(self.sources, c.recipe, c.dtype, c.metric)
        self.built = True


class VectorIndex:
    """The in-memory index of one tenant/index (see the module docstring).

    ``head_capacity``: rows after which :meth:`needs_seal` says yes. Merging is
    size-tiered: ``merge_factor`` segments of one size tier (live rows within a factor of
    ``merge_factor`` of each other, counted in ``head_capacity`` units) are merged, and
    the smallest are merged whenever there are more than ``max_tail_segments``. When the
    writer is idle (``idle=True``), segments under ``compact_rows`` live rows (default 10
    Heads) are merged into one while they fit in it: a search then descends one graph where
    a burst of writes left several (at 100k rows, 3 -> 1), and merges never compete with a
    burst for the one builder thread.
    Raises :class:`InvalidRequest` (``field="recipe"``) for a recipe FAISS cannot build."""

    def __init__(
        self,
        config: IndexConfig,
        *,
        head_capacity: int = 20_000,
        merge_factor: int = 4,
        max_tail_segments: int = 8,
        compact_rows: int | None = None,
    ) -> None:
        if head_capacity < 1 or merge_factor < 2 or max_tail_segments < 1:
            raise ValueError("head_capacity >= 1, merge_factor >= 2, max_tail_segments >= 1")
        check_recipe(config.recipe, config.dtype, config.dim, config.metric)
        self.config = config
        self.head_capacity = head_capacity
        self.merge_factor = merge_factor
        self.max_tail_segments = max_tail_segments
        self.compact_rows = compact_rows if compact_rows is not None else 10 * head_capacity
        self._lock = threading.Lock()
        self._view = _View(self._new_head(), (), ())
        self._sealing: set[HeadIndex] = set()  # frozen Heads with a job out
        self._merging = False
        self._next_segment = 0
        # Exact re-ranking of quantised segments' candidates (see ``search``): set by the
        # owner, which keeps every row's fp32 vector elsewhere (the node's state store).
        self.exact: ExactVectors | None = None
        self.refine_factor = DEFAULT_REFINE_FACTOR

    def _new_head(self) -> HeadIndex:
        return HeadIndex(self.config.dim, self.config.metric)

    def _name(self, segment: TailSegment) -> TailSegment:
        if not segment.name:
            # Unique across indexes too, so a snapshot may hard-link another's files.
            segment.name = f"seg-{self._next_segment:06d}-{uuid.uuid4().hex[:12]}"
            self._next_segment += 1
        return segment

    # -- writes (the writer thread) ---------------------------------------------------

    def __len__(self) -> int:
        """Live rows."""
        v = self._view
        return len(v.head) + sum(len(h) for h in v.frozen) + sum(len(s) for s in v.segments)

    def __contains__(self, label: object) -> bool:
        v = self._view
        parts: Iterable[Any] = (v.head, *v.frozen, *v.segments)
        return any(label in p for p in parts)

    def upsert(
        self,
        label: int,
        vector: Vector,
        tags: Iterable[str] = (),
        numeric: Mapping[str, float] | None = None,
    ) -> None:
        """Add one row, searchable when this returns. Raises :class:`DimensionMismatch`,
        :class:`InvalidRequest` for a non-finite vector, or ``ValueError`` if ``label`` is
        live already (labels are unique by contract; delete the old one first)."""
        vec = np.asarray(vector, dtype=np.float32)
        if vec.shape != (self.config.dim,):
            raise DimensionMismatch(self.config.dim, int(vec.size))
        if not np.isfinite(vec).all():
            raise InvalidRequest("vector contains NaN or infinity", field="vector")
        with self._lock:
            if label in self:
                raise ValueError(f"label {label} is already in the index")
            self._view.head.add(label, vec, tags, numeric)

    def upsert_many(
        self,
        labels: npt.NDArray[np.int64],
        vectors: npt.NDArray[np.float32],
        tags: Sequence[Iterable[str]] | None = None,
        numeric: Sequence[Mapping[str, float] | None] | None = None,
    ) -> None:
        """Add ``len(labels)`` rows (``vectors`` n x dim, raw), all searchable when this
        returns and none before: the batch form of :meth:`upsert`, with its errors, raised
        before any row is added."""
        labels = np.asarray(labels, dtype=np.int64)
        mat = np.asarray(vectors, dtype=np.float32)
        if mat.ndim != 2 or mat.shape[1] != self.config.dim:
            raise DimensionMismatch(self.config.dim, int(mat.shape[-1]) if mat.ndim else 0)
        if not np.isfinite(mat).all():
            raise InvalidRequest("vector contains NaN or infinity", field="vector")
        with self._lock:
            v = self._view
            for part in v.frozen:
                if any(label in part for label in labels.tolist()):
                    raise ValueError("a label is already in the index")
            if any(s.contains_any(labels) for s in v.segments):
                raise ValueError("a label is already in the index")
            v.head.add_many(labels, mat, tags, numeric)

    @property
    def unsealed_rows(self) -> int:
        """Rows in the Head and in frozen Heads not yet sealed (held as fp32)."""
        v = self._view
        return v.head.n_rows + sum(h.n_rows for h in v.frozen)

    def delete(self, label: int) -> bool:
        """Delete the row ``label``; False if there is no live row with it. A search
        that starts after this returns never returns it."""
        with self._lock:
            v = self._view
            parts: tuple[HeadIndex | TailSegment, ...] = (v.head, *v.frozen, *v.segments)
            return any(p.delete(label) for p in parts)

    # -- search (any thread) ----------------------------------------------------------

    def search(
        self,
        query: Vector,
        k: int,
        filter: Filter | None = None,
        *,
        ef_search: int | None = None,
        nprobe: int | None = None,
        record: bool = False,
    ) -> SearchOutcome:
        """The ``k`` best live rows passing ``filter`` across the Head and every segment.

        ``ef_search``/``nprobe`` override the HNSW/IVF defaults (nprobe counted in the
        recipe's lists). A part that returns fewer than ``min(k, its matching rows)``
        widens up to an exhaustive search (``widened`` steps), so fewer than ``k`` hits
        come back only when fewer than ``k`` rows match (``exhausted``). ``record``:
        fill ``SearchOutcome.depends`` (same hits; for the result cache)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InvalidRequest("k must be a positive integer", field="k")
        k = int(k)
        vec = np.asarray(query, dtype=np.float32)
        if vec.shape != (self.config.dim,):
            raise DimensionMismatch(self.config.dim, int(vec.size))
        if not np.isfinite(vec).all():
            raise InvalidRequest("vector contains NaN or infinity", field="vector")
        q = prepare(vec[None, :], self.config.metric)[0]
        v = self._view
        exact, refine = self.exact, self.refine_factor
        wide = k * refine if exact is not None and refine > 1 else k
        parts = [h.search(q, k, filter) for h in (v.head, *v.frozen)]
        depends: tuple[tuple[str, Probe], ...] | None = None
        if record:
            lossy: list[Candidates] = []
            probes: list[tuple[str, Probe]] = []
            for s in v.segments:
                narrow = not (wide > k and s.lossy)
                found, probe = s.search_recorded(
                    q, k if narrow else wide, filter, ef_search=ef_search, nprobe=nprobe
                )
                (parts if narrow else lossy).append(found)
                if probe is not None:
                    probes.append((s.name, probe))
            depends = tuple(probes)
        else:
            lossy = [
                s.search(q, wide, filter, ef_search=ef_search, nprobe=nprobe)
                for s in v.segments
                if wide > k and s.lossy
            ]
            parts += [
                s.search(q, k, filter, ef_search=ef_search, nprobe=nprobe)
                for s in v.segments
                if not (wide > k and s.lossy)
            ]
        matched = sum(p.matched for p in parts) + sum(p.matched for p in lossy)
        all_labels = [p.labels for p in parts]
        all_scores = [p.scores for p in parts]
        if lossy and exact is not None:
            cand, approx = top_k(
                np.concatenate([p.labels for p in lossy]),
                np.concatenate([p.scores for p in lossy]),
                wide,
                self.config.metric,
            )
            all_labels.append(cand)
            all_scores.append(self._rescore(q, cand, approx, exact))
        metric = self.config.metric
        labels, scores = top_k(np.concatenate(all_labels), np.concatenate(all_scores), k, metric)
        widened = max((p.level for p in parts), default=0)
        return SearchOutcome(labels, scores, widened, matched < k, matched, depends)

    def _rescore(
        self,
        q: Vector,
        labels: npt.NDArray[np.int64],
        approx: npt.NDArray[np.float32],
        exact: ExactVectors,
    ) -> npt.NDArray[np.float32]:
        """Exact scores of ``labels`` from their stored vectors; a label without one (its
        state not committed yet, or replaced meanwhile) keeps its approximate score."""
        if labels.size == 0:
            return approx
        found = exact(labels.tolist())
        have = [i for i, x in enumerate(found) if x is not None]
        if not have:
            return approx
        mat = prepare(np.stack([found[i] for i in have]), self.config.metric)  # type: ignore[misc]
        l2 = self.config.metric is Metric.L2
        exact_scores = ((mat - q) ** 2).sum(axis=1) if l2 else mat @ q
        out = approx.copy()
        out[have] = exact_scores
        return out

    # -- seal and merge ---------------------------------------------------------------

    def needs_seal(self) -> bool:
        """The Head is full, or a frozen Head whose job was aborted waits for a new one."""
        v = self._view
        return v.head.n_rows >= self.head_capacity or any(h not in self._sealing for h in v.frozen)

    def begin_seal(self) -> SealJob | None:
        """Freeze the Head (it stays searchable) behind a fresh one and return the job to
        seal it; None if the Head is empty. A frozen Head whose job was aborted comes
        first."""
        with self._lock:
            v = self._view
            for head in v.frozen:
                if head not in self._sealing:
                    self._sealing.add(head)
                    return SealJob(head, self.config)
            if v.head.n_rows == 0:
                return None
            self._view = _View(self._new_head(), (*v.frozen, v.head), v.segments)
            self._sealing.add(v.head)
            return SealJob(v.head, self.config)

    def finish_seal(self, job: SealJob) -> None:
        """Install ``job``'s segment in place of its frozen Head, with the deletes the
        Head took while it was being built."""
        if not job.built:
            raise ValueError("finish_seal before SealJob.build")
        with self._lock:
            v = self._view
            if not any(h is job.head for h in v.frozen):
                raise ValueError("this SealJob is not pending on this index")
            segments = v.segments
            seg = job.segment
            if seg is not None:
                seg.delete_many(job.head.dead_labels())
                if len(seg):
                    segments = (*segments, self._name(seg))
            frozen = tuple(h for h in v.frozen if h is not job.head)
            self._view = _View(v.head, frozen, segments)
            self._sealing.discard(job.head)

    def abort_seal(self, job: SealJob) -> None:
        """Give up on ``job``; its Head stays frozen and searchable until a later
        :meth:`begin_seal` hands it out again."""
        with self._lock:
            self._sealing.discard(job.head)

    def _pick_merge(
        self, segments: tuple[TailSegment, ...], idle: bool = False
    ) -> tuple[TailSegment, ...]:
        f = self.merge_factor
        tiers: dict[int, list[TailSegment]] = {}
        for s in segments:
            units = max(len(s), 1) / self.head_capacity
            tiers.setdefault(max(0, math.floor(math.log(units, f) + 1e-9)), []).append(s)
        for tier in sorted(tiers):
            if len(tiers[tier]) >= f:
                return tuple(sorted(tiers[tier], key=len)[:f])
        if len(segments) > self.max_tail_segments:
            return tuple(sorted(segments, key=len)[: len(segments) - self.max_tail_segments + 1])
        mostly_dead = [s for s in segments if len(s) * 2 < s.n_rows]
        if mostly_dead:
            return (min(mostly_dead, key=len),)
        if idle:
            small = sorted((s for s in segments if len(s) < self.compact_rows), key=len)
            while len(small) >= 2 and sum(len(s) for s in small) > self.compact_rows:
                small.pop()  # the largest that does not fit
            if len(small) >= 2:
                return tuple(small)
        return ()

    def needs_merge(self, idle: bool = False) -> bool:
        return not self._merging and bool(self._pick_merge(self._view.segments, idle))

    def begin_merge(self, idle: bool = False) -> MergeJob | None:
        """Pick segments to merge (one merge at a time; ``idle``: the writer has nothing to
        apply, see the class docstring); None if nothing needs it."""
        with self._lock:
            if self._merging:
                return None
            sources = self._pick_merge(self._view.segments, idle)
            if not sources:
                return None
            self._merging = True
            return MergeJob(sources, self.config)

    def finish_merge(self, job: MergeJob) -> None:
        """Replace ``job``'s sources by the merged segment, with the deletes they took
        while it was being built."""
        if not job.built:
            raise ValueError("finish_merge before MergeJob.build")
        with self._lock:
            v = self._view
            seg = job.segment
            keep = tuple(s for s in v.segments if all(s is not src for src in job.sources))
            if len(keep) != len(v.segments) - len(job.sources):
                raise ValueError("this MergeJob is not pending on this index")
            if seg is not None:
                for src in job.sources:
                    seg.delete_many(src.labels[~src.alive])
                if len(seg):
                    keep = (*keep, self._name(seg))
            self._view = _View(v.head, v.frozen, keep)
            self._merging = False

    def abort_merge(self, job: MergeJob) -> None:
        with self._lock:
            self._merging = False

    # -- introspection ----------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        v = self._view
        heads = (v.head, *v.frozen)
        segments: list[dict[str, Any]] = [
            {
                "name": s.name,
                "rows": s.n_rows,
                "live": len(s),
                "recipe": s.recipe,
                "recipe_used": s.recipe_used,
                "bytes": s.nbytes,
            }
            for s in v.segments
        ]
        return {
            "live": len(self),
            "head_rows": v.head.n_rows,
            "frozen_head_rows": sum(h.n_rows for h in v.frozen),
            "segments": segments,
            "bytes": sum(h.nbytes for h in heads) + sum(s["bytes"] for s in segments),
        }

    # -- persistence ------------------------------------------------------------------

    def save(
        self,
        directory: str | os.PathLike[str],
        *,
        link_from: str | os.PathLike[str] | None = None,
    ) -> None:
        """Write a snapshot into ``directory`` (owned by this index) and publish it
        atomically: files go to a new generation folder, are fsynced, and only then does
        ``CURRENT`` (replaced with ``os.replace``) name it. A crash before that leaves the
        previous snapshot readable. A segment's FAISS file never changes, so it is
        hard-linked, where it exists, from the previous generation in ``directory`` or
        from ``link_from`` (an earlier snapshot of this index saved elsewhere) instead of
        being written again. Contents are those of the moment the writer lock is held."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        with self._lock:
            v = self._view
            heads = [h.export() for h in (v.head, *v.frozen)]
            alive = [s.alive.copy() for s in v.segments]
        previous = _current(root)
        gen = 0 if previous is None else int(previous.name.split("-")[1]) + 1
        out = root / f"gen-{gen:08d}"
        if out.exists():
            shutil.rmtree(out)
        out.mkdir()
        head = _concat_rows(heads, self.config.dim)
        _save_rows(out / "head.npz", head)
        sources = [g for g in (previous, _current(Path(link_from)) if link_from else None) if g]
        names = []
        for seg, live in zip(v.segments, alive, strict=True):
            name = seg.name
            links = [g / name / "index.faiss" for g in sources]
            link = next((p for p in links if p.exists()), None)
            seg.save(out / name, alive=live, link_index_from=link)
            names.append(name)
        manifest = {
            "format": FORMAT,
            "dim": self.config.dim,
            "metric": self.config.metric.value,
            "dtype": self.config.dtype.value,
            "recipe": self.config.recipe,
            "segments": names,
            "next_segment": self._next_segment,
        }
        (out / "manifest.json").write_text(json.dumps(manifest))
        for p in (out / "head.npz", out / "manifest.json", out):
            fsync_path(p)
        tmp = root / (_CURRENT + ".tmp")
        tmp.write_text(out.name)
        fsync_path(tmp)
        os.replace(tmp, root / _CURRENT)
        fsync_path(root)
        for old in root.glob("gen-*"):
            if old.name != out.name:
                shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def load(
        cls, config: IndexConfig, directory: str | os.PathLike[str], **kwargs: int
    ) -> VectorIndex:
        """The index saved in ``directory`` (``kwargs`` as for the constructor). Raises
        :class:`SegmentCorrupt` if there is no snapshot, it cannot be read, or it was
        saved for another dim or metric."""
        root = Path(directory)
        gen = _current(root)
        if gen is None:
            raise SegmentCorrupt(f"{root}: no snapshot ({_CURRENT} missing)")
        try:
            manifest = json.loads((gen / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            raise SegmentCorrupt(f"{gen}: {exc}") from exc
        if manifest.get("format") != FORMAT:
            raise SegmentCorrupt(f"{gen}: unknown format {manifest.get('format')}")
        if manifest.get("dim") != config.dim or manifest.get("metric") != config.metric.value:
            saved = f"{manifest.get('dim')}/{manifest.get('metric')}"
            raise SegmentCorrupt(
                f"{gen}: saved for dim/metric {saved}, config has {config.dim}/{config.metric}"
            )
        index = cls(config, **kwargs)
        rows = _load_rows(gen / "head.npz", config.dim)
        head = HeadIndex.from_rows(rows, config.metric)
        segments = []
        for name in manifest["segments"]:
            seg = TailSegment.load(gen / name)
            seg.name = name
            segments.append(seg)
        index._next_segment = int(manifest.get("next_segment", len(segments)))
        index._view = _View(head, (), tuple(segments))
        return index


def _current(root: Path) -> Path | None:
    try:
        name = (root / _CURRENT).read_text().strip()
    except FileNotFoundError:
        return None
    return root / name


def _concat_rows(parts: list[SegmentRows], dim: int) -> SegmentRows:
    n = sum(len(p) for p in parts)
    labels = np.concatenate([p.labels for p in parts] or [np.empty(0, np.int64)])
    order = np.argsort(labels, kind="stable")
    vectors = np.concatenate([p.vectors for p in parts] or [np.empty((0, dim), np.float32)])
    offsets = np.cumsum([0] + [len(p) for p in parts])
    new_of_new = np.empty(n, dtype=np.int64)
    new_of_new[order] = np.arange(n)
    columns = RowColumns.gather(
        [(p.columns, new_of_new[o : o + len(p)]) for p, o in zip(parts, offsets, strict=False)],
        n,
    )
    return SegmentRows(labels[order], vectors[order], columns)


def _save_rows(path: Path, rows: SegmentRows) -> None:
    with open(path, "wb") as f:
        arrays: dict[str, Any] = {"labels": rows.labels, "vectors": rows.vectors}
        arrays.update(rows.columns.to_arrays())
        np.savez(f, **arrays)


def _load_rows(path: Path, dim: int) -> SegmentRows:
    try:
        with np.load(path, allow_pickle=False) as z:
            labels = z["labels"].astype(np.int64)
            vectors = z["vectors"].astype(np.float32).reshape(-1, dim)
            n = int(labels.shape[0])
            if vectors.shape[0] != n:
                raise ValueError("labels and vectors disagree")
            columns = RowColumns.from_arrays(n, z)
    except (OSError, ValueError, KeyError) as exc:
        raise SegmentCorrupt(f"{path}: {exc}") from exc
    return SegmentRows(labels, vectors, columns)
