"""False hits of the L2 semantic cache on Quora Question Pairs (issue 4 acceptance).

Data: ``../shared/data/semantic-pairs/similiar_qqp_full.json.gz`` (80,854 pairs
``text_a``, ``text_b``, ``label``; 1 = same question). Both texts go through the cache's
:class:`CanonicalKeyMap` and the default offline embedder (``open_embedder()``), as the text
path does. L2 serves the answer cached for ``text_a`` to ``text_b`` when their cosine
distance is at most the threshold (:func:`streams.cache.semantic.serves`): a correct hit when
``label`` is 1, a false hit when it is 0.

* **tune**: rows with an even index. The chosen threshold is the largest one whose precision
  on them is at least ``--target`` (default 0.95) plus ``--margin`` (default 0.01).
* **report**: rows with an odd index, at that threshold, plus the whole curve
  (threshold -> precision, hit rate = served / all pairs, recall = served duplicates / all
  duplicates) on those rows, as a Markdown table for docs/benchmarks.md.

Not measured: many questions cached at once (a ``text_b`` served the answer of a *third*
question): QQP labels only pairs, so such a hit cannot be scored.

Run: ``.venv/bin/python -m bench.semantic_eval [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from streams.cache.canonical import CanonicalKeyMap
from streams.cache.semantic import DEFAULT_L2_THRESHOLD, serves
from streams.embed import open_embedder

DATA = Path(__file__).resolve().parents[2] / "shared/data/semantic-pairs/similiar_qqp_full.json.gz"
CURVE = (0.0, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.08, 0.10, 0.15, 0.20, 0.30)

F32 = npt.NDArray[np.float32]


def load_pairs(path: Path = DATA) -> list[dict[str, Any]]:
    with tarfile.open(path, "r:gz") as tar:
        member = tar.getmembers()[0]
        f = tar.extractfile(member)
        assert f is not None
        rows: list[dict[str, Any]] = json.load(f)
    return rows


def embed_texts(texts: list[str], batch: int = 4096) -> F32:
    emb = open_embedder()
    out = [emb.embed(texts[i : i + batch]) for i in range(0, len(texts), batch)]
    return np.concatenate(out).astype(np.float32)


def scores_at(
    dist: npt.NDArray[np.float64], labels: npt.NDArray[np.int64], thr: float
) -> dict[str, float]:
    served = serves(dist, thr)
    n_served = int(served.sum())
    correct = int((served & (labels == 1)).sum())
    return {
        "threshold": thr,
        "served": n_served,
        "precision": correct / n_served if n_served else 1.0,
        "hit_rate": n_served / dist.size,
        "recall": correct / max(1, int((labels == 1).sum())),
    }


def tune(
    dist: npt.NDArray[np.float64], labels: npt.NDArray[np.int64], want: float, min_served: int
) -> float | None:
    """The largest threshold (over the observed distances) at which at least
    ``min_served`` pairs are served with precision >= ``want``; None if there is none."""
    order = np.argsort(dist, kind="stable")
    d = dist[order]
    correct = np.cumsum(labels[order] == 1)
    last = np.flatnonzero(np.append(d[1:] != d[:-1], True))  # where each tie group ends
    served = last + 1
    ok = (correct[last] / served >= want) & (served >= min_served)
    if not ok.any():
        return None
    return float(d[last[np.flatnonzero(ok)[-1]]])


def best_precision(
    dist: npt.NDArray[np.float64], labels: npt.NDArray[np.int64], min_served: int
) -> float:
    """The threshold with the highest precision serving at least ``min_served`` pairs
    (the fallback default when no threshold reaches the target)."""
    order = np.argsort(dist, kind="stable")
    d = dist[order]
    correct = np.cumsum(labels[order] == 1)
    last = np.flatnonzero(np.append(d[1:] != d[:-1], True))
    served = last + 1
    prec = np.where(served >= min_served, correct[last] / served, -1.0)
    return float(d[last[int(np.argmax(prec))]])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--margin", type=float, default=0.01)
    ap.add_argument("--min-served", type=int, default=100)
    ap.add_argument("--limit", type=int, default=0, help="first N pairs only (0: all)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    rows = load_pairs()
    if args.limit:
        rows = rows[: args.limit]
    canon = CanonicalKeyMap()
    a_txt = [canon.canonical(r["text_a"]) for r in rows]
    b_txt = [canon.canonical(r["text_b"]) for r in rows]
    labels = np.array([int(r["label"]) for r in rows], dtype=np.int64)
    t0 = time.perf_counter()
    emb = embed_texts(a_txt + b_txt)
    embed_s = time.perf_counter() - t0
    ea, eb = emb[: len(rows)], emb[len(rows) :]
    dist = 1.0 - np.einsum("ij,ij->i", ea.astype(np.float64), eb.astype(np.float64))
    even, odd = np.arange(0, len(rows), 2), np.arange(1, len(rows), 2)

    chosen = tune(dist[even], labels[even], args.target + args.margin, args.min_served)
    best = best_precision(dist[even], labels[even], args.min_served)
    equal = np.array([a_txt[i] == b_txt[i] for i in range(len(rows))])
    report: dict[str, Any] = {
        "pairs": len(rows),
        "duplicates": int(labels.sum()),
        "embed_s": round(embed_s, 2),
        "texts_per_s": round(2 * len(rows) / embed_s),
        "target": args.target,
        "margin": args.margin,
        "min_served": args.min_served,
        "tuned_threshold_even": chosen,
        "default_threshold": DEFAULT_L2_THRESHOLD,
        "even_at_tuned": None if chosen is None else scores_at(dist[even], labels[even], chosen),
        "odd_at_tuned": None if chosen is None else scores_at(dist[odd], labels[odd], chosen),
        "even_at_default": scores_at(dist[even], labels[even], DEFAULT_L2_THRESHOLD),
        "best_even": best,
        "even_at_best": scores_at(dist[even], labels[even], best),
        "odd_at_best": scores_at(dist[odd], labels[odd], best),
        "equal_after_normalising": {
            name: {
                "pairs": int(equal[ix].sum()),
                "precision": round(float(labels[ix][equal[ix]].mean()), 4),
            }
            for name, ix in (("even", even), ("odd", odd))
        },
        "odd_at_default": scores_at(dist[odd], labels[odd], DEFAULT_L2_THRESHOLD),
        "curve_odd": [scores_at(dist[odd], labels[odd], t) for t in CURVE],
        "curve_even": [scores_at(dist[even], labels[even], t) for t in CURVE],
    }
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


def render(r: dict[str, Any]) -> str:
    def row(s: dict[str, float]) -> str:
        return (
            f"| {s['threshold']:.4f} | {s['served']} | {s['precision']:.3f} | "
            f"{s['hit_rate']:.3f} | {s['recall']:.3f} |"
        )

    lines = [
        f"pairs {r['pairs']} (duplicates {r['duplicates']}), embedded {2 * r['pairs']} texts "
        f"in {r['embed_s']} s ({r['texts_per_s']}/s)",
        f"tuned on even rows for precision >= {r['target']} + {r['margin']} "
        f"(at least {r['min_served']} pairs served): threshold "
        f"{r['tuned_threshold_even']} (default in code {r['default_threshold']})",
        f"pairs equal after normalising (the labels' own ceiling): {r['equal_after_normalising']}",
        "",
        "| rows | threshold | served | precision | hit rate | recall |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in (
        "even_at_tuned",
        "odd_at_tuned",
        "even_at_best",
        "odd_at_best",
        "even_at_default",
        "odd_at_default",
    ):
        s = r[name]
        if s is None:
            continue
        lines.append(
            f"| {name} | {s['threshold']:.4f} | {s['served']} | {s['precision']:.3f}"
            f" | {s['hit_rate']:.3f} | {s['recall']:.3f} |"
        )
    lines += [
        "",
        "Curve on odd rows:",
        "",
        "| threshold (cosine distance) | served | precision | hit rate | recall |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [row(s) for s in r["curve_odd"]]
    lines += [
        "",
        "Curve on even rows (tuning):",
        "",
        "| threshold (cosine distance) | served | precision | hit rate | recall |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [row(s) for s in r["curve_even"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
