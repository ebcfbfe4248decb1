"""The data plane over RESP, so that ``redis-cli`` and redis-py work unchanged.

Wire (:mod:`streams.service.resp_wire`): RESP2 by default, RESP3 after ``HELLO 3`` (redis-py
>= 8 sends it on connect); vectors travel as raw fp32 little-endian bulk strings. A malformed
frame is answered with ``-ERR Protocol error: ...`` and the connection is closed, as Redis
does; the commands before it in the same read are answered first.

Commands (case-insensitive): ``PING ECHO COMMAND [DOCS] CLIENT SETNAME|GETNAME|SETINFO|ID
HELLO [2|3] AUTH SELECT 0 INFO QUIT`` and the data plane::

    VEC.CREATE tenant index DIM d [METRIC cosine|ip|l2] [DTYPE fp32|fp16|int8] [RECIPE r]
               [FIELDS name tag|numeric [name tag|numeric ...]]          -> position token
    VEC.ADD|VEC.UPSERT tenant index id VECTOR <fp32 bytes> [META json] [TAGS a,b]
               [NUM k v [k v ...]] [IF_VERSION v (UPSERT only)]         -> position token
    VEC.MADD tenant index id <fp32 bytes> [id <fp32 bytes> ...]          -> [token|error, ...]
    VEC.DEL tenant index id                                              -> position token
    VEC.GET tenant index id [CONSISTENCY level [token ...]]              -> map
    VEC.SEARCH tenant index [TOPK k] VECTOR <fp32 bytes> [FILTER expr]
               [CONSISTENCY level [token ...]] [TIMEOUT ms] [BOUND ms]
               [EF n (efSearch of this search; uncached)]
               [SESSION id (client session, 1..128 chars: query log, prefetch)] -> [hits, debug]
    VEC.INFO tenant index                                                -> map
    VEC.LIST [tenant]                                                    -> ["tenant/index", ...]
    VEC.ARCHIVED tenant index                          -> ids the capacity manager archived
    VEC.RESTORE tenant index id [id ...]               -> position tokens (streams.capacity)
    VEC.CREATE tenant index EMBEDDER name [METRIC m] [RECIPE r] [FIELDS ...]  -> position token
    VEC.SOURCE tenant index source_id TEXT <text> [TYPE file|web|chat|other] [META json]
               [TITLE t] [URI u] [CHANNEL c] [USER u] [IF_VERSION v]     -> position token
    VEC.SOURCEDEL tenant index source_id                                 -> position token
    VEC.QUERY tenant index [TOPK k] TEXT <text> [MODE dense|keyword|hybrid] [ALPHA a]
               [FILTER expr] [CONSISTENCY level [token ...]] [TIMEOUT ms]
               [SESSION id]                                              -> [hits, debug]

Options come in any order (so ``redis-cli -x ... VECTOR`` can pass the vector from stdin as
the last argument). ``NUM`` takes pairs until the next keyword and may be repeated. Maps are
flat key/value arrays in RESP2 and real maps in RESP3; floats (scores, numeric fields) are
bulk strings in RESP2 and doubles in RESP3, as Redis answers ZSCORE. In ``VEC.INFO`` and the
search debug map, nested values are JSON text. A search hit is ``[id, score, meta]``.

Errors: ``-VEC_ERR_* message`` from :class:`VecError` (syntax and arity of ``VEC.*`` are
``VEC_ERR_INVALID``); Redis-style ``-ERR ...`` for the Redis commands and unknown commands.
Nothing is appended when a command is refused: arguments are checked before the data plane
is called, and the data plane validates before it appends.

Threads: a call that may wait runs in the server's thread pool, the rest on the event loop.
Reads at ``eventual`` consistency are inline; reads at any other level wait for positions;
writes wait until the record is durable (an fsync, or acks from all in-sync replicas), so
they are run in the pool too. A write on the event loop would stall every connection for a
disk or broker round trip and defeat the log's group commit, which needs concurrent
appenders. Commands of one connection are executed and answered strictly in order;
``VEC.ADD``/``VEC.UPSERT`` commands pipelined back to back are written as one batch (one
log append, one group commit), each still answered on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import itertools
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from streams import __version__
from streams.capacity import CapacityManager
from streams.index.exceptions import InvalidRequest, NotFound, VecError
from streams.index.model import (
    Consistency,
    Dtype,
    FieldKind,
    FilterField,
    IndexConfig,
    Metric,
    Vector,
    VectorUpsert,
)
from streams.ingest.service import IngestService, QueryRequest
from streams.ingest.source import Source, SourceType
from streams.service.api import DataPlane, SearchRequest, SearchResponse
from streams.service.metrics import METRICS, OK, ServiceMetrics
from streams.service.resp_wire import (
    Encoded,
    ErrorReply,
    ParserLimits,
    ProtocolError,
    Reply,
    RespParser,
    SimpleString,
    encode_reply,
    printable,
)
from streams.service.vector_service import CachedHits
from streams.text.neighbors import neighbors as graph_neighbors

__all__ = ["Offload", "RespServer", "serve_in_thread", "serve_resp"]

log = logging.getLogger(__name__)

_INT_RE = re.compile(rb"-?[0-9]{1,18}")
_READ_SIZE = 256 * 1024
_FLUSH_BYTES = 1 << 20


def _json_default(obj: Any) -> Any:
    """``json.dumps(default=...)`` for what stats and debug dicts hold besides JSON."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _flat(d: Mapping[str, Any], entry_memo: dict[Any, Any] | None = None) -> dict[str, Reply]:
    """Top-level pairs of ``d``; values that are not scalars become JSON text.
    ``entry_memo``: a cache hit's memo (:class:`CachedHits`), where the JSON of the
    values that come from the cached entry (``decision``, ``cached_at``) is kept."""
    out: dict[str, Reply] = {}
    for key, value in d.items():
        t = type(value)
        if t in _SCALARS:
            out[key if type(key) is str else str(key)] = value
            continue
        if isinstance(value, np.generic):
            value = value.item()
        if value is None or isinstance(value, (bool, int, float, str)):
            out[str(key)] = value
        elif entry_memo is not None and key in _FROM_ENTRY:
            text = entry_memo.get(("json", key))
            if text is None:
                text = entry_memo[("json", key)] = json.dumps(value, default=_json_default)
            out[key] = text
        elif t is list and len(value) <= 16 and all(type(x) is str for x in value):
            out[str(key)] = _json_strings(value)
        else:
            out[str(key)] = json.dumps(value, default=_json_default)
    return out


_SCALARS = frozenset({str, int, float, bool, type(None)})
_FROM_ENTRY = frozenset({"decision", "cached_at"})  # a cache hit's debug: the entry's
_STRING_LISTS: dict[tuple[str, ...], str] = {}  # JSON of recent position-token lists


def _json_strings(value: list[str]) -> str:
    """``json.dumps`` of a short list of strings (the applied position tokens: the same
    list for every search between two applied batches), remembered."""
    key = tuple(value)
    text = _STRING_LISTS.get(key)
    if text is None:
        if len(_STRING_LISTS) >= 256:
            _STRING_LISTS.clear()
        text = _STRING_LISTS[key] = json.dumps(value)
    return text


def _search_reply(response: SearchResponse, proto: int) -> Reply:
    """``[hits, debug]`` of VEC.SEARCH, encoded here. The hits of a cache hit are encoded
    once per entry, ``k`` and protocol and kept in the entry's memo (the entry never
    changes); the debug map is encoded directly (:func:`_encode_flat`)."""
    hits = response.hits
    if type(hits) is CachedHits:
        memo = hits.derived
        key = ("resp", hits.k, proto)
        encoded = memo.get(key)
        if encoded is None:
            rows = [[h.id, float(h.score), h.meta] for h in hits]
            encoded = memo[key] = Encoded(encode_reply(rows, proto))
        return Encoded(b"*2\r\n" + encoded + _encode_flat(response.debug, proto, memo))
    rows = [[h.id, float(h.score), h.meta] for h in hits]
    return Encoded(b"*2\r\n" + encode_reply(rows, proto) + _encode_flat(response.debug, proto))


def _encode_flat(
    d: Mapping[str, Any], proto: int, entry_memo: dict[Any, Any] | None = None
) -> bytes:
    """``encode_reply(_flat(d, entry_memo), proto)`` without the intermediate map: the
    same bytes (tests/test_cache_hot_path.py compares them), a search's debug map written
    in one pass. Scalars inline; the rest as :func:`_flat` makes them (JSON text)."""
    out = [b"%%%d\r\n" % len(d) if proto == 3 else b"*%d\r\n" % (2 * len(d))]
    append = out.append
    for key, value in d.items():
        head = _KEY_BULKS.get(key)
        if head is None:
            data = (key if type(key) is str else str(key)).encode()
            head = b"$%d\r\n%b\r\n" % (len(data), data)
            if type(key) is str and len(_KEY_BULKS) < 1024:  # debug keys: a fixed set
                _KEY_BULKS[key] = head
        append(head)
        t = type(value)
        if t is str:
            data = value.encode()
            append(b"$%d\r\n%b\r\n" % (len(data), data))
        elif t is int:
            append(b":%d\r\n" % value)
        elif t is bool:
            append(
                (b"#t\r\n" if value else b"#f\r\n")
                if proto == 3
                else (b":1\r\n" if value else b":0\r\n")
            )
        elif value is None:
            append(b"_\r\n" if proto == 3 else b"$-1\r\n")
        elif t is float:
            text = repr(value).encode()
            append(b",%b\r\n" % text if proto == 3 else b"$%d\r\n%b\r\n" % (len(text), text))
        elif (
            entry_memo is not None
            and key in _FROM_ENTRY
            and not isinstance(value, (np.generic, str, int, float))
        ):  # as _flat does
            bulk: bytes | None = entry_memo.get(("bulk", key))
            if bulk is None:
                js = entry_memo.get(("json", key))
                if js is None:
                    js = entry_memo[("json", key)] = json.dumps(value, default=_json_default)
                data = js.encode()
                bulk = entry_memo[("bulk", key)] = b"$%d\r\n%b\r\n" % (len(data), data)
            append(bulk)
        elif t is list and len(value) <= 16 and all(type(x) is str for x in value):
            append(_json_strings_bulk(value))
        elif t is dict and (float_map := _float_map_json(value)) is not None:
            data = float_map.encode()
            append(b"$%d\r\n%b\r\n" % (len(data), data))
        else:
            append(encode_reply(_flat({key: value}, entry_memo)[str(key)], proto))
    return b"".join(out)


_KEY_BULKS: dict[str, bytes] = {}  # a debug key's bulk string
_STRING_LIST_BULKS: dict[tuple[str, ...], bytes] = {}  # _json_strings as a bulk string


def _json_strings_bulk(value: list[str]) -> bytes:
    key = tuple(value)
    bulk = _STRING_LIST_BULKS.get(key)
    if bulk is None:
        if len(_STRING_LIST_BULKS) >= 256:
            _STRING_LIST_BULKS.clear()
        data = _json_strings(value).encode()
        bulk = _STRING_LIST_BULKS[key] = b"$%d\r\n%b\r\n" % (len(data), data)
    return bulk


# per key tuple of a float map: its JSON as a %-format, or None when a key needs escaping
_FLOAT_MAP_FORMATS: dict[tuple[Any, ...], str | None] = {}


def _float_map_json(value: dict[Any, Any]) -> str | None:
    """``json.dumps(value)`` of a small map of plain identifiers to finite floats (the
    latency breakdown), or None for any other map (then :func:`_flat` encodes it)."""
    keys = tuple(value)
    fmt = _FLOAT_MAP_FORMATS.get(keys, "")
    if fmt == "":
        plain = all(type(k) is str and k.isidentifier() and k.isascii() for k in keys)
        fmt = "{" + ", ".join(f'"{k}": %r' for k in keys) + "}" if plain else None
        if len(_FLOAT_MAP_FORMATS) < 256:
            _FLOAT_MAP_FORMATS[keys] = fmt
    if fmt is None:
        return None
    values = tuple(value.values())
    for v in values:
        if type(v) is not float or not math.isfinite(v):
            return None
    return fmt % values


# -- commands -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Offload:
    """A command's work that may block: the server runs it in its thread pool."""

    call: Callable[[], Reply]


@dataclass(slots=True)
class _Session:
    id: int
    proto: int = 2
    name: str | None = None
    closing: bool = False


_KEYWORD_BYTES: dict[frozenset[str], dict[bytes, str]] = {}


def _keyword_bytes(keywords: frozenset[str]) -> dict[bytes, str]:
    """``keywords`` by their upper-case bytes: the usual spelling is found without
    decoding and upper-casing the argument (one dict probe per option)."""
    table = _KEYWORD_BYTES.get(keywords)
    if table is None:
        table = _KEYWORD_BYTES[keywords] = {kw.encode(): kw for kw in keywords}
    return table


class _Args:
    """A cursor over one command's arguments; every error is VEC_ERR_INVALID."""

    def __init__(self, command: str, args: list[bytes], keywords: frozenset[str] = frozenset()):
        self.command, self.args, self.keywords, self.i = command, args, keywords, 0
        self._upper = _keyword_bytes(keywords)

    def more(self) -> bool:
        return self.i < len(self.args)

    def _keyword(self, data: bytes) -> str | None:
        kw = self._upper.get(data)
        if kw is None:
            word = data.decode("latin-1").upper()
            kw = word if word in self.keywords else None
        return kw

    def at_keyword(self) -> bool:
        return self.more() and self._keyword(self.args[self.i]) is not None

    def raw(self, what: str) -> bytes:
        if not self.more():
            raise InvalidRequest(f"{self.command}: {what} is missing", field=what)
        self.i += 1
        return self.args[self.i - 1]

    def text(self, what: str) -> str:
        try:
            return self.raw(what).decode()
        except UnicodeDecodeError:
            raise InvalidRequest(f"{self.command}: {what} is not UTF-8", field=what) from None

    def integer(self, what: str, low: int = 0) -> int:
        data = self.raw(what)
        if len(data) <= 18 and data.isdigit():  # the usual case: no sign, ASCII digits
            value = int(data)
            if value >= low:
                return value
        elif _INT_RE.fullmatch(data) and int(data) >= low:
            return int(data)
        raise InvalidRequest(f"{self.command}: {what} must be an integer >= {low}", field=what)

    def number(self, what: str) -> float:
        try:
            return float(self.raw(what))
        except ValueError:
            raise InvalidRequest(f"{self.command}: {what} must be a number", field=what) from None

    def choice(self, what: str, kind: type[enum.StrEnum]) -> Any:
        value = self.text(what).lower()
        try:
            return kind(value)
        except ValueError:
            allowed = "|".join(m.value for m in kind)
            raise InvalidRequest(f"{self.command}: {what} must be {allowed}", field=what) from None

    def options(self) -> Iterator[str]:
        """Yield each option keyword (upper case); a keyword given twice is refused,
        except ``NUM``."""
        seen: set[str] = set()
        while self.more():
            data = self.args[self.i]
            found = self._upper.get(data)
            if found is None:
                kw = self.text("option").upper()
                if kw not in self.keywords:
                    raise InvalidRequest(
                        f"{self.command}: unknown option {printable(kw.encode())!r}"
                    )
            else:
                kw, self.i = found, self.i + 1
            if kw in seen and kw != "NUM":
                raise InvalidRequest(f"{self.command}: {kw} given twice", field=kw.lower())
            seen.add(kw)
            yield kw

    def session_id(self) -> str:
        """A client session id (``SESSION``): 1 to 128 characters of UTF-8, as HTTP's
        ``session_id``; the query log and the prefetcher key on it."""
        value = self.text("session_id")
        if not 1 <= len(value) <= MAX_SESSION_ID:
            raise InvalidRequest(
                f"{self.command}: SESSION must be 1 to {MAX_SESSION_ID} characters",
                field="session_id",
            )
        return value

    def tokens(self) -> tuple[str, ...]:
        out = []
        while self.more() and not self.at_keyword():
            out.append(self.text("token"))
        return tuple(out)

    def end(self) -> None:
        if self.more():
            raise InvalidRequest(f"wrong number of arguments for {self.command!r}")


def _vector(data: bytes) -> Vector:
    """fp32 little-endian bytes -> float32 array; the data plane checks dim and finiteness."""
    if len(data) % 4:
        raise InvalidRequest(
            "VECTOR must be fp32 little-endian bytes (a multiple of 4)", field="vector"
        )
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


_CREATE_KW = frozenset({"DIM", "METRIC", "DTYPE", "RECIPE", "FIELDS", "EMBEDDER"})
_SOURCE_KW = frozenset({"TEXT", "TYPE", "META", "TITLE", "URI", "CHANNEL", "USER", "IF_VERSION"})
_QUERY_KW = frozenset(
    {"TOPK", "TEXT", "MODE", "FILTER", "CONSISTENCY", "TIMEOUT", "BOUND", "ALPHA", "SESSION"}
)
_WRITE_KW = frozenset({"VECTOR", "META", "TAGS", "NUM", "IF_VERSION"})
_SEARCH_KW = frozenset(
    {"TOPK", "VECTOR", "FILTER", "CONSISTENCY", "TIMEOUT", "BOUND", "EF", "SESSION"}
)
MAX_SESSION_ID = 128  # characters, as HTTP's ``session_id``
# Pipelined back to back, these are written as one batch (RespServer._write_run).
_BATCHED_WRITES = frozenset({b"VEC.ADD", b"VEC.UPSERT"})
_MAX_WRITE_RUN = 4096
_GET_KW = frozenset({"CONSISTENCY"})
_NEIGHBORS_KW = frozenset({"HOPS", "K", "CONSISTENCY"})

Handler = Callable[[_Session, list[bytes]], "Reply | Offload"]


class RespServer:
    """Serves ``dataplane`` over RESP on ``host:port`` (port 0 picks a free one; read
    :attr:`port` after :meth:`start`). ``executor`` runs blocking calls (default: a pool of
    ``max_workers`` threads owned and shut down by this server)."""

    def __init__(
        self,
        dataplane: DataPlane,
        host: str = "127.0.0.1",
        port: int = 6380,
        *,
        metrics: ServiceMetrics = METRICS,
        executor: Executor | None = None,
        max_workers: int = 32,
        limits: ParserLimits | None = None,
        ingest: IngestService | None = None,
    ) -> None:
        self.dataplane, self.host, self.port = dataplane, host, port
        self.ingest = ingest  # VEC.SOURCE, VEC.QUERY, VEC.CREATE ... EMBEDDER
        self.metrics, self.limits = metrics, limits or ParserLimits()
        self._owns_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers, thread_name_prefix="resp")
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._processed = 0
        # work the data plane does on this thread once a reply is sent (the query log's
        # encoding: VectorService.after_reply)
        self._after_reply: Callable[[], object] | None = getattr(dataplane, "after_reply", None)
        # (command, code) -> the counter's inc and the histogram's observe of those labels:
        # prometheus_client's ``labels()`` is a locked lookup per call (label values are
        # bounded: known commands and codes, see streams.service.metrics)
        self._observers: dict[
            tuple[str, str], tuple[Callable[[], None], Callable[[float], None]]
        ] = {}
        self._commands: dict[bytes, tuple[str, Handler]] = {
            name.encode(): (name, handler)
            for name, handler in {
                "PING": self._ping,
                "ECHO": self._echo,
                "COMMAND": self._command,
                "CLIENT": self._client,
                "HELLO": self._hello,
                "AUTH": self._auth,
                "SELECT": self._select,
                "INFO": self._info,
                "QUIT": self._quit,
                "VEC.CREATE": self._vec_create,
                "VEC.ADD": self._vec_add,
                "VEC.UPSERT": self._vec_upsert,
                "VEC.DEL": self._vec_del,
                "VEC.MADD": self._vec_madd,
                "VEC.GET": self._vec_get,
                "VEC.SEARCH": self._vec_search,
                "VEC.INFO": self._vec_info,
                "VEC.LIST": self._vec_list,
                "VEC.ARCHIVED": self._vec_archived,
                "VEC.RESTORE": self._vec_restore,
                "VEC.SOURCE": self._vec_source,
                "VEC.SOURCEDEL": self._vec_sourcedel,
                "VEC.QUERY": self._vec_query,
                "VEC.NEIGHBORS": self._vec_neighbors,
            }.items()
        }

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> asyncio.Server:
        self._server = await asyncio.start_server(self._connection, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self._server

    async def serve(self) -> None:
        """Start (unless started) and serve until cancelled; then close."""
        server = self._server or await self.start()
        try:
            await server.serve_forever()
        finally:
            await self.close()

    async def close(self, grace_s: float = 5.0) -> None:
        """Stop listening, close every client connection, wait up to ``grace_s`` for their
        handlers (a call in the thread pool finishes, its reply is dropped), then cancel
        what is left and release the thread pool."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for task in pending:
                task.cancel()
        if self._server is not None:
            await self._server.wait_closed()
        if self._owns_executor:
            self._executor.shutdown(wait=False)

    # -- connections ----------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = _Session(next(self._ids))
        parser = RespParser(self.limits)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._writers.add(writer)
        self.metrics.connections.inc()
        try:
            while not session.closing:
                data = await reader.read(_READ_SIZE)
                if not data:
                    break
                parser.feed(data)
                await self._pipeline(parser, session, writer)
        except ConnectionError:
            log.debug("RESP client %d went away", session.id)  # nothing left to answer
        except asyncio.CancelledError:
            # A root task nobody awaits: cancelled only by close() or loop shutdown. Ending
            # normally keeps Python 3.11's stream callback from logging the cancellation.
            log.debug("RESP client %d closed by shutdown", session.id)
        finally:
            if task is not None:
                self._tasks.discard(task)
            self._writers.discard(writer)
            self.metrics.connections.dec()
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _pipeline(
        self, parser: RespParser, session: _Session, writer: asyncio.StreamWriter
    ) -> None:
        """Execute every complete command buffered, answering in order with few writes."""
        out: list[bytes] = []
        size = 0
        held: list[bytes] | None = None  # a command a write run read ahead
        for n in itertools.count(1):
            try:
                args, held = (held, None) if held is not None else (parser.next_command(), None)
            except ProtocolError as exc:
                self.metrics.protocol_errors.inc()
                out.append(encode_reply(ErrorReply(f"ERR Protocol error: {exc}")))
                session.closing = True
                break
            if args is None:
                break
            if args[0].upper() in _BATCHED_WRITES:
                replies, held = await self._write_run(parser, session, args)
                chunk = b"".join(encode_reply(r, session.proto) for r in replies)
            else:
                chunk = encode_reply(await self._execute(session, args), session.proto)
            out.append(chunk)
            size += len(chunk)
            if session.closing:
                break
            if size >= _FLUSH_BYTES or n % 256 == 0:  # bound memory; let others run
                writer.write(b"".join(out))
                out, size = [], 0
                await writer.drain()
                await asyncio.sleep(0)
        if out:
            writer.write(b"".join(out))
            await writer.drain()
        if self._after_reply is not None:
            try:
                self._after_reply()
            except Exception:  # the data plane's housekeeping never costs a connection
                log.exception("RESP: after-reply work failed")

    async def _write_run(
        self, parser: RespParser, session: _Session, first: list[bytes]
    ) -> tuple[list[Reply], list[bytes] | None]:
        """Pipelined ``VEC.ADD``/``VEC.UPSERT`` commands buffered back to back, as one
        ``upsert_many`` (one log append, one group commit): their replies in order, and
        the next command if one was read ahead. A command refused by its arguments or the
        data plane gets its own error reply; the others are written. A protocol error
        after the run is left for the next read to raise (the parser repeats it)."""
        run = [first]
        held: list[bytes] | None = None
        while len(run) < _MAX_WRITE_RUN:
            try:
                nxt = parser.next_command()
            except ProtocolError:
                break
            if nxt is None:
                break
            if nxt[0].upper() not in _BATCHED_WRITES:
                held = nxt
                break
            run.append(nxt)
        if len(run) == 1:
            return [await self._execute(session, first)], held
        t0 = time.perf_counter()
        self._processed += len(run)
        replies: list[Reply] = [None] * len(run)
        records: list[VectorUpsert] = []
        conds: list[int | None] = []
        slots: list[int] = []
        for i, args in enumerate(run):
            name = "VEC.ADD" if args[0].upper() == b"VEC.ADD" else "VEC.UPSERT"
            try:
                record, if_version = self._write_record(name, args[1:])
            except VecError as exc:
                replies[i] = ErrorReply(f"{exc.code} {exc}")
                continue
            records.append(record)
            conds.append(0 if name == "VEC.ADD" else if_version)
            slots.append(i)
        if records:
            loop = asyncio.get_running_loop()
            try:
                results = await loop.run_in_executor(
                    self._executor, lambda: self.dataplane.upsert_many(records, conds)
                )
                for i, result in zip(slots, results, strict=True):
                    replies[i] = (
                        ErrorReply(f"{result.code} {result}")
                        if isinstance(result, VecError)
                        else result.token
                    )
            except Exception:
                log.exception("RESP pipelined writes failed")
                for i in slots:
                    replies[i] = ErrorReply("ERR internal error (logged by the server)")
        each = (time.perf_counter() - t0) / len(run)
        for args, reply in zip(run, replies, strict=True):
            label = "VEC.ADD" if args[0].upper() == b"VEC.ADD" else "VEC.UPSERT"
            code = reply.split(" ", 1)[0] if isinstance(reply, ErrorReply) else OK
            self._observe(label, code, each)
        return replies, held

    async def _execute(self, session: _Session, args: list[bytes]) -> Reply:
        t0 = time.perf_counter()
        self._processed += 1
        entry = self._commands.get(args[0].upper())
        label = entry[0] if entry else "UNKNOWN"
        reply: Reply
        try:
            if entry is None:
                reply = ErrorReply(f"ERR unknown command '{printable(args[0])}'")
            else:
                result = entry[1](session, args[1:])
                if isinstance(result, Offload):
                    loop = asyncio.get_running_loop()
                    result = await loop.run_in_executor(self._executor, result.call)
                reply = result
            code = "ERR" if isinstance(reply, ErrorReply) else OK
        except VecError as exc:
            reply, code = ErrorReply(f"{exc.code} {exc}"), exc.code
        except Exception:
            log.exception("RESP command %s failed", label)
            reply, code = ErrorReply("ERR internal error (logged by the server)"), "ERR"
        self._observe(label, code, time.perf_counter() - t0)
        return reply

    def _observe(self, label: str, code: str, seconds: float) -> None:
        """``metrics.observe("resp", label, code, seconds)`` with the labelled children
        looked up once per (command, code)."""
        pair = self._observers.get((label, code))
        if pair is None:
            metrics = self.metrics
            pair = self._observers[(label, code)] = (
                metrics.requests.labels("resp", label, code).inc,
                metrics.latency.labels("resp", label).observe,
            )
        pair[0]()
        pair[1](seconds)

    # -- Redis commands -------------------------------------------------------------------
    def _ping(self, s: _Session, args: list[bytes]) -> Reply:
        if len(args) > 1:
            return ErrorReply("ERR wrong number of arguments for 'ping' command")
        return args[0] if args else SimpleString("PONG")

    def _echo(self, s: _Session, args: list[bytes]) -> Reply:
        if len(args) != 1:
            return ErrorReply("ERR wrong number of arguments for 'echo' command")
        return args[0]

    def _command(self, s: _Session, args: list[bytes]) -> Reply:
        sub = args[0].upper() if args else b""
        if sub == b"COUNT":
            return 0
        return {} if sub == b"DOCS" else []  # no command table: clients fall back to none

    def _client(self, s: _Session, args: list[bytes]) -> Reply:
        sub = args[0].upper() if args else b""
        if sub == b"SETNAME" and len(args) == 2:
            s.name = args[1].decode("utf-8", "replace")
            return SimpleString("OK")
        if sub == b"GETNAME":
            return s.name
        if sub == b"SETINFO":
            return SimpleString("OK")
        if sub == b"ID":
            return s.id
        return ErrorReply(f"ERR unknown subcommand '{printable(sub)}'")

    def _hello(self, s: _Session, args: list[bytes]) -> Reply:
        """``HELLO [2|3 [AUTH user pass] [SETNAME name]]``. There is no authentication on
        this port yet: credentials are accepted, as by Redis's default ``nopass`` user."""
        if args:
            if args[0] not in (b"2", b"3"):
                return ErrorReply("NOPROTO unsupported protocol version")
            for i, word in enumerate(args[1:-1], 1):
                if word.upper() == b"SETNAME":
                    s.name = args[i + 1].decode("utf-8", "replace")
            s.proto = int(args[0])
        return {
            "server": "streamvec",
            "version": __version__,
            "proto": s.proto,
            "id": s.id,
            "mode": "standalone",
            "role": "master",
            "modules": [],
        }

    def _auth(self, s: _Session, args: list[bytes]) -> Reply:
        return SimpleString("OK") if args else ErrorReply("ERR wrong number of arguments")

    def _select(self, s: _Session, args: list[bytes]) -> Reply:
        return SimpleString("OK") if args == [b"0"] else ErrorReply("ERR DB index is out of range")

    def _info(self, s: _Session, args: list[bytes]) -> Reply:
        lines = [
            "# Server",
            "server:streamvec",
            f"streamvec_version:{__version__}",
            "redis_mode:standalone",
            f"tcp_port:{self.port}",
            "",
            "# Clients",
            f"connected_clients:{len(self._writers)}",
            "",
            "# Stats",
            f"total_commands_processed:{self._processed}",
            "",
        ]
        return "\r\n".join(lines)

    def _quit(self, s: _Session, args: list[bytes]) -> Reply:
        s.closing = True
        return SimpleString("OK")

    # -- the data plane -------------------------------------------------------------------
    def _vec_create(self, s: _Session, args: list[bytes]) -> Reply | Offload:
        a = _Args("VEC.CREATE", args, _CREATE_KW)
        tenant, index = a.text("tenant"), a.text("index")
        opts: dict[str, Any] = {}
        fields: list[FilterField] = []
        embedder: str | None = None
        for kw in a.options():
            if kw == "EMBEDDER":
                embedder = a.text("embedder")
            elif kw == "DIM":
                opts["dim"] = a.integer("dim", 1)
            elif kw == "METRIC":
                opts["metric"] = a.choice("metric", Metric)
            elif kw == "DTYPE":
                opts["dtype"] = a.choice("dtype", Dtype)
            elif kw == "RECIPE":
                opts["recipe"] = a.text("recipe")
            else:  # FIELDS: pairs while the second word is a kind
                while a.i + 1 < len(a.args) and a.args[a.i + 1].lower() in (b"tag", b"numeric"):
                    fields.append(FilterField(a.text("field"), a.choice("kind", FieldKind)))
                if not fields:
                    raise InvalidRequest(
                        "VEC.CREATE: FIELDS needs name tag|numeric pairs", field="fields"
                    )
        if embedder is not None:
            return self._create_text_index(tenant, index, embedder, opts, tuple(fields))
        if "dim" not in opts:
            raise InvalidRequest("VEC.CREATE: DIM is required", field="dim")
        config = IndexConfig(tenant, index, fields=tuple(fields), **opts)
        return Offload(lambda: self.dataplane.create_index(config).token)

    def _write_record(self, command: str, args: list[bytes]) -> tuple[VectorUpsert, int | None]:
        keywords = _WRITE_KW if command == "VEC.UPSERT" else _WRITE_KW - {"IF_VERSION"}
        a = _Args(command, args, keywords)
        tenant, index, id = a.text("tenant"), a.text("index"), a.text("id")
        vector: Vector | None = None
        meta: str | None = None
        tags: tuple[str, ...] = ()
        numeric: dict[str, float] = {}
        if_version: int | None = None
        for kw in a.options():
            if kw == "VECTOR":
                vector = _vector(a.raw("vector"))
            elif kw == "META":
                meta = a.text("meta")
            elif kw == "TAGS":
                tags = tuple(t for t in a.text("tags").split(",") if t)
            elif kw == "NUM":
                while True:  # value after name: ``d[k] = v`` would read v first
                    name = a.text("numeric")
                    numeric[name] = a.number("numeric")
                    if not a.more() or a.at_keyword():
                        break
            else:
                if_version = a.integer("if_version", 0)
        if vector is None:
            raise InvalidRequest(f"{command}: VECTOR is required", field="vector")
        record = VectorUpsert(tenant, index, id, vector, meta, tags, numeric)
        return record, if_version

    def _vec_add(self, s: _Session, args: list[bytes]) -> Reply | Offload:
        record, _ = self._write_record("VEC.ADD", args)
        return Offload(lambda: self.dataplane.add(record).token)

    def _vec_madd(self, s: _Session, args: list[bytes]) -> Reply | Offload:
        """``VEC.MADD tenant index id <fp32 bytes> [id <fp32 bytes> ...]``: upserts written
        as one log append; per pair its position token or its own error reply."""
        a = _Args("VEC.MADD", args)
        tenant, index = a.text("tenant"), a.text("index")
        if not a.more() or (len(args) - 2) % 2:
            raise InvalidRequest("VEC.MADD: expected id vector pairs", field="vector")
        replies: list[Reply] = []
        records: list[VectorUpsert] = []
        slots: list[int] = []
        while a.more():
            id_raw, vec_raw = a.raw("id"), a.raw("vector")
            try:
                id = id_raw.decode()
                records.append(VectorUpsert(tenant, index, id, _vector(vec_raw)))
            except UnicodeDecodeError:
                replies.append(ErrorReply("VEC_ERR_INVALID VEC.MADD: id is not UTF-8"))
                continue
            except VecError as exc:
                replies.append(ErrorReply(f"{exc.code} {exc}"))
                continue
            slots.append(len(replies))
            replies.append(None)

        def run() -> Reply:
            results = self.dataplane.upsert_many(records)
            for i, result in zip(slots, results, strict=True):
                replies[i] = (
                    ErrorReply(f"{result.code} {result}")
                    if isinstance(result, VecError)
                    else result.token
                )
            return replies

        return Offload(run)

    def _vec_upsert(self, s: _Session, args: list[bytes]) -> Reply | Offload:
        record, if_version = self._write_record("VEC.UPSERT", args)
        return Offload(lambda: self.dataplane.upsert(record, if_version=if_version).token)

    def _vec_del(self, s: _Session, args: list[bytes]) -> Reply | Offload:
        a = _Args("VEC.DEL", args)
        tenant, index, id = a.text("tenant"), a.text("index"), a.text("id")
        a.end()
        return Offload(lambda: self.dataplane.delete(tenant, index, id).token)

    def _vec_get(self, s: _Session, args: list[bytes]) -> Reply | Offload:
        a = _Args("VEC.GET", args, _GET_KW)
        tenant, index, id = a.text("tenant"), a.text("index"), a.text("id")
        consistency: Consistency = Consistency.EVENTUAL
        tokens: tuple[str, ...] = ()
        for _ in a.options():
            consistency = a.choice("consistency", Consistency)
            tokens = a.tokens()

        def run() -> Reply:
            v = self.dataplane.get(tenant, index, id, consistency=consistency, tokens=tokens)
            return {
                "id": v.id,
                "vector": np.asarray(v.vector, "<f4").tobytes(),
                "meta": v.meta,
                "tags": list(v.tags),
                "numeric": {k: float(x) for k, x in v.numeric.items()},
                "version": int(v.version),
                "position": v.position,
            }

        return run() if consistency is Consistency.EVENTUAL else Offload(run)

    def _vec_search(self, s: _Session, args: list[bytes]) -> Reply | Offload:
        a = _Args("VEC.SEARCH", args, _SEARCH_KW)
        opts: dict[str, Any] = {"tenant": a.text("tenant"), "index": a.text("index")}
        for kw in a.options():
            if kw == "TOPK":
                opts["k"] = a.integer("k", 1)
            elif kw == "VECTOR":
                opts["vector"] = _vector(a.raw("vector"))
            elif kw == "FILTER":
                opts["filter"] = a.text("filter")
            elif kw == "CONSISTENCY":
                opts["consistency"] = a.choice("consistency", Consistency)
                opts["tokens"] = a.tokens()
            elif kw == "TIMEOUT":
                opts["timeout_ms"] = a.integer("timeout_ms", 1)
            elif kw == "EF":
                opts["ef"] = a.integer("ef", 1)
            elif kw == "SESSION":
                opts["session_id"] = a.session_id()
            else:
                opts["bound_ms"] = a.integer("bound_ms", 0)
        if "vector" not in opts:
            raise InvalidRequest("VEC.SEARCH: VECTOR is required", field="vector")
        request = SearchRequest(**opts)

        def run() -> Reply:
            return _search_reply(self.dataplane.search(request), s.proto)

        return run() if request.consistency is Consistency.EVENTUAL else Offload(run)

    def _vec_neighbors(self, s: _Session, args: list[bytes]) -> Reply | Offload:
        """``VEC.NEIGHBORS tenant index id [HOPS h] [K k] [CONSISTENCY level [token...]]``:
        ``[[id, score, hop, via, meta], ...]`` (streams.text.neighbors)."""
        a = _Args("VEC.NEIGHBORS", args, _NEIGHBORS_KW)
        tenant, index, id = a.text("tenant"), a.text("index"), a.text("id")
        hops, k = 1, 10
        consistency: Consistency = Consistency.EVENTUAL
        tokens: tuple[str, ...] = ()
        for kw in a.options():
            if kw == "HOPS":
                hops = a.integer("hops", 1)
            elif kw == "K":
                k = a.integer("k", 1)
            else:
                consistency = a.choice("consistency", Consistency)
                tokens = a.tokens()

        def run() -> Reply:
            found = graph_neighbors(
                self.dataplane, tenant, index, id, hops, k, consistency=consistency, tokens=tokens
            )
            return [[n.id, float(n.score), n.hop, n.via, n.meta] for n in found]

        return Offload(run)

    # -- the knowledge-base path (streams.ingest) -------------------------------------------
    def _ingest(self, command: str) -> IngestService:
        if self.ingest is None:
            raise InvalidRequest(f"{command}: this node runs no embedder processor")
        return self.ingest

    def _create_text_index(
        self,
        tenant: str,
        index: str,
        embedder: str,
        opts: dict[str, Any],
        fields: tuple[FilterField, ...],
    ) -> Offload:
        """``VEC.CREATE tenant index EMBEDDER name [METRIC m] [DTYPE d] [RECIPE r] [FIELDS
        ...]``: dim comes from the embedder (a DIM given must agree)."""
        ingest = self._ingest("VEC.CREATE")
        dim = opts.pop("dim", None)

        def run() -> Reply:
            model_dim = ingest.embedder(embedder).dim if dim is not None else None
            if dim is not None and dim != model_dim:
                raise InvalidRequest(
                    f"VEC.CREATE: DIM {dim} but embedder {embedder} gives {model_dim}", field="dim"
                )
            return ingest.create_text_index(tenant, index, embedder, fields=fields, **opts).token

        return Offload(run)

    def _vec_source(self, s: _Session, args: list[bytes]) -> Reply | Offload:
        """``VEC.SOURCE tenant index source_id TEXT <text> [TYPE file|web|chat|other]
        [META json] [TITLE t] [URI u] [CHANNEL c] [USER u] [IF_VERSION v]`` -> the
        position token of the Source on ``documents``."""
        ingest = self._ingest("VEC.SOURCE")
        a = _Args("VEC.SOURCE", args, _SOURCE_KW)
        tenant, index, id = a.text("tenant"), a.text("index"), a.text("source_id")
        opts: dict[str, Any] = {}
        if_version: int | None = None
        names = {
            "META": "meta",
            "TITLE": "title",
            "URI": "uri",
            "CHANNEL": "channel_id",
            "USER": "user_id",
            "TEXT": "text",
        }
        for kw in a.options():
            if kw == "TYPE":
                opts["type"] = a.choice("type", SourceType)
            elif kw == "IF_VERSION":
                if_version = a.integer("if_version", 0)
            else:
                opts[names[kw]] = a.text(names[kw])
        if "text" not in opts:
            raise InvalidRequest("VEC.SOURCE: TEXT is required", field="text")
        source = Source(tenant, index, id, **opts).validate()
        return Offload(lambda: ingest.put_source(source, if_version=if_version).token)

    def _vec_sourcedel(self, s: _Session, args: list[bytes]) -> Reply | Offload:
        """``VEC.SOURCEDEL tenant index source_id``: a tombstone; its chunks go."""
        ingest = self._ingest("VEC.SOURCEDEL")
        a = _Args("VEC.SOURCEDEL", args)
        tenant, index, id = a.text("tenant"), a.text("index"), a.text("source_id")
        a.end()
        return Offload(lambda: ingest.delete_source(tenant, index, id).token)

    def _vec_query(self, s: _Session, args: list[bytes]) -> Reply | Offload:
        """``VEC.QUERY tenant index [TOPK k] TEXT <text> [MODE dense|keyword|hybrid]
        [ALPHA a] [FILTER expr] [CONSISTENCY level [token ...]] [TIMEOUT ms] [BOUND ms]
        [SESSION id]`` -> ``[hits, debug]`` as VEC.SEARCH; each hit's meta holds its source
        id, chunk location and text. ``SESSION`` reaches the query log and the prefetcher
        with the query's dense search (modes dense and hybrid; keyword mode logs nothing)."""
        ingest = self._ingest("VEC.QUERY")
        a = _Args("VEC.QUERY", args, _QUERY_KW)
        opts: dict[str, Any] = {"tenant": a.text("tenant"), "index": a.text("index")}
        for kw in a.options():
            if kw == "TOPK":
                opts["k"] = a.integer("k", 1)
            elif kw == "TEXT":
                opts["text"] = a.text("text")
            elif kw == "MODE":
                mode = a.text("mode").lower()
                if mode not in ("dense", "keyword", "hybrid"):
                    raise InvalidRequest(
                        "VEC.QUERY: MODE must be dense|keyword|hybrid", field="mode"
                    )
                opts["mode"] = mode
            elif kw == "ALPHA":
                opts["alpha"] = a.number("alpha")
            elif kw == "FILTER":
                opts["filter"] = a.text("filter")
            elif kw == "CONSISTENCY":
                opts["consistency"] = a.choice("consistency", Consistency)
                opts["tokens"] = a.tokens()
            elif kw == "TIMEOUT":
                opts["timeout_ms"] = a.integer("timeout_ms", 1)
            elif kw == "SESSION":
                opts["session_id"] = a.session_id()
            else:
                opts["bound_ms"] = a.integer("bound_ms", 0)
        if "text" not in opts:
            raise InvalidRequest("VEC.QUERY: TEXT is required", field="text")
        request = QueryRequest(**opts)

        def run() -> Reply:  # embedding the query text is CPU work: always off the loop
            response = ingest.query(request)
            hits = [[h.id, float(h.score), h.meta] for h in response.hits]
            return [hits, _flat(response.debug)]

        return Offload(run)

    def _vec_info(self, s: _Session, args: list[bytes]) -> Reply:
        a = _Args("VEC.INFO", args)
        tenant, index = a.text("tenant"), a.text("index")
        a.end()
        return _flat(self.dataplane.info(tenant, index))

    def _capacity(self) -> CapacityManager:
        """The node's streams.capacity manager (the archive), or VEC_ERR_NOT_FOUND."""
        manager = getattr(self.dataplane, "admission", None)
        if not isinstance(manager, CapacityManager):
            raise NotFound("this node has no capacity manager (no archive)")
        return manager

    def _vec_archived(self, s: _Session, args: list[bytes]) -> Reply | Offload:
        a = _Args("VEC.ARCHIVED", args)
        tenant, index = a.text("tenant"), a.text("index")
        a.end()
        manager = self._capacity()
        return Offload(lambda: list(manager.archived_ids(tenant, index)))

    def _vec_restore(self, s: _Session, args: list[bytes]) -> Reply | Offload:
        a = _Args("VEC.RESTORE", args)
        tenant, index = a.text("tenant"), a.text("index")
        ids = [a.text("id")]
        while a.more():
            ids.append(a.text("id"))
        manager = self._capacity()
        return Offload(lambda: [p.token for p in manager.restore(tenant, index, ids).values()])

    def _vec_list(self, s: _Session, args: list[bytes]) -> Reply:
        a = _Args("VEC.LIST", args)
        tenant = a.text("tenant") if a.more() else None
        a.end()
        return [c.key for c in self.dataplane.list_indexes(tenant)]


async def serve_resp(dataplane: DataPlane, host: str, port: int) -> asyncio.Server:
    """Start a :class:`RespServer` on ``host:port`` with the default metrics and thread
    pool; returns the listening server. Use :class:`RespServer` directly to also close
    client connections and the pool on shutdown."""
    return await RespServer(dataplane, host, port).start()


@contextlib.contextmanager
def serve_in_thread(server: RespServer) -> Iterator[RespServer]:
    """Run ``server`` in a background thread with its own event loop until the block
    exits (tests, benchmarks, embedding in a synchronous program); ``server.port`` is set
    when the block starts."""
    started = threading.Event()
    failure: list[BaseException] = []
    holder: dict[str, Any] = {}

    async def main() -> None:
        holder["loop"] = asyncio.get_running_loop()
        holder["task"] = asyncio.current_task()
        try:
            await server.start()
        except BaseException as exc:
            failure.append(exc)
            raise
        finally:
            started.set()
        await server.serve()

    def run() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            asyncio.run(main())

    thread = threading.Thread(target=run, daemon=True, name="resp-server")
    thread.start()
    if not started.wait(10):
        raise RuntimeError("RESP server did not start")
    if failure:
        raise failure[0]
    try:
        yield server
    finally:
        holder["loop"].call_soon_threadsafe(holder["task"].cancel)
        thread.join(10)
