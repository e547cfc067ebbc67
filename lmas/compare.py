"""``lmas-compare DIR...``: aggregate the results.json of runs into one comparison table.

Runs are grouped by the Hydra overrides they differ in (``.hydra/overrides.yaml``, or a study's
``overrides.yaml``; the ``seed`` and the task order ``stream.order`` are what repeats inside a group, overrides
every run has are left out of the names; runs without recorded overrides by their strategy and the options that
differ between them: :func:`run_settings`); each group reports mean ± std over its runs of the
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

from lmas.metrics.stats import KEYS, PAPER_NAMES

METRICS = KEYS
"""Every metric a run's summary may hold (classification, perplexity, general-ability probes); a table shows those
its runs have."""
IGNORED_OVERRIDES = ("seed", "stream.order", "paths.", "logger", "hydra.", "progress", "debug")


SAME_RESULTS = ("eval.mixed_adapters", "eval.shared_trunk", "eval.cache", "train.trunk_cache", "train.compile",
                "distill.cache")  # fmt: skip
"""Performance options whose results are identical (benchmarks/README.md's table): never a run's setting."""
WHERE_AND_SPEED = ("paths.", "logger.", "progress", "resume", "hydra.", "stream.data_dir", "model.cache", *SAME_RESULTS)
"""Config keys that say where files are or how fast a run goes, never what it computes."""
NOT_SETTINGS = (*WHERE_AND_SPEED, "stream.order")
"""Config keys that are not a group's setting: :data:`WHERE_AND_SPEED`, and what repeats inside a group (the task
order; every key ending in ``seed``)."""


@dataclass
class Run:
    path: Path
    results: dict
    overrides: list[str]
    settings: tuple[str, ...] = ()
    """Without recorded overrides: the options that tell this run from the others (:func:`run_settings`)."""
    shared: frozenset[str] = frozenset()
    """Overrides every compared run has (a study's fixed ones): they tell no group apart and are left out."""

    @property
    def kept(self) -> list[str]:
        """The overrides that can set a group: not seeds, orders, paths (:data:`IGNORED_OVERRIDES`)."""
        return [o for o in self.overrides if not o.lstrip("+~").startswith(IGNORED_OVERRIDES)]

    @property
    def group(self) -> str:
        own = sorted(o for o in self.kept if o not in self.shared)
        return ",".join(own) or ",".join([f"strategy={self.results.get('strategy', '?')}", *self.settings])


def flat_config(d: dict, prefix: str = "") -> dict[str, object]:
    """A nested config as ``{"train.lr": value}`` (lists are values)."""
    out: dict[str, object] = {}
    for k, v in d.items():
        out.update(flat_config(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _override_value(v: object) -> str:
    return json.dumps(v) if v is None or isinstance(v, bool) else str(v)


def _varying(cfgs: list[dict[str, object]], keys: set[str]) -> list[str]:
    """``keys`` every config has, with more than one value among them (seeds and :data:`NOT_SETTINGS` aside)."""
    return [k for k in sorted(keys) if not k.endswith("seed") and not k.startswith(NOT_SETTINGS)
            and all(k in c for c in cfgs) and len({repr(c[k]) for c in cfgs}) > 1]  # fmt: skip


def run_settings(results: list[dict], strategy_only: bool = False) -> list[tuple[str, ...]]:
    """Per run, ``key=value`` for every option (results.json ``config``) that tells it from the other runs: an
    option outside ``strategy`` whose value differs between any of them, and a ``strategy.*`` option that differs
    between runs of the same strategy (``strategy_only``: only these). Runs without recorded overrides (a study's
    committed runs, runs copied without ``.hydra``) at two aggregators or two λ are then two groups, never pooled.
    Seeds and task orders are what repeats inside a group; an option only some runs have (written by another lmas
    version) does not split them; :data:`NOT_SETTINGS` never do."""
    cfgs = [flat_config(r.get("config") or {}) for r in results]
    shared = [] if strategy_only else _varying(cfgs, {k for c in cfgs for k in c if not k.startswith("strategy.")})
    by_name: dict[object, list[int]] = {}
    for i, r in enumerate(results):
        by_name.setdefault(r.get("strategy"), []).append(i)
    out: list[tuple[str, ...]] = [()] * len(results)
    for idx in by_name.values():
        own = [cfgs[i] for i in idx]
        keys = {k for c in own for k in c if k.startswith("strategy.") and k != "strategy._target_"}
        varying = shared + _varying(own, keys)
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
            files = [f.parent / ".hydra" / "overrides.yaml", f.parent / "overrides.yaml"]  # Hydra's; a study's
            ov_file = next((o for o in files if o.is_file()), None)
            overrides = yaml.safe_load(ov_file.read_text()) if ov_file else []
            runs.append(Run(f.parent, results, list(overrides or [])))
    if not runs:
        raise ValueError(f"no complete runs under {', '.join(map(str, dirs))}")
    bare = [r for r in runs if not r.overrides]
    for r, settings in zip(bare, run_settings([r.results for r in bare]), strict=True):
        r.settings = settings
    recorded = [set(r.kept) for r in runs if r.overrides]
    shared = frozenset(set.intersection(*recorded)) if len(recorded) > 1 else frozenset()
    for r in runs:
        r.shared = shared
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


def metrics_of(runs: list[Run], agent: str | None = None) -> list[str]:
    """The :data:`METRICS` every run has for ``agent`` (default: each run's first): what the statistics compare."""
    have = [set(r.results["metrics"].get(agent or next(iter(r.results["metrics"])), {})) for r in runs]
    return [k for k in METRICS if all(k in h for h in have)]


def compare(runs: list[Run], agent: str | None = None) -> list[dict]:
    """One row per group: ``group``, ``n``, ``<metric>_mean``/``_std`` for the :data:`METRICS` all its runs have, and
    the costs' (:data:`COSTS`)."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        if agent is not None and agent not in r.results["metrics"]:
            raise ValueError(f"{r.path}: no agent {agent!r} in its metrics (it has {', '.join(r.results['metrics'])})")
        groups.setdefault(r.group, []).append(r)
    rows = []
    for name, members in groups.items():
        row: dict = {"group": name, "n": len(members), "seeds": sorted(m.results.get("seed") for m in members)}
        for key in metrics_of(members, agent):  # a cell never averages over only some of its group's runs
            vals = [m.results["metrics"][agent or next(iter(m.results["metrics"]))][key] for m in members]
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
    try:
        rows = compare(runs, args.agent)
    except ValueError as err:
        print(f"lmas-compare: {err}", file=sys.stderr)
        return 2
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
            srows = stats.comparison_table(groups, baseline, upper, args.agent, keys=metrics_of(runs, args.agent))
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
