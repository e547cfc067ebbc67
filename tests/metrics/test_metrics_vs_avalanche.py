"""lmas.metrics.cl agrees with avalanche-lib's own forgetting / BWT / forward-transfer metrics.

Avalanche is driven two ways over the same matrix:

* its plugin metrics ``GenericStreamForgetting`` and ``GenericStreamForwardTransfer`` (the classes
  behind ``StreamForgetting`` / ``StreamForwardTransfer``), with the per-experience accuracy
  replaced by a table lookup, receive the callbacks an ``EvaluationPlugin`` sends: one evaluation
  of every experience before training (``eval_every > -1``, needed for forward transfer), then for
  each training experience ``i`` a training phase followed by an evaluation of every experience
  ``j`` that reports ``R[i][j]``; the value each emits after the last evaluation is compared;
* its standalone ``Forgetting`` / ``BWT`` / ``ForwardTransfer`` metrics and ``Mean`` updated
  directly, to compare the per-task dictionaries.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

# avalanche-lib is a hard dependency (setup.cfg): import it plainly so a broken install fails here
from avalanche.evaluation.metrics import Mean
from avalanche.evaluation.metrics.forgetting_bwt import (
    BWT,
    Forgetting,
    GenericStreamForgetting,
    forgetting_to_bwt,
)
from avalanche.evaluation.metrics.forward_transfer import (
    ForwardTransfer,
    GenericStreamForwardTransfer,
)

from lmas.metrics import cl

TOL = 1e-9


class _Lookup:
    """Stands in for the accuracy of one evaluation experience: holds a preset value."""

    def __init__(self) -> None:
        self.value = float("nan")

    def reset(self) -> None:
        self.value = float("nan")

    def result(self) -> float:
        return self.value


class _TableStreamForgetting(GenericStreamForgetting):
    def __init__(self) -> None:
        super().__init__(_Lookup())

    def metric_update(self, strategy) -> None:
        self._current_metric.value = strategy.value

    def metric_result(self, strategy) -> float:
        return self._current_metric.result()

    def __str__(self) -> str:
        return "TableStreamForgetting"


class _TableStreamForwardTransfer(GenericStreamForwardTransfer):
    def __init__(self) -> None:
        super().__init__(_Lookup())

    def metric_update(self, strategy) -> None:
        self._current_metric.value = strategy.value

    def metric_result(self, strategy) -> float:
        return self._current_metric.result()

    def __str__(self) -> str:
        return "TableStreamForwardTransfer"


def _strategy() -> SimpleNamespace:
    return SimpleNamespace(
        experience=None,
        is_eval=False,
        is_training=False,
        eval_every=0,
        clock=SimpleNamespace(train_iterations=0),
        value=float("nan"),
    )


def _experience(j: int, stream: str) -> SimpleNamespace:
    return SimpleNamespace(current_experience=j, task_labels=[0], origin_stream=SimpleNamespace(name=stream))


def _evaluate(plugins, strategy, row) -> list:
    """One evaluation phase over every experience; returns what ``after_eval`` emitted."""
    strategy.is_eval, strategy.is_training = True, False
    for p in plugins:
        p.before_eval(strategy)
    for j, v in enumerate(row):
        strategy.experience = _experience(j, "test")
        strategy.value = float(v)
        for p in plugins:
            p.before_eval_exp(strategy)
        for p in plugins:  # one evaluation iteration (minibatch) per experience
            p.before_eval_iteration(strategy)
            p.before_eval_forward(strategy)
            p.after_eval_forward(strategy)
            p.after_eval_iteration(strategy)
        for p in plugins:
            p.after_eval_exp(strategy)
    emitted = [p.after_eval(strategy) for p in plugins]
    strategy.is_eval = False
    return emitted


def _train(plugins, strategy, i: int) -> None:
    """One training phase on experience ``i`` (only the callbacks; nothing is learned)."""
    strategy.is_training = True
    strategy.experience = _experience(i, "train")
    for hook in ("before_training", "before_training_exp", "after_training_exp", "after_training"):
        for p in plugins:
            getattr(p, hook)(strategy)
    strategy.clock.train_iterations += 1
    strategy.is_training = False


def avalanche_stream(R: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(StreamForgetting, StreamForwardTransfer) that Avalanche reports after the last round."""
    fgt, fwt = _TableStreamForgetting(), _TableStreamForwardTransfer()
    plugins = [fgt, fwt]
    strategy = _strategy()
    _evaluate(plugins, strategy, b)  # before any training
    emitted = None
    for i in range(R.shape[0]):
        _train(plugins, strategy, i)
        emitted = _evaluate(plugins, strategy, R[i])
    (f_value,), (t_value,) = emitted
    assert f_value.value == fgt.result() and t_value.value == fwt.result()
    return f_value.value, t_value.value


def avalanche_standalone(R: np.ndarray, b: np.ndarray) -> tuple[dict, dict, dict, float, float]:
    """Per-task forgetting, BWT and forward transfer from the standalone metrics, and the means."""
    T = R.shape[0]
    f, bw, t = Forgetting(), BWT(), ForwardTransfer()
    for j in range(T):
        t.update(j, float(b[j]), initial=True)
    for i in range(T):
        f.reset_last()
        bw.reset_last()
        for j in range(T):
            v = float(R[i, j])
            if j == i:  # the experience just trained: its first value after training
                f.update(j, v, initial=True)
                bw.update(j, v, initial=True)
            else:
                f.update(j, v)
                bw.update(j, v)
            if j == i + 1:  # value after training the previous experience
                t.update(j, v)
    mf, mt = Mean(), Mean()
    for v in f.result().values():
        mf.update(v, weight=1)
    for v in t.result().values():
        mt.update(v, weight=1)
    return f.result(), bw.result(), t.result(), mf.result(), mt.result()


HAND_R = np.array(
    [
        [0.90, 0.20, 0.10, 0.30],
        [0.70, 0.85, 0.15, 0.35],
        [0.60, 0.88, 0.75, 0.40],
        [0.40, 0.65, 0.70, 0.95],
    ]
)
HAND_B = np.array([0.25, 0.25, 0.20, 0.10])


def _cases() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(20240601)
    cases = [(HAND_R, HAND_B)]
    for T in (1, 2, 3, 4, 5, 7, 10):
        cases.append((rng.uniform(0.0, 1.0, (T, T)), rng.uniform(0.0, 1.0, T)))
    return cases


CASES = _cases()


@pytest.mark.parametrize("R,b", CASES, ids=[f"T{c[0].shape[0]}_{k}" for k, c in enumerate(CASES)])
def test_stream_metrics_agree(R: np.ndarray, b: np.ndarray) -> None:
    av_forgetting, av_fwt = avalanche_stream(R, b)
    assert cl.forgetting(R) == pytest.approx(av_forgetting, abs=TOL)
    assert cl.bwt(R) == pytest.approx(forgetting_to_bwt(float(av_forgetting)), abs=TOL)
    assert cl.forward_transfer(R, b) == pytest.approx(av_fwt, abs=TOL)
    # lower-is-better flips the sign of every difference that Avalanche computes
    assert cl.forgetting(R, higher_is_better=False) == pytest.approx(-av_forgetting, abs=TOL)
    assert cl.forward_transfer(R, b, higher_is_better=False) == pytest.approx(-av_fwt, abs=TOL)


@pytest.mark.parametrize("R,b", CASES, ids=[f"T{c[0].shape[0]}_{k}" for k, c in enumerate(CASES)])
def test_standalone_metrics_agree(R: np.ndarray, b: np.ndarray) -> None:
    f, bw, t, mean_f, mean_t = avalanche_standalone(R, b)
    ours_f = cl.forgetting_per_task(R)
    ours_t = cl.forward_transfer_per_task(R, b)
    assert sorted(f) == list(ours_f)
    assert sorted(t) == list(ours_t)
    for j in ours_f:
        assert ours_f[j] == pytest.approx(f[j], abs=TOL)
        assert -ours_f[j] == pytest.approx(bw[j], abs=TOL)
        assert -ours_f[j] == pytest.approx(forgetting_to_bwt(f)[j], abs=TOL)
    for j in ours_t:
        assert ours_t[j] == pytest.approx(t[j], abs=TOL)
    assert cl.forgetting(R) == pytest.approx(mean_f, abs=TOL)
    assert cl.forward_transfer(R, b) == pytest.approx(mean_t, abs=TOL)


def test_hand_matrix_values() -> None:
    # the numbers of tests/metrics/test_cl.py::test_4x4, now straight from Avalanche
    av_forgetting, av_fwt = avalanche_stream(HAND_R, HAND_B)
    assert av_forgetting == pytest.approx(0.25, abs=1e-12)
    assert av_fwt == pytest.approx(0.20 / 3, abs=1e-12)


def test_single_task_is_zero_in_avalanche() -> None:
    av_forgetting, av_fwt = avalanche_stream(np.array([[0.7]]), np.array([0.2]))
    assert av_forgetting == 0.0 and av_fwt == 0.0
    assert cl.forgetting([[0.7]]) == 0.0 and cl.forward_transfer([[0.7]], [0.2]) == 0.0
