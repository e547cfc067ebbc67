"""Experiment trackers: W&B (offline by default) and a plain CSV file.

The loop talks to one :class:`Tracker`; ``logger=wandb`` and ``logger=csv`` choose the class.
Keys are ``<section>/<name>``: ``train/loss`` against ``step``, ``eval/<agent>/<task>`` and
``cl/<agent>/<metric>`` against ``round``.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class Tracker:
    """Records nothing; the base of the real trackers (and ``logger=none``)."""

    def start(self, run_dir: Path, config: dict, name: str) -> None:
        """Open the tracker for one run."""

    def log(self, metrics: dict[str, float], step_key: str, step: int) -> None:
        """Log scalar metrics at ``step`` of the axis ``step_key`` (``step`` or ``round``)."""

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """Log a table (the knowledge matrix)."""

    def log_image(self, key: str, path: Path, step: int) -> None:
        """Log a picture (the heatmap)."""

    def log_artifact(self, path: Path, name: str, kind: str, metadata: dict) -> None:
        """Log a file as a versioned artifact (adapters)."""

    def finish(self) -> None:
        """Close the tracker."""


class CSVTracker(Tracker):
    """Appends every scalar to ``<run_dir>/metrics.csv`` (columns: axis, step, key, value)."""

    def __init__(self, filename: str = "metrics.csv") -> None:
        self.filename = filename
        self._file = None
        self._writer = None

    def start(self, run_dir: Path, config: dict, name: str) -> None:
        self._file = open(Path(run_dir) / self.filename, "a", newline="")
        self._writer = csv.writer(self._file)
        if self._file.tell() == 0:
            self._writer.writerow(["axis", "step", "key", "value"])

    def log(self, metrics: dict[str, float], step_key: str, step: int) -> None:
        for key, value in metrics.items():
            self._writer.writerow([step_key, step, key, value])
        self._file.flush()

    def finish(self) -> None:
        if self._file:
            self._file.close()
            self._file = None


class WandbTracker(Tracker):
    """A W&B run for the whole continual run (``mode=offline`` needs no account or network).

    Upload an offline run later with ``wandb sync <run_dir>/wandb/offline-run-*``. A W&B failure
    (no writable dir, unreachable server) is logged and turns the tracker off; training goes on.
    """

    def __init__(
        self,
        project: str = "lmas",
        entity: str | None = None,
        mode: str = "offline",
        group: str | None = None,
        job_type: str | None = None,
        tags: list[str] | None = None,
    ) -> None:
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.mode={mode!r}: expected offline, online or disabled")
        self.kwargs = dict(project=project, entity=entity, mode=mode, group=group, job_type=job_type,
                           tags=list(tags) if tags else None)
        self.run = None

    def _safe(self, what: str, fn, *args, **kwargs) -> None:
        if self.run is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as err:  # a tracker must never stop training
            log.warning("W&B %s failed (%s); W&B logging is off for the rest of the run", what, err)
            self.run = None

    def start(self, run_dir: Path, config: dict, name: str) -> None:
        try:
            import wandb

            wandb_dir = Path(run_dir)
            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(dir=str(wandb_dir), config=config, name=name, reinit="finish_previous",
                                  **self.kwargs)
            self.run.define_metric("step")
            self.run.define_metric("round")
            self.run.define_metric("train/*", step_metric="step")
            for prefix in ("eval", "cl", "round_info"):
                self.run.define_metric(f"{prefix}/*", step_metric="round")
        except Exception as err:
            log.warning("W&B could not start (%s); continuing without W&B", err)
            self.run = None

    def log(self, metrics: dict[str, float], step_key: str, step: int) -> None:
        self._safe("log", lambda: self.run.log({**metrics, step_key: step}))

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        def _do():
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows), "round": step})

        self._safe("table", _do)

    def log_image(self, key: str, path: Path, step: int) -> None:
        def _do():
            import wandb

            self.run.log({key: wandb.Image(str(path)), "round": step})

        self._safe("image", _do)

    def log_artifact(self, path: Path, name: str, kind: str, metadata: dict) -> None:
        def _do():
            import wandb

            art = wandb.Artifact(name, type=kind, metadata=metadata)
            art.add_file(str(path))
            self.run.log_artifact(art)

        self._safe("artifact", _do)

    def finish(self) -> None:
        self._safe("finish", lambda: self.run.finish())
        self.run = None
