"""An agent's history: typed events, one per thing that happened to it in a round.

An :class:`Event` has a round, a kind (``event``: ``trained``, ``merged``, ``merge_init``, ``lorahub``,
``merge_methods``, ``rejected``, ...), the task it concerns, the agents it came from (``sources``) and the
kind's own details (``steps``, ``examples``, ``residual``, ``method``, ``teachers``, ...). Its JSON form
(:meth:`Event.to_dict`, what results.json and checkpoints hold) is one flat mapping; the event also reads as
that mapping (``e["task"]``, ``e.get("residual")``), so code and tools that read results.json read events
the same way. :class:`History` is an agent's list of events: dicts appended to it become events.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, SupportsIndex

_FIELDS = ("round", "event", "task", "sources")


@dataclass
class Event:
    """One entry of an agent's history (module docstring)."""

    round: int
    event: str
    task: str | None = None
    sources: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Event | Mapping[str, Any]) -> Event:
        """The event of a flat mapping (its JSON form); ``event`` is required, ``round`` defaults to -1."""
        if isinstance(d, Event):
            return d
        if "event" not in d:
            raise ValueError(f"a history event needs an 'event' kind (trained, merged, ...); got {dict(d)}")
        return cls(
            int(d.get("round", -1)),
            str(d["event"]),
            d.get("task"),
            list(d.get("sources") or []),
            {k: v for k, v in d.items() if k not in _FIELDS},
        )

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON form: round, event, task and sources where set, then the details."""
        out: dict[str, Any] = {"round": self.round, "event": self.event}
        if self.task is not None:
            out["task"] = self.task
        if self.sources:
            out["sources"] = list(self.sources)
        return {**out, **self.details}

    # read access as the flat mapping (the JSON view)
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self.to_dict()

    def keys(self) -> Iterable[str]:
        return self.to_dict().keys()

    def items(self) -> Iterable[tuple[str, Any]]:
        return self.to_dict().items()


class History(list[Event]):
    """An agent's events, oldest first; a mapping appended or inserted becomes an :class:`Event`."""

    def __init__(self, events: Iterable[Event | Mapping[str, Any]] = ()) -> None:
        super().__init__(Event.from_dict(e) for e in events)

    def append(self, event: Event | Mapping[str, Any]) -> None:
        super().append(Event.from_dict(event))

    def extend(self, events: Iterable[Event | Mapping[str, Any]]) -> None:
        super().extend(Event.from_dict(e) for e in events)

    def insert(self, index: SupportsIndex, event: Event | Mapping[str, Any]) -> None:
        super().insert(index, Event.from_dict(event))

    def to_list(self) -> list[dict[str, Any]]:
        """The JSON form of every event."""
        return [e.to_dict() for e in self]
