"""Groups of near-duplicate vectors (pure: no I/O).

Two vectors are near-duplicates when their cosine is at least ``similarity``; groups are
the connected components of that relation (union-find). The representative of a group is
its most important vector, then the oldest (lowest label); the others are its members.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from streams.capacity.ledger import Row

__all__ = ["duplicate_groups"]

_BLOCK = 512


def duplicate_groups(
    rows: list[Row],
    similarity: float,
    limit: int,
    neighbours: Callable[[Row], list[str]] | None = None,
) -> list[tuple[Row, list[Row]]]:
    """``(representative, members)`` per group of two or more. Up to ``limit`` rows every
    pair is compared (a block of rows at a time); above it, only each of the first
    ``limit`` rows against the ids ``neighbours`` gives for it (its k nearest)."""
    if len(rows) < 2:
        return []
    index = {r.id: n for n, r in enumerate(rows)}
    parent = list(range(len(rows)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    unit = np.stack([r.entry.vector for r in rows]).astype(np.float32)
    unit /= np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
    if len(rows) <= limit:
        for start in range(0, len(rows), _BLOCK):
            sims = unit[start : start + _BLOCK] @ unit.T
            for i, j in zip(*np.nonzero(sims >= similarity), strict=True):
                a, b = start + int(i), int(j)
                if b > a:
                    parent[find(a)] = find(b)
    elif neighbours is not None:
        for a, row in enumerate(rows[:limit]):
            for other in neighbours(row):
                c = index.get(other)
                if c is not None and c != a and float(unit[a] @ unit[c]) >= similarity:
                    parent[find(a)] = find(c)
    groups: dict[int, list[Row]] = {}
    for n, r in enumerate(rows):
        groups.setdefault(find(n), []).append(r)
    out = []
    for members in groups.values():
        if len(members) > 1:
            members.sort(key=lambda r: (-r.importance, r.entry.label))
            out.append((members[0], members[1:]))
    return out
