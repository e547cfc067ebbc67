"""Continual-learning metrics over an accuracy matrix, with Avalanche's definitions.

Notation: ``R`` is a ``T x T`` array where ``R[i][j]`` is the metric on task ``j`` after
training the ``i``-th task (the ``i``-th *round* of the stream); entries that were not evaluated
are NaN. ``b[j]`` is the metric on task ``j`` before any training. The definitions match
avalanche-lib 0.6.0 (``StreamForgetting``, ``forgetting_to_bwt`` and ``StreamForwardTransfer``):

* average accuracy  ``A = mean_j R[T-1][j]``                   (all ``T`` tasks)
* forgetting        ``F = mean_{j<T-1} R[j][j] - R[T-1][j]``   (first value after training ``j``
  minus the last one; *not* the max over earlier rows used by Chaudhry et al. 2018)
* backward transfer ``BWT = -F``
* forward transfer  ``FWT = mean_{j>=1} R[j-1][j] - b[j]``
* plasticity        ``P = mean_j R[j][j]`` (learning accuracy, Riemer et al. 2019)

Direction. Every function takes ``higher_is_better`` (default ``True``). For a metric where lower
is better (perplexity) the differences are flipped so that the signs keep their meaning:
positive forgetting always means *got worse*, positive BWT/FWT always means *got better*:
``F = mean_{j<T-1} R[T-1][j] - R[j][j]`` and ``FWT = mean_{j>=1} b[j] - R[j-1][j]``.
Plain averages (average accuracy, plasticity, :func:`accuracy_after_each`) do not depend on the
direction; they accept the flag only for a uniform call signature.

One task (``T == 1``). Avalanche averages forgetting and forward transfer with its ``Mean``
metric, which returns ``0.0`` when nothing was added; with one task there is no earlier task to
forget and no later task to transfer to, so :func:`forgetting`, :func:`bwt` and
:func:`forward_transfer` return ``0.0`` as Avalanche does (the per-task dicts are empty). The same
holds whenever no task qualifies (e.g. ``tasks=[T-1]`` for forgetting).

Subsets. ``tasks`` (a list of column indices, default all) restricts an average to some tasks
while the rows keep their meaning; this is what Avalanche reports when its per-experience values
are averaged over a subset of the experiences of the whole stream (used to pool the accuracy-like
and the perplexity tasks of one mixed stream separately). Per-task functions return
``{task index: value}`` dicts.

NaN. Only the entries a metric needs are read; a needed NaN raises ``ValueError`` that names the
round (row) and the task (column). Unneeded entries (e.g. ``R[0][2]`` for forgetting) may be NaN.

Runs of a population (:func:`run_metrics`). An agent of a population may train several tasks in
one round, a task in several rounds, nothing in some rounds, and change after its last training
(merges, exchanges, transfers). The metrics of every run are therefore defined once on the
agent's values over *all rounds of the run*: ``V[r][j]`` (its metric on task ``j`` at the end of
round ``r``, ``F`` = the final round), ``b[j]``, and, for each task ``j`` it trained, the rounds
``first[j]`` and ``last[j]`` in which it first and last trained ``j``; ``s0 = min_j first[j]`` is
its first training round and ``s = +1`` (``-1`` when lower is better). Means run over the tasks the
agent trained (of one metric group):

==============  ==========================================================  ====================
key             formula                                                     tasks averaged
==============  ==========================================================  ====================
``avg_acc``     ``V[F][j]``  (the final round, after every later merge)     all trained
``forgetting``  ``s * (V[last[j]][j] - V[F][j])``                           ``last[j] < F``
``bwt``         ``-forgetting``
``fwt``         ``s * (V[first[j]-1][j] - b[j])`` (just before ``j`` was    ``first[j] > s0``
                first trained)
``plasticity``  ``V[last[j]][j]`` (right after ``j`` was last trained)      all trained
==============  ==========================================================  ====================

Tasks trained in the same round share that round as their ``R[j][j]`` row: two tasks trained
together in round ``r`` (both last) each count ``V[r][j] - V[F][j]`` as forgetting, and tasks
trained in the final round count none (Avalanche's ``j < T-1``); two tasks first trained together
in round ``r > s0`` both take ``V[r-1]`` for forward transfer, and those of the agent's first round
have none (Avalanche's ``j >= 1``). ``forgetting``/``bwt`` are ``0.0`` when no task qualifies (as
above); ``fwt`` is omitted when none qualifies or a value it needs was not evaluated. With one task
per round, trained in stream order in rounds ``0..T-1`` (``first = last = j``, ``F = T-1``), every
value equals the Avalanche function of the square matrix ``V`` above (tested).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "accuracy_after_each",
    "average_accuracy",
    "bwt",
    "forgetting",
    "forgetting_per_task",
    "forward_transfer",
    "forward_transfer_per_task",
    "plasticity",
    "run_metrics",
]


def _square(R: ArrayLike, name: str) -> np.ndarray:
    """``R`` as a float ``T x T`` array with ``T >= 1``; ``ValueError`` otherwise."""
    a = np.asarray(R, dtype=float)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"{name}: R must be a non-empty square T x T matrix, got shape {a.shape}")
    return a


def _initial(b: ArrayLike, T: int, name: str) -> np.ndarray:
    """``b`` as a float vector of length ``T``; ``ValueError`` otherwise."""
    v = np.asarray(b, dtype=float)
    if v.shape != (T,):
        raise ValueError(f"{name}: b must be a vector of length T={T}, got shape {v.shape}")
    return v


def _get(R: np.ndarray, i: int, j: int, name: str) -> float:
    """``R[i][j]``, raising a ``ValueError`` naming round and task when it is NaN."""
    v = float(R[i, j])
    if np.isnan(v):
        raise ValueError(f"{name}: R[{i}][{j}] is NaN (task {j} after training round {i}) but it is needed")
    return v


def _get_b(b: np.ndarray, j: int, name: str) -> float:
    """``b[j]``, raising a ``ValueError`` naming the task when it is NaN."""
    v = float(b[j])
    if np.isnan(v):
        raise ValueError(f"{name}: b[{j}] is NaN (task {j} before any training) but it is needed")
    return v


def _columns(tasks: Sequence[int] | None, T: int, name: str) -> list[int]:
    """The task indices to average over: all ``T`` if ``tasks`` is None, else the sorted subset."""
    if tasks is None:
        return list(range(T))
    cols = sorted({int(j) for j in tasks})
    if not cols:
        raise ValueError(f"{name}: `tasks` is empty; give at least one task index or None for all")
    if cols[0] < 0 or cols[-1] >= T:
        raise ValueError(f"{name}: task indices {cols} out of range for T={T}")
    return cols


def _mean(xs: Sequence[float]) -> float:
    """Mean of ``xs``; ``0.0`` for an empty list (Avalanche's ``Mean`` with no updates)."""
    return float(sum(xs) / len(xs)) if xs else 0.0


def average_accuracy(R: ArrayLike, higher_is_better: bool = True, tasks: Sequence[int] | None = None) -> float:
    """Mean of the last row: the metric on every task (or on ``tasks``) after the last round."""
    name = "average_accuracy"
    a = _square(R, name)
    T = a.shape[0]
    return _mean([_get(a, T - 1, j, name) for j in _columns(tasks, T, name)])


def forgetting_per_task(
    R: ArrayLike, higher_is_better: bool = True, tasks: Sequence[int] | None = None
) -> dict[int, float]:
    """Forgetting of each task ``j < T-1`` (of ``tasks``): ``R[j][j] - R[T-1][j]``.

    Returns ``{j: value}`` in task order; the difference is flipped if lower is better.
    """
    name = "forgetting_per_task"
    a = _square(R, name)
    T = a.shape[0]
    sign = 1.0 if higher_is_better else -1.0
    return {j: sign * (_get(a, j, j, name) - _get(a, T - 1, j, name)) for j in _columns(tasks, T, name) if j < T - 1}


def forgetting(R: ArrayLike, higher_is_better: bool = True, tasks: Sequence[int] | None = None) -> float:
    """Mean forgetting over tasks ``j < T-1`` (Avalanche ``StreamForgetting``); ``0.0`` if none."""
    return _mean(list(forgetting_per_task(R, higher_is_better, tasks).values()))


def bwt(R: ArrayLike, higher_is_better: bool = True, tasks: Sequence[int] | None = None) -> float:
    """Backward transfer, ``-forgetting(R)`` (Avalanche ``forgetting_to_bwt``)."""
    return 0.0 - forgetting(R, higher_is_better, tasks)  # 0.0 - x: no "-0.0" for no forgetting


def forward_transfer_per_task(
    R: ArrayLike, b: ArrayLike, higher_is_better: bool = True, tasks: Sequence[int] | None = None
) -> dict[int, float]:
    """Forward transfer to each task ``j >= 1`` (of ``tasks``): ``R[j-1][j] - b[j]``.

    Returns ``{j: value}`` in task order; the difference is flipped if lower is better.
    """
    name = "forward_transfer_per_task"
    a = _square(R, name)
    T = a.shape[0]
    v = _initial(b, T, name)
    sign = 1.0 if higher_is_better else -1.0
    return {j: sign * (_get(a, j - 1, j, name) - _get_b(v, j, name)) for j in _columns(tasks, T, name) if j >= 1}


def forward_transfer(
    R: ArrayLike, b: ArrayLike, higher_is_better: bool = True, tasks: Sequence[int] | None = None
) -> float:
    """Mean forward transfer over tasks ``j >= 1`` (Avalanche ``StreamForwardTransfer``).

    ``0.0`` when no task qualifies (``T == 1``), as Avalanche's ``Mean`` gives.
    """
    return _mean(list(forward_transfer_per_task(R, b, higher_is_better, tasks).values()))


def plasticity(R: ArrayLike, higher_is_better: bool = True, tasks: Sequence[int] | None = None) -> float:
    """Mean of the diagonal: each task's metric right after training it (learning accuracy)."""
    name = "plasticity"
    a = _square(R, name)
    return _mean([_get(a, j, j, name) for j in _columns(tasks, a.shape[0], name)])


def accuracy_after_each(R: ArrayLike, higher_is_better: bool = True) -> list[float]:
    """For each round ``i``, the mean of ``R[i][0..i]``: the metric over the tasks seen so far."""
    name = "accuracy_after_each"
    a = _square(R, name)
    return [_mean([_get(a, i, j, name) for j in range(i + 1)]) for i in range(a.shape[0])]


def run_metrics(
    V: ArrayLike,
    b: ArrayLike,
    first: Sequence[int],
    last: Sequence[int],
    higher_is_better: bool = True,
    start: int | None = None,
) -> dict[str, float]:
    """An agent's metrics over a whole run (module docstring, "Runs of a population").

    Args:
        V: ``(rounds, T)``: the agent's metric on each of its ``T`` trained tasks at the end of
            every round of the run (``F = rounds - 1`` is the final round).
        b: ``(T,)``: the untrained model's metric on each task.
        first, last: the round in which the agent first / last trained each task.
        higher_is_better: the direction of the metric (signs of forgetting and FWT).
        start: the agent's first training round over *all* its tasks (default ``min(first)``);
            tasks first trained then have no forward transfer.

    Returns ``{"average", "forgetting", "bwt", "plasticity"}`` and ``"fwt"`` when it is known.
    """
    name = "run_metrics"
    a = np.asarray(V, dtype=float)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name}: V must be a (rounds, tasks) matrix with both >= 1, got shape {a.shape}")
    F, T = a.shape[0] - 1, a.shape[1]
    v = _initial(b, T, name)
    first, last = [int(x) for x in first], [int(x) for x in last]
    if len(first) != T or len(last) != T:
        raise ValueError(
            f"{name}: need one first and one last training round per task ({T}), got {len(first)} and {len(last)}"
        )
    bad = [j for j in range(T) if not 0 <= first[j] <= last[j] <= F]
    if bad:
        raise ValueError(
            f"{name}: task {bad[0]} has first={first[bad[0]]}, last={last[bad[0]]}; need 0 <= first <= last <= F={F}"
        )
    s0 = min(first) if start is None else int(start)
    sign = 1.0 if higher_is_better else -1.0
    forgetting = _mean([sign * (_get(a, last[j], j, name) - _get(a, F, j, name)) for j in range(T) if last[j] < F])
    out = {
        "average": _mean([_get(a, F, j, name) for j in range(T)]),
        "forgetting": forgetting,
        "bwt": 0.0 - forgetting,
        "plasticity": _mean([_get(a, last[j], j, name) for j in range(T)]),
    }
    later = [j for j in range(T) if first[j] > s0]
    before = [(float(a[first[j] - 1, j]), float(v[j])) for j in later]
    if later and not any(np.isnan(x) or np.isnan(y) for x, y in before):
        out["fwt"] = _mean([sign * (x - y) for x, y in before])
    return out
