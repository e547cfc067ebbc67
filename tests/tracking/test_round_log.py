"""RoundLog: the one place that names the metrics of a round."""

from __future__ import annotations

from lmas.metrics.knowledge import KnowledgeMatrix
from lmas.population.messages import Message, MessageLog
from lmas.tracking.round_log import RoundLog
from lmas.tracking.trackers import Tracker


class _Recorder(Tracker):
    def __init__(self) -> None:
        self.logged: list[tuple[dict, str, int]] = []

    def log(self, metrics: dict[str, float], step_key: str, step: int) -> None:
        self.logged.append((dict(metrics), step_key, step))


def test_round_metrics_have_their_documented_names():
    m = KnowledgeMatrix(["a", "population"], ["t0"], {"t0": "accuracy"})
    m.record_initial("a", "t0", 0.5)
    m.start_round()
    m.record(0, "a", "t0", 0.75)
    m.record(0, "population", "t0", 0.8)
    m.mark_trained(0, "a", "t0")
    messages = MessageLog()
    messages.send(Message("adapter", "a", "b", 0, [1.0, 2.0]))
    tracker = _Recorder()
    metrics = RoundLog(tracker).round(
        0, m, messages, [{"agent": "a", "round": 0, "event": "merged", "residual": 0.25}],
        {"t0": {"value": 0.8, "escalation_rate": 0.5}}, {"weights": {"a~b": 0.1}, "predictions": {"a~b": float("nan")}})
    assert metrics["eval/a/t0"] == 0.75 and metrics["eval/population/t0"] == 0.8
    assert metrics["cl/a/avg_acc"] == 0.75
    assert metrics["comm/messages"] == 1 and metrics["comm/adapter/messages"] == 1 and metrics["comm/adapter/bytes"] > 0
    assert metrics["transfer/a/merged_residual"] == 0.25
    assert metrics["cascade/t0/escalation_rate"] == 0.5
    assert metrics["similarity/a~b/weights"] == 0.1 and "similarity/a~b/predictions" not in metrics  # NaN dropped
    assert tracker.logged == [(metrics, "round", 0)]


def test_train_loss_and_self_learning_keys():
    tracker = _Recorder()
    log = RoundLog(tracker)
    log.train_loss("agent0", 12, 1.5)
    log.self_learning(2, {"accepted": False, "tasks": {"bbc": {"coverage": 0.5, "precision": None}}})
    assert tracker.logged == [({"train/agent0/loss": 1.5}, "step", 12),
                              ({"self_learning/accepted": 0.0, "self_learning/bbc/coverage": 0.5}, "round", 2)]
