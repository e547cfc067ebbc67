"""The self-learning loop: new data → automatic labels → incremental training → knowledge fusion →
validation gate → model update, cycle after cycle.

The population has worker agents and one consolidated ``student``. Round 0 (the seed): every
worker trains on the first ``seed_labels`` labelled training examples of each task and the
student consolidates them. Each later round is a cycle: for every task, the next ``chunk``
training examples arrive *without their labels*; the workers label them (their label
distributions, fused; an example is kept when the workers agree, or when the fused top
probability reaches ``threshold``); the workers train on the kept pseudo-labels; the student
consolidates the workers' knowledge (``distill``: it trains on the pseudo-labels with a
distillation term from the workers; ``merge``: it becomes the exact sum of the workers'
updates, cut to its LoRA rank, with the relative residual in its ``merged`` event); finally a
validation gate compares the student's validation accuracy on every task with its value before
the cycle: if any task drops by more than ``tolerance``, the cycle is rejected and the whole
population is restored to its state before the cycle
(:meth:`SelfLearning.snapshot` / :meth:`SelfLearning.rollback`):

* every agent's adapter set: adapters added during the cycle (IncLoRA/O-LoRA task adapters) are
  deleted, adapters changed in shape or config are rebuilt, every weight is loaded back
  bit-identical, and each agent's adapter list (what is active, which one trains) is restored;
* the CL strategy's state (replay buffers, IncLoRA's task counts, ...), the allocation's state;
* each agent's history: the cycle's events are replaced by one ``rejected`` event (they are kept
  under its ``undone`` key), so the lineage shows the restored version coming from the previous one;
* the knowledge matrix marks training of a cycle only once it is accepted (a rejected cycle's
  training was undone: metrics treat the agents as not having trained in that round);
* the labelled pool only grows by accepted cycles.

What is *not* rolled back, because it happened: the messages the cycle sent (counted in
``communication``), its loss curves, the global step counter, and its ``assignments`` entry (what
was trained, accepted or not); ``self_learning[r]`` records the decision.

Withheld labels never enter a decision. They are read only for the logged precision. Every
validation split the loop uses (the gate, learning curves, the distillation term's ``val_acc``
teacher weights, a topology's validation scores) is the task's own val split, or, for a task
without one, the first ``min(eval.val_fallback, seed_labels)`` *seed-labelled* training examples
(the base loop would cut ``eval.val_fallback`` training examples, most of them withheld); like the
base loop's fallback, it overlaps the seed's training data. Options the cycle does not use
(``transfer``, a topology's exchange, an allocation other than ``Broadcast``) are refused by
:func:`lmas.config.validate`.

``loop=self_learning`` chooses this round body (``conf/loop/self_learning.yaml``; options ``loop.*``).

Workers and student train with the configured CL strategy (``strategy=``; the student adds the
distillation term to it). What a strategy may see of earlier tasks (``seen``, e.g. for
``strategy=joint``) is the *labelled pool*: the seed's true labels and the pseudo-labels of
accepted cycles — never the withheld labels.

Per cycle the loop logs (and ``results.json`` keeps under ``self_learning``) each task's
pseudo-label coverage and precision against the withheld true labels, the gate's values and the
decision; the knowledge matrix has one round per cycle. The cycles' records and the labelled pool live in
the run's state (``RunState.body``), so checkpoints and resume carry them.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch

from lmas.data.task import Example, Task
from lmas.distill.strategy import Distill
from lmas.loop import ContinualLoop, RoundBody
from lmas.population.events import Event
from lmas.population.fusion import FUSIONS, NEEDS_VAL, fuse
from lmas.population.messages import COORDINATOR, Message
from lmas.strategies.compose import Compose
from lmas.transfer.merge import merge_adapters

log = logging.getLogger(__name__)
LABELLING = ("agreement", "confidence")
CONSOLIDATION = ("distill", "merge")
GATE_EPS = 1e-6  # float32 rounding of accuracies, far below one example of any val split


class SelfLearning(RoundBody):
    """Self-learning cycles as the rounds of a :class:`~lmas.loop.ContinualLoop` (module docstring).

    Args:
        cycles: cycles after the labelled seed (round 0).
        seed_labels: labelled training examples per task in round 0.
        chunk: unlabelled training examples per task arriving in each cycle.
        labelling: ``agreement`` (all workers agree) | ``confidence`` (fused top probability >= ``threshold``).
        fusion: how the workers' label distributions are fused (uniform | confidence | best).
        consolidate: ``distill`` | ``merge``: how the student takes the workers' knowledge.
        tolerance: largest allowed drop of the student's validation accuracy on a task.
        student: the consolidated agent's name. distill: options of the consolidation's Distill term.
    """

    name = "self_learning"

    def __init__(
        self,
        cycles: int = 3,
        seed_labels: int = 16,
        chunk: int = 48,
        labelling: str = "agreement",
        threshold: float = 0.8,
        fusion: str = "uniform",
        consolidate: str = "distill",
        tolerance: float = 0.05,
        student: str = "student",
        distill: dict | None = None,
    ) -> None:
        if labelling not in LABELLING:
            raise ValueError(f"loop.labelling={labelling!r}: expected one of {LABELLING}")
        if consolidate not in CONSOLIDATION:
            raise ValueError(f"loop.consolidate={consolidate!r}: expected one of {CONSOLIDATION}")
        if fusion not in FUSIONS or fusion in NEEDS_VAL:
            raise ValueError(f"loop.fusion={fusion!r}: expected uniform, confidence or best")
        if cycles < 1 or seed_labels < 1 or chunk < 1 or tolerance < 0:
            raise ValueError("loop (self_learning): need cycles, seed_labels, chunk >= 1 and tolerance >= 0")
        self.cycles, self.seed_labels, self.chunk, self.labelling = cycles, seed_labels, chunk, labelling
        self.threshold, self.fusion, self.consolidate, self.tolerance = threshold, fusion, consolidate, tolerance
        self.student, self.distill = student, dict(distill or {})

    def bind(self, loop: ContinualLoop) -> list[list[int]]:
        if self.student not in loop.population.agents:
            raise ValueError(f"loop.student={self.student!r} is not an agent of the population {loop.population.names}")
        self.workers = [a for a in loop.population.names if a != self.student]
        if not self.workers:
            raise ValueError("loop=self_learning: the population needs at least one worker besides the student")
        bad = [t.name for t in loop.stream if t.kind != "classification"]
        if bad:
            raise ValueError(
                f"loop=self_learning: tasks {bad} are not classification tasks (pseudo-labels need label sets)"
            )
        self.loop = loop
        loop.evaluator.val_view = self._eval_view
        return [list(range(len(loop.stream)))] * (self.cycles + 1)

    # --- the record and the labelled pool, in the run's state -----------------------------------
    @property
    def records(self) -> list[dict]:
        """One record per cycle so far (results.json's ``self_learning``)."""
        return self.loop.state.body.setdefault("cycles", [])

    def pool(self, task: str) -> list[Example]:
        """The labelled examples held for ``task``: the seed and the accepted pseudo-labels."""
        return [Example(p, a) for p, a in self.loop.state.body.setdefault("pool", {}).get(task, [])]

    def add_to_pool(self, task: str, rows: list[Example]) -> None:
        self.loop.state.body.setdefault("pool", {}).setdefault(task, []).extend([ex.prompt, ex.answer] for ex in rows)

    def results(self, loop: ContinualLoop) -> dict:
        return {"self_learning": self.records}

    def learn(self, loop: ContinualLoop, r: int) -> None:
        loop.state.assignments.append([])
        self.cycle(r)

    def cycle(self, r: int) -> dict:
        """One cycle (round ``r``; round 0 is the labelled seed). Returns its record."""
        before = self.snapshot()
        gate_before = self._val_scores() if r > 0 else {}
        record: dict = {"cycle": r, "tasks": {}}
        pseudo_tasks, trained = [], []  # trained: (agent, task), marked in the matrix once accepted
        for j, task in enumerate(self.loop.stream.tasks):
            stats, ptask = self.label(r, task)
            record["tasks"][task.name] = stats
            if ptask is None:
                continue
            pseudo_tasks.append(ptask)
            if r == 0:  # the seed's true labels are held from the start
                self.add_to_pool(task.name, ptask.train)
            seen = [
                self._task(t, self.pool(t.name))
                for t in self.loop.stream.tasks
                if t.name != task.name and self.pool(t.name)
            ]
            for w in self.workers:
                self.loop.state.loss_curves[f"{w}/{task.name}/{r}"] = self.loop.fit(w, ptask, seen, r)
                trained.append((w, task.name))
                self.loop.state.assignments[r].append((w, j))
            if self.consolidate == "distill":
                teacher = Distill(teachers=self.workers, **self.distill)
                self.loop.state.loss_curves[f"{self.student}/{task.name}/{r}"] = self.loop.fit(
                    self.student, ptask, seen, r, strategy=Compose([self.loop.strategy, teacher])
                )
            trained.append((self.student, task.name))
        if self.consolidate == "merge" and pseudo_tasks:
            residual = merge_adapters(
                self.loop.population,
                self.workers,
                [1.0 / len(self.workers)] * len(self.workers),
                self.student,
                "exact",
                seed=self.loop.seed,
            )
            self.loop.population.agents[self.student].history.append(  # residual: cut to the student's rank
                {"round": r, "event": "merged", "sources": list(self.workers), "method": "exact", "residual": residual}
            )
        record.update(self.gate(r, gate_before, before))
        if record["accepted"]:
            for agent, task_name in trained:
                self.loop.state.matrix.mark_trained(r, agent, task_name)
            if r > 0:  # accepted pseudo-labels join the labelled pool
                for ptask in pseudo_tasks:
                    self.add_to_pool(ptask.name, ptask.train)
        self.records.append(record)
        self.loop.log.self_learning(r, record)
        return record

    # --- the steps -----------------------------------------------------------------------
    def label(self, r: int, task: Task) -> tuple[dict, Task | None]:
        """This cycle's training data of ``task``: the seed's true labels, or pseudo-labels."""
        seed = self.seed_labels
        if r == 0:
            rows = task.train[:seed]
            return {"arrived": len(rows), "kept": len(rows), "coverage": 1.0, "precision": 1.0}, self._task(task, rows)
        start = seed + (r - 1) * self.chunk
        rows = task.train[start : start + self.chunk]
        if not rows:
            log.warning("selflearn: task %s has no unlabelled examples left for cycle %d", task.name, r)
            return {"arrived": 0, "kept": 0, "coverage": None, "precision": None}, None
        labels = list(task.class_labels)
        lp = self.loop.scorer.label_logprobs(self.workers, [ex.prompt for ex in rows], labels)  # (A, N, L)
        for i, w in enumerate(self.workers):
            self.loop.state.messages.send(Message("label_distribution", w, COORDINATOR, r, lp[i].float()))
        fused = fuse(lp, self.fusion)  # (N, L)
        pred = fused.argmax(-1)
        if self.labelling == "agreement":
            votes = lp.argmax(-1)  # (A, N)
            keep = (votes == votes[0]).all(0)
        else:
            keep = fused.max(-1).values >= self.threshold
        gold = torch.tensor([labels.index(ex.answer) for ex in rows])  # withheld: only for the logs
        pseudo = [Example(ex.prompt, labels[int(p)]) for ex, p, k in zip(rows, pred, keep, strict=True) if k]
        for agent in self.loop.population.names:
            self.loop.state.messages.send(Message("pseudo_labels", COORDINATOR, agent, r, pseudo))
        kept = int(keep.sum())
        stats = {
            "arrived": len(rows),
            "kept": kept,
            "coverage": kept / len(rows),
            "precision": float((pred[keep] == gold[keep]).float().mean()) if kept else None,
            "precision_all": float((pred == gold).float().mean()),
        }
        log.info(
            "selflearn cycle %d, %s: %d/%d pseudo-labelled, precision %s",
            r,
            task.name,
            kept,
            len(rows),
            stats["precision"],
        )
        return stats, (self._task(task, pseudo) if pseudo else None)

    def _task(self, task: Task, rows: list[Example]) -> Task:
        """``task`` training on ``rows``, with a validation split of labelled examples only."""
        return dataclasses.replace(task, train=rows, val=self._labelled_val(task), pool=[])

    def _labelled_val(self, task: Task) -> list[Example]:
        """The task's val split, or (none) its first ``min(eval.val_fallback, seed_labels)`` seed-labelled
        training examples: never an example whose label is withheld (module docstring)."""
        return task.val or task.train[: min(self.loop.eval_cfg.val_fallback, self.seed_labels)]

    def _eval_view(self, task: Task) -> Task:
        """The evaluator's validation view, with the fallback val split cut from the seed-labelled examples only."""
        return task if task.val else self._task(task, task.train)

    def _val_scores(self) -> dict[str, float]:
        """The student's validation accuracy on every task."""
        return {
            t.name: self.loop.scorer.score(self.student, self._eval_view(t), "val", t.labels)
            for t in self.loop.stream.tasks
        }

    def gate(self, r: int, before: dict[str, float], snapshot: dict) -> dict:
        """Accept the cycle unless the student's validation accuracy on a task fell by > tolerance."""
        if r == 0:
            return {"accepted": True, "val_before": None, "val_after": self._val_scores()}
        after = self._val_scores()
        drops = {t: before[t] - after[t] for t in before}
        # accuracies are float32 means: a drop of exactly 2/20 reads 0.10000002, so allow rounding
        accepted = all(d <= self.tolerance + GATE_EPS for d in drops.values())
        if not accepted:
            self.rollback(snapshot, r)
            log.info("selflearn cycle %d rejected (val drops %s > %.3f): population restored", r, drops, self.tolerance)
        return {"accepted": accepted, "val_before": before, "val_after": after, "drops": drops}

    # --- the whole population's state, for the rollback of a rejected cycle ---------------------
    def snapshot(self) -> dict:
        """Everything a cycle changes that a rejection restores (module docstring): per agent its
        adapter names in order, each adapter's peft config and weights, its history length; the
        strategy's and the allocation's state."""
        model = self.loop.population.model
        agents = {}
        for name, agent in self.loop.population.agents.items():
            agents[name] = {
                "adapters": list(agent.adapters),
                "configs": {a: copy.deepcopy(model.peft_config[a]) for a in agent.adapters},
                "weights": {a: self.loop.population.adapter_state(name, a) for a in agent.adapters},
                "history": len(agent.history),
            }
        return {
            "agents": agents,
            "strategy": copy.deepcopy(self.loop.strategy.state_dict()),
            "allocation": copy.deepcopy(self.loop.allocation.state_dict()),
        }

    def rollback(self, snap: dict, r: int) -> None:
        """Restore :meth:`snapshot` after the rejected cycle ``r``."""
        pop, model = self.loop.population, self.loop.population.model
        for name in [n for n in pop.names if n not in snap["agents"]]:  # agents the cycle created
            pop.delete_agent(name)
        for name, state in snap["agents"].items():
            agent = pop.agents[name]
            for adapter in [a for a in agent.adapters if a not in state["adapters"]]:  # added in the cycle
                model.delete_adapter(adapter)
            for adapter in state["adapters"]:
                # the peft config fixes the weights' shapes (rank, modules): compare it, no weight copy
                same = adapter in model.peft_config and model.peft_config[adapter] == state["configs"][adapter]
                if not same:  # deleted or rebuilt in the cycle (e.g. another rank): build it again
                    if adapter in model.peft_config:
                        model.delete_adapter(adapter)
                    with torch.random.fork_rng():
                        model.add_adapter(adapter, copy.deepcopy(state["configs"][adapter]))
                pop.load_adapter_state(name, state["weights"][adapter], adapter)
            agent.adapters = list(state["adapters"])
            undone = agent.history[state["history"] :]
            del agent.history[state["history"] :]
            agent.history.append(
                Event(r, "rejected", details={"restored_to_round": r - 1, "undone": [e.to_dict() for e in undone]})
            )
        self.loop.strategy.load_state_dict(snap["strategy"])
        self.loop.strategy.restore_model(pop)
        self.loop.allocation.load_state_dict(snap["allocation"])
        pop.activate(pop.names[0])
