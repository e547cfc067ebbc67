"""OPCM: continual merging as a CL strategy (Tang et al. 2025, "Merging Models on the Fly Without Retraining").

Each task is learnt by a fresh LoRA adapter from the base (``ΔW = 0``: independent of the earlier tasks, as the
method's task models are), and its update ``τ_t`` is then merged into the running merge ``M_{t-1}`` (the agent's
adapter between tasks), in constant memory:

* projection, per module: with ``M_{t-1} = U S Vᵀ`` (full SVD), ``P = Uᵀ τ_t V``; the entries of ``P`` on its
  diagonal and in its top-left ``k × k`` block are zeroed, ``k`` the first index at which the cumulative share
  of the singular values exceeds ``alpha`` (the merge's principal subspace); ``τ'_t = U P Vᵀ``;
* adaptive scaling over all modules together: ``R_t = λ_{t-1} M_{t-1} + τ'_t``, ``λ_t = ‖R_t‖ / n̄_t`` and
  ``M_t = R_t / λ_t``, so the merge keeps the mean norm ``n̄_t`` of the task vectors seen so far (λ_1 = 1,
  ``M_1 = τ_1``).

The merge is held as the agent's LoRA adapter at rank ``max_rank`` (a truncated SVD of ``M_t``; the relative
error is recorded per task in the agent's history as ``opcm_residual``); before the next task the adapter is
re-created at the population's LoRA rank, fresh, for training.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lmas.data.task import Task
from lmas.strategies.base import Strategy
from lmas.transfer.factors import delta, factorise_dense, read_factors, write_factors

if TYPE_CHECKING:
    from lmas.training.experience import IncrementalLM


def principal_split(s: Tensor, alpha: float) -> int:
    """The first index at which the cumulative share of the singular values ``s`` exceeds ``alpha``."""
    total = s.sum()
    if total <= 0:
        return 0
    return int((s.cumsum(0) / total > alpha).float().argmax().item())


def project_out(merged: Tensor, task: Tensor, alpha: float) -> Tensor:
    """``τ'``: ``task`` without its components in the merge's principal subspace (module docstring)."""
    u, s, vh = torch.linalg.svd(merged.double(), full_matrices=True)
    p = u.T @ task.double() @ vh.T
    p.diagonal().zero_()
    k = principal_split(s, alpha)
    p[:k, :k] = 0
    return (u @ p @ vh).to(task.dtype)


def global_norm(updates: dict[str, Tensor]) -> float:
    """The Frobenius norm of all modules' updates together."""
    return math.sqrt(sum(float(t.double().square().sum()) for t in updates.values()))


def opcm_step(
    merged: dict[str, Tensor], task: dict[str, Tensor], lam: float, mean_norm: float, alpha: float
) -> tuple[dict[str, Tensor], float]:
    """One merge: ``M_t`` and ``λ_t`` from ``M_{t-1}``, ``λ_{t-1}``, the new ``τ_t`` and the mean task-vector norm."""
    raw = {m: lam * merged[m] + project_out(merged[m], t, alpha) if m in merged else t for m, t in task.items()}
    norm = global_norm(raw)
    if norm == 0:
        return raw, lam
    lam_t = norm / mean_norm
    return {m: r / lam_t for m, r in raw.items()}, lam_t


class OPCM(Strategy):
    """Continual merging by orthogonal projection and adaptive scaling (module docstring).

    Args:
        alpha: the share of the merge's singular-value mass whose subspace a new task may not enter.
        max_rank: the rank of the adapter that holds the merge (None: 4 x the population's LoRA rank).
    """

    name = "opcm"
    shape_bound = True  # keeps a merged update and trains at its own rank

    def __init__(self, alpha: float = 0.5, max_rank: int | None = None) -> None:
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"strategy.alpha={alpha}: must be in [0, 1)")
        if max_rank is not None and max_rank < 1:
            raise ValueError(f"strategy.max_rank={max_rank}: must be >= 1 (null: 4 x the LoRA rank)")
        self.alpha, self.max_rank = alpha, max_rank
        self.tasks: dict[str, int] = {}  # agent -> tasks merged so far
        self.lam: dict[str, float] = {}
        self.norms: dict[str, list[float]] = {}  # agent -> the norm of each task vector
        self.rank: dict[str, int] = {}  # agent -> its training LoRA rank
        self._merged: dict[str, Tensor] = {}
        self._residual: float | None = None

    def before_task(self, module: IncrementalLM, task: Task) -> None:
        pop, agent = module.population, module.agent
        self._residual = None
        if not self.tasks.get(agent):
            self.rank[agent] = pop.lora_of(pop.agents[agent].trainable).r
            return
        self._merged = {m: delta(a, b) for m, (a, b) in read_factors(pop, agent).items()}  # M_{t-1}
        if pop.lora_of(pop.agents[agent].trainable).r != self.rank[agent]:
            pop.resize_adapter(agent, self.rank[agent])  # a fresh LoRA (B = 0) at the training rank
        else:  # same rank: the update set to zero (B = 0), the task learnt from the base
            state = pop.adapter_state(agent)
            pop.load_adapter_state(agent, {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in state.items()})

    def after_task(self, module: IncrementalLM, task: Task) -> None:
        pop, agent = module.population, module.agent
        tau = {m: delta(a, b) for m, (a, b) in read_factors(pop, agent).items()}
        self.norms.setdefault(agent, []).append(global_norm(tau))
        n = self.tasks.get(agent, 0)
        self.tasks[agent] = n + 1
        if n == 0:  # M_1 = τ_1: the adapter already holds it
            self.lam[agent] = 1.0
            return
        mean_norm = sum(self.norms[agent]) / len(self.norms[agent])
        merged, self.lam[agent] = opcm_step(self._merged, tau, self.lam[agent], mean_norm, self.alpha)
        rank = self.max_rank or 4 * self.rank[agent]
        factors, worst = {}, 0.0
        for m, w in merged.items():
            a, b, res = factorise_dense(w, rank)
            factors[m], worst = (a, b), max(worst, res)
        pop.resize_adapter(agent, rank)
        write_factors(pop, agent, factors)
        self._merged, self._residual = {}, worst

    def fit_info(self) -> dict:
        return {} if self._residual is None else {"opcm_residual": self._residual}

    def state_dict(self) -> dict:
        return {"tasks": dict(self.tasks), "lam": dict(self.lam), "norms": {a: list(v) for a, v in self.norms.items()},
                "rank": dict(self.rank)}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.tasks = {a: int(n) for a, n in state["tasks"].items()}
        self.lam = {a: float(x) for a, x in state["lam"].items()}
        self.norms = {a: [float(x) for x in v] for a, v in state["norms"].items()}
        self.rank = {a: int(r) for a, r in state["rank"].items()}
