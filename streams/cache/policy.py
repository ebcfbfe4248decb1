"""Admission: whether a fresh result goes into the cache, and the record of that choice.

Every decision carries the action, the probability with which the policy took it and a
reason, so that the query log can record it and a learned policy (a contextual bandit,
ARCHITECTURE §3) can be evaluated offline against it. :class:`AdmitAll` is the default
until the policy learner's tables arrive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from streams.cache.entry import CachedResult

__all__ = ["AdmissionAction", "AdmissionDecision", "AdmissionPolicy", "AdmitAll"]

AdmissionAction = Literal["admit", "reject"]


@dataclass(frozen=True, slots=True)
class AdmissionDecision:
    """What the policy chose for one result: ``probability`` is the chance it had of
    taking ``action`` (1.0 for a deterministic policy)."""

    action: AdmissionAction
    probability: float
    reason: str

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {self.probability}")

    def as_dict(self) -> dict[str, Any]:
        return {"action": self.action, "probability": self.probability, "reason": self.reason}


class AdmissionPolicy(Protocol):
    """Decides admission on the search's hot path: must be cheap (microseconds), must not
    block and must not raise."""

    def decide(self, entry: CachedResult) -> AdmissionDecision: ...


_ADMIT_ALL = AdmissionDecision("admit", 1.0, "admit-all")


class AdmitAll:
    """Admit every result (eviction alone bounds the cache)."""

    def decide(self, entry: CachedResult) -> AdmissionDecision:
        return _ADMIT_ALL
