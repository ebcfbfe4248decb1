"""The knowledge-ingestion path: Sources on ``documents`` are chunked, embedded and
appended to ``vectors`` by the :class:`EmbedderProcessor`; :class:`IngestService` is the
façade of ``VEC.SOURCE``/``VEC.QUERY`` (ARCHITECTURE §3, the embedder)."""

from streams.ingest.catalog import Embedders, IndexCatalog, NodeCatalog
from streams.ingest.chunker import ChatMode, Chunk, Chunker
from streams.ingest.decision import Decision, IndexNow, VectorizeContext, Vectorizer
from streams.ingest.processor import EmbedderProcessor, EmbeddingFailed, ProcessorStats
from streams.ingest.service import TEXT_FIELDS, IngestService, QueryRequest, open_ingest
from streams.ingest.source import ChatMessage, Source, SourceType
from streams.ingest.state import IngestState

__all__ = [
    "TEXT_FIELDS",
    "ChatMessage",
    "ChatMode",
    "Chunk",
    "Chunker",
    "Decision",
    "EmbedderProcessor",
    "Embedders",
    "EmbeddingFailed",
    "IndexCatalog",
    "IndexNow",
    "IngestService",
    "IngestState",
    "NodeCatalog",
    "ProcessorStats",
    "QueryRequest",
    "Source",
    "SourceType",
    "VectorizeContext",
    "Vectorizer",
    "open_ingest",
]
