"""lmas vs what users would pick instead: Hugging Face ``Trainer`` with peft (and TRL's ``SFTTrainer``) for
training one experience, plain per-label ``model(**batch)`` for rank classification. SmolLM2-135M.

Training, the same on every side: the default stream's ``bbc`` task (its first ``--examples`` = 64 training
examples, encoded by lmas's ``PromptEncoder``: ``data.max_length=128``), LoRA r=8, alpha 16 on q_proj/v_proj
(dropout 0), the same initial adapter weights, batch 8, one epoch (8 steps), AdamW (lr 2e-3, no weight decay,
torch's betas/eps, constant learning rate), gradient clipping at norm 1.0, fp32, the answer-only loss (mean
cross-entropy over the answer tokens: ``labels = -100`` on the prompt and padding for the trainers), and the same
order of examples (lmas shuffles with its seeded generator; the trainers get the examples in that order with
``train_sampling_strategy="sequential"``):

* lmas: ``ContinualLoop.fit`` (``Trainer.fit(IncrementalLM)``: the LM head only at answer positions);
* ``transformers.Trainer`` on a ``peft.get_peft_model`` of a second copy of the model (loss from
  ``model(input_ids, attention_mask, labels)``: full ``(B, T, V)`` logits);
* ``trl.SFTTrainer`` (if ``trl`` imports) on a pre-tokenized dataset with the same ``labels``,
  ``gradient_checkpointing=False`` and ``bf16=False`` (SFTConfig's defaults are True: the other sides run fp32
  without checkpointing).

The per-step losses of all sides must agree (checked; the largest difference is written), and so must the
adapters at the end. Timing: per-step process CPU time of the steady steps (stamps at the start of every
batch, from batch 1 on) and of the whole experience (building the trainer included).

Evaluation: the log-likelihood of each of bbc's 5 labels after each of its 40 test prompts, with lmas's
``label_logprobs`` (each prompt's KV cache shared by its labels, the head only where a label token is
predicted) vs the plain way (for every label, ``model(**batch)`` on prompt + label in batches of 32, the sum
of the label tokens' log-probs from the full logits); the scores must be allclose.

All sides alternate in one process (A B C, then rotated), 1 torch thread; ratios are of median process CPU
times (wall-time ratios next to them: the machine is shared), and for training also the median of the
per-repeat ratios (one repeat's sides run back to back, under about the same load). Goal: other / lmas ≥ 1.5.
Writes benchmarks/results/vs_trainer.json.

    .venv/bin/python benchmarks/vs_trainer.py [--repeats 3] [--examples 64] [--no-trl]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainingArguments

from lmas.data.sources import bbc_topics
from lmas.data.stream import Stream
from lmas.lm.encoding import IGNORE, collate
from lmas.lm.likelihood import label_logprobs
from lmas.loop import ContinualLoop, TrainConfig
from lmas.models.providers import smollm2
from lmas.population.population import Population
from lmas.strategies.base import Strategy

OUT = Path(__file__).parent / "results" / "vs_trainer.json"
LORA = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}
LR, BATCH = 2e-3, 8
TRAINER = {"accelerator": "cpu", "devices": 1, "precision": "32-true", "gradient_clip_val": 1.0, "deterministic": False}
GOAL = 1.5


class StepClock(Strategy):
    """The naive strategy; (wall, CPU) stamps and the example indices at the start of every batch."""

    def __init__(self) -> None:
        self.stamps: list[tuple[float, float]] = []
        self.order: list[int] = []

    def on_train_batch_start(self, module, batch) -> None:
        self.stamps.append((time.perf_counter(), time.process_time()))
        self.order.extend(batch["index"].tolist())


class Stamps(TrainerCallback):
    """(wall, CPU) stamps at the start of every trainer step."""

    def __init__(self) -> None:
        self.stamps: list[tuple[float, float]] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.stamps.append((time.perf_counter(), time.process_time()))


def recording(cls: type) -> type:
    """``cls`` (a trainer class) that also records the loss of every training step."""

    class Recording(cls):
        losses: list[float]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.losses.append((out[0] if return_outputs else out).item())
            return out

    return Recording


class Pad:
    """Right padding of pre-tokenized rows: ``input_ids``/``attention_mask`` and ``labels`` (-100 on padding)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        out = {
            "input_ids": torch.full((len(rows), width), self.pad_id),
            "attention_mask": torch.zeros(len(rows), width, dtype=torch.long),
            "labels": torch.full((len(rows), width), IGNORE),
        }
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            out["input_ids"][i, :n] = torch.tensor(r["input_ids"])
            out["attention_mask"][i, :n] = 1
            out["labels"][i, :n] = torch.tensor(r["labels"])
        return out


def args_for(cls: type, tmp: str, steps: int, **extra) -> TrainingArguments:
    return cls(
        output_dir=tmp,
        per_device_train_batch_size=BATCH,
        max_steps=steps,
        num_train_epochs=1,
        learning_rate=LR,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        remove_unused_columns=False,
        **extra,
    )


@torch.no_grad()
def plain_label_logprobs(model, enc, prompts: list[str], labels: list[str], batch_size: int = 32) -> torch.Tensor:
    """For every label: ``model(**batch)`` on prompt + label, the sum of the label tokens' log-probs."""
    cols = []
    for lab in labels:
        items = [enc.encode(p, lab, eos=False) for p in prompts]
        scores = []
        for i in range(0, len(items), batch_size):
            batch = collate(items[i : i + batch_size], enc.pad_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logp = logits[:, :-1].float().log_softmax(-1)  # (B, T-1, V): position t predicts token t+1
            tgt = batch["targets"][:, 1:]
            keep = tgt != IGNORE
            tok = logp.gather(2, tgt.clamp(min=0)[..., None]).squeeze(2)
            scores.append((tok * keep).sum(1))
        cols.append(torch.cat(scores))
    return torch.stack(cols, 1)


def steady(stamps: list[tuple[float, float]], first: int = 1) -> tuple[float, float]:
    """(CPU, wall) seconds per step from batch ``first`` to the start of the last batch."""
    n = len(stamps) - 1 - first
    return (stamps[-1][1] - stamps[first][1]) / n, (stamps[-1][0] - stamps[first][0]) / n


def paired(side: dict, lmas: dict) -> None:
    """Per-repeat ratios (each repeat runs both sides back to back, under the same machine load) and their median."""
    for key in ("step_cpu_s", "experience_cpu_s"):
        ratios = [a[key] / b[key] for a, b in zip(side["runs"], lmas["runs"], strict=True)]
        side[f"{key[:-6]}_ratio_cpu_per_repeat"] = ratios
        side[f"{key[:-6]}_ratio_cpu_median_of_repeats"] = statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--eval-repeats", type=int, default=3)
    parser.add_argument("--no-trl", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    steps = args.examples // BATCH
    base = smollm2()
    pop = Population(base, agents=1, lora=LORA)
    agent = pop.names[0]
    init = pop.adapter_state(agent)
    full = bbc_topics("bbc", n_train=160, n_val=20, n_test=40, max_chars=160)  # conf/stream/default.yaml
    task = dataclasses.replace(full, train=full.train[: args.examples])
    clock, tmp = StepClock(), tempfile.TemporaryDirectory()
    loop = ContinualLoop(
        pop,
        Stream("vs", [task]),
        clock,
        tmp.name,
        seed=0,
        train=TrainConfig(lr=LR, batch_size=BATCH, epochs=1, length_grouping=False),
        trainer=dict(TRAINER),
        max_length=128,
        progress=False,
        save_adapters=False,
    )
    enc = loop.encoder
    # lmas's order: ExperienceData's loader, seeded with the fit's seed (0 for seed 0, round 0, agent 0)
    order = [
        int(i)
        for b in DataLoader(
            range(len(task.train)), batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(0)
        )
        for i in b
    ]
    rows = []
    for i in order:
        e = enc.encode_example(task.train[i], task.kind)
        rows.append({"input_ids": list(e.ids), "labels": [IGNORE] * e.target_start + list(e.ids[e.target_start :])})

    other = smollm2().model  # the trainers' own model: a second copy, with a fresh peft adapter
    hf = get_peft_model(
        other,
        LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=["q_proj", "v_proj"],
            bias="none",
            task_type="CAUSAL_LM",
        ),
    )
    sides = {}

    def run_lmas():
        pop.load_adapter_state(agent, init)
        clock.stamps, clock.order = [], []
        c, t = time.process_time(), time.perf_counter()
        losses = loop.fit(agent, task, [], 0)
        total = (time.process_time() - c, time.perf_counter() - t)
        assert clock.order == order, "lmas's batch order is not the one given to the trainers"
        return losses, clock.stamps, total, pop.adapter_state(agent)

    def run_trainer(cls, make_args, dataset, **kw):
        def run():
            set_peft_model_state_dict(hf, init)
            cb = Stamps()
            with tempfile.TemporaryDirectory() as out:
                c, t = time.process_time(), time.perf_counter()
                trainer = recording(cls)(model=hf, args=make_args(out), train_dataset=dataset, callbacks=[cb], **kw)
                trainer.losses = []
                trainer.train()
                total = (time.process_time() - c, time.perf_counter() - t)
            state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(hf).items()}
            return trainer.losses, cb.stamps, total, state

        return run

    sides["lmas"] = run_lmas
    sides["hf_trainer"] = run_trainer(
        Trainer, lambda out: args_for(TrainingArguments, out, steps), rows, data_collator=Pad(enc.pad_id)
    )  # a list of dicts: a map-style dataset
    trl_note = "not run (--no-trl)"
    if not args.no_trl:
        try:
            import datasets
            import trl
        except ImportError as err:
            trl_note = f"not installed: {err}"
        else:
            trl_note = f"trl {trl.__version__}"
            sides["trl_sft"] = run_trainer(
                trl.SFTTrainer,
                lambda out: args_for(
                    trl.SFTConfig, out, steps, gradient_checkpointing=False, bf16=False, max_length=None, packing=False
                ),
                datasets.Dataset.from_list(rows),
                processing_class=base.tokenizer,
            )

    names = list(sides)
    runs: dict[str, list] = {n: [] for n in names}
    for r in range(args.repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            losses, stamps, total, state = sides[n]()
            step_cpu, step_wall = steady(stamps)
            runs[n].append(
                {
                    "losses": losses,
                    "step_cpu_s": step_cpu,
                    "step_wall_s": step_wall,
                    "experience_cpu_s": total[0],
                    "experience_wall_s": total[1],
                    "state": state,
                }
            )
            print(
                f"repeat {r} {n}: {len(stamps)} steps, {step_cpu:.2f} s CPU/step ({step_wall:.2f} wall), "
                f"experience {total[0]:.1f} s CPU; losses {[round(x, 4) for x in losses[:3]]}",
                flush=True,
            )
    ref = runs["lmas"][0]
    results: dict = {
        "model": base.name,
        "threads": 1,
        "repeats": args.repeats,
        "examples": len(rows),
        "steps": steps,
        "batch_size": BATCH,
        "lr": LR,
        "lora": LORA,
        "goal": GOAL,
        "trl": trl_note,
        "order": order,
        "lmas_losses": ref["losses"],
        "training": {},
    }
    for n in names:
        diff = max(abs(a - b) for row in runs[n] for a, b in zip(row["losses"], ref["losses"], strict=True))
        sdiff = max((row["state"][k] - ref["state"][k]).abs().max().item() for row in runs[n] for k in ref["state"])
        med = {
            k: statistics.median(row[k] for row in runs[n])
            for k in ("step_cpu_s", "step_wall_s", "experience_cpu_s", "experience_wall_s")
        }
        results["training"][n] = {
            **med,
            "losses": runs[n][0]["losses"],
            "max_loss_diff_vs_lmas": diff,
            "max_adapter_diff_vs_lmas": sdiff,
            "runs": [{k: v for k, v in row.items() if k != "state"} for row in runs[n]],
        }
        assert diff < 1e-4 and sdiff < 1e-3, f"{n}: losses / adapters differ from lmas's by {diff} / {sdiff}"
    lm = results["training"]["lmas"]
    for n in names[1:]:
        t = results["training"][n]
        t["step_ratio_cpu"], t["step_ratio_wall"] = (
            t["step_cpu_s"] / lm["step_cpu_s"],
            t["step_wall_s"] / lm["step_wall_s"],
        )
        t["experience_ratio_cpu"] = t["experience_cpu_s"] / lm["experience_cpu_s"]
        t["experience_ratio_wall"] = t["experience_wall_s"] / lm["experience_wall_s"]
        paired(t, lm)
        print(
            f"{n} / lmas: step {t['step_ratio_cpu']:.2f}x CPU ({t['step_ratio_wall']:.2f}x wall), experience "
            f"{t['experience_ratio_cpu']:.2f}x CPU; max loss diff {t['max_loss_diff_vs_lmas']:.2e}",
            flush=True,
        )

    pop.model.eval()
    prompts, labels = [e.prompt for e in full.test], list(full.labels)
    ours = label_logprobs(pop.model, enc, prompts, labels, 32)
    plain = plain_label_logprobs(pop.model, enc, prompts, labels, 32)
    torch.testing.assert_close(ours, plain, rtol=1e-4, atol=1e-4)
    ev: dict[str, dict[str, list[float]]] = {"lmas": {"cpu": [], "wall": []}, "plain": {"cpu": [], "wall": []}}
    fns = {
        "lmas": lambda: label_logprobs(pop.model, enc, prompts, labels, 32),
        "plain": lambda: plain_label_logprobs(pop.model, enc, prompts, labels, 32),
    }
    for r in range(args.eval_repeats):
        for n in ["lmas", "plain"] if r % 2 == 0 else ["plain", "lmas"]:
            c, t = time.process_time(), time.perf_counter()
            fns[n]()
            ev[n]["cpu"].append(time.process_time() - c)
            ev[n]["wall"].append(time.perf_counter() - t)
            print(f"eval repeat {r} {n}: {ev[n]['cpu'][-1]:.2f} s CPU", flush=True)
    med = {n: {k: statistics.median(v) for k, v in d.items()} for n, d in ev.items()}
    results["evaluation"] = {
        "task": "bbc test",
        "prompts": len(prompts),
        "labels": len(labels),
        "batch_size": 32,
        "max_score_diff": (ours - plain).abs().max().item(),
        "same_predictions": bool((ours.argmax(1) == plain.argmax(1)).all()),
        "lmas_cpu_s": med["lmas"]["cpu"],
        "plain_cpu_s": med["plain"]["cpu"],
        "ratio_cpu": med["plain"]["cpu"] / med["lmas"]["cpu"],
        "ratio_wall": med["plain"]["wall"] / med["lmas"]["wall"],
        "runs": ev,
    }
    e = results["evaluation"]
    print(
        f"evaluation plain / lmas: {e['ratio_cpu']:.2f}x CPU ({e['ratio_wall']:.2f}x wall); "
        f"max score diff {e['max_score_diff']:.1e}",
        flush=True,
    )
    results["passes"] = {n: results["training"][n]["step_ratio_cpu"] >= GOAL for n in names[1:]}
    results["passes"]["evaluation"] = e["ratio_cpu"] >= GOAL
    tmp.cleanup()
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {OUT}")


if __name__ == "__main__":
    main()
