"""Similarity between agents: of their weight updates, and of their predictions on a probe set.

* **weights** — the cosine similarity of two agents' LoRA weight updates, each flattened over all
  adapted modules: ``cos(ΔW_a, ΔW_b)`` with ``ΔW = B·A·scale`` per module (an agent with several
  stacked adapters, IncLoRA/O-LoRA, has the sum of their updates: read by
  :func:`lmas.transfer.factors.agent_factors`, the same function every transfer reads agents with).
  Computed from the factors without forming ``ΔW``: ``<B1 A1, B2 A2>_F = sum((B1ᵀ B2) ⊙ (A1 A2ᵀ))``, so the cost is
  ``r × r`` per module whatever the module's size. A module only one agent adapts counts as a
  zero update for the other. An agent whose update is zero (untrained) has no direction: NaN.
* **predictions** — the share of probe examples on which two agents predict the same label
  (the argmax of their label log-likelihoods).

Pairs are keyed ``"<a>~<b>"`` with ``a`` before ``b`` in the given agent order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from itertools import combinations
from typing import TYPE_CHECKING

from torch import Tensor

from lmas.data.task import Task

if TYPE_CHECKING:
    from lmas.data.stream import Stream
    from lmas.evaluation.scorer import PopulationScorer, RoutedScorer
    from lmas.population.bases import Bases
    from lmas.population.population import Population

Factors = Mapping[str, tuple[Tensor, Tensor]]
"""Module name -> ``(A, B)`` with ``ΔW = B @ A`` (scaling folded into ``B``), as
:func:`lmas.transfer.factors.agent_factors` returns."""

PROBE_SIZE = 16  # examples of the probe set (the first test examples of the first classification task)


def pair_key(a: str, b: str) -> str:
    return f"{a}~{b}"


def _inner(f: Factors, g: Factors) -> float:
    """Frobenius inner product of the two updates, summed over the modules both adapt."""
    total = 0.0
    for name in f.keys() & g.keys():
        a1, b1 = f[name]
        a2, b2 = g[name]
        if a1.shape[1] != a2.shape[1] or b1.shape[0] != b2.shape[0]:
            raise ValueError(
                f"module {name}: updates of shapes {tuple(b1.shape[:1] + a1.shape[1:])} and "
                f"{tuple(b2.shape[:1] + a2.shape[1:])} cannot be compared"
            )
        total += float(((b1.double().T @ b2.double()) * (a1.double() @ a2.double().T)).sum())
    return total


def weight_norm(f: Factors) -> float:
    """Frobenius norm of the whole update (all modules)."""
    return math.sqrt(max(_inner(f, f), 0.0))


def weight_cosine(f: Factors, g: Factors) -> float:
    """Cosine similarity of two flattened updates; NaN when either update is zero."""
    nf, ng = weight_norm(f), weight_norm(g)
    if nf == 0.0 or ng == 0.0:
        return math.nan
    return _inner(f, g) / (nf * ng)


def weight_similarity(
    factors: Mapping[str, Factors], comparable: Callable[[str, str], bool] | None = None
) -> dict[str, float]:
    """``{"a~b": cosine}`` for every pair of agents (``factors``: agent -> its update's factors); ``comparable``:
    which pairs to compare (default all; agents on different bases update different modules)."""
    pairs = [(a, b) for a, b in combinations(list(factors), 2) if comparable is None or comparable(a, b)]
    return {pair_key(a, b): weight_cosine(factors[a], factors[b]) for a, b in pairs}


def agreement(pred_a: Tensor, pred_b: Tensor) -> float:
    """Share of examples on which two prediction vectors (label indices) are equal."""
    if pred_a.shape != pred_b.shape or pred_a.ndim != 1 or pred_a.numel() == 0:
        raise ValueError(
            f"agreement: expected two equal non-empty 1-d label vectors, got "
            f"{tuple(pred_a.shape)} and {tuple(pred_b.shape)}"
        )
    return (pred_a == pred_b).float().mean().item()


def prediction_agreement(agents: Sequence[str], logprobs: Tensor) -> dict[str, float]:
    """``{"a~b": agreement}`` from label log-likelihoods ``(A, N, L)`` of ``agents`` on one probe set."""
    if logprobs.ndim != 3 or logprobs.shape[0] != len(agents):
        raise ValueError(
            f"prediction_agreement: logprobs must be (agents={len(agents)}, N, labels), got {tuple(logprobs.shape)}"
        )
    pred = logprobs.argmax(-1)
    return {pair_key(a, b): agreement(pred[i], pred[j]) for (i, a), (j, b) in combinations(list(enumerate(agents)), 2)}


# --- measuring a population (reads adapters and scores the probe set) ------------------------
Probe = tuple[Task, list[str], list[str]]
"""The probe set of :func:`probe_set`: a classification task, its first prompts, and its label space."""


def probe_set(stream: Stream, size: int = PROBE_SIZE, split: str = "test") -> Probe | None:
    """``(task, prompts, labels)`` of the fixed probe set: the first ``size`` examples of the first
    classification task of ``stream`` (labels: the task's label space once the whole stream is
    met, so it stays the same over rounds); ``None`` when the stream has no such task/examples."""
    for j, task in enumerate(stream.tasks):
        labels = stream.label_space(j, len(stream.tasks) - 1)  # None: not a classification task
        if labels is not None and getattr(task, split):
            examples = getattr(task, split)[:size]
            return task, [ex.prompt for ex in examples], labels
    return None


def measure(
    population: Population | Bases, scorer: PopulationScorer | RoutedScorer, agents: Sequence[str], probe: Probe | None
) -> dict:
    """Weight similarity and (with a ``probe`` of :func:`probe_set`) prediction agreement of ``agents``.

    ``scorer``: a :class:`lmas.evaluation.scorer.PopulationScorer` of ``population``.
    Returns ``{"weights": {"a~b": ...}, "predictions": {"a~b": ...}}`` (predictions omitted without a probe).
    """
    from lmas.transfer.factors import agent_factors

    factors = {a: agent_factors(population.of(a), a) for a in agents}
    same = lambda a, b: population.of(a) is population.of(b)  # noqa: E731  # updates of one base's modules only
    out: dict = {"weights": weight_similarity(factors, same)}
    if probe is not None:
        task, prompts, labels = probe
        lp = scorer.label_logprobs(list(agents), prompts, labels)
        out["predictions"] = prediction_agreement(list(agents), lp)
        out["probe"] = {"task": task.name, "examples": len(prompts)}
    return out
