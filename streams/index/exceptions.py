"""Errors of the data plane, each with the code a client sees (ARCHITECTURE §5).

::

    VecError (StreamvecError)
    ├── DimensionMismatch   VEC_ERR_DIM        vector length differs from the index's dim
    ├── NotFound            VEC_ERR_NOT_FOUND  unknown index or id
    ├── QuotaExceeded       VEC_ERR_QUOTA      over a tenant/index quota (retry_after_s)
    ├── Busy                VEC_ERR_BUSY       overloaded, or a consistency wait timed out
    ├── Unauthorized        VEC_ERR_AUTH       key missing or not allowed for the tenant
    ├── InvalidRequest      VEC_ERR_INVALID    malformed input; ``field`` names the culprit
    └── VersionConflict     VEC_ERR_CONFLICT   IF_VERSION did not match the stored version
"""

from __future__ import annotations

from streams.exceptions import StreamvecError

__all__ = [
    "Busy",
    "DimensionMismatch",
    "InvalidRequest",
    "NotFound",
    "QuotaExceeded",
    "Unauthorized",
    "VecError",
    "VersionConflict",
]


class VecError(StreamvecError):
    code = "VEC_ERR_INVALID"
    http_status = 400


class InvalidRequest(VecError):
    code = "VEC_ERR_INVALID"
    http_status = 400

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class DimensionMismatch(InvalidRequest):
    code = "VEC_ERR_DIM"

    def __init__(self, expected: int, got: int) -> None:
        super().__init__(f"vector has {got} dimensions, index expects {expected}", field="vector")
        self.expected = expected
        self.got = got


class NotFound(VecError):
    code = "VEC_ERR_NOT_FOUND"
    http_status = 404


class QuotaExceeded(VecError):
    code = "VEC_ERR_QUOTA"
    http_status = 429

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Busy(VecError):
    code = "VEC_ERR_BUSY"
    http_status = 503

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unauthorized(VecError):
    code = "VEC_ERR_AUTH"
    http_status = 401


class VersionConflict(VecError):
    code = "VEC_ERR_CONFLICT"
    http_status = 409

    def __init__(self, id: str, expected: int, actual: int | None) -> None:
        super().__init__(f"id {id!r}: IF_VERSION {expected} but stored version is {actual}")
        self.expected = expected
        self.actual = actual
