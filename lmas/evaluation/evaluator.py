"""The evaluation schedule: what is scored when, into the knowledge matrix.

* before any training (``eval.initial``): the untrained model on every task (a fresh LoRA adapter is an
  exact no-op, so one evaluation serves every agent), for forward transfer;
* after each round: every agent that has learnt something, on every task met so far and (``eval.next_task``)
  on the next round's tasks before they are trained; a topology that answers jointly adds the
  ``population`` row. That is ``eval.schedule=full``, the whole matrix. ``eval.schedule=minimal`` scores
  only what the continual-learning metrics read (:mod:`lmas.metrics.cl`): after round ``r`` the tasks of
  round ``r`` (right after training them: plasticity, the reference of forgetting) and of round ``r+1``
  (before training them: forward transfer), and after the last round every task met (average accuracy,
  forgetting); the initial evaluation is unchanged. The run's metrics are identical to the full schedule's;
  what is lost is the per-round view of earlier tasks (the ``cl/*`` curves over rounds and the matrix's
  intermediate entries, NaN; a round's summary is logged only where its row is complete,
  :meth:`~lmas.metrics.knowledge.KnowledgeMatrix.complete`). On a stream of T tasks, one per round, it scores
  about 3T task evaluations instead of about T²/2;
* per-example records: every score of the matrix (agents' rows; the initial model) keeps its per-example
  outcomes (:class:`~lmas.evaluation.scoring.Scored`), written per round as ``<records_dir>/initial.npz`` and
  ``<records_dir>/round<r>.npz`` (numpy, one array per ``<row>/<task>``; test items in split order), so any
  metric can be recomputed and resampled later (:mod:`lmas.metrics`);
* a coordinator's competence measurement (answer log-likelihood on a few val examples) for the allocation;
* validation views: a task without a val split is scored on a slice of its training data where a validation
  score is needed (learning curves, a topology's weights); a round body may supply its own view
  (self-learning cuts it from the seed-labelled examples only).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from torch import Tensor

from lmas.data.stream import Stream
from lmas.data.task import HIGHER_IS_BETTER, Task
from lmas.evaluation.scorer import PopulationScorer, RoutedScorer
from lmas.evaluation.scoring import rank_scored
from lmas.metrics import similarity
from lmas.metrics.knowledge import KnowledgeMatrix
from lmas.population.messages import COORDINATOR, Message, MessageLog
from lmas.population.topology import PREDICTIONS, TaskView, Topology
from lmas.schema import EvalConfig

log = logging.getLogger(__name__)
POPULATION = "population"  # the knowledge-matrix row of the topology's joint answer


class Evaluator:
    """Scores agents on the stream's tasks by the schedule above.

    Args:
        scorer: the population's scorer (metrics and label log-likelihoods).
        stream: the tasks; their label spaces follow the stream's scenario.
        plan: task indices per round (who meets what when).
        cfg: ``eval.*``.
        topology: gives the ``population`` row when it answers jointly.
    """

    def __init__(
        self,
        scorer: PopulationScorer | RoutedScorer,
        stream: Stream,
        plan: list[list[int]],
        cfg: EvalConfig,
        topology: Topology,
        records_dir: Path | None = None,
    ) -> None:
        self.scorer, self.stream, self.plan, self.cfg, self.topology = scorer, stream, plan, cfg, topology
        self.val_view: Callable[[Task], Task] = self.fallback_val_view
        self.records_dir = records_dir

    def write_records(self, name: str, records: dict[str, np.ndarray]) -> None:
        """One evaluation's per-example outcomes, ``<records_dir>/<name>.npz`` (atomically replaced)."""
        if self.records_dir is None or not records:
            return
        self.records_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.records_dir / f".{name}.tmp.npz"
        np.savez_compressed(tmp, **records)  # type: ignore[arg-type]  # numpy's stub checks **kwds against allow_pickle
        tmp.replace(self.records_dir / f"{name}.npz")

    def fallback_val_view(self, task: Task) -> Task:
        """``task``, or (no val split) a copy whose val is its first ``eval.val_fallback`` training examples."""
        if task.val:
            return task
        return dataclasses.replace(task, val=task.train[: self.cfg.val_fallback])

    def met_before(self, r: int) -> list[int]:
        """Task indices trained in rounds 0..r, in first-met order."""
        met: list[int] = []
        for round_tasks in self.plan[: r + 1]:
            met += [j for j in round_tasks if j not in met]
        return met

    def seen_index(self, r: int) -> int:
        """The highest task index met by round ``r`` (the class-incremental label space's extent)."""
        return max(self.met_before(r), default=0)

    def round_tasks(self, r: int) -> list[int]:
        """The task indices scored after round ``r`` (``eval.schedule``, module docstring)."""
        nxt = list(self.plan[r + 1]) if self.cfg.next_task and r + 1 < len(self.plan) else []
        if self.cfg.schedule == "full" or r == len(self.plan) - 1:
            return sorted(set(self.met_before(r)) | set(nxt))
        return sorted(set(self.plan[r]) | set(nxt))

    def val_score(self, agent: str, task: Task, labels: list[str] | None = None) -> float:
        """``agent``'s metric on ``task``'s validation view."""
        return self.scorer.score(agent, self.val_view(task), "val", labels)

    def competence(self, agent: str, j: int, shots: int, r: int, messages: MessageLog) -> float:
        """Mean answer log-likelihood per token of ``agent`` on ``shots`` val examples of task ``j`` (a
        coordinator's measurement: the examples go to the agent, the value comes back)."""
        task = self.stream[j]
        rows = self.val_view(task).val[:shots]
        messages.send(Message("task", COORDINATOR, agent, r, rows))
        # one base: answer log-likelihoods; several (RoutedScorer): the metric (tokenizers' likelihoods do not compare)
        value = self.scorer.competence(agent, task, rows, self.stream.label_space(j, self.seen_index(r)))
        messages.send(Message("report", agent, COORDINATOR, r, value))
        return value

    def similarity(self, agents: list[str]) -> dict | None:
        """Inter-agent similarity of ``agents`` (adapter updates; predictions on the probe set); None below two."""
        if len(agents) < 2:
            return None
        probe = similarity.probe_set(self.stream, split=self.cfg.split)
        return similarity.measure(self.scorer.population, self.scorer, agents, probe)

    def initial(self, matrix: KnowledgeMatrix) -> None:
        """The untrained model on every task and probe, for every row of the matrix: a fresh adapter of one agent
        per base (the scorer's ``initial_groups``) for its base's rows. Records: ``<task>`` for a population on
        one base, ``<row>/<task>`` for every row (agents and the ``population`` row) for several."""
        records = {}
        views = [(t, self.stream.label_space(j, 0)) for j, t in enumerate(self.stream.tasks)]
        groups = self.scorer.initial_groups(matrix.agents)
        for agent, rows in groups:
            for task, labels in views + [(p, self.probe_labels(p)) for p in self.stream.probes]:
                scored = self.scorer.untrained(agent, task, self.cfg.split, labels)  # eval.cache: once per sweep
                keys = [task.name] if len(groups) == 1 else [f"{row}/{task.name}" for row in rows]
                records.update(dict.fromkeys(keys, scored.per_example))
                for row in rows:
                    matrix.record_initial(row, task.name, scored.value)
                log.info("initial %s on %s (%s's base): %.4f", task.metric, task.name, agent, scored.value)
        self.write_records("initial", records)

    def evaluate_round(
        self, r: int, matrix: KnowledgeMatrix, agents: list[str], messages: MessageLog
    ) -> dict[str, dict]:
        """Round ``r``'s row of the matrix for ``agents`` (the scheduled tasks, then every probe); returns the
        topology's answers per task (probes get none: the population row is about the stream)."""
        seen, records = self.seen_index(r), dict[str, np.ndarray]()
        answers: dict[str, dict] = {}
        if not agents:
            return answers
        for j in self.round_tasks(r):
            task, labels = self.stream[j], self.stream.label_space(j, seen)
            values, lp, gold = self._score(r, matrix, agents, task, labels, records)
            if self.topology.answers:
                answers[task.name] = self._answer(
                    r, matrix, agents, task, labels, (values, lp, gold), messages, records
                )
        for probe in self.stream.probes:
            self._score(r, matrix, agents, probe, self.probe_labels(probe), records)
        self.write_records(f"round{r:03d}", records)
        return answers

    @staticmethod
    def probe_labels(probe: Task) -> list[str] | None:
        """A probe is scored over its own labels (it belongs to no scenario's label space)."""
        return list(probe.class_labels) if probe.kind == "classification" else None

    def _score(
        self, r: int, matrix: KnowledgeMatrix, agents: list[str], task: Task, labels: list[str] | None, records: dict
    ) -> tuple[dict[str, float], Tensor | None, Tensor | None]:
        """Every agent's metric on ``task`` into the matrix and ``records``; the label log-likelihoods and gold
        indices of a classification task (for the topology's answer)."""
        lp = gold = None
        if task.kind == "classification":
            assert labels is not None  # label_space gives every classification task its labels
            values, lp, gold = self.scorer.classify(agents, task, self.cfg.split, labels)
            scored = {a: rank_scored(lp[i], gold) for i, a in enumerate(agents)}
        else:
            scored = {a: self.scorer.scored(a, task, self.cfg.split, labels) for a in agents}
            values = {a: s.value for a, s in scored.items()}
        records.update({f"{a}/{task.name}": s.per_example for a, s in scored.items()})
        for agent, value in values.items():
            matrix.record(r, agent, task.name, value)
            log.info("round %d: %s on %s: %s=%.4f", r, agent, task.name, task.metric, value)
        return values, lp, gold

    def _answer(
        self,
        r: int,
        matrix: KnowledgeMatrix,
        agents: list[str],
        task: Task,
        labels: list[str] | None,
        scored: tuple[dict[str, float], Tensor | None, Tensor | None],
        messages: MessageLog,
        records: dict[str, np.ndarray],
    ) -> dict:
        """The topology's joint answer on ``task`` (the ``population`` row) and its details; its per-example
        outcomes into ``records``: right or wrong per item for a fused classification answer (the topology's
        ``predictions``), the chosen agent's own for a routed one."""
        values, lp, gold = scored
        cache: dict[str, float] = {}

        def val_score(a: str) -> float:
            if a not in cache:
                cache[a] = self.val_score(a, task, labels)
            return cache[a]

        view = TaskView(task, agents, values, lp, gold, val_score, self.cfg.split, HIGHER_IS_BETTER[task.metric])
        answer = self.topology.answer(view, r, messages)
        assert answer is not None, f"topology {self.topology.name!r} has answers=True but gave no answer"
        value, info = answer
        pred = info.pop(PREDICTIONS, None)
        if pred is not None and gold is not None:
            records[f"{POPULATION}/{task.name}"] = (pred.cpu() == gold.cpu()).numpy().astype(np.uint8)
        elif info.get("routed_to") in agents:
            records[f"{POPULATION}/{task.name}"] = records[f"{info['routed_to']}/{task.name}"]
        matrix.record(r, POPULATION, task.name, value)
        log.info("round %d: %s on %s: %s=%.4f %s", r, POPULATION, task.name, task.metric, value, info)
        return {"value": value, **info}
