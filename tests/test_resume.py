"""Resume after a crash: checkpoints every round; a resumed run ends with the uninterrupted run's results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmas.loop import ContinualLoop
from lmas.train import resume_config, run

COMPARED = ("matrix", "metrics", "loss_curves", "learning_curves", "agents", "population", "truncated_prompts",
            "library")


def _same(a: dict, b: dict, tol: float = 1e-5) -> None:
    """Recursive equality with a float tolerance (the runs may differ in process and thread pool)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k], tol)
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y, tol)
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, abs=tol)
    else:
        assert a == b


def _crash_in_round(monkeypatch, crash_round: int) -> None:
    fit = ContinualLoop.fit

    def crashing(self, agent, task, seen, round_idx, strategy=None, lr=None):
        if round_idx == crash_round:
            raise RuntimeError("simulated crash")
        return fit(self, agent, task, seen, round_idx, strategy, lr)

    monkeypatch.setattr(ContinualLoop, "fit", crashing)


@pytest.mark.parametrize("extra", [
    ["strategy=ewc"],
    ["strategy=replay"],
    ["strategy=olora"],
    ["strategy=opcm"],
    ["strategy=seqft", "allocation=competence"],  # competence scores the model before the next task trains
    ["population=master_worker"],
    ["population=peer_to_peer", "eval.curve_every=1"],
    ["loop=federated", "population.agents=2", "loop.aggregator=fedavgm", "loop.clients_per_round=1"],
    ["loop=evolution", "population.agents=3", "+loop.pbt.space.rank=[2,8]", "loop.pbt.quantile_fraction=0.5"],
    pytest.param(["loop=evolution", "population.agents=3", "loop.method=qd"], marks=pytest.mark.slow),
    ["population=bases", "+population.bases.small={_target_:lmas.models.providers.tiny,hidden_size:48,seed:1}",
     "population.agents={a:model,b:small}"],
    ["population.agents=2", "allocation=broadcast", "transfer=consolidate", "transfer.every=1"],
    ["population=bases", "+population.bases.enc={_target_:lmas.models.providers.tiny_encoder}",
     "population.agents={a:model,e:enc}", "allocation=broadcast", "stream=bbc_class_incremental"],
    ["experiment=encoder_pretraining", "model=tiny_encoder"],
], ids=["ewc", "replay", "olora", "opcm", "seqft", "master_worker", "p2p", "federated", "pbt", "qd", "two_bases",
        "consolidate", "encoder_agent", "encoder_pretraining"])
def test_resume_after_a_crash_gives_the_uninterrupted_results(extra, fast_overrides, tmp_path, run_lmas, compose,
                                                              monkeypatch):
    reference = run_lmas(fast_overrides + extra, tmp_path / "reference")
    crashed = tmp_path / "crashed"
    with monkeypatch.context() as m:
        _crash_in_round(m, 2)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_lmas(fast_overrides + extra, crashed)
    partial = json.loads((crashed / "results.json").read_text())
    assert not partial["complete"] and json.loads((crashed / "checkpoint" / "state.json").read_text())["round"] == 1
    resumed = run(resume_config(crashed, []), crashed, resume=True)
    for key in COMPARED + tuple(k for k in ("federated", "evolution") if k in reference):  # the round body's record
        _same(reference[key], resumed[key], tol=0.0)  # same process: bit-identical
    assert reference["timings"].keys() == resumed["timings"].keys()


def test_a_kill_between_the_two_renames_of_a_checkpoint_swap_resumes_to_the_uninterrupted_results(
        fast_overrides, tmp_path, run_lmas, monkeypatch):
    """Round 1's checkpoint swap dies after `checkpoint` -> `checkpoint.old`, before `checkpoint.new` ->
    `checkpoint`: the resume takes the complete new folder (round 1) and ends as an uninterrupted run."""
    from lmas import checkpoint

    class Killed(BaseException):
        pass

    rename = Path.rename

    def dying(self, target):
        if self.name == f"{checkpoint.DIR}.new" and (self.parent / f"{checkpoint.DIR}.old").exists():
            raise Killed
        return rename(self, target)

    reference = run_lmas(fast_overrides + ["strategy=ewc"], tmp_path / "reference")
    crashed = tmp_path / "crashed"
    with monkeypatch.context() as m:
        m.setattr(Path, "rename", dying)
        with pytest.raises(Killed):
            run_lmas(fast_overrides + ["strategy=ewc"], crashed)
    assert not (crashed / "checkpoint").exists()
    assert json.loads((crashed / "checkpoint.new" / "state.json").read_text())["round"] == 1
    resumed = run(resume_config(crashed, []), crashed, resume=True)
    for key in COMPARED:
        _same(reference[key], resumed[key], tol=0.0)
    assert sorted(p.name for p in crashed.glob("checkpoint*")) == ["checkpoint"]


def test_a_run_dir_with_a_checkpoint_is_refused_without_resume(fast_overrides, tmp_path, run_lmas, monkeypatch):
    out = tmp_path / "run"
    _crash_in_round(monkeypatch, 1)
    with pytest.raises(RuntimeError):
        run_lmas(fast_overrides, out)
    with pytest.raises(FileExistsError, match="resume="):
        run_lmas(fast_overrides, out)


def test_resume_refuses_other_overrides_and_complete_or_empty_dirs(fast_overrides, tmp_path, run_lmas):
    with pytest.raises(ValueError, match=r"drop the other overrides \['seed=3'\]"):
        resume_config(tmp_path, ["resume=x", "seed=3"])
    with pytest.raises(FileNotFoundError, match="config.yaml not found"):
        resume_config(tmp_path, [])
    done = tmp_path / "done"
    run_lmas(fast_overrides, done)
    with pytest.raises(FileExistsError, match="that run is complete"):
        run(resume_config(done, []), done, resume=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        run(resume_config(done, []), empty, resume=True)


def test_sigkill_mid_stream_then_resume_matches_an_uninterrupted_run(tmp_path, run_lmas):
    """A real lmas-train process is killed with SIGKILL after round 0; `resume=` finishes it."""
    overrides = ["model=tiny", "debug=fast", "logger=csv", "strategy=ewc", "train.epochs=10",
                 "train.max_steps=30"]  # 30 steps per task: round 1 is still running when round 0 is saved
    killed = tmp_path / "killed"
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.Popen([sys.executable, "-m", "lmas.train", *overrides, f"hydra.run.dir={killed}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    state = killed / "checkpoint" / "state.json"
    deadline = time.monotonic() + 300
    while not state.is_file():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert json.loads(state.read_text())["round"] == 0, "the run got past round 0 before the kill"
    assert not json.loads((killed / "results.json").read_text())["complete"]
    done = subprocess.run([sys.executable, "-m", "lmas.train", f"resume={killed}",
                           f"hydra.run.dir={tmp_path / 'resume-logs'}"], capture_output=True, env=env)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    resumed = json.loads((killed / "results.json").read_text())
    assert resumed["complete"]
    reference = run_lmas(overrides, tmp_path / "reference")
    for key in ("matrix", "metrics", "loss_curves"):
        _same(reference[key], resumed[key])
    metrics_csv = (killed / "metrics.csv").read_text()
    assert metrics_csv.count("axis,step,key,value") == 1  # the resumed run appended to the same file


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(fast_overrides, tmp_path, run_lmas,
                                                                      monkeypatch):
    import torch
    from safetensors.torch import load_file

    from lmas.strategies.base import Strategy

    def poisoned(self, module, batch, out):
        if module.population.agents[module.agent].history:  # from the second task on
            return {"poison": torch.tensor(float("nan"))}
        return {}

    monkeypatch.setattr(Strategy, "loss_terms", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match="non-finite loss nan"):
        run_lmas(fast_overrides, out)
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["round"] == 0
    weights = load_file(str(out / "checkpoint" / "adapters" / "agent0.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_avalanche_strategies_with_state_refuse_to_resume():
    from lmas.training.avalanche import AvalancheStrategy

    AvalancheStrategy("naive").load_state_dict({"method": "naive", "experiences": {"agent0": 1}})
    with pytest.raises(ValueError, match="cannot be resumed exactly"):
        AvalancheStrategy("ewc").load_state_dict({"method": "ewc", "experiences": {"agent0": 1}})
