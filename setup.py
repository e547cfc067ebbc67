"""Build step of lmas: ship the repository's top-level ``conf/`` inside the package as ``lmas/conf/``.

The repository keeps ``conf/`` as the one source of the configs. A built package (``pip install .``,
``pip wheel .``, ``pip install <wheel or sdist>``) carries a copy of its ``*.yaml`` files as
``lmas/conf/``, so ``lmas-train`` finds them from any directory (:func:`lmas.confdir.config_dir`).
An editable install (``pip install -e .``, what ``make venv`` does) copies nothing and reads the
repository's ``conf/`` in place, so edits there need no reinstall. All metadata is in setup.cfg.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONF = Path(__file__).resolve().parent / "conf"  # the source of the configs
PACKAGED = ("lmas", "conf")  # where they go inside the built package


def conf_files(conf: Path = CONF) -> list[Path]:
    """Every config file of ``conf`` (``*.yaml`` at any depth), relative to it, sorted."""
    return sorted(p.relative_to(conf) for p in conf.rglob("*.yaml") if p.is_file())


class BuildPyWithConf(build_py):
    """``build_py`` that also copies ``conf/**/*.yaml`` to ``<build_lib>/lmas/conf/`` (not in editable mode)."""

    def _target(self) -> Path:
        return Path(self.build_lib, *PACKAGED)

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        if not (CONF / "train.yaml").is_file():
            raise FileNotFoundError(f"lmas build: no conf/train.yaml in {CONF}: build from the repository "
                                    "(or an sdist made from it), which holds the configs in conf/")
        target = self._target()
        shutil.rmtree(target, ignore_errors=True)  # a config deleted from conf/ must not survive in build/
        for rel in conf_files():
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(CONF / rel, target / rel)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if getattr(self, "editable_mode", False):
            return outputs
        return outputs + [str(self._target() / rel) for rel in conf_files()]


setup(cmdclass={"build_py": BuildPyWithConf})
