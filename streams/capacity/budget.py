"""Budgets, usage and thresholds of one index (pure: no I/O).

An index's budget is its ``IndexConfig.quotas`` (``max_vectors``, ``max_bytes``); its
utilisation is the larger of the two ratios. The capacity manager acts at three levels::

    >= 80 %  compress   near-duplicate vectors collapse into a representative that lists
                        its members; the members go to the ``archive`` topic
    >= 90 %  expire     temporaries (``ttl_ms``) that no search has hit are expired early
    >= 95 %  archive    the coldest, least important vectors go to ``archive`` until the
                        utilisation is at most ``archive_target``; while the index stays
                        at or over 95 % new ids are refused (``VEC_ERR_QUOTA``)

Bytes are counted as they are stored: 4 bytes per dimension, the payload, tags, numeric
fields (8 bytes each) and the id.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

from streams.index.model import IndexQuotas

__all__ = [
    "Level",
    "Thresholds",
    "Usage",
    "importance_of",
    "is_text_only",
    "meta_dict",
    "record_bytes",
]


class Level(enum.IntEnum):
    """How full an index is, by the thresholds it has reached."""

    OK = 0
    COMPRESS = 1
    EXPIRE = 2
    ARCHIVE = 3


@dataclass(frozen=True, slots=True)
class Thresholds:
    compress: float = 0.80
    expire: float = 0.90
    archive: float = 0.95
    archive_target: float = 0.70  # archiving stops at or below this utilisation
    duplicate_similarity: float = 0.97  # cosine at which two vectors are near-duplicates

    def __post_init__(self) -> None:
        if not 0 < self.archive_target < self.compress <= self.expire <= self.archive <= 1:
            raise ValueError(
                "thresholds must satisfy 0 < target < compress <= expire <= archive <= 1"
            )
        if not 0 < self.duplicate_similarity <= 1:
            raise ValueError("duplicate_similarity must be in (0, 1]")

    def level(self, utilisation: float) -> Level:
        if utilisation >= self.archive:
            return Level.ARCHIVE
        if utilisation >= self.expire:
            return Level.EXPIRE
        if utilisation >= self.compress:
            return Level.COMPRESS
        return Level.OK


@dataclass(frozen=True, slots=True)
class Usage:
    """What an index holds: vectors in the vector index (text-only records excluded)
    and bytes of every stored record."""

    vectors: int = 0
    bytes: int = 0

    def plus(self, vectors: int, nbytes: int) -> Usage:
        return Usage(self.vectors + vectors, self.bytes + nbytes)

    def utilisation(self, quotas: IndexQuotas | None) -> float:
        """The larger of vectors/max_vectors and bytes/max_bytes; 0 with no budget."""
        if quotas is None:
            return 0.0
        ratios = [0.0]
        if quotas.max_vectors:
            ratios.append(self.vectors / quotas.max_vectors)
        if quotas.max_bytes:
            ratios.append(self.bytes / quotas.max_bytes)
        return max(ratios)


def record_bytes(
    dim: int, id: str, meta: str | None, tags: tuple[str, ...] | list[str], numeric_fields: int
) -> int:
    """Bytes one record counts against ``max_bytes``."""
    return (
        4 * dim
        + len(id.encode())
        + (len(meta.encode()) if meta else 0)
        + sum(len(t.encode()) for t in tags)
        + 8 * numeric_fields
    )


def meta_dict(meta: str | None) -> dict[str, Any]:
    """A payload as a dict (``{}`` when it is absent or not a JSON object)."""
    if not meta:
        return {}
    try:
        parsed = json.loads(meta)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def importance_of(meta: str | None, default: float = 0.5) -> float:
    """A record's importance in [0, 1]: ``meta.vectorize.importance`` (written by
    ``streams.ingest.vectorize``), else ``meta.importance``, else ``default``."""
    d = meta_dict(meta)
    vec = d.get("vectorize")
    value = vec.get("importance") if isinstance(vec, dict) else d.get("importance")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return min(1.0, max(0.0, float(value)))
    return default


def is_text_only(meta: str | None) -> bool:
    """Whether a payload marks its record text-only (kept out of the vector index)."""
    if meta is None or '"text_only"' not in meta:
        return False
    return meta_dict(meta).get("text_only") is True
