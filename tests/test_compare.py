"""lmas-compare: grouping by overrides, mean ± std over seeds, outputs, and clear errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmas.compare import compare, find_runs, main, mean_std


def _fake_run(root: Path, name: str, overrides: list[str], seed: int, acc: float, stream: str = "s") -> None:
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    results = {"complete": True, "stream": stream, "strategy": "x", "seed": seed,
               "metrics": {"agent0": {"avg_acc": acc, "forgetting": 0.1, "bwt": -0.1, "plasticity": acc}},
               "timings": {"train_s": 10.0 + seed}}
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
    assert main([str(tmp_path), "--out", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| strategy=naive | 2 | 0.600 ± 0.141 |" in md
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
