"""The self-learning study's table (experiments/distillation/README.md), from its committed runs.

    python experiments/tables.py self_learning_study experiments/distillation/self_learning

Each run is one labelling rule and one seed of ``experiment=self_learning``: round 0 trains the workers and the
student on the labelled seed, every later round is one cycle of pseudo-labelled data behind a validation gate.
What the cycles did to the student is its test score after the last cycle minus its score after round 0 *of the
same run* (the same seed data, the same test items), per task and as the mean over the tasks; and the two rules
are compared on the student's final mean, paired by seed (a seed gives both rules the same labelled seed, chunks
and validation split, so their round 0 is the same). Each difference: over the seeds (paired t, Holm-corrected
over the table; this decides the verdict) and over the test items of all seeds (a bootstrap resampling each task's
items: item noise given these trained students). The pseudo-labels' coverage and precision and the gate's
decisions are summed over the cycles and seeds.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from lmas.metrics.intervals import Interval, item_mean_difference
from lmas.metrics.stats import NOT_RESOLVED, RunRecords, holm, load_run, run_interval, verdict


def _settings(run: RunRecords) -> dict:
    return run.results["config"]["loop"]


def _student_outcomes(run: RunRecords, tasks: list[str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The student's per-item outcomes per task after round 0 and after the last round, checked against the
    run's knowledge matrix."""
    if not run.rounds:
        raise SystemExit(f"{run.path}: no per_example/ records; the self-learning table resamples test items")
    student, m = _settings(run)["student"], run.results["matrix"]
    last = max(run.rounds)
    if last != len(m["values"]) - 1:  # records must reach the last cycle (a missing round 0: run.outcomes says so)
        raise SystemExit(f"{run.path}/per_example: rounds {sorted(run.rounds)} but the matrix has {len(m['values'])}")
    try:
        return ({t: run.outcomes(0, student, t) for t in tasks}, {t: run.outcomes(last, student, t) for t in tasks})
    except ValueError as err:
        raise SystemExit(str(err)) from err


def _pseudo_labels(runs: list[RunRecords]) -> tuple[str, str, str]:
    """Kept / arrived over the cycles and seeds, precision of the kept ones, accepted cycles / cycles."""
    kept = arrived = right = 0.0
    accepted = cycles = 0
    for run in runs:
        for cyc in run.results["self_learning"]:
            if cyc["cycle"] == 0:
                continue
            cycles += 1
            accepted += bool(cyc["accepted"])
            for st in cyc["tasks"].values():
                kept, arrived = kept + st["kept"], arrived + st["arrived"]
                right += (st["precision"] or 0.0) * st["kept"]
    precision = f"{right / kept:.2f}" if kept else "–"
    return f"{int(kept)}/{int(arrived)}", precision, f"{accepted}/{cycles}"


def self_learning_study(runs_dir: str, resamples: int = 4999) -> str:
    """The markdown tables: per labelling rule, the student after round 0 and after the last cycle and the gain,
    per task and on the mean; then the rules compared on the student's final mean."""
    runs = [load_run(f.parent) for f in sorted(Path(runs_dir).glob("*/results.json"))]
    if not runs:
        raise SystemExit(f"{runs_dir}: no finished runs (*/results.json)")
    bad = [str(r.path) for r in runs if "self_learning" not in r.results]
    if bad:
        raise SystemExit(f"{runs_dir}: runs without a `self_learning` record (not experiment=self_learning): {bad}")
    tasks = runs[0].results["matrix"]["tasks"]
    digests = {t["name"]: t.get("test_digest") for t in runs[0].results["tasks"]}
    for r in runs[1:]:
        if {t["name"]: t.get("test_digest") for t in r.results["tasks"]} != digests:
            raise SystemExit(f"{r.path} and {runs[0].path}: the test items differ (test_digest); they cannot be paired")
    groups: dict[str, dict[int, RunRecords]] = {}
    for r in runs:
        by_seed = groups.setdefault(_settings(r)["labelling"], {})
        if r.results["seed"] in by_seed:
            raise SystemExit(f"{runs_dir}: two runs of labelling={_settings(r)['labelling']}, seed={r.results['seed']}")
        by_seed[r.results["seed"]] = r
    X = {rule: {s: _student_outcomes(r, tasks) for s, r in by_seed.items()} for rule, by_seed in groups.items()}

    def mean(x: dict[str, np.ndarray]) -> float:
        return float(np.mean([x[t].mean() for t in tasks]))

    rows: list[list] = []
    for rule, by_seed in groups.items():
        seeds = sorted(by_seed)
        before = [X[rule][s][0] for s in seeds]
        after = [X[rule][s][1] for s in seeds]
        cells: list = [rule, str(len(seeds)), *_pseudo_labels([by_seed[s] for s in seeds]),
                       run_interval([mean(x) for x in before]).show(), run_interval([mean(x) for x in after]).show()]
        for part in [*tasks, None]:  # each task's gain, then the gain on the mean over the tasks
            on = [part] if part else tasks
            seed_level = run_interval([float(np.mean([a[t].mean() - b[t].mean() for t in on]))
                                       for a, b in zip(after, before, strict=True)])  # fmt: skip
            items = item_mean_difference([np.stack([a[t] - b[t] for a, b in zip(after, before, strict=True)])
                                          for t in on], resamples)  # fmt: skip
            cells.append((seed_level, items))
        rows.append(cells)
    compare: list = []
    rules = list(groups)
    if len(rules) == 2:
        a, b = rules[1], rules[0]
        common = sorted(set(groups[a]) & set(groups[b]))
        if common:
            seed_level = run_interval([mean(X[a][s][1]) - mean(X[b][s][1]) for s in common])
            items = item_mean_difference([np.stack([X[a][s][1][t] - X[b][s][1][t] for s in common]) for t in tasks],
                                         resamples)  # fmt: skip
            compare = [f"{a} − {b}", str(len(common)), (seed_level, items)]
    tests: list[Interval] = [c[0] for row in rows for c in row[7:]] + ([compare[2][0]] if compare else [])
    testable = [iv for iv in tests if not math.isnan(iv.low)]
    adjusted = dict(zip(map(id, testable), holm([iv.p if iv.p == iv.p else 1.0 for iv in testable]), strict=True))

    def cell(pair: tuple[Interval, Interval]) -> str:
        seed_level, items = pair
        p = adjusted.get(id(seed_level))
        word = verdict({"metric": "acc", "diff": seed_level.estimate, "diff_low": seed_level.low,
                        "diff_high": seed_level.high, "p_holm": p}) if p is not None else f"{NOT_RESOLVED} (one seed)"
        holm_p = f", Holm p {p:.3f}" if p is not None else ""
        return f"{seed_level.show(signed=True)}{holm_p}: {word}; items {items.show(signed=True)}"

    head = ["labelling", "seeds", "pseudo-labels kept/arrived", "precision", "cycles accepted",
            "student after round 0", "after the last cycle", *[f"gain on {t}" for t in tasks], "gain on the mean"]
    lines = [head, ["---"] * len(head)] + [[*row[:7], *[cell(c) for c in row[7:]]] for row in rows]
    sizes = ", ".join(f"{t} {len(next(iter(X[rules[0]].values()))[0][t])}" for t in tasks)
    text = (f"{len(runs)} runs; test items per task: {sizes} (the same in every run). Student accuracy, mean over the "
            f"tasks and seeds [95% t-interval]; each gain is (after the last cycle − after round 0) of the same run: "
            f"over the seeds (paired t [95% CI], Holm over the {len(testable)} seed-level comparisons: the verdict) "
            f"and over the test items of all seeds (paired bootstrap):\n\n")  # fmt: skip
    text += "\n".join("| " + " | ".join(line) + " |" for line in lines)
    if compare:
        text += (f"\n\nThe rules on the student after the last cycle, paired by seed ({compare[1]} seeds): "
                 f"{compare[0]} {cell(compare[2])}")  # fmt: skip
    return text
