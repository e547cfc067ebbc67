"""The run's state: everything a run accumulates, in one object that checkpoints, resume and results.json use.

:class:`RunState` holds the knowledge matrix, the global step, the timings, what the allocation
assigned and what the topology answered per round, the transfer/exchange records, the learning and
loss curves, the similarity measurements, the knowledge library's size per round, the message counts,
the prompt-truncation counts and the round body's own record (e.g. self-learning's cycles and labelled
pool). :meth:`RunState.to_dict` is JSON-safe; :meth:`RunState.from_dict` rebuilds it exactly. The
checkpoint stores ``to_dict()`` next to the adapters, the strategy's and the allocation's state and the
random-number generators; results.json is built from the same fields (:meth:`RunState.results`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from lmas.metrics.knowledge import KnowledgeMatrix
from lmas.population.messages import MessageLog

Assignment = list[tuple[str, int]]  # (agent, task index) pairs of one round


@dataclass
class RunState:
    """What a run has done so far (module docstring)."""

    matrix: KnowledgeMatrix
    step: int = 0  # global optimisation step over all experiences (the W&B x-axis)
    timings: dict[str, float] = field(default_factory=lambda: {"train_s": 0.0, "eval_s": 0.0})
    assignments: list[Assignment] = field(default_factory=list)  # per round, as the allocation decided
    answers: list[dict[str, dict]] = field(default_factory=list)  # per round: task -> the topology's answer
    events: list[dict] = field(default_factory=list)  # transfer and exchange records
    curves: dict[str, list[list[float]]] = field(default_factory=dict)  # agent/task -> [[step, value], ...]
    loss_curves: dict[str, list[float]] = field(default_factory=dict)  # agent/task -> per-step training loss
    similarity: list[dict] = field(default_factory=list)  # per round with >= 2 knowing agents
    library: list[dict] = field(default_factory=list)  # per round: the knowing agents' units and bytes
    messages: MessageLog = field(default_factory=MessageLog)
    truncated: int = 0  # examples whose prompt was cut to max_length (the encoder counts them)
    body: dict[str, Any] = field(default_factory=dict)  # the round body's own record (JSON-safe)
    wall_before: float = 0.0  # wall seconds spent before a resume
    started: float = field(default_factory=time.perf_counter, compare=False)

    @contextmanager
    def timed(self, key: str) -> Iterator[None]:
        """Adds the wall time of the ``with`` block to ``timings[key]``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[key] += time.perf_counter() - t0

    def wall_s(self) -> float:
        """Wall time of the run: this process plus the processes before a resume."""
        return self.wall_before + time.perf_counter() - self.started

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe state (the checkpoint's ``run`` entry)."""
        return {
            "matrix": self.matrix.to_dict(),
            "step": self.step,
            "timings": dict(self.timings),
            "wall_s": self.wall_s(),
            "assignments": [[[a, j] for a, j in rnd] for rnd in self.assignments],
            "answers": self.answers,
            "events": self.events,
            "curves": self.curves,
            "loss_curves": self.loss_curves,
            "similarity": self.similarity,
            "library": self.library,
            "messages": self.messages.state_dict(),
            "truncated": self.truncated,
            "body": self.body,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunState:
        """The state :meth:`to_dict` wrote (a resumed run continues its wall clock from ``wall_s``)."""
        messages = MessageLog()
        messages.load_state_dict(d["messages"])
        return cls(
            matrix=KnowledgeMatrix.from_dict(d["matrix"]),
            step=int(d["step"]),
            timings=dict(d["timings"]),
            assignments=[[(a, int(j)) for a, j in rnd] for rnd in d["assignments"]],
            answers=list(d["answers"]),
            events=list(d["events"]),
            curves=dict(d["curves"]),
            loss_curves=dict(d["loss_curves"]),
            similarity=list(d.get("similarity", [])),
            library=list(d.get("library", [])),
            messages=messages,
            truncated=int(d["truncated"]),
            body=dict(d.get("body", {})),
            wall_before=float(d["wall_s"]),
        )

    def results(self, task_names: list[str], partial: bool = False) -> dict[str, Any]:
        """The run-state part of results.json (the loop adds the run's description around it)."""
        return {
            "assignments": [[[a, task_names[j]] for a, j in rnd] for rnd in self.assignments],
            "answers": self.answers,
            "communication": self.messages.to_list(self.matrix.n_rounds),
            "matrix": self.matrix.to_dict(),
            "metrics": self.matrix.summaries(partial),  # the one computation of the metrics (KnowledgeMatrix.summary)
            "loss_curves": self.loss_curves,
            "learning_curves": self.curves,
            "similarity": self.similarity,
            "library": self.library,
            "timings": dict(self.timings),
            "truncated_prompts": self.truncated,
        }
