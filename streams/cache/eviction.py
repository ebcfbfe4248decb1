"""Which entry the L0 cache gives up when it is over a budget: LRU, or cost-aware GDSF.

GDSF (Greedy-Dual-Size-Frequency, Cherkasova 1998, with cost; the simulator's
:class:`streams.policy.policies.GDSFCache` is the reference): every entry has a priority
``H = L + value``, where ``value`` is what keeping one of its bytes is worth and ``L`` is
the cache's inflation, raised to the ``H`` of each victim. The victim is the entry with the
lowest ``H``; an entry's ``L`` is the inflation at its admission or last hit, so entries
that stop being hit age out behind those that keep earning.

The value is an :class:`EvictionScorer`'s. :class:`GDSFScorer` is the rule of issue 4:
expected future hits x the proxy cost a hit saves, per byte (the memory charge is the
division by size): ``(hits + 1) x cost / size``, the entry's own cost (its admission's
``compute_ms``) and hits; optionally plus the admission decision's forecast,
``priority x prior_s`` (its estimated request rate x cost / size, over ``prior_s``
seconds). ``prior_s`` is 0 by default: on the zipf and latest traces with the rules in
front, adding the forecast saved less (docs/benchmarks.md, "Cost-aware eviction"). A
learned eviction table plugs in as another scorer (``streams.policy``).

:class:`LazyHeap` keeps the order in O(log n) without touching the heap on a hit: a hit
only records the hit and the current ``L`` in the entry's slot, and since a hit never
lowers a priority (the scorer contract), a heap item is a lower bound of its entry's
priority. Popping re-checks the entry and pushes it back with its current priority when
it rose. Items of entries that left are skipped when popped and dropped in a rebuild when
they outnumber the live ones.

Domain code: no I/O, no locks (the cache's lock guards every call).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from streams.cache.entry import CachedResult
    from streams.cache.keys import QueryKey

__all__ = [
    "EVICTIONS",
    "EvictionName",
    "EvictionScorer",
    "GDSFScorer",
    "LazyHeap",
    "Slot",
]

# learned: sampled eviction by a table from the query log (streams.cache.learned_eviction)
EvictionName = Literal["gdsf", "lru", "learned"]
EVICTIONS: tuple[EvictionName, ...] = ("gdsf", "lru", "learned")


class EvictionScorer(Protocol):
    """The value per byte of keeping an entry that has served ``hits`` hits (GDSF's
    ``freq x cost / size``). Contract: cheap (called when a candidate victim is checked,
    never on a hit), deterministic, and non-decreasing in ``hits`` (a hit never lowers an
    entry's priority: :class:`LazyHeap` relies on it)."""

    def value(self, entry: CachedResult, hits: int, nbytes: int) -> float: ...


class GDSFScorer:
    """``(hits + 1) x cost / size + priority x prior_s`` (module docstring; ``prior_s`` 0
    by default). ``cost`` is
    the entry's ``compute_ms`` (what a hit saves), at least ``min_cost_ms`` so that free
    searches still rank by frequency and size."""

    name = "gdsf"

    def __init__(self, *, prior_s: float = 0.0, min_cost_ms: float = 0.01) -> None:
        if prior_s < 0 or min_cost_ms <= 0:
            raise ValueError("prior_s >= 0 and min_cost_ms > 0")
        self.prior_s = prior_s
        self.min_cost_ms = min_cost_ms

    def value(self, entry: CachedResult, hits: int, nbytes: int) -> float:
        cost = entry.compute_ms if entry.compute_ms > self.min_cost_ms else self.min_cost_ms
        v = (hits + 1) * cost / max(nbytes, 1)
        d = entry.admission
        if d is not None and d.priority > 0:
            v += d.priority * self.prior_s
        return v


@dataclass(slots=True, eq=False)
class Slot:
    """One cached entry as the cache keeps it: ``hits`` since admission, ``base`` the
    inflation ``L`` at admission or last hit (GDSF), its budget ``scopes``; ``alive``
    turns False when it leaves (its heap items are then skipped); ``stored_s`` its
    ``time.time()`` when stored and ``priority`` its GDSF ``H`` if it was evicted (what
    the query log's removal events say)."""

    key: QueryKey
    entry: CachedResult
    nbytes: int
    hits: int = 0
    scopes: tuple[str, ...] = ()
    base: float = 0.0
    alive: bool = True
    stored_s: float = field(default=0.0)  # time.time() when stored (the removal events)
    priority: float = 0.0  # its GDSF priority when it was evicted (0 otherwise)


_HeapItem = tuple[float, int, Slot]


class LazyHeap:
    """Min-heap of slots by GDSF priority (module docstring). ``scorer`` values entries;
    :meth:`pop_victim` returns the lowest-priority live slot and the priority it had."""

    __slots__ = ("_items", "_seq", "scorer")

    def __init__(self, scorer: EvictionScorer, seq: Callable[[], int] | None = None) -> None:
        self.scorer = scorer
        self._items: list[_HeapItem] = []
        self._seq = seq or itertools.count().__next__

    def priority(self, slot: Slot) -> float:
        return slot.base + self.scorer.value(slot.entry, slot.hits, slot.nbytes)

    def push(self, slot: Slot) -> None:
        heapq.heappush(self._items, (self.priority(slot), self._seq(), slot))

    def __len__(self) -> int:
        """Items held, those of slots that left included."""
        return len(self._items)

    def pop_victim(self, live: int) -> tuple[Slot, float] | None:
        """The live slot of lowest current priority (taken off the heap) with that
        priority; ``live``: how many live slots the heap covers (it is rebuilt when dead
        items outnumber them)."""
        items = self._items
        if len(items) > 2 * live + 256:
            self.rebuild(s for _, _, s in items)
            items = self._items
        while items:
            h, _, slot = items[0]
            if not slot.alive:
                heapq.heappop(items)
                continue
            now = self.priority(slot)
            if now > h:  # hit since it was pushed: put it back where it belongs now
                heapq.heapreplace(items, (now, self._seq(), slot))
                continue
            heapq.heappop(items)
            return slot, now
        return None

    def rebuild(self, slots: Iterable[Slot]) -> None:
        """Forget every item; heapify the live ``slots`` at their current priorities."""
        seen: set[int] = set()
        items = []
        for s in slots:
            if s.alive and id(s) not in seen:
                seen.add(id(s))
                items.append((self.priority(s), self._seq(), s))
        heapq.heapify(items)
        self._items = items
