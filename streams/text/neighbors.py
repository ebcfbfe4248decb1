"""Graph neighbours: the k nearest of a stored item, expanded breadth-first over hops.

The graph is the k-NN graph: an item's edges go to its k nearest other items. Hop h
holds the items first reached at h edges from the origin (each reported once).

Each step is an ordinary k-NN search (through the data plane, so the cache, filters and
the index recipe apply) with the stored vector of a frontier item as the query. Nothing
is loaded beyond the searched items' own vectors: at most ``1 + fanout * (hops - 1)``
vector reads and as many searches, and at most :data:`MAX_RESULTS` results.

Order: hop 1 first (best first), then each later hop in the order its frontier was
found. ``score`` is the similarity (the index metric's own terms) to ``via``, the item
whose search found it; for hop 1 ``via`` is the origin.
"""

from __future__ import annotations

from dataclasses import dataclass

from streams.index.exceptions import InvalidRequest, NotFound
from streams.index.model import Consistency, Vector
from streams.service.api import DataPlane, SearchRequest

__all__ = ["MAX_HOPS", "MAX_K", "MAX_RESULTS", "Neighbor", "neighbors"]

MAX_HOPS = 3
MAX_K = 100
MAX_RESULTS = 1000


@dataclass(frozen=True, slots=True)
class Neighbor:
    id: str
    score: float
    hop: int
    via: str
    meta: str | None = None


def neighbors(
    service: DataPlane,
    tenant: str,
    index: str,
    id: str,
    hops: int = 1,
    k: int = 10,
    *,
    fanout: int | None = None,
    filter: str | None = None,
    consistency: Consistency = Consistency.EVENTUAL,
    tokens: tuple[str, ...] = (),
    timeout_ms: int = 1000,
) -> list[Neighbor]:
    """Neighbours of ``id`` up to ``hops`` away, ``k`` per searched item, expanding at most
    ``fanout`` (default ``k``) items per hop. Raises ``NotFound`` for an unknown index or
    id, ``InvalidRequest`` for hops/k/fanout out of range, ``Busy`` when the consistency
    wait times out (only the first read waits; later ones see at least that)."""
    if isinstance(hops, bool) or not isinstance(hops, int) or not 1 <= hops <= MAX_HOPS:
        raise InvalidRequest(f"hops must be 1..{MAX_HOPS}", field="hops")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise InvalidRequest(f"k must be 1..{MAX_K}", field="k")
    fan = k if fanout is None else fanout
    if not 1 <= fan <= MAX_K:
        raise InvalidRequest(f"fanout must be 1..{MAX_K}", field="fanout")
    origin = service.get(tenant, index, id, consistency=consistency, tokens=tokens)
    seen = {id}
    out: list[Neighbor] = []
    frontier: list[tuple[str, Vector]] = [(id, origin.vector)]
    for hop in range(1, hops + 1):
        found: list[str] = []
        for via, vector in frontier:
            # k + 1: the item itself is usually its own nearest
            resp = service.search(
                SearchRequest(tenant, index, vector, k=k + 1, filter=filter, timeout_ms=timeout_ms)
            )
            for hit in [h for h in resp.hits if h.id != via][:k]:
                if hit.id in seen or len(out) == MAX_RESULTS:
                    continue
                seen.add(hit.id)
                out.append(Neighbor(hit.id, hit.score, hop, via, hit.meta))
                found.append(hit.id)
        if hop == hops or len(out) == MAX_RESULTS:
            break
        frontier = []
        for nid in found[:fan]:
            try:
                frontier.append((nid, service.get(tenant, index, nid).vector))
            except NotFound:  # deleted since it was found
                continue
    return out
