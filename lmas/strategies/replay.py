"""Experience replay: a per-agent memory of earlier tasks' examples mixed into each new task.

The memories are plain objects (no torch, no Lightning) so their sampling behaviour can be
tested alone:

* :class:`ReservoirBuffer` — classic reservoir sampling (Vitter's algorithm R): after ``n``
  offered items every one of them is in the buffer with probability ``capacity / n``. Avalanche's
  ``ReservoirSamplingBuffer`` reaches the same distribution with random sort keys.
* :class:`TaskBalancedBuffer` — capacity split equally over the tasks seen so far, each share a
  reservoir, re-balanced when a task arrives (Avalanche's ``ExperienceBalancedBuffer`` with
  ``adaptive_size=True``: ``capacity // n_tasks`` each, the remainder going one by one to the
  oldest tasks).

Items are ``(Example, kind)`` pairs; ``state_dict`` is JSON-safe (an example is ``[prompt, answer]``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from lmas.data.task import Example, Task
from lmas.strategies.base import Strategy

if TYPE_CHECKING:
    from lmas.training.experience import IncrementalLM

Item = tuple[Example, str]


def item_to_json(item: Item) -> list:
    ex, kind = item
    return [[ex.prompt, ex.answer], kind]


def item_from_json(row: Sequence) -> Item:
    (prompt, answer), kind = row
    return Example(prompt, answer), kind


def rng_to_json(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def rng_from_json(state: Sequence) -> random.Random:
    rng = random.Random()
    version, internal, gauss = state
    rng.setstate((version, tuple(internal), gauss))
    return rng


def balanced_shares(capacity: int, n_groups: int) -> list[int]:
    """``capacity`` split over ``n_groups``: ``capacity // n`` each, the remainder to the first groups.

    The same split as Avalanche's ``BalancedExemplarsBuffer.get_group_lengths`` (adaptive size).
    """
    if n_groups <= 0:
        return []
    shares = [capacity // n_groups] * n_groups
    for i in range(capacity - sum(shares)):
        shares[i] += 1
    return shares


class ReservoirBuffer:
    """A uniform random sample of at most ``capacity`` of all items ever offered.

    Algorithm R: the ``n``-th offered item is kept with probability ``capacity / n`` and then
    replaces a uniformly chosen slot, so every offered item is kept with the same probability.
    The task name passed to :meth:`add` is ignored (the buffer does not balance tasks).
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 0:
            raise ValueError(f"replay capacity={capacity}: must be >= 0")
        self.capacity = capacity
        self.seen = 0  # items offered so far
        self._items: list[Item] = []
        self._rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, items: Sequence[Item], task_name: str | None = None) -> None:
        for item in items:
            self.seen += 1
            if len(self._items) < self.capacity:
                self._items.append(item)
            else:
                j = self._rng.randrange(self.seen)  # uniform in [0, seen)
                if j < self.capacity:
                    self._items[j] = item

    def shrink(self, capacity: int) -> None:
        """Lower the capacity, dropping a uniform random subset (the rest stays a uniform sample)."""
        self.capacity = capacity
        if len(self._items) > capacity:
            keep = sorted(self._rng.sample(range(len(self._items)), capacity))
            self._items = [self._items[i] for i in keep]

    def items(self) -> list[Item]:
        return list(self._items)

    def sample(self, n: int, rng: random.Random) -> list[Item]:
        """``min(n, len(self))`` distinct items, drawn without replacement with ``rng``."""
        return rng.sample(self._items, min(max(n, 0), len(self._items)))

    def state_dict(self) -> dict:
        return {
            "capacity": self.capacity,
            "seen": self.seen,
            "items": [item_to_json(it) for it in self._items],
            "rng": rng_to_json(self._rng),
        }

    def load_state_dict(self, state: dict) -> None:
        self.capacity = int(state["capacity"])
        self.seen = int(state["seen"])
        self._items = [item_from_json(row) for row in state["items"]]
        self._rng = rng_from_json(state["rng"])


class TaskBalancedBuffer:
    """Capacity shared equally by the tasks seen so far, each share a :class:`ReservoirBuffer`.

    When a new task arrives the shares are recomputed with :func:`balanced_shares` (tasks in
    arrival order) and the older shares shrink by dropping a uniform random subset. Adding a task
    that is already in the buffer continues that task's reservoir.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 0:
            raise ValueError(f"replay capacity={capacity}: must be >= 0")
        self.capacity = capacity
        self.seed = seed
        self.groups: dict[str, ReservoirBuffer] = {}

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups.values())

    def add(self, items: Sequence[Item], task_name: str) -> None:
        if task_name not in self.groups:
            self.groups[task_name] = ReservoirBuffer(0, seed=self.seed * 1_000_003 + len(self.groups))
        shares = balanced_shares(self.capacity, len(self.groups))
        for share, (name, group) in zip(shares, self.groups.items(), strict=True):
            group.shrink(share)  # also sets the share as the group's capacity
            if name == task_name:
                group.add(items)

    def sizes(self) -> dict[str, int]:
        return {name: len(g) for name, g in self.groups.items()}

    def items(self) -> list[Item]:
        return [it for g in self.groups.values() for it in g.items()]

    def sample(self, n: int, rng: random.Random) -> list[Item]:
        """``min(n, len(self))`` distinct items, uniformly over the whole buffer."""
        pool = self.items()
        return rng.sample(pool, min(max(n, 0), len(pool)))

    def state_dict(self) -> dict:
        return {
            "capacity": self.capacity,
            "seed": self.seed,
            "groups": [[name, g.state_dict()] for name, g in self.groups.items()],
        }

    def load_state_dict(self, state: dict) -> None:
        self.capacity = int(state["capacity"])
        self.seed = int(state["seed"])
        self.groups = {}
        for name, group_state in state["groups"]:
            group = ReservoirBuffer(0)
            group.load_state_dict(group_state)
            self.groups[name] = group


BUFFERS: dict[str, type[ReservoirBuffer | TaskBalancedBuffer]] = {
    "reservoir": ReservoirBuffer,
    "task_balanced": TaskBalancedBuffer,
}


def make_buffer(kind: str, capacity: int, seed: int) -> ReservoirBuffer | TaskBalancedBuffer:
    if kind not in BUFFERS:
        raise ValueError(f"replay buffer={kind!r}: expected one of {sorted(BUFFERS)}")
    return BUFFERS[kind](capacity, seed)


class Replay(Strategy):
    """Experience replay: train on the new task plus a sample of the agent's memory.

    Args:
        buffer: ``task_balanced`` (equal share per task) or ``reservoir`` (uniform over all items).
        capacity: items kept per agent.
        replay_ratio: replayed items per new training item (``round(ratio * len(task.train))``),
            capped by what the buffer holds.
        seed: seeds the buffers and the per-experience sample (mixed with the agent name and the
            number of tasks the agent has trained, so a resumed run draws the same sample).
    """

    name = "replay"

    def __init__(
        self,
        buffer: Literal["reservoir", "task_balanced"] = "task_balanced",
        capacity: int = 200,
        replay_ratio: float = 1.0,
        seed: int = 0,
    ) -> None:
        if buffer not in BUFFERS:
            raise ValueError(f"replay buffer={buffer!r}: expected one of {sorted(BUFFERS)}")
        if capacity < 0:
            raise ValueError(f"replay capacity={capacity}: must be >= 0")
        if replay_ratio < 0:
            raise ValueError(f"replay replay_ratio={replay_ratio}: must be >= 0")
        self.buffer_kind = buffer
        self.capacity = capacity
        self.replay_ratio = replay_ratio
        self.seed = seed
        self.buffers: dict[str, ReservoirBuffer | TaskBalancedBuffer] = {}
        self.trained: dict[str, int] = {}  # tasks each agent has added to its buffer

    def buffer_of(self, agent: str) -> ReservoirBuffer | TaskBalancedBuffer:
        if agent not in self.buffers:
            agent_seed = self.seed * 1_000_003 + sum(map(ord, agent)) * 7919
            self.buffers[agent] = make_buffer(self.buffer_kind, self.capacity, agent_seed)
        return self.buffers[agent]

    def replayed(self, agent: str, n_new: int) -> list[Item]:
        """The memory sample that joins ``n_new`` new items in this agent's next experience."""
        buffer = self.buffers.get(agent)
        if buffer is None or len(buffer) == 0:
            return []
        rng = random.Random(f"{self.seed}/{agent}/{self.trained.get(agent, 0)}")
        return buffer.sample(round(self.replay_ratio * n_new), rng)

    def train_examples(self, agent: str, task: Task, seen: list[Task]) -> list[Item]:
        new = [(ex, task.kind) for ex in task.train]
        return new + self.replayed(agent, len(new))

    def after_task(self, module: IncrementalLM, task: Task) -> None:
        agent = module.agent
        self.buffer_of(agent).add([(ex, task.kind) for ex in task.train], task.name)
        self.trained[agent] = self.trained.get(agent, 0) + 1

    def state_dict(self) -> dict:
        return {"buffers": {a: b.state_dict() for a, b in self.buffers.items()}, "trained": dict(self.trained)}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {}
        for agent, buffer_state in state["buffers"].items():
            buffer = make_buffer(self.buffer_kind, self.capacity, 0)
            buffer.load_state_dict(buffer_state)
            self.buffers[agent] = buffer
        self.trained = {a: int(n) for a, n in state["trained"].items()}
