"""The query node's RocksDB state: what the indexer derived from the log, and how far.

Keys (raw bytes)::

    P <topic> 0x00 <partition:u32>        applied position: the next offset to apply (u64)
    I <tenant/index>                      IndexConfig (JSON)
    V <tenant/index> 0x00 <id>            current copy of a vector: label, version, vector,
                                          meta, tags, numeric, position token
    L <tenant/index> 0x00 <label:i64 BE>  label -> id and meta (what a hit needs)
    T <tenant/index> 0x00 <id>            expires_ms (u64) of a temporary vector (ttl_ms)
    R <tenant/index> 0x00 <label:i64 BE>  the vector alone, for re-ranking a quantised
                                          index's candidates: 0x02 + fp16, or 0x04 + fp32
                                          where fp16 would overflow

Every batch of applied records is one :class:`StateBatch` written atomically together with
the positions it reaches, so a state directory never claims a position whose effects it
lacks, or the reverse. A checkpoint (hard links, cheap) is taken for snapshots.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _esc
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
from rocksdict import Checkpoint, Options, Rdict, WriteBatch, WriteOptions

from streams.index.model import (
    CacheSettings,
    Dtype,
    FieldKind,
    FilterField,
    IndexConfig,
    IndexQuotas,
    Metric,
    Vector,
)
from streams.log.exceptions import TransportError

__all__ = [
    "Entry",
    "StateBatch",
    "StateStore",
    "config_from_json",
    "config_to_json",
    "hit_value",
]

_ENTRY_HEAD = struct.Struct("<qqI")
_LABEL = struct.Struct(">q")
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")


def config_to_json(c: IndexConfig) -> bytes:
    return json.dumps({
        "tenant": c.tenant, "index": c.index, "dim": c.dim, "metric": c.metric.value,
        "dtype": c.dtype.value, "recipe": c.recipe, "version": c.version,
        "created_ms": c.created_ms,
        "fields": [{"name": f.name, "kind": f.kind.value} for f in c.fields],
        "quotas": None if c.quotas is None else {
            "max_vectors": c.quotas.max_vectors, "max_bytes": c.quotas.max_bytes,
            "qps": c.quotas.qps},
        "embedder": c.embedder,
        "cache": None if c.cache is None else c.cache.as_avro(),
    }).encode()


def config_from_json(raw: bytes) -> IndexConfig:
    d = json.loads(raw)
    return IndexConfig(
        tenant=d["tenant"], index=d["index"], dim=d["dim"], metric=Metric(d["metric"]),
        dtype=Dtype(d["dtype"]), recipe=d["recipe"], version=d["version"],
        created_ms=d["created_ms"],
        fields=tuple(FilterField(f["name"], FieldKind(f["kind"])) for f in d["fields"]),
        quotas=IndexQuotas(**d["quotas"]) if d.get("quotas") else None,
        embedder=d.get("embedder"),
        cache=CacheSettings.from_avro(d.get("cache")),
    )


@dataclass(frozen=True, slots=True)
class Entry:
    """The current copy of one id."""

    label: int
    version: int
    vector: Vector
    meta: str | None
    tags: tuple[str, ...]
    numeric: dict[str, float]
    position: str
    expires_ms: int | None = None  # a temporary vector (VectorRecord.ttl_ms): when it expires

    def encode(self) -> bytes:
        vec = self.vector.astype("<f4", copy=False).tobytes()
        if not self.tags and not self.numeric:
            # the common case, spelled as json.dumps would (asserted by the tests), without
            # building and walking a list per entry
            rest = f"[{_json_str(self.meta)}, [], {{}}, {_esc(self.position)}"
            if self.expires_ms is not None:  # older entries have four fields
                rest += f", {int(self.expires_ms)}"
            raw = (rest + "]").encode()
        else:
            fields: list[object] = [self.meta, list(self.tags), self.numeric, self.position]
            if self.expires_ms is not None:
                fields.append(self.expires_ms)
            raw = json.dumps(fields).encode()
        return _ENTRY_HEAD.pack(self.label, self.version, len(vec)) + vec + raw

    @classmethod
    def decode(cls, raw: bytes) -> Entry:
        label, version, n = _ENTRY_HEAD.unpack_from(raw)
        start = _ENTRY_HEAD.size
        vec = np.frombuffer(raw[start : start + n], dtype="<f4").astype(np.float32)
        meta, tags, numeric, position, *expires = json.loads(raw[start + n :])
        return cls(label, version, vec, meta, tuple(tags), numeric, position,
                   expires[0] if expires else None)


def _json_str(text: str | None) -> str:
    """``json.dumps(text)`` for a str or None, minus its Python-level overhead."""
    return "null" if text is None else _esc(text)


def hit_value(id: str, meta: str | None) -> bytes:
    """The ``L`` value: ``json.dumps([id, meta])``, spelled directly (the hot path)."""
    return f"[{_esc(id)}, {_json_str(meta)}]".encode()


def _vkey(index_key: str, id: str) -> bytes:
    return b"V" + index_key.encode() + b"\x00" + id.encode()


def _lkey(index_key: str, label: int) -> bytes:
    return b"L" + index_key.encode() + b"\x00" + _LABEL.pack(label)


def _rkey(index_key: str, label: int) -> bytes:
    return b"R" + index_key.encode() + b"\x00" + _LABEL.pack(label)


def _rvalue(vector: Vector) -> bytes:
    """fp16 is exact enough to re-rank (relative error 5e-4 a component) at half the bytes."""
    with np.errstate(over="ignore"):  # checked just below
        half = vector.astype("<f2")
    if np.isfinite(half).all():
        return b"\x02" + half.tobytes()
    return b"\x04" + vector.astype("<f4").tobytes()


def _rvalues(vectors: list[Vector]) -> list[bytes]:
    """:func:`_rvalue` of each vector (all of one dim), with one fp16 conversion for all."""
    try:
        mat = np.stack(vectors)
    except ValueError:  # dims differ (several indexes in one batch)
        return [_rvalue(v) for v in vectors]
    with np.errstate(over="ignore"):  # checked just below
        half = mat.astype("<f2")
    finite = np.isfinite(half).all(axis=1).tolist()
    return [
        b"\x02" + h.tobytes() if ok else b"\x04" + v.astype("<f4").tobytes()
        for h, v, ok in zip(half, vectors, finite, strict=True)
    ]


def _tkey(index_key: str, id: str) -> bytes:
    return b"T" + index_key.encode() + b"\x00" + id.encode()


def _pkey(topic: str, partition: int) -> bytes:
    return b"P" + topic.encode() + b"\x00" + _U32.pack(partition)


class StateBatch:
    """Changes of one applied batch; written atomically by :meth:`StateStore.commit`."""

    def __init__(self) -> None:
        self._wb = WriteBatch(raw_mode=True)
        self.positions: dict[tuple[str, int], int] = {}
        # what this batch wrote, so later records of the same batch read their own writes
        self._overlay: dict[tuple[str, str], Entry | None] = {}
        # R (re-rank) values still to write: converted to fp16 together in finish()
        self._rpending: dict[bytes, Vector] = {}

    def entry(self, store: StateStore, index_key: str, id: str) -> Entry | None:
        """The current entry of ``id`` as of this batch (its own writes first)."""
        k = (index_key, id)
        if k in self._overlay:
            return self._overlay[k]
        return store.entry(index_key, id)

    def put_config(self, config: IndexConfig) -> None:
        self._wb.put(b"I" + config.key.encode(), config_to_json(config))

    def put_entry(self, index_key: str, id: str, entry: Entry, old: Entry | None) -> None:
        if old is not None:
            self._wb.delete(_lkey(index_key, old.label))
            self._delete_r(_rkey(index_key, old.label))
            if old.expires_ms is not None and entry.expires_ms is None:
                self._wb.delete(_tkey(index_key, id))
        if entry.expires_ms is not None:
            self._wb.put(_tkey(index_key, id), _U64.pack(entry.expires_ms))
        self._wb.put(_vkey(index_key, id), entry.encode())
        self._wb.put(_lkey(index_key, entry.label), hit_value(id, entry.meta))
        self._rpending[_rkey(index_key, entry.label)] = entry.vector
        self._overlay[(index_key, id)] = entry

    def delete_entry(self, index_key: str, id: str, old: Entry) -> None:
        if old.expires_ms is not None:
            self._wb.delete(_tkey(index_key, id))
        self._wb.delete(_vkey(index_key, id))
        self._wb.delete(_lkey(index_key, old.label))
        self._delete_r(_rkey(index_key, old.label))
        self._overlay[(index_key, id)] = None

    def _delete_r(self, rkey: bytes) -> None:
        # a pending put of the same key (written earlier in this batch) must not land
        # after its delete
        self._rpending.pop(rkey, None)
        self._wb.delete(rkey)

    def finish(self) -> None:
        """Write the pending ``R`` values (one fp16 conversion for the batch)."""
        if self._rpending:
            keys = list(self._rpending)
            for k, v in zip(keys, _rvalues(list(self._rpending.values())), strict=True):
                self._wb.put(k, v)
            self._rpending.clear()

    def advance(self, topic: str, partition: int, next_offset: int) -> None:
        self.positions[(topic, partition)] = next_offset


def open_store(path: Path, what: str) -> tuple[Rdict, WriteOptions]:
    """Open (creating) a raw-mode RocksDB at ``path`` and the write options its batches use
    (no fsync: these stores are derived from the log, which is the durable copy).
    :class:`TransportError` names ``what`` when it cannot be opened."""
    path.mkdir(parents=True, exist_ok=True)
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    try:
        db = Rdict(str(path), opts)
    except Exception as exc:  # rocksdict raises plain Exception on open errors
        raise TransportError(f"cannot open {what} at {path}: {exc}") from exc
    wo = WriteOptions()
    wo.sync = False
    return db, wo


class StateStore:
    """RocksDB at ``path``. Writes are not fsynced: the log is the source of truth and a
    node restarts from a snapshot (a checkpoint of this store) plus the log."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db, self._wo = open_store(self.path, "state")
        self._closed = False

    # -- reads ---------------------------------------------------------------------------
    def positions(self) -> dict[tuple[str, int], int]:
        out = {}
        for k, v in self._items(b"P"):
            if not k.startswith(b"P"):
                break
            topic, part = k[1:-5], k[-4:]  # P <topic> 0x00 <partition:u32>
            out[(topic.decode(), _U32.unpack(part)[0])] = _U64.unpack(v)[0]
        return out

    def configs(self) -> list[IndexConfig]:
        out = []
        for k, v in self._items(b"I"):
            if not k.startswith(b"I"):
                break
            out.append(config_from_json(v))
        return out

    def entry(self, index_key: str, id: str) -> Entry | None:
        raw = self._db.get(_vkey(index_key, id))
        return None if raw is None else Entry.decode(cast(bytes, raw))

    def hit(self, index_key: str, label: int) -> tuple[str, str | None] | None:
        raw = self._db.get(_lkey(index_key, label))
        if raw is None:
            return None
        id, meta = json.loads(cast(bytes, raw))
        return id, meta

    def vectors_by_label(
        self, index_key: str, labels: list[int]
    ) -> list[npt.NDArray[np.floating[Any]] | None]:
        """The stored vectors of ``labels`` (fp16, or fp32), ``None`` where a label is not
        the current copy of its id: scores to re-rank a quantised index's candidates with
        (``VectorIndex.exact``). One multi-get of ``R`` keys; labels written before those
        keys existed are read from their ``V`` entries (fp32)."""
        rkeys: list[Any] = [_rkey(index_key, x) for x in labels]  # rocksdict's multi-get
        out: list[npt.NDArray[np.floating[Any]] | None] = []
        missing: list[int] = []
        for i, raw in enumerate(cast(list[bytes | None], self._db[rkeys])):
            if raw is None:
                out.append(None)
                missing.append(i)
            else:
                out.append(np.frombuffer(raw, dtype="<f2" if raw[0] == 2 else "<f4", offset=1))
        if missing:
            older = self._vectors_from_entries(index_key, [labels[i] for i in missing])
            for i, vec in zip(missing, older, strict=True):
                out[i] = vec
        return out

    def _vectors_from_entries(self, index_key: str, labels: list[int]) -> list[Vector | None]:
        lkeys: list[Any] = [_lkey(index_key, x) for x in labels]  # rocksdict's multi-get
        found = cast(list[bytes | None], self._db[lkeys])
        ids = [None if raw is None else json.loads(raw)[0] for raw in found]
        keys: list[Any] = [_vkey(index_key, id) for id in ids if id is not None]
        entries = iter(cast(list[bytes | None], self._db[keys]) if keys else [])
        out: list[Vector | None] = []
        for label, id in zip(labels, ids, strict=True):
            raw = None if id is None else next(entries)
            if raw is None:
                out.append(None)
                continue
            stored, _version, n = _ENTRY_HEAD.unpack_from(raw)
            start = _ENTRY_HEAD.size
            vec = np.frombuffer(raw, dtype="<f4", count=n // 4, offset=start)
            out.append(vec if stored == label else None)
        return out

    def entries(self, index_key: str) -> Iterator[tuple[str, Entry]]:
        prefix = b"V" + index_key.encode() + b"\x00"
        for k, v in self._items(prefix):
            if not k.startswith(prefix):
                return
            yield k[len(prefix) :].decode(), Entry.decode(v)

    def temporaries(self, index_key: str) -> Iterator[tuple[str, int]]:
        """``(id, expires_ms)`` of the index's temporary vectors (``ttl_ms``), by id."""
        prefix = b"T" + index_key.encode() + b"\x00"
        for k, v in self._items(prefix):
            if not k.startswith(prefix):
                return
            yield k[len(prefix) :].decode(), _U64.unpack(v)[0]

    def _items(self, start: bytes) -> Iterator[tuple[bytes, bytes]]:
        return cast(Iterator[tuple[bytes, bytes]], iter(self._db.items(from_key=start)))

    # -- writes --------------------------------------------------------------------------
    def commit(self, batch: StateBatch) -> None:
        """Write the batch's changes and its positions in one atomic write."""
        batch.finish()
        for (topic, p), off in batch.positions.items():
            batch._wb.put(_pkey(topic, p), _U64.pack(off))
        self._db.write(batch._wb, self._wo)

    def checkpoint(self, target: Path) -> None:
        """A consistent copy of the store at ``target`` (hard links where possible)."""
        self._db.flush()
        Checkpoint(self._db).create_checkpoint(str(target))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._db.close()

    @staticmethod
    def restore(checkpoint: Path | None, path: Path) -> None:
        """Replace the store at ``path`` with ``checkpoint`` (or nothing)."""
        if path.exists():
            shutil.rmtree(path)
        if checkpoint is not None:
            shutil.copytree(checkpoint, path)
