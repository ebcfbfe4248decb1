"""Learned eviction: a hit-density table learned from the request log, and expert selection.

The hot-path form is :class:`EvictionTable`, a pure value (``to_json``/``from_json``) whose
:meth:`EvictionTable.priority` ranks a cached entry with a table lookup or one ``exp``; the
cache evicts the lowest priority among ``samples`` entries drawn at random (sampled
eviction, as in Redis, LHD and LRB) and bypasses a miss whose own priority is below that
victim's (admission by the same rank). Three kinds of table:

- ``density`` (LHD, Beckmann et al. NSDI'18, with cost): ``density[f][x][l][a]`` is the
  expected hits per second of an entry whose key count (decayed with ``tau_s``, as of its
  last request) is in bin ``f``, filter kind ``x``, key lifetime (seconds since first seen)
  in bin ``l`` and idle age (seconds since its last request) in bin ``a``; priority =
  density x cost / size.
- ``decayed``: priority = the key's request count decayed with time constant ``tau_s``
  (evaluated now) x cost / size: frequency that survives eviction (the key counts are kept
  for every key, cached or not), forgotten at a rate the learner picks.
- ``rate``: priority = the key's request rate while alive x the chance it is still alive x
  cost / size (:func:`rate_alive`). The rate is the Gamma(``prior_a``, ``prior_b``) posterior
  mean given the key's requests since it was first seen (its total count: the table's
  ``tau_s`` is :data:`RATE_TAU_S`); a key dies with ``hazard_per_s`` per second, so a
  silence long for its rate makes it likely dead. Keys do die (a trend ends, a document is
  replaced; in ``zipf`` every 5,000 requests 10% of the ranks move to new keys), and a
  decayed count keeps a dead hot key cached for several time constants; with the hazard it
  goes after a few of its own mean gaps. The prior is fitted by empirical Bayes from the key
  counts (:func:`fit_rate_prior`), so a new key is ranked by what new keys usually do.
  With a ``horizon_s`` T > 0 the rate is replaced by the hit density over T under the
  posterior (:func:`rate_hit_density`, LHD's expected hits per unit of occupied time
  applied to the Gamma posterior): a barely-seen key occupies space for T with no hit in
  most draws of its rate, which the posterior mean hides. The selector sets T to
  ``rate_horizon_factor`` x the median idle age at eviction of that shadow's own cache.

:class:`DensityLearner` builds the density table from the log alone: every request of a key
is a sample, and its label is the gap to the key's next request, read off the log once it
has happened (or censored when the key stays idle past the horizon). For each idle age
``a`` the sample survived to, it adds ``hit = gap - a <= T`` and ``lifetime = min(gap - a,
T)`` to its cell; density = hits / lifetime (shrunk towards the cell's marginal over ``l``).
The horizon ``T`` is ``horizon_factor`` x the median idle age of recently evicted entries
(eviction events are in the log: :attr:`~streams.policy.simulator.ReplayLog.evictions`); an
entry the cache ranks high lives well past that median, so T is a multiple of it (10 did
best of 0.5-30 on the density table alone). Labels come from arrivals,
not from the cache's decisions, so the table is learned off-policy and needs no exploration.

:class:`ExpertSelector` is the loop: it replays the same log through one shadow cache per
candidate table (the learned density table, decayed counts at each ``tau`` of
:class:`EvictionConfig`, and a rate table per hazard, its prior refitted and its hit-density
horizon reset from its own evictions every period),
scores each by the proxy cost it saved (an exponentially weighted
sum over periods), and every ``update_every`` requests hands the best one to the real cache.
Before the first selection the real cache runs on the rule (decayed counts, ``start_tau_s``).
Nothing reads the future: a table used at request ``i`` comes from requests ``< i``.

Why several candidates and not one table: on the traces of :mod:`.workloads` the density
table wins where popularity depends on age and context (``latest``, ``sessions``) and loses
by 2 to 4 points of the bound to plain decayed counts where popularity is stationary or
drifts slowly (``zipf``, ``neardup``; the table's class averages are coarser than a key's
own count). The shadows cost CPU in the learner, not on the hot path, which applies one
table.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streams.policy.context import Context, ContextTracker
from streams.policy.policies import AdmissionPolicy, CacheState
from streams.policy.simulator import CacheSimulator, Decision, L2Model, Meter, SimResult
from streams.policy.trace import Request

__all__ = [
    "AGE_EDGES_S",
    "EvictingCache",
    "EvictionConfig",
    "EvictionRun",
    "EvictionTable",
    "ExpertSelector",
    "KeyStats",
    "replay_learned_eviction",
]

AGE_EDGES_S: tuple[float, ...] = tuple(round(0.1 * 1.8**i, 4) for i in range(15))
# powers of 2 (were 1, 4, .., 256: ``latest``, whose keys cool with age, gained 0.1-0.4 point)
LIFE_EDGES_S: tuple[float, ...] = tuple(2.0**i for i in range(10))
COUNT_EDGES: tuple[float, ...] = (2.0, 3.0, 5.0, 9.0, 17.0, 33.0)
FILTER_KINDS = {"none": 0, "tag": 1, "range": 2, "user": 3}  # anything else: 4
_AGE_LO = np.array((0.0, *AGE_EDGES_S))
_N_F, _N_X, _N_L, _N_A = len(COUNT_EDGES) + 1, 5, len(LIFE_EDGES_S) + 1, len(AGE_EDGES_S) + 1


RATE_TAU_S = 1e9  # a count "decayed" with this is the key's total count (about 32 years)


def rate_alive(
    count: float, idle_s: float, life_s: float, a: float, b: float, hazard_per_s: float
) -> float:
    """A key's expected requests per second now: its rate while alive times the chance it
    is still alive (the ``rate`` table; module docstring).

    Rate: the Gamma(``a``, ``b``) posterior mean given ``count - 1`` requests after the
    first in ``life_s`` seconds (the first request only says the key exists). Alive: a
    key dies with ``hazard_per_s`` per second and sends nothing after; ``idle_s`` seconds
    without a request are ``exp(-rate x idle)`` likely if it lives and the odds of an
    unseen death grow with them.
    """
    lam = (max(count - 1.0, 0.0) + a) / (max(life_s, 0.0) + b)
    if hazard_per_s <= 0.0:
        return lam
    q = lam + hazard_per_s
    x = math.exp(-q * max(idle_s, 0.0))
    return lam * x / (x + hazard_per_s / q * (1.0 - x))


def rate_hit_density(
    count: float,
    idle_s: float,
    life_s: float,
    a: float,
    b: float,
    hazard_per_s: float,
    horizon_s: float,
) -> float:
    """Hit density over ``horizon_s`` (T) of a key with the Gamma(alpha, beta) rate
    posterior of :func:`rate_alive` (alpha = count - 1 + a, beta = life + b): expected hits
    within T over expected occupied time (until the hit, at most T),
    ``E[1 - exp(-lam T)] / E[(1 - exp(-lam T)) / lam]``, in closed form
    ``(1 - (beta / (beta + T))**alpha) / (beta / (1 - alpha) x (((beta + T) / beta)**(1 -
    alpha) - 1))`` (``beta x ln(1 + T / beta)`` at alpha = 1). A key dead (the chance from
    ``hazard_per_s``, as in :func:`rate_alive`) is a hit never and occupies all of T.
    As T -> 0 it tends to the posterior mean alpha / beta; for a key seen often it is
    near its rate at any T.
    """
    al = max(count - 1.0, 0.0) + a
    be = max(life_s, 0.0) + b
    log_ratio = math.log1p(horizon_s / be)
    hits = -math.expm1(-al * log_ratio)
    d = 1.0 - al
    occupied = be * (math.expm1(d * log_ratio) / d if abs(d) > 1e-9 else log_ratio)
    if hazard_per_s <= 0.0:
        return hits / occupied
    q = al / be + hazard_per_s
    x = math.exp(-q * max(idle_s, 0.0))
    alive = x / (x + hazard_per_s / q * (1.0 - x))
    return alive * hits / (alive * occupied + (1.0 - alive) * horizon_s)


def fit_rate_prior(counts: np.ndarray, exposures_s: np.ndarray) -> tuple[float, float]:
    """Empirical Bayes: the Gamma(a, b) prior of key rates that makes the keys' counts most
    likely (gamma-Poisson marginal likelihood over a log grid of a and b). ``counts``: each
    key's requests after its first; ``exposures_s``: seconds since its first."""
    from scipy.special import gammaln

    k = np.asarray(counts, dtype=np.float64)
    e = np.maximum(np.asarray(exposures_s, dtype=np.float64), 0.0)
    if len(k) == 0:
        return 0.3, 30.0
    logs = np.log(e[None, :] + _PRIOR_B[:, None])  # [b][key]
    by_k, total = logs @ k, logs.sum(axis=1)
    best, out = -math.inf, (0.3, 30.0)
    for a in _PRIOR_A:
        ll = (gammaln(k + a) - gammaln(a)).sum() + a * len(k) * np.log(_PRIOR_B) - by_k - a * total
        j = int(np.argmax(ll))
        if ll[j] > best:
            best, out = float(ll[j]), (float(a), float(_PRIOR_B[j]))
    return out


_PRIOR_A = np.exp(np.linspace(math.log(0.01), math.log(10.0), 30))
_PRIOR_B = np.exp(np.linspace(math.log(1.0), math.log(3000.0), 30))


def filter_kind(req: Request) -> int:
    """The filter-kind index of a request's context (4: unknown)."""
    f = req.ctx.get("filter", "none")
    return FILTER_KINDS.get(f, 4) if isinstance(f, str) else 4


@dataclass(frozen=True, slots=True)
class EvictionTable:
    """The eviction rank the hot path applies (module docstring). ``kind`` is ``density``
    (``density`` holds ``[f][x][l][a]``) or ``decayed`` (``tau_s`` is used)."""

    version: int
    kind: str
    tau_s: float
    density: tuple[tuple[tuple[tuple[float, ...], ...], ...], ...] = ()
    prior_a: float = 0.0  # ``rate``: Gamma(a, b) prior of a key's request rate (1/s)
    prior_b: float = 0.0
    hazard_per_s: float = 0.0  # ``rate``: the chance per second that a live key dies
    horizon_s: float = 0.0  # ``rate``: T of :func:`rate_hit_density` (0: :func:`rate_alive`)

    @classmethod
    def decayed(cls, tau_s: float, version: int = 0) -> EvictionTable:
        return cls(version, "decayed", tau_s)

    @classmethod
    def rate(
        cls, a: float, b: float, hazard_per_s: float, version: int = 0, horizon_s: float = 0.0
    ) -> EvictionTable:
        return cls(version, "rate", RATE_TAU_S, (), a, b, hazard_per_s, horizon_s)

    @property
    def name(self) -> str:
        if self.kind == "rate":
            return f"rate{self.hazard_per_s:g}"
        return f"{self.kind}{self.tau_s:g}"

    def priority(
        self, size: int, cost: float, count: float, filter_kind: int, idle_s: float, life_s: float
    ) -> float:
        """Expected proxy cost an entry saves per byte-second (``size`` > 0 bytes; for a
        ``decayed`` table up to a constant factor). ``count``: the key's request
        count at its last request, decayed with ``tau_s`` (its own request included);
        ``idle_s``: seconds since that request; ``life_s``: seconds since first seen."""
        if self.kind == "decayed":
            return count * math.exp(-idle_s / self.tau_s) * cost / size
        if self.kind == "rate":
            a, b, h, horizon = self.prior_a, self.prior_b, self.hazard_per_s, self.horizon_s
            if horizon > 0.0:
                return rate_hit_density(count, idle_s, life_s, a, b, h, horizon) * cost / size
            return rate_alive(count, idle_s, life_s, a, b, h) * cost / size
        f = bisect.bisect_right(COUNT_EDGES, count + 1e-9)
        ln = bisect.bisect_right(LIFE_EDGES_S, life_s)
        a = bisect.bisect_right(AGE_EDGES_S, idle_s)
        return self.density[f][filter_kind][ln][a] * cost / size

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "kind": self.kind,
            "tau_s": self.tau_s,
            "age_edges_s": list(AGE_EDGES_S),
            "life_edges_s": list(LIFE_EDGES_S),
            "count_edges": list(COUNT_EDGES),
            "density": [[[list(row) for row in mat] for mat in cube] for cube in self.density],
            **(
                {
                    "prior_a": self.prior_a,
                    "prior_b": self.prior_b,
                    "hazard_per_s": self.hazard_per_s,
                    "horizon_s": self.horizon_s,
                }
                if self.kind == "rate"
                else {}
            ),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> EvictionTable:
        """Inverse of :meth:`to_json`; ``ValueError`` if the kind or the shape is wrong."""
        kind, tau = obj.get("kind"), obj.get("tau_s")
        if (
            kind not in ("density", "decayed", "rate")
            or not isinstance(tau, int | float)
            or (tau <= 0)
        ):
            raise ValueError("kind must be density, decayed or rate, tau_s > 0")
        if kind == "rate":
            a, b, h = (obj.get(f) for f in ("prior_a", "prior_b", "hazard_per_s"))
            t = obj.get("horizon_s", 0.0)  # absent in tables published before it
            nums = [  # a JSON true is not a number here
                float(v) for v in (a, b, h, t)
                if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            ]
            if len(nums) != 4 or not (
                nums[0] > 0 and nums[1] > 0 and nums[2] >= 0 and (nums[3] == 0 or nums[3] >= 1e-6)
            ):
                raise ValueError(
                    "a rate table needs prior_a > 0, prior_b > 0, hazard_per_s >= 0, "
                    "horizon_s 0 or >= 1e-6"
                )
            return cls.rate(
                float(nums[0]),
                float(nums[1]),
                float(nums[2]),
                int(obj.get("version", 0)),
                float(nums[3]),
            )
        dens = obj.get("density", [])
        if kind != "decayed":
            arr = np.asarray(dens, dtype=np.float64)
            if arr.shape != (_N_F, _N_X, _N_L, _N_A) or not np.all(np.isfinite(arr)):
                raise ValueError(f"density must be finite, shape {(_N_F, _N_X, _N_L, _N_A)}")
            dens = _freeze(arr)
        return cls(int(obj.get("version", 0)), kind, float(tau), dens if dens else ())


def _freeze(arr: np.ndarray) -> tuple[tuple[tuple[tuple[float, ...], ...], ...], ...]:
    return tuple(
        tuple(tuple(tuple(float(v) for v in row) for row in mat) for mat in cube) for cube in arr
    )


@dataclass(frozen=True, slots=True)
class EvictionConfig:
    """Knobs of the learned eviction (one set for every workload; see docs/benchmarks.md)."""

    update_every: int = 5_000
    samples: int = 32
    taus_s: tuple[float, ...] = (300.0,)  # the decayed-count candidates (a node keeps 300 s)
    density_taus_s: tuple[float, ...] = (300.0,)  # one density table per count tau
    start_tau_s: float = 300.0  # the table before the first selection (the rule)
    # weight left to older samples at each new table (0.5 until session 5: 0.9 keeps about
    # 10 periods, and ``latest``'s density table gained 0.2-0.4 point of the bound)
    table_decay: float = 0.9
    score_decay: float = 0.5  # weight left to older periods in the expert scores
    prior_weight: float = 2.0  # seconds of pseudo-lifetime at the cell's marginal density
    warmup: int = 2_500  # requests before the density shadows' first table (no pick)
    default_horizon_s: float = 60.0
    horizon_factor: float = 10.0  # T = this x the median idle age of evicted entries
    # the rate candidates: one per hazard (per second), prior fitted from the key counts
    rate_hazards_per_s: tuple[float, ...] = (1e-4, 1e-3, 4e-3)
    rate_fit_keys: int = 20_000  # keys sampled for the prior's fit
    # T of the rate tables' hit density = this x the median idle age at eviction of the
    # shadow's own last 2,000 evictions (0: the posterior mean, :func:`rate_alive`)
    rate_horizon_factor: float = 1.5
    # per-key state kept (KeyCounts, the density learner's counts); past it the least
    # recently requested half is forgotten (a long-running learner stays bounded)
    max_keys: int = 200_000
    seed: int = 0


@dataclass(slots=True)
class KeyStats:
    """Per key (cached or not): last and first request time, counts decayed per tau, and
    the filter kind of its last request (:func:`filter_kind`)."""

    last: float
    first: float
    counts: list[float]
    context: int = 0


class KeyCounts:
    """:class:`KeyStats` of every key seen, updated once per request by :meth:`observe`.

    Several caches replaying the same requests share one (the shadows and the real cache).
    With ``max_keys``, a new key past it makes the least recently requested half be
    forgotten (in place: the caches hold this dict); a forgotten key that comes back starts
    again at count 1, and an entry still cached for it is given the new stats at its next
    hit.
    """

    def __init__(self, taus_s: Sequence[float], max_keys: int | None = None) -> None:
        if max_keys is not None and max_keys < 2:
            raise ValueError("max_keys must be >= 2")
        self.taus = tuple(taus_s)
        self.max_keys = max_keys
        self.stats: dict[str, KeyStats] = {}
        self.forgotten = 0

    def observe(self, req: Request) -> None:
        now = req.time
        context = filter_kind(req)
        s = self.stats.get(req.key)
        if s is None:
            self.stats[req.key] = KeyStats(now, now, [1.0] * len(self.taus), context)
            if self.max_keys is not None and len(self.stats) > self.max_keys:
                self._forget()
            return
        dt = max(now - s.last, 0.0)
        s.counts = [
            c * math.exp(-dt / tau) + 1.0 for c, tau in zip(s.counts, self.taus, strict=True)
        ]
        s.last = now
        s.context = context

    def _forget(self) -> None:
        assert self.max_keys is not None
        stale = heapq.nsmallest(
            len(self.stats) - self.max_keys // 2, self.stats, key=lambda k: self.stats[k].last
        )
        for key in stale:
            del self.stats[key]
        self.forgotten += len(stale)


class _Entry:
    __slots__ = ("cost", "size", "stats")

    def __init__(self, size: int, cost: float, stats: KeyStats) -> None:
        self.size, self.cost, self.stats = size, cost, stats


class EvictingCache(CacheSimulator):
    """A byte-budgeted cache ranked by an :class:`EvictionTable` (sampled eviction).

    Every eviction is logged in ``log.evictions`` as ``(request index, key, idle seconds)``.
    ``table`` may be replaced between requests; the entries need no rebuilding. With a
    shared ``counts`` the owner calls ``counts.observe(req)`` before
    each :meth:`access`; by default the cache keeps its own.
    """

    def __init__(
        self,
        budget_bytes: int,
        table: EvictionTable,
        *,
        taus_s: Sequence[float] = (),
        samples: int = 32,
        seed: int = 0,
        name: str = "learned",
        counts: KeyCounts | None = None,
    ) -> None:
        super().__init__(budget_bytes)
        self.name = name
        self.samples = samples
        self._rng = random.Random(seed)
        self._owns = counts is None
        self.counts = counts or KeyCounts(sorted({*taus_s, table.tau_s}))
        self._stats = self.counts.stats
        self.table = table
        self._keys: list[str] = []
        self._pos: dict[str, int] = {}
        self._entries: dict[str, _Entry] = {}

    @property
    def table(self) -> EvictionTable:
        return self._table

    @table.setter
    def table(self, table: EvictionTable) -> None:
        tau = table.tau_s
        if tau not in self.counts.taus:
            raise ValueError(f"no key counts kept for tau {tau:g} s")
        self._table = table
        self._ci = self.counts.taus.index(tau)

    def holds(self, key: str) -> bool:
        return key in self._entries

    def priority_of(self, key: str, now: float) -> float:
        e = self._entries[key]
        s = e.stats
        return self._table.priority(
            e.size, e.cost, s.counts[self._ci], s.context, now - s.last, now - s.first
        )

    def _lookup(self, index: int, req: Request) -> bool:
        if self._owns:
            self.counts.observe(req)
        e = self._entries.get(req.key)
        if e is None:
            return False
        e.cost = req.cost
        s = self._stats.get(req.key)
        if s is not None and s is not e.stats:  # its key was forgotten and came back
            e.stats = s
        return True

    def _victim(self, now: float) -> tuple[str, float]:
        """The lowest priority among ``samples`` entries drawn at random (with repeats)."""
        keys, entries, rnd, ci = self._keys, self._entries, self._rng.random, self._ci
        n = len(keys)
        victim, low = "", math.inf
        table = self._table
        decayed, rate = table.kind == "decayed", table.kind == "rate"
        tau = table.tau_s
        a, b, h, horizon = table.prior_a, table.prior_b, table.hazard_per_s, table.horizon_s
        for _ in range(min(self.samples, n)):
            key = keys[int(rnd() * n)]
            e = entries[key]
            s = e.stats
            if decayed:  # the decayed form inlined: this loop is the simulator's hot spot
                p = s.counts[ci] * math.exp((s.last - now) / tau) * e.cost / e.size
            elif rate and horizon <= 0.0:  # rate_alive inlined (same arithmetic)
                lam = (max(s.counts[ci] - 1.0, 0.0) + a) / (max(now - s.first, 0.0) + b)
                if h > 0.0:
                    q = lam + h
                    x = math.exp(-q * max(now - s.last, 0.0))
                    lam = lam * x / (x + h / q * (1.0 - x))
                p = lam * e.cost / e.size
            elif rate:  # rate_hit_density inlined (same arithmetic)
                al = max(s.counts[ci] - 1.0, 0.0) + a
                be = max(now - s.first, 0.0) + b
                lr = math.log1p(horizon / be)
                hits = -math.expm1(-al * lr)
                d = 1.0 - al
                occ = be * (math.expm1(d * lr) / d if abs(d) > 1e-9 else lr)
                if h <= 0.0:
                    p = hits / occ * e.cost / e.size
                else:
                    q = al / be + h
                    x = math.exp(-q * max(now - s.last, 0.0))
                    alive = x / (x + h / q * (1.0 - x))
                    p = alive * hits / (alive * occ + (1.0 - alive) * horizon) * e.cost / e.size
            else:
                p = table.priority(
                    e.size, e.cost, s.counts[ci], s.context, now - s.last, now - s.first
                )
            if p < low:
                victim, low = key, p
        return victim, low

    def _on_miss(self, index: int, req: Request) -> Decision:
        now = req.time
        s = self._stats[req.key]
        mine = self._table.priority(
            req.size, req.cost, s.counts[self._ci], s.context, 0.0, now - s.first
        )
        while self.used_bytes + req.size > self.budget_bytes:
            victim, low = self._victim(now)
            if low > mine:
                return Decision("bypass", False, None, 1.0, self._table.name)
            self._evict(index, victim, now)
        self._pos[req.key] = len(self._keys)
        self._keys.append(req.key)
        self._entries[req.key] = _Entry(req.size, req.cost, s)
        self.used_bytes += req.size
        return Decision("admit", True, None, 1.0, self._table.name)

    def _evict(self, index: int, key: str, now: float) -> None:
        i = self._pos.pop(key)
        last = self._keys.pop()
        if last != key:
            self._keys[i] = last
            self._pos[last] = i
        e = self._entries.pop(key)
        self.used_bytes -= e.size
        self.log.evictions.append((index, key, now - e.stats.last))


@dataclass(slots=True)
class _Samples:
    """Training samples not yet labelled: one per request (parallel lists)."""

    t: list[float] = field(default_factory=list)
    f: list[int] = field(default_factory=list)
    x: list[int] = field(default_factory=list)
    life: list[float] = field(default_factory=list)
    gap: list[float] = field(default_factory=list)  # nan until the key's next request


class DensityLearner:
    """Learns the ``density`` table from requests and eviction events (module docstring)."""

    def __init__(self, config: EvictionConfig, tau_s: float) -> None:
        self.config = config
        self.tau_s = tau_s  # the time constant of the key count the table is keyed by
        self.version = 0
        self._hits = np.zeros((_N_F, _N_X, _N_L, _N_A))
        self._life = np.zeros((_N_F, _N_X, _N_L, _N_A))
        self._pending = _Samples()
        self._open: dict[str, int] = {}  # key -> its latest sample (gap unknown)
        self._stats: dict[str, tuple[float, float, float]] = {}  # key -> (count, last, first)
        self._max_keys = config.max_keys
        self._evicted_idle: list[float] = []

    @property
    def horizon_s(self) -> float:
        """T: the median idle age at eviction over the last 2,000 evictions in the log."""
        if not self._evicted_idle:
            return self.config.default_horizon_s
        median = float(np.median(self._evicted_idle[-2000:]))
        return max(self.config.horizon_factor * median, AGE_EDGES_S[0])

    def observe(
        self,
        requests: Sequence[Request],
        evictions: Sequence[tuple[int, str, float]],
        start: int,
        stop: int,
    ) -> None:
        """Read requests ``[start, stop)`` of the log and the evictions logged with them."""
        p = self._pending
        for i in range(start, stop):
            r = requests[i]
            c, last, first = self._stats.get(r.key, (0.0, r.time, r.time))
            c = c * math.exp(-max(r.time - last, 0.0) / self.tau_s) + 1.0
            self._stats[r.key] = (c, r.time, first)
            if len(self._stats) > self._max_keys:  # forget the least recent half
                stats = self._stats
                for key in heapq.nsmallest(
                    len(stats) - self._max_keys // 2, stats, key=lambda k: stats[k][1]
                ):
                    del stats[key]
            j = self._open.get(r.key)
            if j is not None:
                p.gap[j] = r.time - p.t[j]
            self._open[r.key] = len(p.t)
            p.t.append(r.time)
            p.f.append(bisect.bisect_right(COUNT_EDGES, c + 1e-9))
            p.x.append(filter_kind(r))
            p.life.append(r.time - first)
            p.gap.append(math.nan)
        self._evicted_idle.extend(e[2] for e in evictions)
        del self._evicted_idle[:-2000]

    def export(self, now: float) -> EvictionTable:
        """Label what the log has resolved by ``now``, decay the old sums, emit a table."""
        cfg, horizon = self.config, self.horizon_s
        p = self._pending
        t, gap = np.array(p.t), np.array(p.gap)
        known = ~np.isnan(gap)
        done = known | (now - t > _AGE_LO[-1] + horizon)
        self._hits *= cfg.table_decay
        self._life *= cfg.table_decay
        idx = np.nonzero(done)[0]
        if len(idx):
            f, x = np.array(p.f)[idx], np.array(p.x)[idx]
            life0, g = np.array(p.life)[idx], np.where(known, gap, np.inf)[idx]
            for a_bin, age in enumerate(_AGE_LO):
                m = g > age  # the entry would still be idle at this age
                if not m.any():
                    continue
                rem = g[m] - age
                ln = np.searchsorted(LIFE_EDGES_S, life0[m] + age, side="right")
                cell = (f[m], x[m], ln, np.full(int(m.sum()), a_bin))
                np.add.at(self._hits, cell, (rem <= horizon).astype(np.float64))
                np.add.at(self._life, cell, np.minimum(rem, horizon))
        keep = np.nonzero(~done)[0]
        renum = {int(old): new for new, old in enumerate(keep)}
        self._pending = _Samples(
            *(
                [lst[k] for k in keep]
                for lst in (  # type: ignore[arg-type]
                    p.t,
                    p.f,
                    p.x,
                    p.life,
                    p.gap,
                )
            )
        )
        self._open = {k: renum[j] for k, j in self._open.items() if j in renum}
        h_marg = self._hits.sum(axis=2, keepdims=True)
        l_marg = self._life.sum(axis=2, keepdims=True)
        marg = np.where(l_marg > 0, h_marg / np.maximum(l_marg, 1e-12), 0.0)
        w = cfg.prior_weight
        dens = (self._hits + w * marg) / (self._life + w)
        self.version += 1
        return EvictionTable(self.version, "density", self.tau_s, _freeze(dens))


class ExpertSelector:
    """Shadow caches, one per candidate table, and the pick (module docstring)."""

    def __init__(self, budget_bytes: int, config: EvictionConfig) -> None:
        self.config = config
        rate = (RATE_TAU_S,) if config.rate_hazards_per_s else ()
        taus = tuple(sorted({*config.taus_s, *config.density_taus_s, config.start_tau_s, *rate}))
        self.counts = KeyCounts(taus, config.max_keys)
        self._fit_rng = np.random.default_rng(config.seed)
        self.prior: tuple[float, float] | None = None  # the rate prior of the last fit
        self.start = start = EvictionTable.decayed(config.start_tau_s)
        self.learners = [DensityLearner(config, t) for t in config.density_taus_s]
        self.shadows = [
            EvictingCache(
                budget_bytes,
                start,
                counts=self.counts,
                samples=config.samples,
                seed=config.seed + 1 + i,
                name=f"density{lr.tau_s:g}",
            )
            for i, lr in enumerate(self.learners)
        ]
        self.shadows += [
            EvictingCache(
                budget_bytes,
                EvictionTable.decayed(t),
                counts=self.counts,
                samples=config.samples,
                seed=config.seed + 101 + i,
                name=f"decayed{t:g}",
            )
            for i, t in enumerate(config.taus_s)
        ]
        self.rate_shadows = [
            EvictingCache(
                budget_bytes,
                EvictionTable.rate(0.3, 30.0, h),  # until the first fit
                counts=self.counts,
                samples=config.samples,
                seed=config.seed + 201 + i,
                name=f"rate{h:g}",
            )
            for i, h in enumerate(config.rate_hazards_per_s)
        ]
        self.shadows += self.rate_shadows
        self._rate_idle: list[list[float]] = [[] for _ in self.rate_shadows]
        self.scores = [0.0] * len(self.shadows)
        self._period = [0.0] * len(self.shadows)
        self.picks: list[str] = []

    def access(self, index: int, req: Request) -> None:
        """Count ``req`` once in the shared key counts, then replay it in every shadow."""
        self.counts.observe(req)
        for k, sim in enumerate(self.shadows):
            if sim.access(index, req):
                self._period[k] += req.cost

    def update(
        self, requests: Sequence[Request], start: int, stop: int, *, select: bool = True
    ) -> EvictionTable | None:
        """Close the period ``[start, stop)``: learn and rescore; return the table to use
        (``select=False``, the warm-up: learn only, forget the period's scores, None)."""
        for learner, shadow in zip(self.learners, self.shadows, strict=False):
            evictions = shadow.log.evictions
            first = bisect.bisect_left(evictions, start, key=lambda e: e[0])
            learner.observe(requests, evictions[first:], start, stop)
            shadow.table = learner.export(requests[stop - 1].time)
        for idle, shadow in zip(self._rate_idle, self.rate_shadows, strict=True):
            idle.extend(e[2] for e in shadow.log.evictions)
            del idle[:-2000]
        for shadow in self.shadows:  # read once: a caller may restart its request numbering
            shadow.log.evictions.clear()
        if self.rate_shadows:
            self.prior = a, b = self.fit_prior(requests[stop - 1].time)
            hazards = self.config.rate_hazards_per_s
            for shadow, h, idle in zip(self.rate_shadows, hazards, self._rate_idle, strict=True):
                horizon = self.config.rate_horizon_factor * float(np.median(idle)) if idle else 0.0
                shadow.table = EvictionTable.rate(a, b, h, shadow.table.version + 1, horizon)
        if not select:  # the density shadows ran the start rule: their scores mean nothing
            self._period = [0.0] * len(self.shadows)
            return None
        d = self.config.score_decay
        self.scores = [d * s + p for s, p in zip(self.scores, self._period, strict=True)]
        self._period = [0.0] * len(self.shadows)
        best = max(range(len(self.shadows)), key=lambda k: self.scores[k])
        self.picks.append(self.shadows[best].name)
        return self.shadows[best].table

    def fit_prior(self, now: float) -> tuple[float, float]:
        """The rate prior fitted (:func:`fit_rate_prior`) on a sample of the keys seen."""
        ri = self.counts.taus.index(RATE_TAU_S)
        stats = list(self.counts.stats.values())
        if len(stats) > self.config.rate_fit_keys:
            pick = self._fit_rng.choice(len(stats), self.config.rate_fit_keys, replace=False)
            stats = [stats[int(j)] for j in pick]
        k = np.array([s.counts[ri] - 1.0 for s in stats])
        e = np.array([now - s.first for s in stats])
        return fit_rate_prior(k, e)


@dataclass(frozen=True, slots=True)
class EvictionRun:
    """The learned eviction's replay: its result, the last table and the picks per period."""

    result: SimResult
    table: EvictionTable
    picks: tuple[str, ...]


def period_ends(n: int, update_every: int, warmup: int) -> list[int]:
    """Where an online replay of ``n`` requests stops to learn: every ``update_every``
    requests, at the end, and once at ``warmup`` when it comes before the first period."""
    return sorted(
        {
            *range(update_every, n, update_every),
            n,
            *((warmup,) if 0 < warmup < min(update_every, n) else ()),
        }
    )


def replay_learned_eviction(
    requests: Sequence[Request],
    budget_bytes: int,
    config: EvictionConfig | None = None,
    progress: Callable[[int], None] | None = None,
    *,
    l2: L2Model | None = None,
) -> EvictionRun:
    """Replay ``requests`` through the learned eviction, learning online from the log.

    The real cache starts on the rule (decayed counts, ``start_tau_s``); after ``warmup``
    requests the density shadows get their first table (nothing is picked: they ran the
    rule until then); every ``update_every`` requests the selector learns from the log so
    far and hands the real cache the best-scoring table for the next period.
    """
    cfg = config or EvictionConfig()
    selector = ExpertSelector(budget_bytes, cfg)
    cache = EvictingCache(
        budget_bytes,
        EvictionTable.decayed(cfg.start_tau_s),
        counts=selector.counts,
        samples=cfg.samples,
        seed=cfg.seed,
    )
    cache.l2 = l2
    meter = Meter()
    n = len(requests)
    ends = period_ends(n, cfg.update_every, cfg.warmup)
    start = 0
    for stop in ends:
        for i in range(start, stop):
            req = requests[i]
            selector.access(i, req)
            meter.record(req, cache.access(i, req), cache.used_bytes)
        if progress is not None:
            progress(stop - start)
        if stop < n:
            table = selector.update(requests, start, stop, select=stop != cfg.warmup)
            if table is not None:
                cache.table = table
        start = stop
    return EvictionRun(meter.result(cache), cache.table, tuple(selector.picks))


class BanditEvictingCache(EvictingCache):
    """The learned policy with the bandit in front: admission and idle TTL from an
    :class:`~streams.policy.policies.AdmissionPolicy` (the VW table,
    :class:`~streams.policy.learned.TablePolicy`), eviction by the learned rank.

    A miss goes first to the admission policy (it sees the same :class:`Context` and
    :class:`CacheState` as in :class:`~streams.policy.policies.ControlledCache`); if it
    admits, the sampled eviction makes room, and with ``rank_admission`` a miss ranked below
    the victim is still bypassed (logged as a bypass in the bandit's bucket, probability 1).
    An admitted entry not hit for its TTL expires (not logged as an eviction: the join
    knows the TTL).
    """

    def __init__(
        self,
        budget_bytes: int,
        table: EvictionTable,
        policy: AdmissionPolicy,
        *,
        counts: KeyCounts,
        samples: int = 32,
        seed: int = 0,
        rank_admission: bool = True,
        price_window_s: float = 60.0,
        name: str = "learned",
    ) -> None:
        super().__init__(budget_bytes, table, counts=counts, samples=samples, seed=seed, name=name)
        self.policy = policy
        self.rank_admission = rank_admission
        self.tracker = ContextTracker()
        self._window = price_window_s
        self._saved = 0.0
        self._t = 0.0
        self._ctx: Context | None = None
        self._ttl: dict[str, tuple[float, float]] = {}  # key -> (ttl, expires)
        self._expiry: list[tuple[float, str]] = []

    def _lookup(self, index: int, req: Request) -> bool:
        now = req.time
        if now > self._t:
            self._saved *= math.exp(-(now - self._t) / self._window)
            self._t = now
        while self._expiry and self._expiry[0][0] <= now:
            expires, key = heapq.heappop(self._expiry)
            held = self._ttl.get(key)
            if held is not None and held[1] == expires:
                self._drop(key)
        self._ctx = self.tracker.observe(req)
        hit = super()._lookup(index, req)
        if hit:
            self._saved += req.cost
            held = self._ttl.get(req.key)
            if held is not None:
                self._ttl[req.key] = (held[0], now + held[0])
                heapq.heappush(self._expiry, (now + held[0], req.key))
        return hit

    def _drop(self, key: str) -> None:
        i = self._pos.pop(key)
        last = self._keys.pop()
        if last != key:
            self._keys[i] = last
            self._pos[last] = i
        self.used_bytes -= self._entries.pop(key).size
        self._ttl.pop(key, None)

    def _evict(self, index: int, key: str, now: float) -> None:
        super()._evict(index, key, now)
        self._ttl.pop(key, None)

    def _on_miss(self, index: int, req: Request) -> Decision:
        now = req.time
        state = CacheState(
            now, self.used_bytes, self.budget_bytes, self._saved / self._window / self.budget_bytes
        )
        assert self._ctx is not None
        decision = self.policy.decide(index, req, self._ctx, state)
        if not decision.admitted:
            return decision
        s = self._stats[req.key]
        mine = self._table.priority(
            req.size, req.cost, s.counts[self._ci], s.context, 0.0, now - s.first
        )
        while self.used_bytes + req.size > self.budget_bytes:
            victim, low = self._victim(now)
            if self.rank_admission and low > mine:
                return Decision("bypass", False, None, 1.0, decision.bucket)
            self._evict(index, victim, now)
        self._pos[req.key] = len(self._keys)
        self._keys.append(req.key)
        self._entries[req.key] = _Entry(req.size, req.cost, s)
        self.used_bytes += req.size
        if decision.ttl_s is not None:
            self._ttl[req.key] = (decision.ttl_s, now + decision.ttl_s)
            heapq.heappush(self._expiry, (now + decision.ttl_s, req.key))
        return decision
