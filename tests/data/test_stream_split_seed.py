"""Stream.split_seed: seeds resample each task's training data from what its builder held out of the test split;
the test split never changes, so every seed of a study scores the same items."""

from __future__ import annotations

from collections import Counter

import pytest

from lmas.data.sources import bbc_topics, chatterbot_qa
from lmas.data.stream import Stream
from lmas.data.task import Example, Task


def _tasks() -> list[Task]:
    return [
        bbc_topics("bbc", topics=["business", "sports", "tech"], n_train=30, n_val=6, n_test=12, max_chars=80),
        chatterbot_qa("qa", categories=["ai", "humor"], n_train=20, n_val=4, n_test=8),
    ]


def _stream(split_seed: int | None) -> Stream:
    return Stream("s", _tasks(), split_seed=split_seed)


def test_no_split_seed_keeps_the_built_splits():
    built, stream = _tasks(), _stream(None)
    for a, b in zip(built, stream, strict=True):
        assert (a.train, a.val, a.test) == (b.train, b.val, b.test)
    assert "split_seed" not in stream.meta


def test_other_seeds_other_train_examples_same_test_items():
    s1, s2, again = _stream(1), _stream(2), _stream(1)
    assert s1.meta["split_seed"] == 1
    built = _tasks()
    for t1, t2, t1b, b in zip(s1, s2, again, built, strict=True):
        assert t1.test == t2.test == b.test  # paired: the same test items, in the same order
        assert set(t1.train) != set(t2.train)  # other examples, not only another order
        assert (t1.train, t1.val) == (t1b.train, t1b.val)  # same seed, same draw
        assert (len(t1.train), len(t1.val)) == (len(b.train), len(b.val))  # sizes kept
        held = set(t1.test)
        assert not held & (set(t1.train) | set(t1.val)) and not set(t1.train) & set(t1.val)
        assert t1.meta["resample_seed"] == 1
    # the draw reaches beyond the built train + val: BBC holds ~1,500 articles of these topics out of the test
    bbc1, bbc2, bbc0 = s1[0], s2[0], built[0]
    assert set(bbc1.train) - set(bbc0.train) - set(bbc0.val)
    # balanced over topics as bbc_topics deals them: 30 training examples = 10 per topic, in every seed
    for task in (bbc1, bbc2):
        assert Counter(ex.answer for ex in task.train) == {"business": 10, "sports": 10, "tech": 10}
        assert Counter(ex.answer for ex in task.val) == {"business": 2, "sports": 2, "tech": 2}


def test_a_task_without_a_pool_reshuffles_train_and_val():
    rows = [Example(f"q{i}", f"a{i}") for i in range(20)]
    task = Task("t", "generation", rows[:10], rows[10:14], rows[14:])
    s = Stream("s", [task], split_seed=5)
    t = s[0]
    assert set(t.train) | set(t.val) == set(rows[:14]) and t.test == rows[14:]
    assert (len(t.train), len(t.val)) == (10, 4) and set(t.val) != set(rows[10:14])


def test_caps_apply_after_the_resampling():
    s = Stream("s", _tasks(), split_seed=3, max_train=5, max_eval=4)
    full = _stream(3)
    assert s[0].train == full[0].train[:5] and s[0].test == full[0].test[:4]


@pytest.mark.parametrize("bad", ["1", 1.5, True])
def test_a_bad_split_seed_names_the_option(bad):
    with pytest.raises(ValueError, match=r"split_seed=.*expected null \(no resampling\) or an integer"):
        Stream("s", _tasks(), split_seed=bad)


def test_cl_strategies_preset_follows_seed(compose):
    from hydra.utils import instantiate

    streams = {
        seed: instantiate(compose(["experiment=cl_strategies", f"seed={seed}"]).stream, _convert_="all")
        for seed in (3, 4)
    }
    assert streams[3].meta["split_seed"] == 3 and streams[4].meta["split_seed"] == 4
    for a, b in zip(streams[3], streams[4], strict=True):
        assert a.test == b.test and set(a.train) != set(b.train)
    default = compose(["seed=3"]).stream
    assert default.split_seed is None  # other presets keep their splits unless they set it
