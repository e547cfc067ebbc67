"""The typed schemas of lmas's config sections (dataclasses; registered with Hydra's ConfigStore)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    """Optimisation settings of one experience (``train.*`` in the config)."""

    lr: float = 1e-3
    batch_size: int = 8
    epochs: int = 1
    max_steps: int | None = None  # per experience; None = full epochs
    weight_decay: float = 0.0
    warmup_steps: int = 0
    log_every: int = 5
    trunk_cache: bool = False  # cache the frozen layers below the LoRA ones per example (lmas/lm/trunk.py)


@dataclass
class EvalConfig:
    """Evaluation settings (``eval.*`` in the config)."""

    split: str = "test"
    batch_size: int = 32
    max_new_tokens: int = 12
    initial: bool = True  # evaluate the untrained model on every task (b, for FWT)
    next_task: bool = True  # evaluate the next round's tasks before training them
    curve_every: int = 0  # >0: score the training task's val split every k steps (learning curves)
    mixed_adapters: bool = True  # score single-adapter agents together in mixed-adapter batches
    val_fallback: int = 32  # tasks without a val split use this many training examples where val is needed
    shared_trunk: bool = False  # agents' label scores share one pass of the layers below the LoRA ones
