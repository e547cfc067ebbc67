"""report.html: self-contained (inline PNGs), with the pictures the run has data for, from results.json."""

from __future__ import annotations

import base64
import json
import math
import re

import pytest

from lmas.metrics.knowledge import KnowledgeMatrix
from lmas.tracking import html_report


def _results(complete: bool = True) -> dict:
    km = KnowledgeMatrix(["agent0", "agent1"], ["t0", "t1"], {"t0": "accuracy", "t1": "perplexity"})
    for a in km.agents:
        km.record_initial(a, "t0", 0.2)
        km.record_initial(a, "t1", 50.0)
    km.start_round()
    km.record(0, "agent0", "t0", 0.9)
    km.record(0, "agent0", "t1", 40.0)
    km.mark_trained(0, "agent0", "t0")
    km.start_round()
    for a, (v0, v1) in {"agent0": (0.7, 30.0), "agent1": (0.6, 20.0)}.items():
        km.record(1, a, "t0", v0)
        km.record(1, a, "t1", v1)
    km.mark_trained(1, "agent1", "t1")
    return {
        "complete": complete, "stream": "s", "scenario": "task", "strategy": "naive", "seed": 0,
        "tasks": [{"name": "t0", "metric": "accuracy"}, {"name": "t1", "metric": "perplexity"}],
        "matrix": km.to_dict(),
        "metrics": {a: km.summary(a) for a in km.agents},
        "agents": {
            "agent0": {"history": [{"round": 0, "event": "trained", "task": "t0"}]},
            "agent1": {"history": [
                {"round": 1, "event": "merge_init", "transfer": "merge_init", "sources": ["agent0"], "weights": [1.0]},
                {"round": 1, "event": "trained", "task": "t1"}]},
        },
        "similarity": [{"round": 1, "weights": {"agent0~agent1": 0.25}, "predictions": {"agent0~agent1": 0.5}}],
        "population": {"communication": [{"messages": 0, "bytes": 0, "by_kind": {}},
                                         {"messages": 1, "bytes": 4096, "by_kind": {"adapter": {"messages": 1, "bytes": 4096}}}]},
        "loss_curves": {"agent0/t0": [2.0, 1.5], "agent1/t1": [3.0, 2.5]},
        "timings": {"train_s": 1.0},
    }


def _images(text: str) -> dict[str, bytes]:
    pairs = re.findall(r'<h2>([^<]+)</h2><img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    return {title: base64.b64decode(data) for title, data in pairs}


def test_report_embeds_every_picture_as_png(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(_results()))
    out = html_report.write_report(tmp_path)
    assert out == tmp_path / "report.html"
    text = out.read_text()
    images = _images(text)
    assert list(images) == ["Knowledge matrix", "Metric per task over rounds",
                            "Average accuracy, forgetting, BWT and FWT over time", "Adapter lineage",
                            "Inter-agent similarity over time", "Communication", "Training loss"]
    assert all(png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000 for png in images.values())
    assert "src=\"http" not in text and "<script" not in text  # self-contained
    # the versions table gives the lineage in words
    assert "<td>adapter-agent1:round001</td><td>merge_init+t1</td><td>adapter-agent0:round000 (merge_init)</td>" in text
    assert "strategy naive, seed 0, complete," in text


def test_a_run_without_population_data_gets_the_single_agent_pictures(tmp_path):
    results = _results(complete=False)
    for key in ("similarity", "population", "loss_curves"):
        results.pop(key)
    text = html_report.render(results)
    assert list(_images(text)) == ["Knowledge matrix", "Metric per task over rounds",
                                   "Average accuracy, forgetting, BWT and FWT over time", "Adapter lineage"]
    assert "NOT complete (partial results)" in text


def test_metrics_over_time_are_the_summaries_after_each_round():
    km = KnowledgeMatrix.from_dict(_results()["matrix"])
    over = html_report.metrics_over_time(km)
    assert over["agent0"][0] == pytest.approx({"avg_acc": 0.9, "forgetting": 0.0, "bwt": 0.0, "plasticity": 0.9})
    assert over["agent0"][1] == km.summary("agent0")
    assert over["agent1"][0] == {} and over["agent1"][1] == km.summary("agent1")
    assert math.isclose(over["agent1"][1]["avg_ppl"], 20.0)


def test_command_line_writes_reports_and_names_bad_dirs(tmp_path, capsys):
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    (good / "results.json").write_text(json.dumps(_results()))
    assert html_report.main([str(good)]) == 0
    assert (good / "report.html").is_file()
    assert html_report.main([str(bad)]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_many_agent_pairs_are_shown_as_the_last_rounds_matrix():
    from matplotlib.figure import Figure

    agents = [f"a{i}" for i in range(6)]  # 15 pairs: too many lines
    pairs = {f"{x}~{y}": 0.5 for i, x in enumerate(agents) for y in agents[i + 1:]}
    similarity = [{"round": 0, "weights": dict(pairs)}, {"round": 1, "weights": {**pairs, "a0~a5": -1.0}}]
    ax = Figure().add_subplot()
    assert html_report.plot_similarity(ax, similarity, "weights")
    assert ax.get_title().endswith("round 1") and [t.get_text() for t in ax.get_yticklabels()] == agents
    grid = ax.images[0].get_array()
    assert grid[0, 5] == grid[5, 0] == -1.0 and grid[1, 2] == 0.5 and grid[3, 3] == 1.0
    few = Figure().add_subplot()
    assert html_report.plot_similarity(few, [{"round": 0, "weights": {"a~b": 0.1}}, {"round": 1, "weights": {"a~b": 0.2}}],
                                       "weights")
    assert len(few.lines) == 1 and list(few.lines[0].get_ydata()) == [0.1, 0.2]
