"""The outer continual loop: rounds of training, evaluation into the knowledge matrix, and output.

One round = every agent assigned a task trains on it (one ``Trainer.fit`` each), then every agent
is evaluated on every task met so far and on the tasks of the next round (forward transfer).
The loop owns ordering, seeding and the evaluation schedule; the strategy owns the method.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L

from lmas.data.stream import Stream
from lmas.data.task import Task
from lmas.metrics.knowledge import KnowledgeMatrix
from lmas.modules.incremental import ExperienceData, IncrementalLM
from lmas.modules.lm import Encoder, evaluate
from lmas.population.population import Population
from lmas.strategies.base import Strategy
from lmas.tracking import report
from lmas.tracking.trackers import Tracker

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Optimisation settings of one experience (``train.*`` in the config)."""

    lr: float = 1e-3
    batch_size: int = 8
    epochs: int = 1
    max_steps: int | None = None  # per experience; None = full epochs
    weight_decay: float = 0.0
    warmup_steps: int = 0
    log_every: int = 5


@dataclass
class EvalConfig:
    """Evaluation settings (``eval.*`` in the config)."""

    split: str = "test"
    batch_size: int = 32
    max_new_tokens: int = 12
    initial: bool = True  # evaluate the untrained model on every task (b, for FWT)
    next_task: bool = True  # evaluate the next round's tasks before training them


@dataclass
class Schedule:
    """Which agent trains which task in each round: ``rounds[r] = [(agent, task_index), ...]``."""

    rounds: list[list[tuple[str, int]]] = field(default_factory=list)

    @classmethod
    def every_agent_every_task(cls, agents: list[str], n_tasks: int) -> "Schedule":
        return cls([[(a, j) for a in agents] for j in range(n_tasks)])


@contextmanager
def _quiet_lightning():
    """Silence Lightning's per-fit banners (GPU/TPU availability, tips); warnings still show."""
    names = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero", "lightning")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        try:
            yield
        finally:
            for n, level in levels.items():
                logging.getLogger(n).setLevel(level)


class _StepLogger(L.Callback):
    def __init__(self, tracker: Tracker, offset: int, every: int, agent: str) -> None:
        self.tracker, self.offset, self.every, self.agent = tracker, offset, every, agent

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0:
            loss = outputs["loss"].item() if isinstance(outputs, dict) else float(outputs)
            self.tracker.log({f"train/{self.agent}/loss": loss}, "step", self.offset + step)


class ContinualLoop:
    """Runs a stream through a population with a strategy and records the knowledge matrix.

    Args:
        population: the agents and the shared base model.
        stream: the tasks, in training order.
        strategy: the continual-learning method.
        run_dir: where results, matrices, plots and adapters go.
        seed: seeds every experience (``seed``, round and agent index are mixed into each fit's seed).
        train, eval: :class:`TrainConfig` / :class:`EvalConfig`.
        trainer: extra keyword arguments for ``lightning.Trainer`` (accelerator, devices, strategy, ...).
        max_length: longest token sequence (prompts are cut from the start).
        tracker: where metrics go (W&B, CSV, or nothing).
        schedule: who trains what in each round; default: every agent trains every task in order.
        config: the resolved run config, stored in results.json.
    """

    def __init__(
        self,
        population: Population,
        stream: Stream,
        strategy: Strategy,
        run_dir: str | Path,
        seed: int = 0,
        train: TrainConfig | None = None,
        eval: EvalConfig | None = None,
        trainer: dict[str, Any] | None = None,
        max_length: int = 128,
        tracker: Tracker | None = None,
        schedule: Schedule | None = None,
        config: dict | None = None,
        progress: bool = True,
        save_adapters: bool = True,
    ) -> None:
        self.population = population
        self.stream = stream
        self.strategy = strategy
        self.run_dir = Path(run_dir)
        self.seed = seed
        self.train_cfg = train or TrainConfig()
        self.eval_cfg = eval or EvalConfig()
        self.trainer_kwargs = dict(trainer or {})
        self.encoder = Encoder(population.tokenizer, max_length)
        self.tracker = tracker or Tracker()
        self.schedule = schedule or Schedule.every_agent_every_task(population.names, len(stream))
        self.config = config or {}
        self.progress = progress
        self.save_adapters = save_adapters
        self.step = 0  # global optimisation step over all experiences (the W&B x-axis)
        self.matrix = KnowledgeMatrix(population.names, stream.task_names,
                                      {t.name: t.metric for t in stream.tasks})
        self.timings: dict[str, float] = {"train_s": 0.0, "eval_s": 0.0}
        for r, assignments in enumerate(self.schedule.rounds):
            for agent, j in assignments:
                if agent not in population.agents or not 0 <= j < len(stream):
                    raise ValueError(f"schedule round {r}: ({agent!r}, task {j}) is not a known agent/task")

    # --- one experience ----------------------------------------------------------------
    def fit(self, agent: str, task: Task, seen: list[Task], round_idx: int) -> list[float]:
        """Train ``agent`` on ``task`` (one ``Trainer.fit``); returns the per-step losses."""
        cfg = self.train_cfg
        agent_idx = self.population.names.index(agent)
        fit_seed = self.seed * 1_000_003 + round_idx * 1_009 + agent_idx
        L.seed_everything(fit_seed, workers=True, verbose=False)
        examples = self.strategy.train_examples(agent, task, seen)
        self.population.activate(agent)
        external = self.strategy.external_fit(self.population, agent, task, examples, self.encoder, cfg, fit_seed)
        if external is not None:
            self.population.model.eval()
            for i, loss in enumerate(external, 1):  # the same step axis as the Lightning path
                if i % cfg.log_every == 0:
                    self.tracker.log({f"train/{agent}/loss": loss}, "step", self.step + i)
            self._record_fit(agent, task, round_idx, len(external), len(examples))
            return external
        data = ExperienceData(self.encoder, examples, cfg.batch_size, seed=fit_seed)
        module = IncrementalLM(self.population, agent, self.strategy, self.encoder, lr=cfg.lr,
                               weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps)
        self.population.activate(agent)
        self.strategy.before_task(module, task)
        log.info("round %d: %s trains on %s (%d examples, %s)", round_idx, agent, task.name,
                 len(examples), task.kind)
        self.population.model.train()  # Lightning keeps submodules' modes; evaluation left them in eval
        with _quiet_lightning():
            trainer = L.Trainer(
                max_epochs=cfg.epochs,
                max_steps=cfg.max_steps if cfg.max_steps else -1,
                logger=False,
                enable_checkpointing=False,
                enable_model_summary=False,
                enable_progress_bar=self.progress,
                num_sanity_val_steps=0,
                callbacks=[_StepLogger(self.tracker, self.step, cfg.log_every, agent)],
                **{"accelerator": "cpu", "devices": 1, **self.trainer_kwargs},
            )
            trainer.fit(module, datamodule=data)
        self.population.model.eval()
        self.strategy.after_task(module, task)
        self._record_fit(agent, task, round_idx, trainer.global_step, len(examples))
        return module.losses

    def _record_fit(self, agent: str, task: Task, round_idx: int, steps: int, n_examples: int) -> None:
        self.step += steps
        self.population.agents[agent].history.append(
            {"round": round_idx, "event": "trained", "task": task.name, "steps": steps, "examples": n_examples})

    def score(self, agent: str, j: int, seen: int) -> float:
        """The metric of ``agent`` on task ``j`` (label space per the stream's scenario)."""
        self.population.activate(agent)
        task = self.stream[j]
        return evaluate(self.population.model, self.encoder, task, self.eval_cfg.split,
                        labels=self.stream.label_space(j, seen), batch_size=self.eval_cfg.batch_size,
                        max_new_tokens=self.eval_cfg.max_new_tokens)

    # --- the run -----------------------------------------------------------------------
    def run(self) -> dict:
        """Run every round; write results.json, the matrix CSV and heatmap; return the results."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        names = self.population.names
        tasks = self.stream.tasks
        if self.eval_cfg.initial:
            t0 = time.perf_counter()
            for j, task in enumerate(tasks):
                # fresh LoRA adapters are exact no-ops (B = 0), so one evaluation serves all agents
                value = self.score(names[0], j, seen=0)
                for agent in names:
                    self.matrix.record_initial(agent, task.name, value)
                log.info("initial %s on %s: %.4f", task.metric, task.name, value)
            self.timings["eval_s"] += time.perf_counter() - t0
        curves: dict[str, list[float]] = {}
        for r, assignments in enumerate(self.schedule.rounds):
            round_idx = self.matrix.start_round()
            t0 = time.perf_counter()
            for agent, j in assignments:
                seen = [tasks[i] for i in self._met_before(r) if i != j]
                curves[f"{agent}/{tasks[j].name}"] = self.fit(agent, tasks[j], seen, round_idx)
                self.matrix.mark_trained(round_idx, agent, tasks[j].name)
            self.timings["train_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            self.evaluate_round(r)
            self.timings["eval_s"] += time.perf_counter() - t0
            self.after_round(r)
        self.timings["wall_s"] = time.perf_counter() - start
        results = self.results(curves)
        report.write_run(self.run_dir, results, self.matrix)
        self.tracker.finish()
        return results

    def _met_before(self, r: int) -> list[int]:
        """Task indices trained in rounds 0..r, in first-met order."""
        met: list[int] = []
        for assignments in self.schedule.rounds[: r + 1]:
            for _, j in assignments:
                if j not in met:
                    met.append(j)
        return met

    def evaluate_round(self, r: int) -> None:
        """Evaluate every agent on every task met so far and on the next round's tasks."""
        met = self._met_before(r)
        upcoming = []
        if self.eval_cfg.next_task and r + 1 < len(self.schedule.rounds):
            upcoming = [j for _, j in self.schedule.rounds[r + 1] if j not in met]
        targets = sorted(set(met) | set(upcoming))
        seen = max(met)
        for agent in self.population.names:
            for j in targets:
                value = self.score(agent, j, seen)
                self.matrix.record(r, agent, self.stream[j].name, value)
                log.info("round %d: %s on %s: %s=%.4f", r, agent, self.stream[j].name, self.stream[j].metric, value)

    def after_round(self, r: int) -> None:
        """Log the round, save adapter versions and write partial results."""
        values = self.matrix.values()[r]  # (agents, tasks)
        metrics: dict[str, float] = {}
        for a, agent in enumerate(self.population.names):
            for j, task in enumerate(self.stream.task_names):
                if not math.isnan(values[a, j]):
                    metrics[f"eval/{agent}/{task}"] = float(values[a, j])
            for key, value in self.matrix.summary(agent).items():
                metrics[f"cl/{agent}/{key}"] = value
        self.tracker.log(metrics, "round", r)
        heat = self.run_dir / "knowledge_matrix.png"
        self.matrix.heatmap(heat)
        self.tracker.log_image("knowledge_matrix", heat, r)
        if self.save_adapters:
            for agent, j in self.schedule.rounds[r]:
                task = self.stream[j].name
                path = self.run_dir / "adapters" / agent / f"round{r:03d}-{task}.safetensors"
                meta = {"agent": agent, "task": task, "round": str(r), "base": self.population.base.name}
                self.population.save_adapter(agent, path, metadata=meta)
                self.tracker.log_artifact(path, f"adapter-{agent}", "adapter", meta)
        report.write_json(self.run_dir / "results.json", self.results({}, partial=True))

    def results(self, curves: dict[str, list[float]], partial: bool = False) -> dict:
        """The JSON-safe results of the run so far."""
        return {
            "complete": not partial,
            "stream": self.stream.name,
            "scenario": self.stream.scenario,
            "tasks": [{"name": t.name, "kind": t.kind, "metric": t.metric, "source": t.source,
                       "n_train": len(t.train), "n_val": len(t.val), "n_test": len(t.test)}
                      for t in self.stream.tasks],
            "agents": {n: {"history": a.history} for n, a in self.population.agents.items()},
            "strategy": self.strategy.name,
            "seed": self.seed,
            "matrix": self.matrix.to_dict(),
            "metrics": {agent: self.matrix.summary(agent) for agent in self.population.names},
            "loss_curves": curves,
            "timings": dict(self.timings),
            "truncated_prompts": self.encoder.truncated,
            "versions": report.versions(),
            "config": self.config,
        }
