"""Where tensors live and at which precision the forward runs: the one place that decides both.

* Device: every tensor that scoring, training or a strategy builds follows the model's device,
  ``model_device(model)`` (the device of its first parameter). Batches are built on the CPU
  (token ids from Python lists) and moved once with :func:`to_device`.
* The base stays on the accelerator for the whole run: the loop moves the population's model to
  the Trainer's root device once (:func:`trainer_device`), and
  :class:`lmas.training.experience.IncrementalLM` keeps Lightning's end-of-fit teardown from moving
  it back to the CPU. Evaluation between fits then runs on the accelerator too.
* Precision: ``trainer.precision`` is Lightning's. ``32-true`` (default), ``bf16-mixed`` and
  ``16-mixed`` are supported; mixed precision runs the forward under
  ``torch.autocast(device_type, dtype)`` while every parameter (the LoRA weights included) stays
  float32. Lightning autocasts the training step; evaluation outside ``Trainer.fit`` enters the
  same autocast through :func:`autocast` (one context, used by the evaluator). ``*-true`` half
  precisions would cast the shared base and the LoRA weights themselves (and train adapters in
  half precision); ``64-true`` and transformer-engine are not supported: all refused with
  :class:`ValueError` naming ``trainer.precision``.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

# Lightning's precision flags (and their legacy aliases) -> the autocast dtype (None: full fp32)
PRECISIONS: dict[str, torch.dtype | None] = {
    "32-true": None,
    "32": None,
    "bf16-mixed": torch.bfloat16,
    "bf16": torch.bfloat16,
    "16-mixed": torch.float16,
    "16": torch.float16,
}


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def to_device(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Every tensor of ``batch`` on ``device`` (a no-op for tensors already there)."""
    return {k: v.to(device) for k, v in batch.items()}


def autocast_dtype(precision: Any) -> torch.dtype | None:
    """The autocast dtype of Lightning's ``trainer.precision`` (None: no autocast, full float32).

    Raises ``ValueError`` naming ``trainer.precision`` for the precisions lmas does not support.
    """
    key = "32-true" if precision is None else str(precision)
    if key not in PRECISIONS:
        raise ValueError(
            f"trainer.precision={precision!r}: lmas supports 32-true, bf16-mixed and 16-mixed (mixed precision "
            "autocasts the forward and keeps the LoRA weights in float32); '*-true' half precisions would cast "
            "the shared base and the adapters themselves, 64-true and transformer-engine are not supported"
        )
    return PRECISIONS[key]


def autocast(precision: Any, device: torch.device) -> AbstractContextManager:
    """``torch.autocast`` for ``device`` at ``trainer.precision`` when it is mixed, else a no-op context.

    What Lightning's ``MixedPrecision`` plugin enters around a training step, for code outside it
    (evaluation, learning curves, teachers' outputs).
    """
    dtype = autocast_dtype(precision)
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def trainer_device(trainer_kwargs: Mapping[str, Any]) -> torch.device:
    """The root device of a ``lightning.Trainer`` built from ``trainer_kwargs`` (``trainer.*``).

    The device this process trains on: ``cuda:<local rank>`` for GPUs (also under DDP, where each
    process is one rank), ``cpu`` otherwise. Builds a Trainer, which starts no process and moves
    nothing.
    """
    import logging

    import lightning as L

    kwargs = {"accelerator": "cpu", "devices": 1, **dict(trainer_kwargs)}
    autocast_dtype(kwargs.get("precision"))
    names = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:  # no "GPU available" banner for this probe
        logging.getLogger(n).setLevel(logging.WARNING)
    try:
        trainer = L.Trainer(
            logger=False, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False, **kwargs
        )
        return trainer.strategy.root_device
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)
