"""RunState: one object that checkpoint, resume and results.json use; to_dict/from_dict round-trips it."""

from __future__ import annotations

import json

import numpy as np
import torch

from lmas.metrics.knowledge import KnowledgeMatrix
from lmas.population.messages import Message
from lmas.state import RunState


def _state() -> RunState:
    m = KnowledgeMatrix(["a", "b"], ["t0", "t1"], {"t0": "accuracy", "t1": "perplexity"})
    m.record_initial("a", "t0", 0.25)
    m.start_round()
    m.record(0, "a", "t0", 0.75)
    m.mark_trained(0, "a", "t0")
    state = RunState(m, step=7, assignments=[[("a", 0)]], answers=[{"t0": {"value": 0.5}}],
                     events=[{"agent": "b", "event": "merged", "round": 0, "residual": 0.1}],
                     curves={"a/t0": [[0, 0.2], [2, 0.6]]}, loss_curves={"a/t0": [1.5, 1.25]},
                     similarity=[{"round": 0, "weights": {"a~b": 0.3}}], library=[{"round": 0, "units": 1, "bytes": 8}],
                     truncated=3,
                     body={"cycles": [{"cycle": 0, "accepted": True}]})
    state.messages.send(Message("adapter", "a", "b", 0, {"x": torch.zeros(4)}))
    state.timings["train_s"] = 2.0
    return state


def test_to_dict_is_json_and_from_dict_restores_every_field():
    state = _state()
    d = json.loads(json.dumps(state.to_dict()))  # JSON-safe
    back = RunState.from_dict(d)
    for name in ("step", "assignments", "answers", "events", "curves", "loss_curves", "similarity", "library",
                 "truncated", "body"):
        assert getattr(back, name) == getattr(state, name), name
    assert back.timings == state.timings
    assert back.messages.state_dict() == state.messages.state_dict()
    np.testing.assert_array_equal(back.matrix.values(), state.matrix.values())
    assert back.matrix.trained() == state.matrix.trained()
    assert back.wall_before == d["wall_s"] >= 0.0


def test_results_carry_the_state_under_results_json_names():
    state = _state()
    out = state.results(["t0", "t1"])
    assert out["assignments"] == [[["a", "t0"]]]
    assert out["communication"][0]["by_kind"]["adapter"]["messages"] == 1
    assert out["truncated_prompts"] == 3 and out["learning_curves"] == state.curves and out["library"] == state.library
    assert out["metrics"] == state.matrix.summaries()


def test_timed_adds_the_block_s_wall_time():
    state = _state()
    with state.timed("eval_s"):
        pass
    assert state.timings["eval_s"] >= 0.0 and state.timings["train_s"] == 2.0
