"""Teachers' outputs for a student's experience, computed once and cached, and their aggregation.

A teacher is another agent of the population (same base, so same tokenizer) or an external model
that gives label distributions (:class:`ExternalTeacher`, e.g. the MiniLM classifier of
:mod:`lmas.distill.encoder_teacher`). For an experience (a list of examples):

* classification: every teacher's label distribution ``(K, N, L)`` at the distillation
  temperature; external teachers take part here (labels are words, not token ids);
* generation / lm: every agent teacher's top-``k`` token probabilities at each answer position,
  teacher-forced on the reference answer (a list of ``(values, indices)`` per teacher and example),
  kept compressed: probabilities in float16, token ids in uint16 when the vocabulary has at most
  65,536 entries (int32 otherwise), ``k × 4`` bytes per answer token (128 B for ``k = 32``; DistillKit
  reports 114–300 B/token); :meth:`TeacherCache.bytes_per_token` says what a cache holds.

Aggregation over teachers (:func:`aggregate`) reuses the population's fusion weights:
``uniform``, ``val_acc``, ``confidence`` (per example, negative entropy), ``best`` (per example,
the most confident teacher). Per-task routing (each task's specialist teaches its own task) picks
the teacher set, not the weights: see :class:`lmas.distill.strategy.Distill`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from lmas.data.task import Example, Task
from lmas.distill.losses import dense, soften, topk
from lmas.lm.encoding import PromptEncoder, collate
from lmas.lm.likelihood import answer_logits, label_logprobs
from lmas.population.fusion import fusion_weights

if TYPE_CHECKING:
    from lmas.population.population import Population

AGGREGATIONS = ("uniform", "val_acc", "confidence", "best")
CACHE_PROBS = torch.float16  # cached top-k probabilities (relative rounding error <= 2^-11)


def cache_ids(vocab: int) -> torch.dtype:
    """The dtype of cached token ids: uint16 for a vocabulary of at most 65,536 entries, else int32."""
    return torch.uint16 if vocab <= 2**16 else torch.int32


class ExternalTeacher(Protocol):
    """A teacher outside the population: label scores for prompts (any architecture/tokenizer)."""

    name: str

    def fit(self, task: Task) -> None:
        """Learn the task (called once per task before it teaches it)."""

    def label_scores(self, prompts: Sequence[str], labels: Sequence[str]) -> Tensor:
        """Scores ``(N, L)`` whose softmax is the teacher's label distribution."""


def aggregate(teacher_p: Tensor, method: str = "uniform", val_acc: Sequence[float] | None = None) -> Tensor:
    """One distribution ``(N, C)`` from ``K`` teachers' ``(K, N, C)``: ``Σ_k w_k,n p_k,n``."""
    if method not in AGGREGATIONS:
        raise ValueError(f"distill.aggregation={method!r}: expected one of {AGGREGATIONS}")
    w = fusion_weights(method, teacher_p, val_acc)  # (K, N)
    return (w[..., None] * teacher_p).sum(0)


def first_positions(rows: Tensor) -> Tensor:
    """Indices of each example's first position in ``rows`` (the example of each answer position, grouped)."""
    first = torch.ones_like(rows, dtype=torch.bool)
    first[1:] = rows[1:] != rows[:-1]
    return first.nonzero()[:, 0]


def route_to_gold(teacher_p: Tensor, gold: Tensor, rows: Tensor | None = None) -> Tensor:
    """Per-example teacher routing: weights ``(K, N)``, one-hot on the teacher that gives each example's gold
    answer the highest likelihood.

    ``teacher_p``: ``(K, N, C)`` distributions at ``N`` positions; ``gold``: ``(N,)`` the gold class (label or
    token) at each; ``rows``: ``(N,)`` the example of each position (a generation answer spans several: its
    log-likelihood is the sum over them; None: one position per example). Ties go to the first teacher.
    """
    k, n = teacher_p.shape[:2]
    logp = teacher_p.gather(2, gold.view(1, n, 1).expand(k, n, 1)).squeeze(2).clamp_min(1e-30).log()  # (K, N)
    if rows is None:
        best = logp.argmax(0)  # (N,)
    else:
        ids, inverse = rows.unique(return_inverse=True)
        per_row = logp.new_zeros(k, len(ids)).index_add_(1, inverse, logp)  # (K, rows)
        best = per_row.argmax(0)[inverse]
    return torch.nn.functional.one_hot(best, k).T.to(teacher_p.dtype)


@torch.no_grad()
def agent_label_distributions(
    population: Population,
    teachers: Sequence[str],
    encoder: PromptEncoder,
    prompts: Sequence[str],
    labels: Sequence[str],
    temperature: float,
    batch_size: int = 32,
) -> Tensor:
    """``(K, N, L)`` label distributions of agent teachers at ``temperature`` (adapters switched)."""
    model, was_training = population.model, population.model.training
    model.eval()
    out = []
    try:
        for t in teachers:
            population.activate(t)
            out.append(soften(label_logprobs(model, encoder, prompts, labels, batch_size), temperature))
    finally:
        model.train(was_training)
    return torch.stack(out)


@torch.no_grad()
def agent_token_topk(
    population: Population,
    teacher: str,
    encoder: PromptEncoder,
    examples: Sequence[tuple[Example, str]],
    k: int,
    temperature: float,
    batch_size: int = 16,
) -> list[tuple[Tensor, Tensor]]:
    """Per example: the teacher's top-``k`` probabilities and token ids at each answer position."""
    model, was_training = population.model, population.model.training
    model.eval()
    population.activate(teacher)
    out: list[tuple[Tensor, Tensor]] = []
    try:
        for i in range(0, len(examples), batch_size):
            items = [encoder.encode_example(ex, kind) for ex, kind in examples[i : i + batch_size]]
            logits, _, rows = answer_logits(model, collate(items, encoder.pad_id))  # (N, V), (N,)
            values, indices = topk(logits, k, temperature)
            values, indices = values.to(CACHE_PROBS), indices.to(cache_ids(logits.shape[-1]))
            for r in range(len(items)):
                sel = rows == r
                out.append((values[sel].clone(), indices[sel].clone()))
    finally:
        model.train(was_training)
    return out


@dataclass
class TeacherCache:
    """Teachers' outputs for one experience, indexed like the experience's examples."""

    teachers: list[str]
    labels: list[str] | None = None  # classification: the label set of the distributions
    label_p: Tensor | None = None  # (K, N, L)
    tokens: list[list[tuple[Tensor, Tensor]]] = field(default_factory=list)  # [teacher][example] -> (vals, ids)

    def labels_for(self, index: Tensor) -> Tensor:
        """``(K, B, L)`` label distributions of the batch rows ``index``."""
        if self.label_p is None:
            raise RuntimeError(f"TeacherCache: no label distributions of {self.teachers} (not a classification task?)")
        return self.label_p[:, index]

    def tokens_for(self, index: Tensor, vocab: int) -> Tensor:
        """``(K, N, V)`` token distributions at the batch's answer positions (rows in order)."""
        out = []
        for per_example in self.tokens:
            vals = torch.cat([per_example[i][0] for i in index.tolist()]).float()
            ids = torch.cat([per_example[i][1] for i in index.tolist()]).long()
            out.append(dense(vals, ids, vocab))
        return torch.stack(out)

    def bytes_per_token(self) -> float | None:
        """Bytes the cached top-k token distributions hold per answer token and teacher (None: no tokens)."""
        held = sum(v.numel() * v.element_size() + i.numel() * i.element_size() for t in self.tokens for v, i in t)
        positions = sum(v.shape[0] for t in self.tokens for v, _ in t)
        return held / positions if positions else None
