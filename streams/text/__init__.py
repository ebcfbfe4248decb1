"""Text search: keyword (BM25) indexes fed by the indexer, fusion with dense search, and
graph neighbours over k-NN (ARCHITECTURE §4, the knowledge-base path)."""

from streams.text.fusion import RRF_K, alpha_fusion, min_max, rrf
from streams.text.keyword import KeywordDoc, KeywordHit, KeywordIndex, KeywordIndexes
from streams.text.listener import KeywordListener, ListenerFanout
from streams.text.neighbors import Neighbor, neighbors
from streams.text.search import MODES, TextSearch

__all__ = [
    "MODES",
    "RRF_K",
    "KeywordDoc",
    "KeywordHit",
    "KeywordIndex",
    "KeywordIndexes",
    "KeywordListener",
    "ListenerFanout",
    "Neighbor",
    "TextSearch",
    "alpha_fusion",
    "min_max",
    "neighbors",
    "rrf",
]
