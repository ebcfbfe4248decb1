"""The cache-policy simulator, baselines, offline bounds and the learned admission policy.

Domain code: no I/O except reading and writing traces (:mod:`.trace`). The pieces:

- :mod:`.trace` requests and their JSON-lines files; :mod:`.workloads` seeded generators.
- :mod:`.simulator` the replay loop; :mod:`.policies` LRU, LFU, GDSF, the rules.
- :mod:`.context` what the hot path sees and its bucket; :mod:`.join` decisions joined with
  outcomes; :mod:`.learned` the VW bandit and its exported table.
- :mod:`.eviction` the learned eviction: the hit-density table learned from the log, the
  shadow caches that pick a table, and :class:`EvictionTable`, the hot-path rank.
- :mod:`.simulator` also models an L2 (:class:`L2Model`): near-duplicate serves from a
  cached sibling, right or false (a labelled probability), beside the exact L0 figures.
- :mod:`.bounds` Belady and the LP / knapsack upper bounds; :mod:`.evaluate` all of it.
"""

from __future__ import annotations

from streams.policy.bounds import Bound, belady_hits, knapsack_bound, lp_bound
from streams.policy.evaluate import (
    POLICIES,
    POLICY_HELP,
    PolicyRow,
    WorkloadReport,
    default_budget,
    evaluate_trace,
    evaluate_workloads,
    reports_to_json,
)
from streams.policy.eviction import (
    BanditEvictingCache,
    EvictingCache,
    EvictionConfig,
    EvictionRun,
    EvictionTable,
    replay_learned_eviction,
)
from streams.policy.exceptions import BoundUnavailable, PolicyError, TraceFormatError
from streams.policy.learned import (
    CombinedRun,
    LearnerConfig,
    PolicyLearner,
    PolicyTable,
    TablePolicy,
    replay_bandit_eviction,
    replay_learned,
)
from streams.policy.policies import (
    ControlledCache,
    GDSFCache,
    LFUCache,
    LRUCache,
    RuleAdmission,
)
from streams.policy.simulator import L2_PRECISION, Decision, L2Model, SimResult, replay
from streams.policy.trace import Request, read_trace, write_trace
from streams.policy.workloads import WORKLOADS, generate

__all__ = [
    "L2_PRECISION",
    "POLICIES",
    "POLICY_HELP",
    "WORKLOADS",
    "BanditEvictingCache",
    "Bound",
    "BoundUnavailable",
    "CombinedRun",
    "ControlledCache",
    "Decision",
    "EvictingCache",
    "EvictionConfig",
    "EvictionRun",
    "EvictionTable",
    "GDSFCache",
    "L2Model",
    "LFUCache",
    "LRUCache",
    "LearnerConfig",
    "PolicyError",
    "PolicyLearner",
    "PolicyRow",
    "PolicyTable",
    "Request",
    "RuleAdmission",
    "SimResult",
    "TablePolicy",
    "TraceFormatError",
    "WorkloadReport",
    "belady_hits",
    "default_budget",
    "evaluate_trace",
    "evaluate_workloads",
    "generate",
    "knapsack_bound",
    "lp_bound",
    "read_trace",
    "replay",
    "replay_bandit_eviction",
    "replay_learned",
    "replay_learned_eviction",
    "reports_to_json",
    "write_trace",
]
