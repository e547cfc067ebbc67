"""lmas-compare: grouping by overrides, mean ± std over seeds, outputs, and clear errors."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmas.compare import compare, find_runs, main, mean_std, run_settings


def _fake_run(root: Path, name: str, overrides: list[str], seed: int, acc: float, stream: str = "s") -> None:
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    results = {"complete": True, "stream": stream, "strategy": "x", "seed": seed,
               "metrics": {"agent0": {"avg_acc": acc, "forgetting": 0.1, "bwt": -0.1, "plasticity": acc}},
               "timings": {"train_s": 10.0 + seed},
               "population": {"communication": [{"bytes": 1_000_000 * seed}, {"bytes": 500_000}]}}
    (d / "results.json").write_text(json.dumps(results))


def test_mean_std_is_the_sample_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)


def test_groups_by_overrides_without_seed(tmp_path):
    for i, (strategy, seed, acc) in enumerate([("naive", 0, 0.5), ("naive", 1, 0.7), ("ewc", 0, 0.8), ("ewc", 1, 0.8)]):
        _fake_run(tmp_path, str(i), [f"strategy={strategy}", f"seed={seed}", "paths.output_dir=/x"], seed, acc)
    rows = compare(find_runs([tmp_path]))
    assert [r["group"] for r in rows] == ["strategy=ewc", "strategy=naive"]  # sorted by accuracy
    naive = rows[1]
    assert naive["n"] == 2 and naive["seeds"] == [0, 1]
    assert naive["avg_acc_mean"] == pytest.approx(0.6) and naive["avg_acc_std"] == pytest.approx(0.1414, abs=1e-4)
    assert naive["train_s_mean"] == pytest.approx(10.5)
    assert naive["comm_mb_mean"] == pytest.approx(1.0) and "eval_s_mean" not in naive  # (0.5 + 1.5) / 2; not recorded
    assert main([str(tmp_path), "--out", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| strategy=naive | 2 | 0.600 ± 0.141 |" in md and "comm_mb" in md and "1.000 ± 0.707 |" in md
    assert (tmp_path / "cmp" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "cmp" / "comparison.csv").read_text().startswith("group,n,seeds")


def test_clear_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no results.json found"):
        find_runs([tmp_path / "empty"])
    _fake_run(tmp_path / "mixed", "a", ["seed=0"], 0, 0.5, stream="one")
    _fake_run(tmp_path / "mixed", "b", ["seed=0"], 0, 0.5, stream="two")
    with pytest.raises(ValueError, match="different streams"):
        find_runs([tmp_path / "mixed"])
    assert main([str(tmp_path / "empty")]) == 2
    _fake_run(tmp_path / "agents", "a", ["seed=0"], 0, 0.5)
    with pytest.raises(ValueError, match=r"a: no agent 'population' in its metrics \(it has agent0\)"):
        compare(find_runs([tmp_path / "agents"]), agent="population")  # not averaged over the runs that have it
    assert main([str(tmp_path / "agents"), "--agent", "population"]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_a_real_two_job_sweep_feeds_lmas_compare(tmp_path):
    env = {**os.environ, "LMAS_OUTPUT": str(tmp_path), "WANDB_MODE": "offline"}
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "lmas-train"), "-m", "model=tiny", "debug=fast", "logger=csv", "seed=0,1",
           "stream.max_train=4", "train.max_steps=1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    multirun = next((tmp_path / "multiruns").iterdir())
    assert len(list(multirun.rglob("results.json"))) == 2
    out = subprocess.run([str(bin_dir / "lmas-compare"), str(multirun)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "2 runs, stream default" in out.stdout
    assert "| strategy=x" not in out.stdout and "| 2 |" in out.stdout  # one group, both seeds


def test_baseline_adds_paired_statistics_over_real_runs(tmp_path, run_lmas, fast_overrides, capsys):
    """Two strategies × two seeds on the tiny model: each group's CI, the paired difference from the baseline (a
    paired t over seeds: its estimate is the mean of the per-seed differences), Holm, and a verdict."""
    accs: dict[tuple[str, int], float] = {}
    for strategy in ("naive", "replay"):
        for seed in (0, 1):
            out = tmp_path / "runs" / f"{strategy}{seed}"
            overrides = [f"strategy={strategy}", f"seed={seed}"]
            res = run_lmas(fast_overrides + overrides, out)
            (out / ".hydra").mkdir(parents=True, exist_ok=True)
            (out / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
            accs[strategy, seed] = res["metrics"]["agent0"]["avg_acc"]
            assert sorted(p.name for p in (out / "per_example").iterdir())[0] == "initial.npz"
    cmp = tmp_path / "cmp"
    assert main([str(tmp_path / "runs"), "--out", str(cmp), "--baseline", "strategy=naive"]) == 0
    rows = list(csv.DictReader((cmp / "comparison_stats.csv").open()))
    replay = next(r for r in rows if r["group"] == "strategy=replay" and r["metric"] == "avg_acc")
    diff = sum(accs["replay", s] - accs["naive", s] for s in (0, 1)) / 2
    assert float(replay["diff"]) == pytest.approx(diff, abs=1e-9)
    assert float(replay["diff_low"]) <= float(replay["diff"]) <= float(replay["diff_high"])
    assert replay["n"] == "2" and replay["verdict"]
    assert "strategy=replay" in (cmp / "comparison_stats.md").read_text()
    assert "comparison_stats.md" in capsys.readouterr().out


def _matrix_run(root: Path, strategy: str, seed: int, a_last: float, probe_last: float | None = None) -> Path:
    """A finished two-task run (results.json with its matrix and metrics, no per-example records), grouped by
    its overrides; ``a_last``: task a's score after the last round (sets forgetting and avg_acc); ``probe_last``:
    with a general-ability probe ``p`` (0.6 untrained), its score after the last round."""
    from lmas.metrics import KnowledgeMatrix

    tasks = ["a", "b"] + (["p"] if probe_last is not None else [])
    km = KnowledgeMatrix(["agent0"], tasks, dict.fromkeys(tasks, "accuracy"), probes=tasks[2:])
    for t in ("a", "b"):
        km.record_initial("agent0", t, 0.25)
    for r, (va, vb) in enumerate([(0.8, 0.3), (a_last, 0.7)]):
        km.start_round()
        km.record(r, "agent0", "a", va)
        km.record(r, "agent0", "b", vb)
        km.mark_trained(r, "agent0", "ab"[r])
    if probe_last is not None:
        km.record_initial("agent0", "p", 0.6)
        km.record(0, "agent0", "p", 0.6)
        km.record(1, "agent0", "p", probe_last)
    d = root / f"{strategy}{seed}"
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"strategy={strategy}", f"seed={seed}"]))
    results = {"complete": True, "stream": "s", "strategy": strategy, "seed": seed,
               "tasks": [{"name": "a"}, {"name": "b"}], "matrix": km.to_dict(), "metrics": km.summaries(),
               "timings": {"train_s": 1.0}}
    (d / "results.json").write_text(json.dumps(results))
    return d


def test_paper_names_and_a_group_with_fewer_seeds_than_the_baseline(tmp_path, capsys):
    """The tables name AP, F.Ra, BWT, FWT; seqft on seeds 0 and 1 is compared with naive's runs of those seeds only
    (naive also has seed 2), while a seqft seed that naive lacks is an error naming the run."""
    naive = {0: 0.5, 1: 0.6, 2: 0.1}
    seqft = {0: 0.4, 1: 0.45}
    for s, v in naive.items():
        _matrix_run(tmp_path / "runs", "naive", s, v)
    for s, v in seqft.items():
        _matrix_run(tmp_path / "runs", "seqft", s, v)
    out = tmp_path / "cmp"
    assert main([str(tmp_path / "runs"), "--out", str(out), "--baseline", "strategy=naive"]) == 0
    md = (out / "comparison.md").read_text()
    assert md.startswith("| group | runs | avg_acc (AP) | forgetting (F.Ra) | bwt (BWT) | fwt (FWT) | plasticity |")
    stats_md = (out / "comparison_stats.md").read_text()
    assert "| group | avg_acc (AP) | forgetting (F.Ra) | bwt (BWT) | fwt (FWT) | plasticity |" in stats_md
    rows = {(r["group"], r["metric"]): r for r in csv.DictReader((out / "comparison_stats.csv").open())}
    row = rows["strategy=seqft", "avg_acc"]
    # avg_acc = (a_last + 0.7) / 2: the paired difference over seeds 0, 1 is the mean of (seqft - naive) / 2
    want = sum((seqft[s] - naive[s]) / 2 for s in (0, 1)) / 2
    assert float(row["diff"]) == pytest.approx(want) and row["test"] == "paired t, 2 run pairs"
    assert row["paper"] == "AP" and rows["strategy=seqft", "forgetting"]["paper"] == "F.Ra"
    assert rows["strategy=naive", "avg_acc"]["n"] == "3"  # the baseline's own CI uses all its runs
    for s, v in naive.items():  # a multitask group no better than naive: the gap-closure ratio is undefined
        _matrix_run(tmp_path / "runs", "joint", s, v)
    args = [str(tmp_path / "runs"), "--out", str(out), "--baseline", "strategy=naive", "--upper", "strategy=joint"]
    assert main(args) == 0
    rows = {(r["group"], r["metric"]): r for r in csv.DictReader((out / "comparison_stats.csv").open())}
    gap = rows["strategy=seqft", "gap_closure"]
    assert gap["mean"] == "nan" and gap["ci"].startswith("undefined: upper mean = baseline mean")
    _matrix_run(tmp_path / "runs", "seqft", 3, 0.3)
    assert main([str(tmp_path / "runs"), "--out", str(out), "--baseline", "strategy=naive"]) == 2
    assert re.search(r"without a partner.*seqft3", capsys.readouterr().err)


def test_probe_metrics_are_shown_and_compared_when_every_run_has_them(tmp_path):
    """Runs with a general-ability probe: probe_acc and probe_forgetting are columns of both tables, and the paired
    difference of probe_forgetting is the mean of the per-seed differences; a run without probes drops them."""
    naive, replay = {0: 0.4, 1: 0.5}, {0: 0.55, 1: 0.6}
    for s in (0, 1):
        _matrix_run(tmp_path / "runs", "naive", s, 0.5, probe_last=naive[s])
        _matrix_run(tmp_path / "runs", "replay", s, 0.6, probe_last=replay[s])
    out = tmp_path / "cmp"
    assert main([str(tmp_path / "runs"), "--out", str(out), "--baseline", "strategy=naive"]) == 0
    assert "| probe_acc | probe_forgetting |" in (out / "comparison.md").read_text().splitlines()[0]
    rows = {(r["group"], r["metric"]): r for r in csv.DictReader((out / "comparison_stats.csv").open())}
    lost = rows["strategy=replay", "probe_forgetting"]  # (0.6 - replay) - (0.6 - naive), averaged over seeds
    assert float(lost["diff"]) == pytest.approx(sum(naive[s] - replay[s] for s in (0, 1)) / 2)
    assert float(rows["strategy=naive", "probe_forgetting"]["mean"]) == pytest.approx(0.6 - 0.45)
    _matrix_run(tmp_path / "runs", "naive", 2, 0.5)  # no probe: naive's probe cells would average 2 of its 3 runs
    assert main([str(tmp_path / "runs"), "--out", str(out), "--baseline", "strategy=naive"]) == 0
    table = {r["group"]: r for r in csv.DictReader((out / "comparison.csv").open())}
    assert table["strategy=naive"]["probe_acc_mean"] == "" and float(table["strategy=replay"]["probe_acc_mean"]) > 0
    assert "probe" not in (out / "comparison_stats.md").read_text()  # the statistics compare what every run has


def test_a_baseline_may_name_only_the_overrides_that_single_out_its_group():
    from lmas.compare import overrides_of, resolve_group

    groups = ["experiment=x,strategy.lambda_orth=0.5,strategy=olora", "experiment=x,strategy.lambda_orth=0.05,strategy=olora",
              "experiment=x,strategy=naive,transfer.scales=[0,1]"]  # fmt: skip
    assert overrides_of(groups[2]) == {"experiment=x", "strategy=naive", "transfer.scales=[0,1]"}  # commas in a value
    assert resolve_group(groups[0], groups) == groups[0]  # the full name
    assert resolve_group("strategy.lambda_orth=0.5", groups) == groups[0]
    assert resolve_group("transfer.scales=[0,1]", groups) == groups[2]
    with pytest.raises(ValueError, match="2 groups have the overrides \\['strategy=olora'\\]"):
        resolve_group("strategy=olora", groups)
    with pytest.raises(ValueError, match="no group has the overrides \\['strategy=ewc'\\]"):
        resolve_group("strategy=ewc", groups)


def test_runs_without_overrides_are_grouped_by_strategy_and_the_settings_that_differ(tmp_path):
    """A study's committed runs keep no .hydra/overrides.yaml: two λ of one strategy must not pool into one row."""
    def result(name: str, seed: int, **settings) -> dict:
        return {"strategy": name, "config": {"strategy": {"_target_": name, "seed": seed, **settings}}}

    found = run_settings([result("nlora", 0, lambda_l1=0.4, lambda_orth=0.0),
                               result("nlora", 1, lambda_l1=0.4, lambda_orth=0.0),
                               result("nlora", 0, lambda_l1=0.0013, lambda_orth=0.0),
                               result("naive", 0), result("naive", 1, buffer={"size": 2}),  # only in one run
                               result("ewc", 0, ewc_lambda=None), result("ewc", 1, ewc_lambda=726)])  # fmt: skip
    assert found == [("strategy.lambda_l1=0.4",), ("strategy.lambda_l1=0.4",), ("strategy.lambda_l1=0.0013",),
                     (), (), ("strategy.ewc_lambda=null",), ("strategy.ewc_lambda=726",)]  # fmt: skip
    for i, (lam, seed, acc) in enumerate([(0.4, 0, 0.3), (0.4, 1, 0.3), (0.0013, 0, 0.6), (0.0013, 1, 0.8)]):
        d = tmp_path / str(i)
        d.mkdir()
        results = {"complete": True, "stream": "s", "strategy": "nlora", "seed": seed,
                   "config": {"strategy": {"lambda_l1": lam, "seed": seed}},
                   "metrics": {"agent0": {"avg_acc": acc}}}  # fmt: skip
        (d / "results.json").write_text(json.dumps(results))
    rows = {r["group"]: r for r in compare(find_runs([tmp_path]))}
    assert set(rows) == {"strategy=nlora,strategy.lambda_l1=0.4", "strategy=nlora,strategy.lambda_l1=0.0013"}
    assert rows["strategy=nlora,strategy.lambda_l1=0.0013"]["avg_acc_mean"] == pytest.approx(0.7)
    assert rows["strategy=nlora,strategy.lambda_l1=0.4"]["n"] == 2
    # options outside `strategy` split too (the federated study's aggregators); seeds, orders, paths never do
    def fed(agg: str, seed: int, order: int) -> dict:
        return {"strategy": "naive", "config": {"seed": seed, "loop": {"aggregator": agg}, "stream": {"order": order},
                "paths": {"output_dir": f"/x/{seed}"}, "eval": {"cache": f"/c/{seed}"}, "strategy": {"seed": seed}}}

    assert run_settings([fed("local", 0, 4), fed("fedavg", 1, 5), fed("local", 2, 5)]) == [
        ("loop.aggregator=local",), ("loop.aggregator=fedavg",), ("loop.aggregator=local",)]
    assert run_settings([fed("local", 0, 4), fed("fedavg", 1, 5)], strategy_only=True) == [(), ()]


def test_a_studys_kept_overrides_group_its_runs_and_shared_ones_are_left_out_of_the_names(tmp_path):
    """experiments/study.py keeps each job's overrides in overrides.yaml: the study's fixed overrides (every run has
    them) do not appear in the group names."""
    for i, (agg, seed, acc) in enumerate([("local", 0, 0.5), ("local", 1, 0.7), ("fedavg", 0, 0.8)]):
        d = tmp_path / str(i)
        d.mkdir()
        results = {"complete": True, "stream": "s", "strategy": "naive", "seed": seed,
                   "metrics": {"agent0": {"avg_acc": acc}}}  # fmt: skip
        (d / "results.json").write_text(json.dumps(results))
        (d / "overrides.yaml").write_text(yaml.safe_dump(["experiment=federated", f"loop.aggregator={agg}",
                                                          f"seed={seed}"]))  # fmt: skip
    rows = {r["group"]: r for r in compare(find_runs([tmp_path]))}
    assert set(rows) == {"loop.aggregator=local", "loop.aggregator=fedavg"}
    assert rows["loop.aggregator=local"]["avg_acc_mean"] == pytest.approx(0.6)
