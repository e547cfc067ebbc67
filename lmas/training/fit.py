"""Fit backends: how one experience (one agent, one task) is trained.

A strategy names its backend (``Strategy.fit_backend``): ``lightning`` (:class:`LightningFit`, one
``lightning.Trainer.fit`` of :class:`~lmas.training.experience.IncrementalLM`) for lmas's own
strategies, ``avalanche`` (:class:`lmas.training.avalanche.AvalancheFit`) for Avalanche's. Both get an
:class:`Experience` and return a :class:`FitResult`; the loop seeds, logs and records around them.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import lightning as L

from lmas.data.task import Example, Task
from lmas.lm.encoding import PromptEncoder
from lmas.lm.trunk import SharedTrunk
from lmas.population.population import Population
from lmas.schema import TrainConfig
from lmas.strategies.base import Strategy
from lmas.training.experience import ExperienceData, IncrementalLM

log = logging.getLogger(__name__)

StepHook = Callable[[int, float], None]  # (step within the experience, training loss)


@dataclass
class Experience:
    """One agent training on one task: the examples the strategy chose and the fit's seed."""

    agent: str
    task: Task
    examples: list[tuple[Example, str]]
    strategy: Strategy
    seed: int
    lr: float | None = None  # the learning rate of this fit (None: train.lr); population evolution sets it per agent
    round_idx: int | None = None  # the loop's round (strategies read it from the module: module.round_idx)


@dataclass
class FitResult:
    """What a fit produced: per-step losses, optimisation steps, and the strategy's record of it."""

    losses: list[float]
    steps: int
    info: dict[str, Any] = field(default_factory=dict)
    curve: list[list[float]] | None = None  # [[step, val score], ...] when learning curves are on


class FitBackend(Protocol):
    """Trains one experience in place on the population's model."""

    def fit(self, exp: Experience, on_loss: StepHook, curve: Callable[[], float] | None = None) -> FitResult: ...


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-fit banners (GPU/TPU availability, tips); warnings still show."""
    names = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero", "lightning")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        try:
            yield
        finally:
            for n, level in levels.items():
                logging.getLogger(n).setLevel(level)


class _StepLogger(L.Callback):
    def __init__(self, every: int, on_loss: StepHook) -> None:
        self.every, self.on_loss = every, on_loss

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step % self.every == 0:
            self.on_loss(step, outputs["loss"].item() if isinstance(outputs, dict) else float(outputs))


class _CurveLogger(L.Callback):
    """Scores the training task every ``every`` steps (and before the first): a learning curve."""

    def __init__(self, every: int, score: Callable[[], float]) -> None:
        self.every, self.score = every, score
        self.points: list[list[float]] = []  # [[step, score], ...]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.points.append([0, self.score()])

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % self.every == 0:
            self.points.append([trainer.global_step, self.score()])


class LightningFit:
    """One ``lightning.Trainer.fit`` of :class:`IncrementalLM` per experience.

    Args:
        population, encoder: the agents and the prompt encoding.
        train: optimisation settings (``train.*``).
        trainer: extra ``lightning.Trainer`` keyword arguments (accelerator, devices, strategy, precision, ...).
        trunk: the shared frozen trunk, when ``train.trunk_cache`` caches the layers below the LoRA ones.
        curve_every: >0: score the training task every k steps (learning curves).
        progress: show Lightning's progress bar.
    """

    def __init__(
        self,
        population: Population,
        encoder: PromptEncoder,
        train: TrainConfig,
        trainer: dict[str, Any],
        trunk: SharedTrunk | None = None,
        curve_every: int = 0,
        progress: bool = True,
    ) -> None:
        self.population, self.encoder, self.train = population, encoder, train
        self.trainer_kwargs, self.trunk = trainer, trunk
        self.curve_every, self.progress = curve_every, progress

    def fit(self, exp: Experience, on_loss: StepHook, curve: Callable[[], float] | None = None) -> FitResult:
        cfg, strategy = self.train, exp.strategy
        data = ExperienceData(
            self.encoder, exp.examples, cfg.batch_size, seed=exp.seed, length_grouping=cfg.length_grouping
        )
        module = IncrementalLM(
            self.population,
            exp.agent,
            strategy,
            self.encoder,
            lr=exp.lr or cfg.lr,
            weight_decay=cfg.weight_decay,
            warmup_steps=cfg.warmup_steps,
            trunk=self.trunk,
        )
        module.examples, module.round_idx = exp.examples, exp.round_idx
        self.population.activate(exp.agent)
        strategy.before_task(module, exp.task)
        callbacks: list[L.Callback] = [_StepLogger(cfg.log_every, on_loss)]
        curve_cb = _CurveLogger(self.curve_every, curve) if curve is not None and self.curve_every > 0 else None
        if curve_cb is not None:
            callbacks.append(curve_cb)
        self.population.model.train()  # Lightning keeps submodules' modes; evaluation left them in eval
        with quiet_lightning():
            trainer = L.Trainer(
                max_epochs=cfg.epochs,
                max_steps=cfg.max_steps if cfg.max_steps else -1,
                logger=False,
                enable_checkpointing=False,
                enable_model_summary=False,
                enable_progress_bar=self.progress,
                num_sanity_val_steps=0,
                callbacks=callbacks,
                **{"accelerator": "cpu", "devices": 1, **self.trainer_kwargs},
            )
            trainer.fit(module, datamodule=data)
        self.population.model.eval()
        strategy.after_task(module, exp.task)
        return FitResult(
            module.losses, trainer.global_step, strategy.fit_info(), curve_cb.points if curve_cb is not None else None
        )
