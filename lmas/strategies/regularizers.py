"""Weight regularizers: EWC (diagonal empirical Fisher) and plain L2 to the previous weights.

The math is small pure functions on ``{name: tensor}`` dicts:

* :func:`diagonal_fisher` — for each mini-batch, the gradient of the (mean) task loss, squared
  element-wise; summed over batches and divided by the number of batches. This is what
  Avalanche's ``EWCPlugin.compute_importances`` computes (``imp += p.grad ** 2`` per batch,
  then ``imp /= len(dataloader)``), model in eval mode, data in order (no shuffling).
* :func:`ewc_penalty` — ``sum_i F_i (theta_i - theta*_i)^2``, no 1/2 factor; the strategy
  multiplies it by ``ewc_lambda`` (Avalanche's ``EWCPlugin.before_backward``:
  ``strategy.loss += ewc_lambda * penalty``). Parameters missing from the anchors are skipped
  ("new parameters do not count").
* :func:`online_fisher` — ``F_t = decay * F_{t-1} + F_new`` (Avalanche ``mode="online"``,
  ``EWCPlugin.update_importances`` with ``decay_factor``). In ``separate`` mode every earlier
  task keeps its own anchors and Fisher and the penalties add up.
* :func:`l2_penalty` — ``sum (theta - theta_prev)^2``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Literal, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from lmas.data.task import Example, Task
from lmas.lm.likelihood import answer_logits
from lmas.strategies.base import Strategy

if TYPE_CHECKING:
    from lmas.training.experience import IncrementalLM

B = TypeVar("B")


def diagonal_fisher(
    loss_fn: Callable[[B], Tensor], batches: Iterable[B], params: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Empirical diagonal Fisher: mean over mini-batches of the squared gradient of ``loss_fn``.

    Gradients come from ``torch.autograd.grad`` (``.grad`` is left untouched); a parameter the
    loss does not reach contributes zeros.
    """
    names = list(params)
    tensors = [params[n] for n in names]
    fisher = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in zip(names, tensors, strict=True)}
    n_batches = 0
    for batch in batches:
        loss = loss_fn(batch)
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        for n, g in zip(names, grads, strict=True):
            if g is not None:
                fisher[n] += g.detach().float().pow(2)
        n_batches += 1
    if n_batches == 0:
        raise ValueError("diagonal_fisher: no batches to estimate the Fisher from")
    return {n: f / n_batches for n, f in fisher.items()}


def ewc_penalty(params: Mapping[str, Tensor], anchors: Mapping[str, Tensor], fisher: Mapping[str, Tensor]) -> Tensor:
    """``sum F * (theta - theta*)^2`` over the parameters that have an anchor (no 1/2 factor)."""
    total = None
    for name, p in params.items():
        if name not in anchors:
            continue  # new parameters do not count
        term = (fisher[name].to(p) * (p - anchors[name].to(p)).pow(2)).sum()
        total = term if total is None else total + term
    if total is None:
        ref = next(iter(params.values()), None)
        return torch.zeros((), device=ref.device if ref is not None else None)
    return total


def online_fisher(old: Mapping[str, Tensor], new: Mapping[str, Tensor], decay: float) -> dict[str, Tensor]:
    """``decay * old + new``; parameters only in ``new`` take ``new`` (Avalanche's new-head rule)."""
    return {n: (decay * old[n].to(f) + f) if n in old else f.clone() for n, f in new.items()}


def l2_penalty(params: Mapping[str, Tensor], anchors: Mapping[str, Tensor]) -> Tensor:
    """``sum (theta - theta_prev)^2`` over the parameters that have an anchor."""
    ones = {n: torch.ones((), device=a.device) for n, a in anchors.items()}
    return ewc_penalty(params, anchors, ones)


def trainable_params(module: IncrementalLM) -> dict[str, Tensor]:
    """The parameters the optimizer updates in this experience, by name (stable order)."""
    return {n: p for n, p in module.net.named_parameters() if p.requires_grad}


def _detached(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}


class EWC(Strategy):
    """Elastic Weight Consolidation on the agent's trainable adapter.

    After each task the diagonal Fisher is estimated on the task's train examples (in order,
    ``fisher_batch_size`` per batch, at most ``fisher_batches`` batches) with the model in eval
    mode; the next tasks add ``ewc_lambda * sum F (theta - theta*)^2``, logged as ``ewc``.

    Args:
        ewc_lambda: weight of the penalty.
        mode: ``online`` (one Fisher, ``F = decay * F_old + F_new``, anchored at the last task's
            weights) or ``separate`` (one anchor/Fisher pair per earlier task, penalties summed).
        decay: the online decay factor (must stay 1.0 in ``separate`` mode, where it is unused).
        fisher_batches: cap on the number of batches of the Fisher estimate (None: all).
        fisher_batch_size: examples per Fisher batch (Avalanche uses the training batch size).
    """

    name = "ewc"
    shape_bound = True  # anchors the adapter's own weights

    def __init__(
        self,
        ewc_lambda: float = 1.0,
        mode: Literal["online", "separate"] = "online",
        decay: float = 1.0,
        fisher_batches: int | None = None,
        fisher_batch_size: int = 8,
    ) -> None:
        if mode not in ("online", "separate"):
            raise ValueError(f"ewc mode={mode!r}: expected 'online' or 'separate'")
        if mode == "separate" and decay != 1.0:
            raise ValueError("ewc decay is only used in mode='online' (leave it at 1.0 for 'separate')")
        if ewc_lambda < 0 or decay < 0:
            raise ValueError(f"ewc_lambda={ewc_lambda}, decay={decay}: must be >= 0")
        if fisher_batches is not None and fisher_batches <= 0:
            raise ValueError(f"ewc fisher_batches={fisher_batches}: must be positive or null")
        if fisher_batch_size <= 0:
            raise ValueError(f"ewc fisher_batch_size={fisher_batch_size}: must be positive")
        self.ewc_lambda = ewc_lambda
        self.mode = mode
        self.decay = decay
        self.fisher_batches = fisher_batches
        self.fisher_batch_size = fisher_batch_size
        # per agent: a list of {"anchors": {...}, "fisher": {...}} (one entry in online mode)
        self.consolidated: dict[str, list[dict[str, dict[str, Tensor]]]] = {}

    def loss_terms(self, module: IncrementalLM, batch: dict[str, Tensor], out: dict[str, Tensor]) -> dict[str, Tensor]:
        entries = self.consolidated.get(module.agent)
        if not entries:
            return {}
        params = trainable_params(module)
        penalty = cast(Tensor, sum(ewc_penalty(params, e["anchors"], e["fisher"]) for e in entries))  # entries: >= 1
        return {"ewc": self.ewc_lambda * penalty}

    def fisher(self, module: IncrementalLM, task: Task) -> dict[str, Tensor]:
        """The diagonal Fisher of the module's trainable parameters on ``task.train``."""
        rows: list[tuple[Example, str]] = [(ex, task.kind) for ex in task.train]
        size = self.fisher_batch_size
        chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
        if self.fisher_batches is not None:
            chunks = chunks[: self.fisher_batches]

        def loss_fn(chunk: list[tuple[Example, str]]) -> Tensor:
            logits, targets, _ = answer_logits(module.net, module.batch_of(chunk))
            return F.cross_entropy(logits, targets)

        was_training = module.net.training
        module.net.eval()
        try:
            with torch.enable_grad():
                return diagonal_fisher(loss_fn, chunks, trainable_params(module))
        finally:
            module.net.train(was_training)

    def after_task(self, module: IncrementalLM, task: Task) -> None:
        new = self.fisher(module, task)
        anchors = _detached(trainable_params(module))
        entries = self.consolidated.setdefault(module.agent, [])
        if self.mode == "separate" or not entries:
            entries.append({"anchors": anchors, "fisher": new})
        else:
            entries[0] = {"anchors": anchors, "fisher": online_fisher(entries[0]["fisher"], new, self.decay)}

    def state_dict(self) -> dict:
        return {
            "consolidated": {
                a: [{k: dict(v) for k, v in e.items()} for e in entries] for a, entries in self.consolidated.items()
            }
        }

    def load_state_dict(self, state: dict) -> None:
        self.consolidated = {
            a: [{k: dict(v) for k, v in e.items()} for e in entries] for a, entries in state["consolidated"].items()
        }


class L2(Strategy):
    """L2 pull towards the weights the agent's adapter had when the task started.

    From the agent's second task on, adds ``l2_lambda * sum (theta - theta_prev)^2`` (logged as
    ``l2``), ``theta_prev`` being the trainable weights at the start of the task (the end of the
    previous one). The first task has no previous weights, so no term (the adapter's random
    initialisation is not something worth keeping).
    """

    name = "l2"
    shape_bound = True  # anchors the adapter's own weights

    def __init__(self, l2_lambda: float = 1.0) -> None:
        if l2_lambda < 0:
            raise ValueError(f"l2_lambda={l2_lambda}: must be >= 0")
        self.l2_lambda = l2_lambda
        self.trained: dict[str, int] = {}
        self.anchors: dict[str, dict[str, Tensor]] = {}

    def before_task(self, module: IncrementalLM, task: Task) -> None:
        if self.trained.get(module.agent, 0) > 0:
            self.anchors[module.agent] = _detached(trainable_params(module))
        else:
            self.anchors.pop(module.agent, None)

    def loss_terms(self, module: IncrementalLM, batch: dict[str, Tensor], out: dict[str, Tensor]) -> dict[str, Tensor]:
        anchors = self.anchors.get(module.agent)
        if not anchors:
            return {}
        return {"l2": self.l2_lambda * l2_penalty(trainable_params(module), anchors)}

    def after_task(self, module: IncrementalLM, task: Task) -> None:
        self.trained[module.agent] = self.trained.get(module.agent, 0) + 1
        self.anchors.pop(module.agent, None)

    def state_dict(self) -> dict:
        return {"trained": dict(self.trained)}

    def load_state_dict(self, state: dict) -> None:
        self.trained = {a: int(n) for a, n in state["trained"].items()}
        self.anchors = {}
