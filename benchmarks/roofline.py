"""Roofline: achieved FLOP/s of lmas's training and evaluation vs the machine's fp32 matmul rate, on SmolLM2-135M.

Model FLOPs are counted analytically (``lmas/lm/flops.py``: matmuls only; q/k/v/o with SmolLM2's grouped-query
shapes, MLP gate/up/down, attention scores and values over the actual (rows, new tokens, keys) of every forward
call, LoRA's A/B, the LM head only where lmas applies it; the backward of LoRA training on a frozen base:
activation gradients down to the lowest LoRA module, weight gradients for A/B only). The shapes of every forward
call are recorded by hooks on the real code path while it runs (layer 0's attention sees ``(rows, new tokens)``
and its KV cache length; the LM head sees its positions), so padding and KV caches count as computed:

* training: ``ContinualLoop.fit`` (``Trainer.fit(IncrementalLM)``; LoRA r=8 q/v, batch 8, AdamW lr 2e-3,
  clipping 1.0, ``data.max_length=128``) on each default-stream task, ``--steps`` steps; the rate of the steady
  steps (from batch ``--warmup`` on, per-batch CPU-time stamps as in framework_overhead.py);
* rank classification: ``label_logprobs`` on the test prompts of bbc and chat (40 prompts; 5 and 4 labels);
* generation: ``greedy_answers`` on math's 40 test prompts (``eval.max_new_tokens=12``, batch 32).

Peak: ``torch.matmul`` and ``F.linear`` in the same process on the model's own layer shapes ((N, 576) x
(576, 576 | 192 | 1536), (N, 1536) x (1536, 576), the head (N, 576) x (576, 49152); N = 512, 1024, 2048
tokens and N = 32 rows of a decoding step), best of several timings; peak = the best rate over these shapes.
Achieved / peak uses 1 torch thread and process CPU time (the machine is shared: CPU time counts what the
process computes, not its waits); the 2-thread matmul rate is reported too, per CPU-second x 2 (both threads
computing) and per wall second (which on a busy machine also counts the threads' waits for a core).
torch.profiler's top ops per case say where the time goes. Writes benchmarks/results/roofline.json.

    .venv/bin/python benchmarks/roofline.py [--repeats 3] [--steps 6] [--warmup 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from lmas.data.mathgen import math_task
from lmas.data.sources import bbc_topics, chatterbot_categories
from lmas.data.stream import Stream
from lmas.evaluation.scoring import greedy_answers
from lmas.lm import flops
from lmas.lm.likelihood import causal_lm, label_logprobs
from lmas.loop import ContinualLoop, TrainConfig
from lmas.models.providers import smollm2
from lmas.population.population import Population
from lmas.strategies.base import Strategy

OUT = Path(__file__).parent / "results" / "roofline.json"
LORA = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}
TRAINER = {"accelerator": "cpu", "devices": 1, "precision": "32-true", "gradient_clip_val": 1.0, "deterministic": False}
GOAL = 0.8
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


class StepClock(Strategy):
    """The naive strategy, plus (wall, CPU) time stamps at the start of every training batch."""

    def __init__(self) -> None:
        self.stamps: list[tuple[float, float]] = []

    def on_train_batch_start(self, module, batch) -> None:
        self.stamps.append((time.perf_counter(), time.process_time()))


class Trace:
    """The shapes of the forward calls through the decoder, recorded by hooks on the real model.

    ``calls``: (rows, new tokens, keys attended) per forward call, from layer 0's attention and its KV cache;
    ``head``: the number of positions the LM head is applied at, per call of the head.
    """

    def __init__(self, model) -> None:
        base = causal_lm(model)
        self.calls: list[tuple[int, int, int]] = []
        self.head: list[int] = []
        attn = base.model.layers[0].self_attn
        self.hooks = [
            attn.register_forward_pre_hook(self._attn, with_kwargs=True),
            base.get_output_embeddings().register_forward_hook(self._head),
        ]

    def _attn(self, module, args, kwargs) -> None:
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length(0) if cache is not None else 0
        self.calls.append((h.shape[0], h.shape[1], past + h.shape[1]))

    def _head(self, module, inputs, output) -> None:
        self.head.append(inputs[0].shape[:-1].numel())

    def clear(self) -> None:
        self.calls, self.head = [], []


def rate(fn, flop: float, seconds: float) -> tuple[float, float]:
    """FLOP/s of ``fn`` per second of process CPU time and of wall time: run it for ``seconds`` of CPU, >= 3 times."""
    fn()
    n, c0, t0 = 0, time.process_time(), time.perf_counter()
    while n < 3 or time.process_time() - c0 < seconds:
        fn()
        n += 1
    return n * flop / (time.process_time() - c0), n * flop / (time.perf_counter() - t0)


def peak(shape: flops.DecoderShape, threads: int, tries: int = 3) -> dict:
    """The matmul rate on the model's layer shapes, best of ``tries`` per shape.

    ``rates``: per CPU-second times ``threads`` (what the threads compute when each has a core: the
    1-thread peak is this); ``rates_wall``: per wall second (with 2 threads on this shared machine, threads
    also wait for a core)."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    lin = shape.linears()
    dims = {
        "q/o": lin["q_proj"],
        "k/v": lin["k_proj"],
        "gate/up": lin["gate_proj"],
        "down": lin["down_proj"],
        "head": (shape.hidden, shape.vocab),
    }
    rates: dict[str, float] = {}
    walls: dict[str, float] = {}
    for n in (32, 512, 1024, 2048):
        for name, (k, m) in dims.items():
            if name == "head" and n > 512:
                continue
            x = torch.randn(n, k, generator=gen)
            w_kn, w_mk = torch.randn(k, m, generator=gen), torch.randn(m, k, generator=gen)
            f = flops.matmul(n, k, m)
            for kind, fn in (
                ("matmul", lambda x=x, w=w_kn: torch.matmul(x, w)),
                ("linear", lambda x=x, w=w_mk: F.linear(x, w)),
            ):
                runs = [rate(fn, f, 0.15) for _ in range(tries)]
                rates[f"{kind} {name} N={n}"] = threads * max(r[0] for r in runs)
                walls[f"{kind} {name} N={n}"] = max(r[1] for r in runs)
    torch.set_num_threads(1)
    best = max(rates, key=lambda k: rates[k])
    big = {k: v for k, v in rates.items() if "N=32" not in k}
    return {
        "threads": threads,
        "rates": rates,
        "rates_wall": walls,
        "peak": rates[best],
        "peak_shape": best,
        "peak_wall": max(walls.values()),
        "median_over_shapes_N>=512": statistics.median(big.values()),
        "decode_N=32_median": statistics.median(v for k, v in rates.items() if "N=32" in k),
    }


def train_case(
    loop: ContinualLoop, clock: StepClock, trace: Trace, pop: Population, init, task, shape, lora, warmup: int
) -> dict:
    """One ``ContinualLoop.fit`` on ``task``: FLOPs and CPU time of its steady steps."""
    pop.load_adapter_state(pop.names[0], init)
    clock.stamps = []
    trace.clear()
    loop.fit(pop.names[0], task, [], 0)
    steps = len(clock.stamps)
    assert len(trace.calls) == steps and len(trace.head) == steps, (len(trace.calls), len(trace.head), steps)
    window = range(warmup, steps - 1)  # batches whose start and end are both stamped
    counts = [
        flops.lora_training_step(shape, trace.calls[i][0], trace.calls[i][1], trace.head[i], lora) for i in window
    ]
    cpu = clock.stamps[-1][1] - clock.stamps[warmup][1]
    wall = clock.stamps[-1][0] - clock.stamps[warmup][0]
    flop = flops.add(*counts)
    tokens = sum(trace.calls[i][0] * trace.calls[i][1] for i in window)
    return {
        "steps": len(window),
        "flop": flops.total(flop),
        "flop_by_part": flop,
        "cpu_s": cpu,
        "wall_s": wall,
        "computed_tokens_per_step": tokens / len(window),
        "achieved_flops": flops.total(flop) / cpu,
    }


def eval_case(fn, trace: Trace, shape, lora) -> dict:
    """One evaluation call: FLOPs from the traced shapes, its CPU time."""
    trace.clear()
    t, c = time.perf_counter(), time.process_time()
    fn()
    cpu, wall = time.process_time() - c, time.perf_counter() - t
    flop = flops.forward(shape, trace.calls, sum(trace.head), lora)
    return {
        "forward_calls": len(trace.calls),
        "head_positions": sum(trace.head),
        "flop": flops.total(flop),
        "flop_by_part": flop,
        "cpu_s": cpu,
        "wall_s": wall,
        "achieved_flops": flops.total(flop) / cpu,
    }


def top_ops(fn, n: int = 12) -> dict:
    """torch.profiler's top ops by self CPU time, and the share of matmul kernels, attention and the rest."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    whole = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    share = lambda pred: sum(e.self_cpu_time_total for e in events if pred(e.key)) / whole  # noqa: E731
    return {
        "self_cpu_s": whole / 1e6,
        "matmul_share": share(lambda k: k in MATMUL_OPS),
        "attention_share": share(lambda k: "attention" in k),
        "softmax_share": share(lambda k: "softmax" in k),
        "top": [{"op": e.key, "share": e.self_cpu_time_total / whole, "calls": e.count} for e in events[:n]],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="training steps per fit (train.max_steps)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    base = smollm2()
    shape = flops.DecoderShape.from_config(base.model.config)
    lora = flops.lora_of(LORA["target_modules"], LORA["r"])
    pop = Population(base, agents=1, lora=LORA)
    init = pop.adapter_state(pop.names[0])
    tasks = {
        "bbc": bbc_topics("bbc", n_train=160, n_val=20, n_test=40, max_chars=160),
        "chat": chatterbot_categories(
            "chat", ["ai", "coding", "psychology", "trivia"], n_train=160, n_val=20, n_test=40
        ),
        "math": math_task("math", problem="arithmetic__add_or_sub", n_train=160, n_val=20, n_test=40),
    }
    clock, tmp = StepClock(), tempfile.TemporaryDirectory()
    loop = ContinualLoop(
        pop,
        Stream("roofline", list(tasks.values())),
        clock,
        tmp.name,
        seed=0,
        train=TrainConfig(lr=2e-3, batch_size=8, epochs=1, max_steps=args.steps),
        trainer=dict(TRAINER),
        max_length=128,
        progress=False,
        save_adapters=False,
    )
    enc = loop.encoder
    trace = Trace(pop.model)
    cases = {
        f"train {t}": (lambda t=t: train_case(loop, clock, trace, pop, init, tasks[t], shape, lora, args.warmup))
        for t in tasks
    }
    for t in ("bbc", "chat"):
        prompts = [e.prompt for e in tasks[t].test]
        cases[f"rank {t}"] = lambda p=prompts, t=t: eval_case(
            lambda: label_logprobs(pop.model, enc, p, tasks[t].labels, 32), trace, shape, lora
        )
    math_prompts = [e.prompt for e in tasks["math"].test]
    cases["generate math"] = lambda: eval_case(
        lambda: greedy_answers(pop.model, enc, math_prompts, 12, 32), trace, shape, lora
    )
    runs: dict[str, list[dict]] = {name: [] for name in cases}
    peaks = []
    for r in range(args.repeats):  # peak and cases interleaved, so machine noise hits both
        peaks.append(peak(shape, 1))
        print(
            f"repeat {r}: peak (1 thread) {peaks[-1]['peak'] / 1e9:.1f} GFLOP/s ({peaks[-1]['peak_shape']})", flush=True
        )
        for name, fn in cases.items():
            pop.model.eval()
            runs[name].append(fn())
            print(
                f"repeat {r} {name}: {runs[name][-1]['achieved_flops'] / 1e9:.1f} GFLOP/s "
                f"({runs[name][-1]['cpu_s']:.2f} s CPU)",
                flush=True,
            )
    peak1 = statistics.median(p["peak"] for p in peaks)
    peak2 = peak(shape, 2)
    print(
        f"peak (2 threads) {peak2['peak'] / 1e9:.1f} GFLOP/s per CPU-second x 2, "
        f"{peak2['peak_wall'] / 1e9:.1f} GFLOP/s wall",
        flush=True,
    )
    results = {
        "model": base.name,
        "threads": 1,
        "repeats": args.repeats,
        "lora": LORA,
        "goal": GOAL,
        "shape": shape.__dict__,
        "peak_1_thread_flops": peak1,
        "peak_1_thread_runs": peaks,
        "peak_2_threads": peak2,
        "cases": {},
    }
    for name, rows in runs.items():
        achieved = statistics.median(row["achieved_flops"] for row in rows)
        results["cases"][name] = {"achieved_flops": achieved, "utilisation": achieved / peak1, "runs": rows}
        print(f"{name}: {achieved / 1e9:.1f} GFLOP/s = {achieved / peak1:.2f} of peak", flush=True)
    if not args.no_profile:
        prof_cases = {
            "train bbc": cases["train bbc"],
            "rank bbc": cases["rank bbc"],
            "generate math": cases["generate math"],
        }
        for name, fn in prof_cases.items():
            results["cases"][name]["profile"] = top_ops(fn)
            p = results["cases"][name]["profile"]
            print(
                f"profile {name}: matmul {p['matmul_share']:.2f}, attention {p['attention_share']:.2f}, "
                f"top {[(o['op'], round(o['share'], 3)) for o in p['top'][:6]]}",
                flush=True,
            )
    tmp.cleanup()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {OUT}")


if __name__ == "__main__":
    main()
