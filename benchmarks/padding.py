"""No wasted tokens: useful / computed tokens of training and evaluation batches, before and after
length grouping and one-pass label scoring (issue 16, target 2). Writes benchmarks/results/padding.json.

    .venv/bin/python benchmarks/padding.py [--parts tokens scoring train] [--repeats 2]

Parts:
  tokens   counts only (the tokenizer, no model): on the default stream (data.max_length 128) and on the
           long-sequence benchmark (order 4, max_chars 600, data.max_length 192, 200 training and up to
           400 test examples per task as conf/experiment/reproduction/fast.yaml), train.batch_size 8 and
           eval.batch_size 32. A batch computes rows × longest tokens; useful tokens are the sequences'
           own. Rank scoring: useful = each prompt once plus each label's tokens but its last (the least
           any exact scorer computes); before = prompts in split order, one pass of the left-padded prompts,
           then, for multi-token labels, a second pass of every (prompt, label) pair padded to the longest
           label (today's KV-cache scorer); after = length-grouped batches (lmas.lm.batching.length_batches),
           prompt and labels in one pass (lmas.lm.batching.label_tree). Generation: the prompts' pass (the
           decoded tokens are not counted). A prompt cut for its label lengths counts once per cut.
           eval_trunk_before: the shared-trunk scorer as it is (lmas/lm/trunk.py: one pass, split order).
  scoring  SmolLM2-135M, 1 torch thread: today's scorer (KV cache, split order; kept below as the baseline)
           vs lmas.lm.likelihood.label_logprobs on bbc, chat (one-token labels) and dbpedia, agnews
           (multi-token labels), alternating; the scores' largest difference and argmax agreement; process CPU
           time. Also the fixed cost of one pass, in tokens (lmas.lm.batching.BATCH_COST).
  train    SmolLM2-135M, 1 torch thread: one epoch of each default-stream task (ContinualLoop.fit, naive,
           the adapter reset before every run) with train.length_grouping false vs true, alternating; the
           process CPU time, the last steps' training loss and the val answer NLL per token after training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from lmas.data.cl_benchmark import cl_stream
from lmas.data.mathgen import math_task
from lmas.data.sources import bbc_topics, chatterbot_categories
from lmas.data.task import Task
from lmas.lm.batching import label_targets, length_batches, padded_tokens, split_batches
from lmas.lm.device import model_device
from lmas.lm.encoding import PromptEncoder
from lmas.lm.likelihood import by_label_length, label_logprobs, label_tokens, trunk_and_head
from lmas.training.experience import ExperienceData

OUT = Path(__file__).parent / "results" / "padding.json"
DATA = os.environ.get("LMAS_CL_BENCHMARK", str(Path(__file__).resolve().parents[1] / ".." / "shared/data/cl_benchmark"))
TRAIN_BS, EVAL_BS = 8, 32
LORA = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}
TRAINER = {"accelerator": "cpu", "devices": 1, "precision": "32-true", "gradient_clip_val": 1.0, "deterministic": False}


def default_tasks() -> list[Task]:
    """conf/stream/default.yaml."""
    return [
        bbc_topics("bbc", n_train=160, n_val=20, n_test=40, max_chars=160),
        chatterbot_categories("chat", ["ai", "coding", "psychology", "trivia"], n_train=160, n_val=20, n_test=40),
        math_task("math", "arithmetic__add_or_sub", n_train=160, n_val=20, n_test=40),
    ]


def long_tasks() -> list[Task]:
    """The long-sequence benchmark as conf/experiment/reproduction/fast.yaml reads it."""
    stream = cl_stream("long", order=4, skip_missing=True, data_dir=DATA, max_chars=600, max_train=200, max_eval=400)
    return list(stream.tasks)


# --- counting ---------------------------------------------------------------------------------------
def _add(acc: dict, useful: int, computed: int) -> None:
    acc["useful"] += useful
    acc["computed"] += computed


def _ratio(acc: dict) -> dict:
    return {**acc, "ratio": round(acc["useful"] / acc["computed"], 4) if acc["computed"] else 1.0}


def train_counts(enc: PromptEncoder, task: Task, grouping: bool) -> dict:
    data = ExperienceData(enc, [(ex, task.kind) for ex in task.train], TRAIN_BS, seed=0, length_grouping=grouping)
    acc = {"useful": 0, "computed": 0}
    for batch in data.train_dataloader():
        _add(acc, int(batch["attention_mask"].sum()), batch["attention_mask"].numel())
    return acc


def scoring_counts(enc: PromptEncoder, task: Task, labels: Sequence[str]) -> dict[str, dict]:
    """Rank scoring of the test prompts: useful, and computed before (KV cache) / after (grouped, one pass)."""
    label_ids = label_tokens(enc, labels)
    out = {k: {"useful": 0, "computed": 0} for k in ("before", "after", "trunk")}

    def count(rows: list[int], cols: list[int]) -> torch.Tensor:
        labs = [label_ids[c] for c in cols]
        room = enc.max_length - max(len(t) for t in labs)
        lengths = [len(enc.encode_prompt(task.test[r].prompt, room)) for r in rows]
        extra = sum(len(t) - 1 for t in labs)  # label inputs one pass needs
        useful = sum(lengths) + extra * len(rows)
        width = max(len(t) for t in labs)
        before = sum(
            padded_tokens([lengths[i] for i in b]) + (len(b) * len(labs) * width if width > 1 else 0)
            for b in split_batches(len(rows), EVAL_BS)
        )
        after = sum(len(b) * (max(lengths[i] for i in b) + extra) for b in length_batches(lengths, EVAL_BS))
        trunk = sum(len(b) * (max(lengths[i] for i in b) + extra) for b in split_batches(len(rows), EVAL_BS))
        _add(out["before"], useful, before)
        _add(out["after"], useful, after)
        _add(out["trunk"], useful, trunk)
        return torch.zeros(len(rows), len(cols))

    by_label_length(enc, [ex.prompt for ex in task.test], label_ids, count)
    return out


def generation_counts(enc: PromptEncoder, task: Task) -> dict[str, dict]:
    lengths = [len(enc.encode_prompt(ex.prompt)) for ex in task.test]
    before = sum(padded_tokens([lengths[i] for i in b]) for b in split_batches(len(lengths), EVAL_BS))
    return {
        "before": {"useful": sum(lengths), "computed": before},
        "trunk": {"useful": sum(lengths), "computed": before},
        "after": {"useful": sum(lengths), "computed": sum(padded_tokens([lengths[i] for i in b])
                                                             for b in length_batches(lengths, EVAL_BS))},
    }


def tokens_part(tokenizer) -> dict:
    result = {}
    for stream, tasks, max_length in [("default", default_tasks(), 128), ("long", long_tasks(), 192)]:
        enc = PromptEncoder(tokenizer, max_length)
        keys = ("train_before", "train_after", "eval_before", "eval_trunk_before", "eval_after")
        totals = {k: {"useful": 0, "computed": 0} for k in keys}
        per_task = {}
        for task in tasks:
            row = {"train_before": train_counts(enc, task, False), "train_after": train_counts(enc, task, True)}
            ev = scoring_counts(enc, task, task.class_labels) if task.kind == "classification" else generation_counts(enc, task)
            row["eval_before"], row["eval_trunk_before"], row["eval_after"] = ev["before"], ev["trunk"], ev["after"]
            for k, v in row.items():
                _add(totals[k], v["useful"], v["computed"])
            per_task[task.name] = {k: _ratio(v)["ratio"] for k, v in row.items()}
            print(stream, task.name, per_task[task.name], flush=True)
        result[stream] = {"max_length": max_length, "totals": {k: _ratio(v) for k, v in totals.items()}, "tasks": per_task}
    return result


# --- the baseline scorer: today's (before this change) KV-cache scoring, prompts in split order --------
@torch.no_grad()
def kv_cache_label_logprobs(model, enc: PromptEncoder, prompts: Sequence[str], labels: Sequence[str], batch_size: int):
    label_ids = label_tokens(enc, labels)
    return by_label_length(enc, prompts, label_ids, lambda rows, cols: _kv_cache(
        model, enc, [prompts[r] for r in rows], [label_ids[c] for c in cols], batch_size))


def _kv_cache(model, enc, prompts, label_ids, batch_size):
    trunk, head = trunk_and_head(model)
    n_lab, lab_w = len(label_ids), max(len(t) for t in label_ids)
    lab = torch.full((n_lab, lab_w), enc.pad_id, dtype=torch.long)
    lab_mask = torch.zeros_like(lab)
    for i, t in enumerate(label_ids):
        lab[i, : len(t)], lab_mask[i, : len(t)] = torch.tensor(t), 1
    room, scores = enc.max_length - lab_w, []
    for i in range(0, len(prompts), batch_size):
        e = [enc.encode_prompt(p, room) for p in prompts[i : i + batch_size]]
        b, width = len(e), max(len(x) for x in e)
        ids = torch.full((b, width), enc.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, x in enumerate(e):  # left padding
            ids[row, width - len(x):], mask[row, width - len(x):] = torch.tensor(x), 1
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        out = trunk(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        total = head(out.last_hidden_state[:, -1]).float().log_softmax(-1)[:, lab[:, 0]]
        if lab_w > 1:  # the second pass: every (prompt, label) pair, padded to the longest label
            cache = out.past_key_values
            cache.batch_repeat_interleave(n_lab)
            lab_in = lab.repeat(b, 1)
            att = torch.cat([mask.repeat_interleave(n_lab, 0), lab_mask.repeat(b, 1)], 1)
            lab_pos = pos[:, -1:].repeat_interleave(n_lab, 0) + 1 + torch.arange(lab_w)
            h = trunk(input_ids=lab_in, attention_mask=att, position_ids=lab_pos, past_key_values=cache,
                      use_cache=True).last_hidden_state
            keep = lab_mask.repeat(b, 1)[:, 1:].bool()
            logp = head(h[:, :-1][keep]).float().log_softmax(-1).gather(1, lab_in[:, 1:][keep][:, None]).squeeze(1)
            total = total + logp.new_zeros(b * n_lab).index_add_(0, keep.nonzero()[:, 0], logp).view(b, n_lab)
        scores.append(total)
    return torch.cat(scores)


def _cpu(fn):
    c = time.process_time()
    out = fn()
    return out, time.process_time() - c


def scoring_part(base, repeats: int) -> dict:
    model = base.model.eval()
    trunk, _ = trunk_and_head(model)
    with torch.no_grad():  # the fixed cost of a pass, in tokens (BATCH_COST)
        one = min(_cpu(lambda: trunk(input_ids=torch.ones(1, 1, dtype=torch.long)))[1] for _ in range(3))
        full = min(_cpu(lambda: trunk(input_ids=torch.ones(8, 64, dtype=torch.long)))[1] for _ in range(2))
    overhead = {"one_token_pass_s": round(one, 4), "per_token_s_batch_8x64": round(full / 512, 5),
                "pass_overhead_tokens": round(one / (full / 512), 1)}
    print(overhead, flush=True)
    cases = [(t, 128, None) for t in default_tasks()[:2]]
    cases += [(t, 192, 64) for t in long_tasks() if t.name in ("dbpedia", "agnews")]
    out = {"pass": overhead, "tasks": {}}
    for task, max_length, cap in cases:
        enc = PromptEncoder(base.tokenizer, max_length)
        prompts = [ex.prompt for ex in task.test[:cap]]
        labels = task.class_labels
        times = {"before": [], "after": []}
        for _ in range(repeats):
            old, t_old = _cpu(lambda: kv_cache_label_logprobs(model, enc, prompts, labels, EVAL_BS))
            with torch.no_grad():
                new, t_new = _cpu(lambda: label_logprobs(model, enc, prompts, labels, EVAL_BS))
            times["before"].append(t_old)
            times["after"].append(t_new)
        row = {
            "prompts": len(prompts), "labels": len(labels), "label_tokens": [len(t) for t in label_tokens(enc, labels)],
            "max_length": max_length, "cpu_s_before": [round(t, 2) for t in times["before"]],
            "cpu_s_after": [round(t, 2) for t in times["after"]],
            "speedup_cpu": round(statistics.median(times["before"]) / statistics.median(times["after"]), 3),
            "max_abs_diff": float((old - new).abs().max()), "same_argmax": bool((old.argmax(1) == new.argmax(1)).all()),
        }
        out["tasks"][task.name] = row
        print(task.name, row, flush=True)
    return out


def train_part(base, repeats: int, seeds: Sequence[int]) -> dict[str, dict]:
    """Per seed: the runs of each side (``"false"``/``"true"``), ``repeats`` times each, alternating."""
    from lmas.data.stream import Stream
    from lmas.evaluation.scoring import perplexity_scored
    from lmas.loop import ContinualLoop, TrainConfig
    from lmas.population.population import Population
    from lmas.strategies.base import Strategy

    pop = Population(base, agents=1, lora=LORA)
    agent = pop.names[0]
    init = pop.adapter_state(agent)
    tasks = default_tasks()
    tmp = tempfile.TemporaryDirectory()
    out: dict[str, dict] = {}
    for seed in seeds:
        loops = {
            flag: ContinualLoop(pop, Stream("bench", tasks), Strategy(), tmp.name, seed=seed,
                                train=TrainConfig(lr=2e-3, batch_size=TRAIN_BS, length_grouping=flag),
                                trainer=dict(TRAINER), max_length=128, progress=False, save_adapters=False)
            for flag in (False, True)
        }
        runs: dict[str, list] = {"false": [], "true": []}
        for r in range(repeats):
            for flag in ((False, True) if (r + seed) % 2 == 0 else (True, False)):  # alternate the first side
                loop, row = loops[flag], {}
                for task in tasks:
                    pop.load_adapter_state(agent, init)
                    losses, cpu = _cpu(lambda loop=loop, task=task: loop.fit(agent, task, [], 0))
                    pop.model.eval()
                    with torch.no_grad():
                        val = perplexity_scored(pop.model, loop.encoder, task.val, batch_size=EVAL_BS)
                    row[task.name] = {"cpu_s": round(cpu, 2), "steps": len(losses),
                                      "last5_loss": round(statistics.mean(losses[-5:]), 4),
                                      "val_nll_per_token": round(math.log(val.value), 4)}
                row["cpu_s"] = round(sum(v["cpu_s"] for v in row.values()), 2)
                runs[str(flag).lower()].append(row)
                print("seed", seed, "length_grouping", flag, row, flush=True)
        out[str(seed)] = runs
    tmp.cleanup()
    return out


def train_summary(per_seed: dict[str, dict]) -> dict:
    """CPU time per epoch (median over every run) and each task's val NLL (mean over seeds), per side."""
    sides = ("false", "true")
    cpu = {k: statistics.median(r["cpu_s"] for runs in per_seed.values() for r in runs[k]) for k in sides}
    tasks = [t for t in next(iter(per_seed.values()))["false"][0] if t != "cpu_s"]
    nll = {k: {t: round(statistics.mean(runs[k][0][t]["val_nll_per_token"] for runs in per_seed.values()), 4)
               for t in tasks} for k in sides}
    for k in sides:
        nll[k]["mean"] = round(statistics.mean(nll[k][t] for t in tasks), 4)
    return {"seeds": sorted(per_seed, key=int), "epoch_cpu_s_median": cpu,
            "speedup_cpu": round(cpu["false"] / cpu["true"], 3), "val_nll_per_token_mean_over_seeds": nll}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", nargs="+", default=["tokens", "scoring", "train"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train part: run seeds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = json.loads(OUT.read_text()) if OUT.exists() else {}
    result.update({"threads": 1, "train_batch_size": TRAIN_BS, "eval_batch_size": EVAL_BS, "torch": torch.__version__})
    from lmas.models.providers import smollm2

    base = smollm2()
    if "tokens" in args.parts:
        result["tokens"] = tokens_part(base.tokenizer)
    if "scoring" in args.parts:
        result["scoring"] = scoring_part(base, args.repeats)
    if "train" in args.parts:  # seeds already in the result are kept (run seeds in several calls)
        old = result.get("train", {})
        per_seed = old.get("per_seed", {"0": old["runs"]} if "runs" in old else {})
        per_seed.update(train_part(base, args.repeats, args.seeds))
        result["train"] = {**train_summary(per_seed), "per_seed": per_seed}
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
