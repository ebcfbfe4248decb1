"""``CapacityManager``: keeps each index inside its budget (``IndexConfig.quotas``).

It plugs into a :class:`VectorService` at three points: the write path's admission
(``service.admission``), the hits searches return (``service.hit_observers``, which make
vectors warm and promote temporaries) and ``VEC.INFO`` (``service.info_sections``).

One :meth:`tick` per index, in this order (thresholds in ``budget.py``; the level is the
utilisation when the tick starts, so an index at 96 % gets steps 3, 4 and 5):

1. promote: a temporary (``ttl_ms``) that a search has hit is re-written without its TTL;
2. expire: a temporary past its TTL is deleted;
3. at >= 80 %: near-duplicates collapse: the representative (most important, then oldest)
   is re-written with ``meta.members`` listing them, then each member is archived;
4. at >= 90 %: temporaries no search has hit are expired early;
5. at >= 95 %: the coldest, least important vectors are archived until the utilisation is
   at most ``archive_target``: first those no search hit within ``warm_window_ms``, least
   important first, then least recently hit;
6. admission: at >= 95 % new ids are refused with ``VEC_ERR_QUOTA`` (updates of existing
   ids and restores are accepted); over 100 % every write that grows the index is.

Guarantees: every removal is a log record (a delete on ``vectors``, after a copy on
``archive`` where the vector is archived) and every action is an AuditEvent on ``audit``
naming the ids, appended after the action is durable. Nothing acknowledged is deleted
without one: only temporaries expire (their writer asked for a TTL); everything else the
manager removes is archived and can be restored with :meth:`restore`.

Cost: a tick reads only the temporaries' expiry keys, unless the index has a budget and is
at >= 80 % or was last counted ``full_scan_interval_s`` ago: then it scans the index's state
(O(n) reads, the applier paused meanwhile). Between scans, usage is the last scan plus the
new ids admitted since, raised to the vector index's live count (records that other
producers or the embedder processor appended).

Limits: the duplicate pass compares all pairs up to ``compress_limit`` vectors, above that
it asks the index for the neighbours of the first ``compress_limit``; "cold" means not hit
since this node started (hits are counted in memory). Writes produced straight to
``vectors`` bypass admission. Deletes go through
:meth:`VectorService.delete_unchanged` and re-writes (promote, compress) through
:meth:`VectorService.rewrite_unchanged`: under the service's per-id locks an id is deleted
or re-written only if its newest write is still the copy scanned (the same position, not
just the same version), so an acknowledged write racing an archive or expiry keeps its id
(the archive then holds the older copy too; restoring it is refused while the id exists)
and one racing a promotion is not followed by the older copy. "Newest write" covers the
service's own writes and the embedder processor's chunks (appended through
:meth:`VectorService.append_versioned`), applied or not; anything else (a previous run's
writes a restarted node is replaying, a producer appending straight to ``vectors``, a
processor in another process) only once the node has applied it, so a tick does nothing
unless the node has applied what was appended before it (within ``catch_up_timeout_s``):
only such a write appended during the tick can still race it. A re-written Source chunk
keeps its version (its Source's).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streams.capacity.archive import Archive, AuditLog
from streams.capacity.budget import (
    Level,
    Thresholds,
    Usage,
    importance_of,
    is_text_only,
    meta_dict,
    record_bytes,
)
from streams.capacity.duplicates import duplicate_groups
from streams.capacity.ledger import Ledger, Row
from streams.index.exceptions import (
    Busy,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    VersionConflict,
)
from streams.index.model import IndexConfig, VectorUpsert, check_name
from streams.log.port import LogPosition, now_ms
from streams.service.state import Entry
from streams.service.vector_service import VectorService

__all__ = ["CapacityAction", "CapacityManager"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CapacityAction:
    """One thing the manager did to one index (also an AuditEvent ``capacity.<op>``)."""

    index: str
    operation: str  # promote, expire, compress, archive, tighten, relax, restore
    ids: tuple[str, ...]
    reason: str
    utilisation: float  # when the action was decided
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "operation": self.operation,
            "ids": list(self.ids),
            "reason": self.reason,
            "utilisation": round(self.utilisation, 4),
            **self.details,
        }


class CapacityManager:
    """Budgets of every index of ``service``; registers itself on the service."""

    def __init__(
        self,
        service: VectorService,
        *,
        thresholds: Thresholds | None = None,
        actor: str = "capacity-manager",
        compress_limit: int = 5000,
        rescan_interval_s: float = 0.5,
        warm_window_ms: int = 3_600_000,
        max_pending: int = 100_000,
        full_scan_interval_s: float = 60.0,
        catch_up_timeout_s: float = 10.0,
    ) -> None:
        self.service = service
        self.thresholds = thresholds or Thresholds()
        self.archive = Archive(service.log, service.topics, service.codec)
        self.audit = AuditLog(service.log, service.topics, service.codec, actor)
        self.compress_limit = compress_limit
        self.rescan_interval_s = rescan_interval_s
        self.warm_window_ms = warm_window_ms
        self.max_pending = max_pending
        self.full_scan_interval_s = full_scan_interval_s
        self.catch_up_timeout_s = catch_up_timeout_s  # tick: how long to wait for the node
        self.ticks_skipped = 0  # ticks that found the node behind (VEC.INFO capacity)
        # _lock guards the ledgers (short sections, never around a write to the log);
        # _tick_lock runs one tick at a time
        self._lock = threading.RLock()
        self._tick_lock = threading.Lock()
        self._ledgers: dict[str, Ledger] = {}
        self._last_hit: dict[tuple[str, str], int] = {}
        self._local = threading.local()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        service.admission = self
        service.hit_observers.append(self.observe_hits)
        service.info_sections["capacity"] = self.info

    # -- admission (VectorService.admission) ------------------------------------------
    def check(self, config: IndexConfig, record: VectorUpsert, *, is_new: bool) -> None:
        if config.quotas is None or not is_new or getattr(self._local, "bypass", False):
            return
        vectors = 0 if is_text_only(record.meta) else 1
        nbytes = record_bytes(config.dim, record.id, record.meta, record.tags, len(record.numeric))
        with self._lock:
            ledger = self._ledger(config)
            usage = self._estimate(config, ledger)
            util = usage.utilisation(config.quotas)
            after = usage.plus(vectors, nbytes).utilisation(config.quotas)
            if (util >= self.thresholds.archive or after > 1.0) and (
                time.monotonic() - ledger.scanned_s >= self.rescan_interval_s
            ):
                self._rescan(config, ledger)  # confirm with an exact count before refusing
                usage = self._estimate(config, ledger)
                util = usage.utilisation(config.quotas)
                after = usage.plus(vectors, nbytes).utilisation(config.quotas)
            if util >= self.thresholds.archive and not ledger.tightened:
                ledger.tightened = True
                self._record(
                    config,
                    ledger,
                    CapacityAction(
                        config.key,
                        "tighten",
                        (),
                        f"utilisation >= {self.thresholds.archive:.0%}: new ids refused",
                        util,
                    ),
                )
            if after > 1.0:
                ledger.refused += 1
                raise QuotaExceeded(
                    f"index {config.key} is full: {_describe(usage, config)}; this write "
                    f"would exceed the budget (archive or delete vectors, or raise the "
                    f"quota)",
                    retry_after_s=1.0,
                )
            if util >= self.thresholds.archive:
                ledger.refused += 1
                raise QuotaExceeded(
                    f"index {config.key} is at {util:.1%} of its budget "
                    f"({_describe(usage, config)}): at {self.thresholds.archive:.0%} new "
                    f"vectors are refused until the capacity manager frees room; updates "
                    f"of existing ids and restores are accepted",
                    retry_after_s=1.0,
                )

    def appended(
        self, config: IndexConfig, record: VectorUpsert, pos: LogPosition, *, is_new: bool
    ) -> None:
        if config.quotas is None or not is_new:
            return
        nbytes = record_bytes(config.dim, record.id, record.meta, record.tags, len(record.numeric))
        with self._lock:
            ledger = self._ledger(config)
            ledger.add_pending(pos, 0 if is_text_only(record.meta) else 1, nbytes)
            if len(ledger.pending) >= self.max_pending:  # no tick for long: count afresh
                self._rescan(config, ledger)

    # -- hits (VectorService.hit_observers) ------------------------------------------
    def observe_hits(self, index_key: str, hits: list[Any]) -> None:
        now = now_ms()
        for hit in hits:
            self._last_hit[(index_key, hit.id)] = now

    # -- state -------------------------------------------------------------------------
    def _ledger(self, config: IndexConfig) -> Ledger:
        """The index's ledger; counted by a first scan if the index has a budget."""
        ledger = self._ledgers.get(config.key)
        if ledger is None:
            ledger = self._ledgers[config.key] = Ledger()
            if config.quotas is not None:
                self._rescan(config, ledger)
        return ledger

    def _estimate(self, config: IndexConfig, ledger: Ledger) -> Usage:
        """The ledger's usage, raised to the vector index's live count where that is
        larger: records appended without this node's admission (other producers, the
        embedder processor) are in the index before the next scan counts them (their
        bytes estimated at the scanned average)."""
        usage = ledger.estimate()
        vi = self.service.indexer.indexes.get(config.key)
        live = len(vi) if vi is not None else 0
        if live > usage.vectors:
            scanned = ledger.scanned
            per = scanned.bytes / scanned.vectors if scanned.vectors else 4 * config.dim
            usage = Usage(live, usage.bytes + int(per * (live - usage.vectors)))
        return usage

    def _temporaries(self, config: IndexConfig) -> list[Row]:
        """The index's temporary vectors, from the state's expiry keys."""
        rows = []
        for id, _ in self.service.state.temporaries(config.key):
            entry = self.service.state.entry(config.key, id)
            if entry is not None:
                nbytes = record_bytes(config.dim, id, entry.meta, entry.tags, len(entry.numeric))
                rows.append(
                    Row(id, entry, importance_of(entry.meta), is_text_only(entry.meta), nbytes)
                )
        return rows

    def _scan(self, config: IndexConfig) -> tuple[list[Row], dict[tuple[str, int], int]]:
        """Every record of the index in the state, and the applied positions it reflects
        exactly (the applier is paused meanwhile, as for a snapshot)."""
        rows = []
        with self.service.indexer.lock:
            at = self.service.applied.snapshot()
            for id, entry in self.service.state.entries(config.key):
                text_only = is_text_only(entry.meta)
                nbytes = record_bytes(config.dim, id, entry.meta, entry.tags, len(entry.numeric))
                rows.append(Row(id, entry, importance_of(entry.meta), text_only, nbytes))
        return rows, at

    def _rescan(
        self,
        config: IndexConfig,
        ledger: Ledger,
        scan: tuple[list[Row], dict[tuple[str, int], int]] | None = None,
    ) -> None:
        rows, at = scan or self._scan(config)
        ledger.scanned = Usage(sum(r.vectors for r in rows), sum(r.nbytes for r in rows))
        ledger.at = at
        ledger.scanned_s = time.monotonic()
        # keep what the scan may not cover (it covers at least the positions ``at``)
        ledger.set_pending(
            [p for p in ledger.pending if at.get((p[0].topic, p[0].partition), 0) <= p[0].offset]
        )

    def usage(self, tenant: str, index: str) -> Usage:
        """The index's usage as the manager counts it (exact at its last scan, plus the
        new ids admitted since)."""
        config = self._config(tenant, index)
        with self._lock:
            return self._estimate(config, self._ledger(config))

    def utilisation(self, config: IndexConfig) -> float:
        """The index's utilisation of its budget (0 without quotas): what
        ``streams.ingest.vectorize`` tightens its decisions on."""
        if config.quotas is None:
            return 0.0
        with self._lock:
            return self._estimate(config, self._ledger(config)).utilisation(config.quotas)

    def _config(self, tenant: str, index: str) -> IndexConfig:
        check_name(tenant, "tenant")
        check_name(index, "index")
        config = self.service.indexer.configs.get(f"{tenant}/{index}")
        if config is None:
            raise NotFound(f"index {tenant}/{index} does not exist")
        return config

    def _record(self, config: IndexConfig, ledger: Ledger, action: CapacityAction) -> None:
        """Append the action's AuditEvent (durable on return) and count it."""
        self.audit.append(
            config.tenant, f"capacity.{action.operation}", config.key, action.as_dict()
        )
        with self._lock:
            ledger.actions[action.operation] += 1
            ledger.recent.append(action.as_dict())
        log.info(
            "capacity %s %s: %s (%d ids)",
            action.operation,
            config.key,
            action.reason,
            len(action.ids),
        )

    @contextmanager
    def _bypass(self) -> Iterator[None]:
        self._local.bypass = True
        try:
            yield
        finally:
            self._local.bypass = False

    # -- the tick ----------------------------------------------------------------------
    def tick(self) -> list[CapacityAction]:
        """Run steps 1-6 of the module docstring on every index; returns what was done
        (each action is on ``audit`` when this returns). Nothing, when the node has not
        applied the ``vectors`` appended before the tick within ``catch_up_timeout_s``
        (a replay after a restart, a stalled applier): the state it would decide on may
        be older than records no bookkeeping of this process knows of (a previous run's
        writes), so the next tick decides instead."""
        if not self._catch_up(self.catch_up_timeout_s):
            self.ticks_skipped += 1
            if self.ticks_skipped & (self.ticks_skipped - 1) == 0:  # 1st, 2nd, 4th, 8th...
                log.warning("capacity tick skipped (%d so far): the node is behind the "
                            "vectors topic", self.ticks_skipped)
            return []
        done: list[CapacityAction] = []
        for config in list(self.service.indexer.configs.values()):
            if config.key in self.service.indexer.indexes:
                done.extend(self.tick_index(config))
        return done

    def _catch_up(self, timeout_s: float = 10.0) -> bool:
        """Wait (bounded) until the node has applied the ``vectors`` written so far, so a
        tick decides on what is really there; whether it has."""
        topic = self.service.topics.vectors
        ends = self.service.log.end_offsets(topic)
        return self.service.applied.wait({(topic, p): end for p, end in ends.items()}, timeout_s)

    def tick_index(self, config: IndexConfig) -> list[CapacityAction]:
        with self._tick_lock:  # one tick at a time; never holds _lock while writing
            with self._lock:
                ledger = self._ledger(config)
                usage = self._estimate(config, ledger)
                level = self.thresholds.level(usage.utilisation(config.quotas))
                full = config.quotas is not None and (
                    level >= Level.COMPRESS
                    or time.monotonic() - ledger.scanned_s >= self.full_scan_interval_s
                )
                if full:  # count exactly, and see every record to choose from
                    rows, at = self._scan(config)
                    self._rescan(config, ledger, (rows, at))
                    usage = self._estimate(config, ledger)
                    level = self.thresholds.level(usage.utilisation(config.quotas))
                    temporaries = [r for r in rows if r.entry.expires_ms is not None]
                else:  # below 80 %: only the temporaries (their own key range)
                    rows = temporaries = self._temporaries(config)
            done: list[CapacityAction] = []
            last: LogPosition | None = None
            live = {r.id: r for r in rows}

            def act(op: str, ids: list[str], reason: str, **details: Any) -> None:
                action = CapacityAction(
                    config.key, op, tuple(ids), reason, usage.utilisation(config.quotas), details
                )
                self._record(config, ledger, action)
                done.append(action)

            def remove(row: Row) -> None:
                nonlocal usage
                live.pop(row.id, None)
                usage = usage.plus(-row.vectors, -row.nbytes)

            # 1. promote hit temporaries
            now = now_ms()
            hit = [r for r in temporaries if (config.key, r.id) in self._last_hit]
            promoted = []
            for r in hit:
                pos = self._rewrite(config, r, meta=_promoted_meta(r.entry.meta))
                if pos is not None:
                    last = pos
                    promoted.append(r.id)
            if promoted:
                act("promote", promoted, "hit by a search while temporary")
            # 2. expire temporaries past their TTL
            due = [
                r
                for r in temporaries
                if r.id not in promoted
                and r.entry.expires_ms is not None
                and r.entry.expires_ms <= now
            ]
            gone, pos = self._delete_many(config, due)
            last = pos or last
            for r in gone:
                remove(r)
            if gone:
                act("expire", [r.id for r in gone], "ttl elapsed")
            # 3. compress near-duplicates
            collapsed: list[tuple[Row, list[Row]]] = []
            if level >= Level.COMPRESS:
                for rep, members in self._duplicate_groups(config, live):
                    pos = self._rewrite(
                        config, rep, meta=_with_members(rep.entry.meta, [m.id for m in members])
                    )
                    if pos is not None:  # the representative lists them before they go
                        last = pos
                        collapsed.append((rep, members))
                reasons = {m.id: f"near-duplicate of {rep.id}" for rep, ms in collapsed for m in ms}
                gone, pos = self._archive_many(
                    config, [m for _, ms in collapsed for m in ms], reasons
                )
                last = pos or last
                gone_ids = {r.id for r in gone}
                for r in gone:
                    remove(r)
                for rep, members in collapsed:
                    ids = [m.id for m in members if m.id in gone_ids]
                    if ids:
                        act("compress", ids, f"near-duplicates of {rep.id}", representative=rep.id)
            # 4. expire unhit temporaries early
            if level >= Level.EXPIRE:
                gone, pos = self._delete_many(
                    config, [r for r in temporaries if r.id in live and r.id not in promoted]
                )
                last = pos or last
                for r in gone:
                    remove(r)
                if gone:
                    act(
                        "expire",
                        [r.id for r in gone],
                        f"utilisation >= {self.thresholds.expire:.0%}: "
                        "temporaries never hit expire early",
                    )
            # 5. archive the coldest, least important, while over the target
            if level >= Level.ARCHIVE:
                warm_since = now - self.warm_window_ms

                def coldness(r: Row) -> tuple[bool, float, int, int]:
                    hit = self._last_hit.get((config.key, r.id), 0)
                    return hit >= warm_since, r.importance, hit, r.entry.label

                rewritten = set(promoted) | {rep.id for rep, _ in collapsed}
                candidates = sorted(
                    (r for r in live.values() if not r.text_only and r.id not in rewritten),
                    key=coldness,
                )
                chosen, after = [], usage
                for r in candidates:
                    if after.utilisation(config.quotas) <= self.thresholds.archive_target:
                        break
                    chosen.append(r)
                    after = after.plus(-r.vectors, -r.nbytes)
                gone, pos = self._archive_many(
                    config, chosen, dict.fromkeys((r.id for r in chosen), "cold, low importance")
                )
                last = pos or last
                for r in gone:
                    remove(r)
                if gone:
                    act(
                        "archive",
                        [r.id for r in gone],
                        f"utilisation >= {self.thresholds.archive:.0%}: "
                        f"coldest, least important archived down to "
                        f"{self.thresholds.archive_target:.0%}",
                    )
            # 6. admission follows the utilisation
            if last is not None:  # let the indexer apply our writes, then count exactly
                self.service.applied.wait({(last.topic, last.partition): last.offset + 1}, 10)
            with self._lock:
                if last is not None and config.quotas is not None:
                    self._rescan(config, ledger)
                    usage = self._estimate(config, ledger)
                util = usage.utilisation(config.quotas)
                relax = ledger.tightened and util < self.thresholds.archive
                tighten = not ledger.tightened and util >= self.thresholds.archive
                ledger.tightened = (ledger.tightened or tighten) and not relax
            if relax:
                act(
                    "relax",
                    [],
                    f"utilisation {util:.1%} < {self.thresholds.archive:.0%}: "
                    "new ids accepted again",
                )
            elif tighten:
                act("tighten", [], f"utilisation >= {self.thresholds.archive:.0%}: new ids refused")
            return done

    def _rewrite(self, config: IndexConfig, row: Row, *, meta: str | None) -> LogPosition | None:
        """Re-write ``row`` without its TTL and with ``meta``, unless it changed since
        the scan (then the next tick sees the new copy)."""
        try:
            return self.service.rewrite_unchanged(
                config.tenant, config.index, row.id, row.entry.position, meta=meta
            )
        except NotFound:  # the index was dropped meanwhile
            return None

    def _unchanged(self, config: IndexConfig, rows: list[Row]) -> list[tuple[Row, Entry]]:
        """The rows whose current copy is still the one scanned (others are left to the
        next tick), with that copy."""
        out = []
        for row in rows:
            current = self.service.state.entry(config.key, row.id)
            if current is not None and current.position == row.entry.position:
                out.append((row, current))
        return out

    def _tombstones(
        self, config: IndexConfig, rows: list[tuple[Row, Entry]]
    ) -> tuple[list[Row], LogPosition | None]:
        """Delete each row whose newest write is still the copy scanned, in one durable
        batch, under the service's per-id locks (a concurrent acknowledged write wins and
        keeps its id); returns the rows deleted and the last position."""
        if not rows:
            return [], None
        gone, pos = self.service.delete_unchanged(
            config.tenant, config.index, {row.id: cur.position for row, cur in rows})
        deleted = set(gone)
        return [row for row, _ in rows if row.id in deleted], pos

    def _delete_many(
        self, config: IndexConfig, rows: list[Row]
    ) -> tuple[list[Row], LogPosition | None]:
        """Delete the unchanged rows; returns them and the last position appended."""
        return self._tombstones(config, self._unchanged(config, rows))

    def _archive_many(
        self, config: IndexConfig, rows: list[Row], reasons: dict[str, str]
    ) -> tuple[list[Row], LogPosition | None]:
        """Copy the unchanged rows to ``archive`` (durable), then delete them from
        ``vectors``; returns them and the last position appended."""
        keep = self._unchanged(config, rows)
        if not keep:
            return [], None
        self.archive.put_many(
            [
                (config.tenant, config.index, row.id, current, reasons[row.id])
                for row, current in keep
            ]
        )  # 1st
        return self._tombstones(config, keep)  # 2nd

    def _duplicate_groups(
        self, config: IndexConfig, live: dict[str, Row]
    ) -> list[tuple[Row, list[Row]]]:
        """Near-duplicates among the non-temporary vectors: (representative, members)."""
        vi = self.service.indexer.indexes.get(config.key)
        if vi is None:
            return []
        rows = [r for r in live.values() if not r.text_only and r.entry.expires_ms is None]

        def neighbours(row: Row) -> list[str]:  # above compress_limit: ask the index
            out = vi.search(row.entry.vector, 4, None)
            found = (self.service.state.hit(config.key, int(lb)) for lb in out.labels.tolist())
            return [f[0] for f in found if f is not None]

        return duplicate_groups(
            rows, self.thresholds.duplicate_similarity, self.compress_limit, neighbours
        )

    # -- restore ----------------------------------------------------------------------
    def restore(self, tenant: str, index: str, ids: list[str]) -> dict[str, LogPosition]:
        """Re-append archived vectors to ``vectors`` (whatever the utilisation), then
        tombstone them in ``archive``. Raises :class:`NotFound` if an id is not in the
        archive, :class:`VersionConflict` if it exists again in the index and
        :class:`Busy` if the node has not applied within ``catch_up_timeout_s`` what was
        appended before the call; nothing is written then (an id written concurrently
        after the check fails alone with VersionConflict, the ids restored before it stay
        restored)."""
        config = self._config(tenant, index)
        ids = list(dict.fromkeys(ids))
        if not ids:
            raise InvalidRequest("no ids to restore", field="ids")
        if not self._catch_up(self.catch_up_timeout_s):  # the state must show every
            raise Busy(  # write appended before this call, or the check below is blind
                "the node is behind the vectors topic: restore again shortly", retry_after_s=1.0)
        archived = self.archive.records(tenant, index)
        missing = [i for i in ids if i not in archived]
        if missing:
            raise NotFound(f"not in the archive of {config.key}: {', '.join(missing)}")
        for id in ids:
            current = self.service.state.entry(config.key, id)
            if current is not None:
                raise VersionConflict(id, 0, current.version)
        out: dict[str, LogPosition] = {}
        for id in ids:
            rec = archived[id]
            vector = np.frombuffer(rec.vector, dtype="<f4").astype(np.float32)
            with self._bypass():
                out[id] = self.service.add(
                    VectorUpsert(
                        tenant,
                        index,
                        id,
                        vector,
                        rec.meta,
                        rec.tags,
                        rec.numeric,
                        ttl_ms=rec.ttl_ms,
                    )
                )
            self.archive.tombstone(tenant, index, id)  # 2nd: after the vector is durable
        with self._lock:  # the restored ids are pending in the ledger (``appended``)
            ledger = self._ledger(config)
            now = now_ms()  # restored vectors count as warm: not the next to archive
            for id in ids:
                self._last_hit[(config.key, id)] = now
            self._record(
                config,
                ledger,
                CapacityAction(
                    config.key,
                    "restore",
                    tuple(ids),
                    "restored from the archive",
                    self._estimate(config, ledger).utilisation(config.quotas),
                    {"positions": [p.token for p in out.values()]},
                ),
            )
        return out

    def archived_ids(self, tenant: str, index: str) -> list[str]:
        self._config(tenant, index)
        return sorted(self.archive.records(tenant, index))

    # -- VEC.INFO ----------------------------------------------------------------------
    def info(self, index_key: str) -> dict[str, Any]:
        config = self.service.indexer.configs.get(index_key)
        if config is None:
            return {"budget": None}
        with self._lock:
            ledger = self._ledgers.get(index_key)
            if ledger is None and config.quotas is None:
                return {"budget": None, "actions": {}}
            ledger = self._ledger(config)
            usage = self._estimate(config, ledger)
            util = usage.utilisation(config.quotas)
            q = config.quotas
            return {
                "budget": None
                if q is None
                else {"max_vectors": q.max_vectors, "max_bytes": q.max_bytes},
                "usage": {"vectors": usage.vectors, "bytes": usage.bytes},
                "utilisation": round(util, 4),
                "level": self.thresholds.level(util).name.lower(),
                "admission": "tightened" if ledger.tightened else "open",
                "thresholds": {
                    "compress": self.thresholds.compress,
                    "expire": self.thresholds.expire,
                    "archive": self.thresholds.archive,
                    "archive_target": self.thresholds.archive_target,
                },
                "refused": ledger.refused,
                "ticks_skipped": self.ticks_skipped,  # node-wide: the node was behind
                "actions": dict(ledger.actions),
                "recent": list(ledger.recent),
            }

    # -- background --------------------------------------------------------------------
    def start(self, interval_s: float) -> CapacityManager:
        """Tick every ``interval_s`` in a daemon thread until :meth:`stop`."""

        def run() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.tick()
                except Exception:  # the next tick retries; every done action is logged
                    log.exception("capacity tick failed")

        self._thread = threading.Thread(target=run, name="capacity", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)


def _describe(usage: Usage, config: IndexConfig) -> str:
    q = config.quotas
    parts = []
    if q is not None and q.max_vectors:
        parts.append(f"{usage.vectors}/{q.max_vectors} vectors")
    if q is not None and q.max_bytes:
        parts.append(f"{usage.bytes}/{q.max_bytes} bytes")
    return ", ".join(parts)


def _promoted_meta(meta: str | None) -> str | None:
    d = meta_dict(meta)
    if not d:
        return meta
    vec = d.get("vectorize")
    if isinstance(vec, dict) and vec.get("decision") == "temporary":
        d["vectorize"] = {**vec, "promoted": True}
    return json.dumps(d)


def _with_members(meta: str | None, members: list[str], cap: int = 500) -> str:
    d = meta_dict(meta)
    known = [m for m in d.get("members", []) if isinstance(m, str)]
    merged = sorted(set(known) | set(members))
    d["members"] = merged[:cap]
    d["members_count"] = len(merged)
    return json.dumps(d)
