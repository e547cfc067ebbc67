"""IncLoRA and O-LoRA: a new LoRA adapter per task, the earlier ones kept active and frozen.

O-LoRA (Wang et al., 2023, arXiv 2310.14152) adds two terms, as in the authors' trainer
(cmnfriend/O-LoRA, ``src/uie_trainer_lora.py``, ``UIETrainer.training_step``):

* orthogonality: for every LoRA layer, ``|A_prev @ A_cur^T|`` summed over all entries (an L1
  norm of the (r_prev, r) product), summed over layers; the authors keep the earlier tasks' A
  matrices concatenated row-wise in one frozen ``lora_A``, which gives the same sum as adding
  the per-task products here; weighted by ``lambda_1`` (0.5 in all their scripts);
* L2: ``torch.norm(p, p=2)`` — the *unsquared* Frobenius norm — of every parameter of the
  current adapter (A and B), summed; weighted by ``lambda_2`` (0 in their scripts).

IncLoRA is the same adapter growth without either term.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor

from lmas.data.task import Task
from lmas.strategies.base import Strategy

if TYPE_CHECKING:
    from lmas.population.population import Population
    from lmas.training.experience import IncrementalLM


def olora_orthogonality(prev_As: list[Tensor], cur_A: Tensor) -> Tensor:
    """``sum_i |A_i @ cur_A^T|.sum()`` for one layer; A matrices are (r, in_features)."""
    total = cur_A.new_zeros(())
    for prev in prev_As:
        total = total + torch.mm(prev.to(cur_A), cur_A.T).abs().sum()
    return total


def olora_l2(params: Iterable[Tensor]) -> Tensor:
    """Sum of the (unsquared) Frobenius norms of ``params``."""
    norms = [p.norm(p=2) for p in params]
    if not norms:
        raise ValueError("olora_l2: no parameters")
    return torch.stack(norms).sum()


def layer_key(param_name: str, adapter: str) -> str | None:
    """The module path of a peft LoRA A parameter of ``adapter`` (``...q_proj``), else None."""
    marker = f".lora_A.{adapter}."
    return param_name.split(marker)[0] if marker in param_name else None


class IncLoRA(Strategy):
    """A fresh trainable adapter for each task after an agent's first; earlier adapters stay frozen."""

    name = "inclora"

    def __init__(self) -> None:
        self.trained: dict[str, int] = {}

    def before_task(self, module: IncrementalLM, task: Task) -> None:
        agent = module.agent
        population = module.population
        if self.trained.get(agent, 0) > 0 and len(population.agents[agent].adapters) <= self.trained[agent]:
            population.add_task_adapter(agent)

    def after_task(self, module: IncrementalLM, task: Task) -> None:
        self.trained[module.agent] = self.trained.get(module.agent, 0) + 1

    def state_dict(self) -> dict:
        return {"trained": dict(self.trained)}

    def load_state_dict(self, state: dict) -> None:
        self.trained = {a: int(n) for a, n in state["trained"].items()}


class OLoRA(IncLoRA):
    """O-LoRA: IncLoRA plus orthogonality to the earlier adapters' A subspaces (and an L2 term).

    Terms (logged under their names): ``olora_orth = lambda_orth * sum_layers sum_prev
    |A_prev A_cur^T|_1`` when the agent has earlier adapters, and ``olora_l2 = lambda_l2 * sum
    ||p||_2`` over the current adapter when ``lambda_l2 > 0``. Layers are matched by module path.

    Args:
        lambda_orth: weight of the orthogonality loss (the authors' ``lamda_1``, 0.5).
        lambda_l2: weight of the L2 term (the authors' ``lamda_2``, 0).
    """

    name = "olora"

    def __init__(self, lambda_orth: float = 0.5, lambda_l2: float = 0.0) -> None:
        super().__init__()
        if lambda_orth < 0 or lambda_l2 < 0:
            raise ValueError(f"olora lambda_orth={lambda_orth}, lambda_l2={lambda_l2}: must be >= 0")
        self.lambda_orth = lambda_orth
        self.lambda_l2 = lambda_l2
        self._pairs: dict[str, tuple[str, list[tuple[Tensor, list[Tensor]]]]] = {}

    def layer_pairs(self, population: Population, agent: str) -> list[tuple[Tensor, list[Tensor]]]:
        """(current A, [earlier A's]) per LoRA layer of ``agent`` (cached per current adapter)."""
        adapters = population.agents[agent].adapters
        cached = self._pairs.get(agent)
        if cached is not None and cached[0] == adapters[-1]:
            return cached[1]
        previous: dict[str, list[Tensor]] = {}
        for adapter in adapters[:-1]:
            for pname, p in population.parameters_of(agent, adapter=adapter).items():
                key = layer_key(pname, adapter)
                if key is not None:
                    previous.setdefault(key, []).append(p.detach())
        pairs: list[tuple[Tensor, list[Tensor]]] = []
        for pname, p in population.parameters_of(agent).items():
            key = layer_key(pname, adapters[-1])
            if key is not None and key in previous:
                pairs.append((p, previous[key]))
        self._pairs[agent] = (adapters[-1], pairs)
        return pairs

    def before_task(self, module: IncrementalLM, task: Task) -> None:
        super().before_task(module, task)
        self._pairs.pop(module.agent, None)

    def loss_terms(self, module: IncrementalLM, batch: dict[str, Tensor], out: dict[str, Tensor]) -> dict[str, Tensor]:
        population, agent = module.population, module.agent
        terms: dict[str, Tensor] = {}
        if len(population.agents[agent].adapters) > 1 and self.lambda_orth > 0:
            pairs = self.layer_pairs(population, agent)
            if pairs:
                orth = cast(Tensor, sum(olora_orthogonality(prev, cur) for cur, prev in pairs))  # pairs: >= 1
                terms["olora_orth"] = self.lambda_orth * orth
        if self.lambda_l2 > 0:
            terms["olora_l2"] = self.lambda_l2 * olora_l2(population.parameters_of(agent).values())
        return terms
