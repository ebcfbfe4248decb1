"""Cache simulators at equal memory: LRU, LFU, GDSF, and admission/TTL-controlled caches.

Every simulator here is an on-demand byte-budgeted cache (:mod:`streams.policy.simulator`).

- :class:`LRUCache` admits everything, evicts the least recently used.
- :class:`LFUCache` admits everything, evicts the entry with the fewest hits since it was
  admitted (in-cache LFU), least recently used among equals.
- :class:`GDSFCache` Greedy-Dual-Size-Frequency (Cherkasova 1998) with cost: priority
  ``H = L + freq * cost / size``; evicts the lowest ``H`` and raises the inflation ``L`` to
  it, so that entries which stop being hit age out.
- :class:`ControlledCache` GDSF eviction (logged in ``log.evictions``) plus an
  :class:`AdmissionPolicy` that decides, on
  each miss, whether to admit and with which idle TTL (an entry not hit for ``ttl_s``
  seconds expires and frees its bytes; a hit renews it). This is the hot path of
  ARCHITECTURE §4; :class:`RuleAdmission` is its hand-written rule set and
  :class:`streams.policy.learned.TablePolicy` the learned one.

Memory price. :class:`ControlledCache` keeps an exponentially weighted rate of the cost its
hits save (time constant ``price_window_s``); divided by the budget it is what a byte of cache
earns per second on average: the rent an entry must beat to be worth admitting.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from streams.policy.context import Context, ContextTracker, bucket
from streams.policy.simulator import ADMIT, CacheSimulator, Decision
from streams.policy.trace import Request

__all__ = [
    "TTL_BUCKETS_S",
    "AdmissionPolicy",
    "AdmitAll",
    "CacheState",
    "ControlledCache",
    "GDSFCache",
    "LFUCache",
    "LRUCache",
    "RuleAdmission",
]

TTL_BUCKETS_S = (5.0, 30.0, 300.0)  # idle timeouts the controller chooses from


class LRUCache(CacheSimulator):
    name = "lru"

    def __init__(self, budget_bytes: int) -> None:
        super().__init__(budget_bytes)
        self._od: OrderedDict[str, int] = OrderedDict()

    def holds(self, key: str) -> bool:
        return key in self._od

    def _lookup(self, index: int, req: Request) -> bool:
        if req.key in self._od:
            self._od.move_to_end(req.key)
            return True
        return False

    def _on_miss(self, index: int, req: Request) -> Decision:
        while self.used_bytes + req.size > self.budget_bytes:
            _, size = self._od.popitem(last=False)
            self.used_bytes -= size
        self._od[req.key] = req.size
        self.used_bytes += req.size
        return ADMIT


class LFUCache(CacheSimulator):
    name = "lfu"

    def __init__(self, budget_bytes: int) -> None:
        super().__init__(budget_bytes)
        self._entries: dict[str, tuple[int, int, int]] = {}  # key -> (count, seq, size)
        self._heap: list[tuple[int, int, str]] = []  # (count, seq, key); stale ones skipped

    def holds(self, key: str) -> bool:
        return key in self._entries

    def _touch(self, index: int, key: str, count: int, size: int) -> None:
        self._entries[key] = (count, index, size)
        heapq.heappush(self._heap, (count, index, key))
        if len(self._heap) > 4 * len(self._entries) + 1024:
            self._heap = [(c, s, k) for k, (c, s, _) in self._entries.items()]
            heapq.heapify(self._heap)

    def _lookup(self, index: int, req: Request) -> bool:
        entry = self._entries.get(req.key)
        if entry is None:
            return False
        self._touch(index, req.key, entry[0] + 1, entry[2])
        return True

    def _on_miss(self, index: int, req: Request) -> Decision:
        while self.used_bytes + req.size > self.budget_bytes:
            count, seq, key = heapq.heappop(self._heap)
            entry = self._entries.get(key)
            if entry is not None and entry[0] == count and entry[1] == seq:
                del self._entries[key]
                self.used_bytes -= entry[2]
        self._touch(index, req.key, 1, req.size)
        self.used_bytes += req.size
        return ADMIT


@dataclass(frozen=True, slots=True)
class CacheState:
    """What an admission policy may read about the cache when it decides."""

    now: float
    used_bytes: int
    budget_bytes: int
    price_per_byte_s: float  # average proxy cost a held byte saves per second (the rent)


class AdmissionPolicy(Protocol):
    """Decides on a miss. Must return ``admitted=False`` or a TTL from :data:`TTL_BUCKETS_S`
    (or None), and the probability it gave to the action it returns."""

    name: str

    def decide(self, index: int, req: Request, ctx: Context, state: CacheState) -> Decision: ...


class AdmitAll:
    """Admit every miss with no TTL: with :class:`ControlledCache` this is plain GDSF."""

    name = "gdsf"

    def decide(self, index: int, req: Request, ctx: Context, state: CacheState) -> Decision:
        return ADMIT


class _Entry:
    __slots__ = ("cost", "expires", "freq", "last", "prio", "seq", "size", "ttl")

    def __init__(self, size: int, cost: float, ttl: float | None, last: float) -> None:
        self.size, self.cost, self.ttl, self.last = size, cost, ttl, last
        self.freq, self.prio, self.seq, self.expires = 0, 0.0, 0, math.inf


class ControlledCache(CacheSimulator):
    """GDSF eviction, idle TTLs and a pluggable admission policy (module docstring)."""

    def __init__(
        self,
        budget_bytes: int,
        policy: AdmissionPolicy,
        *,
        price_window_s: float = 60.0,
        tracker: ContextTracker | None = None,
    ) -> None:
        super().__init__(budget_bytes)
        self.policy = policy
        self.name = policy.name
        self.tracker = tracker or ContextTracker()
        self._entries: dict[str, _Entry] = {}
        self._heap: list[tuple[float, int, str]] = []  # (prio, seq, key)
        self._expiry: list[tuple[float, str]] = []  # (expires, key)
        self._inflation = 0.0
        self._seq = 0
        self._window = price_window_s
        self._saved = 0.0  # exponentially weighted saved cost
        self._t = 0.0
        self._ctx: Context | None = None

    def holds(self, key: str) -> bool:
        return key in self._entries

    def _prioritise(self, key: str, e: _Entry) -> None:
        self._seq += 1
        e.seq = self._seq
        e.prio = self._inflation + e.freq * e.cost / e.size
        heapq.heappush(self._heap, (e.prio, e.seq, key))
        if len(self._heap) > 4 * len(self._entries) + 1024:
            self._heap = [(x.prio, x.seq, k) for k, x in self._entries.items()]
            heapq.heapify(self._heap)

    def _remove(self, key: str) -> None:
        self.used_bytes -= self._entries.pop(key).size

    def _expire(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] <= now:
            expires, key = heapq.heappop(self._expiry)
            e = self._entries.get(key)
            if e is not None and e.expires == expires:
                self._remove(key)

    def _lookup(self, index: int, req: Request) -> bool:
        now = req.time
        self._saved *= math.exp(-(now - self._t) / self._window) if now > self._t else 1.0
        self._t = now
        self._expire(now)
        self._ctx = self.tracker.observe(req)
        e = self._entries.get(req.key)
        if e is None:
            return False
        self._saved += req.cost
        e.freq += 1
        e.cost = req.cost
        e.last = now
        self._prioritise(req.key, e)
        if e.ttl is not None:
            e.expires = now + e.ttl
            heapq.heappush(self._expiry, (e.expires, req.key))
        return True

    def state(self, now: float) -> CacheState:
        price = self._saved / self._window / self.budget_bytes
        return CacheState(now, self.used_bytes, self.budget_bytes, price)

    def _on_miss(self, index: int, req: Request) -> Decision:
        assert self._ctx is not None
        decision = self.policy.decide(index, req, self._ctx, self.state(req.time))
        if not decision.admitted:
            return decision
        while self.used_bytes + req.size > self.budget_bytes:
            prio, seq, key = heapq.heappop(self._heap)
            e = self._entries.get(key)
            if e is not None and e.seq == seq:
                self._inflation = prio
                self._remove(key)
                self.log.evictions.append((index, key, req.time - e.last))
        e = _Entry(req.size, req.cost, decision.ttl_s, req.time)
        e.freq = 1
        self._entries[req.key] = e
        self.used_bytes += req.size
        self._prioritise(req.key, e)
        if e.ttl is not None:
            e.expires = req.time + e.ttl
            heapq.heappush(self._expiry, (e.expires, req.key))
        return decision


class GDSFCache(ControlledCache):
    """Classic GDSF: admit all, no TTL, frequency counted while in the cache."""

    def __init__(self, budget_bytes: int) -> None:
        super().__init__(budget_bytes, AdmitAll())


class RuleAdmission:
    """The hot-path rules: admit when the expected saving beats the memory rent.

    The key's request rate is estimated as ``r = max(freq / window_s, 1 / gap)`` (``window_s``
    is the span the decayed counts cover, :attr:`Context.window_s`); a key never seen
    borrows its cluster's rate over ``cluster_keys`` variants, else ``prior / window_s``.
    The entry is admitted iff ``r * cost >= margin * (price * size + stale_per_s)``: it saves
    more per second than its bytes earn on average in this cache (the rent,
    :attr:`CacheState.price_per_byte_s`) plus a staleness charge (0 by default: L0
    invalidation is exact, ARCHITECTURE §4). The idle TTL is the smallest bucket covering
    ``ttl_gaps`` expected gaps between requests (the largest if none does).
    """

    name = "rules"

    def __init__(
        self,
        *,
        prior: float = 1.0,
        cluster_keys: float = 4.0,
        margin: float = 1.0,
        stale_per_s: float = 0.0,
        ttl_gaps: float = 3.0,
    ) -> None:
        self.prior, self.cluster_keys, self.margin = prior, cluster_keys, margin
        self.stale_per_s, self.ttl_gaps = stale_per_s, ttl_gaps

    def rate(self, ctx: Context) -> float:
        """Estimated requests per second for the key of ``ctx``."""
        w = ctx.window_s
        if ctx.freq >= 0.5 or not math.isinf(ctx.gap_s):
            r = ctx.freq / w
            return max(r, 1.0 / max(ctx.gap_s, 1e-3)) if not math.isinf(ctx.gap_s) else r
        if ctx.cluster_freq > 0:
            return max(ctx.cluster_freq / w / self.cluster_keys, self.prior / w)
        return self.prior / w

    def decide(self, index: int, req: Request, ctx: Context, state: CacheState) -> Decision:
        r = self.rate(ctx)
        b = bucket(ctx)
        if r * ctx.cost < self.margin * (state.price_per_byte_s * ctx.size + self.stale_per_s):
            return Decision("bypass", False, None, 1.0, b)
        want = self.ttl_gaps / r
        ttl = next((t for t in TTL_BUCKETS_S if t >= want), TTL_BUCKETS_S[-1])
        return Decision(f"ttl{ttl:g}", True, ttl, 1.0, b)
