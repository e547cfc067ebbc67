"""SeqFT: sequential full fine-tuning of the base model (a reference for small models).

This strategy changes the *shared* base model: every agent of a population sits on the same
base weights, so it is refused for populations of more than one agent. The agent's LoRA adapter
keeps training as well (it is part of the model). Use it only to compare against full
fine-tuning; the base stays modified after the run.

Checkpoints: after its first task the state holds every base parameter (the whole model: ~540 MB for
SmolLM2-135M in float32, rewritten after every round), written back into the base by :meth:`SeqFT.restore_model`
as soon as the state is loaded (a resume, a self-learning rollback), so a SeqFT run resumes exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lmas.data.task import Task
from lmas.strategies.base import Strategy

if TYPE_CHECKING:
    from lmas.population.population import Population
    from lmas.training.experience import IncrementalLM


def base_parameters(net: nn.Module) -> dict[str, nn.Parameter]:
    """Every non-LoRA parameter of a peft model, by name."""
    return {n: p for n, p in net.named_parameters() if "lora_" not in n}


class SeqFT(Strategy):
    """Unfreeze the base before each task (``configure_optimizers`` then picks it up), refreeze after."""

    name = "seqft"

    def __init__(self) -> None:
        self.tasks = 0  # experiences trained: from the first on, the base differs from the model's files
        self.base: dict[str, nn.Parameter] = {}  # the fine-tuned base parameters (live), by name
        self._restore_base: dict[str, Tensor] = {}  # those of a loaded state, until restore_model writes them

    def before_task(self, module: IncrementalLM, task: Task) -> None:
        agents = list(module.population.agents)
        if len(agents) > 1:
            raise ValueError(
                f"SeqFT fine-tunes the shared base model, so it needs a single-agent population; "
                f"this one has {len(agents)} agents ({agents})"
            )
        for p in base_parameters(module.net).values():
            p.requires_grad_(True)

    def after_task(self, module: IncrementalLM, task: Task) -> None:
        self.base = base_parameters(module.net)
        for p in self.base.values():
            p.requires_grad_(False)
        self.tasks += 1

    def state_dict(self) -> dict:
        return {"tasks": self.tasks, "base": {n: p.detach() for n, p in self.base.items()}}

    def load_state_dict(self, state: dict) -> None:
        """The state's fine-tuned base is kept for :meth:`restore_model`, which the loader calls next."""
        self.tasks = int(state["tasks"])
        if self.tasks and not state.get("base"):
            raise ValueError(
                "strategy=seqft: this checkpoint was written before lmas saved SeqFT's fine-tuned base (it holds the "
                "adapters only), so the run cannot be resumed exactly; start it again"
            )
        self._restore_base = dict(state.get("base") or {})

    def restore_model(self, population: Population) -> None:
        """Write the loaded state's fine-tuned base into the population's model (every base parameter, by name)."""
        saved, self._restore_base = self._restore_base, {}
        if not saved:
            return
        params = base_parameters(population.model)
        extra, missing = sorted(saved.keys() - params.keys()), sorted(params.keys() - saved.keys())
        if extra or missing:
            raise ValueError(
                f"strategy=seqft: the checkpoint's base parameters do not match this model's: {len(extra)} not in "
                f"the model {extra[:2]}, {len(missing)} of the model not in the checkpoint {missing[:2]}; resume "
                "with the model the run was started with"
            )
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])
        self.base = params
