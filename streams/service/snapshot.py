"""Snapshots of a query node: a RocksDB checkpoint of its state, every index's Head and
Tail segments, and the log positions they cover, as one directory::

    snapshots/
      CURRENT              the name of the newest complete snapshot
      snap-000042/
        manifest.json      positions, index keys, created time
        state/             RocksDB checkpoint (hard links)
        indexes/<tenant>~<index>/   VectorIndex.save()

A snapshot becomes visible only through CURRENT, which is replaced atomically after the
directory is complete and fsynced: a crash mid-snapshot leaves the previous one in force.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streams.service.indexer import Indexer

__all__ = ["SnapshotInfo", "Snapshots"]


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    name: str
    path: Path
    positions: dict[tuple[str, int], int]
    indexes: list[str]
    created_ms: int

    @property
    def state_dir(self) -> Path:
        return self.path / "state"

    def index_dir(self, key: str) -> Path:
        return self.path / "indexes" / key.replace("/", "~")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


class Snapshots:
    def __init__(self, root: str | Path, *, keep: int = 2) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = keep

    def latest(self) -> SnapshotInfo | None:
        current = self.root / "CURRENT"
        if not current.exists():
            return None
        name = current.read_text().strip()
        path = self.root / name
        manifest = json.loads((path / "manifest.json").read_text())
        positions = {(t, int(p)): int(off) for t, p, off in manifest["positions"]}
        return SnapshotInfo(name, path, positions, manifest["indexes"], manifest["created_ms"])

    def write(self, indexer: Indexer) -> SnapshotInfo:
        """Take a snapshot of ``indexer``'s node.

        1. Hold the indexer's apply lock: state, indexes and positions agree.
        2. Write a RocksDB checkpoint, each index's save and the manifest into a
           temporary directory.
        3. Release the lock; fsync the directory tree and rename it to its final name.
        4. Point CURRENT at it (write a temporary file, fsync, ``os.replace``).
        5. Remove snapshots older than the newest ``keep``.
        """
        latest = self.latest()
        seq = int(latest.name.split("-")[1]) + 1 if latest else 1
        name = f"snap-{seq:06d}"
        tmp = self.root / f".tmp-{name}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        with indexer.lock:  # 1
            positions = indexer.applied.snapshot()  # 2
            indexer.state.checkpoint(tmp / "state")
            keys = sorted(indexer.indexes)
            for key in keys:
                # unchanged segment files are hard-linked from the previous snapshot
                prev = latest.index_dir(key) if latest and key in latest.indexes else None
                indexer.indexes[key].save(tmp / "indexes" / key.replace("/", "~"),
                                          link_from=prev)
        manifest = {
            "positions": [[t, p, off] for (t, p), off in sorted(positions.items())],
            "indexes": keys,
            "created_ms": int(time.time() * 1000),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        _fsync_tree(tmp)  # 3
        final = self.root / name
        os.rename(tmp, final)
        _fsync_dir(self.root)
        cur_tmp = self.root / "CURRENT.tmp"  # 4
        with open(cur_tmp, "w") as f:
            f.write(name)
            f.flush()
            os.fsync(f.fileno())
        os.replace(cur_tmp, self.root / "CURRENT")
        _fsync_dir(self.root)
        snaps = sorted(p for p in self.root.glob("snap-*") if p.is_dir())  # 5
        for old in snaps[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        info = self.latest()
        assert info is not None
        return info
