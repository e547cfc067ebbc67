"""What the loop hands the tracker and writes, on a real 2-agent peer-to-peer run (tiny model):
the knowledge table per round, adapter versions with their lineage, inter-agent similarity, report.html."""

from __future__ import annotations

import json
import math

from safetensors import safe_open

from lmas.tracking import lineage
from lmas.tracking.trackers import CSVTracker


def test_p2p_run_logs_tables_lineage_and_similarity(fast_overrides, tmp_path, run_lmas, monkeypatch):
    tables, artifacts = [], []
    monkeypatch.setattr(CSVTracker, "log_table", lambda self, key, columns, rows, step: tables.append(
        (key, list(columns), [list(r) for r in rows], step)))
    monkeypatch.setattr(CSVTracker, "log_artifact", lambda self, path, name, kind, meta, aliases=None, parents=None:
                        artifacts.append((path, name, kind, dict(meta), list(aliases), list(parents))))
    run_dir = tmp_path / "run"
    res = run_lmas(fast_overrides + ["population=peer_to_peer", "population.agents=2", "stream.max_train=4",
                                     "train.max_steps=1"], run_dir)
    m = res["matrix"]
    trained = {tuple(t) for t in m["trained"]}

    # the knowledge matrix of each round as a table: every evaluated value, once
    assert [(k, s) for k, _, _, s in tables] == [("knowledge_table", r) for r in range(3)]
    for key, columns, rows, r in tables:
        assert columns == ["round", "agent", "task", "metric", "value", "trained"]
        expected = [[r, a, t, m["metrics"][t], m["values"][r][i][j], (r, a, t) in trained]
                    for i, a in enumerate(m["agents"]) for j, t in enumerate(m["tasks"]) if m["values"][r][i][j] is not None]
        assert rows == expected

    # every adapter version, parents first, with the lineage of the agents' histories
    histories = {a: info["history"] for a, info in res["agents"].items()}
    versions = lineage.versions(histories)
    assert [(name, aliases) for _, name, _, _, aliases, _ in artifacts] == \
        [(lineage.artifact_name(v.agent), [lineage.alias(v.round)]) for v in versions]
    logged = set()
    for (path, name, kind, meta, aliases, parents), v in zip(artifacts, versions):
        assert kind == "adapter" and path.is_file()
        assert parents == [lineage.ref(a, r) for a, r, _ in v.parents]
        assert set(parents) <= logged  # a parent is always logged before its child
        logged.add(f"{name}:{aliases[0]}")
        with safe_open(str(path), "pt") as f:
            assert f.metadata()["parents"] == ",".join(parents)
    # ring of 2: round 0 agent0 trains bbc, agent1 receives it; round 1 agent1 trains chat then both merge
    assert artifacts[1][1] == "adapter-agent1" and artifacts[1][5] == ["adapter-agent0:round000"]
    round1 = {name: parents for _, name, _, _, (alias,), parents in artifacts if alias == "round001"}
    assert round1 == {"adapter-agent0": ["adapter-agent0:round000", "adapter-agent1:round000"],
                      "adapter-agent1": ["adapter-agent1:round000", "adapter-agent0:round000"]}

    # similarity: every round (both agents know something from round 0), in results.json and metrics.csv
    sims = json.loads((run_dir / "results.json").read_text())["similarity"]
    assert [s["round"] for s in sims] == [0, 1, 2]
    for s in sims:
        assert set(s["weights"]) == {"agent0~agent1"} and -1.0 - 1e-9 <= s["weights"]["agent0~agent1"] <= 1.0 + 1e-9
        assert s["predictions"]["agent0~agent1"] in {i / 6 for i in range(7)}  # 6 probe examples (debug=fast)
        assert s["probe"] == {"task": "bbc", "examples": 6}
    # round 0: agent1 is an exact copy of agent0's adapter (its only source, weight 1)
    assert math.isclose(sims[0]["weights"]["agent0~agent1"], 1.0, abs_tol=1e-6)
    assert sims[0]["predictions"]["agent0~agent1"] == 1.0
    csv_keys = {line.split(",")[2] for line in (run_dir / "metrics.csv").read_text().splitlines()[1:]}
    assert {"similarity/agent0~agent1/weights", "similarity/agent0~agent1/predictions"} <= csv_keys

    # the local report
    report = (run_dir / "report.html").read_text()
    for title in ("Knowledge matrix", "Adapter lineage", "Inter-agent similarity over time", "Communication"):
        assert f"<h2>{title}</h2><img" in report
