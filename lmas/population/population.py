"""A population: N agents, each a named LoRA adapter in one peft model over one frozen base."""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from peft import (
    LoraConfig,
    LoraModel,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lmas.models.providers import BaseModel
from lmas.population.events import History

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
EXTRA = "extra/"  # adapter-file keys of state beyond the LoRA weights (:meth:`Population.load_adapter` skips them)


@dataclass
class Agent:
    """An agent: a name, the adapters it owns, and what happened to it (its history of typed events).

    ``adapters`` are peft adapter names, oldest first. All of them are active together (their
    LoRA updates add up); only the last one is trainable. Most strategies keep one adapter;
    IncLoRA and O-LoRA add one per task. ``history`` is a :class:`~lmas.population.events.History`: assigning a
    list of events or of their JSON mappings keeps it one.
    """

    name: str
    adapters: list[str] = field(default_factory=list)
    history: History = field(default_factory=History)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, History(value) if name == "history" else value)

    @property
    def trainable(self) -> str:
        return self.adapters[-1]

    def trained_tasks(self, tasks: list[str]) -> list[int]:
        """Indices into ``tasks`` of the tasks this agent has trained, in first-trained order (a strategy's
        ``seen``: what replay, joint or LwF protect is the agent's own past)."""
        out: list[int] = []
        for e in self.history:
            if e.event == "trained" and e.task in tasks and tasks.index(e.task) not in out:
                out.append(tasks.index(e.task))
        return out


def lora_config(
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
    layers_to_transform: list[int] | None = None,
    fan_in_fan_out: bool = False,
) -> LoraConfig:
    """A peft ``LoraConfig`` from the ``population.lora`` options, with checked values."""
    if r <= 0:
        raise ValueError(f"population.lora.r={r}: the LoRA rank must be a positive integer")
    if alpha <= 0:
        raise ValueError(f"population.lora.alpha={alpha}: must be positive")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"population.lora.dropout={dropout}: must be in [0, 1)")
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules) if target_modules else ["q_proj", "v_proj"],
        layers_to_transform=list(layers_to_transform) if layers_to_transform else None,
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        task_type="CAUSAL_LM",
    )


class Population:
    """Agents sharing one frozen base model, held once in memory.

    Args:
        base: the base model and tokenizer (its weights are frozen and never trained).
        agents: number of agents (named ``agent0``, ``agent1``, ...) or their names.
        lora: options of :func:`lora_config`.
        seed: seeds the LoRA initialisation; agent ``i`` uses ``seed + i``.
        bases: refused (several bases are :class:`lmas.population.bases.Bases`, ``population=bases``).
    """

    def __init__(
        self,
        base: BaseModel,
        agents: int | list[str] = 1,
        lora: dict | None = None,
        seed: int = 0,
        bases: dict | None = None,
    ):
        if bases:
            raise ValueError(f"population.bases={sorted(bases)}: a Population has one base; use population=bases")
        names = [f"agent{i}" for i in range(agents)] if isinstance(agents, int) else list(agents)
        if not names:
            raise ValueError("population.agents: a population needs at least one agent")
        for n in names:
            if not _NAME.match(n):
                raise ValueError(f"population.agents: agent name {n!r} must match {_NAME.pattern}")
        if len(set(names)) != len(names):
            raise ValueError(f"population.agents: names must be unique, got {names}")
        if base.kind != "decoder" and type(self) is Population:
            raise ValueError(
                f"the base {base.name} is an {base.kind}: its agents classify with label heads "
                "(lmas.encoders.agents); use population=bases, which gives each base its kind of agents"
            )
        self.base = base
        self.tokenizer = base.tokenizer
        self.lora = self.lora_from(lora or {})
        self.seed = seed
        self.agents: dict[str, Agent] = {}
        with torch.random.fork_rng():  # the first agent's adapter comes with the peft model
            torch.manual_seed(seed)
            self.model: PeftModel = get_peft_model(base.model, self.lora, adapter_name=names[0])
        self._register(names[0])
        for name in names[1:]:
            self.add_agent(name)

    def lora_from(self, options: dict) -> LoraConfig:
        """The agents' LoRA config from the ``population.lora`` options."""
        return lora_config(**options)

    # --- agents -------------------------------------------------------------------------
    def add_agent(self, name: str, config: LoraConfig | None = None) -> Agent:
        """Add an agent with a fresh adapter (deterministic init from the population seed)."""
        if name in self.agents:
            raise ValueError(f"agent {name!r} already exists")
        with torch.random.fork_rng():
            torch.manual_seed(self.seed + len(self.agents))
            self.model.add_adapter(name, config or self.lora)
        return self._register(name)

    def _register(self, name: str) -> Agent:
        """Record the agent whose adapter ``name`` was just added, and activate it."""
        self.agents[name] = Agent(name, [name])
        self.activate(name)
        return self.agents[name]

    def add_task_adapter(self, name: str) -> str:
        """Give agent ``name`` a new trainable adapter; its earlier adapters stay active, frozen."""
        self._check(name)
        agent = self.agents[name]
        new = f"{name}-t{len(agent.adapters)}"
        with torch.random.fork_rng():
            torch.manual_seed(self.seed + 7919 * len(agent.adapters) + self.names.index(name))
            self.model.add_adapter(new, self.lora)
        agent.adapters.append(new)
        self.activate(name)
        return new

    def resize_adapter(self, name: str, rank: int, adapter: str | None = None) -> None:
        """Re-create one adapter of an agent (default: its trainable one) at LoRA rank ``rank``.

        Same targets and ``α/r`` (so the same scaling ``s``); the new weights are a fresh LoRA
        (B = 0) for the caller to write. Grows a receiver so a merge stays exact
        (``topology.max_rank``) and restores such an adapter from a file.
        """
        self._check(name)
        adapter = adapter or self.agents[name].trainable
        cfg = self.lora_of(adapter)
        if rank < 1:
            raise ValueError(f"resize_adapter: rank={rank} must be >= 1")
        if cfg.r == rank:
            return
        active = next((n for n, a in self.agents.items() if a.adapters == list(self.model.active_adapters)), name)
        new = with_rank(cfg, rank)
        with warnings.catch_warnings():  # peft warns that the active adapter goes: it is re-activated below
            warnings.filterwarnings("ignore", message=r"Adapter .* was active which is now deleted")
            self.model.delete_adapter(adapter)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed + 104729 * rank + self.names.index(name))
            self.model.add_adapter(adapter, new)
        self.activate(active)

    def delete_agent(self, name: str) -> None:
        self._check(name)
        if len(self.agents) == 1:
            raise ValueError("cannot delete the last agent of a population")
        for adapter in self.agents[name].adapters:
            self.model.delete_adapter(adapter)
        del self.agents[name]
        self.activate(next(iter(self.agents)))

    def lora_of(self, adapter: str) -> LoraConfig:
        """The LoRA config of one peft adapter (by adapter name)."""
        config = self.model.peft_config[adapter]
        if not isinstance(config, LoraConfig):
            raise TypeError(f"adapter {adapter!r} is a {type(config).__name__}, not a LoRA adapter")
        return config

    @property
    def names(self) -> list[str]:
        return list(self.agents)

    def of(self, name: str) -> Population:
        """The population (one base) that holds agent ``name``: this one (a population over several bases,
        :class:`lmas.population.bases.Bases`, has one per base)."""
        self._check(name)
        return self

    def _check(self, name: str) -> None:
        """Raise a KeyError naming the known agents if ``name`` is not one of them."""
        if name not in self.agents:
            raise KeyError(f"unknown agent {name!r}; the population has {self.names}")

    def activate(self, name: str) -> None:
        """Make ``name``'s adapters the active ones; its newest adapter is the only trainable part."""
        self._check(name)
        adapters = self.agents[name].adapters
        set_active(self.model, adapters)
        trainable = adapters[-1]
        for pname, p in self.model.named_parameters():
            p.requires_grad_(_owned_by(pname, trainable))

    def parameters_of(self, name: str, adapter: str | None = None) -> dict[str, nn.Parameter]:
        """Parameters of one adapter of an agent (default: its trainable one), by peft name."""
        self._check(name)
        adapter = adapter or self.agents[name].trainable
        return {n: p for n, p in self.model.named_parameters() if _owned_by(n, adapter)}

    # --- adapter weights ----------------------------------------------------------------
    def adapter_state(self, name: str, adapter: str | None = None) -> dict[str, Tensor]:
        """A detached copy of one adapter's weights (default: the agent's trainable one).

        Keys are peft's adapter-name-free keys, so states of different agents line up.
        """
        self._check(name)
        state = get_peft_model_state_dict(self.model, adapter_name=adapter or self.agents[name].trainable)
        return {k: v.detach().clone().contiguous() for k, v in state.items()}

    def load_adapter_state(self, name: str, state: dict[str, Tensor], adapter: str | None = None) -> None:
        """Load weights into one adapter of an agent (default: its trainable one)."""
        self._check(name)
        adapter = adapter or self.agents[name].trainable
        result = set_peft_model_state_dict(self.model, state, adapter_name=adapter)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"adapter state for {adapter!r} has unexpected keys: {unexpected[:5]}")

    def save_adapter(
        self,
        name: str,
        path: str | Path,
        metadata: dict[str, str] | None = None,
        extra: dict[str, Tensor] | None = None,
    ) -> Path:
        """Save all of an agent's adapters into one safetensors file (never pickle), atomically.

        Keys are ``<i>/<peft key>`` for the agent's ``i``-th adapter; ``extra``: more tensors, keys ``extra/...``.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i, adapter in enumerate(self.agents[name].adapters):
            tensors.update({f"{i}/{k}": v for k, v in self.adapter_state(name, adapter).items()})
        tensors.update(extra or {})
        meta = {**(metadata or {}), "adapters": str(len(self.agents[name].adapters))}
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)
        return path

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load an agent's adapters from a file of :meth:`save_adapter` (adds missing task adapters)."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: adapters load only from .safetensors files")
        self._check(name)
        states: dict[int, dict[str, Tensor]] = {}
        for key, value in load_file(str(path)).items():
            if key.startswith(EXTRA):  # a subclass's own state (an encoder agent's label head)
                continue
            index, _, rest = key.partition("/")
            if not index.isdigit() or not rest:
                raise ValueError(f"{path}: key {key!r} is not '<adapter index>/<name>' (not an lmas adapter file?)")
            states.setdefault(int(index), {})[rest] = value
        while len(self.agents[name].adapters) < len(states):
            self.add_task_adapter(name)
        for i, state in sorted(states.items()):
            ranks = {v.shape[0] for k, v in state.items() if ".lora_A." in k}
            if len(ranks) == 1:  # an adapter grown by a merge (topology.max_rank) comes back at its rank
                self.resize_adapter(name, ranks.pop(), self.agents[name].adapters[i])
            self.load_adapter_state(name, state, self.agents[name].adapters[i])


def with_rank(config: LoraConfig, rank: int, **changes: Any) -> LoraConfig:
    """``config`` at LoRA rank ``rank`` with the same ``α/r`` (so the same scaling), without per-module
    rank/alpha patterns; ``changes``: other fields to replace."""
    alpha = config.lora_alpha * rank / config.r
    alpha = int(alpha) if float(alpha).is_integer() else alpha
    return dataclasses.replace(
        config,
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft annotates it int; a float α (exact α/r) works
        rank_pattern={},
        alpha_pattern={},
        **changes,
    )


def set_active(model: PeftModel, adapters: list[str]) -> None:
    """Make ``adapters`` the active ones of ``model`` (several at once: their LoRA updates add up)."""
    cast(LoraModel, model.base_model).set_adapter(adapters if len(adapters) > 1 else adapters[0])


def _owned_by(param_name: str, agent: str) -> bool:
    """True for LoRA parameters of ``agent`` (peft names them ``...lora_A.<agent>.weight``)."""
    return f".{agent}." in param_name and "lora_" in param_name
