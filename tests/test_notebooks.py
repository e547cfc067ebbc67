"""notebooks/analysis.ipynb runs top to bottom on a small real multirun and finds what the runs hold."""

from __future__ import annotations

import json
from pathlib import Path

import nbclient
import nbformat
import pytest
import yaml

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "analysis.ipynb"


def _outputs(nb, kind: str) -> list:
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", []) if o.get("output_type") == kind]


@pytest.mark.slow  # long (a subprocess or a sweep); the slow suite runs it (docs/testing.md)
def test_analysis_notebook_on_a_small_multirun(tmp_path, fast_overrides, run_lmas, monkeypatch):
    multirun = tmp_path / "multirun"
    results = {}
    for i, (strategy, seed) in enumerate([("naive", 0), ("naive", 1), ("l2", 0)]):
        overrides = [f"strategy={strategy}", f"seed={seed}"]
        run_dir = multirun / f"{i}_{strategy},{seed}"
        results[run_dir.name] = run_lmas(fast_overrides + overrides + ["stream.max_train=4", "train.max_steps=1"],
                                         run_dir)
        (run_dir / ".hydra").mkdir()  # what a Hydra sweep leaves in each job's dir
        (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    assert all(r["similarity"] == [] for r in results.values())  # one agent: nothing to compare

    monkeypatch.setenv("LMAS_MULTIRUN", str(multirun))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()

    summary = json.loads(_outputs(nb, "stream")[-1]["text"].strip().splitlines()[-1])
    assert summary["multirun"] == str(multirun) and summary["runs"] == 3
    assert sorted(summary["groups"]) == ["strategy=l2", "strategy=naive"]
    naive = sorted(r["metrics"]["agent0"]["avg_acc"] for n, r in results.items() if "naive" in n)
    assert sorted(summary["final_avg_acc"]["strategy=naive"]) == pytest.approx(naive)
    pictures = [o for o in _outputs(nb, "display_data") if "image/png" in o["data"]]
    assert len(pictures) >= 5  # comparison bars, evolution, task curves, heatmap, lineage
    tables = [o for o in _outputs(nb, "execute_result") + _outputs(nb, "display_data") if "text/html" in o["data"]]
    assert any("avg_acc_mean" in o["data"]["text/html"] for o in tables)
