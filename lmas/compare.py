"""``lmas-compare DIR...``: aggregate the results.json of runs into one comparison table.

Runs are grouped by the Hydra overrides they differ in (the ``seed`` and the task order ``stream.order`` are what
repeats inside a group; runs without recorded overrides, such as a study's committed runs, by their strategy and
the strategy settings that differ between its runs); each group reports mean ± std over its runs of the
continual-learning metrics (read from each results.json's ``metrics``, computed once by
``KnowledgeMatrix.summary``; never recomputed here) and the training time. Writes ``comparison.csv``,
``comparison.md`` and ``comparison.png``.

With ``--baseline GROUP`` it also writes the statistics (:mod:`lmas.metrics.stats`, docs/statistics.md): each
metric with its 95% CI, each group's paired difference from the baseline with its CI, p-value and Holm-corrected
p-value, and (with ``--upper GROUP``, the multitask run) the gap-closure ratio — ``comparison_stats.md``/``.csv``.
A group with fewer runs than the baseline (one order, two seeds) is compared with the baseline's runs of the same
stream, task order and seed. Tables also name the metrics as the LLM continual-learning papers do:
``avg_acc (AP)``, ``forgetting (F.Ra)``, ``bwt (BWT)``, ``fwt (FWT)`` (``comparison_stats.csv``: its ``paper``
column); docs/statistics.md gives where the papers' definitions differ from ours.

    lmas-compare outputs/multiruns/2026-11-29_10-00-00
    lmas-compare DIR --baseline strategy=naive --upper strategy=joint
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from lmas.metrics.stats import PAPER_NAMES

METRICS = ("avg_acc", "forgetting", "bwt", "fwt", "plasticity")
IGNORED_OVERRIDES = ("seed", "stream.order", "paths.", "logger", "hydra.", "progress", "debug")


@dataclass
class Run:
    path: Path
    results: dict
    overrides: list[str]
    settings: tuple[str, ...] = ()
    """Without recorded overrides: the strategy settings that tell this run from other runs of its strategy
    (:func:`strategy_settings`)."""

    @property
    def group(self) -> str:
        kept = [o for o in self.overrides if not o.lstrip("+~").startswith(IGNORED_OVERRIDES)]
        return ",".join(sorted(kept)) or ",".join([f"strategy={self.results.get('strategy', '?')}", *self.settings])


def _flat(d: dict, prefix: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _override_value(v: object) -> str:
    return json.dumps(v) if v is None or isinstance(v, bool) else str(v)


def strategy_settings(results: list[dict]) -> list[tuple[str, ...]]:
    """Per run, ``strategy.<key>=<value>`` for every strategy setting (results.json ``config.strategy``) whose
    value differs between runs of the same strategy, so that runs without recorded overrides (a study's committed
    runs) at two values of a weight are two groups, never pooled. Seeds are what repeats inside a group and are
    ignored; a key that only some runs have (written by a later version) does not split them."""
    cfgs = [_flat((r.get("config") or {}).get("strategy") or {}, "strategy.") for r in results]
    by_name: dict[object, list[int]] = {}
    for i, r in enumerate(results):
        by_name.setdefault(r.get("strategy"), []).append(i)
    out: list[tuple[str, ...]] = [()] * len(results)
    for idx in by_name.values():
        keys = sorted({k for i in idx for k in cfgs[i]} - {"strategy._target_"})
        varying = [
            k for k in keys
            if not k.endswith("seed") and all(k in cfgs[i] for i in idx) and len({repr(cfgs[i][k]) for i in idx}) > 1
        ]  # fmt: skip
        for i in idx:
            out[i] = tuple(f"{k}={_override_value(cfgs[i][k])}" for k in varying)
    return out


def overrides_of(group: str) -> set[str]:
    """A group name's ``key=value`` items (a value may hold commas: ``transfer.scales=[0,1]``)."""
    return set(re.split(r",(?=[+~]?[\w.]+=)", group)) if group else set()


def resolve_group(name: str, groups: list[str]) -> str:
    """The group ``name`` names: itself, or the one group whose overrides include all of ``name``'s
    (``strategy.lambda_orth=0.5`` for a group that also names the experiment); errors list the candidates."""
    if name in groups:
        return name
    wanted = overrides_of(name)
    matches = [g for g in groups if wanted <= overrides_of(g)]
    if len(matches) != 1:
        found = "no group has" if not matches else f"{len(matches)} groups have"
        raise ValueError(f"{found} the overrides {sorted(wanted)}; groups: {matches or sorted(groups)}")
    return matches[0]


def find_runs(dirs: list[str | Path]) -> list[Run]:
    """Every complete run (a folder with results.json) under ``dirs``; errors name the folder."""
    runs: list[Run] = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise ValueError(f"{d}: not a directory")
        found = sorted(d.rglob("results.json"))
        if not found:
            raise ValueError(f"{d}: no results.json found under it (expected an lmas run or multirun dir)")
        for f in found:
            try:
                results = json.loads(f.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{f}: not valid JSON ({err})") from err
            if not results.get("complete"):
                print(f"lmas-compare: skipping {f.parent} (run not complete)", file=sys.stderr)
                continue
            ov_file = f.parent / ".hydra" / "overrides.yaml"
            overrides = yaml.safe_load(ov_file.read_text()) if ov_file.is_file() else []
            runs.append(Run(f.parent, results, list(overrides or [])))
    if not runs:
        raise ValueError(f"no complete runs under {', '.join(map(str, dirs))}")
    bare = [r for r in runs if not r.overrides]
    for r, settings in zip(bare, strategy_settings([r.results for r in bare]), strict=True):
        r.settings = settings
    streams: dict[str, list[str]] = {}
    for r in runs:
        streams.setdefault(r.results["stream"], []).append(str(r.path))
    if len(streams) > 1:
        detail = "; ".join(f"{s}: {len(p)} runs, e.g. {p[0]}" for s, p in streams.items())
        raise ValueError(f"runs on different streams cannot be compared: {detail}")
    return runs


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


COSTS = ("train_s", "eval_s", "wall_s", "comm_mb")
"""The cost columns: seconds of training, evaluation and wall time (results.json ``timings``), and the megabytes
of every message between agents (``population.communication``: adapters, label distributions, examples, ...)."""


def cost(results: dict, key: str) -> float | None:
    """One run's :data:`COSTS` entry (None when the run did not record it)."""
    if key == "comm_mb":
        rounds = results.get("population", {}).get("communication")
        return None if rounds is None else sum(r["bytes"] for r in rounds) / 1e6
    return results.get("timings", {}).get(key)


def compare(runs: list[Run], agent: str | None = None) -> list[dict]:
    """One row per group: ``group``, ``n``, ``<metric>_mean``/``_std`` and the costs' (:data:`COSTS`)."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    rows = []
    for name, members in groups.items():
        row: dict = {"group": name, "n": len(members), "seeds": sorted(m.results.get("seed") for m in members)}
        for key in METRICS:
            vals = []
            for m in members:
                who = agent or next(iter(m.results["metrics"]))
                value = m.results["metrics"].get(who, {}).get(key)
                if value is not None:
                    vals.append(value)
            if vals:
                row[f"{key}_mean"], row[f"{key}_std"] = mean_std(vals)
        for key in COSTS:
            vals = [v for m in members if (v := cost(m.results, key)) is not None]
            if vals:
                row[f"{key}_mean"], row[f"{key}_std"] = mean_std(vals)
        rows.append(row)
    return sorted(rows, key=lambda r: -r.get("avg_acc_mean", float("-inf")))


def header(key: str) -> str:
    """A metric's column title: ``avg_acc (AP)`` where the papers have a name for it."""
    return f"{key} ({PAPER_NAMES[key]})" if key in PAPER_NAMES else key


def to_markdown(rows: list[dict]) -> str:
    cols = [k for k in (*METRICS, *COSTS) if any(f"{k}_mean" in r for r in rows)]
    head = "| group | runs | " + " | ".join(header(c) for c in cols) + " |"
    sep = "|---|---|" + "---|" * len(cols)
    body = []
    for r in rows:
        cells = [f"{r[f'{c}_mean']:.3f} ± {r[f'{c}_std']:.3f}" if f"{c}_mean" in r else "-" for c in cols]
        body.append(f"| {r['group']} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def write_outputs(rows: list[dict], out: Path) -> dict[str, Path]:
    """comparison.csv, comparison.md and comparison.png in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "comparison.csv", "md": out / "comparison.md", "png": out / "comparison.png"}
    keys = ["group", "n", "seeds"] + sorted({k for r in rows for k in r} - {"group", "n", "seeds"})
    with open(paths["csv"], "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    paths["md"].write_text(to_markdown(rows) + "\n")
    shown = [k for k in ("avg_acc", "forgetting", "fwt") if any(f"{k}_mean" in r for r in rows)]
    fig = Figure(figsize=(max(6, 1.2 * len(rows) * len(shown)), 4))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(shown))
    for i, key in enumerate(shown):
        xs = [j + i * width for j in range(len(rows))]
        ax.bar(
            xs,
            [r.get(f"{key}_mean", 0) for r in rows],
            width,
            yerr=[r.get(f"{key}_std", 0) for r in rows],
            label=header(key),
            capsize=3,
        )
    ax.set_xticks([j + width * (len(shown) - 1) / 2 for j in range(len(rows))])
    ax.set_xticklabels([r["group"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend()
    ax.set_title("mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=100)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmas-compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="run or multirun directories")
    parser.add_argument("--out", help="where to write comparison.* (default: the first dir)")
    parser.add_argument("--agent", help="agent whose metrics are compared (default: each run's first)")
    parser.add_argument("--baseline", help="group every other is compared with, e.g. strategy=naive (statistics)")
    parser.add_argument("--upper", help="the multitask group, for the gap-closure ratio (with --baseline)")
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.dirs)
    except ValueError as err:
        print(f"lmas-compare: {err}", file=sys.stderr)
        return 2
    rows = compare(runs, args.agent)
    paths = write_outputs(rows, Path(args.out or args.dirs[0]))
    print(f"{len(runs)} runs, stream {runs[0].results['stream']}\n")
    print(to_markdown(rows))
    print(f"\nwritten: {paths['csv']}  {paths['md']}  {paths['png']}")
    if args.baseline:
        from lmas.metrics import stats

        groups: dict[str, list[Path]] = {}
        for r in runs:
            groups.setdefault(r.group, []).append(r.path)
        try:
            baseline = resolve_group(args.baseline, list(groups))
            upper = resolve_group(args.upper, list(groups)) if args.upper else None
            srows = stats.comparison_table(groups, baseline, upper, args.agent)
        except ValueError as err:
            print(f"lmas-compare: {err}", file=sys.stderr)
            return 2
        out = Path(args.out or args.dirs[0])
        table = stats.to_markdown(srows, baseline)
        (out / "comparison_stats.md").write_text(table + "\n")
        stats.to_csv(srows, out / "comparison_stats.csv")
        print(f"\n{table}\n\nwritten: {out / 'comparison_stats.md'}  {out / 'comparison_stats.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
