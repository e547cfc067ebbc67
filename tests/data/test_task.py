"""Split functions, Task validation and Stream.label_space."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from lmas.data.stream import Stream
from lmas.data.task import Example, Task, split_examples, stratified_split


def _rows(n: int, labels: tuple[str, ...] = ("a", "b", "c")) -> list[Example]:
    return [Example(f"x{i}", labels[i % len(labels)]) for i in range(n)]


def _cls(name: str, labels: list[str], n: int = 6) -> Task:
    rows = [Example(f"{name}-{i}", labels[i % len(labels)]) for i in range(n)]
    return Task(name, "classification", rows, [], rows[:2], labels=labels)


def _gen(name: str) -> Task:
    rows = [Example(f"{name}-q{i}", f"{i}") for i in range(4)]
    return Task(name, "generation", rows, [], rows[:1])


# ---------------------------------------------------------------- split_examples


def test_split_examples_sizes_disjoint_and_deterministic():
    rows = _rows(100)
    train, val, test = split_examples(rows, 50, 10, 20, seed=3)
    assert (len(train), len(val), len(test)) == (50, 10, 20)
    prompts = [ex.prompt for ex in train + val + test]
    assert len(set(prompts)) == 80
    assert split_examples(rows, 50, 10, 20, seed=3) == (train, val, test)
    assert split_examples(rows, 50, 10, 20, seed=4)[2] != test


def test_split_examples_ignores_global_rng():
    rows = _rows(60)
    random.seed(1)
    first = split_examples(rows, 30, 10, 10, seed=0)
    random.seed(2)
    assert split_examples(rows, 30, 10, 10, seed=0) == first


def test_split_examples_growing_train_keeps_eval_splits():
    rows = _rows(100)
    small = split_examples(rows, 10, 10, 20, seed=0)
    big = split_examples(rows, 70, 10, 20, seed=0)
    assert big[1] == small[1] and big[2] == small[2]
    assert big[0][:10] == small[0]


def test_split_examples_too_few_names_task_and_counts():
    with pytest.raises(ValueError, match=r"task 'toy': needs 12 examples .* only 10"):
        split_examples(_rows(10), 8, 2, 2, seed=0, name="toy")


# ---------------------------------------------------------------- stratified_split


def test_stratified_split_balances_every_split():
    rows = _rows(90)  # 30 per label
    train, val, test = stratified_split(rows, 30, 15, 30, seed=0)
    assert Counter(ex.answer for ex in test) == {"a": 10, "b": 10, "c": 10}
    assert Counter(ex.answer for ex in val) == {"a": 5, "b": 5, "c": 5}
    assert Counter(ex.answer for ex in train) == {"a": 10, "b": 10, "c": 10}
    assert len({ex.prompt for ex in train + val + test}) == 75


def test_stratified_split_deterministic_and_seed_dependent():
    rows = _rows(90)
    assert stratified_split(rows, 30, 15, 30, seed=5) == stratified_split(rows, 30, 15, 30, seed=5)
    assert stratified_split(rows, 30, 15, 30, seed=5)[2] != stratified_split(rows, 30, 15, 30, seed=6)[2]


def test_stratified_split_unbalanced_source_still_uses_rare_label():
    rows = [Example(f"a{i}", "a") for i in range(50)] + [Example(f"b{i}", "b") for i in range(4)]
    train, val, test = stratified_split(rows, 20, 0, 6, seed=0)
    assert Counter(ex.answer for ex in test) == {"a": 3, "b": 3}
    assert Counter(ex.answer for ex in train)["b"] == 1  # the last b; then only a's are left


def test_stratified_split_errors():
    with pytest.raises(ValueError, match="needs 10 examples .* only 9"):
        stratified_split(_rows(9), 5, 2, 3, seed=0)
    with pytest.raises(ValueError, match="only 0"):
        stratified_split([], 1, 0, 1, seed=0)


# ---------------------------------------------------------------- Task


def test_task_metric_and_limited():
    task = _cls("t", ["a", "b"], n=10)
    assert task.metric == "accuracy"
    assert _gen("g").metric == "exact_match"
    small = task.limited(max_train=3, max_eval=1)
    assert (len(small.train), len(small.test)) == (3, 1)
    assert small.train == task.train[:3] and small.labels == task.labels
    assert len(task.train) == 10  # the original is unchanged


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "regression"}, "kind='regression' is not one of"),
        ({"labels": None}, "needs a non-empty `labels`"),
        ({"labels": ["a", "a", "b"]}, "duplicates"),
        ({"labels": ["a"]}, r"train answers \['b'\] are not in labels"),
        ({"train": []}, "the train split is empty"),
        ({"test": []}, "the test split is empty"),
    ],
)
def test_task_validation(kwargs, message):
    rows = [Example("p1", "a"), Example("p2", "b")]
    args = {"name": "t", "kind": "classification", "train": rows, "val": [], "test": rows, "labels": ["a", "b"]}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        Task(**args)


def test_class_labels_of_a_classification_task_and_error_for_other_kinds():
    assert _cls("t", ["b", "a"]).class_labels == ["b", "a"]
    with pytest.raises(ValueError, match="task 'g' is a generation task; only classification tasks have labels"):
        _gen("g").class_labels


def test_task_allows_empty_val_and_lm_without_labels():
    rows = [Example("", "some text")]
    task = Task("lm", "lm", rows, [], rows)
    assert task.metric == "perplexity" and task.labels is None


# ---------------------------------------------------------------- Stream


def test_label_space_task_scenario_is_own_labels():
    stream = Stream("s", [_cls("t1", ["a", "b"]), _cls("t2", ["c", "d"]), _gen("g")], scenario="task")
    assert stream.label_space(0, seen=2) == ["a", "b"]
    assert stream.label_space(1, seen=0) == ["c", "d"]
    assert stream.label_space(2, seen=2) is None


def test_label_space_class_scenario_is_union_so_far():
    stream = Stream(
        "s", [_cls("t1", ["a", "b"]), _cls("t2", ["c", "b"]), _gen("g"), _cls("t3", ["e"])], scenario="class"
    )
    assert stream.label_space(0, seen=0) == ["a", "b"]
    assert stream.label_space(0, seen=1) == ["a", "b", "c"]  # old task scored over new classes too
    assert stream.label_space(1, seen=0) == ["a", "b", "c"]  # forward transfer includes own labels
    assert stream.label_space(3, seen=3) == ["a", "b", "c", "e"]
    assert stream.label_space(0, seen=3) == ["a", "b", "c", "e"]
    assert stream.label_space(2, seen=3) is None


def test_label_space_domain_and_shuffled_order():
    tasks = [_cls("t1", ["x", "y"]), _cls("t2", ["x", "y"]), _cls("t3", ["z"])]
    assert Stream("d", tasks, scenario="domain").label_space(2, seen=2) == ["z"]
    shuffled = Stream("c", tasks, scenario="class", order="shuffle", seed=1)
    assert sorted(shuffled.task_names) == ["t1", "t2", "t3"]
    union = []
    for t in shuffled.tasks:
        union += [lab for lab in t.labels if lab not in union]
    assert shuffled.label_space(0, seen=2) == union  # stream order, not construction order


def test_stream_validation_and_caps():
    with pytest.raises(ValueError, match="repeated"):
        Stream("s", [_gen("g"), _gen("g")])
    with pytest.raises(ValueError, match="scenario"):
        Stream("s", [_gen("g")], scenario="online")
    capped = Stream("s", [_cls("t1", ["a", "b"], n=10)], max_train=4, max_eval=1)
    assert len(capped[0].train) == 4 and len(capped[0].test) == 1


def test_describe_carries_the_loaders_notes_into_results():
    rows = [Example("q", "a")]
    task = Task("t", "generation", rows, [], rows, meta={"split_note": "test cut from train", "answers": [["a"]]})
    d = task.describe()
    assert d["split_note"] == "test cut from train" and "answers" not in d
    assert (d["n_train"], d["n_val"], d["n_test"], d["metric"]) == (1, 0, 1, "exact_match")
    # the test items' fingerprint: the same items give the same digest, any other item or order another
    assert d["test_digest"] == Task("u", "generation", rows, [], [Example("q", "a")]).describe()["test_digest"]
    for other in ([Example("q", "b")], [Example("q", "a", ("a", "c"))], [Example("q", "a")] * 2, [Example("p", "a")]):
        assert Task("t", "generation", rows, [], other).describe()["test_digest"] != d["test_digest"]
