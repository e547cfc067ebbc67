"""Lightning DDP trains an agent: 2 CPU processes (gloo) end with one adapter, the one a single process gets.

tests/ddp_fit.py trains the tiny model's adapter twice: with ``strategy="ddp"`` on 2 CPU processes
(batch 4 each) and in one process (batch 8, the same global batches in the same order). DDP averages
the ranks' gradients, so both ranks hold identical adapters, equal to the one-process adapter up to
float rounding, and score the same on held-out data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("ddp_fit.py")


def run(devices: int, batch_size: int, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--devices", str(devices), "--batch-size", str(batch_size),
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow  # long (a subprocess or a sweep); the slow suite runs it (docs/testing.md)
def test_ddp_two_cpu_processes_match_one_process(tmp_path):
    run(2, 4, tmp_path / "ddp")
    run(1, 8, tmp_path / "one")
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    assert [r["world_size"] for r in ranks] == [2, 2] and one["world_size"] == 1
    assert ranks[0]["backend"] == "gloo" and ranks[0]["pid"] != ranks[1]["pid"]
    assert ranks[0]["steps"] == ranks[1]["steps"] == one["steps"] == 8  # 32 examples, global batch 8, 2 epochs

    a0, a1 = (load_file(str(tmp_path / "ddp" / f"rank{r}.safetensors")) for r in (0, 1))
    ref = load_file(str(tmp_path / "one" / "rank0.safetensors"))
    assert a0.keys() == a1.keys() == ref.keys()
    for k in a0:
        assert torch.equal(a0[k], a1[k]), f"ranks disagree on {k}"
    torch.testing.assert_close(a0, ref, rtol=1e-4, atol=1e-5)
    assert any(a0[k].abs().sum() > 0 for k in a0 if "lora_B" in k)  # it trained

    # each step, the ranks trained on the two halves of the one-process run's batch
    for step, (r0, r1, both) in enumerate(zip(ranks[0]["rows"], ranks[1]["rows"], one["rows"])):
        assert len(r0) == len(r1) == 4 and sorted(r0 + r1) == sorted(both), step
    # their mean loss is the global batch's loss
    mean = [(x + y) / 2 for x, y in zip(ranks[0]["losses"], ranks[1]["losses"])]
    assert ranks[0]["losses"] != ranks[1]["losses"]
    assert mean == pytest.approx(one["losses"], rel=1e-4, abs=1e-5)
    assert ranks[0]["eval_nll"] == ranks[1]["eval_nll"]
    assert ranks[0]["eval_nll"] == pytest.approx(one["eval_nll"], rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_lmas_train_with_ddp_on_two_cpu_processes(tmp_path):
    """`lmas-train trainer.strategy=ddp trainer.devices=2`: rank 1 re-runs the job into `.rank1/`."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, "-m", "lmas.train", "model=tiny", "debug=fast", "logger=csv",
                           "stream.max_eval=4", "trainer.strategy=ddp", "trainer.devices=2",
                           f"hydra.run.dir={run_dir}"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    main = json.loads((run_dir / "results.json").read_text())
    worker = json.loads((run_dir / ".rank1" / "results.json").read_text())
    assert main["complete"] and worker["complete"]
    assert main["config"]["trainer"]["strategy"] == "ddp"
    assert main["matrix"] == worker["matrix"]  # both ranks hold the same adapters, so they score alike
    assert main["loss_curves"].keys() == worker["loss_curves"].keys()
    assert (run_dir / "metrics.csv").is_file() and not (run_dir / ".rank1" / "metrics.csv").exists()
