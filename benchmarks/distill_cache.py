"""Per-step cost of distilling from K=4 teachers, with and without the teacher-output cache.

A student agent trains on one task of the default stream with a Distill term from 4 teacher agents
(on the embedded model; teachers' LoRA B factors are made non-zero so they are real, distinct
models). Three variants train the same steps from the same start, alternately (A B C A B C ...):
  none   — no distillation (the task loss alone),
  cached — teachers' outputs computed once for the experience (included in the time), then read,
  live   — teachers run at every step (what a cache-less implementation pays).
Reported: seconds per step (median over repeats) and the ratios live/cached and cached/none, in wall
time and in process CPU time (what each variant computes, whatever else the machine is doing).
Writes benchmarks/results/distill_cache.json.

    .venv/bin/python benchmarks/distill_cache.py [--task bbc|math] [--epochs 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmas.data.mathgen import math_task
from lmas.data.sources import bbc_topics
from lmas.data.stream import Stream
from lmas.distill.strategy import Distill
from lmas.loop import ContinualLoop, EvalConfig, TrainConfig
from lmas.models.providers import smollm2
from lmas.population.allocation import Explicit
from lmas.population.population import Population
from lmas.strategies.base import Strategy

OUT = Path(__file__).parent / "results" / "distill_cache.json"
TEACHERS = ["t0", "t1", "t2", "t3"]


def build(task_name: str, n_train: int):
    if task_name == "bbc":
        return bbc_topics("bbc", n_train=n_train, n_val=8, n_test=8, max_chars=160)
    return math_task("math", problem="arithmetic__add_or_sub", n_train=n_train, n_val=8, n_test=8)


def seconds_per_step(base, task, strategy, epochs: int, batch: int) -> tuple[float, float, int]:
    """Wall and CPU seconds per training step of the student (teacher caching included)."""
    pop = Population(base, agents=TEACHERS + ["student"], lora={"r": 8, "alpha": 16}, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pop.model.named_parameters():
            if "lora_B" in n and ".student." not in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    for t in TEACHERS:
        pop.agents[t].history.append({"round": -1, "event": "trained", "task": task.name})
    with tempfile.TemporaryDirectory() as tmp:
        loop = ContinualLoop(pop, Stream("s", [task]), strategy, tmp, seed=0,
                             train=TrainConfig(lr=1e-3, batch_size=batch, epochs=epochs),
                             eval=EvalConfig(initial=False, next_task=False), allocation=Explicit([{"student": task.name}]),
                             progress=False, save_adapters=False)
        t0, c0 = time.perf_counter(), time.process_time()
        loop.fit("student", task, [], 0)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return wall / loop.state.step, cpu / loop.state.step, loop.state.step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="bbc", choices=["bbc", "math"])
    parser.add_argument("--n-train", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    task = build(args.task, args.n_train)
    variants = {"none": lambda: Strategy(),
                "cached": lambda: Distill(teachers=TEACHERS, cache=True),
                "live": lambda: Distill(teachers=TEACHERS, cache=False)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    steps = 0
    for rep in range(args.repeats):
        for name, make in variants.items():
            base = smollm2()
            per_step, cpu_step, steps = seconds_per_step(base, task, make(), args.epochs, args.batch_size)
            times[name].append(per_step)
            cpu[name].append(cpu_step)
            print(f"repeat {rep} {name:6s} {per_step:.3f} s/step (CPU {cpu_step:.3f} s)", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    result = {
        "benchmark": "distill_cache",
        "command": "python " + " ".join(sys.argv),
        "task": args.task, "teachers": len(TEACHERS), "n_train": args.n_train, "batch_size": args.batch_size,
        "epochs": args.epochs, "steps": steps, "repeats": args.repeats,
        "seconds_per_step_median": med, "seconds_per_step_all": times,
        "cpu_seconds_per_step_median": med_cpu, "cpu_seconds_per_step_all": cpu,
        "live_over_cached": med["live"] / med["cached"],
        "cached_over_no_distillation": med["cached"] / med["none"],
        "cpu_live_over_cached": med_cpu["live"] / med_cpu["cached"],
        "cpu_cached_over_no_distillation": med_cpu["cached"] / med_cpu["none"],
        "versions": {"torch": torch.__version__},
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("seconds_per_step_median", "live_over_cached",
                                              "cached_over_no_distillation", "cpu_live_over_cached",
                                              "cpu_cached_over_no_distillation")}, indent=2))


if __name__ == "__main__":
    main()
