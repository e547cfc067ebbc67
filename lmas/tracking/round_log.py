"""The one place that names the metrics a run logs (the tracker's keys).

=============================================  ==========  ==================================================
key                                            x-axis      what
=============================================  ==========  ==================================================
``train/<agent>/loss``                         step        training loss every ``train.log_every`` steps
``eval/<row>/<task>``                          round       the knowledge matrix's entry (agents, ``population``)
``cl/<row>/<metric>``                          round       avg_acc, forgetting, bwt, fwt, ... so far
``comm/messages``, ``comm/bytes``              round       everything sent in the round
``comm/<kind>/messages``, ``comm/<kind>/bytes``  round     per message kind (adapter, label_distribution, ...)
``transfer/<agent>/<event>_residual``          round       a merge's relative truncation error of ΔW (0 = exact)
``cascade/<task>/escalation_rate``             round       hierarchical topology: share of escalated examples
``similarity/<a>~<b>/weights|predictions``     round       inter-agent similarity (>= 2 knowing agents)
``library/units``, ``library/bytes``           round       the knowing agents' distinct LoRA updates, their size
``self_learning/accepted``                     round       the self-learning gate's decision
``self_learning/<task>/coverage|precision``    round       pseudo-labels kept, and their precision
=============================================  ==========  ==================================================

``cl/*`` is logged in a round whose row is complete for that row (``eval.schedule=minimal``: the last round only).
Per round it also logs the ``knowledge_table`` table, the ``knowledge_matrix`` heatmap image and each new
adapter version as an artifact (:mod:`lmas.tracking.lineage`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lmas.metrics.knowledge import KnowledgeMatrix
from lmas.population.messages import MessageLog
from lmas.population.population import Population
from lmas.tracking import lineage
from lmas.tracking.trackers import Tracker


class RoundLog:
    """Turns what a round produced into the tracker's metrics (module docstring)."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def train_loss(self, agent: str, step: int, loss: float) -> None:
        """One training-loss point at global ``step``."""
        self.tracker.log({f"train/{agent}/loss": loss}, "step", step)

    def round(
        self,
        r: int,
        matrix: KnowledgeMatrix,
        messages: MessageLog,
        events: list[dict],
        answers: dict[str, dict],
        similarity: dict[str, Any] | None,
    ) -> dict[str, float]:
        """Round ``r``'s metrics (matrix, CL metrics, communication, merges, cascade, similarity): logged and
        returned."""
        values = matrix.values()[r]  # (rows, tasks)
        metrics: dict[str, float] = {}
        for a, agent in enumerate(matrix.agents):
            for j, task in enumerate(matrix.tasks):
                if not math.isnan(values[a, j]):
                    metrics[f"eval/{agent}/{task}"] = float(values[a, j])
            for key, value in (matrix.summary(agent) if matrix.complete(agent) else {}).items():
                metrics[f"cl/{agent}/{key}"] = value
        comm = messages.round_summary(r)
        metrics["comm/messages"], metrics["comm/bytes"] = comm["messages"], comm["bytes"]
        for kind, c in comm["by_kind"].items():
            metrics[f"comm/{kind}/messages"], metrics[f"comm/{kind}/bytes"] = c["messages"], c["bytes"]
        for rec in events:
            if rec.get("round") == r and "residual" in rec:
                metrics[f"transfer/{rec['agent']}/{rec.get('event', 'transfer')}_residual"] = float(rec["residual"])
        for task, info in answers.items():
            if "escalation_rate" in info:
                metrics[f"cascade/{task}/escalation_rate"] = info["escalation_rate"]
        for kind in ("weights", "predictions"):
            for pair, value in (similarity or {}).get(kind, {}).items():
                if not math.isnan(value):
                    metrics[f"similarity/{pair}/{kind}"] = value
        self.tracker.log(metrics, "round", r)
        return metrics

    def library(self, r: int, lib: dict[str, int]) -> dict[str, int]:
        """The knowledge library's size after round ``r`` (:func:`lmas.transfer.consolidate.library`), logged."""
        self.tracker.log({f"library/{k}": v for k, v in lib.items()}, "round", r)
        return lib

    def self_learning(self, r: int, record: dict) -> None:
        """A self-learning cycle's decision and each task's pseudo-label coverage and precision."""
        metrics = {"self_learning/accepted": float(record["accepted"])}
        for name, stats in record["tasks"].items():
            for key in ("coverage", "precision"):
                if stats.get(key) is not None:
                    metrics[f"self_learning/{name}/{key}"] = stats[key]
        self.tracker.log(metrics, "round", r)

    def matrix(self, r: int, matrix: KnowledgeMatrix, heatmap: Path) -> None:
        """The round's knowledge table and the matrix's heatmap (written to ``heatmap``)."""
        values, trained = matrix.values()[r], set(matrix.trained())
        self.tracker.log_table(
            "knowledge_table",
            ["round", "agent", "task", "metric", "value", "trained"],
            [
                [r, agent, task, matrix.metrics[task], float(values[a, j]), (r, agent, task) in trained]
                for a, agent in enumerate(matrix.agents)
                for j, task in enumerate(matrix.tasks)
                if not math.isnan(values[a, j])
            ],
            r,
        )
        matrix.heatmap(heatmap)
        self.tracker.log_image("knowledge_matrix", heatmap, r)

    def versions(self, r: int, population: Population, folder: Path) -> None:
        """Save each adapter version made in round ``r`` (parents first) and log it as an artifact with its lineage."""
        histories = {n: a.history for n, a in population.agents.items()}
        for version in (v for v in lineage.versions(histories) if v.round == r):
            agent, label = version.agent, version.label
            parents = [lineage.ref(a, pr) for a, pr, _ in version.parents]
            path = folder / agent / f"round{r:03d}-{label}.safetensors"
            meta = {
                "agent": agent,
                "round": str(r),
                "base": population.of(agent).base.name,
                "task": label,
                "events": ",".join(e["event"] for e in version.events),
                "parents": ",".join(parents),
            }
            population.save_adapter(agent, path, metadata=meta)
            self.tracker.log_artifact(
                path, lineage.artifact_name(agent), "adapter", meta, aliases=[lineage.alias(r)], parents=parents
            )
