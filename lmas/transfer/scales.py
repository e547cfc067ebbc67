"""A merge's coefficient tuned on validation splits (``transfer.scales``): the grid of ``λ`` for which the target
holds ``λ·merge``, each scored on the validation splits (held out of train; never test) of the tasks the merge
should serve, the first best kept. ``0`` in the grid is "no merge": the guard against negative transfer.

Several tasks are combined scale-free (:func:`pick_scale`): each task's score relative to its best candidate
(``s / max s`` for accuracy-like metrics, ``min s / s`` for perplexity), averaged over the tasks, so one task's
units do not outweigh another's; with one task this is that task's own best.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lmas.data.task import HIGHER_IS_BETTER, Task
from lmas.evaluation.scoring import evaluate
from lmas.lm.encoding import PromptEncoder
from lmas.transfer.merge import merge_adapters

if TYPE_CHECKING:
    from lmas.population.population import Population

log = logging.getLogger(__name__)


def checked_scales(scales: Sequence[float] | None) -> list[float] | None:
    """The ``transfer.scales`` option as floats (None: no tuning, the merge at coefficient 1)."""
    if scales is not None and not scales:
        raise ValueError("transfer.scales=[]: give the grid of merge coefficients (or null: 1)")
    return None if scales is None else [float(x) for x in scales]


def pick_scale(
    scales: Sequence[float], scores: Mapping[str, Mapping[str, float]], lower_is_better: Mapping[str, bool]
) -> tuple[float, dict[str, float]]:
    """The first ``λ`` of ``scales`` with the best mean relative score, and every candidate's mean.

    ``scores[str(λ)][task]``: the candidate's validation score on the task; ``lower_is_better[task]``: perplexity.
    """
    if not scales:
        raise ValueError("transfer.scales=[]: give the grid of merge coefficients (or null: 1)")
    tasks = list(lower_is_better)
    relative: dict[str, float] = {str(lam): 0.0 for lam in scales}
    for t in tasks:
        values = [scores[str(lam)][t] for lam in scales]
        for lam, v in zip(scales, values, strict=True):
            if lower_is_better[t]:
                rel = min(values) / v if v > 0 else 1.0
            else:
                rel = v / max(values) if max(values) > 0 else 1.0
            relative[str(lam)] += rel / len(tasks)
    best = max(scales, key=lambda lam: relative[str(lam)])  # max keeps the first of equal scores
    return best, relative


def tune_scale(
    population: Population,
    merged: str,
    target: str,
    tasks: Sequence[Task],
    encoder: PromptEncoder | None,
    scales: Sequence[float],
    seed: int = 0,
    keep_frozen: bool = False,
) -> tuple[float, dict[str, dict[str, float]], dict[str, float]]:
    """Write ``λ·merged`` into ``target`` for each ``λ`` of ``scales`` and score ``tasks`` on validation. Returns
    the best ``λ``, the scores per candidate and task, and the mean relative scores; the caller writes the best
    (the last candidate is what ``target`` holds on return). ``keep_frozen``: the target's frozen adapters stay
    (merge initialisation) instead of being zeroed."""
    if encoder is None:
        raise ValueError("transfer.scales needs the loop's encoder")
    if not tasks:
        raise ValueError(f"transfer.scales: no task to tune the merge into {target!r} on (its sources learnt none)")
    bare = [t.name for t in tasks if not t.val]
    if bare:
        raise ValueError(f"transfer.scales: tasks {bare} have no validation split to tune the merge on")

    def write(lam: float) -> None:
        merge_adapters(population, [merged], [lam], target, "exact", seed=seed, keep_frozen=keep_frozen)
        population.activate(target)

    scores: dict[str, dict[str, float]] = {}
    for lam in scales:
        write(lam)
        scores[str(lam)] = {t.name: evaluate(population.model, encoder, t, "val") for t in tasks}
    best, relative = pick_scale(scales, scores, {t.name: not HIGHER_IS_BETTER[t.metric] for t in tasks})
    log.info("merge scale for %s on %s: %s (val %s)", target, [t.name for t in tasks], best, scores)
    return best, scores, relative


def merge_tuned(
    population: Population,
    sources: list[str],
    weights: list[float],
    target: str,
    method: str,
    tasks: Sequence[Task],
    encoder: PromptEncoder | None,
    scales: Sequence[float],
    options: Mapping[str, Any],
) -> tuple[float, dict[str, Any]]:
    """Merge ``sources`` by ``method`` and write ``λ·merge`` into ``target`` (its whole update), ``λ`` tuned on
    the validation splits of ``tasks``; returns the merge's relative truncation error and the record's fields."""
    tmp = f"{target}-unscaled"
    residual = merge_adapters(population, sources, weights, tmp, method, **options)
    seed = int(options.get("seed") or 0)
    scale, scores, relative = tune_scale(population, tmp, target, tasks, encoder, scales, seed)
    residual = max(residual, merge_adapters(population, [tmp], [scale], target, "exact", seed=seed))
    population.delete_agent(tmp)
    return residual, {"scale": scale, "val_tasks": [t.name for t in tasks], "val_scores": scores,
                      "val_relative": relative}  # fmt: skip
