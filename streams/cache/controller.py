"""``CacheController``: the search path's one entry into the cache layers.

Lookup order (ARCHITECTURE §4): **L0** exact (:class:`QueryKey`), **L1** tolerant
(:mod:`streams.cache.tolerant`), **L2** semantic (:mod:`streams.cache.semantic`); on a
miss the search's payload join goes through **L3** (:mod:`streams.cache.payload`). Each
layer is switched per index by ``IndexConfig.cache.layers`` (node default: L0 and L3, so
tolerant answers are an explicit choice of the index's owner). A new configuration of an
index switches its layers at its next search; a layer switched off drops the index's state
in it (all of L0/L1/L2 off: its cached results too).

One store. Every result lives once, in the :class:`ResultCache`, under its L0 key; L1 and
L2 are secondary indexes from a tolerant key / a cluster representative to that L0 key.
So an L1/L2 answer is invalidated exactly like an L0 one (the same result-aware
:class:`InvalidationIndex`, the same put race check), memory is counted once against the
node's, the tenant's and the index's budgets, and when the result cache drops an entry
(invalidated, evicted) its removal hook unlinks it from L1 and L2.

Consistency. An L0 hit is what a fresh search would return at the node's applied
position, so it is served at every level after that level's wait. L1 and L2 hits were
computed for *another* query: they are served only at ``eventual``, and at ``bounded`` when
the entry was computed within the bound; at ``session`` and ``strong`` they are never
consulted (``skipped`` in the lookup says so). Every lookup says which layer answered and at
what distance (L1: Hamming distance 0 by construction; L2: cosine distance to the cluster's
representative), and the node's verification (``cache_verify_rate``) counts false hits per
layer against a fresh search.

Memory. A tenant's budget (``t:<tenant>``) and an index's (``i:<tenant>/<index>``,
``IndexConfig.cache.memory_budget_bytes``) bound the sum over the layers, estimated per
structure: an L0 entry its :attr:`CachedResult.nbytes`; its L1 link
:data:`L1_LINK_BYTES`; its L2 representative :func:`l2_rep_bytes` (the fp32 row with the
array's doubling slack, the maps' entries, and the text's features on the text path); an
L3 row :data:`~streams.cache.payload.ROW_BYTES` plus its strings. The L1/L2 bytes are
charged to the entry they point at (added to its ``nbytes`` before the put), so the result
cache's eviction (its policy, within each scope) drops an entry together with its links,
and its removal hook unlinks them. L3 rows belong to no entry: the payload cache gets the
room the scope's entries leave (:meth:`CacheController._l3_room`) and is trimmed after
every store, so a scope over budget evicts its own rows first, never another scope's. The
node-wide budgets (the result cache's, the payload cache's) still evict across tenants, as
a node's memory is one. :meth:`memory` reports the bytes per layer of one tenant.

Deferred offers (``background_offers=True``, off by default): the admission decision is
taken on the search path (so the query log records what the policy chose), and the store
(race check, invalidation index, L1/L2 links, about 0.1 ms of Python per miss) runs in one
worker thread. That is safe by the put race check: the entry is tested against every write
reported since its search began, however late it is stored. The price: a repeat of the
query that arrives before the worker stored it is a miss.

Lazy offers (``lazy_offers=True``; indexes with neither L1 nor L2 on, e.g. the node's
default L0+L3). Most misses are never repeated, and storing their result (the put: race
check, invalidation index, eviction heap, budgets) is half of what a miss costs the cache.
So the miss takes the admission decision on the search path (the query log records it,
its ``outcome`` is ``parked``) on what the policy reads of an entry (key, estimated size,
cost, filter; :meth:`CacheController.park_fresh`), builds no entry, and *parks* the fresh
result as the search returned it (its hit objects, labels, applied tokens) in a small
bounded map (``parked_entries``, ``parked_bytes``, oldest dropped first). When the
same query comes again, its lookup first builds the entry (as the first search would have)
and stores it through the ordinary put
with the seen sequence number of the *first* search: the put's race check tests it
against every write reported since that search began (as for deferred offers), so what
is stored is exactly what a put at this moment would store, and the lookup then finds it
as an L0 hit. The repeat is served from the cache as it would be with an eager offer; a
parked entry that is dropped, or refused by its late put (stale, unverifiable once the
index's write ring moved past it, index disabled), only makes that repeat a miss. Parked
entries are node-wide state bounded by their own byte limit, not charged to tenant or
index budgets until they are stored (then the put applies every budget). L1/L2 indexes
offer eagerly: a near query must find its cluster's entry after a single search.

Decisions off the search path (``defer_decisions``, on; where the node logs searches: the
policy loop's query log). A lazy miss builds and parks nothing on the search path
(:meth:`CacheController.defer`): its debug ``decision`` is a :class:`PendingDecision`
(``{"outcome": "parked", "action": "pending"}`` to the client) that holds the fresh result
as the search returned it, left in a map of deferred results by query key. Whoever comes
first, the query log's thread as it builds the miss's event or the query's repeat (its
lookup), makes it a parked result *undecided* (:meth:`CacheController.take_deferred`: the
``_Raw``, parked as :meth:`CacheController.park_undecided` parks one); the admission
decision is then taken once (:meth:`CacheController.settle`), by the query log's thread
(the event carries it as before) or by the repeat, and by the policy in force when the
search ran (``PolicyHolder.route``, taken at the search). A deferred result that a newer
miss of its query replaced before it was taken never enters the parked map (counted parked
and dropped, as a re-park drops the older); the deferred map holds at most a quarter of the
parked entries and the parked bytes (estimated: the oldest leave it; their events still
settle them, as dropped), and a result estimated over 1/64 of the parked bytes (64 KiB) is
parked undecided on the search path as before. A rejected result then leaves the parked
map; the parked map's trims (and freeing what they hold) happen at the decision too, at
most 256 drops a settle, while a park drops one only past twice the bounds: the map may
hold up to twice them. Only while the emitter's thread runs. Why: with the CPU caches cold
after the index scan, the decision (context, rules, the decision's dict) cost about 55 µs
of a 0.7 ms search on the search thread (docs/benchmarks.md, "Session 6"); deferring the
park too (session 7) took another ~10 µs of cold-cache work (the result's copy, the
park's lock and map, one of two objects) off it ("Session 7"). What it costs: the
decision's CPU is spent on the log's thread (or a RESP thread's, after its reply); the
policy's context counts the request when the decision is taken (milliseconds later); a
miss whose event is dropped (full queue) or never logged (a prefetch) is decided only if
its query repeats (else it leaves the deferred map by its bounds).

Doorkeeper (``admit_after=2``, :mod:`streams.cache.doorkeeper`): a first miss of a key
offers nothing (not even its entry is built); the key's next miss within the window
offers as usual. It trades the repeat's first hit for a cheaper first miss.

Threads: the controller's lock guards the L1 and L2 maps; the result cache's lock is never
taken while holding it except through the cache's public calls (lock order controller ->
cache; the removal hook only appends to a deque, drained under the controller's lock).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, cast

import numpy as np

from streams.cache.doorkeeper import Doorkeeper
from streams.cache.entry import CachedResult, estimate_nbytes, trusted_result
from streams.cache.keys import QueryKey, query_key
from streams.cache.payload import PayloadCache, scopes_of
from streams.cache.policy import AdmissionDecision, AdmitAll, PolicyHolder
from streams.cache.result_cache import PutOutcome, ResultCache
from streams.cache.semantic import (
    DEFAULT_L2_TEXT_THRESHOLD,
    DEFAULT_L2_VECTOR_THRESHOLD,
    TEXT_CURVE,
    VECTOR_CURVE,
    SemanticIndex,
    reuses,
)
from streams.cache.tolerant import SIMHASH_BITS, TolerantKey, tolerant_key
from streams.index.filters import Filter
from streams.index.model import (
    RESULT_LAYERS,
    CacheSettings,
    Consistency,
    IndexConfig,
    Metric,
    Vector,
)

if TYPE_CHECKING:
    from streams.index.segment import Probe

__all__ = [
    "L1_LINK_BYTES",
    "LAYERS",
    "CacheController",
    "CacheLookup",
    "FreshHit",
    "LayerMemory",
    "LayerStats",
    "l2_rep_bytes",
]

log = logging.getLogger(__name__)

LAYERS = ("L0", "L1", "L2", "L3")
_TOLERANT = ("L1", "L2")
_NO_LAYERS: frozenset[str] = frozenset()
_RESULT = frozenset(RESULT_LAYERS)

# Estimated bytes per structure (module docstring), from tracemalloc (docs/benchmarks.md,
# "Cache memory accounting"): an L1 link is a 16-byte digest (a bytes object), its entries
# in the key map and the reverse map's set, and the entry's charge record (measured 447);
# an L2 representative is a row of the group's fp32 matrix (counted twice: the matrix
# doubles), its log norm, key and text slots and its map entries (measured 390 + 4 per
# dimension); a text's features (token tuples and sets) measured 1,750 + 27 per character.
L1_LINK_BYTES = 450
_L2_FIXED_BYTES = 420
_L2_TEXT_BYTES = 1800  # plus 28 per character


class LayerMemory(TypedDict):
    """One tenant's cache bytes per layer, their total and its budget (None: unbounded)."""

    L0: int
    L1: int
    L2: int
    L3: int
    total: int
    budget: int | None


def l2_rep_bytes(dim: int, text: str | None = None) -> int:
    """Estimated bytes of one L2 representative of ``dim`` dimensions (with its text's
    features on the text path)."""
    extra = 0 if text is None else _L2_TEXT_BYTES + 28 * len(text)
    return _L2_FIXED_BYTES + 8 * dim + extra


@dataclass(slots=True)
class CacheLookup:
    """What the layers answered for one search. ``layer`` is ``L0``/``L1``/``L2`` on a
    hit, ``none`` on a miss; ``entry`` the cached result (serve its first ``k`` hits);
    ``distance`` the distance the tolerant layer used; ``skipped`` the enabled layers not
    consulted because of the consistency level. ``qkey``/``seen_seq`` are for the offer
    after a miss (``seen_seq`` taken before the search reads the index).

    Read-only by convention, not ``frozen``: a frozen dataclass's ``__init__`` sets each of
    its 13 fields through ``object.__setattr__`` (2.1 µs a lookup against 0.5 µs; every
    search makes one)."""

    layer: str
    entry: CachedResult | None
    distance: float | None
    qkey: QueryKey
    seen_seq: int
    layers: frozenset[str]
    skipped: tuple[str, ...] = ()
    l1_key: TolerantKey | None = None
    l2_leader: bool = False  # on a miss: no cluster within the threshold, start one
    hit_count: int = 0  # the entry's hits, this one included (its own field is not kept)
    agreement: float | None = None  # L2 on the text path: the text stage's score
    # on a miss: whether to build and offer the fresh result (False: the doorkeeper held
    # the key's first miss, streams.cache.doorkeeper)
    offer: bool = True
    # on a miss: the fresh result goes to :meth:`CacheController.park_fresh` (lazy offers
    # of an index without L1/L2), which builds nothing unless the query repeats
    lazy: bool = False

    @property
    def hit(self) -> bool:
        return self.entry is not None

    def as_debug(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "distance": self.distance,
            "agreement": self.agreement,
            "layers": sorted(self.layers),
            "tolerant_skipped": list(self.skipped),
        }


@dataclass(slots=True)
class LayerStats:
    """Per-layer counters: ``hits``; ``verified``/``false_hits`` (hits re-checked
    against a fresh search, and those whose ids differed)."""

    hits: int = 0
    verified: int = 0
    false_hits: int = 0

    def as_dict(self) -> dict[str, Any]:
        rate = self.false_hits / self.verified if self.verified else 0.0
        return {
            "hits": self.hits,
            "verified": self.verified,
            "false_hits": self.false_hits,
            "false_hit_rate": round(rate, 6),
        }


@dataclass(frozen=True, slots=True)
class _IndexSettings:
    layers: frozenset[str]
    threshold: float
    text_threshold: float = DEFAULT_L2_TEXT_THRESHOLD
    l0: bool = False  # the layer flags, precomputed for the hot path
    l1: bool = False
    l2: bool = False
    tolerant: tuple[str, ...] = ()
    l3: bool = False
    results: bool = False  # any of L0/L1/L2: results are cached


@dataclass(slots=True)
class _Links:
    """What an entry's L1/L2 links were charged (bytes), for :meth:`memory`."""

    tenant: str
    index_key: str
    l1: int
    l2: int


@dataclass(slots=True)
class _Counters:
    layers: dict[str, LayerStats] = field(
        default_factory=lambda: {x: LayerStats() for x in RESULT_LAYERS}
    )
    offer_errors: int = 0


class CacheController:
    """The layers over one :class:`ResultCache` (module docstring). ``default_layers``:
    layers of an index without cache settings; ``l2_threshold``: the node's default L2
    distance for vector queries; ``l2_text_threshold``: its distance on the text path
    (:meth:`lookup_text`, where the text stage checks every candidate too); both are caps
    of L2's cost-aware reuse (:func:`~streams.cache.semantic.reuses`), whose
    ``l2_penalty_ms`` / ``l2_text_penalty_ms`` (ms a wrong answer costs; 0, the default
    here: distance alone) the node sets from ``cache_l2_penalty_ms`` / ``..._text_...``;
    ``simhash_bits``: L1's key width."""

    def __init__(
        self,
        cache: ResultCache,
        *,
        default_layers: tuple[str, ...] = ("L0", "L3"),
        l2_threshold: float = DEFAULT_L2_VECTOR_THRESHOLD,
        l2_text_threshold: float = DEFAULT_L2_TEXT_THRESHOLD,
        l2_penalty_ms: float = 0.0,
        l2_text_penalty_ms: float = 0.0,
        simhash_bits: int = SIMHASH_BITS,
        max_clusters_per_group: int = 4096,
        background_offers: bool = False,
        payload_budget_bytes: int = 16 * 1024 * 1024,
        admit_after: int = 1,
        doorkeeper_keys: int = 65_536,
        lazy_offers: bool = False,
        parked_entries: int = 4096,
        parked_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        if admit_after not in (1, 2):
            raise ValueError("admit_after must be 1 or 2")
        if any(x not in LAYERS for x in default_layers):
            raise ValueError(f"layers must be of {LAYERS}")
        if not 0.0 <= l2_threshold <= 2.0:
            raise ValueError("l2_threshold must be in [0, 2]")
        if not 0.0 <= l2_text_threshold <= 2.0:
            raise ValueError("l2_text_threshold must be in [0, 2]")
        if not (l2_penalty_ms >= 0.0 and l2_text_penalty_ms >= 0.0):  # NaN fails too
            raise ValueError("l2_penalty_ms and l2_text_penalty_ms must be >= 0")
        self.cache = cache
        self.default_layers = frozenset(default_layers)
        self.l2_threshold = l2_threshold
        self.l2_text_threshold = l2_text_threshold
        # L2's cost-aware reuse (semantic.reuses): ms a wrong answer costs; 0: distance only
        self.l2_penalty_ms = l2_penalty_ms
        self.l2_text_penalty_ms = l2_text_penalty_ms
        # text-path entries that any write to their index invalidates (hybrid results):
        # QueryKey -> the index's invalidation sequence number their search began at and
        # the caller's generation of what else they read (the keyword index)
        self._any_write: dict[QueryKey, tuple[int, int]] = {}
        self.simhash_bits = simhash_bits
        self._lock = threading.Lock()
        self._l1: dict[TolerantKey, QueryKey] = {}
        self._l1_of: dict[QueryKey, set[TolerantKey]] = {}
        self._l2 = SemanticIndex(max_per_group=max_clusters_per_group)
        self._removed: deque[QueryKey] = deque()
        self._settings: dict[str, tuple[CacheSettings | None, _IndexSettings]] = {}
        self._n = _Counters()
        self.background_offers = background_offers
        # admit_after 2: a miss offers its result only if its key missed recently before
        self.doorkeeper = Doorkeeper(doorkeeper_keys) if admit_after == 2 else None
        # lazy offers (L0-only indexes): an admitted miss is parked, stored when its query
        # repeats (module docstring, "Lazy offers")
        self.lazy_offers = lazy_offers
        self._parked = _Parked(parked_entries, parked_bytes)
        self._settle_lock = threading.Lock()  # a parked result's decision is taken once
        # lazy misses deferred whole (defer): query key -> its PendingDecision, the newest,
        # in the order they came; changed under _defer_lock (a lookup reads it without),
        # bounded by entries and estimated bytes (_trim_deferred)
        self._deferred: dict[QueryKey, PendingDecision] = {}
        self._defer_lock = threading.Lock()
        self._defer_entries = max(16, parked_entries // 4)
        self._defer_bytes = parked_bytes // 4  # estimated bytes held, at most
        self._defer_item_bytes = parked_bytes // 64  # larger results park at once
        self._deferred_bytes = 0
        self.deferred_trimmed = 0
        # where the query log runs, a lazy miss's decision is taken off the search path
        # (park_undecided); False: on it (park_fresh), as without a query log
        self.defer_decisions = True
        # per entry, the bytes its L1/L2 links were charged; per tenant, their sums (l1, l2)
        self._links: dict[QueryKey, _Links] = {}
        self._tenant_links: dict[str, list[int]] = {}
        # L3: the payload join of fresh searches of indexes with L3 on, within the room
        # each tenant's and index's entries leave in their budgets
        self.payloads = PayloadCache(payload_budget_bytes, self._l3_room)
        self._pending: queue.Queue[tuple[CacheLookup, CachedResult, AdmissionDecision] | None]
        self._pending = queue.Queue()
        self._worker: threading.Thread | None = None
        cache.add_removal_hook(self._removed.append)

    # -- settings ------------------------------------------------------------------------

    def settings(self, config: IndexConfig) -> _IndexSettings:
        """The index's layers and L2 thresholds (vector, text); the first time a
        configuration is seen, applies its memory budget and drops the index's state in
        the layers it switched off (module docstring)."""
        known = self._settings.get(config.key)
        if known is not None and known[0] is config.cache:
            return known[1]
        cs = config.cache
        layers = self.default_layers if cs is None else frozenset(cs.layers)
        out = _IndexSettings(
            layers,
            self.l2_threshold if cs is None or cs.l2_threshold is None else cs.l2_threshold,
            self.l2_text_threshold
            if cs is None or cs.l2_text_threshold is None
            else cs.l2_text_threshold,
            "L0" in layers,
            "L1" in layers,
            "L2" in layers,
            tuple(x for x in _TOLERANT if x in layers),
            "L3" in layers,
            not layers.isdisjoint(_RESULT),
        )
        self.cache.set_index_budget(config.key, None if cs is None else cs.memory_budget_bytes)
        if known is not None and known[1].layers != layers:
            self._switch_off(config.key, known[1], out)
        self._settings[config.key] = (cs, out)
        self.payloads.trim(scopes_of(config.key))  # the index's budget may have shrunk
        return out

    def _switch_off(self, index_key: str, old: _IndexSettings, new: _IndexSettings) -> None:
        """Drop ``index_key``'s state in the layers ``new`` switched off. An unlinked
        L1/L2 link's bytes stay charged to its entry until the entry leaves the cache (an
        overcount of the budget, never an undercount)."""
        if old.results and not new.results:
            self.cache.reset_index(index_key)  # its entries, with their L1/L2 links
        with self._lock:
            self._drain()
            if old.l1 and not new.l1:
                for qkey, links in self._links.items():
                    if links.index_key == index_key:
                        for l1_key in self._l1_of.pop(qkey, ()):
                            if self._l1.get(l1_key) == qkey:
                                del self._l1[l1_key]
            if old.l2 and not new.l2:
                self._l2.drop_index(index_key)
        if old.l3 and not new.l3:
            self.payloads.drop_index(index_key)

    def set_tenant_budget(self, tenant: str, budget_bytes: int | None) -> None:
        """Bound the bytes of ``tenant``'s cache state over every layer (None: the node's
        default); evicts its own state at once if it is over."""
        self.cache.set_tenant_budget(tenant, budget_bytes)
        self.payloads.trim(("t:" + tenant,))

    def _l3_room(self, scope: str) -> float:
        """Bytes ``scope`` may hold in L3: its budget less what its entries hold."""
        budget = self.cache.budget_of(scope)
        if budget is None:
            return float("inf")
        return budget - self.cache.scope_bytes(scope)

    # -- lookup --------------------------------------------------------------------------

    def lookup(
        self,
        config: IndexConfig,
        query: Vector,
        k: int,
        flt: Filter | None,
        consistency: Consistency = Consistency.EVENTUAL,
        bound_ms: int | None = None,
    ) -> CacheLookup:
        """Look the search up layer by layer (module docstring). Call after the
        consistency wait; pass the result to :meth:`offer` on a miss.

        Cost: an index with no layer on pays its :class:`QueryKey` (the query log's key)
        and nothing else; one lock of the result cache answers the sequence number, the
        index's switch and the L0 probe together; L1/L2 run only where switched on."""
        st = self.settings(config)
        key = config.key
        qkey = query_key(key, config.metric, query, k, flt)
        if not st.results:  # no layer, or L3 only
            return CacheLookup("none", None, None, qkey, 0, st.layers)
        # a parked (or deferred) result of this query: store it first (lock-free looks,
        # then the pop)
        if st.l0:
            deferred = self._deferred.get(qkey)
            if deferred is not None:
                self.take_deferred(deferred)
            if qkey in self._parked.items:
                self._promote(qkey)
        # the sequence number is taken before the search reads the index
        seen_seq, enabled, found = self.cache.probe(key, qkey if st.l0 else None)
        if not enabled:
            return CacheLookup("none", None, None, qkey, seen_seq, _NO_LAYERS)
        layers = st.layers
        if found is not None:
            self._count("L0")
            return CacheLookup("L0", found[0], 0.0, qkey, seen_seq, layers, hit_count=found[1])
        dk = self.doorkeeper
        if not st.tolerant:
            return CacheLookup(
                "none",
                None,
                None,
                qkey,
                seen_seq,
                layers,
                offer=dk is None or dk.admit(qkey),
                lazy=self.lazy_offers,
            )
        max_age_s = _max_age_s(consistency, bound_ms)
        if max_age_s is None:
            return CacheLookup(
                "none",
                None,
                None,
                qkey,
                seen_seq,
                layers,
                st.tolerant,
                offer=dk is None or dk.admit(qkey),
            )
        l1_key: TolerantKey | None = None
        if st.l1:
            l1_key = tolerant_key(key, config.metric, query, k, flt, self.simhash_bits)
            with self._lock:
                target = self._l1.get(l1_key)
            found = self._serve(target, k, max_age_s)
            if found is not None:
                self._count("L1")
                entry = found[0]
                dist = _cosine_distance(query, entry.vector)  # the keys' Hamming distance is 0
                return CacheLookup(
                    "L1", entry, dist, qkey, seen_seq, layers, (), l1_key, hit_count=found[1]
                )
        leader = False
        if st.l2:
            group = SemanticIndex.group_of("vector", key, flt, k)
            with self._lock:
                self._drain()
                # within the threshold only: the projected prefilter (semantic.py)
                match = self._l2.nearest(group, query, config.metric, within=st.threshold)
            if match is not None and reuses(
                match.distance, match.cost_ms, st.threshold, self.l2_penalty_ms, VECTOR_CURVE
            ):
                found = self._serve(match.key, k, max_age_s)
                if found is not None:
                    self._count("L2")
                    return CacheLookup(
                        "L2",
                        found[0],
                        match.distance,
                        qkey,
                        seen_seq,
                        layers,
                        (),
                        l1_key,
                        hit_count=found[1],
                    )
            leader = True  # no cluster near enough, or its result cannot serve this query
        # the doorkeeper keys an L1 index by its tolerant key (near duplicates count as
        # one query), else by the exact key
        offer = dk is None or dk.admit(qkey if l1_key is None else l1_key)
        return CacheLookup(
            "none", None, None, qkey, seen_seq, layers, (), l1_key, leader, offer=offer
        )

    def _serve(
        self, target: QueryKey | None, k: int, max_age_s: float
    ) -> tuple[CachedResult, int] | None:
        if target is None:
            return None
        found = self.cache.hit(target, l0=False)
        if found is None:
            return None
        entry = found[0]
        if entry.k < k:
            return None
        if max_age_s < float("inf") and time.monotonic() - entry.created_s > max_age_s:
            return None
        return found

    def _count(self, layer: str) -> None:
        with self._lock:
            self._n.layers[layer].hits += 1

    # -- offer ---------------------------------------------------------------------------

    def offer(self, lookup: CacheLookup, entry: CachedResult) -> PutOutcome | None:
        """Offer a fresh result after ``lookup`` missed (``entry.key`` must be
        ``lookup.qkey``). Stored once in the result cache (admission, budget, race
        check), then linked from L1 and L2 as the layers are enabled. None when none of
        L0/L1/L2 is enabled for the index, or the doorkeeper held the miss
        (``lookup.offer`` False: a caller that checks it need not build the entry). The
        links' bytes are charged to the entry (module docstring)."""
        if not lookup.offer or lookup.layers.isdisjoint(_RESULT):
            return None
        if entry.key != lookup.qkey:
            raise ValueError("the entry must carry the lookup's QueryKey")
        l1 = L1_LINK_BYTES if "L1" in lookup.layers else 0
        l2 = (
            l2_rep_bytes(entry.vector.size)
            if "L2" in lookup.layers and (lookup.l2_leader or lookup.skipped)
            else 0
        )
        if l1 or l2:
            _charge(entry, l1, l2)
        if self.lazy_offers and lookup.layers.isdisjoint(_TOLERANT):
            decision = self.cache.policy.decide(entry)
            if decision.action == "admit" and self._parked.park(lookup, entry, decision):
                return PutOutcome(decision, "parked")
            return self._store(lookup, entry, decision)  # L3 trimmed as after any store
        if self.background_offers:
            decision = self.cache.policy.decide(entry)
            if decision.action == "admit":
                self._start_worker()
                self._pending.put((lookup, entry, decision))
                return PutOutcome(decision, "queued")
            return self.cache.put(entry, lookup.seen_seq, decision=decision)  # counted
        return self._store(lookup, entry, None)

    def fresh_raw(
        self,
        lookup: CacheLookup,
        index_key: str,
        metric: Metric,
        query: Vector,
        k: int,
        flt: Filter | None,
        labels: tuple[int, ...],
        hits: Sequence[FreshHit],
        applied: tuple[str, ...],
        compute_ms: float,
        depends: tuple[tuple[str, Probe], ...] = (),
        chars: int | None = None,
        created_s: float | None = None,
    ) -> _Raw:
        """A lazy miss's fresh result *as the search returned it* (its ``hits`` objects
        with ``id``, ``score``, ``meta``), for :meth:`park_fresh` or
        :meth:`park_undecided`: what the policy reads of an entry (key, size estimate,
        cost, filter) and a copy of the query; nothing is built. ``chars``: the
        characters of the hits' ids and metas, if the caller counted them (the search's
        payload join does). ``created_s``: ``time.monotonic()`` when the search ran (default
        now): what a bounded-staleness read measures the entry's age from."""
        if chars is None:
            chars = 0
            for h in hits:
                chars += len(h.id) if h.meta is None else len(h.id) + len(h.meta)
        query = np.array(query, dtype=np.float32)
        return _Raw(
            lookup.qkey, index_key, metric, query, k, flt, labels, tuple(hits), applied,
            compute_ms, time.monotonic() if created_s is None else created_s, depends,
            estimate_nbytes(query.shape[0], len(hits), chars),
        )  # fmt: skip

    def defer(
        self,
        lookup: CacheLookup,
        index_key: str,
        metric: Metric,
        query: Vector,
        k: int,
        flt: Filter | None,
        labels: tuple[int, ...],
        hits: tuple[FreshHit, ...],
        applied: tuple[str, ...],
        compute_ms: float,
        depends: tuple[tuple[str, Probe], ...],
        chars: int,
    ) -> PendingDecision | None:
        """A lazy miss where the query log runs (module docstring, "Decisions off the
        search path"): nothing is built, copied or parked; the fresh result is held by the
        returned :class:`PendingDecision` (the search's debug ``decision``), found by the
        query's repeat through the deferred map. ``query`` and ``hits`` must be the
        caller's to give (not changed later: a view of someone's buffer is not). None
        (nothing deferred): the policy decides on built entries, or the result's estimated
        bytes are over 1/64 of the parked bytes; then :meth:`fresh_raw` and
        :meth:`park_undecided` (or :meth:`park_fresh`), as before."""
        policy = self.cache.policy
        cls = policy.__class__
        nbytes = estimate_nbytes(query.shape[0], len(hits), chars)
        if cls not in _DRAFT_POLICIES or nbytes > self._defer_item_bytes:
            return None
        d = PendingDecision(_PENDING_ITEMS)
        d._ctl = self
        d._raw = None
        d._args = (
            lookup, index_key, metric, query, k, flt, labels, hits, applied, compute_ms,
            depends, chars, time.monotonic(),
            cast("PolicyHolder", policy).route(index_key) if cls is PolicyHolder else None,
            nbytes,
        )  # fmt: skip
        key = lookup.qkey
        with self._defer_lock:
            deferred = self._deferred
            old = deferred.pop(key, None)  # a concurrent miss of the query: replaced (its
            if old is not None:  # event still settles it, as dropped); the newest goes last
                self._deferred_bytes -= old._args[-1]
            deferred[key] = d
            self._deferred_bytes += nbytes
            if len(deferred) > self._defer_entries or self._deferred_bytes > self._defer_bytes:
                self._trim_deferred()
        return d

    def take_deferred(self, d: PendingDecision) -> _Raw:
        """The parked form of deferred miss ``d`` (:meth:`defer`), made once: its
        ``_Raw``, parked undecided if ``d`` is still its query's deferred result; one a
        newer miss replaced (or the map's bounds dropped) is not parked, and counts as
        parked and dropped. Called by whoever comes first: the query log's thread
        (:meth:`PendingDecision.settle`) or the query's repeat (:meth:`lookup`)."""
        with self._defer_lock:
            raw = d._raw
            if raw is not None:
                return raw
            (lookup, index_key, metric, query, k, flt, labels, hits, applied, compute_ms,
             depends, chars, created_s, route, nbytes) = d._args  # fmt: skip
            raw = self.fresh_raw(
                lookup, index_key, metric, query, k, flt, labels, hits, applied, compute_ms,
                depends, chars, created_s,
            )  # fmt: skip
            raw.route = route
            d._raw, d._args = raw, None
            deferred = self._deferred
            key = lookup.qkey
            if deferred.get(key) is d:
                # parked before it leaves the deferred map: a lookup finds it in one of them;
                # at its search's wall time (what its stored entry's removal event carries,
                # and the learner joins with the miss's event)
                at = time.time() - (time.monotonic() - created_s)
                if not self._parked.park(lookup, raw, None, slack=2, at=at):
                    self._parked.count_dropped()  # the parked bytes are 0 (tests)
                del deferred[key]
                self._deferred_bytes -= nbytes
            else:
                self._parked.count_dropped()
        return raw

    def _trim_deferred(self) -> None:
        """Drop the oldest deferred results past the bounds (caller holds
        ``_defer_lock``; their events still settle them: not parked, counted as dropped
        then)."""
        deferred = self._deferred
        while deferred and (
            len(deferred) > self._defer_entries or self._deferred_bytes > self._defer_bytes
        ):
            d = deferred.pop(next(iter(deferred)))
            self._deferred_bytes -= d._args[-1]
            self.deferred_trimmed += 1

    def park_fresh(self, lookup: CacheLookup, raw: _Raw) -> PutOutcome:
        """The lazy miss (``lookup.lazy``; module docstring, "Lazy offers"): take the
        admission decision on ``raw`` (:meth:`fresh_raw`) and park it; the
        :class:`CachedResult` is built, and put, only when the query repeats. A rejected
        or unparkable result is built and put at once, as :meth:`offer` would. Returns
        the outcome to log (``parked`` when parked)."""
        policy = self.cache.policy
        # the known policies read only the draft's fields; any other decides on the entry
        entry: CachedResult | None = None
        if policy.__class__ in _DRAFT_POLICIES:
            decision = policy.decide(cast("CachedResult", raw))
        else:
            entry = raw.build()
            decision = policy.decide(entry)
        if decision.action == "admit" and self._parked.park(lookup, raw, decision):
            return PutOutcome(decision, "parked")
        return self._store(lookup, entry or raw.build(), decision)  # as an eager offer

    def park_undecided(self, lookup: CacheLookup, raw: _Raw) -> bool:
        """A lazy miss whose admission decision is taken off the search path (module
        docstring, "Decisions off the search path"): park ``raw`` (:meth:`fresh_raw`)
        *undecided*; the caller hands it to whoever settles it (:meth:`settle`: the query
        log's thread, or the query's repeat, whichever comes first). False (nothing
        parked): the policy decides on built entries, or the result alone is over the
        parked byte limit; then call :meth:`park_fresh`."""
        policy = self.cache.policy
        if policy.__class__ not in _DRAFT_POLICIES:
            return False
        if policy.__class__ is PolicyHolder:
            raw.route = policy.route(raw.index_key)
        # the drops of the oldest, and freeing what they hold, are left to settle()
        return self._parked.park(lookup, raw, None, slack=2)

    def settle(self, raw: _Raw, *, promoting: bool = False) -> AdmissionDecision:
        """The admission decision of a result parked undecided, taken once (the policy
        counts the request then): by the query log's thread as it logs the miss, or by
        the query's repeat if that comes first (``promoting``: the repeat's lookup, which
        popped it already). A rejected result leaves the parked map. Off the search path,
        also trims what :meth:`park_undecided` left over the parked bounds."""
        with self._settle_lock:
            decision = raw.decision
            if decision is not None:
                return decision
            policy = self.cache.policy
            entry = cast("CachedResult", raw)
            decision = raw.decision = (
                policy.decide_routed(entry, raw.route)
                if policy.__class__ is PolicyHolder
                else policy.decide(entry)
            )
        if decision.action != "admit":
            self.cache.count_rejected()
            if not promoting:  # the repeat popped it and counts it (_promote)
                self._parked.reject(raw)
        if not promoting:
            self._parked.trim()  # what park_undecided left over the bounds, some at a time
        return decision

    def _store(
        self,
        lookup: CacheLookup,
        entry: CachedResult,
        decision: AdmissionDecision | None,
        decided_s: float | None = None,
    ) -> PutOutcome:
        outcome = (
            self.cache.put(entry, lookup.seen_seq)
            if decision is None
            else self.cache.put(entry, lookup.seen_seq, decision=decision, decided_s=decided_s)
        )
        if not outcome.stored:
            return outcome
        with self._lock:
            self._drain()
            if entry.key not in self.cache:  # dropped since the put: no dangling link
                return outcome
            self._account(entry)
            if lookup.l1_key is not None:
                self._link_l1(lookup.l1_key, entry)
            elif "L1" in lookup.layers:
                self._link_l1(
                    tolerant_key(
                        entry.index_key,
                        entry.metric,
                        entry.vector,
                        entry.k,
                        entry.filter,
                        self.simhash_bits,
                    ),
                    entry,
                )
            if "L2" in lookup.layers and (lookup.l2_leader or lookup.skipped):
                group = SemanticIndex.group_of("vector", entry.index_key, entry.filter, entry.k)
                self._l2.add(group, entry.vector, entry.key, cost_ms=entry.compute_ms)
        self.payloads.trim(scopes_of(entry.index_key))  # the entry took room from L3
        return outcome

    def _promote(self, qkey: QueryKey) -> None:
        """Store the parked result of ``qkey`` (its query repeats), through the same put
        as any offer: its race check tests it against every write reported since its
        search began. One that can no longer be checked or stored is dropped (a miss)."""
        parked = self._parked.pop(qkey)
        if parked is None:
            return
        lookup, held, decision, parked_s = parked
        if decision is None:  # parked undecided, not settled by the query log yet
            assert isinstance(held, _Raw)
            decision = self.settle(held, promoting=True)
            if decision.action != "admit":  # popped here: counted here, whoever decided
                self._parked.reject(held, popped=True)
                return
        try:
            entry = held.build() if isinstance(held, _Raw) else held
            outcome = self._store(lookup, entry, decision, parked_s)
        except ValueError:  # its index's sequence was reset under it: never served
            outcome = None
        self._parked.settled(outcome is not None and outcome.stored)

    def _start_worker(self) -> None:
        if self._worker is None:
            with self._lock:
                if self._worker is None:
                    self._worker = threading.Thread(
                        target=self._work, name="cache-offers", daemon=True
                    )
                    self._worker.start()

    def _work(self) -> None:
        while (item := self._pending.get()) is not None:
            try:
                self._store(*item)
            except Exception:  # an entry not stored is a miss later, never a wrong hit
                log.exception("deferred cache offer failed")
                with self._lock:
                    self._n.offer_errors += 1
            finally:
                self._pending.task_done()
        self._pending.task_done()

    def flush(self) -> None:
        """Wait until every deferred offer is stored (tests, benchmarks)."""
        if self._worker is not None:
            self._pending.join()

    def close(self) -> None:
        """Store the deferred offers, then stop the worker."""
        worker, self._worker = self._worker, None
        if worker is not None:
            self._pending.put(None)
            worker.join()

    def _link_l1(self, l1_key: TolerantKey, entry: CachedResult) -> None:
        old = self._l1.get(l1_key)
        if old is not None and old != entry.key:
            self._l1_of.get(old, set()).discard(l1_key)
        self._l1[l1_key] = entry.key
        self._l1_of.setdefault(entry.key, set()).add(l1_key)

    # -- the text path (VEC.QUERY) -------------------------------------------------------

    def lookup_text(
        self,
        config: IndexConfig,
        text_embedding: Vector,
        k: int,
        flt: Filter | None,
        consistency: Consistency = Consistency.EVENTUAL,
        bound_ms: int | None = None,
        text: str | None = None,
        *,
        variant: str = "",
        generation: int = 0,
    ) -> CacheLookup:
        """L2 on the embedding of the query *text* (``VEC.QUERY``, dense and hybrid: a hit
        needs no vector search, keyword search or fusion). Only L2 is consulted, at the
        index's text threshold (``cache.l2_text_threshold``, else the node's); the same
        consistency rules apply (call after the consistency wait). On a miss, search and
        call :meth:`offer_text`. Pass the raw ``text`` (to both calls) for L2's text stage
        (:mod:`streams.cache.agreement`): without it only distance counts. A hit says its
        ``distance`` and ``agreement``. An entry offered with ``any_write`` serves only
        while no write has reached its index since its search began. ``variant``: what
        else the result depends on (the text search's mode and fusion); results of
        different variants never serve each other. ``generation``: for ``any_write``
        entries, the caller's version of whatever else the result read (the keyword index,
        read before this call); an entry offered at another generation is stale."""
        st = self.settings(config)
        key = config.key
        layers = st.layers if self.cache.enabled(key) else frozenset()
        dummy = QueryKey(b"\0" * 16)
        seen_seq = self.cache.get_seq(key)
        if "L2" not in layers:
            return CacheLookup("none", None, None, dummy, seen_seq, layers)
        max_age_s = _max_age_s(consistency, bound_ms)
        if max_age_s is None:
            return CacheLookup("none", None, None, dummy, seen_seq, layers, ("L2",))
        group = SemanticIndex.group_of(_text_space(variant), key, flt, k)
        threshold = st.text_threshold
        with self._lock:
            self._drain()
            match = self._l2.nearest(group, text_embedding, Metric.COSINE, text, threshold)
            if match is not None:
                since = self._any_write.get(match.key)
                if since is not None and since != (seen_seq, generation):  # a write since
                    self._l2.remove(match.key)
                    del self._any_write[match.key]
                    match = None
        if match is not None and reuses(
            match.distance, match.cost_ms, threshold, self.l2_text_penalty_ms, TEXT_CURVE
        ):
            found = self._serve(match.key, k, max_age_s)
            if found is not None:
                self._count("L2")
                return CacheLookup(
                    "L2",
                    found[0],
                    match.distance,
                    found[0].key,
                    seen_seq,
                    layers,
                    hit_count=found[1],
                    agreement=match.agreement,
                )
        return CacheLookup("none", None, None, dummy, seen_seq, layers, (), None, True)

    def offer_text(
        self,
        lookup: CacheLookup,
        text_embedding: Vector,
        entry: CachedResult,
        text: str | None = None,
        *,
        any_write: bool = False,
        variant: str = "",
        generation: int = 0,
    ) -> PutOutcome | None:
        """Store ``entry`` (the fresh result of the text query; its ``key``/``vector``
        are those of the search vector, so it is invalidated like any entry) and make
        ``text_embedding`` the representative of a new text cluster pointing at it.
        ``lookup`` is the :meth:`lookup_text` that missed (its ``seen_seq`` is used).

        ``any_write``: the result depends on more than its own hits and the search vector
        (hybrid: keyword ranks, BM25 statistics, fused scores), so the result-aware rule
        cannot tell which writes change it. It then serves only while the index's
        invalidation sequence number is still ``lookup.seen_seq``: any upsert or delete
        reported for the index since the search began, or a change of ``generation``
        (the keyword index's, taken before the search), makes it a miss (and unlinks it).
        ``variant``, ``generation``: as given to :meth:`lookup_text`."""
        if "L2" not in lookup.layers:
            return None
        prev: tuple[int, int] | None = None
        seen = (lookup.seen_seq, generation)
        if any_write:
            with self._lock:
                prev = self._any_write.get(entry.key)
                self._any_write[entry.key] = seen
        linking = lookup.l2_leader or bool(lookup.skipped)
        if linking:
            _charge(entry, 0, l2_rep_bytes(np.asarray(text_embedding).size, text))
        outcome = self.cache.put(entry, lookup.seen_seq)
        if outcome.stored:
            group = SemanticIndex.group_of(
                _text_space(variant), entry.index_key, entry.filter, entry.k
            )
            with self._lock:
                self._drain()
                if entry.key in self.cache:  # not dropped since the put: no dangling link
                    self._account(entry)
                    if linking:
                        self._l2.add(
                            group, text_embedding, entry.key, text, cost_ms=entry.compute_ms
                        )
            self.payloads.trim(scopes_of(entry.index_key))
        elif any_write and not outcome.stored:  # an older entry of the key stays as it was
            with self._lock:
                if self._any_write.get(entry.key) == seen:
                    if prev is None:
                        del self._any_write[entry.key]
                    else:
                        self._any_write[entry.key] = prev
        return outcome

    # -- bookkeeping ---------------------------------------------------------------------

    def _account(self, entry: CachedResult) -> None:
        """Record the link bytes charged to the stored ``entry`` (caller holds the lock)."""
        l1, l2 = entry.derived.get(_LINKS, (0, 0))
        old = self._links.get(entry.key)
        if old is not None:  # replaced: the old slot's charge left with it
            self._unaccount(old)
        if not (l1 or l2):
            if old is not None:
                del self._links[entry.key]
            return
        tenant = entry.index_key.partition("/")[0]
        self._links[entry.key] = _Links(tenant, entry.index_key, l1, l2)
        sums = self._tenant_links.setdefault(tenant, [0, 0])
        sums[0] += l1
        sums[1] += l2

    def _unaccount(self, links: _Links) -> None:
        sums = self._tenant_links[links.tenant]
        sums[0] -= links.l1
        sums[1] -= links.l2
        if sums == [0, 0]:
            del self._tenant_links[links.tenant]

    def _drain(self) -> None:
        """Unlink entries the result cache dropped (caller holds the lock)."""
        while self._removed:
            key = self._removed.popleft()
            if key in self.cache:  # replaced, not dropped
                continue
            links = self._links.pop(key, None)
            if links is not None:
                self._unaccount(links)
            self._l2.remove(key)
            self._any_write.pop(key, None)
            for l1_key in self._l1_of.pop(key, ()):
                if self._l1.get(l1_key) == key:
                    del self._l1[l1_key]

    def record_verification(self, layer: str, false_hit: bool) -> None:
        """Count one hit of ``layer`` re-checked against a fresh search."""
        if layer == "L0":
            self.cache.record_verification(false_hit)
        with self._lock:
            s = self._n.layers[layer]
            s.verified += 1
            s.false_hits += int(false_hit)

    def memory(self, tenant: str) -> LayerMemory:
        """``tenant``'s cache bytes per layer (estimates, module docstring), their
        ``total`` and its ``budget`` (None: unbounded). L0 is its entries without the
        link bytes charged to them."""
        scope = "t:" + tenant
        with self._lock:
            self._drain()
            l1, l2 = self._tenant_links.get(tenant, (0, 0))
            held = self.cache.scope_bytes(scope)
        l3 = self.payloads.scope_bytes(scope)
        return {
            "L0": held - l1 - l2,
            "L1": l1,
            "L2": l2,
            "L3": l3,
            "total": held + l3,
            "budget": self.cache.budget_of(scope),
        }

    def stats(self) -> dict[str, Any]:
        held = self.cache.stats().bytes
        payloads = self.payloads.stats()
        with self._lock:
            self._drain()
            l1 = sum(s[0] for s in self._tenant_links.values())
            l2 = sum(s[1] for s in self._tenant_links.values())
            return {
                "layers": {x: s.as_dict() for x, s in self._n.layers.items()},
                "l1_keys": len(self._l1),
                "l2_clusters": len(self._l2),
                "offer_errors": self._n.offer_errors,
                "offers_pending": self._pending.qsize(),
                "doorkeeper": None if self.doorkeeper is None else self.doorkeeper.stats(),
                "parked": (
                    {
                        **self._parked.stats(),
                        # lazy misses not parked yet (defer), and those the bound dropped
                        "deferred": len(self._deferred),
                        "deferred_bytes": self._deferred_bytes,
                        "deferred_trimmed": self.deferred_trimmed,
                    }
                    if self.lazy_offers
                    else None
                ),
                "L3": payloads,
                "memory": {"L0": held - l1 - l2, "L1": l1, "L2": l2, "L3": payloads["bytes"]},
            }


_LINKS = "links"  # CachedResult.derived: the (L1, L2) bytes charged to the entry


class PendingDecision(dict[str, Any]):
    """The search's debug ``decision`` of a lazy miss deferred
    (:meth:`CacheController.defer`: it holds the fresh result until taken) or parked
    undecided (:meth:`CacheController.park_undecided`): ``{"outcome": "parked", "action":
    "pending"}`` to the client, and :meth:`settle` for the query log's thread, which logs
    the decision it takes (or the one the query's repeat took first)."""

    __slots__ = ("_args", "_ctl", "_raw")
    _ctl: CacheController
    _raw: _Raw | None
    _args: Any

    @classmethod
    def of(cls, ctl: CacheController, raw: _Raw) -> PendingDecision:
        """The pending decision of ``raw`` (built without an ``__init__``: a search pays
        for this on every lazy miss, and a dict subclass's keyword init costs twice as
        much with the CPU caches cold after the index scan)."""
        d = cls(_PENDING_ITEMS)
        d._ctl = ctl
        d._raw = raw
        return d

    def settle(self) -> dict[str, Any]:
        """The decision's debug form, as :meth:`CacheController.park_fresh` gives it: an
        admitted result stays ``parked``, a rejected one leaves (``rejected``)."""
        raw = self._raw
        if raw is None:
            raw = self._ctl.take_deferred(self)
        decision = self._ctl.settle(raw)
        out = decision.as_dict()
        out["outcome"] = "parked" if decision.action == "admit" else "rejected"
        return out


_PENDING_ITEMS = (("outcome", "parked"), ("action", "pending"))


def settled_decision(decision: Any) -> Any:
    """A search's debug ``decision`` with a pending one (:class:`PendingDecision`) taken
    now (the same decision the query log records: it is taken once); others as they are.
    For in-process callers that read decisions from responses."""
    return decision.settle() if isinstance(decision, PendingDecision) else decision


class FreshHit(Protocol):
    """A hit of a fresh search as the search path holds it (``streams.index.model.Hit``)."""

    @property
    def id(self) -> str: ...
    @property
    def score(self) -> float: ...
    @property
    def meta(self) -> str | None: ...


class _Raw:
    """A lazy miss's fresh result, parked as the search returned it (:meth:`
    CacheController.park_fresh`). It carries what the admission policy reads of an entry
    (``key``, ``index_key``, ``filter``, ``compute_ms``, ``nbytes``: the entry's own
    estimate, :func:`estimate_nbytes`), and :meth:`build` makes the entry when the query
    repeats (most never do: then nothing is built)."""

    __slots__ = (
        "applied", "compute_ms", "created_s", "decision", "depends", "filter", "hits",
        "index_key", "k", "key", "labels", "metric", "nbytes", "route", "vector",
    )  # fmt: skip

    def __init__(
        self,
        key: QueryKey,
        index_key: str,
        metric: Metric,
        vector: Vector,
        k: int,
        flt: Filter | None,
        labels: tuple[int, ...],
        hits: tuple[FreshHit, ...],
        applied: tuple[str, ...],
        compute_ms: float,
        created_s: float,
        depends: tuple[tuple[str, Probe], ...],
        nbytes: int,
    ) -> None:
        self.key = key
        self.index_key = index_key
        self.metric = metric
        self.vector = vector
        self.k = k
        self.filter = flt
        self.labels = labels
        self.hits = hits
        self.applied = applied
        self.compute_ms = compute_ms
        self.created_s = created_s
        self.depends = depends
        self.nbytes = nbytes
        # its admission decision; None until settled (CacheController.settle), for a
        # result parked undecided (CacheController.park_undecided); ``route``: the
        # policy in force at its search (PolicyHolder.route), which decides it then
        self.decision: AdmissionDecision | None = None
        self.route: Any = None

    def build(self) -> CachedResult:
        """The entry, as an eager offer would have built it at the first search (its
        ``created_s`` that search's); checked as :func:`trusted_result` checks."""
        hits = self.hits
        entry = trusted_result(
            self.key, self.index_key, self.metric, self.vector, self.k, self.filter,
            self.labels, tuple([h.id for h in hits]), tuple([h.score for h in hits]),
            tuple([h.meta for h in hits]), self.applied, self.compute_ms, self.created_s,
            self.depends,
        )  # fmt: skip
        entry.derived["nbytes"] = self.nbytes  # the same estimate the decision charged
        return entry


# the policies whose decide() reads only key, index_key, filter, compute_ms and nbytes
_DRAFT_POLICIES: frozenset[type] = frozenset({AdmitAll, PolicyHolder})

# a parked offer: its lookup, entry (or raw result), decision and time.time() when parked
_ParkedItem = tuple[CacheLookup, "CachedResult | _Raw", "AdmissionDecision | None", float]


class _Parked:
    """Admitted results waiting for their query to repeat (lazy offers): at most
    ``entries`` of them and ``max_bytes`` of their ``nbytes``, the oldest dropped first
    (a dropped one only means its query's next search is a miss). Its own lock: the
    search threads park and promote; nothing else is held while it is."""

    __slots__ = ("_lock", "bytes", "counts", "items", "max_bytes", "max_entries", "n")

    def __init__(self, entries: int, max_bytes: int) -> None:
        if entries < 1 or max_bytes < 0:
            raise ValueError("parked_entries >= 1 and parked_bytes >= 0")
        self.max_entries = entries
        self.max_bytes = max_bytes
        # written under the lock; the lookup's fast check reads membership without it (a
        # dict lookup is atomic under the GIL; the pop that follows takes the lock)
        self.items: OrderedDict[QueryKey, _ParkedItem] = OrderedDict()
        self._lock = threading.Lock()
        self.n = 0  # len(items)
        self.bytes = 0
        # promoted: stored when the query repeated; not_stored: its put refused it then
        # (stale, unverifiable, disabled, evicted); dropped: pushed out unrequested (or
        # replaced by its query's next result); rejected: parked undecided, then rejected
        # by its decision (taken later). parked = promoted + not_stored + dropped +
        # rejected + entries
        self.counts = {"parked": 0, "promoted": 0, "not_stored": 0, "dropped": 0, "rejected": 0}

    def park(
        self,
        lookup: CacheLookup,
        entry: CachedResult | _Raw,
        decision: AdmissionDecision | None,
        *,
        slack: int = 1,
        at: float | None = None,
    ) -> bool:
        """Park ``entry``; False (not parked) when it alone is over ``max_bytes``. The
        oldest are dropped once the map is over ``slack`` times its bounds: a caller
        passing 2 leaves the drops (and freeing what they held, cold in the CPU caches
        after an index scan) to a later :meth:`trim` off the search path. ``at``: the wall
        time it counts as parked at (default now; what its stored entry's decision time
        becomes)."""
        nbytes = entry.nbytes
        if nbytes > self.max_bytes:
            return False
        items = self.items
        dropped: list[_ParkedItem] = []
        with self._lock:
            old = items.pop(entry.key, None)
            if old is not None:  # its query parked again (its repeat was not stored)
                self.bytes -= old[1].nbytes
                self.counts["dropped"] += 1
                dropped.append(old)
            items[entry.key] = (lookup, entry, decision, time.time() if at is None else at)
            self.bytes += nbytes
            self.counts["parked"] += 1
            # back under ``slack`` times the bounds: one or two drops a park, never a sweep
            self._drop(dropped, slack, len(items))
            self.n = len(items)
        return True

    def trim(self, most: int = 256) -> None:
        """Drop the oldest, at most ``most`` of them, towards the map's bounds (what
        :meth:`park` with ``slack`` left); what they held is freed after the lock is
        released."""
        if self.n <= self.max_entries and self.bytes <= self.max_bytes:
            return
        dropped: list[_ParkedItem] = []
        with self._lock:
            self._drop(dropped, 1, most)
            self.n = len(self.items)

    def _drop(self, into: list[_ParkedItem], slack: int, most: int) -> None:
        items = self.items
        cap_entries, cap_bytes = self.max_entries * slack, self.max_bytes * slack
        while most > 0 and (len(items) > cap_entries or self.bytes > cap_bytes):
            _, item = items.popitem(last=False)
            self.bytes -= item[1].nbytes
            self.counts["dropped"] += 1
            into.append(item)
            most -= 1

    def pop(self, key: QueryKey) -> _ParkedItem | None:
        with self._lock:
            item = self.items.pop(key, None)
            if item is not None:
                self.bytes -= item[1].nbytes
                self.n = len(self.items)
            return item

    def reject(self, entry: _Raw, *, popped: bool = False) -> None:
        """``entry``'s decision (taken after it was parked) rejected it: remove it if it is
        still what is parked for its key, and count it ``rejected`` then, or when the
        repeat had ``popped`` it; one dropped before its decision stays counted
        ``dropped`` only (each parked result ends in exactly one count)."""
        with self._lock:
            if popped:
                self.counts["rejected"] += 1
                return
            item = self.items.get(entry.key)
            if item is not None and item[1] is entry:
                del self.items[entry.key]
                self.bytes -= entry.nbytes
                self.n = len(self.items)
                self.counts["rejected"] += 1

    def count_dropped(self) -> None:
        """A deferred result that never entered the map: counted parked and dropped."""
        with self._lock:
            self.counts["parked"] += 1
            self.counts["dropped"] += 1

    def settled(self, stored: bool) -> None:
        with self._lock:
            self.counts["promoted" if stored else "not_stored"] += 1

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": self.n, "bytes": self.bytes, **self.counts}


def _charge(entry: CachedResult, l1: int, l2: int) -> None:
    """Add the bytes of the links the entry will get to its ``nbytes`` (the memo the
    result cache and the policy read) before it is offered, once per entry."""
    memo = entry.derived
    if _LINKS in memo:
        return
    base = entry.nbytes
    memo[_LINKS] = (l1, l2)
    memo["nbytes"] = base + l1 + l2


def _cosine_distance(a: Vector, b: Vector) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 1.0
    return max(0.0, 1.0 - float(np.dot(a, b)) / (na * nb))


def _text_space(variant: str) -> str:
    """L2's space of text-path clusters of ``variant`` (``"text"`` for the plain one)."""
    return "text" if not variant else "text:" + variant


def _max_age_s(consistency: Consistency, bound_ms: int | None) -> float | None:
    """How old a tolerant (L1/L2) entry may be at this level; None: not at all."""
    if consistency is Consistency.EVENTUAL:
        return float("inf")
    if consistency is Consistency.BOUNDED:
        return max(0.0, (bound_ms or 0) / 1000)
    return None
