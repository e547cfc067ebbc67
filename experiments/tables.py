"""Print the README tables of experiments/ from finished runs' ``results.json``.

    python experiments/tables.py forward_transfer <run dir or multirun dir> ... [--plot curves.png]
    python experiments/tables.py topologies <run or multirun dir> ...
    python experiments/tables.py distillation <specialists runs> ... [--joint <joint runs> ...]
    python experiments/tables.py minilm <run or multirun dir> ...
    python experiments/tables.py self_learning <run or multirun dir> ...
    python experiments/tables.py probes <run or multirun dir> ...
    python experiments/tables.py model_selection <runs dir>
    python experiments/tables.py agents <runs dir> --baseline s_none [--agents s_kl,s_rkl] [--metrics avg_acc]
    python experiments/tables.py reproduction <runs dir> [--baseline strategy=naive --upper strategy=joint]
        [--strategies naive,olora,...] [--out table.csv]
    python experiments/tables.py protocol_check <fast runs dir> <all-layer runs dir> [--seeds 0,1]
    python experiments/tables.py federated <runs dir>
    python experiments/tables.py merge_methods <runs dir> [--baseline merged_exact]
    python experiments/tables.py consolidation <runs dir> [--agent population]

``reproduction`` is the reproduction study's main table with 95% CIs, paired differences from SeqLoRA (Holm) and
gap-closure ratios beside the published ones, all computed by ``lmas.metrics.stats`` from the committed runs'
records (``experiments/reproduction/table.py``); ``federated`` the federated study's table, each aggregator against
the local-only baseline of its partition (``experiments/populations/table.py``); ``merge_methods`` each merge
method's quality, expert gap and cost against the exact merge (``experiments/knowledge_transfer/table.py``);
``consolidation`` the library's size and the population's accuracy with and without consolidation
(``experiments/consolidation/table.py``).

Each argument is a run directory (with ``results.json``) or a directory holding several (a Hydra
multirun). Values are read, never recomputed: accuracies from ``matrix`` (rows: agents, then the
``population`` row where a topology answers jointly; the last round, which is also the round
``avg_acc`` is defined on), continual-learning metrics (avg_acc, forgetting, ...) from ``metrics``
(computed once, by ``KnowledgeMatrix.summary``; formulas in ``lmas/metrics/cl.py``), curves from
``learning_curves``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmas.metrics.intervals import Interval


def load_runs(paths: list[str]) -> list[dict]:
    """Every finished run under ``paths``, in path order; each dict gets its ``dir``."""
    runs = []
    for p in map(Path, paths):
        files = [p / "results.json"] if (p / "results.json").is_file() else sorted(p.glob("*/results.json"))
        if not files:
            raise SystemExit(f"{p}: no results.json here or one level below (is it a run or multirun directory?)")
        for f in files:
            run = json.loads(f.read_text())
            if not run.get("complete", True):
                print(f"note: {f.parent} is not complete (its last round is shown)", file=sys.stderr)
            run["dir"] = str(f.parent)
            runs.append(run)
    return runs


def final(run: dict) -> dict[str, dict[str, float | None]]:
    """``{row: {task: value}}`` after the last round (rows: agents, then ``population`` where a topology answers)."""
    m = run["matrix"]
    return {a: dict(zip(m["tasks"], row, strict=True)) for a, row in zip(m["agents"], m["values"][-1], strict=True)}


def fmt(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return fmt(values[0])
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


# --- knowledge_transfer ---------------------------------------------------------------------------
def new_task(run: dict) -> tuple[str, str]:
    """(agent, task) trained in the run's last round: the new task of a forward-transfer run."""
    trained = run["matrix"]["trained"]
    last = max(r for r, _, _ in trained)
    ((agent, task),) = [(a, t) for r, a, t in trained if r == last]
    return agent, task


def forward_transfer(runs: list[dict]) -> str:
    """Per run: the new agent's validation curve on the new task; then the mean per transfer."""
    rows, by = [], {}
    for run in runs:
        agent, task = new_task(run)
        curve = [acc for _, acc in run["learning_curves"][f"{agent}/{task}"]]
        transfer, seed = run["population"]["transfer"], run["seed"]
        test = final(run)[agent][task]
        entry = {"start": curve[0], "curve_mean": statistics.mean(curve), "test": test}
        by.setdefault(transfer, []).append(entry)
        rows.append([transfer, str(seed), " ".join(f"{a:.2f}" for a in curve), fmt(entry["curve_mean"]), fmt(test)])
    out = table(["transfer", "seed", f"{task} val accuracy every {runs[0]['config']['eval']['curve_every']} steps",
                 "curve mean", f"{task} test after training"], rows)
    summary = [[t, str(len(e)), mean_sd([x["start"] for x in e]), mean_sd([x["curve_mean"] for x in e]),
                mean_sd([x["test"] for x in e])] for t, e in by.items()]
    return out + "\n\n" + table(["transfer", "seeds", "val at step 0", "curve mean", "test after training"], summary)


def plot_forward_transfer(runs: list[dict], path: str) -> None:
    """The new agent's validation curves: one thin line per run, the mean per transfer in bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    by: dict[str, list[list[tuple[int, float]]]] = {}
    for run in runs:
        agent, task = new_task(run)
        by.setdefault(run["population"]["transfer"], []).append(run["learning_curves"][f"{agent}/{task}"])
    for i, (transfer, curves) in enumerate(by.items()):
        color = f"C{i}"
        for c in curves:
            ax.plot([s for s, _ in c], [a for _, a in c], color=color, alpha=0.25, lw=1)
        steps = [s for s, _ in curves[0]]
        mean = [statistics.mean(c[k][1] for c in curves) for k in range(len(steps))]
        ax.plot(steps, mean, color=color, lw=2.2, label=f"{transfer} (mean of {len(curves)})")
    ax.set_xlabel("training step of the new task")
    ax.set_ylabel(f"{task} validation accuracy")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def topologies(runs: list[dict]) -> str:
    rows = []
    for run in runs:
        name = run["population"]["topology"]["name"]
        tasks = run["matrix"]["tasks"]
        pop = final(run)["population"]
        agents = {a: v for a, v in final(run).items() if a != "population"}
        best = [max((v[t] for v in agents.values() if v[t] is not None), default=None) for t in tasks]
        metrics = run["metrics"].get("population", {})
        comm = run["population"]["communication"]
        last = run["population"]["answers"][-1]
        escalation = " / ".join(fmt(last.get(t, {}).get("escalation_rate"), 2) for t in tasks)
        trained = "; ".join(f"r{r}: {a}←{t}" for r, a, t in run["matrix"]["trained"] if a != "population")
        rows.append([name, str(run["seed"]), trained, " / ".join(fmt(pop[t], 2) for t in tasks),
                     " / ".join(fmt(b, 2) for b in best), fmt(metrics.get("avg_acc")), fmt(metrics.get("forgetting")),
                     escalation, str(sum(c["messages"] for c in comm)), f"{sum(c['bytes'] for c in comm) / 1e6:.2f}"])
    return table(["topology", "seed", "trained (round: agent←task)", f"population {' / '.join(tasks)}",
                  "best single agent per task", "population avg_acc", "population forgetting",
                  "escalation rate (last round)", "messages", "MB sent"], rows)


# --- distillation ---------------------------------------------------------------------------------
def distillation(specs: list[dict], joints: list[dict]) -> str:
    """Every agent's final test accuracy per task (mean ± sd over the runs, usually seeds)."""
    tasks = specs[0]["matrix"]["tasks"]
    rows: dict[str, list[dict[str, float]]] = {
        "untrained model": [dict(zip(tasks, r["matrix"]["initial"][0], strict=True)) for r in specs]}
    for run in specs:
        for agent, accs in final(run).items():
            rows.setdefault(agent, []).append(accs)
    for run in joints:
        (agent, accs), = final(run).items()
        rows.setdefault(f"joint upper bound ({agent}, strategy=joint)", []).append(accs)
    out = []
    for name, runs in rows.items():
        per_task = [mean_sd([r[t] for r in runs]) for t in tasks]
        out.append([name, *per_task, mean_sd([statistics.mean(r[t] for t in tasks) for r in runs])])
    seeds = sorted({r["seed"] for r in specs})
    return f"seeds {seeds}, {len(joints)} joint run(s)\n\n" + table(["agent", *tasks, "mean"], out)


def minilm(runs: list[dict]) -> str:
    """Per run: the agents' test accuracy per round, and each external teacher's own test accuracy."""
    rows = []
    for run in runs:
        m, seed = run["matrix"], str(run["seed"])
        rows.append([seed, "–", "untrained model", *[fmt(v) for v in m["initial"][0]]])
        rows += [[seed, str(r), agent, *[fmt(v) for v in accs]]
                 for r, values in enumerate(m["values"]) for agent, accs in zip(m["agents"], values, strict=True)]
        teacher: dict[str, dict[str, float]] = {}
        for agent in run["agents"].values():
            for e in agent["history"]:
                for name, acc in e.get("external_teacher_accuracy", {}).items():
                    teacher.setdefault(name, {})[e["task"]] = acc.get("test")
        rows += [[seed, "–", f"teacher {name} (test)", *[fmt(accs.get(t)) for t in m["tasks"]]]
                 for name, accs in teacher.items()]
    return table(["seed", "round", "agent", *runs[0]["matrix"]["tasks"]], rows)


def self_learning(runs: list[dict]) -> str:
    """Per run and cycle: pseudo-labels kept and their precision, the gate, the student's accuracies."""
    parts = []
    for run in runs:
        sl = run["config"].get("selflearn") or run["config"]["loop"]  # runs before the loop group: `selflearn`
        m = run["matrix"]
        rows = []
        for cyc, values in zip(run["self_learning"], m["values"], strict=False):
            r = cyc["cycle"]
            accs = dict(zip(m["agents"], values, strict=True))[sl["student"]]
            label = "true labels (seed)" if r == 0 else "; ".join(
                f"{t} {st['kept']}/{st['arrived']} ({fmt(st['precision'], 2)})" for t, st in cyc["tasks"].items())
            gate = "–" if r == 0 else ("accepted" if cyc["accepted"] else "rejected, restored")
            rows.append([str(r), label, gate, *[fmt(a) for a in accs]])
        parts.append(f"labelling={sl['labelling']}, consolidate={sl['consolidate']}, seed={run['seed']}\n\n" +
                     table(["cycle", "pseudo-labels kept/arrived (precision)", "gate",
                            *[f"{sl['student']} {t} test" for t in m["tasks"]]], rows))
    return "\n\n".join(parts)


def probes(runs: list[dict]) -> str:
    """Per general-ability probe (scored, never trained) and strategy: the untrained model's score, each run's after
    the last round (by seed) and their mean change (first agent's row)."""
    names = list(dict.fromkeys(p for run in runs for p in run["matrix"].get("probes", [])))
    if not names:
        raise SystemExit("no general-ability probes in these runs (they run with probes=general)")
    by: dict[str, list[dict]] = {}
    for run in sorted(runs, key=lambda r: r["seed"]):
        by.setdefault(run["strategy"], []).append(run)
    rows = []
    for probe in names:
        for strategy, members in by.items():
            before, after = [], []
            for run in members:
                m = run["matrix"]
                if probe not in m["tasks"]:
                    raise SystemExit(f"{run['dir']}: no probe {probe!r} (its probes: {m.get('probes', [])})")
                before.append(m["initial"][0][m["tasks"].index(probe)])
                after.append(final(run)[m["agents"][0]][probe])
            change = statistics.mean(a - b for a, b in zip(after, before, strict=True))
            rows.append([probe, strategy, fmt(statistics.mean(before)), ", ".join(fmt(a) for a in after),
                         f"{change:+.3f}", ", ".join(str(r["seed"]) for r in members)])
    return table(["probe", "strategy", "untrained", "after the last round (per seed)", "mean change", "seeds"], rows)


# --- model_selection ------------------------------------------------------------------------------
def _ci(iv: Interval) -> str:
    return iv.show(signed=True, p=True)


def model_selection(runs_dir: str) -> str:
    """Which base wins which task, and the population's per-task selection against each base alone.

    Per task, each row's accuracy after the last round (mean over seeds, t-interval) and how many seeds selected
    each agent for it (``val_acc`` of the last round's answer); then ``avg_acc`` and ``forgetting`` of the
    population minus each base, and of one base minus the other, paired within each run: over the seeds (paired t)
    and over the test items of all seeds (paired bootstrap; item noise given these trained models).
    """
    from lmas.metrics.stats import load_run, paired_difference, run_interval

    runs = [load_run(f.parent) for f in sorted(Path(runs_dir).glob("*/results.json"))]
    if not runs:
        raise SystemExit(f"{runs_dir}: no finished runs (*/results.json)")
    m0 = runs[0].results["matrix"]
    agents, tasks = [a for a in m0["agents"] if a != "population"], m0["tasks"]
    n_test = {t["name"]: t["n_test"] for t in runs[0].results["tasks"]}
    rows = []
    for t in tasks:
        cells = []
        for row in [*agents, "population"]:
            iv = run_interval([final(r.results)[row][t] for r in runs])
            cells.append(f"{iv.estimate:.3f} [{iv.low:.3f}, {iv.high:.3f}]")
        picks = [agents[max(range(len(agents)), key=lambda i, r=r: r.results["population"]["answers"][-1][t]
                            ["val_acc"][i])] for r in runs]  # fmt: skip
        rows.append([t, str(n_test[t]), *cells, ", ".join(f"{a} {picks.count(a)}" for a in agents)])
    head = ["task", "n test", *agents, "population (select)", "selected (seeds)"]
    parts = [f"Accuracy after the last round, mean over {len(runs)} seeds [95% t-interval]:", table(head, rows)]
    pairs = [("population", a) for a in agents] + [(agents[0], agents[1])]
    diff_rows = []
    for x, y in pairs:
        for level in ("runs", "items"):
            d = paired_difference(runs, runs, agent=x, agent_b=y, keys=["avg_acc", "forgetting"], level=level)
            diff_rows.append([f"{x} − {y}", level, _ci(d["avg_acc"]), _ci(d["forgetting"]), d["avg_acc"].method])
    head = ["difference", "level", "avg_acc", "forgetting", "how"]
    parts += ["Paired differences [95% CI], p:", table(head, diff_rows)]
    return "\n\n".join(parts)


# --- agents: rows of the same runs compared with one of them -----------------------------------------
def agents(runs_dir: str, baseline: str, names: list[str] | None = None, keys: tuple[str, ...] = ("avg_acc",)) -> str:
    """Each agent row of the runs (e.g. one student per distillation loss) against the ``baseline`` row of the
    same runs: the row's metric over the seeds [95% t-interval], and its paired difference from the baseline over
    the seeds (paired t, Holm-corrected over the table) and over the test items of all seeds (paired bootstrap:
    item noise given these trained models). A difference is resolved only where the seed-level CI excludes 0
    and Holm keeps it."""
    from lmas.metrics.stats import holm, load_run, paired_difference, run_interval, verdict

    runs = [load_run(f.parent) for f in sorted(Path(runs_dir).glob("*/results.json"))]
    if not runs:
        raise SystemExit(f"{runs_dir}: no finished runs (*/results.json)")
    rows_of = runs[0].results["matrix"]["agents"]
    names = names or [a for a in rows_of if a != baseline]
    missing = [a for a in [baseline, *names] if a not in rows_of]
    if missing:
        raise SystemExit(f"{runs_dir}: no agent {missing} in the runs (agents: {', '.join(rows_of)})")
    cells, tests = [], []
    for a in names:
        for k in keys:
            iv = run_interval([r.metric(k, a) for r in runs])
            seeds = paired_difference(runs, runs, agent=a, agent_b=baseline, keys=[k], level="runs")[k]
            items = paired_difference(runs, runs, agent=a, agent_b=baseline, keys=[k], level="items")[k]
            cells.append((a, k, iv, seeds, items))
            tests.append(seeds.p)
    adjusted = holm(tests)
    rows = []
    for (a, k, iv, seeds, items), p in zip(cells, adjusted, strict=True):
        word = verdict({"metric": k, "diff": seeds.estimate, "diff_low": seeds.low, "diff_high": seeds.high,
                        "p_holm": p})  # fmt: skip
        rows.append([a, k, iv.show(), _ci(seeds), f"{p:.3f}", word,
                     _ci(items)])  # fmt: skip
    n_items = sum(t["n_test"] for t in runs[0].results["tasks"])
    head = ["agent", "metric", f"mean over {len(runs)} seeds [95% CI]", f"− {baseline}, seeds (paired t)",
            "p (Holm)", "verdict", f"− {baseline}, items (paired bootstrap)"]  # fmt: skip
    return (f"{len(runs)} runs (seeds {', '.join(str(r.results.get('seed')) for r in runs)}), {n_items} test items "
            f"per run, every row paired with `{baseline}` of the same run:\n\n" + table(head, rows))


def study_table(study: str) -> ModuleType:
    """``experiments/<study>/table.py``, loaded by path (this script is run as a file, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parent / study / "table.py"
    spec = importlib.util.spec_from_file_location(f"{study}_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    for name in ("forward_transfer", "topologies", "self_learning", "minilm", "probes"):
        sub.add_parser(name).add_argument("runs", nargs="+")
    sub.choices["forward_transfer"].add_argument("--plot", help="also draw the learning curves into this PNG")
    d = sub.add_parser("distillation")
    d.add_argument("runs", nargs="+")
    d.add_argument("--joint", nargs="*", default=[])
    sub.add_parser("model_selection", help="which base wins which task; selection vs each base (CIs)").add_argument(
        "runs_dir", help="the study's runs folder, e.g. experiments/model_selection/runs")
    r = sub.add_parser("reproduction", help="the reproduction study's main table (statistics from lmas.metrics.stats)")
    r.add_argument("runs_dir", help="the study's runs folder, e.g. experiments/reproduction/runs")
    r.add_argument("--baseline", default="strategy=naive", help="SeqLoRA's runs (default strategy=naive)")
    r.add_argument("--upper", default="strategy=joint", help="the multitask runs (default strategy=joint)")
    r.add_argument("--strategies", help="comma-separated strategies to show (default: every one found)")
    r.add_argument("--out", help="also write the table as CSV to this file")
    g = sub.add_parser("agents", help="agent rows of the same runs against one of them (CIs, paired, Holm)")
    g.add_argument("runs_dir", help="the study's runs folder, e.g. experiments/distillation/losses")
    g.add_argument("--baseline", required=True, help="the row every other is compared with, e.g. s_none")
    g.add_argument("--agents", help="comma-separated rows to show (default: every other)")
    g.add_argument("--metrics", default="avg_acc", help="comma-separated metrics (default avg_acc)")
    c = sub.add_parser("protocol_check", help="the reproduction study's protocol check: both protocols' verdicts")
    c.add_argument("runs_dirs", nargs=2, metavar="DIR", help="the fast and the all-layer runs folders, in that order")
    c.add_argument("--resamples", type=int, default=4999, help="bootstrap resamples (default 4999)")
    c.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], help="only these seeds, e.g. 0 or 0,1")
    sub.add_parser("federated", help="the federated study: each aggregator vs local-only, per partition").add_argument(
        "runs_dir", help="the study's runs folder, e.g. experiments/populations/federated")
    sl = sub.add_parser("self_learning_study", help="the self-learning study: each rule's gain over round 0 (CIs)")
    sl.add_argument("runs_dir", help="the study's runs folder, e.g. experiments/distillation/self_learning")
    sl.add_argument("--resamples", type=int, default=4999, help="bootstrap resamples (default 4999)")
    m = sub.add_parser("merge_methods", help="the merge-methods study: quality, expert gap, cost; each vs a baseline")
    m.add_argument("runs_dir", help="the study's runs folder, e.g. experiments/knowledge_transfer/merge_methods")
    m.add_argument("--baseline", default="merged_exact", help="the merged agent compared with (default merged_exact)")
    m.add_argument("--resamples", type=int, default=4999, help="bootstrap resamples (default 4999)")
    k = sub.add_parser("consolidation", help="the consolidation study: library size and accuracy, with and without")
    k.add_argument("runs_dir", help="the study's runs folder, e.g. experiments/consolidation/runs")
    k.add_argument("--agent", default="population", help="the row compared (default population)")
    args = parser.parse_args(argv)
    if args.what == "consolidation":
        print(study_table("consolidation").consolidation(args.runs_dir, args.agent))
        return
    if args.what == "merge_methods":
        print(study_table("knowledge_transfer").merge_methods(args.runs_dir, args.baseline, args.resamples))
        return
    if args.what == "self_learning_study":
        print(study_table("distillation").self_learning_study(args.runs_dir, args.resamples))
        return
    if args.what == "federated":
        print(study_table("populations").federated(args.runs_dir))
        return
    if args.what == "agents":
        names = [a for a in (args.agents or "").split(",") if a] or None
        print(agents(args.runs_dir, args.baseline, names, tuple(args.metrics.split(","))))
        return
    if args.what == "protocol_check":
        study_table("reproduction").check_main(args)
        return
    if args.what == "reproduction":
        study_table("reproduction").main(args)
        return
    if args.what == "model_selection":
        print(model_selection(args.runs_dir))
        return
    runs = load_runs(args.runs)
    if args.what == "forward_transfer":
        print(forward_transfer(runs))
        if args.plot:
            plot_forward_transfer(runs, args.plot)
    elif args.what == "topologies":
        print(topologies(runs))
    elif args.what == "distillation":
        print(distillation(runs, load_runs(args.joint) if args.joint else []))
    elif args.what == "minilm":
        print(minilm(runs))
    elif args.what == "probes":
        print(probes(runs))
    else:
        print(self_learning(runs))


if __name__ == "__main__":
    main()
