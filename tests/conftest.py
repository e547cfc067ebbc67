"""Shared fixtures: tiny models built in code, and the real Hydra config composed and shrunk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture
def tiny_base():
    """A fresh random tiny Llama with the SmolLM2 tokenizer (fresh per test: peft edits it in place)."""
    from lmas.models.providers import tiny

    return tiny(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=0)


@pytest.fixture(scope="session")
def smollm2_folder():
    """The converted embedded model folder (converted once per cache)."""
    from lmas.models.providers import ensure_smollm2_folder

    return ensure_smollm2_folder()


def compose(overrides: list[str], run_dir: Path | None = None):
    """Compose conf/train.yaml with overrides, as `lmas-train` would (Hydra config included)."""
    import lmas  # noqa: F401 - registers the typed config sections (lmas.schema) with Hydra's ConfigStore
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
        if run_dir is not None:
            cfg.hydra.runtime.output_dir = str(run_dir)
        HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):  # the job sees no `hydra` node, as under @hydra.main
        del cfg["hydra"]
    return cfg


@pytest.fixture(name="compose")
def compose_fixture():
    """The :func:`compose` function, for tests."""
    return compose


@pytest.fixture
def run_lmas():
    """Run lmas-train's job function on composed overrides; returns the results dict."""

    def _run(overrides: list[str], run_dir: Path) -> dict:
        from lmas.train import run

        return run(compose(overrides, run_dir), run_dir)

    return _run


@pytest.fixture
def fast_overrides(tmp_path):
    """Overrides that make any experiment a few-second smoke run on the tiny model."""
    return ["model=tiny", "debug=fast", "logger=csv", f"paths.output_dir={tmp_path}"]


@pytest.fixture
def one_thread():
    """Tiny matrices: one torch thread avoids OpenMP start-up and contention; restored after the test."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
