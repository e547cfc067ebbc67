"""Initialise an agent's adapter for a new task from a merge of related agents' adapters."""

from __future__ import annotations

from lmas.transfer.merge import merge_adapters


def init_from_merge(
    population,
    new_agent: str,
    sources: list[str],
    weights: list[float] | None = None,
    method: str = "exact",
    **merge,
) -> None:
    """Start ``new_agent`` from a merge of ``sources`` (a thin wrapper over :func:`merge_adapters`).

    A missing ``new_agent`` is created with the merge's rank; an existing one keeps its rank and
    has its trainable adapter overwritten (e.g. a task adapter just added by
    ``population.add_task_adapter``). ``weights`` default to uniform ``1/n``; ``merge`` passes
    ``density``, ``majority_sign_method``, ``rank`` and ``seed`` on.
    """
    if weights is None:
        weights = [1.0 / len(sources)] * len(sources) if sources else []
    merge_adapters(population, sources, weights, new_agent, method, **merge)
