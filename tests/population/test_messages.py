"""Typed messages: real payload sizes, per-round counts and bytes."""

from __future__ import annotations

import pytest
import torch

from lmas.data.task import Example
from lmas.population.messages import Message, MessageLog, nbytes


def test_payload_sizes_are_the_real_sizes():
    assert nbytes(torch.zeros(3, 4)) == 48  # float32
    assert nbytes(torch.zeros(3, dtype=torch.float16)) == 6
    assert nbytes("héllo") == 6  # UTF-8
    assert nbytes(Example("ab", "c")) == 3
    assert nbytes({"w": (torch.zeros(2), torch.zeros(1, 2))}) == 1 + 8 + 8
    assert nbytes(0.5) == 8 and nbytes(None) == 0
    with pytest.raises(TypeError, match="no defined size"):
        nbytes(object())


def test_log_counts_messages_and_bytes_per_round_and_kind():
    log = MessageLog()
    log.send(Message("adapter", "a", "b", 0, torch.zeros(10)))
    log.send(Message("adapter", "b", "a", 0, torch.zeros(10)))
    log.send(Message("report", "a", "coordinator", 0, 1.0))
    log.send(Message("examples", "a", "b", 1, [Example("xy", "z")]))
    r0 = log.round_summary(0)
    assert r0 == {"messages": 3, "bytes": 88,
                  "by_kind": {"adapter": {"messages": 2, "bytes": 80}, "report": {"messages": 1, "bytes": 8}}}
    assert log.round_summary(1)["bytes"] == 3
    assert log.to_list(3)[2] == {"messages": 0, "bytes": 0, "by_kind": {}}


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="message kind 'gossip'"):
        Message("gossip", "a", "b", 0)
