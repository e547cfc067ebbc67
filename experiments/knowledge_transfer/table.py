"""The merge-methods study's table (experiments/knowledge_transfer/README.md), from its committed runs.

    python experiments/tables.py merge_methods experiments/knowledge_transfer/merge_methods

In each run specialists learn one task each, then every merge method merges their adapters (uniform weights, no
further training) into an agent ``merged_<method>`` that is scored on every task. Per method, as MergeBench reports
a merge (quality, forgetting and cost together):

* **quality**: the merged agent's score on each task after the last round, and their mean over the tasks;
* **expert gap** (the merge's forgetting): the mean over the tasks of (the task's own specialist on it − the
  merged agent on it), what merging loses of what each specialist knew;
* **cost**: the merge's runtime (``merge_s`` of the agent's ``merge_methods`` event, coefficient tuning included)
  and the truncation residual of writing the merge back as a LoRA adapter.

Every method is compared with ``baseline`` (default ``merged_exact``: the exact sum of the products) on the mean
over the tasks, paired within runs: over the seeds (paired t, Holm-corrected over the methods; this decides the
verdict) and over the test items of all seeds (a bootstrap resampling each task's items, the same items for every
run and method: item noise given these specialists). Seeds resample the training data; the test items are the
same in every run (checked by ``test_digest``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lmas.data.task import TOKEN_WEIGHTED
from lmas.metrics.intervals import Interval, item_mean_difference
from lmas.metrics.stats import NOT_RESOLVED, RunRecords, holm, load_run, run_interval, verdict

EVENT = "merge_methods"


def merged_agents(results: dict) -> list[str]:
    """The agents a merge method made (those with a ``merge_methods`` event), in the run's order."""
    return [a for a, info in results["agents"].items() if any(e.get("event") == EVENT for e in info["history"])]


def _event(results: dict, agent: str) -> dict:
    return next(e for e in results["agents"][agent]["history"] if e.get("event") == EVENT)


def _outcomes(run: RunRecords, tasks: list[str], agents: list[str]) -> dict[tuple[str, str], np.ndarray]:
    """``(agent, task) -> (N,)`` per-item outcomes after the last round, checked against the run's matrix."""
    if not run.rounds:
        raise SystemExit(f"{run.path}: no per_example/ records; the merge table resamples test items")
    last = max(run.rounds)
    try:
        return {(a, t): run.outcomes(last, a, t) for a in agents for t in tasks}
    except ValueError as err:
        raise SystemExit(str(err)) from err


def merge_methods(runs_dir: str, baseline: str = "merged_exact", resamples: int = 4999) -> str:
    """The markdown table: the specialists, then each merged agent with its quality, expert gap, difference from
    ``baseline`` (over seeds and over items) and cost."""
    runs = [load_run(f.parent) for f in sorted(Path(runs_dir).glob("*/results.json"))]
    if not runs:
        raise SystemExit(f"{runs_dir}: no finished runs (*/results.json)")
    first = runs[0].results
    tasks, metrics = first["matrix"]["tasks"], first["matrix"]["metrics"]
    weighted = [t for t in tasks if metrics[t] in TOKEN_WEIGHTED]
    if weighted:
        raise SystemExit(f"{runs_dir}: tasks {weighted} are scored by a token-weighted metric; the table needs "
                         "accuracy, exact match or ROUGE-L (a mean over items)")  # fmt: skip
    merged = merged_agents(first)
    if baseline not in merged:
        raise SystemExit(f"{runs_dir}: no merged agent {baseline!r} (merged agents: {', '.join(merged)})")
    experts = {t: a for _, a, t in first["matrix"]["trained"]}
    if sorted(experts) != sorted(tasks):
        raise SystemExit(f"{runs_dir}: every task needs one specialist; trained: {first['matrix']['trained']}")
    specialists = list(dict.fromkeys(experts[t] for t in tasks))
    digests = {t["name"]: t.get("test_digest") for t in first["tasks"]}
    for r in runs[1:]:
        if r.results["matrix"]["tasks"] != tasks or merged_agents(r.results) != merged:
            raise SystemExit(f"{r.path}: other tasks or merge methods than {runs[0].path}; one study per folder")
        other = {t["name"]: t.get("test_digest") for t in r.results["tasks"]}
        if other != digests:
            raise SystemExit(f"{r.path} and {runs[0].path}: the test items differ (test_digest); they cannot be paired")
    X = [_outcomes(r, tasks, specialists + merged) for r in runs]
    acc = [{k: float(v.mean()) for k, v in x.items()} for x in X]  # per run: (agent, task) -> score

    def per_run(agent: str, f: Callable[[dict, str, str], float]) -> list[float]:
        return [float(np.mean([f(a, agent, t) for t in tasks])) for a in acc]

    rows, tests = [], []
    for agent in specialists + merged:
        row = {"agent": agent, "tasks": [f"{np.mean([a[agent, t] for a in acc]):.3f}" for t in tasks],
               "mean": run_interval(per_run(agent, lambda a, g, t: a[g, t])).show(),
               "gap": run_interval(per_run(agent, lambda a, g, t: a[experts[t], t] - a[g, t])).show()}  # fmt: skip
        if agent in merged:
            ev = [_event(r.results, agent) for r in runs]
            row["cost"] = [f"{np.mean([e.get('merge_s', math.nan) for e in ev]):.3g}",
                           f"{np.mean([e.get('residual', math.nan) for e in ev]):.3f}"]  # fmt: skip
        if agent in merged and agent != baseline:
            d = run_interval(per_run(agent, lambda a, g, t: a[g, t] - a[baseline, t]))
            row["seeds"], row["items"] = d, _item_difference(X, tasks, agent, baseline, resamples)
            tests.append(row)
        rows.append(row)
    testable = [r for r in tests if not math.isnan(r["seeds"].low)]
    for r, p in zip(testable, holm([r["seeds"].p if r["seeds"].p == r["seeds"].p else 1.0 for r in testable]),
                    strict=True):  # fmt: skip
        d = r["seeds"]
        r["p"], r["verdict"] = f"{p:.3f}", verdict({"metric": "mean", "diff": d.estimate, "diff_low": d.low,
                                                    "diff_high": d.high, "p_holm": p})  # fmt: skip
    n_seeds = f"{len(runs)} seed{'s' * (len(runs) > 1)}"
    head = ["agent", *tasks, f"mean over tasks [95% CI, {n_seeds}]", "expert gap [95% CI]",
            f"− {baseline}, seeds (paired t)", "p (Holm)", "verdict", f"− {baseline}, items (paired bootstrap)",
            "merge s", "residual"]  # fmt: skip
    lines = [head, ["---"] * len(head)]
    for r in rows:
        seeds, items = r.get("seeds"), r.get("items")
        diff = ["–", "–", "baseline" if r["agent"] == baseline else "specialist", "–"]
        if seeds is not None:
            one = math.isnan(seeds.low)
            diff = [
                seeds.show(signed=True, p=True),
                r.get("p", "–"),
                r.get("verdict", f"{NOT_RESOLVED} (one seed)" if one else ""),
                items.show(signed=True, p=True),
            ]
        lines.append([r["agent"], *r["tasks"], r["mean"], r["gap"], *diff, *r.get("cost", ["–", "–"])])
    sizes = ", ".join(f"{t} {len(X[0][specialists[0], t])}" for t in tasks)
    intro = (f"{len(runs)} runs (seeds {', '.join(str(r.results.get('seed')) for r in runs)}), test items per task: "
             f"{sizes} (the same in every run); task columns: mean over the seeds. Every merged agent is paired with "
             f"`{baseline}` of the same run (Holm over the {len(testable)} seed-level comparisons with an interval)"
             ":\n\n")  # fmt: skip
    return intro + "\n".join("| " + " | ".join(line) + " |" for line in lines)


def _item_difference(X: list[dict], tasks: list[str], agent: str, baseline: str, resamples: int) -> Interval:
    """Mean over runs and tasks of ``agent − baseline``, bootstrapped over each task's test items."""
    return item_mean_difference([np.stack([x[agent, t] - x[baseline, t] for x in X]) for t in tasks], resamples)
