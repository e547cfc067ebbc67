"""The lineage of adapter versions, from the agents' histories (``results.json`` ``"agents"``).

A **version** ``(agent, round)`` is the agent's adapter at the end of a round in which something
happened to it (it trained, or a merge/transfer/distillation wrote into it): exactly the files
``adapters/<agent>/roundNNN-*.safetensors``. Its **parents** are

* the agent's own previous version (edge kind ``"self"``), and
* for each history event of that round that names other agents (``sources``, ``teachers``,
  ``teacher``, ``source``), each such agent's version that was written into it (edge kind = the
  event, e.g. ``merged``, ``merge_init``, ``lorahub``, ``distilled``):

  - a transfer before training (the event has a ``transfer`` key: merge, merge_init, LoraHub,
    merge_methods) used the source's latest version of an *earlier* round;
  - an exchange after training (peer-to-peer) used the source's state after this round's
    training: that is the source's version of this round when nothing was merged into the
    source in this round (then the saved version is that state), else the source's latest
    version of an earlier round (the post-training, pre-exchange state is not saved).

So every edge goes from an earlier round, or within a round from a version without an exchange
to one with an exchange: the graph is acyclic, and versions can be logged in :func:`versions`
order with every parent logged before its child (what W&B's lineage graph needs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from lmas.population.events import Event

EventLike = Event | Mapping[str, Any]  # an agent's history event, or its JSON form (results.json)

SOURCE_KEYS = ("sources", "teachers", "teacher", "source")


@dataclass
class Version:
    agent: str
    round: int
    events: list[EventLike] = field(default_factory=list)
    parents: list[tuple[str, int, str]] = field(default_factory=list)  # (agent, round, edge kind)

    @property
    def key(self) -> tuple[str, int]:
        return self.agent, self.round

    @property
    def label(self) -> str:
        """What happened, e.g. ``"chat+merged"`` (the adapter file's label)."""
        return "+".join(dict.fromkeys(e.get("task", e.get("event", "?")) for e in self.events))

    @property
    def exchanged(self) -> bool:
        return any(_sources(e) and "transfer" not in e for e in self.events)


def artifact_name(agent: str) -> str:
    """The W&B artifact (collection) of an agent's adapter versions."""
    return f"adapter-{agent}"


def alias(round_idx: int) -> str:
    return f"round{int(round_idx):03d}"


def ref(agent: str, round_idx: int) -> str:
    """``adapter-<agent>:roundNNN``: a version as a W&B artifact reference."""
    return f"{artifact_name(agent)}:{alias(round_idx)}"


def _sources(event: EventLike) -> list[str]:
    out: list[str] = []
    for key in SOURCE_KEYS:
        value = event.get(key)
        if isinstance(value, str):
            value = [value]
        for s in value or []:
            if isinstance(s, str) and s not in out:
                out.append(s)
    return out


def versions(histories: Mapping[str, Sequence[EventLike]]) -> list[Version]:
    """Every version with its parents, ordered by round; within a round, versions without an
    exchange come first (so parents always precede children)."""
    by_key: dict[tuple[str, int], Version] = {}
    for agent, history in histories.items():
        for event in history:
            if "round" not in event:
                continue
            r = int(event["round"])
            by_key.setdefault((agent, r), Version(agent, r)).events.append(event)
    rounds: dict[str, list[int]] = {}
    for agent, r in sorted(by_key, key=lambda k: k[1]):
        rounds.setdefault(agent, []).append(r)

    def before(agent: str, r: int) -> int | None:
        earlier = [x for x in rounds.get(agent, []) if x < r]
        return earlier[-1] if earlier else None

    for v in by_key.values():
        own = before(v.agent, v.round)
        if own is not None:
            v.parents.append((v.agent, own, "self"))
        for event in v.events:
            kind = str(event.get("event", "transfer"))
            for s in _sources(event):
                if s == v.agent:
                    continue
                same = by_key.get((s, v.round))
                parent: int | None
                if "transfer" not in event and same is not None and not same.exchanged:
                    parent = v.round
                else:
                    parent = before(s, v.round)
                if parent is not None and (s, parent, kind) not in v.parents:
                    v.parents.append((s, parent, kind))
    order = list(histories)
    return sorted(by_key.values(), key=lambda v: (v.round, v.exchanged, order.index(v.agent)))


def parents_of(histories: Mapping[str, Sequence[EventLike]], agent: str, round_idx: int) -> list[tuple[str, int, str]]:
    """The parents ``(agent, round, kind)`` of one version (``[]`` if it does not exist)."""
    for v in versions(histories):
        if v.key == (agent, round_idx):
            return list(v.parents)
    return []


def draw(histories: Mapping[str, Sequence[EventLike]], path_or_file: str | Path | BinaryIO, dpi: int = 100) -> bool:
    """Draw the lineage graph as a PNG: one row per agent, one column per round, a node per
    version (labelled with what happened), grey arrows from the agent's previous version,
    coloured arrows from the versions merged/distilled into it. Returns False (and draws
    nothing) when there are no versions."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    vs = versions(histories)
    if not vs:
        return False
    agents = [a for a in histories if any(v.agent == a for v in vs)]
    rounds = sorted({v.round for v in vs})
    col = {r: i for i, r in enumerate(rounds)}
    row = {a: i for i, a in enumerate(agents)}
    pos = {v.key: (col[v.round], -row[v.agent]) for v in vs}
    kinds = sorted({k for v in vs for *_, k in v.parents if k != "self"})
    palette = matplotlib.colormaps["tab10"]
    colour: dict[str, str | tuple[float, float, float, float]] = {k: palette(i % 10) for i, k in enumerate(kinds)}
    colour["self"] = "#888888"
    fig = Figure(figsize=(max(5.0, 1.9 * len(rounds) + 2.0), max(2.5, 1.0 * len(agents) + 1.4)), dpi=dpi)
    ax = fig.add_subplot()
    for v in vs:
        x1, y1 = pos[v.key]
        for pa, pr, kind in v.parents:
            if (pa, pr) not in pos:
                continue
            x0, y0 = pos[(pa, pr)]
            bend = 0.35 if x0 == x1 and abs(y0 - y1) > 1 else 0.0  # within a round: around the nodes between
            ax.annotate(
                "",
                xy=(x1, y1),
                xytext=(x0, y0),
                arrowprops=dict(
                    arrowstyle="-|>",
                    color=colour[kind],
                    lw=1.4 if kind == "self" else 1.8,
                    shrinkA=14,
                    shrinkB=14,
                    connectionstyle=f"arc3,rad={bend}",
                ),
            )
    for v in vs:
        x, y = pos[v.key]
        trained = any(e.get("event") == "trained" for e in v.events)
        ax.scatter([x], [y], s=520, color="#cfe8cf" if trained else "#dde4f0", edgecolors="black", zorder=3)
        ax.text(x, y - 0.32, v.label, ha="center", va="top", fontsize=7)
    ax.set_xticks(range(len(rounds)))
    ax.set_xticklabels([f"round {r}" for r in rounds], fontsize=8)
    ax.set_yticks([-row[a] for a in agents])
    ax.set_yticklabels(agents, fontsize=8)
    ax.set_xlim(-0.6, len(rounds) - 0.4)
    ax.set_ylim(-len(agents) + 0.4, 0.6)
    ax.set_title("adapter lineage (node = version saved that round; green: trained)", fontsize=9)
    handles = [
        Line2D([], [], color=colour[k], lw=2, label="previous version" if k == "self" else f"{k} from")
        for k in ["self", *kinds]
    ]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    fig.savefig(path_or_file, dpi=dpi, format="png")
    return True
