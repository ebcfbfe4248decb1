"""Fusing ranked lists (dense and keyword) into one ranking. Pure functions.

- :func:`rrf`: reciprocal rank fusion (Cormack, Clarke, Büttcher 2009):
  ``score(d) = sum over lists of 1 / (k + rank(d))`` with ranks from 1 and ``k = 60``.
  Scores of the inputs are ignored, so lists on different scales mix safely.
- :func:`alpha_fusion`: ``alpha * norm(dense) + (1 - alpha) * norm(keyword)`` where ``norm``
  min-max scales each list's scores to [0, 1] (all equal -> 1); an id missing from a list
  gets 0 from it; ties go to the id found by the more heavily weighted list. ``alpha = 1``
  ranks by the dense list, ``alpha = 0`` by the keyword one.

Both return ``(id, fused score)`` best first, ties broken by id so the result is a
function of the inputs. Each input list is ``(id, score)`` best first, higher is better,
ids unique within a list.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["RRF_K", "alpha_fusion", "min_max", "rrf"]

RRF_K = 60

Ranked = Sequence[tuple[str, float]]


def _ordered(scores: dict[str, float], limit: int | None) -> list[tuple[str, float]]:
    out = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
    return out if limit is None else out[:limit]


def rrf(
    lists: Sequence[Ranked], *, k: int = RRF_K, limit: int | None = None
) -> list[tuple[str, float]]:
    """Reciprocal rank fusion of ``lists``; the first ``limit`` (all when None)."""
    if k < 0:
        raise ValueError("rrf k must be >= 0")
    ranks: dict[str, list[int]] = {}
    for ranked in lists:
        for rank, (id, _score) in enumerate(ranked, start=1):
            ranks.setdefault(id, []).append(rank)
    # summed in rank order, so the result does not depend on the order of the lists
    scores = {id: sum(1.0 / (k + r) for r in sorted(rs)) for id, rs in ranks.items()}
    return _ordered(scores, limit)


def min_max(ranked: Ranked) -> dict[str, float]:
    """Scores scaled to [0, 1] by the list's min and max (a list of equal scores -> 1)."""
    if not ranked:
        return {}
    values = [s for _, s in ranked]
    if not all(math.isfinite(v) for v in values):
        raise ValueError("scores must be finite")
    lo, hi = min(values), max(values)
    span = hi - lo
    return {id: (s - lo) / span if span > 0 else 1.0 for id, s in ranked}


def alpha_fusion(
    dense: Ranked, keyword: Ranked, alpha: float, *, limit: int | None = None
) -> list[tuple[str, float]]:
    """Weighted fusion of min-max normalised scores; ``alpha`` in [0, 1] weighs dense."""
    if not 0.0 <= alpha <= 1.0 or math.isnan(alpha):
        raise ValueError("alpha must be in [0, 1]")
    d, kw = min_max(dense), min_max(keyword)
    fused = []
    for id in d.keys() | kw.keys():
        score = alpha * d.get(id, 0.0) + (1.0 - alpha) * kw.get(id, 0.0)
        # a list's last hit normalises to 0, like an absent id: on a tie, being found by
        # the more heavily weighted list wins
        presence = alpha * (id in d) + (1.0 - alpha) * (id in kw)
        fused.append((score, presence, id))
    fused.sort(key=lambda t: (-t[0], -t[1], t[2]))
    out = [(id, score) for score, _, id in fused]
    return out if limit is None else out[:limit]
