"""``CacheController``: the search path's one entry into the cache layers.

Lookup order (ARCHITECTURE §4): **L0** exact (:class:`QueryKey`), **L1** tolerant
(:mod:`streams.cache.tolerant`), **L2** semantic (:mod:`streams.cache.semantic`). Each
layer is switched per index by ``IndexConfig.cache.layers`` (node default: L0 only, so
tolerant answers are an explicit choice of the index's owner).

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

Deferred offers (``background_offers=True``, off by default): the admission decision is
taken on the search path (so the query log records what the policy chose), and the store
(race check, invalidation index, L1/L2 links, about 0.1 ms of Python per miss) runs in one
worker thread. That is safe by the put race check: the entry is tested against every write
reported since its search began, however late it is stored. The price: a repeat of the
query that arrives before the worker stored it is a miss.

Threads: the controller's lock guards the L1 and L2 maps; the result cache's lock is never
taken while holding it except through the cache's public calls (lock order controller ->
cache; the removal hook only appends to a deque, drained under the controller's lock).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streams.cache.entry import CachedResult
from streams.cache.keys import QueryKey, query_key
from streams.cache.payload import PayloadCache
from streams.cache.policy import AdmissionDecision
from streams.cache.result_cache import PutOutcome, ResultCache
from streams.cache.semantic import (
    DEFAULT_L2_TEXT_THRESHOLD,
    DEFAULT_L2_VECTOR_THRESHOLD,
    SemanticIndex,
    serves,
)
from streams.cache.tolerant import SIMHASH_BITS, TolerantKey, tolerant_key
from streams.index.filters import Filter
from streams.index.model import CacheSettings, Consistency, IndexConfig, Metric, Vector

__all__ = ["LAYERS", "CacheController", "CacheLookup", "LayerStats"]

log = logging.getLogger(__name__)

LAYERS = ("L0", "L1", "L2")
_TOLERANT = ("L1", "L2")
_NO_LAYERS: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class CacheLookup:
    """What the layers answered for one search. ``layer`` is ``L0``/``L1``/``L2`` on a
    hit, ``none`` on a miss; ``entry`` the cached result (serve its first ``k`` hits);
    ``distance`` the distance the tolerant layer used; ``skipped`` the enabled layers not
    consulted because of the consistency level. ``qkey``/``seen_seq`` are for the offer
    after a miss (``seen_seq`` taken before the search reads the index)."""

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


@dataclass(slots=True)
class _Counters:
    layers: dict[str, LayerStats] = field(default_factory=lambda: {x: LayerStats() for x in LAYERS})
    offer_errors: int = 0


class CacheController:
    """The layers over one :class:`ResultCache` (module docstring). ``default_layers``:
    layers of an index without cache settings; ``l2_threshold``: the node's default L2
    distance for vector queries; ``l2_text_threshold``: its distance on the text path
    (:meth:`lookup_text`, where the text stage checks every candidate too);
    ``simhash_bits``: L1's key width."""

    def __init__(
        self,
        cache: ResultCache,
        *,
        default_layers: tuple[str, ...] = ("L0",),
        l2_threshold: float = DEFAULT_L2_VECTOR_THRESHOLD,
        l2_text_threshold: float = DEFAULT_L2_TEXT_THRESHOLD,
        simhash_bits: int = SIMHASH_BITS,
        max_clusters_per_group: int = 4096,
        background_offers: bool = False,
        payload_budget_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        if any(x not in LAYERS for x in default_layers):
            raise ValueError(f"layers must be of {LAYERS}")
        if not 0.0 <= l2_threshold <= 2.0:
            raise ValueError("l2_threshold must be in [0, 2]")
        if not 0.0 <= l2_text_threshold <= 2.0:
            raise ValueError("l2_text_threshold must be in [0, 2]")
        self.cache = cache
        self.default_layers = frozenset(default_layers)
        self.l2_threshold = l2_threshold
        self.l2_text_threshold = l2_text_threshold
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
        # L3: the payload join of fresh searches of indexes with any layer on
        self.payloads = PayloadCache(payload_budget_bytes)
        self._pending: queue.Queue[tuple[CacheLookup, CachedResult, AdmissionDecision] | None]
        self._pending = queue.Queue()
        self._worker: threading.Thread | None = None
        cache.add_removal_hook(self._removed.append)

    # -- settings ------------------------------------------------------------------------

    def settings(self, config: IndexConfig) -> _IndexSettings:
        """The index's layers and L2 thresholds (vector, text); applies its memory
        budget to the result cache the first time a configuration is seen."""
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
        )
        self.cache.set_index_budget(config.key, None if cs is None else cs.memory_budget_bytes)
        self._settings[config.key] = (cs, out)
        return out

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
        if not st.layers:
            return CacheLookup("none", None, None, qkey, 0, _NO_LAYERS)
        # the sequence number is taken before the search reads the index
        seen_seq, enabled, found = self.cache.probe(key, qkey if st.l0 else None)
        if not enabled:
            return CacheLookup("none", None, None, qkey, seen_seq, _NO_LAYERS)
        layers = st.layers
        if found is not None:
            self._count("L0")
            return CacheLookup("L0", found[0], 0.0, qkey, seen_seq, layers, hit_count=found[1])
        if not st.tolerant:
            return CacheLookup("none", None, None, qkey, seen_seq, layers)
        max_age_s = _max_age_s(consistency, bound_ms)
        if max_age_s is None:
            return CacheLookup("none", None, None, qkey, seen_seq, layers, st.tolerant)
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
                match = self._l2.nearest(group, query, config.metric)
            if match is not None and bool(serves(match.distance, st.threshold)):
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
        return CacheLookup("none", None, None, qkey, seen_seq, layers, (), l1_key, leader)

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
        check), then linked from L1 and L2 as the layers are enabled. None when no layer
        is enabled for the index."""
        if not lookup.layers:
            return None
        if entry.key != lookup.qkey:
            raise ValueError("the entry must carry the lookup's QueryKey")
        if self.background_offers:
            decision = self.cache.policy.decide(entry)
            if decision.action == "admit":
                self._start_worker()
                self._pending.put((lookup, entry, decision))
                return PutOutcome(decision, "queued")
            return self.cache.put(entry, lookup.seen_seq, decision=decision)  # counted
        return self._store(lookup, entry, None)

    def _store(
        self, lookup: CacheLookup, entry: CachedResult, decision: AdmissionDecision | None
    ) -> PutOutcome:
        outcome = (
            self.cache.put(entry, lookup.seen_seq)
            if decision is None
            else self.cache.put(entry, lookup.seen_seq, decision=decision)
        )
        if not outcome.stored:
            return outcome
        with self._lock:
            self._drain()
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
                self._l2.add(group, entry.vector, entry.key)
        return outcome

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
        if match is not None and bool(serves(match.distance, threshold)):
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
        outcome = self.cache.put(entry, lookup.seen_seq)
        if outcome.stored and (lookup.l2_leader or lookup.skipped):
            group = SemanticIndex.group_of(
                _text_space(variant), entry.index_key, entry.filter, entry.k
            )
            with self._lock:
                self._drain()
                if entry.key in self.cache:  # not dropped since the put: no dangling link
                    self._l2.add(group, text_embedding, entry.key, text)
        elif any_write and not outcome.stored:  # an older entry of the key stays as it was
            with self._lock:
                if self._any_write.get(entry.key) == seen:
                    if prev is None:
                        del self._any_write[entry.key]
                    else:
                        self._any_write[entry.key] = prev
        return outcome

    # -- bookkeeping ---------------------------------------------------------------------

    def _drain(self) -> None:
        """Unlink entries the result cache dropped (caller holds the lock)."""
        while self._removed:
            key = self._removed.popleft()
            if key in self.cache:  # replaced, not dropped
                continue
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

    def stats(self) -> dict[str, Any]:
        with self._lock:
            self._drain()
            return {
                "layers": {x: s.as_dict() for x, s in self._n.layers.items()},
                "l1_keys": len(self._l1),
                "l2_clusters": len(self._l2),
                "offer_errors": self._n.offer_errors,
                "offers_pending": self._pending.qsize(),
                "L3": self.payloads.stats(),
            }


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
