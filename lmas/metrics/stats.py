"""Confidence intervals and paired tests for the continual-learning metrics of runs.

Two sources of noise make a metric uncertain, and each has its interval (docs/statistics.md):

* **test items** (within a run): the metrics are recomputed from the run's per-example records
  (``<run>/per_example/initial.npz`` and ``round<rrr>.npz``) on bootstrap resamples of the test
  items of every task, with the same code that wrote results.json (:meth:`KnowledgeMatrix.summary`
  on a matrix rebuilt from the resampled items), by :func:`scipy.stats.bootstrap`. The test set is
  the same in every run on the same data, so every run of a resample gets the same items: runs are
  paired item by item.
* **runs** (seeds x task orders): a t-interval for the mean of the run-level values
  (:func:`scipy.stats.ttest_1samp`), and the paired t-test (on the differences of runs with the
  same seed and order) for comparisons.

:func:`comparison_table` puts both into rows (mean with CI per group and metric, the difference to a
baseline with CI, p-value, Holm-corrected p, significance mark, verdict, and the gap-closure ratio
``(method - baseline) / (upper - baseline)``); :func:`to_markdown` and :func:`to_csv` write them.
The intervals live in :mod:`lmas.metrics.intervals`, a run's records in :mod:`lmas.metrics.records`
(their public names are importable from here too).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmas.metrics.intervals import (
    KEYS,
    Interval,
    bootstrap_intervals,
    holm,
    item_bootstrap,
    item_intervals,
    ratio_interval,
    run_interval,
    run_intervals,
)
from lmas.metrics.records import RunRecords, Slot, load_run

__all__ = [
    "KEYS",
    "PAPER_NAMES",
    "Interval",
    "RunRecords",
    "comparison_table",
    "gap_closure",
    "holm",
    "item_intervals",
    "load_run",
    "pair_key_of",
    "paired_difference",
    "plot_intervals",
    "ratio_interval",
    "run_interval",
    "run_intervals",
    "to_csv",
    "to_markdown",
    "verdict",
]
"""Every key of :meth:`KnowledgeMatrix.summary`, in table order."""
PAPER_NAMES: dict[str, str] = {"avg_acc": "AP", "forgetting": "F.Ra", "bwt": "BWT", "fwt": "FWT"}
"""The names the LLM continual-learning papers (O-LoRA, SAPT, N-LoRA) give these metrics."""
LOWER_IS_BETTER: frozenset[str] = frozenset({"forgetting", "avg_ppl", "ppl_forgetting"})
SAME_HYPOTHESIS: dict[str, str] = {"bwt": "forgetting", "ppl_bwt": "ppl_forgetting"}
"""``bwt = -forgetting``: one test, counted once in the Holm family (the p-value is shared)."""
GAP = "gap_closure"
NOT_RESOLVED = "not resolved at this sample size"


def pair_key_of(results: dict) -> tuple[Any, ...]:
    """What pairs runs of two strategies: the same stream, task order and seed (orders of one benchmark share the
    stream's name, so the task order is part of the key)."""
    order = tuple(t.get("name") for t in results.get("tasks") or [])
    return (results.get("stream"), order, results.get("seed"))


# ---------------------------------------------------------------------------- comparisons
def _pairs(
    *groups: Sequence[RunRecords], pair_key: Callable[[dict], Any] = pair_key_of, first: bool = False
) -> list[tuple[RunRecords, ...]]:
    """Runs of the groups matched by ``pair_key`` (stream, task order and seed); unmatched runs are an error.

    ``first``: the pairs are the first group's runs; runs of the other groups that it lacks are left out
    (a method run on one order with 2 seeds is compared with the baseline's runs of that order and
    those seeds), while a run of the first group without a partner is still an error."""
    by_key = []
    for g in groups:
        d: dict[Any, RunRecords] = {}
        for r in g:
            k = pair_key(r.results)
            if k in d:
                why = f"have the same pairing key {k} (stream, task order, seed) in one group"
                raise ValueError(f"{r.path} and {d[k].path} {why}")
            d[k] = r
        by_key.append(d)
    common = set(by_key[0]).intersection(*by_key[1:])
    lost = [str(r.path) for d in (by_key[:1] if first else by_key) for k, r in d.items() if k not in common]
    if lost:
        raise ValueError(f"runs without a partner of the same (stream, task order, seed) in every group: {lost}")
    if not common:
        raise ValueError("no paired runs (same stream, task order and seed) in the groups")
    return [tuple(d[k] for d in by_key) for k in sorted(common, key=repr)]


def _have_records(matched: Sequence[tuple[RunRecords, ...]]) -> bool:
    return all(r.rounds is not None for runs in matched for r in runs)


def paired_difference(
    a: Sequence[RunRecords],
    b: Sequence[RunRecords],
    agent: str | None = None,
    keys: Sequence[str] = KEYS,
    *,
    level: str = "auto",
    min_runs: int = 2,
    n_resamples: int = 4999,
    confidence: float = 0.95,
    seed: int = 0,
    agent_b: str | None = None,
) -> dict[str, Interval]:
    """``a - b`` per metric over runs paired by stream, task order and seed: mean difference, CI, p-value.

    The pairs are ``a``'s runs: each needs a partner in ``b``; runs of ``b`` that ``a`` lacks are left out.
    ``agent`` is the row compared (default: each run's first); ``agent_b`` another row for ``b`` (default
    ``agent``): ``a`` and ``b`` may be the same runs, comparing two rows of each run (e.g. the population's
    answer and one of its agents), paired over the same test items.

    ``level="runs"``: paired t-test over the run pairs (training noise, seeds x orders);
    ``"items"``: paired bootstrap over test items of the mean difference over the pairs (item noise,
    given these trained models; p from the bootstrap distribution); ``"auto"``: runs when there
    are at least ``min_runs`` pairs or a run has no per-example records, items otherwise.
    """
    pairs = _pairs(a, b, first=True)
    if level == "auto":
        level = "runs" if len(pairs) >= min_runs or not _have_records(pairs) else "items"
    if level == "runs":
        out = {}
        for k in keys:
            d = [x.metric(k, agent) - y.metric(k, agent_b or agent) for x, y in pairs]
            if any(not math.isnan(v) for v in d):
                iv = run_interval(d, confidence)
                out[k] = Interval(iv.estimate, iv.low, iv.high, iv.n, f"paired t, {iv.n} run pairs", iv.p)
        return out
    if level != "items":
        raise ValueError(f"paired_difference: level must be 'auto', 'runs' or 'items', got {level!r}")
    slots = [Slot(r, who) for pair in pairs for r, who in zip(pair, (agent, agent_b or agent), strict=True)]
    n = len(pairs)
    point, res = item_bootstrap(
        slots, keys, lambda v: (v[0::2] - v[1::2]).mean(0),
        n_resamples=n_resamples, confidence=confidence, seed=seed, method="percentile",
    )  # fmt: skip
    items = sum(slots[0].sizes.values())
    return bootstrap_intervals(point, res, n, f"paired item bootstrap, {n} run pair(s), {items} items", True)


def gap_closure(
    method: Sequence[RunRecords],
    baseline: Sequence[RunRecords],
    upper: Sequence[RunRecords],
    agent: str | None = None,
    key: str = "avg_acc",
    *,
    level: str = "auto",
    min_runs: int = 3,
    n_resamples: int = 4999,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """``(method - baseline) / (upper - baseline)`` of ``key`` (ratio of the means over paired runs).

    0: no better than the baseline (SeqLoRA), 1: as good as the upper bound (multitask). The triples
    are ``method``'s runs with their partners (same stream, task order, seed). Over run triples
    (``level="runs"``): Fieller's interval for the ratio of the paired means (:func:`ratio_interval`, the ratios
    the paired t-test of ``(m - s) - R (u - s)`` does not reject; it excludes 0 exactly when the paired t of
    ``method - baseline`` does, with its p-value); over test items (``"items"``): the three resampled together;
    ``"auto"``: runs with at least ``min_runs`` triples or without per-example records, items otherwise.
    Where the upper bound's mean equals the baseline's, the ratio is undefined: NaN, no interval. A method run
    whose seed the upper bound has not been run with yet (a study in progress) is left out of the ratio (``n``
    counts the triples used); a method run without a baseline partner is an error.
    """
    have_upper = {pair_key_of(r.results) for r in upper}
    triples = _pairs([r for r in method if pair_key_of(r.results) in have_upper], baseline, upper, first=True)
    if level == "auto":
        level = "runs" if len(triples) >= min_runs or not _have_records(triples) else "items"
    s_bar, u_bar = (float(np.mean([t[i].metric(key, agent) for t in triples])) for i in (1, 2))
    if not u_bar != s_bar:  # equal (or NaN): 0/0 or x/0 on the runs themselves
        return Interval(math.nan, math.nan, math.nan, len(triples), f"undefined: upper mean = baseline mean ({u_bar})")

    def ratio(m: np.ndarray, s: np.ndarray, u: np.ndarray, axis: int = -1) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return (m.mean(axis) - s.mean(axis)) / (u.mean(axis) - s.mean(axis))

    n = len(triples)
    if level == "runs":
        m, s, u = (np.array([t[i].metric(key, agent) for t in triples]) for i in range(3))
        return ratio_interval(m - s, u - s, confidence, unit="run triple")
    if level != "items":
        raise ValueError(f"gap_closure: level must be 'auto', 'runs' or 'items', got {level!r}")
    slots = [Slot(r, agent) for t in triples for r in t]
    point, res = item_bootstrap(
        slots, [key], lambda v: ratio(v[0::3], v[1::3], v[2::3], axis=0),
        n_resamples=n_resamples, confidence=confidence, seed=seed, method="percentile",
    )  # fmt: skip
    return bootstrap_intervals(point, res, n, f"paired item bootstrap, {n} run triple(s)", False)[key]


# ---------------------------------------------------------------------------- the table
def _mark(p: float) -> str:
    if math.isnan(p):
        return ""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else ""


def comparison_table(
    groups: Mapping[str, Sequence[RunRecords | str | os.PathLike]],
    baseline: str,
    upper: str | None = None,
    agent: str | None = None,
    keys: Sequence[str] = ("avg_acc", "forgetting", "bwt", "fwt", "plasticity"),
    *,
    alpha: float = 0.05,
    confidence: float = 0.95,
    n_resamples: int = 4999,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Rows (one per group and metric, plus ``gap_closure`` rows) ready for CSV and markdown.

    ``groups``: name -> runs (paths or :class:`RunRecords`); ``baseline``: the group every other is
    compared with (SeqLoRA/naive); ``upper``: the multitask group for the gap-closure ratio of
    ``avg_acc``. Each row: ``group, metric, paper`` (AP, F.Ra, ...), ``n, mean, low, high, ci``
    (runs: t-interval; one run: item bootstrap), and for non-baseline groups ``diff, diff_low,
    diff_high, p, test`` (:func:`paired_difference`, ``level="auto"``), ``p_holm`` (Holm over every
    comparison of the table; ``bwt`` shares the test of ``forgetting``), ``mark`` and ``verdict``.
    """
    runs = {g: [r if isinstance(r, RunRecords) else load_run(r) for r in rs] for g, rs in groups.items()}
    for name in (baseline, upper):
        if name is not None and name not in runs:
            raise ValueError(f"comparison_table: no group {name!r}; groups: {sorted(runs)}")
    rows: list[dict[str, Any]] = []
    for g, rs in runs.items():
        if len(rs) > 1 or rs[0].rounds is None:
            level = run_intervals(rs, agent, keys, confidence)
        else:
            level = item_intervals(rs[0], agent, keys, n_resamples=n_resamples, confidence=confidence, seed=seed)
        diffs = {}
        if g != baseline:
            diffs = paired_difference(
                rs, runs[baseline], agent, keys, n_resamples=n_resamples, confidence=confidence, seed=seed
            )
        for k, iv in level.items():
            row: dict[str, Any] = {
                "group": g,
                "metric": k,
                "paper": PAPER_NAMES.get(k, ""),
                "n": iv.n,
                "mean": iv.estimate,
                "low": iv.low,
                "high": iv.high,
                "ci": iv.method,
            }
            if k in diffs:
                d = diffs[k]
                row.update(diff=d.estimate, diff_low=d.low, diff_high=d.high, p=d.p, test=d.method)
            rows.append(row)
        if upper is not None and g not in (baseline, upper) and "avg_acc" in level:
            gc = gap_closure(
                rs, runs[baseline], runs[upper], agent, n_resamples=n_resamples, confidence=confidence, seed=seed
            )
            rows.append(
                {
                    "group": g,
                    "metric": GAP,
                    "paper": "",
                    "n": gc.n,
                    "mean": gc.estimate,
                    "low": gc.low,
                    "high": gc.high,
                    "ci": gc.method,
                }
            )
    tested = [r for r in rows if "p" in r and r["metric"] not in SAME_HYPOTHESIS]
    for r, p in zip(tested, holm([r["p"] for r in tested]), strict=True):
        r["p_holm"] = p
    shared = {(r["group"], r["metric"]): r["p_holm"] for r in tested}
    for r in rows:
        if "diff" not in r:
            continue
        r.setdefault("p_holm", shared.get((r["group"], SAME_HYPOTHESIS.get(r["metric"], "")), math.nan))
        r["mark"] = _mark(r["p_holm"])
        r["verdict"] = verdict(r, alpha)
    return rows


def verdict(row: Mapping[str, Any], alpha: float = 0.05) -> str:
    """Whether the group is better or worse than the baseline, or why the difference is not a result (``row``:
    ``metric``, ``diff``, ``diff_low``, ``diff_high``, ``p_holm``)."""
    if not (row["diff_low"] > 0 or row["diff_high"] < 0):
        return NOT_RESOLVED
    if not row["p_holm"] < alpha:
        return "not resolved after Holm correction"
    higher = row["diff"] > 0
    return "better" if higher != (row["metric"] in LOWER_IS_BETTER) else "worse"


def _cell(v: float, lo: float, hi: float) -> str:
    if math.isnan(lo):
        return f"{v:.3f}"
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def to_markdown(rows: Sequence[Mapping[str, Any]], baseline: str | None = None) -> str:
    """Two markdown tables: each group's metrics with CIs, and its differences to the baseline."""
    groups = list(dict.fromkeys(r["group"] for r in rows))
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    at = {(r["group"], r["metric"]): r for r in rows}

    def head(m: str) -> str:
        return f"{m} ({PAPER_NAMES[m]})" if m in PAPER_NAMES else m

    out = ["| group | " + " | ".join(head(m) for m in metrics) + " |", "|---|" + "---|" * len(metrics)]
    for g in groups:
        cells = [_cell(at[g, m]["mean"], at[g, m]["low"], at[g, m]["high"]) if (g, m) in at else "-" for m in metrics]
        out.append(f"| {g} | " + " | ".join(cells) + " |")
    compared = [m for m in metrics if any("diff" in r and r["metric"] == m for r in rows)]
    if compared:
        out += [
            "",
            f"Difference to {baseline or 'the baseline'} (95% CI; marks: Holm-corrected p < 0.05 *, "
            "< 0.01 **, < 0.001 ***; n.r. = not resolved at this sample size, the CI includes 0):",
            "",
        ]
        out += [
            "| group | " + " | ".join(head(m) for m in compared) + " | test |",
            "|---|" + "---|" * (len(compared) + 1),
        ]
        for g in groups:
            rs = [at.get((g, m)) for m in compared]
            if not any(r is not None and "diff" in r for r in rs):
                continue
            cells = []
            for r in rs:
                if r is None or "diff" not in r:
                    cells.append("-")
                    continue
                note = "n.r." if r["verdict"] == NOT_RESOLVED else r["mark"]
                cells.append(f"{r['diff']:+.3f} [{r['diff_low']:+.3f}, {r['diff_high']:+.3f}] {note}".rstrip())
            test = next(r["test"] for r in rs if r is not None and "test" in r)
            out.append(f"| {g} | " + " | ".join(cells) + f" | {test} |")
    return "\n".join(out)


def plot_intervals(ax: Any, intervals: Mapping[str, Mapping[str, Interval]], keys: Sequence[str] = KEYS[:5]) -> bool:
    """Draw ``{series: {key: Interval}}`` (e.g. per agent, from :func:`item_intervals`) on a matplotlib
    axis as points with CI bars, one cluster per key; False (nothing drawn) when no key is present."""
    shown = [k for k in keys if any(k in ivs for ivs in intervals.values())]
    if not shown:
        return False
    width = 0.8 / max(1, len(intervals))
    for i, (name, ivs) in enumerate(intervals.items()):
        xs = [j + i * width for j, k in enumerate(shown) if k in ivs]
        est = np.array([ivs[k].estimate for k in shown if k in ivs])
        lo = np.array([ivs[k].low for k in shown if k in ivs])
        hi = np.array([ivs[k].high for k in shown if k in ivs])
        err = np.nan_to_num(np.stack([est - lo, hi - est]))
        ax.errorbar(xs, est, yerr=err, fmt="o", capsize=3, label=name)
    ax.set_xticks([j + width * (len(intervals) - 1) / 2 for j in range(len(shown))])
    ax.set_xticklabels([f"{k} ({PAPER_NAMES[k]})" if k in PAPER_NAMES else k for k in shown], fontsize=8)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_title("95% CI over test items (bootstrap)", fontsize=9)
    ax.legend(fontsize=7)
    return True


CSV_FIELDS = ("group", "metric", "paper", "n", "mean", "low", "high", "ci", "diff", "diff_low", "diff_high",
              "p", "p_holm", "mark", "verdict", "test")  # fmt: skip


def to_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write the rows (long format, :data:`CSV_FIELDS`; empty cells where a row has no value)."""
    out = Path(path)
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    return out
