"""Experiment trackers: W&B (offline by default) and a plain CSV file.

The loop talks to one :class:`Tracker`; ``logger=wandb`` and ``logger=csv`` choose the class
(``logger=tensorboard`` and ``logger=mlflow``: :mod:`lmas.tracking.local_trackers`).
Keys are ``<section>/<name>``: ``train/<agent>/loss`` against ``step``; ``eval/<agent>/<task>``,
``cl/<agent>/<metric>``, ``comm/*``, ``similarity/<a>~<b>/{weights,predictions}``,
``transfer/<agent>/<event>_residual`` (a merge's relative truncation error of ΔW, 0 = exact) and the
``knowledge_matrix`` heatmap and ``knowledge_table`` table against ``round``. Adapter versions
are artifacts ``adapter-<agent>`` with the alias ``roundNNN`` and their parents (lineage, see
:mod:`lmas.tracking.lineage`).
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from wandb.sdk.wandb_run import Run

log = logging.getLogger(__name__)


class Tracker:
    """Records nothing; the base of the real trackers (and ``logger=none``)."""

    def start(self, run_dir: Path, config: dict, name: str) -> None:
        """Open the tracker for one run."""

    def log(self, metrics: dict[str, float], step_key: str, step: int) -> None:
        """Log scalar metrics at ``step`` of the axis ``step_key`` (``step`` or ``round``)."""

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """Log a table at round ``step`` (the knowledge matrix of a round)."""

    def log_image(self, key: str, path: Path, step: int) -> None:
        """Log a picture (the heatmap)."""

    def log_artifact(
        self,
        path: Path,
        name: str,
        kind: str,
        metadata: dict,
        aliases: list[str] | None = None,
        parents: list[str] | None = None,
    ) -> None:
        """Log a file as a new version of the artifact ``name`` (adapters).

        ``aliases``: extra names of this version (e.g. ``round003``); ``parents``: the versions it
        was made from, as ``"<artifact name>:<alias>"`` references to earlier calls (lineage).
        """

    def finish(self) -> None:
        """Close the tracker."""


class CSVTracker(Tracker):
    """Appends every scalar to ``<run_dir>/metrics.csv`` (columns: axis, step, key, value)."""

    def __init__(self, filename: str = "metrics.csv") -> None:
        self.filename = filename
        self._file: TextIO | None = None

    def start(self, run_dir: Path, config: dict, name: str) -> None:
        self._file = open(Path(run_dir) / self.filename, "a", newline="")
        if self._file.tell() == 0:
            csv.writer(self._file).writerow(["axis", "step", "key", "value"])

    def log(self, metrics: dict[str, float], step_key: str, step: int) -> None:
        if self._file is None:
            raise RuntimeError(f"CSVTracker.log before start(): {self.filename} is not open")
        writer = csv.writer(self._file)
        for key, value in metrics.items():
            writer.writerow([step_key, step, key, value])
        self._file.flush()

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """Nothing: the table's values are already in ``metrics.csv`` as ``eval/*`` scalars."""

    def finish(self) -> None:
        if self._file:
            self._file.close()
            self._file = None


class WandbTracker(Tracker):
    """A W&B run for the whole continual run (``mode=offline`` needs no account or network).

    Upload an offline run later with ``wandb sync <run_dir>/wandb/offline-run-*``. A W&B failure
    (no writable dir, unreachable server) is logged and turns the tracker off; training goes on.

    Sweeps: ``group`` and ``job_type`` (``conf/logger/wandb.yaml``: the experiment, else the
    stream; the strategy) let the W&B UI group a sweep's runs and compare strategies.

    Adapter lineage: every adapter version is an artifact ``adapter-<agent>`` (alias
    ``roundNNN``) whose metadata lists its ``parents``. W&B records *uses* of artifacts only
    online (``use_artifact`` refuses offline runs, and ``wandb sync`` cannot add them later), so
    online each version is logged by a short run of its own (``job_type="adapter"``, same group)
    that first uses the parent versions: W&B's lineage graph then shows, version by version, what
    was trained or merged from what. ``lineage_runs=false`` logs every version from the main run
    instead (one run that uses and produces them all). Offline, the parents are in the metadata
    and the run dir's ``report.html`` draws the graph.
    """

    def __init__(
        self,
        project: str = "lmas",
        entity: str | None = None,
        mode: str = "offline",
        group: str | None = None,
        job_type: str | None = None,
        tags: list[str] | None = None,
        lineage_runs: bool = True,
    ) -> None:
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.mode={mode!r}: expected offline, online or disabled")
        self.kwargs: dict[str, Any] = dict(
            project=project, entity=entity, mode=mode, group=group, job_type=job_type, tags=list(tags) if tags else None
        )
        self.lineage_runs = lineage_runs
        self.run: Run | None = None
        self._dir: Path | None = None
        self._logged: dict[str, Any] = {}  # "<name>:<alias>" -> the logged wandb.Artifact

    @property
    def online(self) -> bool:
        return self.run is not None and self.kwargs["mode"] == "online"

    def _safe(self, what: str, fn: Callable[[Run], object]) -> None:
        """``fn(run)`` on the open run; a failure turns W&B off (logged), never stops training."""
        if self.run is None:
            return
        try:
            fn(self.run)
        except Exception as err:  # a tracker must never stop training
            log.warning("W&B %s failed (%s); W&B logging is off for the rest of the run", what, err)
            self.run = None

    def start(self, run_dir: Path, config: dict, name: str) -> None:
        try:
            import wandb

            self._dir = Path(run_dir)
            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = run = wandb.init(
                dir=str(self._dir), config=config, name=name, reinit="finish_previous", **self.kwargs
            )
            run.define_metric("step")
            run.define_metric("round")
            run.define_metric("train/*", step_metric="step")
            for prefix in ROUND_PREFIXES:
                run.define_metric(f"{prefix}/*", step_metric="round")
            for key in ROUND_KEYS:
                run.define_metric(key, step_metric="round")
        except Exception as err:
            log.warning("W&B could not start (%s); continuing without W&B", err)
            self.run = None

    def log(self, metrics: dict[str, float], step_key: str, step: int) -> None:
        self._safe("log", lambda run: run.log({**metrics, step_key: step}))

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        def _do(run: Run) -> None:
            import wandb

            run.log({key: wandb.Table(columns=list(columns), data=[list(r) for r in rows]), "round": step})

        self._safe("table", _do)

    def log_image(self, key: str, path: Path, step: int) -> None:
        def _do(run: Run) -> None:
            import wandb

            run.log({key: wandb.Image(str(path)), "round": step})

        self._safe("image", _do)

    def _use(self, run: Run, parent: str) -> None:
        """``run`` uses the version ``parent`` (online only); a parent W&B cannot find is skipped."""
        try:
            run.use_artifact(self._logged.get(parent, parent))
        except Exception as err:
            log.warning("W&B: could not record the use of %s (%s); the lineage misses that edge", parent, err)

    def log_artifact(
        self,
        path: Path,
        name: str,
        kind: str,
        metadata: dict,
        aliases: list[str] | None = None,
        parents: list[str] | None = None,
    ) -> None:
        parents = list(parents or [])
        aliases = list(aliases or [])

        def _do(run: Run) -> None:
            import wandb

            art = wandb.Artifact(
                name,
                type=kind,
                metadata={**metadata, "parents": parents},
                description=f"from {', '.join(parents)}" if parents else None,
            )
            art.add_file(str(path))
            producer = run
            if self.online and self.lineage_runs:
                label = f":{aliases[0]}" if aliases else ""
                try:
                    producer = wandb.init(
                        dir=str(self._dir),
                        name=f"{run.name}/{name}{label}",
                        reinit="create_new",
                        config={"main_run": run.id},
                        **{**self.kwargs, "job_type": kind},
                    )
                except Exception as err:
                    log.warning(
                        "W&B: no run of its own for %s (%s); adapter versions are logged from the main run from now on",
                        name,
                        err,
                    )
                    self.lineage_runs = False
            try:
                if self.online:
                    for parent in parents:
                        self._use(producer, parent)
                logged = producer.log_artifact(art, aliases=["latest", *aliases])
                if self.online:
                    logged.wait()  # committed (has an id): later versions can use it
            finally:
                if producer is not run:
                    producer.finish()
            for a in aliases:
                self._logged[f"{name}:{a}"] = logged

        self._safe("artifact", _do)

    def finish(self) -> None:
        self._safe("finish", lambda run: run.finish())
        self.run = None


ROUND_PREFIXES = ("eval", "cl", "comm", "cascade", "similarity", "round_info")
ROUND_KEYS = ("knowledge_matrix", "knowledge_table")
