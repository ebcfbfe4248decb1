"""The doorkeeper: cache a result on its query's second miss, not its first.

Most misses of real traffic are compulsory: the query is never asked again, and building
its cache entry (the entry's columns, the admission decision, the put with its race check
and invalidation index, the L1/L2 links) is pure cost on the search thread. TinyLFU's
doorkeeper and CDNs' "cache on second request" skip that work: the first miss of a key
only records the key's hash here; a miss of a key recorded within the window builds and
offers the entry as before. The price is one more miss for a repeated query (its first
hit comes on its third request instead of its second); docs/benchmarks.md ("Miss path,
session 3 (helper E)") measures both sides.

The window is two generations of hashes, each at most ``capacity // 2`` keys: when the
new one fills, it becomes the old one and the old one is dropped, so memory is bounded
(about 100 bytes a key) and a key stays known for between ``capacity // 2`` and
``capacity`` later first misses. A key is known while it is in either generation; a known
key seen again is copied into the new generation (it stays known while it keeps
repeating). Hashes, not keys: two keys with the same 64-bit hash only let the second be
offered one miss early, which is harmless (the put's checks still run).

Guarantees are unchanged: the doorkeeper only decides *whether* a miss offers its result;
what is offered goes through the same admission, race check, budgets and invalidation.
A first miss offers nothing, so the query log records no admission decision for it (its
``decision`` is ``"first-seen"``; the policy is not consulted).

Threads: set operations are atomic under the GIL; two searches that fill the new
generation at once may rotate twice, which forgets some keys early (they are offered one
miss later), never offers a key that was not seen. No lock on the hot path.
"""

from __future__ import annotations

__all__ = ["FIRST_SEEN", "Doorkeeper"]

FIRST_SEEN = "first-seen"  # the search's debug ``decision`` for a miss the doorkeeper held


class Doorkeeper:
    """Recently missed keys' hashes (module docstring). ``capacity``: keys remembered,
    at least 2."""

    __slots__ = ("_half", "_new", "_old", "capacity", "first_seen", "seen_before")

    def __init__(self, capacity: int = 65_536) -> None:
        if capacity < 2:
            raise ValueError("capacity must be at least 2")
        self.capacity = capacity
        self._half = capacity // 2
        self._new: set[int] = set()
        self._old: set[int] = set()
        self.first_seen = 0  # misses held (nothing offered)
        self.seen_before = 0  # misses let through (offered)

    def admit(self, key: object) -> bool:
        """Record a miss of ``key``: True when it missed within the window before (offer
        its result), False on its first miss (offer nothing)."""
        h = hash(key)
        new = self._new
        if h in new:
            self.seen_before += 1
            return True
        known = h in self._old
        new.add(h)
        if len(new) >= self._half:
            self._old, self._new = new, set()
        if known:
            self.seen_before += 1
        else:
            self.first_seen += 1
        return known

    def __contains__(self, key: object) -> bool:
        h = hash(key)
        return h in self._new or h in self._old

    def __len__(self) -> int:
        return len(self._new) + len(self._old)

    def clear(self) -> None:
        self._new, self._old = set(), set()

    def stats(self) -> dict[str, int]:
        return {
            "capacity": self.capacity,
            "keys": len(self),
            "first_seen": self.first_seen,
            "seen_before": self.seen_before,
        }
