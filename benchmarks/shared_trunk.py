"""Shared frozen trunk: LoRA on the top k layers only, the layers below computed once, on the embedded model.

SmolLM2-135M has 30 decoder layers; LoRA (r=8, alpha=16, q_proj/v_proj) sits in the top k = 4
(``population.lora.layers_to_transform=[26,27,28,29]``), so layers 0-25 are the same for every agent
(``lmas/lm/trunk.py``). Three measurements, each side alternating with the other in one process
(A B A B ...), ratios of median times:

1. evaluation: label log-likelihoods of 8 agents (random non-zero adapters) on the default stream's
   ``bbc`` test prompts (40 prompts, 5 labels) with the shared trunk (``eval.shared_trunk``: the
   bottom once per batch, the top 4 layers per agent), vs one agent scored the usual way
   (``label_logprobs``). Target: ≤ 2.5× one agent. The trunk's scores are checked against the 8
   agents scored without it.
2. training, one agent, 3 epochs (``ContinualLoop.fit``) with ``train.trunk_cache`` (the bottom's
   output cached per example, a fresh cache per run) vs without. Target: ≥ 1.5× faster.
3. training, 4 agents one after another on the same task, 3 epochs each, sharing one cache, vs the
   same 4 runs without it. Target: ≥ 2.2× faster.

Training uses the first ``--train-examples`` (default 24: 3 steps per epoch) of the bbc training
set, batch 8, AdamW lr 2e-3, gradient clipping 1.0; adapters are reset to the same start before
each run, and the cached runs must end with the adapters of the plain runs (checked).
Counting layer passes (forward 1, backward through a LoRA layer 2, or 1: LoRA's backward computes no
gradient for the frozen base weights) gives the bounds written next to the measured ratios. The ratios are of process CPU time with 1 torch thread (what each side
computes: on this shared 2-core machine wall time also counts waiting for a core, and background
jobs get paused at times); wall-time ratios are written next to them.
Writes benchmarks/results/shared_trunk.json.

    .venv/bin/python benchmarks/shared_trunk.py [--repeats 3] [--train-repeats 3] [--train-examples 24] [--parts eval train] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lmas.data.sources import bbc_topics
from lmas.data.stream import Stream
from lmas.data.task import Task
from lmas.loop import ContinualLoop, TrainConfig
from lmas.models.providers import smollm2
from lmas.lm.encoding import PromptEncoder
from lmas.lm.trunk import SharedTrunk
from lmas.evaluation.scorer import PopulationScorer
from lmas.population.population import Population
from lmas.strategies.base import Strategy

OUT = Path(__file__).parent / "results" / "shared_trunk.json"
K = 4
TRAINER = {"accelerator": "cpu", "devices": 1, "precision": "32-true", "gradient_clip_val": 1.0, "deterministic": False}
TARGETS = {"eval_8_agents_vs_1": 2.5, "train_3_epochs_speedup": 1.5, "train_4_agents_speedup": 2.2}


def randomise(pop: Population, seed: int, std: float = 0.02) -> None:
    """Random non-zero adapters (fresh ones are exact no-ops: B = 0), different per agent."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in pop.names:
            for pname, p in pop.parameters_of(name).items():
                if "lora_B" in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)


def alternate(sides: dict, repeats: int, label: str) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Run each side ``repeats`` times, alternating the order; (wall, process CPU) seconds per run."""
    wall: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            t, c = time.perf_counter(), time.process_time()
            sides[name]()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
            print(f"{label} repeat {r} {name}: {wall[name][-1]:.1f} s ({cpu[name][-1]:.1f} s CPU)", flush=True)
    return wall, cpu


def medians(runs: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in runs.items()}


def bounds(n_layers: int, k: int, agents: int, epochs: int, backward: float = 2.0) -> dict[str, float]:
    """Layer-pass counts: a forward pass through a layer = 1, a backward pass through one of the top
    k (the only layers gradients flow through) = ``backward``. 2 is the usual rule of thumb (the
    issue's bounds); 1 is closer for LoRA, whose backward skips the frozen base weights' gradients."""
    split = n_layers - k
    epoch_plain, epoch_cached = n_layers + backward * k, k + backward * k
    one = epochs * epoch_plain / (epoch_plain + (epochs - 1) * epoch_cached)
    many = agents * epochs * epoch_plain / (split + agents * epochs * epoch_cached)
    return {"eval_8_agents_vs_1": (split + 8 * k) / n_layers, "train_3_epochs_speedup": one,
            "train_4_agents_speedup": many}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the evaluation measurement")
    parser.add_argument("--train-repeats", type=int, default=3, help="repeats of each training measurement")
    parser.add_argument("--train-examples", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--train-agents", type=int, default=4)
    parser.add_argument("--parts", nargs="+", choices=["eval", "train"], default=["eval", "train"],
                        help="measure only these; the other part's results are kept from the existing file")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    base = smollm2()
    n_layers = base.model.config.num_hidden_layers
    top = list(range(n_layers - K, n_layers))
    lora = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"], "layers_to_transform": top}
    pop = Population(base, agents=args.agents, lora=lora)
    trunk = SharedTrunk(pop.model)
    assert trunk.split == n_layers - K
    enc = PromptEncoder(base.tokenizer, 128)
    task = bbc_topics("bbc", n_train=160, n_val=20, n_test=40, max_chars=160)  # conf/stream/default.yaml
    results = {"model": base.name, "threads": torch.get_num_threads(), "layers": n_layers, "k": K,
               "split": trunk.split, "lora": lora, "targets": TARGETS,
               "layer_pass_bounds": bounds(n_layers, K, args.train_agents, args.epochs),
               "layer_pass_bounds_backward_1x": bounds(n_layers, K, args.train_agents, args.epochs, backward=1.0)}

    old = json.loads(OUT.read_text()) if OUT.is_file() else {}
    for key in ("evaluation", "single_agent", "agents_same_task"):
        if key in old:
            results[key] = old[key]
    init = {a: pop.adapter_state(a) for a in pop.names}
    if "eval" in args.parts:
        evaluation(results, pop, trunk, enc, task, args)
        for a in pop.names:
            pop.load_adapter_state(a, init[a])
    if "train" in args.parts:
        training(results, pop, init, task, args)

    measured = {"eval_8_agents_vs_1": results["evaluation"]["shared_vs_one_agent_cpu"],
                "train_3_epochs_speedup": results["single_agent"]["speedup_cpu"],
                "train_4_agents_speedup": results["agents_same_task"]["speedup_cpu"]}
    results["measured"] = measured  # CPU time; the wall-time ratios are in each section
    results["passes"] = {
        "eval_8_agents_vs_1": measured["eval_8_agents_vs_1"] <= TARGETS["eval_8_agents_vs_1"],
        "train_3_epochs_speedup": measured["train_3_epochs_speedup"] >= TARGETS["train_3_epochs_speedup"],
        "train_4_agents_speedup": measured["train_4_agents_speedup"] >= TARGETS["train_4_agents_speedup"],
    }
    for k, v in measured.items():
        print(f"{k}: measured {v:.2f}, bounds {results['layer_pass_bounds'][k]:.2f} (backward 2x) / "
              f"{results['layer_pass_bounds_backward_1x'][k]:.2f} (backward 1x), target {TARGETS[k]}, "
              f"{'passes' if results['passes'][k] else 'FAILS'}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {OUT}")


def evaluation(results: dict, pop: Population, trunk: SharedTrunk, enc: PromptEncoder, task: Task, args) -> None:
    """8 agents' label scores through the shared trunk vs one agent's scored the usual way."""
    randomise(pop, seed=0)
    prompts = [ex.prompt for ex in task.test]
    agents = pop.names[: args.agents]
    one = PopulationScorer(pop, enc, 32, mixed=False)
    shared = PopulationScorer(pop, enc, 32, trunk=trunk)
    out = {}
    wall, cpu = alternate({
        "one_agent": lambda: one.label_logprobs(agents[:1], prompts, task.labels),
        "shared_trunk": lambda: out.__setitem__("shared", shared.label_logprobs(agents, prompts, task.labels)),
    }, args.repeats, f"eval {len(agents)} agents")
    # the same scores as without the trunk (agents switched one by one; untimed)
    plain = PopulationScorer(pop, enc, 32, mixed=False).label_logprobs(agents, prompts, task.labels)
    torch.testing.assert_close(out["shared"], plain, rtol=1e-3, atol=1e-3)
    med, med_cpu = medians(wall), medians(cpu)
    results["evaluation"] = {
        "agents": len(agents), "prompts": len(prompts), "labels": len(task.labels),
        "runs_wall": wall, "runs_cpu": cpu,
        **{f"{k}_cpu_s": v for k, v in med_cpu.items()}, **{f"{k}_s": v for k, v in med.items()},
        "shared_vs_one_agent_cpu": med_cpu["shared_trunk"] / med_cpu["one_agent"],
        "shared_vs_one_agent_wall": med["shared_trunk"] / med["one_agent"],
        "max_abs_diff_vs_plain": (out["shared"] - plain).abs().max().item(),
    }
    print("evaluation", {k: v for k, v in results["evaluation"].items() if not k.startswith("runs")}, flush=True)


def training(results: dict, pop: Population, init: dict, task: Task, args) -> None:
    """3-epoch runs of one agent, then of several agents on the same task, with and without the cache."""
    small = Task(task.name, task.kind, task.train[: args.train_examples], task.val, task.test, task.labels)
    tmp = tempfile.TemporaryDirectory()
    loops = {cache: ContinualLoop(pop, Stream("bench", [small]), Strategy(), Path(tmp.name) / str(cache), seed=0,
                                  train=TrainConfig(lr=2e-3, batch_size=8, epochs=args.epochs, trunk_cache=cache),
                                  trainer=dict(TRAINER), max_length=128, progress=False, save_adapters=False)
             for cache in (False, True)}
    trained: dict[tuple[bool, int], dict] = {}

    def train(cache: bool, n_agents: int) -> None:
        loop = loops[cache]
        if cache:
            loop.trunk.clear()  # every cached run starts cold: its first epoch pays for the bottom
        for a in pop.names[:n_agents]:
            pop.load_adapter_state(a, init[a])
            loop.fit(a, small, [], 0)
        trained[(cache, n_agents)] = {a: pop.adapter_state(a) for a in pop.names[:n_agents]}

    for key, n_agents in (("single_agent", 1), ("agents_same_task", args.train_agents)):
        wall, cpu = alternate({"plain": lambda: train(False, n_agents), "cached": lambda: train(True, n_agents)},
                              args.train_repeats, f"train {n_agents} agent(s) x {args.epochs} epochs")
        diff = max((trained[(True, n_agents)][a][k] - trained[(False, n_agents)][a][k]).abs().max().item()
                   for a in trained[(True, n_agents)] for k in init[a])
        for a in trained[(True, n_agents)]:
            torch.testing.assert_close(trained[(True, n_agents)][a], trained[(False, n_agents)][a],
                                       rtol=1e-3, atol=1e-4)
        med, med_cpu = medians(wall), medians(cpu)
        results[key] = {"agents": n_agents, "epochs": args.epochs, "examples": len(small.train),
                        "steps_per_agent": args.epochs * -(-len(small.train) // 8),
                        "runs_wall": wall, "runs_cpu": cpu,
                        "plain_cpu_s": med_cpu["plain"], "cached_cpu_s": med_cpu["cached"],
                        "speedup_cpu": med_cpu["plain"] / med_cpu["cached"],
                        "plain_s": med["plain"], "cached_s": med["cached"], "speedup_wall": med["plain"] / med["cached"],
                        "max_abs_adapter_diff": diff}
        print(key, {k: v for k, v in results[key].items() if not k.startswith("runs")}, flush=True)
    tmp.cleanup()


if __name__ == "__main__":
    main()
