"""A population over several base models (``population=bases``): one :class:`Population` per base, one facade.

peft adapters belong to one model, so each base keeps its own :class:`Population` (its agents' adapters), and the
run builds each base's prompt encoder (its tokenizer), scorer and fit backends once (:func:`machinery`). The loop,
allocation, evaluator and checkpoints see the union of the agents through :class:`Bases`, which sends every
per-agent call to the agent's own base (:meth:`Bases.of`). The run's ``model`` is the base named ``model``; others
come from ``population.bases`` (name -> a model config, each loaded once), and ``population.agents`` maps each
agent to its base's name. What cannot cross bases (adapter merges and exchange, agents made by a transfer,
token-level distillation, the self-learning/federated/evolution bodies) is refused by the config check
(:func:`check`); a distillation teacher on another base than its student teaches classification tasks through its
label distribution (:func:`bind_teachers`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:  # light at import: the config check (lmas.config) reads :func:`check`
    from peft import LoraConfig
    from torch import Tensor, nn

    from lmas.data.task import Task
    from lmas.distill.teachers import ExternalTeacher
    from lmas.lm.encoding import PromptEncoder
    from lmas.lm.trunk import SharedTrunk
    from lmas.models.providers import BaseModel
    from lmas.options import Reader
    from lmas.population.population import Agent, Population
    from lmas.schema import EvalConfig, TrainConfig
    from lmas.strategies.base import Strategy

DEFAULT = "model"  # the name of the run's ``model`` among the bases


class Bases:
    """Agents on several frozen bases (each held once), addressed like one :class:`Population`.

    Args:
        base: the run's ``model`` (the base named ``model``).
        agents: agent name -> the name of its base (``model`` or a key of ``bases``), in population order; a
            number or a list of names puts every agent on ``model`` (as :class:`Population` names them).
        bases: the other bases by name.
        lora, seed: as :class:`Population`; the ``i``-th base's agents are seeded from ``seed + 1000 * i``.
    """

    def __init__(
        self,
        base: BaseModel,
        agents: Mapping[str, str] | int | list[str],
        bases: Mapping[str, BaseModel] | None = None,
        lora: dict | None = None,
        seed: int = 0,
    ) -> None:
        from lmas.encoders.agents import EncoderPopulation
        from lmas.population.population import Population

        models = {DEFAULT: base, **dict(bases or {})}
        if not isinstance(agents, Mapping):
            agents = {a: DEFAULT for a in ([f"agent{i}" for i in range(agents)] if isinstance(agents, int) else agents)}
        if not agents:
            raise ValueError("population.agents: a population needs at least one agent (name: base)")
        for agent, name in agents.items():
            if name not in models:
                raise ValueError(
                    f"population.agents.{agent}={name!r}: no such base; the bases are {', '.join(models)} "
                    f"('{DEFAULT}' is the run's model, the others population.bases)"
                )
        used = [n for n in models if n in agents.values()]
        self.parts: dict[str, Population] = {
            n: (EncoderPopulation if models[n].kind == "encoder" else Population)(
                models[n], [a for a, b in agents.items() if b == n], lora, seed + 1000 * i
            )
            for i, n in enumerate(used)
        }
        self.home = dict(agents)  # agent -> the name of its base, in population order
        self.agents = _Agents(self)
        self.seed, self.lora = seed, next(iter(self.parts.values())).lora

    # --- where an agent lives ---------------------------------------------------------
    def of(self, agent: str) -> Population:
        """The :class:`Population` (one base) that holds ``agent``."""
        if agent not in self.home:
            raise KeyError(f"unknown agent {agent!r}; the population has {self.names}")
        return self.parts[self.home[agent]]

    def base_name(self, agent: str) -> str:
        """The name (``model`` or a key of ``population.bases``) of ``agent``'s base."""
        self.of(agent)
        return self.home[agent]

    @property
    def names(self) -> list[str]:
        return list(self.home)

    def __getattr__(self, name: str) -> Any:
        if name in ("model", "tokenizer", "base"):  # the loop reaches these per base (machinery, of)
            raise AttributeError(
                f"a population over several bases ({', '.join(self.parts)}) has no single {name}; use .of(agent)"
            )
        raise AttributeError(name)

    # --- per-agent calls, sent to the agent's base --------------------------------------
    def activate(self, name: str) -> None:
        self.of(name).activate(name)

    def parameters_of(self, name: str, adapter: str | None = None) -> dict[str, nn.Parameter]:
        return self.of(name).parameters_of(name, adapter)

    def adapter_state(self, name: str, adapter: str | None = None) -> dict[str, Tensor]:
        return self.of(name).adapter_state(name, adapter)

    def load_adapter_state(self, name: str, state: dict[str, Tensor], adapter: str | None = None) -> None:
        self.of(name).load_adapter_state(name, state, adapter)

    def save_adapter(self, name: str, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
        return self.of(name).save_adapter(name, path, metadata)

    def load_adapter(self, name: str, path: str | Path) -> None:
        self.of(name).load_adapter(name, path)

    def add_task_adapter(self, name: str) -> str:
        return self.of(name).add_task_adapter(name)

    def resize_adapter(self, name: str, rank: int, adapter: str | None = None) -> None:
        self.of(name).resize_adapter(name, rank, adapter)

    def lora_of(self, adapter: str) -> LoraConfig:
        part = next((p for p in self.parts.values() if adapter in p.model.peft_config), None)
        if part is None:
            raise KeyError(f"no adapter {adapter!r} in any base of the population")
        return part.lora_of(adapter)

    def add_agent(self, name: str, config: LoraConfig | None = None) -> Agent:
        raise ValueError(
            f"cannot add agent {name!r}: agents made during a run (merges, copies) need one base, and this "
            f"population has several ({', '.join(self.parts)}); name every agent in population.agents"
        )


class _Agents(Mapping[str, "Agent"]):
    """The agents of every base, in population order (a read-only view, like ``Population.agents``)."""

    def __init__(self, bases: Bases) -> None:
        self._bases = bases

    def __getitem__(self, name: str) -> Agent:
        return self._bases.of(name).agents[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._bases.names)

    def __len__(self) -> int:
        return len(self._bases.names)


def parts(population: Population | Bases) -> dict[str, Population]:
    """Each base's :class:`Population` by base name (a plain population is the one base ``model``)."""
    return population.parts if isinstance(population, Bases) else {DEFAULT: population}


def machinery(
    population: Population | Bases,
    max_length: int,
    train: TrainConfig,
    eval: EvalConfig,
    trainer: dict[str, Any],
    progress: bool = True,
) -> tuple[PromptEncoder, SharedTrunk | None, Any, dict[str, Any]]:
    """Per base: the model on the trainer's device (compiled with ``train.compile``), the prompt encoder (its
    tokenizer), the shared trunk, the scorer and the fit backends. Returns the first base's encoder and trunk, the
    population's scorer and its fit backends by name: the base's own for one base, routed to the agent's base for
    several."""
    from lmas.encoders.agents import EncoderFit, EncoderPopulation, EncoderScorer
    from lmas.evaluation.cache import build_scoring
    from lmas.evaluation.scorer import RoutedScorer
    from lmas.lm.compiled import compile_layers
    from lmas.lm.device import trainer_device
    from lmas.lm.encoding import PromptEncoder
    from lmas.training import RoutedFit, fit_backends

    encoders: dict[str, PromptEncoder] = {}
    trunks: dict[str, SharedTrunk | None] = {}
    scorers: dict[str, Any] = {}
    backends: dict[str, dict[str, Any]] = {}
    for name, pop in parts(population).items():
        pop.model.to(trainer_device(trainer))  # once; IncrementalLM.cpu keeps Lightning from moving it back
        if isinstance(pop, EncoderPopulation):  # label heads: their own scorer and fit (lmas/encoders/agents.py)
            encoders[name], trunks[name] = PromptEncoder(pop.tokenizer, max_length), None
            scorers[name] = EncoderScorer(pop, max_length, eval.batch_size)
            fit = EncoderFit(pop, train, max_length)
            backends[name] = {"lightning": fit, "avalanche": fit}
            continue
        if train.compile:  # the decoder layers, in place: training and evaluation use them compiled
            compile_layers(pop.model)
        encoders[name] = enc = PromptEncoder(pop.tokenizer, max_length, pop.base.prompt_format)
        trunks[name], scorers[name] = build_scoring(pop, enc, train, eval, trainer.get("precision"))
        fit_trunk = trunks[name] if train.trunk_cache else None  # eval.cache: lmas/evaluation/cache.py
        backends[name] = fit_backends(pop, enc, train, trainer, fit_trunk, eval.curve_every, progress)
    first = next(iter(parts(population)))
    if not isinstance(population, Bases):
        return encoders[first], trunks[first], scorers[first], backends[first]
    routed = {k: RoutedFit({n: b[k] for n, b in backends.items()}, population.home) for k in backends[first]}
    return encoders[first], trunks[first], RoutedScorer(population, scorers, population.home), routed


class AgentTeacher:
    """An agent of another base as a label-level distillation teacher (an :class:`ExternalTeacher`): its label
    log-likelihoods from its own base's scorer, as it stands when asked; it learns in the loop, not here."""

    def __init__(self, name: str, scorer: Any) -> None:
        self.name, self.scorer = name, scorer

    def fit(self, task: Task) -> None:
        """Nothing: the agent trains its own tasks in the loop."""

    def label_scores(self, prompts: Sequence[str], labels: Sequence[str]) -> Tensor:
        return self.scorer.label_logprobs([self.name], prompts, labels)[0]


def bind_teachers(strategy: Strategy, population: Population | Bases, scorer: Any) -> None:
    """``population=bases`` with distillation: the teachers of a student that live on another base teach it
    classification tasks through their label distributions (:class:`AgentTeacher`); its own base's teachers
    teach as usual. Nothing to bind for one base or without :class:`lmas.distill.strategy.Distill`."""
    from lmas.distill.strategy import Distill

    if not isinstance(population, Bases):
        return
    for part in getattr(strategy, "parts", [strategy]):
        if isinstance(part, Distill):
            part.everyone = population.names

            def cross(agent: str, task: Task, d: Distill = part) -> list[ExternalTeacher]:
                own = population.of(agent).agents
                names = d.teachers_for(cast("Population", population), agent, task)
                return [AgentTeacher(n, scorer.of(n)) for n in names if n not in own]

            part.cross = cross


def check(r: Reader) -> None:
    """The config check's rules for ``population=bases``: only the continual loop; no adapter transfer, exchange
    or peer distillation (they cross bases, or leave an encoder agent's label head behind); each refusal names the
    agents on different bases (or the encoder agents)."""
    encoder_agents = _encoders(r)
    agents, known = r.get("population.agents"), [DEFAULT, *(r.get("population.bases") or {})]
    if not isinstance(agents, dict):
        agents = {}  # a number or a list of names: every agent on `model`
    for agent, name in agents.items():
        if name not in known:
            r.fail(f"population.agents.{agent}", name, f"no such base; the bases are {', '.join(known)}")
    bases = {str(v) for v in agents.values()}
    if len(bases) < 2 and not encoder_agents:
        return
    groups = "; ".join(f"{b}: {', '.join(a for a, v in agents.items() if v == b)}" for b in sorted(bases))
    if len(bases) > 1:
        why = f"the agents live on different bases ({groups}), and "
    else:
        why = f"encoder agents ({encoder_agents}) keep a label head that adapters do not carry, and "
    if (body := getattr(r.target("loop"), "__name__", "")) not in ("", "Continual"):
        r.fail("loop._target_", r.get("loop._target_"), why + f"the {body} loop shares adapters; use loop=continual")
    transfer = r.target("transfer")
    if transfer is not None and getattr(transfer, "__name__", "") != "Transfer":
        r.fail("transfer._target_", r.get("transfer._target_"), why + "adapters cannot move between architectures")
    from lmas.population.topology import Topology

    topology = r.target("topology")
    if isinstance(topology, type) and issubclass(topology, Topology) and topology.exchange is not Topology.exchange:
        r.fail("topology._target_", r.get("topology._target_"), why + "its exchange merges adapters across them")
    distill, tasks = r.get("distill") or {}, r.get("stream.tasks")
    from lmas.config import _task_kind

    kinds = [t for t in tasks if isinstance(t, dict) and _task_kind(t) != "classification"] if isinstance(tasks,
             list) else []  # fmt: skip
    if distill.get("_target_") and distill.get("teachers") not in (None, []) and kinds:
        names = [str(t.get("name")) for t in kinds]
        why_d = why + f"teachers on another base teach label distributions only, and tasks {names} would be "
        r.fail("distill.teachers", distill.get("teachers"), why_d + "distilled token by token (one tokenizer)")


def _encoders(r: Reader) -> str:
    """Encoder agents (lmas/encoders/agents.py) need ``population=bases``, classification tasks or raw text scored
    by an encoder metric (``pseudo_perplexity``, ``masked_accuracy``), and a data-level strategy (naive, joint)
    without a distillation term: the others' loss terms and hooks read a causal LM's outputs. Raw text scored by
    an encoder metric needs every agent on an encoder base. Returns the encoder agents' names ('' for none)."""
    from lmas.config import _agent_names, _strategies, _task_kind
    from lmas.data.task import ENCODER_METRICS
    from lmas.encoders.agents import DATA_LEVEL, ENCODER_PROVIDERS

    agents, bases = r.get("population.agents"), r.get("population.bases") or {}
    models = {DEFAULT: r.get("model._target_"), **{n: (b or {}).get("_target_") for n, b in bases.items()}}
    enc = [n for n, t in models.items() if t in ENCODER_PROVIDERS]
    on = dict(agents) if isinstance(agents, dict) else {a: DEFAULT for a in _agent_names(r)}
    tasks = r.get("stream.tasks")
    tasks = [t for t in tasks if isinstance(t, dict)] if isinstance(tasks, list) else []
    masked = [str(t.get("name")) for t in tasks if _task_kind(t) == "lm" and t.get("metric") in ENCODER_METRICS]
    decoders = ", ".join(a for a, b in on.items() if b not in enc)
    if masked and decoders:
        why = f"tasks {masked} are scored by an encoder's masked LM, which agents {decoders} (causal LMs) lack"
        r.fail("stream.tasks", "[...]", why + "; leave their metric at perplexity or put every agent on an encoder")
    if not enc:
        return ""
    if r.get("population._target_") != "lmas.population.bases.Bases":
        why = f"model={models[DEFAULT]} is an encoder: its agents (LoRA + a label head) need population=bases"
        r.fail("population._target_", r.get("population._target_"), why)
        return ""
    who = ", ".join(a for a, b in on.items() if b in enc)
    if not who:
        return ""
    for path, cls in _strategies(r):
        if cls.__name__ not in DATA_LEVEL:
            why = f"encoder agents ({who}) train with the data-level strategies naive and joint only"
            r.fail(f"{path}._target_", r.get(f"{path}._target_"), why)
    other = [str(t.get("name")) for t in tasks if _task_kind(t) not in ("classification", None)
             and str(t.get("name")) not in masked]  # fmt: skip
    if other:
        why = f"encoder agents ({who}) score classification tasks, and raw text by {' or '.join(ENCODER_METRICS)}"
        r.fail("stream.tasks", "[...]", why + f"; not {other} (raw text: set the task's metric)")
    students = r.get("distill.students")
    taught = [a for a in on if a in who.split(", ") and (students is None or a in students)]
    if r.get("distill._target_") and taught:
        why = f"encoder agents ({', '.join(taught)}) train without a distillation term (it reads a causal LM's "
        hint = ", ".join(a for a in on if a not in who.split(", ")) or "none: distill=none"
        r.fail("distill.students", students, why + f"outputs); they teach, and the students are decoders ({hint})")
    return who
