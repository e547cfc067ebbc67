"""eval.cache: the on-disk store (atomic, checksummed, bounded) and the untrained model's scores computed once."""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest
import torch

from lmas.data.stream import Stream
from lmas.data.task import Example, Task
from lmas.evaluation.cache import ScoreCache, score_key, untrained_reason
from lmas.evaluation.scorer import PopulationScorer
from lmas.lm.diskcache import DiskCache, key, pack, unpack
from lmas.lm.encoding import PromptEncoder
from lmas.population.population import Population

PAIRS = [
    ("News: the striker scored twice in the cup final\nTopic:", "sport"),
    ("News: shares rose\nTopic:", "business news"),
    ("News: a telescope found water on a distant planet\nTopic:", "science"),
    ("News: the central bank held interest rates\nTopic:", "business news"),
]
LABELS = ["sport", "business news", "science"]


def news() -> Task:
    return Task("news", "classification", [Example(p, a) for p, a in PAIRS * 2], [], [Example(p, a) for p, a in PAIRS],
                LABELS)


def sums() -> Task:
    rows = [Example(f"What is {a} plus {b}?", str(a + b)) for a, b in [(1, 2), (3, 4), (2, 2), (5, 1)]]
    return Task("sums", "generation", rows, [], rows[:3])


@pytest.fixture
def tiny4():
    from lmas.models.providers import tiny

    return tiny(hidden_size=32, num_layers=4, num_heads=2, intermediate_size=64, seed=0)


# --- the store --------------------------------------------------------------------------------
def test_entries_round_trip_and_bad_files_are_misses_that_get_removed(tmp_path):
    store = DiskCache(tmp_path, max_mb=1)
    h = torch.randn(5, 3)
    store.put(key("a"), pack({"value": 0.25}, {"h": h, "n": np.arange(4, dtype=np.uint8)}))
    meta, arrays = unpack(store.get(key("a")))
    assert meta == {"value": 0.25} and torch.equal(arrays["h"], h) and arrays["n"].tolist() == [0, 1, 2, 3]
    assert store.get(key("b")) is None and (store.hits, store.misses) == (1, 1)
    file = tmp_path / f"{key('a')}.lmc"
    data = file.read_bytes()
    file.write_bytes(data[:-7])  # truncated (a crashed writer on a filesystem without atomic rename)
    assert store.get(key("a")) is None and not file.exists()
    store.put(key("a"), pack({"value": 0.25}, {"h": h}))
    flipped = bytearray(file.read_bytes())
    flipped[-1] ^= 1  # one bit of the numbers
    file.write_bytes(bytes(flipped))
    assert store.get(key("a")) is None and not file.exists()
    assert key("a", 1) != key("a", "1") != key(["a", 1]) and key(torch.tensor([1])) != key(torch.tensor([1.0]))
    for entry in tmp_path.iterdir():  # the directory emptied and removed by hand while a run uses it
        entry.unlink()
    tmp_path.rmdir()
    assert store.get(key("a")) is None and store.entries() == []
    store.put(key("a"), b"again")
    assert store.get(key("a")) == b"again" and store.failures == 0


def test_the_size_limit_evicts_the_least_recently_used_entries(tmp_path):
    store = DiskCache(tmp_path, max_mb=1)
    blob = os.urandom(300_000)  # about 0.29 MB each: three fit in 1 MB, four do not
    for i, name in enumerate("abc"):
        store.put(key(name), blob)
        os.utime(tmp_path / f"{key(name)}.lmc", (1000 + i, 1000 + i))  # a, b, c: oldest first
    assert store.get(key("a")) is not None  # a hit makes "a" the most recently used
    store.put(key("d"), blob)
    store.enforce_limit()
    assert store.get(key("b")) is None  # the least recently used went
    assert all(store.get(key(n)) is not None for n in "acd")
    assert store.size_bytes() <= store.max_bytes


def test_bad_options_are_refused_naming_them(tmp_path):
    with pytest.raises(ValueError, match=r"eval\.cache_mb=0"):
        DiskCache(tmp_path, max_mb=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"eval\.cache=.*cannot create the cache directory"):
        DiskCache(tmp_path / "file" / "sub")


def _hammer(path: str, worker: int) -> int:
    """Write and read the same keys as other processes, under a limit that keeps evicting; count bad reads."""
    store, bad = DiskCache(path, max_mb=0.05), 0  # ~50 kB: evicted all the time (a sweep every 1 MB written)
    for i in range(150):
        k = key("entry", i % 7)
        want = bytes([i % 7]) * 20_000
        if i % 3 == worker % 3:
            store.put(k, want)
            store.enforce_limit()
        got = store.get(k)
        bad += got is not None and got != want
    return bad


def test_parallel_processes_read_whole_entries_or_nothing(tmp_path):
    with multiprocessing.get_context("fork").Pool(3) as pool:
        bad = pool.starmap(_hammer, [(str(tmp_path), w) for w in range(3)])
    assert bad == [0, 0, 0]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # no temp file left behind


# --- the untrained model's scores -------------------------------------------------------------
def test_any_changed_input_is_a_different_key(tiny4, tmp_path):
    pop = Population(tiny4, agents=1, lora={"r": 4, "alpha": 8})
    scorer = PopulationScorer(pop, PromptEncoder(tiny4.tokenizer, 48), batch_size=4)
    task = news()
    first = score_key(scorer, task, "test", LABELS)
    assert score_key(scorer, task, "test", LABELS) == first  # deterministic
    weight = pop.model.get_base_model().model.layers[1].mlp.up_proj.weight
    with torch.no_grad():
        weight[0, 0] += 1e-3  # one number of the frozen base
    assert score_key(scorer, task, "test", LABELS) != first
    with torch.no_grad():
        weight[0, 0] -= 1e-3
    assert score_key(scorer, task, "test", LABELS) == first  # content-addressed: the same weights, the same key
    with torch.no_grad():  # LoRA weights are not part of it (a fresh adapter's lora_A does not change the scores)
        next(p for n, p in pop.model.named_parameters() if "lora_A" in n).add_(1.0)
    assert score_key(scorer, task, "test", LABELS) == first
    test = [Example(PAIRS[0][0] + " x", PAIRS[0][1])] + task.test[1:]
    changed = Task("news", "classification", task.train, [], test, LABELS)
    assert score_key(scorer, changed, "test", LABELS) != first  # a token
    assert score_key(scorer, task, "test", LABELS[::-1]) != first  # the label set
    for option, value in (("batch_size", 2), ("max_new_tokens", 3)):
        other = PopulationScorer(pop, scorer.encoder, batch_size=4)
        setattr(other, option, value)
        assert score_key(other, task, "test", LABELS) != first, option
    for encoder in (PromptEncoder(tiny4.tokenizer, 40), PromptEncoder(tiny4.tokenizer, 48, "chat")):
        assert score_key(PopulationScorer(pop, encoder, 4), task, "test", LABELS) != first  # max_length, format
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert score_key(scorer, task, "test", LABELS) != first  # the autocast dtype
    assert score_key(scorer, sums(), "test", None) != score_key(scorer, sums(), "train", None)


def test_a_trained_adapter_is_scored_but_not_cached(tiny4, tmp_path):
    pop = Population(tiny4, agents=1, lora={"r": 4, "alpha": 8})
    cache = ScoreCache(DiskCache(tmp_path))
    scorer = PopulationScorer(pop, PromptEncoder(tiny4.tokenizer, 48), batch_size=4, cache=cache)
    assert untrained_reason(pop, "agent0") is None
    with torch.no_grad():
        next(p for n, p in pop.model.named_parameters() if "lora_B" in n).add_(0.5)
    assert "lora_B" in untrained_reason(pop, "agent0") and "not fresh" in untrained_reason(pop, "agent0")
    got = scorer.untrained("agent0", news(), "test", LABELS)
    assert got.value == scorer.scored("agent0", news(), "test", LABELS).value
    assert cache.refused == 1 and cache.store.stores == 0 and not list(tmp_path.iterdir())


def _loop(base, run_dir, cache_dir):
    from lmas.loop import ContinualLoop
    from lmas.schema import EvalConfig, TrainConfig
    from lmas.strategies.base import Strategy

    pop = Population(base, agents=1, lora={"r": 4, "alpha": 8}, seed=0)
    return ContinualLoop(pop, Stream("s", [news(), sums()]), Strategy(), run_dir, seed=0,
                         train=TrainConfig(lr=1e-2, batch_size=4, max_steps=2),
                         eval=EvalConfig(batch_size=4, max_new_tokens=3, cache=str(cache_dir)),
                         max_length=48, progress=False, save_adapters=False)


def test_a_warm_cache_gives_the_cold_runs_results_without_running_the_model(tmp_path, one_thread):
    from lmas.lm.likelihood import trunk_and_head
    from lmas.models.providers import tiny

    def base():
        return tiny(hidden_size=32, num_layers=4, num_heads=2, intermediate_size=64, seed=0)

    cold_loop = _loop(base(), tmp_path / "cold", tmp_path / "cache")
    cold = cold_loop.run()
    assert (cold_loop.scorer.cache.hits, cold_loop.scorer.cache.misses) == (0, 2)
    warm_loop = _loop(base(), tmp_path / "warm", tmp_path / "cache")
    warm = warm_loop.run()
    assert (warm_loop.scorer.cache.hits, warm_loop.scorer.cache.misses) == (2, 0)
    assert warm["matrix"] == cold["matrix"] and warm["metrics"] == cold["metrics"]
    for name in ("initial", "round000", "round001"):
        a, b = (np.load(tmp_path / run / "per_example" / f"{name}.npz") for run in ("cold", "warm"))
        assert sorted(a.files) == sorted(b.files) and all(np.array_equal(a[f], b[f]) for f in a.files)
    # the initial evaluation of a warm run does not run the model
    again = _loop(base(), tmp_path / "again", tmp_path / "cache")
    calls = []
    embedding = trunk_and_head(again.population.model)[0].embed_tokens  # every forward pass starts here
    handle = embedding.register_forward_pre_hook(lambda *_: calls.append(1))
    again.evaluator.initial(again.state.matrix)
    assert calls == [] and again.scorer.cache.hits == 2
    again.scorer.scored("agent0", news(), "test", LABELS)  # (the hook does count a real evaluation)
    handle.remove()
    assert calls


def test_the_fast_protocol_turns_the_cache_on_under_the_cache_dir(compose, tmp_path, monkeypatch):
    from lmas.config import ConfigError, validate

    monkeypatch.setenv("LMAS_CACHE", str(tmp_path / "c"))
    assert compose(["experiment=reproduction/fast", "model=tiny"]).eval.cache == str(tmp_path / "c" / "eval")
    monkeypatch.delenv("LMAS_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = compose(["experiment=reproduction/fast", "model=tiny"])
    assert cfg.eval.cache == str(tmp_path / "home" / ".cache" / "lmas" / "eval") and cfg.eval.cache_mb > 0
    assert compose(["model=tiny"]).eval.cache is None  # off by default
    with pytest.raises(ConfigError, match=r"eval\.cache_mb=0(\.0)?: expected a size in MB > 0"):
        validate(compose(["model=tiny", "eval.cache_mb=0"]))
