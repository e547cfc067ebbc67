"""LoraHub-style composition: weights over existing adapters, found gradient-free on a few examples.

LoraHub (Huang et al., 2023, arXiv:2307.13269) searches weights ``w`` for a merge of trained
adapters that minimises ``loss(merge(w)) + 0.05 · mean|w_i|`` on a few examples of a new task,
with nevergrad's gradient-free optimiser. Two differences here:

* the candidate adapter is the *exact* sum of products ``ΔW(w) = Σ w_i ΔW_i`` (LoraHub averages
  A and B separately, see :mod:`lmas.transfer.merge`), ``ΔW_i`` being agent ``i``'s whole update
  (the sum of all its adapters, IncLoRA/O-LoRA included). It is held as a stacked ("cat") adapter of
  rank ``Σ r_i`` in a scratch agent: ``A = [A_1; ...]`` is written once, and a candidate only
  rewrites ``B = [w_1 s_1 B_1, ...]``, so one evaluation is one forward pass, with no SVD;
* the optimiser is a (1+1)-ES written here (:func:`one_plus_one_es`), not nevergrad.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lmas.data.task import Example
from lmas.lm.encoding import IGNORE, PromptEncoder, collate
from lmas.lm.likelihood import answer_loss
from lmas.transfer.factors import agent_factors
from lmas.transfer.merge import check_merge, merge_adapters, target_config

if TYPE_CHECKING:
    from lmas.population.population import Population


# --- search (pure) --------------------------------------------------------------------------
def l1_objective(nll: float, weights: Sequence[float], l1: float) -> float:
    """LoraHub's objective: task NLL plus ``l1`` times the mean absolute weight."""
    return nll + l1 * sum(abs(w) for w in weights) / len(weights)


def one_plus_one_es(
    f: Callable[[list[float]], float],
    x0: Sequence[float],
    budget: int,
    bounds: tuple[float, float] = (-1.5, 1.5),
    sigma0: float = 0.5,
    seed: int = 0,
) -> tuple[list[float], float, list[float]]:
    """Minimise ``f`` in a box with a (1+1) evolution strategy and the 1/5th success rule.

    Each step draws ``y = clip(x + σ·N(0, I))``; ``y`` replaces ``x`` if ``f(y) <= f(x)``. The step
    size grows by ``e^{1/3}`` on a success and shrinks by ``e^{-1/12}`` on a failure, which holds
    the success rate near 1/5 (Rechenberg's rule). Deterministic for a fixed ``seed``
    (Python's ``random.Random``); ``budget`` counts every call of ``f``, ``x0`` included.

    Returns:
        the best point, its value, and the best value after each evaluation.
    """
    if budget < 1:
        raise ValueError(f"budget={budget}: need at least one evaluation")
    lo, hi = bounds
    if not lo < hi:
        raise ValueError(f"bounds={bounds}: need low < high")
    rng = random.Random(seed)
    x = [min(max(v, lo), hi) for v in x0]
    fx = f(x)
    history = [fx]
    sigma = sigma0
    for _ in range(budget - 1):
        y = [min(max(v + sigma * rng.gauss(0.0, 1.0), lo), hi) for v in x]
        fy = f(y)
        if fy <= fx:
            x, fx = y, fy
            sigma *= math.exp(1 / 3)
        else:
            sigma *= math.exp(-1 / 12)
        history.append(fx)
    return x, fx, history


# --- few-shot loss --------------------------------------------------------------------------
def few_shot_batches(
    encoder: PromptEncoder, examples: Sequence[Example], kind: str, batch_size: int = 16
) -> list[dict]:
    """The examples encoded as training sequences, in collated batches."""
    if not examples:
        raise ValueError("lorahub: `examples` is empty; give a few examples of the new task")
    items = [encoder.encode_example(ex, kind) for ex in examples]
    return [collate(items[i : i + batch_size], encoder.pad_id) for i in range(0, len(items), batch_size)]


@torch.no_grad()
def answer_nll(model: torch.nn.Module, batches: Sequence[dict[str, Tensor]]) -> float:
    """Mean answer-token NLL over all batches (token-weighted, as one big :func:`answer_loss`)."""
    total, count = 0.0, 0
    for batch in batches:
        n = int((batch["targets"][:, 1:] != IGNORE).sum())
        total += answer_loss(model, batch).item() * n
        count += n
    return total / count


# --- population glue ------------------------------------------------------------------------
def active_agent(population: Population) -> str | None:
    """The agent whose adapters are the active ones (None if no agent matches)."""
    active = list(population.model.active_adapters)
    return next((n for n, a in population.agents.items() if a.adapters == active), None)


class _Scratch:
    """A temporary agent holding ``Σ w_i ΔW_i`` as a stacked adapter; only B changes per candidate."""

    def __init__(self, population: Population, sources: Sequence[str]) -> None:
        self.population = population
        self.sets = [agent_factors(population, s) for s in sources]  # each agent: all its adapters
        modules = sorted(set().union(*self.sets))
        rank = max(sum(s[m][0].shape[0] for s in self.sets if m in s) for m in modules)
        self.name = "lorahubscratch"
        while self.name in population.agents:
            self.name += "x"
        population.add_agent(self.name, target_config(population, sources, rank, modules))
        self.params = population.parameters_of(self.name)
        adapter = population.agents[self.name].trainable
        self.a = {n.split(".lora_A.")[0]: p for n, p in self.params.items() if ".lora_A." in n}
        self.b = {n.split(".lora_B.")[0]: p for n, p in self.params.items() if ".lora_B." in n}
        layers = dict(population.model.named_modules())
        self.scale = {m: layers[m].scaling[adapter] for m in self.a}
        with torch.no_grad():
            for m, p in self.a.items():
                stacked = torch.cat([s[m][0] for s in self.sets if m in s])
                p.zero_()[: stacked.shape[0]] = stacked

    @torch.no_grad()
    def set_weights(self, weights: Sequence[float]) -> None:
        for m, p in self.b.items():
            cols = [w * s[m][1] for s, w in zip(self.sets, weights, strict=True) if m in s]
            stacked = torch.cat(cols, dim=1) / self.scale[m] if cols else p[:, :0]
            p.zero_()[:, : stacked.shape[1]] = stacked

    def close(self) -> None:
        self.population.delete_agent(self.name)


def lorahub_weights(
    population: Population,
    sources: list[str],
    examples: Sequence[Example],
    kind: str,
    encoder: PromptEncoder,
    budget: int = 40,
    seed: int = 0,
    bounds: tuple[float, float] = (-1.5, 1.5),
    l1: float = 0.05,
    sigma0: float = 0.5,
    batch_size: int = 16,
) -> list[float]:
    """Weights over the sources' adapters that minimise ``NLL + l1·mean|w|`` on ``examples``.

    The search starts at uniform weights ``1/n`` and returns the best point seen, so its objective
    is never worse than uniform's. Costs ``budget`` forward passes over the examples. The
    population is left as it was (a scratch agent is added and deleted; the active agent is
    restored).
    """
    check_merge(population, sources, [1.0] * len(sources), "scratch", "exact", None, "total", None)
    batches = few_shot_batches(encoder, examples, kind, batch_size)
    before, was_training = active_agent(population), population.model.training
    scratch = _Scratch(population, sources)
    population.model.eval()
    try:

        def objective(w: list[float]) -> float:
            scratch.set_weights(w)
            return l1_objective(answer_nll(population.model, batches), w, l1)

        x0 = [1.0 / len(sources)] * len(sources)
        best, _, _ = one_plus_one_es(objective, x0, budget, bounds, sigma0, seed)
    finally:
        scratch.close()
        population.model.train(was_training)
        if before is not None:
            population.activate(before)
    return [float(w) for w in best]


def compose_adapter(
    population: Population,
    sources: list[str],
    examples: Sequence[Example],
    kind: str,
    encoder: PromptEncoder,
    target: str,
    rank: int | None = None,
    **search,
) -> list[float]:
    """Find LoraHub weights (:func:`lorahub_weights`) and merge exactly into ``target``; returns the weights.

    ``rank``: the target's rank for a new agent (default: sum of the sources' ranks, exact).
    ``search``: keyword arguments of :func:`lorahub_weights` (budget, seed, bounds, l1, ...).
    """
    weights = lorahub_weights(population, sources, examples, kind, encoder, **search)
    merge_adapters(population, sources, weights, target, "exact", rank=rank)
    return weights
