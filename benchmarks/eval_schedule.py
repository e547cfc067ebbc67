"""Evaluation schedule: ``eval.schedule=minimal`` vs ``full`` on a 14-task stream, same metrics.

The long-sequence benchmark in order 4 (the 14 tasks of the shared copy; ``--data-dir`` or
``$LMAS_CL_BENCHMARK``) on the embedded SmolLM2-135M, LoRA (r=8, q/v) on the top 4 layers, one run per
schedule with the same seed: ``--train`` training examples and one step per task, ``--test`` test items per
task, inputs cut to 300 characters. Both runs evaluate the untrained model on every task (``eval.initial``);
``minimal`` then scores each task right after training it and just before, and every task after the last
round (``lmas/evaluation/evaluator.py``). Reported: the evaluation's process CPU time (``Evaluator`` calls, 1
torch thread) and wall time, with and without the initial evaluation (which a sweep pays once with
``eval.cache``), the number of task evaluations, and whether every CL metric is identical (asserted).
Writes benchmarks/results/eval_schedule.json.

    LMAS_CL_BENCHMARK=../shared/data/cl_benchmark .venv/bin/python benchmarks/eval_schedule.py [--test 16] [--train 8]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmas.data.cl_benchmark import cl_stream
from lmas.loop import ContinualLoop
from lmas.models.providers import smollm2
from lmas.population.population import Population
from lmas.schema import EvalConfig, TrainConfig
from lmas.strategies.base import Strategy

OUT = Path(__file__).parent / "results" / "eval_schedule.json"
TRAINER = {"accelerator": "cpu", "devices": 1, "precision": "32-true", "deterministic": False}


def run(schedule: str, args: argparse.Namespace, run_dir: Path) -> dict:
    stream = cl_stream("long", order=4, skip_missing=True, data_dir=args.data_dir, max_train=args.train,
                       max_eval=args.test, max_chars=300)  # fmt: skip
    pop = Population(smollm2(), agents=1, lora={"r": 8, "alpha": 16, "layers_to_transform": [26, 27, 28, 29]})
    loop = ContinualLoop(pop, stream, Strategy(), run_dir, seed=0, trainer=TRAINER, max_length=160,
                         train=TrainConfig(lr=1e-3, batch_size=args.train, max_steps=1),
                         eval=EvalConfig(batch_size=16, schedule=schedule), progress=False,
                         save_adapters=False)  # fmt: skip
    spent = {"initial": [0.0, 0.0], "rounds": [0.0, 0.0]}  # CPU, wall

    def timed(fn: Callable, key: str) -> Callable:
        def wrapper(*a: Any, **kw: Any) -> Any:
            c, t = time.process_time(), time.perf_counter()
            out = fn(*a, **kw)
            spent[key][0] += time.process_time() - c
            spent[key][1] += time.perf_counter() - t
            return out

        return wrapper

    loop.evaluator.initial = timed(loop.evaluator.initial, "initial")
    loop.evaluator.evaluate_round = timed(loop.evaluator.evaluate_round, "rounds")
    results = loop.run()
    values = results["matrix"]["values"]
    entries = sum(1 for rnd in values for row in rnd for v in row if v is not None and not math.isnan(v))
    return {"metrics": results["metrics"]["agent0"], "task_evaluations_after_rounds": entries,
            "tasks": len(stream), "cpu_s": spent["rounds"][0], "wall_s": spent["rounds"][1],
            "initial_cpu_s": spent["initial"][0], "initial_wall_s": spent["initial"][1]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("LMAS_CL_BENCHMARK"))
    parser.add_argument("--test", type=int, default=16)
    parser.add_argument("--train", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if not args.data_dir:
        raise SystemExit("give --data-dir or set LMAS_CL_BENCHMARK to the CL_Benchmark folder")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = {s: run(s, args, Path(tmp) / s) for s in ("full", "minimal")}
    full, minimal = out["full"], out["minimal"]
    assert full["metrics"] == minimal["metrics"], (full["metrics"], minimal["metrics"])
    result = {
        "setup": {
            "tasks": full["tasks"],
            "test_items_per_task": args.test,
            "train_examples": args.train,
            "threads": args.threads,
            "torch": torch.__version__,
        },  # fmt: skip
        "runs": out,
        "metrics_identical": True,
        "task_evaluations_ratio": full["task_evaluations_after_rounds"] / minimal["task_evaluations_after_rounds"],
        "rounds_cpu_ratio": full["cpu_s"] / minimal["cpu_s"],
        "rounds_wall_ratio": full["wall_s"] / minimal["wall_s"],
        "with_initial_cpu_ratio": (full["cpu_s"] + full["initial_cpu_s"])
        / (minimal["cpu_s"] + minimal["initial_cpu_s"]),
        "goal": ">= 3x less evaluation time, identical metrics",
    }
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
