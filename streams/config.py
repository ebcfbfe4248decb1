"""One frozen, typed settings object. Precedence: CLI flags > ``STREAMVEC_*`` env vars >
a ``.env`` file > the defaults below (which are the safe ones: durable appends, loopback)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from streams.exceptions import ConfigError

__all__ = ["RESERVED_KAFKA_PROPERTIES", "Settings"]

_KAFKA_CALLBACKS = frozenset({"logger", "on_delivery", "on_commit"})  # and every *_cb

# librdkafka properties a user's kafka_config may not set: the adapter's own (durable,
# ordered appends; readers' groups and commits) and the two that have their own setting
RESERVED_KAFKA_PROPERTIES = frozenset({
    "bootstrap.servers", "metadata.broker.list", "sasl.password", "acks",
    "request.required.acks", "enable.idempotence", "group.id", "enable.auto.commit",
    "enable.auto.offset.store", "auto.offset.reset", "client.id", "partitioner",
    "linger.ms", "queue.buffering.max.ms", "enable.partition.eof", "fetch.wait.max.ms",
})


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STREAMVEC_", env_file=".env", frozen=True, extra="ignore"
    )

    transport: Literal["embedded", "kafka"] = "embedded"
    data_dir: Path = Path("./data")
    kafka_bootstrap: str | None = None
    # librdkafka properties added to every Kafka client this node opens (security.protocol,
    # sasl.*, ssl.*, client.rack ...); STREAMVEC_KAFKA_CONFIG takes a JSON object. The
    # properties streamvec's guarantees rest on (acks, idempotence, groups) are not settable.
    kafka_config: dict[str, str | int | float | bool] = Field(default_factory=dict)
    # becomes sasl.password (a secret: kept out of kafka_config, never printed)
    kafka_sasl_password: SecretStr | None = None
    # replication factor of the topics streamvec creates; -1: the broker's
    # default.replication.factor (Kafka >= 2.4), so a cluster's own default applies
    kafka_replication_factor: int = Field(default=-1, ge=-1, le=32)
    topic_prefix: str = "streamvec."
    partitions: int = Field(default=1, ge=1, le=1024)

    # embedded log durability: sync (fsync per append call), group (fsync per group commit)
    # or none (no fsync: survives a process crash, not a power loss)
    durability: Literal["sync", "group", "none"] = "group"
    group_commit_ms: float = Field(default=0.0, ge=0.0, le=1000.0)
    cleaner_interval_s: float = Field(default=60.0, gt=0.0)

    head_capacity: int = Field(default=20_000, ge=100)  # rows before a Head is sealed
    snapshot_interval_s: float = Field(default=300.0, gt=0.0)

    # L0 exact result cache of the query node (ARCHITECTURE §4); verify rate: share of hits
    # re-checked against a fresh search to measure false hits
    cache_enabled: bool = True
    cache_budget_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    cache_verify_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    # cache layers of an index without IndexConfig.cache (L1/L2 are tolerant: opt in),
    # L2's cosine distance for vector queries and for text queries (VEC.QUERY, which also
    # check the texts agree), each tenant's share of the budget, store misses in a thread
    cache_layers: tuple[Literal["L0", "L1", "L2", "L3"], ...] = ("L0", "L3")  # L3: payloads
    cache_l2_threshold: float = Field(default=0.003, ge=0.0, le=2.0)  # DEFAULT_L2_VECTOR_THRESHOLD
    cache_l2_text_threshold: float = Field(default=0.02, ge=0.0, le=2.0)  # .._TEXT_THRESHOLD
    # L2 cost-aware reuse: ms a wrong answer from the cache costs the user (0: distance alone;
    # the thresholds above stay hard caps); defaults DEFAULT_L2_PENALTY_MS, .._TEXT_PENALTY_MS
    cache_l2_penalty_ms: float = Field(default=12.0, ge=0.0)
    cache_l2_text_penalty_ms: float = Field(default=20.0, ge=0.0)
    cache_tenant_budget_bytes: int | None = Field(default=None, ge=0)
    cache_background_offers: bool = False
    # which entry the L0 cache evicts over a budget: cost-aware GDSF (lowest
    # L + hits x cost / size first, streams.cache.eviction) or least recently used
    # (learned: sampled by the eviction table the policy learner publishes,
    # streams.cache.learned_eviction; GDSF until one is in force)
    cache_eviction: Literal["gdsf", "lru", "learned"] = "gdsf"
    # on which miss of a query its result is cached: 1 (the first) or 2 (the doorkeeper:
    # a first miss only records the key's hash, streams.cache.doorkeeper)
    cache_admit_after: int = Field(default=1, ge=1, le=2)
    # lazy offers: an admitted miss of an index without L1/L2 is parked and stored when
    # its query repeats (through the put's race check), so one-off queries never pay the
    # store (CacheController, "Lazy offers"); on by default since the learner's join
    # settles a parked admission at its repeat (streams/policy/join.py)
    cache_lazy_offers: bool = True
    # the cache policy loop: hot-path policy and query log, the policy learner's thread in
    # `streamvec up` (a PolicyUpdate per index every N trained decisions), idle prefetch
    policy_enabled: bool = True
    policy_learner: bool = True
    policy_update_every: int = Field(default=5_000, ge=1)
    # the in-process learner's share of one CPU (searches keep the rest; it lags under load)
    policy_learner_cpu_share: float = Field(default=0.25, gt=0.0, le=1.0)
    prefetch_enabled: bool = False
    # the hot path's guardrails (streams.cache.policy.GuardConfig): a version older than
    # this falls back; what decides then; searches per side before a version is judged
    policy_max_age_s: float = Field(default=24 * 3600.0, gt=0.0)
    policy_fallback: Literal["rules", "lru"] = "rules"
    policy_min_searches: int = Field(default=200, ge=1)

    # the embedder processor (documents -> chunks -> vectors): chunk windows in the model's
    # tokens, chat Sources chunked per message or per turn, provider retries with backoff
    ingest_enabled: bool = True
    chunk_tokens: int = Field(default=128, ge=8, le=8192)
    chunk_overlap_tokens: int = Field(default=32, ge=0, le=4096)
    chat_chunking: Literal["message", "turn"] = "message"
    ingest_batch_sources: int = Field(default=32, ge=1, le=10_000)
    embed_attempts: int = Field(default=3, ge=1, le=20)
    embed_backoff_s: float = Field(default=0.05, ge=0.0, le=60.0)
    # bearer key of OpenAI-compatible embedders (openai:<model>@<url>); OPENAI_API_KEY if unset
    embed_api_key: SecretStr | None = None
    # streams.ingest.vectorize: importance/novelty decisions per chunk (off: index every
    # chunk now); streams.capacity: budget ticks of the query node (0: only on demand)
    smart_vectorize: bool = False
    # chunks queued at medium/low priority: released when the processor is idle this long,
    # or once held this long, or beyond this many held (highest priority first)
    hold_idle_ms: int = Field(default=50, ge=0)
    hold_max_age_ms: int = Field(default=5_000, ge=0)
    hold_max_pending: int = Field(default=10_000, ge=0)
    capacity_interval_s: float = Field(default=5.0, ge=0.0)

    host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    registry_port: int = Field(default=8081, ge=0, le=65535)
    resp_port: int = Field(default=6380, ge=0, le=65535)
    schema_registry_url: str | None = None  # a remote registry; None = serve the embedded one

    def check(self) -> Settings:
        if self.transport == "kafka" and not self.kafka_bootstrap:
            raise ConfigError("transport=kafka needs kafka_bootstrap (STREAMVEC_KAFKA_BOOTSTRAP)")
        callbacks = sorted(
            k for k in self.kafka_config if k.endswith("_cb") or k in _KAFKA_CALLBACKS)
        if callbacks:  # error_cb, stats_cb, logger...: Python callables, not settings
            raise ConfigError(f"kafka_config: not a librdkafka property: {', '.join(callbacks)}")
        reserved = sorted(set(self.kafka_config) & RESERVED_KAFKA_PROPERTIES)
        if reserved:
            raise ConfigError(
                f"kafka_config may not set {', '.join(reserved)}: streamvec sets them itself"
                " (bootstrap servers: kafka_bootstrap; sasl.password: kafka_sasl_password)")
        if self.kafka_replication_factor == 0:
            raise ConfigError(
                "kafka_replication_factor must be >= 1, or -1 for the broker's default")
        return self

    def kafka_client_config(self) -> dict[str, str | int | float | bool]:
        """The librdkafka properties every Kafka client gets on top of the bootstrap servers."""
        out = dict(self.kafka_config)
        if self.kafka_sasl_password is not None:
            out["sasl.password"] = self.kafka_sasl_password.get_secret_value()
        return out
