"""The federated study's table (experiments/populations/README.md), from its committed runs.

    python experiments/tables.py federated experiments/populations/federated

Each run is placed by the config it ran with (results.json ``config.loop``): its partition (IID, or the Dirichlet
α of the label skew) and its aggregator; ``loop=continual`` runs are centralised training on the pooled data, which
no partition changes. A run's score is its **mean client**: the mean over its agents of each agent's metric (after
FedAvg, FedProx and FedAvgM every client holds the global adapter, so this is the global model's; local-only
clients each hold their own, and a user of the federation gets one of them). Every method is compared with the
local-only baseline **of the same partition** (their clients train on the same shards), paired by seed (the seeds
resample the training data; the test items are the same in every run): the mean difference over the seeds with its
paired-t 95% CI and p-value, Holm-corrected over every comparison of the table (``lmas.metrics.stats``). Seeds a
method or the baseline lacks (a study in progress) are left out of that comparison; the runs column says how
many pairs it has.
"""

from __future__ import annotations

import math
from pathlib import Path

from lmas.compare import cost
from lmas.metrics.stats import NOT_RESOLVED, Interval, holm, load_run, pair_key_of, run_interval, verdict

LOCAL = "local"
CENTRALISED = "centralised"
KEYS = ("avg_acc", "forgetting")


def placement(results: dict, where: object) -> tuple[str | None, str]:
    """``(partition, method)`` of a run: ``(None, "centralised")`` for training on the pooled data."""
    loop = (results.get("config") or {}).get("loop") or {}
    if "aggregator" not in loop:
        if str(loop.get("_target_", "")).endswith("Federated"):
            raise SystemExit(f"{where}: a federated run without `config.loop.aggregator`")
        return None, CENTRALISED
    alpha = loop.get("alpha")
    return ("IID" if alpha is None else f"Dirichlet α={alpha}"), str(loop["aggregator"])


def mean_client(results: dict, key: str) -> float:
    """The mean over the run's agents of ``key`` (NaN when no agent has it)."""
    values = [m[key] for m in results["metrics"].values() if m.get(key) is not None]
    return float(sum(values) / len(values)) if values else math.nan


def federated(runs_dir: str) -> str:
    """The markdown table: per partition, the local-only baseline and each method's difference from it."""
    found = sorted(Path(runs_dir).glob("*/results.json"))
    if not found:
        raise SystemExit(f"{runs_dir}: no finished runs (*/results.json)")
    cells: dict[tuple[str | None, str], dict[tuple, dict]] = {}
    for f in found:
        res = load_run(f.parent, items=False).results
        cells.setdefault(placement(res, f.parent), {})[pair_key_of(res)] = res
    digests: dict[str, set[str]] = {}
    for c in cells.values():
        for r in c.values():
            for t in r["tasks"]:  # runs made before lmas recorded the digest are not checked
                if "test_digest" in t:
                    digests.setdefault(t["name"], set()).add(t["test_digest"])
    differ = sorted(t for t, d in digests.items() if len(d) > 1)
    if differ:
        raise SystemExit(f"{runs_dir}: the runs' test items differ on {differ} (test_digest); they cannot be paired")
    items = {sum(t.get("n_test", 0) for t in r["tasks"]) for c in cells.values() for r in c.values()}
    if len(items) > 1:
        raise SystemExit(f"{runs_dir}: the runs have different numbers of test items {sorted(items)}")
    partitions = sorted({p for p, _ in cells if p is not None}, key=lambda p: (p != "IID", p))
    missing = [p for p in partitions if (p, LOCAL) not in cells]
    if missing:
        raise SystemExit(f"{runs_dir}: no local-only baseline (loop.aggregator=local) for the partition(s) {missing}")
    order = {m: i for i, m in enumerate(("fedavg", "fedprox", "fedavgm", "flexlora", CENTRALISED))}
    rows: list[dict] = []
    tests: list[tuple[dict, str, Interval | None]] = []
    for p in partitions:
        base = cells[(p, LOCAL)]
        rows.append({"partition": p, "method": LOCAL, "n": str(len(base)), "runs": base})
        methods = {m for q, m in cells if q == p and m != LOCAL}
        methods |= {m for q, m in cells if q is None}  # centralised: compared with every partition's local clients
        for m in sorted(methods, key=lambda m: (order.get(m, len(order)), m)):
            runs = cells[(None if m == CENTRALISED else p, m)]
            common = sorted(set(runs) & set(base), key=repr)
            row = {"partition": p, "method": m, "n": f"{len(runs)} ({len(common)} paired)", "runs": runs}
            rows.append(row)
            for k in KEYS:
                d = [mean_client(runs[c], k) - mean_client(base[c], k) for c in common]
                tests.append((row, k, run_interval(d) if d else None))
    testable = [(row, k, iv) for row, k, iv in tests if iv is not None and not math.isnan(iv.low)]
    for row, k, iv in tests:
        if iv is None or math.isnan(iv.low):  # no interval: not a test, and not in the Holm family
            row[f"d_{k}"] = "–" if iv is None else f"{iv.estimate:+.3f}"
            row[f"v_{k}"] = f"{NOT_RESOLVED} ({'no paired seeds' if iv is None else 'one paired seed'})"
    adjusted = holm([iv.p if iv.p == iv.p else 1.0 for _, _, iv in testable])
    for (row, k, iv), p in zip(testable, adjusted, strict=True):
        row[f"d_{k}"] = f"{iv.estimate:+.3f} [{iv.low:+.3f}, {iv.high:+.3f}] p={p:.3f}"
        row[f"v_{k}"] = verdict({"metric": k, "diff": iv.estimate, "diff_low": iv.low, "diff_high": iv.high,
                                 "p_holm": p})  # fmt: skip
    head = ["partition", "method", "runs", *(f"{k}, mean client [95% CI]" for k in KEYS),
            *(h for k in KEYS for h in (f"{k} − local [95% CI], p (Holm)", "verdict")), "MB sent per run",
            "training s per run"]  # fmt: skip
    lines = [head, ["---"] * len(head)]
    for r in rows:
        diffs = [r.get(f"{x}_{k}", "") for k in KEYS for x in ("d", "v")]
        part = r["partition"] if r["method"] != CENTRALISED else f"pooled (vs {r['partition']} local)"
        costs = [_cost(r["runs"], "comm_mb"), _cost(r["runs"], "train_s")]
        lines.append([part, r["method"], r["n"], *(_level(r["runs"], k) for k in KEYS), *diffs, *costs])
    seeds = sorted({s for c in cells.values() for (_, _, s) in c})
    intro = (
        f"{len(found)} runs (seeds {', '.join(map(str, seeds))}), {items.pop()} test items per "
        "run (the same in every run); each method paired by seed with the local-only "
        f"baseline of its partition (paired t over seeds; Holm over the {len(testable)} comparisons with an "
        "interval):\n\n"
    )
    return intro + "\n".join("| " + " | ".join(line) + " |" for line in lines)


def _level(runs: dict[tuple, dict], key: str) -> str:
    return run_interval([mean_client(r, key) for r in runs.values()]).show()


def _cost(runs: dict[tuple, dict], key: str) -> str:
    """The mean over the runs of one of :data:`lmas.compare.COSTS` (MB sent, seconds)."""
    values = [v for r in runs.values() if (v := cost(r, key)) is not None]
    return f"{sum(values) / len(values):.3g}" if values else "–"
