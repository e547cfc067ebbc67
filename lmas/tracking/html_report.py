"""A self-contained HTML report of one run, for users without W&B: ``<run_dir>/report.html``.

Everything is read from ``results.json`` (so it works for old and for unfinished runs) and every
picture is embedded as a base64 PNG: the knowledge-matrix heatmap, each agent's metric per task
over rounds, average accuracy / forgetting / BWT / FWT over time, the adapter lineage graph,
inter-agent similarity over time and communication per round (when the run has them), and the
training loss. With the run's per-example records (``per_example/*.npz``) it also draws each agent's
metrics with 95% confidence intervals over test items (:func:`lmas.metrics.stats.item_intervals`);
a run without records (made before them) says so there. ``lmas-train`` writes it at the end of every
run; for any run dir:

    python -m lmas.tracking.html_report outputs/runs/2026-11-29_10-00-00
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

from lmas.metrics.knowledge import KnowledgeMatrix
from lmas.tracking import lineage

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

REPORT = "report.html"
OVER_TIME = ("avg_acc", "forgetting", "bwt", "fwt")
CI_KEYS = ("avg_acc", "forgetting", "bwt", "fwt", "plasticity")
CI_TITLE = "Metrics with 95% confidence intervals over test items"


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure  # a bare Figure: Agg, no pyplot state

    return Figure(figsize=(width, height), dpi=100)


def _integer_ticks(ax: Axes) -> None:
    """Only whole numbers (rounds) on the x axis."""
    cast("MaxNLocator", ax.xaxis.get_major_locator()).set_params(integer=True)  # the default AutoLocator is one


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def matrix_of(results: dict) -> KnowledgeMatrix:
    return KnowledgeMatrix.from_dict(results["matrix"])


def metrics_over_time(matrix: KnowledgeMatrix) -> dict[str, list[dict[str, float]]]:
    """``{agent: [summary at the end of round 0, 1, ...]}`` (an empty dict where unknown)."""
    out: dict[str, list[dict[str, float]]] = {}
    for agent in matrix.agents:
        rows = []
        for r in range(matrix.n_rounds):
            try:
                rows.append(matrix.until(r).summary(agent))
            except ValueError:  # a value the metric needs was not evaluated in that round
                rows.append({})
        out[agent] = rows
    return out


def plot_task_curves(ax: Axes, matrix: KnowledgeMatrix, agent: str) -> None:
    """``agent``'s metric on every task over rounds (x = -1: untrained); filled markers: trained then."""
    a = matrix.agents.index(agent)
    values, initial = matrix.values(), matrix.initial()
    xs = [-1] + list(range(matrix.n_rounds))
    trained = {(r, t) for r, _, t in matrix.trained(agent)}
    for j, task in enumerate(matrix.tasks):
        ys = [initial[a, j]] + [values[r, a, j] for r in range(matrix.n_rounds)]
        (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=f"{task} ({matrix.metrics[task]})")
        hits = [(r, values[r, a, j]) for r in range(matrix.n_rounds) if (r, task) in trained]
        if hits:
            rounds, scores = zip(*hits, strict=True)
            ax.scatter(rounds, scores, s=60, color=line.get_color(), edgecolors="black", zorder=3)
    ax.set_xticks(xs)
    ax.set_xticklabels(["init"] + [str(r) for r in xs[1:]], fontsize=7)
    ax.set_xlabel("round", fontsize=8)
    ax.set_title(agent, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def plot_over_time(ax: Axes, over_time: dict[str, list[dict[str, float]]], key: str) -> bool:
    """One line per agent of ``key`` (avg_acc, forgetting, bwt, fwt, ...) at the end of each round."""
    import matplotlib

    palette = matplotlib.colormaps["tab10"]
    drawn = False
    for i, (agent, rows) in enumerate(over_time.items()):  # one colour per agent in every panel
        pts = [(r, row[key]) for r, row in enumerate(rows) if key in row and row[key] is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", markersize=3, label=agent, color=palette(i % 10))
            drawn = True
    ax.set_title(key, fontsize=9)
    ax.set_xlabel("round", fontsize=8)
    _integer_ticks(ax)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    return drawn


SIMILARITY_TITLES = {
    "weights": "cosine similarity of adapter updates ΔW",
    "predictions": "prediction agreement on the probe set",
}
MAX_PAIR_LINES = 10  # more agent pairs than this: the last round as an agent x agent matrix


def plot_similarity(ax: Axes, similarity: list[dict], kind: str) -> bool:
    """``kind`` (``weights``: cosine of ΔW, ``predictions``: agreement) of every agent pair: one line
    per pair over rounds, or, with more than :data:`MAX_PAIR_LINES` pairs, the last round's matrix."""
    series: dict[str, list[tuple[int, float]]] = {}
    for entry in similarity:
        for pair, value in (entry.get(kind) or {}).items():
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                series.setdefault(pair, []).append((entry["round"], value))
    title = SIMILARITY_TITLES.get(kind, kind)
    if len(series) > MAX_PAIR_LINES:
        last = next(e for e in reversed(similarity) if e.get(kind))
        agents: list[str] = []
        for pair in last[kind]:
            for a in pair.split("~", 1):
                if a not in agents:
                    agents.append(a)
        grid = np.full((len(agents), len(agents)), np.nan)
        np.fill_diagonal(grid, 1.0)
        for pair, value in last[kind].items():
            a, b = pair.split("~", 1)
            if value is not None:
                grid[agents.index(a), agents.index(b)] = grid[agents.index(b), agents.index(a)] = value
        im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=-1.0 if kind == "weights" else 0.0, vmax=1.0)
        ax.set_xticks(range(len(agents)))
        ax.set_xticklabels(agents, rotation=60, ha="right", fontsize=6)
        ax.set_yticks(range(len(agents)))
        ax.set_yticklabels(agents, fontsize=6)
        ax.figure.colorbar(im, ax=ax, fraction=0.046)
        ax.set_title(f"{title}, round {last['round']}", fontsize=9)
        return True
    for pair, pts in series.items():
        ax.plot(*zip(*pts, strict=True), marker="o", markersize=3, label=pair)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("round", fontsize=8)
    _integer_ticks(ax)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7)
    return bool(series)


def _heatmap(matrix: KnowledgeMatrix) -> bytes:
    buf = io.BytesIO()
    matrix.heatmap(buf)
    return buf.getvalue()


def figures(results: dict) -> dict[str, bytes]:
    """The report's pictures as PNG bytes, by title (only those the run has data for)."""
    matrix = matrix_of(results)
    out: dict[str, bytes] = {"Knowledge matrix": _heatmap(matrix)}
    agents = [
        a
        for a in matrix.agents
        if matrix.trained(a) or any(not math.isnan(v) for v in matrix.values()[:, matrix.agents.index(a), :].ravel())
    ]
    if agents and matrix.n_rounds:
        cols = min(3, len(agents))
        rows = math.ceil(len(agents) / cols)
        fig = _figure(4.6 * cols, 3.2 * rows)
        for i, agent in enumerate(agents):
            plot_task_curves(fig.add_subplot(rows, cols, i + 1), matrix, agent)
        fig.tight_layout()
        out["Metric per task over rounds"] = _png(fig)
        over = metrics_over_time(matrix)
        fig = _figure(4.2 * len(OVER_TIME), 3.2)
        any_drawn = [
            plot_over_time(fig.add_subplot(1, len(OVER_TIME), i + 1), over, k) for i, k in enumerate(OVER_TIME)
        ]
        fig.tight_layout()
        if any(any_drawn):
            out["Average accuracy, forgetting, BWT and FWT over time"] = _png(fig)
    histories = {a: info.get("history", []) for a, info in results.get("agents", {}).items()}
    buf = io.BytesIO()
    if lineage.draw(histories, buf):
        out["Adapter lineage"] = buf.getvalue()
    similarity = results.get("similarity") or []
    if similarity:
        n_pairs = max(len(e.get("weights") or {}) for e in similarity)
        fig = _figure(10, 3.4) if n_pairs <= MAX_PAIR_LINES else _figure(12, 5.5)
        drawn = [
            plot_similarity(fig.add_subplot(1, 2, i + 1), similarity, k)
            for i, k in enumerate(("weights", "predictions"))
        ]
        fig.tight_layout()
        if any(drawn):
            out["Inter-agent similarity over time"] = _png(fig)
    comm = (results.get("population") or {}).get("communication") or []
    if any(c.get("messages") for c in comm):
        fig = _figure(9, 3.2)
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        kinds = sorted({k for c in comm for k in c.get("by_kind", {})})
        bottom = [0.0] * len(comm)
        for kind in kinds:
            ys = [c.get("by_kind", {}).get(kind, {}).get("bytes", 0) for c in comm]
            ax1.bar(range(len(comm)), ys, bottom=bottom, label=kind)
            bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
        ax1.set_title("bytes per round", fontsize=9)
        ax2.bar(range(len(comm)), [c.get("messages", 0) for c in comm])
        ax2.set_title("messages per round", fontsize=9)
        for ax in (ax1, ax2):
            ax.set_xlabel("round", fontsize=8)
        ax1.legend(fontsize=7)
        fig.tight_layout()
        out["Communication"] = _png(fig)
    losses = results.get("loss_curves") or {}
    if losses:
        fig = _figure(9, 3.2)
        ax = fig.add_subplot()
        start = 0
        for name, curve in losses.items():
            if curve:
                ax.plot(range(start, start + len(curve)), curve, label=name)
                start += len(curve)
        ax.set_xlabel("optimisation step (experiences one after another)", fontsize=8)
        ax.set_title("training loss", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        out["Training loss"] = _png(fig)
    return out


def _table(head: list[str], rows: list[list]) -> str:
    cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def _fmt(v: object) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "-" if v is None else str(v)


def interval_panel(run_dir: str | Path | None, results: dict) -> list[str]:
    """HTML of the CI panel: each agent's :data:`CI_KEYS` as points with 95% bootstrap CI bars over the
    run's test items (from ``<run_dir>/per_example``) and the numbers as a table; without records (a
    run made before them, or no run dir), or records that do not match results.json, a sentence why."""
    head = [f"<h2>{html.escape(CI_TITLE)}</h2>"]
    if run_dir is None:
        return head + ["<p>No run directory given: the intervals need the run's per_example/ records.</p>"]
    from lmas.metrics import stats  # scipy: only when a report is drawn

    try:
        run = stats.load_run(run_dir)
    except ValueError as err:
        return head + [f"<p>No confidence intervals: {html.escape(str(err))}</p>"]
    if run.rounds is None:
        return head + [
            "<p>No confidence intervals: this run has no per-example records (per_example/ next to "
            "results.json); runs made before lmas kept them cannot be resampled over test items.</p>"
        ]
    intervals: dict[str, dict] = {}
    skipped = []
    for agent in results.get("metrics", {}):
        try:
            intervals[agent] = stats.item_intervals(run, agent, CI_KEYS)
        except ValueError as err:  # an agent that trained nothing, records that do not match the matrix
            skipped.append(f"{agent}: {err}")
    parts = list(head)
    if intervals:
        fig = _figure(max(6.0, 1.6 * len(CI_KEYS) + 0.6 * len(intervals)), 3.6)
        stats.plot_intervals(fig.add_subplot(), intervals, CI_KEYS)
        fig.tight_layout()
        data = base64.b64encode(_png(fig)).decode("ascii")
        rows = [
            [a, f"{k} ({stats.PAPER_NAMES[k]})" if k in stats.PAPER_NAMES else k,
             f"{iv.estimate:.4f}", f"{iv.low:.4f}", f"{iv.high:.4f}", iv.n]
            for a, ivs in intervals.items() for k, iv in ivs.items()
        ]  # fmt: skip
        parts += [
            f'<img alt="{html.escape(CI_TITLE)}" src="data:image/png;base64,{data}">',
            "<p>Percentile bootstrap over each agent's test items (each task resampled on its own; 4999 "
            "resamples, seed 0: <code>lmas.metrics.stats.item_intervals(run_dir, agent)</code> gives these "
            "numbers; docs/statistics.md).</p>",
            _table(["agent", "metric", "value", "95% CI low", "95% CI high", "test items"], rows),
        ]
    if skipped:
        parts.append("<p>No intervals for " + html.escape("; ".join(skipped)) + "</p>")
    return parts


def render(results: dict, title: str = "lmas run", run_dir: str | Path | None = None) -> str:
    """The report as one HTML string (images inline); ``run_dir`` holds the per-example records of
    the CI panel (:func:`interval_panel`)."""
    tasks = results.get("tasks", [])
    metrics = results.get("metrics", {})
    keys = list(dict.fromkeys(k for summary in metrics.values() for k in summary))
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        "<p>"
        + html.escape(
            f"stream {results.get('stream')} ({results.get('scenario', '?')}-incremental; tasks "
            f"{', '.join(t['name'] + ' [' + t['metric'] + ']' for t in tasks)}), strategy {results.get('strategy')}, "
            f"seed {results.get('seed')}, "
            f"{'complete' if results.get('complete') else 'NOT complete (partial results)'}, "
            f"train {results.get('timings', {}).get('train_s', 0):.0f} s"
        )
        + "</p>",
        "<h2>Continual-learning metrics</h2>",
        _table(["agent", *keys], [[a, *(_fmt(s.get(k)) for k in keys)] for a, s in metrics.items()]),
        *interval_panel(run_dir, results),
    ]
    for name, png in figures(results).items():
        data = base64.b64encode(png).decode("ascii")
        parts += [
            f"<h2>{html.escape(name)}</h2>",
            f'<img alt="{html.escape(name)}" src="data:image/png;base64,{data}">',
        ]
    histories = {a: info.get("history", []) for a, info in results.get("agents", {}).items()}
    vs = lineage.versions(histories)
    if vs:
        parts += [
            "<h2>Adapter versions</h2>",
            _table(
                ["version", "what happened", "parents"],
                [
                    [
                        lineage.ref(v.agent, v.round),
                        v.label,
                        ", ".join(f"{lineage.ref(a, r)} ({k})" for a, r, k in v.parents) or "-",
                    ]
                    for v in vs
                ],
            ),
        ]
    style = (
        "body{font-family:sans-serif;max-width:1400px;margin:auto;padding:1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
        "img{max-width:100%;display:block;margin:0.5em 0}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n"
    )


def write_report(run_dir: str | Path, results: dict | None = None) -> Path:
    """Write ``<run_dir>/report.html`` from ``results`` (default: the run dir's results.json)."""
    run_dir = Path(run_dir)
    if results is None:
        path = run_dir / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{run_dir}: no results.json (not an lmas run dir?)")
        results = json.loads(path.read_text())
    out = run_dir / REPORT
    tmp = out.with_name(f".{REPORT}.tmp")
    tmp.write_text(render(results, title=f"lmas run {run_dir.name}", run_dir=run_dir))
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmas.tracking.html_report", description="Write <run_dir>/report.html from its results.json."
    )
    parser.add_argument("run_dirs", nargs="+", help="lmas run directories")
    args = parser.parse_args(argv)
    status = 0
    for d in args.run_dirs:
        try:
            print(write_report(d))
        except (OSError, ValueError, KeyError) as err:
            print(f"lmas report: {d}: {err}", file=sys.stderr)
            status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
