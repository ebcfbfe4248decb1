"""Errors of Avro schemas, the wire-format codec and the schema registry.

``http_status``/``error_code`` are the Confluent Schema Registry's, so the REST layer answers
exactly as Confluent's clients expect.
"""

from __future__ import annotations

from streams.exceptions import StreamvecError

__all__ = [
    "DecodeError",
    "IncompatibleSchema",
    "InvalidSchema",
    "SchemaError",
    "SchemaNotFound",
    "SubjectNotFound",
    "VersionNotFound",
]


class SchemaError(StreamvecError):
    code = "VEC_ERR_INVALID"
    http_status = 500
    error_code = 50001


class SubjectNotFound(SchemaError):
    code = "VEC_ERR_NOT_FOUND"
    http_status = 404
    error_code = 40401

    def __init__(self, subject: str) -> None:
        super().__init__(f"Subject '{subject}' not found.")
        self.subject = subject


class VersionNotFound(SchemaError):
    code = "VEC_ERR_NOT_FOUND"
    http_status = 404
    error_code = 40402

    def __init__(self, subject: str, version: object) -> None:
        super().__init__(f"Version {version} not found.")
        self.subject = subject


class SchemaNotFound(SchemaError):
    code = "VEC_ERR_NOT_FOUND"
    http_status = 404
    error_code = 40403

    def __init__(self, what: object) -> None:
        super().__init__(f"Schema {what} not found")


class InvalidSchema(SchemaError):
    http_status = 422
    error_code = 42201


class InvalidVersion(SchemaError):
    http_status = 422
    error_code = 42202


class InvalidCompatibilityLevel(SchemaError):
    http_status = 422
    error_code = 42203


class IncompatibleSchema(SchemaError):
    http_status = 409
    error_code = 409

    def __init__(self, messages: list[str]) -> None:
        super().__init__(
            "Schema being registered is incompatible with an earlier schema: " + "; ".join(messages)
        )
        self.messages = messages


class DecodeError(SchemaError):
    """Bytes that are not a record we can read: wrong magic byte, unknown schema id,
    truncated or corrupt Avro. Readers send such records to the dead-letter topic."""

    code = "VEC_ERR_INVALID"
