"""``TextSearch``: search an index by text, dense, keyword (BM25) or hybrid.

- ``dense``: the text is embedded with the index's embedder (``IndexConfig.embedder``, the
  default offline model when unset) and searched like ``VEC.SEARCH``.
- ``keyword``: BM25 over the chunk text (:mod:`streams.text.keyword`).
- ``hybrid``: both, each to a candidate depth of ``max(5k, 50)``, fused by reciprocal rank
  fusion (``alpha`` None) or by ``alpha * dense + (1 - alpha) * keyword`` over min-max
  normalised scores (:mod:`streams.text.fusion`).

Filters use the ``VEC.SEARCH`` grammar in every mode. Consistency is waited for once,
before either index is read; the keyword index is updated before the applied positions
advance, so a ``session``/``strong`` read sees both up to date. Hits carry the stored meta
(source id, chunk location, text); a keyword hit deleted between the search and the
payload join is dropped.

The text cache (L2 on the query text, :meth:`CacheController.lookup_text`), for indexes
whose cache layers hold ``L2``:

- ``dense`` and ``hybrid``: after embedding, the text's embedding is looked up among the
  cached query texts of the same mode (and fusion), filter and topK bucket, at the text
  threshold (``cache.l2_text_threshold``, node default 0.02) *and* the text stage (the two
  texts must agree: same numbers, negation, entities, word order). A hit answers with the
  cached hits and debug ``layer: "L2"``, ``distance``, ``agreement``; the vector search,
  keyword search, fusion and payload join are skipped. Served only at ``eventual``, and at
  ``bounded`` when the entry is younger than the bound; never at ``session``/``strong``.
- on a miss the fresh result is offered (:meth:`CacheController.offer_text`) keyed by the
  search vector, so it is invalidated like any result. ``dense``: by the result-aware rule
  (a write that enters its top-k or removes one of its hits). ``hybrid``: the fused answer
  also depends on keyword ranks and BM25 statistics, which any chunk write may move, so
  *any* write reported for the index since its search began invalidates it (``any_write``).
  Only a result computed fresh (or from the exact L0) is offered, never one built on a
  tolerant (L1/L2) vector hit.
- ``keyword``: not cached (its BM25 statistics change with every write to the index).

The query log (where the node runs the policy loop; :mod:`streams.cache.querylog`, "Text
queries"): a text-cache hit is one search event of the served entry's key (layer ``L2``,
proxy cost its ``compute_ms``); on a miss the text offer's admission decision is logged
once, keyed by the text entry's key, in the inner dense search's event (dense, when that
was a miss of the same key) or in an event of its own (hybrid; dense after an inner hit).
"""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any, Literal

from streams.cache.canonical import CanonicalKeyMap
from streams.cache.controller import CacheController, CacheLookup
from streams.cache.entry import CachedResult
from streams.cache.keys import QueryKey, query_key
from streams.cache.querylog import SearchObserver, TextQueryLog
from streams.embed import DEFAULT_EMBEDDER, Embedder, open_embedder
from streams.index.exceptions import InvalidRequest, NotFound
from streams.index.filters import Filter, parse_filter
from streams.index.model import (
    LIMITS,
    Consistency,
    Hit,
    IndexConfig,
    Vector,
    check_name,
    parse_vector,
)
from streams.service.api import DataPlane, SearchRequest, SearchResponse
from streams.text.fusion import alpha_fusion, rrf
from streams.text.keyword import KeywordIndexes

__all__ = ["MODES", "Mode", "TextSearch"]

Mode = Literal["dense", "keyword", "hybrid"]
MODES: tuple[str, ...] = ("dense", "keyword", "hybrid")


class TextSearch:
    """Text search over one node's data plane and keyword indexes. ``embedders`` opens an
    embedder by registry name (default :func:`streams.embed.open_embedder`); each is opened
    once and shared."""

    def __init__(
        self, service: DataPlane, keyword: KeywordIndexes, *, open_embedder_fn: Any = open_embedder
    ) -> None:
        self.service = service
        self.keyword = keyword
        self._open = open_embedder_fn
        self._embedders: dict[str, Embedder] = {}
        self._lock = threading.Lock()

    def embedder(self, config: IndexConfig) -> Embedder:
        name = config.embedder or DEFAULT_EMBEDDER
        with self._lock:
            emb = self._embedders.get(name)
            if emb is None:
                emb = self._embedders[name] = self._open(name)
        if emb.dim != config.dim:
            raise InvalidRequest(
                f"index {config.key} has dim {config.dim} but embedder {name} gives {emb.dim}; "
                "create it with EMBEDDER to search it by text",
                field="embedder",
            )
        return emb

    def _config(self, tenant: str, index: str) -> IndexConfig:
        check_name(tenant, "tenant")
        check_name(index, "index")
        for config in self.service.list_indexes(tenant):
            if config.index == index:
                return config
        raise NotFound(f"index {tenant}/{index} does not exist")

    def search(
        self,
        tenant: str,
        index: str,
        text: str,
        k: int = 10,
        *,
        mode: str = "hybrid",
        filter: str | None = None,
        alpha: float | None = None,
        consistency: Consistency = Consistency.EVENTUAL,
        tokens: tuple[str, ...] = (),
        bound_ms: int | None = None,
        timeout_ms: int = 1000,
        vector: Vector | None = None,
        session_id: str | None = None,
    ) -> SearchResponse:
        """The ``k`` best chunks for ``text``. ``vector``: the text's embedding by the
        index's embedder when the caller has it (else embedded here). ``session_id``: the
        client session, carried by the dense search to the query log and the prefetcher. Raises
        ``InvalidRequest`` (bad mode, k, alpha, filter, text or vector), ``NotFound`` (no
        such index), ``Busy`` (consistency)."""
        t0 = time.perf_counter()
        if mode not in MODES:
            raise InvalidRequest(f"mode must be one of {', '.join(MODES)}", field="mode")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= LIMITS.max_k:
            raise InvalidRequest(f"TOPK must be 1..{LIMITS.max_k}", field="k")
        if alpha is not None and not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
            raise InvalidRequest("alpha must be in [0, 1]", field="alpha")
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequest("query text must not be empty", field="text")
        config = self._config(tenant, index)
        flt = parse_filter(filter, config) if filter else None
        depth = k if mode != "hybrid" else min(LIMITS.max_k, max(5 * k, 50))
        timings: dict[str, float] = {}
        dense: list[Hit] = []
        dense_debug: dict[str, Any] = {}
        text_cache: _TextCache | None = None
        seen_applied: tuple[str, ...] = ()
        ranked: list[tuple[str, float]] = []
        applied = getattr(self.service, "applied", None)
        if mode != "keyword":
            t1 = time.perf_counter()
            ctl = self._text_layers(config)
            canon = None if ctl is None else _canonical(text)
            # one embedding call: the text (search vector, unless given) and, for L2, the
            # canonical text (the form L2's thresholds were tuned on) where it differs
            texts = ([text] if vector is None else []) + (
                [canon] if canon is not None and canon != text else []
            )
            embedded = self.embedder(config).embed(texts) if texts else None
            if vector is None:
                assert embedded is not None
                vector = embedded[0]
            vector = parse_vector(vector, config.dim)
            timings["embed"] = (time.perf_counter() - t1) * 1000
            if ctl is not None and canon is not None:
                key_vec = vector
                if canon != text:
                    assert embedded is not None
                    key_vec = parse_vector(embedded[-1], config.dim)
                text_cache = self._text_cache(ctl, config, key_vec, vector, k, flt, mode, alpha)
            if text_cache is not None:
                t1 = time.perf_counter()
                if consistency is Consistency.BOUNDED:  # the bound is waited for first
                    self._wait(consistency, tokens, bound_ms, timeout_ms)
                hit = text_cache.lookup(consistency, bound_ms, text)
                timings["text_cache"] = (time.perf_counter() - t1) * 1000
                observer = text_cache.observer
                logged = None  # this query as the query log and the policy see it
                if observer is not None:
                    logged = SearchRequest(
                        tenant,
                        index,
                        vector,
                        k,
                        filter,
                        consistency,
                        tokens,
                        bound_ms,
                        timeout_ms,
                        session_id,
                    )
                if hit is not None:
                    resp = self._cached(hit, k, mode, alpha, t0, timings)
                    if observer is not None and logged is not None:  # a hit of the entry's key
                        observer.text_hit(logged, config.key, resp, hit[1])
                    return resp
                if applied is not None:  # what the fresh result will have seen at least
                    seen_applied = tuple(applied.tokens())
                if observer is not None and logged is not None and observer.emitter is not None:
                    text_cache.log = TextQueryLog(observer.emitter, logged, config.key)
            tlog = None if text_cache is None else text_cache.log
            t1 = time.perf_counter()
            if tlog is not None:
                tlog.hold()  # the inner search's event, until the offer's decision is known
            try:
                resp = self.service.search(
                    SearchRequest(
                        tenant,
                        index,
                        vector,
                        k=depth,
                        filter=filter,
                        consistency=consistency,
                        tokens=tokens,
                        bound_ms=bound_ms,
                        timeout_ms=timeout_ms,
                        session_id=session_id,
                    )
                )
            finally:
                if tlog is not None:  # dense: the inner search's key is the entry's
                    tlog.held(text_cache.key() if text_cache and mode == "dense" else None)
            dense, dense_debug = resp.hits, resp.debug
            timings["dense"] = (time.perf_counter() - t1) * 1000
        else:
            t1 = time.perf_counter()
            self._wait(consistency, tokens, bound_ms, timeout_ms)
            timings["consistency"] = (time.perf_counter() - t1) * 1000
        kw: list[tuple[str, float]] = []
        if mode != "dense":
            t1 = time.perf_counter()
            kw = [(h.id, h.score) for h in self.keyword.search(config.key, text, depth, flt)]
            timings["keyword"] = (time.perf_counter() - t1) * 1000
        metas = {h.id: h.meta for h in dense}
        if mode == "dense":
            hits = dense[:k]
        else:
            if mode == "keyword":
                ranked = kw[:k]
            elif alpha is None:
                ranked = rrf([[(h.id, h.score) for h in dense], kw], limit=k)
            else:
                ranked = alpha_fusion(_as_higher_better(dense, config), kw, float(alpha), limit=k)
            t1 = time.perf_counter()
            hits = self._join(tenant, index, ranked, metas)
            timings["payload"] = (time.perf_counter() - t1) * 1000
        # dense mode keeps the vector search's debug (cache layer, widening); the others
        # report the dense part's cache hit separately
        debug: dict[str, Any] = (
            dict(dense_debug)
            if mode == "dense"
            else {
                "cache_hit": False,
                "layer": "none",
                "decision": "none",
                "dense_cache_hit": dense_debug.get("cache_hit"),
            }
        )
        if "applied" not in debug and applied is not None:
            debug["applied"] = applied.tokens()
        if text_cache is not None:
            # only an exact dense answer is offered (not one built on a tolerant vector hit)
            exact = dense_debug.get("layer", "none") in ("none", "L0") and (
                mode == "dense" or len(hits) == len(ranked)  # no hit dropped by the join
            )
            t1 = time.perf_counter()
            debug["text_cache"] = text_cache.offer(
                hits, seen_applied, (t1 - t0) * 1000, text, exact, t0
            )
            timings["text_cache_offer"] = (time.perf_counter() - t1) * 1000
        debug.update(
            {
                "mode": mode,
                "fusion": None if mode != "hybrid" else ("rrf" if alpha is None else "alpha"),
                "alpha": alpha,
                "candidates": {"dense": len(dense), "keyword": len(kw)},
                "latency_ms": round((time.perf_counter() - t0) * 1000, 3),
                "text_latency_breakdown_ms": {name: round(ms, 3) for name, ms in timings.items()},
            }
        )
        return SearchResponse(hits, debug)

    def _wait(
        self,
        consistency: Consistency,
        tokens: tuple[str, ...],
        bound_ms: int | None,
        timeout_ms: int,
    ) -> None:
        wait = getattr(self.service, "wait_for", None)
        if wait is not None:
            wait(consistency, tokens, bound_ms, timeout_ms)

    def _text_layers(self, config: IndexConfig) -> CacheController | None:
        """The node's cache layers when L2 is on for this index, else None."""
        ctl = getattr(self.service, "cache_layers", None)
        if not isinstance(ctl, CacheController) or not ctl.settings(config).l2:
            return None
        return ctl

    def _text_cache(
        self,
        ctl: CacheController,
        config: IndexConfig,
        text_vec: Vector,
        vector: Vector,
        k: int,
        flt: Filter | None,
        mode: str,
        alpha: float | None,
    ) -> _TextCache:
        observer: SearchObserver | None = getattr(self.service, "search_observer", None)
        # a fused result also read the keyword index: it holds while that is unchanged
        generation = 0 if mode == "dense" else self.keyword.generation(config.key)
        return _TextCache(ctl, observer, config, text_vec, vector, k, flt, mode, alpha, generation)

    def _cached(
        self,
        hit: tuple[CacheLookup, CachedResult],
        k: int,
        mode: str,
        alpha: float | None,
        t0: float,
        timings: dict[str, float],
    ) -> SearchResponse:
        look, entry = hit
        hits = [
            Hit(i, s, m)
            for i, s, m in zip(entry.ids[:k], entry.scores[:k], entry.metas[:k], strict=True)
        ]
        applied = getattr(self.service, "applied", None)
        debug: dict[str, Any] = {
            "cache_hit": True,
            "layer": look.layer,
            "distance": look.distance,
            "agreement": look.agreement,
            "decision": entry.admission.as_dict() if entry.admission else "none",
            "cached_at": list(entry.applied),
            "cache_hit_count": look.hit_count,
            "query_key": str(entry.key),
            "mode": mode,
            "fusion": None if mode != "hybrid" else ("rrf" if alpha is None else "alpha"),
            "alpha": alpha,
            "latency_ms": round((time.perf_counter() - t0) * 1000, 3),
            "text_latency_breakdown_ms": {name: round(ms, 3) for name, ms in timings.items()},
        }
        if applied is not None:
            debug["applied"] = applied.tokens()
        return SearchResponse(hits, debug)

    def _join(
        self, tenant: str, index: str, ranked: list[tuple[str, float]], metas: dict[str, str | None]
    ) -> list[Hit]:
        out: list[Hit] = []
        for id, score in ranked:
            if id in metas:
                out.append(Hit(id, score, metas[id]))
                continue
            try:
                stored = self.service.get(tenant, index, id)
            except NotFound:  # deleted after the keyword search found it
                continue
            out.append(Hit(id, score, stored.meta))
        return out


def _as_higher_better(hits: list[Hit], config: IndexConfig) -> list[tuple[str, float]]:
    """Dense scores oriented so that higher is better (L2 distances negated)."""
    sign = 1.0 if config.metric.higher_is_better else -1.0
    return [(h.id, sign * h.score) for h in hits]


class _TextCache:
    """One text search's use of L2 on its text (module docstring): :meth:`lookup` before
    the search, :meth:`offer` of its fresh result after a miss."""

    def __init__(
        self,
        ctl: CacheController,
        observer: SearchObserver | None,
        config: IndexConfig,
        text_vec: Vector,
        vector: Vector,
        k: int,
        flt: Filter | None,
        mode: str,
        alpha: float | None,
        generation: int,
    ) -> None:
        self.ctl = ctl
        self.generation = generation
        self.observer = observer
        self.config = config
        self.text_vec = text_vec  # the canonical text's embedding: L2's point
        self.vector = vector  # the search vector: the entry's key and invalidation
        self.k = k
        self.flt = flt
        self.mode = mode
        self.alpha = alpha
        # results of another mode or fusion never serve each other
        self.variant = mode if mode == "dense" else f"{mode}:{'rrf' if alpha is None else alpha}"
        self.look: CacheLookup | None = None
        self.log: TextQueryLog | None = None  # a miss, where the node logs searches
        self._key: QueryKey | None = None

    def lookup(
        self, consistency: Consistency, bound_ms: int | None, text: str
    ) -> tuple[CacheLookup, CachedResult] | None:
        look = self.look = self.ctl.lookup_text(
            self.config,
            self.text_vec,
            self.k,
            self.flt,
            consistency,
            bound_ms,
            text=text,
            variant=self.variant,
            generation=self.generation,
        )
        entry = look.entry
        if entry is None:
            return None
        if self.observer is not None and self.observer.expired(entry):
            return None  # its admission TTL has passed: answer as a miss (not re-offered)
        return look, entry

    def key(self) -> QueryKey:
        """The entry's key: the search vector's :class:`QueryKey`; for fused results one
        derived from it and the fusion (they are other answers to the same vector)."""
        if self._key is not None:
            return self._key
        c = self.config
        base = query_key(c.key, c.metric, self.vector, self.k, self.flt)
        if self.mode == "dense":
            self._key = base
            return base
        h = hashlib.blake2b(base.digest, digest_size=len(base.digest))
        h.update(self.variant.encode())
        self._key = QueryKey(h.digest())
        return self._key

    def offer(
        self,
        hits: list[Hit],
        applied: tuple[str, ...],
        compute_ms: float,
        text: str,
        exact: bool,
        t0: float = 0.0,
    ) -> dict[str, Any]:
        """Offer the fresh result after a miss; what became of it, for the debug info.
        ``t0``: when the search began (``perf_counter``; the logged latency). Where the
        node logs searches, :attr:`log` records the offer's decision (also if it raised)."""
        log = self.log
        if log is not None:
            log.offering()
        out: dict[str, Any] = {"layer": "none", "decision": "none"}
        try:
            look = self.look
            if look is not None and look.entry is None:
                out = look.as_debug()
                out["decision"] = (
                    "not-offered" if not exact else self._put(look, hits, applied, compute_ms, text)
                )
        finally:
            if log is not None:
                latency_ms = (time.perf_counter() - t0) * 1000
                log.offered(out.get("decision"), self.key(), hits, compute_ms, latency_ms, applied)
        return out

    def _put(
        self,
        look: CacheLookup,
        hits: list[Hit],
        applied: tuple[str, ...],
        compute_ms: float,
        text: str,
    ) -> Any:
        """Build the text entry and offer it; the put's outcome as the debug shows it."""
        entry = CachedResult(
            self.key(),
            self.config.key,
            self.config.metric,
            self.vector,
            self.k,
            self.flt,
            (-1,) * len(hits),  # index rows are not known here; nothing reads them
            tuple(h.id for h in hits),
            tuple(h.score for h in hits),
            tuple(h.meta for h in hits),
            applied,
            compute_ms=compute_ms,
            created_s=time.monotonic(),
        )
        outcome = self.ctl.offer_text(
            look,
            self.text_vec,
            entry,
            text,
            any_write=self.mode != "dense",
            variant=self.variant,
            generation=self.generation,
        )
        return "none" if outcome is None else outcome.as_dict()


_CANON = CanonicalKeyMap()  # no aliases: the strict normal form


def _canonical(text: str) -> str | None:
    """The text L2 embeds and compares (case folded, spacing and prose punctuation
    normalised: what the QQP tuning embedded); None when the normaliser refuses it (too
    long): such a query bypasses the text cache."""
    try:
        return _CANON.canonical(text)
    except InvalidRequest:
        return None
