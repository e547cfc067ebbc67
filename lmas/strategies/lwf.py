"""Learning without Forgetting: distil the agent's own start-of-task predictions while it learns.

:func:`lwf_loss` is Avalanche's ``LearningWithoutForgetting._distillation_loss``:
``kl_div(log_softmax(student / T), softmax(teacher / T), reduction="batchmean")`` — no ``T**2``
factor — and the strategy multiplies it by ``alpha`` (``LearningWithoutForgetting.__call__``).
Here a "sample" is one answer position and the classes are the whole vocabulary (Avalanche
restricts the units to the classes seen before; an LM head has no such partition).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from peft import LoraModel
from torch import Tensor

from lmas.data.task import Task
from lmas.lm.likelihood import answer_logits
from lmas.strategies.base import Strategy

if TYPE_CHECKING:
    from lmas.population.population import Population
    from lmas.training.experience import IncrementalLM


def lwf_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(teacher_T || student_T) averaged over the N rows of (N, V) logits (``batchmean``)."""
    if temperature <= 0:
        raise ValueError(f"lwf temperature={temperature}: must be positive")
    log_p = F.log_softmax(student_logits / temperature, dim=-1)
    q = F.softmax(teacher_logits.detach() / temperature, dim=-1)
    return F.kl_div(log_p, q, reduction="batchmean")


class LwF(Strategy):
    """LwF with the agent's own adapter at the start of the task as teacher.

    ``before_task`` copies the agent's trainable adapter weights into a spare peft adapter
    ``<agent>-lwf`` (created once per agent, never trainable, never listed in the agent's
    adapters); ``loss_terms`` runs the teacher — the agent's frozen adapters other than the
    trainable one, as they were at ``before_task``, plus the spare — on the same batch under
    ``no_grad`` and in eval mode, then re-activates the agent and restores every parameter's
    ``requires_grad`` flag. The term ``lwf`` is absent on an agent's
    first task (nothing to distil yet). The teacher shares the base model with the student, so it
    is the start-of-task model only while the base is frozen (not under SeqFT).

    Args:
        alpha: weight of the distillation loss.
        temperature: softmax temperature of both distributions.
    """

    name = "lwf"
    shape_bound = True  # its teacher is a spare adapter at the population's LoRA rank

    def __init__(self, alpha: float = 1.0, temperature: float = 2.0) -> None:
        if alpha < 0:
            raise ValueError(f"lwf alpha={alpha}: must be >= 0")
        if temperature <= 0:
            raise ValueError(f"lwf temperature={temperature}: must be positive")
        self.alpha = alpha
        self.temperature = temperature
        self.trained: dict[str, int] = {}
        self.teachers: dict[str, list[str]] = {}  # per agent: the adapters that form the teacher

    @staticmethod
    def spare_name(agent: str) -> str:
        return f"{agent}-lwf"

    def _ensure_spare(self, population: Population, agent: str) -> str:
        spare = self.spare_name(agent)
        if spare in population.agents:
            raise ValueError(f"LwF needs the adapter name {spare!r}, but it is an agent of the population")
        if spare not in population.model.peft_config:
            with torch.random.fork_rng():  # adding an adapter draws its init: keep training's RNG untouched
                population.model.add_adapter(spare, population.lora)
            population.activate(agent)
        return spare

    def before_task(self, module: IncrementalLM, task: Task) -> None:
        agent = module.agent
        self.teachers.pop(agent, None)
        if self.trained.get(agent, 0) == 0:
            return
        population = module.population
        snapshot = population.adapter_state(agent)
        spare = self._ensure_spare(population, agent)
        population.load_adapter_state(agent, snapshot, adapter=spare)
        population.activate(agent)
        # fixed now, so an adapter added later in this task (IncLoRA/O-LoRA composed after LwF)
        # does not enter the teacher; one added before is fresh (B = 0) and changes nothing
        self.teachers[agent] = population.agents[agent].adapters[:-1] + [spare]

    @torch.no_grad()
    def teacher_logits(self, module: IncrementalLM, batch: dict[str, Tensor]) -> Tensor:
        """(N, V) answer-position logits of the start-of-task model on ``batch``."""
        population, agent = module.population, module.agent
        flags = [(p, p.requires_grad) for p in population.model.parameters()]
        teacher = self.teachers[agent]
        was_training = module.net.training
        try:
            base = cast(LoraModel, population.model.base_model)
            base.set_adapter(teacher if len(teacher) > 1 else teacher[0], inference_mode=True)
            module.net.eval()
            logits, _, _ = answer_logits(module.net, batch)
        finally:
            module.net.train(was_training)
            population.activate(agent)
            for p, flag in flags:  # keep whatever the other strategies made trainable (SeqFT)
                p.requires_grad_(flag)
        return logits

    def loss_terms(self, module: IncrementalLM, batch: dict[str, Tensor], out: dict[str, Tensor]) -> dict[str, Tensor]:
        if module.agent not in self.teachers:
            return {}
        teacher = self.teacher_logits(module, batch)
        return {"lwf": self.alpha * lwf_loss(out["logits"], teacher, self.temperature)}

    def after_task(self, module: IncrementalLM, task: Task) -> None:
        self.trained[module.agent] = self.trained.get(module.agent, 0) + 1
        self.teachers.pop(module.agent, None)

    def state_dict(self) -> dict:
        return {"trained": dict(self.trained)}

    def load_state_dict(self, state: dict) -> None:
        self.trained = {a: int(n) for a, n in state["trained"].items()}
        self.teachers = {}
