"""Checkpoint durability (lmas/checkpoint.py): fsync before the swap, a kill between the two renames,
and damaged files that are named in the error instead of being loaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lmas import checkpoint
from lmas.checkpoint import CheckpointError
from lmas.population.population import Population


@pytest.fixture(name="pop")
def pop_fixture(tiny_base):
    return Population(tiny_base, agents=["a", "b"], lora={"r": 2, "alpha": 4}, seed=0)


def _bump(pop: Population, value: float) -> None:
    """Set every LoRA weight of every agent to ``value`` (a recognisable state)."""
    for name in pop.names:
        state = {k: torch.full_like(v, value) for k, v in pop.adapter_state(name).items()}
        pop.load_adapter_state(name, state)


def _weights(pop: Population) -> dict[str, torch.Tensor]:
    return {f"{n}/{k}": v for n in pop.names for k, v in pop.adapter_state(n).items()}


def _state(r: int) -> dict:
    return {"round": r, "fisher": torch.arange(6, dtype=torch.float32).reshape(2, 3) * (r + 1), "note": f"round {r}"}


class Killed(BaseException):
    """The process dies here (not an Exception: nothing may catch it)."""


def _kill_at_second_rename(monkeypatch) -> None:
    """Path.rename raises at the swap's second rename (checkpoint.new -> checkpoint) once a previous
    checkpoint was moved away: the state a SIGKILL between the two renames leaves on disk."""
    rename = Path.rename

    def dying(self, target):
        if self.name == f"{checkpoint.DIR}.new" and (self.parent / f"{checkpoint.DIR}.old").exists():
            raise Killed
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", dying)


def _gap_state(pop, run_dir, monkeypatch) -> tuple[dict, dict]:
    """Round 0 saved; round 1's save killed between its renames. Returns the weights of both rounds."""
    _bump(pop, 0.25)
    checkpoint.save(run_dir, _state(0), pop)
    w0 = _weights(pop)
    _bump(pop, 0.75)
    w1 = _weights(pop)
    with monkeypatch.context() as m:
        _kill_at_second_rename(m)
        with pytest.raises(Killed):
            checkpoint.save(run_dir, _state(1), pop)
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.new", "checkpoint.old"]
    return w0, w1


def _restored(tiny_base_factory, run_dir) -> tuple[dict, dict]:
    state, folder = checkpoint.load(run_dir)
    fresh = Population(tiny_base_factory(), agents=["a", "b"], lora={"r": 2, "alpha": 4}, seed=1)
    checkpoint.restore_population(fresh, state["adapters"], folder / "adapters", {})
    return state, _weights(fresh)


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.fixture(name="new_base")
def new_base_fixture():
    from lmas.models.providers import tiny

    return lambda: tiny(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=0)


def test_a_kill_between_the_two_renames_resumes_from_the_complete_new_checkpoint(pop, new_base, tmp_path,
                                                                                 monkeypatch):
    _, w1 = _gap_state(pop, tmp_path, monkeypatch)
    state, weights = _restored(new_base, tmp_path)
    assert state["round"] == 1 and state["note"] == "round 1"
    torch.testing.assert_close(state["fisher"], _state(1)["fisher"], rtol=0, atol=0)
    _assert_same(weights, w1)
    # the next save finishes the interrupted swap: one checkpoint, the newest
    checkpoint.save(tmp_path, _state(2), pop)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert checkpoint.load(tmp_path)[0]["round"] == 2


@pytest.mark.parametrize("damage", ["no manifest", "half state.json"])
def test_a_kill_between_the_renames_with_an_incomplete_new_folder_falls_back_to_the_old_one(
        damage, pop, new_base, tmp_path, monkeypatch):
    w0, _ = _gap_state(pop, tmp_path, monkeypatch)
    new = tmp_path / "checkpoint.new"
    (new / "manifest.json").unlink()  # as if killed while checkpoint.new was still being written
    if damage == "half state.json":
        (new / "state.json").write_text((new / "state.json").read_text()[:40])
    state, weights = _restored(new_base, tmp_path)
    assert state["round"] == 0
    torch.testing.assert_close(state["fisher"], _state(0)["fisher"], rtol=0, atol=0)
    _assert_same(weights, w0)
    checkpoint.save(tmp_path, _state(1), pop)  # the next save starts over and keeps one checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert checkpoint.load(tmp_path)[0]["round"] == 1


def test_every_file_and_folder_is_fsynced_before_the_swap_and_the_run_dir_after(pop, tmp_path, monkeypatch):
    checkpoint.save(tmp_path, _state(0), pop)
    events: list[tuple[str, str]] = []
    fsync, rename = os.fsync, Path.rename

    def spy_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def spy_rename(self, target):
        events.append(("rename", str(self)))
        return rename(self, target)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(Path, "rename", spy_rename)
    checkpoint.save(tmp_path, _state(1), pop)
    renames = [i for i, (kind, _) in enumerate(events) if kind == "rename"]
    assert len(renames) == 2
    before = {p for kind, p in events[: renames[0]] if kind == "fsync"}
    final, new = tmp_path.resolve() / "checkpoint", tmp_path.resolve() / "checkpoint.new"
    expected = {str(new / p.relative_to(final)) for p in final.rglob("*")} | {str(new)}  # as written
    assert expected <= before, sorted(expected - before)
    assert {"state.json", "manifest.json", "tensors.safetensors", "a.safetensors", "b.safetensors",
            "adapters"} <= {Path(p).name for p in expected}
    assert ("fsync", str(tmp_path.resolve())) in events[renames[1]:]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # a byte of tensor data (safetensors keeps its header first)
    path.write_bytes(bytes(data))


_DAMAGE = [  # (file, damage, manifest): without a manifest (checkpoints of earlier lmas versions) only
    # what the file formats themselves can tell is caught; a flipped data byte needs the checksums
    ("state.json", _truncate, True),
    ("tensors.safetensors", _truncate, True),
    ("adapters/b.safetensors", _truncate, True),
    ("tensors.safetensors", _flip, True),
    ("adapters/a.safetensors", _flip, True),
    ("state.json", _truncate, False),
    ("tensors.safetensors", _truncate, False),
    ("adapters/b.safetensors", _truncate, False),
]


@pytest.mark.parametrize("damaged, how, manifest", _DAMAGE,
                         ids=[f"{f}-{h.__name__[1:]}-{'manifest' if m else 'no-manifest'}" for f, h, m in _DAMAGE])
def test_a_damaged_checkpoint_file_is_an_error_naming_it(damaged, how, manifest, pop, new_base, tmp_path):
    _bump(pop, 0.5)
    checkpoint.save(tmp_path, _state(0), pop)
    folder = tmp_path / "checkpoint"
    if not manifest:
        (folder / "manifest.json").unlink()
    how(folder / damaged)
    with pytest.raises(CheckpointError) as info:
        _restored(new_base, tmp_path)
    message = str(info.value)
    assert message.startswith(str((folder / damaged).resolve()) + ":"), message
    assert "damaged" in message


def test_a_damaged_manifest_is_an_error_naming_it(pop, tmp_path):
    checkpoint.save(tmp_path, _state(0), pop)
    manifest = tmp_path / "checkpoint" / "manifest.json"
    _truncate(manifest)
    with pytest.raises(CheckpointError, match=f"^{manifest.resolve()}: not readable JSON"):
        checkpoint.load(tmp_path)


def test_a_missing_listed_file_is_an_error_naming_it(pop, tmp_path):
    checkpoint.save(tmp_path, _state(0), pop)
    gone = tmp_path / "checkpoint" / "adapters" / "a.safetensors"
    gone.unlink()
    with pytest.raises(CheckpointError, match=f"^{gone.resolve()}: missing"):
        checkpoint.load(tmp_path)
    assert json.loads((tmp_path / "checkpoint" / "manifest.json").read_text())["sha256"].keys() == {
        "state.json", "tensors.safetensors", "adapters/a.safetensors", "adapters/b.safetensors"}
