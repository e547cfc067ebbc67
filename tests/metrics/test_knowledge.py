"""KnowledgeMatrix: recording, per-agent task matrices, summaries, I/O and the heatmap."""

from __future__ import annotations

import csv
import json
import math
import struct

import numpy as np
import pytest

from lmas.metrics import KnowledgeMatrix

TASKS = ["t0", "t1", "t2", "lm"]
METRICS = {"t0": "accuracy", "t1": "exact_match", "t2": "accuracy", "lm": "perplexity"}
AGENTS = ["alice", "bob", "population"]

# values[agent] = (initial, rows for rounds 0..3), columns t0, t1, t2, lm
ALICE = (
    [0.25, 0.10, 0.30, 40.0],
    [
        [0.80, 0.20, 0.35, 30.0],  # r0: alice trains t0
        [0.70, 0.90, 0.40, 32.0],  # r1: alice trains t1
        [0.60, 0.85, 0.45, 12.0],  # r2: alice trains lm
        [0.55, 0.80, 0.50, 14.0],  # r3: alice idle
    ],
)
BOB = (
    [0.20, 0.15, 0.30, 50.0],
    [
        [0.30, 0.75, 0.32, 45.0],  # r0: bob trains t1
        [0.35, 0.70, 0.33, 44.0],  # r1: bob idle
        [0.40, 0.65, 0.85, 43.0],  # r2: bob trains t2
        [0.90, 0.60, 0.80, 42.0],  # r3: bob trains t0
    ],
)
TRAINED = [(0, "alice", "t0"), (0, "bob", "t1"), (1, "alice", "t1"), (2, "alice", "lm"), (2, "bob", "t2"), (3, "bob", "t0")]


def build() -> KnowledgeMatrix:
    km = KnowledgeMatrix(AGENTS, TASKS, METRICS)
    for name, (init, _) in (("alice", ALICE), ("bob", BOB)):
        for t, v in zip(TASKS, init):
            km.record_initial(name, t, v)
    for r in range(4):
        assert km.start_round() == r
        for name, (_, rows) in (("alice", ALICE), ("bob", BOB)):
            for t, v in zip(TASKS, rows[r]):
                km.record(r, name, t, v)
    # the population is only evaluated at the end, on two tasks
    km.record(3, "population", "t0", 0.95)
    km.record(3, "population", "lm", 11.0)
    for r, a, t in TRAINED:
        km.mark_trained(r, a, t)
    return km


def test_shapes_and_values() -> None:
    km = build()
    v = km.values()
    assert v.shape == (4, 3, 4)
    assert km.initial().shape == (3, 4)
    np.testing.assert_array_equal(v[:, 0, :], np.array(ALICE[1]))
    np.testing.assert_array_equal(v[:, 1, :], np.array(BOB[1]))
    assert np.isnan(v[:3, 2, :]).all() and v[3, 2, 0] == 0.95 and np.isnan(v[3, 2, 1])
    assert np.isnan(km.initial()[2]).all()
    v[0, 0, 0] = -1.0  # a copy
    assert km.values()[0, 0, 0] == 0.80


def test_training_rounds_are_first_and_last_ordered_by_last() -> None:
    km = build()
    assert km.training_rounds("alice") == {"t0": (0, 0), "t1": (1, 1), "lm": (2, 2)}
    assert list(km.training_rounds("bob")) == ["t1", "t2", "t0"]
    assert km.training_rounds("population") == {}


def test_summary_alice_mixed_metrics() -> None:
    s = build().summary("alice")
    # alice trains t0 @ r0, t1 @ r1, lm @ r2 and nothing in r3, the final round F = 3 (a merge or an
    # exchange may change an agent after its last training: the final round counts).
    # accuracy-like tasks t0, t1:
    #   avg_acc = V[3] = (0.55 + 0.80) / 2 = 0.675          (the last training round r2 would give 0.725)
    #   forgetting = ((V[0][t0] - V[3][t0]) + (V[1][t1] - V[3][t1])) / 2 = (0.25 + 0.10) / 2 = 0.175
    #   fwt: t1 (first trained r1 > alice's first round r0): V[0][t1] - b = 0.20 - 0.10 = 0.10
    #   plasticity = (V[0][t0] + V[1][t1]) / 2 = (0.80 + 0.90) / 2 = 0.85
    # perplexity task lm (lower is better, signs flipped), trained r2:
    #   avg_ppl = V[3][lm] = 14.0 ; ppl_forgetting = V[3] - V[2] = 14.0 - 12.0 = 2.0
    #   ppl_fwt = b - V[1][lm] = 40.0 - 32.0 = 8.0
    expected = {
        "avg_acc": 0.675,
        "forgetting": 0.175,
        "bwt": -0.175,
        "fwt": 0.10,
        "plasticity": 0.85,
        "avg_ppl": 14.0,
        "ppl_forgetting": 2.0,
        "ppl_bwt": -2.0,
        "ppl_fwt": 8.0,
    }
    assert s.keys() == expected.keys()
    for k, v in expected.items():
        assert s[k] == pytest.approx(v, abs=1e-12), k


def test_summary_bob_accuracy_only() -> None:
    s = build().summary("bob")
    # bob: t1 @ r0, t2 @ r2, t0 @ r3 = F
    #   avg_acc = (0.60 + 0.80 + 0.90) / 3 = 2.30 / 3
    #   forgetting (tasks last trained before F: t1, t2) = ((0.75 - 0.60) + (0.85 - 0.80)) / 2 = 0.10
    #   fwt, from the round just before each task was first trained:
    #     t2: V[1][t2] - b = 0.33 - 0.30 = 0.03 ; t0: V[2][t0] - b = 0.40 - 0.20 = 0.20 -> 0.115
    #   plasticity = (0.75 + 0.85 + 0.90) / 3 = 2.50 / 3
    expected = {"avg_acc": 2.30 / 3, "forgetting": 0.10, "bwt": -0.10, "fwt": 0.115, "plasticity": 2.50 / 3}
    assert s.keys() == expected.keys()
    for k, v in expected.items():
        assert s[k] == pytest.approx(v, abs=1e-12), k


def test_summary_single_task_and_untrained() -> None:
    km = KnowledgeMatrix(["a"], ["x", "y"], {"x": "accuracy", "y": "accuracy"})
    r = km.start_round()
    km.record(r, "a", "x", 0.9)
    km.mark_trained(r, "a", "x")
    # one task: no fwt key, forgetting 0.0 (as Avalanche)
    assert km.summary("a") == {"avg_acc": 0.9, "forgetting": 0.0, "bwt": 0.0, "plasticity": 0.9}
    assert build().summary("population") == {}


def test_summary_nan_names_agent_round_and_task() -> None:
    km = build()
    km.record(2, "alice", "t0", math.nan)  # not needed: t0 was last trained in r0, the final round is r3
    assert km.summary("alice")["avg_acc"] == pytest.approx(0.675)
    km.record(3, "alice", "t0", math.nan)  # alice's final value on t0 is now missing
    with pytest.raises(ValueError, match=r"summary\('alice'\).*R\[3\]\[0\].*round 3.*\['t0', 't1'\]"):
        km.summary("alice")


def test_retraining_counts_from_the_last_training_and_mark_is_idempotent() -> None:
    km = build()
    km.mark_trained(3, "alice", "t0")
    km.mark_trained(3, "alice", "t0")
    km.mark_trained(0, "alice", "t0")
    assert km.trained("alice") == [(0, "alice", "t0"), (1, "alice", "t1"), (2, "alice", "lm"), (3, "alice", "t0")]
    assert km.training_rounds("alice") == {"t1": (1, 1), "lm": (2, 2), "t0": (0, 3)}
    s = km.summary("alice")  # t0 last trained in the final round: it counts no forgetting
    assert s["forgetting"] == pytest.approx(0.90 - 0.80) and s["plasticity"] == pytest.approx((0.55 + 0.90) / 2)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="no metric"):
        KnowledgeMatrix(["a"], ["x"], {})
    with pytest.raises(ValueError, match="unknown metrics"):
        KnowledgeMatrix(["a"], ["x"], {"x": "bleu"})
    with pytest.raises(ValueError, match="unique"):
        KnowledgeMatrix(["a", "a"], ["x"], {"x": "accuracy"})
    km = build()
    with pytest.raises(KeyError, match="unknown agent"):
        km.record(0, "carol", "t0", 0.5)
    with pytest.raises(KeyError, match="unknown task"):
        km.mark_trained(0, "alice", "t9")
    with pytest.raises(IndexError, match="round 4"):
        km.record(4, "alice", "t0", 0.5)
    with pytest.raises(ValueError, match="finite"):
        km.record(0, "alice", "lm", math.inf)


def test_dict_round_trip_is_exact_and_json_safe() -> None:
    km = build()
    km.record(1, "alice", "t2", 0.1 + 0.2)  # a float with a long repr
    d = km.to_dict()
    text = json.dumps(d, allow_nan=False)
    back = KnowledgeMatrix.from_dict(json.loads(text))
    np.testing.assert_array_equal(back.values(), km.values())  # NaN == NaN here
    np.testing.assert_array_equal(back.initial(), km.initial())
    assert back.values()[1, 0, 2] == 0.1 + 0.2
    assert back.agents == km.agents and back.tasks == km.tasks and back.metrics == km.metrics
    assert back.trained() == km.trained()
    assert back.to_dict() == d
    assert back.summary("alice") == km.summary("alice")
    # an empty matrix survives too
    empty = KnowledgeMatrix(["a"], ["x"], {"x": "perplexity"})
    again = KnowledgeMatrix.from_dict(json.loads(json.dumps(empty.to_dict())))
    assert again.values().shape == (0, 1, 1) and again.n_rounds == 0


def test_csv_long_format(tmp_path) -> None:
    km = build()
    path = tmp_path / "km.csv"
    km.to_csv(path)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["round", "agent", "task", "metric", "value"]
    body = rows[1:]
    # 2 agents x 4 initial + 2 agents x 4 tasks x 4 rounds + 2 population values = 8 + 32 + 2
    assert len(body) == 42
    assert body[0] == ["-1", "alice", "t0", "accuracy", "0.25"]
    assert ["2", "alice", "lm", "perplexity", "12.0"] in body
    assert ["0", "bob", "t1", "exact_match", "0.75"] in body
    assert ["3", "population", "lm", "perplexity", "11.0"] in body
    assert not any(r[1] == "population" and r[0] != "3" for r in body)
    # values parse back exactly
    v = km.values()
    for r, a, t, _, val in body:
        if r != "-1":
            assert float(val) == v[int(r), AGENTS.index(a), TASKS.index(t)]


def _png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        data = f.read(24)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_heatmap_png(tmp_path) -> None:
    km = build()
    all_path = tmp_path / "all.png"
    km.heatmap(all_path)
    assert all_path.stat().st_size > 1000
    w, h = km.figure_size(3)
    assert _png_size(all_path) == (round(w * 100), round(h * 100))
    one_path = tmp_path / "bob.png"
    km.heatmap(one_path, agent="bob", dpi=50)
    w, h = km.figure_size(1)
    assert _png_size(one_path) == (round(w * 50), round(h * 50))
    with pytest.raises(KeyError):
        km.heatmap(tmp_path / "x.png", agent="carol")
