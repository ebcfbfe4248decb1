"""Child process of the crash test: appends keyed records to an embedded log and prints
``ack <seq> <partition> <offset>`` for every append that has returned (i.e. is durable).
The parent kills it with SIGKILL at a random moment."""

from __future__ import annotations

import sys
from collections import deque
from concurrent.futures import Future

from streams.log.embedded import EmbeddedLog
from streams.log.port import LogPosition, Record, TopicSpec


def main(path: str, durability: str, total: int, window: int) -> None:
    log = EmbeddedLog(path, durability=durability)
    log.create_topic(TopicSpec("crash", 3))
    inflight: deque[tuple[int, Future[list[LogPosition]]]] = deque()
    out = sys.stdout
    for seq in range(total):
        value = f"{seq:08d}".encode() * 16  # 128 bytes, self-describing
        inflight.append((seq, log.submit([Record.of("crash", f"key-{seq % 97}", value)])))
        while len(inflight) >= window or (seq == total - 1 and inflight):
            done_seq, fut = inflight.popleft()
            pos = fut.result()[0]
            out.write(f"ack {done_seq} {pos.partition} {pos.offset}\n")
            out.flush()
    out.write("done\n")
    out.flush()
    log.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
