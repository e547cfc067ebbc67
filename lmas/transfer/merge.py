"""Merge agents' LoRA adapters into one agent's adapter: peft's combination types, plus exact merges.

An adapter is held as :data:`~lmas.transfer.factors.Factors` (``ΔW = B @ A`` per module, the
scaling folded into ``B``; :mod:`lmas.transfer.factors` has that algebra and reads and writes agents).

Methods:

* peft's ``add_weighted_adapter`` types (:data:`PEFT_METHODS`). ``linear``, ``ties``,
  ``dare_*`` and ``magnitude_prune`` combine the A's and the B's *separately* (weights split as
  ``±sqrt(|w s|)`` on each side); the ``*_svd`` types combine the products ``ΔW_i`` and factor the
  result back by truncated SVD; ``cat`` stacks the factors (rank = sum of ranks).
* ``exact``: ``ΔW = Σ w_i s_i B_i A_i`` per module, factored into rank ``k`` by a truncated SVD
  (:func:`~lmas.transfer.factors.factorise`). ``k`` = sum of ranks (the default for a new agent) is exact; a smaller
  ``k`` gives the best rank-``k`` approximation (Eckart–Young).
* ``task_arithmetic``: the same sum of products under its task-vector name, never truncated by
  request; weights are free signed scalars (``[1, -1]`` of one adapter gives ``ΔW = 0`` exactly).
* ``breadcrumbs``, ``della``, ``knots_ties``, ``model_stock``: the merging toolkits' task-vector merges
  (:mod:`lmas.transfer.task_vectors`) on each module's dense ``ΔW_i``, factored back into rank ``k``
  (default: the sum of the sources' ranks; pruned merges are not low-rank, so the truncation error is reported).

A source's knowledge is the sum of ALL its adapters (:func:`~lmas.transfer.factors.agent_factors`);
the merge replaces the target's (:func:`~lmas.transfer.factors.write_knowledge`).

Why averaging the factors is inexact (FedAvg of A and B is not the average of the products):
``(Σ_i b_i B_i)(Σ_j a_j A_j) = Σ_i b_i a_i B_i A_i + Σ_{i≠j} b_i a_j B_i A_j``. The cross terms
``B_i A_j`` pair one adapter's output directions with another's input directions and belong to no
``ΔW_i``. Adapters trained apart have unrelated bases (any invertible ``R`` gives the same product
``(B R)(R⁻¹ A)``), so the cross terms are not small in general. In general it is exact for one
adapter only (peft turns every type into ``linear`` then).
"""

from __future__ import annotations

import copy
import logging
import math
import re
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig

from lmas.population.population import set_active, with_rank
from lmas.transfer import task_vectors
from lmas.transfer.factors import (
    Factors,
    adapter_factors,
    agent_factors,
    factorise,
    factorise_dense,
    is_stacked,
    stack_sets,
    write_knowledge,
)

if TYPE_CHECKING:
    from lmas.population.population import Population

log = logging.getLogger(__name__)

PEFT_METHODS = (
    "linear",
    "svd",
    "cat",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
OWN_METHODS = ("exact", "task_arithmetic", *task_vectors.METHODS)
METHODS = PEFT_METHODS + OWN_METHODS
PRUNING = ("ties", "dare", "magnitude", "breadcrumbs", "della", "knots")
NEEDS_DENSITY = frozenset(m for m in METHODS if m.startswith(PRUNING))
SAME_RANK = frozenset({"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"})
STACK_EXACT = ("cat", "svd")  # peft types that are linear in the products: exact on stacked agents too
SIGN_METHODS = ("total", "frequency")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


def exact_merge(sets: Sequence[Factors], weights: Sequence[float], rank: int | None = None) -> tuple[Factors, float]:
    """``ΔW = Σ w_i ΔW_i`` per module, as factors of rank ``rank`` (None: sum of the ranks, exact).

    A module missing from some adapters takes the sum over those that have it.
    Returns the factors and the largest relative truncation error over modules (0 = exact).
    """
    out: Factors = {}
    worst = 0.0
    for module, (a, b) in sorted(stack_sets(sets, weights).items()):
        a, b, res = factorise(a, b, rank or a.shape[0])
        out[module] = (a, b)
        worst = max(worst, res)
    return out, worst


def task_vector_merge(
    sets: Sequence[Factors],
    weights: Sequence[float],
    method: str,
    density: float | None,
    rank: int | None = None,
    seed: int = 0,
) -> tuple[Factors, float]:
    """A :mod:`~lmas.transfer.task_vectors` merge of each module's ``ΔW_i``, factored into rank ``rank``
    (None: the sum of the ranks of the adapters that have the module). Returns the factors and the largest
    relative truncation error over modules."""
    gen = torch.Generator().manual_seed(seed)
    out: Factors = {}
    worst = 0.0
    for module in sorted(dict.fromkeys(m for s in sets for m in s)):
        present = [(s[module], float(w)) for s, w in zip(sets, weights, strict=True) if module in s]
        taus = [(b.double() @ a.double()) for (a, b), _ in present]
        merged = task_vectors.merge(taus, [w for _, w in present], method, density, gen)
        dtype = present[0][0][0].dtype
        a, b, res = factorise_dense(merged.to(dtype), rank or sum(p[0][0].shape[0] for p in present))
        out[module] = (a, b)
        worst = max(worst, res)
    return out, worst


# --- merges on a population ---------------------------------------------------------------
def merged_model(population: Population, agent: str) -> torch.nn.Module:
    """A standalone copy of the model with ``agent``'s adapters folded into its weights.

    peft's ``merge_and_unload`` runs on a deep copy, so the population's base stays bit-identical
    (merging and unmerging in place, ``W + ΔW - ΔW``, is exact only up to float rounding).
    """
    model = copy.deepcopy(population.model)
    adapters = population.agents[agent].adapters
    set_active(model, adapters)
    return model.merge_and_unload(adapter_names=adapters)


def adapter_config(population: Population, agent: str) -> LoraConfig:
    """The LoRA config of ``agent``'s trainable adapter."""
    return population.lora_of(population.agents[agent].trainable)


def target_config(population: Population, sources: Sequence[str], rank: int, modules: Sequence[str]) -> LoraConfig:
    """Config of a new agent for a merge of ``sources``: rank ``rank``, the first source's α/r ratio.

    Sources with the same targets hand them on; otherwise the new adapter targets exactly
    ``modules`` (full module names).
    """
    configs = [adapter_config(population, s) for s in sources]
    first = configs[0]
    same = all(
        c.target_modules == first.target_modules and c.layers_to_transform == first.layers_to_transform for c in configs
    )
    changes = (
        {}
        if same
        else {
            "target_modules": sorted(m.removeprefix("base_model.model.") for m in modules),
            "layers_to_transform": None,
        }
    )
    return with_rank(first, rank, **changes)


def peft_merge(
    population: Population,
    sources: Sequence[str],
    weights: Sequence[float],
    method: str,
    density: float | None,
    majority_sign_method: str,
    rank: int | None,
    seed: int,
) -> Factors:
    """Run peft's ``add_weighted_adapter`` on the sources' (single) adapters; return its factors.

    The temporary adapter is deleted again. peft's RNG use (init of the new adapter, DARE's
    random masks) runs under ``seed`` and leaves the global RNG untouched.
    """
    tmp = "lmasmergetmp"
    while tmp in population.model.peft_config:
        tmp += "x"
    adapters = [population.agents[s].trainable for s in sources]
    try:
        with torch.random.fork_rng(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*density.*no pruning.*")
            torch.manual_seed(seed)
            population.model.add_weighted_adapter(
                adapters,
                list(weights),
                tmp,
                combination_type=method,
                svd_rank=rank if method.endswith("svd") else None,
                density=density,
                majority_sign_method=majority_sign_method,
            )
        return adapter_factors(population, tmp)
    finally:
        if tmp in population.model.peft_config:
            population.model.delete_adapter(tmp)


def check_merge(
    population: Population,
    sources: Sequence[str],
    weights: Sequence[float],
    target: str,
    method: str,
    density: float | None,
    majority_sign_method: str,
    rank: int | None,
) -> None:
    """Raise a ValueError naming the problem with a merge request."""
    if method not in METHODS:
        raise ValueError(f"merge method {method!r} is unknown; allowed: {', '.join(METHODS)}")
    if not sources:
        raise ValueError("merge: `sources` is empty; give at least one agent")
    if len(sources) != len(weights):
        raise ValueError(f"merge: {len(sources)} sources but {len(weights)} weights; give one weight per source")
    unknown = [s for s in sources if s not in population.agents]
    if unknown:
        raise ValueError(f"merge: unknown source agents {unknown}; the population has {population.names}")
    stacked = [s for s in dict.fromkeys(sources) if is_stacked(population, s)]
    if stacked and method in PEFT_METHODS and method not in STACK_EXACT:
        raise ValueError(
            f"merge method {method!r} combines single adapters (peft's add_weighted_adapter), but source agents "
            f"{stacked} hold several stacked task adapters (strategy=inclora/olora), whose sum it cannot merge; "
            f"use exact, task_arithmetic, {' or '.join(STACK_EXACT)}, which merge an agent's whole update"
        )
    if not all(math.isfinite(float(w)) for w in weights):
        raise ValueError(f"merge: weights must be finite, got {list(weights)}")
    if not isinstance(target, str) or not _NAME.match(target):
        raise ValueError(f"merge: target {target!r} must be an agent name matching {_NAME.pattern}")
    if method in NEEDS_DENSITY:
        if density is None:
            raise ValueError(f"merge method {method!r} needs `density` in (0, 1] (1 = no pruning)")
        if not 0.0 < density <= 1.0:
            raise ValueError(f"merge: density={density} must be in (0, 1]")
    if majority_sign_method not in SIGN_METHODS:
        raise ValueError(f"merge: majority_sign_method={majority_sign_method!r} is not one of {SIGN_METHODS}")
    if rank is not None and rank < 1:
        raise ValueError(f"merge: rank={rank} must be >= 1")
    if method == "model_stock" and len(set(sources)) < 2:
        raise ValueError("merge method 'model_stock' needs at least two source agents (their angle sets the ratio)")
    if method == "task_arithmetic" and rank is not None:
        raise ValueError("merge method 'task_arithmetic' never truncates; use method='exact' with `rank`")
    ranks = {adapter_config(population, s).r for s in sources}
    if method in SAME_RANK and len(sources) > 1 and len(ranks) > 1:
        raise ValueError(
            f"merge method {method!r} needs sources of one LoRA rank, got ranks {sorted(ranks)}; "
            "use cat, an *_svd method or exact"
        )


def merge_adapters(
    population: Population,
    sources: list[str],
    weights: list[float],
    target: str,
    method: str,
    density: float | None = None,
    majority_sign_method: str = "total",
    rank: int | None = None,
    seed: int = 0,
    keep_frozen: bool = False,
) -> float:
    """Merge the sources' knowledge into ``target``: its whole update becomes ``merge(ΔW_s)``.

    A source's knowledge is the sum of ALL its adapters (:func:`agent_factors`). ``exact`` and
    ``task_arithmetic`` merge those sums; for agents that stack adapters (IncLoRA/O-LoRA) ``cat``
    and ``svd`` are computed the same way (they are linear in the products: ``cat`` = ``exact``,
    ``svd`` = ``exact`` cut to ``rank``, default the largest adapter rank, as peft does); the other
    peft types combine single adapters and are refused for them (:func:`check_merge`).
    The merge replaces the target's knowledge (:func:`write_knowledge` with ``keep = 0``): its
    trainable adapter holds the merge and its frozen adapters are zeroed, so nothing counts twice
    (the target may be a source). ``keep_frozen=True`` overwrites the trainable adapter only and
    keeps the target's frozen adapters (initialising a task adapter: :func:`lmas.transfer.init_from_merge`).

    A missing ``target`` becomes a new agent whose adapter has the merge's rank (``cat``, ``exact``
    and ``task_arithmetic``: the sum of ranks; ``*_svd``: ``rank`` or the largest source rank;
    the others: the sources' rank) and the first source's ``α/r``. An existing target keeps its
    rank: a merge of a higher rank is cut to the best approximation of its ``ΔW`` (logged), a lower
    one padded exactly. ``target`` may be one of the sources (sources are read before writing).
    The target ends as the active agent; the base model is never touched.
    Returns the largest relative truncation error of ``ΔW`` over modules (0 = exact).

    Args:
        sources, weights: agents and one signed weight each.
        method: one of :data:`METHODS`.
        density: kept share in (0, 1] for the pruning methods (:data:`NEEDS_DENSITY`).
        majority_sign_method: ``total`` | ``frequency`` (TIES sign election).
        rank: output rank (``*_svd``: peft's ``svd_rank``; others: the merge is re-factorised).
        seed: seeds DARE's random pruning and the padding of a lower-rank merge.
        keep_frozen: keep the target's frozen adapters (False: zero them; the merge is its whole update).
    """
    check_merge(population, sources, weights, target, method, density, majority_sign_method, rank)
    weights = [float(w) for w in weights]
    if method in task_vectors.METHODS:
        sets = [agent_factors(population, s) for s in sources]
        factors, worst = task_vector_merge(sets, weights, method, density, rank, seed)
    elif method in OWN_METHODS or any(is_stacked(population, s) for s in sources):
        if method == "svd" and rank is None:
            rank = max(population.lora_of(ad).r for s in sources for ad in population.agents[s].adapters)
        factors, worst = exact_merge([agent_factors(population, s) for s in sources], weights, rank)
    else:
        factors = peft_merge(population, sources, weights, method, density, majority_sign_method, rank, seed)
        worst = 0.0
        if rank is not None and not method.endswith("svd"):
            factors, worst = exact_merge([factors], [1.0], rank)
    if target not in population.agents:
        r = rank or max(a.shape[0] for a, _ in factors.values())
        population.add_agent(target, target_config(population, sources, r, list(factors)))
    worst = max(worst, write_knowledge(population, target, factors, 0.0, 1.0 if keep_frozen else 0.0, seed))
    if worst > 0:
        log.info("merge %s -> %s (%s): rank cut, relative error of ΔW up to %.3g", sources, target, method, worst)
    population.activate(target)
    return worst
