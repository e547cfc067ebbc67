"""The reproduction study's main table, from the committed runs alone (``experiments/tables.py reproduction``).

    python experiments/tables.py reproduction experiments/reproduction/runs [--baseline strategy=naive]
        [--upper strategy=joint] [--strategies naive,olora,...] [--out table.csv]

Runs are grouped by their strategy (results.json ``strategy``; seeds x task orders repeat inside a group). Every
number comes from :func:`lmas.metrics.stats.comparison_table` (one place for the math, docs/statistics.md): each
strategy's avg_acc / forgetting / bwt / fwt / plasticity with 95% CIs over runs, its paired difference from SeqLoRA
(``naive``) with CI, p-value and Holm-corrected p-value, and the gap-closure ratio (method - SeqLoRA) / (multitask -
SeqLoRA) with its CI. This module only formats them, and sets beside them the published numbers as gap-closure
ratios (:data:`PUBLISHED`, each with its source; a ratio only where the source gives the method, SeqLoRA and
multitask in one setting).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from lmas.compare import run_settings
from lmas.metrics import stats
from lmas.metrics.records import Slot

KEYS = ("avg_acc", "forgetting", "bwt", "fwt", "plasticity")
ORDER = ("naive", "seqft", "inclora", "olora", "nlora", "osf", "opcm", "ewc", "lwf", "replay", "joint")
"""Table order of the strategies (others follow, sorted)."""
PAPER_METHOD = {
    "naive": "SeqLoRA", "seqft": "SeqFT", "inclora": "IncLoRA", "olora": "O-LoRA", "nlora": "N-LoRA", "osf": "OSF",
    "opcm": "OPCM",
    "ewc": "EWC", "lwf": "LwF", "replay": "Replay", "joint": "multitask (MTL)",
}  # fmt: skip
"""The names the papers give our strategies."""
PUBLISHED: tuple[dict[str, Any], ...] = (
    {
        "source": "O-LoRA paper (Wang et al. 2023, arXiv 2310.14152), Table 1 (O-LoRA and multitask also in NOTES.md)",
        "setting": "T5-large, standard CL benchmark, average of orders 1-3",
        "avg_acc": {"seqft": 28.5, "naive": 43.7, "inclora": 66.4, "olora": 75.8, "ewc": 50.3, "lwf": 52.3,
                    "replay": 57.8, "joint": 80.0},
    },
    {
        "source": "O-LoRA paper, Table 1; N-LoRA 72.4: the N-LoRA paper (COLING 2025) as quoted in issue 15",
        "setting": "T5-large, long sequence (15 tasks), average of orders 4-6",
        "avg_acc": {"seqft": 7.4, "naive": 1.6, "inclora": 61.2, "olora": 69.6, "nlora": 72.4, "ewc": 45.1,
                    "lwf": 46.9, "replay": 54.2, "joint": 76.5},
    },
    {
        "source": "O-LoRA authors' committed run logs, via NOTES.md",
        "setting": "T5-large, standard CL benchmark, order 1",
        "avg_acc": {"olora": 78.4, "inclora": 68.6, "seqft": 67.8, "naive": 62.9},
    },
)  # fmt: skip
"""Published average accuracies (%), one entry per source and setting. A gap-closure ratio needs the method,
SeqLoRA (``naive``) and multitask (``joint``) of the same entry (so the run logs' entry gives none)."""
CSV_FIELDS = ("strategy", "paper_name", "metric", "paper", "runs", "seeds", "orders", "items_per_task", "mean", "low",
              "high", "ci", "diff", "diff_low", "diff_high", "p", "p_holm", "verdict", "test", "published_ratio",
              "published_source")  # fmt: skip


def strategy_of(spec: str, option: str) -> str:
    """``strategy=naive`` (as lmas-compare takes it) or ``naive`` -> ``naive``; a group's name (``nlora
    lambda_l1=0.4``) as it is; any other key is an error."""
    key, sep, value = spec.partition("=")
    if not sep or " " in key:
        return spec
    if key != "strategy" or not value:
        raise ValueError(
            f"{option} {spec!r}: the table groups runs by strategy; give strategy=<name>, e.g. strategy=naive"
        )
    return value


def load_groups(
    runs_dir: str | os.PathLike, context: Sequence[dict] = (), seeds: Collection[int] | None = None
) -> dict[str, list[stats.RunRecords]]:
    """Every complete run under ``runs_dir`` (with its per-example records), by strategy, in :data:`ORDER`. Runs of
    one strategy at different settings are separate groups, named ``<strategy> <key>=<value>`` (e.g. ``nlora
    lambda_l1=0.4``: :func:`lmas.compare.run_settings`); ``context``: results.json of runs elsewhere whose
    settings count too (so that two folders compared with each other name the same setting alike); ``seeds``: only
    the runs of these seeds."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory (expected the study's runs/ folder)")
    found = sorted(root.rglob("results.json"))
    if not found:
        raise ValueError(f"{root}: no results.json under it (no finished run of the study is there)")
    runs: list[stats.RunRecords] = []
    streams: dict[str, str] = {}
    for f in found:
        run = stats.load_run(f.parent)
        if not run.results.get("complete"):
            print(f"reproduction: skipping {f.parent} (run not complete)", file=sys.stderr)
            continue
        if not isinstance(run.results.get("strategy"), str):
            raise ValueError(f"{f}: no `strategy` name (expected an lmas run's results.json)")
        runs.append(run)
        streams.setdefault(str(run.results.get("stream")), str(f.parent))
    groups: dict[str, list[stats.RunRecords]] = {}
    every = run_settings([r.results for r in runs] + list(context), strategy_only=True)
    for run, settings in zip(runs, every[: len(runs)], strict=True):
        if seeds is not None and run.results.get("seed") not in seeds:
            continue
        label = " ".join([run.results["strategy"], *(k.removeprefix("strategy.") for k in settings)])
        groups.setdefault(label, []).append(run)
    if len(streams) > 1:
        raise ValueError(f"{root}: runs on different streams cannot be paired: " +
                         "; ".join(f"{s} (e.g. {p})" for s, p in streams.items()))  # fmt: skip
    rank = {s: i for i, s in enumerate(ORDER)}
    return dict(sorted(groups.items(), key=lambda kv: (rank.get(method(kv[0]), len(ORDER)), kv[0])))


def method(group: str) -> str:
    """A group's strategy: ``nlora`` of ``nlora lambda_l1=0.4``."""
    return group.split(" ")[0]


def describe(runs: Sequence[stats.RunRecords]) -> dict[str, Any]:
    """``runs``, ``seeds``, ``orders`` (distinct task orders) and ``items`` (test items per task, from the records
    of the first run that has them; empty without records)."""
    items: dict[str, int] = {}
    for r in runs:
        if r.rounds is not None:
            items = Slot(r).sizes
            break
    return {
        "runs": len(runs),
        "seeds": len({r.results.get("seed") for r in runs}),
        "orders": len({tuple(t.get("name") for t in r.results.get("tasks") or []) for r in runs}),
        "items": items,
    }


def published_ratios(strategy: str) -> list[tuple[float, dict[str, Any]]]:
    """``(G, entry)`` for every :data:`PUBLISHED` entry with the method, SeqLoRA and multitask numbers."""
    out = []
    for entry in PUBLISHED:
        acc = entry["avg_acc"]
        name = method(strategy)
        if name in acc and "naive" in acc and "joint" in acc and name not in ("naive", "joint"):
            out.append(((acc[name] - acc["naive"]) / (acc["joint"] - acc["naive"]), entry))
    return out


def build(
    runs_dir: str | os.PathLike,
    baseline: str = "strategy=naive",
    upper: str | None = "strategy=joint",
    strategies: Sequence[str] | None = None,
    *,
    n_resamples: int = 4999,
    seed: int = 0,
    context: Sequence[dict] = (),
    seeds: Collection[int] | None = None,
    groups: dict[str, list[stats.RunRecords]] | None = None,
) -> dict[str, Any]:
    """The table's content: ``rows`` (:func:`stats.comparison_table`), ``info`` per strategy (:func:`describe`),
    ``baseline``, ``upper``, ``stream``. Missing strategies (asked for, or the baseline/upper) are errors;
    ``upper=None``: no gap closure. ``context``, ``seeds``: as for :func:`load_groups`; ``groups``: its result when
    the caller has already loaded them."""
    base, up = strategy_of(baseline, "--baseline"), strategy_of(upper, "--upper") if upper else None
    groups = load_groups(runs_dir, context, seeds) if groups is None else groups
    wanted = list(strategies) if strategies else list(groups)
    needed = [(base, "--baseline (SeqLoRA)")] + ([(up, "--upper (multitask)")] if up else [])
    for name, why in needed + [(s, "--strategies") for s in wanted]:
        if name not in groups:
            raise ValueError(f"{runs_dir}: no complete run of strategy {name!r} ({why}); strategies there: "
                             f"{', '.join(groups) or 'none'}")  # fmt: skip
    chosen = {s: groups[s] for s in dict.fromkeys([base, *wanted, *([up] if up else [])])}
    chosen = {s: chosen[s] for s in groups if s in chosen}  # table order
    rows = stats.comparison_table(chosen, base, up, keys=KEYS, n_resamples=n_resamples, seed=seed)
    first = next(iter(chosen.values()))[0]
    return {"rows": rows, "info": {s: describe(rs) for s, rs in chosen.items()}, "baseline": base, "upper": up,
            "stream": first.results.get("stream"), "dir": str(runs_dir)}  # fmt: skip


def _num(v: float, signed: bool = False) -> str:
    return "–" if v is None or math.isnan(v) else f"{v:+.3f}" if signed else f"{v:.3f}"


def _ci(v: float, lo: float, hi: float, signed: bool = False) -> str:
    if math.isnan(lo):
        return f"{_num(v, signed)} (no CI)"
    return f"{_num(v, signed)} [{_num(lo, signed)}, {_num(hi, signed)}]"


def _p(p: float) -> str:
    return "–" if math.isnan(p) else "<0.001" if p < 0.001 else f"{p:.3f}"


def _head(m: str) -> str:
    return f"{m} ({stats.PAPER_NAMES[m]})" if m in stats.PAPER_NAMES else m


def verdict(row: dict[str, Any]) -> str:
    """``resolved: better/worse`` only where the difference's CI excludes 0 (and Holm keeps it), else why not."""
    v = row["verdict"]
    return f"resolved: {v}" if v in ("better", "worse") else v


def _runs_cell(i: dict[str, Any]) -> str:
    def n(k: int, word: str) -> str:
        return f"{k} {word}" + ("" if k == 1 else "s")

    lo, hi = min(i["items"].values(), default=0), max(i["items"].values(), default=0)
    items = "" if not i["items"] else f"; {lo if lo == hi else f'{lo}–{hi}'} test items/task"
    return f"{i['runs']} ({n(i['seeds'], 'seed')}, {n(i['orders'], 'order')}){items}"


def markdown(table: dict[str, Any]) -> str:
    """The main table (metrics with CIs), the paired differences from SeqLoRA, and the gap closure beside the
    published ratios."""
    rows, info, base, up = table["rows"], table["info"], table["baseline"], table["upper"]
    at = {(r["group"], r["metric"]): r for r in rows}
    out = [f"Stream `{table['stream']}`, runs under `{table['dir']}`; 95% CIs (docs/statistics.md). Values are "
           "lmas' metrics under the papers' names too; SAPT's F.Ra, BWT and FWT are defined differently "
           "(docs/statistics.md, Paper names).", "",
           "| strategy | in the papers | runs (distinct seeds, orders); test items | " + " | ".join(map(_head, KEYS)) + " |",
           "|---|---|---|" + "---|" * len(KEYS)]  # fmt: skip
    for s, i in info.items():
        cells = [_ci(at[s, k]["mean"], at[s, k]["low"], at[s, k]["high"]) if (s, k) in at else "–" for k in KEYS]
        out.append(f"| {s} | {PAPER_METHOD.get(method(s), '')} | {_runs_cell(i)} | " + " | ".join(cells) + " |")
    items = info[base]["items"]
    if items:
        out += ["", "Test items per task (the same in every run): " + ", ".join(f"{t} {n}" for t, n in items.items())]
    out += ["", f"Paired difference from {base} (SeqLoRA), same stream, task order and seed; p: the test's, "
            "p (Holm): corrected over the whole table:", "",
            "| strategy | metric | difference [95% CI] | p | p (Holm) | verdict | test |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if "diff" in r:
            diff = _ci(r["diff"], r["diff_low"], r["diff_high"], signed=True)
            out.append(f"| {r['group']} | {_head(r['metric'])} | {diff} | {_p(r['p'])} | {_p(r['p_holm'])} | "
                       f"{verdict(r)} | {r['test']} |")  # fmt: skip
    out += ["", f"Gap closure on avg_acc (AP): (method − {base}) / ({up} − {base}); 0 = SeqLoRA, 1 = multitask. "
            "Published: the same ratio from a paper's numbers (sources below):", "",
            "| strategy | gap closure [95% CI] | verdict | published | CI method |",
            "|---|---|---|---|---|"]  # fmt: skip
    for s in info:
        r = at.get((s, stats.GAP))
        if r is None:
            continue
        resolved = r["low"] > 0 or r["high"] < 0  # False for NaN
        diff = at.get((s, "avg_acc"), {}).get("verdict", "")
        if math.isnan(r["mean"]):
            word = f"undefined: {up} = {base} on avg_acc"
        elif not resolved:
            word = stats.NOT_RESOLVED
        elif diff not in ("better", "worse"):  # the ratio is resolved only as far as the difference it divides
            word = f"CI excludes 0, but the avg_acc difference is {diff or 'untested'}"
        else:
            word = "resolved: closes part of the gap" if r["low"] > 0 else "resolved: below SeqLoRA"
        pub = "; ".join(f"{g:.2f} ({e['setting']})" for g, e in published_ratios(s)) or "–"
        out.append(f"| {s} | {_ci(r['mean'], r['low'], r['high'])} | {word} | {pub} | {r['ci']} |")
    out += ["", "Published average accuracies (%):"]
    for e in PUBLISHED:
        nums = ", ".join(f"{PAPER_METHOD.get(k, k)} {v}" for k, v in e["avg_acc"].items())
        has = "naive" in e["avg_acc"] and "joint" in e["avg_acc"]
        note = "" if has else " (no ratio: the source gives no SeqLoRA and multitask pair)"
        out.append(f"- {e['setting']}: {nums} — {e['source']}{note}")
    return "\n".join(out)


def to_csv(table: dict[str, Any], path: str | os.PathLike) -> Path:
    """Long format (:data:`CSV_FIELDS`): one row per strategy and metric (and ``gap_closure``), stats' numbers
    unrounded, the strategy's runs, seeds, orders and test items, and the published ratios."""
    out = Path(path)
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in table["rows"]:
            i = table["info"][r["group"]]
            row = {**r, "strategy": r["group"], "paper_name": PAPER_METHOD.get(method(r["group"]), ""),
                   "runs": i["runs"], "seeds": i["seeds"], "orders": i["orders"],
                   "items_per_task": " ".join(f"{t}:{n}" for t, n in i["items"].items())}  # fmt: skip
            if "verdict" in r:
                row["verdict"] = verdict(r)
            if r["metric"] == stats.GAP:
                pubs = published_ratios(r["group"])
                row["published_ratio"] = " ".join(f"{g:.4f}" for g, _ in pubs)
                row["published_source"] = " | ".join(f"{e['source']} ({e['setting']})" for _, e in pubs)
            w.writerow(row)
    return out


def _call(row: dict[str, Any] | None) -> str:
    """A difference's verdict in one word: ``better``/``worse`` where resolved (CI and Holm), ``unresolved``."""
    if row is None:
        return "missing"
    return row["verdict"] if row["verdict"] in ("better", "worse") else "unresolved"


def agreement(tables: dict[str, dict[str, Any]], keys: Sequence[str] = ("avg_acc", "forgetting")) -> list[dict]:
    """The protocol check: per strategy (in every table) and metric, each protocol's paired difference from
    SeqLoRA with its verdict (:func:`_call`), ``agree`` (the same verdict in every protocol) and ``same_sign``
    (the point estimates on the same side of 0). ``tables``: protocol name -> :func:`build`'s table."""
    at = {name: {(r["group"], r["metric"]): r for r in t["rows"] if "diff" in r} for name, t in tables.items()}
    first = next(iter(tables.values()))
    shared = [s for s in first["info"] if s != first["baseline"] and all(s in t["info"] for t in tables.values())]
    out = []
    for s in shared:
        for k in keys:
            cells = {name: at[name].get((s, k)) for name in tables}
            calls = {name: _call(r) for name, r in cells.items()}
            signs = {math.copysign(1, r["diff"]) if r and r["diff"] else 0 for r in cells.values()}
            out.append({"strategy": s, "metric": k, "cells": cells, "calls": calls,
                        "agree": len(set(calls.values())) == 1 and "missing" not in calls.values(),
                        "same_sign": len(signs) == 1 and 0 not in signs})  # fmt: skip
    return out


def agreement_markdown(tables: dict[str, dict[str, Any]]) -> str:
    """:func:`agreement` as a markdown table, with how many verdicts agree."""
    rows = agreement(tables)
    names = list(tables)
    out = ["| strategy | metric | " + " | ".join(f"{n}: difference from SeqLoRA [95% CI]" for n in names) +
           " | verdicts | agree | same sign |", "|---|---|" + "---|" * len(names) + "---|---|---|"]  # fmt: skip
    for r in rows:
        cells = r["cells"].values()
        diffs = [_ci(c["diff"], c["diff_low"], c["diff_high"], signed=True) if c else "–" for c in cells]
        out.append(f"| {r['strategy']} | {_head(r['metric'])} | " + " | ".join(diffs) +
                   f" | {' / '.join(r['calls'].values())} | {'yes' if r['agree'] else 'no'} | "
                   f"{'yes' if r['same_sign'] else 'no'} |")  # fmt: skip
    runs = "; ".join(f"{n}: {sum(i['runs'] for i in t['info'].values())} runs under `{t['dir']}`"
                     for n, t in tables.items())  # fmt: skip
    agree = sum(r["agree"] for r in rows)
    return "\n".join([f"Protocol check ({runs}). Verdicts: resolved better/worse (CI excludes 0 and Holm keeps it) "
                      "or unresolved.", "", *out, "",
                      f"The verdicts agree on {agree} of {len(rows)} comparisons; the point estimates lie on the same "
                      f"side of 0 in {sum(r['same_sign'] for r in rows)}. Tests: " + "; ".join(
                          f"{n}: {', '.join(sorted({c['test'] for r in rows if (c := r['cells'][n])}))}"
                          for n in names)])  # fmt: skip


def check_main(args: Any) -> None:
    """``experiments/tables.py protocol_check FAST ALL_LAYERS``: the two protocols' verdicts side by side, each
    table built on the strategies both folders hold (so that Holm's correction runs over the same family)."""
    dirs = dict(zip(("fast", "all layers"), args.runs_dirs, strict=True))
    every = [json.loads(f.read_text()) for d in dirs.values() for f in sorted(Path(d).rglob("results.json"))]
    try:
        loaded = {name: load_groups(d, every, args.seeds) for name, d in dirs.items()}
        common = [s for s in loaded["fast"] if all(s in g for g in loaded.values())]
        upper = "strategy=joint" if "joint" in common else None  # the gap closure is not compared here
        built = {name: build(d, upper=upper, strategies=common, n_resamples=args.resamples, groups=loaded[name])
                 for name, d in dirs.items()}  # fmt: skip
    except ValueError as err:
        raise SystemExit(f"protocol_check: {err}") from err
    print(agreement_markdown(built))


def main(args: Any) -> None:
    """``experiments/tables.py reproduction``: print the markdown; with ``--out``, write the CSV."""
    try:
        table = build(args.runs_dir, args.baseline, args.upper,
                      [s for s in (args.strategies or "").split(",") if s] or None)  # fmt: skip
    except ValueError as err:
        raise SystemExit(f"reproduction: {err}") from err
    print(markdown(table))
    if args.out:
        print(f"\nwritten: {to_csv(table, args.out)}")
