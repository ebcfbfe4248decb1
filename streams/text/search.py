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
"""

from __future__ import annotations

import threading
import time
from typing import Any, Literal

from streams.embed import DEFAULT_EMBEDDER, Embedder, open_embedder
from streams.index.exceptions import InvalidRequest, NotFound
from streams.index.filters import parse_filter
from streams.index.model import LIMITS, Consistency, Hit, IndexConfig, check_name
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
    ) -> SearchResponse:
        """The ``k`` best chunks for ``text``. Raises ``InvalidRequest`` (bad mode, k,
        alpha, filter or text), ``NotFound`` (no such index), ``Busy`` (consistency)."""
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
        if mode != "keyword":
            emb = self.embedder(config)
            t1 = time.perf_counter()
            vector = emb.embed([text])[0]
            timings["embed"] = (time.perf_counter() - t1) * 1000
            t1 = time.perf_counter()
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
                )
            )
            dense, dense_debug = resp.hits, resp.debug
            timings["dense"] = (time.perf_counter() - t1) * 1000
        else:
            wait = getattr(self.service, "wait_for", None)
            if wait is not None:
                t1 = time.perf_counter()
                wait(consistency, tokens, bound_ms, timeout_ms)
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
        applied = getattr(self.service, "applied", None)
        if "applied" not in debug and applied is not None:
            debug["applied"] = applied.tokens()
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
