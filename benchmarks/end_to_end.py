"""Summarise benchmarks/end_to_end.sh's three runs (before; after with a cold cache; after with a warm one).

    .venv/bin/python benchmarks/end_to_end.py /tmp/e2e

Reads each run's results.json (timings: wall, training, evaluation) and compares the metrics and the matrix
entries both runs hold (before: the full schedule; after: the minimal one). Writes
benchmarks/results/end_to_end.json.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

OUT = Path(__file__).parent / "results" / "end_to_end.json"


def load(folder: Path) -> dict:
    (path,) = sorted(folder.glob("runs/*/results.json"))
    return json.loads(path.read_text())


def main(root: str) -> None:
    runs = {name: load(Path(root) / name) for name in ("before", "after_cold", "after_warm")}
    before = runs["before"]
    out: dict = {"setup": "experiment=reproduction/fast, 14 tasks, 16 train / 32 test items per task, seed 0",
                 "timings": {k: r["timings"] for k, r in runs.items()}}  # fmt: skip
    for k in ("after_cold", "after_warm"):
        after = runs[k]
        m0, m1 = before["metrics"]["agent0"], after["metrics"]["agent0"]
        v0, v1 = before["matrix"]["values"], after["matrix"]["values"]
        diffs = [abs(a - b) for r0, r1 in zip(v0, v1, strict=True) for x0, x1 in zip(r0, r1, strict=True)
                 for a, b in zip(x0, x1, strict=True) if a is not None and b is not None]  # fmt: skip
        out[k] = {
            "wall_speedup": before["timings"]["wall_s"] / after["timings"]["wall_s"],
            "eval_speedup": before["timings"]["eval_s"] / after["timings"]["eval_s"],
            "metric_max_abs_diff": max(abs(m0[key] - m1[key]) for key in m0),
            "matrix_entries_compared": len(diffs),
            "matrix_max_abs_diff": max(diffs) if diffs else math.nan,
        }
    OUT.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/e2e")
