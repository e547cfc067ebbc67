"""Every consumer reads the metrics of one computation (KnowledgeMatrix.summary), on a real run whose
agents are changed by exchanges after their last training (peer-to-peer, round-robin)."""

from __future__ import annotations

import csv
import importlib.util
import math
import statistics
from pathlib import Path

import pytest

from lmas.compare import compare, find_runs
from lmas.metrics import KnowledgeMatrix
from lmas.tracking import html_report, report

ROOT = Path(__file__).resolve().parents[2]


def _tables():
    spec = importlib.util.spec_from_file_location("experiment_tables", ROOT / "experiments" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_results_tracker_tables_compare_and_report_read_the_same_metrics(run_lmas, fast_overrides, tmp_path):
    out = tmp_path / "runs" / "p2p"
    res = run_lmas(fast_overrides + ["experiment=knowledge_transfer/topologies", "population=peer_to_peer"], out)
    km = KnowledgeMatrix.from_dict(res["matrix"])
    assert res["metrics"] == km.summaries()
    final = res["matrix"]["values"][-1]
    assert km.training_rounds("agent0") == {"bbc": (0, 0)} and km.n_rounds == 3  # then merged in rounds 0-2
    for a, agent in enumerate(km.agents):
        trained = {t for _, _, t in km.trained(agent)}
        # avg_acc: the final round (after the exchanges that followed the agent's last training)
        accs = [final[a][km.tasks.index(t)] for t in trained if km.metrics[t] != "perplexity"]
        assert res["metrics"][agent]["avg_acc"] == pytest.approx(statistics.mean(accs), abs=1e-12)
    # the tracker's per-round cl/ metrics: the same function on the rounds so far
    logged: dict[tuple[int, str], float] = {}
    with open(out / "metrics.csv", newline="") as f:
        for axis, step, key, value in csv.reader(f):
            if axis == "round" and key.startswith("cl/"):
                logged[int(step), key] = float(value)
    for r in range(km.n_rounds):
        for agent in km.agents:
            for key, value in km.until(r).summary(agent).items():
                assert logged[r, f"cl/{agent}/{key}"] == pytest.approx(value, abs=1e-12)
    assert {k for k in logged if k[0] == km.n_rounds - 1} == {
        (km.n_rounds - 1, f"cl/{a}/{k}") for a, s in res["metrics"].items() for k in s}
    # lmas-compare, experiments/tables.py, the report
    for agent in ("agent0", "population"):
        (row,) = compare(find_runs([tmp_path / "runs"]), agent)
        assert row["avg_acc_mean"] == res["metrics"][agent]["avg_acc"]
        assert row["forgetting_mean"] == res["metrics"][agent]["forgetting"]
    tables = _tables()
    (row,) = [r for r in tables.topologies(tables.load_runs([str(out)])).splitlines() if r.startswith("| peer")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5] == f"{res['metrics']['population']['avg_acc']:.3f}"
    assert cells[6] == f"{res['metrics']['population']['forgetting']:.3f}"
    assert f"{res['metrics']['agent0']['avg_acc']:.4f}" in report.metrics_table(res)
    assert f"{res['metrics']['agent0']['avg_acc']:.4f}" in html_report.render(res)
    over = html_report.metrics_over_time(km)
    assert over["agent0"][-1] == res["metrics"]["agent0"] and not math.isnan(over["agent0"][0]["avg_acc"])
