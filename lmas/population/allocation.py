"""Task allocation: which tasks each round holds, and which agent trains each of them.

An allocation is asked twice: :meth:`Allocation.plan` splits the stream into rounds (task indices
per round, fixed before the run), and :meth:`Allocation.assign` maps each of a round's tasks to
agents when the round starts (a coordinator may measure the agents first).

* :class:`Broadcast` — every agent trains every task, one task per round (one agent: plain CL).
* :class:`RoundRobin` — a shared stream: round ``r`` holds task ``r``, trained by agent ``r mod N``.
* :class:`OwnStream` — each agent has its own sub-stream; round ``r`` trains every agent's ``r``-th task.
* :class:`Explicit` — the config lists, per round, which agent trains which task.
* :class:`Competence` — a coordinator splits the stream into rounds of ``tasks_per_round`` tasks and
  gives each task to the agent with the best measured competence: the mean log-likelihood per
  answer token of a few validation examples (higher = more competent).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

Assignment = list[tuple[str, int]]  # (agent, task index) pairs of one round
Competence_fn = Callable[[str, int], float]


def _check_names(what: str, names: Sequence[str], known: Sequence[str]) -> None:
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"allocation: unknown {what} {bad}; known: {list(known)}")


class Allocation:
    """Base: one task per round, in stream order, trained by every agent (:class:`Broadcast`)."""

    name = "broadcast"
    needs_competence = False

    def plan(self, tasks: Sequence[str], agents: Sequence[str]) -> list[list[int]]:
        """Task indices of every round."""
        return [[j] for j in range(len(tasks))]

    def assign(
        self, round_idx: int, tasks: Sequence[int], agents: Sequence[str], competence: Competence_fn | None = None
    ) -> Assignment:
        """The ``(agent, task index)`` pairs that train in round ``round_idx``, in training order."""
        return [(a, j) for j in tasks for a in agents]

    def round(
        self, round_idx: int, tasks: Sequence[int], agents: Sequence[str], competence: Competence_fn | None = None
    ) -> Assignment:
        """:meth:`assign`, checked: every pair names a known agent and a task of the round."""
        assignments = self.assign(round_idx, tasks, agents, competence)
        unknown = [(a, j) for a, j in assignments if a not in agents or j not in tasks]
        if unknown:
            raise ValueError(f"allocation: round {round_idx} assigned {unknown}, not (agent, task of the round)")
        return list(assignments)

    def state_dict(self) -> dict:
        """What a resumed run needs to continue allocating as before (JSON-safe)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""


class Broadcast(Allocation):
    """Every agent trains every task (the default; with one agent, plain continual learning)."""


class RoundRobin(Allocation):
    """A shared stream: task ``r`` in round ``r`` goes to agent ``(r + offset) mod N``."""

    name = "round_robin"

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset

    def assign(
        self, round_idx: int, tasks: Sequence[int], agents: Sequence[str], competence: Competence_fn | None = None
    ) -> Assignment:
        return [(agents[(round_idx + self.offset + i) % len(agents)], j) for i, j in enumerate(tasks)]


class OwnStream(Allocation):
    """Each agent learns its own sub-stream; round ``r`` trains every agent's ``r``-th task.

    Args:
        streams: agent -> its task names, in order; ``None`` deals the stream's tasks out in
            turn (task ``j`` to agent ``j mod N``).
    """

    name = "own_stream"

    def __init__(self, streams: dict[str, list[str]] | None = None) -> None:
        self.streams = streams
        self._rounds: list[Assignment] = []

    def plan(self, tasks: Sequence[str], agents: Sequence[str]) -> list[list[int]]:
        if self.streams is None:
            own = {a: [tasks[j] for j in range(i, len(tasks), len(agents))] for i, a in enumerate(agents)}
        else:
            own = {a: list(ts) for a, ts in self.streams.items()}
            _check_names("agents in `streams`", list(own), agents)
            _check_names("tasks in `streams`", [t for ts in own.values() for t in ts], tasks)
        n_rounds = max((len(ts) for ts in own.values()), default=0)
        self._rounds = [[(a, tasks.index(ts[r])) for a, ts in own.items() if r < len(ts)] for r in range(n_rounds)]
        return [sorted({j for _, j in pairs}) for pairs in self._rounds]

    def assign(
        self, round_idx: int, tasks: Sequence[int], agents: Sequence[str], competence: Competence_fn | None = None
    ) -> Assignment:
        return list(self._rounds[round_idx])


class Explicit(Allocation):
    """The config says who trains what: ``rounds[r] = {agent: task name or [task names]}``.

    A round may be empty (``{}``): nothing trains, but transfer and evaluation still happen.
    """

    name = "explicit"

    def __init__(self, rounds: list[dict[str, str | list[str]]]) -> None:
        if not rounds:
            raise ValueError("allocation.rounds: give at least one round")
        self.rounds = [{a: [t] if isinstance(t, str) else list(t) for a, t in (r or {}).items()} for r in rounds]
        self._rounds: list[Assignment] = []

    def plan(self, tasks: Sequence[str], agents: Sequence[str]) -> list[list[int]]:
        for r, rnd in enumerate(self.rounds):
            _check_names(f"agents in round {r}", list(rnd), agents)
            _check_names(f"tasks in round {r}", [t for ts in rnd.values() for t in ts], tasks)
        self._rounds = [[(a, tasks.index(t)) for a, ts in rnd.items() for t in ts] for rnd in self.rounds]
        return [sorted({j for _, j in pairs}) for pairs in self._rounds]

    def assign(
        self, round_idx: int, tasks: Sequence[int], agents: Sequence[str], competence: Competence_fn | None = None
    ) -> Assignment:
        return list(self._rounds[round_idx])


class Competence(Allocation):
    """A coordinator assigns each task to the most competent agent.

    Args:
        tasks_per_round: how many stream tasks each round holds.
        shots: validation examples per task on which each agent is measured.
        capacity: most tasks one agent trains in a round (``None``: ``ceil(tasks_per_round / N)``).

    Pairs are taken greedily by competence (ties: the agent that has trained fewer tasks so far,
    then population order), skipping agents at capacity.
    """

    name = "competence"
    needs_competence = True

    def __init__(self, tasks_per_round: int = 1, shots: int = 8, capacity: int | None = None) -> None:
        if tasks_per_round < 1 or shots < 1 or (capacity is not None and capacity < 1):
            raise ValueError("allocation: tasks_per_round, shots and capacity must be >= 1")
        self.tasks_per_round, self.shots, self.capacity = tasks_per_round, shots, capacity
        self.load: dict[str, int] = {}
        self.scores: list[dict[str, dict[int, float]]] = []  # per round: agent -> task -> competence

    def plan(self, tasks: Sequence[str], agents: Sequence[str]) -> list[list[int]]:
        k = self.tasks_per_round
        return [list(range(i, min(i + k, len(tasks)))) for i in range(0, len(tasks), k)]

    def assign(
        self, round_idx: int, tasks: Sequence[int], agents: Sequence[str], competence: Competence_fn | None = None
    ) -> Assignment:
        if competence is None:
            raise ValueError("Competence allocation needs a competence function from the loop")
        scores = {a: {j: competence(a, j) for j in tasks} for a in agents}
        self.scores.append(scores)
        cap = self.capacity or math.ceil(len(tasks) / len(agents))
        order = sorted(
            ((scores[a][j], a, j) for a in agents for j in tasks),
            key=lambda s: (-s[0], self.load.get(s[1], 0), agents.index(s[1])),
        )
        taken: dict[int, str] = {}
        used: dict[str, int] = {}
        for _, a, j in order:
            if j in taken or used.get(a, 0) >= cap:
                continue
            taken[j] = a
            used[a] = used.get(a, 0) + 1
        if len(taken) < len(tasks):
            raise ValueError(
                f"allocation.capacity={cap}: {len(agents)} agents cannot take the "
                f"{len(tasks)} tasks of round {round_idx}"
            )
        for a, n in used.items():
            self.load[a] = self.load.get(a, 0) + n
        return [(taken[j], j) for j in tasks]

    def state_dict(self) -> dict:
        return {"load": dict(self.load), "scores": self.scores}

    def load_state_dict(self, state: dict) -> None:
        self.load = {a: int(n) for a, n in state["load"].items()}
        self.scores = [
            {a: {int(j): float(v) for j, v in per.items()} for a, per in rnd.items()} for rnd in state["scores"]
        ]
