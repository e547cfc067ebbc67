"""General-ability probes: tasks scored after every round and never trained (``conf/probes/``).

Continual fine-tuning can erode what the base model knew before any task of the stream (TRACE's finding on
LLM continual learning). A probe measures it: its test split is scored for the untrained model and for every
agent after every round, beside the stream's tasks, and never enters training, replay or a validation view.
:meth:`lmas.metrics.knowledge.KnowledgeMatrix.summary` reports ``probe_acc`` (the final value, averaged over
the probes) and ``probe_forgetting`` (untrained minus final: positive = general ability lost), with item-level
intervals from the per-example records like every other metric. The packaged tasks (BBC topics, ChatterBot
categories, mathematics) serve as probes for the CL_Benchmark streams, which never train on them;
:meth:`lmas.data.stream.Stream.with_probes` refuses a probe that shares prompts with the stream.
"""

from __future__ import annotations

import dataclasses

from lmas.data.task import Task


def probes(tasks: list[Task] | None = None, max_test: int | None = None) -> list[Task]:
    """The probe tasks: each task with its test split cut to the first ``max_test`` examples (its train split
    stays, since a task needs one, but the loop never trains, replays or validates on a probe)."""
    out = []
    for task in tasks or []:
        if not isinstance(task, Task):
            raise TypeError(f"probes.tasks: expected tasks (each a task factory's _target_), got {type(task).__name__}")
        test = task.test[:max_test] if max_test is not None else list(task.test)
        out.append(dataclasses.replace(task, test=test, meta={**task.meta, "probe": True}))
    return out
