"""The consolidation study's tables (experiments/consolidation/README.md), from its committed runs.

    python experiments/tables.py consolidation experiments/consolidation/runs [--agent population]

Each run is placed by the transfer it ran with (results.json ``population.transfer``: ``none`` or ``consolidate``).
Per arm: the knowledge library after the last round (results.json ``library``: distinct units and their kB) and the
row's avg_acc and forgetting, each with its 95% t-interval over the runs. Then ``consolidate − none``, paired by
seed (seeds resample the training data; the test items are the same in every run): the library's kB and the
metrics, paired t over the seed pairs, Holm over the table's comparisons (``lmas.metrics.stats``). Then the
library's kB after every round, mean over each arm's runs: its size against the stream. Last, the accuracy kept on
each task after the last round (the row's last line of the knowledge matrix): each arm's mean over its runs and
``consolidate − none`` paired by seed, Holm over the tasks.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from lmas.metrics.stats import (
    RunRecords,
    holm,
    load_run,
    pair_key_of,
    paired_difference,
    run_interval,
    verdict,
)

ARMS = ("none", "consolidate")
KEYS = ("avg_acc", "forgetting")


def _arms(runs_dir: str) -> dict[str, list[RunRecords]]:
    found = sorted(Path(runs_dir).glob("*/results.json"))
    if not found:
        raise SystemExit(f"{runs_dir}: no finished runs (*/results.json)")
    arms: dict[str, list[RunRecords]] = {a: [] for a in ARMS}
    for f in found:
        run = load_run(f.parent, items=False)  # run-level statistics: no per-example records needed
        transfer = run.results["population"]["transfer"]
        if transfer not in arms:
            raise SystemExit(f"{f.parent}: transfer {transfer!r}, the study compares {' and '.join(ARMS)}")
        if not run.results.get("library"):
            raise SystemExit(f"{f.parent}: no `library` in results.json (a run of lmas before it was recorded)")
        arms[transfer].append(run)
    if not all(arms.values()):
        raise SystemExit(f"{runs_dir}: runs of both arms are needed; found {({a: len(r) for a, r in arms.items()})}")
    return arms


def kb(run: RunRecords, r: int = -1) -> float:
    """The library's kB after round ``r`` (default: the last)."""
    return run.results["library"][r]["bytes"] / 1024


def final(run: RunRecords, agent: str, task: str) -> float:
    """``agent``'s score on ``task`` after the last round (NaN where the matrix has no entry)."""
    m = run.results["matrix"]
    value = m["values"][-1][m["agents"].index(agent)][m["tasks"].index(task)]
    return math.nan if value is None else float(value)


def _iv(values: list[float], signed: bool = False) -> str:
    return run_interval(values).show(signed=signed)


def consolidation(runs_dir: str, agent: str = "population") -> str:
    """The three markdown tables (module docstring)."""
    arms = _arms(runs_dir)
    head = ["arm", "runs (seeds)", "library units", "library kB", *KEYS]
    rows = []
    for arm, runs in arms.items():
        seeds = ", ".join(str(r.results["seed"]) for r in runs)
        units = statistics.mean(r.results["library"][-1]["units"] for r in runs)
        rows.append([arm, f"{len(runs)} ({seeds})", f"{units:.2f}", _iv([kb(r) for r in runs]),
                     *[_iv([r.metric(k, agent) for r in runs]) for k in KEYS]])  # fmt: skip
    # consolidate − none, paired by seed
    by_key = {pair_key_of(r.results): r for r in arms["none"]}
    pairs = [(r, by_key[pair_key_of(r.results)]) for r in arms["consolidate"] if pair_key_of(r.results) in by_key]
    if not pairs:
        raise SystemExit(f"{runs_dir}: no seed has runs of both arms")
    diffs = {"library_kb": run_interval([kb(a) - kb(b) for a, b in pairs])}
    diffs.update(paired_difference([a for a, _ in pairs], [b for _, b in pairs], agent, KEYS, level="runs"))
    adjusted = dict(zip(diffs, holm([iv.p for iv in diffs.values()]), strict=True))
    drows = []
    for k, iv in diffs.items():
        row = {"metric": k, "diff": iv.estimate, "diff_low": iv.low, "diff_high": iv.high, "p_holm": adjusted[k]}
        call = verdict(row)
        if k == "library_kb" and call in ("better", "worse"):  # a size: smaller or larger, not better
            call = "smaller" if iv.estimate < 0 else "larger"
        drows.append([k, iv.show(signed=True), f"{iv.p:.3g}", f"{adjusted[k]:.3g}", call])
    rounds = len(pairs[0][0].results["library"])
    per_round = [[str(r), *[f"{statistics.mean(kb(run, r) for run in arms[a]):.1f}" for a in ARMS]]
                 for r in range(rounds)]  # fmt: skip
    tasks = pairs[0][0].results["matrix"]["tasks"]
    kept = {t: run_interval([final(a, agent, t) - final(b, agent, t) for a, b in pairs]) for t in tasks}
    kept_holm = dict(zip(tasks, holm([iv.p for iv in kept.values()]), strict=True))
    per_task = [[t, *[f"{statistics.mean(final(r, agent, t) for r in arms[a]):.3f}" for a in ARMS],
                 iv.show(signed=True), f"{kept_holm[t]:.3g}"] for t, iv in kept.items()]  # fmt: skip
    return "\n\n".join([
        f"Row `{agent}`; library after the last round; 95% t-intervals over the runs:\n\n" + _table(head, rows),
        f"consolidate − none, paired t over {len(pairs)} seed pairs, Holm over the {len(diffs)} comparisons:\n\n"
        + _table(["metric", "difference [95% CI]", "p", "p (Holm)", "verdict"], drows),
        "Library kB after each round (mean over each arm's runs):\n\n" + _table(["round", *ARMS], per_round),
        f"Accuracy kept on each task after the last round (row `{agent}`; each arm's mean over its runs; consolidate"
        f" − none, paired t over {len(pairs)} seed pairs, Holm over the {len(tasks)} tasks):\n\n"
        + _table(["task", *ARMS, "consolidate − none [95% CI]", "p (Holm)"], per_task),
    ])  # fmt: skip


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
