"""Streams: an ordered list of tasks and the scenario that says how they are scored."""

from __future__ import annotations

import copy
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
        split_seed: ``None`` (default) keeps every task's splits as built. An int draws each task's train and val
            splits anew with that seed from the examples its builder held out of the test split
            (:meth:`lmas.data.task.Task.resampled`; balanced over answers where the builder balanced them), at
            the same sizes, before the caps; the test splits never change. Study presets set it to ``${seed}``,
            so seeds resample the training data while every seed scores the same test items (paired
            comparisons). ``stream.meta["split_seed"]`` records it.
        probes: general-ability probe tasks (:meth:`with_probes`): scored after every round, never trained.
    """

    name: str
    tasks: list[Task]
    scenario: Scenario = "task"
    order: Literal["fixed", "shuffle"] = "fixed"
    seed: int = 0
    max_train: int | None = None
    max_eval: int | None = None
    split_seed: int | None = None
    meta: dict = field(default_factory=dict)
    probes: list[Task] = field(default_factory=list)

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
        if self.split_seed is not None:
            if not isinstance(self.split_seed, int) or isinstance(self.split_seed, bool):
                raise ValueError(
                    f"stream {self.name!r}: split_seed={self.split_seed!r}, expected null (no resampling) or an integer"
                )
            self.tasks = [t.resampled(self.split_seed) for t in self.tasks]
            self.meta = {**self.meta, "split_seed": self.split_seed}
        if self.max_train is not None or self.max_eval is not None:
            self.tasks = [t.limited(self.max_train, self.max_eval) for t in self.tasks]

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self):
        return iter(self.tasks)

    def __getitem__(self, i: int) -> Task:
        return self.tasks[i]

    def with_probes(self, probes: list[Task]) -> Stream:
        """This stream with ``probes`` as its general-ability probes (``conf/probes/``): tasks that are scored
        like the stream's after every round but never trained, so that forgetting of what the base model knew
        is measured (``probe_*`` metrics). A probe's name must differ from every task's, and no probe test
        prompt may be a training or test prompt of a stream task (a probe that is trained is no probe)."""
        names, seen = self.task_names, {ex.prompt for t in self.tasks for ex in t.train + t.test}
        for p in probes:
            if p.name in names or [q.name for q in probes].count(p.name) > 1:
                raise ValueError(f"probes: task name {p.name!r} is used twice (stream tasks: {names})")
            if not p.test:
                raise ValueError(f"probes: probe {p.name!r} has no test examples")
            shared = [ex.prompt for ex in p.test if ex.prompt in seen]
            if shared:
                raise ValueError(
                    f"probes: probe {p.name!r} shares {len(shared)} prompts with the stream's tasks (e.g. "
                    f"{shared[0][:60]!r}); probes must be tasks the stream never trains on"
                )
        out = copy.copy(self)  # no __post_init__: the tasks stay as they are (no second shuffle or resampling)
        out.probes = list(probes)
        return out

    @property
    def probe_names(self) -> list[str]:
        return [p.name for p in self.probes]

    @property
    def metrics(self) -> dict[str, str]:
        """Every scored task's metric: the stream's tasks in order, then its probes (the knowledge matrix's columns)."""
        return {t.name: t.metric for t in self.tasks + self.probes}

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
