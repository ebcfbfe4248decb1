"""The log port and its transports. ``open_log`` picks the adapter from settings."""

from __future__ import annotations

from streams.log.exceptions import (
    InvalidRecord,
    LogClosed,
    LogError,
    TopicConflict,
    TopicNotFound,
    TransportError,
)
from streams.log.port import (
    CleanupPolicy,
    Log,
    LogPosition,
    Record,
    StoredRecord,
    Subscription,
    TopicSpec,
)

__all__ = [
    "CleanupPolicy",
    "InvalidRecord",
    "Log",
    "LogClosed",
    "LogError",
    "LogPosition",
    "Record",
    "StoredRecord",
    "Subscription",
    "TopicConflict",
    "TopicNotFound",
    "TopicSpec",
    "TransportError",
    "open_log",
]


def open_log(settings: object) -> Log:
    """The log that ``settings`` (a :class:`streams.config.Settings`) asks for."""
    from streams.config import Settings

    assert isinstance(settings, Settings)
    settings.check()
    if settings.transport == "kafka":
        from confluent_kafka import KafkaException

        from streams.exceptions import ConfigError
        from streams.log.kafka import KafkaLog

        assert settings.kafka_bootstrap is not None
        log: KafkaLog | None = None
        try:
            log = KafkaLog(settings.kafka_bootstrap, config=settings.kafka_client_config(),
                           replication_factor=settings.kafka_replication_factor)
            log.check_client_config()  # the consumer-only checks, before a reader fails
        except (KafkaException, TypeError, ValueError) as e:  # librdkafka refuses a property
            if log is not None:
                log.close()
            raise ConfigError(f"kafka_config: {_client_error(e)}") from None
        return log
    from streams.log.embedded import EmbeddedLog

    return EmbeddedLog(
        settings.data_dir / "log",
        durability=settings.durability,
        group_commit_ms=settings.group_commit_ms,
        cleaner_interval_s=settings.cleaner_interval_s,
    )


def _client_error(exc: BaseException) -> str:
    """librdkafka's message for a refused client property."""
    from confluent_kafka import KafkaException

    if isinstance(exc, KafkaException) and exc.args:
        return str(exc.args[0].str())
    return str(exc)
