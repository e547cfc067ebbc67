"""General-ability probes from the config group (conf/probes/): built, attached, and refused where they overlap."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate

from lmas.data.probes import probes


def test_the_general_probes_are_the_packaged_tasks_test_splits(compose):
    cfg = compose(["probes=general"])
    built = instantiate(cfg.probes, _convert_="all")
    assert [(p.name, p.metric, len(p.test), p.meta["probe"]) for p in built] == [
        ("probe_bbc", "accuracy", 100, True), ("probe_chat", "accuracy", 100, True),
        ("probe_math", "exact_match", 100, True),
    ]  # fmt: skip
    assert [len(p.test) for p in probes(built, max_test=7)] == [7, 7, 7]
    assert instantiate(compose([]).probes, _convert_="all") == []  # none by default


def test_general_probes_are_refused_on_a_stream_that_trains_the_same_tasks(compose):
    cfg = compose(["probes=general"])
    stream = instantiate(cfg.stream, _convert_="all")  # the default stream: bbc, chat, math
    with pytest.raises(ValueError, match="probe 'probe_bbc' shares .* prompts with the stream's tasks"):
        stream.with_probes(instantiate(cfg.probes, _convert_="all"))


def test_probes_need_tasks():
    with pytest.raises(TypeError, match="probes.tasks: expected tasks"):
        probes([{"name": "x"}])  # type: ignore[list-item]
