"""One frozen, typed settings object. Precedence: CLI flags > ``STREAMVEC_*`` env vars >
a ``.env`` file > the defaults below (which are the safe ones: durable appends, loopback)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from streams.exceptions import ConfigError

__all__ = ["Settings"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STREAMVEC_", env_file=".env", frozen=True, extra="ignore"
    )

    transport: Literal["embedded", "kafka"] = "embedded"
    data_dir: Path = Path("./data")
    kafka_bootstrap: str | None = None
    kafka_sasl_password: SecretStr | None = None
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

    host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    registry_port: int = Field(default=8081, ge=0, le=65535)
    resp_port: int = Field(default=6380, ge=0, le=65535)
    schema_registry_url: str | None = None  # a remote registry; None = serve the embedded one

    def check(self) -> Settings:
        if self.transport == "kafka" and not self.kafka_bootstrap:
            raise ConfigError("transport=kafka needs kafka_bootstrap (STREAMVEC_KAFKA_BOOTSTRAP)")
        return self
