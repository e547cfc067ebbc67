"""Initialise an agent's adapter for a new task from a merge of related agents' adapters: the function
(:func:`init_from_merge`) and the transfer policy (:class:`MergeInit`, ``transfer=merge_init``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from lmas.data.task import Task
from lmas.lm.encoding import PromptEncoder
from lmas.transfer.factors import is_stacked
from lmas.transfer.merge import merge_adapters
from lmas.transfer.policy import FromRound, MergeOptions
from lmas.transfer.scales import checked_scales, tune_scale

if TYPE_CHECKING:
    from lmas.population.population import Population

log = logging.getLogger(__name__)


def init_from_merge(
    population: Population,
    new_agent: str,
    sources: list[str],
    weights: list[float] | None = None,
    method: str = "exact",
    **merge,
) -> float:
    """Start ``new_agent`` from a merge of ``sources`` (a thin wrapper over :func:`merge_adapters`).

    Each source contributes its whole update (all its adapters). A missing ``new_agent`` is created
    with the merge's rank; an existing one keeps its rank and has its trainable adapter overwritten
    (e.g. a task adapter just added by ``population.add_task_adapter``) while its earlier, frozen
    adapters stay: its update becomes ``ΔW_frozen + merge``. ``weights`` default to uniform ``1/n``;
    ``merge`` passes ``density``, ``majority_sign_method``, ``rank`` and ``seed`` on.
    Returns the merge's relative truncation error (0 = exact).
    """
    if weights is None:
        weights = [1.0 / len(sources)] * len(sources) if sources else []
    if new_agent in sources and new_agent in population.agents and is_stacked(population, new_agent):
        raise ValueError(
            f"init_from_merge: {new_agent!r} is one of its own sources and keeps its frozen adapters, "
            "which would count them twice; leave it out of `sources` or use merge_adapters"
        )
    return merge_adapters(population, sources, weights, new_agent, method, keep_frozen=True, **merge)


class MergeInit(FromRound):
    """Before round ``r >= start``, each assigned agent starts from a merge of ``sources``.

    ``sources`` default to every other agent that has learnt something; ``weights`` to ``1/n``.
    The merge (any method of :func:`lmas.transfer.merge.merge_adapters`) is written into the
    agent's trainable adapter, which keeps its rank; its frozen adapters, if any, stay.
    ``scales``: the merge's coefficient ``λ`` (the agent starts from ``λ·merge``) tuned on the assigned task's
    validation split (held out of train; never test) over this grid, the first best kept (``0`` is starting
    fresh, the guard against negative transfer); None: ``λ = 1``. Each record has the scale and the scores.
    """

    name = "merge_init"

    def __init__(
        self,
        method: str = "exact",
        sources: list[str] | None = None,
        weights: list[float] | None = None,
        start: int = 1,
        density: float | None = None,
        majority_sign_method: str = "total",
        seed: int = 0,
        scales: list[float] | None = None,
    ) -> None:
        self.method, self.sources, self.weights, self.start = method, sources, weights, start
        self.options: MergeOptions = {"density": density, "majority_sign_method": majority_sign_method, "seed": seed}
        self.scales = checked_scales(scales)

    def apply(
        self,
        population: Population,
        round_idx: int,
        assignments: Sequence[tuple[str, Task]] = (),
        encoder: PromptEncoder | None = None,
    ) -> list[dict]:
        if not self.due(round_idx):
            return []
        plans = []
        for agent, task in assignments:
            sources = self.peers(population, agent)
            if sources:
                weights = list(self.weights) if self.weights is not None else [1.0 / len(sources)] * len(sources)
                plans.append((agent, task, sources, weights))
        # compute every merge before writing any (an agent may be another's source)
        merged = {}
        for agent, _, sources, weights in plans:
            tmp = f"mergeinit_{agent}"
            merged[agent] = (tmp, merge_adapters(population, sources, weights, tmp, self.method, **self.options))
        records = []
        for agent, task, sources, weights in plans:
            tmp, first = merged[agent]
            scale, scores = self.tune(population, tmp, agent, task, encoder) if self.scales else (1.0, None)
            residual = max(
                first,
                merge_adapters(population, [tmp], [scale], agent, "exact", seed=self.options["seed"], keep_frozen=True),
            )
            population.delete_agent(tmp)
            records.append(
                {
                    "round": round_idx,
                    "transfer": self.name,
                    "method": self.method,
                    "agent": agent,
                    "task": task.name,
                    "sources": sources,
                    "weights": weights,
                    "residual": residual,
                    **({"scale": scale, "val_scores": scores} if scores is not None else {}),
                }
            )
        return records

    def tune(
        self, population: Population, merged: str, agent: str, task: Task, encoder: PromptEncoder | None
    ) -> tuple[float, dict[str, float]]:
        """The first best ``λ`` of :attr:`scales` for ``agent`` starting from ``λ·merged`` on ``task``'s validation
        split, and every candidate's score."""
        best, scores, _ = tune_scale(
            population, merged, agent, [task], encoder, self.scales or [], self.options["seed"], keep_frozen=True
        )
        return best, {lam: by_task[task.name] for lam, by_task in scores.items()}
