"""benchmarks/gpu.py runs end to end (on the CPU, a 2-layer shape of SmolLM2's architecture) and writes what the
GPU report reads: rates, utilisations and losses that are numbers in range, for every batch size."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_the_gpu_benchmark_script_runs_on_a_small_shape_and_writes_its_report(tmp_path, smollm2_folder):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--device", "cpu", "--out-dir",
           str(tmp_path), "--model-folder", str(smollm2_folder), "--batch-sizes", "2,4", "--seq", "24",
           "--steps", "4", "--warmup", "1", "--no-compile"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_cpu_smoke.json").read_text())
    assert report["attention"] == "sdpa" and report["precision"] == "bf16-mixed"
    assert report["peak_bf16"]["peak"] > 0
    for kind in ("train", "rank", "generate"):
        assert set(report[kind]) == {"2", "4"}, kind
        for row in report[kind].values():
            assert row["tokens_per_s"] > 0 and row["flop"] > 0
            assert 0 < row["mfu"] < 1.5, (kind, row["mfu"])  # model FLOP/s against a measured matmul rate
    for b, row in report["train"].items():
        assert row["steps"] == 2 and row["tokens"] == 2 * int(b) * 24  # rows cut to exactly --seq tokens
        assert math.isfinite(row["loss_first"]) and math.isfinite(row["loss_last"])
    assert report["best_training_mfu"] == max(r["mfu"] for r in report["train"].values())


def test_the_gpu_benchmark_refuses_cuda_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "torch.cuda.is_available() is False" in done.stderr
