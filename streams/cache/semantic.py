"""L2: the semantic layer. Queries are clustered online and a cluster's cached result is
reused for a query close enough to the cluster's representative.

Online leader clustering: a query that finds no representative within the threshold is
searched fresh, and its point becomes the representative of a new cluster holding its
result; a later query within the threshold of it joins that cluster (is served its result).
Points are compared by cosine distance ``1 - cos``; for spaces whose metric is not cosine
(inner product, L2) the log of the norm ratio is added, since there a scaled query ranks or
scores differently. The rule is :func:`reuses` (cost-aware, below); :func:`serves` is its
distance-only part (distance at most the threshold, the hard cap).

Cost-aware reuse (:func:`reuses`): serving a cluster's result saves the search it cost
(``c``, the representative entry's ``compute_ms``) and risks a wrong answer, which costs the
user ``penalty`` ms. Reuse pays when ``c * (1 - p) > penalty * p``, i.e. when the
false-hit rate at that distance ``p = p_wrong(d) <= c / (c + penalty)``. ``p_wrong`` is a
:class:`FalseHitCurve` measured on QQP (:data:`TEXT_CURVE` with the text stage,
:data:`VECTOR_CURVE` by distance alone), nondecreasing, so the rule is a distance bar
that grows with the cost: a cheap search is reused only very close, a costly one farther,
never beyond the threshold (the cap). ``penalty`` 0 turns the cost part off (distance at
most the cap, the rule before). One bisect in a table of about 20 steps per lookup.

On the text path a second stage follows (:mod:`streams.cache.agreement`): when the query
comes with its text and a representative was added with its text, that representative
serves only if the two texts *agree* (:func:`agreement` at least ``min_agreement``):
same numbers, negation, persons, entities and content-word order, and a token LCS ratio
high enough. It exists because the default offline embedder is a bag of tokens ("poles
dislike russians" == "russians dislike poles"). :meth:`SemanticIndex.nearest` then returns
the nearest of the ``candidates`` closest representatives that passes it (None if none
does); the caller still applies the distance rule. A query without text (the vector path)
is compared by distance alone and never takes a representative added with text; a text
query never takes one added without.

Clusters are grouped by (space, index, filter, topK bucket): a query is only served a
result of the same filter, from a cluster whose result holds at least its ``k`` hits.
``space`` is ``"vector"`` (the query vector itself) or ``"text"`` (an embedding of the
query text, for the text path). Each representative points at a :class:`QueryKey` of the
result cache; the cached entry itself lives in :class:`ResultCache` and is invalidated
there exactly like an L0 entry. This class is the index of representatives only: no lock
(the :class:`CacheController` holds one), no I/O.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from streams.cache.agreement import TextFeatures, agreement, features
from streams.cache.keys import QueryKey
from streams.cache.tolerant import k_bucket
from streams.index.exceptions import InvalidRequest
from streams.index.filters import Filter
from streams.index.model import Metric

__all__ = [
    "CURVE_EDGES",
    "DEFAULT_L2_AGREEMENT",
    "DEFAULT_L2_PENALTY_MS",
    "DEFAULT_L2_TEXT_PENALTY_MS",
    "DEFAULT_L2_TEXT_THRESHOLD",
    "DEFAULT_L2_THRESHOLD",
    "DEFAULT_L2_VECTOR_THRESHOLD",
    "REFERENCE_COST_MS",
    "TEXT_CURVE",
    "VECTOR_CURVE",
    "FalseHitCurve",
    "SemanticIndex",
    "SemanticMatch",
    "reuses",
    "serves",
    "verified",
]

# Tuned together on the even rows of QQP with the default offline embedder
# (bench/semantic_eval.py; docs/benchmarks.md "Semantic cache (QQP)"): the pair with the
# highest hit rate whose precision there is at least 0.96 (target 0.95 plus a margin).
# Odd rows (reported): precision 0.951 [bootstrap 95% 0.935, 0.966], 1.7% of pairs served;
# distance alone reaches 0.95 at no threshold (best 0.907).
DEFAULT_L2_THRESHOLD = 0.02  # cosine distance
DEFAULT_L2_AGREEMENT = 0.8  # agreement() of the two texts (guards, then min(content, LCS))
# The tuning above holds for the text path only (query texts, with the text stage). A vector
# query has no text to check, so the vector path keeps the earlier, conservative distance.
DEFAULT_L2_TEXT_THRESHOLD = DEFAULT_L2_THRESHOLD
DEFAULT_L2_VECTOR_THRESHOLD = 0.003  # cosine distance, no text stage

F32 = npt.NDArray[np.float32]
Group = tuple[str, str, str, int]


@dataclass(frozen=True, slots=True)
class FalseHitCurve:
    """``p_wrong(d)``: the share of wrong answers among the hits served at cosine distance
    ``d``, a nondecreasing step function: ``rates[0]`` on ``[0, edges[0]]``, ``rates[i]`` on
    ``(edges[i-1], edges[i]]``, 1.0 beyond the last edge (not measured: the cost rule never
    reuses there)."""

    edges: tuple[float, ...]
    rates: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.edges) != len(self.rates) or not self.edges:
            raise ValueError("a curve needs one rate per edge")
        if list(self.edges) != sorted(set(self.edges)) or list(self.rates) != sorted(self.rates):
            raise ValueError("edges must increase and rates must not decrease")

    def p_wrong(self, distance: float) -> float:
        i = bisect_left(self.edges, distance)
        return self.rates[i] if i < len(self.rates) else 1.0

    def max_distance(self, cost_ms: float, penalty_ms: float) -> float:
        """The largest distance :func:`reuses` serves at this cost (before the cap); -1
        when none (the curve's first rate is already above ``c / (c + penalty)``)."""
        if penalty_ms <= 0.0:
            return math.inf
        ratio = cost_ms / (cost_ms + penalty_ms) if cost_ms > 0.0 else 0.0
        j = bisect_right(self.rates, ratio)
        return self.edges[j - 1] if j else -1.0


# p_wrong(d) measured on the even rows of QQP with the default offline embedder: pairs
# binned by distance, the false-hit share per bin, made nondecreasing by pooling adjacent
# violators (isotonic regression weighted by the pairs per bin). TEXT_CURVE: the pairs the
# text stage passes at DEFAULT_L2_AGREEMENT (the text path); VECTOR_CURVE: all pairs,
# distance alone (the vector path has no text; QQP text embeddings are the only labelled
# stand-in we have). Produced by
#   .venv/bin/python -m bench.semantic_eval --json /tmp/qqp.json   (its "calibration")
# and checked against that procedure by tests/test_issue4_audit.py (slow).
CURVE_EDGES = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02,
    0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
)  # fmt: skip
TEXT_CURVE = FalseHitCurve(
    CURVE_EDGES,
    (
        0.031, 0.031, 0.031, 0.039, 0.039, 0.039, 0.039, 0.050, 0.050,
        0.091, 0.154, 0.168, 0.168, 0.260, 0.310, 0.421, 0.652,
    ),
)  # fmt: skip
VECTOR_CURVE = FalseHitCurve(
    CURVE_EDGES,
    (
        0.096, 0.096, 0.096, 0.096, 0.127, 0.127, 0.127, 0.171, 0.172,
        0.218, 0.279, 0.279, 0.303, 0.337, 0.382, 0.417, 0.437,
    ),
)  # fmt: skip

# The default penalties reproduce the tuned thresholds at a typical search: the p50 of an
# uncached search of 100k vectors (docs/benchmarks.md, ~1.5 ms). Text: c / (c + 20) = 0.070
# lies in [0.050, 0.091), the step ending at 0.02 = DEFAULT_L2_TEXT_THRESHOLD; vector:
# c / (c + 12) = 0.111 lies in [0.096, 0.127), the step ending at 0.003. Cheaper searches
# get a tighter bar (text below ~0.62 ms, vector below ~1.27 ms: none), costlier ones a
# looser one up to the cap (the thresholds; raise them to let costly searches go farther).
REFERENCE_COST_MS = 1.5
DEFAULT_L2_TEXT_PENALTY_MS = 20.0
DEFAULT_L2_PENALTY_MS = 12.0  # the vector path


def reuses(
    distance: float, cost_ms: float, cap: float, penalty_ms: float, curve: FalseHitCurve
) -> bool:
    """Whether L2 serves a representative whose result cost ``cost_ms`` to a query at
    ``distance`` (module docstring, "Cost-aware reuse"): within the cap, and the expected
    saving ``c * (1 - p)`` is at least the expected loss ``penalty * p``."""
    if distance > cap:
        return False
    if penalty_ms <= 0.0:
        return True
    return curve.p_wrong(distance) * (cost_ms + penalty_ms) <= cost_ms


def serves(distance: npt.ArrayLike, threshold: float) -> npt.NDArray[np.bool_]:
    """Whether L2 reuses a cluster's result at ``distance`` from its representative."""
    out: npt.NDArray[np.bool_] = np.asarray(distance, dtype=np.float64) <= threshold
    return out


def verified(score: npt.ArrayLike, min_agreement: float) -> npt.NDArray[np.bool_]:
    """Whether texts with this :func:`agreement` pass L2's text stage: no guard failed
    (score above 0) and the score is at least ``min_agreement``."""
    s = np.asarray(score, dtype=np.float64)
    out: npt.NDArray[np.bool_] = (s > 0.0) & (s >= min_agreement)
    return out


@dataclass(frozen=True, slots=True)
class SemanticMatch:
    """The representative chosen; ``agreement`` is None when no text was compared;
    ``cost_ms``: what its result cost to compute (given to :meth:`SemanticIndex.add`)."""

    key: QueryKey
    distance: float
    agreement: float | None = None
    cost_ms: float = 0.0


# The vector path's prefilter (SemanticIndex.nearest with ``within``): each unit row is
# also kept projected by a fixed random orthonormal map to PROJ_DIMS dimensions. A
# projection with orthonormal rows never lengthens a vector, and for unit rows the cosine
# distance is half the squared Euclidean one, so a representative within ``within`` of the
# query is within sqrt(2 * within) of it in the projection: rows farther than that there
# are skipped without reading their full row (exact, no false negatives). One matmul over
# a (PROJ_DIMS + 1, n) array instead of (n, dim): 3,000 representatives of 384 dimensions
# read 400 KB instead of 4.6 MB. The array is stored transposed (a row per projected
# dimension: numpy's vector-matrix product over it is about twice as fast as over
# (n, PROJ_DIMS) rows) with a last row of -|Pr|^2 / 2, so one product gives
# Pr.Pq - |Pr|^2 / 2, which is at least (|Pq|^2 - c) / 2 exactly when |Pr - Pq|^2 <= c.
PROJ_DIMS = 16
_PROJ_SLACK = 1e-4  # float32 rounding of the projected distances
_PROJ: dict[int, F32] = {}


def _projection(dim: int) -> F32:
    """The fixed (PROJ_DIMS, dim) map with orthonormal rows (seeded: the same in every
    process)."""
    m = _PROJ.get(dim)
    if m is None:
        g = np.random.default_rng(dim).standard_normal((dim, PROJ_DIMS))
        q, _ = np.linalg.qr(g)  # (dim, PROJ_DIMS), orthonormal columns
        m = _PROJ[dim] = np.ascontiguousarray(q.T, dtype=np.float32)
    return m


class _Group:
    __slots__ = (
        "costs",
        "keys",
        "lognorm",
        "points",
        "proj",
        "projection",
        "rows",
        "size",
        "texted",
        "texts",
    )

    def __init__(self, dim: int) -> None:
        self.points = np.zeros((8, dim), dtype=np.float32)
        # the rows projected (PROJ_DIMS wide), where the dimension is larger than that
        self.projection = _projection(dim) if dim > PROJ_DIMS else None
        self.proj = np.zeros((PROJ_DIMS + 1, 8), dtype=np.float32)  # transposed, see above
        self.lognorm = np.zeros(8, dtype=np.float64)
        self.costs: list[float] = [0.0] * 8
        self.keys: list[QueryKey | None] = [None] * 8
        self.texts: list[TextFeatures | None] = [None] * 8
        self.rows: dict[QueryKey, int] = {}
        self.size = 0  # rows in use are [0, size); removal swaps the last row in
        self.texted = 0  # rows added with a text (none: nearest() is one argmax)


class SemanticIndex:
    """Representatives per group (module docstring). ``max_per_group`` bounds each group:
    a full group takes no new clusters until one is removed (eviction in the result cache
    removes its representative). ``min_agreement``: the text stage's bar; ``candidates``:
    how many of the closest representatives the text stage may look at per lookup."""

    def __init__(
        self,
        *,
        max_per_group: int = 4096,
        min_agreement: float = DEFAULT_L2_AGREEMENT,
        candidates: int = 4,
    ) -> None:
        if not 0.0 <= min_agreement <= 1.0:
            raise ValueError("min_agreement must be in [0, 1]")
        if candidates < 1:
            raise ValueError("candidates must be at least 1")
        self.max_per_group = max_per_group
        self.min_agreement = min_agreement
        self.candidates = candidates
        self._groups: dict[Group, _Group] = {}
        self._where: dict[QueryKey, Group] = {}

    def __len__(self) -> int:
        return len(self._where)

    @staticmethod
    def group_of(space: str, index_key: str, flt: Filter | None, k: int) -> Group:
        return (space, index_key, "" if flt is None else str(flt), k_bucket(k))

    @staticmethod
    def _unit(point: npt.ArrayLike) -> tuple[F32, float]:
        p = np.asarray(point, dtype=np.float32).ravel()
        norm = math.sqrt(float(p @ p))  # np.linalg.norm's sum, without its checks
        if norm > 0.0:
            p = p / norm
        return p, (math.log(norm) if norm > 0.0 else -math.inf)

    def nearest(
        self,
        group: Group,
        point: npt.ArrayLike,
        metric: Metric,
        text: str | None = None,
        within: float | None = None,
    ) -> SemanticMatch | None:
        """The representative of ``group`` closest to ``point``, with its distance.

        With ``text`` (the text stage, module docstring): the closest of the ``candidates``
        nearest representatives that were added with a text agreeing with it, or None;
        ``within`` skips the text work for representatives farther than that distance
        (pass L2's threshold). Without ``text``, representatives added with a text are
        passed over (they cannot be verified). Raises ``InvalidRequest`` for a text the
        normaliser refuses."""
        g = self._groups.get(group)
        if g is None or g.size == 0:
            return None
        p, lognorm = self._unit(point)
        if p.size != g.points.shape[1]:
            return None
        if text is None and g.texted == 0:  # the vector path: no text stage, one pass
            if within is not None and g.projection is not None:
                return self._within(g, p, lognorm, metric, within)
            return self._closest(g, g.points[: g.size] @ p, lognorm, metric, within)
        sims = g.points[: g.size] @ p
        dist = 1.0 - sims.astype(np.float64)
        if metric is not Metric.COSINE:
            dist = dist + np.abs(g.lognorm[: g.size] - lognorm)
        m = min(self.candidates, g.size)
        near = np.argpartition(dist, m - 1)[:m] if m < g.size else np.arange(g.size)
        order = near[np.argsort(dist[near], kind="stable")].tolist()
        if within is not None:
            order = [i for i in order if dist[i] <= within]
        query = None if text is None or not order else features(text)
        for i in order:
            rep = g.texts[i]
            if (rep is None) != (query is None):
                continue
            score = None
            if query is not None and rep is not None:
                score = agreement(query, rep)
                if not (score > 0.0 and score >= self.min_agreement):  # verified(), scalar
                    continue
            key = g.keys[i]
            assert key is not None
            return SemanticMatch(key, max(0.0, float(dist[i])), score, g.costs[i])
        return None

    @classmethod
    def _within(
        cls, g: _Group, p: F32, lognorm: float, metric: Metric, within: float
    ) -> SemanticMatch | None:
        """:meth:`_closest` of the representatives within ``within`` only, through the
        projected rows (the prefilter above :data:`PROJ_DIMS`): the same answer as
        :meth:`_closest` whenever that one is within ``within``, else None."""
        assert g.projection is not None
        q = np.empty(PROJ_DIMS + 1, dtype=np.float32)
        pq = q[:PROJ_DIMS] = g.projection @ p
        q[PROJ_DIMS] = 1.0
        s = q @ g.proj[:, : g.size]  # Pr.Pq - |Pr|^2 / 2 per representative
        bar = 0.5 * (float(pq @ pq) - 2.0 * within - _PROJ_SLACK)
        if float(s.max()) < bar:  # the usual miss: none is near enough in the projection
            return None
        near = np.flatnonzero(s >= bar)
        sims = g.points[near] @ p
        if metric is Metric.COSINE:
            j = int(np.argmax(sims))
            d = 1.0 - float(sims[j])
        else:
            dist = 1.0 - sims.astype(np.float64) + np.abs(g.lognorm[near] - lognorm)
            j = int(np.argmin(dist))
            d = float(dist[j])
        if d > within:
            return None
        i = int(near[j])
        key = g.keys[i]
        assert key is not None
        return SemanticMatch(key, max(0.0, d), None, g.costs[i])

    @staticmethod
    def _closest(
        g: _Group, sims: F32, lognorm: float, metric: Metric, within: float | None
    ) -> SemanticMatch | None:
        """:meth:`nearest` of a group without texts and a query without one: the
        closest representative (argmax of the similarity for cosine), no sort."""
        if metric is Metric.COSINE:
            i = int(np.argmax(sims))
            d = 1.0 - float(sims[i])
        else:
            dist = 1.0 - sims.astype(np.float64) + np.abs(g.lognorm[: g.size] - lognorm)
            i = int(np.argmin(dist))
            d = float(dist[i])
        if within is not None and d > within:
            return None
        key = g.keys[i]
        assert key is not None
        return SemanticMatch(key, max(0.0, d), None, g.costs[i])

    def add(
        self,
        group: Group,
        point: npt.ArrayLike,
        key: QueryKey,
        text: str | None = None,
        *,
        cost_ms: float = 0.0,
    ) -> bool:
        """Make ``point`` the representative of a new cluster holding ``key``'s result,
        with ``text`` for the text stage and ``cost_ms`` (what the result cost: what a
        hit saves, for :func:`reuses`); False (nothing added) when the group is full,
        the point is zero or of another dim, or the normaliser refuses the text (the
        lookup with that text was refused already)."""
        try:
            feats = None if text is None else features(text)
        except InvalidRequest:
            return False
        p, lognorm = self._unit(point)
        if not math.isfinite(lognorm):
            return False
        if key in self._where:
            self.remove(key)
        g = self._groups.get(group)
        if g is None:
            g = self._groups[group] = _Group(p.size)
        if p.size != g.points.shape[1] or g.size >= self.max_per_group:
            return False
        if g.size == g.points.shape[0]:
            cap = 2 * g.size
            g.points = np.vstack([g.points, np.zeros_like(g.points)])[:cap]
            g.lognorm = np.append(g.lognorm, np.zeros(g.size))
            g.proj = np.hstack([g.proj, np.zeros_like(g.proj)])[:, :cap].copy()
            g.keys += [None] * g.size
            g.texts += [None] * g.size
            g.costs += [0.0] * g.size
        i = g.size
        g.points[i] = p
        g.lognorm[i] = lognorm
        if g.projection is not None:
            pr = g.projection @ p
            g.proj[:PROJ_DIMS, i] = pr
            g.proj[PROJ_DIMS, i] = -0.5 * float(pr @ pr)
        g.keys[i] = key
        g.texts[i] = feats
        g.costs[i] = cost_ms
        g.texted += feats is not None
        g.rows[key] = i
        g.size += 1
        self._where[key] = group
        return True

    def remove(self, key: QueryKey) -> bool:
        group = self._where.pop(key, None)
        if group is None:
            return False
        g = self._groups[group]
        i = g.rows.pop(key)
        g.texted -= g.texts[i] is not None
        last = g.size - 1
        if i != last:
            moved = g.keys[last]
            assert moved is not None
            g.points[i] = g.points[last]
            g.lognorm[i] = g.lognorm[last]
            g.proj[:, i] = g.proj[:, last]
            g.keys[i] = moved
            g.texts[i] = g.texts[last]
            g.costs[i] = g.costs[last]
            g.rows[moved] = i
        g.keys[last] = None
        g.texts[last] = None
        g.size -= 1
        if g.size == 0:
            del self._groups[group]
        return True

    def drop_index(self, index_key: str) -> int:
        keys = [k for k, grp in self._where.items() if grp[1] == index_key]
        for key in keys:
            self.remove(key)
        return len(keys)
