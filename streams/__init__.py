"""streamvec: Kafka-native vector search whose source of truth is a log of Avro records."""

from __future__ import annotations

from streams.exceptions import ConfigError, StreamvecError

__all__ = ["ConfigError", "StreamvecError", "__version__"]

__version__ = "0.1.0"
