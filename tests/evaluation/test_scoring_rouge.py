"""ROUGE-L for SuperNI: the metric by hand, the best of several references, per-example records on a tiny
model, and a whole run on a SuperNI-layout stream whose records the item bootstrap resamples."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from lmas.data.cl_benchmark import cl_stream
from lmas.data.task import Example, Task
from lmas.evaluation.scoring import evaluate_scored, greedy_answers, rouge_l, rouge_l_scored
from lmas.lm.encoding import PromptEncoder
from lmas.metrics import KnowledgeMatrix


def f1(lcs: int, n_pred: int, n_ref: int) -> float:
    p, r = lcs / n_pred, lcs / n_ref
    return 2 * p * r / (p + r)


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        # tokens the cat sat on the mat / the cat is on a mat: LCS "the cat on mat" = 4 of 6 and 6
        ("the cat sat on the mat", "the cat is on a mat", f1(4, 6, 6)),
        # LCS "a c" = 2 of 4 predicted and 2 reference tokens: P = 1/2, R = 1
        ("a b c d", "a c", f1(2, 4, 2)),
        # order matters: LCS of "c b a" and "a b c" is one token
        ("c b a", "a b c", f1(1, 3, 3)),
        # case and punctuation are separators, not tokens
        ("Hello, World!", "hello world", 1.0),
        # Porter stemming of tokens longer than 3 characters: running -> run, dogs -> dog
        ("running dogs", "run dog", 1.0),
        # no token on one side: 0
        ("", "an answer", 0.0),
        ("!!!", "an answer", 0.0),
    ],
)
def test_rouge_l_by_hand(prediction, reference, expected):
    assert rouge_l(prediction, [reference]) == pytest.approx(expected, abs=1e-12)


def test_rouge_l_takes_the_best_reference():
    # against "a": LCS 1, P = 1/3, R = 1 -> 0.5; against "a b": LCS 2, P = 2/3, R = 1 -> 0.8
    assert rouge_l("a b c", ["a"]) == pytest.approx(0.5)
    assert rouge_l("a b c", ["a b"]) == pytest.approx(0.8)
    assert rouge_l("a b c", ["a", "a b", "zzz"]) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="no reference answer"):
        rouge_l("a b", [])


def test_rouge_l_scored_per_example_on_a_tiny_model(tiny_base):
    model, tokenizer = tiny_base.model, tiny_base.tokenizer
    model.eval()
    enc = PromptEncoder(tokenizer, 48)
    prompts = [f"Input: question {i}\nOutput:" for i in range(6)]
    preds = greedy_answers(model, enc, prompts, max_new_tokens=6, batch_size=4)
    has_tokens = [rouge_l(p, [p]) == 1.0 for p in preds]
    assert any(has_tokens)  # the random model writes some words, so the checks below are not all zeros
    examples = [
        Example(prompts[0], preds[0]),  # its own output: 1 if it has a token
        Example(prompts[1], "zzzz qqqq"),  # nothing in common: 0
        Example(prompts[2], "zzzz", ("zzzz", preds[2])),  # the second reference is the output: best = 1
        Example(prompts[3], "zzzz", ("zzzz", "qqqq")),
        Example(prompts[4], preds[4]),
        Example(prompts[5], "zzzz", ("qqqq", preds[5], "zzzz")),
    ]
    scored = rouge_l_scored(model, enc, examples, max_new_tokens=6, batch_size=4)
    expected = [has_tokens[0], 0.0, has_tokens[2], 0.0, has_tokens[4], has_tokens[5]]
    assert scored.per_example.dtype == np.float32 and scored.per_example.shape == (6,)
    np.testing.assert_allclose(scored.per_example, np.array(expected, dtype=float))
    assert scored.value == pytest.approx(float(np.mean(expected)))
    # the task's metric chooses the scorer: the same split by exact match gives 1/0 outcomes
    task = Task("t", "generation", examples, [], examples, metric="rouge_l")
    via_task = evaluate_scored(model, enc, task, max_new_tokens=6, batch_size=4)
    np.testing.assert_allclose(via_task.per_example, scored.per_example)
    em = evaluate_scored(model, enc, Task("t", "generation", examples, [], examples), max_new_tokens=6)
    assert em.per_example.dtype == np.uint8 and set(em.per_example.tolist()) <= {0, 1}


def test_rouge_l_is_a_generation_metric_only():
    rows = [Example("q", "a")]
    with pytest.raises(ValueError, match=r"metric='rouge_l' does not score a classification task"):
        Task("t", "classification", rows, [], rows, labels=["a"], metric="rouge_l")


def test_rouge_l_pools_with_accuracy_in_avg_acc():
    km = KnowledgeMatrix(["a"], ["cls", "gen"], {"cls": "accuracy", "gen": "rouge_l"})
    km.record_initial("a", "cls", 0.2)
    km.record_initial("a", "gen", 0.1)
    km.start_round()
    km.record(0, "a", "cls", 0.8)
    km.record(0, "a", "gen", 0.3)
    km.mark_trained(0, "a", "cls")
    km.start_round()
    km.record(1, "a", "cls", 0.6)
    km.record(1, "a", "gen", 0.5)
    km.mark_trained(1, "a", "gen")
    s = km.summary("a")
    assert s["avg_acc"] == pytest.approx((0.6 + 0.5) / 2)
    assert s["forgetting"] == pytest.approx(0.8 - 0.6)  # cls: 0.8 after training, 0.6 at the end
    assert "avg_ppl" not in s


def _superni(root: Path, name: str, n_train: int, n_test: int) -> None:
    folder = root / "SuperNI" / name
    folder.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        rows = [
            {"input": f"{name} {split} item {i}", "output": [f"the answer {i}", f"answer number {i}"]} for i in range(n)
        ]
        data = {"Definition": [f"Answer {name}."], "Instances": rows}
        (folder / f"{split}.json").write_text(json.dumps(data), encoding="utf-8")


def test_a_superni_stream_run_keeps_float_records_the_bootstrap_resamples(tiny_base, tmp_path):
    from lmas.loop import ContinualLoop
    from lmas.metrics.intervals import item_intervals
    from lmas.metrics.records import load_run
    from lmas.population.population import Population
    from lmas.schema import EvalConfig, TrainConfig
    from lmas.strategies.base import Strategy

    _superni(tmp_path / "data", "task001_alpha", 12, 6)
    _superni(tmp_path / "data", "task002_beta", 12, 6)
    stream = cl_stream("superni", tasks=["task001_alpha", "task002_beta"], data_dir=tmp_path / "data", val_size=2)
    assert [t.metric for t in stream] == ["rouge_l", "rouge_l"]
    run_dir = tmp_path / "run"
    loop = ContinualLoop(
        Population(tiny_base, agents=1, lora={"r": 2}),
        stream,
        Strategy(),
        run_dir,
        seed=0,
        train=TrainConfig(lr=1e-2, batch_size=4, max_steps=2),
        eval=EvalConfig(max_new_tokens=4),
        progress=False,
        save_adapters=False,
    )
    results = loop.run()
    assert results["matrix"]["metrics"] == {"task001_alpha": "rouge_l", "task002_beta": "rouge_l"}
    run = load_run(run_dir)
    assert run.rounds is not None and run.initial is not None
    values = np.array(results["matrix"]["values"], dtype=float)  # (rounds, agents, tasks)
    last = run.rounds[max(run.rounds)]
    agent = run.agent
    for j, task in enumerate(["task001_alpha", "task002_beta"]):
        per = last[f"{agent}/{task}"]
        assert per.dtype == np.float32 and per.shape == (6,) and ((per >= 0) & (per <= 1)).all()
        assert float(per.astype(float).mean()) == pytest.approx(values[-1, 0, j], abs=1e-6)
    ivs = item_intervals(run_dir, keys=["avg_acc"], n_resamples=199)
    iv = ivs["avg_acc"]
    assert iv.low <= results["metrics"][agent]["avg_acc"] <= iv.high and not math.isnan(iv.low)
