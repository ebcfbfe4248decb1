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
from pydantic import ValidationError
from pydantic_settings import SettingsError
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from streams.config import Settings
from streams.exceptions import ConfigError, StreamvecError
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
    try:
        return Settings(**over).check()
    except (ValidationError, SettingsError) as exc:  # a bad STREAMVEC_* value or flag
        raise ConfigError(_settings_error(exc)) from None


def _settings_error(exc: ValidationError | SettingsError) -> str:
    """One line per bad setting, named as its environment variable."""
    if isinstance(exc, SettingsError):  # the value is not even parseable (bad JSON)
        return f"{exc} (a list or object setting takes JSON, e.g. STREAMVEC_KAFKA_CONFIG)"
    out: dict[str, str] = {}  # one message per setting (a union reports each member)
    for e in exc.errors():
        loc = e["loc"]
        name = f"STREAMVEC_{str(loc[0]).upper()}" if loc else "settings"
        where = f" ({loc[1]!r})" if len(loc) > 1 and isinstance(loc[1], str) else ""
        out.setdefault(name, f"{name}{where}: {e['msg']}")
    return "; ".join(out.values())


def _fail(exc: StreamvecError) -> None:
    err.print(f"[red]{exc.code}[/red] {exc}")
    raise typer.Exit(2)


@app.command()
def up(
    data_dir: DataDir = None,
    kafka: Kafka = None,
    registry_port: Annotated[int | None, typer.Option(help="schema registry port")] = None,
    http_port: Annotated[int | None, typer.Option(help="HTTP API port")] = None,
    resp_port: Annotated[int | None, typer.Option(help="RESP (redis protocol) port")] = None,
    host: Annotated[str | None, typer.Option(help="listen address")] = None,
    demo: Annotated[bool, typer.Option(help="load a small demo data set first")] = False,
) -> None:
    """Run a node: log, topics, schema registry."""
    try:
        settings = _settings(data_dir, kafka, registry_port=registry_port, host=host,
                             http_port=http_port, resp_port=resp_port)
        with open_node(settings) as node:
            query = node.start_query_node()
            console.print(f"query node: restored from {query.restored_from or 'nothing'} "
                          f"in {query.restore_s:.2f} s; replaying the log")
            if settings.ingest_enabled:
                node.start_ingest()
            if settings.policy_enabled and settings.policy_learner:
                node.start_policy_learner()  # query-log -> policy, applied live
            if demo:
                _load_demo(node)
            _print_banner(node)
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(node.serve())
    except StreamvecError as exc:
        _fail(exc)


def _load_demo(node: Node) -> None:
    """A small demo set: index demo/products (8-dim, cosine, fields color and price) with
    1,000 vectors. Idempotent: the same ids are upserted again on every start."""
    import numpy as np

    from streams.index.model import FieldKind, FilterField, IndexConfig, VectorUpsert

    assert node.query is not None
    svc = node.query.service
    svc.create_index(IndexConfig(
        "demo", "products", 8, recipe="HNSW32",
        fields=(FilterField("color", FieldKind.TAG), FilterField("price", FieldKind.NUMERIC)),
    ))
    rng = np.random.default_rng(0)
    colors = ["red", "green", "blue"]
    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("loading demo vectors", total=1000)
        for i in range(1000):
            svc.upsert(VectorUpsert(
                "demo", "products", f"p{i}", rng.standard_normal(8).astype(np.float32),
                meta=json.dumps({"name": f"product {i}"}),
                tags=(f"color:{colors[i % 3]}",), numeric={"price": float(i % 100)},
            ))
            progress.advance(task)
    node.query.catch_up(30)
    console.print("demo: index demo/products with 1,000 vectors")


def _print_banner(node: Node) -> None:
    s = node.settings
    table = Table(title="streamvec node", show_header=False)
    table.add_row(
        "transport", s.transport if s.transport == "embedded" else f"kafka {s.kafka_bootstrap}"
    )
    if s.transport == "embedded":
        table.add_row("data", str(s.data_dir.resolve()))
    table.add_row("HTTP (OpenAPI at /docs)", f"http://{s.host}:{s.http_port}")
    table.add_row("RESP (redis-cli)", f"{s.host}:{s.resp_port}")
    if s.schema_registry_url is None:
        table.add_row("schema registry", f"http://{s.host}:{s.registry_port}")
    table.add_row("topics", ", ".join(node.log.list_topics()))
    console.print(table)
    vec = "[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]"
    console.print(
        "try:\n"
        f"  redis-cli -p {s.resp_port} VEC.INFO demo products\n"
        f"  python3 -c 'import struct,sys; sys.stdout.buffer.write(struct.pack(\"<8f\", "
        f"*{vec}))' | redis-cli -p {s.resp_port} -x VEC.SEARCH demo products TOPK 3 "
        "FILTER color:red VECTOR\n"
        f"  curl -s http://{s.host}:{s.http_port}/v1/indexes/demo/products/search "
        f"-H 'content-type: application/json' -d '{{\"vector\": {vec}, \"k\": 3}}'\n"
        f"  curl -s http://{s.host}:{s.registry_port}/subjects\n"
        "Ctrl-C stops the node; everything acknowledged is on disk.",
        markup=False, highlight=False, soft_wrap=True,
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


policy_app = typer.Typer(help="cache policy: simulate, bound and compare admission policies.")
app.add_typer(policy_app, name="policy")


@policy_app.command("eval")
def policy_eval(
    workload: Annotated[
        str, typer.Option(help="zipf | latest | sessions | neardup | all")
    ] = "all",
    requests: Annotated[
        int, typer.Option("--requests", min=1, help="requests per generated trace")
    ] = 100_000,
    budget_bytes: Annotated[
        int | None,
        typer.Option("--budget-bytes", min=1,
                     help="cache budget (default: --budget-fraction of each trace's footprint)"),
    ] = None,
    budget_fraction: Annotated[
        float, typer.Option("--budget-fraction", min=1e-6, max=1.0)
    ] = 0.05,
    trace: Annotated[
        Path | None, typer.Option("--trace", help="replay this JSON-lines trace instead")
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="also write the reports here as JSON")
    ] = None,
    seed: Annotated[int, typer.Option(help="generator seed")] = 0,
    bound: Annotated[
        str, typer.Option(help="lp (LP relaxation, HiGHS) | knapsack (looser, cheaper)")
    ] = "lp",
    l2: Annotated[
        bool,
        typer.Option("--l2", help="also model an L2 that serves a near-duplicate from a cached "
                     "sibling of its cluster; report its hits and false hits"),
    ] = False,
    l2_precision: Annotated[
        float,
        typer.Option("--l2-precision", min=0.0, max=1.0,
                     help="share of L2 serves that are the right answer (default: QQP)"),
    ] = 0.951,
) -> None:
    """Replay traces through LRU, LFU, GDSF, the rules, the bandit (VW admission/TTL over
    GDSF), the learned policy (learned eviction) and the combined one (VW admission/TTL in
    front of the learned eviction) at equal memory, and compare the proxy cost each saves
    with the offline bound. The table ends with what each row contains."""
    from streams.policy import (
        POLICIES,
        POLICY_HELP,
        WORKLOADS,
        PolicyError,
        Request,
        WorkloadReport,
        default_budget,
        evaluate_trace,
        generate,
        read_trace,
        reports_to_json,
    )

    if workload != "all" and workload not in WORKLOADS:
        raise typer.BadParameter(f"one of {[*WORKLOADS, 'all']}", param_hint="--workload")
    if bound not in ("lp", "knapsack"):
        raise typer.BadParameter("lp or knapsack", param_hint="--bound")
    names = [*WORKLOADS] if workload == "all" else [workload]
    given: list[Request] = []
    if trace is not None:
        try:
            given = read_trace(trace)
        except PolicyError as exc:
            _fail(exc)
        names = [trace.stem]
    total = len(POLICIES) * (len(given) if trace is not None else requests * len(names))
    reports: list[WorkloadReport] = []
    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("cache policies", total=total)
        for name in names:
            progress.update(task, description=f"{name}: generating")
            reqs = given if trace is not None else generate(name, requests, seed)
            reports.append(evaluate_trace(
                name, reqs, budget_bytes or default_budget(reqs, budget_fraction),
                bound="knapsack" if bound == "knapsack" else "lp",
                progress=lambda n: progress.advance(task, n),
                stage=lambda text: progress.update(task, description=text),
                l2_precision=l2_precision if l2 else None, seed=seed,
            ))
    for rep in reports:
        b, k = rep.bound, rep.knapsack
        table = Table(
            "policy", "hit ratio", "cost saved", "share of bound", "vs LRU", "mean MiB",
            title=f"{rep.workload}: {rep.requests:,} requests, budget "
            f"{rep.budget_bytes / 2**20:.1f} MiB "
            f"({rep.budget_bytes / rep.footprint_bytes:.1%} of footprint)",
            caption=f"bound ({b.method}): {b.savings / b.total_cost:.1%} of proxy cost "
            f"saved; knapsack bound {k.savings / k.total_cost:.1%}",
        )
        if l2:
            for col in ("+L2 hit ratio", "+L2 cost saved", "false hits"):
                table.add_column(col)
        for r in rep.rows:
            cells = [r.policy, f"{r.hit_ratio:.3f}", f"{r.saved_share:.1%}",
                     f"{r.bound_share:.1%}", f"{r.vs_lru:.2f}x", f"{r.mean_bytes / 2**20:.1f}"]
            if l2:
                cells += [f"{r.l2_hit_ratio:.3f}", f"{r.l2_saved_share:.1%}",
                          f"{r.false_hits} ({r.false_hit_ratio:.2%})"]
            table.add_row(*cells)
        console.print(table)
    for name, text in POLICY_HELP.items():
        console.print(f"  {name}: {text}")
    if l2:
        console.print(f"  +L2: an L2 serves an L0 miss from a cached sibling of its cluster, "
                      f"right with probability {l2_precision:g}; false hits are not hits")
    if json_out is not None:
        json_out.write_text(json.dumps(reports_to_json(reports), indent=2))
        console.print(f"wrote {json_out}")


@policy_app.command("learn")
def policy_learn(
    data_dir: DataDir = None,
    kafka: Kafka = None,
    follow: Annotated[bool, typer.Option(help="keep learning as events arrive")] = False,
    update_every: Annotated[
        int, typer.Option("--update-every", min=1, help="trained decisions per new version")
    ] = 5_000,
    canary: Annotated[
        float, typer.Option("--canary", min=0.0, max=1.0, help="canary share of tenants")
    ] = 1.0,
    eviction_tables: Annotated[bool, typer.Option(
        help="learn the eviction table too (for nodes with cache_eviction learned; most of "
        "the learner's CPU)")] = True,
) -> None:
    """Train the cache policy from query-log and publish PolicyUpdates to policy (the
    learner `streamvec up` runs on a thread; with the embedded log, stop the node first)."""
    import time

    from streams.policy.learner import OnlineLearner

    try:
        settings = _settings(data_dir, kafka)
        with open_node(settings) as node:
            learner = OnlineLearner(node.log, node.topics, node.codec,
                                    budget_bytes=settings.cache_budget_bytes,
                                    update_every=update_every,
                                    guardrails={"canary_share": canary},
                                    eviction_tables=eviction_tables)
            try:
                published = learner.run_to_end()
                while follow:
                    published += learner.step(timeout_s=1.0)
                    time.sleep(0.1)
            except KeyboardInterrupt:
                pass
            finally:
                learner.close()
    except StreamvecError as exc:
        _fail(exc)
    stats = learner.stats()
    console.print(f"{stats['events']:,} events, {stats['decisions']:,} decisions, "
                  f"{stats['events_per_s']:,.0f} events/s")
    for rec in published:
        console.print(f"published {rec['tenant']}/{rec['index']} v{rec['version']} "
                      f"(parent {rec['parent_version']}): {len(rec['table'])} buckets")


@policy_app.command("rollback")
def policy_rollback(
    tenant: str, index: str, version: int, data_dir: DataDir = None, kafka: Kafka = None,
) -> None:
    """Publish a new version of tenant/index's cache policy with the content of VERSION;
    query nodes apply it without a restart."""
    from streams.policy.learner import publish_policy, read_policies, rollback_record

    try:
        with open_node(_settings(data_dir, kafka)) as node:
            record = rollback_record(read_policies(node.log, node.topics, node.codec),
                                     tenant, index, version)
            publish_policy(node.log, node.topics, node.codec, record)
    except StreamvecError as exc:
        _fail(exc)
    console.print(f"{tenant}/{index}: v{record['version']} restores v{version}")

Url = Annotated[str, typer.Option("--url", help="HTTP API of a running node")]
_DEFAULT_URL = "http://127.0.0.1:8080"


def _http(method: str, url: str, body: dict[str, Any] | None = None) -> Any:
    """One call to a running node's HTTP API; its VEC_ERR_* error becomes exit code 2."""
    import httpx

    try:
        reply = httpx.request(method, url, json=body, timeout=30.0)
    except httpx.HTTPError as exc:
        err.print(f"[red]cannot reach {url}[/red]: {exc} (is `streamvec up` running?)")
        raise typer.Exit(2) from None
    data = reply.json() if reply.content else {}
    if reply.status_code >= 400:
        e = data.get("error", {}) if isinstance(data, dict) else {}
        err.print(f"[red]{e.get('code', reply.status_code)}[/red] {e.get('message', reply.text)}")
        raise typer.Exit(2)
    return data


@app.command()
def search(
    tenant: Annotated[str, typer.Argument(help="tenant id")],
    index: Annotated[str, typer.Argument(help="index name")],
    vector: Annotated[str | None, typer.Option(help="comma-separated numbers")] = None,
    text: Annotated[str | None, typer.Option(help="query text (text indexes)")] = None,
    k: Annotated[int, typer.Option("--k", "-k", help="how many hits")] = 10,
    filter: Annotated[str | None, typer.Option(help="filter expression")] = None,
    consistency: Annotated[str, typer.Option(help="eventual|session|bounded|strong")] = "eventual",
    mode: Annotated[str, typer.Option(help="text queries: dense|keyword|hybrid")] = "hybrid",
    url: Url = _DEFAULT_URL,
    as_json: Annotated[bool, typer.Option("--json", help="print the raw reply")] = False,
) -> None:
    """Search a running node over its HTTP API (a vector, or text on a text index)."""
    if (vector is None) == (text is None):
        err.print("[red]VEC_ERR_INVALID[/red] give exactly one of --vector and --text")
        raise typer.Exit(2)
    base = f"{url.rstrip('/')}/v1/indexes/{tenant}/{index}"
    body: dict[str, Any] = {"k": k, "filter": filter, "consistency": consistency}
    if vector is not None:
        try:
            body["vector"] = [float(x) for x in vector.split(",") if x.strip()]
        except ValueError:
            err.print("[red]VEC_ERR_INVALID[/red] --vector must be comma-separated numbers")
            raise typer.Exit(2) from None
        reply = _http("POST", f"{base}/search", body)
    else:
        body.update(text=text, mode=mode)
        reply = _http("POST", f"{base}/query", body)
    if as_json:
        print(json.dumps(reply, indent=2))
        return
    table = Table(title=f"{tenant}/{index}: {len(reply['hits'])} hits")
    for col in ("#", "id", "score", "meta"):
        table.add_column(col)
    for i, hit in enumerate(reply["hits"], 1):
        meta = json.dumps(hit.get("meta"))
        table.add_row(str(i), hit["id"], f"{hit['score']:.4f}",
                      meta if len(meta) <= 80 else meta[:77] + "...")
    console.print(table)
    dbg = reply.get("debug", {})
    console.print(f"layer={dbg.get('layer')} cache_hit={dbg.get('cache_hit')} "
                  f"latency_ms={dbg.get('latency_ms')}")


@app.command()
def snapshot(url: Url = _DEFAULT_URL) -> None:
    """Ask a running node to write a snapshot now (start-up then replays only what follows)."""
    console.print_json(data=_http("POST", f"{url.rstrip('/')}/v1/snapshot"))


@app.command()
def replay(
    data_dir: DataDir = None,
    kafka: Kafka = None,
    timeout_s: Annotated[float, typer.Option(help="give up after this many seconds")] = 3600.0,
) -> None:
    """Rebuild the query node from the log alone (no snapshot), then write a fresh snapshot.

    Run it with the node stopped. The old node directory is kept beside the new one
    (``node.replaced-<time>``), never deleted: remove it yourself once the rebuild is checked.
    """
    import time

    from streams.service.query_node import QueryNode

    try:
        settings = _settings(data_dir, kafka)
        node_dir = settings.data_dir / "node"
        with open_node(settings) as node:
            if node_dir.exists():
                kept = node_dir.with_name(f"node.replaced-{time.strftime('%Y%m%dT%H%M%S')}")
                node_dir.rename(kept)
                console.print(f"kept the old node directory as {kept}")
            query = QueryNode(node.log, node.topics, node.codec, node_dir,
                              head_capacity=settings.head_capacity, cache_enabled=False)
            targets: dict[tuple[str, int], int] = {}
            for topic in (node.topics.indexes, node.topics.vectors):
                for p, end in node.log.end_offsets(topic).items():
                    targets[(topic, p)] = end
            total = sum(targets.values())
            query.start()
            try:
                deadline = time.monotonic() + timeout_s
                with Progress(console=console) as bar:
                    task = bar.add_task("replaying", total=max(total, 1))
                    while True:
                        done = query.applied.snapshot()
                        bar.update(task, completed=sum(min(done.get(tp, 0), end)
                                                       for tp, end in targets.items()))
                        if query.applied.reached(targets):
                            break
                        if time.monotonic() > deadline:
                            err.print("[red]VEC_ERR_BUSY[/red] replay did not finish in time")
                            raise typer.Exit(2)
                        time.sleep(0.2)
                query.indexer.drain_builds()
                info = query.service.snapshot()
            finally:
                query.close()
            console.print(f"replayed {total} records; snapshot {info.get('snapshot', info)}")
    except StreamvecError as exc:
        _fail(exc)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
