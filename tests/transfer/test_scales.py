"""Merge coefficients tuned on validation (transfer.scales) for the between-round merge and the merge-method
comparison: the scale-free choice by hand, and merges whose targets hold λ·merge with the recorded scores."""

from __future__ import annotations

import pytest
import torch

from lmas.data.task import Example, Task
from lmas.evaluation.scoring import evaluate
from lmas.lm.encoding import PromptEncoder
from lmas.transfer import merge_adapters
from lmas.transfer.factors import agent_factors, delta
from lmas.transfer.policy import Merge, MergeMethods
from lmas.transfer.scales import checked_scales, pick_scale


def test_pick_scale_averages_each_tasks_score_relative_to_its_best_candidate():
    scores = {"0.0": {"acc": 0.5, "ppl": 20.0}, "1.0": {"acc": 1.0, "ppl": 40.0}, "2.0": {"acc": 0.8, "ppl": 10.0}}
    best, rel = pick_scale([0.0, 1.0, 2.0], scores, {"acc": False, "ppl": True})
    # acc: 0.5/1, 1/1, 0.8/1; ppl (lower is better): 10/20, 10/40, 10/10
    assert rel == pytest.approx({"0.0": (0.5 + 0.5) / 2, "1.0": (1.0 + 0.25) / 2, "2.0": (0.8 + 1.0) / 2})
    assert best == 2.0
    tie = {"0.0": {"acc": 0.7}, "0.5": {"acc": 0.7}, "1.0": {"acc": 0.6}}
    assert pick_scale([0.0, 0.5, 1.0], tie, {"acc": False})[0] == 0.0  # the first of equal scores
    zero = {"0.0": {"acc": 0.0}, "1.0": {"acc": 0.0}}
    assert pick_scale([0.0, 1.0], zero, {"acc": False}) == (0.0, {"0.0": 1.0, "1.0": 1.0})  # nothing to choose
    with pytest.raises(ValueError, match=r"transfer.scales=\[\]"):
        checked_scales([])
    assert checked_scales(None) is None and checked_scales([1]) == [1.0]


def _learnt(make_population, tx, task_names=("story", "story")):
    pop = make_population(["a", "b"], {"r": 4, "alpha": 8})
    for i, (name, task) in enumerate(zip(("a", "b"), task_names, strict=True)):
        tx.randomise(pop, name, 30 + i)
        pop.agents[name].history.append({"round": 0, "event": "trained", "task": task})
    return pop


def _story():
    texts = [Example("", f"the {w} sat on the mat and looked at the {w}") for w in ("cat", "dog", "owl", "fox")]
    return Task("story", "lm", texts, texts[:2], texts[2:])


def _update(pop, agent):
    return {m: delta(a, b) for m, (a, b) in agent_factors(pop, agent).items()}


def test_a_tuned_merge_gives_every_target_the_best_scaled_merge_of_the_sources_tasks(make_population, tx):
    pop, task = _learnt(make_population, tx), _story()
    merged = {m: 0.5 * (_update(pop, "a")[m] + _update(pop, "b")[m]) for m in _update(pop, "a")}
    enc = PromptEncoder(pop.tokenizer, 32)
    policy = Merge(start=0, scales=[0.0, 0.5, 1.0])
    policy.bind([task, Task("unmet", "lm", task.train, task.val, task.test)])  # only the sources' tasks count
    records = policy.apply(pop, 0, [], enc)
    assert [r["agent"] for r in records] == ["a", "b"] and "a-unscaled" not in pop.agents
    rec = records[0]
    assert rec["val_tasks"] == ["story"] and list(rec["val_scores"]) == ["0.0", "0.5", "1.0"]
    ppl = {lam: s["story"] for lam, s in rec["val_scores"].items()}
    assert len(set(ppl.values())) == 3 and rec["scale"] == min([0.0, 0.5, 1.0], key=lambda lam: ppl[str(lam)])
    for agent in ("a", "b"):  # both hold scale·merge
        got = _update(pop, agent)
        for m in merged:
            torch.testing.assert_close(got[m], rec["scale"] * merged[m], atol=1e-5, rtol=1e-5)
    pop.activate("a")  # the recorded score is the target's with λ·merge
    assert evaluate(pop.model, enc, task, "val") == pytest.approx(ppl[str(rec["scale"])], rel=1e-5)
    untuned = _learnt(make_population, tx)
    (plain,) = Merge(start=0, targets=["a"]).apply(untuned, 0, [], enc)
    assert "scale" not in plain  # without scales: the merge at 1, nothing scored


def test_each_merge_method_is_tuned_on_its_own(make_population, tx):
    pop, task = _learnt(make_population, tx), _story()
    enc = PromptEncoder(pop.tokenizer, 32)
    policy = MergeMethods(methods=["exact", "ties"], start=0, density=0.5, scales=[0.5, 1.0, 2.0])
    policy.bind([task])
    records = {r["method"]: r for r in policy.apply(pop, 0, [], enc)}
    assert set(records) == {"exact", "ties"} and not any(n.endswith("-unscaled") for n in pop.names)
    for method, rec in records.items():
        ppl = {lam: s["story"] for lam, s in rec["val_scores"].items()}
        assert rec["scale"] == min([0.5, 1.0, 2.0], key=lambda lam: ppl[str(lam)]) and rec["merge_s"] > 0
        reference = make_population(["a", "b"], {"r": 4, "alpha": 8})  # the same sources, merged at 1 here
        for i, name in enumerate(("a", "b")):
            tx.randomise(reference, name, 30 + i)
        merge_adapters(reference, ["a", "b"], [0.5, 0.5], "m", method, density=0.5, seed=0)
        want, got = _update(reference, "m"), _update(pop, f"merged_{method}")
        for m in want:
            torch.testing.assert_close(got[m], rec["scale"] * want[m], atol=1e-5, rtol=1e-5)


def test_a_tuned_merge_without_validation_data_names_the_tasks(make_population, tx):
    pop, task = _learnt(make_population, tx), _story()
    policy = Merge(start=0, scales=[1.0])
    policy.bind([Task("story", "lm", task.train, [], task.test)])
    with pytest.raises(ValueError, match=r"tasks \['story'\] have no validation split"):
        policy.apply(pop, 0, [], PromptEncoder(pop.tokenizer, 32))
    policy.bind([])  # the sources' tasks are not in the stream
    with pytest.raises(ValueError, match="no task to tune the merge into 'a' on"):
        policy.apply(pop, 0, [], PromptEncoder(pop.tokenizer, 32))


def test_a_run_tunes_its_between_round_merge_on_the_stream_tasks(run_lmas, tmp_path):
    results = run_lmas(["model=tiny", "debug=fast", "logger=csv", "population.agents=2", "transfer=merge",
                        "transfer.scales=[0,1]", f"paths.output_dir={tmp_path}"], tmp_path / "run")  # fmt: skip
    merges = [e for e in results["agents"]["agent0"]["history"] if e["event"] == "merge"]
    assert merges and all(e["scale"] in (0.0, 1.0) for e in merges)
    first = merges[0]  # before round 1: the sources trained the stream's first task
    assert first["round"] == 1 and first["val_tasks"] == [results["tasks"][0]["name"]]
