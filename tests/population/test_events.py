"""An agent's history is typed: events with a round, a kind, a task, sources and details; JSON round trip."""

from __future__ import annotations

import json

import pytest

from lmas.population.events import Event, History
from lmas.population.population import Agent


def test_an_event_reads_and_writes_its_flat_json_form():
    d = {"round": 2, "event": "merged", "sources": ["a", "b"], "method": "exact", "residual": 0.25}
    e = Event.from_dict(d)
    assert (e.round, e.event, e.task, e.sources, e.details) == (2, "merged", None, ["a", "b"],
                                                                {"method": "exact", "residual": 0.25})
    assert e.to_dict() == d and json.loads(json.dumps(e.to_dict())) == d
    assert e["residual"] == 0.25 and e.get("task") is None and "sources" in e and "task" not in e
    trained = Event(0, "trained", "news", details={"steps": 5})
    assert trained.to_dict() == {"round": 0, "event": "trained", "task": "news", "steps": 5}
    with pytest.raises(ValueError, match="needs an 'event' kind"):
        Event.from_dict({"round": 1, "task": "x"})


def test_a_history_keeps_events_whatever_is_appended_or_assigned():
    agent = Agent("a")
    agent.history.append({"round": 0, "event": "trained", "task": "t0"})
    agent.history.extend([Event(1, "trained", "t1"), {"event": "merged", "sources": ["b"]}])
    assert all(isinstance(e, Event) for e in agent.history) and agent.history[2].round == -1
    agent.history = [{"round": 3, "event": "rejected", "undone": []}]  # e.g. restored from a checkpoint
    assert isinstance(agent.history, History) and agent.history[0].event == "rejected"
    assert agent.history.to_list() == [{"round": 3, "event": "rejected", "undone": []}]


def test_trained_tasks_are_in_first_trained_order():
    agent = Agent("a", history=History([Event(0, "trained", "t1"), Event(1, "merged", sources=["b"]),
                                        Event(2, "trained", "t0"), Event(3, "trained", "t1")]))
    assert agent.trained_tasks(["t0", "t1", "t2"]) == [1, 0]
