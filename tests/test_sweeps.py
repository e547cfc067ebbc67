"""Hydra sweeps through launchers and the Optuna sweeper, fed to lmas-compare; launcher configs compose."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

BIN = Path(sys.executable).parent
FAST = ["model=tiny", "debug=fast", "logger=csv", "stream.max_train=4", "train.max_steps=1"]


def _lmas(args: list[str], out: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "LMAS_OUTPUT": str(out), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(BIN / "lmas-train"), *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _compare(sweep: Path) -> str:
    out = subprocess.run([str(BIN / "lmas-compare"), str(sweep)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.slow  # long (a subprocess or a sweep); the slow suite runs it (docs/testing.md)
def test_two_jobs_in_parallel_through_the_joblib_launcher_feed_lmas_compare(tmp_path):
    _lmas(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1", *FAST], tmp_path)
    (sweep,) = (tmp_path / "multiruns").iterdir()
    launcher = yaml.safe_load((sweep / "multirun.yaml").read_text())["hydra"]["launcher"]
    assert launcher["_target_"].endswith("JoblibLauncher") and launcher["n_jobs"] == 2
    runs = sorted(p.parent for p in sweep.rglob("results.json"))
    assert len(runs) == 2 and "seed=0" in runs[0].name and "seed=1" in runs[1].name
    assert all((r / "report.html").is_file() for r in runs)
    out = _compare(sweep)
    assert "2 runs, stream default" in out and "| 2 |" in out  # one group, both seeds
    assert (sweep / "comparison.md").is_file()


@pytest.mark.slow  # two trials of a few seconds, but two lmas-train processes start (~1 min on 2 cores)
def test_optuna_search_runs_trials_and_reports_the_best(tmp_path):
    _lmas(["hparams_search=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", "hydra/launcher=parallel",
           *FAST], tmp_path)
    (sweep,) = (tmp_path / "multiruns").iterdir()
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["name"] == "optuna" and set(best["best_params"]) == {"train.lr", "population.lora.r", "train.epochs"}
    runs = sorted(sweep.rglob("results.json"))
    assert len(runs) == 2
    values = [json.loads(p.read_text())["metrics"]["agent0"]["avg_acc"] for p in runs]
    assert best["best_value"] == pytest.approx(max(values))
    out = _compare(sweep)
    assert "2 runs, stream default" in out and "train.lr=" in out


def _hydra(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import lmas.schema  # noqa: F401 - registers train_schema, the first entry of train.yaml's defaults

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return hydra_compose("train", overrides=overrides, return_hydra_config=True).hydra


def test_optuna_search_config_composes():
    from hydra.types import RunMode

    hydra = _hydra(["hparams_search=optuna"])
    assert hydra.mode == RunMode.MULTIRUN and hydra.sweeper._target_.endswith("OptunaSweeper")
    assert hydra.sweeper.direction == "maximize" and hydra.sweeper.sampler._target_.endswith("TPESampler")
    assert set(hydra.sweeper.params) == {"train.lr", "population.lora.r", "train.epochs"}


def test_the_optuna_search_selects_on_validation_never_on_test(tmp_path, compose):
    assert compose(["hparams_search=optuna"]).eval.split == "val"
    # a search told to read the test split is refused before any run
    env = {**os.environ, "LMAS_OUTPUT": str(tmp_path), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    args = ["hparams_search=optuna", "eval.split=test", "hydra.sweeper.n_trials=1", *FAST]
    proc = subprocess.run([str(BIN / "lmas-train"), *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "would maximise a score on the test split" in proc.stderr + proc.stdout
    assert not list(tmp_path.rglob("results.json"))


@pytest.mark.parametrize("strategy", ["olora", "nlora", "ewc", "lwf"])
def test_the_lambda_searches_tune_a_parameter_of_their_strategy_on_validation(strategy, compose):
    from lmas.config import validate

    overrides = [f"hparams_search=lambda_{strategy}", f"strategy={strategy}"]
    (param,) = _hydra(overrides).sweeper.params
    cfg = compose(overrides)
    assert cfg.eval.split == "val" and param.startswith("strategy.")
    assert param.removeprefix("strategy.") in cfg.strategy  # a real argument of the strategy, not a new key
    validate(cfg)


def test_slurm_and_parallel_launcher_configs_compose():
    slurm = _hydra(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"]).launcher
    assert slurm._target_.endswith("SlurmLauncher")
    assert slurm.partition == "gpu" and slurm.timeout_min == 240 and slurm.gpus_per_node == 1
    parallel = _hydra(["hydra/launcher=parallel"]).launcher
    assert parallel._target_.endswith("JoblibLauncher") and parallel.n_jobs == 2


def test_ray_launcher_config_needs_the_plugin():
    if importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None:
        with pytest.raises(Exception, match="ray"):
            _hydra(["hydra/launcher=ray_cluster"])
    else:
        ray = _hydra(["hydra/launcher=ray_cluster"]).launcher
        assert ray._target_.endswith("RayLauncher") and ray.ray.remote.num_cpus == 2
