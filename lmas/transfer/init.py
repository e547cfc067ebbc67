"""Initialise an agent's adapter for a new task from a merge of related agents' adapters."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmas.transfer.factors import is_stacked
from lmas.transfer.merge import merge_adapters

if TYPE_CHECKING:
    from lmas.population.population import Population


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
