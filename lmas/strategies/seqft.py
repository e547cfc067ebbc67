"""SeqFT: sequential full fine-tuning of the base model (a reference for small models).

This strategy changes the *shared* base model: every agent of a population sits on the same
base weights, so it is refused for populations of more than one agent. The agent's LoRA adapter
keeps training as well (it is part of the model). Use it only to compare against full
fine-tuning; the base stays modified after the run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from lmas.data.task import Task
from lmas.strategies.base import Strategy

if TYPE_CHECKING:
    from lmas.training.experience import IncrementalLM


def base_parameters(net: nn.Module) -> dict[str, nn.Parameter]:
    """Every non-LoRA parameter of a peft model, by name."""
    return {n: p for n, p in net.named_parameters() if "lora_" not in n}


class SeqFT(Strategy):
    """Unfreeze the base before each task (``configure_optimizers`` then picks it up), refreeze after."""

    name = "seqft"

    def __init__(self) -> None:
        self.tasks = 0  # experiences trained: from the first on, the base differs from the model's files

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
        for p in base_parameters(module.net).values():
            p.requires_grad_(False)
        self.tasks += 1

    def state_dict(self) -> dict:
        return {"tasks": self.tasks}

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint holds the adapters, not the fine-tuned base: a run that has trained cannot resume."""
        if state.get("tasks"):
            raise ValueError(
                "strategy=seqft: the fine-tuned base weights are not checkpointed (only the adapters are), so this "
                "run cannot be resumed exactly; start it again"
            )
