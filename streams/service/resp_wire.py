"""RESP framing: an incremental parser of client requests and the reply encoder.

Requests are arrays of bulk strings (binary-safe) or inline commands (a line split on
whitespace, no quoting). Limits mirror Redis: 1M elements per array, 512 MB per bulk string,
64 KB per inline command or header line; requests do not nest (an array of arrays is a
protocol error, as in Redis). Replies are RESP2, or RESP3 for connections that said
``HELLO 3``. No I/O here: :mod:`streams.service.resp` owns the sockets.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np

from streams.exceptions import StreamvecError

__all__ = [
    "CRLF",
    "Encoded",
    "ErrorReply",
    "ParserLimits",
    "ProtocolError",
    "Reply",
    "RespParser",
    "SimpleString",
    "encode_reply",
    "printable",
]

CRLF = b"\r\n"
_INT_RE = re.compile(rb"-?[0-9]{1,18}")


# -- parsing ------------------------------------------------------------------------------
class ProtocolError(StreamvecError):
    """A frame that is not RESP; the connection cannot be resynchronised."""

    code = "ERR"


@dataclass(frozen=True, slots=True)
class ParserLimits:
    max_elements: int = 1024 * 1024
    max_bulk_bytes: int = 512 * 1024 * 1024
    max_inline_bytes: int = 64 * 1024


class RespParser:
    """Incremental parser of client requests: :meth:`feed` bytes as they arrive, then call
    :meth:`next_command` until it returns ``None`` (a partial command stays buffered).

    Once it has raised :class:`ProtocolError` it raises the same error forever. A large bulk
    string is never rescanned: the parser remembers how many bytes it is waiting for."""

    def __init__(self, limits: ParserLimits | None = None) -> None:
        self.limits = limits or ParserLimits()
        self._buf = bytearray()
        self._pos = 0
        self._args: list[bytes] | None = None  # the array being read
        self._remaining = 0  # its elements still to read
        self._bulk = -1  # length of the bulk string being read; -1: its header is next
        self._failed: ProtocolError | None = None

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_command(self) -> list[bytes] | None:
        if self._failed is not None:
            raise self._failed
        try:
            command = self._parse()
        except ProtocolError as exc:
            self._failed = exc
            raise
        if self._pos and (self._pos == len(self._buf) or self._pos > 1 << 16):
            del self._buf[: self._pos]
            self._pos = 0
        return command

    def _line(self, sep: bytes, what: str) -> bytes | None:
        end = self._buf.find(sep, self._pos)
        if end < 0:
            if len(self._buf) - self._pos > self.limits.max_inline_bytes:
                raise ProtocolError(f"too big {what}")
            return None
        line = bytes(self._buf[self._pos : end])
        self._pos = end + len(sep)
        return line

    def _int(self, text: bytes, what: str) -> int:
        if not _INT_RE.fullmatch(text):
            raise ProtocolError(f"invalid {what}")
        return int(text)

    def _parse(self) -> list[bytes] | None:
        # Header lines are read inline (no call per line): a count of ASCII digits is
        # converted directly, anything else goes through _int's check, so the errors are
        # the same (tests/test_resp.py compares this parser with the one it replaced).
        buf = self._buf
        while self._args is None:
            pos = self._pos
            if pos >= len(buf):
                return None
            if buf[pos] != 42:  # not '*': an inline command
                line = self._line(b"\n", "inline request")
                if line is None:
                    return None
                args = line.removesuffix(b"\r").split()
                if args:
                    return args
                continue  # an empty line, as Redis: ignored
            end = buf.find(CRLF, pos)
            if end < 0:
                if len(buf) - pos > self.limits.max_inline_bytes:
                    raise ProtocolError("too big mbulk count string")
                return None
            text = buf[pos + 1 : end]
            self._pos = end + 2
            if 0 < len(text) <= 18 and text.isdigit():
                n = int(text)
            else:
                n = self._int(bytes(text), "multibulk length")
            if n > self.limits.max_elements:
                raise ProtocolError("invalid multibulk length")
            if n > 0:  # *0 and *-1 are ignored
                self._args, self._remaining, self._bulk = [], n, -1
        args_out = self._args
        while self._remaining:
            if self._bulk < 0:
                pos = self._pos
                if pos >= len(buf):
                    return None
                if buf[pos] != 36:  # '$'
                    got = printable(bytes(buf[pos : pos + 1]))
                    raise ProtocolError(f"expected '$', got {got!r}")
                end = buf.find(CRLF, pos)
                if end < 0:
                    if len(buf) - pos > self.limits.max_inline_bytes:
                        raise ProtocolError("too big bulk count string")
                    return None
                text = buf[pos + 1 : end]
                if 0 < len(text) <= 18 and text.isdigit():
                    n = int(text)
                else:
                    n = self._int(bytes(text), "bulk length")
                if not 0 <= n <= self.limits.max_bulk_bytes:
                    raise ProtocolError("invalid bulk length")
                self._pos, self._bulk = end + 2, n
            start = self._pos
            end = start + self._bulk
            if len(buf) < end + 2:
                return None
            if buf[end] != 13 or buf[end + 1] != 10:
                raise ProtocolError("bulk string not terminated by CRLF")
            args_out.append(bytes(buf[start:end]))
            self._pos, self._bulk, self._remaining = end + 2, -1, self._remaining - 1
        command, self._args = self._args, None
        return command


def printable(data: bytes, limit: int = 64) -> str:
    text = data[:limit].decode("utf-8", "replace")
    return "".join(c if c.isascii() and c.isprintable() else "?" for c in text)


# -- replies ------------------------------------------------------------------------------
class SimpleString(str):
    """A status reply (``+OK``)."""


class ErrorReply(str):
    """An error reply; the text starts with its code (``VEC_ERR_DIM ...``, ``ERR ...``)."""


class Encoded(bytes):
    """A value already encoded for the connection's protocol (by :func:`encode_reply`),
    written as it is: a reply part that does not change between requests (a cached
    search result's hits) is encoded once."""


Reply: TypeAlias = "bool | int | float | str | bytes | Sequence[Reply] | Mapping[str, Reply] | None"


def encode_reply(value: Reply, proto: int = 2) -> bytes:
    """RESP2 or RESP3 encoding of ``value``: ``None`` null, ``bool``/``int`` integers
    (RESP3 booleans), ``float`` bulk strings (RESP3 doubles), ``str``/``bytes`` bulk
    strings, sequences arrays, mappings flat key/value arrays (RESP3 maps)."""
    out: list[bytes] = []
    _encode(value, proto, out)
    return b"".join(out)


def _encode(v: Any, proto: int, out: list[bytes]) -> None:
    # Exact-type fast paths for what replies are made of (a search reply is ~40 values);
    # subclasses (SimpleString, ErrorReply, bool) and the rest take the general path.
    t = type(v)
    if t is str:
        data = v.encode()
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    elif t is list or t is tuple:
        out.append(b"*%d\r\n" % len(v))
        for item in v:
            _encode(item, proto, out)
    elif t is float:
        text = repr(v).encode()
        out.append(b",%b\r\n" % text if proto == 3 else b"$%d\r\n%b\r\n" % (len(text), text))
    elif t is int:
        out.append(b":%d\r\n" % v)
    elif t is dict:
        out.append(b"%%%d\r\n" % len(v) if proto == 3 else b"*%d\r\n" % (2 * len(v)))
        for key, item in v.items():
            data = (key if type(key) is str else str(key)).encode()
            out.append(b"$%d\r\n%b\r\n" % (len(data), data))
            ti = type(item)  # the scalars of a flat map (a search's debug) inline
            if ti is str:
                data = item.encode()
                out.append(b"$%d\r\n%b\r\n" % (len(data), data))
            elif ti is int:
                out.append(b":%d\r\n" % item)
            else:
                _encode(item, proto, out)
    elif t is Encoded:
        out.append(v)
    else:
        _encode_general(v, proto, out)


def _encode_general(v: Any, proto: int, out: list[bytes]) -> None:
    if isinstance(v, np.generic):
        v = v.item()
    if v is None:
        out.append(b"_\r\n" if proto == 3 else b"$-1\r\n")
    elif isinstance(v, (SimpleString, ErrorReply)):
        text = re.sub(r"[\r\n]+", " ", v).encode()
        out.append((b"+" if isinstance(v, SimpleString) else b"-") + text + CRLF)
    elif isinstance(v, (str, bytes, bytearray, memoryview)):
        data = v.encode() if isinstance(v, str) else bytes(v)
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    elif isinstance(v, bool):
        if proto == 3:
            out.append(b"#t\r\n" if v else b"#f\r\n")
        else:
            out.append(b":1\r\n" if v else b":0\r\n")
    elif isinstance(v, int):
        out.append(b":%d\r\n" % v)
    elif isinstance(v, float):
        text = repr(v).encode()
        out.append(b",%b\r\n" % text if proto == 3 else b"$%d\r\n%b\r\n" % (len(text), text))
    elif isinstance(v, Mapping):
        out.append(b"%%%d\r\n" % len(v) if proto == 3 else b"*%d\r\n" % (2 * len(v)))
        for key, item in v.items():
            _encode(str(key), proto, out)
            _encode(item, proto, out)
    elif isinstance(v, Sequence | np.ndarray):
        out.append(b"*%d\r\n" % len(v))
        for item in v:
            _encode(item, proto, out)
    else:
        raise TypeError(f"cannot encode {type(v).__name__} as RESP")
