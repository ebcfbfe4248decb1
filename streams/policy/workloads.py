"""Seeded synthetic request traces for the cache-policy simulator.

Four families, each a known shape of vector-search traffic:

``zipf``
    Zipf(alpha) popularity over a catalogue whose hot set drifts: every ``drift_every``
    requests a fraction of the ranks is handed to brand-new keys (news, new products).
``latest``
    YCSB's ``latest`` distribution: a share of requests asks for a newly born key; the rest
    pick ``newest - Zipf`` so that recent keys are the popular ones.
``sessions``
    Users follow short query chains (templates with Zipf popularity, 3-8 steps), interleaved
    across concurrent sessions; a share of the steps are personal queries (filtered on the
    user) that nobody repeats.
``neardup``
    Queries fall in clusters (Zipf over clusters); inside a cluster a few near-duplicate
    variants repeat with geometric popularity and a share are fresh paraphrases seen once.

Sizes and proxy costs come from one model of a search result (:func:`key_profiles`): ``k``
from {5, 10, 20, 50, 100}; the result holds ``k`` ids, scores and a log-normal payload; the
proxy cost (ms of index time) is log-normal and grows with ``k`` and with filtering (tag <
range < user filters, which widen the search). Every generator is a pure function of its
arguments: the same seed gives the same trace, request for request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from streams.policy.trace import Feature, Request

__all__ = [
    "WORKLOADS",
    "KeyProfiles",
    "generate",
    "key_profiles",
    "latest",
    "neardup",
    "sessions",
    "zipf_drift",
]

_K = np.array([5, 10, 20, 50, 100])
_K_P = np.array([0.15, 0.45, 0.2, 0.12, 0.08])
_FILTERS = ("none", "tag", "range", "user")
_FILTER_P = np.array([0.6, 0.25, 0.15, 0.0])
_FILTER_COST = np.array([1.0, 1.8, 2.5, 3.0])
_RATE_PER_S = 200.0  # mean request rate of every generated trace


@dataclass(frozen=True, slots=True)
class KeyProfiles:
    """Per-key attributes, indexed by key number: result ``k``, filter kind, size, cost."""

    k: npt.NDArray[np.int64]
    filt: npt.NDArray[np.int64]
    size: npt.NDArray[np.int64]
    cost: npt.NDArray[np.float64]


def key_profiles(rng: np.random.Generator, n: int, *, user_filtered: float = 0.0) -> KeyProfiles:
    """Draw ``n`` key profiles; ``user_filtered`` is the share filtered on a user id.

    size = 96 B header + k x (12 B id/score + payload), payload ~ LogNormal(median 160 B);
    cost = LogNormal(median 1.5 ms) x (1 + k/40) x filter factor (1, 1.8, 2.5, 3.0).
    """
    k = rng.choice(_K, size=n, p=_K_P)
    p = _FILTER_P * (1.0 - user_filtered)
    p[3] = user_filtered
    filt = rng.choice(len(_FILTERS), size=n, p=p / p.sum())
    payload = rng.lognormal(np.log(160.0), 0.6, size=n)
    size = (96 + k * (12 + payload)).astype(np.int64)
    cost = rng.lognormal(np.log(1.5), 0.5, size=n) * (1 + k / 40) * _FILTER_COST[filt]
    return KeyProfiles(k.astype(np.int64), filt.astype(np.int64), size, cost)


def _zipf_sampler(
    rng: np.random.Generator, n: int, alpha: float
) -> Callable[[int], npt.NDArray[np.int64]]:
    """Ranks in [0, n) with P(rank r) proportional to (r + 1) ** -alpha."""
    cdf = np.cumsum(np.arange(1, n + 1, dtype=np.float64) ** -alpha)
    cdf /= cdf[-1]

    def draw(m: int) -> npt.NDArray[np.int64]:
        ranks = np.searchsorted(cdf, rng.random(m), side="right")
        return np.minimum(ranks, n - 1).astype(np.int64)

    return draw


def _times(rng: np.random.Generator, n: int) -> npt.NDArray[np.float64]:
    return np.cumsum(rng.exponential(1.0 / _RATE_PER_S, size=n))


def _build(
    rng: np.random.Generator,
    times: npt.NDArray[np.float64],
    keys: list[str],
    prof_ids: npt.NDArray[np.int64],
    prof: KeyProfiles,
    extra: list[dict[str, Feature]] | None = None,
) -> list[Request]:
    jitter = rng.lognormal(0.0, 0.1, size=len(keys))
    out: list[Request] = []
    for i, key in enumerate(keys):
        p = int(prof_ids[i])
        ctx: dict[str, Feature] = {"k": int(prof.k[p]), "filter": _FILTERS[int(prof.filt[p])]}
        if extra is not None:
            ctx.update(extra[i])
        out.append(
            Request(
                round(float(times[i]), 6),
                key,
                int(prof.size[p]),
                round(float(prof.cost[p] * jitter[i]), 4),
                ctx,
            )
        )
    return out


def zipf_drift(
    n: int,
    seed: int,
    *,
    n_keys: int = 20_000,
    alpha: float = 0.9,
    drift_every: int = 5_000,
    drift_frac: float = 0.1,
) -> list[Request]:
    """Zipf(``alpha``) over ``n_keys`` ranks; every ``drift_every`` requests ``drift_frac`` of
    the ranks (chosen uniformly) move to keys never seen before."""
    rng = np.random.default_rng([seed, 1])
    draw = _zipf_sampler(rng, n_keys, alpha)
    owner = rng.permutation(n_keys).astype(np.int64)  # rank -> key number
    next_key = n_keys
    ids = np.empty(n, dtype=np.int64)
    for start in range(0, n, drift_every):
        m = min(drift_every, n - start)
        ids[start : start + m] = owner[draw(m)]
        moved = rng.choice(n_keys, size=int(n_keys * drift_frac), replace=False)
        owner[moved] = np.arange(next_key, next_key + len(moved))
        next_key += len(moved)
    prof = key_profiles(rng, next_key)
    return _build(rng, _times(rng, n), [f"z{i}" for i in ids], ids, prof)


def latest(n: int, seed: int, *, p_new: float = 0.05, alpha: float = 0.99) -> list[Request]:
    """YCSB ``latest``: with probability ``p_new`` a request asks for a newly born key,
    otherwise for ``newest - r`` with r ~ Zipf(``alpha``) (folded into the keys born so far)."""
    rng = np.random.default_rng([seed, 2])
    born = rng.random(n) < p_new
    ranks = _zipf_sampler(rng, n, alpha)(n)
    ids = np.empty(n, dtype=np.int64)
    newest = 99  # a first batch of 100 keys exists before the trace starts
    for i in range(n):
        if born[i]:
            newest += 1
            ids[i] = newest
        else:
            ids[i] = newest - int(ranks[i]) % (newest + 1)
    prof = key_profiles(rng, newest + 1)
    return _build(rng, _times(rng, n), [f"l{i}" for i in ids], ids, prof)


def sessions(
    n: int,
    seed: int,
    *,
    n_chains: int = 3_000,
    alpha: float = 1.0,
    concurrent: int = 64,
    p_personal: float = 0.3,
) -> list[Request]:
    """Interleaved user sessions. A session follows one chain (Zipf(``alpha``) over
    ``n_chains`` templates of 3-8 steps); at each step, with probability ``p_personal``, the
    user sends a personal (user-filtered) query instead, which is never repeated."""
    rng = np.random.default_rng([seed, 3])
    lengths = rng.integers(3, 9, size=n_chains)
    pick_chain = _zipf_sampler(rng, n_chains, alpha)
    chain_prof = key_profiles(rng, int(lengths.sum()))
    personal_prof = key_profiles(rng, n, user_filtered=1.0)
    offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    active = [[int(c), 0] for c in pick_chain(concurrent)]
    slot = rng.integers(0, concurrent, size=n)
    personal = rng.random(n) < p_personal
    keys: list[str] = []
    pids = np.empty(n, dtype=np.int64)
    extra: list[dict[str, Feature]] = []
    personal_ids: list[int] = []
    for i in range(n):
        sess = active[int(slot[i])]
        chain, step = sess
        extra.append({"session_step": step})
        if personal[i]:
            keys.append(f"u{i}")
            pids[i] = len(chain_prof.k) + len(personal_ids)
            personal_ids.append(i)
        else:
            keys.append(f"s{chain}.{step}")
            pids[i] = offsets[chain] + step
        sess[1] += 1
        if sess[1] >= lengths[chain]:
            sess[0], sess[1] = int(pick_chain(1)[0]), 0
    prof = KeyProfiles(
        np.concatenate((chain_prof.k, personal_prof.k[: len(personal_ids)])),
        np.concatenate((chain_prof.filt, personal_prof.filt[: len(personal_ids)])),
        np.concatenate((chain_prof.size, personal_prof.size[: len(personal_ids)])),
        np.concatenate((chain_prof.cost, personal_prof.cost[: len(personal_ids)])),
    )
    return _build(rng, _times(rng, n), keys, pids, prof, extra)


def neardup(
    n: int,
    seed: int,
    *,
    n_clusters: int = 5_000,
    alpha: float = 0.8,
    variants: int = 8,
    p_fresh: float = 0.25,
) -> list[Request]:
    """Near-duplicate queries: cluster ~ Zipf(``alpha``); variant ~ Geometric(1/2) capped at
    ``variants``; with probability ``p_fresh`` a fresh paraphrase (a key seen once). Variants
    of one cluster share ``k``, filter, size and cost (same query, slightly different words)."""
    rng = np.random.default_rng([seed, 4])
    clusters = _zipf_sampler(rng, n_clusters, alpha)(n)
    cluster_of = rng.permutation(n_clusters)  # rank -> cluster id, so ids carry no rank
    variant = np.minimum(rng.geometric(0.5, size=n) - 1, variants - 1)
    fresh = rng.random(n) < p_fresh
    prof = key_profiles(rng, n_clusters)
    keys: list[str] = []
    extra: list[dict[str, Feature]] = []
    pids = np.empty(n, dtype=np.int64)
    for i in range(n):
        c = int(cluster_of[clusters[i]])
        pids[i] = c
        keys.append(f"n{c}.x{i}" if fresh[i] else f"n{c}.{variant[i]}")
        extra.append({"cluster": f"c{c}"})
    return _build(rng, _times(rng, n), keys, pids, prof, extra)


WORKLOADS: dict[str, Callable[[int, int], list[Request]]] = {
    "zipf": zipf_drift,
    "latest": latest,
    "sessions": sessions,
    "neardup": neardup,
}


def generate(name: str, n: int, seed: int = 0) -> list[Request]:
    """The ``n``-request trace of workload ``name`` (one of :data:`WORKLOADS`) for ``seed``."""
    try:
        make = WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; one of {sorted(WORKLOADS)}") from None
    return make(n, seed)
