"""Errors of the cache-policy simulator and learner.

::

    PolicyError (StreamvecError)         VEC_ERR_INVALID
    ├── TraceFormatError                 a trace line that is not a request (``line`` says which)
    └── BoundUnavailable                 the exact bound cannot be computed here (no scipy,
                                         or the trace is over ``max_requests``)
"""

from __future__ import annotations

from streams.exceptions import StreamvecError

__all__ = ["BoundUnavailable", "PolicyError", "TraceFormatError"]


class PolicyError(StreamvecError):
    """Base class of the policy package's errors."""

    code = "VEC_ERR_INVALID"


class TraceFormatError(PolicyError):
    """A trace file line that cannot be read as a :class:`~streams.policy.trace.Request`."""

    def __init__(self, message: str, *, line: int) -> None:
        super().__init__(f"trace line {line}: {message}")
        self.line = line


class BoundUnavailable(PolicyError):
    """The LP bound cannot be computed; callers fall back to the knapsack bound."""
