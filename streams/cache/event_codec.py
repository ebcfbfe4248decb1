"""The Avro binary body of a SearchEvent, written by hand for the query log's thread.

fastavro's ``schemaless_writer`` spends ~21 us on a typical cache-hit event (20 fields,
ten result ids, four log positions; ``bench/querylog_encode.py``), all of it holding the GIL
that the node's search and RESP threads wait for; the query log writes one event per
search. :func:`encode` writes the same bytes ~2.6x cheaper on a node's real events: the
record's fields in schema order with Avro's binary encoding (zigzag varints, little-endian
doubles, length-prefixed UTF-8, one block per non-empty array or map, union branch
indexes), and it keeps the encodings that repeat from one event to the next (the applied
log positions, tenant, index, map keys, a hit's result ids, the millisecond) in small
memo tables.

It is written for one schema: :data:`SCHEMA_FINGERPRINT` is a SHA-256 digest of
``schemas/SearchEvent.avsc``'s JSON without its docs (so names, types, order, defaults and
logical types: the parsing canonical form's CRC-64 would miss a changed default, which
this encoder writes for a missing field). :func:`for_schema`
returns :func:`encode` only for that schema, else None (the emitter then uses fastavro):
a schema change is never written with a stale encoder, and tests/test_event_codec.py
fails until this module follows it. The same tests check, on generated events
(hypothesis), that the bytes equal fastavro's and that what fastavro refuses, this
refuses too. It is stricter than fastavro in places (a bool or a numpy scalar for a
double, a str subclass, a datetime timestamp are refused): the query log builds its events
from Python floats, ints and strs, and an event this refuses is counted as failed.

Errors: a value of the wrong type or out of range raises ``TypeError``, ``ValueError``,
``KeyError`` or ``OverflowError``, as the emitter expects of an event it cannot write.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import fastavro

__all__ = [
    "POSITIONS_AVRO",
    "SCHEMA_FINGERPRINT",
    "encode",
    "fastavro_encoder",
    "for_schema",
    "positions",
]

#: :func:`fingerprint` of the SearchEvent schema this module writes
SCHEMA_FINGERPRINT = "bc4850ed3f20d6a1"

_DOUBLE = struct.Struct("<d").pack
_INT_MIN, _INT_MAX = -(1 << 31), (1 << 31) - 1
_LONG_MIN, _LONG_MAX = -(1 << 63), (1 << 63) - 1

# zigzag varints of 0..63 (lengths, counts, small ints) are one byte: 2n
_SMALL = [bytes((2 * n,)) for n in range(64)]


def _long(n: int) -> bytes:
    """Avro ``long`` (zigzag varint). Raises TypeError for a non-int (bools are ints in
    Python and Avro has no objection: fastavro writes them too), OverflowError out of
    range."""
    if type(n) is not int:
        if isinstance(n, bool):
            n = int(n)
        else:
            raise TypeError(f"expected an int, got {type(n).__name__}")
    if 0 <= n < 64:
        return _SMALL[n]
    if not _LONG_MIN <= n <= _LONG_MAX:
        raise OverflowError(f"{n} out of the range of an Avro long")
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def _int(n: int) -> bytes:
    if type(n) is int and not _INT_MIN <= n <= _INT_MAX:
        raise OverflowError(f"{n} out of the range of an Avro int")
    return _long(n)


def _double(x: float) -> bytes:
    if type(x) is not float and (isinstance(x, bool) or not isinstance(x, int)):
        raise TypeError(f"expected a number, got {type(x).__name__}")
    return _DOUBLE(x)


def _string(s: str) -> bytes:
    if type(s) is not str:
        raise TypeError(f"expected a str, got {type(s).__name__}")
    b = s.encode()
    n = len(b)
    return (_SMALL[n] if n < 64 else _long(n)) + b


class _Memo:
    """The encodings of values that repeat (strings, map keys, id tuples): a bounded
    dict. Only what ``fn`` encoded is kept, so a key is a str or a tuple of them: a value
    equal to one of those encodes the same."""

    __slots__ = ("fn", "table")

    def __init__(self, fn: Callable[[Any], bytes]) -> None:
        self.fn = fn
        self.table: dict[Any, bytes] = {}

    def __call__(self, value: Any) -> bytes:
        found = self.table.get(value)
        if found is None:
            found = self.fn(value)
            if len(self.table) >= 1024:
                self.table.clear()
            self.table[value] = found
        return found


_name = _Memo(_string)  # tenant, index, action, bucket, map keys, segment names

_LAYER = {s: _SMALL[i] for i, s in enumerate(("NONE", "L0", "L1", "L2"))}
_CONSISTENCY = {s: _SMALL[i] for i, s in enumerate(("eventual", "session", "bounded", "strong"))}
_REASON = {
    s: _SMALL[i]
    for i, s in enumerate(("evicted", "expired", "invalidated", "replaced", "dropped", "other"))
}
_NULL = _SMALL[0]  # union branch 0 ("null"); also the end of an array or map
_SOME = b"\x02"  # union branch 1
_TRUE, _FALSE = b"\x01", b"\x00"


def _enum(table: Mapping[str, bytes], value: str, name: str) -> bytes:
    try:
        return table[value]
    except (KeyError, TypeError):
        raise ValueError(f"{value!r} is not a symbol of {name}") from None


def _doubles(m: Mapping[str, float]) -> bytes:
    if not isinstance(m, Mapping):
        raise TypeError(f"expected a map, got {type(m).__name__}")
    if not m:
        return _NULL
    n = len(m)
    parts = [_SMALL[n] if n < 64 else _long(n)]
    for k, v in m.items():
        parts.append(_name(k))
        parts.append(_double(v))
    parts.append(_NULL)
    return b"".join(parts)


def _array(items: Any) -> Sequence[Any]:
    if type(items) is not list and type(items) is not tuple:
        raise TypeError(f"expected a list, got {type(items).__name__}")
    return items


def _strings(items: Sequence[str]) -> bytes:
    if not _array(items):
        return _NULL
    n = len(items)
    parts = [_SMALL[n] if n < 64 else _long(n)]
    parts.extend(map(_string, items))
    parts.append(_NULL)
    return b"".join(parts)


_ids = _Memo(_strings)  # result ids: a hit's repeat the entry's


def _result_ids(items: Sequence[str]) -> bytes:
    return _ids(tuple(items)) if _array(items) else _NULL


#: key of an event's pre-encoded ``index_positions`` (:func:`positions`); fastavro, which
#: ignores fields a record's schema does not name, writes the list beside it
POSITIONS_AVRO = "_index_positions_avro"


def _positions(items: Sequence[Mapping[str, Any]]) -> bytes:
    if not _array(items):
        return _NULL
    n = len(items)
    parts = [_SMALL[n] if n < 64 else _long(n)]
    for p in items:
        parts.append(_name(p["topic"]))
        parts.append(_int(p["partition"]))
        parts.append(_long(p["offset"]))
    parts.append(_NULL)
    return b"".join(parts)


def positions(items: Sequence[Mapping[str, Any]]) -> bytes:
    """The encoding of ``index_positions`` ``items``: made once for the positions that
    many events share, put in the event under :data:`POSITIONS_AVRO`."""
    return _positions(items)


def _optional(value: Any, fn: Callable[[Any], bytes]) -> bytes:
    """A ``["null", X]`` union: fastavro picks the branch by validating the value, so
    a bool is no long there, and a tuple means its tuple notation (refused here)."""
    if value is None:
        return _NULL
    if type(value) is bool or type(value) is tuple:
        raise ValueError(f"{value!r} matches no branch of the union")
    return _SOME + fn(value)


def _depends(items: Sequence[Mapping[str, Any]]) -> bytes:
    n = len(items)
    if not n:
        return _NULL
    parts = [_SMALL[n] if n < 64 else _long(n)]
    for probe in items:
        if not isinstance(probe, dict):
            raise TypeError(f"expected a SegmentProbe record, got {type(probe).__name__}")
        parts.append(_name(probe["segment"]))
        lists = _array(probe.get("lists", ()))
        if lists:
            m = len(lists)
            parts.append(_SMALL[m] if m < 64 else _long(m))
            parts.extend(map(_union_int, lists))
        parts.append(_NULL)
        parts.append(_union_int(probe.get("ef", 0)))
    parts.append(_NULL)
    return b"".join(parts)


def _union_int(n: int) -> bytes:
    if type(n) is bool:  # inside a union fastavro validates: a bool is no int there
        raise ValueError("a bool is no int")
    return _int(n)


def _union_long(n: int) -> bytes:
    if type(n) is bool:
        raise ValueError("a bool is no long")
    return _long(n)


def _removal(r: Mapping[str, Any]) -> bytes:
    if not isinstance(r, dict):
        raise TypeError(f"expected a CacheRemoval record, got {type(r).__name__}")
    return b"".join(
        (
            _enum(_REASON, r.get("reason", "other"), "RemovalReason"),
            _union_long(r.get("hits", 0)),
            _union_long(r.get("bytes", 0)),
            _union_long(r["stored_ms"]),
            _double(r.get("priority", 0.0)),
        )
    )


_last_ts: tuple[Any, bytes] = (None, b"")  # consecutive events share their millisecond


def _timestamp(ms: int) -> bytes:
    global _last_ts
    last = _last_ts  # one tuple, rebound whole: two emitters' threads may race here
    if ms == last[0] and type(ms) is int:
        return last[1]
    out = _long(ms)
    _last_ts = (ms, out)
    return out


_NO_MAP: Mapping[str, float] = {}  # a missing map field's default (never changed)


def _union_list(items: Any) -> list[Any]:
    if type(items) is not list:  # a tuple is fastavro's tuple notation in a union
        raise ValueError(f"expected a list, got {type(items).__name__}")
    return items


def _bool(b: bool) -> bytes:
    if b is True:
        return _TRUE
    if b is False:
        return _FALSE
    raise TypeError(f"expected a bool, got {type(b).__name__}")


def encode(e: Mapping[str, Any]) -> bytes:
    """The Avro binary body of SearchEvent ``e`` (a dict in the schema's shape, as
    :func:`streams.cache.querylog._complete` leaves it; fields with a default may be
    missing). Equal to ``fastavro.schemaless_writer``'s bytes for the same record."""
    get = e.get
    depends = get("depends")
    removal = get("removal")
    return b"".join(
        (
            _string(e["event_id"]),
            _name(e["tenant"]),
            _name(e["index"]),
            _string(e["query_key"]),
            _int(e["top_k"]),
            _doubles(get("features", _NO_MAP)),
            _optional(get("bucket"), _name),
            _enum(_LAYER, get("cache_layer", "NONE"), "CacheLayer"),
            _bool(get("cache_hit", False)),
            _name(e["action"]),
            _double(e["action_probability"]),
            _optional(get("policy_version"), _long),
            _optional(get("ttl_ms"), _long),
            _double(get("proxy_cost", 0.0)),
            _doubles(get("latency_ms", _NO_MAP)),
            _result_ids(get("result_ids", ())),
            get(POSITIONS_AVRO) or _positions(get("index_positions", ())),
            _enum(_CONSISTENCY, get("consistency", "eventual"), "Consistency"),
            _optional(get("session_id"), _string),
            _timestamp(e["timestamp"]),
            _NULL if removal is None else _SOME + _removal(removal),
            _NULL if depends is None else _SOME + _depends(_union_list(depends)),
        )
    )


def fingerprint(schema: str) -> str:
    """The digest :data:`SCHEMA_FINGERPRINT` is of ``schema`` (Avro JSON text): SHA-256 of
    its JSON without ``doc``, keys sorted (independent of fastavro's parsed form)."""

    def shape(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: shape(v) for k, v in node.items() if k != "doc"}
        if isinstance(node, list):
            return [shape(v) for v in node]
        return node

    text = json.dumps(shape(json.loads(schema)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def for_schema(schema: str) -> Callable[[Mapping[str, Any]], bytes] | None:
    """:func:`encode` if ``schema`` (Avro JSON text: what the query log registers and
    writes with) is the schema this module writes, else None."""
    try:
        digest = fingerprint(schema)
    except (TypeError, ValueError):
        return None
    return encode if digest == SCHEMA_FINGERPRINT else None


def fastavro_encoder(parsed: Any) -> Callable[[Mapping[str, Any]], bytes]:
    """fastavro's encoder of bodies of the parsed schema ``parsed``: what :func:`encode`
    must equal (tests), the query log's fallback for another schema, the benches'
    baseline."""

    def encode_with_fastavro(e: Mapping[str, Any]) -> bytes:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed, e)
        return buf.getvalue()

    return encode_with_fastavro
