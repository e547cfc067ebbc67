"""Confidence intervals of the continual-learning metrics: over runs (t-interval), over test items
(a stratified :func:`scipy.stats.bootstrap` of :class:`Slot` summaries), and Holm's correction
(docs/statistics.md; :mod:`lmas.metrics.stats` compares runs with them)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.stats

from lmas.metrics.records import RunRecords, Slot, load_run

KEYS: tuple[str, ...] = (
    "avg_acc", "forgetting", "bwt", "fwt", "plasticity", "avg_ppl", "ppl_forgetting", "ppl_bwt", "ppl_fwt",
    "probe_acc", "probe_forgetting", "probe_ppl", "probe_ppl_forgetting",
)  # fmt: skip


EQUAL = 1e-6
"""Run-level values closer than this (relative to their size) are equal: the knowledge matrix holds float32 values,
so one accuracy reached along two paths differs by ~1e-8, and a paired t on such differences would be all noise."""


@dataclass(frozen=True)
class Interval:
    """An estimate with its confidence interval.

    ``n``: the runs (or run pairs) behind a run-level interval, the test items behind an item-level
    one; ``method``: how it was computed; ``p``: for a difference, the two-sided p-value of "no
    difference" (NaN where not computed).
    """

    estimate: float
    low: float
    high: float
    n: int
    method: str
    p: float = math.nan

    def show(self, signed: bool = False, p: bool = False) -> str:
        """``0.512 [0.431, 0.590]`` (``signed``: ``+0.012 [-0.031, +0.055]``; ``p``: then ``p=0.412`` where known);
        the estimate alone where there is no interval (one run)."""
        f = "{:+.3f}" if signed else "{:.3f}"
        text = f.format(self.estimate)
        if not math.isnan(self.low):
            text += f" [{f.format(self.low)}, {f.format(self.high)}]"
        return text + (f" p={self.p:.3f}" if p and self.p == self.p else "")

    @property
    def resolved(self) -> bool:
        """Whether the interval excludes 0 (False when it is unknown)."""
        return bool(self.low > 0.0 or self.high < 0.0)


def run_interval(
    values: Sequence[float], confidence: float = 0.95, method: str = "t", seed: int = 0, n_resamples: int = 9999
) -> Interval:
    """A CI for the mean of run-level ``values`` (one per seed x order), and the p-value of mean 0.

    ``method="t"`` (default): Student's t-interval and one-sample t-test (:func:`scipy.stats.ttest_1samp`;
    on paired differences this is the paired t-test); ``"bootstrap"``: :func:`scipy.stats.bootstrap`
    percentile interval (no p-value). One value: no interval (NaN); equal values (up to :data:`EQUAL`): a zero-width
    one, with p = 1 at 0 and NaN otherwise (not a test: a t statistic needs a spread).
    """
    if method not in ("t", "bootstrap"):
        raise ValueError(f"run_interval: method must be 't' or 'bootstrap', got {method!r}")
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    n = len(x)
    if n == 0:
        raise ValueError("run_interval: no values (every run lacks this metric)")
    mean = float(x.mean())
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1, "one run: no interval")
    if np.ptp(x) <= EQUAL * max(1.0, float(np.abs(x).max())):
        # equal up to float32 rounding (the matrix's precision): a t statistic of that spread would be noise
        return Interval(mean, mean, mean, n, f"{n} equal values", 1.0 if abs(mean) <= EQUAL else math.nan)
    if method == "t":
        res = scipy.stats.ttest_1samp(x, 0.0)
        ci = res.confidence_interval(confidence)
        return Interval(mean, float(ci.low), float(ci.high), n, f"t, {n} runs", float(res.pvalue))
    boot = scipy.stats.bootstrap(
        (x,), np.mean, n_resamples=n_resamples, confidence_level=confidence, method="percentile",
        rng=np.random.default_rng(seed),
    )  # fmt: skip
    ci = boot.confidence_interval
    return Interval(mean, float(ci.low), float(ci.high), n, f"bootstrap over {n} runs")


def ratio_interval(a: Sequence[float], b: Sequence[float], confidence: float = 0.95, unit: str = "run") -> Interval:
    """A CI for ``mean(a) / mean(b)`` over paired run-level values (Fieller's theorem, Student's t).

    The interval is every ratio ``R`` that the paired t-test of ``a - R * b`` does not reject: the
    roots of ``(ā - R b̄)² = t² (V_aa - 2R V_ab + R² V_bb)`` (``V``: the (co)variances of the means,
    ``t``: the two-sided quantile with ``n - 1`` degrees of freedom). It excludes 0 exactly when the t-test
    of ``a`` rejects (``p`` is that test's), so a gap closure and the paired difference it divides agree. Where
    ``b̄`` itself is not resolved from 0 (``b̄² <= t² V_bb``) the set is unbounded: ``(-inf, inf)``. ``unit`` names
    one pair in the method text (``"run"``, ``"run triple"``).
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"ratio_interval: a and b must be paired 1-d values, got shapes {x.shape} and {y.shape}")
    n = len(x)
    est = float(x.mean() / y.mean()) if y.mean() != 0 else math.nan
    if n < 2:
        return Interval(est, math.nan, math.nan, n, f"one {unit}: no interval")
    label = f"Fieller (t), {n} {unit}s"
    p = run_interval(x.tolist(), confidence).p
    cov = np.cov(x, y, ddof=1) / n
    t2 = float(scipy.stats.t.ppf(0.5 + confidence / 2, n - 1)) ** 2
    qa = y.mean() ** 2 - t2 * cov[1, 1]
    qb = x.mean() * y.mean() - t2 * cov[0, 1]
    qc = x.mean() ** 2 - t2 * cov[0, 0]
    if not qa > 0:
        return Interval(est, -math.inf, math.inf, n, f"{label}: unbounded (the denominator is not resolved from 0)", p)
    root = math.sqrt(max(qb * qb - qa * qc, 0.0))  # >= 0 when qa > 0: R = est satisfies the inequality
    return Interval(est, float((qb - root) / qa), float((qb + root) / qa), n, label, p)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN and does not count in the family).

    scipy has only FDR control (``false_discovery_control``), statsmodels is not a dependency:
    sorted ascending, ``adj_(i) = max_{j<=i} min(1, (m - j + 1) p_(j))`` for ``i = 1..m``.
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    order = ok[np.argsort(p[ok], kind="stable")]
    running = 0.0
    for i, k in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[k]))
        out[k] = running
    return out.tolist()


def _weights(idx: Sequence[np.ndarray], sizes: Sequence[int]) -> tuple[list[np.ndarray], tuple[int, ...]]:
    """Item index samples (any batch shape ``(..., m)``) -> item counts ``(M, N)`` per task, batch shape."""
    batch = np.broadcast_shapes(*(np.shape(i)[:-1] for i in idx))
    M = int(np.prod(batch, dtype=int))
    out = []
    for i, n in zip(idx, sizes, strict=True):
        flat = np.broadcast_to(i, (*batch, np.shape(i)[-1])).reshape(M, -1).astype(np.int64)
        rows = np.arange(M)[:, None] * n
        out.append(np.bincount((rows + flat).ravel(), minlength=M * n).reshape(M, n).astype(float))
    return out, batch


def _digests(slot: Slot) -> dict[str, str]:
    """``{task: test_digest}`` of the slot's run (runs written before lmas recorded it have none)."""
    return {t["name"]: t["test_digest"] for t in slot.run.results.get("tasks") or [] if "test_digest" in t}


def item_bootstrap(
    slots: Sequence[Slot],
    keys: Sequence[str],
    combine: Callable[[np.ndarray], np.ndarray],
    *,
    n_resamples: int,
    confidence: float,
    seed: int,
    method: str,
) -> tuple[dict[str, float], Any]:
    """Point values ``{key: value}`` (the keys the agents have) and the :func:`scipy.stats.bootstrap`
    result (same key order) of ``combine(per-slot summaries)``.

    ``combine`` maps ``(slots, B, K)`` to ``(B, K)``. The items of every task form one sample
    (``paired=False``: each task is resampled on its own, a stratified bootstrap); every slot gets
    the same items, so runs stay paired.
    """
    sizes, digests = slots[0].sizes, _digests(slots[0])
    for s in slots[1:]:
        if s.sizes != sizes:
            raise ValueError(
                f"{s.run.path} and {slots[0].run.path} are not paired item by item: test items per trained task "
                f"{s.sizes} vs {sizes} (same stream, same test set needed)"
            )
        other = _digests(s)
        differ = sorted(t for t in digests.keys() & other.keys() if digests[t] != other[t])
        if differ:
            raise ValueError(
                f"{s.run.path} and {slots[0].run.path} are not paired item by item: the test items of {differ} "
                "differ (results.json tasks[].test_digest; same test set needed)"
            )
    tasks = list(sizes)

    def stat(W: list[np.ndarray], keys: Sequence[str]) -> np.ndarray:
        w = dict(zip(tasks, W, strict=True))
        return combine(np.stack([s.summaries(w, keys) for s in slots]))

    point = stat([np.ones((1, sizes[t])) for t in tasks], keys)[0]
    keys = [k for k, v in zip(keys, point, strict=True) if not math.isnan(v)]  # those the agents have
    if not keys:
        raise ValueError(f"{slots[0].run.path}: agent {slots[0].agent!r} has none of the metrics asked for")

    def statistic(*idx: np.ndarray, axis: int = -1) -> np.ndarray:
        W, batch = _weights(idx, [sizes[t] for t in tasks])
        return stat(W, keys).T.reshape(len(keys), *batch)

    res = scipy.stats.bootstrap(
        tuple(np.arange(sizes[t]) for t in tasks), statistic, n_resamples=n_resamples, batch=500,
        vectorized=True, paired=False, confidence_level=confidence, method=method, rng=np.random.default_rng(seed),
    )  # fmt: skip
    return {k: float(v) for k, v in zip(keys, point[~np.isnan(point)], strict=True)}, res


def _boot_p(dist: np.ndarray) -> float:
    """Two-sided p-value of 0 from a bootstrap distribution: twice the smaller tail, ``(1 + #) / (B + 1)``."""
    d = dist[~np.isnan(dist)]
    lo, hi = (1 + np.sum(d <= 0.0)) / (len(d) + 1), (1 + np.sum(d >= 0.0)) / (len(d) + 1)
    return float(min(1.0, 2 * min(lo, hi)))


def bootstrap_intervals(point: dict[str, float], res: Any, n: int, label: str, with_p: bool) -> dict[str, Interval]:
    """``{key: Interval}`` from :func:`item_bootstrap`'s result (p-values of 0 if ``with_p``)."""
    lows, highs = np.atleast_1d(res.confidence_interval.low), np.atleast_1d(res.confidence_interval.high)
    dist = res.bootstrap_distribution.reshape(len(point), -1)
    return {
        k: Interval(v, float(lows[i]), float(highs[i]), n, label, _boot_p(dist[i]) if with_p else math.nan)
        for i, (k, v) in enumerate(point.items())
    }


def item_mean_difference(diffs: Sequence[np.ndarray], resamples: int = 4999, seed: int = 0) -> Interval:
    """Mean over runs and strata (tasks) of paired per-item differences, with a percentile bootstrap that resamples
    each stratum's test items (the same resampled items in every run: the runs share the test set) and its
    two-sided p-value. ``diffs``: per stratum a ``(runs, N)`` array of (A − B) outcomes on the same items."""
    D = [np.atleast_2d(np.asarray(d, dtype=float)) for d in diffs]
    if not D or len({d.shape[0] for d in D}) != 1:
        raise ValueError(f"item_mean_difference: need per-stratum arrays of the same runs, got {[d.shape for d in D]}")

    def statistic(*idx: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.mean([d[:, i].mean(-1).mean(0) for d, i in zip(D, idx, strict=True)], axis=0)

    samples = tuple(np.arange(d.shape[1]) for d in D)
    n = sum(d.shape[1] for d in D)
    label = f"paired item bootstrap, {D[0].shape[0]} run(s), {n} items"
    if all(not d.any() for d in D):  # the same outcome on every item of every run: nothing to resample
        return Interval(0.0, 0.0, 0.0, n, label + " (identical answers)", 1.0)
    res = scipy.stats.bootstrap(samples, statistic, n_resamples=resamples, vectorized=True, paired=False,
                                method="percentile", rng=np.random.default_rng(seed))  # fmt: skip
    return bootstrap_intervals({"mean": float(statistic(*samples))}, res, n, label, True)["mean"]


def item_intervals(
    run: RunRecords | str | os.PathLike,
    agent: str | None = None,
    keys: Sequence[str] = KEYS,
    *,
    n_resamples: int = 4999,
    confidence: float = 0.95,
    seed: int = 0,
    method: str = "percentile",
) -> dict[str, Interval]:
    """CIs of one run's metrics over its test items (bootstrap, tasks resampled separately).

    ``{key: Interval}`` for the keys the agent has. ``method``: scipy's ``percentile`` (default),
    ``basic`` or ``BCa``; ``seed`` fixes the resamples.
    """
    rec = run if isinstance(run, RunRecords) else load_run(run)
    slot = Slot(rec, agent)
    point, res = item_bootstrap(
        [slot], keys, lambda v: v[0], n_resamples=n_resamples, confidence=confidence, seed=seed, method=method
    )
    n = sum(slot.sizes.values())
    return bootstrap_intervals(point, res, n, f"items: {method} bootstrap, {n} items, {n_resamples} resamples", False)


def run_intervals(
    runs: Sequence[RunRecords], agent: str | None = None, keys: Sequence[str] = KEYS, confidence: float = 0.95
) -> dict[str, Interval]:
    """CIs of the mean over runs (seeds x orders) of each metric in results.json (t-interval)."""
    out = {}
    for k in keys:
        vals = [r.metric(k, agent) for r in runs]
        if any(not math.isnan(v) for v in vals):
            out[k] = run_interval(vals, confidence)
    return out
