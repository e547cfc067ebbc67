"""TensorBoard and MLflow trackers: local files under the run dir, no server, no account.

Both carry what :class:`lmas.tracking.trackers.Tracker` gets, under the same keys:

* scalars ``train/<agent>/loss`` against ``step`` and every round key (``eval/…``, ``cl/…``,
  ``comm/…``, ``similarity/…``, …) against ``round``: each key is its own series, so its x axis is
  the axis it was logged on (``step`` = the training step, or the round number);
* the knowledge matrix of round r (``knowledge_table``: round, agent, task, metric, value, trained):
  TensorBoard, a markdown table as text at step r; MLflow, the artifact
  ``knowledge_table/roundRRR.csv``;
* the heatmap (TensorBoard image at step r; MLflow artifact ``knowledge_matrix/roundRRR/…png``) and,
  MLflow only, every adapter version as the artifact ``<name>/<alias>/`` with a ``metadata.json``
  that lists its parents (lineage).

MLflow names may hold only letters, digits and ``_ - . / : space``; any other character becomes
``_`` (:func:`mlflow_key`: ``similarity/a0~a1/weights`` → ``similarity/a0_a1/weights``).
A failing tracker (unwritable dir, broken store) logs a warning and turns itself off; training goes on.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmas.tracking.trackers import Tracker

log = logging.getLogger(__name__)

_MLFLOW_BAD = re.compile(r"[^\w.\-/: ]")


def mlflow_key(key: str) -> str:
    """``key`` with every character MLflow refuses in a metric or param name replaced by ``_``."""
    return _MLFLOW_BAD.sub("_", key)


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-markdown table (TensorBoard's text plugin renders it); floats with 4 decimals."""

    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(map(str, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def csv_text(columns: list[str], rows: list[list[Any]]) -> str:
    """The table as CSV text (header line first)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return buf.getvalue()


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` → ``{"a.b": "1"}`` (lists stay one value, as their JSON)."""
    out: dict[str, str] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


class _SafeTracker(Tracker):
    """A tracker whose every call is guarded: the first failure is logged and turns it off."""

    label = "tracker"

    def __init__(self) -> None:
        self.on = False

    def _safe(self, what: str, fn: Callable[[], None]) -> None:
        if not self.on:
            return
        try:
            fn()
        except Exception as err:  # a tracker must never stop training
            log.warning(
                "%s %s failed (%s); %s logging is off for the rest of the run", self.label, what, err, self.label
            )
            self.on = False


class TensorBoardTracker(_SafeTracker):
    """TensorBoard event files in ``<run_dir>/<subdir>`` (``tensorboard --logdir <run dir>``)."""

    label = "TensorBoard"

    def __init__(self, subdir: str = "tensorboard", flush_secs: int = 30) -> None:
        super().__init__()
        self.subdir = subdir
        self.flush_secs = flush_secs
        self.writer: Any = None

    def start(self, run_dir: Path, config: dict, name: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / self.subdir), flush_secs=self.flush_secs)
            self.on = True
        except Exception as err:
            log.warning(
                "TensorBoard could not start in %s (%s); continuing without TensorBoard",
                Path(run_dir) / self.subdir,
                err,
            )
            self.on = False
            return
        self._safe(
            "config",
            lambda: self.writer.add_text(
                "config", "```json\n" + json.dumps(config, indent=2, default=str) + "\n```", 0
            ),
        )

    def log(self, metrics: dict[str, float], step_key: str, step: int) -> None:
        def _do() -> None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, float(value), global_step=step)

        self._safe("log", _do)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        def _do() -> None:
            self.writer.add_text(key, markdown_table(list(columns), [list(r) for r in rows]), global_step=step)
            self.writer.flush()  # once a round: a crashed run keeps its rounds

        self._safe("table", _do)

    def log_image(self, key: str, path: Path, step: int) -> None:
        def _do() -> None:
            import matplotlib.image

            self.writer.add_image(key, matplotlib.image.imread(str(path)), global_step=step, dataformats="HWC")

        self._safe("image", _do)

    def finish(self) -> None:
        self._safe("finish", lambda: self.writer.close())
        self.on = False


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a ``sqlite:///<path>`` database
    (``<dir of path>/mlartifacts``), since MLflow's default for database stores is ``./mlruns`` in
    the current directory; ``None`` (MLflow's default, inside the store) for file stores."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///") :]).expanduser().resolve().parent / "mlartifacts").as_uri()


class MLflowTracker(_SafeTracker):
    """An MLflow run in a local store: ``file:<run_dir>/mlruns`` unless ``tracking_uri`` says otherwise.

    View it with ``mlflow ui --backend-store-uri file:<run dir>/mlruns``. MLflow 3 keeps the file
    store in maintenance mode and refuses it unless ``MLFLOW_ALLOW_FILE_STORE=true``, which this
    tracker sets for ``file:`` URIs; ``tracking_uri=sqlite:///<path>/mlflow.db`` uses MLflow's
    database store instead (a few seconds to create the tables).
    """

    label = "MLflow"

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "lmas",
        tags: dict | None = None,
        log_adapters: bool = True,
    ) -> None:
        super().__init__()
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.tags = {k: str(v) for k, v in (tags or {}).items() if v is not None}
        self.log_adapters = log_adapters
        self.client: Any = None
        self.run_id: str | None = None

    def start(self, run_dir: Path, config: dict, name: str) -> None:
        uri = self.tracking_uri or f"file:{Path(run_dir).resolve() / 'mlruns'}"
        try:
            if uri.startswith("file:") or "://" not in uri:
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(uri)
            exp = self.client.get_experiment_by_name(self.experiment)
            exp_id = (
                exp.experiment_id
                if exp
                else self.client.create_experiment(self.experiment, artifact_location=artifact_root(uri))
            )
            self.run_id = self.client.create_run(exp_id, run_name=name, tags=self.tags).info.run_id
            self.on = True
        except Exception as err:
            log.warning("MLflow could not start with tracking_uri=%s (%s); continuing without MLflow", uri, err)
            self.on = False
            return
        self._safe("config", lambda: self._log_config(config))

    def _log_config(self, config: dict) -> None:
        from mlflow.entities import Param

        self.client.log_dict(self.run_id, config, "config.json")
        params = {mlflow_key(k)[:250]: v[:6000] for k, v in flatten(config).items()}  # MLflow's limits
        batch = [Param(k, v) for k, v in params.items()]
        try:
            for i in range(0, len(batch), 100):  # at most 100 params a batch
                self.client.log_batch(self.run_id, params=batch[i : i + 100])
        except Exception as err:  # the config is in config.json all the same
            log.warning("MLflow: the config's params were not all logged (%s); see the artifact config.json", err)

    def log(self, metrics: dict[str, float], step_key: str, step: int) -> None:
        def _do() -> None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [Metric(mlflow_key(k), float(v), now, int(step)) for k, v in metrics.items()]
            for i in range(0, len(batch), 1000):  # MLflow takes at most 1000 metrics a batch
                self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

        self._safe("log", _do)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        self._safe(
            "table",
            lambda: self.client.log_text(
                self.run_id, csv_text(list(columns), [list(r) for r in rows]), f"{mlflow_key(key)}/round{step:03d}.csv"
            ),
        )

    def log_image(self, key: str, path: Path, step: int) -> None:
        self._safe(
            "image", lambda: self.client.log_artifact(self.run_id, str(path), f"{mlflow_key(key)}/round{step:03d}")
        )

    def log_artifact(
        self,
        path: Path,
        name: str,
        kind: str,
        metadata: dict,
        aliases: list[str] | None = None,
        parents: list[str] | None = None,
    ) -> None:
        if not self.log_adapters:
            return
        where = f"{mlflow_key(name)}/{mlflow_key((aliases or ['latest'])[0])}"

        def _do() -> None:
            self.client.log_artifact(self.run_id, str(path), where)
            self.client.log_dict(
                self.run_id,
                {**metadata, "kind": kind, "aliases": list(aliases or []), "parents": list(parents or [])},
                f"{where}/metadata.json",
            )

        self._safe("artifact", _do)

    def finish(self) -> None:
        self._safe("finish", lambda: self.client.set_terminated(self.run_id, "FINISHED"))
        self.on = False
