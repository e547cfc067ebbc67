"""N-LoRA: O-LoRA's adapter growth with an L1 sparsity term on the current task's update.

N-LoRA (Yang et al., "Is Parameter Collision Hindering Continual Learning in LLMs?", COLING 2025,
arXiv 2410.10179; code: PKU-YuanGroup/N-LoRA) keeps a new LoRA adapter per task with the earlier
ones frozen, and adds ``lambda * sum_layers ||Delta W_t||_1`` — the entrywise L1 norm of the
current task's low-rank update — so that each task's update is sparse and the tasks' updates
collide on few parameters (which, the paper shows, implies their orthogonality).

What the authors' trainer does (``src/uie_trainer_lora.py``, ``UIETrainer.training_step``):

* the L1 term **replaces** O-LoRA's orthogonality term (their training step adds nothing else;
  ``lamda_2`` is unused), so ``lambda_orth`` defaults to 0 here (set it > 0 for O-LoRA + N-LoRA);
* it covers the current (``loranew``) adapter only, of every LoRA layer, on every task including
  the first; it is summed over layers, not normalised, and carries no ``alpha / r`` scaling;
* its weight ``lamda_1`` is 0.4 in their T5-large scripts for the standard benchmark (orders 1-3),
  0.4 / 1.2, 0.55 and 1.8 for the long sequence (orders 4, 5, 6), 0.38-0.46 for LLaMA.

The paper writes the term on ``Delta W = A B`` (the update). Their code evaluates
``torch.norm(torch.mm(A.weight, B.weight), p=1)`` with nn.Linear weights ``A`` (r, in) and ``B``
(out, r), which for the square q/v projections they adapt is the (r, r) product ``A B`` rather than
the (out, in) update ``B A``; this module follows the paper: ``|B A|_1``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lmas.strategies.olora import OLoRA, layer_key

if TYPE_CHECKING:
    from lmas.training.experience import IncrementalLM


def nlora_l1(pairs: list[tuple[Tensor, Tensor]]) -> Tensor:
    """``sum_layers |B @ A|_1``: the entrywise L1 norm of each layer's update, summed; ``pairs`` holds
    (A (r, in), B (out, r)) per layer, as peft stores ``lora_A`` / ``lora_B`` weights."""
    if not pairs:
        raise ValueError("nlora_l1: no LoRA layers")
    return torch.stack([torch.mm(b, a).abs().sum() for a, b in pairs]).sum()


def lora_pairs(params: Mapping[str, Tensor], adapter: str) -> list[tuple[Tensor, Tensor]]:
    """(A, B) weights per LoRA layer of ``adapter``, from its parameters by peft name."""
    pairs = []
    for name, a in params.items():
        key = layer_key(name, adapter)
        if key is not None:
            pairs.append((a, params[name.replace(f".lora_A.{adapter}.", f".lora_B.{adapter}.")]))
    return pairs


class NLoRA(OLoRA):
    """N-LoRA: IncLoRA plus ``nlora_l1 = lambda_l1 * sum_layers |B A|_1`` on the current adapter.

    Logged as ``nlora_l1`` at every step of every task; O-LoRA's terms (``olora_orth``, ``olora_l2``)
    are added as well when their weights are > 0.

    Args:
        lambda_l1: weight of the L1 term (the authors' ``lamda_1``: 0.4 on the standard benchmark).
        lambda_orth, lambda_l2: O-LoRA's weights (0: the authors' N-LoRA has neither term).
    """

    name = "nlora"

    def __init__(self, lambda_l1: float = 0.4, lambda_orth: float = 0.0, lambda_l2: float = 0.0) -> None:
        if lambda_l1 < 0:
            raise ValueError(f"nlora lambda_l1={lambda_l1}: must be >= 0")
        super().__init__(lambda_orth=lambda_orth, lambda_l2=lambda_l2)
        self.lambda_l1 = lambda_l1

    def loss_terms(self, module: IncrementalLM, batch: dict[str, Tensor], out: dict[str, Tensor]) -> dict[str, Tensor]:
        terms = super().loss_terms(module, batch, out)
        if self.lambda_l1 > 0:
            population, agent = module.population, module.agent
            pairs = lora_pairs(population.parameters_of(agent), population.agents[agent].trainable)
            terms["nlora_l1"] = self.lambda_l1 * nlora_l1(pairs)
        return terms
