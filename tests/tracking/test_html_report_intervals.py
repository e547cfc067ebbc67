"""report.html's CI panel: each agent's metrics with 95% bootstrap CIs over the run's test items, drawn from the
per-example records of a real tiny-model run; a run without records (an old run) still renders and says why."""

from __future__ import annotations

import base64
import re
import shutil

import numpy as np
import pytest

from lmas.metrics import stats
from lmas.tracking import html_report


def _panel(text: str) -> str:
    """The HTML between the CI panel's heading and the next heading."""
    start = text.index(f"<h2>{html_report.CI_TITLE}</h2>")
    return text[start : text.index("<h2>", start + 4)]


def test_report_of_a_run_with_records_draws_ci_bars_with_the_intervals_numbers(run_lmas, fast_overrides, tmp_path):
    run_dir = tmp_path / "run"
    res = run_lmas(fast_overrides + ["strategy=naive", "seed=0"], run_dir)
    text = (run_dir / "report.html").read_text()  # written by lmas-train at the end of the run
    panel = _panel(text)
    (png,) = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', panel)
    assert base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"
    ivs = stats.item_intervals(run_dir, "agent0", html_report.CI_KEYS)
    assert set(ivs) == set(html_report.CI_KEYS)
    assert ivs["avg_acc"].estimate == pytest.approx(res["metrics"]["agent0"]["avg_acc"], abs=1e-6)  # float32 scores
    assert ivs["avg_acc"].low < ivs["avg_acc"].high  # a real interval on this run's items
    for key, iv in ivs.items():
        name = f"{key} ({stats.PAPER_NAMES[key]})" if key in stats.PAPER_NAMES else key
        row = (f"<tr><td>agent0</td><td>{name}</td><td>{iv.estimate:.4f}</td><td>{iv.low:.4f}</td>"
               f"<td>{iv.high:.4f}</td><td>{iv.n}</td></tr>")
        assert row in panel, row
    assert "4999" in panel and ivs["avg_acc"].method.endswith("4999 resamples")  # the panel's numbers: defaults


def test_a_run_without_records_still_renders_and_says_so(run_lmas, fast_overrides, tmp_path):
    run_dir = tmp_path / "run"
    run_lmas(fast_overrides + ["strategy=naive", "seed=0"], run_dir)
    shutil.move(run_dir / "per_example", tmp_path / "backup")  # as a run made before per-example records
    text = html_report.write_report(run_dir).read_text()
    panel = _panel(text)
    assert "no per-example records" in panel and "<img" not in panel
    assert "Knowledge matrix" in text  # the rest of the report is there
    # records that do not give results.json's values (one outcome flipped): the report renders and says why
    shutil.copytree(tmp_path / "backup", run_dir / "per_example")
    f = run_dir / "per_example" / "round000.npz"
    arrays = dict(np.load(f))
    key = next(k for k in arrays if k.startswith("agent0/"))
    arrays[key][0] = 1 - arrays[key][0]
    np.savez(f, **arrays)
    panel = _panel(html_report.write_report(run_dir).read_text())
    assert "<img" not in panel and "No intervals for agent0" in panel and "do not belong to this run" in panel
