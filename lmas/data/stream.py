"""Streams: an ordered list of tasks and the scenario that says how they are scored."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

from lmas.data.task import Task

Scenario = Literal["task", "class", "domain"]
SCENARIOS = ("task", "class", "domain")


@dataclass
class Stream:
    """An ordered list of tasks.

    Args:
        name: stream name, stored in results (``lmas-compare`` refuses to mix streams).
        tasks: the tasks; their order is the training order unless ``order="shuffle"``.
        scenario: ``task`` (each task is scored over its own labels), ``class`` (classification
            tasks are scored over the union of labels of every task seen so far: class-incremental),
            ``domain`` (same label set, new input distribution; scored like ``task``).
        order: ``fixed`` keeps the given order; ``shuffle`` permutes it with ``seed``.
        seed: seed of the task order when ``order="shuffle"``.
        max_train, max_eval: caps on every task's train and val/test sizes (for fast runs).
    """

    name: str
    tasks: list[Task]
    scenario: Scenario = "task"
    order: Literal["fixed", "shuffle"] = "fixed"
    seed: int = 0
    max_train: int | None = None
    max_eval: int | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tasks = list(self.tasks)
        if not self.tasks:
            raise ValueError(f"stream {self.name!r}: `tasks` is empty; a stream needs at least one task")
        if self.scenario not in SCENARIOS:
            raise ValueError(f"stream {self.name!r}: scenario={self.scenario!r}, expected one of {SCENARIOS}")
        if self.order not in ("fixed", "shuffle"):
            raise ValueError(f"stream {self.name!r}: order={self.order!r}, expected 'fixed' or 'shuffle'")
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"stream {self.name!r}: task names must be unique, repeated: {dup}")
        if self.order == "shuffle":
            random.Random(self.seed).shuffle(self.tasks)
        if self.max_train is not None or self.max_eval is not None:
            self.tasks = [t.limited(self.max_train, self.max_eval) for t in self.tasks]

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self):
        return iter(self.tasks)

    def __getitem__(self, i: int) -> Task:
        return self.tasks[i]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def index(self, name: str) -> int:
        return self.task_names.index(name)

    def label_space(self, j: int, seen: int) -> list[str] | None:
        """Labels that task ``j`` is scored over when tasks ``0..seen`` have been met.

        ``task``/``domain`` scenarios: the task's own labels. ``class`` scenario: the union, in
        stream order, of the labels of tasks ``0..max(seen, j)`` (so a task evaluated before it
        is trained, for forward transfer, includes its own labels).
        """
        task = self.tasks[j]
        if task.kind != "classification":
            return None
        if self.scenario != "class":
            return list(task.class_labels)
        labels: list[str] = []
        for t in self.tasks[: max(seen, j) + 1]:
            for lab in t.labels or []:
                if lab not in labels:
                    labels.append(lab)
        return labels
