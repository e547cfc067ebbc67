"""OSF: peft's Orthogonal Subspace Fine-tuning of the base weights, task after task.

OSF (Nayak et al., "Sculpting Subspaces: Constrained Full Fine-Tuning in LLMs for Continual
Learning", arXiv 2504.07097; peft >= 0.18, ``peft/tuners/osf``) splits a weight by its SVD,
``W = U_high S_high V_high + U_low S_low V_low``, freezes the top ``effective_rank`` directions
(``high``) and trains the rest (``low``), with the gradients of ``U_low`` / ``V_low`` projected
orthogonal to ``U_high`` / ``V_high`` (hooks of ``peft.tuners.osf.layer.OSFLayer``). peft's
continual-learning recipe (docs/source/package_reference/osf.md, "Sequential Task Learning";
examples/orthogonal_subspace_learning): per task, recompute the SVD of the updated weights and
grow the preserved rank (their example: 0.3, 0.5, 0.7 of the smaller dimension for 3 tasks).

How it sits in lmas's population (one PeftModel of LoRA adapters on a shared base): peft's
``get_peft_model(model, OSFConfig)`` would wrap the whole model in a second PeftModel, so instead
each target's base ``nn.Linear`` — the ``base_layer`` of every LoRA layer the population has
(``population.lora``: its target modules and layers) — is wrapped by peft's own OSF layer
(``peft.tuners.osf.layer.Linear``: peft's SVD split, its forward and its projection hooks) for the
duration of a task, and merged back with the layer's ``merge`` after it. Between tasks the base is
a plain model again, with the task's update in its weights. Only the OSF factors train: the LoRA
adapters stay frozen (the agent's fresh adapter is an exact no-op), so this is OSF alone. Like
SeqFT it changes the shared base, so it subclasses :class:`SeqFT` and shares its rules: one agent,
no cached trunk (lmas/config.py).

peft projects the gradients only; lmas trains with AdamW, whose per-coordinate scaling takes the step
partly out of the allowed subspace (on a 32x32 weight, preserved rank 16, 20 steps: 17% of the
update's norm lies in the preserved directions; 7e-6 with SGD). ``project_weights=True`` applies the
same projection to the factors themselves before every step and before the merge, which makes the
preserved directions exact under any optimizer (an lmas option; peft's behaviour is the default).

peft 0.21.2's layer adds the update as a delta (``U_low S_low V_low - U_low_init S_low_init
V_low_init``), so the docs' ``model.unload()`` between tasks would drop it; ``merge`` keeps it.

Checkpoints: the state holds the adapted weights, written back into the base by :meth:`OSF.restore_model`
as soon as the state is loaded (a resume, a self-learning rollback).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from peft import OSFConfig
from peft.tuners.osf.layer import Linear as OSFLinear
from torch import Tensor, nn

from lmas.data.task import Task
from lmas.strategies.seqft import SeqFT

if TYPE_CHECKING:
    from lmas.population.population import Population
    from lmas.training.experience import IncrementalLM

ADAPTER = "osf"  # peft's adapter name for the OSF factors while a task trains


def preserved_rank(min_dim: int, fraction: float) -> int:
    """The number of top singular directions kept frozen: ``fraction`` of ``min_dim`` (peft's rule for a
    fractional ``effective_rank``), at least 1 and at most ``min_dim - 1`` so that something trains."""
    return max(1, min(min_dim - 1, int(min_dim * fraction)))


@torch.no_grad()
def project_factors(layer: OSFLinear, adapter: str = ADAPTER) -> None:
    """Project ``U_low``'s columns and ``V_low``'s rows onto the complement of the preserved subspace, in place:
    the projection peft's hooks apply to their gradients (``OSFLayer._attach_hooks``: with ``U_high`` / ``V_high``
    where stored, else with the initial low factors that span that complement), applied to the factors."""
    factors = cast(nn.ParameterDict, layer.osf_svd_params[adapter])
    u, v = factors["U_low"], factors["V_low"]
    if adapter in layer._osf_U_high:
        high = layer._osf_U_high[adapter]
        u -= high @ (high.T @ u)
    else:
        init = layer._osf_U_low_init[adapter]
        u.copy_(init @ (init.T @ u))
    if adapter in layer._osf_V_high:
        high = layer._osf_V_high[adapter]
        v -= (v @ high.T) @ high
    else:
        init = layer._osf_V_low_init[adapter]
        v.copy_((v @ init.T) @ init)


def lora_base_layers(net: nn.Module) -> dict[str, tuple[nn.Module, nn.Linear]]:
    """Every ``nn.Linear`` that a LoRA layer wraps (its ``base_layer``), by module path, with that LoRA layer."""
    out = {}
    for path, module in net.named_modules():
        base = getattr(module, "base_layer", None)
        if hasattr(module, "lora_A") and isinstance(base, nn.Linear):
            out[f"{path}.base_layer"] = (module, base)
    return out


class OSF(SeqFT):
    """Per task: wrap the LoRA layers' base weights in peft's OSF layers, train their low subspace, merge.

    The preserved fraction of task ``t`` (0 for the agent's first) is ``min(preserve_first + t *
    preserve_step, preserve_max)`` of each weight's smaller dimension (:func:`preserved_rank`).

    Args:
        preserve_first: preserved fraction on the first task (peft's default is 0.5).
        preserve_step: growth of the preserved fraction per task.
        preserve_max: its cap (< 1: a share of every weight stays trainable).
        project_weights: also project the factors before every step (:func:`project_factors`): exact under AdamW.
    """

    name = "osf"

    def __init__(
        self,
        preserve_first: float = 0.3,
        preserve_step: float = 0.2,
        preserve_max: float = 0.9,
        project_weights: bool = False,
    ) -> None:
        if not (0 < preserve_first <= preserve_max < 1 and preserve_step >= 0):
            raise ValueError(
                f"osf preserve_first={preserve_first}, preserve_step={preserve_step}, preserve_max={preserve_max}: "
                "need 0 < preserve_first <= preserve_max < 1 and preserve_step >= 0"
            )
        super().__init__()
        self.preserve_first, self.preserve_step, self.preserve_max = preserve_first, preserve_step, preserve_max
        self.project_weights = project_weights
        self.weights: dict[str, Tensor] = {}  # the adapted base weights, by module path (live parameters)
        self._restore: dict[str, Tensor] = {}  # weights of a loaded state, until restore_model writes them
        self._wrapped: dict[str, tuple[nn.Module, OSFLinear]] = {}

    def fraction(self, t: int) -> float:
        """The preserved fraction on the agent's ``t``-th task (0-based)."""
        return min(self.preserve_first + t * self.preserve_step, self.preserve_max)

    def before_task(self, module: IncrementalLM, task: Task) -> None:
        super().before_task(module, task)  # SeqFT's single-agent check (it unfreezes the base: refrozen next)
        net = module.net
        for p in net.parameters():
            p.requires_grad_(False)  # only the OSF factors train
        targets = lora_base_layers(net)
        if not targets:
            raise ValueError("strategy=osf: the model has no LoRA layers whose base weights OSF could adapt")
        config, fraction = OSFConfig(), self.fraction(self.tasks)
        for path, (lora_layer, linear) in targets.items():
            rank = preserved_rank(min(linear.weight.shape), fraction)
            osf = OSFLinear(linear, ADAPTER, config=config, effective_rank=rank)
            lora_layer.base_layer = osf
            self._wrapped[path] = (lora_layer, osf)

    def on_train_batch_start(self, module: IncrementalLM, batch: dict[str, Tensor]) -> None:
        if self.project_weights:  # after the previous optimizer step
            for _, osf in self._wrapped.values():
                project_factors(osf)

    def after_task(self, module: IncrementalLM, task: Task) -> None:
        self.on_train_batch_start(module, {})  # the last step's projection
        for path, (lora_layer, osf) in self._wrapped.items():
            osf.merge(adapter_names=[ADAPTER])  # W += U_low S_low V_low - (its value at the task's start)
            osf._detach_hooks()
            linear = cast(nn.Linear, osf.get_base_layer())
            lora_layer.base_layer = linear
            self.weights[path] = linear.weight
        self._wrapped = {}
        super().after_task(module, task)  # SeqFT: every base parameter frozen; one more task

    def state_dict(self) -> dict:
        return {"tasks": self.tasks, "weights": {p: w.detach() for p, w in self.weights.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Unlike SeqFT's, OSF's state holds the adapted weights: the run resumes exactly."""
        self.tasks = int(state["tasks"])
        self._restore = dict(state["weights"])

    def restore_model(self, population: Population) -> None:
        """Write the loaded state's adapted weights into the LoRA layers' base weights of the population's model."""
        saved, self._restore = self._restore, {}
        targets = lora_base_layers(population.model) if saved else {}
        for path, weight in saved.items():
            if path not in targets:
                raise ValueError(
                    f"strategy=osf: the checkpoint's weight {path} is not a LoRA layer's base of this model"
                )
            linear = targets[path][1]
            linear.weight.data.copy_(weight)
            self.weights[path] = linear.weight
