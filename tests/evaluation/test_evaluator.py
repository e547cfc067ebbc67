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


@pytest.fixture
def finished(tiny_base, tmp_path):
    loop = ContinualLoop(Population(tiny_base, agents=2, lora={"r": 2}), _stream(), Strategy(), tmp_path, seed=0,
                         train=TrainConfig(lr=1e-2, batch_size=4, max_steps=2), eval=EvalConfig(max_new_tokens=3),
                         progress=False, save_adapters=False)
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
    assert checked >= 2 * (1 + 2 + 3)  # both agents, tasks met so far (plus the next one)
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
