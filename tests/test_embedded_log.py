"""Behaviour of the embedded transport beyond the shared contract: durability across
reopen and kill -9, compaction, retention, corruption detection, concurrent appenders."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from streams.log import codec
from streams.log.embedded import Durability, EmbeddedLog
from streams.log.exceptions import TransportError
from streams.log.port import CleanupPolicy, Record, TopicSpec

ROOT = Path(__file__).resolve().parents[1]
HOUR = 3600_000


def read_all(log: EmbeddedLog, topic: str, partition: int = 0) -> list[tuple[int, bytes | None, bytes | None]]:  # noqa: E501
    out, off = [], 0
    while True:
        recs = log.read(topic, partition, off, 1000)
        if not recs:
            return out
        out += [(r.offset, r.key, r.value) for r in recs]
        off = recs[-1].offset + 1


@pytest.mark.parametrize("durability", list(Durability))
def test_reopen_keeps_records_offsets_and_commits(tmp_path: Path, durability: Durability) -> None:
    with EmbeddedLog(tmp_path, durability=durability) as log:
        log.create_topic(TopicSpec("t", 2))
        positions = log.append_batch([Record.of("t", f"k{i}", b"%d" % i) for i in range(100)])
        log.commit("g", {("t", 0): 3})
    with EmbeddedLog(tmp_path, durability=durability) as log:
        assert log.describe("t").partitions == 2
        assert log.end_offsets("t") == {
            p: sum(1 for x in positions if x.partition == p) for p in (0, 1)}
        assert log.committed("g", "t") == {0: 3}
        nxt = log.append("t", "k0", b"after")
        assert nxt.offset == log.end_offsets("t")[nxt.partition] - 1
        assert sum(len(read_all(log, "t", p)) for p in (0, 1)) == 101


def test_second_process_cannot_open_the_same_log(tmp_path: Path) -> None:
    with EmbeddedLog(tmp_path):
        code = (
            "import sys\nfrom streams.log.embedded import EmbeddedLog\n"
            "from streams.log.exceptions import TransportError\n"
            f"try:\n    EmbeddedLog({str(tmp_path)!r})\nexcept TransportError:\n    sys.exit(3)\n"
        )
        assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 3


def test_compaction_keeps_latest_per_key_drops_expired_tombstones_keeps_offsets(
    tmp_path: Path,
) -> None:
    now = 1_800_000_000_000
    with EmbeddedLog(tmp_path) as log:
        log.create_topic(TopicSpec("c", 1, CleanupPolicy.COMPACT, tombstone_retention_ms=HOUR))
        rng = random.Random(7)
        expected: dict[bytes, tuple[int, bytes | None, int]] = {}
        for i in range(2000):
            key = f"k{rng.randrange(150)}".encode()
            value = None if rng.random() < 0.1 else f"v{i}".encode()
            ts = now - 3 * HOUR + i  # everything is older than the tombstone retention...
            if i >= 1900:
                ts = now - 60_000  # ...except the last 100 records
            pos = log.append("c", key, value, timestamp_ms=ts)
            expected[key] = (pos.offset, value, ts)
        report = log.run_cleaner(now=now)
        got = read_all(log, "c")
        want = sorted(
            (off, k, v) for k, (off, v, ts) in expected.items()
            if v is not None or ts >= now - HOUR  # young tombstones stay readable
        )
        assert got == want
        assert report.compacted["c"] == 2000 - len(want)
        assert any(v is None for _o, _k, v in got)  # a young tombstone survived
        assert log.end_offsets("c") == {0: 2000}  # offsets unchanged, next append goes on
        assert log.append("c", "new", b"x").offset == 2000
        # a second pass has nothing left to do
        assert log.run_cleaner(now=now).compacted["c"] == 0


def test_time_retention_drops_only_old_records(tmp_path: Path) -> None:
    now = 1_800_000_000_000
    with EmbeddedLog(tmp_path) as log:
        log.create_topic(TopicSpec("d", 1, retention_ms=HOUR))
        for i in range(50):
            log.append("d", None, b"%d" % i, timestamp_ms=now - 2 * HOUR + i * 60_000 * 3)
        report = log.run_cleaner(now=now)
        got = read_all(log, "d")
        assert all(int(v or b"") * 3 * 60_000 >= HOUR for _o, _k, v in got)
        assert report.expired["d"] == 50 - len(got)
        assert log.start_offsets("d") == {0: got[0][0]}


def test_size_retention_keeps_partition_under_budget(tmp_path: Path) -> None:
    with EmbeddedLog(tmp_path) as log:
        log.create_topic(TopicSpec("s", 1, retention_ms=None, retention_bytes=50_000))
        for i in range(100):
            log.append("s", None, b"x" * 1000 + b"%d" % i)
        assert log.retained_bytes("s")[0] > 100_000
        log.run_cleaner()
        assert log.retained_bytes("s")[0] <= 50_000
        got = read_all(log, "s")
        assert got[-1][0] == 99 and len(got) < 50  # newest kept, oldest gone


def test_corrupt_record_is_detected_not_returned(tmp_path: Path) -> None:
    raw = codec.encode_record(b"k", b"value", 1, (("h", b"1"),))
    assert codec.decode_record(raw) == (b"k", b"value", 1, (("h", b"1"),))
    for i in range(len(raw)):
        torn = bytearray(raw)
        torn[i] ^= 0x40
        with pytest.raises(TransportError):
            codec.decode_record(bytes(torn))
    with pytest.raises(TransportError):
        codec.decode_record(raw[:10])


def test_concurrent_appenders_get_unique_consecutive_offsets(tmp_path: Path) -> None:
    with EmbeddedLog(tmp_path, durability="group", group_commit_ms=1) as log:
        log.create_topic(TopicSpec("t", 1))
        results: list[list[int]] = [[] for _ in range(8)]

        def writer(i: int) -> None:
            for j in range(200):
                results[i].append(log.append("t", f"w{i}", b"%d-%d" % (i, j)).offset)

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        offsets = sorted(o for r in results for o in r)
        assert offsets == list(range(1600))
        assert all(r == sorted(r) for r in results)  # each writer's order is kept
        by_offset = {o: v for o, _k, v in read_all(log, "t")}
        for i, r in enumerate(results):
            assert [by_offset[o] for o in r] == [b"%d-%d" % (i, j) for j in range(200)]


@pytest.mark.slow
@pytest.mark.parametrize("durability,window", [("sync", 1), ("group", 64), ("group", 1)])
def test_kill_9_loses_no_acknowledged_append(tmp_path: Path, durability: str, window: int) -> None:
    """A child appends 20,000 keyed records and is SIGKILLed at random moments; after each
    kill every acknowledged append is present exactly once, in order, and nothing torn is
    readable. The log is reopened and appended to again between kills."""
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    acked: dict[int, tuple[int, int]] = {}
    for _round in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.crash_child", str(tmp_path), durability, "20000",
             str(window)],
            cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )
        assert proc.stdout is not None
        kill_after = rng.randrange(50, 6000)
        lines = 0
        for line in proc.stdout:
            if line.startswith("ack"):
                _, seq, part, off = line.split()
                acked[(_round, int(seq))] = (int(part), int(off))  # type: ignore[index]
                lines += 1
                if lines >= kill_after:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
        proc.wait()
        rest = proc.stdout.read()
        for line in rest.splitlines():  # acks written before the kill landed
            if line.startswith("ack"):
                _, seq, part, off = line.split()
                acked[(_round, int(seq))] = (int(part), int(off))  # type: ignore[index]

        with EmbeddedLog(tmp_path, durability=durability) as log:
            stored = {}
            for p in range(3):
                recs = read_all(log, "crash", p)  # raises if a frame were torn
                offsets = [o for o, _k, _v in recs]
                assert offsets == sorted(set(offsets))
                for o, _k, v in recs:
                    assert v is not None and len(v) == 128 and v == v[:8] * 16
                    stored[(p, o)] = v
            for (rnd, seq), (p, o) in acked.items():
                assert (p, o) in stored, f"acknowledged append {rnd}/{seq} at {p}:{o} lost"
            # each round's records appear once and in submit order per partition
            for p in range(3):
                values = [int(stored[(pp, o)][:8]) for (pp, o) in sorted(stored) if pp == p]
                rounds: list[list[int]] = []
                for v in values:
                    if rounds and v > rounds[-1][-1]:
                        rounds[-1].append(v)
                    else:
                        rounds.append([v])
                assert len(rounds) <= _round + 1
        time.sleep(0)
