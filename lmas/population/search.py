"""The operators of a weight-space search over a population's adapters (:mod:`lmas.population.evolution` runs
them), pure and tested by hand:

* PBT (Ray Tune's semantics): :func:`sample_hparams` (log-uniform), :func:`exploit_pairs` (the bottom quantile
  paired with the top one), :func:`explore` (×0.8 / ×1.2, or resampled);
* CycleQD: :func:`crossover` (a weighted merge of two updates, exact as stacked factors), :func:`svd_mutation`
  (singular values scaled, singular vectors kept), the MAP-Elites :class:`Archive`;
* Model Swarms: :func:`swarm_velocity` and the search itself, :func:`swarm_search` (the evolution step and the
  ``transfer=swarm`` policy run it);
* writing adapters: :func:`copy_agent` (exact when the layouts match) and :func:`set_rank` (re-factorisation).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lmas.transfer.factors import (
    Factors,
    agent_factors,
    factor_svd,
    read_factors,
    stack_sets,
    write_factors,
    write_knowledge,
)

if TYPE_CHECKING:
    from lmas.population.population import Population

PERTURB = (0.8, 1.2)  # Ray Tune's PBT perturbation factors


def sample_hparams(space: Mapping[str, Sequence[float]], rng: random.Random) -> dict[str, float]:
    """One value per hyperparameter, log-uniform in its ``[low, high]`` (``rank``: rounded to an integer)."""
    out = {}
    for name, (low, high) in space.items():
        value = math.exp(rng.uniform(math.log(low), math.log(high)))
        out[name] = float(round(value)) if name == "rank" else value
    return out


def exploit_pairs(fitness: Mapping[str, float], quantile_fraction: float, rng: random.Random) -> list[tuple[str, str]]:
    """PBT's exploit: ``(loser, winner)`` for each agent of the bottom quantile, the winner drawn from the top one.

    The quantile holds ``ceil(N · quantile_fraction)`` agents, at most ``N // 2`` (Ray Tune); ties rank by name.
    """
    ranked = sorted(fitness, key=lambda a: (fitness[a], a))  # worst first
    n = min(math.ceil(len(ranked) * quantile_fraction), len(ranked) // 2)
    top = ranked[len(ranked) - n :]
    return [(loser, rng.choice(top)) for loser in ranked[:n]]


def explore(
    hparams: Mapping[str, float], space: Mapping[str, Sequence[float]], resample_probability: float, rng: random.Random
) -> dict[str, float]:
    """PBT's explore: each value resampled from the space with ``resample_probability``, else multiplied by 0.8
    or 1.2; clipped to the space (``rank``: an integer)."""
    out = {}
    for name, value in hparams.items():
        low, high = space[name]
        if rng.random() < resample_probability:
            new = sample_hparams({name: (low, high)}, rng)[name]
        else:
            new = min(max(value * rng.choice(PERTURB), low), high)
        out[name] = float(min(max(round(new), math.ceil(low)), math.floor(high))) if name == "rank" else new
    return out


def crossover(a: Factors, b: Factors, w: float) -> Factors:
    """The merge ``w ΔW_a + (1 − w) ΔW_b`` per module, exact (stacked factors, rank ``r_a + r_b``)."""
    return stack_sets([a, b], [w, 1.0 - w])


def svd_mutation(factors: Factors, sigma: float, generator: torch.Generator) -> Factors:
    """Each module's update with every singular value scaled by ``1 + sigma·u``, ``u ~ U(−1, 1)`` (the singular
    vectors kept; values stay >= 0 for ``sigma <= 1``); as factors ``B = U√s'``, ``A = √s' Vh``."""
    out: Factors = {}
    for module, (a, b) in factors.items():
        u, s, vh = factor_svd(a, b)
        noise = torch.rand(s.shape, generator=generator, dtype=torch.float64) * 2 - 1
        root = (s * (1 + sigma * noise)).clamp_min(0).sqrt()
        out[module] = ((root[:, None] * vh).to(a.dtype), (u * root).to(b.dtype))
    return out


def swarm_velocity(
    x: Mapping[str, Tensor], v: Mapping[str, Tensor], best: Mapping[str, Tensor], g: Mapping[str, Tensor],
    worst: Mapping[str, Tensor], phi: Sequence[float], r: Sequence[float],
) -> dict[str, Tensor]:  # fmt: skip
    """Model Swarms' velocity update (module docstring): ``phi``, ``r``: the (inertia, cognitive, social, repel)
    coefficients and their random factors."""
    c = [f * u for f, u in zip(phi, r, strict=True)]
    total = sum(c)
    if total <= 0:
        raise ValueError(f"swarm: the weighted coefficients {c} sum to {total}; need > 0")
    return {
        k: (c[0] * v[k] + c[1] * (best[k] - x[k]) + c[2] * (g[k] - x[k]) - c[3] * (worst[k] - x[k])) / total for k in x
    }


@dataclass
class SwarmOptions:
    """Model Swarms' settings (``loop.swarm`` of the evolution step, ``transfer=swarm``)."""

    iterations: int = 2
    inertia: float = 0.2
    cognitive: float = 0.3
    social: float = 0.4
    repel: float = 0.05
    step: float = 0.5
    step_decay: float = 0.95
    min_step: float = 0.1

    def check(self, where: str) -> None:
        if self.iterations < 1 or not 0 < self.min_step <= self.step:
            raise ValueError(f"{where}: need iterations >= 1 and 0 < min_step <= step")


State = dict[str, Tensor]


def swarm_search(
    x: Mapping[str, State], fitness: Callable[[str, State], float], opt: SwarmOptions, rng: random.Random,
    read: Callable[[str, str, State], None] | None = None,
) -> dict:  # fmt: skip
    """Model Swarms over the particles ``x`` (name -> adapter state; two or more): ``fitness(name, state)`` scores a
    particle at a position (higher is better), ``read(source, reader, state)`` is told each time a particle reads
    the global best's or worst's position (a message). Returns the particles' fitness at the ``start``, the personal
    bests ``best`` and their fitness ``f_best``, the global best ``g`` (its fitness ``f_g``, its ``owner``) and the
    per-iteration ``trace``."""
    names = list(x)
    if len(names) < 2:
        raise ValueError(f"swarm: {len(names)} particle(s); the search needs two or more")
    x = {a: dict(x[a]) for a in names}
    f = {a: fitness(a, x[a]) for a in names}
    start, best, f_best = dict(f), {a: dict(x[a]) for a in names}, dict(f)
    owner_g = max(names, key=lambda a: (f[a], a))
    owner_w = min(names, key=lambda a: (f[a], a))
    g, f_g, w, f_w = dict(x[owner_g]), f[owner_g], dict(x[owner_w]), f[owner_w]
    v = {}
    for a in names:  # the first velocity points at a random other particle
        other = rng.choice([b for b in names if b != a])
        v[a] = {k: x[other][k] - x[a][k] for k in x[a]}
    step, phi = opt.step, (opt.inertia, opt.cognitive, opt.social, opt.repel)
    trace = []
    for it in range(opt.iterations):
        for a in names:
            factors = [rng.random() for _ in range(4)]
            v[a] = swarm_velocity(x[a], v[a], best[a], g, w, phi, factors)
            x[a] = {k: x[a][k] + step * v[a][k] for k in x[a]}
            for src in {owner_g, owner_w} - {a}:  # the global best and worst it read
                if read is not None:
                    read(src, a, g if src == owner_g else w)
            f[a] = fitness(a, x[a])
            if f[a] > f_best[a]:
                best[a], f_best[a] = dict(x[a]), f[a]
            if f[a] > f_g:
                g, f_g, owner_g = dict(x[a]), f[a], a
            if f[a] < f_w:
                w, f_w, owner_w = dict(x[a]), f[a], a
        trace.append({"iteration": it, "step": step, "fitness": dict(f), "best": f_g})
        step = max(step * opt.step_decay, opt.min_step)
    return {"start": start, "best": best, "f_best": f_best, "g": g, "f_g": f_g, "owner": owner_g, "trace": trace}


@dataclass
class Elite:
    """An archive entry: its adapter (as factors), fitness, descriptors, and lineage (the agents it came from)."""

    key: str
    fitness: float
    descriptors: tuple[float, float]
    factors: Factors = field(repr=False)
    sources: list[str]


class Archive:
    """A MAP-Elites grid: ``bins`` cells per descriptor over ``[0, 1]``, one elite per cell (the fittest)."""

    def __init__(self, bins: int) -> None:
        if bins < 1:
            raise ValueError(f"loop.qd.bins={bins}: need >= 1")
        self.bins = bins
        self.cells: dict[tuple[int, ...], Elite] = {}

    def cell(self, descriptors: Sequence[float]) -> tuple[int, ...]:
        return tuple(min(max(int(d * self.bins), 0), self.bins - 1) for d in descriptors)

    def add(self, elite: Elite) -> bool:
        """Insert ``elite`` if its cell is empty or it is fitter than the cell's elite; True if it went in."""
        c = self.cell(elite.descriptors)
        if c in self.cells and self.cells[c].fitness >= elite.fitness:
            return False
        self.cells[c] = elite
        return True

    def elites(self) -> list[Elite]:
        """The elites, fittest first (ties by key)."""
        return sorted(self.cells.values(), key=lambda e: (-e.fitness, e.key))

    def coverage(self) -> float:
        return len(self.cells) / self.bins**2


# --- writing adapters ----------------------------------------------------------------------------
def copy_agent(pop: Population, src: str, dst: str, states: Sequence[dict[str, Tensor]] | None = None) -> float:
    """``dst`` takes ``src``'s adapters (``states``: as read before any write): exact when both hold as many
    adapters of the same ranks (``dst``'s trainable one is resized to match first), else the best approximation
    of ``src``'s whole update in ``dst``'s trainable adapter. Returns the relative truncation error (0 = exact)."""
    s_ad, d_ad = pop.agents[src].adapters, pop.agents[dst].adapters
    states = list(states) if states is not None else [pop.adapter_state(src, a) for a in s_ad]
    if len(s_ad) == len(d_ad) and all(
        pop.lora_of(a).r == pop.lora_of(b).r for a, b in zip(s_ad[:-1], d_ad[:-1], strict=True)
    ):
        pop.resize_adapter(dst, pop.lora_of(s_ad[-1]).r)
        for adapter, state in zip(d_ad, states, strict=True):
            pop.load_adapter_state(dst, state, adapter=adapter)
        return 0.0
    return write_knowledge(pop, dst, agent_factors(pop, src), keep=0.0)


def set_rank(pop: Population, agent: str, rank: int, seed: int = 0) -> float:
    """Re-factorise ``agent``'s trainable adapter at LoRA rank ``rank`` (truncated SVD; padded when growing);
    returns the relative truncation error."""
    factors = read_factors(pop, agent)
    pop.resize_adapter(agent, rank)
    return write_factors(pop, agent, factors, seed)
