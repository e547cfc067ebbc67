"""The model cache (lmas/models/providers.py, convert_once): processes that convert into an empty cache at
once all end with the same whole model; a half folder left by a killed process is never taken for a model."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmas.models import providers

IDS = [[1, 504, 3575, 282, 4649, 314, 2]]

# One process of the race: load lmas, say "ready", wait for "go", convert (or wait for the other), then
# load the folder with transformers and save the logits on IDS.
WORKER = r"""
import os, sys, time
from pathlib import Path
cache, kind, out, ready, go = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5])
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from lmas.models import providers

def convert(tmp):
    with open(Path(cache) / "conversions.log", "a") as fh:
        fh.write(f"{os.getpid()}\n")
    base = providers.tiny(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=3)
    time.sleep(1.0)  # the other process reaches convert_once meanwhile
    base.model.save_pretrained(tmp)
    base.tokenizer.save_pretrained(tmp)

ready.write_text("ready")
while not go.exists():
    time.sleep(0.01)
if kind == "smollm2":
    folder = providers.ensure_smollm2_folder(cache)
else:
    folder = providers.convert_once(Path(cache) / "tiny", convert)
model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
with torch.no_grad():
    logits = model(input_ids=torch.tensor(%r)).logits
save_file({"logits": logits.contiguous()}, str(out))
print(folder)
""" % (IDS,)


def _race(cache: Path, kind: str, tmp_path: Path, n: int = 2, timeout: float = 900) -> list[torch.Tensor]:
    """Start ``n`` processes, release them at once, return each one's logits."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    go = tmp_path / "go"
    procs, outs, readies = [], [], []
    for i in range(n):
        outs.append(tmp_path / f"logits{i}.safetensors")
        readies.append(tmp_path / f"ready{i}")
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(cache), kind, str(outs[-1]),
                                       str(readies[-1]), str(go)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env))
    deadline = time.monotonic() + timeout
    while not all(r.exists() for r in readies):
        for p in procs:
            assert p.poll() is None, p.communicate()[1].decode()[-3000:]
        assert time.monotonic() < deadline, "workers did not start"
        time.sleep(0.05)
    go.write_text("go")
    for p in procs:
        out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        assert p.returncode == 0, err.decode()[-3000:]
    return [load_file(str(o))["logits"] for o in outs]


def _leftovers(cache: Path, folder: str) -> list[str]:
    """Entries of the cache other than the finished folder, its lock file and the test's log."""
    return sorted(p.name for p in cache.iterdir() if p.name not in (folder, f".{folder}.lock", "conversions.log"))


def _save_tiny(out: Path, seed: int = 3) -> None:
    base = providers.tiny(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=seed)
    base.model.save_pretrained(out)
    base.tokenizer.save_pretrained(out)


def _logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits


def test_two_processes_converting_into_an_empty_cache_at_once_end_with_one_whole_model(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    a, b = _race(cache, "tiny", tmp_path)
    assert torch.equal(a, b)
    assert len((cache / "conversions.log").read_text().split()) == 1  # the loser waited and used the folder
    assert providers.is_converted(cache / "tiny")
    assert _leftovers(cache, "tiny") == []  # no temp folder
    torch.testing.assert_close(a, _logits(cache / "tiny"), rtol=0, atol=0)


@pytest.mark.slow
def test_two_processes_converting_the_embedded_model_into_an_empty_cache_at_once(tmp_path, smollm2_folder):
    """The real GGUF conversion (tens of seconds on 2 cores, twice that under load) in two processes at once."""
    cache = tmp_path / "cache"
    cache.mkdir()
    a, b = _race(cache, "smollm2", tmp_path)
    assert torch.equal(a, b)
    folder = cache / providers.SMOLLM2_FOLDER
    assert providers.is_converted(folder) and _leftovers(cache, providers.SMOLLM2_FOLDER) == []
    torch.testing.assert_close(a, _logits(smollm2_folder), rtol=0, atol=0)  # the same model as the shared cache


def test_without_locks_the_loser_of_the_rename_keeps_the_winners_folder(tmp_path, monkeypatch):
    """Where the filesystem has no locks both processes convert; the one that renames second keeps the
    first one's folder and removes its own temp folder."""
    monkeypatch.setattr(providers, "_lock", lambda path: _no_lock())
    final = tmp_path / "tiny"

    def convert_while_another_process_finishes(tmp: Path) -> None:
        _save_tiny(tmp, seed=3)
        winner = tmp_path / ".tiny-winner"  # what the other process does meanwhile: the same steps
        _save_tiny(winner, seed=3)
        (winner / "who").write_text("winner")
        (winner / providers.COMPLETE).write_text("finished\n")
        os.rename(winner, final)

    assert providers.convert_once(final, convert_while_another_process_finishes) == final
    assert (final / "who").read_text() == "winner" and providers.is_converted(final)
    assert _leftovers(tmp_path, "tiny") == []


class _no_lock:
    def __enter__(self) -> bool:
        return False

    def __exit__(self, *exc) -> None:
        return None


def test_a_half_folder_left_by_killed_conversions_is_not_taken_for_a_model(tmp_path):
    final = tmp_path / "tiny"
    _save_tiny(final, seed=3)
    weights = final / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # killed while writing, by a non-atomic writer
    stale = tmp_path / ".tiny-abc123"  # a temp folder of a process killed an hour ago
    stale.mkdir()
    (stale / "config.json").write_text("{")
    old = time.time() - 2 * providers.STALE_S
    os.utime(stale, (old, old))
    young = tmp_path / ".tiny-def456"  # a conversion running now (on another machine, say): kept
    young.mkdir()
    calls = []

    def convert(tmp: Path) -> None:
        calls.append(tmp)
        _save_tiny(tmp, seed=3)

    assert providers.convert_once(final, convert) == final
    assert len(calls) == 1 and providers.is_converted(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tiny-def456", ".tiny.lock", "tiny"]
    reference = tmp_path / "reference"
    _save_tiny(reference, seed=3)
    torch.testing.assert_close(_logits(final), _logits(reference), rtol=0, atol=0)


def test_a_whole_folder_converted_before_markers_is_adopted_without_converting_again(tmp_path):
    final = tmp_path / "tiny"
    _save_tiny(final, seed=3)
    before = (final / "model.safetensors").stat().st_mtime_ns
    calls = []
    assert providers.convert_once(final, calls.append) == final
    assert calls == [] and providers.is_converted(final)
    assert (final / "model.safetensors").stat().st_mtime_ns == before


def test_a_conversion_that_fails_leaves_nothing_and_the_next_one_succeeds(tmp_path):
    final = tmp_path / "tiny"

    def failing(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("out of disk")

    with pytest.raises(RuntimeError, match="out of disk"):
        providers.convert_once(final, failing)
    assert _leftovers(tmp_path, "tiny") == [] and not final.exists()
    assert providers.convert_once(final, _save_tiny) == final and providers.is_converted(final)
