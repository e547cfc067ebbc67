"""Each option's own checks on a composed config (:func:`problems`), beyond what the typed schema
(:mod:`lmas.schema`) makes Hydra check at compose time; :mod:`lmas.config` adds the cross-option rules."""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import fields
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lmas.schema import ABSENT, HYDRA_KEYS, SECTIONS, TRAINER_SET_BY_LOOP, StreamConfig, show


class Reader:
    """A composed config as the checks read it: resolved values by option path; problems in ``errors``."""

    def __init__(self, cfg: DictConfig, errors: list[str], missing: set[str]):
        self.cfg, self.errors, self.missing = cfg, errors, missing

    def get(self, path: str, default: Any = None) -> Any:
        """The resolved value at ``path`` (containers as plain Python), or ``default`` if absent or missing."""
        if path in self.missing:
            return default
        try:
            value = OmegaConf.select(self.cfg, path, default=ABSENT, throw_on_missing=True)
            if isinstance(value, (DictConfig, ListConfig)):
                value = OmegaConf.to_container(value, resolve=True)
        except OmegaConfBaseException as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.fail(path, _raw(self.cfg, path), f"cannot be resolved ({first})")
            return default
        return default if value is ABSENT else value

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
            value = reader.get(option, ABSENT) if "check" in f.metadata else ABSENT
            wrong = f.metadata["check"](value) if value is not ABSENT else None
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
