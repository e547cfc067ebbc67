"""Transfer policies the continual loop calls between rounds: ``policy.apply(population, round_idx, ...)``.

* :class:`Transfer` — no transfer (``conf/transfer/none.yaml``).
* :class:`Merge` — on a schedule of rounds, merge agents' adapters into some agents (consensus
  merging, or pushing a merge into chosen agents).
* :class:`lmas.transfer.init.MergeInit` — before an agent trains a task, start its adapter from a merge of the
  other agents' adapters (initialising a new task's adapter from related agents; in ``init.py``).
* :class:`LoraHub` — before an agent trains a task, start its adapter from a LoraHub composition of
  other agents' adapters, with weights found on a few of the task's training examples.
* :class:`MergeMethods` — merge the same sources with several methods, each into a new agent
  ``merged_<method>`` (to compare merge methods on one set of adapters).

"Other agents" default to those that have learnt something (a non-empty history): a fresh
adapter is ``ΔW = 0`` and would only dilute a merge.

A source's knowledge is the sum of all its adapters (:func:`lmas.transfer.merge.agent_factors`).
What is written (:func:`lmas.transfer.merge.write_knowledge`): :class:`Merge` and
:class:`MergeMethods` *replace* the target's knowledge (its trainable adapter holds the merge, its
frozen task adapters are zeroed: a target that is also a source is not counted twice);
:class:`MergeInit` and :class:`LoraHub` *initialise* the agent's trainable adapter (its frozen
adapters, if any, stay; the agent is never one of its own sources). In a run, the trainable adapter
of an IncLoRA/O-LoRA agent that has trained is its last task's (the strategy adds the new one when
training starts), so the config check refuses those strategies with ``merge_init``/``lorahub``.

``apply`` returns one record (a plain dict) per adapter it wrote, for the logs; ``[]`` when idle.
Each record has ``residual``: the merge's relative truncation error of ``ΔW`` (0 = exact; the
largest over modules), logged as ``transfer/<agent>/<transfer>_residual``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypedDict

from lmas.data.task import Task
from lmas.lm.encoding import PromptEncoder
from lmas.population.messages import Message, MessageLog
from lmas.transfer.lorahub import lorahub_weights
from lmas.transfer.merge import (
    NEEDS_DENSITY,
    agent_factors,
    exact_merge,
    merge_adapters,
    write_knowledge,
)
from lmas.transfer.scales import checked_scales, merge_tuned

if TYPE_CHECKING:
    from lmas.population.population import Population


log = logging.getLogger(__name__)


class MergeOptions(TypedDict, total=False):
    """The :func:`~lmas.transfer.merge.merge_adapters` options of a merge transfer."""

    density: float | None
    majority_sign_method: str
    rank: int | None
    seed: int


class SearchOptions(TypedDict):
    """The :func:`~lmas.transfer.lorahub.lorahub_weights` options of the LoraHub search."""

    budget: int
    seed: int
    bounds: tuple[float, float]
    l1: float
    sigma0: float


def knowing_peers(population: Population, agent: str | None = None) -> list[str]:
    """Agents other than ``agent`` that have trained or received something."""
    return [n for n, a in population.agents.items() if n != agent and a.history]


class Transfer:
    """No transfer: ``apply`` does nothing."""

    name = "none"
    tasks: dict[str, Task] = {}  # the stream's tasks by name (:meth:`bind`)

    def bind(self, tasks: Sequence[Task]) -> None:
        """The stream's tasks (the loop binds them): the validation splits a tuned merge (``scales``) scores on."""
        self.tasks = {t.name: t for t in tasks}

    def peers(self, population: Population, agent: str) -> list[str]:
        """The sources of a transfer into ``agent``: its ``sources`` option without ``agent``, or (None) every other
        agent that has learnt something."""
        given = getattr(self, "sources", None)
        return [s for s in given if s != agent] if given else knowing_peers(population, agent)

    def learnt(self, population: Population, sources: Sequence[str]) -> list[Task]:
        """The stream's tasks that ``sources`` trained, in first-trained order: what their merge should serve."""
        names = [e.task for s in sources for e in population.agents[s].history if e.event == "trained"]
        return [self.tasks[n] for n in dict.fromkeys(names) if n in self.tasks]

    def due(self, round_idx: int) -> bool:
        return False

    def apply(
        self,
        population: Population,
        round_idx: int,
        assignments: Sequence[tuple[str, Task]] = (),
        encoder: PromptEncoder | None = None,
    ) -> list[dict]:
        """Transfer before round ``round_idx``; ``assignments``: the (agent, task) pairs about to train."""
        return []

    def run(
        self,
        population: Population,
        round_idx: int,
        assignments: Sequence[tuple[str, Task]],
        encoder: PromptEncoder | None,
        messages: MessageLog,
    ) -> list[dict]:
        """:meth:`apply`, each adapter it read from another agent counted as a message; returns the records with
        their event kind (the transfer's name)."""
        records = self.apply(population, round_idx, assignments, encoder)
        for rec in records:
            for src in rec.get("sources", []):
                if src != rec["agent"] and src in population.agents:
                    state = population.adapter_state(src)
                    messages.send(Message("adapter", src, rec["agent"], round_idx, state))
        return [{**rec, "event": rec.get("transfer", "transfer")} for rec in records]


class FromRound(Transfer):
    """A transfer into the agents about to train, in every round from ``start`` on (merge_init, swarm)."""

    start = 1

    def due(self, round_idx: int) -> bool:
        return round_idx >= self.start


class Merge(Transfer):
    """Merge ``sources`` into each of ``targets`` before rounds ``start, start + every, ...``.

    The merge is computed once (from the adapters as they are before any write) and given to
    every target, so the order of targets does not matter.
    """

    name = "merge"

    def __init__(
        self,
        method: str = "exact",
        sources: list[str] | None = None,
        weights: list[float] | None = None,
        targets: list[str] | None = None,
        start: int = 1,
        every: int = 1,
        density: float | None = None,
        majority_sign_method: str = "total",
        rank: int | None = None,
        seed: int = 0,
        scales: list[float] | None = None,
    ) -> None:
        if every < 1 or start < 0:
            raise ValueError(f"transfer: need every >= 1 and start >= 0, got every={every}, start={start}")
        self.method, self.sources, self.weights, self.targets = method, sources, weights, targets
        self.start, self.every = start, every
        self.options: MergeOptions = {
            "density": density,
            "majority_sign_method": majority_sign_method,
            "rank": rank,
            "seed": seed,
        }
        self.scales = checked_scales(scales)

    def due(self, round_idx: int) -> bool:
        return round_idx >= self.start and (round_idx - self.start) % self.every == 0

    def apply(
        self,
        population: Population,
        round_idx: int,
        assignments: Sequence[tuple[str, Task]] = (),
        encoder: PromptEncoder | None = None,
    ) -> list[dict]:
        if not self.due(round_idx):
            return []
        sources = list(self.sources or population.names)
        weights = list(self.weights) if self.weights is not None else [1.0 / len(sources)] * len(sources)
        targets, tuned = list(self.targets or sources), dict[str, Any]()
        if self.scales:  # λ·merge, λ tuned on the validation splits of the tasks the sources trained
            tasks = self.learnt(population, sources)
            first, tuned = merge_tuned(population, sources, weights, targets[0], self.method, tasks, encoder,
                                       self.scales, self.options)  # fmt: skip
        else:
            first = merge_adapters(population, sources, weights, targets[0], self.method, **self.options)
        residual = {targets[0]: first}
        for t in targets[1:]:  # copy the one merge (exact when the ranks agree)
            residual[t] = max(
                first, merge_adapters(population, [targets[0]], [1.0], t, "exact", seed=self.options["seed"])
            )
        return [
            {
                "round": round_idx,
                "transfer": self.name,
                "method": self.method,
                "agent": t,
                "sources": sources,
                "weights": weights,
                "residual": residual[t],
                **tuned,
            }
            for t in targets
        ]


class LoraHub(Transfer):
    """Before round ``r >= start``, each assigned agent starts from a LoraHub composition for its task.

    Weights are searched on the task's first ``shots`` training examples
    (:func:`lmas.transfer.lorahub.lorahub_weights`), with ``sources`` (default: every other agent
    that has learnt something)
    read before any agent is written (each source's whole update, all its adapters); the merge is
    exact, cut to the agent's rank, and written into the agent's trainable adapter.
    """

    name = "lorahub"

    def __init__(
        self,
        sources: list[str] | None = None,
        shots: int = 5,
        budget: int = 40,
        seed: int = 0,
        bounds: tuple[float, float] = (-1.5, 1.5),
        l1: float = 0.05,
        sigma0: float = 0.5,
        start: int = 1,
    ) -> None:
        if shots < 1:
            raise ValueError(f"transfer.shots={shots}: need at least one example")
        self.sources, self.shots, self.start = sources, shots, start
        lo, hi = bounds  # a list from a config
        self.search: SearchOptions = {"budget": budget, "seed": seed, "bounds": (lo, hi), "l1": l1, "sigma0": sigma0}

    def due(self, round_idx: int) -> bool:
        return round_idx >= self.start

    def apply(
        self,
        population: Population,
        round_idx: int,
        assignments: Sequence[tuple[str, Task]] = (),
        encoder: PromptEncoder | None = None,
    ) -> list[dict]:
        if not self.due(round_idx) or not assignments:
            return []
        if encoder is None:
            raise ValueError("transfer=lorahub needs the loop's encoder")
        plans = []
        for agent, task in assignments:
            sources = [s for s in self.sources if s != agent] if self.sources else knowing_peers(population, agent)
            if not sources:
                continue
            w = lorahub_weights(population, sources, task.train[: self.shots], task.kind, encoder, **self.search)
            plans.append((agent, task, sources, w))
        # each source read once, before any write (all plans merge the agents as they were)
        snapshot = {s: agent_factors(population, s) for s in dict.fromkeys(s for *_, srcs, _ in plans for s in srcs)}
        records = []
        for agent, task, sources, w in plans:
            factors, _ = exact_merge([snapshot[s] for s in sources], w)
            residual = write_knowledge(population, agent, factors, keep=0.0, frozen=1.0, seed=self.search["seed"])
            records.append(
                {
                    "round": round_idx,
                    "transfer": self.name,
                    "agent": agent,
                    "task": task.name,
                    "sources": sources,
                    "weights": w,
                    "residual": residual,
                }
            )
        return records


class MergeMethods(Transfer):
    """In round ``start``, merge ``sources`` with each of ``methods`` into a new agent ``merged_<method>``.

    Every merge reads the same source adapters, so the new agents compare the methods on one set
    of adapters. ``density`` applies to the pruning methods (ties, dare, magnitude_prune).
    """

    name = "merge_methods"

    def __init__(
        self,
        methods: list[str],
        sources: list[str] | None = None,
        weights: list[float] | None = None,
        start: int = 1,
        density: float = 0.5,
        majority_sign_method: str = "total",
        seed: int = 0,
        scales: list[float] | None = None,
    ) -> None:
        if not methods:
            raise ValueError("transfer.methods: give at least one merge method")
        self.methods, self.sources, self.weights, self.start = list(methods), sources, weights, start
        self.density, self.majority_sign_method, self.seed = density, majority_sign_method, seed
        self.scales = checked_scales(scales)

    def due(self, round_idx: int) -> bool:
        return round_idx == self.start

    def apply(
        self,
        population: Population,
        round_idx: int,
        assignments: Sequence[tuple[str, Task]] = (),
        encoder: PromptEncoder | None = None,
    ) -> list[dict]:
        if not self.due(round_idx):
            return []
        sources = list(self.sources) if self.sources else knowing_peers(population)
        weights = list(self.weights) if self.weights is not None else [1.0 / len(sources)] * len(sources)
        records, tasks = [], self.learnt(population, sources) if self.scales else []
        for method in self.methods:
            target = f"merged_{method}"
            density = self.density if method in NEEDS_DENSITY else None
            if method == "model_stock" and len(set(sources)) < 2:  # its ratio is the angle between two updates
                log.warning("merge_methods round %d: model_stock skipped: one source agent (%s)", round_idx, sources)
                continue
            start, tuned = time.perf_counter(), dict[str, Any]()
            options: MergeOptions = {"density": density, "majority_sign_method": self.majority_sign_method,
                                     "seed": self.seed}  # fmt: skip
            if self.scales:  # the merge's coefficient tuned on validation (merge_s then includes the tuning)
                residual, tuned = merge_tuned(population, sources, weights, target, method, tasks, encoder,
                                              self.scales, options)  # fmt: skip
            else:
                residual = merge_adapters(population, sources, weights, target, method, **options)
            records.append(
                {
                    "round": round_idx,
                    "transfer": self.name,
                    "method": method,
                    "agent": target,
                    "sources": sources,
                    "weights": weights,
                    "residual": residual,
                    "merge_s": time.perf_counter() - start,  # the merge's runtime (MergeBench reports it)
                    **tuned,
                }
            )
        return records
