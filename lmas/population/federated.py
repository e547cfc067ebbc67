"""Federated fine-tuning as a round body (``loop=federated``): each task of the stream is learnt by server-client
rounds over its training data split across the agents (the clients), as FlowerTune and OpenFedLLM do with LoRA.

A loop round is one task. Inside it, ``rounds`` communication rounds: the server samples ``clients_per_round``
clients (all by default), each trains ``train.epochs`` local epochs on its shard from the global adapter (the
run's strategy; FedProx adds ``mu/2 ‖θ − θ_global‖²``), uploads its adapter, and the server aggregates and
broadcasts the result to every agent; after the last round every agent holds the global adapter, and the
loop evaluates as usual. Every upload and download is a typed message with its bytes (results.json
``communication``; per round in ``federated``).

Pure parts, tested by hand:

* :func:`partition`: IID (a seeded shuffle dealt evenly) or label skew (``alpha``: per label, client shares
  drawn from a symmetric Dirichlet(alpha); small alpha gives each client few labels, large alpha near IID).
* :func:`fedavg`: ``Σ_k n_k θ_k / Σ_k n_k`` per tensor, ``n_k`` the client's examples (FedAvg; the LoRA A and B
  matrices averaged separately, as the federated LLM frameworks do).
* :func:`fedavgm`: server momentum, ``v ← β v + (θ_global − θ_avg)``, ``θ_global ← θ_global − η v``
  (FedAvgM; ``β = 0, η = 1`` is FedAvg).
* FlexLoRA (``aggregator=flexlora``): the clients' products ``ΔW_k = s_k B_k A_k`` averaged with the same
  weights, and each client's adapter set to the best approximation of the average at its own rank (truncated
  SVD): exact in the products, and it admits clients of different ranks.
* :func:`proximal_term`: FedProx's ``mu/2 Σ ‖θ − θ_global‖²`` over the adapter's parameters.
* :func:`bytes_to_target`: per task, the bytes sent until the validation score after a server round first reaches
  ``target`` (FlowerTune's communication-to-accuracy), from the records' ``val`` (``val_curve``: the global
  model's validation score after every server round; the mean over the clients when they differ, local/FlexLoRA).

``transport``: ``inprocess`` trains the clients one after another in this process; ``flower`` trains each in its
own Flower client process (:mod:`lmas.population.flower`), the rest of the round unchanged.
"""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from lmas.data.task import HIGHER_IS_BETTER, Example, Task
from lmas.loop import RoundBody
from lmas.population.messages import COORDINATOR, Message
from lmas.strategies.base import Strategy
from lmas.strategies.compose import Compose
from lmas.transfer.factors import agent_factors, write_knowledge
from lmas.transfer.merge import exact_merge

if TYPE_CHECKING:
    from lmas.loop import ContinualLoop
    from lmas.population.population import Population
    from lmas.training.experience import IncrementalLM

log = logging.getLogger(__name__)
AGGREGATORS = ("fedavg", "fedprox", "fedavgm", "flexlora", "local")
TRANSPORTS = ("inprocess", "flower")


# --- pure functions ------------------------------------------------------------------------------
def partition(
    examples: Sequence[Example], clients: int, alpha: float | None, seed: int, labels: Sequence[str] | None = None
) -> list[list[int]]:
    """Indices of ``examples`` per client: IID (``alpha`` None) or Dirichlet label skew (``alpha`` > 0).

    Every example goes to exactly one client; deterministic in ``seed``. Label skew needs ``labels``.
    """
    if clients < 1:
        raise ValueError(f"federated: {clients} clients; need at least one")
    rng = np.random.default_rng(seed)
    if alpha is None:
        order = rng.permutation(len(examples))
        return [sorted(order[k::clients].tolist()) for k in range(clients)]
    if alpha <= 0:
        raise ValueError(f"loop.alpha={alpha}: the Dirichlet concentration must be > 0 (null: IID)")
    if labels is None:
        raise ValueError("loop.alpha: label-skew partitions need a classification task (its labels)")
    out: list[list[int]] = [[] for _ in range(clients)]
    for label in labels:
        idx = [i for i, ex in enumerate(examples) if ex.answer == label]
        rng.shuffle(idx)
        shares = rng.dirichlet([alpha] * clients)
        cuts = (np.cumsum(shares)[:-1] * len(idx)).round().astype(int)
        for k, part in enumerate(np.split(np.asarray(idx, dtype=int), cuts)):
            out[k].extend(part.tolist())
    return [sorted(p) for p in out]


def fedavg(states: Sequence[dict[str, Tensor]], sizes: Sequence[int]) -> dict[str, Tensor]:
    """The example-weighted mean of the clients' adapter states (FedAvg)."""
    total = sum(sizes)
    if not states or total <= 0 or len(states) != len(sizes):
        raise ValueError(f"fedavg: {len(states)} states with sizes {list(sizes)}")
    keys = set(states[0])
    if any(set(s) != keys for s in states):
        raise ValueError("fedavg: the clients' adapters differ in their parameters (ranks or modules)")
    weights = [n / total for n in sizes]
    return {
        k: torch.stack([w * s[k].double() for s, w in zip(states, weights, strict=True)]).sum(0).to(states[0][k].dtype)
        for k in states[0]
    }


def fedavgm(
    global_state: dict[str, Tensor], average: dict[str, Tensor], velocity: dict[str, Tensor] | None, lr: float,
    momentum: float,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:  # fmt: skip
    """One FedAvgM server step: the new global state and velocity."""
    v = {k: momentum * (velocity[k] if velocity else 0) + (global_state[k] - average[k]) for k in global_state}
    return {k: global_state[k] - lr * v[k] for k in global_state}, v


def flexlora(pop: Population, clients: Sequence[str], sizes: Sequence[int], to: Sequence[str], seed: int = 0) -> float:
    """FlexLoRA: the example-weighted mean of the clients' products ``ΔW_k``, written into every agent of ``to``
    as the best approximation at that agent's own rank (truncated SVD). Returns the largest relative residual."""
    weights = [n / sum(sizes) for n in sizes]
    merged, _ = exact_merge([agent_factors(pop, c) for c in clients], weights)
    return max(write_knowledge(pop, agent, merged, keep=0.0, seed=seed) for agent in to)


def bytes_to_target(records: Sequence[Mapping[str, Any]], target: float, lower: Collection[str] = ()) -> dict:
    """Per task of ``records`` (in order): whether the validation score reached ``target`` (at most ``target`` for
    the tasks in ``lower``: perplexity), the first server round that did, and the bytes sent up to and including it
    (all the task's bytes when it never did)."""
    out: dict[str, dict[str, Any]] = {}
    for rec in records:
        task = out.setdefault(rec["task"], {"reached": False, "fl_round": None, "bytes": 0, "val": None})
        if task["reached"]:
            continue
        task["bytes"] += rec["bytes"]
        val = rec.get("val")
        if val is not None and (val <= target if rec["task"] in lower else val >= target):
            task.update(reached=True, fl_round=rec["fl_round"], val=val)
    return out


def proximal_term(params: Mapping[str, Tensor], anchor: Mapping[str, Tensor], mu: float) -> Tensor:
    """FedProx's ``mu/2 Σ ‖θ − θ_anchor‖²``."""
    return 0.5 * mu * sum(((p - anchor[k]) ** 2).sum() for k, p in params.items())  # type: ignore[return-value]


class Proximal(Strategy):
    """FedProx's proximal term, anchored at the adapter a client's fit starts from (the global one)."""

    name = "fedprox"

    def __init__(self, mu: float) -> None:
        self.mu = mu
        self.anchor: dict[str, Tensor] = {}

    def before_task(self, module: IncrementalLM, task: Task) -> None:
        params = module.population.parameters_of(module.agent)
        self.anchor = {k: p.detach().clone() for k, p in params.items()}

    def loss_terms(self, module: IncrementalLM, batch: dict[str, Tensor], out: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"fedprox": proximal_term(module.population.parameters_of(module.agent), self.anchor, self.mu)}


# --- the round body ------------------------------------------------------------------------------
class Federated(RoundBody):
    """Server-client rounds per task (module docstring).

    Args:
        rounds: communication rounds per task.
        clients_per_round: clients sampled each round (None: every client with data).
        alpha: Dirichlet label skew of the partition (None: IID).
        aggregator: ``fedavg`` | ``fedprox`` (FedAvg plus the client's proximal term ``mu``) | ``fedavgm``
            (server momentum ``momentum``, server learning rate ``server_lr``) | ``flexlora`` | ``local`` (the
            baseline without a server: each client trains on its own shard from the common start, nothing is
            sent; the matrix's agent rows are the clients' local models).
        mu, momentum, server_lr: FedProx's and FedAvgM's settings.
        seed: the partition's and the client sampling's randomness.
        val_curve: score the validation split after every server round (records' ``val``).
        target: with ``val_curve``, the validation score whose bytes-to-reach results.json reports
            (``federated_to_target``; perplexity: lower is better).
        transport: ``inprocess`` | ``flower`` (each client a Flower client process; ``flower``: its ``address``,
            ``clients`` (``spawn`` | ``external``) and ``timeout``, :class:`lmas.population.flower.FlowerServer`).
    """

    name = "federated"

    def __init__(
        self,
        rounds: int = 3,
        clients_per_round: int | None = None,
        alpha: float | None = None,
        aggregator: str = "fedavg",
        mu: float = 0.01,
        momentum: float = 0.9,
        server_lr: float = 1.0,
        seed: int = 0,
        val_curve: bool = True,
        target: float | None = None,
        transport: str = "inprocess",
        flower: dict[str, Any] | None = None,
    ) -> None:
        if aggregator not in AGGREGATORS:
            raise ValueError(f"loop.aggregator={aggregator!r}: expected one of {AGGREGATORS}")
        if rounds < 1 or (clients_per_round is not None and clients_per_round < 1):
            raise ValueError(f"loop.rounds={rounds}, loop.clients_per_round={clients_per_round}: need >= 1")
        if alpha is not None and alpha <= 0:
            raise ValueError(f"loop.alpha={alpha}: the Dirichlet concentration must be > 0 (null: IID)")
        if mu < 0 or not 0 <= momentum < 1 or server_lr <= 0:
            raise ValueError(f"loop: need mu >= 0, 0 <= momentum < 1, server_lr > 0; got {mu}, {momentum}, {server_lr}")
        self.rounds, self.clients_per_round, self.alpha, self.aggregator = rounds, clients_per_round, alpha, aggregator
        self.mu, self.momentum, self.server_lr, self.seed = mu, momentum, server_lr, seed
        if transport not in TRANSPORTS:
            raise ValueError(f"loop.transport={transport!r}: expected one of {TRANSPORTS}")
        if transport == "flower":
            from lmas.population.flower import check_flower

            check_flower()  # before the model loads
        if target is not None and not val_curve:
            raise ValueError(f"loop.target={target}: the bytes to a target need loop.val_curve=true")
        self.val_curve, self.target = val_curve, target
        self.transport, self.flower = transport, dict(flower or {})
        self.server: Any = None

    def bind(self, loop: ContinualLoop) -> list[list[int]]:
        names = loop.population.names
        if len(names) < 2:
            raise ValueError(f"loop=federated: the population has {len(names)} agent; federated rounds need 2 or more")
        if self.alpha is not None:
            bad = [t.name for t in loop.stream if t.kind != "classification"]
            if bad:
                raise ValueError(f"loop.alpha={self.alpha}: label skew needs classification tasks, not {bad}")
        self.loop = loop
        if self.transport == "flower":
            if type(loop.strategy).state_dict is not Strategy.state_dict:
                raise ValueError(
                    f"loop.transport=flower: strategy {loop.strategy.name!r} keeps per-agent state that would live "
                    "in the client processes, outside the run's checkpoint; over Flower use a stateless strategy "
                    "(strategy=naive; loop.aggregator=fedprox adds its term in the clients) or loop.transport=inprocess"
                )
            from lmas.population.flower import FlowerServer

            opts = {"address": "127.0.0.1:0", "clients": "spawn", "timeout": 600.0, **self.flower}
            self.server = FlowerServer(loop, str(opts["address"]), str(opts["clients"]), float(opts["timeout"]))
            self.server.start()
        return [[j] for j in range(len(loop.stream))]

    @property
    def records(self) -> list[dict]:
        return self.loop.state.body.setdefault("federated", [])

    def results(self, loop: ContinualLoop) -> dict[str, Any]:
        out = {"federated": self.records, "federated_setup": self.describe()}
        if self.target is not None:
            lower = {t.name for t in loop.stream if not HIGHER_IS_BETTER[t.metric]}
            out["federated_to_target"] = bytes_to_target(self.records, self.target, lower)
        return out

    def describe(self) -> dict[str, Any]:
        keys = (
            "rounds",
            "clients_per_round",
            "alpha",
            "aggregator",
            "mu",
            "momentum",
            "server_lr",
            "target",
            "transport",
        )
        return {k: getattr(self, k) for k in keys}

    def shard(self, task: Task, client: str) -> Task:
        """``task`` with the client's share of its training examples."""
        names = self.loop.population.names
        parts = partition(task.train, len(names), self.alpha, self.seed * 7919 + sum(map(ord, task.name)),
                          task.class_labels if task.kind == "classification" else None)  # fmt: skip
        view = copy.copy(task)  # a share of a checked task (a shard may lack some labels: no warnings)
        view.train = [task.train[i] for i in parts[names.index(client)]]
        return view

    def fit_client(self, loop: ContinualLoop, client: str, j: int, r: int) -> list[float]:
        """One client's local epochs on its shard of task ``j`` from its current adapter (here, or in a Flower
        client process); returns the losses."""
        strategy = Compose([loop.strategy, Proximal(self.mu)]) if self.aggregator == "fedprox" else None
        seen = [self.shard(loop.stream[i], client) for i in range(j)]
        return loop.fit(client, self.shard(loop.stream[j], client), seen, r, strategy=strategy)

    def broadcast(self, state: dict[str, Tensor], r: int, to: Sequence[str]) -> None:
        pop, messages = self.loop.population, self.loop.state.messages
        for agent in to:
            messages.send(Message("adapter", COORDINATOR, agent, r, state))
            pop.load_adapter_state(agent, state)

    def learn(self, loop: ContinualLoop, r: int) -> None:
        pop, state = loop.population, loop.state
        j = r  # one task per loop round (bind's plan)
        task = loop.stream[j]
        names = pop.names
        shards = {c: self.shard(task, c) for c in names}
        clients = [c for c in names if shards[c].train]
        if r == 0 and self.aggregator != "flexlora":  # one global start: the first agent's initial adapter
            self.broadcast(pop.adapter_state(names[0]), r, names[1:])
        global_state, velocity = pop.adapter_state(names[0]), None
        state.assignments.append([])
        rng = random.Random(self.seed * 1_000_003 + r)
        for t in range(self.rounds):
            k = min(self.clients_per_round or len(clients), len(clients))
            chosen = sorted(rng.sample(clients, k), key=names.index)
            sizes = [len(shards[c].train) for c in chosen]
            bytes_before = state.messages.round_summary(r)["bytes"]
            if self.server is not None:  # each client in its own process
                losses = self.server.fit(chosen, j, r)
            else:
                losses = {c: self.fit_client(loop, c, j, r) for c in chosen}
            for c in chosen:
                state.loss_curves[f"{c}/{task.name}/{t}"] = losses[c]
                state.assignments[r].append((c, j))
            uploads = {c: pop.adapter_state(c) for c in chosen} if self.aggregator != "local" else {}
            for c in uploads:
                state.messages.send(Message("adapter", c, COORDINATOR, r, uploads[c]))
            if self.aggregator == "local":  # the baseline without a server: each client keeps its own adapter
                residual = 0.0
            elif self.aggregator == "flexlora":
                residual = flexlora(pop, chosen, sizes, names, self.seed)
                for agent in names:  # each its own rank-r_k factors
                    state.messages.send(Message("adapter", COORDINATOR, agent, r, pop.adapter_state(agent)))
            else:
                average = fedavg([uploads[c] for c in chosen], sizes)
                if self.aggregator == "fedavgm":
                    global_state, velocity = fedavgm(global_state, average, velocity, self.server_lr, self.momentum)
                else:
                    global_state = average
                self.broadcast(global_state, r, names)
                residual = 0.0
            sent = state.messages.round_summary(r)["bytes"] - bytes_before
            self.records.append({"task": task.name, "round": r, "fl_round": t, "clients": chosen, "examples": sizes,
                                 "bytes": sent, "residual": residual})  # fmt: skip
            if self.val_curve:  # the global model (each client's, when they differ) on the task's validation split
                labels = loop.stream.label_space(j, loop.evaluator.seen_index(r))
                scored = names if self.aggregator in ("local", "flexlora") else names[:1]
                self.records[-1]["val"] = sum(loop.evaluator.val_score(a, task, labels) for a in scored) / len(scored)
            log.info("federated %s round %d.%d: clients %s (%s examples), %s bytes", task.name, r, t, chosen, sizes,
                     self.records[-1]["bytes"])  # fmt: skip
        if self.server is not None and r == len(loop.plan) - 1:  # the last task: the clients can go
            self.server.close()
        if self.aggregator == "local":  # each client learnt the task from its own shard, nothing was exchanged
            for agent in dict.fromkeys(a for a, _ in state.assignments[r]):
                state.matrix.mark_trained(r, agent, task.name)
            return
        for agent in names:  # every agent holds the global model: each has learnt the task
            pop.agents[agent].history.append({"round": r, "event": "merged", "task": task.name, "via": "federated",
                                              "method": self.aggregator, "sources": list(clients)})  # fmt: skip
            state.matrix.mark_trained(r, agent, task.name)
