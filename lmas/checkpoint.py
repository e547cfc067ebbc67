"""Per-round checkpoints: everything a run needs to continue after a crash, written atomically.

``<run_dir>/checkpoint/`` holds, after every complete round:

* ``state.json`` — the loop's state (round index, knowledge matrix, histories, message counts,
  curves, timings), the allocation's and the strategy's state (tensors replaced by references),
  the random-number generator states, and each agent's adapter configs;
* ``tensors.safetensors`` — the strategy's tensors (EWC Fisher and anchors, ...);
* ``adapters/<agent>.safetensors`` — every adapter of every agent.

* ``manifest.json`` — written last: the SHA-256 of every other file of the folder.

The folder is written as ``checkpoint.new``; its files and folders are fsynced, then it is swapped
in by two renames (``checkpoint`` -> ``checkpoint.old``, ``checkpoint.new`` -> ``checkpoint``) and
the run dir is fsynced. A crash at any moment leaves a complete checkpoint to resume from:

* before the swap: ``checkpoint`` (the previous round);
* between the two renames: ``checkpoint.new`` (complete: it has its ``manifest.json``) or, if it
  does not, ``checkpoint.old`` — :func:`find` takes them in that order, and the next :func:`save`
  first finishes the interrupted swap.

:func:`load` checks every file against the manifest, so a truncated or corrupted file is an error
naming that file (never a half checkpoint loaded). Only safetensors and JSON are read back:
nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from lmas.population.events import History

if TYPE_CHECKING:
    from lmas.population.allocation import Allocation
    from lmas.population.population import Population
    from lmas.strategies.base import Strategy

log = logging.getLogger(__name__)
DIR = "checkpoint"
FORMAT_VERSION = 2  # 2: the loop's state is one RunState entry ("run")
MANIFEST = "manifest.json"
_TENSOR = "__tensor__"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated or corrupted; the message starts with its path."""


_LORA_FIELDS = ("r", "lora_alpha", "target_modules", "layers_to_transform", "lora_dropout", "fan_in_fan_out")


# --- tensors inside JSON-like state -----------------------------------------------------
def split_tensors(obj: Any, tensors: dict[str, Tensor] | None = None) -> tuple[Any, dict[str, Tensor]]:
    """Replace every tensor in ``obj`` (dicts/lists/tuples) by ``{"__tensor__": key}``."""
    tensors = {} if tensors is None else tensors
    if isinstance(obj, Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().cpu().contiguous()
        return {_TENSOR: key}, tensors
    if isinstance(obj, dict):
        return {k: split_tensors(v, tensors)[0] for k, v in obj.items()}, tensors
    if isinstance(obj, (list, tuple)):
        return [split_tensors(v, tensors)[0] for v in obj], tensors
    return obj, tensors


def join_tensors(obj: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of :func:`split_tensors`."""
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


# --- random number generators -----------------------------------------------------------
def rng_state() -> dict:
    """Python, NumPy and torch (CPU) generator states, JSON-safe."""
    py = random.getstate()
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # the MT19937 state (the legacy form is a tuple for it)
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


# --- adapters -----------------------------------------------------------------------------
def adapter_specs(population: Population) -> dict[str, list[dict]]:
    """Per agent, the LoRA settings of each of its adapters (to rebuild agents made by merges)."""
    out = {}
    for name, agent in population.agents.items():
        specs = []
        for adapter in agent.adapters:
            cfg = population.lora_of(adapter)
            spec = {f: getattr(cfg, f) for f in _LORA_FIELDS}
            spec["target_modules"] = sorted(spec["target_modules"]) if spec["target_modules"] else None
            spec["layers_to_transform"] = list(spec["layers_to_transform"] or []) or None
            specs.append(spec)
        out[name] = specs
    return out


def restore_population(
    population: Population, specs: dict[str, list[dict]], folder: Path, histories: dict[str, list]
) -> None:
    """Recreate missing agents with their saved LoRA settings and load every adapter."""
    for name, adapters in specs.items():
        if name not in population.agents:
            population.add_agent(
                name, dataclasses.replace(population.lora, rank_pattern={}, alpha_pattern={}, **adapters[0])
            )
        path = folder / f"{name}.safetensors"
        try:
            population.load_adapter(name, path)
        except SafetensorError as err:
            raise CheckpointError(
                f"{path.resolve()}: not a readable safetensors file ({err}); the checkpoint is damaged"
            ) from None
        population.agents[name].history = History(histories.get(name, []))
    extra = [n for n in population.names if n not in specs]
    if extra:
        raise ValueError(
            f"checkpoint in {folder.parent}: the population has agents {extra} the checkpoint lacks; "
            "resume with the run's own config"
        )


# --- durability ---------------------------------------------------------------------------
def fsync(path: Path) -> None:
    """Flush a file's bytes, or a folder's entries, to disk (a folder that cannot be fsynced is skipped)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if not path.is_dir() or err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def seal(folder: Path) -> None:
    """Write ``manifest.json`` (the SHA-256 of every file) last, then fsync every file and folder."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {"version": FORMAT_VERSION, "sha256": {p.relative_to(folder).as_posix(): sha256(p) for p in files}}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    fsync_tree(folder)


def fsync_tree(folder: Path) -> None:
    """fsync every file below ``folder``, then every folder, deepest first (``folder`` last)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in files:
        fsync(path)
    for sub in sorted({p.parent for p in files} | {folder}, key=lambda p: -len(p.parts)):
        fsync(sub)


def verify(folder: Path) -> None:
    """Check every file of ``folder`` against its ``manifest.json``; raise :class:`CheckpointError` naming
    the first file that is missing or differs. A folder without a manifest (older lmas) is not checked."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return
    manifest = read_json(manifest_path)
    sums = manifest.get("sha256") if isinstance(manifest, dict) else None
    if not isinstance(sums, dict):
        raise CheckpointError(f"{manifest_path.resolve()}: no 'sha256' table; the checkpoint is damaged")
    for rel, expected in sums.items():
        path = folder / rel
        if not path.is_file():
            raise CheckpointError(
                f"{path.resolve()}: missing (listed in {manifest_path.name}); the checkpoint is damaged"
            )
        if sha256(path) != expected:
            raise CheckpointError(
                f"{path.resolve()}: truncated or corrupted (its SHA-256 differs from "
                f"{manifest_path.name}); the checkpoint is damaged"
            )


def read_json(path: Path) -> Any:
    """A checkpoint's JSON file; :class:`CheckpointError` naming it if it cannot be read."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path.resolve()}: not readable JSON ({err}); the checkpoint is damaged") from None


def read_tensors(path: Path) -> dict[str, Tensor]:
    """A checkpoint's safetensors file; :class:`CheckpointError` naming it if it cannot be read."""
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise CheckpointError(
            f"{path.resolve()}: not a readable safetensors file ({err}); the checkpoint is damaged"
        ) from None


# --- the folder -----------------------------------------------------------------------------
def _complete(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def finish_swap(run_dir: Path) -> None:
    """Finish a swap that a crash interrupted between its two renames (see the module doc)."""
    run_dir = Path(run_dir)
    new, final, old = run_dir / f"{DIR}.new", run_dir / DIR, run_dir / f"{DIR}.old"
    if not final.exists() and _complete(new):
        new.rename(final)
        fsync(run_dir)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)


def save(run_dir: Path, state: dict, population: Population) -> Path:
    """Write ``state`` (tensors allowed anywhere) and every agent's adapters; fsync; atomic swap."""
    run_dir = Path(run_dir)
    new, final, old = run_dir / f"{DIR}.new", run_dir / DIR, run_dir / f"{DIR}.old"
    finish_swap(run_dir)
    shutil.rmtree(new, ignore_errors=True)
    (new / "adapters").mkdir(parents=True)
    for name in population.names:
        population.save_adapter(name, new / "adapters" / f"{name}.safetensors")
    plain, tensors = split_tensors(
        {**state, "rng": rng_state(), "adapters": adapter_specs(population), "version": FORMAT_VERSION}
    )
    save_file(tensors, str(new / "tensors.safetensors"))
    (new / "state.json").write_text(json.dumps(plain))
    seal(new)  # manifest last, every byte on disk before the swap
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)  # a crash from here until the next rename leaves checkpoint.new complete
    new.rename(final)
    fsync(run_dir)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of ``run_dir``, or None: ``checkpoint``; else, after a
    crash between the two renames of :func:`save`, ``checkpoint.new`` if complete, else ``checkpoint.old``."""
    run_dir = Path(run_dir)
    final, new, old = run_dir / DIR, run_dir / f"{DIR}.new", run_dir / f"{DIR}.old"
    if (final / "state.json").is_file():
        return final
    if _complete(new):
        return new
    if (old / "state.json").is_file():
        return old
    return None


def load(run_dir: Path) -> tuple[dict, Path]:
    """The saved state (tensors restored) and the folder it came from; every file checked first."""
    folder = find(run_dir)
    if folder is None:
        raise FileNotFoundError(
            f"{Path(run_dir).resolve()}: no checkpoint/state.json; nothing to resume (was a round completed?)"
        )
    verify(folder)
    plain = read_json(folder / "state.json")
    if not isinstance(plain, dict) or plain.get("version") != FORMAT_VERSION:
        version = plain.get("version") if isinstance(plain, dict) else None
        raise CheckpointError(
            f"{(folder / 'state.json').resolve()}: checkpoint format {version} is not {FORMAT_VERSION}"
        )
    return join_tensors(plain, read_tensors(folder / "tensors.safetensors")), folder


def save_round(
    run_dir: Path, r: int, run: dict, population: Population, allocation: Allocation, strategy: Strategy
) -> Path:
    """The checkpoint after round ``r``: the run's state (``RunState.to_dict``), the allocation's and the
    strategy's state, every agent's history and adapters, the random-number generators."""
    histories = {n: a.history.to_list() for n, a in population.agents.items()}
    parts = {"allocation": allocation.state_dict(), "strategy": strategy.state_dict()}
    return save(run_dir, {"round": r, "run": run, **parts, "histories": histories}, population)


def load_round(run_dir: Path, population: Population, allocation: Allocation, strategy: Strategy) -> tuple[int, dict]:
    """Restore :func:`save_round` into ``population``, ``allocation``, ``strategy`` and the RNGs; returns the
    last complete round and the run's state dict (for ``RunState.from_dict``)."""
    state, folder = load(run_dir)
    restore_population(population, state["adapters"], folder / "adapters", state["histories"])
    allocation.load_state_dict(state["allocation"])
    strategy.load_state_dict(state["strategy"])
    strategy.restore_model(population)
    set_rng_state(state["rng"])
    log.info("resumed %s after round %d (from %s)", run_dir, state["round"], folder)
    return int(state["round"]), state["run"]
