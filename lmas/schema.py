"""The typed schema of lmas-train's config (dataclasses registered with Hydra's ConfigStore as ``train_schema``,
first in conf/train.yaml's defaults) and the checks each option makes on its own. Hydra refuses at compose time a
key no section has and a value of the wrong type; :func:`problems` checks what types cannot say, as
``<option>=<value>: <what is allowed>``: field checks, keys added with ``+``, every ``_target_`` and its keys, the
trainer's options, the stream's tasks, the files options name (``train.lr``, ``seed``, ``lora.target_modules`` are
``Any`` to Hydra so their own checks say what is allowed; a stream factory's keys are checked here too).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

SCHEMA_NAME = "train_schema"  # the ConfigStore entry conf/train.yaml's defaults list starts with
SEED_MAX = 2**32 - 1  # lightning.seed_everything replaces a seed outside [0, 2**32 - 1] by a random one
AGENT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")  # as lmas.population.population checks
HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}
# lightning.Trainer arguments the loop sets itself (lmas/loop.py), and where to set them
TRAINER_SET_BY_LOOP = dict.fromkeys(
    ("callbacks", "enable_checkpointing", "enable_model_summary", "num_sanity_val_steps")
)
TRAINER_SET_BY_LOOP |= {
    "max_epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "enable_progress_bar": "progress",
    "logger": "logger=<wandb|csv|tensorboard|mlflow|none>",
}
Check = Callable[[Any], "str | None"]  # a value -> what is wrong with it (None: fine)
ABSENT = object()


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


def _agents(v: Any) -> str | None:
    allowed = "expected a positive integer, a non-empty list of agent names or (population=bases) agent: base"
    if _is_int(v):
        return None if v >= 1 else allowed
    if isinstance(v, dict) and v and all(isinstance(b, str) for b in v.values()):
        v = list(v)
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
    # batches of similar length in a shuffled order (lmas/lm/batching.py): on the default stream 1.2x less CPU
    # per epoch, no worse val loss over 3 seeds (benchmarks/padding.py); false: plain shuffled batches
    length_grouping: bool = True
    # torch.compile each decoder layer of the base (lmas/lm/compiled.py), for training and evaluation; the first
    # steps pay the compilation (benchmarks/compile.py on CPU, benchmarks/gpu.py on CUDA)
    compile: bool = False


@dataclass
class EvalConfig:
    """Evaluation settings (``eval.*`` in the config)."""

    split: str = _opt("test", _one_of("val", "test"))
    batch_size: int = _opt(32, _int_at_least(1))
    max_new_tokens: int = _opt(12, _int_at_least(1))
    initial: bool = True  # evaluate the untrained model on every task (b, for FWT)
    next_task: bool = True  # evaluate the next round's tasks before training them
    # full: every met task after every round; minimal: only what the CL metrics read (Evaluator docstring)
    schedule: str = _opt("full", _one_of("full", "minimal"))
    curve_every: int = _opt(0, _int_at_least(0, " (0 = no learning curves)"))  # >0: val score every k steps
    # score single-adapter agents together in mixed-adapter batches: auto = on CUDA only (slower on CPU, measured
    # in benchmarks/results/mixed_adapter_eval.json)
    mixed_adapters: Any = _opt("auto", _rule(lambda v: v in ("auto", True, False), "expected auto, true or false"))
    # tasks without a val split use this many training examples where val is needed
    val_fallback: int = _opt(32, _int_at_least(1))
    shared_trunk: bool = False  # agents' label scores share one pass of the layers below the LoRA ones
    # a directory: the untrained model's scores and the frozen trunk's activations, shared by a sweep's runs
    cache: str | None = _opt(
        None, _rule(lambda v: v is None or (isinstance(v, str) and v != ""), "expected null (off) or a directory")
    )
    cache_mb: float = _opt(4096.0, _rule(lambda v: _is_num(v) and v > 0, "expected a size in MB > 0"))


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
    agents: Any = _opt(1, _agents)  # a number, or the agents' names (population=bases: agent -> its base's name)
    bases: Any = None  # population=bases: more base models by name (lmas.population.bases)
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
    split_seed: Any = None  # null: splits as built; an int (${seed}) resamples train/val, never test


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
    probes: Any = None
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
