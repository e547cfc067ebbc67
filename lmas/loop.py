"""The continual loop: rounds of allocate → transfer → fit each assignment → exchange → evaluate → record.

The loop owns ordering and seeding; the units it calls own the rest: the strategy and its fit backend, allocation,
transfer and topology, the Evaluator, RoundLog (metric names), RunState (checkpoint, resume, results.json). What a
round learns is its body (``conf/loop/``): :class:`Continual` or another (self-learning, federated, evolution).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

import lightning as L

from lmas import checkpoint
from lmas.data.stream import Stream
from lmas.data.task import Task
from lmas.evaluation.evaluator import POPULATION, Evaluator
from lmas.metrics.knowledge import KnowledgeMatrix
from lmas.population.allocation import Allocation
from lmas.population.bases import Bases, bind_teachers, machinery
from lmas.population.events import Event
from lmas.population.messages import COORDINATOR, Message
from lmas.population.population import Population
from lmas.population.topology import Topology
from lmas.schema import EvalConfig, TrainConfig
from lmas.state import Assignment, RunState
from lmas.strategies.base import Strategy
from lmas.tracking import report
from lmas.tracking.round_log import RoundLog
from lmas.tracking.trackers import Tracker
from lmas.training.fit import Experience
from lmas.transfer.consolidate import library
from lmas.transfer.policy import Transfer

log = logging.getLogger(__name__)


class RoundBody:
    """What a round learns (``conf/loop/``); the loop evaluates and records around it."""

    name = "continual"

    def bind(self, loop: ContinualLoop) -> list[list[int]]:
        """Check the run's parts and return the plan: task indices per round."""
        return loop.allocation.plan(loop.stream.task_names, loop.population.names)

    def learn(self, loop: ContinualLoop, r: int) -> None:
        raise NotImplementedError  # round r's learning

    def results(self, loop: ContinualLoop) -> dict[str, Any]:
        return {}  # the body's own entries of results.json


class Continual(RoundBody):
    """A round of the stream: the allocation's assignments, the transfer, each assignment trained, the exchange."""

    def learn(self, loop: ContinualLoop, r: int) -> None:
        assignments, state, pop = loop.assign(r), loop.state, loop.population
        pairs = [(a, loop.stream[j]) for a, j in assignments]
        loop.add_events(loop.transfer.run(pop, r, pairs, loop.encoder, state.messages))  # may create agents
        for agent in [a for a in pop.names if a not in state.matrix.agents]:
            state.matrix.add_agent(agent)
        for agent, j in assignments:
            task, trained = loop.stream[j], pop.agents[agent].trained_tasks(loop.stream.task_names)
            seen = [loop.stream[i] for i in trained if i != j]  # the agent's own past tasks
            state.loss_curves[f"{agent}/{task.name}"] = self.fit(loop, agent, task, seen, r)
            for row in [agent] + ([POPULATION] if loop.topology.answers else []):  # the joint answer learnt it too
                state.matrix.mark_trained(r, row, task.name)
        loop.add_events(loop.topology.exchange(pop, r, loop.knowing(), state.messages))

    def fit(self, loop: ContinualLoop, agent: str, task: Task, seen: list[Task], r: int) -> list[float]:
        return loop.fit(agent, task, seen, r)  # one assignment (lmas.population.evolution: the agent's own settings)


class ContinualLoop:
    """Runs a stream through a population with a strategy and records the knowledge matrix in ``run_dir``.
    ``seed`` is mixed with round and agent index into each fit's seed; ``train``/``eval``: ``train.*``/``eval.*``;
    ``trainer``: ``lightning.Trainer`` arguments; ``max_length``: tokens per sequence (prompts are cut); allocation,
    topology, transfer default to every agent every task, no exchange, no transfer; ``body`` to :class:`Continual`.
    """

    # fmt: off
    def __init__(self, population: Population | Bases, stream: Stream, strategy: Strategy, run_dir: str | Path,
                 seed: int = 0, train: TrainConfig | None = None, eval: EvalConfig | None = None,
                 trainer: dict[str, Any] | None = None, max_length: int = 128, tracker: Tracker | None = None,
                 allocation: Allocation | None = None, topology: Topology | None = None,
                 transfer: Transfer | None = None, body: RoundBody | None = None, config: dict | None = None,
                 progress: bool = True, save_adapters: bool = True) -> None:
        # fmt: on
        self.stream, self.strategy, self.run_dir = stream, strategy, Path(run_dir)
        # Bases answers every per-agent call of the continual loop, and the config check keeps it from the bodies
        # and transfers that need a single base (lmas/population/bases.py)
        self.population = cast(Population, population)
        self.seed, self.config, self.save_adapters = seed, config or {}, save_adapters
        train_cfg, eval_cfg, trainer = train or TrainConfig(), eval or EvalConfig(), dict(trainer or {})
        self.train_cfg, self.eval_cfg = train_cfg, eval_cfg
        self.allocation, self.topology = allocation or Allocation(), topology or Topology()
        self.transfer, self.body, self.tracker = transfer or Transfer(), body or Continual(), tracker or Tracker()
        self.log = RoundLog(self.tracker)
        # per base (lmas/population/bases.py): the model on its device, prompt encoder, scorer, fit backends
        parts = machinery(population, max_length, train_cfg, eval_cfg, trainer, progress)
        self.encoder, self.trunk, self.scorer, self.backends = parts
        bind_teachers(strategy, population, self.scorer)  # several bases: teachers on another one, label level
        self.topology.check(population.names)
        self.transfer.bind(list(stream))  # the tasks a tuned merge scores on (transfer.scales)
        self.evaluator = Evaluator(self.scorer, stream, [], eval_cfg, self.topology, self.run_dir / "per_example")
        self.plan = self.evaluator.plan = self.body.bind(self)  # task indices per round
        if not self.plan:
            raise ValueError("allocation: the plan has no rounds")
        rows = population.names + ([POPULATION] if self.topology.answers else [])
        self.state = RunState(KnowledgeMatrix(rows, list(stream.metrics), stream.metrics, stream.probe_names))

    def run(self, resume: bool = False) -> dict:
        """Run every round (after the last complete one when ``resume``); returns the results."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        first = 0
        if resume:  # continue after the checkpoint's round
            r, run = checkpoint.load_round(self.run_dir, self.population, self.allocation, self.strategy)
            self.state, first = RunState.from_dict(run), r + 1
            self.encoder.truncated = self.state.truncated
        if self.eval_cfg.initial and not resume:
            with self.state.timed("eval_s"):  # fresh LoRA adapters are exact no-ops: one evaluation per base
                self.evaluator.initial(self.state.matrix)
        for r in range(first, len(self.plan)):
            self.state.matrix.start_round()
            with self.state.timed("train_s"):
                self.body.learn(self, r)
            with self.state.timed("eval_s"):
                answers = self.evaluator.evaluate_round(r, self.state.matrix, self.knowing(), self.state.messages)
                self.state.answers.append(answers)
            self.record(r)
        self.state.timings["wall_s"] = self.state.wall_s()
        results = self.results()
        report.write_run(self.run_dir, results, self.state.matrix)
        self.tracker.finish()
        return results

    def assign(self, r: int) -> Assignment:
        """Ask the allocation who trains what in round ``r``; a coordinator hands out the task data."""
        round_tasks, needs, shots = self.plan[r], self.allocation.needs_competence, getattr(self.allocation, "shots", 8)
        competence = lambda a, j: self.evaluator.competence(a, j, shots, r, self.state.messages)  # noqa: E731
        assignments = self.allocation.round(r, round_tasks, self.population.names, competence if needs else None)
        for agent, j in assignments if needs else []:
            self.state.messages.send(Message("task", COORDINATOR, agent, r, self.stream[j].train))
        self.state.assignments.append(list(assignments))
        log.info("round %d: %s", r, ", ".join(f"{a} <- {self.stream[j].name}" for a, j in assignments) or "no training")
        return assignments

    def fit(self, agent: str, task: Task, seen: list[Task], round_idx: int, strategy: Strategy | None = None,
            lr: float | None = None) -> list[float]:  # fmt: skip
        """Train ``agent`` on ``task`` with ``strategy`` (default: the run's) at ``lr`` (default: train.lr); losses."""
        strategy = strategy or self.strategy
        seed = self.seed * 1_000_003 + round_idx * 1_009 + self.population.names.index(agent)
        L.seed_everything(seed, workers=True, verbose=False)
        examples = strategy.train_examples(agent, task, seen)
        log.info("round %d: %s trains on %s (%d examples, %s)", round_idx, agent, task.name, len(examples), task.kind)
        labels = self.stream.label_space(self.stream.index(task.name), self.evaluator.seen_index(round_idx))
        offset, exp = self.state.step, Experience(agent, task, examples, strategy, seed, lr, round_idx)
        on_loss = lambda step, loss: self.log.train_loss(agent, offset + step, loss)  # noqa: E731
        curve = lambda: self.evaluator.val_score(agent, task, labels)  # noqa: E731
        result = self.backends[strategy.fit_backend].fit(exp, on_loss, curve)
        if result.curve is not None:
            self.state.curves[f"{agent}/{task.name}"] = result.curve
        self.state.step += result.steps
        details = {"steps": result.steps, "examples": len(examples), **result.info}
        self.population.agents[agent].history.append(Event(round_idx, "trained", task.name, details=details))
        return result.losses

    def add_events(self, records: list[dict]) -> None:
        """Transfer/exchange records: the run's event list and each receiving agent's history."""
        for rec in records:
            self.state.events.append(rec)
            self.population.agents[rec["agent"]].history.append({k: v for k, v in rec.items() if k != "agent"})

    def knowing(self) -> list[str]:
        """Agents that have learnt something (a history), in population order."""
        return [a for a in self.population.names if self.population.agents[a].history]

    def record(self, r: int) -> None:
        """Log round ``r``, save its adapter versions, write partial results and the checkpoint."""
        measured = self.evaluator.similarity(self.knowing())
        if measured is not None:
            self.state.similarity.append({"round": r, **measured})
        self.state.library.append({"round": r, **self.log.library(r, library(self.population, self.knowing()))})
        self.log.round(r, self.state.matrix, self.state.messages, self.state.events, self.state.answers[r], measured)
        self.log.matrix(r, self.state.matrix, self.run_dir / "knowledge_matrix.png")
        if self.save_adapters:
            self.log.versions(r, self.population, self.run_dir / "adapters")
        report.write_json(self.run_dir / "results.json", self.results(partial=True))
        self.state.truncated = self.encoder.truncated
        checkpoint.save_round(self.run_dir, r, self.state.to_dict(), self.population, self.allocation, self.strategy)

    def results(self, partial: bool = False) -> dict:
        """The JSON-safe results of the run so far (:func:`lmas.tracking.report.results`)."""
        self.state.truncated = self.encoder.truncated
        return report.results(self, partial)
