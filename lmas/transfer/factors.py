"""An adapter as factors: the exact algebra of LoRA updates, and reading/writing them on a population.

A LoRA adapter changes a weight by ``ΔW = s B A`` (``A``: (r, in), ``B``: (out, r), ``s = α/r``).
Here an adapter is held as :data:`Factors`, one ``(A, B)`` pair per module with ``s`` folded
into ``B``, so ``ΔW = B @ A`` whatever the adapter's rank and scaling.

Sums of updates are exact as stacked factors (:func:`stack_sets`: rank = sum of ranks); a lower
rank is the best approximation by truncated SVD (:func:`factorise`, Eckart–Young).

An agent's knowledge is the sum of ALL its adapters (IncLoRA/O-LoRA stack one per task, earlier
ones frozen): :func:`agent_factors` reads it as stacked factors ``A = [A_1; A_2; ...]``,
``B = [s_1 B_1, s_2 B_2, ...]`` (exact), and :func:`write_knowledge` writes a result back as
``ΔW_target ← keep·ΔW_target + ΔW_new`` (frozen adapters scaled by ``keep``, the trainable one
taking the rest), so no earlier task adapter is dropped from a source or counted twice in a target.
Every transfer (merges, the peer-to-peer exchange, LoraHub, merge-initialisation) and the weight
similarity go through these functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

if TYPE_CHECKING:
    from lmas.population.population import Population

Factors = dict[str, tuple[Tensor, Tensor]]
"""Module name (as in ``population.model.named_modules()``) -> ``(A, B)`` with ``ΔW = B @ A``."""


# --- math on factors (pure) ---------------------------------------------------------------
def delta(a: Tensor, b: Tensor) -> Tensor:
    """The weight update ``B @ A`` (out, in) of one module's factors (scaling folded into ``B``)."""
    return b @ a


def stack_factors(pairs: Sequence[tuple[Tensor, Tensor]], weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Factors of ``Σ w_i B_i A_i`` by concatenation: ``A = [A_1; A_2; ...]``, ``B = [w_1 B_1, ...]``.

    Exact, with rank ``Σ r_i`` (what peft's ``cat`` does).
    """
    a = torch.cat([p[0] for p in pairs], dim=0)  # (R, in)
    b = torch.cat([w * p[1] for p, w in zip(pairs, weights, strict=True)], dim=1)  # (out, R)
    return a, b


def factor_svd(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The thin SVD ``B @ A = U diag(s) Vh`` in float64, from the small core ``R_b R_aᵀ`` of the QR decompositions
    of ``B`` and ``Aᵀ`` (the (out, in) product is never formed): ``U`` (out, k), ``s`` (k,), ``Vh`` (k, in)."""
    qb, rb = torch.linalg.qr(b.double())  # (out, m), (m, R)
    qa, ra = torch.linalg.qr(a.double().T)  # (in, n), (n, R)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)  # core (m, n)
    return qb @ u, s, vh @ qa.T


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
    u, s, vh = factor_svd(a, b)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b_k = u[:, :k] * root  # (out, k)
    a_k = root[:, None] * vh[:k]  # (k, in)
    total = float(s.square().sum())
    residual = math.sqrt(float(s[k:].square().sum()) / total) if total > 0 else 0.0
    return a_k.to(a.dtype), b_k.to(b.dtype), residual


def factorise_dense(w: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """Best rank-``rank`` factors ``(A, B)`` of a dense update ``w`` (out, in), and the error (:func:`factorise`)."""
    return factorise(torch.eye(w.shape[1], dtype=w.dtype, device=w.device), w, rank)


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
        present = [(s[module], w) for s, w in zip(sets, weights, strict=True) if module in s]
        out[module] = stack_factors([p for p, _ in present], [w for _, w in present])
    return out


# --- reading and writing a population's adapters ----------------------------------------
def lora_layers(population: Population) -> dict[str, LoraLayer]:
    """The LoRA-wrapped modules of the population's model, by module name."""
    return {n: m for n, m in population.model.named_modules() if isinstance(m, LoraLayer)}


def _weight(matrices: nn.ModuleDict, adapter: str) -> Tensor:
    """``adapter``'s weight in a LoRA layer's ``lora_A`` or ``lora_B`` (torch types it ``Tensor | Module``)."""
    return cast(Tensor, matrices[adapter].weight)


def adapter_factors(population: Population, adapter: str) -> Factors:
    """Detached ``(A, B·s)`` of one peft adapter of the population's model, by adapter name."""
    out: Factors = {}
    for name, layer in lora_layers(population).items():
        if adapter in layer.lora_A:
            a = _weight(layer.lora_A, adapter).detach().clone()
            b = _weight(layer.lora_B, adapter).detach() * layer.scaling[adapter]
            out[name] = (a, b)
    return out


def read_factors(population: Population, agent: str, adapter: str | None = None) -> Factors:
    """Detached ``(A, B·s)`` of ONE adapter of ``agent`` (default: its trainable one).

    Not an agent's knowledge when it stacks adapters (IncLoRA/O-LoRA): use :func:`agent_factors`.
    """
    return adapter_factors(population, adapter or population.agents[agent].trainable)


def agent_factors(population: Population, agent: str) -> Factors:
    """An agent's whole update ``ΔW = Σ_i s_i B_i A_i`` over ALL its active adapters, as exact stacked factors.

    Rank per module = the sum of its adapters' ranks. Every transfer (merges, the peer-to-peer
    exchange, LoraHub, merge-initialisation) and the weight similarity read an agent through this.
    """
    return stack_sets([read_factors(population, agent, ad) for ad in population.agents[agent].adapters])


def is_stacked(population: Population, agent: str) -> bool:
    """True when ``agent`` holds more than one adapter (IncLoRA/O-LoRA task adapters)."""
    return len(population.agents[agent].adapters) > 1


def write_factors(population: Population, target: str, factors: Factors, seed: int = 0) -> float:
    """Load ``factors`` into ``target``'s trainable adapter, fitted to its rank and scaling.

    Factors of a higher rank are cut by :func:`factorise` (best approximation), lower ones
    padded by :func:`pad_rank`. Modules of the adapter that the factors lack get ``ΔW = 0``
    (B zeroed). Returns the largest relative truncation error (0 = exact).
    """
    adapter = population.agents[target].trainable
    layers = {n: layer for n, layer in lora_layers(population).items() if adapter in layer.lora_A}
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


def write_knowledge(
    population: Population,
    target: str,
    factors: Factors,
    keep: float = 0.0,
    frozen: float | None = None,
    seed: int = 0,
    max_rank: int | None = None,
) -> float:
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
        rank = population.lora_of(adapters[-1]).r
        needed = min(max_rank, max(a.shape[0] for a, _ in combined.values()))
        if needed > rank:
            population.resize_adapter(target, needed)
    worst = write_factors(population, target, combined, seed)
    if frozen != 1.0:
        with torch.no_grad():
            for layer in lora_layers(population).values():
                for adapter in adapters[:-1]:
                    if adapter in layer.lora_B:
                        _weight(layer.lora_B, adapter).mul_(frozen)
    return worst
