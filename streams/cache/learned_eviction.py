"""``cache_eviction: learned``: the L0 cache evicts by an :class:`EvictionTable` learned
from the query log (:mod:`streams.policy.eviction`), sampled as in Redis, LHD and LRB.

Why sampling and not :class:`~streams.cache.eviction.LazyHeap`: a table's priority drops
while an entry sits idle, so a heap item is no bound of its entry's priority and popping
would pick wrong victims. Instead, to evict one entry of a scope (the whole cache, a
tenant, an index) :meth:`LearnedEviction.victim` draws ``samples`` live entries of that
scope at random (with repeats) and the lowest :meth:`EvictionTable.priority` goes. The
entry just stored is always among the candidates, so a miss ranked below every sampled
entry is evicted by its own put (``PutOutcome.outcome == "evicted"``): the table's
admission by the same rank (a bypass).

Per key (cached or not, at most ``max_keys``) the cache keeps :class:`KeyState`: first
and last request time, the request count decayed with ``tau_s`` as of the last request,
the total request count, and the filter kind (none, tag, range). A request is counted
when its result is offered to the cache (the miss's put) and on every hit
(:meth:`LearnedEviction.hit`, a dict lookup, one ``exp`` and two adds: the hit path stays
a few microseconds). Size and cost are the slot's (``nbytes``, the entry's
``compute_ms``). A ``rate`` table is given the total count (its ``tau_s`` is
:data:`~streams.policy.eviction.RATE_TAU_S`: a count decayed with it is the total), a
``density`` or ``decayed`` table the decayed one. A ``rate`` table with a ``horizon_s``
(the hit density over it, :func:`~streams.policy.eviction.rate_hit_density`) needs no more
state: the same :meth:`EvictionTable.priority` ranks it from the same counts and times.
These counts are of the requests the cache saw (hits and stored misses; a miss not stored,
e.g. a lazy offer not yet promoted, is not counted) and start again for a key forgotten
past ``max_keys``; the learner's shadow caches count every logged search.

Which tables apply: a ``rate`` table always; a ``density`` or ``decayed`` table only when
its ``tau_s`` is the cache's (the count it is keyed by is the one the cache keeps).
Another tau would rank by the wrong count, so such a table is refused: its index evicts
by GDSF, as with no table; each eviction that refused it is counted (``refused`` in
:meth:`LearnedEviction.stats`) and the refusal logged once per index and table version
(:meth:`LearnedEviction.applies`); the policy status shows ``applied: false``. The
policy learner publishes only tables at the node's tau (:mod:`streams.policy.learner`).

Tables come from a :class:`TableSource`, per index: :class:`StaticTables` (tests,
benchmarks) or :class:`HolderTables`, the versions a
:class:`~streams.cache.policy.PolicyHolder` has in force (the ``eviction_table`` of the
PolicyUpdate, parsed once per version). So a table is installed without a restart when
the holder applies an update, a rollback restores the rolled-back version's table, and
when the guardrails put the rules (or LRU) back in charge the index has no table. An
eviction whose sampled candidates include an entry of an index without a table is left
to GDSF (the cache keeps its heaps): until a table is in force the cache is GDSF.

Domain code: no I/O but that warning, no locks (the cache's lock guards every call).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from streams.index.filters import NumericClause
from streams.policy.eviction import EvictionTable

if TYPE_CHECKING:
    from streams.cache.eviction import Slot
    from streams.cache.keys import QueryKey
    from streams.cache.policy import PolicyHolder
    from streams.index.filters import Filter

__all__ = [
    "HolderTables",
    "InstalledTable",
    "KeyState",
    "LearnedEviction",
    "StaticTables",
    "TableSource",
    "eviction_payload",
    "filter_kind_of",
    "parse_eviction_payload",
]

log = logging.getLogger(__name__)

DEFAULT_TAU_S = 300.0  # the count's time constant (EvictionConfig.density_taus_s)


def filter_kind_of(f: Filter | None) -> int:
    """The filter-kind index of :mod:`streams.policy.eviction` (``FILTER_KINDS``): 0 none,
    1 tags only, 2 with a numeric range."""
    if f is None or not f.clauses:
        return 0
    return 2 if any(isinstance(c, NumericClause) for c in f.clauses) else 1


@dataclass(frozen=True, slots=True)
class InstalledTable:
    """A table as the cache applies it. ``by_filter``: whether the table's filter-kind
    axis was learned (the query log does not say a search's filter: a table learned from
    it is keyed by kind 0 only, and the cache then ranks every entry as kind 0)."""

    table: EvictionTable
    by_filter: bool = False


def eviction_payload(table: EvictionTable, *, by_filter: bool = False) -> str:
    """The JSON a PolicyUpdate's ``eviction_table`` carries."""
    return json.dumps({"table": table.to_json(), "by_filter": by_filter}, separators=(",", ":"))


def parse_eviction_payload(text: str) -> InstalledTable:
    """Inverse of :func:`eviction_payload`; ``ValueError`` for anything malformed."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"eviction_table is not JSON: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("table"), dict):
        raise ValueError("eviction_table must be an object with a `table` object")
    return InstalledTable(EvictionTable.from_json(obj["table"]), bool(obj.get("by_filter")))


class TableSource(Protocol):
    """The table in force for an index (None: that index evicts by GDSF)."""

    def table_for(self, index_key: str) -> InstalledTable | None: ...


class StaticTables:
    """Tables set by hand, per index key or for every index (``"*"``)."""

    def __init__(self) -> None:
        self._tables: dict[str, InstalledTable] = {}

    def install(self, index_key: str, table: EvictionTable | None, by_filter: bool = False) -> None:
        if table is None:
            self._tables.pop(index_key, None)
        else:
            self._tables[index_key] = InstalledTable(table, by_filter)

    def table_for(self, index_key: str) -> InstalledTable | None:
        return self._tables.get(index_key) or self._tables.get("*")


class HolderTables:
    """The ``eviction_table`` of the version a :class:`PolicyHolder` has in force for an
    index (module docstring); a malformed one counts as none (the version's admission
    table still applies) and is counted in ``rejected``."""

    def __init__(self, holder: PolicyHolder) -> None:
        self.holder = holder
        self._parsed: dict[tuple[str, int, int], InstalledTable | None] = {}
        self.rejected = 0

    def table_for(self, index_key: str) -> InstalledTable | None:
        v = self.holder.in_force(index_key)
        if v is None:
            return None
        text = v.record.get("eviction_table")
        if not text:
            return None
        memo = (v.key, v.version, v.created_ms)
        if memo in self._parsed:
            return self._parsed[memo]
        try:
            found: InstalledTable | None = parse_eviction_payload(str(text))
        except ValueError:
            found = None
            self.rejected += 1
        if len(self._parsed) > 256:
            self._parsed.clear()
        self._parsed[memo] = found
        return found


class KeyState:
    """What the rank needs of one key: first/last request (``clock`` seconds), count
    decayed with ``tau_s`` as of ``last`` (this request included), total count (every
    request counted since ``first``), filter kind."""

    __slots__ = ("count", "first", "kind", "last", "total")

    def __init__(self, now: float, kind: int) -> None:
        self.first = self.last = now
        self.count = self.total = 1.0
        self.kind = kind


class _Members:
    """The live slots of one scope, indexable for sampling (swap-remove)."""

    __slots__ = ("pos", "slots")

    def __init__(self) -> None:
        self.slots: list[Slot] = []
        self.pos: dict[QueryKey, int] = {}

    def add(self, slot: Slot) -> None:
        self.pos[slot.key] = len(self.slots)
        self.slots.append(slot)

    def remove(self, key: QueryKey) -> None:
        i = self.pos.pop(key, None)
        if i is None:
            return
        last = self.slots.pop()
        if i < len(self.slots):
            self.slots[i] = last
            self.pos[last.key] = i


class LearnedEviction:
    """Sampled eviction by learned tables for one :class:`ResultCache` (module
    docstring). ``clock``: seconds (``time.time``; a benchmark passes the trace's);
    ``min_cost_ms``: the floor of an entry's cost, as in GDSF."""

    def __init__(
        self,
        source: TableSource | None = None,
        *,
        samples: int = 32,
        tau_s: float = DEFAULT_TAU_S,
        max_keys: int = 200_000,
        clock: Callable[[], float] = time.time,
        seed: int = 0,
        min_cost_ms: float = 0.01,
    ) -> None:
        if samples < 1 or tau_s <= 0 or max_keys < 1 or min_cost_ms <= 0:
            raise ValueError("samples >= 1, tau_s > 0, max_keys >= 1, min_cost_ms > 0")
        self.source: TableSource = source or StaticTables()
        self.samples = samples
        self.tau_s = tau_s
        self.max_keys = max_keys
        self.clock = clock
        self.min_cost_ms = min_cost_ms
        self._rng = random.Random(seed)
        self._keys: dict[QueryKey, KeyState] = {}
        self._members: dict[str, _Members] = {"": _Members()}
        self._newest: Slot | None = None
        self.counts = {"learned": 0, "gdsf": 0, "bypassed": 0, "refused": 0}
        self._refused: set[tuple[str, int, str, float]] = set()  # logged once each

    # -- requests ------------------------------------------------------------------------

    def hit(self, key: QueryKey) -> None:
        """Count a hit of ``key`` (the hot path: one dict lookup, one ``exp``)."""
        s = self._keys.get(key)
        if s is not None:
            now = self.clock()
            s.count = s.count * math.exp((s.last - now) / self.tau_s) + 1.0
            s.total += 1.0
            s.last = now

    def offered(self, key: QueryKey, f: Filter | None) -> None:
        """Count the miss whose result is being stored under ``key``."""
        now = self.clock()
        s = self._keys.get(key)
        if s is None:
            if len(self._keys) >= self.max_keys:
                self._forget()
            self._keys[key] = KeyState(now, filter_kind_of(f))
            return
        s.count = s.count * math.exp(min(s.last - now, 0.0) / self.tau_s) + 1.0
        s.total += 1.0
        s.last = now
        s.kind = filter_kind_of(f)

    def state(self, key: QueryKey) -> KeyState | None:
        return self._keys.get(key)

    def _forget(self) -> None:
        """Drop the older half of the keys not cached (by last request)."""
        cached = self._members[""].pos
        idle = sorted((s.last, i) for i, (k, s) in enumerate(self._keys.items()) if k not in cached)
        drop = {i for _, i in idle[: max(1, len(idle) // 2)]}
        self._keys = {k: s for i, (k, s) in enumerate(self._keys.items()) if i not in drop}

    # -- membership (the cache calls these under its lock) ----------------------------------

    def added(self, slot: Slot) -> None:
        """A slot was stored: a member of the whole cache and of each of its scopes."""
        self.offered(slot.key, slot.entry.filter)
        self._members[""].add(slot)
        for scope in slot.scopes:
            m = self._members.get(scope)
            if m is None:
                m = self._members[scope] = _Members()
            m.add(slot)
        self._newest = slot

    def removed(self, slot: Slot, reason: str) -> None:
        """A removal listener of the cache: the slot left (any ``reason``)."""
        self._members[""].remove(slot.key)
        for scope in slot.scopes:
            m = self._members.get(scope)
            if m is not None:
                m.remove(slot.key)
                if not m.slots:
                    del self._members[scope]
        if self._newest is slot:
            self._newest = None

    # -- eviction ----------------------------------------------------------------------

    def can_apply(self, table: EvictionTable) -> bool:
        """Whether this cache can rank by ``table`` (module docstring): a ``rate`` table,
        or one keyed by a count decayed with the cache's ``tau_s``."""
        return table.kind == "rate" or math.isclose(table.tau_s, self.tau_s, rel_tol=1e-9)

    def applies(self, index_key: str, installed: InstalledTable) -> bool:
        """:meth:`can_apply`, a refusal counted, and logged once per index and table
        version."""
        t = installed.table
        if self.can_apply(t):
            return True
        self.counts["refused"] += 1
        memo = (index_key, t.version, t.kind, t.tau_s)
        if memo not in self._refused:
            if len(self._refused) > 256:
                self._refused.clear()
            self._refused.add(memo)
            log.warning(
                "learned eviction: %s table v%d of %s is keyed by a count decayed with "
                "tau %g s but this cache keeps tau %g s; refused, %s evicts by GDSF",
                t.kind,
                t.version,
                index_key,
                t.tau_s,
                self.tau_s,
                index_key,
            )
        return False

    def priority(self, slot: Slot, installed: InstalledTable, now: float) -> float:
        """The rank of ``slot`` by ``installed`` (one that :meth:`applies`): a ``rate``
        table is given the key's total count, the others its decayed count."""
        s = self._keys.get(slot.key)
        cost = slot.entry.compute_ms
        cost = cost if cost > self.min_cost_ms else self.min_cost_ms
        if s is None:  # forgotten while cached (cannot happen: cached keys are kept)
            return 0.0
        kind = s.kind if installed.by_filter else 0
        t = installed.table
        count = s.total if t.kind == "rate" else s.count
        return t.priority(
            max(slot.nbytes, 1), cost, count, kind, max(now - s.last, 0.0), now - s.first
        )

    def victim(self, scope: str | None) -> tuple[Slot, float] | None:
        """The lowest-priority of ``samples`` random live slots of ``scope`` (None: the
        whole cache; all of them when it has at most ``samples``) and the newest slot,
        with its priority; None when one of them has no table or one this cache cannot
        apply (:meth:`applies`; GDSF decides) or the scope is empty."""
        m = self._members.get(scope or "")
        if m is None or not m.slots:
            return None
        slots, n, rnd = m.slots, len(m.slots), self._rng.random
        now = self.clock()
        tables: dict[str, InstalledTable | None] = {}
        if n <= self.samples:  # a small scope: every entry is a candidate (exact)
            candidates = list(slots)
        else:
            candidates = [slots[int(rnd() * n)] for _ in range(self.samples)]
        newest = self._newest
        if newest is not None and newest.key in m.pos:
            candidates.append(newest)
        best: Slot | None = None
        low = math.inf
        for slot in candidates:
            ik = slot.entry.index_key
            if ik in tables:
                installed = tables[ik]
            else:
                installed = self.source.table_for(ik)
                if installed is not None and not self.applies(ik, installed):
                    installed = None
                tables[ik] = installed
            if installed is None:
                self.counts["gdsf"] += 1
                return None
            p = self.priority(slot, installed, now)
            if p < low:
                best, low = slot, p
        if best is None:
            return None
        self.counts["learned"] += 1
        if best is newest:
            self.counts["bypassed"] += 1
        return best, low

    def stats(self) -> Mapping[str, Any]:
        return {**self.counts, "keys": len(self._keys), "entries": len(self._members[""].slots)}
