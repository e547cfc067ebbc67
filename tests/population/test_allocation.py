"""Task allocation: plans and assignments of every allocation."""

from __future__ import annotations

import pytest

from lmas.population.allocation import Allocation, Broadcast, Competence, Explicit, OwnStream, RoundRobin

TASKS = ["t0", "t1", "t2", "t3"]
AGENTS = ["a", "b", "c"]


def _all(alloc, competence=None):
    plan = alloc.plan(TASKS, AGENTS)
    return plan, [alloc.assign(r, ts, AGENTS, competence) for r, ts in enumerate(plan)]


def test_broadcast_every_agent_every_task():
    plan, rounds = _all(Broadcast())
    assert plan == [[0], [1], [2], [3]]
    assert rounds[1] == [("a", 1), ("b", 1), ("c", 1)]


def test_round_robin_deals_a_shared_stream():
    plan, rounds = _all(RoundRobin())
    assert plan == [[0], [1], [2], [3]]
    assert [r[0][0] for r in rounds] == ["a", "b", "c", "a"]
    assert [r[0][0] for r in _all(RoundRobin(offset=1))[1]] == ["b", "c", "a", "b"]


def test_own_stream_default_deal_and_explicit_streams():
    plan, rounds = _all(OwnStream())
    assert plan == [[0, 1, 2], [3]]
    assert rounds == [[("a", 0), ("b", 1), ("c", 2)], [("a", 3)]]
    plan, rounds = _all(OwnStream({"c": ["t3", "t0"], "a": ["t1"]}))
    assert rounds == [[("c", 3), ("a", 1)], [("c", 0)]]
    with pytest.raises(ValueError, match=r"unknown tasks in `streams` \['t9'\]"):
        OwnStream({"a": ["t9"]}).plan(TASKS, AGENTS)


def test_explicit_rounds_may_be_empty_and_names_are_checked():
    alloc = Explicit([{"a": "t0", "b": ["t1", "t2"]}, {}, {"c": "t3"}])
    plan, rounds = _all(alloc)
    assert plan == [[0, 1, 2], [], [3]]
    assert rounds == [[("a", 0), ("b", 1), ("b", 2)], [], [("c", 3)]]
    with pytest.raises(ValueError, match=r"unknown agents in round 0 \['zed'\]"):
        Explicit([{"zed": "t0"}]).plan(TASKS, AGENTS)


def test_competence_gives_each_task_to_the_most_competent_agent():
    skill = {("a", 0): -1.0, ("b", 0): -0.5, ("c", 0): -2.0,
             ("a", 1): -0.1, ("b", 1): -0.2, ("c", 1): -3.0,
             ("a", 2): -1.0, ("b", 2): -1.0, ("c", 2): -0.9,
             ("a", 3): -1.0, ("b", 3): -1.0, ("c", 3): -1.0}
    alloc = Competence(tasks_per_round=2)
    plan, rounds = _all(alloc, lambda a, j: skill[(a, j)])
    assert plan == [[0, 1], [2, 3]]
    assert rounds[0] == [("b", 0), ("a", 1)]  # capacity 1 per agent: each best agent gets its task
    # round 1: c is best on t2; t3 is a three-way tie -> the agent that trained fewest tasks (c has 0
    # but is at capacity) -> a and b each trained one -> population order: a
    assert rounds[1] == [("c", 2), ("a", 3)]
    assert alloc.scores[0]["b"][0] == -0.5


def test_competence_capacity_too_small_is_a_clear_error():
    alloc = Competence(tasks_per_round=4, capacity=1)
    with pytest.raises(ValueError, match="capacity=1: 3 agents cannot take the 4 tasks"):
        _all(alloc, lambda a, j: 0.0)


def test_round_checks_what_an_allocation_assigns():
    class Stray(Allocation):
        def assign(self, round_idx, tasks, agents, competence=None):
            return [("agent0", 0), ("ghost", 0), ("agent0", 5)]

    with pytest.raises(ValueError, match=r"round 1 assigned \[\('ghost', 0\), \('agent0', 5\)\], not \(agent, task"):
        Stray().round(1, [0], ["agent0"])
    assert Allocation().round(0, [2], ["a", "b"]) == [("a", 2), ("b", 2)]
