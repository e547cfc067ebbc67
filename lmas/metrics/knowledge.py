"""The knowledge matrix of a population: ``R[round, agent, task]``.

Every round, each agent (and any extra pseudo-agent such as ``"population"``, the fused answers of
the whole population) is evaluated on some or all tasks; unevaluated entries stay NaN. Which agent
trained which task in which round is recorded separately with :meth:`KnowledgeMatrix.mark_trained`,
so agents may train different tasks in different rounds, several tasks in one round, or nothing
at all. From the values of all rounds and these training records, :meth:`KnowledgeMatrix.summary`
computes every continual-learning metric of an agent with :func:`lmas.metrics.cl.run_metrics`
(formulas in :mod:`lmas.metrics.cl`): avg_acc on the final round, forgetting/BWT from the round in
which each task was last trained, FWT from the round before it was first trained.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from typing import Any, BinaryIO

import numpy as np

from lmas.data.task import HIGHER_IS_BETTER, METRICS
from lmas.metrics import cl

_FORMAT_VERSION = 1


def _to_json(a: np.ndarray) -> Any:
    """Nested lists of floats with NaN replaced by ``None``."""
    if a.ndim == 0:
        v = float(a)
        return None if math.isnan(v) else v
    return [_to_json(x) for x in a]


def _from_json(x: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`_to_json`, checked against ``shape``."""

    def conv(y: Any) -> Any:
        if isinstance(y, list):
            return [conv(z) for z in y]
        return math.nan if y is None else float(y)

    a = np.array(conv(x), dtype=float)
    if a.size == 0:
        a = a.reshape(shape)
    if a.shape != shape:
        raise ValueError(f"KnowledgeMatrix.from_dict: expected an array of shape {shape}, got {a.shape}")
    return a


class KnowledgeMatrix:
    """Metric values per round, agent and task, plus the initial (untrained) values.

    Args:
        agents: agent names (unique); pseudo-agents such as ``"population"`` are allowed.
        tasks: task names (unique), in stream order.
        metrics: task name -> one of :data:`lmas.data.task.METRICS` (``accuracy``, ``exact_match``, ``rouge_l``,
            ``perplexity``, ``pseudo_perplexity``, ``masked_accuracy``), for every task.
        probes: the tasks (of ``tasks``) that are general-ability probes: scored, never trained
            (:meth:`summary`'s ``probe_*`` keys).
    """

    def __init__(
        self, agents: list[str], tasks: list[str], metrics: dict[str, str], probes: Sequence[str] = ()
    ) -> None:
        self.agents = [str(a) for a in agents]
        self.tasks = [str(t) for t in tasks]
        for kind, names in (("agent", self.agents), ("task", self.tasks)):
            if not names:
                raise ValueError(f"KnowledgeMatrix: at least one {kind} is needed")
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"KnowledgeMatrix: {kind} names must be unique, repeated: {dup}")
        missing = [t for t in self.tasks if t not in metrics]
        if missing:
            raise ValueError(f"KnowledgeMatrix: no metric given for tasks {missing}")
        extra = sorted(set(metrics) - set(self.tasks))
        if extra:
            raise ValueError(f"KnowledgeMatrix: metrics given for unknown tasks {extra}")
        bad = {t: m for t, m in metrics.items() if m not in METRICS}
        if bad:
            raise ValueError(f"KnowledgeMatrix: unknown metrics {bad}, expected one of {METRICS}")
        self.metrics = {t: metrics[t] for t in self.tasks}
        self.probes = [str(p) for p in probes]
        unknown = [p for p in self.probes if p not in self.tasks]
        if unknown:
            raise ValueError(f"KnowledgeMatrix: probes {unknown} are not among the tasks {self.tasks}")
        self._a = {a: i for i, a in enumerate(self.agents)}
        self._t = {t: j for j, t in enumerate(self.tasks)}
        self._initial = np.full((len(self.agents), len(self.tasks)), np.nan)
        self._values = np.full((0, len(self.agents), len(self.tasks)), np.nan)
        self._trained: list[tuple[int, str, str]] = []  # (round, agent, task), in call order

    # ----------------------------------------------------------------- recording
    def _agent(self, agent: str) -> int:
        if agent not in self._a:
            raise KeyError(f"KnowledgeMatrix: unknown agent {agent!r}; known: {self.agents}")
        return self._a[agent]

    def _task(self, task: str) -> int:
        if task not in self._t:
            raise KeyError(f"KnowledgeMatrix: unknown task {task!r}; known: {self.tasks}")
        return self._t[task]

    def _round(self, round: int) -> int:
        if not isinstance(round, (int, np.integer)) or not 0 <= round < self.n_rounds:
            raise IndexError(f"KnowledgeMatrix: round {round!r} does not exist ({self.n_rounds} rounds started)")
        return int(round)

    @staticmethod
    def _value(value: float, where: str) -> float:
        v = float(value)
        if math.isinf(v):
            raise ValueError(f"KnowledgeMatrix: value for {where} is {v}; only finite values (or NaN) are stored")
        return v

    @property
    def n_rounds(self) -> int:
        """Number of rounds started so far."""
        return int(self._values.shape[0])

    def record_initial(self, agent: str, task: str, value: float) -> None:
        """Record the value of ``agent`` on ``task`` before any training (``b``)."""
        v = self._value(value, f"initial {agent}/{task}")
        self._initial[self._agent(agent), self._task(task)] = v

    def add_agent(self, agent: str) -> None:
        """Add an agent (e.g. one created by a merge) with NaN values so far."""
        agent = str(agent)
        if agent in self._a:
            raise ValueError(f"KnowledgeMatrix: agent {agent!r} already exists")
        self.agents.append(agent)
        self._a[agent] = len(self.agents) - 1
        self._initial = np.concatenate([self._initial, np.full((1, len(self.tasks)), np.nan)], axis=0)
        pad = np.full((self.n_rounds, 1, len(self.tasks)), np.nan)
        self._values = np.concatenate([self._values, pad], axis=1)

    def start_round(self) -> int:
        """Append a NaN row for every agent and task; return the new round's index."""
        row = np.full((1, len(self.agents), len(self.tasks)), np.nan)
        self._values = np.concatenate([self._values, row], axis=0)
        return self.n_rounds - 1

    def record(self, round: int, agent: str, task: str, value: float) -> None:
        """Record the value of ``agent`` on ``task`` at the end of ``round``."""
        r = self._round(round)
        self._values[r, self._agent(agent), self._task(task)] = self._value(value, f"round {r} {agent}/{task}")

    def mark_trained(self, round: int, agent: str, task: str) -> None:
        """Note that ``agent`` finished training on ``task`` in ``round`` (idempotent)."""
        entry = (self._round(round), agent, task)
        self._agent(agent)
        self._task(task)
        if entry not in self._trained:
            self._trained.append(entry)

    # ----------------------------------------------------------------- access
    def values(self) -> np.ndarray:
        """A copy of all values, shape ``(rounds, agents, tasks)``."""
        return self._values.copy()

    def initial(self) -> np.ndarray:
        """A copy of the initial values, shape ``(agents, tasks)``."""
        return self._initial.copy()

    def trained(self, agent: str | None = None) -> list[tuple[int, str, str]]:
        """Training events ``(round, agent, task)`` sorted by round (ties: call order)."""
        ev = [e for e in self._trained if agent is None or e[1] == agent]
        return sorted(ev, key=lambda e: e[0])

    def training_rounds(self, agent: str) -> dict[str, tuple[int, int]]:
        """``{task: (first, last)}``: the rounds in which ``agent`` first and last trained each task,
        ordered by the last one (ties: stream order). Empty for an agent that trained nothing."""
        self._agent(agent)
        out: dict[str, tuple[int, int]] = {}
        for r, _, t in self.trained(agent):
            out[t] = (out[t][0] if t in out else r, r)
        return dict(sorted(out.items(), key=lambda kv: (kv[1][1], self._t[kv[0]])))

    def summary(self, agent: str) -> dict[str, float]:
        """The continual-learning metrics of ``agent``: the one place they are computed.

        :func:`lmas.metrics.cl.run_metrics` (its module docstring has the table of formulas) over
        the agent's values in every round of the matrix (the final round is the last one: the
        values after every later merge or exchange), with the first and last training round of
        each task from :meth:`mark_trained`. Tasks scored by ``accuracy``, ``exact_match``, ``rouge_l`` or
        ``masked_accuracy`` (all in ``[0, 1]``, higher is better; ROUGE-L is kept ×1, not the papers' ×100) are
        pooled into ``avg_acc``, ``forgetting``, ``bwt``, ``fwt`` and ``plasticity``, as the papers average SuperNI's
        ROUGE-L with the classification tasks' accuracy; perplexity tasks (``perplexity``, an encoder agent's
        ``pseudo_perplexity``; lower is better, signs flipped) into ``avg_ppl``, ``ppl_forgetting``, ``ppl_bwt`` and
        ``ppl_fwt`` (a stream does not mix the two perplexities: the config check refuses it). A group is omitted
        when the agent trained no task of it; ``fwt``/``ppl_fwt`` when no task of the group was first trained after
        the agent's first training round or a value it needs was not evaluated. An agent that trained
        nothing (e.g. ``"population"`` without a topology answer) gets ``{}``. Probe tasks (never trained) add
        ``probe_acc`` and ``probe_forgetting`` (:meth:`_probe_summary`).
        results.json ``metrics``, the tracker's ``cl/*`` (``until(r).summary``: as they stood after
        round ``r``), the report, ``lmas-compare`` and ``experiments/tables.py`` all read this.
        """
        rounds = self.training_rounds(agent)
        if not rounds:
            return {}
        a = self._agent(agent)
        start = min(f for f, _ in rounds.values())
        out: dict[str, float] = {}
        for hib, keys in (
            (True, ("avg_acc", "forgetting", "bwt", "fwt", "plasticity")),
            (False, ("avg_ppl", "ppl_forgetting", "ppl_bwt", "ppl_fwt", None)),
        ):
            names = [t for t in rounds if HIGHER_IS_BETTER[self.metrics[t]] == hib]
            if not names:
                continue
            cols = [self._t[t] for t in names]
            try:
                m = cl.run_metrics(
                    self._values[:, a, cols],
                    self._initial[a, cols],
                    [rounds[t][0] for t in names],
                    [rounds[t][1] for t in names],
                    hib,
                    start,
                )
            except ValueError as e:
                raise ValueError(
                    f"KnowledgeMatrix.summary({agent!r}): {e}; row i is round i and task j is {names}[j]"
                ) from e
            for key, src in zip(keys, ("average", "forgetting", "bwt", "fwt", "plasticity"), strict=True):
                if key is not None and src in m:
                    out[key] = m[src]
        out.update(self._probe_summary(a))
        return out

    def _probe_summary(self, a: int) -> dict[str, float]:
        """Row ``a``'s general-ability probes (never trained): the final value and its loss since the untrained
        model, pooled like the trained tasks (``probe_acc``/``probe_forgetting``; perplexity probes:
        ``probe_ppl``/``probe_ppl_forgetting``, positive = got worse). A group's keys are omitted where a value
        was not evaluated."""
        out: dict[str, float] = {}
        if not self.n_rounds:
            return out
        for hib, (level, lost) in (
            (True, ("probe_acc", "probe_forgetting")),
            (False, ("probe_ppl", "probe_ppl_forgetting")),
        ):
            cols = [self._t[p] for p in self.probes if HIGHER_IS_BETTER[self.metrics[p]] == hib]
            final, initial = self._values[-1, a, cols], self._initial[a, cols]
            if not cols or np.isnan(final).any():
                continue
            out[level] = float(final.mean())
            if not np.isnan(initial).any():
                out[lost] = float(((initial - final) if hib else (final - initial)).mean())
        return out

    def summaries(self, partial: bool = False) -> dict[str, dict[str, float]]:
        """``{agent: summary(agent)}`` for every row of the matrix (results.json ``metrics``). ``partial`` (a run
        still going): ``{}`` for an agent whose last row is not :meth:`complete` yet (``eval.schedule=minimal``
        scores earlier tasks only after the last round); a finished run's summaries are never skipped."""
        return {a: self.summary(a) if not partial or self.complete(a) else {} for a in self.agents}

    def complete(self, agent: str) -> bool:
        """Whether the last round's row holds ``agent``'s value on every task it trained (what :meth:`summary`
        reads as the final values); False before any round."""
        if not self.n_rounds:
            return False
        a, last = self._agent(agent), self._values[-1]
        return all(not np.isnan(last[a, self._t[t]]) for t in self.training_rounds(agent))

    def until(self, round: int) -> KnowledgeMatrix:
        """A copy holding only rounds ``0..round`` (and the training events of those rounds).

        ``until(r).summary(agent)`` is the agent's metrics as they stood at the end of round ``r``
        (what the loop logged then): forgetting, BWT and FWT over time.
        """
        r = self._round(round)
        km = KnowledgeMatrix(self.agents, self.tasks, self.metrics, self.probes)
        km._initial = self._initial.copy()
        km._values = self._values[: r + 1].copy()
        km._trained = [e for e in self._trained if e[0] <= r]
        return km

    def summaries_over_rounds(self, agent: str) -> list[dict[str, float]]:
        """``[until(r).summary(agent) for every round r]``: the metrics at the end of each round."""
        self._agent(agent)
        return [self.until(r).summary(agent) for r in range(self.n_rounds)]

    # ----------------------------------------------------------------- I/O
    def to_dict(self) -> dict:
        """A JSON-safe dict (NaN -> ``None``); :meth:`from_dict` inverts it exactly."""
        return {
            "version": _FORMAT_VERSION,
            "agents": list(self.agents),
            "tasks": list(self.tasks),
            "metrics": dict(self.metrics),
            "initial": _to_json(self._initial),
            "values": _to_json(self._values),
            "trained": [[r, a, t] for r, a, t in self._trained],
            "probes": list(self.probes),
        }

    @classmethod
    def from_dict(cls, d: dict) -> KnowledgeMatrix:
        """Rebuild a matrix written by :meth:`to_dict`."""
        if d.get("version", _FORMAT_VERSION) != _FORMAT_VERSION:
            raise ValueError(f"KnowledgeMatrix.from_dict: unsupported version {d.get('version')!r}")
        km = cls(d["agents"], d["tasks"], d["metrics"], d.get("probes", ()))
        A, T = len(km.agents), len(km.tasks)
        km._initial = _from_json(d["initial"], (A, T))
        km._values = _from_json(d["values"], (len(d["values"]), A, T))
        for r, a, t in d.get("trained", []):
            km.mark_trained(int(r), a, t)
        return km

    def to_csv(self, path: str | os.PathLike) -> None:
        """Write the recorded (non-NaN) values in long format.

        Columns ``round,agent,task,metric,value``; initial values have ``round = -1``. Rows are
        ordered by round, then agent, then task (constructor order).
        """
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["round", "agent", "task", "metric", "value"])
            planes = [(-1, self._initial)] + [(r, self._values[r]) for r in range(self.n_rounds)]
            for r, plane in planes:
                for i, a in enumerate(self.agents):
                    for j, t in enumerate(self.tasks):
                        v = float(plane[i, j])
                        if not math.isnan(v):
                            w.writerow([r, a, t, self.metrics[t], repr(v)])

    def heatmap(self, path: str | os.PathLike | BinaryIO, agent: str | None = None, *, dpi: int = 100) -> None:
        """Save a PNG heatmap (matplotlib, Agg): rows = ``initial`` then the rounds, columns = tasks.

        One panel per agent (stacked vertically) when ``agent`` is None. Cells are annotated with
        their values; the colour shows how good a value is within its task (accuracy and exact
        match on a fixed ``[0, 1]`` scale, perplexity on a log scale from the column's worst to
        best), NaN cells are left blank, and cells where the agent trained that task in that
        round are outlined. The figure is ``figure_size(n_panels)`` inches at ``dpi``.
        """
        import matplotlib
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle

        names = self.agents if agent is None else [self.agents[self._agent(agent)]]
        # a bare Figure renders with Agg and leaves pyplot's global state and backend alone
        fig = Figure(figsize=self.figure_size(len(names)), dpi=dpi)
        axes = fig.subplots(len(names), 1, squeeze=False)
        cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="#eeeeee")
        for ax, name in zip(axes[:, 0], names, strict=True):
            a = self._a[name]
            data = np.concatenate([self._initial[a][None, :], self._values[:, a, :]], axis=0)
            score = self._goodness(data)
            ax.imshow(np.ma.masked_invalid(score), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
            for i in range(data.shape[0]):
                for j in range(data.shape[1]):
                    v = data[i, j]
                    if not math.isnan(v):
                        text = f"{v:.2f}" if HIGHER_IS_BETTER[self.metrics[self.tasks[j]]] else f"{v:.3g}"
                        dark = not math.isnan(score[i, j]) and not 0.15 <= score[i, j] <= 0.85
                        ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
            for r, _, t in self.trained(name):
                ax.add_patch(Rectangle((self._t[t] - 0.5, r + 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2))
            ax.set_xticks(range(len(self.tasks)))
            ax.set_xticklabels([f"{t}\n({self.metrics[t]})" for t in self.tasks], fontsize=7)
            ax.set_yticks(range(data.shape[0]))
            ax.set_yticklabels(["initial"] + [f"round {r}" for r in range(self.n_rounds)], fontsize=7)
            ax.set_title(name, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=dpi, format="png")

    def figure_size(self, n_panels: int = 1) -> tuple[float, float]:
        """Size in inches of the :meth:`heatmap` figure with ``n_panels`` panels."""
        width = max(4.0, 1.2 * len(self.tasks) + 2.0)
        height = n_panels * (0.4 * (self.n_rounds + 1) + 1.4)
        return width, height

    def _goodness(self, data: np.ndarray) -> np.ndarray:
        """Per-column colour score in ``[0, 1]`` (1 = best), NaN kept."""
        score = np.full(data.shape, np.nan)
        for j, t in enumerate(self.tasks):
            col = data[:, j]
            if HIGHER_IS_BETTER[self.metrics[t]]:
                score[:, j] = np.clip(col, 0.0, 1.0)
                continue
            ok = ~np.isnan(col) & (col > 0)
            if not ok.any():
                continue
            logs = np.log(col[ok])
            lo, hi = logs.min(), logs.max()
            score[ok, j] = 1.0 if hi == lo else (hi - logs) / (hi - lo)
        return score
