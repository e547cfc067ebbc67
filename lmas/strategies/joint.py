"""Joint training: the multitask upper bound on every task met so far."""

from __future__ import annotations

from lmas.data.task import Example, Task
from lmas.strategies.base import Strategy


class Joint(Strategy):
    """Train on the current task plus the train split of every task seen before it.

    With one adapter trained continuously this is "cumulative" joint training: each experience
    sees all the data of the tasks met so far (the current task first, then ``seen`` in order;
    the loader shuffles them together).
    """

    name = "joint"

    def train_examples(self, agent: str, task: Task, seen: list[Task]) -> list[tuple[Example, str]]:
        rows: list[tuple[Example, str]] = [(ex, task.kind) for ex in task.train]
        for old in seen:
            if old.name != task.name:
                rows.extend((ex, old.kind) for ex in old.train)
        return rows
