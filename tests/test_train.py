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


def _tiny_cl_benchmark(root: Path) -> Path:
    """Two long-sequence tasks in SAPT's layout (a preset over the benchmark skips the absent ones)."""
    for name, labels in (("yelp", ["1", "5"]), ("amazon", ["negative", "positive"])):
        folder = root / "Long_Sequence" / name
        folder.mkdir(parents=True)
        (folder / "labels.json").write_text(json.dumps(labels))
        for split, n in (("train", 70), ("test", 12)):
            rows = [{"input": f"{name} {split} text {i}", "output": labels[i % 2]} for i in range(n)]
            (folder / f"{split}.json").write_text(json.dumps({"Definition": ["Classify."], "Instances": rows}))
    return root


SLOW_PRESETS = {"distillation/losses"}  # the pieces of distillation/specialists with other losses: the slow suite


@pytest.mark.parametrize("preset", [pytest.param(p, marks=pytest.mark.slow) if p in SLOW_PRESETS else p
                                    for p in PRESETS])  # fmt: skip
def test_every_experiment_preset_runs_fast(preset, fast_overrides, tmp_path, run_lmas):
    extra = []
    if preset.startswith("reproduction/"):  # the benchmark's data, and LoRA on the tiny model's top layer
        extra = [f"stream.data_dir={_tiny_cl_benchmark(tmp_path / 'CL_Benchmark')}"]
        if preset != "reproduction/all_layers":  # the others restrict LoRA to the top layers
            extra.append("population.lora.layers_to_transform=[1]")
    if preset == "encoder_pretraining":  # its agents are encoders: the tiny BERT instead of the tiny Llama
        extra = ["model=tiny_encoder"]
    results = run_lmas(fast_overrides + [f"experiment={preset}", *extra], tmp_path / preset)
    assert results["complete"]
    assert len(results["tasks"]) >= 2
    assert any(results["metrics"].values())  # some agent trained and has CL metrics
    if preset.startswith("reproduction/"):  # the papers' preset scores by generation, the CPU protocols by rank
        want = "exact_match" if preset == "reproduction/paper" else "accuracy"
        assert {t["metric"] for t in results["tasks"]} == {want}


def test_the_protocol_check_preset_differs_from_the_cpu_protocol_only_where_lora_sits(compose, monkeypatch):
    """reproduction/all_layers is reproduction/fast with LoRA in every layer (and so no frozen trunk to share)."""
    from omegaconf import OmegaConf

    monkeypatch.setenv("LMAS_CL_BENCHMARK", "/nonexistent")  # composed only, never read
    fast, full = (OmegaConf.to_container(compose([f"experiment=reproduction/{p}", "stream=cl_standard"]), resolve=True)
                  for p in ("fast", "all_layers"))
    assert fast["population"]["lora"].pop("layers_to_transform") == [26, 27, 28, 29]
    assert full["population"]["lora"].pop("layers_to_transform") is None
    assert (fast["train"].pop("trunk_cache"), full["train"].pop("trunk_cache")) == (True, False)
    assert (fast["eval"].pop("shared_trunk"), full["eval"].pop("shared_trunk")) == (True, False)
    fast.pop("logger"), full.pop("logger")  # the W&B group is the preset's name
    assert fast == full  # data caps, sequence length, optimiser, schedule, cache: all the same


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


def test_a_bad_argument_of_a_cheap_object_fails_before_the_model_and_the_stream_load(tmp_path, compose, monkeypatch):
    """Strategy, transfer, allocation, topology and distill are built first: their own checks fail at once."""
    from hydra.errors import InstantiationException

    import lmas.data.stream
    import lmas.models.providers
    from lmas.train import run

    def not_now(*args, **kwargs):
        raise AssertionError("the model and the stream must not load before the cheap objects are built")

    monkeypatch.setattr(lmas.models.providers, "tiny", not_now)
    monkeypatch.setattr(lmas.data.stream, "Stream", not_now)
    cases = [
        (["strategy=ewc", "strategy.ewc_lambda=-1"], r"ewc_lambda=-1, decay=1.0: must be >= 0'\)\nfull_key: strategy"),
        (["population=peer_to_peer", "topology.graph=star"], r"topology.graph='star'.*\nfull_key: topology"),
        (["population=master_worker", "allocation.shots=0"], r"allocation: tasks_per_round, shots.*\nfull_key: alloc"),
    ]
    for overrides, expected in cases:
        run_dir = tmp_path / overrides[-1]
        with pytest.raises(InstantiationException, match=expected):
            run(compose(["model=tiny", *overrides], run_dir), run_dir)
        assert not run_dir.exists()  # nor is the run dir made


def test_help_lists_the_config_groups(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "lmas.train", "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    groups = proc.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    assert "allocation: broadcast, competence, explicit, own_stream, round_robin" in groups
    assert "topology: hierarchical, master_worker, none, peer_to_peer" in groups


def test_resume_reads_a_run_saved_while_allocation_and_topology_were_population_options(tmp_path):
    from omegaconf import OmegaConf

    from lmas.train import CONFIG, resume_config

    old = {"seed": 0, "population": {"agents": 3, "allocation": {"_target_": "lmas.population.allocation.RoundRobin"},
                                     "topology": {"_target_": "lmas.population.topology.Hierarchical"}}}
    OmegaConf.save(OmegaConf.create(old), tmp_path / CONFIG)
    cfg = resume_config(tmp_path, ["resume=" + str(tmp_path)])
    assert cfg.allocation._target_.endswith("RoundRobin") and cfg.topology._target_.endswith("Hierarchical")
    assert "allocation" not in cfg.population and cfg.population.agents == 3


def test_resume_keeps_the_plain_shuffle_of_a_run_saved_before_length_grouping(tmp_path):
    from omegaconf import OmegaConf

    from lmas.train import CONFIG, resume_config

    OmegaConf.save(OmegaConf.create({"seed": 0, "train": {"lr": 0.01}}), tmp_path / CONFIG)
    assert resume_config(tmp_path, ["resume=" + str(tmp_path)]).train.length_grouping is False
    OmegaConf.save(OmegaConf.create({"seed": 0, "train": {"lr": 0.01, "length_grouping": True}}), tmp_path / CONFIG)
    assert resume_config(tmp_path, ["resume=" + str(tmp_path)]).train.length_grouping is True


@pytest.mark.parametrize("old, target", [
    ({"cycles": 2, "student": "s"}, "lmas.selflearn.SelfLearning"),
    (None, "lmas.loop.Continual"),
])
def test_resume_reads_a_run_saved_with_the_selflearn_key(old, target, tmp_path):
    from omegaconf import OmegaConf

    from lmas.train import CONFIG, resume_config

    OmegaConf.save(OmegaConf.create({"seed": 0, "selflearn": old}), tmp_path / CONFIG)
    cfg = resume_config(tmp_path, ["resume=" + str(tmp_path)])
    assert "selflearn" not in cfg and cfg.loop._target_ == target
    assert (cfg.loop.cycles, cfg.loop.student) == (2, "s") if old else len(cfg.loop) == 1
