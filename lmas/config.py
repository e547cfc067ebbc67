"""Checks on a composed config, run by ``lmas-train`` before anything is built.

Hydra already refuses, while composing, an option that does not exist in the config
(``train.lrr=1``: "Could not override 'train.lrr'") and a group choice that has no file
(``strategy=ewcc``: "Could not find 'strategy/ewcc'", followed by the available options).
:func:`validate` checks what Hydra lets through: values out of range, keys added with ``+`` or
misspelt in a preset file, ``_target_`` paths that do not import, and choices that do not fit
together. It reads the config only: no model, data set or strategy is built, so a bad option
fails in a fraction of a second, before the (slow) model load and before the run directory is
made. Every problem is reported at once, each as ``<full option path>=<value>: <what is allowed>``.

Where the checks live:
    _check_train         train.*, eval.*, data.*, seed, progress
    _check_population    population.agents, population.lora.*
    _check_stream        stream.tasks, stream.scenario, stream.order, stream.max_*
    _check_trainer       trainer.* (keyword arguments of lightning.Trainer not set by the loop)
    _check_targets       every ``_target_`` imports, and its node's keys are its parameters
    _check_paths         every local file or folder an option names exists (lmas.paths)
    _check_cross         options that must agree with each other (agent and task names, SeqFT
                         with one agent). Cross-option checks of knowledge distillation (teacher
                         and student choices, once lmas/distill exists) go here too.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import re
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lmas.confdir import primary_config

__all__ = ["ConfigError", "validate"]

PRIMARY = primary_config  # lmas-train's config, train.yaml: packaged or the repo's (lmas.confdir)
EVAL_SPLITS = ("val", "test")
SCENARIOS = ("task", "class", "domain")  # lmas.data.stream.SCENARIOS
ORDERS = ("fixed", "shuffle")
PROMPT_FORMATS = ("plain", "chat")  # lmas.lm.likelihood.PROMPT_FORMATS
AGENT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")  # as lmas.population.population checks
# lightning.Trainer arguments the loop sets itself (lmas/loop.py, ContinualLoop._fit), and where to set them
TRAINER_SET_BY_LOOP = {
    "max_epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "logger": "logger=<wandb|csv|tensorboard|mlflow|none>",
    "callbacks": None,
    "enable_checkpointing": None,
    "enable_model_summary": None,
    "enable_progress_bar": "progress",
    "num_sanity_val_steps": None,
}
# Hydra's own keys in a node with a _target_
HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}
# keys of a node that run() takes out before instantiating it (lmas/train.py)
POPPED_KEYS = {"population": {"allocation", "topology"}}
SEED_MAX = 2**32 - 1  # lightning.seed_everything replaces a seed outside [0, 2**32 - 1] by a random one

_ABSENT = object()


class ConfigError(ValueError):
    """A config that lmas-train refuses; ``problems`` lists one line per bad option."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        n = len(self.problems)
        head = "invalid config" if n == 1 else f"invalid config ({n} problems)"
        super().__init__(head + ":\n  " + "\n  ".join(self.problems))


def validate(cfg: DictConfig) -> None:
    """Check a composed lmas-train config; raise :class:`ConfigError` naming every bad option.

    Reads the config only (imports the modules named by ``_target_``, builds nothing).
    """
    errors: list[str] = []
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not str(k).startswith("hydra."))
    for key in missing:
        errors.append(f"{key}=???: this option has no value; set it, e.g. {key}=<value>")
    ctx = _Ctx(cfg, errors, set(missing))
    for check in (_check_top_level, _check_train, _check_population, _check_stream, _check_trainer,
                  _check_targets, _check_paths, _check_cross, _check_adapter_transfer):
        check(ctx)
    if errors:
        raise ConfigError(errors)


# --- helpers ------------------------------------------------------------------------------------
class _Ctx:
    def __init__(self, cfg: DictConfig, errors: list[str], missing: set[str]):
        self.cfg = cfg
        self.errors = errors
        self.missing = missing

    def get(self, path: str, default: Any = _ABSENT) -> Any:
        """The resolved value at ``path`` (containers as plain Python), or ``default`` if absent/missing."""
        if path in self.missing:
            return default
        try:
            value = OmegaConf.select(self.cfg, path, default=_ABSENT, throw_on_missing=True)
        except OmegaConfBaseException as exc:
            self.fail(path, _raw(self.cfg, path), f"cannot be resolved ({_first_line(exc)})")
            return default
        if value is _ABSENT:
            return default
        if isinstance(value, (DictConfig, ListConfig)):
            try:
                return OmegaConf.to_container(value, resolve=True)
            except OmegaConfBaseException as exc:
                self.fail(path, _raw(self.cfg, path), f"cannot be resolved ({_first_line(exc)})")
                return default
        return value

    def fail(self, path: str, value: Any, allowed: str) -> None:
        self.errors.append(f"{path}={_show(value)}: {allowed}")

    def check(self, path: str, ok: Callable[[Any], bool], allowed: str) -> Any:
        """Check an option if it is present; return its value (``_ABSENT`` if absent)."""
        value = self.get(path)
        if value is not _ABSENT and not ok(value):
            self.fail(path, value, allowed)
        return value


def _raw(cfg: DictConfig, path: str) -> Any:
    try:
        parent, _, key = path.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        return node._get_node(key)._value()  # the unresolved value, e.g. "${oc.env:X}"
    except Exception:  # noqa: BLE001 - only for the message
        return "?"


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _show(value: Any) -> str:
    """A value as one would type it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value and re.fullmatch(r"[\w.:/+-]+", value) else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_show(v)}" for k, v in value.items()) + "}"
    return str(value)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int_at_least(lo: int) -> Callable[[Any], bool]:
    return lambda v: _is_int(v) and v >= lo


def _one_of(choices) -> str:
    return "expected one of " + ", ".join(choices)


def _check_keys(ctx: _Ctx, path: str, allowed, what: str) -> None:
    """Every key of the mapping at ``path`` must be in ``allowed`` (a key added with + or misspelt in a file)."""
    node = OmegaConf.select(ctx.cfg, path) if path else ctx.cfg
    if not isinstance(node, DictConfig):
        return
    allowed = list(allowed)
    for key in node.keys():
        if key not in allowed and not (path == "" and key == "hydra"):  # hydra: present only outside @hydra.main
            full = f"{path}.{key}" if path else str(key)
            hint = difflib.get_close_matches(str(key), allowed, n=1)
            ctx.errors.append(
                f"{full}: not an option of {what}"
                + (f" (did you mean {path + '.' if path else ''}{hint[0]}?)" if hint else "")
                + f"; allowed: {', '.join(allowed)}"
            )


# --- checks -------------------------------------------------------------------------------------
def _primary() -> DictConfig | None:
    """conf/train.yaml as written; None when it is not found (a broken install)."""
    try:
        return OmegaConf.load(PRIMARY())
    except (OSError, OmegaConfBaseException):
        return None


def _top_level_keys() -> list[str] | None:
    """The config's top level: conf/train.yaml's own keys and the groups of its defaults list
    (``optional local`` included)."""
    primary = _primary()
    if primary is None:
        return None
    keys = [str(k) for k in primary if k not in ("defaults", "hydra")]
    for entry in primary.get("defaults") or []:
        if isinstance(entry, DictConfig):
            keys += [str(k).split()[-1].lstrip("/") for k in entry]  # "optional local" -> local
    return list(dict.fromkeys(keys))


def _check_top_level(ctx: _Ctx) -> None:
    allowed = _top_level_keys()
    if allowed is not None:
        _check_keys(ctx, "", allowed, "the config (conf/train.yaml and its groups)")


def _check_train(ctx: _Ctx) -> None:
    from lmas.schema import EvalConfig, TrainConfig

    _check_keys(ctx, "train", [f.name for f in dataclasses.fields(TrainConfig)], "train (lmas.schema.TrainConfig)")
    _check_keys(ctx, "eval", [f.name for f in dataclasses.fields(EvalConfig)], "eval (lmas.schema.EvalConfig)")
    primary = _primary()
    if primary is not None and isinstance(primary.get("data"), DictConfig):
        _check_keys(ctx, "data", list(primary.data), "data (conf/train.yaml)")

    ctx.check("train.lr", lambda v: _is_num(v) and v > 0, "the learning rate must be a number > 0")
    ctx.check("train.batch_size", _int_at_least(1), "expected an integer >= 1")
    ctx.check("train.epochs", _int_at_least(1), "expected an integer >= 1")
    ctx.check("train.max_steps", lambda v: v is None or (_is_int(v) and v >= 1),
              "expected null (full epochs) or an integer >= 1")
    ctx.check("train.weight_decay", lambda v: _is_num(v) and v >= 0, "expected a number >= 0")
    ctx.check("train.warmup_steps", _int_at_least(0), "expected an integer >= 0")
    ctx.check("train.log_every", _int_at_least(1), "expected an integer >= 1")
    ctx.check("train.trunk_cache", lambda v: isinstance(v, bool), "expected true or false")

    ctx.check("eval.split", lambda v: v in EVAL_SPLITS, _one_of(EVAL_SPLITS))
    ctx.check("eval.batch_size", _int_at_least(1), "expected an integer >= 1")
    ctx.check("eval.max_new_tokens", _int_at_least(1), "expected an integer >= 1")
    ctx.check("eval.curve_every", _int_at_least(0), "expected an integer >= 0 (0 = no learning curves)")
    ctx.check("eval.val_fallback", _int_at_least(1), "expected an integer >= 1")
    for key in ("initial", "next_task", "mixed_adapters", "shared_trunk"):
        ctx.check(f"eval.{key}", lambda v: isinstance(v, bool), "expected true or false")
    ctx.check("progress", lambda v: isinstance(v, bool), "expected true or false")

    ctx.check("data.max_length", _int_at_least(8), "expected an integer >= 8 (tokens per sequence)")
    fmt = ctx.check("model.prompt_format", lambda v: v in PROMPT_FORMATS, _one_of(PROMPT_FORMATS))
    path = ctx.get("model.name_or_path", None)
    if fmt == "chat" and isinstance(path, str) and _local_chat_template(path) is False:
        ctx.fail("model.prompt_format", fmt, f"the tokenizer in model.name_or_path={_show(path)} has no chat "
                 f"template (tokenizer_config.json: chat_template); use model.prompt_format=plain")
    ctx.check("seed", lambda v: _is_int(v) and 0 <= v <= SEED_MAX, f"expected an integer in [0, {SEED_MAX}]")


def _local_chat_template(path: str) -> bool | None:
    """Whether the local HF folder ``path`` ships a chat template; ``None`` if not a local folder."""
    import json

    folder = Path(path).expanduser()
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    if any((folder / f).is_file() for f in ("chat_template.jinja", "chat_template.json")):
        return True
    try:
        return bool(json.loads(config.read_text()).get("chat_template"))
    except (OSError, ValueError):
        return None


def _agent_names(agents: Any) -> list[str] | None:
    if _is_int(agents):
        return [f"agent{i}" for i in range(agents)]
    if isinstance(agents, list):
        return [str(a) for a in agents]
    return None


def _check_population(ctx: _Ctx) -> None:
    agents = ctx.get("population.agents")
    if agents is not _ABSENT:
        if _is_int(agents):
            if agents < 1:
                ctx.fail("population.agents", agents, "expected a positive integer or a non-empty list of agent names")
        elif isinstance(agents, list):
            bad = [a for a in agents if not isinstance(a, str) or not AGENT_NAME.match(a)]
            dupes = sorted({a for a in agents if agents.count(a) > 1}, key=str)
            if not agents:
                ctx.fail("population.agents", agents, "expected a positive integer or a non-empty list of agent names")
            elif bad:
                ctx.fail("population.agents", agents,
                         f"agent names must match {AGENT_NAME.pattern}; not {', '.join(map(_show, bad))}")
            elif dupes:
                ctx.fail("population.agents", agents, f"agent names must be unique; repeated: {', '.join(dupes)}")
        else:
            ctx.fail("population.agents", agents, "expected a positive integer or a non-empty list of agent names")

    if ctx.get("population.lora") is _ABSENT:
        return
    try:
        from lmas.population.population import lora_config

        _check_keys(ctx, "population.lora", list(inspect.signature(lora_config).parameters),
                    "population.lora (lmas.population.population.lora_config)")
    except ImportError:  # reported by _check_targets (population._target_)
        pass
    ctx.check("population.lora.r", _int_at_least(1), "the LoRA rank must be an integer >= 1")
    ctx.check("population.lora.alpha", lambda v: _is_num(v) and v > 0, "expected a number > 0")
    ctx.check("population.lora.dropout", lambda v: _is_num(v) and 0 <= v < 1, "expected a number in [0, 1)")
    ctx.check("population.lora.target_modules",
              lambda v: isinstance(v, list) and v and all(isinstance(m, str) and m for m in v),
              "expected a non-empty list of module names, e.g. [q_proj,v_proj]")
    ctx.check("population.lora.layers_to_transform",
              lambda v: v is None or (isinstance(v, list) and v and all(_is_int(i) and i >= 0 for i in v)),
              "expected null (every layer) or a non-empty list of layer indices >= 0")


def _check_stream(ctx: _Ctx) -> None:
    tasks = ctx.get("stream.tasks", default=None)
    if not isinstance(tasks, list) or not tasks:
        ctx.fail("stream.tasks", tasks,
                 "a stream needs a non-empty list of tasks, each {_target_: <task factory>, name: <name>, ...}")
    else:
        seen: dict[str, int] = {}
        for i, task in enumerate(tasks):
            path = f"stream.tasks[{i}]"
            if not isinstance(task, dict):
                ctx.fail(path, task, "expected a mapping {_target_: <task factory>, name: <name>, ...}")
                continue
            if "_target_" not in task:
                ctx.errors.append(f"{path}._target_: missing; every task needs the function that builds it, "
                                  "e.g. lmas.data.sources.bbc_topics")
            name = task.get("name")
            if not isinstance(name, str) or not name:
                ctx.fail(f"{path}.name", name, "every task needs a non-empty name")
            elif name in seen:
                ctx.fail(f"{path}.name", name, f"task names must be unique in a stream; stream.tasks[{seen[name]}] "
                                               f"has this name too")
            else:
                seen[name] = i
    ctx.check("stream.scenario", lambda v: v in SCENARIOS, _one_of(SCENARIOS))
    ctx.check("stream.order", lambda v: v in ORDERS, _one_of(ORDERS))
    for key in ("max_train", "max_eval"):
        ctx.check(f"stream.{key}", lambda v: v is None or (_is_int(v) and v >= 1),
                  "expected null (no cap) or an integer >= 1")


def _check_trainer(ctx: _Ctx) -> None:
    trainer = ctx.get("trainer")
    if not isinstance(trainer, dict):
        return
    for key, where in TRAINER_SET_BY_LOOP.items():
        if key in trainer:
            ctx.fail(f"trainer.{key}", trainer[key],
                     "set by the loop itself" + (f"; use {where} instead" if where else "; remove it"))
    from lmas.lm.device import (
        PRECISIONS,  # what the loop and the evaluator support (autocast)
    )

    ctx.check("trainer.precision", lambda v: str(v) in PRECISIONS,
              "expected 32-true, bf16-mixed or 16-mixed (mixed precision autocasts the forward and keeps the "
              "LoRA weights in float32; '*-true' half precisions would cast the shared base and the adapters)")
    try:
        import lightning

        params = inspect.signature(lightning.Trainer).parameters
    except (ImportError, TypeError, ValueError):
        return
    allowed = [p for p in params if p not in TRAINER_SET_BY_LOOP and p != "self"]
    node = OmegaConf.select(ctx.cfg, "trainer")
    for key in node.keys():
        if key not in params:
            hint = difflib.get_close_matches(str(key), allowed, n=1)
            ctx.errors.append(f"trainer.{key}: not an argument of lightning.Trainer"
                              + (f" (did you mean trainer.{hint[0]}?)" if hint else "")
                              + "; see lightning.Trainer's documentation for the allowed ones")


def _locate(target: str) -> Any:
    """Import ``package.module.Name`` (like Hydra's ``_target_``); raise ImportError saying what is wrong."""
    if not isinstance(target, str) or not target or any(not p.isidentifier() for p in target.split(".")):
        raise ImportError("expected a dotted path package.module.Name")
    parts = target.split(".")
    obj, i = None, len(parts)
    while i > 0:
        name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(name)
            break
        except ModuleNotFoundError as exc:
            # the module itself (or a parent) does not exist: try a shorter prefix; a module that
            # exists but fails to import one of its own dependencies is a different error
            if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
                i -= 1
                continue
            raise ImportError(f"importing {name} failed: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - a broken module: say so
            raise ImportError(f"importing {name} failed: {type(exc).__name__}: {exc}") from exc
    if obj is None:
        raise ImportError(f"no module named {parts[0]}")
    for j in range(i, len(parts)):
        if not hasattr(obj, parts[j]):
            where = ".".join(parts[:j])
            names = [n for n in dir(obj) if not n.startswith("_")]
            hint = difflib.get_close_matches(parts[j], names, n=1)
            raise ImportError(f"{where} has no {parts[j]!r}"
                              + (f" (did you mean {where}.{hint[0]}?)" if hint else ""))
        obj = getattr(obj, parts[j])
    if not callable(obj):
        raise ImportError(f"{target} is not a class or function")
    return obj


def _target_nodes(node: Any, path: str):
    """(path, mapping) of every mapping with a ``_target_`` in the (unresolved) config tree."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield path, node
        for key, value in node.items():
            if path == "" and key == "hydra":
                continue
            yield from _target_nodes(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _target_nodes(value, f"{path}[{i}]")


def _check_targets(ctx: _Ctx) -> None:
    tree = OmegaConf.to_container(ctx.cfg, resolve=False)
    for path, node in _target_nodes(tree, ""):
        tpath = f"{path}._target_"
        target = node["_target_"]
        if isinstance(target, str) and "${" in target:
            target = ctx.get(tpath, default=None)
        try:
            obj = _locate(target)
        except ImportError as exc:
            ctx.fail(tpath, target, f"cannot be imported: {exc}; expected an importable class or function "
                                    "(package.module.Name), as in the presets under conf/")
            continue
        try:
            params = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            continue
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue
        allowed = [p for p, v in params.items() if v.kind is not inspect.Parameter.VAR_POSITIONAL]
        known = set(allowed) | HYDRA_KEYS | POPPED_KEYS.get(path, set())
        for key in node:
            if key not in known:
                hint = difflib.get_close_matches(str(key), allowed, n=1)
                ctx.errors.append(f"{path}.{key}: not an argument of {target}"
                                  + (f" (did you mean {path}.{hint[0]}?)" if hint else "")
                                  + f"; allowed: {', '.join(allowed) or 'none'}")


def _check_paths(ctx: _Ctx) -> None:
    """Files and folders the config names (lmas.paths.PATH_OPTIONS) exist: ``<option>=<value>: no such file: <abs>``."""
    from lmas import paths

    tree = OmegaConf.to_container(ctx.cfg, resolve=False)
    for path, node in _target_nodes(tree, ""):
        target = ctx.get(f"{path}._target_", default=None)
        try:
            obj = _locate(target)
        except ImportError:  # reported by _check_targets
            continue
        name = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
        for option, value, what in paths.node_problems(name, lambda key: ctx.get(f"{path}.{key}", default=None)):
            ctx.fail(f"{path}.{option}", value, what)
    for key in ("paths.output_dir", "paths.cache_dir"):
        value = ctx.get(key, default=None)
        if isinstance(value, str) and value and paths.absolute(value).is_file():
            ctx.fail(key, value, f"{paths.absolute(value)} is a file; expected a folder (made if missing)")


def _check_cross(ctx: _Ctx) -> None:
    """Options that must agree with each other."""
    agents = _agent_names(ctx.get("population.agents", default=None))
    tasks = ctx.get("stream.tasks", default=None)
    task_names = [t.get("name") for t in tasks if isinstance(t, dict)] if isinstance(tasks, list) else None

    # SeqFT fine-tunes the shared base model: one agent only (lmas/strategies/seqft.py)
    targets = [ctx.get("strategy._target_", default=None)]
    parts = ctx.get("strategy.parts", default=None)
    if isinstance(parts, list):
        targets += [p.get("_target_") for p in parts if isinstance(p, dict)]
    if agents and len(agents) > 1 and any(_is_seqft(t) for t in targets):
        ctx.fail("population.agents", ctx.get("population.agents"),
                 f"strategy=seqft fine-tunes the shared base model, so it needs a single agent "
                 f"(population.agents=1); this population has {len(agents)}")

    # A shared trunk needs LoRA restricted to the top layers (lmas/lm/trunk.py), and a frozen base
    for key in ("train.trunk_cache", "eval.shared_trunk"):
        if ctx.get(key, default=False) is True:
            if ctx.get("population.lora.layers_to_transform", default=None) is None:
                ctx.fail(key, True, "the shared trunk computes the layers below every LoRA layer once; set "
                         "population.lora.layers_to_transform to the top layers (e.g. [26,27,28,29] for "
                         "SmolLM2's 30) or turn it off")
            elif key == "train.trunk_cache" and any(_is_seqft(t) for t in targets):
                ctx.fail(key, True, "strategy=seqft trains the base model, so its layers cannot be cached")

    # Explicit allocation: the agents and tasks it names must exist
    alloc = ctx.get("population.allocation", default=None)
    if isinstance(alloc, dict) and isinstance(alloc.get("rounds"), list) and agents and task_names:
        for r, rnd in enumerate(alloc["rounds"]):
            if not isinstance(rnd, dict):  # a malformed round: the allocation's own check says so
                continue
            for agent, ts in rnd.items():
                path = f"population.allocation.rounds[{r}]"
                if agent not in agents:
                    ctx.fail(f"{path}.{agent}", ts, f"{agent!r} is not an agent; the agents "
                             f"(population.agents) are {', '.join(agents)}")
                for t in [ts] if isinstance(ts, str) else (ts or []):
                    if t not in task_names:
                        ctx.fail(f"{path}.{agent}", ts, f"task {t!r} is not in the stream; its tasks "
                                 f"(stream.tasks[*].name) are {', '.join(map(str, task_names))}")

    # topology.order names agents
    order = ctx.get("population.topology.order", default=None)
    if isinstance(order, list) and agents:
        unknown = [a for a in order if a not in agents]
        if unknown:
            ctx.fail("population.topology.order", order, f"unknown agents {', '.join(map(str, unknown))}; "
                     f"the agents (population.agents) are {', '.join(agents)}")

    # Distill strategies: the distill group, the strategy itself, or a part of a composed strategy
    nodes = [("distill", ctx.get("distill", default=None)), ("strategy", ctx.get("strategy", default=None))]
    if isinstance(parts, list):
        nodes += [(f"strategy.parts[{i}]", p) for i, p in enumerate(parts)]
    distills = [(path, node) for path, node in nodes
                if isinstance(node, dict) and str(node.get("_target_", "")).endswith("Distill")]

    # The self-learning loop adds its own distillation term (loop.distill) to the strategy
    selflearn = str(ctx.get("loop._target_", default="")).endswith("SelfLearning")
    if selflearn and distills:
        ctx.fail(distills[0][0], "<a Distill>", "the self-learning loop consolidates with its own distillation "
                 "term (loop.distill.*); keep distill=none and a strategy without Distill parts")
    if selflearn:
        _check_selflearn(ctx)

    # Distillation from external teachers (another tokenizer) gives label distributions only:
    # token-level KD on a generation/lm task needs agent teachers (same tokenizer as the student)
    kinds = {t.get("name"): _task_kind(t) for t in tasks if isinstance(t, dict)} if isinstance(tasks, list) else {}
    token_tasks = [n for n, k in kinds.items() if k in ("generation", "lm")]
    for path, node in distills:
        if node.get("external") and node.get("teachers") == [] and token_tasks:
            ctx.fail(f"{path}.external", "[...]", "external teachers (another tokenizer) teach through label "
                     f"distributions only, but tasks {token_tasks} need token-level distillation; add agent "
                     f"teachers ({path}.teachers=peers) or use classification tasks only")


def _check_selflearn(ctx: _Ctx) -> None:
    """Options the self-learning loop (lmas/selflearn.py) does not use are refused, not ignored: each
    cycle trains every agent on every task (no allocation), with no transfer step and no exchange."""
    from lmas.population.allocation import Broadcast
    from lmas.population.topology import Topology
    from lmas.transfer.policy import Transfer

    why = "is not used by the self-learning loop (loop=self_learning), whose cycles "
    for path, base, what, default in (
            ("transfer", Transfer, "have no transfer step", "transfer=none"),
            ("population.allocation", Broadcast, "train every agent on every task",
             "population.allocation._target_=lmas.population.allocation.Broadcast")):
        target = ctx.get(f"{path}._target_", default=None)
        try:
            obj = _locate(target) if target else None
        except ImportError:  # _check_targets names it
            continue
        if obj is not None and obj is not base:
            ctx.fail(f"{path}._target_", target, f"{why}{what}; use {default}")
    target = ctx.get("population.topology._target_", default=None)
    try:
        topo = _locate(target) if target else None
    except ImportError:
        return
    if isinstance(topo, type) and issubclass(topo, Topology) and topo.exchange is not Topology.exchange:
        ctx.fail("population.topology._target_", target, f"{why}have no exchange step, and this topology exchanges "
                 "adapters between agents; use a topology without exchange (population=single, or master_worker/"
                 "hierarchical with population.allocation._target_=lmas.population.allocation.Broadcast)")


def _strategy_classes(ctx: _Ctx) -> list[tuple[str, type]]:
    """``(name, class)`` of the strategy and of each part of a composed strategy (importable ones)."""
    nodes = [("strategy", ctx.get("strategy", default=None))]
    parts = ctx.get("strategy.parts", default=None)
    if isinstance(parts, list):
        nodes += [(f"strategy.parts[{i}]", p) for i, p in enumerate(parts)]
    out = []
    for path, node in nodes:
        target = node.get("_target_") if isinstance(node, dict) else None
        try:
            obj = _locate(target) if isinstance(target, str) else None
        except ImportError:  # _check_targets names it
            continue
        if isinstance(obj, type):
            out.append((str(getattr(obj, "name", obj.__name__)), obj))
    return out


def _check_adapter_transfer(ctx: _Ctx) -> None:
    """Adapter transfers that cannot honour a strategy's adapters are refused (lmas/transfer/merge.py).

    * IncLoRA/O-LoRA stack one adapter per task: peft's single-adapter merge types (all but cat and
      svd) cannot merge their sum, and merge_init/lorahub write the trainable adapter before the
      strategy adds the new task's one, so they would overwrite the agent's last task adapter.
    * population.topology.max_rank grows an agent's adapter: strategies that keep per-parameter
      state of a fixed shape (EWC, L2, LwF, Avalanche's) cannot follow it.
    """
    from lmas.strategies.olora import IncLoRA
    from lmas.transfer.merge import OWN_METHODS, STACK_EXACT
    from lmas.transfer.policy import LoraHub, MergeInit

    strategies = _strategy_classes(ctx)
    stacking = [cls for _, cls in strategies if issubclass(cls, IncLoRA)]
    target = ctx.get("transfer._target_", default=None)
    try:
        transfer = _locate(target) if isinstance(target, str) else None
    except ImportError:
        transfer = None
    if stacking:
        name = getattr(stacking[0], "name", stacking[0].__name__)
        if isinstance(transfer, type) and issubclass(transfer, (MergeInit, LoraHub)):
            ctx.fail("transfer._target_", target, f"strategy={name} stacks one adapter per task and adds the new "
                     f"task's adapter when training starts, after this transfer has written the agent's trainable "
                     f"adapter (its last task's): it would overwrite that task; use transfer=merge or none, or a "
                     f"strategy with one adapter per agent")
        ok = set(OWN_METHODS) | set(STACK_EXACT)
        for key in ("transfer.method", "transfer.methods"):
            value = ctx.get(key, default=None)
            bad = [m for m in ([value] if isinstance(value, str) else value or []) if m not in ok]
            if bad:
                ctx.fail(key, value, f"strategy={name} stacks one adapter per task, and merge method(s) "
                         f"{', '.join(map(str, bad))} (peft's add_weighted_adapter) combine single adapters, not an "
                         f"agent's sum of adapters; use {', '.join(sorted(ok))}")
    if ctx.get("population.topology.max_rank", default=None) is not None:
        from lmas.strategies.lwf import LwF
        from lmas.strategies.regularizers import EWC, L2

        fixed_shape: tuple[type, ...] = (EWC, L2, LwF)
        if any(cls.__module__ == "lmas.strategies.avalanche_bridge" for _, cls in strategies):
            from lmas.strategies.avalanche_bridge import AvalancheStrategy

            fixed_shape += (AvalancheStrategy,)
        fixed = [n for n, cls in strategies if issubclass(cls, fixed_shape)]
        if fixed:
            ctx.fail("population.topology.max_rank", ctx.get("population.topology.max_rank"),
                     f"grows an agent's adapter during the run, but strategy {fixed[0]} keeps per-parameter state "
                     "of the adapter's initial shape; use population.topology.max_rank=null (a rank-r approximation "
                     "with its residual recorded) or a strategy without such state (naive, replay, agem, inclora, "
                     "olora, joint)")


def _task_kind(task: dict) -> str | None:
    """A stream task's kind from its config (``kind``, or what its packaged source makes)."""
    if task.get("kind"):
        return str(task["kind"])
    target = str(task.get("_target_", ""))
    if target.endswith(("math_task", "chatterbot_qa")):
        return "generation"
    if target.endswith("bbc_text"):
        return "lm"
    return "classification" if target.endswith(("bbc_topics", "chatterbot_categories")) else None


def _is_seqft(target: Any) -> bool:
    if not isinstance(target, str):
        return False
    try:
        from lmas.strategies.seqft import SeqFT

        obj = _locate(target)
    except ImportError:
        return False
    return isinstance(obj, type) and issubclass(obj, SeqFT)
