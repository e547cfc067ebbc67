"""Populations end to end through lmas-train on real data (tiny model): allocation, topologies,
fusion row, messages per round, transfer wired into the loop, learning curves."""

from __future__ import annotations

import json


def test_master_worker_assigns_by_competence_and_fuses(fast_overrides, tmp_path, run_lmas):
    res = run_lmas(fast_overrides + ["population=master_worker"], tmp_path / "mw")
    pop = res["population"]
    assert pop["allocation"] == "competence" and pop["topology"] == {"name": "master_worker", "fusion": "val_acc"}
    assert [len(r) for r in pop["assignments"]] == [1, 1, 1]  # one task per round, one worker each
    m = res["matrix"]
    assert m["agents"] == ["agent0", "agent1", "agent2", "population"]
    rows = m["values"]
    for r, (agent, task) in enumerate(a for rnd in pop["assignments"] for a in rnd):
        j = m["tasks"].index(task)
        assert rows[r][m["agents"].index(agent)][j] is not None  # the worker was scored on its task
        assert rows[r][3][j] is not None  # and so was the population
    comm = pop["communication"]
    # round 0: the coordinator sends 8 val shots to each of 3 workers and gets 3 reports, then hands
    # out the task; the one trained worker sends its label distributions for bbc and chat
    assert comm[0]["by_kind"]["task"]["messages"] == 3 + 1
    assert comm[0]["by_kind"]["label_distribution"]["messages"] == 2
    assert "population" in res["metrics"] and "avg_acc" in res["metrics"]["population"]


def test_peer_to_peer_exchanges_adapters_each_round(fast_overrides, tmp_path, run_lmas):
    res = run_lmas(fast_overrides + ["population=peer_to_peer"], tmp_path / "p2p")
    assigned = [[a for a, _ in rnd] for rnd in res["population"]["assignments"]]
    assert assigned == [["agent0"], ["agent1"], ["agent2"]]  # round robin
    comm = res["population"]["communication"]
    # ring of 3 after round 0: only agent0 knows something; agent1 and agent2 each receive it
    assert comm[0]["by_kind"]["adapter"]["messages"] == 2
    assert comm[2]["by_kind"]["adapter"]["messages"] == 6  # everyone knows something: 3 x 2 neighbours
    one_adapter = comm[0]["by_kind"]["adapter"]["bytes"] // 2
    assert comm[2]["by_kind"]["adapter"]["bytes"] == 6 * one_adapter
    hist = res["agents"]["agent1"]["history"]
    assert hist[0]["event"] == "merged" and hist[0]["sources"] == ["agent0"] and hist[0]["round"] == 0
    # after the round-0 exchange agent1 holds knowledge and is scored, although it trained nothing yet
    m = res["matrix"]
    assert m["values"][0][m["agents"].index("agent1")][0] is not None


def test_hierarchical_cascade_logs_escalation(fast_overrides, tmp_path, run_lmas):
    out = tmp_path / "h"
    res = run_lmas(fast_overrides + ["population=hierarchical", "topology.threshold=0.9"], out)
    answers = res["population"]["answers"]
    last = answers[-1]
    assert set(last) == {"bbc", "chat", "math"}
    for task in ("bbc", "chat"):
        assert 0.0 <= last[task]["escalation_rate"] <= 1.0
        assert sum(last[task]["answered_by"].values()) == res["tasks"][["bbc", "chat"].index(task)]["n_test"]
    assert last["math"]["routed_to"] in ("agent0", "agent1", "agent2")  # generation: routed by val score
    text = (out / "metrics.csv").read_text()
    assert "cascade/bbc/escalation_rate" in text and "comm/bytes" in text


def test_merge_transfer_in_the_loop_creates_a_scored_agent(fast_overrides, tmp_path, run_lmas):
    out = tmp_path / "merge"
    res = run_lmas(fast_overrides + [
        "population.agents=[a,b]",
        "allocation=explicit",
        "allocation.rounds=[{a:bbc,b:chat},{}]",
        "transfer=merge", "transfer.sources=[a,b]", "transfer.targets=[both]", "transfer.start=1",
    ], out)
    m = res["matrix"]
    assert m["agents"] == ["a", "b", "both"]
    assert m["values"][0][2] == [None, None, None]  # did not exist in round 0
    assert m["values"][1][2][0] is not None and m["values"][1][2][1] is not None
    assert res["agents"]["both"]["history"][0]["event"] == "merge"
    assert res["population"]["communication"][1]["by_kind"]["adapter"]["messages"] == 2
    assert (out / "adapters" / "both" / "round001-merge.safetensors").is_file()
    assert res["metrics"]["both"] == {}  # trained nothing: no CL metrics, only matrix values


def test_learning_curves_score_the_task_during_training(fast_overrides, tmp_path, run_lmas):
    res = run_lmas(fast_overrides + ["eval.curve_every=1"], tmp_path / "curves")
    curves = res["learning_curves"]
    assert set(curves) == {"agent0/bbc", "agent0/chat", "agent0/math"}
    steps = [s for s, _ in curves["agent0/bbc"]]
    assert steps == [0, 1, 2]  # before training, then after each of the 2 steps (debug=fast)
    assert all(0.0 <= v <= 1.0 for _, v in curves["agent0/bbc"])
    json.dumps(curves)
