"""experiments/tables.py reads the README tables from real (tiny-model) runs of the presets."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("experiment_tables", ROOT / "experiments" / "tables.py")
tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tables)


def _rows(md: str) -> list[list[str]]:
    """The body rows of the last markdown table in ``md``."""
    last = md.strip().split("\n\n")[-1]
    lines = [ln for ln in last.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]


def test_forward_transfer_and_topologies(run_lmas, fast_overrides, tmp_path):
    runs = []
    for transfer in ("none", "merge_init"):
        run_lmas(fast_overrides + ["experiment=knowledge_transfer/forward_transfer", f"transfer={transfer}"],
                 tmp_path / "ft" / transfer)
    runs = tables.load_runs([str(tmp_path / "ft")])
    assert [r["population"]["transfer"] for r in runs] == ["merge_init", "none"]  # path order
    md = tables.forward_transfer(runs)
    for run, row in zip(runs, _rows(md.split("\n\n")[0])):
        curve = [a for _, a in run["learning_curves"]["agent2/news_b"]]
        assert row[0] == run["population"]["transfer"] and row[2] == " ".join(f"{a:.2f}" for a in curve)
        assert row[4] == f"{run['matrix']['values'][-1][2][2]:.3f}"  # agent2 on news_b, last round
    assert [r[0] for r in _rows(md)] == ["merge_init", "none"]
    tables.plot_forward_transfer(runs, str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    res = run_lmas(fast_overrides + ["experiment=knowledge_transfer/topologies", "population=hierarchical"],
                   tmp_path / "topo")
    (row,) = _rows(tables.topologies(tables.load_runs([str(tmp_path / "topo")])))
    pop = res["matrix"]["values"][-1][res["matrix"]["agents"].index("population")]
    assert row[0] == "hierarchical" and row[3] == " / ".join(f"{v:.2f}" for v in pop)
    assert row[8] == str(sum(c["messages"] for c in res["population"]["communication"]))


def test_model_selection_tables_the_rows_of_tiny_runs(run_lmas, tmp_path):
    """Per task: each row's final accuracy (mean over seeds) and which agent each seed selected; the paired
    differences between rows come from lmas.metrics.stats on the same runs."""
    from lmas.metrics.stats import load_run, paired_difference

    enc = "population.bases.minilm={_target_:lmas.models.providers.tiny_encoder}"
    res = [run_lmas(["model=tiny", "debug=fast", "logger=csv", f"paths.output_dir={tmp_path}", f"seed={s}",
                     "experiment=model_selection", enc], tmp_path / "runs" / f"seed={s}") for s in (0, 1)]  # fmt: skip
    md = tables.model_selection(str(tmp_path / "runs"))
    first = [[c.strip() for c in ln.strip("|").split("|")] for ln in md.split("\n\n")[1].splitlines()[2:]]
    tasks = res[0]["matrix"]["tasks"]
    for row, task in zip(first, tasks, strict=True):
        j = tasks.index(task)
        for col, agent in ((2, 0), (3, 1), (4, 2)):  # smollm2, minilm, population
            mean = sum(r["matrix"]["values"][-1][agent][j] for r in res) / 2
            assert row[col].startswith(f"{mean:.3f} [")
        picks = [int(max(range(2), key=lambda i, r=r: r["population"]["answers"][-1][task]["val_acc"][i]))
                 for r in res]  # fmt: skip
        assert row[5] == f"smollm2 {picks.count(0)}, minilm {picks.count(1)}"
    runs = [load_run(tmp_path / "runs" / f"seed={s}") for s in (0, 1)]
    want = paired_difference(runs, runs, agent="population", agent_b="minilm", keys=["avg_acc"], level="runs")
    diffs = _rows(md)
    assert diffs[2][:2] == ["population − minilm", "runs"] and diffs[2][2].startswith(f"{want['avg_acc'].estimate:+.3f}")


@pytest.mark.slow  # long (a subprocess or a sweep); the slow suite runs it (docs/testing.md)
def test_distillation_minilm_and_self_learning(run_lmas, fast_overrides, tmp_path):
    res = run_lmas(fast_overrides + ["experiment=distillation/specialists"], tmp_path / "spec")
    joint = run_lmas(fast_overrides + ["experiment=distillation/joint"], tmp_path / "joint")
    rows = _rows(tables.distillation(tables.load_runs([str(tmp_path / "spec")]),
                                     tables.load_runs([str(tmp_path / "joint")])))
    agents = res["matrix"]["agents"]
    assert [r[0] for r in rows] == ["untrained model", *agents, "joint upper bound (student, strategy=joint)"]
    for agent, row in zip(agents, rows[1:]):
        accs = res["matrix"]["values"][-1][agents.index(agent)]
        assert row[1:4] == [f"{a:.3f}" for a in accs]
    assert rows[-1][1:4] == [f"{a:.3f}" for a in joint["matrix"]["values"][-1][0]]

    res = run_lmas(fast_overrides + ["experiment=distillation/minilm"], tmp_path / "minilm")
    rows = _rows(tables.minilm(tables.load_runs([str(tmp_path / "minilm")])))
    teacher = [r for r in rows if r[2].startswith("teacher")]
    (fit,) = [e for e in res["agents"]["minilm"]["history"] if e.get("task") == "bbc" and e["event"] == "trained"]
    assert teacher and teacher[0][3] == f"{fit['external_teacher_accuracy']['minilm_l6']['test']:.3f}"

    small = ["loop.seed_labels=4", "loop.chunk=6", "loop.cycles=2"]
    res = run_lmas(fast_overrides + ["experiment=self_learning", *small], tmp_path / "sl")
    rows = _rows(tables.self_learning(tables.load_runs([str(tmp_path / "sl")])))
    assert [r[0] for r in rows] == ["0", "1", "2"]
    for cycle, row in zip(res["self_learning"][1:], rows[1:]):
        assert row[2] == ("accepted" if cycle["accepted"] else "rejected, restored")
        assert f"{cycle['tasks']['bbc']['kept']}/{cycle['tasks']['bbc']['arrived']}" in row[1]


def test_a_directory_without_results_is_named(tmp_path):
    with pytest.raises(SystemExit, match=str(tmp_path)):
        tables.load_runs([str(tmp_path)])


def test_agents_compares_rows_of_the_same_runs_with_one_of_them(run_lmas, tmp_path):
    """The distillation-losses study's table: each student against the untaught one, paired within each run."""
    from lmas.metrics.stats import holm, load_run, paired_difference, run_interval

    for s in (0, 1):
        run_lmas(["model=tiny", "debug=fast", "logger=csv", f"paths.output_dir={tmp_path}", f"seed={s}",
                  "experiment=distillation/losses", "train.max_steps=1"], tmp_path / "runs" / f"seed={s}")  # fmt: skip
    md = tables.agents(str(tmp_path / "runs"), "s_none", ["s_kl", "s_gkd"])
    runs = [load_run(tmp_path / "runs" / f"seed={s}") for s in (0, 1)]
    rows = _rows(md)
    assert [r[0] for r in rows] == ["s_kl", "s_gkd"] and md.startswith("2 runs (seeds 0, 1)")
    ps = []
    for row in rows:
        iv = run_interval([r.metric("avg_acc", row[0]) for r in runs])
        d = paired_difference(runs, runs, agent=row[0], agent_b="s_none", keys=["avg_acc"], level="runs")["avg_acc"]
        assert row[2] == f"{iv.estimate:.3f} [{iv.low:.3f}, {iv.high:.3f}]" and row[3].startswith(f"{d.estimate:+.3f}")
        ps.append(d.p)
    assert [r[4] for r in rows] == [f"{p:.3f}" for p in holm(ps)]
    with pytest.raises(SystemExit, match=r"no agent \['s_xx'\]"):
        tables.agents(str(tmp_path / "runs"), "s_xx")


def test_federated_compares_each_aggregator_with_local_only_training_of_its_partition(run_lmas, tmp_path):
    """The federated study's table: mean-client scores, paired by seed with the local baseline of the same partition."""
    from lmas.metrics.stats import holm, run_interval

    fast = ["model=tiny", "debug=fast", "logger=csv", "experiment=federated", "population.agents=2"]
    jobs = {f"{a},{s}": [f"loop.aggregator={a}", "loop.rounds=1", f"seed={s}"]
            for a in ("local", "fedavg") for s in (0, 1)}  # fmt: skip
    jobs["centralised,0"] = ["loop=continual", "population.agents=1", "seed=0"]
    res = {name: run_lmas([*fast, *ov, f"paths.output_dir={tmp_path}"], tmp_path / "runs" / name)
           for name, ov in jobs.items()}  # fmt: skip
    md = tables.study_table("populations").federated(str(tmp_path / "runs"))
    rows = _rows(md)
    n_items = sum(t["n_test"] for t in res["local,0"]["tasks"])
    assert md.startswith(f"5 runs (seeds 0, 1), {n_items} test items per run")
    assert [r[:3] for r in rows] == [["IID", "local", "2"], ["IID", "fedavg", "2 (2 paired)"],
                                     ["pooled (vs IID local)", "centralised", "1 (1 paired)"]]  # fmt: skip

    def client(name, key):  # the mean over the run's agents
        return sum(m[key] for m in res[name]["metrics"].values()) / len(res[name]["metrics"])

    local = run_interval([client(f"local,{s}", "avg_acc") for s in (0, 1)])
    assert rows[0][3].startswith(f"{local.estimate:.3f}")
    diffs = {k: run_interval([client(f"fedavg,{s}", k) - client(f"local,{s}", k) for s in (0, 1)])
             for k in ("avg_acc", "forgetting")}  # fmt: skip
    one = {k: client("centralised,0", k) - client("local,0", k) for k in ("avg_acc", "forgetting")}
    ps = holm([d.p if d.p == d.p else 1.0 for d in diffs.values()])  # one paired seed: not in the family
    for k, cell, p in (("avg_acc", 5, ps[0]), ("forgetting", 7, ps[1])):
        iv = diffs[k]
        if iv.low == iv.low:  # two different differences: an interval, its Holm p-value
            assert rows[1][cell] == f"{iv.estimate:+.3f} [{iv.low:+.3f}, {iv.high:+.3f}] p={p:.3f}"
        assert rows[2][cell] == f"{one[k]:+.3f}" and rows[2][cell + 1].endswith("(one paired seed)")
    assert float(rows[1][-2]) > float(rows[0][-2]) and float(rows[1][-1]) > 0  # FedAvg sends adapters every round
    moved = tmp_path / "runs" / "local,1" / "results.json"
    moved.write_text(moved.read_text().replace(res["local,1"]["tasks"][0]["test_digest"], "0" * 64))
    with pytest.raises(SystemExit, match="test items differ"):
        tables.study_table("populations").federated(str(tmp_path / "runs"))
    alone = tmp_path / "alone"
    alone.mkdir()
    (tmp_path / "runs" / "fedavg,0").rename(alone / "fedavg,0")
    with pytest.raises(SystemExit, match=r"no local-only baseline .*\['IID'\]"):
        tables.study_table("populations").federated(str(alone))


def test_merge_methods_scores_each_merge_against_the_exact_one_with_its_expert_gap_and_cost(run_lmas, tmp_path):
    """The merge-methods study's table: per-task scores, mean over tasks, the gap to each task's specialist, the
    seed-level paired difference from merged_exact (Holm) and the item-level one, the merge's runtime."""
    import numpy as np

    from lmas.metrics.records import load_run
    from lmas.metrics.stats import holm, run_interval

    fast = ["model=tiny", "debug=fast", "logger=csv", "experiment=knowledge_transfer/merge_methods",
            "transfer.methods=[exact,linear,ties,della]"]  # fmt: skip
    res = {s: run_lmas([*fast, f"seed={s}", f"paths.output_dir={tmp_path}"], tmp_path / "runs" / f"seed={s}")
           for s in (0, 1)}  # fmt: skip
    table = tables.study_table("knowledge_transfer")
    md = table.merge_methods(str(tmp_path / "runs"), resamples=999)
    rows = {r[0]: r for r in _rows(md)}
    merged = ["merged_exact", "merged_linear", "merged_ties", "merged_della"]
    assert list(rows) == ["bbc", "chat", "math", *merged]
    tasks = res[0]["matrix"]["tasks"]
    records = {s: load_run(tmp_path / "runs" / f"seed={s}") for s in (0, 1)}

    def score(s, agent, t):  # from the per-example records after the last round
        rec = records[s]
        return float(rec.rounds[max(rec.rounds)][f"{agent}/{t}"].mean())

    assert md.startswith("2 runs (seeds 0, 1), test items per task: " + ", ".join(
        f"{t} {next(x['n_test'] for x in res[0]['tasks'] if x['name'] == t)}" for t in tasks))  # fmt: skip
    for agent, row in rows.items():
        assert row[1:4] == [f"{np.mean([score(s, agent, t) for s in (0, 1)]):.3f}" for t in tasks]
        mean = run_interval([float(np.mean([score(s, agent, t) for t in tasks])) for s in (0, 1)])
        assert row[4].startswith(f"{mean.estimate:.3f}")
        gap = [float(np.mean([score(s, t, t) - score(s, agent, t) for t in tasks])) for s in (0, 1)]  # specialist t
        assert row[5].startswith(f"{run_interval(gap).estimate:.3f}")
    assert rows["merged_exact"][8] == "baseline" and rows["bbc"][8] == "specialist" and rows["bbc"][-1] == "–"
    diffs = {a: run_interval([float(np.mean([score(s, a, t) - score(s, "merged_exact", t) for t in tasks]))
                              for s in (0, 1)]) for a in merged[1:]}  # fmt: skip
    for a, d in diffs.items():
        assert rows[a][6].startswith(f"{d.estimate:+.3f}") and rows[a][9].startswith(f"{d.estimate:+.3f}")
    testable = [a for a, d in diffs.items() if d.low == d.low]
    for a, p in zip(testable, holm([diffs[a].p for a in testable]), strict=True):
        assert rows[a][7] == f"{p:.3f}"
    runtime = np.mean([next(e["merge_s"] for e in r["agents"]["merged_della"]["history"] if e["event"] ==
                            "merge_methods") for r in res.values()])  # fmt: skip
    assert rows["merged_della"][10] == f"{runtime:.3g}" and float(rows["merged_della"][10]) > 0
    with pytest.raises(SystemExit, match=r"no merged agent 'merged_svd' \(merged agents: merged_exact, "):
        table.merge_methods(str(tmp_path / "runs"), baseline="merged_svd")
    moved = tmp_path / "runs" / "seed=1" / "results.json"
    moved.write_text(moved.read_text().replace(res[1]["tasks"][0]["test_digest"], "0" * 64))
    with pytest.raises(SystemExit, match="the test items differ"):
        table.merge_methods(str(tmp_path / "runs"))


def test_self_learning_study_gives_each_rule_its_gain_over_round_0_and_compares_the_rules(run_lmas, tmp_path):
    """The self-learning study's table: per labelling rule, the student after round 0 and after the last cycle,
    each task's gain and the mean's (seed-level paired t, Holm over the table; item bootstrap), the pseudo-labels
    summed over cycles and seeds; then the two rules paired by seed."""
    import numpy as np

    from lmas.metrics.records import load_run
    from lmas.metrics.stats import holm, run_interval

    fast = ["model=tiny", "debug=fast", "logger=csv", "experiment=self_learning", "loop.seed_labels=4",
            "loop.chunk=6", "loop.cycles=2", "stream.split_seed=${seed}", f"paths.output_dir={tmp_path}"]  # fmt: skip
    runs = tmp_path / "runs"
    res = {(rule, s): run_lmas([*fast, f"loop.labelling={rule}", f"seed={s}"], runs / f"{rule}-{s}")
           for rule in ("agreement", "confidence") for s in (0, 1)}  # fmt: skip
    table = tables.study_table("distillation")
    md = table.self_learning_study(str(runs), resamples=999)
    rows = {r[0]: r for r in _rows(md.split("\n\nThe rules")[0])}
    assert list(rows) == ["agreement", "confidence"]
    tasks = res["agreement", 0]["matrix"]["tasks"]
    rec = {k: load_run(runs / f"{k[0]}-{k[1]}") for k in res}

    def acc(k, r, t):
        return float(rec[k].rounds[r][f"student/{t}"].mean())

    tests = []
    for rule in rows:
        cyc = [c for s in (0, 1) for c in res[rule, s]["self_learning"] if c["cycle"] > 0]
        kept = sum(st["kept"] for c in cyc for st in c["tasks"].values())
        arrived = sum(st["arrived"] for c in cyc for st in c["tasks"].values())
        assert rows[rule][1:3] == ["2", f"{kept}/{arrived}"]
        assert rows[rule][4] == f"{sum(c['accepted'] for c in cyc)}/{len(cyc)}"
        before = run_interval([float(np.mean([acc((rule, s), 0, t) for t in tasks])) for s in (0, 1)])
        assert rows[rule][5] == before.show()
        for j, on in enumerate([[t] for t in tasks] + [tasks]):
            g = run_interval([float(np.mean([acc((rule, s), 2, t) - acc((rule, s), 0, t) for t in on]))
                              for s in (0, 1)])  # fmt: skip
            assert rows[rule][7 + j].startswith(g.show(signed=True)), (rule, on, rows[rule][7 + j])
            tests += [g] if g.low == g.low else []
    final = {k: float(np.mean([acc(k, 2, t) for t in tasks])) for k in res}
    d = run_interval([final["confidence", s] - final["agreement", s] for s in (0, 1)])
    tests += [d] if d.low == d.low else []
    tail = md.split("\n\nThe rules")[1]
    assert f"confidence − agreement {d.show(signed=True)}" in tail
    for iv, p in zip(tests, holm([iv.p for iv in tests]), strict=True):
        assert f"{iv.show(signed=True)}, Holm p {p:.3f}" in md
    run_lmas(["model=tiny", "debug=fast", "logger=csv", f"paths.output_dir={tmp_path}"], runs / "plain")
    with pytest.raises(SystemExit, match=r"without a `self_learning` record .*plain"):
        table.self_learning_study(str(runs))


def test_probes_gives_each_strategys_probe_scores_before_and_after_its_runs():
    """Per probe and strategy: the untrained score, each seed's after the last round, their mean change; runs
    without probes are refused by name."""
    from lmas.metrics import KnowledgeMatrix

    def run(strategy: str, seed: int, after: float) -> dict:
        km = KnowledgeMatrix(["agent0"], ["a", "p"], {"a": "accuracy", "p": "accuracy"}, probes=["p"])
        km.record_initial("agent0", "a", 0.2)
        km.record_initial("agent0", "p", 0.6)
        km.start_round()
        km.record(0, "agent0", "a", 0.9)
        km.record(0, "agent0", "p", after)
        km.mark_trained(0, "agent0", "a")
        return {"strategy": strategy, "seed": seed, "matrix": km.to_dict(), "dir": f"{strategy}{seed}"}

    runs = [run("naive", 1, 0.5), run("naive", 0, 0.4), run("replay", 0, 0.7)]
    assert _rows(tables.probes(runs)) == [
        ["p", "naive", "0.600", "0.400, 0.500", "-0.150", "0, 1"],
        ["p", "replay", "0.600", "0.700", "+0.100", "0"],
    ]
    bare = run("naive", 2, 0.5)
    bare["matrix"]["probes"] = []
    with pytest.raises(SystemExit, match="no general-ability probes"):
        tables.probes([bare])


def test_consolidation_gives_each_arms_library_and_accuracy_and_their_paired_difference(run_lmas, tmp_path):
    """The consolidation study's tables from tiny runs (2 seeds per arm): each arm's library after the last round
    and the population's metrics (t-intervals over the runs), consolidate − none paired by seed with Holm over the
    three comparisons, the library's kB per round, and each task's accuracy after the last round."""
    from lmas.metrics.stats import holm, run_interval

    fast = ["model=tiny", "debug=fast", "logger=csv", f"paths.output_dir={tmp_path}", "population.agents=2",
            "allocation=round_robin", "topology=master_worker", "eval.next_task=false"]  # fmt: skip (as the study)
    res = {(t, s): run_lmas([*fast, f"transfer={t}", f"seed={s}"]
                            + (["transfer.every=1", "transfer.budget=0.5"] if t == "consolidate" else []),
                            tmp_path / "runs" / f"transfer={t},seed={s}")
           for t in ("none", "consolidate") for s in (0, 1)}  # fmt: skip
    md = tables.study_table("consolidation").consolidation(str(tmp_path / "runs"))
    arms, diffs, per_round, per_task = (_rows(part) for part in md.split("\n\n")[1::2])
    kb = {k: r["library"][-1]["bytes"] / 1024 for k, r in res.items()}
    for row, arm in zip(arms, ("none", "consolidate"), strict=True):
        assert row[:2] == [arm, "2 (0, 1)"]
        assert row[3] == run_interval([kb[arm, s] for s in (0, 1)]).show()
        assert row[4] == run_interval([res[arm, s]["metrics"]["population"]["avg_acc"] for s in (0, 1)]).show()
    want = {"library_kb": run_interval([kb["consolidate", s] - kb["none", s] for s in (0, 1)]),
            **{k: run_interval([res["consolidate", s]["metrics"]["population"][k]
                                - res["none", s]["metrics"]["population"][k] for s in (0, 1)])
               for k in ("avg_acc", "forgetting")}}  # fmt: skip
    assert [r[0] for r in diffs] == list(want) and want["library_kb"].estimate < 0  # re-ranked: smaller
    for row, (k, iv), p in zip(diffs, want.items(), holm([iv.p for iv in want.values()]), strict=True):
        assert row[1] == iv.show(signed=True) and row[3] == f"{p:.3g}", k
    rounds = len(res["none", 0]["library"])
    assert [r[0] for r in per_round] == [str(r) for r in range(rounds)]
    assert per_round[-1][1:] == [f"{(kb[t, 0] + kb[t, 1]) / 2:.1f}" for t in ("none", "consolidate")]
    m = res["none", 0]["matrix"]
    last = {k: r["matrix"]["values"][-1][m["agents"].index("population")] for k, r in res.items()}
    assert [r[0] for r in per_task] == m["tasks"]
    for j, row in enumerate(per_task):
        assert row[1:3] == [f"{(last[t, 0][j] + last[t, 1][j]) / 2:.3f}" for t in ("none", "consolidate")]
        diff = run_interval([last["consolidate", s][j] - last["none", s][j] for s in (0, 1)])
        assert row[3] == diff.show(signed=True)
    import shutil

    shutil.copytree(tmp_path / "runs" / "transfer=none,seed=0", tmp_path / "none_only" / "seed=0")
    with pytest.raises(SystemExit, match="runs of both arms are needed"):
        tables.study_table("consolidation").consolidation(str(tmp_path / "none_only"))
