"""``train.compile`` on this CPU: regional torch.compile of SmolLM2-135M's decoder layers vs eager, in one process.

One torch thread, process CPU time (the machine is shared). The same model and adapter in both modes; the
compiled forward is switched off and on again between runs (``nn.Module.compile`` keeps the eager
``forward``; Dynamo's cache survives the switch, so later compiled runs do not recompile):

* training: ``ContinualLoop.fit`` (naive, LoRA r=8 q/v, batch 8, ``data.max_length=128``,
  ``train.length_grouping`` on) of ``--steps`` steps on bbc, the adapter reset before every fit; the CPU time
  of the steps after the first ``--warmup`` (per-batch stamps, as roofline.py);
* rank classification: ``label_logprobs`` on bbc's 40 test prompts (5 labels, batch 32);
* compile cost: the CPU time of the first compiled fit and evaluation minus a steady one (Inductor building its
  C++ kernels, the new sequence lengths' recompilations included).

Writes benchmarks/results/compile.json (speed-up = eager CPU time / compiled CPU time, per repeat and median).

    .venv/bin/python benchmarks/compile.py [--repeats 3] [--steps 12] [--warmup 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from roofline import StepClock

from lmas.data.sources import bbc_topics
from lmas.data.stream import Stream
from lmas.lm.compiled import compile_layers
from lmas.lm.likelihood import causal_lm, label_logprobs
from lmas.loop import ContinualLoop, TrainConfig
from lmas.models.providers import smollm2
from lmas.population.population import Population

OUT = Path(__file__).parent / "results" / "compile.json"
LORA = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}
TRAINER = {"accelerator": "cpu", "devices": 1, "precision": "32-true", "gradient_clip_val": 1.0, "deterministic": False}


def set_compiled(model, on: bool, compiled: dict) -> None:
    """Switch the decoder layers' compiled forward on (as compile_layers left it) or off (eager)."""
    for layer in causal_lm(model).model.layers:
        if layer not in compiled:
            compiled[layer] = layer._compiled_call_impl
        layer._compiled_call_impl = compiled[layer] if on else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    base = smollm2()
    pop = Population(base, agents=1, lora=LORA)
    agent = pop.names[0]
    init = pop.adapter_state(agent)
    task = bbc_topics("bbc", n_train=160, n_val=20, n_test=40, max_chars=160)
    clock, tmp = StepClock(), tempfile.TemporaryDirectory()
    loop = ContinualLoop(pop, Stream("compile", [task]), clock, tmp.name, seed=0,
                         train=TrainConfig(lr=2e-3, batch_size=8, epochs=1, max_steps=args.steps),
                         trainer=dict(TRAINER), max_length=128, progress=False, save_adapters=False)
    prompts = [e.prompt for e in task.test]

    def train() -> dict:
        pop.load_adapter_state(agent, init)
        clock.stamps = []
        c = time.process_time()
        losses = loop.fit(agent, task, [], 0)
        whole = time.process_time() - c
        steady = clock.stamps[-1][1] - clock.stamps[args.warmup][1]
        return {"cpu_s": whole, "steady_cpu_s": steady, "steady_steps": len(clock.stamps) - 1 - args.warmup,
                "losses": losses}

    def evaluate() -> dict:
        pop.load_adapter_state(agent, init)
        pop.model.eval()
        c = time.process_time()
        scores = label_logprobs(pop.model, loop.encoder, prompts, task.labels, 32)
        return {"cpu_s": time.process_time() - c, "scores": scores}  # scores dropped before writing

    compiled: dict = {}
    first: dict[str, dict] = {"eager train": train(), "eager rank": evaluate()}
    compile_layers(pop.model)
    first["compiled train"], first["compiled rank"] = train(), evaluate()  # pays the compilation
    runs: dict[str, list[dict]] = {k: [] for k in first}
    for r in range(args.repeats):
        for mode in ("eager", "compiled"):
            set_compiled(pop.model, mode == "compiled", compiled)
            runs[f"{mode} train"].append(train())
            runs[f"{mode} rank"].append(evaluate())
        print(f"repeat {r}: " + ", ".join(f"{k} {v[-1]['cpu_s']:.2f} s" for k, v in runs.items()), flush=True)
    loss_diff = max(
        max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))
        for a, b in zip(runs["eager train"], runs["compiled train"])
    )
    diff = max((a["scores"] - b["scores"]).abs().max().item() for a, b in zip(runs["eager rank"], runs["compiled rank"]))
    train_ratio = [e["steady_cpu_s"] / c["steady_cpu_s"] for e, c in zip(runs["eager train"], runs["compiled train"])]
    rank_ratio = [e["cpu_s"] / c["cpu_s"] for e, c in zip(runs["eager rank"], runs["compiled rank"])]
    med = lambda k, f="cpu_s": statistics.median(x[f] for x in runs[k])  # noqa: E731
    results = {
        "model": base.name,
        "threads": 1,
        "repeats": args.repeats,
        "steps": args.steps,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "train_speedup_steady": {"runs": train_ratio, "median": statistics.median(train_ratio)},
        "rank_speedup": {"runs": rank_ratio, "median": statistics.median(rank_ratio)},
        "compile_cost_cpu_s": {
            "train": first["compiled train"]["cpu_s"] - med("compiled train"),
            "rank": first["compiled rank"]["cpu_s"] - med("compiled rank"),
        },
        "steady_train_cpu_s_per_step": {
            m: med(f"{m} train", "steady_cpu_s") / runs[f"{m} train"][0]["steady_steps"] for m in ("eager", "compiled")
        },
        "rank_cpu_s": {m: med(f"{m} rank") for m in ("eager", "compiled")},
        "max_abs_score_difference": diff,
        "max_abs_loss_difference": loss_diff,
    }
    print(json.dumps(results, indent=1))
    tmp.cleanup()
    for rows in runs.values():
        for row in rows:
            row.pop("scores", None)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {OUT}")


if __name__ == "__main__":
    main()
