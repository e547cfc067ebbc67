"""Scoring agents of a population: one agent at a time, or many in one mixed-adapter batch.

Classification tasks are scored from label log-likelihoods, which the loop also hands to the
topology for result fusion; :meth:`PopulationScorer.label_logprobs` computes them for several
agents at once. When every agent has a single adapter it runs one mixed batch (peft's
``adapter_names``: each row uses its agent's adapter); agents with several stacked adapters
(IncLoRA, O-LoRA) are scored one after another with their adapters activated.

Scoring runs on the model's device, under the trainer's autocast when ``trainer.precision`` is
mixed (:func:`lmas.lm.device.autocast`, what Lightning enters around a training step); the
label log-likelihoods it returns are float32 on the CPU: fusion, the topology's answers and the
messages are bookkeeping on ``(A, N, L)`` tensors, not model work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lmas.data.task import HIGHER_IS_BETTER, Example, Task
from lmas.evaluation.scoring import Scored, evaluate_scored, rank_scored
from lmas.lm.device import autocast, autocast_dtype, model_device
from lmas.lm.encoding import PromptEncoder
from lmas.lm.likelihood import label_logprobs
from lmas.lm.trunk import SharedTrunk, shared_label_logprobs
from lmas.population.population import Population

if TYPE_CHECKING:
    from lmas.evaluation.cache import ScoreCache
    from lmas.population.bases import Bases


class Classifier:
    """What the evaluator asks of a scorer (:class:`PopulationScorer`, :class:`RoutedScorer`, an encoder base's
    :class:`lmas.encoders.agents.EncoderScorer`); :meth:`classify` is accuracy from :meth:`label_logprobs`."""

    population: Any  # the agents scored (a Population; Bases for RoutedScorer)

    def of(self, agent: str) -> Classifier:
        """The scorer of ``agent``'s base: this one (:class:`RoutedScorer` has one per base)."""
        return self

    def initial_groups(self, rows: list[str]) -> list[tuple[str, list[str]]]:
        """``(agent, rows)``: whose fresh adapter scores the untrained model for which matrix rows (one base: the
        first agent for every row; fresh LoRA adapters are exact no-ops)."""
        return [(self.population.names[0], list(rows))]

    def competence(self, agent: str, task: Task, rows: Sequence[Example], labels: Sequence[str] | None) -> float:
        """A coordinator's measure of ``agent`` on ``rows`` of ``task`` (higher is better): the task's metric on
        them (negated where lower is better); :class:`PopulationScorer` uses the mean answer log-likelihood per
        token."""
        value = self.score(agent, dataclasses.replace(task, val=list(rows)), "val", labels)
        return value if HIGHER_IS_BETTER[task.metric] else -value

    def label_logprobs(self, agents: Sequence[str], prompts: Sequence[str], labels: Sequence[str]) -> Tensor:
        raise NotImplementedError  # (A, N, L)

    def scored(self, agent: str, task: Task, split: str = "test", labels: Sequence[str] | None = None) -> Scored:
        raise NotImplementedError  # the task's metric and per-example outcomes

    def untrained(self, agent: str, task: Task, split: str = "test", labels: Sequence[str] | None = None) -> Scored:
        return self.scored(agent, task, split, labels)  # of an agent whose adapters are fresh

    def score(self, agent: str, task: Task, split: str = "test", labels: Sequence[str] | None = None) -> float:
        return self.scored(agent, task, split, labels).value

    def classify(
        self, agents: Sequence[str], task: Task, split: str, labels: Sequence[str]
    ) -> tuple[dict[str, float], Tensor, Tensor]:
        """Accuracy of each agent, the label log-likelihoods ``(A, N, L)`` and gold indices ``(N,)`` (CPU)."""
        examples = getattr(task, split)
        if not examples:
            raise ValueError(f"task {task.name!r}: the {split} split is empty, nothing to evaluate")
        lp = self.label_logprobs(agents, [ex.prompt for ex in examples], labels)
        gold = torch.tensor([list(labels).index(ex.answer) for ex in examples])
        acc = (lp.argmax(-1) == gold).float().mean(-1)  # (A,)
        return {a: acc[i].item() for i, a in enumerate(agents)}, lp, gold


class PopulationScorer(Classifier):
    """Metrics and label log-likelihoods of a population's agents.

    Args:
        population: the agents.
        encoder: tokenisation (``data.max_length``).
        batch_size: evaluation batch size (rows of one forward pass).
        max_new_tokens: greedy decoding budget of generation tasks.
        mixed: score several single-adapter agents in one mixed-adapter batch: True, False, or ``"auto"`` (only on
            CUDA: on the CPU it measured slower than switching adapters, benchmarks/results/mixed_adapter_eval.json).
        trunk: a :class:`lmas.lm.trunk.SharedTrunk` (``eval.shared_trunk``): label
            log-likelihoods of several agents run the layers below the LoRA ones once per batch,
            then only the top layers per agent (any agents, stacked adapters too).
        precision: ``trainer.precision``; mixed precisions score under the same autocast as training.
        cache: the untrained model's scores shared by a sweep (``eval.cache``, :mod:`lmas.evaluation.cache`).
            With it, the trunk's bottom layers also come from the cache, and label scoring of a single
            agent goes through the trunk as well.
    """

    def __init__(
        self,
        population: Population,
        encoder: PromptEncoder,
        batch_size: int = 32,
        max_new_tokens: int = 12,
        mixed: bool | str = "auto",
        trunk: SharedTrunk | None = None,
        precision: str | int | None = None,
        cache: ScoreCache | None = None,
    ) -> None:
        self.population, self.encoder = population, encoder
        self.batch_size, self.max_new_tokens, self.mixed = batch_size, max_new_tokens, mixed
        self.trunk = trunk
        autocast_dtype(precision)  # refuses an unsupported trainer.precision here
        self.precision, self.cache = precision, cache

    def competence(self, agent: str, task: Task, rows: Sequence[Example], labels: Sequence[str] | None) -> float:
        """Mean answer log-likelihood per token of ``agent`` on ``rows`` (one tokenizer: comparable across agents)."""
        from lmas.transfer.lorahub import answer_nll, few_shot_batches

        self.population.activate(agent)
        return -answer_nll(self.population.model, few_shot_batches(self.encoder, rows, task.kind))

    def autocast(self) -> AbstractContextManager:
        """The trainer's autocast on the model's device (a no-op at 32-true)."""
        return autocast(self.precision, model_device(self.population.model))

    @property
    def through_cache(self) -> bool:
        """Label scores (of any number of agents) go through the trunk, its bottom from ``eval.cache``."""
        return self.trunk is not None and self.trunk.disk is not None

    def can_mix(self, agents: Sequence[str]) -> bool:
        on = self.mixed is True or (self.mixed == "auto" and model_device(self.population.model).type == "cuda")
        return on and len(agents) > 1 and all(len(self.population.agents[a].adapters) == 1 for a in agents)

    @torch.no_grad()
    def label_logprobs(self, agents: Sequence[str], prompts: Sequence[str], labels: Sequence[str]) -> Tensor:
        """Label log-likelihoods of every agent: ``(A, N, L)``."""
        with self.autocast():
            return self._label_logprobs(agents, prompts, labels).float().cpu()

    def _label_logprobs(self, agents: Sequence[str], prompts: Sequence[str], labels: Sequence[str]) -> Tensor:
        model = self.population.model
        was_training = model.training
        model.eval()
        try:
            if self.trunk is not None and (len(agents) > 1 or self.through_cache):
                return shared_label_logprobs(
                    self.trunk, self.encoder, prompts, labels, agents, self.population.activate, self.batch_size
                )
            if self.can_mix(agents):
                names = [self.population.agents[a].trainable for a in agents for _ in prompts]
                out = label_logprobs(
                    model, self.encoder, list(prompts) * len(agents), labels, self.batch_size, adapter_names=names
                )
                return out.view(len(agents), len(prompts), len(labels))
            rows = []
            for a in agents:
                self.population.activate(a)
                rows.append(label_logprobs(model, self.encoder, prompts, labels, self.batch_size))
            return torch.stack(rows)
        finally:
            model.train(was_training)

    def scored(self, agent: str, task: Task, split: str = "test", labels: Sequence[str] | None = None) -> Scored:
        """:meth:`score` with the per-example outcomes."""
        if task.kind == "classification" and self.through_cache:  # the trunk's bottom from eval.cache
            _, lp, gold = self.classify([agent], task, split, list(labels or task.class_labels))
            return rank_scored(lp[0], gold)
        self.population.activate(agent)
        with self.autocast():
            return evaluate_scored(
                self.population.model,
                self.encoder,
                task,
                split,
                labels=labels,
                batch_size=self.batch_size,
                max_new_tokens=self.max_new_tokens,
            )

    def untrained(self, agent: str, task: Task, split: str = "test", labels: Sequence[str] | None = None) -> Scored:
        """:meth:`scored` of an agent whose adapters are fresh (the untrained model): from ``eval.cache`` when
        it holds the score, else computed (and stored there)."""
        if self.cache is None:
            return self.scored(agent, task, split, labels)
        return self.cache.scored(self, agent, task, split, labels)


class RoutedScorer(Classifier):
    """The scorer of a population over several bases (:class:`lmas.population.bases.Bases`): every call goes to
    the scorer of each agent's base; label log-likelihoods of agents on different bases are stacked in the order
    asked (each base ranks the same label strings in its own tokenizer, so the ``(A, N, L)`` rows line up)."""

    def __init__(self, population: Bases, scorers: dict[str, Classifier], home: dict[str, str]) -> None:
        self.population, self.scorers, self.home = population, scorers, home

    def of(self, agent: str) -> Classifier:
        return self.scorers[self.home[agent]]

    def initial_groups(self, rows: list[str]) -> list[tuple[str, list[str]]]:
        """One fresh agent per base scores its base's untrained model for that base's rows; rows that are no agent
        (the ``population`` row) take the first base's."""
        firsts = {b: next(a for a in self.population.names if self.home[a] == b) for b in self.scorers}
        groups = {a: [r for r in rows if self.home.get(r) == b] for b, a in firsts.items()}
        groups[next(iter(groups))] += [r for r in rows if r not in self.home]
        return [(a, rs) for a, rs in groups.items() if rs]

    def scored(self, agent: str, task: Task, split: str = "test", labels: Sequence[str] | None = None) -> Scored:
        return self.of(agent).scored(agent, task, split, labels)

    def untrained(self, agent: str, task: Task, split: str = "test", labels: Sequence[str] | None = None) -> Scored:
        return self.of(agent).untrained(agent, task, split, labels)

    def label_logprobs(self, agents: Sequence[str], prompts: Sequence[str], labels: Sequence[str]) -> Tensor:
        """``(A, N, L)`` over every base: each base scores its agents in one call, rows back in ``agents``' order."""
        rows: dict[str, Tensor] = {}
        for base, scorer in self.scorers.items():
            mine = [a for a in agents if self.home[a] == base]
            if mine:
                rows.update(zip(mine, scorer.label_logprobs(mine, prompts, labels), strict=True))
        return torch.stack([rows[a] for a in agents])
