"""The typed schema of lmas-train's config (dataclasses registered with Hydra's ConfigStore as ``train_schema``,
the first entry of conf/train.yaml's defaults list) and the checks each option makes on its own.

Hydra refuses while composing a key no section has (``train.lrr=1``: "Could not override 'train.lrr'") and a
value of the wrong type (``eval.batch_size=abc``: "Error merging override eval.batch_size=abc"). :func:`problems`
checks what types cannot say, each problem as ``<option>=<value>: <what is allowed>``: a field's ``check``, keys
added with ``+``, every ``_target_`` (it imports; its node takes its parameters), the trainer's options, the stream's
tasks and the files options name. ``train.lr``, ``seed`` and ``population.lora.target_modules`` are ``Any`` to
Hydra, so that their own checks say what is allowed (``train.lr=fast: the learning rate must be a number > 0``).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

SCHEMA_NAME = "train_schema"  # the ConfigStore entry conf/train.yaml's defaults list starts with
SEED_MAX = 2**32 - 1  # lightning.seed_everything replaces a seed outside [0, 2**32 - 1] by a random one
AGENT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")  # as lmas.population.population checks
HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}
# lightning.Trainer arguments the loop sets itself (lmas/loop.py), and where to set them
TRAINER_SET_BY_LOOP = dict.fromkeys(
    ("callbacks", "enable_checkpointing", "enable_model_summary", "num_sanity_val_steps")
)
TRAINER_SET_BY_LOOP |= {"max_epochs": "train.epochs", "max_steps": "train.max_steps", "enable_progress_bar": "progress"}
TRAINER_SET_BY_LOOP |= {"logger": "logger=<wandb|csv|tensorboard|mlflow|none>"}
Check = Callable[[Any], "str | None"]  # a value -> what is wrong with it (None: fine)
_ABSENT = object()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _rule(ok: Callable[[Any], bool], allowed: str) -> Check:
    return lambda v: None if ok(v) else allowed


def _int_at_least(lo: int, note: str = "") -> Check:
    return _rule(lambda v: _is_int(v) and v >= lo, f"expected an integer >= {lo}{note}")


def _one_of(*choices: str) -> Check:
    return _rule(lambda v: v in choices, "expected one of " + ", ".join(choices))


def _null_or_int(what: str) -> Check:
    return _rule(lambda v: v is None or (_is_int(v) and v >= 1), f"expected null ({what}) or an integer >= 1")


def _opt(default: Any, check: Check) -> Any:
    """A schema field whose values must pass ``check``."""
    return field(default=default, metadata={"check": check})


def _list_of(ok: Callable[[Any], Any], what: str, null: str = "") -> Check:
    """A non-empty list of items that pass ``ok`` (``what``); also None if ``null`` says what None means."""
    allowed = (
        f"expected null ({null}) or a non-empty list of {what}" if null else f"expected a non-empty list of {what}"
    )
    return _rule(lambda v: (v is None and bool(null)) or (isinstance(v, list) and bool(v) and all(map(ok, v))), allowed)


def _agents(v: Any) -> str | None:
    allowed = "expected a positive integer or a non-empty list of agent names"
    if _is_int(v):
        return None if v >= 1 else allowed
    if not isinstance(v, list) or not v:
        return allowed
    bad = [a for a in v if not isinstance(a, str) or not AGENT_NAME.match(a)]
    if bad:
        return f"agent names must match {AGENT_NAME.pattern}; not {', '.join(map(show, bad))}"
    dupes = sorted({a for a in v if v.count(a) > 1})
    return f"agent names must be unique; repeated: {', '.join(dupes)}" if dupes else None


_MODULES = _list_of(lambda m: isinstance(m, str) and m, "module names, e.g. [q_proj,v_proj]")


@dataclass
class TrainConfig:
    """Optimisation settings of one experience (``train.*`` in the config)."""

    lr: Any = _opt(1e-3, _rule(lambda v: _is_num(v) and v > 0, "the learning rate must be a number > 0"))
    batch_size: int = _opt(8, _int_at_least(1))
    epochs: int = _opt(1, _int_at_least(1))
    max_steps: int | None = _opt(None, _null_or_int("full epochs"))  # per experience; None = full epochs
    weight_decay: float = _opt(0.0, _rule(lambda v: _is_num(v) and v >= 0, "expected a number >= 0"))
    warmup_steps: int = _opt(0, _int_at_least(0))
    log_every: int = _opt(5, _int_at_least(1))
    trunk_cache: bool = False  # cache the frozen layers below the LoRA ones per example (lmas/lm/trunk.py)


@dataclass
class EvalConfig:
    """Evaluation settings (``eval.*`` in the config)."""

    split: str = _opt("test", _one_of("val", "test"))
    batch_size: int = _opt(32, _int_at_least(1))
    max_new_tokens: int = _opt(12, _int_at_least(1))
    initial: bool = True  # evaluate the untrained model on every task (b, for FWT)
    next_task: bool = True  # evaluate the next round's tasks before training them
    curve_every: int = _opt(0, _int_at_least(0, " (0 = no learning curves)"))  # >0: val score every k steps
    mixed_adapters: bool = True  # score single-adapter agents together in mixed-adapter batches
    # tasks without a val split use this many training examples where val is needed
    val_fallback: int = _opt(32, _int_at_least(1))
    shared_trunk: bool = False  # agents' label scores share one pass of the layers below the LoRA ones


@dataclass
class DataConfig:
    """How examples become token sequences (``data.*``)."""

    max_length: int = _opt(128, _int_at_least(8, " (tokens per sequence)"))


@dataclass
class PopulationLoraConfig:
    """Every agent's LoRA adapter (``population.lora.*``: :func:`lmas.population.population.lora_config`)."""

    r: int = _opt(8, _rule(lambda v: _is_int(v) and v >= 1, "the LoRA rank must be an integer >= 1"))
    alpha: int = _opt(16, _rule(lambda v: _is_num(v) and v > 0, "expected a number > 0"))
    dropout: float = _opt(0.0, _rule(lambda v: _is_num(v) and 0 <= v < 1, "expected a number in [0, 1)"))
    target_modules: Any = field(default_factory=lambda: ["q_proj", "v_proj"], metadata={"check": _MODULES})
    layers_to_transform: list[int] | None = _opt(
        None, _list_of(lambda i: _is_int(i) and i >= 0, "layer indices >= 0", "every layer")
    )
    fan_in_fan_out: bool = False


@dataclass
class PopulationConfig:
    """The agents (``population.*``: :class:`lmas.population.population.Population`)."""

    _target_: str = "lmas.population.population.Population"
    agents: Any = _opt(1, _agents)  # a number, or the agents' names
    seed: Any = 0  # ${seed}: checked there
    lora: PopulationLoraConfig = field(default_factory=PopulationLoraConfig)


@dataclass
class StreamConfig:
    """The tasks in training order (``stream.*``: :class:`lmas.data.stream.Stream`); ``tasks`` each name a
    task factory (``_target_``) and its arguments."""

    _target_: str = "lmas.data.stream.Stream"
    name: str = MISSING
    tasks: list[Any] = MISSING
    scenario: str = _opt("task", _one_of("task", "class", "domain"))  # lmas.data.stream.SCENARIOS
    order: str = _opt("fixed", _one_of("fixed", "shuffle"))
    seed: Any = 0  # ${seed}: checked there
    max_train: int | None = _opt(None, _null_or_int("no cap"))
    max_eval: int | None = _opt(None, _null_or_int("no cap"))


@dataclass
class RootConfig:
    """The whole config: conf/train.yaml's own options and one key per config group; the groups without a schema
    here take their ``_target_``'s parameters (:func:`problems`), ``loop`` (the round body) too."""

    seed: Any = _opt(0, _rule(lambda v: _is_int(v) and 0 <= v <= SEED_MAX, f"expected an integer in [0, {SEED_MAX}]"))
    progress: bool = True
    resume: str | None = None  # a run dir to continue
    loop: Any = None
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data: DataConfig = field(default_factory=DataConfig)
    population: PopulationConfig = field(default_factory=PopulationConfig)
    stream: Any = None  # StreamConfig, checked by problems(); another factory (cl_stream) takes its own keys
    model: Any = None
    allocation: Any = None
    topology: Any = None
    strategy: Any = None
    transfer: Any = None
    distill: Any = None
    trainer: Any = None
    logger: Any = None
    paths: Any = None


ConfigStore.instance().store(name=SCHEMA_NAME, node=RootConfig)
# the typed sections and the file that writes each (named in the problem of a key it does not have)
SECTIONS: dict[str, tuple[type, str]] = {
    "": (RootConfig, "the config (conf/train.yaml and its groups)"),
    "train": (TrainConfig, "train (conf/train.yaml)"),
    "eval": (EvalConfig, "eval (conf/train.yaml)"),
    "data": (DataConfig, "data (conf/train.yaml)"),
    "population": (PopulationConfig, "population (conf/population/)"),
    "population.lora": (PopulationLoraConfig, "population.lora (conf/population/)"),
    "stream": (StreamConfig, "stream (conf/stream/)"),
}


class Reader:
    """A composed config as the checks read it: resolved values by option path; problems in ``errors``."""

    def __init__(self, cfg: DictConfig, errors: list[str], missing: set[str]):
        self.cfg, self.errors, self.missing = cfg, errors, missing

    def get(self, path: str, default: Any = None) -> Any:
        """The resolved value at ``path`` (containers as plain Python), or ``default`` if absent or missing."""
        if path in self.missing:
            return default
        try:
            value = OmegaConf.select(self.cfg, path, default=_ABSENT, throw_on_missing=True)
            if isinstance(value, (DictConfig, ListConfig)):
                value = OmegaConf.to_container(value, resolve=True)
        except OmegaConfBaseException as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.fail(path, _raw(self.cfg, path), f"cannot be resolved ({first})")
            return default
        return default if value is _ABSENT else value

    def fail(self, path: str, value: Any, allowed: str) -> None:
        """Record ``<path>=<value>: <allowed>``."""
        self.errors.append(f"{path}={show(value)}: {allowed}")

    def keys(self, path: str, allowed: list[str], what: str, kind: str = "an option") -> None:
        """Every key of the mapping at ``path`` must be in ``allowed`` (a key added with + or misspelt in a file)."""
        node = OmegaConf.select(self.cfg, path) if path else self.cfg
        if not isinstance(node, DictConfig):
            return
        for key in map(str, node.keys()):
            if key not in allowed and key not in HYDRA_KEYS and not (path == "" and key == "hydra"):
                full = f"{path}.{key}" if path else key
                hint = difflib.get_close_matches(key, allowed, n=1)
                self.errors.append(
                    f"{full}: not {kind} of {what}"
                    + (f" (did you mean {path + '.' if path else ''}{hint[0]}?)" if hint else "")
                    + f"; allowed: {', '.join(allowed) or 'none'}"
                )

    def getter(self, path: str) -> Callable[[str], Any]:
        """``key -> get("<path>.<key>")``."""
        return lambda key: self.get(f"{path}.{key}")

    def target(self, path: str) -> Any:
        """The class or function that ``<path>._target_`` names; None if absent or not importable."""
        name = self.get(f"{path}._target_")
        try:
            return locate(name) if name else None
        except ImportError:  # problems() names it
            return None


def _raw(cfg: DictConfig, path: str) -> Any:
    """The unresolved value at ``path`` (e.g. ``${oc.env:X}``), for a message."""
    parent, _, key = path.rpartition(".")
    node = OmegaConf.select(cfg, parent, throw_on_resolution_failure=False) if parent else cfg
    return node._get_node(key)._value() if isinstance(node, DictConfig) and key in node else "?"  # type: ignore


def show(value: Any) -> str:
    """A value as one would type it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value and re.fullmatch(r"[\w.:/+-]+", value) else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{show(v)}" for k, v in value.items()) + "}"
    return str(value)


def locate(target: str) -> Any:
    """What ``_target_: <target>`` names, found as Hydra's instantiate finds it; an ImportError says what is
    wrong (Hydra's reason, and the closest name in the parent module)."""
    from hydra._internal.utils import _locate  # what instantiate calls

    if not isinstance(target, str) or not target:
        raise ImportError("expected a dotted path package.module.Name")
    try:
        obj = _locate(target)
    except Exception as exc:  # noqa: BLE001 - ImportError, or ValueError for a malformed path
        why = " ".join(str(exc).replace(f"Error loading '{target}':", "").split())
        module, _, name = target.rpartition(".")
        try:
            hint = difflib.get_close_matches(name, dir(importlib.import_module(module)), n=1) if module else []
        except Exception:  # noqa: BLE001 - no hint then
            hint = []
        raise ImportError(why + (f" (did you mean {module}.{hint[0]}?)" if hint else "")) from exc
    if not callable(obj):
        raise ImportError(f"{target} is not a class or function")
    return obj


def problems(reader: Reader) -> None:
    """Record in ``reader.errors`` what the types let through: each section's keys and field checks, the
    stream's tasks, the trainer's options, every ``_target_`` and its keys, and the files options name."""
    for path, (cls, what) in SECTIONS.items():
        if path == "stream" and not _plain_stream(reader):
            continue  # a stream factory's node: its keys are checked against its signature by _targets
        reader.keys(path, [f.name for f in fields(cls)], what)
        for f in fields(cls):
            option = f"{path}.{f.name}" if path else f.name
            value = reader.get(option, _ABSENT) if "check" in f.metadata else _ABSENT
            wrong = f.metadata["check"](value) if value is not _ABSENT else None
            if wrong:
                reader.fail(option, value, wrong)
    if _plain_stream(reader):
        _tasks(reader)
    _trainer(reader)
    _targets(reader)


def _plain_stream(reader: Reader) -> bool:
    """Whether ``stream`` builds a :class:`lmas.data.stream.Stream` from its ``tasks`` (not another factory)."""
    return reader.get("stream._target_", StreamConfig._target_) == StreamConfig._target_


def _tasks(reader: Reader) -> None:
    """A stream's tasks: a non-empty list of ``{_target_: <task factory>, name: <unique name>, ...}``."""
    tasks, shape = reader.get("stream.tasks"), "{_target_: <task factory>, name: <name>, ...}"
    seen: dict[Any, int] = {}
    if (not isinstance(tasks, list) or not tasks) and "stream.tasks" not in reader.missing:
        reader.fail("stream.tasks", tasks, f"a stream needs a non-empty list of tasks, each {shape}")
    for i, task in enumerate(tasks if isinstance(tasks, list) else []):
        path, name = f"stream.tasks[{i}]", task.get("name") if isinstance(task, dict) else None
        if not isinstance(task, dict):
            reader.fail(path, task, f"expected a mapping {shape}")
            continue
        if "_target_" not in task:
            reader.errors.append(f"{path}._target_: missing; every task needs the function that builds it")
        if not isinstance(name, str) or not name:
            reader.fail(f"{path}.name", name, "every task needs a non-empty name")
        elif name in seen:
            why = f"task names must be unique in a stream; stream.tasks[{seen[name]}] has this name too"
            reader.fail(f"{path}.name", name, why)
        seen.setdefault(name, i)


def _trainer(reader: Reader) -> None:
    """``trainer.*`` are lightning.Trainer's arguments, less those the loop sets; a precision the loop supports."""
    import lightning

    from lmas.lm.device import PRECISIONS  # what the loop and the evaluator support (autocast)

    trainer = reader.get("trainer")
    for key, where in TRAINER_SET_BY_LOOP.items() if isinstance(trainer, dict) else ():
        if key in trainer:
            reader.fail(
                f"trainer.{key}",
                trainer[key],
                f"set by the loop itself; {f'use {where} instead' if where else 'remove it'}",
            )
    if isinstance(trainer, dict) and "precision" in trainer and str(trainer["precision"]) not in PRECISIONS:
        why = "expected 32-true, bf16-mixed or 16-mixed (mixed precision autocasts and keeps the LoRA weights in"
        reader.fail("trainer.precision", trainer["precision"], why + " float32; '*-true' would cast base and adapters)")
    allowed = [p for p in inspect.signature(lightning.Trainer).parameters if p != "self"]
    reader.keys("trainer", allowed, "lightning.Trainer", kind="an argument")


def _target_nodes(node: Any, path: str) -> Iterator[tuple[str, dict]]:
    """(path, mapping) of every mapping with a ``_target_`` in the (unresolved) config tree."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield path, node
        for key, value in node.items():
            if not (path == "" and key == "hydra"):
                yield from _target_nodes(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _target_nodes(value, f"{path}[{i}]")


def _targets(reader: Reader) -> None:
    """Every ``_target_`` imports; a node without a schema takes only its target's parameters; the files
    its options name exist (:mod:`lmas.paths`)."""
    from lmas import paths

    for path, _ in _target_nodes(OmegaConf.to_container(reader.cfg, resolve=False), ""):
        target = reader.get(f"{path}._target_")
        try:
            obj = locate(target)
        except ImportError as exc:
            reader.fail(f"{path}._target_", target, f"cannot be imported: {exc}; expected package.module.Name")
            continue
        name = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
        for option, value, what in paths.node_problems(name, reader.getter(path)):
            reader.fail(f"{path}.{option}", value, what)
        try:
            params = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            continue
        typed = path in SECTIONS and (path != "stream" or _plain_stream(reader))
        if not typed and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            allowed = [p for p, v in params.items() if v.kind is not inspect.Parameter.VAR_POSITIONAL]
            reader.keys(path, allowed, target, kind="an argument")
    for key in ("paths.output_dir", "paths.cache_dir"):
        value = reader.get(key)
        if isinstance(value, str) and value and paths.absolute(value).is_file():
            reader.fail(key, value, f"{paths.absolute(value)} is a file; expected a folder (made if missing)")
