"""Where ``lmas-train``'s configs live: the one answer used by :mod:`lmas.train` and :mod:`lmas.config`.

Two places are tried, in order; the first holding ``train.yaml`` wins:

1. ``lmas/conf/`` inside the installed package: a wheel (``pip install .``, ``pip install <wheel>``)
   carries a copy of the repository's ``conf/`` there (setup.py copies it at build time);
2. ``conf/`` next to the ``lmas/`` folder: a source checkout or an editable install
   (``pip install -e .``, ``make venv``) reads the repository's configs in place.

Users add their own config dirs on top of these without touching the package:
``lmas-train --config-dir ~/my_conf stream=my_stream`` or ``'hydra.searchpath=[file:///abs/my_conf]'``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

PRIMARY_NAME = "train"  # conf/train.yaml, lmas-train's primary config


def candidates() -> list[Path]:
    """The config dirs tried, in order: the packaged ``lmas/conf``, then the source tree's ``conf``."""
    package = Path(str(resources.files("lmas")))
    return [package / "conf", package.parent / "conf"]


def config_dir() -> Path:
    """The dir holding ``train.yaml`` (see the module doc); ``FileNotFoundError`` naming both places if none."""
    for folder in candidates():
        if (folder / f"{PRIMARY_NAME}.yaml").is_file():
            return folder
    tried = ", ".join(str(c) for c in candidates())
    raise FileNotFoundError(
        f"lmas-train: no {PRIMARY_NAME}.yaml in {tried}; reinstall lmas from its repository "
        "(`pip install .` ships conf/ inside the package; `pip install -e .` reads it in place)"
    )


def primary_config() -> Path:
    """``train.yaml``, lmas-train's primary config (``FileNotFoundError`` as :func:`config_dir`)."""
    return config_dir() / f"{PRIMARY_NAME}.yaml"
