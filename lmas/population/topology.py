"""Topologies: who talks to whom, and how the population answers as a whole.

A topology does two things in each round of the loop:

* :meth:`Topology.exchange` after the agents have trained: knowledge moving between agents
  (peer-to-peer adapter exchange), as :class:`~lmas.population.messages.Message` objects;
* :meth:`Topology.answer` during evaluation: the population's answer to a task, recorded as the
  ``"population"`` row of the knowledge matrix.

The topologies:

* :class:`Topology` (``none``) — agents work alone; no population answer.
* :class:`MasterWorker` — a coordinator (pair it with the ``Competence`` allocation) assigns tasks;
  the workers send it their label distributions and it fuses them (``fusion``).
* :class:`PeerToPeer` — after each round every agent sends its adapter to its neighbours
  (``ring``, ``all_to_all`` or random ``gossip``) and merges what it receives with its own
  (the exact weighted sum of the agents' whole updates; exact up to ``max_rank``, beyond it cut by
  truncated SVD, with the relative residual recorded per merge); peers answer by a fused vote.
* :class:`Hierarchical` — a cascade: the first agent answers when its top label probability
  reaches ``threshold``, otherwise the example escalates to the next agent; the escalation rate
  is logged.

Classification tasks are fused from label distributions. Generation and perplexity tasks have
no label distribution to fuse: every topology routes them to the agent with the best validation
score (what a coordinator or a cascade can do without one). A fused answer's info carries its predicted labels
(:data:`PREDICTIONS`), from which the evaluator keeps the population row's per-example outcomes.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lmas.data.task import Task
from lmas.population.fusion import FUSIONS, NEEDS_VAL, cascade, fuse
from lmas.population.messages import COORDINATOR, Message, MessageLog
from lmas.transfer.merge import agent_factors, stack_sets, write_knowledge

if TYPE_CHECKING:
    from lmas.population.population import Population

GRAPHS = ("ring", "all_to_all", "gossip")
PREDICTIONS = "predictions"  # an answer's info key: the (N,) predicted label indices (the evaluator's records)


@dataclass
class TaskView:
    """What the loop knows about one task when the population answers it.

    Attributes:
        task: the task.
        agents: the agents evaluated this round (population order).
        values: each agent's test metric.
        logprobs: classification only: test label log-likelihoods ``(A, N, L)``.
        gold: classification only: the gold label index of every test example ``(N,)``.
        val_score: an agent's metric on the validation split (computed on demand, cached).
        split: the split the values and log-likelihoods were computed on.
        higher_is_better: the metric's direction (False for perplexity).
    """

    task: Task
    agents: list[str]
    values: dict[str, float]
    logprobs: Tensor | None
    gold: Tensor | None
    val_score: Callable[[str], float]
    split: str = "test"
    higher_is_better: bool = True


class Topology:
    """No communication: agents learn alone and the population gives no joint answer."""

    name = "none"
    answers = False  # whether :meth:`answer` gives a ``population`` row

    def exchange(self, population: Population, round_idx: int, senders: list[str], log: MessageLog) -> list[dict]:
        """Move knowledge between agents after round ``round_idx``; one record per agent written."""
        return []

    def answer(self, view: TaskView, round_idx: int, log: MessageLog) -> tuple[float, dict] | None:
        """The population's metric on ``view.task`` and details for the logs (None: no answer)."""
        return None

    def describe(self) -> dict:
        return {"name": self.name}

    def check(self, agents: list[str]) -> None:
        """Raise a clear error if the topology's options do not fit the population's agents."""

    # --- shared pieces -------------------------------------------------------------------
    @staticmethod
    def route(view: TaskView, round_idx: int, log: MessageLog, receiver: str = COORDINATOR) -> tuple[float, dict]:
        """Answer with the agent whose validation score is best (each agent reports its score)."""
        scores = {}
        for a in view.agents:
            scores[a] = view.val_score(a)
            log.send(Message("report", a, receiver, round_idx, scores[a]))
        sign = 1.0 if view.higher_is_better else -1.0
        best = max(view.agents, key=lambda a: sign * scores[a])
        return view.values[best], {"routed_to": best, "val_scores": scores}

    @staticmethod
    def accuracy(probs: Tensor, gold: Tensor) -> float:
        return (probs.argmax(-1) == gold).float().mean().item()


class MasterWorker(Topology):
    """A coordinator fuses its workers' label distributions (``fusion``: see :mod:`lmas.population.fusion`)."""

    name = "master_worker"
    answers = True

    def __init__(self, fusion: str = "val_acc") -> None:
        if fusion not in FUSIONS:
            raise ValueError(f"topology.fusion={fusion!r}: expected one of {FUSIONS}")
        self.fusion = fusion

    def describe(self) -> dict:
        return {"name": self.name, "fusion": self.fusion}

    def answer(self, view: TaskView, round_idx: int, log: MessageLog) -> tuple[float, dict]:
        if view.logprobs is None or view.gold is None:  # no label distribution (not a classification task)
            return self.route(view, round_idx, log)
        for i, a in enumerate(view.agents):
            log.send(Message("label_distribution", a, COORDINATOR, round_idx, view.logprobs[i].float()))
        val = None
        if self.fusion in NEEDS_VAL:
            val = [view.val_score(a) for a in view.agents]
            for a, v in zip(view.agents, val, strict=True):
                log.send(Message("report", a, COORDINATOR, round_idx, v))
        probs = fuse(view.logprobs, self.fusion, val)
        return self.accuracy(probs, view.gold), {"fusion": self.fusion, "val_acc": val, PREDICTIONS: probs.argmax(-1)}


class PeerToPeer(Topology):
    """Peers exchange adapters with their neighbours after every ``every``-th round.

    Args:
        graph: ``ring`` (each agent receives from the agents before and after it),
            ``all_to_all``, or ``gossip`` (each agent sends to ``fanout`` random peers per round).
        self_weight: share of an agent's own ``ΔW`` in its merge; the received adapters share the
            rest equally. An agent that has learnt nothing yet takes the mean of what it receives.
        fanout: peers each agent gossips to (``gossip`` only).
        every: exchange period in rounds.
        fusion: how peers vote on an answer (``uniform`` by default).
        seed: the gossip's random choices (round ``r`` uses ``seed`` and ``r``).
        max_rank: the largest rank a receiver's trainable adapter may grow to so that the merge
            stays exact (the rank of a merge is the sum of the ranks); None keeps its LoRA rank
            ``r`` (a rank-r approximation of the merge).

    Only agents that have learnt something (trained or received) send. An agent sends its whole
    update ``ΔW`` (the sum of ALL its adapters, :func:`~lmas.transfer.merge.agent_factors`); the
    receiver's update becomes ``w_own ΔW_own + Σ_p w_p ΔW_p`` (exact sum of products), written by
    :func:`~lmas.transfer.merge.write_knowledge` with ``keep = w_own``: its frozen task adapters
    are scaled by ``w_own`` (exact) and its trainable adapter takes ``w_own ΔW_trainable + Σ_p
    w_p ΔW_p``, whose stacked rank is ``r + Σ_p rank_p``. With ``max_rank`` the adapter grows to
    that rank, up to ``max_rank``, and the merge is exact; beyond the cap (and always without
    ``max_rank``) it is cut by truncated SVD to the best approximation of that rank (Eckart–Young).
    Each record carries ``residual``, the largest relative Frobenius error ``‖cut‖_F/‖ΔW‖_F`` of
    the written trainable update over modules (0 = exact), and ``rank``, the adapter's rank after
    the merge; the loop logs it as ``transfer/<agent>/merged_residual``.
    """

    name = "peer_to_peer"
    answers = True

    def __init__(
        self,
        graph: str = "ring",
        self_weight: float = 0.5,
        fanout: int = 1,
        every: int = 1,
        fusion: str = "uniform",
        seed: int = 0,
        max_rank: int | None = None,
    ) -> None:
        if graph not in GRAPHS:
            raise ValueError(f"topology.graph={graph!r}: expected one of {GRAPHS}")
        if not 0.0 <= self_weight <= 1.0:
            raise ValueError(f"topology.self_weight={self_weight}: must be in [0, 1]")
        if fanout < 1 or every < 1:
            raise ValueError("topology: fanout and every must be >= 1")
        if fusion not in FUSIONS or fusion in NEEDS_VAL:
            raise ValueError(
                f"topology.fusion={fusion!r}: peers vote with one of {[f for f in FUSIONS if f not in NEEDS_VAL]}"
            )
        if max_rank is not None and max_rank < 1:
            raise ValueError(f"topology.max_rank={max_rank}: must be >= 1 (null keeps the LoRA rank)")
        self.graph, self.self_weight, self.fanout, self.every = graph, self_weight, fanout, every
        self.fusion, self.seed, self.max_rank = fusion, seed, max_rank

    def describe(self) -> dict:
        return {
            "name": self.name,
            "graph": self.graph,
            "self_weight": self.self_weight,
            "fanout": self.fanout,
            "every": self.every,
            "fusion": self.fusion,
            "max_rank": self.max_rank,
        }

    def neighbours(self, agents: list[str], round_idx: int) -> dict[str, list[str]]:
        """``receiver -> senders`` of one exchange."""
        n = len(agents)
        if n < 2:
            return {}
        if self.graph == "all_to_all":
            return {a: [b for b in agents if b != a] for a in agents}
        if self.graph == "ring":
            out = {}
            for i, a in enumerate(agents):
                out[a] = list(dict.fromkeys([agents[(i - 1) % n], agents[(i + 1) % n]]))
            return out
        rng = random.Random(self.seed * 1_000_003 + round_idx)
        incoming: dict[str, list[str]] = {a: [] for a in agents}
        for a in agents:
            for b in rng.sample([x for x in agents if x != a], min(self.fanout, n - 1)):
                incoming[b].append(a)
        return {b: sorted(s, key=agents.index) for b, s in incoming.items() if s}

    def exchange(self, population: Population, round_idx: int, senders: list[str], log: MessageLog) -> list[dict]:
        if (round_idx + 1) % self.every:
            return []
        agents = population.names
        snapshot = {a: agent_factors(population, a) for a in senders}
        plans = []
        for receiver, peers in self.neighbours(agents, round_idx).items():
            peers = [p for p in peers if p in snapshot]
            if not peers:
                continue
            got = [log.send(Message("adapter", p, receiver, round_idx, snapshot[p])) for p in peers]
            own = receiver in snapshot
            w_own = self.self_weight if own else 0.0
            w_peer = [(1.0 - w_own) / len(got)] * len(got)
            incoming = stack_sets([m.payload for m in got], w_peer)  # exact: Σ_p w_p ΔW_p
            plans.append((receiver, peers, w_own, ([w_own] if own else []) + w_peer, incoming))
        records = []
        for receiver, peers, w_own, weights, incoming in plans:  # write after every merge is computed
            residual = write_knowledge(
                population, receiver, incoming, keep=w_own, seed=self.seed, max_rank=self.max_rank
            )
            records.append(
                {
                    "round": round_idx,
                    "event": "merged",
                    "agent": receiver,
                    "method": "exact",
                    "sources": ([receiver] if receiver in snapshot else []) + peers,
                    "weights": weights,
                    "via": f"{self.name}/{self.graph}",
                    "residual": residual,
                    "rank": population.lora_of(population.agents[receiver].trainable).r,
                }
            )
        return records

    def answer(self, view: TaskView, round_idx: int, log: MessageLog) -> tuple[float, dict]:
        if view.logprobs is None or view.gold is None:  # no label distribution (not a classification task)
            return self.route(view, round_idx, log, receiver="peers")
        for i, a in enumerate(view.agents):
            for b in view.agents:
                if b != a:
                    log.send(Message("label_distribution", a, b, round_idx, view.logprobs[i].float()))
        probs = fuse(view.logprobs, self.fusion)
        return self.accuracy(probs, view.gold), {"fusion": self.fusion, PREDICTIONS: probs.argmax(-1)}


class Hierarchical(Topology):
    """A confidence cascade over ``order`` (default: population order).

    The first agent answers an example when its top label probability is at least ``threshold``;
    otherwise the example (its prompt) escalates to the next agent, and so on; the last agent
    always answers. The share of escalated examples is logged per task and round.
    """

    name = "hierarchical"
    answers = True

    def __init__(self, threshold: float = 0.7, order: list[str] | None = None) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"topology.threshold={threshold}: must be in [0, 1]")
        self.threshold, self.order = threshold, order

    def describe(self) -> dict:
        return {"name": self.name, "threshold": self.threshold, "order": self.order}

    def check(self, agents: list[str]) -> None:
        unknown = [a for a in self.order or [] if a not in agents]
        if unknown:
            raise ValueError(f"topology.order: unknown agents {unknown}; the population has {agents}")

    def answer(self, view: TaskView, round_idx: int, log: MessageLog) -> tuple[float, dict]:
        listed = [a for a in (self.order or []) if a in view.agents]
        order = listed + [a for a in view.agents if a not in listed]  # agents not listed come last
        if view.logprobs is None or view.gold is None:  # no label distribution (not a classification task)
            return self.route(view, round_idx, log)
        idx = torch.tensor([view.agents.index(a) for a in order])
        pred, level = cascade(view.logprobs[idx], self.threshold)
        examples = getattr(view.task, view.split)
        for k in range(1, len(order)):  # examples passed from level k-1 to level k
            up = [examples[n] for n in (level >= k).nonzero().flatten().tolist()]
            if up:
                log.send(Message("examples", order[k - 1], order[k], round_idx, up))
        counts = {a: int((level == k).sum()) for k, a in enumerate(order)}
        rate = float((level > 0).float().mean()) if len(order) > 1 else 0.0
        return float((pred == view.gold).float().mean()), {
            "order": order,
            "answered_by": counts,
            "escalation_rate": rate,
            "threshold": self.threshold,
            PREDICTIONS: pred,
        }
