"""cl.run_metrics / KnowledgeMatrix.summary: the one definition of the metrics of a run, by hand.

Cases the square Avalanche matrix cannot express: an agent changed by a merge after its last
training (avg_acc is the final round's), two tasks trained in one round, a task retrained later;
and the reduction to Avalanche's definitions when one task is trained per round.
"""

from __future__ import annotations

import numpy as np
import pytest

from lmas.metrics import KnowledgeMatrix, cl


def _matrix(values: list[list[float]], initial: list[float], trained: list[tuple[int, str]],
            tasks=("t0", "t1", "t2"), agent: str = "a") -> KnowledgeMatrix:
    km = KnowledgeMatrix([agent], list(tasks)[: len(initial)], {t: "accuracy" for t in list(tasks)[: len(initial)]})
    for t, v in zip(km.tasks, initial):
        km.record_initial(agent, t, v)
    for r, row in enumerate(values):
        km.start_round()
        for t, v in zip(km.tasks, row):
            km.record(r, agent, t, v)
    for r, t in trained:
        km.mark_trained(r, agent, t)
    return km


def test_avg_acc_reflects_a_merge_after_the_last_training():
    # the agent trains t0 in r0 and t1 in r1; in r2 it trains nothing, but a merge changes it
    km = _matrix([[0.8, 0.3], [0.7, 0.9], [0.5, 0.6]], [0.2, 0.25], [(0, "t0"), (1, "t1")])
    s = km.summary("a")
    assert s == pytest.approx({
        "avg_acc": (0.5 + 0.6) / 2,  # the final round r2, not r1 (0.80)
        "forgetting": ((0.8 - 0.5) + (0.9 - 0.6)) / 2,  # t1 changed after its last training too
        "bwt": -((0.8 - 0.5) + (0.9 - 0.6)) / 2,
        "fwt": 0.3 - 0.25,  # t1 just before it was trained (r0) minus untrained
        "plasticity": (0.8 + 0.9) / 2,
    }, abs=1e-12)
    # what the tracker logged after each round is the same function on the rounds so far
    assert km.until(1).summary("a")["avg_acc"] == pytest.approx((0.7 + 0.9) / 2)
    assert km.summaries() == {"a": s}


def test_two_tasks_trained_in_one_round():
    # t0 and t1 both trained in r0, t2 in r1 (F = 1)
    km = _matrix([[0.8, 0.7, 0.3], [0.6, 0.65, 0.9]], [0.2, 0.25, 0.1], [(0, "t0"), (0, "t1"), (1, "t2")])
    assert km.summary("a") == pytest.approx({
        "avg_acc": (0.6 + 0.65 + 0.9) / 3,
        "forgetting": ((0.8 - 0.6) + (0.7 - 0.65)) / 2,  # both measured from r0, their shared row
        "bwt": -((0.8 - 0.6) + (0.7 - 0.65)) / 2,
        "fwt": 0.3 - 0.1,  # t2 only: t1 trained in the agent's first round has no forward transfer
        "plasticity": (0.8 + 0.7 + 0.9) / 3,
    }, abs=1e-12)
    # two tasks first trained together in a later round both take the round before it
    km = _matrix([[0.8, 0.4, 0.3], [0.6, 0.65, 0.9]], [0.2, 0.25, 0.1], [(0, "t0"), (1, "t1"), (1, "t2")])
    s = km.summary("a")
    assert s["fwt"] == pytest.approx(((0.4 - 0.25) + (0.3 - 0.1)) / 2)
    assert s["forgetting"] == pytest.approx(0.8 - 0.6)  # tasks trained in the final round count none


def test_a_task_retrained_later_counts_from_its_last_training():
    # t0 in r0 and again in r2, t1 in r1, nothing in r3
    km = _matrix([[0.8, 0.3], [0.5, 0.9], [0.85, 0.7], [0.75, 0.6]], [0.2, 0.25],
                 [(0, "t0"), (1, "t1"), (2, "t0")])
    assert km.training_rounds("a") == {"t1": (1, 1), "t0": (0, 2)}
    s = km.summary("a")
    assert s["forgetting"] == pytest.approx(((0.9 - 0.6) + (0.85 - 0.75)) / 2)
    assert s["plasticity"] == pytest.approx((0.9 + 0.85) / 2)
    assert s["fwt"] == pytest.approx(0.3 - 0.25)


@pytest.mark.parametrize("seed", range(5))
def test_one_task_per_round_is_avalanche(seed):
    """first = last = j, F = T-1: the cl functions of the square matrix, which are checked against
    avalanche-lib in test_metrics_vs_avalanche.py."""
    rng = np.random.default_rng(seed)
    T = int(rng.integers(1, 6))
    R, b = rng.random((T, T)), rng.random(T)
    for hib in (True, False):
        m = cl.run_metrics(R, b, list(range(T)), list(range(T)), hib)
        assert m["average"] == pytest.approx(cl.average_accuracy(R, hib), abs=1e-12)
        assert m["forgetting"] == pytest.approx(cl.forgetting(R, hib), abs=1e-12)
        assert m["bwt"] == pytest.approx(cl.bwt(R, hib), abs=1e-12)
        assert m["plasticity"] == pytest.approx(cl.plasticity(R, hib), abs=1e-12)
        if T > 1:
            assert m["fwt"] == pytest.approx(cl.forward_transfer(R, b, hib), abs=1e-12)
        else:
            assert "fwt" not in m


def test_fwt_is_omitted_when_the_round_before_was_not_evaluated_and_bad_rounds_are_named():
    V = np.array([[0.8, np.nan], [0.7, 0.9]])
    m = cl.run_metrics(V, [0.2, 0.3], [0, 1], [0, 1])
    assert "fwt" not in m and m["average"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="task 1 has first=1, last=2"):
        cl.run_metrics(V, [0.2, 0.3], [0, 1], [0, 2])
