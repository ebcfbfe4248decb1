"""The search cache (ARCHITECTURE §4). L0: exact results with exact, result-aware
invalidation. Domain code: numpy only, no I/O; the query node wires it to the indexer
(:class:`CacheInvalidator`) and to the search path (``VectorService``)."""

from streams.cache.entry import CachedResult
from streams.cache.invalidation import InvalidationIndex, UpsertRow
from streams.cache.keys import QueryKey, query_key
from streams.cache.policy import AdmissionDecision, AdmissionPolicy, AdmitAll
from streams.cache.result_cache import CacheInvalidator, CacheStats, PutOutcome, ResultCache
from streams.cache.scoring import score_margin, would_enter

__all__ = [
    "AdmissionDecision",
    "AdmissionPolicy",
    "AdmitAll",
    "CacheInvalidator",
    "CacheStats",
    "CachedResult",
    "InvalidationIndex",
    "PutOutcome",
    "QueryKey",
    "ResultCache",
    "UpsertRow",
    "query_key",
    "score_margin",
    "would_enter",
]
