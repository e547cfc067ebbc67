"""An 8-strategy sweep with the evaluation cache (``eval.cache``) vs one run without it, on the embedded model.

The reproduction study's fast protocol (``conf/experiment/reproduction/fast.yaml``) sweeps strategies and
seeds on one stream with LoRA on the top 4 of SmolLM2's 30 layers. The untrained model's scores and the
26 frozen layers' activations for every test prompt are the same in every run of such a sweep; with
``eval.cache`` they are computed once and kept on disk (``lmas/evaluation/cache.py``). Issue 16, target 4:
the 8 runs' evaluation together should cost at most 2x the evaluation of one run without the cache.

Protocol: SmolLM2-135M (``smollm2()``, float32), LoRA r=8, alpha=16 on q_proj/v_proj of layers 26-29,
``train.trunk_cache`` and ``eval.shared_trunk`` on (as in the fast protocol), ``data.max_length`` 192;
a 2-task stream (bbc topics, 5 labels, texts cut to ``--max-chars``; ChatterBot categories, 4 labels),
``--test`` test items per task; ``--steps`` training steps of batch 8 per task; the full evaluation
schedule (the untrained model; after round 0, task 0 and the next task; after round 1, both tasks).
Each run is a fresh model and population (``ContinualLoop`` as ``lmas-train`` builds it), the strategy
from its preset in ``conf/strategy/``. First one naive run without the cache (the baseline), then the
8 strategies with one cache directory, cold at the start of the sweep (a fresh temp dir), then the
baseline again; the baseline's cost is the mean of its two runs. Evaluation time is measured around
``Evaluator.initial`` and ``Evaluator.evaluate_round`` (what ``eval_s`` in results.json times), as
process CPU time (1 torch thread: what is computed, whatever the waiting on this shared machine) and
wall time. The first cached run's matrix is checked against the baseline's (same strategy, same seed):
equal within float tolerance.
Writes benchmarks/results/sweep_cache.json.

    .venv/bin/python benchmarks/sweep_cache.py [--test 48] [--steps 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lmas.data.sources import bbc_topics, chatterbot_categories
from lmas.data.stream import Stream
from lmas.evaluation.evaluator import Evaluator
from lmas.loop import ContinualLoop
from lmas.models.providers import smollm2
from lmas.population.population import Population
from lmas.schema import EvalConfig, TrainConfig
from lmas.strategies.base import Strategy

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "sweep_cache.json"
STRATEGIES = ["naive", "replay", "ewc", "l2", "lwf", "olora", "inclora", "joint"]
TRAINER = {"accelerator": "cpu", "devices": 1, "precision": "32-true", "gradient_clip_val": 1.0, "deterministic": False}
K, TARGET = 4, 2.0
CLOCK = {"cpu": 0.0, "wall": 0.0}


def timed(fn: Callable) -> Callable:
    """Add the wall and process CPU time of every call of an Evaluator method to CLOCK."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        c, t = time.process_time(), time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            CLOCK["cpu"] += time.process_time() - c
            CLOCK["wall"] += time.perf_counter() - t

    return wrapper


Evaluator.initial = timed(Evaluator.initial)  # type: ignore[method-assign]
Evaluator.evaluate_round = timed(Evaluator.evaluate_round)  # type: ignore[method-assign]


def strategy(name: str) -> Strategy:
    """The preset conf/strategy/<name>.yaml, its ${seed} and ${train.batch_size} resolved."""
    preset = OmegaConf.load(ROOT / f"conf/strategy/{name}.yaml")
    cfg = OmegaConf.create({"seed": 0, "train": {"batch_size": 8}, "strategy": preset})
    return instantiate(cfg.strategy)


def run(name: str, stream: Stream, run_dir: Path, cache: str | None, steps: int) -> dict:
    """One run: a fresh model and population; returns its evaluation times and results."""
    base = smollm2()
    n_layers = base.model.config.num_hidden_layers
    top = list(range(n_layers - K, n_layers))
    lora = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"], "layers_to_transform": top}
    pop = Population(base, agents=1, lora=lora, seed=0)
    loop = ContinualLoop(pop, stream, strategy(name), run_dir, seed=0,
                         train=TrainConfig(lr=1e-3, batch_size=8, max_steps=steps, trunk_cache=True),
                         eval=EvalConfig(batch_size=32, shared_trunk=True, cache=cache),
                         trainer=dict(TRAINER), max_length=192, progress=False, save_adapters=False)
    CLOCK.update(cpu=0.0, wall=0.0)
    c, t = time.process_time(), time.perf_counter()
    results = loop.run()
    out = {"strategy": name, "cache": cache is not None, "eval_cpu_s": CLOCK["cpu"], "eval_wall_s": CLOCK["wall"],
           "run_cpu_s": time.process_time() - c, "run_wall_s": time.perf_counter() - t, "matrix": results["matrix"]}
    if loop.scorer.cache is not None:
        store = loop.scorer.cache.store
        out |= {"untrained_hits": loop.scorer.cache.hits, "untrained_misses": loop.scorer.cache.misses,
                "trunk_rows_computed": loop.trunk.misses, "trunk_rows_read": loop.trunk.hits,
                "store_hits": store.hits, "store_writes": store.stores, "store_mb": store.size_bytes() / 2**20}
    print(name, "cache" if cache else "no cache", {k: v for k, v in out.items() if k != "matrix"}, flush=True)
    return out


def flat(value: Any) -> Iterator[float]:
    if isinstance(value, dict):
        for k in sorted(value):
            yield from flat(value[k])
    elif isinstance(value, list):
        for v in value:
            yield from flat(v)
    elif isinstance(value, (int, float)):
        yield float(value)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--test", type=int, default=48, help="test items per task")
    parser.add_argument("--steps", type=int, default=4, help="training steps per task")
    parser.add_argument("--max-chars", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tasks = [bbc_topics("bbc", n_train=8 * args.steps, n_val=8, n_test=args.test, max_chars=args.max_chars),
             chatterbot_categories("chat", categories=["ai", "coding", "psychology", "trivia"],
                                   n_train=8 * args.steps, n_val=8, n_test=args.test)]
    stream = Stream("sweep", tasks)
    tmp = Path(tempfile.mkdtemp(prefix="lmas-sweep-cache-"))
    before = run("naive", stream, tmp / "baseline0", None, args.steps)
    sweep = [run(name, stream, tmp / name, str(tmp / "cache"), args.steps) for name in STRATEGIES]
    after = run("naive", stream, tmp / "baseline1", None, args.steps)
    diffs = [abs(a - b) for a, b in zip(flat(before["matrix"]), flat(sweep[0]["matrix"]), strict=True)
             if not (math.isnan(a) or math.isnan(b))]
    if max(diffs) > 1e-6:
        print(f"WARNING: the cached naive run's matrix differs from the uncached one's by {max(diffs)}")
    one = {k: (before[k] + after[k]) / 2 for k in ("eval_cpu_s", "eval_wall_s")}
    total = {k: sum(r[k] for r in sweep) for k in ("eval_cpu_s", "eval_wall_s")}
    ratio_cpu, ratio_wall = total["eval_cpu_s"] / one["eval_cpu_s"], total["eval_wall_s"] / one["eval_wall_s"]
    results = {
        "model": "smollm2-135m-instruct", "threads": torch.get_num_threads(), "layers": 30, "k": K,
        "runs": len(STRATEGIES), "strategies": STRATEGIES, "tasks": [t.name for t in tasks], "test_items": args.test,
        "steps_per_task": args.steps, "max_length": 192, "max_chars": args.max_chars, "target": TARGET,
        "baseline_runs": [{k: v for k, v in r.items() if k != "matrix"} for r in (before, after)],
        "sweep_runs": [{k: v for k, v in r.items() if k != "matrix"} for r in sweep],
        "one_run_eval_cpu_s": one["eval_cpu_s"], "one_run_eval_wall_s": one["eval_wall_s"],
        "sweep_eval_cpu_s": total["eval_cpu_s"], "sweep_eval_wall_s": total["eval_wall_s"],
        "sweep_vs_one_run_cpu": ratio_cpu, "sweep_vs_one_run_wall": ratio_wall,
        "without_cache_estimate": len(STRATEGIES), "max_abs_matrix_diff_vs_uncached": max(diffs),
        "passes": ratio_cpu <= TARGET,
    }
    print(f"8-run sweep evaluation / one run without the cache: {ratio_cpu:.2f} (CPU), {ratio_wall:.2f} (wall); "
          f"target <= {TARGET}: {'passes' if results['passes'] else 'FAILS'}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {OUT}")


if __name__ == "__main__":
    main()
