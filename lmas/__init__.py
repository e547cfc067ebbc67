"""lmas: continual learning in populations of LoRA agents on one frozen base LM."""

from omegaconf import OmegaConf


def _first(*values):
    """``${lmas.first:a,b,...}``: the first value that is set (not null/empty), e.g. the experiment
    preset's name, else the stream's name (``conf/logger/wandb.yaml``'s W&B group)."""
    return next((v for v in values if v not in (None, "", "null", "None")), None)


OmegaConf.register_new_resolver("lmas.first", _first, replace=True)

import lmas.schema  # noqa: E402,F401 - registers the typed config sections with Hydra's ConfigStore (train_schema)
