"""Train one agent's adapter with Lightning DDP (or in one process); run by tests/test_ddp.py.

    python tests/ddp_fit.py --devices 2 --batch-size 4 --out DIR   # 2 CPU processes, gloo
    python tests/ddp_fit.py --devices 1 --batch-size 8 --out DIR   # the same global batch, one process

Lightning's ``ddp`` strategy starts the other ranks by running this script again with the same
arguments, so it has to be a file (not a function inside a test). Every rank writes
``DIR/rank<r>.safetensors`` (its adapter after training) and ``DIR/rank<r>.json`` (its per-step
losses, steps, world size and the answer NLL of a fixed evaluation batch after training).

Under DDP, Lightning replaces the training loader's sampler by a shuffling ``DistributedSampler``
(seed ``PL_GLOBAL_SEED``, here 0): in each epoch it permutes the examples and rank r takes every
second one from position r, so a step's global batch is the next 8 of the permutation. The
one-process run draws the same permutation (a ``DistributedSampler`` for one replica) with batch 8,
so it trains on the same global batches; every answer is one token, so the mean of the ranks' mean
losses is the global batch's mean loss.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, DistributedSampler

from lmas.data.task import Example
from lmas.models.providers import tiny
from lmas.training.experience import ExperienceData, IncrementalLM
from lmas.lm.encoding import PromptEncoder, collate
from lmas.lm.likelihood import answer_loss
from lmas.population.population import Population
from lmas.strategies.base import Strategy

SEED = 0
TOPICS = ["sport", "business", "politics", "tech"]
WORDS = ["rain", "match", "shares", "vote", "phone", "goal", "bank", "minister", "chip", "cup", "market", "law"]


class Recorder(Strategy):
    """The naive strategy, recording which examples each step trains on."""

    def __init__(self) -> None:
        self.rows: list[list[int]] = []

    def on_train_batch_start(self, module, batch) -> None:
        self.rows.append(batch["index"].tolist())


class LikeDistributed(ExperienceData):
    """One process, the batches DDP's ranks train on together (see the module docstring)."""

    def train_dataloader(self) -> DataLoader:
        sampler = DistributedSampler(range(len(self.items)), num_replicas=1, rank=0, shuffle=True, seed=SEED)
        return DataLoader(range(len(self.items)), batch_size=self.batch_size, sampler=sampler, collate_fn=self.collate)


def examples(n: int) -> list[Example]:
    return [Example(f"News: {WORDS[i % len(WORDS)]} {WORDS[(3 * i + 1) % len(WORDS)]} {i}\nTopic:",
                    TOPICS[i % len(TOPICS)]) for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4, help="per process")
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(SEED, verbose=False)
    base = tiny(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=0)
    pop = Population(base, agents=1, lora={"r": 4, "alpha": 8}, seed=0)
    enc = PromptEncoder(base.tokenizer, max_length=32)
    for topic in TOPICS:  # one answer token per example: rank means average to the global mean
        assert len(enc.tokens(" " + topic)) == 1, topic
    train = [(ex, "classification") for ex in examples(args.examples)]
    # plain shuffled batches (train.length_grouping=false): what Lightning hands to DistributedSampler
    data = (ExperienceData if args.devices > 1 else LikeDistributed)(enc, train, args.batch_size, seed=SEED,
                                                                     length_grouping=False)
    recorder = Recorder()
    module = IncrementalLM(pop, "agent0", recorder, enc, lr=1e-2)
    pop.model.train()
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.epochs, logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=False, num_sanity_val_steps=0, gradient_clip_val=1.0,
    )
    trainer.fit(module, datamodule=data)
    rank = trainer.global_rank
    pop.model.eval()
    held_out = collate([enc.encode_example(ex, "classification") for ex in examples(48)[-8:]], enc.pad_id)
    with torch.no_grad():
        nll = answer_loss(pop.model, held_out).item()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(pop.adapter_state("agent0"), str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world_size": trainer.world_size, "steps": trainer.global_step, "losses": module.losses, "rows": recorder.rows,
        "eval_nll": nll, "pid": os.getpid(),
        "backend": getattr(trainer.strategy, "process_group_backend", None),
    }))


if __name__ == "__main__":
    main()
