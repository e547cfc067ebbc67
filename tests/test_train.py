"""lmas-train end to end: the composed config runs on the tiny model, every preset runs fast,
outputs are complete, the same seed gives the same metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CONF_EXPERIMENT = Path(__file__).parents[1] / "conf" / "experiment"
PRESETS = sorted(str(p.relative_to(CONF_EXPERIMENT).with_suffix("")) for p in CONF_EXPERIMENT.rglob("*.yaml"))


def test_default_experiment_on_tiny_model_writes_all_outputs(fast_overrides, tmp_path, capsys, run_lmas):
    run_dir = tmp_path / "run"
    results = run_lmas(fast_overrides, run_dir)
    out = capsys.readouterr().out
    assert str(run_dir / "results.json") in out and "avg_acc" in out
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["complete"] is True
    assert [t["name"] for t in saved["tasks"]] == ["bbc", "chat", "math"]
    assert saved["config"]["model"]["_target_"].endswith("tiny")
    assert set(saved["versions"]) >= {"torch", "transformers", "peft", "lightning"}
    values = saved["matrix"]
    # one row per task, lower triangle + next task filled, the rest empty (None)
    from lmas.metrics.knowledge import KnowledgeMatrix

    km = KnowledgeMatrix.from_dict(values)
    v = km.values()[:, 0, :]  # (rounds, tasks)
    assert v.shape == (3, 3)
    import numpy as np

    assert np.isnan(v[0, 2]) and not np.isnan(v[0, 1]) and not np.isnan(v[2]).any()
    assert not np.isnan(km.initial()).any()
    m = saved["metrics"]["agent0"]
    assert m["bwt"] == pytest.approx(-m["forgetting"])
    assert 0.0 <= m["avg_acc"] <= 1.0
    assert (run_dir / "knowledge_matrix.csv").read_text().startswith("round,agent,task")
    assert (run_dir / "knowledge_matrix.png").read_bytes()[:4] == b"\x89PNG"
    adapters = sorted((run_dir / "adapters" / "agent0").glob("*.safetensors"))
    assert [a.name for a in adapters] == ["round000-bbc.safetensors", "round001-chat.safetensors",
                                          "round002-math.safetensors"]
    assert (run_dir / "metrics.csv").is_file()
    assert results["metrics"] == saved["metrics"]


def test_same_seed_same_metrics_other_seed_other_training(fast_overrides, tmp_path, run_lmas):
    over = fast_overrides + ["train.max_steps=3", "train.lr=0.05"]
    a = run_lmas(over + ["seed=3"], tmp_path / "a")
    b = run_lmas(over + ["seed=3"], tmp_path / "b")
    c = run_lmas(over + ["seed=4"], tmp_path / "c")
    assert a["matrix"] == b["matrix"] and a["metrics"] == b["metrics"]
    assert a["loss_curves"] == b["loss_curves"]
    assert a["loss_curves"] != c["loss_curves"]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_experiment_preset_runs_fast(preset, fast_overrides, tmp_path, run_lmas):
    results = run_lmas(fast_overrides + [f"experiment={preset}"], tmp_path / preset)
    assert results["complete"]
    assert len(results["tasks"]) >= 2
    assert any(results["metrics"].values())  # some agent trained and has CL metrics


def test_wandb_offline_logger_writes_an_offline_run(tmp_path, run_lmas):
    over = ["model=tiny", "debug=fast", "logger=wandb", f"paths.output_dir={tmp_path}", "stream.max_train=4",
            "train.max_steps=1"]
    run_dir = tmp_path / "run"
    run_lmas(over, run_dir)
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")), "the offline run has no .wandb log"


def test_unknown_option_is_refused_before_training(tmp_path, compose):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="strategy"):
        compose(["strategy=nope"], tmp_path)


def test_an_existing_run_is_never_overwritten(fast_overrides, tmp_path, run_lmas):
    run_dir = tmp_path / "run"
    run_lmas(fast_overrides + ["stream.max_train=4", "train.max_steps=1"], run_dir)
    before = (run_dir / "results.json").read_bytes()
    with pytest.raises(FileExistsError, match="never overwrites"):
        run_lmas(fast_overrides, run_dir)
    assert (run_dir / "results.json").read_bytes() == before
