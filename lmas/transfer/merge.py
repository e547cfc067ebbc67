"""Merge agents' LoRA adapters into one agent's adapter: peft's combination types, plus exact merges.

A LoRA adapter changes a weight by ``ΔW = s B A`` (``A``: (r, in), ``B``: (out, r), ``s = α/r``).
Here an adapter is held as :data:`Factors`, one ``(A, B)`` pair per module with ``s`` folded
into ``B``, so ``ΔW = B @ A`` whatever the adapter's rank and scaling.

Methods:

* peft's ``add_weighted_adapter`` types (:data:`PEFT_METHODS`). ``linear``, ``ties``,
  ``dare_*`` and ``magnitude_prune`` combine the A's and the B's *separately* (weights split as
  ``±sqrt(|w s|)`` on each side); the ``*_svd`` types combine the products ``ΔW_i`` and factor the
  result back by truncated SVD; ``cat`` stacks the factors (rank = sum of ranks).
* ``exact``: ``ΔW = Σ w_i s_i B_i A_i`` per module, factored into rank ``k`` by a truncated SVD
  (:func:`factorise`). ``k`` = sum of ranks (the default for a new agent) is exact; a smaller
  ``k`` gives the best rank-``k`` approximation (Eckart–Young).
* ``task_arithmetic``: the same sum of products under its task-vector name, never truncated by
  request; weights are free signed scalars (``[1, -1]`` of one adapter gives ``ΔW = 0`` exactly).

An agent's knowledge is the sum of ALL its adapters (IncLoRA/O-LoRA stack one per task, earlier
ones frozen): :func:`agent_factors` reads it as stacked factors ``A = [A_1; A_2; ...]``,
``B = [s_1 B_1, s_2 B_2, ...]`` (exact), and :func:`write_knowledge` writes a result back as
``ΔW_target ← keep·ΔW_target + ΔW_new`` (frozen adapters scaled by ``keep``, the trainable one
taking the rest), so no earlier task adapter is dropped from a source or counted twice in a target.

Why averaging the factors is inexact (FedAvg of A and B is not the average of the products):
``(Σ_i b_i B_i)(Σ_j a_j A_j) = Σ_i b_i a_i B_i A_i + Σ_{i≠j} b_i a_j B_i A_j``. The cross terms
``B_i A_j`` pair one adapter's output directions with another's input directions and belong to no
``ΔW_i``. Adapters trained apart have unrelated bases (any invertible ``R`` gives the same product
``(B R)(R⁻¹ A)``), so the cross terms are not small in general. In general it is exact for one
adapter only (peft turns every type into ``linear`` then).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import re
import warnings
from typing import Sequence

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch import Tensor

log = logging.getLogger(__name__)

Factors = dict[str, tuple[Tensor, Tensor]]
"""Module name (as in ``population.model.named_modules()``) -> ``(A, B)`` with ``ΔW = B @ A``."""

PEFT_METHODS = (
    "linear", "svd", "cat", "ties", "ties_svd", "dare_linear", "dare_ties",
    "dare_linear_svd", "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd",
)
OWN_METHODS = ("exact", "task_arithmetic")
METHODS = PEFT_METHODS + OWN_METHODS
NEEDS_DENSITY = frozenset(m for m in PEFT_METHODS if m.startswith(("ties", "dare", "magnitude")))
SAME_RANK = frozenset({"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"})
STACK_EXACT = ("cat", "svd")  # peft types that are linear in the products: exact on stacked agents too
SIGN_METHODS = ("total", "frequency")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


# --- math on factors (pure) ---------------------------------------------------------------
def delta(a: Tensor, b: Tensor) -> Tensor:
    """The weight update ``B @ A`` (out, in) of one module's factors (scaling folded into ``B``)."""
    return b @ a


def stack_factors(pairs: Sequence[tuple[Tensor, Tensor]], weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Factors of ``Σ w_i B_i A_i`` by concatenation: ``A = [A_1; A_2; ...]``, ``B = [w_1 B_1, ...]``.

    Exact, with rank ``Σ r_i`` (what peft's ``cat`` does).
    """
    a = torch.cat([p[0] for p in pairs], dim=0)  # (R, in)
    b = torch.cat([w * p[1] for p, w in zip(pairs, weights)], dim=1)  # (out, R)
    return a, b


def factorise(a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """Best rank-``rank`` factors of ``B @ A`` (truncated SVD), split evenly: ``B' = U√S``, ``A' = √S Vᵀ``.

    Works on the small core ``R_b R_aᵀ`` of the QR decompositions of ``B`` and ``Aᵀ``, so the
    (out, in) product is never formed. Computed in float64, returned in ``a``'s dtype.

    Returns:
        a: (k, in), b: (out, k) with ``k = min(rank, R, out, in)`` (pad with :func:`pad_rank`).
        residual: ``‖BA - B'A'‖_F / ‖BA‖_F`` (0 when nothing is cut, or when ``BA = 0``).
    """
    if rank < 1:
        raise ValueError(f"rank={rank}: must be >= 1")
    qb, rb = torch.linalg.qr(b.double())  # (out, m), (m, R)
    qa, ra = torch.linalg.qr(a.double().T)  # (in, n), (n, R)
    u, s, vh = torch.linalg.svd(rb @ ra.T)  # core (m, n)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b_k = (qb @ u[:, :k]) * root  # (out, k)
    a_k = root[:, None] * (vh[:k] @ qa.T)  # (k, in)
    total = float(s.square().sum())
    residual = math.sqrt(float(s[k:].square().sum()) / total) if total > 0 else 0.0
    return a_k.to(a.dtype), b_k.to(b.dtype), residual


def pad_rank(a: Tensor, b: Tensor, rank: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Grow factors to ``rank`` without changing ``B @ A``: new rows of A are random, new columns of B zero.

    Like a fresh LoRA, the added directions are trainable (a zero A row and zero B column
    would both get zero gradient forever).
    """
    extra = rank - a.shape[0]
    if extra < 0:
        raise ValueError(f"pad_rank: factors have rank {a.shape[0]} > {rank}")
    if extra == 0:
        return a, b
    bound = 1.0 / math.sqrt(a.shape[1])
    rows = (torch.rand(extra, a.shape[1], generator=generator, dtype=a.dtype) * 2 - 1) * bound
    return torch.cat([a, rows.to(a.device)]), torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1)


def stack_sets(sets: Sequence[Factors], weights: Sequence[float] | None = None) -> Factors:
    """Factors of ``Σ_i w_i ΔW_i`` per module by concatenation (:func:`stack_factors`): exact, rank ``Σ r_i``.

    A module missing from some sets takes the sum over those that have it. ``weights``: 1 each by default.
    """
    weights = [1.0] * len(sets) if weights is None else list(weights)
    out: Factors = {}
    for module in dict.fromkeys(m for s in sets for m in s):  # first-seen order
        present = [(s[module], w) for s, w in zip(sets, weights) if module in s]
        out[module] = stack_factors([p for p, _ in present], [w for _, w in present])
    return out


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


# --- population glue ------------------------------------------------------------------------
def merged_model(population, agent: str) -> torch.nn.Module:
    """A standalone copy of the model with ``agent``'s adapters folded into its weights.

    peft's ``merge_and_unload`` runs on a deep copy, so the population's base stays bit-identical
    (merging and unmerging in place, ``W + ΔW - ΔW``, is exact only up to float rounding).
    """
    model = copy.deepcopy(population.model)
    adapters = population.agents[agent].adapters
    model.base_model.set_adapter(adapters if len(adapters) > 1 else adapters[0])
    return model.merge_and_unload(adapter_names=adapters)


def lora_layers(population) -> dict[str, LoraLayer]:
    """The LoRA-wrapped modules of the population's model, by module name."""
    return {n: m for n, m in population.model.named_modules() if isinstance(m, LoraLayer)}


def read_factors(population, agent: str, adapter: str | None = None) -> Factors:
    """Detached ``(A, B·s)`` of ONE adapter of ``agent`` (default: its trainable one).

    Not an agent's knowledge when it stacks adapters (IncLoRA/O-LoRA): use :func:`agent_factors`.
    """
    adapter = adapter or population.agents[agent].trainable
    out: Factors = {}
    for name, layer in lora_layers(population).items():
        if adapter in layer.lora_A:
            a = layer.lora_A[adapter].weight.detach().clone()
            b = layer.lora_B[adapter].weight.detach() * layer.scaling[adapter]
            out[name] = (a, b)
    return out


def agent_factors(population, agent: str) -> Factors:
    """An agent's whole update ``ΔW = Σ_i s_i B_i A_i`` over ALL its active adapters, as exact stacked factors.

    Rank per module = the sum of its adapters' ranks. Every transfer (merges, the peer-to-peer
    exchange, LoraHub, merge-initialisation) and the weight similarity read an agent through this.
    """
    return stack_sets([read_factors(population, agent, ad) for ad in population.agents[agent].adapters])


def is_stacked(population, agent: str) -> bool:
    """True when ``agent`` holds more than one adapter (IncLoRA/O-LoRA task adapters)."""
    return len(population.agents[agent].adapters) > 1


def adapter_config(population, agent: str) -> LoraConfig:
    return population.model.peft_config[population.agents[agent].trainable]


def target_config(population, sources: Sequence[str], rank: int, modules: Sequence[str]) -> LoraConfig:
    """Config of a new agent for a merge of ``sources``: rank ``rank``, the first source's α/r ratio.

    Sources with the same targets hand them on; otherwise the new adapter targets exactly
    ``modules`` (full module names).
    """
    configs = [adapter_config(population, s) for s in sources]
    first = configs[0]
    alpha = first.lora_alpha * rank / first.r
    alpha = int(alpha) if float(alpha).is_integer() else alpha
    same = all(
        c.target_modules == first.target_modules and c.layers_to_transform == first.layers_to_transform
        for c in configs
    )
    targets = {} if same else {
        "target_modules": sorted(m.removeprefix("base_model.model.") for m in modules),
        "layers_to_transform": None,
    }
    return dataclasses.replace(first, r=rank, lora_alpha=alpha, rank_pattern={}, alpha_pattern={}, **targets)


def write_factors(population, target: str, factors: Factors, seed: int = 0) -> float:
    """Load ``factors`` into ``target``'s trainable adapter, fitted to its rank and scaling.

    Factors of a higher rank are cut by :func:`factorise` (best approximation), lower ones
    padded by :func:`pad_rank`. Modules of the adapter that the factors lack get ``ΔW = 0``
    (B zeroed). Returns the largest relative truncation error (0 = exact).
    """
    adapter = population.agents[target].trainable
    layers = {n: l for n, l in lora_layers(population).items() if adapter in l.lora_A}
    missing = sorted(set(factors) - set(layers))
    if missing:
        raise ValueError(
            f"merge into {target!r}: its adapter does not wrap {missing[:3]}... ({len(missing)} modules); "
            "give a new agent name to get an adapter that covers the sources' modules"
        )
    state = population.adapter_state(target)
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for name, layer in layers.items():
        a_key, b_key = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        r, scale = layer.r[adapter], layer.scaling[adapter]
        if name not in factors:
            state[b_key] = torch.zeros_like(state[b_key])
            continue
        a, b = factors[name]
        if a.shape[0] > r:
            a, b, res = factorise(a, b, r)
            worst = max(worst, res)
        a, b = pad_rank(a, b, r, gen)
        root = math.sqrt(abs(scale))
        state[a_key] = (a / root).to(state[a_key].dtype)
        state[b_key] = (b / (root * math.copysign(1.0, scale))).to(state[b_key].dtype)
    population.load_adapter_state(target, state)
    return worst


def write_knowledge(population, target: str, factors: Factors, keep: float = 0.0, frozen: float | None = None,
                    seed: int = 0, max_rank: int | None = None) -> float:
    """Set ``target``'s whole update to ``frozen·ΔW_frozen + keep·ΔW_trainable + ΔW(factors)``.

    ``ΔW_frozen``: the sum of its frozen adapters (earlier IncLoRA/O-LoRA tasks), whose ``B`` is
    scaled by ``frozen`` (default ``keep``; exact, ranks and A subspaces kept). The trainable
    adapter takes ``keep·ΔW_trainable + ΔW(factors)``, fitted to its rank by :func:`write_factors`.
    The three uses: ``keep = 0`` replaces the agent's knowledge by ``factors`` (frozen adapters
    zeroed, nothing counted twice); ``keep = w`` gives ``w·ΔW_target + ΔW(factors)`` (the
    peer-to-peer exchange); ``keep = 0, frozen = 1`` overwrites only the trainable adapter.
    For a single-adapter agent and ``keep = 0`` this is :func:`write_factors`.
    ``max_rank``: grow the trainable adapter (never shrink it) to the written update's stacked rank
    ``keep·r + Σ r_factors``, up to ``max_rank``, so that nothing is cut below the cap
    (:meth:`~lmas.population.population.Population.resize_adapter`); None keeps its rank.
    Returns the largest relative truncation error ``‖cut‖_F / ‖ΔW_trainable'‖_F`` over modules (0 = exact).
    """
    frozen = keep if frozen is None else frozen
    adapters = population.agents[target].adapters
    own = read_factors(population, target) if keep != 0.0 else {}
    combined = stack_sets([own, factors], [keep, 1.0]) if own else dict(factors)
    if max_rank is not None and combined:
        rank = population.model.peft_config[adapters[-1]].r
        needed = min(max_rank, max(a.shape[0] for a, _ in combined.values()))
        if needed > rank:
            population.resize_adapter(target, needed)
    worst = write_factors(population, target, combined, seed)
    if frozen != 1.0:
        with torch.no_grad():
            for layer in lora_layers(population).values():
                for adapter in adapters[:-1]:
                    if adapter in layer.lora_B:
                        layer.lora_B[adapter].weight.mul_(frozen)
    return worst


def peft_merge(population, sources: Sequence[str], weights: Sequence[float], method: str, density: float | None,
               majority_sign_method: str, rank: int | None, seed: int) -> Factors:
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
                adapters, list(weights), tmp, combination_type=method,
                svd_rank=rank if method.endswith("svd") else None,
                density=density, majority_sign_method=majority_sign_method,
            )
        out: Factors = {}
        for name, layer in lora_layers(population).items():
            if tmp in layer.lora_A:
                a = layer.lora_A[tmp].weight.detach().clone()
                out[name] = (a, layer.lora_B[tmp].weight.detach() * layer.scaling[tmp])
        return out
    finally:
        if tmp in population.model.peft_config:
            population.model.delete_adapter(tmp)


def check_merge(population, sources: Sequence[str], weights: Sequence[float], target: str, method: str,
                density: float | None, majority_sign_method: str, rank: int | None) -> None:
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
    if method == "task_arithmetic" and rank is not None:
        raise ValueError("merge method 'task_arithmetic' never truncates; use method='exact' with `rank`")
    ranks = {adapter_config(population, s).r for s in sources}
    if method in SAME_RANK and len(sources) > 1 and len(ranks) > 1:
        raise ValueError(f"merge method {method!r} needs sources of one LoRA rank, got ranks {sorted(ranks)}; "
                         "use cat, an *_svd method or exact")


def merge_adapters(
    population,
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
    if method in OWN_METHODS or any(is_stacked(population, s) for s in sources):
        if method == "svd" and rank is None:
            rank = max(population.model.peft_config[ad].r for s in sources for ad in population.agents[s].adapters)
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
