"""Peak memory of a population of N LoRA agents on one shared frozen base model.

Each case runs in a fresh child process (``subprocess.run([python, this file, "--child", ...])``)
so that every measurement starts clean; the child reports its peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, KiB on Linux). Cases, on the embedded model:
  * baseline: the base model loaded, no peft, and one eval forward under ``torch.no_grad`` (the
    safetensors weights are memory-mapped and count in RSS only once read);
  * N = 1, 4, 8 agents (LoRA r=8, alpha=16 on q_proj/v_proj): the population is built, then every
    agent is activated in turn and does a training forward + backward on a small batch (grads
    zeroed after) and an eval forward under ``torch.no_grad``.
The naive alternative, N independent full model copies, is *not* run: it is estimated as the
measured 1-agent peak + (N - 1) x the base model's parameter bytes, and labelled as an estimate.
Target: the peak with 8 agents is at most 1.15x the peak with 1 agent.
Writes benchmarks/results/population_memory.json.

    .venv/bin/python benchmarks/population_memory.py [--agents 1 4 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).parent / "results" / "population_memory.json"
ROOT = Path(__file__).resolve().parents[1]
LORA = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}
TARGET_AGENTS, TARGET_RATIO = 8, 1.15
THREADS = 2
MAX_LENGTH = 64
# a small fixed batch: prompt/answer pairs of different lengths (the longest is truncated to 64 tokens)
PAIRS = [
    ("Classify the topic of this news text: Shares in the carmaker rose after strong quarterly sales. Answer:", "business"),
    ("What is 17 + 25? Answer:", "42"),
    ("Classify the category of this question: Do you think machines can ever feel emotions? Answer:", "ai"),
    ("Classify the topic of this news text: The striker scored twice as the home side won the cup final "
     "in front of a record crowd, ending a decade without a trophy for the club and its fans. Answer:", "sport"),
]


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """Current resident set size of this process, MiB (from /proc/self/statm)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def load_base(model: str, **kwargs):
    from lmas.models import providers

    return {"smollm2": providers.smollm2, "tiny": providers.tiny}[model](**kwargs)


def measure(agents: int, model: str = "smollm2", model_kwargs: dict | None = None) -> dict:
    """Build a population of ``agents`` agents, work with each one, and report memory.

    ``agents=0`` is the baseline: the base model only (no peft), one eval forward under
    ``torch.no_grad`` so its memory-mapped weights become resident. Meant to run in a fresh
    process (``--child``); in-process the peak includes whatever the process did before.
    """
    import torch

    from lmas.lm.encoding import PromptEncoder, collate

    from lmas.lm.likelihood import answer_loss
    from lmas.population.population import Population

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    rss_imports = current_rss_mib()
    base = load_base(model, **(model_kwargs or {}))
    param_bytes = sum(p.numel() * p.element_size() for p in base.model.parameters())
    result = {"agents": agents, "model": base.name, "threads": torch.get_num_threads(),
              "base_parameters": sum(p.numel() for p in base.model.parameters()), "base_parameter_bytes": param_bytes,
              "rss_after_imports_mib": rss_imports, "rss_after_load_mib": current_rss_mib()}
    encoder = PromptEncoder(base.tokenizer, MAX_LENGTH)
    batch = collate([encoder.encode(p, a, eos=True) for p, a in PAIRS], encoder.pad_id)
    result.update(batch_size=len(PAIRS), batch_tokens=int(batch["attention_mask"].sum()))
    if agents == 0:
        # safetensors weights are memory-mapped and only become resident when read: without a
        # forward pass the baseline would leave most of the base weights out of its RSS
        with torch.no_grad():
            eval_loss = answer_loss(base.model, batch)
        assert torch.isfinite(eval_loss), eval_loss
        result.update(eval_loss=float(eval_loss), rss_after_work_mib=current_rss_mib(), peak_rss_mib=peak_rss_mib())
        return result
    pop = Population(base, agents=agents, lora=LORA, seed=0)
    result["rss_after_build_mib"] = current_rss_mib()
    adapter_counts = {name: sum(p.numel() for p in pop.parameters_of(name).values()) for name in pop.names}
    result["adapter_parameters_per_agent"] = adapter_counts[pop.names[0]]
    assert len(set(adapter_counts.values())) == 1, adapter_counts

    losses = {}
    for name in pop.names:
        pop.activate(name)
        pop.model.train()
        loss = answer_loss(pop.model, batch)
        loss.backward()
        n_grads = sum(p.grad is not None for p in pop.model.parameters())
        assert n_grads == len(pop.parameters_of(name)), (name, n_grads)
        pop.model.zero_grad(set_to_none=True)
        pop.model.eval()
        with torch.no_grad():
            eval_loss = answer_loss(pop.model, batch)
        assert torch.isfinite(loss) and torch.isfinite(eval_loss), (name, loss, eval_loss)
        losses[name] = float(eval_loss)
    result.update(eval_loss=losses, rss_after_work_mib=current_rss_mib(), peak_rss_mib=peak_rss_mib())
    return result


def run_child(agents: int, model: str) -> dict:
    """Run :func:`measure` in a fresh Python process and return its result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--model", model, "--agents", str(agents)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True, cwd=ROOT)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def versions() -> dict:
    import peft
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "peft": peft.__version__,
            "transformers": transformers.__version__, "platform": platform.platform()}


def command() -> str:
    exe = Path(sys.executable)
    exe_s = os.path.relpath(exe, ROOT) if ROOT in exe.absolute().parents else str(exe)
    script = os.path.relpath(Path(__file__).resolve(), ROOT)
    return shlex.join([exe_s, script, *sys.argv[1:]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[1, 4, 8], help="population sizes to measure")
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one case, fresh process: print its result as the last stdout line
        print(json.dumps(measure(args.agents[0], args.model)), flush=True)
        return
    sizes = sorted(set(args.agents) | {1})
    baseline = run_child(0, args.model)
    print(f"baseline (base model only, eval forward): peak {baseline['peak_rss_mib']:.1f} MiB", flush=True)
    cases = {}
    for n in sizes:
        cases[n] = run_child(n, args.model)
        print(f"{n} agent(s): peak {cases[n]['peak_rss_mib']:.1f} MiB", flush=True)
    one = cases[1]["peak_rss_mib"]
    param_mib = baseline["base_parameter_bytes"] / 2**20
    rows = {}
    for n, c in cases.items():
        naive = one + (n - 1) * param_mib
        rows[str(n)] = {
            "peak_rss_mib": c["peak_rss_mib"], "ratio_to_1_agent": c["peak_rss_mib"] / one,
            "over_baseline_mib": c["peak_rss_mib"] - baseline["peak_rss_mib"],
            "growth_over_1_agent_mib": c["peak_rss_mib"] - one,
            "rss_after_build_mib": c["rss_after_build_mib"], "rss_after_work_mib": c["rss_after_work_mib"],
            "adapter_parameters_per_agent": c["adapter_parameters_per_agent"],
            "adapter_parameters_total": c["adapter_parameters_per_agent"] * n,
            "naive_copies_estimate_mib": naive, "naive_copies_estimate_ratio_to_1_agent": naive / one,
        }
    target = {"description": f"{TARGET_AGENTS} agents <= {TARGET_RATIO}x of 1 agent (peak RSS)",
              "agents": TARGET_AGENTS, "max_ratio": TARGET_RATIO}
    if str(TARGET_AGENTS) in rows:
        ratio = rows[str(TARGET_AGENTS)]["ratio_to_1_agent"]
        target.update(ratio=ratio, passed=ratio <= TARGET_RATIO)
    else:
        target.update(ratio=None, passed=None)
    results = {
        "model": baseline["model"], "threads": baseline["threads"], "lora": LORA, "batch_size": len(PAIRS),
        "max_length": MAX_LENGTH, "batch_tokens": cases[1]["batch_tokens"],
        "measure": "peak RSS (ru_maxrss) of a fresh child process per case, MiB",
        "work_per_agent": "activate; train forward + backward (answer_loss), grads zeroed; eval forward under no_grad",
        "base_parameters": baseline["base_parameters"], "base_parameter_mib": param_mib,
        "rss_after_imports_mib": baseline["rss_after_imports_mib"],
        "baseline_base_model_only": {"what": "base model loaded, no peft, one eval forward under no_grad",
                                     "peak_rss_mib": baseline["peak_rss_mib"]},
        "agents": rows,
        "naive_copies_note": "NOT measured: estimate of N independent full model copies = "
                             "measured 1-agent peak + (N - 1) x base parameter bytes (each copy holding its own weights)",
        "target": target, "versions": versions(), "command": command(), "children": {"baseline": baseline, **cases},
    }

    print(f"\n{results['model']}, {results['threads']} threads, LoRA r={LORA['r']} on {'/'.join(LORA['target_modules'])}, "
          f"base parameters {param_mib:.1f} MiB")
    print(f"python + torch/transformers/peft imported: RSS {baseline['rss_after_imports_mib']:.1f} MiB")
    print(f"baseline (base model only, no peft, one eval forward): peak RSS {baseline['peak_rss_mib']:.1f} MiB")
    header = (f"{'agents':>6} | {'peak RSS MiB':>12} | {'x 1 agent':>9} | {'over baseline MiB':>17} | "
              f"{'adapter params/agent':>20} | {'naive N copies MiB (estimate)':>29}")
    print(header)
    print("-" * len(header))
    for n, r in rows.items():
        print(f"{n:>6} | {r['peak_rss_mib']:>12.1f} | {r['ratio_to_1_agent']:>9.3f} | {r['over_baseline_mib']:>17.1f} | "
              f"{r['adapter_parameters_per_agent']:>20,} | {r['naive_copies_estimate_mib']:>20.1f} "
              f"({r['naive_copies_estimate_ratio_to_1_agent']:.2f}x)")
    if target["passed"] is not None:
        print(f"target {target['description']}: ratio {target['ratio']:.3f} -> {'PASS' if target['passed'] else 'FAIL'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
