"""The learner's join reads parked admissions (lazy offers) right.

A lazy offer's admission is logged at its miss (outcome ``parked``, the event's feature
``parked``) but its entry is stored only when the query repeats. The join must not settle it
by its idle estimate while it waits: its key's next event settles it (a hit: stored from
then; a miss: never stored), or the parked cap (no reuse, no bytes).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from streams.policy.join import JoinedDecision, OutcomeJoin
from streams.policy.learned import ACTIONS
from streams.policy.learner import EventJoin
from streams.policy.simulator import Decision, LoggedDecision, ReplayLog
from streams.policy.trace import Request
from tests.test_cache_events import T0, EventLog

TTLS = tuple(t for _, t in ACTIONS)
TTL300 = next(i for i, (n, _) in enumerate(ACTIONS) if n == "ttl300")
COST = 2.0


class Replay:
    """A replay log built request by request, joined incrementally like the learner does."""

    def __init__(self, join: OutcomeJoin, char_time_s: float = 10.0) -> None:
        self.join = join
        self.join.char_time_s = char_time_s
        self.requests: list[Request] = []
        self.log = ReplayLog()
        self.out: list[JoinedDecision] = []

    def add(self, t: float, key: str, *, hit: bool = False, admit: bool = False) -> int:
        i = len(self.requests)
        self.requests.append(Request(t, key, 1000, COST))
        self.log.hits.append(1 if hit else 0)
        if admit:
            self.log.decisions.append(LoggedDecision(i, Decision("ttl300", True, 300.0, 1.0, "b")))
        return i

    def advance(self) -> list[JoinedDecision]:
        got = self.join.advance(self.requests, self.log, len(self.requests))
        self.out.extend(got)
        return got

    def observed(self, index: int) -> tuple[float, float]:
        j = next(j for j in self.out if j.index == index)
        assert j.action == TTL300
        o = j.outcomes[j.action]
        assert o.observed
        return o.saved, o.held_s


@pytest.mark.parametrize("join_cls", [OutcomeJoin, EventJoin])
def test_a_parked_admission_does_not_expire_before_its_keys_next_event(
    join_cls: type[OutcomeJoin],
) -> None:
    r = Replay(join_cls(TTLS))
    parked = r.add(T0, "a", admit=True)
    eager = r.add(T0, "b", admit=True)  # the control: the same admission, not parked
    r.join.parked.add(parked)
    r.advance()
    r.add(T0 + 100, "filler")  # idle 100 s > min(300 s, char time 10 s)
    got = r.advance()
    assert [j.index for j in got] == [eager]  # only the eager one settles by its estimate
    r.add(T0 + 400, "a", hit=True)  # the repeat: the entry is stored now, and serves it
    r.add(T0 + 403, "a", hit=True)
    assert r.advance() == []
    r.add(T0 + 500, "filler")
    assert [j.index for j in r.advance()] == [parked]
    # both hits credited; bytes held from the repeat to the last hit + char time
    assert r.observed(parked) == (pytest.approx(2 * COST), pytest.approx(13.0))
    assert r.observed(eager) == (0.0, pytest.approx(10.0))


def test_a_parked_admission_whose_repeat_misses_was_never_stored() -> None:
    r = Replay(OutcomeJoin(TTLS))
    parked = r.add(T0, "a", admit=True)
    r.join.parked.add(parked)
    r.add(T0 + 50, "a")  # dropped from the parked map (or refused by its late put)
    r.add(T0 + 51, "a", hit=True)  # a later entry's hit is not this decision's
    r.advance()
    r.out.extend(r.join.flush())
    assert r.observed(parked) == (0.0, 0.0)


def test_the_parked_cap_settles_one_whose_key_never_came_again() -> None:
    r = Replay(OutcomeJoin(TTLS))
    assert r.join.parked_cap_s == 10 * 300.0
    parked = r.add(T0, "a", admit=True)
    r.join.parked.add(parked)
    r.add(T0 + 2999, "filler")
    assert r.advance() == []
    r.add(T0 + 3001, "filler")
    assert [j.index for j in r.advance()] == [parked]
    assert r.observed(parked) == (0.0, 0.0)  # no reuse, no bytes held


def test_a_join_without_parked_decisions_is_unchanged() -> None:
    """The simulator never parks: a decision settles by the idle estimate as before."""
    r = Replay(OutcomeJoin(TTLS))
    i = r.add(T0, "a", admit=True)
    r.add(T0 + 1, "a", hit=True)
    r.add(T0 + 100, "filler")
    assert [j.index for j in r.advance()] == [i]
    assert r.observed(i) == (pytest.approx(COST), pytest.approx(11.0))


# -- through the production learner, from real query-log events ------------------------------


@pytest.fixture
def events(tmp_path: Path) -> Iterator[EventLog]:
    e = EventLog(tmp_path)
    yield e
    e.close()


def _parked_search(events: EventLog, key: str, t: float, parked: bool) -> None:
    """A miss the policy admitted (ttl300), logged as the node logs a lazy offer."""
    from streams.schemas import catalog

    events.n += 1
    features = {"size": 1000.0} | ({"parked": 1.0} if parked else {})
    rec = {
        "event_id": f"e{events.n}",
        "tenant": "acme",
        "index": "docs",
        "query_key": key,
        "top_k": 5,
        "features": features,
        "bucket": "f0.g0.s0.c0.x0.q0",
        "cache_layer": "NONE",
        "cache_hit": False,
        "action": "ttl300",
        "action_probability": 1.0,
        "proxy_cost": COST,
        "timestamp": int(t * 1000),
    }
    topic = events.topics.query_log
    value = events.codec.encode(catalog.subject_for(topic), catalog.load_schema("SearchEvent"), rec)
    events.log.append(topic, "acme/docs", value)


@pytest.mark.parametrize("parked", [True, False])
def test_the_learner_joins_a_parked_admissions_removal_as_matched(
    events: EventLog, parked: bool
) -> None:
    """Its repeat came after the idle horizon (300 s): parked, the join waits for it and the
    later removal matches; not parked (the control), it was settled first: late."""
    _parked_search(events, "k", T0, parked)
    events.search("filler", T0 + 350, arm="bypass")
    events.search("k", T0 + 400, hit=True)
    events.search("k", T0 + 401, hit=True)
    events.removal("k", T0 + 420, T0, "evicted", 2)
    events.search("filler", T0 + 5000, arm="bypass")
    ol, seen = events.learner()
    try:
        while not ol.caught_up():  # one event a step: the join expires between them
            ol.step(max_events=1)
        ol.run_to_end()
        joined = ol.stats()["removals_joined"]
        j = next(j for j in seen if j.time == pytest.approx(T0, abs=1e-3))
        o = j.outcomes[j.action]
        if parked:
            assert joined == {"matched": 1, "late": 0, "unmatched": 0}
            assert (o.saved, o.held_s) == (pytest.approx(2 * COST), pytest.approx(20.0))
        else:
            assert joined == {"matched": 0, "late": 1, "unmatched": 0}
            assert o.saved == 0.0
    finally:
        ol.close()
