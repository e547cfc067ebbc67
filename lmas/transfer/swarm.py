"""Model Swarms as a transfer policy (``transfer=swarm``, :class:`SwarmInit`): before an agent trains a task, a
particle swarm over the adapters of agents that have learnt something searches weight space for the adapter that
does best on the new task's validation split (held out of train; never test), and the agent starts from the
swarm's global best — Model Swarms' use (Feng et al. 2024: experts adapted to one task's utility by swarm search).

The particles start at copies of the sources' adapters (the sources themselves are not moved); each position is
scored by writing it into the assigned agent's adapter. The update rule, the step decay and the first velocity are
:func:`lmas.population.search.swarm_search`'s, shared with the evolution step (``loop=evolution
loop.method=swarm``, which instead moves the agents themselves on the stream's fitness). Every source needs one
adapter of the assigned agent's shape (same rank and modules); the record has the fitness of every iteration.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from lmas.data.task import HIGHER_IS_BETTER, Task
from lmas.evaluation.scoring import evaluate
from lmas.lm.encoding import PromptEncoder
from lmas.population.search import SwarmOptions, swarm_search
from lmas.transfer.policy import FromRound

if TYPE_CHECKING:
    from lmas.population.population import Population

log = logging.getLogger(__name__)


class SwarmInit(FromRound):
    """Before round ``r >= start``, each assigned agent starts from the best adapter a swarm over ``sources``
    (default: every other agent that has learnt something; two or more) finds for its task's validation split.

    ``iterations``, ``inertia``, ``cognitive``, ``social``, ``repel``, ``step``, ``step_decay``, ``min_step``:
    :class:`lmas.population.search.SwarmOptions`.
    """

    name = "swarm"

    def __init__(self, sources: list[str] | None = None, start: int = 1, seed: int = 0, **swarm: Any) -> None:
        unknown = set(swarm) - set(SwarmOptions.__dataclass_fields__)
        if unknown:
            raise ValueError(f"transfer: unknown swarm options {sorted(unknown)}")
        self.sources, self.start, self.seed = sources, start, seed
        self.options = SwarmOptions(**swarm)
        self.options.check("transfer")

    def apply(
        self,
        population: Population,
        round_idx: int,
        assignments: Sequence[tuple[str, Task]] = (),
        encoder: PromptEncoder | None = None,
    ) -> list[dict]:
        if not self.due(round_idx):
            return []
        records = []
        for agent, task in assignments:
            sources = self.peers(population, agent)
            if len(sources) < 2:
                log.info("swarm round %d: %s starts fresh (%d source; the swarm needs two)", round_idx, agent,
                         len(sources))  # fmt: skip
                continue
            records.append(self.search(population, round_idx, agent, task, sources, encoder))
        return records

    def search(
        self, population: Population, r: int, agent: str, task: Task, sources: list[str], encoder: PromptEncoder | None
    ) -> dict:
        """One swarm for ``agent`` on ``task``; writes the global best into its trainable adapter."""
        if encoder is None:
            raise ValueError("transfer=swarm needs the loop's encoder")
        if not task.val:
            raise ValueError(f"transfer=swarm: task {task.name!r} has no validation split to search on")
        target = population.adapter_state(agent)
        shape = {k: tuple(t.shape) for k, t in target.items()}
        for s in sources:
            state = population.adapter_state(s)
            if len(population.agents[s].adapters) > 1 or {k: tuple(t.shape) for k, t in state.items()} != shape:
                raise ValueError(
                    f"transfer=swarm: source {s!r} needs one adapter of {agent!r}'s shape (same rank and modules)"
                )

        def fitness(name: str, state: dict[str, Tensor]) -> float:
            population.load_adapter_state(agent, state)
            population.activate(agent)
            score = evaluate(population.model, encoder, task, "val")
            return score if HIGHER_IS_BETTER[task.metric] else -score

        rng = random.Random(self.seed * 1_000_003 + r * 1_009 + population.names.index(agent))
        out = swarm_search({s: population.adapter_state(s) for s in sources}, fitness, self.options, rng)
        population.load_adapter_state(agent, out["g"])
        sign = 1.0 if HIGHER_IS_BETTER[task.metric] else -1.0
        log.info("swarm round %d: %s starts from the swarm's best on %s (val %s %.4f, from %s)", r, agent, task.name,
                 task.metric, sign * out["f_g"], out["owner"])  # fmt: skip
        return {
            "round": r,
            "transfer": self.name,
            "agent": agent,
            "task": task.name,
            "sources": sources,
            "val": sign * out["f_g"],
            "val_sources": {s: sign * v for s, v in out["start"].items()},  # each source's own adapter
            "iterations": [
                {**it, "fitness": {k: sign * v for k, v in it["fitness"].items()}, "best": sign * it["best"]}
                for it in out["trace"]
            ],  # fmt: skip
        }
