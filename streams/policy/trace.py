"""Request traces: what the cache sees, one request at a time, and their JSON-lines form.

A trace is a sequence of :class:`Request` in non-decreasing ``time``. Each request names the
exact result-cache key (the L0 ``QueryKey``), the size in bytes its cached result would take,
its *proxy cost* (what a miss costs: the search work, in milliseconds of index time), and the
context features the hot path can see when it decides on admission (``k``, the filter kind,
the near-duplicate cluster, the position in a session...). The same key always has the same
size in the generated workloads; its cost may jitter a little from one request to the next.

File format: one JSON object per line, ``{"t": .., "key": .., "size": .., "cost": ..,
"ctx": {...}}``. Reading validates every line and raises :class:`TraceFormatError` with the
line number on the first bad one; nothing is half-returned.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streams.policy.exceptions import TraceFormatError

__all__ = ["Feature", "Request", "read_trace", "trace_footprint", "write_trace"]

Feature = float | int | str


@dataclass(frozen=True, slots=True)
class Request:
    """One cache lookup. ``size`` > 0 bytes, ``cost`` >= 0, ``time`` in seconds."""

    time: float
    key: str
    size: int
    cost: float
    ctx: Mapping[str, Feature] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "t": self.time,
            "key": self.key,
            "size": self.size,
            "cost": self.cost,
            "ctx": dict(self.ctx),
        }

    @classmethod
    def from_json(cls, obj: Any) -> Request:
        """Build a request from a decoded JSON object; ``ValueError`` says what is wrong."""
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        try:
            time, key, size, cost = obj["t"], obj["key"], obj["size"], obj["cost"]
        except KeyError as exc:
            raise ValueError(f"missing field {exc.args[0]!r}") from None
        ctx = obj.get("ctx", {})
        if not isinstance(key, str):
            raise ValueError("key must be a string")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ValueError("size must be a positive integer")
        if not isinstance(time, int | float) or not math.isfinite(time):
            raise ValueError("t must be a finite number")
        if not isinstance(cost, int | float) or not math.isfinite(cost) or cost < 0:
            raise ValueError("cost must be a finite number >= 0")
        if not isinstance(ctx, dict) or not all(
            isinstance(v, int | float | str) and not isinstance(v, bool) for v in ctx.values()
        ):
            raise ValueError("ctx must map names to numbers or strings")
        return cls(float(time), key, size, float(cost), ctx)


def write_trace(path: Path, requests: Iterable[Request]) -> int:
    """Write ``requests`` as JSON lines (replacing ``path``); returns how many were written."""
    n = 0
    with path.open("w", encoding="utf-8") as out:
        for req in requests:
            out.write(json.dumps(req.to_json(), separators=(",", ":")))
            out.write("\n")
            n += 1
    return n


def read_trace(path: Path) -> list[Request]:
    """Read a JSON-lines trace. Blank lines are skipped; times must not go backwards.

    Raises :class:`TraceFormatError` (with the 1-based line number) on the first bad line.
    """
    requests: list[Request] = []
    last_t = -math.inf
    with path.open(encoding="utf-8") as src:
        for lineno, line in enumerate(src, start=1):
            if not line.strip():
                continue
            try:
                req = Request.from_json(json.loads(line))
            except (json.JSONDecodeError, ValueError) as exc:
                raise TraceFormatError(str(exc), line=lineno) from None
            if req.time < last_t:
                raise TraceFormatError("time goes backwards", line=lineno)
            last_t = req.time
            requests.append(req)
    return requests


def trace_footprint(requests: Sequence[Request]) -> int:
    """Bytes needed to hold every distinct key of the trace at once (its largest size)."""
    sizes: dict[str, int] = {}
    for r in requests:
        if r.size > sizes.get(r.key, 0):
            sizes[r.key] = r.size
    return sum(sizes.values())
