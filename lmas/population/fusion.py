"""Result fusion: combine several agents' label distributions into one answer (pure functions).

Inputs are label log-likelihoods ``(A, N, L)`` (agents, examples, labels) as
:func:`lmas.lm.likelihood.label_logprobs` gives them; :func:`label_distributions` turns them into
distributions over the labels. Weights ``(A, N)`` sum to one over the agents for each example:

* ``uniform``: ``1/A``;
* ``val_acc``: proportional to each agent's validation accuracy on the task (uniform if all are 0);
* ``confidence``: ``softmax_a(-H(p_a,n))``, per example, from the entropy of each agent's distribution;
* ``best``: all weight on the most confident agent of each example (lowest entropy);
* ``select``: all weight on the agent with the best validation accuracy on the task (the first on ties): model
  selection per task, e.g. among agents of different bases (``population=bases``).

``val_acc`` and ``select`` need each agent's validation accuracy (:data:`NEEDS_VAL`).

:func:`cascade` is the hierarchical answer: the first agent whose top probability reaches the
threshold answers, otherwise the example escalates to the next; the last agent always answers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

FUSIONS = ("uniform", "val_acc", "confidence", "best", "select")
NEEDS_VAL = ("val_acc", "select")


def label_distributions(logprobs: Tensor) -> Tensor:
    """``softmax`` over the label axis (last) of label log-likelihoods."""
    return logprobs.float().log_softmax(-1).exp()


def entropy(probs: Tensor) -> Tensor:
    """Entropy over the last axis, in nats (``0 log 0 = 0``)."""
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1)


def fusion_weights(method: str, probs: Tensor, val_acc: Sequence[float] | None = None) -> Tensor:
    """Agent weights ``(A, N)`` for ``probs`` ``(A, N, L)``, on its device; each column sums to one."""
    if method not in FUSIONS:
        raise ValueError(f"fusion={method!r}: expected one of {FUSIONS}")
    n_agents, n = probs.shape[:2]
    if method == "uniform":
        return torch.full((n_agents, n), 1.0 / n_agents, device=probs.device)
    if method in NEEDS_VAL:
        if val_acc is None or len(val_acc) != n_agents:
            raise ValueError(f"fusion={method!r} needs one validation accuracy per agent ({n_agents})")
        acc = torch.tensor([float(a) for a in val_acc], device=probs.device).clamp_min(0)
        if method == "select":
            return torch.nn.functional.one_hot(acc.argmax(), n_agents).float()[:, None].expand(n_agents, n).clone()
        w = acc / acc.sum() if acc.sum() > 0 else torch.full((n_agents,), 1.0 / n_agents, device=probs.device)
        return w[:, None].expand(n_agents, n).clone()
    h = entropy(probs)  # (A, N)
    if method == "confidence":
        return (-h).softmax(0)
    return torch.nn.functional.one_hot(h.argmin(0), n_agents).T.float()  # best


def fuse(logprobs: Tensor, method: str = "uniform", val_acc: Sequence[float] | None = None) -> Tensor:
    """The fused label distribution ``(N, L)`` of ``A`` agents' label log-likelihoods ``(A, N, L)``."""
    if logprobs.dim() != 3:
        raise ValueError(f"fuse: expected (agents, examples, labels), got shape {tuple(logprobs.shape)}")
    probs = label_distributions(logprobs)
    w = fusion_weights(method, probs, val_acc)  # (A, N)
    return (w[..., None] * probs).sum(0)


def cascade(logprobs: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Answers of a confidence cascade over agents ``0..A-1``.

    Returns ``(pred, level)``, both ``(N,)``: the predicted label index and the index of the
    agent that answered (``level > 0`` means the example was escalated ``level`` times).
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"cascade threshold={threshold}: must be in [0, 1]")
    probs = label_distributions(logprobs)  # (A, N, L)
    top, arg = probs.max(-1)  # (A, N)
    confident = top >= threshold
    confident[-1] = True  # the last agent always answers
    level = confident.float().argmax(0)  # first confident agent, (N,)
    pred = arg.gather(0, level[None]).squeeze(0)
    return pred, level
