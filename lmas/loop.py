"""The outer continual loop: rounds of training, evaluation into the knowledge matrix, and output.

One round:

1. the allocation assigns the round's tasks to agents (a coordinator may measure them first);
2. the transfer policy may initialise adapters from other agents' (merge, LoraHub);
3. every assigned agent trains on its task (one ``Trainer.fit`` each);
4. the topology moves knowledge between agents (peer-to-peer adapter exchange);
5. every agent that has learnt something is evaluated on every task met so far and on the next
   round's tasks (forward transfer); the topology's joint answer is the ``population`` row.

The loop owns ordering, seeding and the evaluation schedule; the strategy owns the CL method,
the allocation/topology/transfer objects own the population's behaviour. Everything that moves
between agents is counted as messages (count and bytes per round).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L

from lmas import checkpoint
from lmas.data.stream import Stream
from lmas.data.task import Task
from lmas.evaluation.scorer import PopulationScorer
from lmas.lm.device import trainer_device
from lmas.lm.encoding import PromptEncoder
from lmas.lm.trunk import SharedTrunk
from lmas.metrics import similarity
from lmas.metrics.knowledge import KnowledgeMatrix
from lmas.population.allocation import Allocation, Assignment
from lmas.population.messages import COORDINATOR, Message, MessageLog
from lmas.population.population import Population
from lmas.population.topology import TaskView, Topology
from lmas.schema import EvalConfig, TrainConfig
from lmas.strategies.base import Strategy
from lmas.tracking import lineage, report
from lmas.tracking.trackers import Tracker
from lmas.training.experience import ExperienceData, IncrementalLM
from lmas.transfer.lorahub import answer_nll, few_shot_batches
from lmas.transfer.policy import Transfer

log = logging.getLogger(__name__)


POPULATION = "population"  # the knowledge-matrix row of the topology's joint answer


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


class _CurveLogger(L.Callback):
    """Scores the training task every ``every`` steps (and before the first): a learning curve."""

    def __init__(self, every: int, score) -> None:
        self.every, self.score, self.points = every, score, []

    def on_train_start(self, trainer, pl_module) -> None:
        self.points.append([0, self.score()])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            self.points.append([trainer.global_step, self.score()])


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
        max_length: longest token sequence (prompts are cut from the start; the start token and a chat
            template are kept). The prompt format is the base model's (``model.prompt_format``).
        tracker: where metrics go (W&B, CSV, or nothing).
        allocation: who trains what in each round (default: every agent every task, in order).
        topology: exchange between agents and the population's joint answer (default: none).
        transfer: adapter initialisation from other agents before training (default: none).
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
        allocation: Allocation | None = None,
        topology: Topology | None = None,
        transfer: Transfer | None = None,
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
        # the base moves to the trainer's device once; every fit and every evaluation run there
        # (IncrementalLM.cpu keeps Lightning from moving it back after each fit)
        self.device = trainer_device(self.trainer_kwargs)
        population.model.to(self.device)
        self.encoder = PromptEncoder(population.tokenizer, max_length, population.base.prompt_format)
        self.tracker = tracker or Tracker()
        self.allocation = allocation or Allocation()
        self.topology = topology or Topology()
        self.transfer = transfer or Transfer()
        self.config = config or {}
        self.progress = progress
        self.save_adapters = save_adapters
        self.trunk = (SharedTrunk(population.model)
                      if self.train_cfg.trunk_cache or self.eval_cfg.shared_trunk else None)
        self.scorer = PopulationScorer(population, self.encoder, self.eval_cfg.batch_size,
                                       self.eval_cfg.max_new_tokens, self.eval_cfg.mixed_adapters,
                                       trunk=self.trunk if self.eval_cfg.shared_trunk else None,
                                       precision=self.trainer_kwargs.get("precision"))
        self.messages = MessageLog()
        self.step = 0  # global optimisation step over all experiences (the W&B x-axis)
        self.topology.check(population.names)
        self.plan = self.allocation.plan(stream.task_names, population.names)  # task indices per round
        if not self.plan:
            raise ValueError("population.allocation: the plan has no rounds")
        rows = population.names + ([POPULATION] if self.topology.answers else [])
        self.matrix = KnowledgeMatrix(rows, stream.task_names, {t.name: t.metric for t in stream.tasks})
        self.timings: dict[str, float] = {"train_s": 0.0, "eval_s": 0.0}
        self.assignments: list[Assignment] = []  # per round, as the allocation decided
        self.answers: list[dict[str, dict]] = []  # per round: task -> the topology's answer details
        self.events: list[dict] = []  # transfer and exchange records
        self.curves: dict[str, list[list[float]]] = {}  # agent/task -> [[step, value], ...]
        self.loss_curves: dict[str, list[float]] = {}  # agent/task -> per-step training loss
        self.similarity: list[dict] = []  # per round with >= 2 knowing agents: weights/predictions per pair
        self._started, self._wall_before = time.perf_counter(), 0.0  # wall time: this process + before a resume

    # --- one experience ----------------------------------------------------------------
    def fit(self, agent: str, task: Task, seen: list[Task], round_idx: int,
            strategy: Strategy | None = None) -> list[float]:
        """Train ``agent`` on ``task`` (one ``Trainer.fit``); returns the per-step losses.

        ``strategy`` overrides the loop's strategy for this experience (e.g. a distillation step).
        """
        cfg = self.train_cfg
        strategy = strategy or self.strategy
        agent_idx = self.population.names.index(agent)
        fit_seed = self.seed * 1_000_003 + round_idx * 1_009 + agent_idx
        L.seed_everything(fit_seed, workers=True, verbose=False)
        examples = strategy.train_examples(agent, task, seen)
        self.population.activate(agent)
        external = strategy.external_fit(self.population, agent, task, examples, self.encoder, cfg, fit_seed)
        if external is not None:
            self.population.model.eval()
            for i, loss in enumerate(external, 1):  # the same step axis as the Lightning path
                if i % cfg.log_every == 0:
                    self.tracker.log({f"train/{agent}/loss": loss}, "step", self.step + i)
            self._record_fit(agent, task, round_idx, len(external), len(examples))
            return external
        data = ExperienceData(self.encoder, examples, cfg.batch_size, seed=fit_seed)
        module = IncrementalLM(self.population, agent, strategy, self.encoder, lr=cfg.lr,
                               weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
                               trunk=self.trunk if cfg.trunk_cache else None)
        module.examples = examples
        self.population.activate(agent)
        strategy.before_task(module, task)
        log.info("round %d: %s trains on %s (%d examples, %s)", round_idx, agent, task.name,
                 len(examples), task.kind)
        callbacks: list[L.Callback] = [_StepLogger(self.tracker, self.step, cfg.log_every, agent)]
        if self.eval_cfg.curve_every > 0:
            labels = self.stream.label_space(self.stream.index(task.name), self._seen_index(round_idx))
            curve = _CurveLogger(self.eval_cfg.curve_every,
                                 lambda: self.scorer.score(agent, self._eval_view(task, "val"), "val", labels))
            callbacks.append(curve)
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
                callbacks=callbacks,
                **{"accelerator": "cpu", "devices": 1, **self.trainer_kwargs},
            )
            trainer.fit(module, datamodule=data)
        self.population.model.eval()
        strategy.after_task(module, task)
        if self.eval_cfg.curve_every > 0:
            self.curves[f"{agent}/{task.name}"] = curve.points
        self._record_fit(agent, task, round_idx, trainer.global_step, len(examples), strategy.fit_info())
        return module.losses

    def _eval_view(self, task: Task, split: str) -> Task:
        """``task`` itself, or (for a missing val split) a copy whose val is a slice of train."""
        if split != "val" or task.val:
            return task
        return Task(task.name, task.kind, task.train, task.train[: self.eval_cfg.val_fallback], task.test,
                    task.labels, task.source, task.meta)

    def _record_fit(self, agent: str, task: Task, round_idx: int, steps: int, n_examples: int,
                    info: dict | None = None) -> None:
        self.step += steps
        self.population.agents[agent].history.append({"round": round_idx, "event": "trained", "task": task.name,
                                                      "steps": steps, "examples": n_examples, **(info or {})})

    def score(self, agent: str, j: int, seen: int) -> float:
        """The metric of ``agent`` on task ``j`` (label space per the stream's scenario)."""
        return self.scorer.score(agent, self.stream[j], self.eval_cfg.split, self.stream.label_space(j, seen))

    def competence(self, agent: str, j: int) -> float:
        """Mean answer log-likelihood per token of ``agent`` on a few val examples of task ``j``."""
        task = self.stream[j]
        shots = self._eval_view(task, "val").val[: getattr(self.allocation, "shots", 8)]
        round_idx = len(self.assignments)
        self.messages.send(Message("task", COORDINATOR, agent, round_idx, shots))
        self.population.activate(agent)
        value = -answer_nll(self.population.model, few_shot_batches(self.encoder, shots, task.kind))
        self.messages.send(Message("report", agent, COORDINATOR, round_idx, value))
        return value

    # --- the run -----------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict:
        """Run every round; write results.json, the matrix CSV and heatmap; return the results.

        ``resume``: continue from the run dir's last checkpoint (the round after it) instead of
        starting over; the resumed run ends with the results an uninterrupted run would have.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._started = time.perf_counter()
        tasks = self.stream.tasks
        first = self.restore() + 1 if resume else 0
        if self.eval_cfg.initial and not resume:
            t0 = time.perf_counter()
            for j, task in enumerate(tasks):
                # fresh LoRA adapters are exact no-ops (B = 0), so one evaluation serves all agents
                value = self.score(self.population.names[0], j, seen=0)
                for agent in self.matrix.agents:
                    self.matrix.record_initial(agent, task.name, value)
                log.info("initial %s on %s: %.4f", task.metric, task.name, value)
            self.timings["eval_s"] += time.perf_counter() - t0
        for r in range(first, len(self.plan)):
            self.matrix.start_round()
            t0 = time.perf_counter()
            self.train_round(r)
            self.timings["train_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            self.evaluate_round(r)
            self.timings["eval_s"] += time.perf_counter() - t0
            self.after_round(r)
        self.timings["wall_s"] = self._wall_before + time.perf_counter() - self._started
        results = self.results()
        report.write_run(self.run_dir, results, self.matrix)
        self.tracker.finish()
        return results

    def train_round(self, r: int) -> None:
        """Round ``r``'s learning: allocation, transfer, one fit per assignment, exchange."""
        tasks = self.stream.tasks
        assignments = self.assign(r, self.plan[r])
        self._transfer(r, assignments)
        for agent, j in assignments:
            seen = [tasks[i] for i in self.trained_by(agent) if i != j]
            self.loss_curves[f"{agent}/{tasks[j].name}"] = self.fit(agent, tasks[j], seen, r)
            self.matrix.mark_trained(r, agent, tasks[j].name)
            if self.topology.answers:
                self.matrix.mark_trained(r, POPULATION, tasks[j].name)
        senders = [a for a in self.population.names if self.population.agents[a].history]
        self._log_events(self.topology.exchange(self.population, r, senders, self.messages))

    # --- checkpoints ---------------------------------------------------------------------
    def checkpoint(self, r: int) -> None:
        """Save everything needed to continue after round ``r`` (atomically; see :mod:`lmas.checkpoint`)."""
        state = {
            "round": r,
            "step": self.step,
            "timings": dict(self.timings),
            "wall_s": self._wall_before + time.perf_counter() - self._started,
            "matrix": self.matrix.to_dict(),
            "histories": {n: a.history for n, a in self.population.agents.items()},
            "assignments": [[list(p) for p in rnd] for rnd in self.assignments],
            "answers": self.answers,
            "events": self.events,
            "curves": self.curves,
            "loss_curves": self.loss_curves,
            "similarity": self.similarity,
            "truncated": self.encoder.truncated,
            "messages": self.messages.state_dict(),
            "allocation": self.allocation.state_dict(),
            "strategy": self.strategy.state_dict(),
            "extra": self.extra_state(),
        }
        checkpoint.save(self.run_dir, state, self.population)

    def extra_state(self) -> dict:
        """A subclass's own checkpointed state (JSON-safe; tensors allowed)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore :meth:`extra_state`."""

    def restore(self) -> int:
        """Load the run dir's checkpoint into this loop; returns the last complete round."""
        state, folder = checkpoint.load(self.run_dir)
        checkpoint.restore_population(self.population, state["adapters"], folder / "adapters", state["histories"])
        self.matrix = KnowledgeMatrix.from_dict(state["matrix"])
        self.step = state["step"]
        self.timings, self._wall_before = dict(state["timings"]), float(state["wall_s"])
        self.assignments = [[(a, j) for a, j in rnd] for rnd in state["assignments"]]
        self.answers, self.events = state["answers"], state["events"]
        self.curves, self.loss_curves = state["curves"], state["loss_curves"]
        self.similarity = state.get("similarity", [])
        self.encoder.truncated = state["truncated"]
        self.messages.load_state_dict(state["messages"])
        self.allocation.load_state_dict(state["allocation"])
        self.strategy.load_state_dict(state["strategy"])
        self.load_extra_state(state.get("extra", {}))
        checkpoint.set_rng_state(state["rng"])
        log.info("resumed %s after round %d (from %s)", self.run_dir, state["round"], folder)
        return int(state["round"])

    def assign(self, r: int, round_tasks: list[int]) -> Assignment:
        """Ask the allocation who trains what in round ``r``; a coordinator hands out the task data."""
        competence = self.competence if self.allocation.needs_competence else None
        assignments = self.allocation.assign(r, round_tasks, self.population.names, competence)
        unknown = [(a, j) for a, j in assignments if a not in self.population.agents or j not in round_tasks]
        if unknown:
            raise ValueError(f"population.allocation: round {r} assigned {unknown}, not (agent, task of the round)")
        if self.allocation.needs_competence:
            for agent, j in assignments:
                self.messages.send(Message("task", COORDINATOR, agent, r, self.stream[j].train))
        self.assignments.append(list(assignments))
        log.info("round %d: %s", r, ", ".join(f"{a} <- {self.stream[j].name}" for a, j in assignments) or "no training")
        return assignments

    def _transfer(self, r: int, assignments: Assignment) -> None:
        """Run the transfer policy before round ``r``'s training; count its adapter messages."""
        records = self.transfer.apply(self.population, r, [(a, self.stream[j]) for a, j in assignments], self.encoder)
        for agent in self.population.names:
            if agent not in self.matrix.agents:  # a merge created a new agent
                self.matrix.add_agent(agent)
        for rec in records:
            for src in rec.get("sources", []):
                if src != rec["agent"] and src in self.population.agents:
                    self.messages.send(Message("adapter", src, rec["agent"], r, self.population.adapter_state(src)))
        self._log_events([{**rec, "event": rec.get("transfer", "transfer")} for rec in records])

    def _log_events(self, records: list[dict]) -> None:
        for rec in records:
            self.events.append(rec)
            self.population.agents[rec["agent"]].history.append({k: v for k, v in rec.items() if k != "agent"})

    def trained_by(self, agent: str) -> list[int]:
        """Indices of the tasks ``agent`` has trained so far, in first-trained order (a strategy's
        ``seen``: what replay, joint or LwF protect is the agent's own past)."""
        out: list[int] = []
        for e in self.population.agents[agent].history:
            if e.get("event") == "trained" and e.get("task") in self.stream.task_names:
                j = self.stream.index(e["task"])
                if j not in out:
                    out.append(j)
        return out

    def _met_before(self, r: int) -> list[int]:
        """Task indices trained in rounds 0..r, in first-met order."""
        met: list[int] = []
        for round_tasks in self.plan[: r + 1]:
            for j in round_tasks:
                if j not in met:
                    met.append(j)
        return met

    def _seen_index(self, r: int) -> int:
        met = self._met_before(r)
        return max(met) if met else 0

    def evaluate_round(self, r: int) -> None:
        """Evaluate every agent that has learnt something on the tasks met so far and the next round's."""
        met = self._met_before(r)
        upcoming = []
        if self.eval_cfg.next_task and r + 1 < len(self.plan):
            upcoming = [j for j in self.plan[r + 1] if j not in met]
        seen = self._seen_index(r)
        agents = [a for a in self.population.names if self.population.agents[a].history]
        split = self.eval_cfg.split
        self.answers.append({})
        for j in sorted(set(met) | set(upcoming)):
            task, labels = self.stream[j], self.stream.label_space(j, seen)
            lp = gold = None
            if not agents:
                continue
            if task.kind == "classification":
                values, lp, gold = self.scorer.classify(agents, task, split, labels)
            else:
                values = {a: self.scorer.score(a, task, split, labels) for a in agents}
            for agent, value in values.items():
                self.matrix.record(r, agent, task.name, value)
                log.info("round %d: %s on %s: %s=%.4f", r, agent, task.name, task.metric, value)
            if self.topology.answers:
                cache: dict[str, float] = {}

                def val_score(a: str, task=task, labels=labels, cache=cache) -> float:
                    if a not in cache:
                        cache[a] = self.scorer.score(a, self._eval_view(task, "val"), "val", labels)
                    return cache[a]

                view = TaskView(task, agents, values, lp, gold, val_score, split,
                                higher_is_better=task.metric != "perplexity")
                value, info = self.topology.answer(view, r, self.messages)
                self.matrix.record(r, POPULATION, task.name, value)
                self.answers[r][task.name] = {"value": value, **info}
                log.info("round %d: %s on %s: %s=%.4f %s", r, POPULATION, task.name, task.metric, value, info)

    def after_round(self, r: int) -> None:
        """Log the round, save adapter versions and write partial results."""
        values = self.matrix.values()[r]  # (agents, tasks)
        metrics: dict[str, float] = {}
        for a, agent in enumerate(self.matrix.agents):
            for j, task in enumerate(self.stream.task_names):
                if not math.isnan(values[a, j]):
                    metrics[f"eval/{agent}/{task}"] = float(values[a, j])
            for key, value in self.matrix.summary(agent).items():
                metrics[f"cl/{agent}/{key}"] = value
        comm = self.messages.round_summary(r)
        metrics["comm/messages"], metrics["comm/bytes"] = comm["messages"], comm["bytes"]
        for kind, c in comm["by_kind"].items():
            metrics[f"comm/{kind}/messages"], metrics[f"comm/{kind}/bytes"] = c["messages"], c["bytes"]
        for rec in self.events:  # each merge's relative truncation error of ΔW (0 = exact)
            if rec.get("round") == r and "residual" in rec:
                metrics[f"transfer/{rec['agent']}/{rec.get('event', 'transfer')}_residual"] = float(rec["residual"])
        for task, info in self.answers[r].items():
            if "escalation_rate" in info:
                metrics[f"cascade/{task}/escalation_rate"] = info["escalation_rate"]
        knowing = [a for a in self.population.names if self.population.agents[a].history]
        if len(knowing) >= 2:  # inter-agent similarity: of the adapter updates, of predictions on a probe set
            measured = similarity.measure(self.population, self.scorer, knowing,
                                          similarity.probe_set(self.stream, split=self.eval_cfg.split))
            self.similarity.append({"round": r, **measured})
            for kind in ("weights", "predictions"):
                for pair, value in measured.get(kind, {}).items():
                    if not math.isnan(value):
                        metrics[f"similarity/{pair}/{kind}"] = value
        self.tracker.log(metrics, "round", r)
        trained = set(self.matrix.trained())
        self.tracker.log_table("knowledge_table", ["round", "agent", "task", "metric", "value", "trained"],
                               [[r, agent, task, self.matrix.metrics[task], float(values[a, j]), (r, agent, task) in trained]
                                for a, agent in enumerate(self.matrix.agents)
                                for j, task in enumerate(self.matrix.tasks) if not math.isnan(values[a, j])], r)
        heat = self.run_dir / "knowledge_matrix.png"
        self.matrix.heatmap(heat)
        self.tracker.log_image("knowledge_matrix", heat, r)
        if self.save_adapters:
            histories = {n: a.history for n, a in self.population.agents.items()}
            for version in (v for v in lineage.versions(histories) if v.round == r):  # parents first
                agent, events, label = version.agent, version.events, version.label
                parents = [lineage.ref(a, pr) for a, pr, _ in version.parents]
                path = self.run_dir / "adapters" / agent / f"round{r:03d}-{label}.safetensors"
                meta = {"agent": agent, "round": str(r), "base": self.population.base.name,
                        "events": ",".join(e["event"] for e in events), "task": label, "parents": ",".join(parents)}
                self.population.save_adapter(agent, path, metadata=meta)
                self.tracker.log_artifact(path, lineage.artifact_name(agent), "adapter", meta,
                                          aliases=[lineage.alias(r)], parents=parents)
        report.write_json(self.run_dir / "results.json", self.results(partial=True))
        self.checkpoint(r)

    def results(self, partial: bool = False) -> dict:
        """The JSON-safe results of the run so far."""
        return {
            "complete": not partial,
            "stream": self.stream.name,
            "scenario": self.stream.scenario,
            "tasks": [{"name": t.name, "kind": t.kind, "metric": t.metric, "source": t.source,
                       "n_train": len(t.train), "n_val": len(t.val), "n_test": len(t.test)}
                      for t in self.stream.tasks],
            "agents": {n: {"history": a.history} for n, a in self.population.agents.items()},
            "population": {
                "allocation": self.allocation.name,
                "topology": self.topology.describe(),
                "transfer": self.transfer.name,
                "assignments": [[[a, self.stream[j].name] for a, j in rnd] for rnd in self.assignments],
                "answers": self.answers,
                "communication": self.messages.to_list(self.matrix.n_rounds),
            },
            "strategy": self.strategy.name,
            "seed": self.seed,
            "matrix": self.matrix.to_dict(),
            "metrics": self.matrix.summaries(),  # the one computation of the metrics (KnowledgeMatrix.summary)
            "loss_curves": self.loss_curves,
            "learning_curves": self.curves,
            "similarity": self.similarity,
            "timings": dict(self.timings),
            "truncated_prompts": self.encoder.truncated,
            "versions": report.versions(),
            "config": self.config,
        }
