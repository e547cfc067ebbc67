"""KnowledgeMatrix.until / summaries_over_rounds: the metrics as they stood after each round."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmas.metrics.knowledge import KnowledgeMatrix


def _matrix() -> KnowledgeMatrix:
    km = KnowledgeMatrix(["a"], ["t0", "t1", "t2"], {"t0": "accuracy", "t1": "accuracy", "t2": "accuracy"})
    for t, v in zip(["t0", "t1", "t2"], [0.1, 0.2, 0.3]):
        km.record_initial("a", t, v)
    rows = [[0.8, 0.4, math.nan], [0.6, 0.9, 0.35], [0.5, 0.7, 0.95]]
    for r, row in enumerate(rows):
        km.start_round()
        for t, v in zip(["t0", "t1", "t2"], row):
            if not math.isnan(v):
                km.record(r, "a", t, v)
        km.mark_trained(r, "a", f"t{r}")
    return km


def test_until_keeps_the_first_rounds_and_their_training():
    km = _matrix()
    early = km.until(1)
    assert early.n_rounds == 2 and early.trained() == [(0, "a", "t0"), (1, "a", "t1")]
    np.testing.assert_array_equal(early.values(), km.values()[:2])  # NaN == NaN here
    assert km.n_rounds == 3  # the original is untouched
    with pytest.raises(IndexError):
        km.until(3)


def test_summaries_over_rounds_by_hand():
    over = _matrix().summaries_over_rounds("a")
    assert over[0] == pytest.approx({"avg_acc": 0.8, "forgetting": 0.0, "bwt": 0.0, "plasticity": 0.8})
    # after round 1: R = [[.8, .4], [.6, .9]], b = [.1, .2]
    assert over[1] == pytest.approx({"avg_acc": 0.75, "forgetting": 0.2, "bwt": -0.2, "fwt": 0.2, "plasticity": 0.85})
    assert over[2] == _matrix().summary("a")
    assert over[2]["forgetting"] == pytest.approx(((0.8 - 0.5) + (0.9 - 0.7)) / 2)
