"""GPU throughput (issue 16, target 8): LoRA training and evaluation of the SmolLM2-135M architecture in bf16.

The model is SmolLM2-135M's architecture (its ``config.json``) with random weights and PyTorch's SDPA attention,
run through lmas's own code: ``ContinualLoop.fit`` (Lightning, ``IncrementalLM``, ``trainer.precision=bf16-mixed``:
autocast, float32 LoRA weights; LoRA r=8 on q/v, AdamW, clipping 1.0) for training, ``label_logprobs`` (rank
classification, 4 labels) and ``greedy_answers`` (generation) for evaluation, under the same autocast. Every
prompt is longer than ``--seq`` tokens, so every row is cut to exactly ``--seq`` (no padding).

* peak: the bf16 matmul rate measured in the same process (CUDA events; ``torch.matmul`` on 8192^3 and on the
  model's own layer shapes at the batch's token count), best of several timings;
* training, per batch size: steady step time (per-batch stamps after ``--warmup`` steps; every step ends in one
  host sync, its loss), tokens/s, model FLOP/s (``lmas/lm/flops.py``: matmuls only, the whole attention
  rectangle as the kernels are asked for it, the LM head at the answer positions), and the model-FLOPs
  utilisation = model FLOP/s / peak;
* evaluation, per batch size: rank classification and generation tokens/s and utilisation;
* ``torch.compile`` (``train.compile``: each decoder layer compiled, lmas/lm/compiled.py) at ``--compile-batch``:
  training and rank classification, compiled / eager, and the compile time.

Writes ``<out-dir>/gpu_<device>.json``. The whole run is sized to finish in under 5 minutes on one H200.

    python benchmarks/gpu.py --model-folder <folder with SmolLM2's config.json and tokenizer>
    python benchmarks/gpu.py --smoke --device cpu --out-dir /tmp/x    # a 2-layer shape, to test the script

On a machine without lmas's dependencies installed, carry the wheels of hydra-core, omegaconf,
antlr4-python3-runtime and defusedxml (lmas imports them) and a folder with SmolLM2's config and tokenizer
files (``~/.cache/lmas/smollm2-135m-instruct`` without ``model.safetensors``: 3.4 MB); benchmarks/README.md
has the command.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compile import set_compiled  # noqa: E402  (benchmarks/compile.py)
from roofline import StepClock, Trace  # noqa: E402

from lmas.data.stream import Stream  # noqa: E402
from lmas.data.task import Example, Task  # noqa: E402
from lmas.evaluation.scoring import greedy_answers  # noqa: E402
from lmas.lm import flops  # noqa: E402
from lmas.lm.compiled import compile_layers  # noqa: E402
from lmas.lm.device import autocast  # noqa: E402
from lmas.lm.likelihood import label_logprobs  # noqa: E402
from lmas.loop import ContinualLoop, TrainConfig  # noqa: E402
from lmas.models.providers import BaseModel  # noqa: E402
from lmas.population.population import Population  # noqa: E402

LORA = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}
LABELS = ["world news", "sports", "business", "science and technology"]  # 1- to 3-token labels
GOAL = 0.2  # training MFU at a sensible batch (issue 16)
SMOKE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16}


def build_base(folder: str | None, smoke: bool) -> BaseModel:
    """SmolLM2-135M's architecture (or, for ``smoke``, a 2-layer shape of it) with random weights, SDPA attention."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    if folder is None:
        from lmas.models.providers import ensure_smollm2_folder

        folder = str(ensure_smollm2_folder())
    config = AutoConfig.from_pretrained(folder)
    if smoke:
        for k, v in SMOKE.items():
            setattr(config, k, v)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    return BaseModel(model, tokenizer, "smollm2-135m-architecture-random" + ("-smoke" if smoke else ""),
                     {"parameters": n})


def prompts(n: int, seq: int, seed: int) -> list[str]:
    """``n`` prompts of random words, each longer than ``seq`` tokens (cut to exactly ``seq`` by the encoder)."""
    rng = random.Random(seed)
    words = ["market", "team", "planet", "season", "bank", "goal", "rocket", "vote", "energy", "match", "share",
             "orbit", "coach", "court", "price", "storm", "data", "model", "cell", "road"]
    return [" ".join(rng.choice(words) for _ in range(seq + 16)) + "\nTopic:" for _ in range(n)]


def task_of(n_train: int, n_test: int, seq: int) -> Task:
    train = [Example(p, LABELS[i % 4]) for i, p in enumerate(prompts(n_train, seq, 1))]
    test = [Example(p, LABELS[i % 4]) for i, p in enumerate(prompts(n_test, seq, 2))]
    return Task("synthetic", "classification", train, train[:4], test, labels=list(LABELS))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def peak(device: torch.device, shape: flops.DecoderShape, tokens: int, smoke: bool) -> dict:
    """bf16 matmul FLOP/s: 8192^3 (4096^3 on CPU or smoke) and the model's layer shapes at ``tokens`` rows."""
    dt = torch.bfloat16
    big = 1024 if smoke or device.type != "cuda" else 8192
    lin = shape.linears()
    dims = {"square": (big, big, big), "q/o": (tokens, *lin["q_proj"]), "gate/up": (tokens, *lin["gate_proj"]),
            "down": (tokens, *lin["down_proj"]), "head": (tokens, shape.hidden, shape.vocab)}
    rates = {}
    for name, (m, k, n) in dims.items():
        a, b = torch.randn(m, k, device=device, dtype=dt), torch.randn(k, n, device=device, dtype=dt)
        reps = 20 if device.type == "cuda" else 2
        times = [timed(lambda a=a, b=b: [torch.matmul(a, b) for _ in range(reps)], device) / reps for _ in range(5)]
        rates[name] = flops.matmul(m, k, n) / min(times)
    return {"rates": rates, "peak": max(rates.values()), "peak_shape": max(rates, key=rates.get)}


def train_case(loop, pop, init, clock, trace, task, shape, lora, warmup: int, count: bool) -> dict:
    """One fit; steady-step wall time, tokens/s and model FLOP/s (FLOPs traced when ``count``)."""
    agent = pop.names[0]
    pop.load_adapter_state(agent, init)
    clock.stamps = []
    if count:
        trace.clear()
    losses = loop.fit(agent, task, [], 0)
    steps = len(clock.stamps)
    window = range(warmup, steps - 1)  # batches whose start and end are both stamped
    wall = clock.stamps[-1][0] - clock.stamps[warmup][0]
    out = {"steps": len(window), "wall_s": wall, "loss_first": losses[0], "loss_last": losses[-1]}
    if count:
        counted = [flops.lora_training_step(shape, trace.calls[i][0], trace.calls[i][1], trace.head[i], lora)
                   for i in window]
        out["flop"] = flops.total(flops.add(*counted))
        out["tokens"] = sum(trace.calls[i][0] * trace.calls[i][1] for i in window)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-folder", help="a folder with the config.json and tokenizer files of SmolLM2-135M")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="a 2-layer shape and tiny sizes: tests the script")
    parser.add_argument("--batch-sizes", default="8,16,32,64,128")
    parser.add_argument("--seq", type=int, default=256, help="tokens per row (every prompt is cut to it)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile-batch", type=int, default=32, help="batch size of the torch.compile case")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py: --device cuda but torch.cuda.is_available() is False (use --smoke --device cpu "
                 "to test the script on a CPU)")
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    trainer = {"accelerator": accelerator, "devices": 1, "precision": "bf16-mixed", "gradient_clip_val": 1.0,
               "deterministic": False}
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    started = time.perf_counter()
    base = build_base(args.model_folder, args.smoke)
    shape = flops.DecoderShape.from_config(base.model.config)
    lora = flops.lora_of(LORA["target_modules"], LORA["r"])
    pop = Population(base, agents=1, lora=LORA)
    init = pop.adapter_state(pop.names[0])
    clock, tmp = StepClock(), tempfile.TemporaryDirectory()
    trace = Trace(pop.model)
    results: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "model": base.name, "parameters": base.info["parameters"],
        "attention": base.model.config._attn_implementation, "precision": "bf16-mixed", "lora": LORA,
        "seq": args.seq, "steps": args.steps, "warmup": args.warmup, "goal_training_mfu": GOAL,
        "shape": shape.__dict__, "train": {}, "rank": {}, "generate": {},
    }
    results["peak_bf16"] = peak(device, shape, max(batch_sizes) * args.seq, args.smoke)
    top = results["peak_bf16"]["peak"]
    print(f"peak bf16 matmul {top / 1e12:.1f} TFLOP/s ({results['peak_bf16']['peak_shape']})", flush=True)
    loops, tasks = {}, {}
    for b in batch_sizes:
        tasks[b] = task_of(b * (args.steps + 1), 4 * b, args.seq)
        loops[b] = ContinualLoop(pop, Stream("gpu", [tasks[b]]), clock, tmp.name, seed=0,
                                 train=TrainConfig(lr=1e-3, batch_size=b, epochs=1, max_steps=args.steps),
                                 trainer=dict(trainer), max_length=args.seq, progress=False, save_adapters=False)
        row = train_case(loops[b], pop, init, clock, trace, tasks[b], shape, lora, args.warmup, count=True)
        row["tokens_per_s"] = row["tokens"] / row["wall_s"]
        row["model_flops_per_s"] = row["flop"] / row["wall_s"]
        row["mfu"] = row["model_flops_per_s"] / top
        results["train"][b] = row
        print(f"train batch {b}: {row['tokens_per_s']:.0f} tokens/s, MFU {row['mfu']:.3f}", flush=True)

        pop.model.eval()
        test = [e.prompt for e in tasks[b].test]
        enc = loops[b].encoder
        for kind, fn in (("rank", lambda: label_logprobs(pop.model, enc, test, LABELS, b)),
                         ("generate", lambda: greedy_answers(pop.model, enc, test[:b], 8, b))):
            with torch.no_grad(), autocast("bf16-mixed", device):
                fn()  # warm-up
                trace.clear()
                wall = timed(fn, device)
            flop = flops.total(flops.forward(shape, trace.calls, sum(trace.head), lora))
            tokens = sum(r * q for r, q, _ in trace.calls)
            results[kind][b] = {"wall_s": wall, "flop": flop, "tokens": tokens, "tokens_per_s": tokens / wall,
                                "model_flops_per_s": flop / wall, "mfu": flop / wall / top}
            print(f"{kind} batch {b}: {tokens / wall:.0f} tokens/s, MFU {flop / wall / top:.3f}", flush=True)
    for h in trace.hooks:
        h.remove()
    best = max(results["train"].values(), key=lambda r: r["mfu"])
    results["best_training_mfu"] = best["mfu"]
    results["goal_met"] = best["mfu"] >= GOAL
    if not args.no_compile:
        b = args.compile_batch if args.compile_batch in loops else batch_sizes[0]
        eager = results["train"][b]
        test = [e.prompt for e in tasks[b].test]
        enc = loops[b].encoder

        def rank() -> float:  # the faster of two passes (the first may still meet a new shape)
            pop.model.eval()
            with torch.no_grad(), autocast("bf16-mixed", device):
                return min(timed(lambda: label_logprobs(pop.model, enc, test, LABELS, b), device) for _ in range(2))

        t = time.perf_counter()
        compile_layers(pop.model)
        first = train_case(loops[b], pop, init, clock, trace, tasks[b], shape, lora, args.warmup, count=False)
        first_rank = rank()
        compile_s = time.perf_counter() - t
        compiled = train_case(loops[b], pop, init, clock, trace, tasks[b], shape, lora, args.warmup, count=False)
        compiled_rank = rank()
        set_compiled(pop.model, False, {})  # eager again, same process: the pair the ratio compares
        eager_again = train_case(loops[b], pop, init, clock, trace, tasks[b], shape, lora, args.warmup, count=False)
        eager_rank = rank()
        results["compile"] = {
            "batch": b, "first_compiled_fit_and_eval_s": compile_s,
            "train_speedup": eager_again["wall_s"] / compiled["wall_s"],
            "rank_speedup": eager_rank / compiled_rank,
            "train_mfu_compiled": eager["flop"] / compiled["wall_s"] / top,
            "loss_last": {"eager": eager_again["loss_last"], "compiled": compiled["loss_last"],
                          "first_compiled": first["loss_last"]},
            "first_rank_s": first_rank,
        }
        print(f"compile (batch {b}): train {results['compile']['train_speedup']:.2f}x, "
              f"rank {results['compile']['rank_speedup']:.2f}x, compile {compile_s:.0f} s", flush=True)
    results["total_s"] = time.perf_counter() - started
    tmp.cleanup()
    out = Path(args.out_dir) / f"gpu_{device.type}{'_smoke' if args.smoke else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {out} ({results['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
