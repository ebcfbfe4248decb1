"""The embedded log's on-disk formats: RocksDB keys and the framed record value.

Keys sort so that one partition's records are one contiguous, offset-ordered range::

    T <topic name>                                  topic metadata (JSON)
    R <topic id:u32> <partition:u32> <offset:u64>   a record (big-endian, so bytes sort as numbers)
    E <topic id:u32> <partition:u32>                next offset (log end), u64
    Z <topic id:u32> <partition:u32>                retained bytes, u64
    C <group> 0x00 <topic id:u32> <partition:u32>   committed offset, u64

A record value is framed with a CRC32 of everything after the CRC, so a torn or corrupt
value is detected on read (RocksDB's WAL has its own checksums; this guards our framing too)::

    crc:u32 | timestamp_ms:i64 | key_len:i32 (-1 = null) | value_len:i32 (-1 = tombstone)
    | header_count:u16 | key | value | (name_len:u16 name value_len:u32 value)*
"""

from __future__ import annotations

import struct
import zlib

from streams.log.exceptions import TransportError
from streams.log.port import Headers

__all__ = [
    "committed_key",
    "decode_record",
    "encode_record",
    "end_key",
    "partition_prefix",
    "record_key",
    "size_key",
    "topic_key",
]

_HEAD = struct.Struct("<IqiiH")
_HEAD_SIZE = _HEAD.size
_crc32 = zlib.crc32
_HEAD_UNPACK = _HEAD.unpack_from
_REC_KEY = struct.Struct(">cIIQ")
_TP = struct.Struct(">II")
U64 = struct.Struct(">Q")
_HNAME = struct.Struct("<H")
_HVAL = struct.Struct("<I")


def topic_key(name: str) -> bytes:
    return b"T" + name.encode()


def record_key(topic_id: int, partition: int, offset: int) -> bytes:
    return _REC_KEY.pack(b"R", topic_id, partition, offset)


def partition_prefix(topic_id: int, partition: int) -> bytes:
    return b"R" + _TP.pack(topic_id, partition)


def offset_of(key: bytes) -> int:
    return int(U64.unpack_from(key, 9)[0])


def end_key(topic_id: int, partition: int) -> bytes:
    return b"E" + _TP.pack(topic_id, partition)


def size_key(topic_id: int, partition: int) -> bytes:
    return b"Z" + _TP.pack(topic_id, partition)


def committed_key(group: str, topic_id: int, partition: int) -> bytes:
    return b"C" + group.encode() + b"\x00" + _TP.pack(topic_id, partition)


def encode_record(
    key: bytes | None, value: bytes | None, timestamp_ms: int, headers: Headers
) -> bytes:
    parts = [
        b"",
        key or b"",
        value or b"",
    ]
    for name, hval in headers:
        nb = name.encode()
        parts.append(_HNAME.pack(len(nb)) + nb + _HVAL.pack(len(hval)) + hval)
    parts[0] = _HEAD.pack(
        0,
        timestamp_ms,
        -1 if key is None else len(key),
        -1 if value is None else len(value),
        len(headers),
    )[4:]
    body = b"".join(parts)
    return struct.pack("<I", zlib.crc32(body)) + body


def decode_record(
    raw: bytes,
) -> tuple[bytes | None, bytes | None, int, Headers]:
    """(key, value, timestamp_ms, headers); :class:`TransportError` if the frame is corrupt."""
    try:
        crc, ts, klen, vlen, nh = _HEAD_UNPACK(raw)
    except struct.error:
        raise TransportError("corrupt log record: short frame", retriable=False) from None
    if _crc32(raw[4:]) != crc:
        raise TransportError("corrupt log record: CRC mismatch", retriable=False)
    pos = _HEAD_SIZE
    if klen >= 0:
        key: bytes | None = raw[pos : pos + klen]
        pos += klen
    else:
        key = None
    if vlen >= 0:
        value: bytes | None = raw[pos : pos + vlen]
        pos += vlen
    else:
        value = None
    if not nh:
        return key, value, ts, ()
    hs = []
    for _ in range(nh):
        (nl,) = _HNAME.unpack_from(raw, pos)
        pos += 2
        name = raw[pos : pos + nl].decode()
        pos += nl
        (hl,) = _HVAL.unpack_from(raw, pos)
        pos += 4
        hs.append((name, raw[pos : pos + hl]))
        pos += hl
    return key, value, ts, tuple(hs)
