"""Typed messages between agents, and the log that counts them per round.

Everything that moves between agents (or between an agent and the coordinator) is a
:class:`Message`: adapter weights, label distributions, pseudo-labelled or escalated examples, task
assignments and scalar reports. The loop hands each one to :meth:`MessageLog.send`, which keeps
the count and the bytes per round and kind; ``results.json`` and the tracker get the totals.

Bytes are the payload's real size: tensors ``numel * element_size``, text its UTF-8 length,
examples their prompt and answer, numbers 8 bytes; containers add up their items.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from lmas.data.task import Example

Kind = Literal["adapter", "label_distribution", "pseudo_labels", "examples", "task", "report"]
KINDS: tuple[str, ...] = ("adapter", "label_distribution", "pseudo_labels", "examples", "task", "report")
COORDINATOR = "coordinator"


def nbytes(payload: Any) -> int:
    """Size in bytes of a message payload (see the module docstring)."""
    if payload is None:
        return 0
    if isinstance(payload, Tensor):
        return payload.numel() * payload.element_size()
    if isinstance(payload, (bytes, bytearray)):
        return len(payload)
    if isinstance(payload, str):
        return len(payload.encode("utf-8"))
    if isinstance(payload, Example):
        return nbytes(payload.prompt) + nbytes(payload.answer)
    if isinstance(payload, (bool, int, float)):
        return 8
    if isinstance(payload, dict):
        return sum(nbytes(k) + nbytes(v) for k, v in payload.items())
    if isinstance(payload, (list, tuple)):
        return sum(nbytes(x) for x in payload)
    raise TypeError(f"message payload of type {type(payload).__name__} has no defined size")


@dataclass(frozen=True)
class Message:
    """One transfer of knowledge or work from ``sender`` to ``receiver`` in round ``round``."""

    kind: Kind
    sender: str
    receiver: str
    round: int
    payload: Any = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"message kind {self.kind!r} is not one of {KINDS}")

    @property
    def nbytes(self) -> int:
        return nbytes(self.payload)


class MessageLog:
    """Counts messages and bytes per round and kind; keeps no payloads (they can be large)."""

    def __init__(self) -> None:
        self._count: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._bytes: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def send(self, message: Message) -> Message:
        """Record ``message`` and return it (so the receiver can read the payload)."""
        self._count[message.round][message.kind] += 1
        self._bytes[message.round][message.kind] += message.nbytes
        return message

    def round_summary(self, round_idx: int) -> dict:
        """``{"messages", "bytes", "by_kind": {kind: {"messages", "bytes"}}}`` of one round."""
        counts, sizes = self._count.get(round_idx, {}), self._bytes.get(round_idx, {})
        return {
            "messages": int(sum(counts.values())),
            "bytes": int(sum(sizes.values())),
            "by_kind": {k: {"messages": counts[k], "bytes": sizes[k]} for k in KINDS if counts.get(k)},
        }

    def to_list(self, n_rounds: int) -> list[dict]:
        """One :meth:`round_summary` per round ``0..n_rounds-1``."""
        return [self.round_summary(r) for r in range(n_rounds)]

    def state_dict(self) -> dict:
        return {
            "count": {str(r): dict(k) for r, k in self._count.items()},
            "bytes": {str(r): dict(k) for r, k in self._bytes.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        for key, target in (("count", self._count), ("bytes", self._bytes)):
            target.clear()
            for r, kinds in state[key].items():
                target[int(r)].update({k: int(v) for k, v in kinds.items()})
