"""Answer-only logits and shared-prompt scoring vs the plain full-logits way, on the embedded model.

Measures, on batches of the default stream (BBC topics, ChatterBot categories, math):
  1. a LoRA training step (forward + backward) whose loss applies the LM head only at answer
     positions, vs one that computes full logits (B, T, V) and masks the loss;
  2. rank classification scoring with each prompt's KV cache shared by all labels, vs one full
     sequence per (prompt, label).
Both variants run alternately in the same process (A B A B ...), so machine noise hits both; the
result is the ratio of median times. Writes benchmarks/results/answer_logits.json.

    .venv/bin/python benchmarks/answer_logits.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lmas.data.sources import bbc_topics, chatterbot_categories
from lmas.data.mathgen import math_task
from lmas.models.providers import smollm2
from lmas.lm.encoding import IGNORE, PromptEncoder, collate
from lmas.lm.likelihood import answer_loss, label_logprobs, sequence_logprobs
from lmas.population.population import Population

OUT = Path(__file__).parent / "results" / "answer_logits.json"


def full_logits_loss(model, batch):
    """The plain way: full (B, T, V) logits, loss masked to the answer tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["targets"][:, 1:].flatten(), ignore_index=IGNORE)


@torch.no_grad()
def separate_label_logprobs(model, encoder, prompts, labels, batch_size=32):
    """The plain way: one sequence per (prompt, label)."""
    items = [encoder.encode(p, lab, eos=False) for p in prompts for lab in labels]
    out = [sequence_logprobs(model, collate(items[i : i + batch_size], encoder.pad_id))[0]
           for i in range(0, len(items), batch_size)]
    return torch.cat(out).view(len(prompts), len(labels))


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = smollm2()
    pop = Population(base, agents=1)
    enc = PromptEncoder(base.tokenizer, 128)
    tasks = [bbc_topics("bbc", n_train=64, n_val=1, n_test=40, max_chars=160),
             chatterbot_categories("chat", ["ai", "coding", "psychology", "trivia"], n_train=64, n_val=1, n_test=40),
             math_task("math", n_train=64, n_val=1, n_test=1)]
    results = {"model": base.name, "threads": torch.get_num_threads(), "repeats": args.repeats,
               "batch_size": args.batch_size, "train_step": {}, "rank_scoring": {}}
    pop.model.train()
    for task in tasks:
        batch = collate([enc.encode_example(e, task.kind) for e in task.train[: args.batch_size]], enc.pad_id)
        torch.testing.assert_close(answer_loss(pop.model, batch), full_logits_loss(pop.model, batch), rtol=1e-4, atol=1e-4)
        a, b = [], []
        for _ in range(args.repeats):
            a.append(timed(lambda: answer_loss(pop.model, batch).backward()))
            b.append(timed(lambda: full_logits_loss(pop.model, batch).backward()))
            pop.model.zero_grad(set_to_none=True)
        results["train_step"][task.name] = {
            "tokens_per_batch": int(batch["attention_mask"].sum()), "answer_tokens": int((batch["targets"] != IGNORE).sum()),
            "answer_only_s": statistics.median(a), "full_logits_s": statistics.median(b),
            "speedup": statistics.median(b) / statistics.median(a)}
        print(task.name, "train step", results["train_step"][task.name], flush=True)
    pop.model.eval()
    for task in tasks[:2]:
        prompts = [e.prompt for e in task.test]
        torch.testing.assert_close(label_logprobs(pop.model, enc, prompts, task.labels),
                                   separate_label_logprobs(pop.model, enc, prompts, task.labels), rtol=1e-3, atol=1e-3)
        a, b = [], []
        for _ in range(args.repeats):
            a.append(timed(lambda: label_logprobs(pop.model, enc, prompts, task.labels)))
            b.append(timed(lambda: separate_label_logprobs(pop.model, enc, prompts, task.labels)))
        results["rank_scoring"][task.name] = {
            "prompts": len(prompts), "labels": len(task.labels),
            "shared_prompt_s": statistics.median(a), "separate_sequences_s": statistics.median(b),
            "speedup": statistics.median(b) / statistics.median(a)}
        print(task.name, "scoring", results["rank_scoring"][task.name], flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {OUT}")


if __name__ == "__main__":
    main()
