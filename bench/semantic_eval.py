"""False hits of the L2 semantic cache on Quora Question Pairs (issue 4 acceptance).

Data: ``../shared/data/semantic-pairs/similiar_qqp_full.json.gz`` (80,854 pairs
``text_a``, ``text_b``, ``label``; 1 = same question). Both texts go through the cache's
:class:`CanonicalKeyMap` and the default offline embedder (``open_embedder()``), as the text
path does. L2 serves the answer cached for ``text_a`` to ``text_b`` when

* their cosine distance is at most ``d`` (:func:`streams.cache.semantic.serves`), and
* the raw texts agree (:func:`streams.cache.agreement.agreement`: number, negation,
  person, deictic, entity, opposite-word and content-order guards, then the token LCS
  ratio) with a score of at least ``v`` (:func:`streams.cache.semantic.verified`).

A correct hit when ``label`` is 1, a false hit when it is 0. Side by side in the same run:
the **baseline**, distance alone (L2 before the text stage), tuned the same way.

* **tune**: rows with an even index. Over the grid ``D x V`` the chosen ``(d, v)`` is the
  one serving the most pairs with precision at least ``--target + --margin`` (default
  0.95 + 0.01) and at least ``--min-served`` pairs.
* **report**: rows with an odd index at the chosen pair, with a bootstrap 95% interval
  (``--boot`` resamples of the odd rows), and the curves (``d`` -> precision, hit rate =
  served / all pairs, recall = served duplicates / all duplicates) for several ``v``.
* **cost**: ``features()`` per text and ``agreement()`` per candidate pair in
  microseconds, and :meth:`SemanticIndex.nearest` per lookup with and without the text
  stage on a group of ``--reps`` representatives.
* **cost-aware reuse** (:func:`streams.cache.semantic.reuses`): ``calibration``, the
  false-hit curve ``p_wrong(d)`` measured on the even rows (per distance bin of
  :data:`~streams.cache.semantic.CURVE_EDGES`, made nondecreasing by pooling adjacent
  violators), for the text path (pairs the text stage passes at the default ``v``) and the
  vector path (distance alone), compared with the tables stored in ``semantic.py``; and
  ``cost_aware``, precision and hit rate on the odd rows with the default penalties at
  the costs :data:`COST_LEVELS_MS`, at the default cap and at a raised one, beside the
  fixed threshold (the rule before) in the same run.
* **normaliser check**: precision of the pairs whose texts are equal after the strict
  normaliser (the default) and after the aggressive one (stop words dropped, words sorted).

``--distances FILE.npy`` takes per-pair distances from another embedder (for instance
MiniLM in its own virtual environment, ``bench/qqp_distances.py``) instead of embedding;
the rest is the same.

Not measured: many questions cached at once (a ``text_b`` served the answer of a *third*
question): QQP labels only pairs, so such a hit cannot be scored.

Run: ``.venv/bin/python -m bench.semantic_eval [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.qqp_distances import load_pairs
from streams.cache.agreement import agreement, features
from streams.cache.canonical import CanonicalKeyMap
from streams.cache.keys import QueryKey
from streams.cache.semantic import (
    CURVE_EDGES,
    DEFAULT_L2_AGREEMENT,
    DEFAULT_L2_PENALTY_MS,
    DEFAULT_L2_TEXT_PENALTY_MS,
    DEFAULT_L2_THRESHOLD,
    DEFAULT_L2_VECTOR_THRESHOLD,
    TEXT_CURVE,
    VECTOR_CURVE,
    FalseHitCurve,
    SemanticIndex,
    serves,
    verified,
)
from streams.embed import open_embedder
from streams.index.model import Metric

# A coarse grid on purpose: with ~500 pairs served per point, precision has a standard
# error of ~0.01, and picking the best of a fine grid (thousands of points) picks noise.
GRID_D = (0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05)
GRID_V = (0.0, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
CURVE_D = (0.0, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.2)
CURVE_V: tuple[float | None, ...] = (None, 0.0, 0.7, 0.8, 0.85, 0.9)  # None: distance alone

COST_LEVELS_MS = (0.3, 0.75, 1.5, 3.0, 10.0)  # cheap .. typical (REFERENCE_COST_MS) .. costly
RAISED_CAP = {"text": 0.05, "vector": 0.02}  # a cap above the defaults: costly ones go farther

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
B = npt.NDArray[np.bool_]


def embed_texts(texts: list[str], batch: int = 4096) -> F32:
    emb = open_embedder()
    out = [emb.embed(texts[i : i + batch]) for i in range(0, len(texts), batch)]
    return np.concatenate(out).astype(np.float32)


def served_mask(dist: F64, score: F64, d: float, v: float | None) -> B:
    """L2's decision per pair; ``v`` None: distance alone (the baseline)."""
    s = serves(dist, d)
    return s if v is None else s & verified(score, v)


def scores(served: B, labels: I64) -> dict[str, float]:
    n_served = int(served.sum())
    correct = int((served & (labels == 1)).sum())
    return {
        "served": n_served,
        "precision": correct / n_served if n_served else 1.0,
        "hit_rate": n_served / max(1, served.size),
        "recall": correct / max(1, int((labels == 1).sum())),
    }


def tune(
    dist: F64, score: F64, labels: I64, want: float, min_served: int, vs: tuple[float | None, ...]
) -> tuple[float, float | None] | None:
    """The grid pair ``(d, v)`` serving the most pairs with precision >= ``want`` and at
    least ``min_served`` served; ties go to the smaller ``d``, then the larger ``v``."""
    best: tuple[int, float, float | None] | None = None
    for v in vs:
        for d in GRID_D:
            s = scores(served_mask(dist, score, d, v), labels)
            if s["precision"] < want or s["served"] < min_served:
                continue
            if best is None or s["served"] > best[0]:
                best = (int(s["served"]), d, v)
    return None if best is None else (best[1], best[2])


def bootstrap(served: B, labels: I64, n: int, seed: int = 0) -> dict[str, list[float]]:
    """95% percentile intervals of precision and hit rate over ``n`` resamples."""
    rng = np.random.default_rng(seed)
    prec, hit = np.empty(n), np.empty(n)
    ok = served & (labels == 1)
    for i in range(n):
        ix = rng.integers(0, served.size, served.size)
        k = int(served[ix].sum())
        prec[i] = ok[ix].sum() / k if k else 1.0
        hit[i] = k / served.size
    q = [2.5, 97.5]
    return {
        "precision": [round(float(x), 4) for x in np.percentile(prec, q)],
        "hit_rate": [round(float(x), 5) for x in np.percentile(hit, q)],
    }


def pooled(rates: list[float], weights: list[int]) -> list[float]:
    """Pool adjacent violators: the nondecreasing sequence closest to ``rates`` in the
    ``weights``-weighted least squares sense (isotonic regression)."""
    blocks: list[list[float]] = []  # [rate, weight, count]
    for r, w in zip(rates, weights, strict=True):
        blocks.append([r, float(w), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            r2, w2, n2 = blocks.pop()
            r1, w1, n1 = blocks.pop()
            blocks.append([(r1 * w1 + r2 * w2) / max(w1 + w2, 1e-12), w1 + w2, n1 + n2])
    return [r for r, _, n in blocks for _ in range(int(n))]


def calibrate(dist: F64, mask: B, labels: I64) -> FalseHitCurve:
    """``p_wrong(d)`` of the pairs in ``mask``: the share of label-0 pairs per distance bin
    (bins ``(edges[i-1], edges[i]]`` of :data:`CURVE_EDGES`), pooled to be nondecreasing,
    rounded to 3 decimals (the tables in ``semantic.py``)."""
    rates, weights, lo = [], [], -np.inf
    for e in CURVE_EDGES:
        sel = mask & (dist > lo) & (dist <= e)
        k = int(sel.sum())
        rates.append(int((sel & (labels == 0)).sum()) / k if k else 0.0)
        weights.append(k)
        lo = e
    return FalseHitCurve(CURVE_EDGES, tuple(round(r, 3) for r in pooled(rates, weights)))


def cost_aware(dist: F64, score: F64, labels: I64) -> list[dict[str, Any]]:
    """Odd-row figures of the cost-aware rule at :data:`COST_LEVELS_MS` with the default
    penalties, per path and cap, after the fixed threshold (the rule before) per path. A
    pair is served when ``d <= min(cap, curve.max_distance(c, penalty))`` (and, on the
    text path, the text stage passes): :func:`reuses` per pair (the two agree, see
    tests/test_l2_cost.py). ``net_ms_per_1k``: the expected saving per 1,000 pairs,
    ``c x correct - penalty x wrong``, of the cost rule and, at the same cost, of the
    fixed threshold (what the rule maximises: precision alone is not its goal)."""

    def net(served: B, c: float, penalty: float) -> float:
        right = int((served & (labels == 1)).sum())
        wrong = int(served.sum()) - right
        return round((c * right - penalty * wrong) / labels.size * 1000, 1)

    out: list[dict[str, Any]] = []
    v_text: float | None = DEFAULT_L2_AGREEMENT
    paths = (
        ("text", TEXT_CURVE, DEFAULT_L2_TEXT_PENALTY_MS, DEFAULT_L2_THRESHOLD, v_text),
        ("vector", VECTOR_CURVE, DEFAULT_L2_PENALTY_MS, DEFAULT_L2_VECTOR_THRESHOLD, None),
    )
    for path, curve, penalty, cap, v in paths:
        fixed_mask = served_mask(dist, score, cap, v)
        out.append({"path": path, "rule": "fixed (before)", "cost_ms": None, "cap": cap,
                    "d_bar": cap, **scores(fixed_mask, labels)})  # fmt: skip
        for cap_ in (cap, RAISED_CAP[path]):
            for c in COST_LEVELS_MS:
                bar = min(cap_, curve.max_distance(c, penalty))
                mask = served_mask(dist, score, bar, v)
                out.append({"path": path, "rule": f"cost-aware, penalty {penalty:g} ms",
                            "cost_ms": c, "cap": cap_, "d_bar": bar, **scores(mask, labels),
                            "net_ms_per_1k": net(mask, c, penalty),
                            "fixed_net_ms_per_1k": net(fixed_mask, c, penalty)})  # fmt: skip
    return out


def lookup_cost(rows: list[dict[str, Any]], emb_a: F32, emb_b: F32, reps: int) -> dict[str, float]:
    """µs per :meth:`SemanticIndex.nearest` on one group of ``reps`` representatives
    (the ``text_a`` of the first pairs), querying with the ``text_b``: distance only,
    with the text stage as the controller calls it (``within`` the default threshold),
    and with the text stage on every lookup. Best of 3 interleaved rounds (shared machine)."""
    reps = min(reps, len(rows))
    idx = SemanticIndex(max_per_group=reps)
    group = SemanticIndex.group_of("text", "bench/qqp", None, 10)
    plain = SemanticIndex(max_per_group=reps)
    for i in range(reps):
        key = QueryKey(i.to_bytes(16, "big"))
        idx.add(group, emb_a[i], key, rows[i]["text_a"])
        plain.add(group, emb_a[i], key)
    n = min(1000, reps)
    variants: dict[str, tuple[SemanticIndex, bool, float | None]] = {
        "nearest_us_distance_only": (plain, False, None),
        "nearest_us_text_within_default": (idx, True, DEFAULT_L2_THRESHOLD),
        "nearest_us_text_always": (idx, True, None),
    }
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(3):
        for name, (ix, with_text, within) in variants.items():
            t0 = time.perf_counter()
            for i in range(n):
                text = rows[i]["text_b"] if with_text else None
                ix.nearest(group, emb_b[i], Metric.COSINE, text, within)
            best[name] = min(best[name], (time.perf_counter() - t0) / n * 1e6)
    return {"representatives": reps, **{k: round(v, 1) for k, v in best.items()}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--margin", type=float, default=0.01)
    ap.add_argument("--min-served", type=int, default=100)
    ap.add_argument("--limit", type=int, default=0, help="first N pairs only (0: all)")
    ap.add_argument("--boot", type=int, default=1000, help="bootstrap resamples")
    ap.add_argument("--reps", type=int, default=4096, help="representatives for lookup cost")
    ap.add_argument("--distances", type=Path, help="per-pair distances (.npy) to use instead")
    ap.add_argument("--label", default="wordllama-256 (default)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    rows = load_pairs()
    if args.limit:
        rows = rows[: args.limit]
    n = len(rows)
    canon = CanonicalKeyMap()
    labels = np.array([int(r["label"]) for r in rows], dtype=np.int64)
    report: dict[str, Any] = {"embedder": args.label, "pairs": n, "duplicates": int(labels.sum())}
    cost: dict[str, float] = {}
    if args.distances is not None:
        dist = np.load(args.distances).astype(np.float64)[:n]
        emb_a = emb_b = None
    else:
        a_txt = [canon.canonical(r["text_a"]) for r in rows]
        b_txt = [canon.canonical(r["text_b"]) for r in rows]
        t0 = time.perf_counter()
        emb = embed_texts(a_txt + b_txt)
        embed_s = time.perf_counter() - t0
        report.update(embed_s=round(embed_s, 1), texts_per_s=round(2 * n / embed_s))
        emb_a, emb_b = emb[:n], emb[n:]
        dist = 1.0 - np.einsum("ij,ij->i", emb_a.astype(np.float64), emb_b.astype(np.float64))

    t0 = time.perf_counter()
    fa = [features(r["text_a"]) for r in rows]
    fb = [features(r["text_b"]) for r in rows]
    cost["features_us_per_text"] = round((time.perf_counter() - t0) / (2 * n) * 1e6, 2)
    t0 = time.perf_counter()
    score = np.array([agreement(fa[i], fb[i]) for i in range(n)], dtype=np.float64)
    cost["agreement_us_per_candidate"] = round((time.perf_counter() - t0) / n * 1e6, 2)
    t0 = time.perf_counter()
    for r in rows:
        canon.normalise(r["text_a"])
    cost["normalise_us_per_text"] = round((time.perf_counter() - t0) / n * 1e6, 2)
    if emb_a is not None and emb_b is not None:
        cost.update(lookup_cost(rows, emb_a, emb_b, args.reps))
    report["cost"] = cost

    even, odd = np.arange(0, n, 2), np.arange(1, n, 2)
    want = args.target + args.margin
    report.update(target=args.target, margin=args.margin, min_served=args.min_served)
    for name, vs in (("with_text_stage", GRID_V), ("distance_only", (None,))):
        chosen = tune(dist[even], score[even], labels[even], want, args.min_served, vs)
        entry: dict[str, Any] = {"chosen": chosen}
        if chosen is not None:
            d, v = chosen
            s_odd = served_mask(dist[odd], score[odd], d, v)
            entry["even"] = scores(served_mask(dist[even], score[even], d, v), labels[even])
            entry["odd"] = scores(s_odd, labels[odd])
            entry["odd_ci95"] = bootstrap(s_odd, labels[odd], args.boot)
        report[name] = entry
    d0, v0 = DEFAULT_L2_THRESHOLD, DEFAULT_L2_AGREEMENT
    report["defaults"] = {"d": d0, "v": v0}
    s_def = served_mask(dist[odd], score[odd], d0, v0)
    report["odd_at_defaults"] = scores(s_def, labels[odd])
    report["odd_at_defaults_ci95"] = bootstrap(s_def, labels[odd], args.boot)
    report["even_at_defaults"] = scores(served_mask(dist[even], score[even], d0, v0), labels[even])
    report["curves_odd"] = {
        str(v): [
            {"d": d, **scores(served_mask(dist[odd], score[odd], d, v), labels[odd])}
            for d in CURVE_D
        ]
        for v in CURVE_V
    }

    ok_text = (score > 0.0) & (score >= DEFAULT_L2_AGREEMENT)
    calib = {
        "text": calibrate(dist[even], ok_text[even], labels[even]),
        "vector": calibrate(dist[even], np.ones(even.size, dtype=bool), labels[even]),
    }
    report["calibration"] = {
        path: {"edges": list(c.edges), "rates": list(c.rates),
               "matches_stored": c == (TEXT_CURVE if path == "text" else VECTOR_CURVE)}
        for path, c in calib.items()
    }  # fmt: skip
    report["cost_aware"] = cost_aware(dist[odd], score[odd], labels[odd])

    aggressive = CanonicalKeyMap(stop_words=True, sort_words=True)
    checks: dict[str, Any] = {}
    for nm, cm in (("strict (default)", canon), ("stop words + sorted", aggressive)):
        eq = np.array([cm.normalise(r["text_a"]) == cm.normalise(r["text_b"]) for r in rows])
        checks[nm] = {
            part: {
                "pairs": int(eq[ix].sum()),
                "precision": round(float(labels[ix][eq[ix]].mean()), 4) if eq[ix].any() else None,
            }
            for part, ix in (("even", even), ("odd", odd))
        }
    report["equal_after_normalising"] = checks

    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


def _fmt_v(v: float | None) -> str:
    return "off (distance only)" if v is None else f"{v:g}"


def render(r: dict[str, Any]) -> str:
    speed = f", embedded in {r['embed_s']} s ({r['texts_per_s']} texts/s)" if "embed_s" in r else ""
    lines = [
        f"embedder {r['embedder']}: pairs {r['pairs']} (duplicates {r['duplicates']}){speed}",
        f"cost: {r['cost']}",
        f"equal after normalising: {r['equal_after_normalising']}",
        f"tuned on even rows for precision >= {r['target']} + {r['margin']} "
        f"(at least {r['min_served']} pairs served); defaults in code: d={r['defaults']['d']}, "
        f"v={r['defaults']['v']}",
        "",
        "| L2 rule | d | v | even precision | even hit rate | odd precision [95% CI] "
        "| odd hit rate [95% CI] | odd recall |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("distance_only", "with_text_stage"):
        e = r[name]
        if e["chosen"] is None:
            lines.append(f"| {name} | - | - | none reaches the target | | | | |")
            continue
        d, v = e["chosen"]
        ev, od, ci = e["even"], e["odd"], e["odd_ci95"]
        lines.append(
            f"| {name} | {d:g} | {_fmt_v(v)} | {ev['precision']:.3f} | {ev['hit_rate']:.4f} | "
            f"{od['precision']:.3f} [{ci['precision'][0]:.3f}, {ci['precision'][1]:.3f}] | "
            f"{od['hit_rate']:.4f} [{ci['hit_rate'][0]:.4f}, {ci['hit_rate'][1]:.4f}] | "
            f"{od['recall']:.3f} |"
        )
    od, ci = r["odd_at_defaults"], r["odd_at_defaults_ci95"]
    lines += [
        "",
        f"odd rows at the defaults: precision {od['precision']:.3f} "
        f"[{ci['precision'][0]:.3f}, {ci['precision'][1]:.3f}], hit rate {od['hit_rate']:.4f} "
        f"[{ci['hit_rate'][0]:.4f}, {ci['hit_rate'][1]:.4f}], served {od['served']}",
        "",
        "Curves on odd rows (precision / hit rate):",
        "",
        "| d (cosine distance) | " + " | ".join(f"v = {_fmt_v(v)}" for v in CURVE_V) + " |",
        "| --- |" + " --- |" * len(CURVE_V),
    ]
    curves = [r["curves_odd"][str(v)] for v in CURVE_V]
    for i, d in enumerate(CURVE_D):
        cells = [f"{c[i]['precision']:.3f} / {c[i]['hit_rate']:.4f}" for c in curves]
        lines.append(f"| {d:g} | " + " | ".join(cells) + " |")
    cal = r["calibration"]
    lines += [
        "",
        "Calibration on even rows, p_wrong(d) per bin (d <= edge), pooled nondecreasing:",
        "",
        "| d <= | " + " | ".join(f"{e:g}" for e in cal["text"]["edges"]) + " |",
        "| --- |" + " --- |" * len(cal["text"]["edges"]),
    ]
    for path in ("text", "vector"):
        rates = " | ".join(f"{x:.3f}" for x in cal[path]["rates"])
        lines.append(f"| {path} (stored: {cal[path]['matches_stored']}) | {rates} |")
    lines += [
        "",
        "Cost-aware reuse on odd rows (default penalties):",
        "",
        "| path | rule | cost ms | cap | distance bar | precision | hit rate | served "
        "| net ms saved / 1k (fixed rule at this cost) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for x in r["cost_aware"]:
        cost = "-" if x["cost_ms"] is None else f"{x['cost_ms']:g}"
        bar = "none" if x["d_bar"] < 0 else f"{x['d_bar']:g}"
        gain = (
            "-"
            if x["cost_ms"] is None
            else f"{x['net_ms_per_1k']:g} ({x['fixed_net_ms_per_1k']:g})"
        )
        lines.append(
            f"| {x['path']} | {x['rule']} | {cost} | {x['cap']:g} | {bar} | "
            f"{x['precision']:.3f} | {x['hit_rate']:.4f} | {x['served']} | {gain} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
