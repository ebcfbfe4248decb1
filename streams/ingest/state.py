"""The embedder processor's RocksDB state: how far it has read ``documents``, which
Source versions are done, and the one batch it may have in flight.

Keys (raw bytes)::

    P <topic> 0x00 <partition:u32>     next offset of ``documents`` to process (u64)
    S <tenant/index/source_id>         the done version and chunk count: JSON [version, n]
    Q                                  the batch in flight (an intent): its output records
                                       and the S/P/H changes to commit after them, JSON
    H <tenant/index/source_id> 0x00 <chunk_no:u32>
                                       a held chunk (smart vectorization queued it medium/
                                       low): its encoded ``vectors`` record, priority,
                                       Source version and position, JSON (:class:`Held`)

Held chunks are put and deleted in the same write batch as the positions (step 3), so a
Source's position is never committed without its held chunks and a released chunk is
never deleted before its record is durable in the log.

An :class:`Outcome` is written twice: first as the intent ``Q`` (one write), then, once its
records are durable in the log, as the S/P changes with ``Q`` deleted (one atomic write
batch). A process that dies between the two finds ``Q`` on start and re-appends its
records (deterministic ids, identical bytes) instead of embedding them again.

Writes are not fsynced (like the query node's state): they survive a process crash
(RocksDB's WAL is in the OS page cache); after a power loss the processor may embed again
what it had done since the last flush, which is safe (the same ids are re-appended).
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from rocksdict import WriteBatch

from streams.log.port import Record
from streams.service.state import open_store

__all__ = ["Held", "IngestState", "Outcome", "SourceDone"]

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_INTENT = b"Q"


def _pkey(topic: str, partition: int) -> bytes:
    return b"P" + topic.encode() + b"\x00" + _U32.pack(partition)


def _skey(key: str) -> bytes:
    return b"S" + key.encode()


def _hkey(key: str, chunk_no: int) -> bytes:
    return b"H" + key.encode() + b"\x00" + _U32.pack(chunk_no)


def _b64(v: bytes | None) -> str | None:
    return None if v is None else base64.b64encode(v).decode()


def _unb64(v: str | None) -> bytes | None:
    return None if v is None else base64.b64decode(v)


@dataclass(frozen=True, slots=True)
class SourceDone:
    """The newest version of a Source that is embedded and appended, and its chunk count."""

    version: int
    chunks: int


@dataclass(frozen=True, slots=True)
class Held:
    """A chunk embedded and encoded but held back (a medium/low Queue decision): appended
    to ``vectors`` later, by ``priority`` (lower first), unless a newer version or a
    tombstone of its Source (``key``) supersedes it. ``position``: the ``documents``
    record of the Source (topic, partition, offset); ``held_ms``: when it was held."""

    key: str
    chunk_no: int
    priority: int
    version: int
    record: Record
    held_ms: int
    position: tuple[str, int, int]

    def to_list(self) -> list[Any]:
        r = self.record
        return [
            self.key,
            self.chunk_no,
            self.priority,
            self.version,
            [r.topic, _b64(r.key), _b64(r.value), r.timestamp_ms],
            self.held_ms,
            list(self.position),
        ]

    @classmethod
    def from_list(cls, d: list[Any]) -> Held:
        key, chunk_no, priority, version, (t, k, v, ts), held_ms, (pt, pp, po) = d
        return cls(
            key,
            chunk_no,
            priority,
            version,
            Record(t, _unb64(k), _unb64(v), (), ts),
            held_ms,
            (pt, pp, po),
        )


@dataclass
class Outcome:
    """What processing one batch of ``documents`` produced: the records to append
    (chunk upserts and deletes), the Sources now done (``None``: deleted by a tombstone),
    the positions reached, the chunks newly held and the held chunks ``released``
    (appended in ``records``, or superseded: dropped)."""

    records: list[Record] = field(default_factory=list)
    sources: dict[str, SourceDone | None] = field(default_factory=dict)
    positions: dict[tuple[str, int], int] = field(default_factory=dict)
    held: dict[tuple[str, int], Held] = field(default_factory=dict)
    released: set[tuple[str, int]] = field(default_factory=set)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "records": [
                    [r.topic, _b64(r.key), _b64(r.value), r.timestamp_ms] for r in self.records
                ],
                "sources": {
                    k: None if v is None else [v.version, v.chunks] for k, v in self.sources.items()
                },
                "positions": [[t, p, off] for (t, p), off in self.positions.items()],
                "held": [h.to_list() for h in self.held.values()],
                "released": sorted([k, n] for k, n in self.released),
            }
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Outcome:
        d: dict[str, Any] = json.loads(raw)
        held = [Held.from_list(h) for h in d.get("held", [])]
        return cls(
            [Record(t, _unb64(k), _unb64(v), (), ts) for t, k, v, ts in d["records"]],
            {k: None if v is None else SourceDone(v[0], v[1]) for k, v in d["sources"].items()},
            {(t, p): off for t, p, off in d["positions"]},
            {(h.key, h.chunk_no): h for h in held},
            {(k, n) for k, n in d.get("released", [])},
        )


class IngestState:
    """RocksDB at ``path`` (created if missing). One writer (the processor's thread); reads
    from any thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db, self._wo = open_store(self.path, "ingest state")
        self._closed = False

    def positions(self) -> dict[tuple[str, int], int]:
        out = {}
        for k, v in cast(Any, self._db.items(from_key=b"P")):
            if not k.startswith(b"P"):
                break
            out[(k[1:-5].decode(), _U32.unpack(k[-4:])[0])] = _U64.unpack(v)[0]
        return out

    def source(self, key: str) -> SourceDone | None:
        raw = self._db.get(_skey(key))
        if raw is None:
            return None
        version, chunks = json.loads(cast(bytes, raw))
        return SourceDone(version, chunks)

    def held(self) -> list[Held]:
        """Every held chunk (in key order)."""
        out = []
        for k, v in cast(Any, self._db.items(from_key=b"H")):
            if not k.startswith(b"H"):
                break
            out.append(Held.from_list(json.loads(v)))
        return out

    def intent(self) -> Outcome | None:
        raw = self._db.get(_INTENT)
        return None if raw is None else Outcome.from_json(cast(bytes, raw))

    def write_intent(self, outcome: Outcome) -> None:
        """Step 1 of a batch: its outcome, before any of its records is appended."""
        self._db.put(_INTENT, outcome.to_json(), self._wo)

    def commit(self, outcome: Outcome) -> None:
        """Step 3 of a batch (after its records are durable in the log): the Sources done,
        the positions reached, the held chunks released and held, and the removal of the
        intent, in one atomic write."""
        wb = WriteBatch(raw_mode=True)
        for key, n in sorted(outcome.released):  # before the puts: a key may be held again
            wb.delete(_hkey(key, n))
        for h in outcome.held.values():
            wb.put(_hkey(h.key, h.chunk_no), json.dumps(h.to_list()).encode())
        for key, done in outcome.sources.items():
            if done is None:
                wb.delete(_skey(key))
            else:
                wb.put(_skey(key), json.dumps([done.version, done.chunks]).encode())
        for (topic, p), off in outcome.positions.items():
            wb.put(_pkey(topic, p), _U64.pack(off))
        wb.delete(_INTENT)
        self._db.write(wb, self._wo)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._db.close()
