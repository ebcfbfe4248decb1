"""``ResultCache``: the node's L0 exact result cache, and the indexer's hook into it.

Contract: :meth:`ResultCache.get` returns an entry only while it equals what a fresh
search of the node would return, provided the applier reports every applied write
(:meth:`ResultCache.invalidate`, or :class:`CacheInvalidator` as the indexer's listener)
after the index has taken it and before the node advances its applied positions. Then a
search that has waited for position P finds no entry that is stale at P. Which entries a
write changes is decided exactly (:mod:`streams.cache.invalidation`), so writes elsewhere
in the vector space leave entries cached.

The put race. A search takes ``seq = get_seq(index)`` before it searches, computes its
result, then offers it with ``put(entry, seq)``. Writes reported after ``seq`` may or may
not be in that result; every write is kept in a bounded ring of the index's recent write
batches, and ``put`` tests the entry against each batch newer than ``seq`` exactly as
invalidation would have tested it had it been cached. A batch that would have invalidated
it refuses the put (``stale``); when the ring no longer reaches back to ``seq`` the put is
refused too (``unverifiable``). So an entry is either checked against every write since
its search began, or not stored. Writes reported at or before ``seq`` had reached the
index before the search read it.

Threads: one lock guards everything. Searchers ``get``/``put``; the applier invalidates;
the exact invalidation work is done under the lock, so a large batch briefly delays
lookups of the node. Eviction (``eviction``) is cost-aware GDSF by default (lowest
``H = L + value`` first, :mod:`streams.cache.eviction`: O(log n) per eviction, a hit only
records itself) or LRU, within ``budget_bytes``, across all indexes, and within each
tenant's budget (``tenant_budget_bytes``, :meth:`ResultCache.set_tenant_budget`) and each
index's (:meth:`ResultCache.set_index_budget`, from ``IndexConfig.cache``): a tenant over
its budget evicts its own entries (lowest priority, or least recently used, first), never
another tenant's. The admission policy (:class:`AdmissionPolicy`) is asked before a put
takes the lock. Removal hooks (:meth:`ResultCache.add_removal_hook`) hear of every entry
that leaves, listeners (:meth:`ResultCache.add_removal_listener`) also of why
(``evicted``, ``expired``, ``invalidated``, ``replaced``, ``dropped``); both run under the
lock and must only record.
"""

from __future__ import annotations

import itertools
import operator
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from streams.cache.entry import CachedResult
from streams.cache.eviction import (
    EVICTIONS,
    EvictionName,
    EvictionScorer,
    GDSFScorer,
    LazyHeap,
    Slot,
)
from streams.cache.invalidation import InvalidationIndex, UpsertRow
from streams.cache.keys import QueryKey
from streams.cache.learned_eviction import LearnedEviction
from streams.cache.policy import AdmissionDecision, AdmissionPolicy, AdmitAll
from streams.cache.scoring import would_enter
from streams.index.model import Vector

__all__ = ["REMOVAL_REASONS", "CacheInvalidator", "CacheStats", "PutOutcome", "ResultCache"]

# why an entry left (what removal listeners and the query log's removal events say)
REMOVAL_REASONS = ("evicted", "expired", "invalidated", "replaced", "dropped")


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counters since the cache was made. ``invalidations``: entries dropped by writes;
    ``stale_puts``: puts refused because a write since their search changed them (or
    could no longer be checked); ``verified``/``false_hits``: hits re-checked against a
    fresh search, and those that differed (measured by the node, see ``VectorService``)."""

    hits: int
    misses: int
    puts: int
    rejected: int
    stale_puts: int
    invalidations: int
    evictions: int
    entries: int
    bytes: int
    budget_bytes: int
    verified: int
    false_hits: int
    expirations: int = 0  # entries removed because their admission TTL passed
    eviction: str = "lru"  # the eviction order (``gdsf`` or ``lru``)

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__} | {
            "hit_rate": round(self.hit_rate, 6)
        }


@dataclass(frozen=True, slots=True)
class PutOutcome:
    """The admission decision (logged as the policy took it) and what became of the
    entry: ``stored``, ``rejected`` (by the policy), ``stale``, ``unverifiable``,
    ``disabled`` (for its index), ``too-large`` (for the whole budget) or ``evicted``
    (stored, then valued lowest of its scope by GDSF and evicted by its own put)."""

    decision: AdmissionDecision
    outcome: str

    @property
    def stored(self) -> bool:
        return self.outcome == "stored"

    def as_dict(self) -> dict[str, Any]:
        return self.decision.as_dict() | {"outcome": self.outcome}


@dataclass(frozen=True, slots=True)
class _Writes:
    """One reported batch of an index: ``ids`` deleted or replaced (upserted ids
    included), ``rows`` upserted; ``reset`` drops everything (index dropped/recreated)."""

    seq: int
    ids: frozenset[str]
    rows: tuple[UpsertRow, ...]
    reset: bool = False

    @property
    def size(self) -> int:
        return max(1, len(self.ids) + len(self.rows))


@dataclass(slots=True)
class _IndexState:
    enabled: bool
    seq: int = 0
    floor: int = 0  # puts that saw a seq below this cannot be checked any more
    ring: deque[_Writes] = field(default_factory=deque)
    ring_rows: int = 0
    index: InvalidationIndex | None = None
    scopes: tuple[str, str] = ("", "")  # its tenant's and its own budget scope, made once


_Slot = Slot  # one entry as the cache keeps it (streams.cache.eviction)
RemovalListener = Callable[[Slot, str], None]


class ResultCache:
    """L0 of one node (see the module docstring). ``ring_rows``: writes per index kept
    for checking puts (a search slower than that many writes is not cached);
    ``enabled``: whether indexes start enabled (:meth:`set_enabled` switches one);
    ``eviction``: ``gdsf`` (default), ``lru``, or an :class:`EvictionScorer` to order GDSF
    by (a learned value table)."""

    def __init__(
        self,
        budget_bytes: int,
        *,
        policy: AdmissionPolicy | None = None,
        enabled: bool = True,
        ring_rows: int = 4096,
        max_clusters: int = 64,
        tenant_budget_bytes: int | None = None,
        eviction: EvictionName | EvictionScorer | LearnedEviction = "gdsf",
    ) -> None:
        if isinstance(eviction, str) and eviction not in EVICTIONS:
            raise ValueError(f"eviction must be one of {EVICTIONS} or a scorer, got {eviction!r}")
        if budget_bytes < 0 or ring_rows < 1:
            raise ValueError("budget_bytes >= 0 and ring_rows >= 1")
        if tenant_budget_bytes is not None and tenant_budget_bytes < 0:
            raise ValueError("tenant_budget_bytes >= 0")
        self.budget_bytes = budget_bytes
        self.policy: AdmissionPolicy = policy or AdmitAll()
        self._default_enabled = enabled
        self._ring_limit = ring_rows
        self._max_clusters = max_clusters
        self._lock = threading.Lock()
        self._lru: OrderedDict[QueryKey, _Slot] = OrderedDict()
        self._indexes: dict[str, _IndexState] = {}
        self._bytes = 0
        self._tenant_default = tenant_budget_bytes
        self._budgets: dict[str, int] = {}  # scope ("t:tenant" / "i:tenant/index") -> bytes
        self._scopes: dict[str, OrderedDict[QueryKey, None]] = {}
        self._scope_bytes: dict[str, int] = {}
        self._hooks: list[Callable[[QueryKey], None]] = []
        self._listeners: list[RemovalListener] = []
        # GDSF: a lazy heap over every entry, one per budget scope once it must evict
        self.eviction: str = eviction if isinstance(eviction, str) else "gdsf"
        self._gdsf = self.eviction == "gdsf"
        self._scorer: EvictionScorer = (
            GDSFScorer() if isinstance(eviction, str | LearnedEviction) else eviction
        )
        self._heap_seq = itertools.count().__next__
        self._heap = LazyHeap(self._scorer, self._heap_seq)
        self._scope_heaps: dict[str, LazyHeap] = {}
        self._inflation = 0.0  # GDSF's L: the priority of the last victim
        self._touch = self._touch_gdsf if self._gdsf else self._touch_lru
        # learned (streams.cache.learned_eviction): sampled eviction by the table in
        # force; GDSF's heaps are kept for indexes without one
        self.learned: LearnedEviction | None = None
        if isinstance(eviction, LearnedEviction) or eviction == "learned":
            learned = eviction if isinstance(eviction, LearnedEviction) else LearnedEviction()
            self.learned = learned
            self.eviction, self._gdsf, self._touch = "learned", True, self._touch_learned
            self._listeners.append(learned.removed)
        self._n = dict.fromkeys(
            (
                "hits",
                "misses",
                "puts",
                "rejected",
                "stale_puts",
                "invalidations",
                "evictions",
                "verified",
                "false_hits",
                "expirations",
            ),
            0,
        )

    # -- switches ----------------------------------------------------------------------

    def _state(self, index_key: str) -> _IndexState:
        st = self._indexes.get(index_key)
        if st is None:
            st = self._indexes[index_key] = self._new_state(index_key)
        return st

    def _new_state(self, index_key: str) -> _IndexState:
        return _IndexState(self._default_enabled, scopes=self._scopes_of(index_key))

    def enabled(self, index_key: str) -> bool:
        with self._lock:
            st = self._indexes.get(index_key)
            return self._default_enabled if st is None else st.enabled

    def set_enabled(self, index_key: str, enabled: bool) -> None:
        """Switch caching of one index; switching off drops its entries."""
        with self._lock:
            st = self._state(index_key)
            st.enabled = enabled
            if not enabled:
                self._drop_entries(index_key)

    def set_tenant_budget(self, tenant: str, budget_bytes: int | None) -> None:
        """Bound the bytes of ``tenant``'s entries (None: the default); evicts its least
        recently used entries at once if it is over."""
        self._set_budget(
            "t:" + tenant, budget_bytes if budget_bytes is not None else self._tenant_default
        )

    def set_index_budget(self, index_key: str, budget_bytes: int | None) -> None:
        """Bound the bytes of one index's entries (None: no bound of its own)."""
        self._set_budget("i:" + index_key, budget_bytes)

    def _set_budget(self, scope: str, budget_bytes: int | None) -> None:
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError("a budget must be >= 0")
        with self._lock:
            if budget_bytes is None:
                self._budgets.pop(scope, None)
            else:
                self._budgets[scope] = budget_bytes
                self._evict_scope(scope)

    def budget_of(self, scope: str) -> int | None:
        """The budget of ``t:<tenant>`` or ``i:<tenant>/<index>`` (None: unbounded)."""
        if scope.startswith("t:") and scope not in self._budgets:
            return self._tenant_default
        return self._budgets.get(scope)

    def scope_bytes(self, scope: str) -> int:
        """Bytes held by ``t:<tenant>`` or ``i:<tenant>/<index>``."""
        with self._lock:
            return self._scope_bytes.get(scope, 0)

    def add_removal_hook(self, hook: Callable[[QueryKey], None]) -> None:
        """Call ``hook(key)`` whenever an entry leaves the cache (under the cache's lock:
        the hook must be quick and must not call back into the cache)."""
        with self._lock:
            self._hooks.append(hook)

    def add_removal_listener(self, listener: RemovalListener) -> None:
        """Call ``listener(slot, reason)`` whenever an entry leaves (``slot``: the entry,
        its hits, bytes, ``stored_s``; ``reason`` one of :data:`REMOVAL_REASONS`), under
        the cache's lock like a removal hook: record only (the query log queues it)."""
        with self._lock:
            self._listeners.append(listener)

    @property
    def inflation(self) -> float:
        """GDSF's ``L``: the priority of the last entry evicted (0 under LRU)."""
        return self._inflation

    def priority_of(self, key: QueryKey) -> float | None:
        """The entry's current GDSF priority ``H`` (None: not cached, or LRU)."""
        with self._lock:
            slot = self._lru.get(key)
            return None if slot is None or not self._gdsf else self._heap.priority(slot)

    @staticmethod
    def _scopes_of(index_key: str) -> tuple[str, str]:
        return "t:" + index_key.partition("/")[0], "i:" + index_key

    # -- lookups -----------------------------------------------------------------------

    def get_seq(self, index_key: str) -> int:
        """The index's invalidation sequence number: take it before searching, pass it
        to :meth:`put`."""
        with self._lock:
            return self._state(index_key).seq

    def get(self, key: QueryKey) -> CachedResult | None:
        """The entry for ``key`` (with its hit count, this hit included), or None; counts
        a hit or a miss and refreshes its LRU place."""
        with self._lock:
            slot = self._lru.get(key)
            if slot is None:
                self._n["misses"] += 1
                return None
            self._touch(key, slot)
            self._n["hits"] += 1
            return replace(slot.entry, hit_count=slot.hits)

    def fetch(self, key: QueryKey) -> CachedResult | None:
        """Like :meth:`get` for a tolerant layer's lookup: refreshes the LRU place and the
        entry's hit count but leaves the L0 hit/miss counters alone."""
        found = self.hit(key, l0=False)
        return None if found is None else replace(found[0], hit_count=found[1])

    def count_rejected(self) -> None:
        """Count a result the policy rejected without a put (a lazy miss decided after it
        was parked: streams.cache.controller.CacheController.settle)."""
        with self._lock:
            self._n["rejected"] += 1

    def probe(
        self, index_key: str, key: QueryKey | None
    ) -> tuple[int, bool, tuple[CachedResult, int] | None]:
        """The search path's first call, under one lock: :meth:`get_seq`, :meth:`enabled`
        and, when ``key`` is given and the index is enabled, :meth:`hit` of ``key`` (a
        miss is counted)."""
        with self._lock:
            st = self._indexes.get(index_key)
            if st is None:
                st = self._indexes[index_key] = self._new_state(index_key)
            if key is None or not st.enabled:
                return st.seq, st.enabled, None
            slot = self._lru.get(key)
            if slot is None:
                self._n["misses"] += 1
                return st.seq, True, None
            self._touch(key, slot)
            self._n["hits"] += 1
            return st.seq, True, (slot.entry, slot.hits)

    def hit(self, key: QueryKey, *, l0: bool = True) -> tuple[CachedResult, int] | None:
        """The hot path's :meth:`get` (``l0``) or :meth:`fetch`: the stored entry itself
        (its ``hit_count`` is not this one's) and its hit count with this hit, without
        copying the entry."""
        with self._lock:
            slot = self._lru.get(key)
            if slot is None:
                if l0:
                    self._n["misses"] += 1
                return None
            self._touch(key, slot)
            if l0:
                self._n["hits"] += 1
            return slot.entry, slot.hits

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._lru

    def _touch_gdsf(self, key: QueryKey, slot: _Slot) -> None:
        # the hit path: its heap items stay; they are re-checked when popped
        slot.hits += 1
        slot.base = self._inflation

    def _touch_learned(self, key: QueryKey, slot: _Slot) -> None:
        slot.hits += 1
        slot.base = self._inflation
        self.learned.hit(key)  # type: ignore[union-attr]  # set with this touch

    def _touch_lru(self, key: QueryKey, slot: _Slot) -> None:
        self._lru.move_to_end(key)
        for scope in slot.scopes:
            lru = self._scopes.get(scope)
            if lru is not None:
                lru.move_to_end(key)
        slot.hits += 1

    def peek(self, key: QueryKey) -> CachedResult | None:
        """Like :meth:`get` without counting or touching the LRU order."""
        with self._lock:
            slot = self._lru.get(key)
            return None if slot is None else replace(slot.entry, hit_count=slot.hits)

    # -- puts --------------------------------------------------------------------------

    def put(
        self,
        entry: CachedResult,
        seen_seq: int,
        decision: AdmissionDecision | None = None,
        *,
        decided_s: float | None = None,
    ) -> PutOutcome:
        """Offer a fresh result whose search began at ``seen_seq`` (from :meth:`get_seq`).
        Stored only if the policy admits it, its index is enabled, it fits the budget
        and no write reported since ``seen_seq`` changes it (module docstring). Raises
        ``ValueError`` for a ``seen_seq`` the index has not reached. ``decision``: the
        policy's decision taken earlier (a deferred put applies the logged one);
        ``decided_s``: its ``time.time()`` then (a lazy offer's park time), what the slot's
        ``stored_s`` says, so a removal event joins the decision's search event."""
        if decision is None:
            decision = self.policy.decide(entry)
        if decision.action != "admit":
            with self._lock:
                self._n["rejected"] += 1
            return PutOutcome(decision, "rejected")
        nbytes = entry.nbytes
        with self._lock:
            st = self._state(entry.index_key)
            if seen_seq > st.seq:
                raise ValueError(f"seen_seq {seen_seq} is ahead of the index ({st.seq})")
            if not st.enabled:
                return PutOutcome(decision, "disabled")
            verdict = self._recheck(st, entry, seen_seq)
            if verdict is not None:
                self._n["stale_puts"] += 1
                return PutOutcome(decision, verdict)
            scopes = st.scopes
            if self._budgets or self._tenant_default is not None:
                budgets: tuple[float, ...] = tuple(
                    self._default_budget(scope) if own is None else own
                    for scope in scopes
                    for own in (self._budgets.get(scope),)
                )
                if nbytes > min(budgets):
                    return PutOutcome(decision, "too-large")
            else:  # no budget but the node's (the usual case): nothing to look up
                budgets = _UNBOUNDED
            if nbytes > self.budget_bytes:
                return PutOutcome(decision, "too-large")
            self._remove(entry.key, "replaced")
            index = st.index
            if index is None or index.metric != entry.metric or index.dim != entry.vector.size:
                self._drop_entries(entry.index_key)  # none expected: a reset comes first
                index = st.index = InvalidationIndex(
                    entry.metric, int(entry.vector.size), max_clusters=self._max_clusters
                )
            index.add(entry.key, entry.vector, entry.kth_score, entry.filter, entry.ids)
            slot = self._lru[entry.key] = _Slot(
                entry.key,
                _stored(entry, decision),
                nbytes,
                0,
                scopes,
                self._inflation,
                True,
                time.time() if decided_s is None else decided_s,
            )
            self._bytes += nbytes
            scope_bytes = self._scope_bytes
            for scope in scopes:
                lru = self._scopes.get(scope)
                if lru is None:
                    lru = self._scopes[scope] = OrderedDict()
                lru[entry.key] = None
                scope_bytes[scope] = scope_bytes.get(scope, 0) + nbytes
            if self._gdsf:
                self._push(slot)
            if self.learned is not None:
                self.learned.added(slot)
            self._n["puts"] += 1
            while self._bytes > self.budget_bytes:
                self._evict_one(None)
            if budgets is not _UNBOUNDED:
                for scope, budget in zip(scopes, budgets, strict=True):
                    if scope_bytes.get(scope, 0) > budget:
                        self._evict_scope(scope)
            if slot.alive:
                return PutOutcome(decision, "stored")
            return PutOutcome(decision, "evicted")  # GDSF valued it least of all at once

    def _default_budget(self, scope: str) -> float:
        if scope.startswith("t:") and self._tenant_default is not None:
            return self._tenant_default
        return float("inf")

    def _evict_scope(self, scope: str) -> None:
        """Evict the scope's lowest-priority (or least recently used) entries until it
        fits its budget; other scopes' entries stay."""
        budget = self._budgets.get(scope, self._default_budget(scope))
        lru = self._scopes.get(scope)
        while lru and self._scope_bytes.get(scope, 0) > budget:
            self._evict_one(scope)
            lru = self._scopes.get(scope)

    def _push(self, slot: _Slot) -> None:
        """Order a new slot in the GDSF heaps; a heap whose items of departed entries
        (invalidated, replaced, expired: never popped) outnumber its live ones is rebuilt,
        so the heaps stay O(entries) when nothing is evicted."""
        heap = self._heap
        heap.push(slot)
        if len(heap) > 2 * len(self._lru) + 1024:
            heap.rebuild(self._lru.values())
        for scope in slot.scopes:
            scoped = self._scope_heaps.get(scope)
            if scoped is not None:
                scoped.push(slot)
                members = self._scopes[scope]
                if len(scoped) > 2 * len(members) + 256:
                    scoped.rebuild(self._lru[k] for k in members)

    def _evict_one(self, scope: str | None) -> None:
        """Evict one entry of ``scope`` (None: of the whole cache): the lowest GDSF
        priority (raising the inflation to it), or the least recently used."""
        members = self._lru if scope is None else self._scopes[scope]
        if not self._gdsf:
            self._remove(next(iter(members)), "evicted")
            self._n["evictions"] += 1
            return
        if self.learned is not None:  # sampled by the table in force (None: GDSF below)
            sampled = self.learned.victim(scope)
            if sampled is not None:
                sampled[0].priority = sampled[1]
                self._remove(sampled[0].key, "evicted")
                self._n["evictions"] += 1
                return
        heap = self._heap
        if scope is not None:
            found = self._scope_heaps.get(scope)
            if found is None:  # the scope's first eviction: order its entries
                found = self._scope_heaps[scope] = LazyHeap(self._scorer, self._heap_seq)
                found.rebuild(self._lru[k] for k in members)
            heap = found
        victim = heap.pop_victim(len(members))
        if victim is None:  # cannot happen while members is not empty; be safe
            self._remove(next(iter(members)), "evicted")
        else:
            slot, priority = victim
            slot.priority = priority
            if priority > self._inflation:
                self._inflation = priority
            self._remove(slot.key, "evicted")
        self._n["evictions"] += 1

    def _recheck(self, st: _IndexState, entry: CachedResult, seen_seq: int) -> str | None:
        """None if no batch after ``seen_seq`` changes ``entry``, else why not storable."""
        if seen_seq < st.floor:
            return "unverifiable"
        if not st.ring or st.ring[-1].seq <= seen_seq:
            return None  # no write reported since the search began (the usual case)
        ids = set(entry.ids)
        kth = entry.kth_score
        for writes in reversed(st.ring):
            if writes.seq <= seen_seq:
                break
            if writes.reset or not ids.isdisjoint(writes.ids):
                return "stale"
            if not writes.rows:
                continue
            vectors = np.stack([r.vector for r in writes.rows])
            if vectors.shape[1] != entry.vector.size:
                return "stale"
            enters = would_enter(entry.metric, entry.vector, kth, vectors)
            for row, enter in zip(writes.rows, enters.tolist(), strict=True):
                if enter and (entry.filter is None or entry.filter.matches(row.tags, row.numeric)):
                    return "stale"
        return None

    # -- invalidation (the applier) ----------------------------------------------------

    def invalidate(
        self, index_key: str, rows: Sequence[UpsertRow], deleted_ids: Iterable[str] = ()
    ) -> int:
        """Report one applied batch of ``index_key``: ``rows`` upserted (new ids and
        updates), ``deleted_ids`` deleted. Drops every entry they change and remembers
        them for in-flight puts; returns the number of entries dropped."""
        ids = frozenset(deleted_ids) | {r.id for r in rows}
        if not ids:
            return 0
        with self._lock:
            st = self._state(index_key)
            st.seq += 1
            self._remember(st, _Writes(st.seq, ids, tuple(rows)))
            index = st.index
            if index is None or not len(index):
                return 0
            keys = index.affected_by_ids(ids)
            if rows:
                if any(r.vector.shape != (index.dim,) for r in rows):
                    keys = {k for k, s in self._lru.items() if s.entry.index_key == index_key}
                else:
                    keys |= index.affected_by_upserts(
                        np.stack([r.vector for r in rows]),
                        [r.tags for r in rows],
                        [r.numeric for r in rows],
                    )
            for key in keys:
                self._remove(key, "invalidated")
            self._n["invalidations"] += len(keys)
            return len(keys)

    def invalidate_upserts(self, index_key: str, rows: Sequence[UpsertRow]) -> int:
        return self.invalidate(index_key, rows)

    def invalidate_ids(self, index_key: str, ids: Iterable[str]) -> int:
        return self.invalidate(index_key, (), ids)

    def reset_index(self, index_key: str) -> int:
        """The index was dropped or (re)created: drop its entries and refuse puts of
        searches that began before; returns the number dropped."""
        with self._lock:
            st = self._state(index_key)
            st.seq += 1
            self._remember(st, _Writes(st.seq, frozenset(), (), reset=True))
            n = self._drop_entries(index_key)
            st.index = None
            self._n["invalidations"] += n
            return n

    def _remember(self, st: _IndexState, writes: _Writes) -> None:
        st.ring.append(writes)
        st.ring_rows += writes.size
        while st.ring_rows > self._ring_limit and len(st.ring) > 1:
            old = st.ring.popleft()
            st.ring_rows -= old.size
            st.floor = old.seq

    # -- bookkeeping -------------------------------------------------------------------

    def expire(self, entry: CachedResult) -> bool:
        """Remove ``entry`` (as a lookup just returned it) because its admission TTL
        passed; False when the cache holds another entry under its key by now (kept). The
        lookup that found it expired is not counted among the hits it served."""
        with self._lock:
            slot = self._lru.get(entry.key)
            if slot is None or not (
                slot.entry is entry
                or (slot.entry.created_s == entry.created_s and slot.entry.ids == entry.ids)
            ):
                return False
            slot.hits = max(0, slot.hits - 1)
            self._remove(entry.key, "expired")
            self._n["expirations"] += 1
            return True

    def _remove(self, key: QueryKey, reason: str = "dropped") -> None:
        slot = self._lru.pop(key, None)
        if slot is None:
            return
        slot.alive = False
        self._bytes -= slot.nbytes
        for scope in slot.scopes:
            lru = self._scopes.get(scope)
            if lru is not None and lru.pop(key, 0) is None:
                self._scope_bytes[scope] -= slot.nbytes
                if not lru:
                    del self._scopes[scope], self._scope_bytes[scope]
                    self._scope_heaps.pop(scope, None)
        st = self._indexes.get(slot.entry.index_key)
        if st is not None and st.index is not None:
            st.index.remove(key)
        for hook in self._hooks:
            hook(key)
        for listener in self._listeners:
            listener(slot, reason)

    def _drop_entries(self, index_key: str) -> int:
        keys = [k for k, s in self._lru.items() if s.entry.index_key == index_key]
        for key in keys:
            self._remove(key, "dropped")
        return len(keys)

    def record_verification(self, false_hit: bool) -> None:
        """Count one hit re-checked against a fresh search (``false_hit``: they differed)."""
        with self._lock:
            self._n["verified"] += 1
            self._n["false_hits"] += int(false_hit)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                entries=len(self._lru),
                bytes=self._bytes,
                budget_bytes=self.budget_bytes,
                eviction=self.eviction,
                **self._n,
            )

    def pruning(self, index_key: str) -> tuple[int, int]:
        """(pairs tested exactly, pairs a full scan would have tested) by upsert
        invalidation of ``index_key`` so far."""
        with self._lock:
            st = self._indexes.get(index_key)
            if st is None or st.index is None:
                return 0, 0
            return st.index.checked_pairs, st.index.scanned_pairs


_ENTRY_FIELDS = tuple(
    f for f in CachedResult.__dataclass_fields__ if f not in ("admission", "hit_count")
)


_UNBOUNDED: tuple[float, ...] = (float("inf"), float("inf"))
_GET_FIELDS = operator.attrgetter(*_ENTRY_FIELDS)
# the slots' own setters: they skip the frozen class's __setattr__ (one call per field)
_SLOTS: Mapping[str, Any] = CachedResult.__dict__
_SET_FIELDS = tuple(_SLOTS[name].__set__ for name in _ENTRY_FIELDS)
_SET_ADMISSION = _SLOTS["admission"].__set__
_SET_HIT_COUNT = _SLOTS["hit_count"].__set__


def _stored(entry: CachedResult, decision: AdmissionDecision) -> CachedResult:
    """``replace(entry, admission=decision, hit_count=0)`` without re-running the
    entry's checks (it passed them when made): a copy of its fields through the slots'
    setters, about a twentieth of the cost."""
    out = object.__new__(CachedResult)
    for set_field, value in zip(_SET_FIELDS, _GET_FIELDS(entry), strict=True):
        set_field(out, value)
    _SET_ADMISSION(out, decision)
    _SET_HIT_COUNT(out, 0)
    return out


class CacheInvalidator:
    """The indexer's change listener for a :class:`ResultCache`: buffers the upserts,
    deletes and index resets of the batch being applied and reports them when the
    indexer says the batch is applied (after the index took it, before the applied
    positions advance). Called from the applier thread only."""

    def __init__(self, cache: ResultCache) -> None:
        self.cache = cache
        self._rows: dict[str, list[UpsertRow]] = {}
        self._deleted: dict[str, list[str]] = {}
        self._resets: list[str] = []

    def upserted(
        self,
        index_key: str,
        id: str,
        vector: Vector,
        tags: Sequence[str],
        numeric: Mapping[str, float],
    ) -> None:
        self._rows.setdefault(index_key, []).append(
            UpsertRow(id, vector, tuple(tags), dict(numeric))
        )

    def deleted(self, index_key: str, id: str) -> None:
        self._deleted.setdefault(index_key, []).append(id)

    def reset(self, index_key: str) -> None:
        self._resets.append(index_key)

    def applied(self) -> None:
        rows, deleted, resets = self._rows, self._deleted, self._resets
        self._rows, self._deleted, self._resets = {}, {}, []
        for index_key in rows.keys() | deleted.keys():
            self.cache.invalidate(index_key, rows.get(index_key, ()), deleted.get(index_key, ()))
        for index_key in resets:
            self.cache.reset_index(index_key)
