"""The Evaluator's schedule and its per-example records: every matrix entry is recomputed from its records."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmas.data.stream import Stream
from lmas.data.task import Example, Task
from lmas.loop import ContinualLoop
from lmas.population.population import Population
from lmas.schema import EvalConfig, TrainConfig
from lmas.strategies.base import Strategy


def _stream() -> Stream:
    labels = ["red", "blue", "green"]
    cls_rows = [Example(f"colour of thing {i}?", labels[i % 3]) for i in range(15)]
    gen_rows = [Example(f"{i} plus one is", str(i + 1)) for i in range(9)]
    lm_rows = [Example(f"a sentence number {i}", f"ends with word {i % 4}") for i in range(8)]
    return Stream("mixed", [
        Task("colours", "classification", cls_rows[:9], cls_rows[9:12], cls_rows[9:], labels),
        Task("count", "generation", gen_rows[:6], [], gen_rows[3:]),
        Task("text", "lm", lm_rows[:5], [], lm_rows[2:]),
    ])


@pytest.fixture(params=["none", "master_worker"])
def finished(tiny_base, tmp_path, request):
    """A finished run of two agents; with master_worker, a population row too (fused on classification, routed
    to the best agent on validation otherwise), whose records are checked like the agents'."""
    from lmas.population.topology import MasterWorker, Topology

    topology = MasterWorker("val_acc") if request.param == "master_worker" else Topology()
    loop = ContinualLoop(Population(tiny_base, agents=2, lora={"r": 2}), _stream(), Strategy(), tmp_path, seed=0,
                         train=TrainConfig(lr=1e-2, batch_size=4, max_steps=2), eval=EvalConfig(max_new_tokens=3),
                         progress=False, save_adapters=False, topology=topology)
    return loop, loop.run()


# perplexity: the matrix sums each batch's NLL in float32, the records hold each example's (float64):
# the two sums agree to float32 rounding
REL = 1e-5


def _metric(task: Task, outcomes: np.ndarray) -> float:
    if task.kind == "lm":  # token-weighted: exp(sum NLL / sum tokens)
        return math.exp(outcomes[:, 0].sum() / outcomes[:, 1].sum())
    return float(outcomes.mean())


def test_every_matrix_entry_is_recomputed_from_its_per_example_records(finished, tmp_path):
    loop, results = finished
    folder = tmp_path / "per_example"
    assert sorted(p.name for p in folder.iterdir()) == ["initial.npz", "round000.npz", "round001.npz", "round002.npz"]
    values = np.array(results["matrix"]["values"], dtype=float)
    initial = np.load(folder / "initial.npz")
    for j, task in enumerate(loop.stream.tasks):
        assert len(initial[task.name]) == len(task.test)
        assert _metric(task, initial[task.name]) == pytest.approx(results["matrix"]["initial"][0][j], rel=REL)
    checked = 0
    for r in range(3):
        records = np.load(folder / f"round{r:03d}.npz")
        for a, agent in enumerate(results["matrix"]["agents"]):
            for j, task in enumerate(loop.stream.tasks):
                key = f"{agent}/{task.name}"
                if math.isnan(values[r, a, j]):
                    assert key not in records.files
                    continue
                assert len(records[key]) == len(task.test)
                assert _metric(task, records[key]) == pytest.approx(values[r, a, j], rel=REL)
                checked += 1
    rows = len(results["matrix"]["agents"])
    assert checked >= rows * (1 + 2 + 3)  # every row, tasks met so far (plus the next one)
    assert set(np.unique(np.load(folder / "round002.npz")["agent0/colours"])) <= {0, 1}


def test_the_schedule_scores_met_and_next_tasks_only(tiny_base, tmp_path):
    loop = ContinualLoop(Population(tiny_base, agents=1, lora={"r": 2}), _stream(), Strategy(), tmp_path,
                         train=TrainConfig(max_steps=1), eval=EvalConfig(next_task=False, initial=False),
                         progress=False, save_adapters=False)
    results = loop.run()
    values = np.array(results["matrix"]["values"], dtype=float)[:, 0]
    assert np.isnan(values).tolist() == [[False, True, True], [False, False, True], [False, False, False]]
    assert not (tmp_path / "per_example" / "initial.npz").exists()
    assert loop.evaluator.met_before(1) == [0, 1] and loop.evaluator.seen_index(2) == 2


def _long_stream(n: int = 5) -> Stream:
    labels = ["red", "blue", "green"]
    tasks = []
    for t in range(n):
        rows = [Example(f"task {t}: colour of thing {i}?", labels[(i + t) % 3]) for i in range(12)]
        tasks.append(Task(f"t{t}", "classification", rows[:6], [], rows[6:], labels))
    return Stream("long", tasks)


def _run(path, schedule: str) -> tuple[ContinualLoop, dict]:
    from lmas.models.providers import tiny  # a fresh base per run (peft edits it in place)

    base = tiny(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=0)
    loop = ContinualLoop(Population(base, agents=1, lora={"r": 2}), _long_stream(), Strategy(), path, seed=3,
                         train=TrainConfig(lr=5e-2, batch_size=3, max_steps=2), eval=EvalConfig(schedule=schedule),
                         progress=False, save_adapters=False)
    return loop, loop.run()


def test_the_minimal_schedule_gives_the_full_schedules_metrics_from_fewer_evaluations(tmp_path):
    from lmas.metrics.intervals import item_intervals

    full_loop, full = _run(tmp_path / "full", "full")
    min_loop, minimal = _run(tmp_path / "minimal", "minimal")
    assert min_loop.evaluator.round_tasks(1) == [1, 2] and full_loop.evaluator.round_tasks(1) == [0, 1, 2]
    assert min_loop.evaluator.round_tasks(4) == [0, 1, 2, 3, 4]
    m = full["metrics"]["agent0"]
    assert set(m) == {"avg_acc", "forgetting", "bwt", "fwt", "plasticity"}
    assert minimal["metrics"]["agent0"] == m  # identical, not approximately equal
    fv, mv = (np.array(r["matrix"]["values"], dtype=float)[:, 0] for r in (full, minimal))
    evaluated = ~np.isnan(mv)
    assert np.array_equal(mv[evaluated], fv[evaluated]) and np.array_equal(mv[-1], fv[-1])
    # rows 0..3: the task just trained and the next one; the last row: every task
    assert evaluated.sum(1).tolist() == [2, 2, 2, 2, 5] and (~np.isnan(fv)).sum() == 2 + 3 + 4 + 5 + 5
    # the per-example records carry what was evaluated, and item-level CIs work on them
    records = np.load(tmp_path / "minimal" / "per_example" / "round001.npz")
    assert sorted(records.files) == ["agent0/t1", "agent0/t2"]
    iv = item_intervals(tmp_path / "minimal", n_resamples=99)
    assert iv["avg_acc"].estimate == pytest.approx(m["avg_acc"])


def test_partial_results_of_the_minimal_schedule_leave_incomplete_rows_out():
    from lmas.metrics.knowledge import KnowledgeMatrix

    km = KnowledgeMatrix(["a"], ["t0", "t1"], {"t0": "accuracy", "t1": "accuracy"})
    assert not km.complete("a")
    for r, (v0, v1) in enumerate([(0.5, 0.25), (math.nan, 0.75)]):
        km.start_round()
        km.mark_trained(r, "a", f"t{r}")
        km.record(r, "a", "t0", v0)
        km.record(r, "a", "t1", v1)
    assert not km.complete("a") and km.summaries(partial=True) == {"a": {}}
    with pytest.raises(ValueError, match="NaN"):
        km.summaries()  # a finished run never hides a missing value
    km.record(1, "a", "t0", 0.5)
    assert km.complete("a") and km.summaries(partial=True) == km.summaries()


def _probes() -> list[Task]:
    labels = ["yes", "no"]
    rows = [Example(f"is {i} even?", labels[i % 2]) for i in range(10)]
    gen = [Example(f"{i} times one is", str(i)) for i in range(6)]
    return [Task("probe_even", "classification", rows[:2], [], rows[2:], labels),
            Task("probe_times", "generation", gen[:2], [], gen[2:])]


def test_probes_are_scored_every_round_never_trained_and_summarised(tmp_path):
    from lmas.metrics.intervals import item_intervals
    from lmas.models.providers import tiny

    stream = _long_stream(2).with_probes(_probes())
    base = tiny(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=0)
    loop = ContinualLoop(Population(base, agents=1, lora={"r": 2}), stream, Strategy(), tmp_path, seed=0,
                         train=TrainConfig(lr=5e-2, batch_size=3, max_steps=3),
                         eval=EvalConfig(schedule="minimal", max_new_tokens=2), progress=False, save_adapters=False)
    results = loop.run()
    matrix = results["matrix"]
    assert matrix["tasks"] == ["t0", "t1", "probe_even", "probe_times"] and matrix["probes"] == ["probe_even", "probe_times"]
    values, initial = np.array(matrix["values"], dtype=float)[:, 0], np.array(matrix["initial"], dtype=float)[0]
    assert not np.isnan(values[:, 2:]).any() and not np.isnan(initial[2:]).any()  # every round, and untrained
    assert [e["task"] for e in results["agents"]["agent0"]["history"]] == ["t0", "t1"]  # never trained
    m = results["metrics"]["agent0"]
    assert m["probe_acc"] == pytest.approx(values[-1, 2:].mean())  # accuracy and exact match pool
    assert m["probe_forgetting"] == pytest.approx((initial[2:] - values[-1, 2:]).mean())
    records = np.load(tmp_path / "per_example" / "round001.npz")
    assert len(records["agent0/probe_even"]) == 8 and "probe_even" in np.load(tmp_path / "per_example" / "initial.npz")
    iv = item_intervals(tmp_path, n_resamples=99)
    assert iv["probe_acc"].estimate == pytest.approx(m["probe_acc"])


def test_a_probe_must_be_a_task_the_stream_never_trains_on():
    stream = _long_stream(2)
    clash = Task("t0", "classification", stream[0].train, [], stream[0].test, stream[0].labels)
    with pytest.raises(ValueError, match="'t0' is used twice"):
        stream.with_probes([clash])
    overlap = Task("probe", "classification", stream[0].train[:1], [], stream[0].train[:3], stream[0].labels)
    with pytest.raises(ValueError, match="shares 3 prompts"):
        stream.with_probes([overlap])
