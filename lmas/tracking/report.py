"""Run outputs on disk: results.json, the knowledge matrix as CSV and PNG, report.html, the final table."""

from __future__ import annotations

import json
import logging
import math
import os
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmas.loop import ContinualLoop
    from lmas.metrics.knowledge import KnowledgeMatrix

log = logging.getLogger(__name__)

PACKAGES = ("lmas", "torch", "transformers", "peft", "lightning", "hydra-core", "wandb", "avalanche-lib")


def versions() -> dict[str, str]:
    """Installed versions of the packages that shape a result."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def results(loop: ContinualLoop, partial: bool = False) -> dict[str, Any]:
    """results.json of a run so far: what ran (stream, tasks, agents' histories, the population's parts, the
    strategy, the seed), the run's state (:meth:`lmas.state.RunState.results`), the round body's own entries,
    the package versions and the config."""
    run = loop.state.results(loop.stream.task_names, partial)
    pop = {"allocation": loop.allocation.name, "topology": loop.topology.describe(), "transfer": loop.transfer.name}
    pop.update({k: run.pop(k) for k in ("assignments", "answers", "communication")})
    return {
        "complete": not partial, "stream": loop.stream.name, "scenario": loop.stream.scenario,
        "tasks": [t.describe() for t in loop.stream.tasks],
        "agents": {n: {"base": loop.population.of(n).base.name, "history": a.history.to_list()}
                   for n, a in loop.population.agents.items()},
        "population": pop, "strategy": loop.strategy.name, "seed": loop.seed, **run, **loop.body.results(loop),
        "versions": versions(), "config": loop.config,
    }  # fmt: skip


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: str | Path, data: dict) -> Path:
    """Write JSON atomically (a temp file renamed into place): readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_json_safe(data), indent=2, sort_keys=False, default=str))
    tmp.replace(path)
    return path


def metrics_table(results: dict) -> str:
    """A plain-text table of the per-agent continual-learning metrics."""
    rows = results["metrics"]
    keys: list[str] = []
    for summary in rows.values():
        keys += [k for k in summary if k not in keys]
    head = ["agent"] + keys
    body = [[agent] + [f"{summary[k]:.4f}" if k in summary else "-" for k in keys] for agent, summary in rows.items()]
    widths = [max(len(str(r[i])) for r in [head] + body) for i in range(len(head))]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join(fmt.format(*r) for r in [head] + body)


def write_run(run_dir: str | Path, results: dict, matrix: KnowledgeMatrix) -> dict[str, Path]:
    """Write the final results.json, knowledge_matrix.csv, knowledge_matrix.png and report.html.

    The report (:mod:`lmas.tracking.html_report`) is a convenience: if drawing it fails, the run's
    results stand, a warning says why, and ``python -m lmas.tracking.html_report <run dir>`` retries.
    """
    from lmas.tracking import html_report

    run_dir = Path(run_dir)
    paths = {
        "results": write_json(run_dir / "results.json", results),
        "csv": run_dir / "knowledge_matrix.csv",
        "heatmap": run_dir / "knowledge_matrix.png",
    }
    matrix.to_csv(paths["csv"])
    matrix.heatmap(paths["heatmap"])
    try:
        paths["report"] = html_report.write_report(run_dir)  # from the results.json just written
    except Exception as err:  # never lose a finished run to a plotting problem
        log.warning(
            "report.html not written (%s: %s); retry with `python -m lmas.tracking.html_report %s`",
            type(err).__name__,
            err,
            run_dir,
        )
    return paths
