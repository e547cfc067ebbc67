"""Mixed-adapter batched evaluation vs switching adapters one agent at a time, on the embedded model.

A population of N single-adapter agents (N = 4 and 8; LoRA r=8, alpha=16 on q_proj/v_proj of
SmolLM2-135M) is given random non-zero adapters (``lora_B`` drawn from N(0, 0.02²), so every agent
scores differently), then the label log-likelihoods of every agent on a classification task's test
prompts (the default stream's ``bbc``: 40 prompts, 5 labels) are computed two ways with
``PopulationScorer.label_logprobs`` (what the loop's evaluation calls):

* switching (``mixed=False``): activate each agent's adapter in turn and score all prompts;
* mixed (``mixed=True``): one pass over N × prompts rows, each row routed to its agent's adapter
  (peft ``adapter_names``), in batches of ``eval.batch_size`` = 32 rows.

Both run alternately in one process (A B A B ...); the result is the ratio of median times,
switching / mixed (> 1: mixed is faster), in process CPU time with 1 torch thread (what each side
computes; on this shared machine wall time also counts waiting for a core), and in wall time. The
two must give the same log-likelihoods (checked, atol 1e-3).
Writes benchmarks/results/mixed_adapter_eval.json.

    .venv/bin/python benchmarks/mixed_adapter_eval.py [--agents 4 8] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lmas.data.sources import bbc_topics
from lmas.models.providers import smollm2
from lmas.lm.encoding import PromptEncoder
from lmas.evaluation.scorer import PopulationScorer
from lmas.population.population import Population

OUT = Path(__file__).parent / "results" / "mixed_adapter_eval.json"
LORA = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}


def randomise(pop: Population, seed: int, std: float = 0.02) -> None:
    """Give every agent a random non-zero adapter (fresh LoRA adapters are exact no-ops: B = 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in pop.names:
            for pname, p in pop.parameters_of(name).items():
                if "lora_B" in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)


def timed(fn):
    """(wall seconds, process CPU seconds, result) of ``fn()``."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t, time.process_time() - c, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--agents", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    base = smollm2()
    pop = Population(base, agents=max(args.agents), lora=LORA)
    randomise(pop, seed=0)
    enc = PromptEncoder(base.tokenizer, 128)
    task = bbc_topics("bbc", n_train=160, n_val=20, n_test=40, max_chars=160)  # conf/stream/default.yaml
    prompts = [ex.prompt for ex in task.test]
    mixed = PopulationScorer(pop, enc, args.batch_size, mixed=True)
    switching = PopulationScorer(pop, enc, args.batch_size, mixed=False)
    results = {"model": base.name, "threads": torch.get_num_threads(), "repeats": args.repeats,
               "task": "bbc", "prompts": len(prompts), "labels": len(task.labels), "batch_size": args.batch_size,
               "lora": LORA, "cases": {}}
    for n in args.agents:
        agents = pop.names[:n]
        assert mixed.can_mix(agents)
        times = {"switching": [], "mixed": []}
        cpu = {"switching": [], "mixed": []}
        outs = {}
        for r in range(args.repeats):
            order = [("switching", switching), ("mixed", mixed)]
            for name, scorer in order if r % 2 == 0 else order[::-1]:
                t, c, outs[name] = timed(lambda: scorer.label_logprobs(agents, prompts, task.labels))
                times[name].append(t)
                cpu[name].append(c)
                print(f"{n} agents, repeat {r}, {name}: {t:.1f} s ({c:.1f} s CPU)", flush=True)
        diff = (outs["mixed"] - outs["switching"]).abs().max().item()
        torch.testing.assert_close(outs["mixed"], outs["switching"], rtol=1e-3, atol=1e-3)
        spread = (outs["switching"] - outs["switching"][0]).abs().max().item()
        assert spread > 1e-3, "the agents' adapters should make them score differently"
        med = {k: statistics.median(v) for k, v in times.items()}
        med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
        case = {"agents": n, "rows": n * len(prompts),
                "switching_cpu_s": med_cpu["switching"], "mixed_cpu_s": med_cpu["mixed"],
                "speedup_cpu": med_cpu["switching"] / med_cpu["mixed"],
                "switching_s": med["switching"], "mixed_s": med["mixed"], "speedup_wall": med["switching"] / med["mixed"],
                "runs_wall": times, "runs_cpu": cpu, "max_abs_diff": diff, "max_abs_diff_between_agents": spread,
                "same_predictions": bool((outs["mixed"].argmax(-1) == outs["switching"].argmax(-1)).all())}
        results["cases"][str(n)] = case
        print(f"{n} agents: switching {med_cpu['switching']:.1f} s CPU, mixed {med_cpu['mixed']:.1f} s CPU: "
              f"speed-up {case['speedup_cpu']:.2f}x (CPU), {case['speedup_wall']:.2f}x (wall); "
              f"max |diff| {diff:.2e}", flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {OUT}")


if __name__ == "__main__":
    main()
