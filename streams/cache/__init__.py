"""The search cache (ARCHITECTURE §4). L0: exact results with exact, result-aware
invalidation; L1 tolerant keys and L2 semantic clusters over the same store
(:class:`CacheController`); query-text aliases (:class:`CanonicalKeyMap`). Domain code:
numpy only, no I/O; the query node wires it to the indexer (:class:`CacheInvalidator`) and
to the search path (``VectorService``)."""

from streams.cache.canonical import CanonicalKeyMap, LanguageModelHook
from streams.cache.controller import CacheController, CacheLookup
from streams.cache.entry import CachedResult
from streams.cache.invalidation import InvalidationIndex, UpsertRow
from streams.cache.keys import QueryKey, query_key
from streams.cache.payload import PayloadCache
from streams.cache.policy import AdmissionDecision, AdmissionPolicy, AdmitAll
from streams.cache.result_cache import CacheInvalidator, CacheStats, PutOutcome, ResultCache
from streams.cache.scoring import score_margin, would_enter

__all__ = [
    "AdmissionDecision",
    "AdmissionPolicy",
    "AdmitAll",
    "CacheController",
    "CacheInvalidator",
    "CacheLookup",
    "CacheStats",
    "CachedResult",
    "CanonicalKeyMap",
    "InvalidationIndex",
    "LanguageModelHook",
    "PayloadCache",
    "PutOutcome",
    "QueryKey",
    "ResultCache",
    "UpsertRow",
    "query_key",
    "score_margin",
    "would_enter",
]
