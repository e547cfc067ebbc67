"""A finished run's records for the statistics of :mod:`lmas.metrics.stats`: its results.json, its
per-example outcomes (``per_example/*.npz``), and :class:`Slot`, one agent's outcomes ready to recompute
its metrics on reweighted test items."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmas.data.task import TOKEN_WEIGHTED
from lmas.metrics.knowledge import KnowledgeMatrix


@dataclass
class RunRecords:
    """A finished run: its results.json and, when it has them, its per-example records.

    ``initial``: task (``"<row>/<task>"`` with several bases) -> outcomes of the untrained model; ``rounds``:
    round -> ``"<agent>/<task>"`` -> outcomes (the ``population`` row's too, where a topology answers).
    Outcomes per test item (fixed order): ``(N,)`` 1/0 for accuracy and exact match, the item's score in
    ``[0, 1]`` for ROUGE-L (a mean like the others), ``(N, 2)`` (a sum over the item's tokens, its token count)
    for the token-weighted metrics (:data:`lmas.data.task.TOKEN_WEIGHTED`: the NLL sum for perplexity and
    pseudo-perplexity, the hits for masked accuracy). ``None`` without records.
    """

    path: Path
    results: dict
    initial: dict[str, np.ndarray] | None = None
    rounds: dict[int, dict[str, np.ndarray]] | None = None

    @property
    def agent(self) -> str:
        """The agent compared by default: the first of results.json ``metrics`` (as lmas-compare)."""
        metrics = self.results.get("metrics") or {}
        if not metrics:
            raise ValueError(f"{self.path}/results.json: no `metrics` (no agent to compare)")
        return next(iter(metrics))

    def metric(self, key: str, agent: str | None = None) -> float:
        """results.json's value of ``key`` for ``agent`` (NaN when the run lacks it)."""
        value = self.results["metrics"].get(agent or self.agent, {}).get(key)
        return math.nan if value is None else float(value)

    def outcomes(self, round_idx: int, agent: str, task: str) -> np.ndarray:
        """``(N,)`` per-item scores of ``agent`` on an accuracy, exact-match or ROUGE-L ``task`` after ``round_idx``,
        checked against the run's matrix (any agent of the matrix, also one that trained nothing, e.g. a merge)."""
        where = f"{self.path}/per_example/round{round_idx:03d}.npz"
        if not self.rounds or round_idx not in self.rounds:
            raise ValueError(f"{where}: no such per-example record (rounds: {sorted(self.rounds or {})})")
        key = f"{agent}/{task}"
        if key not in self.rounds[round_idx]:
            raise ValueError(f"{where}: no array {key!r}")
        x = np.asarray(self.rounds[round_idx][key], dtype=float)
        m = self.results["matrix"]
        stored = m["values"][round_idx][m["agents"].index(agent)][m["tasks"].index(task)]
        if x.ndim != 1 or not math.isclose(float(x.mean()), stored, rel_tol=1e-4, abs_tol=1e-6):
            raise ValueError(f"{where}: {key} gives {x.mean()} (shape {x.shape}) but the matrix has {stored}")
        return x


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable .npz of per-example outcomes ({err})") from err


def load_run(path: str | os.PathLike, items: bool = True) -> RunRecords:
    """Read ``<path>/results.json`` and, if ``items`` and present, ``<path>/per_example/*.npz``."""
    run = Path(path)
    res_file = run / "results.json"
    if not res_file.is_file():
        raise ValueError(f"{run}: no results.json (expected a finished lmas run directory)")
    try:
        results = json.loads(res_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{res_file}: not valid JSON ({err})") from err
    if "matrix" not in results:
        raise ValueError(f"{res_file}: no `matrix` (the knowledge matrix the metrics come from)")
    rec = RunRecords(run, results)
    folder = run / "per_example"
    if items and folder.is_dir():
        init = folder / "initial.npz"
        rec.initial = _read_npz(init) if init.is_file() else {}
        rec.rounds = {}
        for f in sorted(folder.glob("round*.npz")):
            digits = f.stem[len("round") :]
            if not digits.isdigit():
                raise ValueError(f"{f}: expected per-example files named round<rrr>.npz (e.g. round000.npz)")
            rec.rounds[int(digits)] = _read_npz(f)
    return rec


class Slot:
    """One agent of one run, ready to recompute its metrics on reweighted test items.

    ``x[task]``: ``(N, E, c)`` outcomes per item for the entries ``E = 1 + rounds`` (the initial
    value, then each round) and components ``c`` (1: correct; 2: NLL sum, tokens), NaN where the
    matrix has no value. ``summaries(w)`` writes the values under item weights ``w`` into a copy of
    the run's matrix and calls :meth:`KnowledgeMatrix.summary`.
    """

    def __init__(self, run: RunRecords, agent: str | None = None) -> None:
        if run.rounds is None or run.initial is None:
            raise ValueError(
                f"{run.path}: no per_example/ records next to results.json; item-level statistics need them "
                "(runs made before per-example records cannot be resampled over test items)"
            )
        self.run, self.agent = run, agent or run.agent
        self.km = KnowledgeMatrix.from_dict(run.results["matrix"])
        km = self.km
        if self.agent not in km.agents:
            raise ValueError(f"{run.path}: agent {self.agent!r} not in the run's matrix (agents: {km.agents})")
        self.tasks = list(km.training_rounds(self.agent))
        if not self.tasks:
            raise ValueError(f"{run.path}: agent {self.agent!r} trained no task; it has no CL metrics")
        self.tasks += km.probes  # the general-ability probes, resampled like the trained tasks
        self.a = km.agents.index(self.agent)
        self.cols = [km.tasks.index(t) for t in self.tasks]
        self.pool = [TOKEN_WEIGHTED.get(km.metrics[t], "") for t in self.tasks]  # "exp" | "ratio" | "" (a mean)
        values, initial = km.values(), km.initial()
        self.x: dict[str, np.ndarray] = {}
        for t, j, pool in zip(self.tasks, self.cols, self.pool, strict=True):
            wanted = [initial[self.a, j]] + [values[r, self.a, j] for r in range(km.n_rounds)]
            own = f"{self.agent}/{t}"  # several bases: the untrained model of the row's own base
            where = [("initial.npz", own if own in (run.initial or {}) else t, run.initial)] + [
                (f"round{r:03d}.npz", f"{self.agent}/{t}", run.rounds.get(r, {})) for r in range(km.n_rounds)
            ]
            cols: list[np.ndarray | None] = []
            for (fname, key, arrays), value in zip(where, wanted, strict=True):
                arr = arrays.get(key)
                if arr is None:
                    if not math.isnan(value):
                        raise ValueError(
                            f"{run.path}/per_example/{fname}: no array {key!r}, but the matrix has "
                            f"a value for it ({value})"
                        )
                    cols.append(None)
                    continue
                cols.append(self._outcomes(arr, bool(pool), f"{run.path}/per_example/{fname}[{key!r}]"))
            sizes = {len(c) for c in cols if c is not None}
            if len(sizes) != 1:
                raise ValueError(
                    f"{run.path}/per_example: task {t!r} has different item counts across files "
                    f"{sorted(sizes)} (or none at all)"
                )
            (n,) = sizes
            c = 2 if pool else 1
            self.x[t] = np.stack([np.full((n, c), np.nan) if v is None else v for v in cols], axis=1)
        self._check(initial, values)

    @staticmethod
    def _outcomes(arr: np.ndarray, weighted: bool, where: str) -> np.ndarray:
        """Per-item outcomes as ``(N, c)`` floats; a wrong shape is an error naming the array."""
        a = np.asarray(arr, dtype=float)
        if weighted and (a.ndim != 2 or a.shape[1] != 2):
            why = "a perplexity or masked-accuracy task needs (N, 2) = (sum over tokens, tokens) per item"
            raise ValueError(f"{where}: {why}, got {a.shape}")
        if not weighted and a.ndim != 1:
            raise ValueError(f"{where}: an accuracy/exact-match/ROUGE-L task needs (N,) scores per item, got {a.shape}")
        if len(a) == 0:
            raise ValueError(f"{where}: no test items")
        return a if weighted else a[:, None]

    @property
    def sizes(self) -> dict[str, int]:
        """Test items per trained task."""
        return {t: len(x) for t, x in self.x.items()}

    def entries(self, w: Mapping[str, np.ndarray]) -> np.ndarray:
        """``(B, E, T)``: every entry's value under item weights ``w[task]`` of shape ``(B, N)``."""
        out = []
        for t, pool in zip(self.tasks, self.pool, strict=True):
            x, wt = self.x[t], np.asarray(w[t], dtype=float)
            n, E, c = x.shape
            sums = (wt @ x.reshape(n, E * c)).reshape(len(wt), E, c)
            with np.errstate(invalid="ignore", divide="ignore"):
                ratio = sums[..., 0] / (sums[..., 1] if pool else wt.sum(1)[:, None])
                out.append(np.exp(ratio) if pool == "exp" else ratio)
        return np.stack(out, axis=-1)

    def summaries(self, w: Mapping[str, np.ndarray], keys: Sequence[str]) -> np.ndarray:
        """``(B, len(keys))``: :meth:`KnowledgeMatrix.summary` of the agent under each row of weights."""
        vals = self.entries(w)
        km, a, cols = self.km, self.a, self.cols
        out = np.full((len(vals), len(keys)), np.nan)
        for b, v in enumerate(vals):
            # the agent's trained columns of the run's own matrix, overwritten in place: summary() then
            # reads exactly what it read for results.json (KnowledgeMatrix has no public bulk setter)
            km._initial[a, cols] = v[0]
            km._values[:, a, cols] = v[1:]
            s = km.summary(self.agent)
            out[b] = [s.get(k, math.nan) for k in keys]
        return out

    def _check(self, initial: np.ndarray, values: np.ndarray) -> None:
        """The records on all items must give the matrix's values (they belong to this run, in order)."""
        full = self.entries({t: np.ones((1, n)) for t, n in self.sizes.items()})[0]
        stored = np.concatenate([initial[None, self.a, self.cols], values[:, self.a, self.cols]], axis=0)
        bad = ~np.isclose(full, stored, rtol=1e-4, atol=1e-6, equal_nan=True)
        if bad.any():
            e, j = (int(i) for i in np.argwhere(bad)[0])
            where = "initial" if e == 0 else f"round {e - 1}"
            raise ValueError(
                f"{self.run.path}/per_example: {where} {self.agent}/{self.tasks[j]} gives {full[e, j]} from the "
                f"records but the matrix has {stored[e, j]}; the records do not belong to this run"
            )
