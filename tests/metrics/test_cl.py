"""Hand-computed checks of lmas.metrics.cl (arithmetic in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmas.metrics import cl

ABS = 1e-12

# R3[i][j]: task j after training round i
R3 = np.array(
    [
        [0.80, 0.30, 0.20],
        [0.60, 0.90, 0.40],
        [0.50, 0.70, 0.95],
    ]
)
B3 = np.array([0.10, 0.25, 0.30])

R4 = np.array(
    [
        [0.90, 0.20, 0.10, 0.30],
        [0.70, 0.85, 0.15, 0.35],
        [0.60, 0.88, 0.75, 0.40],  # R4[2][1] = 0.88 > R4[1][1]: max-based forgetting would differ
        [0.40, 0.65, 0.70, 0.95],
    ]
)
B4 = np.array([0.25, 0.25, 0.20, 0.10])

# perplexity: lower is better
P3 = np.array(
    [
        [10.0, 50.0, 40.0],
        [12.0, 8.0, 30.0],
        [15.0, 9.0, 6.0],
    ]
)
BP3 = np.array([60.0, 55.0, 45.0])


def test_3x3() -> None:
    # last row (0.50 + 0.70 + 0.95) / 3 = 2.15 / 3
    assert cl.average_accuracy(R3) == pytest.approx(2.15 / 3, abs=ABS)
    # j=0: 0.80 - 0.50 = 0.30 ; j=1: 0.90 - 0.70 = 0.20
    per = cl.forgetting_per_task(R3)
    assert list(per) == [0, 1]
    assert per[0] == pytest.approx(0.30, abs=ABS)
    assert per[1] == pytest.approx(0.20, abs=ABS)
    # (0.30 + 0.20) / 2 = 0.25
    assert cl.forgetting(R3) == pytest.approx(0.25, abs=ABS)
    assert cl.bwt(R3) == pytest.approx(-0.25, abs=ABS)
    # j=1: R[0][1] - b[1] = 0.30 - 0.25 = 0.05 ; j=2: R[1][2] - b[2] = 0.40 - 0.30 = 0.10
    fw = cl.forward_transfer_per_task(R3, B3)
    assert list(fw) == [1, 2]
    assert fw[1] == pytest.approx(0.05, abs=ABS)
    assert fw[2] == pytest.approx(0.10, abs=ABS)
    # (0.05 + 0.10) / 2 = 0.075
    assert cl.forward_transfer(R3, B3) == pytest.approx(0.075, abs=ABS)
    # diagonal (0.80 + 0.90 + 0.95) / 3 = 2.65 / 3
    assert cl.plasticity(R3) == pytest.approx(2.65 / 3, abs=ABS)
    # [0.80, (0.60 + 0.90) / 2 = 0.75, 2.15 / 3]
    assert cl.accuracy_after_each(R3) == pytest.approx([0.80, 0.75, 2.15 / 3], abs=ABS)


def test_4x4() -> None:
    # (0.40 + 0.65 + 0.70 + 0.95) / 4 = 2.70 / 4 = 0.675
    assert cl.average_accuracy(R4) == pytest.approx(0.675, abs=ABS)
    # j=0: 0.90 - 0.40 = 0.50 ; j=1: 0.85 - 0.65 = 0.20 (first value after training, not the
    # max 0.88) ; j=2: 0.75 - 0.70 = 0.05
    assert cl.forgetting_per_task(R4) == pytest.approx({0: 0.50, 1: 0.20, 2: 0.05}, abs=ABS)
    # (0.50 + 0.20 + 0.05) / 3 = 0.25   (max-based would give (0.50 + 0.23 + 0.05) / 3 = 0.26)
    assert cl.forgetting(R4) == pytest.approx(0.25, abs=ABS)
    assert cl.bwt(R4) == pytest.approx(-0.25, abs=ABS)
    # j=1: 0.20 - 0.25 = -0.05 ; j=2: R[1][2] - b[2] = 0.15 - 0.20 = -0.05 ;
    # j=3: R[2][3] - b[3] = 0.40 - 0.10 = 0.30
    assert cl.forward_transfer_per_task(R4, B4) == pytest.approx({1: -0.05, 2: -0.05, 3: 0.30}, abs=ABS)
    # (-0.05 - 0.05 + 0.30) / 3 = 0.20 / 3
    assert cl.forward_transfer(R4, B4) == pytest.approx(0.20 / 3, abs=ABS)
    # (0.90 + 0.85 + 0.75 + 0.95) / 4 = 3.45 / 4 = 0.8625
    assert cl.plasticity(R4) == pytest.approx(0.8625, abs=ABS)
    # [0.90, (0.70 + 0.85) / 2 = 0.775, (0.60 + 0.88 + 0.75) / 3 = 2.23 / 3, 0.675]
    assert cl.accuracy_after_each(R4) == pytest.approx([0.90, 0.775, 2.23 / 3, 0.675], abs=ABS)


def test_lists_are_accepted() -> None:
    assert cl.forgetting(R3.tolist()) == pytest.approx(0.25, abs=ABS)
    assert cl.forward_transfer(R3.tolist(), B3.tolist()) == pytest.approx(0.075, abs=ABS)


def test_perplexity_direction() -> None:
    # average and plasticity do not depend on the direction
    assert cl.average_accuracy(P3, higher_is_better=False) == pytest.approx(10.0, abs=ABS)  # (15+9+6)/3
    assert cl.plasticity(P3, higher_is_better=False) == pytest.approx(8.0, abs=ABS)  # (10+8+6)/3
    # forgetting = R[T-1][j] - R[j][j]: j=0: 15 - 10 = 5 ; j=1: 9 - 8 = 1 -> 3 (got worse)
    assert cl.forgetting_per_task(P3, higher_is_better=False) == pytest.approx({0: 5.0, 1: 1.0}, abs=ABS)
    assert cl.forgetting(P3, higher_is_better=False) == pytest.approx(3.0, abs=ABS)
    assert cl.bwt(P3, higher_is_better=False) == pytest.approx(-3.0, abs=ABS)
    # fwt = b[j] - R[j-1][j]: j=1: 55 - 50 = 5 ; j=2: 45 - 30 = 15 -> 10 (perplexity dropped)
    assert cl.forward_transfer(P3, BP3, higher_is_better=False) == pytest.approx(10.0, abs=ABS)
    # the default direction reads the same numbers the other way round
    assert cl.forgetting(P3) == pytest.approx(-3.0, abs=ABS)
    assert cl.forward_transfer(P3, BP3) == pytest.approx(-10.0, abs=ABS)


def test_single_task_is_zero_like_avalanche() -> None:
    R = [[0.7]]
    assert cl.average_accuracy(R) == pytest.approx(0.7)
    assert cl.plasticity(R) == pytest.approx(0.7)
    assert cl.forgetting(R) == 0.0
    assert cl.bwt(R) == 0.0
    assert cl.forward_transfer(R, [0.1]) == 0.0
    assert cl.forgetting_per_task(R) == {}
    assert cl.forward_transfer_per_task(R, [0.1]) == {}
    assert cl.accuracy_after_each(R) == pytest.approx([0.7])


def test_task_subsets() -> None:
    # forgetting over tasks {0, 2} of R4: (0.50 + 0.05) / 2 = 0.275 ; task 3 alone has none
    assert cl.forgetting(R4, tasks=[2, 0]) == pytest.approx(0.275, abs=ABS)
    assert cl.forgetting(R4, tasks=[3]) == 0.0
    # average over tasks {1, 3}: (0.65 + 0.95) / 2 = 0.80
    assert cl.average_accuracy(R4, tasks=[1, 3]) == pytest.approx(0.80, abs=ABS)
    # fwt over {0}: none ; over {3}: 0.30
    assert cl.forward_transfer(R4, B4, tasks=[0]) == 0.0
    assert cl.forward_transfer(R4, B4, tasks=[3]) == pytest.approx(0.30, abs=ABS)
    # plasticity over {0, 1}: (0.90 + 0.85) / 2
    assert cl.plasticity(R4, tasks=[0, 1]) == pytest.approx(0.875, abs=ABS)
    with pytest.raises(ValueError, match="empty"):
        cl.forgetting(R4, tasks=[])
    with pytest.raises(ValueError, match="out of range"):
        cl.plasticity(R4, tasks=[4])


def test_nan_needed_raises_with_round_and_task() -> None:
    R = R3.copy()
    R[2][0] = math.nan
    with pytest.raises(ValueError, match=r"R\[2\]\[0\].*task 0 after training round 2"):
        cl.forgetting(R)
    with pytest.raises(ValueError, match=r"R\[2\]\[0\]"):
        cl.average_accuracy(R)
    R = R3.copy()
    R[1][1] = math.nan
    with pytest.raises(ValueError, match=r"R\[1\]\[1\]"):
        cl.plasticity(R)
    with pytest.raises(ValueError, match=r"R\[1\]\[1\]"):
        cl.accuracy_after_each(R)
    R = R3.copy()
    R[0][1] = math.nan
    with pytest.raises(ValueError, match=r"R\[0\]\[1\].*round 0"):
        cl.forward_transfer(R, B3)
    b = B3.copy()
    b[2] = math.nan
    with pytest.raises(ValueError, match=r"b\[2\].*task 2 before any training"):
        cl.forward_transfer(R3, b)


def test_nan_not_needed_is_ignored() -> None:
    # forgetting reads the diagonal and the last row only; fwt the super-diagonal and b[1:]
    R = R3.copy()
    R[0][1] = R[0][2] = R[1][0] = math.nan  # off-diagonal, not in the last row
    assert cl.forgetting(R) == pytest.approx(0.25, abs=ABS)
    assert cl.plasticity(R) == pytest.approx(2.65 / 3, abs=ABS)
    R = R3.copy()
    R[0][2] = R[1][0] = math.nan
    b = B3.copy()
    b[0] = math.nan
    assert cl.forward_transfer(R, b) == pytest.approx(0.075, abs=ABS)


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="square"):
        cl.forgetting(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="square"):
        cl.average_accuracy(np.zeros((0, 0)))
    with pytest.raises(ValueError, match="length T=3"):
        cl.forward_transfer(R3, [0.1, 0.2])
