"""Populations that evolve (``loop=evolution``): the continual round (:class:`lmas.loop.Continual`), then, every
``every`` rounds, a search in weight space over the agents' adapters.

Fitness is an agent's mean validation metric over the tasks the population has met so far (never a test split):
what it kept and what it just learnt. Three methods (``method``):

* ``pbt`` — population-based training, Ray Tune's semantics: each agent has its own hyperparameters, sampled
  log-uniformly from ``pbt.space`` at the start (``lr``; ``rank``, the trainable adapter's LoRA rank; and
  ``strategy.<attr>``, a strategy weight such as ``strategy.lambda_orth``). Every ``every`` rounds the agents in
  the bottom ``quantile_fraction`` (at most half) copy the adapter and hyperparameters of a random agent of the
  top quantile (*exploit*) and perturb each hyperparameter (*explore*: resampled with ``resample_probability``,
  else multiplied by 0.8 or 1.2, clipped to the space). A rank change re-factorises the adapter by truncated SVD
  (the error reported). The strategy's per-agent state (anchors, buffers) is copied with the adapter
  (:meth:`lmas.strategies.base.Strategy.copy_agent`); lmas builds a fresh optimizer per task, so there is no
  optimizer state to copy.
* ``qd`` — quality-diversity, CycleQD-style: a MAP-Elites archive over two behaviour descriptors (by default the
  stability–plasticity pair: mean validation score on the earlier tasks, and on the latest one; or two named
  tasks), ``bins`` cells per descriptor, seeded with the agents. Each generation makes ``offspring`` children:
  two elites crossed by a merge ``w ΔW_a + (1 − w) ΔW_b`` (``w ~ U(0, 1)``), then an SVD mutation that scales
  every singular value of the child's update by ``1 + sigma·u``, ``u ~ U(−1, 1)`` (its singular vectors kept). A
  child enters the archive if its cell is empty or it beats the cell's elite. The agents then take the archive's
  best ``N`` elites: an agent that is one keeps itself, the others take the children among them in order of
  fitness, the least fit agent first (with fewer elites than agents, the agents left over keep their own adapter:
  no agent is duplicated).
* ``swarm`` — Model Swarms: the agents' adapters are particles ``x``; with personal bests ``p``, the global best
  ``g`` and the global worst ``g_w``, each of ``iterations`` steps moves every particle by
  ``v ← (r_v φ_v v + r_p φ_p (p − x) + r_g φ_g (g − x) − r_w φ_w (g_w − x)) / (r_v φ_v + r_p φ_p + r_g φ_g + r_w φ_w)``,
  ``x ← x + λ v`` (``r ~ U(0, 1)``; the step ``λ`` decays by ``step_decay`` down to ``min_step``; the first
  velocity points at a random other particle). The search runs between rounds on the population's own fitness
  (Model Swarms adapts experts to one task's utility, which ``transfer=swarm`` does; here the utility is the
  stream so far), and each agent
  ends at its personal best. Particles are the LoRA factors themselves, so every agent needs one adapter of one
  shape (strategies that stack adapters per task are refused).

Every copy, crossover and move is an ``adapter`` message with its bytes, and a record with its sources (the
lineage edge) in the run's events and the receiving agent's history; each step's fitness, descriptors, archive
and hyperparameters are in results.json (``evolution``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lmas.data.task import Task
from lmas.loop import Continual
from lmas.population.messages import COORDINATOR, Message
from lmas.population.search import (
    Archive,
    Elite,
    SwarmOptions,
    copy_agent,
    crossover,
    exploit_pairs,
    explore,
    sample_hparams,
    set_rank,
    svd_mutation,
    swarm_search,
)
from lmas.strategies.base import Strategy
from lmas.strategies.compose import Compose
from lmas.strategies.olora import IncLoRA
from lmas.transfer.factors import agent_factors, write_knowledge

if TYPE_CHECKING:
    from lmas.loop import ContinualLoop

log = logging.getLogger(__name__)
METHODS = ("pbt", "qd", "swarm")
CHILD = "evolution-child"  # the scratch agent a QD child is scored in (deleted after the step)


# --- options -------------------------------------------------------------------------------------
@dataclass
class PBTOptions:
    space: dict[str, list[float]] = field(default_factory=lambda: {"lr": [1e-4, 3e-3]})
    quantile_fraction: float = 0.25
    resample_probability: float = 0.25


@dataclass
class QDOptions:
    bins: int = 3
    generations: int = 1
    offspring: int = 2
    sigma: float = 0.1
    descriptors: list[str] | None = None  # two task names; None: (earlier tasks, latest task)


def _options(cls: type, given: Mapping[str, Any] | None, path: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(given or {}) - names)
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {unknown}; expected {sorted(names)}")
    return cls(**{k: (dict(v) if isinstance(v, Mapping) else list(v) if isinstance(v, Sequence) and not
                      isinstance(v, str) else v) for k, v in (given or {}).items()})  # fmt: skip


def _flat(space: Mapping[str, Any], prefix: str = "") -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for name, value in space.items():
        out.update(_flat(value, f"{prefix}{name}.") if isinstance(value, Mapping) else {prefix + name: list(value)})
    return out


def _parts(strategy: Strategy) -> list[Strategy]:
    return list(strategy.parts) if isinstance(strategy, Compose) else [strategy]


@contextlib.contextmanager
def strategy_values(strategy: Strategy, values: Mapping[str, float]) -> Iterator[None]:
    """Set ``strategy.<attr>`` (on the composed part that has it) for the duration of one fit."""
    saved = []
    for name, value in values.items():
        part = next(p for p in _parts(strategy) if hasattr(p, name))
        saved.append((part, name, getattr(part, name)))
        setattr(part, name, value)
    try:
        yield
    finally:
        for part, name, value in reversed(saved):
            setattr(part, name, value)


def mean_score(scores: Mapping[str, float]) -> float:
    """Fitness: the mean of an agent's validation scores over the tasks met."""
    return sum(scores.values()) / len(scores)


# --- the round body ------------------------------------------------------------------------------
class Evolution(Continual):
    """The continual round, then an evolution step every ``every`` rounds (module docstring).

    Args:
        method: ``pbt`` | ``qd`` | ``swarm``.
        every: rounds between steps (PBT's ``perturbation_interval``); the step follows the round's training.
        pbt, qd, swarm: the method's options (:class:`PBTOptions`, :class:`QDOptions`, :class:`SwarmOptions`).
        seed: the step's randomness (sampling, pairing, crossover weights, mutation, swarm factors).
    """

    name = "evolution"

    def __init__(
        self, method: str = "pbt", every: int = 1, pbt: Mapping[str, Any] | None = None,
        qd: Mapping[str, Any] | None = None, swarm: Mapping[str, Any] | None = None, seed: int = 0,
    ) -> None:  # fmt: skip
        if method not in METHODS:
            raise ValueError(f"loop.method={method!r}: expected one of {METHODS}")
        if every < 1:
            raise ValueError(f"loop.every={every}: need >= 1")
        self.method, self.every, self.seed = method, every, seed
        self.pbt: PBTOptions = _options(PBTOptions, pbt, "loop.pbt")
        self.pbt.space = _flat(self.pbt.space)  # +loop.pbt.space.strategy.lam=[..] arrives nested
        self.qd: QDOptions = _options(QDOptions, qd, "loop.qd")
        self.swarm: SwarmOptions = _options(SwarmOptions, swarm, "loop.swarm")
        for name, bounds in self.pbt.space.items():
            if len(bounds) != 2 or not 0 < bounds[0] <= bounds[1]:
                raise ValueError(f"loop.pbt.space.{name}={bounds}: expected [low, high] with 0 < low <= high")
            if name not in ("lr", "rank") and not name.startswith("strategy."):
                raise ValueError(f"loop.pbt.space.{name}: expected lr, rank or strategy.<attribute>")
        if not 0 < self.pbt.quantile_fraction <= 0.5 or not 0 <= self.pbt.resample_probability <= 1:
            raise ValueError("loop.pbt: need 0 < quantile_fraction <= 0.5 and 0 <= resample_probability <= 1")
        if self.qd.descriptors is not None and len(self.qd.descriptors) != 2:
            raise ValueError(f"loop.qd.descriptors={self.qd.descriptors}: name two tasks (or null)")
        if self.qd.offspring < 1 or self.qd.generations < 1 or not 0 <= self.qd.sigma <= 1:
            raise ValueError("loop.qd: need offspring >= 1, generations >= 1 and 0 <= sigma <= 1")
        self.swarm.check("loop.swarm")

    def bind(self, loop: ContinualLoop) -> list[list[int]]:
        pop, self.loop = loop.population, loop
        if len(pop.names) < 2:
            raise ValueError(f"loop=evolution: the population has {len(pop.names)} agent; evolution needs 2 or more")
        stacks = [p.name for p in _parts(loop.strategy) if isinstance(p, IncLoRA)]
        if stacks and (self.method != "pbt" or "rank" in self.pbt.space):
            what = "loop.method=" + self.method if self.method != "pbt" else "loop.pbt.space.rank"
            raise ValueError(f"{what}: strategy={stacks[0]} stacks one adapter per task; {what} needs one adapter")
        if self.method == "pbt" and loop.strategy.fit_backend == "avalanche":
            raise ValueError(f"loop.method=pbt: strategy={loop.strategy.name} trains with Avalanche, whose per-agent "
                             "state (its own strategy object) cannot be copied from one agent to another")  # fmt: skip
        if self.method == "pbt" and "rank" in self.pbt.space and loop.strategy.shape_bound:
            raise ValueError(f"loop.pbt.space.rank: strategy={loop.strategy.name} keeps per-agent state of the "
                             "adapter's shape (anchors); drop rank from the space")  # fmt: skip
        for name in [n for n in self.pbt.space if n.startswith("strategy.")] if self.method == "pbt" else []:
            if not any(hasattr(p, name[9:]) for p in _parts(loop.strategy)):
                raise ValueError(f"loop.pbt.space.{name}: strategy={loop.strategy.name} has no {name[9:]!r}")
        names = [t.name for t in loop.stream]
        for task in self.qd.descriptors or [] if self.method == "qd" else []:
            if task not in names:
                raise ValueError(f"loop.qd.descriptors: {task!r} is not in the stream; its tasks are {names}")
        self.start = {}
        if self.method == "pbt":  # Ray Tune samples every trial's start from the space
            rng = random.Random(self.seed)
            self.start = {a: sample_hparams(self.pbt.space, rng) for a in pop.names}
            for agent, hp in self.start.items():
                if "rank" in hp:
                    pop.resize_adapter(agent, int(hp["rank"]))  # fresh adapters: nothing to re-factorise
        return super().bind(loop)

    # --- the record (results.json "evolution"; kept in the checkpoint for resume) ---
    @property
    def book(self) -> dict[str, Any]:
        return self.loop.state.body.setdefault("evolution", {"hparams": self.start, "steps": []})

    def results(self, loop: ContinualLoop) -> dict[str, Any]:
        setup = {
            "method": self.method,
            "every": self.every,
            self.method: dataclasses.asdict(getattr(self, self.method)),
        }
        return {"evolution": self.book, "evolution_setup": setup}

    # --- the round ---
    def fit(self, loop: ContinualLoop, agent: str, task: Task, seen: list[Task], r: int) -> list[float]:
        hp = self.book["hparams"].get(agent, {})
        with strategy_values(loop.strategy, {k[9:]: v for k, v in hp.items() if k.startswith("strategy.")}):
            return loop.fit(agent, task, seen, r, lr=hp.get("lr"))

    def learn(self, loop: ContinualLoop, r: int) -> None:
        super().learn(loop, r)
        if (r + 1) % self.every:
            return
        rng = random.Random(self.seed * 1_000_003 + r)
        step = {"pbt": self.pbt_step, "qd": self.qd_step, "swarm": self.swarm_step}[self.method]
        record = step(r, rng)
        self.book["steps"].append({"round": r, "method": self.method, **record})

    # --- fitness ---
    def met(self, r: int) -> list[int]:
        return self.loop.evaluator.met_before(r)

    def scores(self, agent: str, r: int) -> dict[str, float]:
        """``agent``'s validation metric on every task met by round ``r``."""
        ev, stream = self.loop.evaluator, self.loop.stream
        return {
            stream[j].name: ev.val_score(agent, stream[j], stream.label_space(j, ev.seen_index(r))) for j in self.met(r)
        }

    def fitness(self, agent: str, r: int) -> float:
        return mean_score(self.scores(agent, r))

    def describe(self, scores: Mapping[str, float]) -> tuple[float, float]:
        """The QD descriptors of one agent's scores (module docstring)."""
        if self.qd.descriptors:
            a, b = self.qd.descriptors
            return scores.get(a, 0.0), scores.get(b, 0.0)
        names = list(scores)
        earlier = [scores[n] for n in names[:-1]] or [scores[names[-1]]]
        return sum(earlier) / len(earlier), scores[names[-1]]

    def states(self, agent: str) -> list[dict[str, Tensor]]:
        """Every adapter of ``agent`` (what a message carries)."""
        pop = self.loop.population
        return [pop.adapter_state(agent, a) for a in pop.agents[agent].adapters]

    def send(self, sender: str, receiver: str, r: int, state: Any) -> None:
        self.loop.state.messages.send(Message("adapter", sender, receiver, r, state))

    def event(self, agent: str, r: int, sources: list[str], **details: Any) -> None:
        self.loop.add_events([{"agent": agent, "round": r, "event": self.method, "sources": sources, **details}])

    # --- PBT ---
    def pbt_step(self, r: int, rng: random.Random) -> dict[str, Any]:
        pop, hparams = self.loop.population, self.book["hparams"]
        fitness = {a: self.fitness(a, r) for a in pop.names}
        pairs = exploit_pairs(fitness, self.pbt.quantile_fraction, rng)  # losers and winners are disjoint
        before = {a: dict(hp) for a, hp in hparams.items()}
        states = {w: self.states(w) for _, w in pairs}
        exploits = []
        for loser, winner in pairs:
            residual = copy_agent(pop, winner, loser, states[winner])
            self.loop.strategy.copy_agent(winner, loser)  # its anchors, buffers and counts go with the adapter
            new = explore(before[winner], self.pbt.space, self.pbt.resample_probability, rng)
            if "rank" in new and int(new["rank"]) != pop.lora_of(pop.agents[loser].trainable).r:
                residual = max(residual, set_rank(pop, loser, int(new["rank"]), self.seed))
            hparams[loser] = new
            self.send(winner, loser, r, states[winner])
            self.event(loser, r, [winner], hparams=new, residual=residual)
            exploits.append({"loser": loser, "winner": winner, "from": before[loser], "to": new, "residual": residual})
            log.info("pbt round %d: %s (%.4f) <- %s (%.4f), %s", r, loser, fitness[loser], winner, fitness[winner], new)
        return {"fitness": fitness, "exploits": exploits, "hparams": {a: dict(h) for a, h in hparams.items()}}

    # --- QD ---
    def qd_step(self, r: int, rng: random.Random) -> dict[str, Any]:
        pop = self.loop.population
        if len(self.met(r)) < 2 and not self.qd.descriptors:
            log.info("qd round %d: one task met; the descriptors need two (step skipped)", r)
            return {"skipped": "one task met"}
        archive, own = Archive(self.qd.bins), {}
        for agent in pop.names:
            scores = self.scores(agent, r)
            own[agent] = mean_score(scores)
            archive.add(Elite(agent, own[agent], self.describe(scores), agent_factors(pop, agent), [agent]))
        if CHILD in pop.agents:
            raise ValueError(f"loop=evolution: an agent is named {CHILD!r}, the name QD scores its children under")
        pop.add_agent(CHILD, pop.lora_of(pop.agents[pop.names[0]].trainable))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + r)
        uploaded: set[str] = set()
        children = []
        try:
            for g in range(self.qd.generations):
                for c in range(self.qd.offspring):
                    elites = archive.elites()
                    pa, pb = rng.sample(elites, 2) if len(elites) > 1 else (elites[0], elites[0])
                    w = rng.random()
                    for parent in {pa.key, pb.key} & set(pop.names) - uploaded:  # an agent's adapter, read once
                        self.send(parent, COORDINATOR, r, self.states(parent))
                        uploaded.add(parent)
                    child = svd_mutation(crossover(pa.factors, pb.factors, w), self.qd.sigma, gen)
                    residual = write_knowledge(pop, CHILD, child, keep=0.0, seed=self.seed)
                    scores = self.scores(CHILD, r)
                    elite = Elite(f"child{g}.{c}", mean_score(scores), self.describe(scores),
                                  agent_factors(pop, CHILD), sorted({*pa.sources, *pb.sources}))  # fmt: skip
                    entered = archive.add(elite)
                    children.append({"key": elite.key, "parents": [pa.key, pb.key], "w": w, "entered": entered,
                                     "fitness": elite.fitness, "descriptors": list(elite.descriptors),
                                     "residual": residual})  # fmt: skip
        finally:
            pop.activate(pop.names[0])  # not the child: deleting the active adapter warns
            pop.delete_agent(CHILD)
        chosen = archive.elites()[: len(pop.names)]  # an agent holding one keeps it; the others take the rest
        held = {e.key for e in chosen} & set(pop.names)
        placed = {a: a for a in pop.names}  # fewer elites than agents: the agents left over keep their own adapter
        losers = sorted((a for a in pop.names if a not in held), key=lambda a: (own[a], a))  # the least fit first
        for agent, elite in zip(losers, [e for e in chosen if e.key not in held], strict=False):
            residual = write_knowledge(pop, agent, elite.factors, keep=0.0, seed=self.seed)
            self.send(COORDINATOR, agent, r, self.states(agent))
            self.event(agent, r, elite.sources, elite=elite.key, fitness=elite.fitness, residual=residual)
            placed[agent] = elite.key
        cells = [{"cell": list(archive.cell(e.descriptors)), "key": e.key, "fitness": e.fitness,
                  "descriptors": list(e.descriptors), "sources": e.sources} for e in archive.elites()]  # fmt: skip
        log.info("qd round %d: %d children, archive %d cells (coverage %.2f)", r, len(children), len(cells),
                 archive.coverage())  # fmt: skip
        return {"children": children, "archive": cells, "coverage": archive.coverage(),
                "population": {a: placed[a] for a in pop.names}}  # fmt: skip

    # --- Model Swarms ---
    def swarm_step(self, r: int, rng: random.Random) -> dict[str, Any]:
        pop = self.loop.population
        names = pop.names
        x = {a: pop.adapter_state(a) for a in names}
        shapes = {a: {k: tuple(t.shape) for k, t in s.items()} for a, s in x.items()}
        if any(shapes[a] != shapes[names[0]] for a in names) or any(len(pop.agents[a].adapters) > 1 for a in names):
            raise ValueError("loop.method=swarm: every agent needs one adapter of the same shape (same rank, modules)")

        def fitness(a: str, state: dict[str, Tensor]) -> float:  # each particle is its agent
            pop.load_adapter_state(a, state)
            return self.fitness(a, r)

        out = swarm_search(x, fitness, self.swarm, rng, lambda src, a, state: self.send(src, a, r, state))
        for a in names:  # each agent ends at its personal best
            pop.load_adapter_state(a, out["best"][a])
            self.event(a, r, list(names), fitness=out["f_best"][a])
        log.info("swarm round %d: best fitness %.4f (%s)", r, out["f_g"], out["owner"])
        return {"iterations": out["trace"], "personal_best": out["f_best"], "global_best": out["f_g"]}
