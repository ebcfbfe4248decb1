"""The ``streamvec`` command line. Flags override ``STREAMVEC_*`` env vars, which override
the defaults of :class:`streams.config.Settings`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from streams.config import Settings
from streams.exceptions import StreamvecError
from streams.log.port import LogPosition, Record
from streams.node import Node, open_node
from streams.schemas import catalog

__all__ = ["app", "main"]

app = typer.Typer(
    add_completion=False, help="streamvec: vector search whose source of truth is a log."
)
console = Console()
err = Console(stderr=True)

DataDir = Annotated[Path | None, typer.Option("--data-dir", help="embedded log and state")]
Kafka = Annotated[str | None, typer.Option("--kafka", help="run on Kafka at host:port")]


def _settings(data_dir: Path | None, kafka: str | None, **extra: Any) -> Settings:
    over: dict[str, Any] = {k: v for k, v in extra.items() if v is not None}
    if data_dir is not None:
        over["data_dir"] = data_dir
    if kafka is not None:
        over["transport"] = "kafka"
        over["kafka_bootstrap"] = kafka
    return Settings(**over).check()


def _fail(exc: StreamvecError) -> None:
    err.print(f"[red]{exc.code}[/red] {exc}")
    raise typer.Exit(2)


@app.command()
def up(
    data_dir: DataDir = None,
    kafka: Kafka = None,
    registry_port: Annotated[int | None, typer.Option(help="schema registry port")] = None,
    host: Annotated[str | None, typer.Option(help="listen address")] = None,
    demo: Annotated[bool, typer.Option(help="load a small demo data set first")] = False,
) -> None:
    """Run a node: log, topics, schema registry."""
    try:
        settings = _settings(data_dir, kafka, registry_port=registry_port, host=host)
        with open_node(settings) as node:
            if demo:
                _load_demo(node)
            _print_banner(node)
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(node.serve())
    except StreamvecError as exc:
        _fail(exc)


def _load_demo(node: Node) -> None:
    """A tiny demo set: one index config and 200 vectors (idempotent: keys repeat)."""
    import numpy as np

    rng = np.random.default_rng(0)
    records = [
        Record.of(
            node.topics.indexes,
            "demo/products",
            node.encode(
                "indexes",
                {
                    "tenant": "demo",
                    "index": "products",
                    "dim": 8,
                    "metric": "cosine",
                    "dtype": "fp32",
                    "recipe": "HNSW32",
                    "fields": [],
                    "created_ms": 0,
                    "version": 1,
                },
            ),
        )
    ]
    for i in range(200):
        vec = rng.standard_normal(8).astype("<f4").tobytes()
        records.append(
            Record.of(
                node.topics.vectors,
                f"demo/products/p{i}",
                node.encode(
                    "vectors",
                    {
                        "tenant": "demo",
                        "index": "products",
                        "id": f"p{i}",
                        "vector": vec,
                        "dtype": "fp32",
                        "meta": json.dumps({"name": f"product {i}"}),
                        "tags": [],
                        "numeric": {},
                        "version": 1,
                        "timestamp": 0,
                    },
                ),
            )
        )
    positions = node.log.append_batch(records)
    console.print(f"demo: appended {len(positions)} records (last at {positions[-1].token})")


def _print_banner(node: Node) -> None:
    s = node.settings
    table = Table(title="streamvec node", show_header=False)
    table.add_row(
        "transport", s.transport if s.transport == "embedded" else f"kafka {s.kafka_bootstrap}"
    )
    if s.transport == "embedded":
        table.add_row("data", str(s.data_dir.resolve()))
    if s.schema_registry_url is None:
        table.add_row("schema registry", f"http://{s.host}:{s.registry_port}")
    table.add_row("topics", ", ".join(node.log.list_topics()))
    console.print(table)
    console.print(
        f"try: curl -s http://{s.host}:{s.registry_port}/subjects\n"
        f"     streamvec topics --data-dir {s.data_dir}  (after stopping the node: the "
        "embedded log has one owner)\n"
        "Ctrl-C stops the node; everything acknowledged is on disk."
    )


@app.command()
def topics(data_dir: DataDir = None, kafka: Kafka = None) -> None:
    """List topics with partitions, cleanup policy and end offsets."""
    try:
        with open_node(_settings(data_dir, kafka)) as node:
            table = Table("topic", "partitions", "cleanup", "start", "end")
            for name in node.log.list_topics():
                spec = node.log.describe(name)
                start, end = node.log.start_offsets(name), node.log.end_offsets(name)
                table.add_row(
                    name,
                    str(spec.partitions),
                    spec.cleanup.value,
                    str(sum(start.values())),
                    str(sum(end.values())),
                )
            console.print(table)
    except StreamvecError as exc:
        _fail(exc)


@app.command()
def produce(
    topic: Annotated[str, typer.Argument(help="topic suffix, e.g. vectors, documents")],
    file: Annotated[
        Path, typer.Argument(help='JSON lines: {"key": ..., "value": {...}}; - = stdin')
    ],
    data_dir: DataDir = None,
    kafka: Kafka = None,
) -> None:
    """Encode JSON records with the topic's Avro value schema and append them."""
    try:
        with open_node(_settings(data_dir, kafka)) as node:
            if topic not in catalog.TOPIC_VALUE_SCHEMA:
                raise typer.BadParameter(
                    f"unknown topic {topic!r}; one of {list(catalog.TOPIC_VALUE_SCHEMA)}"
                )
            lines = (sys.stdin if str(file) == "-" else file.open()).read().splitlines()
            last: LogPosition | None = None
            with Progress(console=err, transient=True) as progress:
                task = progress.add_task(f"producing to {topic}", total=len(lines))
                for chunk_start in range(0, len(lines), 500):
                    chunk = [
                        json.loads(line)
                        for line in lines[chunk_start : chunk_start + 500]
                        if line.strip()
                    ]
                    recs = [
                        Record.of(
                            node.topics.name(topic),
                            r["key"],
                            None if r.get("value") is None else node.encode(topic, r["value"]),
                        )
                        for r in chunk
                    ]
                    last = node.log.append_batch(recs)[-1] if recs else last
                    progress.advance(task, len(chunk))
            console.print(
                f"appended {len(lines)} records; last position {last.token if last else '-'}"
            )
    except StreamvecError as exc:
        _fail(exc)


@app.command()
def tail(
    topic: Annotated[str, typer.Argument(help="topic suffix, e.g. vectors, dlq")],
    limit: Annotated[int, typer.Option(help="stop after this many records")] = 20,
    data_dir: DataDir = None,
    kafka: Kafka = None,
) -> None:
    """Print the first ``limit`` records of a topic, decoded, as JSON lines."""
    try:
        with (
            open_node(_settings(data_dir, kafka)) as node,
            node.log.subscribe([node.topics.name(topic)]) as sub,
        ):
            shown = 0
            while shown < limit:
                recs = sub.poll(limit - shown, timeout_s=1.0)
                if not recs:
                    break
                for r in recs:
                    value = None if r.value is None else node.codec.decode(r.value)[1]
                    print(
                        json.dumps(
                            {
                                "position": r.position.token,
                                "key": r.key.decode() if r.key else None,
                                "value": value,
                            },
                            default=str,
                        )
                    )
                shown += len(recs)
    except StreamvecError as exc:
        _fail(exc)


def main() -> None:
    app()
