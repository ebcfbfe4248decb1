"""Per-pair cosine distances of the QQP pairs under a chosen embedder, saved as ``.npy`` for
``bench/semantic_eval.py --distances`` (docs/benchmarks.md "Semantic cache (QQP)").

For embedders whose dependencies live outside the project venv (MiniLM: torch and
sentence-transformers in ``~/.cache/streamvec/minilm-venv``), so this module imports only
numpy and :func:`streams.embed.open_embedder`. Texts are embedded raw (no
``CanonicalKeyMap``: that would pull in the cache package and its dependencies).

Run: ``PYTHONPATH=. ~/.cache/streamvec/minilm-venv/bin/python -m bench.qqp_distances
--embedder minilm --limit 20000 --out /tmp/minilm20k.npy``.
"""

from __future__ import annotations

import argparse
import json
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from streams.embed import open_embedder

DATA = Path(__file__).resolve().parents[2] / "shared/data/semantic-pairs/similiar_qqp_full.json.gz"


def load_pairs(path: Path = DATA) -> list[dict[str, Any]]:
    with tarfile.open(path, "r:gz") as tar:
        member = tar.getmembers()[0]
        f = tar.extractfile(member)
        assert f is not None
        rows: list[dict[str, Any]] = json.load(f)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--embedder", default="minilm")
    ap.add_argument("--limit", type=int, default=0, help="first N pairs only (0: all)")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    rows = load_pairs()
    if args.limit:
        rows = rows[: args.limit]
    n = len(rows)
    texts = [r["text_a"] for r in rows] + [r["text_b"] for r in rows]
    emb = open_embedder(args.embedder)
    t0 = time.perf_counter()
    parts = [emb.embed(texts[i : i + args.batch]) for i in range(0, len(texts), args.batch)]
    secs = time.perf_counter() - t0
    x = np.concatenate(parts).astype(np.float64)
    dist = 1.0 - np.einsum("ij,ij->i", x[:n], x[n:])
    np.save(args.out, dist)
    print(f"{args.embedder}: {n} pairs, {len(texts)} texts in {secs:.1f} s -> {args.out}")


if __name__ == "__main__":
    main()
