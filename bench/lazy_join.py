"""How well the policy learner's join reads removals, eager offers against lazy ones.

The small-cache rig of tests/test_cache_events.py (a real query node with a 6 kB cache, its
policy loop logging to a real embedded log): 300 Zipf(1.3) searches over 24 queries, then a
real OnlineLearner reads the query log. Eager and lazy offers alternate in the same run;
each row is one rig. Reports removals and how many joined their decision before it was
resolved (matched) or after (late).

    nice -n 10 .venv/bin/python -m bench.lazy_join --runs 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np

from streams.policy.learner import OnlineLearner
from tests.test_cache_events import SmallCacheRig, search
from tests.test_policy_online import fill, queries


def one(lazy: bool, seed: int) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as d:
        small = SmallCacheRig(Path(d))
        try:
            ctl = small.node.service.cache_layers
            assert ctl is not None
            ctl.lazy_offers = lazy
            fill(small)
            pool = queries(24)
            rng = np.random.default_rng(seed)
            for i in rng.zipf(1.3, 300) % len(pool):
                search(small, pool[int(i)])
            loop = small.node.policy_loop
            assert loop is not None and loop.emitter.flush(10)
            learner = OnlineLearner(small.log, small.topics, small.codec, budget_bytes=small.budget)
            try:
                learner.run_to_end()
                s = learner.stats()
            finally:
                learner.close()
            joined = s["removals_joined"]
            return {"removals": s["removals"], **joined}
        finally:
            small.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    rows: dict[str, list[dict[str, int]]] = {"eager": [], "lazy": []}
    for r in range(args.runs):
        for name in rows:
            row = one(name == "lazy", 4 + r)
            rows[name].append(row)
            print(f"run {r + 1} {name:5s} {row}")
    for name, rs in rows.items():
        late = [x["late"] / max(x["removals"], 1) for x in rs]
        matched = statistics.median(x["matched"] for x in rs)
        lates = statistics.median(x["late"] for x in rs)
        print(
            f"{name:5s} median matched {matched:g}, late {lates:g}; late share "
            f"{min(late):.1%} to {max(late):.1%}"
        )


if __name__ == "__main__":
    main()
