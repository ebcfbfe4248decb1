"""A query node: state restored from the newest snapshot, the log replayed from the
positions it covers, then kept up to date by the indexer.

Start (numbered as it happens):

1. Find the newest complete snapshot (CURRENT); none = start empty.
2. Replace the working state directory with the snapshot's RocksDB checkpoint (immutable
   SST files are hard-linked, the rest copied), so state and indexes describe the same
   positions. The working state of the previous run is discarded: it may be ahead of the
   snapshot, and the log, not it, is the source of truth.
3. Load every index saved in the snapshot; indexes created after it come from the replay.
4. Start the indexer at the snapshot's positions (the beginning without a snapshot).
5. With the policy loop: read the compacted ``policy`` topic to its end, so the newest
   cache policy of every index is in force before the node serves.

Both paths (snapshot + replay, or full replay) yield the same searchable state.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import faiss

from streams.cache import CacheController, CacheInvalidator, ResultCache
from streams.cache.eviction import EvictionName
from streams.cache.policy import GuardConfig
from streams.cache.semantic import (
    DEFAULT_L2_PENALTY_MS,
    DEFAULT_L2_TEXT_PENALTY_MS,
    DEFAULT_L2_TEXT_THRESHOLD,
    DEFAULT_L2_VECTOR_THRESHOLD,
)
from streams.capacity import CapacityManager
from streams.dlq import DeadLetterQueue
from streams.index.vector_index import VectorIndex
from streams.log.port import Log
from streams.policy.learner import PolicyLoop
from streams.schemas.codec import AvroCodec
from streams.service.applied import AppliedPositions
from streams.service.indexer import Indexer
from streams.service.snapshot import SnapshotInfo, Snapshots
from streams.service.state import StateStore
from streams.service.vector_service import VectorService
from streams.text import KeywordIndexes, KeywordListener, ListenerFanout, TextSearch
from streams.topics import Topics

__all__ = ["QueryNode"]


def _restore_state(snapshot: SnapshotInfo | None, path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    if snapshot is None:
        return

    def link_or_copy(src: str, dst: str) -> object:
        if src.endswith(".sst"):
            try:
                os.link(src, dst)
                return dst
            except OSError:
                pass
        return shutil.copy2(src, dst)

    shutil.copytree(snapshot.state_dir, path, copy_function=link_or_copy)


DEFAULT_CACHE_BUDGET = 64 * 1024 * 1024


class QueryNode:
    """One query node. ``cache_enabled``: serve searches through an L0 result cache of
    ``cache_budget_bytes`` (its invalidation is wired to the indexer, so hits are exact);
    ``cache_verify_rate``: the share of hits re-checked against a fresh search to measure
    false hits (each pauses the applier for one search)."""

    def __init__(
        self,
        log: Log,
        topics: Topics,
        codec: AvroCodec,
        data_dir: str | Path,
        *,
        head_capacity: int = 20_000,
        snapshot_interval_s: float | None = None,
        faiss_threads: int = 1,
        cache_enabled: bool = True,
        cache_budget_bytes: int = DEFAULT_CACHE_BUDGET,
        cache_verify_rate: float = 0.0,
        cache_layers: tuple[str, ...] = ("L0", "L3"),
        cache_l2_threshold: float = DEFAULT_L2_VECTOR_THRESHOLD,
        cache_l2_text_threshold: float = DEFAULT_L2_TEXT_THRESHOLD,
        cache_l2_penalty_ms: float = DEFAULT_L2_PENALTY_MS,
        cache_l2_text_penalty_ms: float = DEFAULT_L2_TEXT_PENALTY_MS,
        cache_tenant_budget_bytes: int | None = None,
        cache_background_offers: bool = False,
        cache_eviction: EvictionName = "gdsf",
        cache_admit_after: int = 1,
        cache_lazy_offers: bool = True,
        policy_loop: bool = False,
        prefetch: bool = False,
        capacity_interval_s: float | None = None,
        policy_guard: GuardConfig | None = None,
    ) -> None:
        # FAISS's OpenMP workers spin while waiting; beside many searcher threads on few
        # cores that turned millisecond segment builds into seconds (measured on 2 cores).
        faiss.omp_set_num_threads(faiss_threads)
        self.data_dir = Path(data_dir)
        self.snapshots = Snapshots(self.data_dir / "snapshots")
        t0 = time.perf_counter()
        snap = self.snapshots.latest()  # 1
        _restore_state(snap, self.data_dir / "state")  # 2
        self.state = StateStore(self.data_dir / "state")
        indexes: dict[str, VectorIndex] = {}
        for config in self.state.configs():  # 3
            if snap is not None and config.key in snap.indexes:
                indexes[config.key] = VectorIndex.load(config, snap.index_dir(config.key))
            else:
                indexes[config.key] = VectorIndex(config, head_capacity=head_capacity)
        self.restored_from = snap.name if snap else None
        self.restore_s = time.perf_counter() - t0
        self.applied = AppliedPositions(self.state.positions())
        self.dlq = DeadLetterQueue(log, topics, codec)
        self.cache = ResultCache(cache_budget_bytes, tenant_budget_bytes=cache_tenant_budget_bytes,
                                 eviction=cache_eviction) if cache_enabled else None
        # L0/L1/L2 over the cache; an index's IndexConfig.cache overrides these defaults
        layers = CacheController(
            self.cache, default_layers=cache_layers, l2_threshold=cache_l2_threshold,
            l2_text_threshold=cache_l2_text_threshold,
            l2_penalty_ms=cache_l2_penalty_ms, l2_text_penalty_ms=cache_l2_text_penalty_ms,
            background_offers=cache_background_offers,
            admit_after=cache_admit_after,
            lazy_offers=cache_lazy_offers) if self.cache else None
        # streams.text: BM25 indexes rebuilt from the restored state, then fed by the indexer
        self.keyword = KeywordIndexes(self.data_dir / "keyword")
        self.keyword_docs = self.keyword.rebuild(self.state)
        keyword_listener = KeywordListener(self.keyword, self.state)
        listener = ListenerFanout(CacheInvalidator(self.cache) if self.cache else None,
                                  keyword_listener)
        self.indexer = Indexer(log, topics, codec, self.dlq, self.state, indexes, self.applied,
                               head_capacity=head_capacity, listener=listener)
        keyword_listener.configs = self.indexer.configs
        self.service = VectorService(log, topics, codec, self.state, self.indexer,
                                     self.applied, self.snapshots, cache=self.cache,
                                     verify_rate=cache_verify_rate, cache_layers=layers)
        self.text = TextSearch(self.service, self.keyword)  # VEC.QUERY: dense/keyword/hybrid
        # streams.capacity: per-index budgets (admission, actions at 80/90/95 %, archive);
        # ticks every capacity_interval_s when set, else when called
        self.capacity = CapacityManager(self.service)
        self._capacity_interval_s = capacity_interval_s
        # the cache policy loop (streams.policy.learner.PolicyLoop): hot-path policy, query
        # log, policy updates applied live, prefetch
        self.policy_loop = PolicyLoop(log, topics, codec, self.service, self.cache,
                                      prefetch=prefetch, guard=policy_guard,
                                      ) if policy_loop and self.cache else None
        self._snapshot_interval_s = snapshot_interval_s
        self._stop = threading.Event()
        self._snapshotter: threading.Thread | None = None

    def start(self) -> QueryNode:
        self.indexer.start()  # 4
        if self.policy_loop is not None:
            self.policy_loop.start()  # 5: the newest policy version, before serving
        if self._snapshot_interval_s:
            self._snapshotter = threading.Thread(target=self._snapshot_loop, daemon=True,
                                                 name="snapshotter")
            self._snapshotter.start()
        if self._capacity_interval_s:
            self.capacity.start(self._capacity_interval_s)
        return self

    def _snapshot_loop(self) -> None:
        assert self._snapshot_interval_s
        while not self._stop.wait(self._snapshot_interval_s):
            self.snapshots.write(self.indexer)

    def catch_up(self, timeout_s: float = 60.0) -> bool:
        """Wait until everything in the log at call time is applied (start-up, tests)."""
        log = self.indexer.log
        targets = {}
        for topic in (self.indexer.topics.indexes, self.indexer.topics.vectors):
            for p, end in log.end_offsets(topic).items():
                targets[(topic, p)] = end
        return self.applied.wait(targets, timeout_s)

    def close(self) -> None:
        self._stop.set()
        if self._snapshotter is not None:
            self._snapshotter.join(60)
        if self.policy_loop is not None:
            self.policy_loop.close()
        self.capacity.stop()
        if self.service.cache_layers is not None:
            self.service.cache_layers.close()  # stores deferred offers, stops their thread
        self.indexer.stop()
        self.keyword.close()
        self.state.close()

    def __enter__(self) -> QueryNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
