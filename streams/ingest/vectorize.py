"""Smart vectorization: what to do with each embedded chunk, and why.

:class:`SmartVectorizer` implements the processor's :class:`~streams.ingest.decision.Vectorizer`
hook. Per chunk it scores

* **importance** in [0, 1]: a base, plus the index's declared weights for the chunk's
  fields (``source_type:incident``, ``channel_id:ops``, any scalar of the Source's meta as
  ``key:value``), plus error/stack-trace and workflow patterns in the text, minus a penalty
  for very short text and plus a little for long text;
* **novelty** in [0, 1]: ``1 - cosine`` to its nearest neighbour already indexed (the
  index's own search) or decided earlier in this process (a window of recent chunks, which
  covers chunks of the same batch that are not indexed yet);

and decides, first rule that matches::

    cosine >= duplicate_similarity       Duplicate(of)  text kept (text-only), the
                                                        representative lists its members
    importance >= critical               IndexNow       priority critical
    importance < text_only_below         TextOnly       keyword-searchable, no vector
    novelty < temporary_novelty          Temporary      a vector with a TTL; promoted
                                                        when a search hits it
    otherwise                            Queue(p)       p = high / medium / low by
                                                        importance
    (utilisation >= tight_utilisation:   low -> TextOnly, medium -> Temporary)

Every decision carries its reasons (``code: detail``) and, in ``Decision.fields``, the
payload fields the processor writes down with the chunk (``meta.vectorize``); the
counters per decision and per reason code are in ``VEC.INFO``/HTTP stats (``vectorize``).

Duplicates keep their own (text-only) record with ``duplicate_of``; once attached to a
service the vectorizer also writes each representative's ``meta.members``
(:meth:`SmartVectorizer.collapse`, every ``collapse_interval_s``).

Queue: a critical/high chunk is appended with its batch; a medium/low one carries
``Decision.defer`` (its priority), and the embedder processor holds it in its RocksDB
state and appends it later, by priority (see :mod:`streams.ingest.processor`, "Held
chunks"). :class:`DecisionQueue` is the in-memory equivalent for other callers (critical
first, FIFO within a priority); a caller must drain it before committing the input position
that covers what it holds.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import json
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from streams.index.model import IndexConfig, Metric
from streams.ingest.chunker import Chunk
from streams.ingest.decision import Decision, VectorizeContext

__all__ = [
    "DecisionQueue",
    "Duplicate",
    "ImportanceScorer",
    "IndexNeighbours",
    "IndexNow",
    "NeighbourLookup",
    "Priority",
    "Queue",
    "SmartVectorizer",
    "Temporary",
    "TextOnly",
    "VectorizeDecision",
    "VectorizePolicy",
]

Vec = npt.NDArray[np.float32]


class Priority(enum.IntEnum):
    """Queue order: lower drains first."""

    CRITICAL = 0
    HIGH = 1
    MEDIUM = 2
    LOW = 3


@dataclass(frozen=True, slots=True)
class VectorizeDecision(Decision):
    """A :class:`Decision` with what led to it. ``kind`` names the subclass."""

    kind: str = "index_now"
    priority: Priority | None = None
    importance: float = 0.0
    novelty: float = 1.0
    reasons: tuple[str, ...] = ()
    of: str | None = None  # Duplicate: the representative's id

    def record(self) -> dict[str, Any]:
        """What is written with the chunk (``meta.vectorize``)."""
        out: dict[str, Any] = {
            "decision": self.kind,
            "importance": round(self.importance, 4),
            "novelty": round(self.novelty, 4),
            "reasons": list(self.reasons),
        }
        if self.priority is not None:
            out["priority"] = self.priority.name.lower()
        if self.ttl_ms is not None:
            out["ttl_ms"] = self.ttl_ms
        if self.of is not None:
            out["duplicate_of"] = self.of
        return out


def _decision(
    kind: str,
    *,
    index: bool = True,
    ttl_ms: int | None = None,
    text_only: bool = False,
    priority: Priority | None = None,
    importance: float,
    novelty: float,
    reasons: tuple[str, ...],
    of: str | None = None,
) -> VectorizeDecision:
    decision = VectorizeDecision(
        index=index,
        ttl_ms=ttl_ms,
        text_only=text_only,
        reason=f"{kind}: " + "; ".join(reasons),
        kind=kind,
        priority=priority,
        importance=importance,
        novelty=novelty,
        reasons=reasons,
        of=of,
        defer=(
            int(priority)
            if kind == "queue" and priority is not None and priority >= Priority.MEDIUM
            else None
        ),
    )
    fields: dict[str, Any] = {"vectorize": decision.record()}
    if of is not None:
        fields["duplicate_of"] = of
    object.__setattr__(decision, "fields", fields)  # recorded with the chunk
    return decision


# The five decisions, as constructors with the names the design uses.
def IndexNow(*, importance: float, novelty: float, reasons: tuple[str, ...]) -> VectorizeDecision:
    return _decision(
        "index_now",
        priority=Priority.CRITICAL,
        importance=importance,
        novelty=novelty,
        reasons=reasons,
    )


def Queue(
    priority: Priority, *, importance: float, novelty: float, reasons: tuple[str, ...]
) -> VectorizeDecision:
    return _decision(
        "queue", priority=priority, importance=importance, novelty=novelty, reasons=reasons
    )


def Temporary(
    ttl_ms: int, *, importance: float, novelty: float, reasons: tuple[str, ...]
) -> VectorizeDecision:
    return _decision(
        "temporary",
        ttl_ms=ttl_ms,
        priority=Priority.LOW,
        importance=importance,
        novelty=novelty,
        reasons=reasons,
    )


def TextOnly(*, importance: float, novelty: float, reasons: tuple[str, ...]) -> VectorizeDecision:
    return _decision(
        "text_only", text_only=True, importance=importance, novelty=novelty, reasons=reasons
    )


def Duplicate(
    of: str, *, importance: float, novelty: float, reasons: tuple[str, ...]
) -> VectorizeDecision:
    return _decision(
        "duplicate", text_only=True, importance=importance, novelty=novelty, reasons=reasons, of=of
    )


# -- importance --------------------------------------------------------------------------

ERROR_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"Traceback \(most recent call last\)"),
    re.compile(r"^\s+at [\w.$<>/]+\([\w.]*(?::\d+)?\)", re.MULTILINE),  # JVM stack frame
    re.compile(r"^\s+File \"[^\"]+\", line \d+", re.MULTILINE),  # Python stack frame
    re.compile(r"\b[A-Z]\w*(?:Error|Exception)\b"),
    re.compile(r"\b(?:ERROR|FATAL|CRITICAL|PANIC)\b|\bpanic:"),
    re.compile(r"\b(?:segmentation fault|core dumped|out of memory|OOMKilled)\b", re.I),
    re.compile(r"\bexit(?:ed)? (?:with )?(?:code|status) [1-9]\d*", re.I),
)
WORKFLOW_PATTERN = re.compile(
    r"\b(?:TODO|FIXME|action items?|next steps?|deadline|due (?:date|by)|decided|decision|"
    r"approved?|sign[- ]off|roll ?back|deploy(?:ed|ment)?|release[ds]?|incident|"
    r"post-?mortem|outage|on[- ]call|escalat\w+|runbook|hotfix)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class VectorizePolicy:
    """One index's policy. ``weights``: declared importance per field value, e.g.
    ``{"source_type:incident": 0.4, "channel_id:random": -0.2}``."""

    weights: Mapping[str, float] = field(default_factory=dict)
    base: float = 0.3
    error_weight: float = 0.4
    workflow_weight: float = 0.2
    short_chars: int = 40
    short_penalty: float = 0.25
    long_chars: int = 600
    long_bonus: float = 0.1
    critical: float = 0.8
    high: float = 0.6
    medium: float = 0.4
    text_only_below: float = 0.15
    duplicate_similarity: float = 0.95
    temporary_novelty: float = 0.15
    temporary_ttl_ms: int = 7 * 24 * 3_600_000
    tight_utilisation: float = 0.9

    def __post_init__(self) -> None:
        if not 0 <= self.text_only_below <= self.medium <= self.high <= self.critical <= 1:
            raise ValueError("need 0 <= text_only_below <= medium <= high <= critical <= 1")
        if not 0 < self.duplicate_similarity <= 1 or not 0 <= self.temporary_novelty <= 1:
            raise ValueError("duplicate_similarity in (0, 1], temporary_novelty in [0, 1]")
        if self.temporary_ttl_ms < 1:
            raise ValueError("temporary_ttl_ms must be positive")


class ImportanceScorer:
    """Importance of a chunk's text and fields under a :class:`VectorizePolicy`."""

    def score(
        self, policy: VectorizePolicy, text: str, fields: Mapping[str, str]
    ) -> tuple[float, list[str]]:
        """(importance in [0, 1], reasons)."""
        score = policy.base
        reasons: list[str] = []
        for name, value in sorted(fields.items()):
            weight = policy.weights.get(f"{name}:{value}")
            if weight:
                score += weight
                reasons.append(f"weight: {name}:{value} {weight:+g}")
        for pattern in ERROR_PATTERNS:
            m = pattern.search(text)
            if m:
                score += policy.error_weight
                reasons.append(f"error_pattern: {m.group(0).strip()[:40]!r}")
                break
        m = WORKFLOW_PATTERN.search(text)
        if m:
            score += policy.workflow_weight
            reasons.append(f"workflow: {m.group(0)!r}")
        n = len(text.strip())
        if n < policy.short_chars:
            score -= policy.short_penalty
            reasons.append(f"short: {n} chars")
        elif n >= policy.long_chars:
            score += policy.long_bonus
            reasons.append(f"long: {n} chars")
        return min(1.0, max(0.0, score)), reasons


def chunk_fields(context: VectorizeContext) -> dict[str, str]:
    """The fields declared weights match: the Source's type, channel, user, and the
    scalars of its meta."""
    s = context.source
    out = {"source_type": s.type.value}
    if s.channel_id:
        out["channel_id"] = s.channel_id
    if s.user_id:
        out["user_id"] = s.user_id
    if s.meta:
        try:
            meta = json.loads(s.meta)
        except ValueError:
            meta = None
        if isinstance(meta, dict):
            for k, v in meta.items():
                if isinstance(v, (str, int, float, bool)) and k not in out:
                    out[str(k)] = str(v).lower() if isinstance(v, bool) else str(v)
    return out


# -- novelty -----------------------------------------------------------------------------


class NeighbourLookup(Protocol):
    def nearest(self, config: IndexConfig, vector: Vec) -> tuple[str, float] | None:
        """The indexed vector nearest to ``vector`` and its cosine, or None if empty."""


class IndexNeighbours:
    """:class:`NeighbourLookup` over a query node's own index and state (the index's
    search, without the result cache: ingestion is not a user's query)."""

    def __init__(self, service: Any) -> None:  # a VectorService (kept loose: no cycle)
        self.service = service

    def nearest(self, config: IndexConfig, vector: Vec) -> tuple[str, float] | None:
        vi = self.service.indexer.indexes.get(config.key)
        if vi is None or len(vi) == 0:
            return None
        # a few candidates, not one: while the node applies an update of the nearest row,
        # its new label is in the index before its payload is committed (and the old one
        # is deleted after), so the top label alone can be briefly unjoinable; the next
        # candidate is then that row's other copy (a lone top-1 answered "no neighbour",
        # seen as a flaky decision under a loaded full suite)
        out = vi.search(np.asarray(vector, dtype=np.float32), _CANDIDATES, None)
        for label, score in zip(out.labels.tolist(), out.scores.tolist(), strict=True):
            found = self.service.state.hit(config.key, int(label))
            if found is None:
                continue
            if config.metric is Metric.COSINE:  # the score is the cosine already
                return found[0], float(score)
            entry = self.service.state.entry(config.key, found[0])
            if entry is not None:
                return found[0], _cosine(vector, entry.vector)
        return None


_CANDIDATES = 4  # IndexNeighbours.nearest: labels tried, best first


def _cosine(a: Vec, b: Vec) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return 0.0 if na == 0 or nb == 0 else float(np.dot(a, b)) / (na * nb)


# -- the queue ---------------------------------------------------------------------------

T = TypeVar("T")


class DecisionQueue(Generic[T]):
    """Items drained by priority (critical first), first in first out within one."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, T]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()

    def push(self, priority: Priority, item: T) -> None:
        with self._lock:
            heapq.heappush(self._heap, (int(priority), next(self._seq), item))

    def drain(self, max_items: int | None = None) -> list[tuple[Priority, T]]:
        out: list[tuple[Priority, T]] = []
        with self._lock:
            while self._heap and (max_items is None or len(out) < max_items):
                p, _, item = heapq.heappop(self._heap)
                out.append((Priority(p), item))
        return out

    def sizes(self) -> dict[str, int]:
        with self._lock:
            counts = Counter(Priority(p).name.lower() for p, _, _ in self._heap)
        return {p.name.lower(): counts.get(p.name.lower(), 0) for p in Priority}

    def __len__(self) -> int:
        return len(self._heap)


# -- the vectorizer ----------------------------------------------------------------------


class _Window:
    """The last ``size`` chunks decided (ids and unit vectors) in a ring buffer: novelty
    against chunks not indexed yet, with one matrix product."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.ids: list[str] = []
        self.rows: Vec | None = None
        self.next = 0

    def add(self, id: str, vector: Vec) -> None:
        norm = float(np.linalg.norm(vector))
        unit = np.asarray(vector, dtype=np.float32) / (norm or 1.0)
        if self.rows is None:
            self.rows = np.zeros((self.size, unit.shape[0]), dtype=np.float32)
        if len(self.ids) < self.size:
            self.ids.append(id)
            self.rows[len(self.ids) - 1] = unit
        else:
            self.ids[self.next] = id
            self.rows[self.next] = unit
            self.next = (self.next + 1) % self.size

    def nearest(self, vector: Vec, exclude: str) -> tuple[str, float] | None:
        if self.rows is None or not self.ids:
            return None
        norm = float(np.linalg.norm(vector))
        if norm == 0:
            return None
        sims = self.rows[: len(self.ids)] @ (np.asarray(vector, dtype=np.float32) / norm)
        for i in np.argsort(-sims)[:2].tolist():  # the best that is not the chunk itself
            if self.ids[i] != exclude:
                return self.ids[i], float(sims[i])
        return None


@dataclass
class _IndexStats:
    decisions: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=20))
    window: _Window = field(default_factory=lambda: _Window(512))
    members: dict[str, set[str]] = field(default_factory=dict)  # representative -> members


class SmartVectorizer:
    """The decision policy (module docstring). ``policies``: per ``tenant/index``;
    ``neighbours``: novelty lookups (None: only the in-process window); ``utilisation``:
    the index's budget utilisation (the capacity manager's), for tighter admission."""

    def __init__(
        self,
        *,
        policies: Mapping[str, VectorizePolicy] | None = None,
        default: VectorizePolicy | None = None,
        neighbours: NeighbourLookup | None = None,
        utilisation: Callable[[IndexConfig], float] | None = None,
        scorer: ImportanceScorer | None = None,
        collapse_interval_s: float = 5.0,
    ) -> None:
        self.policies = dict(policies or {})
        self.default = default or VectorizePolicy()
        self.neighbours = neighbours
        self.utilisation = utilisation
        self.scorer = scorer or ImportanceScorer()
        self.queue: DecisionQueue[tuple[Chunk, Vec, VectorizeContext, VectorizeDecision]] = (
            DecisionQueue()
        )
        self._stats: dict[str, _IndexStats] = {}
        self._lock = threading.Lock()
        self._service: Any = None  # set by attach(): collapse() runs from decide()
        self.collapse_interval_s = collapse_interval_s
        self._collapsed_s: dict[str, float] = {}

    def policy(self, index_key: str) -> VectorizePolicy:
        return self.policies.get(index_key, self.default)

    def decide(self, chunk: Chunk, vector: Vec, context: VectorizeContext) -> VectorizeDecision:
        config = context.config
        policy = self.policy(config.key)
        importance, reasons = self.scorer.score(policy, chunk.text, chunk_fields(context))
        with self._lock:
            stats = self._stats.setdefault(config.key, _IndexStats())
            nearest = self._nearest(config, vector, stats, exclude=chunk.id)
            novelty = 1.0 if nearest is None else max(0.0, 1.0 - nearest[1])
            decision = self._rule(
                policy, config, chunk, importance, novelty, nearest, tuple(reasons)
            )
            self._count(stats, chunk.id, decision)
            if decision.of is not None:
                stats.members.setdefault(decision.of, set()).add(chunk.id)
            elif not decision.text_only:
                stats.window.add(chunk.id, vector)
        self._maybe_collapse(config)
        return decision

    def _maybe_collapse(self, config: IndexConfig) -> None:
        """Every ``collapse_interval_s`` per index, once attached to a service."""
        if self._service is None or not self.members(config.key):
            return
        now = time.monotonic()
        if now - self._collapsed_s.get(config.key, -1e9) < self.collapse_interval_s:
            return
        self._collapsed_s[config.key] = now
        self.collapse(self._service, config.tenant, config.index)

    def submit(self, chunk: Chunk, vector: Vec, context: VectorizeContext) -> VectorizeDecision:
        """:meth:`decide`, and put a ``queue`` decision on :attr:`queue`."""
        decision = self.decide(chunk, vector, context)
        if decision.kind == "queue" and decision.priority is not None:
            self.queue.push(decision.priority, (chunk, vector, context, decision))
        return decision

    def _nearest(
        self, config: IndexConfig, vector: Vec, stats: _IndexStats, *, exclude: str
    ) -> tuple[str, float] | None:
        best: tuple[str, float] | None = None
        if self.neighbours is not None:
            found = self.neighbours.nearest(config, vector)
            if found is not None and found[0] != exclude:  # a re-ingested chunk is itself
                best = found
        recent = stats.window.nearest(vector, exclude)
        if recent is not None and (best is None or recent[1] > best[1]):
            best = recent
        return best

    def _rule(
        self,
        p: VectorizePolicy,
        config: IndexConfig,
        chunk: Chunk,
        importance: float,
        novelty: float,
        nearest: tuple[str, float] | None,
        reasons: tuple[str, ...],
    ) -> VectorizeDecision:
        kw: dict[str, Any] = {"importance": importance, "novelty": novelty}
        if nearest is not None and nearest[1] >= p.duplicate_similarity:
            return Duplicate(
                nearest[0],
                reasons=(*reasons, f"near_duplicate: of {nearest[0]} (cosine {nearest[1]:.3f})"),
                **kw,
            )
        if importance >= p.critical:
            return IndexNow(reasons=(*reasons, f"critical: importance {importance:.2f}"), **kw)
        if importance < p.text_only_below:
            return TextOnly(reasons=(*reasons, f"low_importance: {importance:.2f}"), **kw)
        if novelty < p.temporary_novelty and nearest is not None:
            return Temporary(
                p.temporary_ttl_ms,
                reasons=(*reasons, f"low_novelty: {novelty:.2f}, near {nearest[0]}"),
                **kw,
            )
        priority = (
            Priority.HIGH
            if importance >= p.high
            else Priority.MEDIUM
            if importance >= p.medium
            else Priority.LOW
        )
        util = self.utilisation(config) if self.utilisation is not None else 0.0
        if util >= p.tight_utilisation and priority is Priority.LOW:
            return TextOnly(reasons=(*reasons, f"capacity: utilisation {util:.0%}"), **kw)
        if util >= p.tight_utilisation and priority is Priority.MEDIUM:
            return Temporary(
                p.temporary_ttl_ms, reasons=(*reasons, f"capacity: utilisation {util:.0%}"), **kw
            )
        return Queue(
            priority,
            reasons=(*reasons, f"priority: {priority.name.lower()} (importance {importance:.2f})"),
            **kw,
        )

    def _count(self, stats: _IndexStats, id: str, decision: VectorizeDecision) -> None:
        stats.decisions[decision.kind] += 1
        for reason in decision.reasons:
            stats.reasons[reason.partition(":")[0]] += 1
        stats.recent.append({"id": id, **decision.record()})

    def members(self, index_key: str) -> dict[str, list[str]]:
        """Representative id -> the near-duplicate chunks collapsed into it (this
        process's decisions; :meth:`collapse` writes them to the representatives)."""
        with self._lock:
            stats = self._stats.get(index_key)
            return {} if stats is None else {k: sorted(v) for k, v in stats.members.items()}

    def collapse(self, service: Any, tenant: str, index: str) -> dict[str, list[str]]:
        """Write each representative's ``meta.members`` (merged with what it lists); a
        representative not indexed yet, or changed meanwhile, is kept for the next call.
        Returns what was written.

        A Source chunk (written by the embedder processor: its record's ``version`` is its
        Source's version) is rewritten as its newest record with the merged members and
        the same version (:meth:`VectorService.rewrite_unchanged`, under the id's lock,
        only if the copy read is still the newest write: a capacity archive or a newer
        chunk appended meanwhile wins), and only while the node has applied every record
        of its partition (no newer copy is in the log that this process did not append,
        e.g. one a restarted node is replaying). A node-assigned version (``stored + 1``)
        there would make the processor's next version of that chunk go down in
        ``vectors``, and a copy read behind the newest append would put stale text after
        it. Any other vector is upserted with IF_VERSION (stored version + 1)."""
        from streams.index.exceptions import NotFound, VersionConflict
        from streams.index.model import VectorUpsert

        key = f"{tenant}/{index}"
        written: dict[str, list[str]] = {}
        for rep, new in self.members(key).items():
            entry = service.state.entry(key, rep)
            if entry is None:
                continue
            meta = json.loads(entry.meta) if entry.meta else {}
            if not isinstance(meta, dict):
                meta = {"value": meta}
            merged = sorted(set(meta.get("members") or []) | set(new))
            meta["members"] = merged
            if "source_version" in meta:  # a Source chunk: the processor's version
                if not _applied_all(service, entry.position) or service.rewrite_unchanged(
                    tenant, index, rep, entry.position, meta=json.dumps(meta), keep_ttl=True
                ) is None:
                    continue
            else:
                try:
                    service.upsert(
                        VectorUpsert(
                            tenant,
                            index,
                            rep,
                            entry.vector,
                            json.dumps(meta),
                            entry.tags,
                            dict(entry.numeric),
                        ),
                        if_version=entry.version,
                    )
                except (VersionConflict, NotFound):
                    continue
            written[rep] = merged
            with self._lock:
                self._stats[key].members.pop(rep, None)
        return written

    # -- VEC.INFO ----------------------------------------------------------------------
    def stats(self, index_key: str) -> dict[str, Any]:
        with self._lock:
            s = self._stats.get(index_key)
            if s is None:
                return {"decisions": {}, "reasons": {}, "queued": self.queue.sizes(), "recent": []}
            return {
                "decisions": dict(s.decisions),
                "reasons": dict(s.reasons),
                "queued": self.queue.sizes(),
                "pending_members": sum(len(v) for v in s.members.values()),
                "recent": list(s.recent),
            }

    def attach(self, service: Any) -> SmartVectorizer:
        """Show :meth:`stats` as the ``vectorize`` section of the service's ``info``, and
        write representatives' member lists through it (:meth:`collapse`) as decisions go."""
        service.info_sections["vectorize"] = self.stats
        self._service = service
        return self


def _applied_all(service: Any, position: str) -> bool:
    """Whether the node has applied every record of the partition of ``position`` (a
    ``vectors`` token): then no copy newer than the applied one is in the log, whoever
    appended it (a previous run's records a restarted node replays included)."""
    from streams.log.port import LogPosition

    pos = LogPosition.parse(position)
    end = service.log.end_offsets(pos.topic).get(pos.partition, 0)
    return bool(service.applied.reached({(pos.topic, pos.partition): end}))
