"""The config check of ``lmas-train`` (:func:`validate`): each option on its own (:func:`lmas.options.problems`)
and the rules no single option or constructor can see, options that must agree with each other. It reads the
config only, so a bad option fails in a fraction of a second, before the model loads and the run dir is made;
every problem is reported at once, each as ``<full option path>=<value>: <what is allowed>``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lmas.options import Reader, problems, show
from lmas.population.bases import check as _bases  # population=bases: what cannot cross bases

__all__ = ["ConfigError", "validate"]
# the kind of task each packaged source makes (lmas/data/sources.py, mathgen.py)
SOURCE_KINDS = {"math_task": "generation", "chatterbot_qa": "generation", "bbc_text": "lm"}
SOURCE_KINDS |= {"bbc_topics": "classification", "chatterbot_categories": "classification"}
FIXED = "keeps per-parameter state of the adapter's initial shape"
STACKS = "stacks one adapter per task"
FEDERATED = "the federated loop (loop=federated), whose rounds "


class ConfigError(ValueError):
    """A config that lmas-train refuses; ``problems`` lists one line per bad option."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        head = "invalid config" if len(problems) == 1 else f"invalid config ({len(problems)} problems)"
        super().__init__(head + ":\n  " + "\n  ".join(self.problems))


def validate(cfg: DictConfig) -> None:
    """Check a composed lmas-train config (imports the ``_target_`` modules, builds nothing); raise
    :class:`ConfigError` naming every bad option."""
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not str(k).startswith("hydra."))
    errors = [f"{key}=???: this option has no value; set it, e.g. {key}=<value>" for key in missing]
    reader = Reader(cfg, errors, set(missing))
    problems(reader)
    for rule in (_prompt_format, _seqft_and_trunk, _names, _round_body, _distill, _adapter_transfer, _bases):
        rule(reader)
    if errors:
        raise ConfigError(errors)


def _strategies(r: Reader) -> list[tuple[str, Any]]:
    """``(path, class)`` of the strategy and of each part of a composed strategy (the importable ones)."""
    parts = r.get("strategy.parts")
    paths = ["strategy"] + [f"strategy.parts[{i}]" for i in range(len(parts) if isinstance(parts, list) else 0)]
    return [(p, cls) for p in paths if isinstance(cls := r.target(p), type)]


def _prompt_format(r: Reader) -> None:
    """``model.prompt_format``: one the encoder knows; ``chat`` needs a chat template in a local tokenizer."""
    from lmas.lm.encoding import PROMPT_FORMATS

    fmt, path = r.get("model.prompt_format"), r.get("model.name_or_path")
    if fmt is not None and fmt not in PROMPT_FORMATS:
        r.fail("model.prompt_format", fmt, "expected one of " + ", ".join(PROMPT_FORMATS))
    if fmt == "chat" and isinstance(path, str) and _local_chat_template(path) is False:
        why = f"the tokenizer in model.name_or_path={show(path)} has no chat template (tokenizer_config.json: "
        r.fail("model.prompt_format", fmt, why + "chat_template); use model.prompt_format=plain")


def _local_chat_template(path: str) -> bool | None:
    """Whether the local HF folder ``path`` ships a chat template; ``None`` if not a local folder."""
    folder = Path(path).expanduser()
    if not (config := folder / "tokenizer_config.json").is_file():
        return None
    try:
        files = any((folder / f).is_file() for f in ("chat_template.jinja", "chat_template.json"))
        return files or bool(json.loads(config.read_text()).get("chat_template"))
    except (OSError, ValueError):
        return None


def _agent_names(r: Reader) -> list[str]:
    agents = r.get("population.agents")
    if isinstance(agents, int) and not isinstance(agents, bool):
        return [f"agent{i}" for i in range(agents)]
    return [str(a) for a in agents] if isinstance(agents, (list, dict)) else []  # a dict: agent -> its base


def _seqft_and_trunk(r: Reader) -> None:
    """SeqFT fine-tunes the shared base: one agent, no cached trunk; a shared trunk needs LoRA on the top layers."""
    from lmas.strategies.seqft import SeqFT

    names = [cls.name for _, cls in _strategies(r) if issubclass(cls, SeqFT)]  # seqft, osf: they train the base
    n, seqft = len(_agent_names(r)), bool(names)
    if n > 1 and seqft:
        why = f"strategy={names[0]} fine-tunes the shared base model, so it needs a single agent (population.agents=1)"
        r.fail("population.agents", r.get("population.agents"), why)
    for key in ("train.trunk_cache", "eval.shared_trunk"):
        if r.get(key) is True and r.get("population.lora.layers_to_transform") is None:
            why = "the shared trunk computes the layers below every LoRA layer once; set population.lora."
            r.fail(key, True, why + "layers_to_transform to the top layers (e.g. [26,27,28,29] of SmolLM2's 30)")
        elif r.get(key) is True and key == "train.trunk_cache" and seqft:
            r.fail(key, True, f"strategy={names[0]} trains the base model, so its layers cannot be cached")


def _names(r: Reader) -> None:
    """An Explicit allocation and a Hierarchical order name the population's agents and the stream's tasks."""
    agents, tasks, rounds = _agent_names(r), r.get("stream.tasks"), r.get("allocation.rounds")
    task_names = [str(t.get("name")) for t in tasks if isinstance(t, dict)] if isinstance(tasks, list) else []
    for i, rnd in enumerate(rounds if isinstance(rounds, list) and agents and task_names else []):
        for agent, ts in rnd.items() if isinstance(rnd, dict) else []:  # else: the allocation says so
            path = f"allocation.rounds[{i}].{agent}"
            if agent not in agents:
                r.fail(path, ts, f"{agent!r} is not an agent; the agents (population.agents) are {', '.join(agents)}")
            for t in [t for t in ([ts] if isinstance(ts, str) else ts or []) if t not in task_names]:
                why = f"task {t!r} is not in the stream; its tasks (stream.tasks[*].name) are "
                r.fail(path, ts, why + ", ".join(task_names))
    order = r.get("topology.order")
    unknown = [str(a) for a in order if a not in agents] if isinstance(order, list) and agents else []
    if unknown:
        r.fail("topology.order", order, f"unknown agents {', '.join(unknown)}; the agents are {', '.join(agents)}")


def _round_body(r: Reader) -> None:
    """loop=self_learning and loop=federated train every agent on every task, with no transfer and no exchange
    (options they would ignore are refused); federated rounds need 2+ agents and one trainable adapter each."""
    if (name := getattr(r.target("loop"), "__name__", "")) not in ("SelfLearning", "Federated"):
        return
    body = {"SelfLearning": "the self-learning loop (loop=self_learning), whose cycles "}.get(name, FEDERATED)
    from lmas.population.allocation import Broadcast
    from lmas.population.topology import Topology
    from lmas.strategies.olora import IncLoRA
    from lmas.transfer.policy import Transfer

    for path, base, what in (
        ("transfer", Transfer, "have no transfer step; use transfer=none"),
        ("allocation", Broadcast, "train every agent on every task; use allocation=broadcast"),
        ("topology", Topology, "have no exchange step; use topology=none, master_worker or hierarchical"),
    ):
        cls = r.target(path)  # a topology may answer together, but not exchange adapters
        if cls is not None and (cls is not base if base is not Topology else cls.exchange is not Topology.exchange):
            r.fail(f"{path}._target_", r.get(f"{path}._target_"), "is not used by " + body + what)
    if name == "Federated" and len(_agent_names(r)) == 1:
        r.fail("population.agents", r.get("population.agents"), "loop=federated splits each task across 2+ agents")
    if name == "Federated" and (stack := [c.name for _, c in _strategies(r) if issubclass(c, IncLoRA)]):
        r.fail("loop", "federated", f"strategy={stack[0]} {STACKS}, but it averages one trainable adapter per agent")


def _distill(r: Reader) -> None:
    """Distill terms: self-learning adds its own; external teachers (another tokenizer) give label distributions
    only, so generation/lm tasks and on-policy distillation need agent teachers (the student's tokenizer)."""
    nodes = [("distill", r.target("distill")), *_strategies(r)]
    distills = [(p, r.get(p)) for p, cls in nodes if getattr(cls, "__name__", "") == "Distill"]
    if distills and getattr(r.target("loop"), "__name__", "") == "SelfLearning":
        why = "the self-learning loop distils with its own term (loop.distill.*); keep distill=none"
        r.fail(distills[0][0], "<a Distill>", why + " and a strategy without Distill parts")
    tasks = r.get("stream.tasks")
    kinds = {t.get("name"): _task_kind(t) for t in tasks if isinstance(t, dict)} if isinstance(tasks, list) else {}
    token_tasks = [n for n, k in kinds.items() if k in ("generation", "lm")]
    for path, node in distills:
        if node.get("external") and node.get("teachers") == [] and token_tasks:
            why = f"external teachers (another tokenizer) teach label distributions only, but tasks {token_tasks}"
            r.fail(f"{path}.external", "[...]", why + f" need token-level distillation; add {path}.teachers=peers")
        if node.get("external") and (node.get("on_policy") or 0) > 0:
            r.fail(f"{path}.on_policy", node["on_policy"], f"on-policy distillation scores the student's sampled "
                   f"tokens, which a teacher of another tokenizer ({path}.external) cannot; set it to 0")  # fmt: skip


def _task_kind(task: dict) -> str | None:
    """A stream task's kind from its config (``kind``, or what its packaged source makes)."""
    return task.get("kind") or SOURCE_KINDS.get(str(task.get("_target_", "")).rpartition(".")[2])


def _adapter_transfer(r: Reader) -> None:
    """Adapter transfers a strategy cannot follow (lmas/transfer/merge.py). IncLoRA/O-LoRA stack one adapter per
    task: peft's single-adapter merge types (all but cat and svd) cannot merge their sum, and merge_init/lorahub/swarm
    write the trainable adapter before the strategy adds the new task's one (overwriting the last task's).
    topology.max_rank grows adapters: strategies with per-parameter state of a fixed shape cannot follow."""
    from lmas.strategies.olora import IncLoRA
    from lmas.transfer.init import MergeInit
    from lmas.transfer.merge import OWN_METHODS, STACK_EXACT
    from lmas.transfer.policy import LoraHub
    from lmas.transfer.swarm import SwarmInit

    strategies = _strategies(r)
    stacking = [getattr(cls, "name", cls.__name__) for _, cls in strategies if issubclass(cls, IncLoRA)]
    transfer, ok = r.target("transfer"), sorted({*OWN_METHODS, *STACK_EXACT})
    if stacking and isinstance(transfer, type) and issubclass(transfer, (MergeInit, LoraHub, SwarmInit)):
        why = f"strategy={stacking[0]} {STACKS}, and adds the new task's one after this transfer wrote the trainable"
        r.fail("transfer._target_", r.get("transfer._target_"), why + " one: it would overwrite that task")
    for key in ("transfer.method", "transfer.methods") if stacking else ():
        value = r.get(key)
        bad = [m for m in ([value] if isinstance(value, str) else value or []) if m not in ok]
        if bad:
            why = f"strategy={stacking[0]} {STACKS}, and merge method(s) {', '.join(map(str, bad))} (peft's"
            r.fail(key, value, why + f" add_weighted_adapter) merge single adapters; use {', '.join(ok)}")
    fixed = [getattr(c, "name", c.__name__) for _, c in strategies if getattr(c, "shape_bound", False)]
    if fixed and r.get("topology.max_rank") is not None:
        why = f"grows an agent's adapter during the run, but strategy {fixed[0]} {FIXED}; use topology.max_rank=null"
        r.fail("topology.max_rank", r.get("topology.max_rank"), why + " or a strategy without such state")
