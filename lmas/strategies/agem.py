"""Averaged GEM: project the gradient so the loss on a memory of earlier tasks does not go up.

:func:`agem_project` is the projection of Avalanche's ``AGEMPlugin.after_backward``: with ``g``
the flattened current gradient and ``g_ref`` the gradient on a memory sample, if
``g . g_ref < 0`` then ``g <- g - (g . g_ref) / (g_ref . g_ref) * g_ref``, otherwise ``g`` is
kept. The memory follows ``AGEMPlugin.update_memory``: after each task, at most
``patterns_per_task`` random examples of it; the reference sample takes
``sample_size // n_tasks`` examples from each task's memory (Avalanche's group-balanced loader).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from lmas.data.task import Example, Task
from lmas.lm.likelihood import answer_logits
from lmas.strategies.base import Strategy
from lmas.strategies.replay import (
    item_from_json,
    item_to_json,
    rng_from_json,
    rng_to_json,
)

if TYPE_CHECKING:
    from lmas.training.experience import IncrementalLM

Item = tuple[Example, str]


def agem_project(grad: Tensor, ref_grad: Tensor) -> Tensor:
    """A-GEM projection of a flat gradient against a flat reference gradient."""
    if grad.shape != ref_grad.shape:
        raise ValueError(f"agem_project: gradient {tuple(grad.shape)} vs reference {tuple(ref_grad.shape)}")
    dot = torch.dot(grad, ref_grad)
    if dot < 0:
        return grad - (dot / torch.dot(ref_grad, ref_grad)) * ref_grad
    return grad


def flat_grads(params: list[Tensor], grads: list[Tensor | None] | None = None) -> Tensor:
    """Concatenate gradients (default: each ``p.grad``) into one vector; missing ones are zeros."""
    grads = [p.grad for p in params] if grads is None else grads
    return torch.cat(
        [
            (g.reshape(-1) if g is not None else torch.zeros(p.numel(), device=p.device, dtype=p.dtype))
            for p, g in zip(params, grads, strict=True)
        ]
    )


class AGEM(Strategy):
    """A-GEM over the agent's trainable parameters.

    ``on_train_batch_start`` computes the reference gradient of the task loss on a memory sample
    with ``torch.autograd.grad`` (``.grad`` is not touched); ``on_before_optimizer_step``
    projects the accumulated ``.grad`` in place. ``stats[agent]`` counts the steps that had a
    reference gradient (``checked``) and those that were projected (``projected``).

    Args:
        patterns_per_task: examples of each task kept in the agent's memory.
        sample_size: memory examples per reference gradient (split evenly over the tasks).
        seed: seeds memory selection and sampling.
    """

    name = "agem"

    def __init__(self, patterns_per_task: int = 32, sample_size: int = 8, seed: int = 0) -> None:
        if patterns_per_task <= 0 or sample_size <= 0:
            raise ValueError(f"agem patterns_per_task={patterns_per_task}, sample_size={sample_size}: must be positive")
        self.patterns_per_task = patterns_per_task
        self.sample_size = sample_size
        self.seed = seed
        self.memory: dict[str, list[list[Item]]] = {}
        self.rngs: dict[str, random.Random] = {}
        self.stats: dict[str, dict[str, int]] = {}
        self._ref: dict[str, tuple[list[Tensor], Tensor]] = {}

    def _rng(self, agent: str) -> random.Random:
        if agent not in self.rngs:
            self.rngs[agent] = random.Random(f"agem/{self.seed}/{agent}")
        return self.rngs[agent]

    def reference(self, agent: str) -> Tensor | None:
        """The flat reference gradient pending for ``agent``'s next optimizer step, if any."""
        pending = self._ref.get(agent)
        return None if pending is None else pending[1]

    def memory_sample(self, agent: str) -> list[Item]:
        groups = self.memory.get(agent, [])
        if not groups:
            return []
        per_group = max(1, self.sample_size // len(groups))
        rng = self._rng(agent)
        return [item for g in groups for item in rng.sample(g, min(per_group, len(g)))]

    def on_train_batch_start(self, module: IncrementalLM, batch: dict[str, Tensor]) -> None:
        agent = module.agent
        sample = self.memory_sample(agent)
        if not sample:
            self._ref.pop(agent, None)
            return
        params: list[Tensor] = [p for p in module.net.parameters() if p.requires_grad]
        with torch.enable_grad():
            logits, targets, _ = answer_logits(module.net, module.batch_of(sample))
            loss = F.cross_entropy(logits, targets)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        self._ref[agent] = (params, flat_grads(params, list(grads)).detach())

    @torch.no_grad()
    def on_before_optimizer_step(self, module: IncrementalLM) -> None:
        agent = module.agent
        if agent not in self._ref:
            return
        params, ref = self._ref.pop(agent)
        current = flat_grads(params)
        projected = agem_project(current, ref)
        stats = self.stats.setdefault(agent, {"checked": 0, "projected": 0})
        stats["checked"] += 1
        if projected is current:
            return
        stats["projected"] += 1
        offset = 0
        for p in params:
            n = p.numel()
            if p.grad is not None:
                p.grad.copy_(projected[offset : offset + n].view_as(p))
            offset += n

    def after_task(self, module: IncrementalLM, task: Task) -> None:
        agent = module.agent
        rows: list[Item] = [(ex, task.kind) for ex in task.train]
        rng = self._rng(agent)
        if len(rows) > self.patterns_per_task:
            rows = rng.sample(rows, self.patterns_per_task)
        self.memory.setdefault(agent, []).append(rows)
        self._ref.pop(agent, None)

    def state_dict(self) -> dict:
        return {
            "memory": {a: [[item_to_json(it) for it in g] for g in groups] for a, groups in self.memory.items()},
            "rngs": {a: rng_to_json(r) for a, r in self.rngs.items()},
            "stats": {a: dict(s) for a, s in self.stats.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.memory = {a: [[item_from_json(row) for row in g] for g in groups] for a, groups in state["memory"].items()}
        self.rngs = {a: rng_from_json(r) for a, r in state["rngs"].items()}
        self.stats = {a: {k: int(v) for k, v in s.items()} for a, s in state.get("stats", {}).items()}
        self._ref = {}
