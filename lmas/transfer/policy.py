"""Transfer policies the continual loop calls between rounds: ``policy.apply(population, round_idx, ...)``.

* :class:`Transfer` — no transfer (``conf/transfer/none.yaml``).
* :class:`Merge` — on a schedule of rounds, merge agents' adapters into some agents (consensus
  merging, or pushing a merge into chosen agents).
* :class:`LoraHub` — before an agent trains a task, start its adapter from a LoraHub composition of
  other agents' adapters, with weights found on a few of the task's training examples.

``apply`` returns one record (a plain dict) per adapter it wrote, for the logs; ``[]`` when idle.
"""

from __future__ import annotations

from typing import Sequence

from lmas.data.task import Task
from lmas.modules.lm import Encoder
from lmas.transfer.compose import lorahub_weights
from lmas.transfer.merge import exact_merge, merge_adapters, read_factors, write_factors


class Transfer:
    """No transfer: ``apply`` does nothing."""

    name = "none"

    def due(self, round_idx: int) -> bool:
        return False

    def apply(
        self,
        population,
        round_idx: int,
        assignments: Sequence[tuple[str, Task]] = (),
        encoder: Encoder | None = None,
    ) -> list[dict]:
        """Transfer before round ``round_idx``; ``assignments``: the (agent, task) pairs about to train."""
        return []


class Merge(Transfer):
    """Merge ``sources`` into each of ``targets`` before rounds ``start, start + every, ...``.

    The merge is computed once (from the adapters as they are before any write) and given to
    every target, so the order of targets does not matter.
    """

    name = "merge"

    def __init__(self, method: str = "exact", sources: list[str] | None = None, weights: list[float] | None = None,
                 targets: list[str] | None = None, start: int = 1, every: int = 1, density: float | None = None,
                 majority_sign_method: str = "total", rank: int | None = None, seed: int = 0) -> None:
        if every < 1 or start < 0:
            raise ValueError(f"transfer: need every >= 1 and start >= 0, got every={every}, start={start}")
        self.method, self.sources, self.weights, self.targets = method, sources, weights, targets
        self.start, self.every = start, every
        self.options = {"density": density, "majority_sign_method": majority_sign_method, "rank": rank, "seed": seed}

    def due(self, round_idx: int) -> bool:
        return round_idx >= self.start and (round_idx - self.start) % self.every == 0

    def apply(self, population, round_idx, assignments=(), encoder=None) -> list[dict]:
        if not self.due(round_idx):
            return []
        sources = list(self.sources or population.names)
        weights = list(self.weights) if self.weights is not None else [1.0 / len(sources)] * len(sources)
        targets = list(self.targets or sources)
        merge_adapters(population, sources, weights, targets[0], self.method, **self.options)
        for t in targets[1:]:  # copy the one merge (exact when the ranks agree)
            merge_adapters(population, [targets[0]], [1.0], t, "exact", seed=self.options["seed"])
        return [{"round": round_idx, "transfer": self.name, "method": self.method, "agent": t,
                 "sources": sources, "weights": weights} for t in targets]


class LoraHub(Transfer):
    """Before round ``r >= start``, each assigned agent starts from a LoraHub composition for its task.

    Weights are searched on the task's first ``shots`` training examples
    (:func:`lmas.transfer.compose.lorahub_weights`), with ``sources`` (default: every other agent)
    read before any agent is written; the merge is exact, cut to the agent's rank.
    """

    name = "lorahub"

    def __init__(self, sources: list[str] | None = None, shots: int = 5, budget: int = 40, seed: int = 0,
                 bounds: tuple[float, float] = (-1.5, 1.5), l1: float = 0.05, sigma0: float = 0.5,
                 start: int = 1) -> None:
        if shots < 1:
            raise ValueError(f"transfer.shots={shots}: need at least one example")
        self.sources, self.shots, self.start = sources, shots, start
        self.search = {"budget": budget, "seed": seed, "bounds": tuple(bounds), "l1": l1, "sigma0": sigma0}

    def due(self, round_idx: int) -> bool:
        return round_idx >= self.start

    def apply(self, population, round_idx, assignments=(), encoder=None) -> list[dict]:
        if not self.due(round_idx) or not assignments:
            return []
        if encoder is None:
            raise ValueError("transfer=lorahub needs the loop's encoder")
        plans = []
        for agent, task in assignments:
            sources = [s for s in (self.sources or population.names) if s != agent]
            if not sources:
                continue
            w = lorahub_weights(population, sources, task.train[: self.shots], task.kind, encoder, **self.search)
            plans.append((agent, task, sources, w))
        snapshot = {s: read_factors(population, s) for _, _, sources, _ in plans for s in sources}
        records = []
        for agent, task, sources, w in plans:
            factors, _ = exact_merge([snapshot[s] for s in sources], w)
            write_factors(population, agent, factors, self.search["seed"])
            records.append({"round": round_idx, "transfer": self.name, "agent": agent, "task": task.name,
                            "sources": sources, "weights": w})
        return records
