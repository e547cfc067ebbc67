"""The LightningModule that trains one agent's adapter on one task, and its data module."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from lmas.data.task import Example
from lmas.lm.batching import LengthGroupedSampler
from lmas.lm.device import model_device, to_device
from lmas.lm.encoding import Encoded, PromptEncoder, collate
from lmas.lm.likelihood import answer_logits

if TYPE_CHECKING:
    from lmas.lm.trunk import SharedTrunk
    from lmas.population.population import Population
    from lmas.strategies.base import Strategy


class ExperienceData(L.LightningDataModule):
    """Training data of one experience (a task, plus whatever the strategy adds, e.g. replay).

    Examples are tokenised once; the loader shuffles with its own seeded generator so the
    order depends only on ``seed``. ``length_grouping`` (``train.length_grouping``): batches of
    similar length in a shuffled order (:class:`lmas.lm.batching.LengthGroupedSampler`), less padding.
    Each batch carries ``index``: the positions of its rows in ``examples`` (the loop also hands
    ``examples`` to the module, so strategies can look rows up).
    """

    def __init__(
        self,
        encoder: PromptEncoder,
        examples: Sequence[tuple[Example, str]],
        batch_size: int,
        seed: int,
        length_grouping: bool = True,
    ) -> None:
        super().__init__()
        if not examples:
            raise ValueError("an experience needs at least one training example")
        if batch_size <= 0:
            raise ValueError(f"train.batch_size={batch_size}: must be a positive integer")
        self.encoder = encoder
        self.items: list[Encoded] = [encoder.encode_example(ex, kind) for ex, kind in examples]
        self.batch_size = batch_size
        self.seed = seed
        self.length_grouping = length_grouping

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        dataset: Any = range(len(self.items))  # a map-style dataset (len, getitem) of example indices
        if self.length_grouping:  # consecutive runs of batch_size indices are the length-grouped batches
            sampler = LengthGroupedSampler([len(it.ids) for it in self.items], self.batch_size, gen)
            return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collate)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=True, generator=gen, collate_fn=self.collate)

    def collate(self, indices: list[int]) -> dict[str, Tensor]:
        """A batch of the examples at ``indices``; ``batch["index"]`` (B,) says which they are."""
        batch = collate([self.items[i] for i in indices], self.encoder.pad_id)
        batch["index"] = torch.tensor(indices, dtype=torch.long)
        return batch


class IncrementalLM(L.LightningModule):
    """Trains the active agent's LoRA adapter: task loss on answer tokens + the strategy's terms.

    The base model's weights are frozen; only the agent's adapter parameters reach the
    optimizer. The loss terms come from the strategy (``strategy.loss_terms``), each a
    scalar tensor that this module adds to the task loss and logs under its name.

    ``trunk`` (:class:`lmas.lm.trunk.SharedTrunk`, ``train.trunk_cache``): the layers below the
    lowest LoRA layer are taken from its per-example cache, so later epochs and other agents on
    the same examples run only the top layers; the loss and gradients are those of the full pass.
    """

    def __init__(
        self,
        population: Population,
        agent: str,
        strategy: Strategy,
        encoder: PromptEncoder,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        trunk: SharedTrunk | None = None,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"train.lr={lr}: must be positive")
        self.net = population.model
        self.population = population
        self.agent = agent
        self.strategy = strategy
        self.encoder = encoder  # strategies use it to collate their own examples (replay, A-GEM memory)
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.trunk = trunk  # a lmas.lm.trunk.SharedTrunk: the frozen bottom layers cached per example
        self.losses: list[float] = []  # per-step total loss, read by the loop for curves
        self.examples: Sequence[tuple[Example, str]] = ()  # the experience's data; batch["index"] points here
        self.round_idx: int | None = None  # the loop's round of this experience (None outside a loop)

    def on_train_start(self) -> None:
        if self.trunk is not None:
            self.trunk.check(training=True)

    def on_train_batch_start(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.strategy.on_train_batch_start(self, batch)

    def batch_of(self, examples: Sequence[tuple[Example, str]]) -> dict[str, Tensor]:
        """Collate (example, kind) pairs into a batch on the model's device."""
        items = [self.encoder.encode_example(ex, kind) for ex, kind in examples]
        return to_device(collate(items, self.encoder.pad_id), model_device(self.net))

    def cpu(self) -> IncrementalLM:
        """Keep the shared base where the loop put it: a no-op.

        Lightning's ``Strategy.teardown`` (2.6, ``lightning/pytorch/strategies/strategy.py``) calls
        ``lightning_module.cpu()`` at the end of every ``Trainer.fit`` to free the accelerator. This
        module is used for one fit, but its ``net`` is the population's model, shared by every fit
        and every evaluation of the run: moved back it would be copied CPU <-> GPU twice per fit
        and evaluated on the CPU. Nothing else calls ``cpu()`` on this module; to move the
        population, move ``population.model``. (Strategy subclasses would need one per Lightning
        strategy, auto/ddp/fsdp/deepspeed; this covers them all.)
        """
        return self

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self.trunk is not None:  # the same logits; layers below the LoRA ones come from the cache
            logits, targets, rows = self.trunk.answer_logits(batch)  # (N, V), (N,), (N,)
        else:
            logits, targets, rows = answer_logits(self.net, batch)  # (N, V), (N,), (N,)
        task_loss = F.cross_entropy(logits, targets)
        terms = self.strategy.loss_terms(self, batch, {"logits": logits, "targets": targets, "rows": rows})
        loss = task_loss + sum(terms.values()) if terms else task_loss
        value = loss.item()  # the one host sync of a step: the loss curve and the NaN check share it
        if not math.isfinite(value):
            raise FloatingPointError(
                f"agent {self.agent!r}: non-finite loss {value} at step {self.global_step} "
                f"(task loss {task_loss.item()}, terms { {k: v.item() for k, v in terms.items()} })"
            )
        if self._lightning_logs():
            self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
            for name, term in terms.items():
                self.log(f"train/{name}", term, batch_size=batch["input_ids"].shape[0])
        self.losses.append(value)
        return loss

    def _lightning_logs(self) -> bool:
        """Whether anything reads ``self.log``: a Lightning logger or the progress bar.

        The loop runs with ``logger=False`` and tracks losses itself (``losses``, its step logger);
        ``self.log`` costs about 2 ms a step (benchmarks/framework_overhead.py), so it is skipped then.
        """
        trainer = self._trainer
        return trainer is not None and (bool(trainer.loggers) or trainer.progress_bar_callback is not None)

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        self.strategy.on_before_optimizer_step(self)

    def configure_optimizers(self) -> OptimizerLRScheduler:
        params = [p for p in self.net.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError(f"agent {self.agent!r} has no trainable parameters")
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.warmup_steps <= 0:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / self.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
