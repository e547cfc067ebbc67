"""Per-round checkpoints: everything a run needs to continue after a crash, written atomically.

``<run_dir>/checkpoint/`` holds, after every complete round:

* ``state.json`` — the loop's state (round index, knowledge matrix, histories, message counts,
  curves, timings), the allocation's and the strategy's state (tensors replaced by references),
  the random-number generator states, and each agent's adapter configs;
* ``tensors.safetensors`` — the strategy's tensors (EWC Fisher and anchors, ...);
* ``adapters/<agent>.safetensors`` — every adapter of every agent.

The folder is written as ``checkpoint.new`` and swapped in by renames, so a crash at any moment
leaves either the previous checkpoint or the new one. Only safetensors and JSON are read back:
nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

DIR = "checkpoint"
FORMAT_VERSION = 1
_TENSOR = "__tensor__"
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
    np_state = np.random.get_state()
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
def adapter_specs(population) -> dict[str, list[dict]]:
    """Per agent, the LoRA settings of each of its adapters (to rebuild agents made by merges)."""
    out = {}
    for name, agent in population.agents.items():
        specs = []
        for adapter in agent.adapters:
            cfg = population.model.peft_config[adapter]
            spec = {f: getattr(cfg, f) for f in _LORA_FIELDS}
            spec["target_modules"] = sorted(spec["target_modules"]) if spec["target_modules"] else None
            spec["layers_to_transform"] = list(spec["layers_to_transform"] or []) or None
            specs.append(spec)
        out[name] = specs
    return out


def restore_population(population, specs: dict[str, list[dict]], folder: Path, histories: dict[str, list]) -> None:
    """Recreate missing agents with their saved LoRA settings and load every adapter."""
    for name, adapters in specs.items():
        if name not in population.agents:
            population.add_agent(name, dataclasses.replace(population.lora, rank_pattern={}, alpha_pattern={},
                                                           **adapters[0]))
        population.load_adapter(name, folder / f"{name}.safetensors")
        population.agents[name].history = list(histories.get(name, []))
    extra = [n for n in population.names if n not in specs]
    if extra:
        raise ValueError(f"checkpoint in {folder.parent}: the population has agents {extra} the checkpoint lacks; "
                         "resume with the run's own config")


# --- the folder -----------------------------------------------------------------------------
def save(run_dir: Path, state: dict, population) -> Path:
    """Write ``state`` (tensors allowed anywhere) and every agent's adapters; atomic swap."""
    run_dir = Path(run_dir)
    new, final, old = run_dir / f"{DIR}.new", run_dir / DIR, run_dir / f"{DIR}.old"
    shutil.rmtree(new, ignore_errors=True)
    (new / "adapters").mkdir(parents=True)
    for name in population.names:
        population.save_adapter(name, new / "adapters" / f"{name}.safetensors")
    plain, tensors = split_tensors({**state, "rng": rng_state(), "adapters": adapter_specs(population),
                                    "version": FORMAT_VERSION})
    save_file(tensors, str(new / "tensors.safetensors"))
    (new / "state.json").write_text(json.dumps(plain))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of ``run_dir`` (``checkpoint``, or ``checkpoint.old``
    if a crash hit between the two renames of :func:`save`), or None."""
    for name in (DIR, f"{DIR}.old"):
        folder = Path(run_dir) / name
        if (folder / "state.json").is_file():
            return folder
    return None


def load(run_dir: Path) -> tuple[dict, Path]:
    """The saved state (tensors restored) and the folder it came from."""
    folder = find(run_dir)
    if folder is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint/state.json; nothing to resume (was a round completed?)")
    plain = json.loads((folder / "state.json").read_text())
    if plain.get("version") != FORMAT_VERSION:
        raise ValueError(f"{folder}: checkpoint format {plain.get('version')} is not {FORMAT_VERSION}")
    return join_tensors(plain, load_file(str(folder / "tensors.safetensors"))), folder
