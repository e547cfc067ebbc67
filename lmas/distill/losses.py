"""Distillation losses (pure functions): forward KL, reverse KL and Jensen–Shannon, with a temperature.

All work over the last axis of ``(rows, classes)`` tensors. The classes are either the labels of
a classification task (label distributions: works between models with different tokenizers) or
the vocabulary at answer-token positions (token distributions: needs one vocabulary).

* forward KL ``KL(p_T || p_S)`` — mean-seeking, the classic Hinton et al. loss;
* reverse KL ``KL(p_S || p_T)`` — mode-seeking;
* JSD ``½ KL(p_T || m) + ½ KL(p_S || m)``, ``m = ½ (p_T + p_S)`` — symmetric and bounded by ln 2;
* generalized JSD (GKD, Agarwal et al. 2024; TRL's ``generalized_jsd_loss``) with ``β`` in [0, 1]:
  ``β KL(p_T || m) + (1 − β) KL(p_S || m)``, ``m = β p_T + (1 − β) p_S``; ``β = 0`` is forward KL and
  ``β = 1`` reverse KL (the endpoints are defined so, as in TRL; the formula itself vanishes there),
  ``β = ½`` the JSD above;
* skew KL (DistiLLM, Ko et al. 2024) with skew ``α`` in [0, 1): ``KL(p_T || α p_T + (1 − α) p_S)``;
  skew reverse KL ``KL(p_S || (1 − α) p_T + α p_S)``; ``α = 0`` gives forward / reverse KL, and a
  larger ``α`` bounds the loss (by ``−log α``) and its gradients when the student misses the teacher's mass.

The student's distribution is ``softmax(z / T)``; the teacher's is given already softened. Losses
are averaged over rows and multiplied by ``T²`` so their gradients keep their scale as ``T`` varies.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOSSES = ("forward_kl", "reverse_kl", "jsd", "gjsd", "skew_kl", "skew_rkl")
_EPS = 1e-12


def _kl(p: Tensor, logp: Tensor, logq: Tensor) -> Tensor:
    """``KL(p || q)`` per row from ``p`` and the two log-distributions (``0 log 0 = 0``)."""
    return (p * (logp - logq)).sum(-1)


def _mixture_log(p: Tensor, logp: Tensor, q: Tensor, logq: Tensor, a: float) -> Tensor:
    """``log(a p + (1 - a) q)``, exact where one side's probability underflows (``logp``/``logq`` given)."""
    if a <= 0:
        return logq
    if a >= 1:
        return logp
    return torch.logaddexp(logp + math.log(a), logq + math.log1p(-a))


def divergence(
    student_logp: Tensor, teacher_p: Tensor, kind: str = "forward_kl", beta: float = 0.5, skew: float = 0.1
) -> Tensor:
    """Per-row divergence between the student (log-probs) and the teacher (probs).

    ``beta``: the generalized JSD's weight (``gjsd``); ``skew``: the skew KLs' ``α`` (``skew_kl``, ``skew_rkl``).
    """
    if kind not in LOSSES:
        raise ValueError(f"distill.loss={kind!r}: expected one of {LOSSES}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"distill.beta={beta}: the generalized JSD's beta must be in [0, 1]")
    if not 0.0 <= skew < 1.0:
        raise ValueError(f"distill.skew={skew}: the skew KL's alpha must be in [0, 1)")
    teacher_p = teacher_p.to(student_logp.dtype)
    teacher_logp = teacher_p.clamp_min(_EPS).log()
    if kind == "gjsd" and beta in (0.0, 1.0):
        kind = "forward_kl" if beta == 0.0 else "reverse_kl"
    if kind == "forward_kl":
        return _kl(teacher_p, teacher_logp, student_logp)
    student_p = student_logp.exp()
    if kind == "reverse_kl":
        return _kl(student_p, student_logp, teacher_logp)
    if kind == "skew_kl":
        return _kl(teacher_p, teacher_logp, _mixture_log(teacher_p, teacher_logp, student_p, student_logp, skew))
    if kind == "skew_rkl":
        return _kl(student_p, student_logp, _mixture_log(student_p, student_logp, teacher_p, teacher_logp, skew))
    b = 0.5 if kind == "jsd" else beta
    logm = _mixture_log(teacher_p, teacher_logp, student_p, student_logp, b)
    return b * _kl(teacher_p, teacher_logp, logm) + (1 - b) * _kl(student_p, student_logp, logm)


def kd_loss(
    student_scores: Tensor,
    teacher_p: Tensor,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
) -> Tensor:
    """``T² · mean_rows D(teacher || student_T)``; ``student_scores`` are logits or log-likelihoods."""
    if temperature <= 0:
        raise ValueError(f"distill.temperature={temperature}: must be positive")
    if student_scores.shape != teacher_p.shape:
        raise ValueError(
            f"kd_loss: student {tuple(student_scores.shape)} and teacher {tuple(teacher_p.shape)} "
            "distributions differ in shape (different label sets or vocabularies?)"
        )
    student_logp = (student_scores.float() / temperature).log_softmax(-1)
    return divergence(student_logp, teacher_p, kind, beta, skew).mean() * temperature**2


def soften(scores: Tensor, temperature: float = 1.0) -> Tensor:
    """``softmax(scores / T)`` over the last axis (a teacher's distribution at temperature ``T``)."""
    return (scores.float() / temperature).softmax(-1)


def topk(logits: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """The ``k`` largest probabilities of ``softmax(logits / T)`` and their indices: what a cache keeps."""
    p = soften(logits, temperature)
    values, indices = p.topk(min(k, p.shape[-1]), dim=-1)
    return values, indices


def dense(values: Tensor, indices: Tensor, vocab: int) -> Tensor:
    """A full distribution from cached top-k probabilities; the remaining mass is spread evenly
    over the other ``vocab - k`` entries (exact on the top k, uniform on the tail)."""
    k = values.shape[-1]
    rest = (1.0 - values.sum(-1, keepdim=True)).clamp_min(0.0)  # (N, 1)
    fill = rest / max(vocab - k, 1)
    out = fill.expand(*values.shape[:-1], vocab).clone()
    return out.scatter_(-1, indices, values)
