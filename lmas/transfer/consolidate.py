"""A knowledge base that consolidates itself (``transfer=consolidate``): every ``every`` rounds, before the round's
training, the population's knowledge units (each agent's whole update ``ΔW``, the sum of its adapters) are
de-duplicated, fused and re-factorised; the loop then evaluates every unit as usual.

* duplicates: two units whose updates have a cosine similarity (over all modules, flattened) of at least
  ``threshold`` are fused TIES-style (per module, the sign of the sum elected and the agreeing entries averaged,
  :func:`lmas.transfer.task_vectors.elect_and_fuse`); both agents then hold the fused unit (its best approximation
  at their rank, the error reported), so the library counts it once (units are counted by content);
* re-ranking: every single-adapter unit is re-factorised to the smallest LoRA rank whose relative error
  ``‖ΔW − ΔW_k‖_F / ‖ΔW‖_F`` stays within ``budget`` in every module (truncated SVD), the error reported;
* per consolidation, a record per agent (lineage: the fused pair are each other's sources) and the library's
  units and bytes before and after.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lmas.data.task import Task
from lmas.lm.encoding import PromptEncoder
from lmas.transfer.factors import (
    Factors,
    agent_factors,
    delta,
    factorise_dense,
    is_stacked,
    write_factors,
    write_knowledge,
)
from lmas.transfer.policy import Transfer, knowing_peers
from lmas.transfer.task_vectors import elect_and_fuse

if TYPE_CHECKING:
    from lmas.population.bases import Bases
    from lmas.population.population import Population


def cosine(x: dict[str, Tensor], y: dict[str, Tensor]) -> float:
    """Cosine similarity of two updates over the modules they share, flattened together (0 if either is 0)."""
    common = sorted(set(x) & set(y))
    dot = sum(float((x[m].double() * y[m].double()).sum()) for m in common)
    nx = math.sqrt(sum(float(x[m].double().square().sum()) for m in common))
    ny = math.sqrt(sum(float(y[m].double().square().sum()) for m in common))
    return dot / (nx * ny) if nx > 0 and ny > 0 else 0.0


def duplicate_pairs(updates: dict[str, dict[str, Tensor]], threshold: float) -> list[tuple[str, str, float]]:
    """Disjoint pairs of units with cosine >= ``threshold``, the most similar first (greedy)."""
    names = list(updates)
    scored = sorted(
        ((cosine(updates[a], updates[b]), a, b) for i, a in enumerate(names) for b in names[i + 1 :]), reverse=True
    )
    used: set[str] = set()
    out = []
    for c, a, b in scored:
        if c >= threshold and a not in used and b not in used:
            out.append((a, b, c))
            used |= {a, b}
    return out


def smallest_rank(w: Tensor, budget: float) -> tuple[int, float]:
    """The smallest rank ``k >= 1`` whose truncated SVD of ``w`` has relative error <= ``budget``, and that error."""
    s = torch.linalg.svdvals(w.double())
    total = float(s.square().sum())
    if total == 0:
        return 1, 0.0
    tail = (s.square().flip(0).cumsum(0).flip(0) / total).sqrt()  # tail[k] = error of the rank-k cut
    errors = torch.cat([tail[1:], tail.new_zeros(1)])  # errors[k-1] = error at rank k
    k = int((errors <= budget).nonzero()[0].item()) + 1
    return k, float(errors[k - 1])


def content_key(update: dict[str, Tensor]) -> str:
    """A hash of an update's values (units with equal content count once)."""
    h = hashlib.sha256()
    for m in sorted(update):
        h.update(m.encode())
        h.update(update[m].detach().to(torch.float32).cpu().numpy().round(6).tobytes())
    return h.hexdigest()


def library(population: Population | Bases, agents: Sequence[str]) -> dict[str, int]:
    """The knowledge library of ``agents``: units (distinct updates) and bytes (every adapter's parameters, each
    distinct unit once). The loop records it every round (results.json ``library``); the units are the agents' LoRA
    adapters, so knowledge a strategy writes into the base (seqft, osf) is not in it."""
    seen: dict[str, int] = {}
    for a in agents:
        pop = population.of(a)
        key = content_key({m: delta(x, y) for m, (x, y) in agent_factors(pop, a).items()})
        if key not in seen:
            seen[key] = sum(v.numel() * v.element_size() for ad in pop.agents[a].adapters
                            for v in pop.adapter_state(a, ad).values())  # fmt: skip
    return {"units": len(seen), "bytes": sum(seen.values())}


class Consolidate(Transfer):
    """Consolidate the population's knowledge every ``every`` rounds (module docstring).

    Args:
        every: consolidate before rounds ``every, 2 every, ...``.
        threshold: the cosine similarity at which two units are duplicates.
        budget: the largest relative error a re-factorisation may introduce in a module (0: exact only).
        seed: padding of re-written factors.
    """

    name = "consolidate"

    def __init__(self, every: int = 2, threshold: float = 0.9, budget: float = 0.05, seed: int = 0) -> None:
        if every < 1 or not -1.0 <= threshold <= 1.0 or not 0.0 <= budget < 1.0:
            raise ValueError(
                f"transfer.every={every}, transfer.threshold={threshold}, transfer.budget={budget}: "
                "need every >= 1, threshold in [-1, 1], budget in [0, 1)"
            )
        self.every, self.threshold, self.budget, self.seed = every, threshold, budget, seed

    def due(self, round_idx: int) -> bool:
        return round_idx > 0 and round_idx % self.every == 0

    def apply(
        self,
        population: Population,
        round_idx: int,
        assignments: Sequence[tuple[str, Task]] = (),
        encoder: PromptEncoder | None = None,
    ) -> list[dict]:
        if not self.due(round_idx):
            return []
        agents = knowing_peers(population)
        before = library(population, agents)
        updates = {a: {m: delta(x, y) for m, (x, y) in agent_factors(population, a).items()} for a in agents}
        records: list[dict] = []
        for a, b, c in duplicate_pairs(updates, self.threshold):
            fused = {m: elect_and_fuse([updates[a][m], updates[b][m]]) for m in updates[a] if m in updates[b]}
            factors: Factors = {}
            for m, w in fused.items():
                fa, fb, _ = factorise_dense(w, min(w.shape))
                factors[m] = (fa, fb)
            for agent, other in ((a, b), (b, a)):
                residual = write_knowledge(population, agent, factors, keep=0.0, seed=self.seed)
                records.append({"round": round_idx, "transfer": self.name, "agent": agent, "method": "ties_fuse",
                                "sources": [agent, other], "cosine": c, "residual": residual})  # fmt: skip
        for agent in agents:  # re-rank the single-adapter units
            if is_stacked(population, agent):
                continue
            current = population.lora_of(population.agents[agent].trainable).r
            factors = agent_factors(population, agent)
            ranks = [smallest_rank(delta(x, y), self.budget) for x, y in factors.values()]
            rank = max((k for k, _ in ranks), default=current)
            if rank < current:
                population.resize_adapter(agent, rank)
                residual = write_factors(population, agent, factors, self.seed)
                records.append({"round": round_idx, "transfer": self.name, "agent": agent, "method": "rerank",
                                "sources": [agent], "rank_before": current, "rank": rank,
                                "residual": residual})  # fmt: skip
        after = library(population, agents)
        for rec in records:
            rec["library"] = {"before": before, "after": after}
        return records
