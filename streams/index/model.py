"""The data plane's domain records and their validation (before anything is appended).

Vectors are 1-D float32 numpy arrays in memory; on the wire they are fp32 little-endian
bytes. Scores are reported in the metric's own terms and hits are ordered best first:
cosine similarity and inner product descending, squared L2 distance ascending.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from streams.index.exceptions import DimensionMismatch, InvalidRequest

__all__ = [
    "LIMITS",
    "CacheSettings",
    "Consistency",
    "Dtype",
    "FieldKind",
    "FilterField",
    "Hit",
    "IndexConfig",
    "IndexQuotas",
    "Limits",
    "Metric",
    "Vector",
    "VectorDelete",
    "VectorUpsert",
    "check_id",
    "check_name",
    "parse_vector",
]

Vector = npt.NDArray[np.float32]

NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")


class Metric(enum.StrEnum):
    COSINE = "cosine"
    IP = "ip"
    L2 = "l2"

    @property
    def higher_is_better(self) -> bool:
        return self is not Metric.L2


class Dtype(enum.StrEnum):
    """Storage type of Tail segments (Head is always fp32)."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


class FieldKind(enum.StrEnum):
    TAG = "tag"
    NUMERIC = "numeric"


class Consistency(enum.StrEnum):
    EVENTUAL = "eventual"
    SESSION = "session"
    BOUNDED = "bounded"
    STRONG = "strong"


@dataclass(frozen=True, slots=True)
class Limits:
    max_dim: int = 4096
    max_id_bytes: int = 256
    max_meta_bytes: int = 64 * 1024
    max_tags: int = 64
    max_tag_bytes: int = 128
    max_numeric: int = 64
    max_k: int = 1000
    max_source_bytes: int = 1024 * 1024  # text of one Source (UTF-8), before chunking


LIMITS = Limits()


def check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise InvalidRequest(f"{what} must match [A-Za-z0-9_-]{{1,128}}, got {value!r}", field=what)
    return value


@dataclass(frozen=True, slots=True)
class FilterField:
    name: str
    kind: FieldKind

    def __post_init__(self) -> None:
        check_name(self.name, "field name")


@dataclass(frozen=True, slots=True)
class IndexQuotas:
    """Limits of one index (``IndexQuotas`` in IndexConfig.avsc); ``None``: no limit.
    ``max_vectors``/``max_bytes`` are the capacity budgets of ``streams.capacity``."""

    max_vectors: int | None = None
    max_bytes: int | None = None
    qps: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_vectors", "max_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InvalidRequest(f"quota {name} must be a positive integer", field=name)
        if self.qps is not None and not (isinstance(self.qps, (int, float)) and self.qps > 0):
            raise InvalidRequest("quota qps must be positive", field="qps")


CACHE_LAYERS = ("L0", "L1", "L2", "L3")
RESULT_LAYERS = ("L0", "L1", "L2")  # the layers that answer a search from a cached result


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """Search-cache settings of one index (``CacheSettings`` in IndexConfig.avsc).
    ``layers``: the layers on, of ``L0`` (exact), ``L1`` (tolerant key), ``L2``
    (semantic), ``L3`` (payload join of fresh searches); ``NONE`` is dropped; empty: no
    caching at all. ``memory_budget_bytes``: most bytes this index's cache state (every
    layer) may hold (None: the node's default). ``l2_threshold``: the largest cosine
    distance at which L2 reuses a cached result for a vector query (None: the node's
    default); ``l2_text_threshold``: the same for a text query (``VEC.QUERY``), where the
    text stage also checks the texts (None: the node's default).

    In Avro, L3 is the field ``l3`` (the ``CacheLayer`` enum is shared with SearchEvent,
    where L3 never answers a search). Records written before IndexConfig v3 have no ``l3``:
    their payload cache was on whenever another layer was, and :meth:`from_avro` keeps it
    so."""

    layers: tuple[str, ...] = CACHE_LAYERS
    memory_budget_bytes: int | None = None
    l2_threshold: float | None = None
    l2_text_threshold: float | None = None

    def __post_init__(self) -> None:
        layers = tuple(dict.fromkeys(x for x in self.layers if x != "NONE"))
        if any(x not in CACHE_LAYERS for x in layers):
            raise InvalidRequest(f"cache layers must be of {', '.join(CACHE_LAYERS)}, NONE",
                                 field="cache.layers")
        object.__setattr__(self, "layers", layers)
        budget = self.memory_budget_bytes
        if budget is not None and (not isinstance(budget, int) or budget < 0):
            raise InvalidRequest("cache memory_budget_bytes must be >= 0",
                                 field="cache.memory_budget_bytes")
        for name in ("l2_threshold", "l2_text_threshold"):
            thr = getattr(self, name)
            if thr is not None and not (isinstance(thr, (int, float)) and not isinstance(
                    thr, bool) and 0.0 <= thr <= 2.0):
                raise InvalidRequest(f"cache {name} must be in [0, 2]", field=f"cache.{name}")

    def as_avro(self) -> dict[str, object]:
        return {"layers": [x for x in self.layers if x != "L3"],
                "memory_budget_bytes": self.memory_budget_bytes,
                "l2_threshold": self.l2_threshold, "l2_text_threshold": self.l2_text_threshold,
                "l3": "L3" in self.layers}

    @classmethod
    def from_avro(cls, d: Mapping[str, object] | None) -> CacheSettings | None:
        if not d:
            return None
        layers = d.get("layers", CACHE_LAYERS)
        budget, thr = d.get("memory_budget_bytes"), d.get("l2_threshold")
        text_thr = d.get("l2_text_threshold")  # absent in records written before v2
        names = (tuple(str(x) for x in layers) if isinstance(layers, (list, tuple))
                 else CACHE_LAYERS)
        l3 = d.get("l3")  # null in records written before v3: L3 followed the layers
        named = "L3" in names  # a JSON form may name it among the layers (Avro cannot)
        names = tuple(x for x in names if x != "L3")
        if l3 is True or (l3 is None and (named or any(x in RESULT_LAYERS for x in names))):
            names = (*names, "L3")
        return cls(names,
                   int(budget) if isinstance(budget, int) else None,
                   float(thr) if isinstance(thr, (int, float)) else None,
                   float(text_thr) if isinstance(text_thr, (int, float)) else None)


@dataclass(frozen=True, slots=True)
class IndexConfig:
    """One index. ``recipe`` is the FAISS factory string of its Tail segments; ``fields``
    the allow-list of filterable fields (tag fields match tags ``name:value``; numeric
    fields are keys of a record's ``numeric`` map)."""

    tenant: str
    index: str
    dim: int
    metric: Metric = Metric.COSINE
    dtype: Dtype = Dtype.FP32
    recipe: str = "HNSW32"
    fields: tuple[FilterField, ...] = ()
    version: int = 1
    created_ms: int = 0
    quotas: IndexQuotas | None = None
    embedder: str | None = None  # text indexes: the embedder's registry name (VEC.QUERY)
    cache: CacheSettings | None = None  # None: the node's cache defaults

    def __post_init__(self) -> None:
        check_name(self.tenant, "tenant")
        check_name(self.index, "index")
        for name, enum_type in (("metric", Metric), ("dtype", Dtype)):
            try:  # accept the wire spelling ("cosine", "fp16") and store the enum
                object.__setattr__(self, name, enum_type(getattr(self, name)))
            except ValueError:
                allowed = ", ".join(m.value for m in enum_type)
                raise InvalidRequest(f"{name} must be one of {allowed}", field=name) from None
        if not isinstance(self.dim, int) or not 1 <= self.dim <= LIMITS.max_dim:
            raise InvalidRequest(f"dim must be 1..{LIMITS.max_dim}", field="dim")
        if (
            not self.recipe
            or len(self.recipe) > 200
            or not re.fullmatch(r"[A-Za-z0-9_,.]+", self.recipe)
        ):
            raise InvalidRequest(
                f"recipe {self.recipe!r} is not a FAISS factory string", field="recipe"
            )
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise InvalidRequest("duplicate filter field", field="fields")

    @property
    def key(self) -> str:
        return f"{self.tenant}/{self.index}"

    def field_kind(self, name: str) -> FieldKind | None:
        for f in self.fields:
            if f.name == name:
                return f.kind
        return None


def parse_vector(data: bytes | Vector | list[float], dim: int) -> Vector:
    """fp32 little-endian bytes (or a list/array) -> a finite float32 vector of ``dim``."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) % 4:
            raise InvalidRequest(
                "vector bytes must be fp32 little-endian (a multiple of 4)", field="vector"
            )
        vec = np.frombuffer(bytes(data), dtype="<f4").astype(np.float32)
    else:
        try:
            vec = np.asarray(data, dtype=np.float32)
        except (TypeError, ValueError):
            raise InvalidRequest("vector must be a list of numbers", field="vector") from None
    if vec.ndim != 1:
        raise InvalidRequest("vector must be one-dimensional", field="vector")
    if vec.shape[0] != dim:
        raise DimensionMismatch(dim, int(vec.shape[0]))
    if not np.isfinite(vec).all():
        raise InvalidRequest("vector contains NaN or infinity", field="vector")
    return vec


@dataclass(frozen=True, slots=True)
class VectorUpsert:
    tenant: str
    index: str
    id: str
    vector: Vector
    meta: str | None = None
    tags: tuple[str, ...] = ()
    numeric: Mapping[str, float] = field(default_factory=dict)
    version: int = 1
    ttl_ms: int | None = None  # a temporary vector: expires ttl_ms after it is written

    def validate(self, config: IndexConfig) -> VectorUpsert:
        """Raise :class:`InvalidRequest`/:class:`DimensionMismatch` unless this record
        may be appended to ``config``'s index."""
        check_id(self.id)
        if self.ttl_ms is not None and (not isinstance(self.ttl_ms, int) or self.ttl_ms < 1):
            raise InvalidRequest("ttl_ms must be a positive integer", field="ttl_ms")
        parse_vector(self.vector, config.dim)
        if self.meta is not None:
            if len(self.meta.encode()) > LIMITS.max_meta_bytes:
                raise InvalidRequest(f"meta exceeds {LIMITS.max_meta_bytes} bytes", field="meta")
            try:
                json.loads(self.meta)
            except ValueError:
                raise InvalidRequest("meta must be JSON", field="meta") from None
        if len(self.tags) > LIMITS.max_tags:
            raise InvalidRequest(f"more than {LIMITS.max_tags} tags", field="tags")
        for tag in self.tags:
            if not tag or len(tag.encode()) > LIMITS.max_tag_bytes or "," in tag:
                raise InvalidRequest(f"bad tag {tag!r}", field="tags")
            name, sep, _ = tag.partition(":")
            if sep and config.field_kind(name) is not FieldKind.TAG:
                raise InvalidRequest(f"tag field {name!r} is not declared", field="tags")
        if len(self.numeric) > LIMITS.max_numeric:
            raise InvalidRequest(f"more than {LIMITS.max_numeric} numeric fields", field="numeric")
        for name, value in self.numeric.items():
            if config.field_kind(name) is not FieldKind.NUMERIC:
                raise InvalidRequest(f"numeric field {name!r} is not declared", field="numeric")
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidRequest(f"numeric field {name!r} must be finite", field="numeric")
        return self


def check_id(id: str) -> str:
    if not isinstance(id, str) or not id or len(id.encode()) > LIMITS.max_id_bytes:
        raise InvalidRequest(f"id must be 1..{LIMITS.max_id_bytes} bytes", field="id")
    if any(c in id for c in "\x00\n\r"):
        raise InvalidRequest("id must not contain NUL or newlines", field="id")
    return id


@dataclass(frozen=True, slots=True)
class VectorDelete:
    tenant: str
    index: str
    id: str


@dataclass(frozen=True, slots=True)
class Hit:
    id: str
    score: float
    meta: str | None = None
