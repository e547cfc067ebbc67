"""Model Swarms: the search on a function known by hand, and as a transfer policy (transfer=swarm) whose agent
starts from the best adapter the swarm found on its task's validation split, the sources left as they were."""

from __future__ import annotations

import random

import pytest
import torch

from lmas.data.task import Example, Task
from lmas.evaluation.scoring import evaluate
from lmas.lm.encoding import PromptEncoder
from lmas.population.search import SwarmOptions, swarm_search
from lmas.transfer.swarm import SwarmInit


def test_the_swarm_climbs_a_known_function_and_keeps_its_bests():
    target = torch.tensor([1.0, -2.0])
    fitness = lambda name, s: -float(((s["w"] - target) ** 2).sum())  # noqa: E731  best at `target`
    x = {"a": {"w": torch.tensor([3.0, 3.0])}, "b": {"w": torch.tensor([-3.0, 0.0])}, "c": {"w": torch.zeros(2)}}
    reads = []
    out = swarm_search(x, fitness, SwarmOptions(iterations=6), random.Random(0), lambda *a: reads.append(a[:2]))
    assert out["start"] == {n: fitness(n, s) for n, s in x.items()}
    assert out["f_g"] >= max(out["start"].values())  # the global best never gets worse
    assert out["f_g"] == max(out["f_best"].values()) == fitness("", out["g"])
    for n in x:  # every personal best is at least where the particle started, and is its recorded fitness
        assert out["f_best"][n] >= out["start"][n] and out["f_best"][n] == fitness(n, out["best"][n])
    bests = [it["best"] for it in out["trace"]]
    assert bests == sorted(bests) and len(bests) == 6
    assert out["f_g"] > max(out["start"].values())  # it moved closer to the optimum than any start
    assert reads and all(src != reader for src, reader in reads)  # reads of the global best/worst by the others
    again = swarm_search(x, fitness, SwarmOptions(iterations=6), random.Random(0))
    assert again["f_g"] == out["f_g"] and torch.equal(again["g"]["w"], out["g"]["w"])  # deterministic in the seed
    with pytest.raises(ValueError, match="needs two or more"):
        swarm_search({"a": x["a"]}, fitness, SwarmOptions(), random.Random(0))
    with pytest.raises(ValueError, match="transfer: need iterations >= 1"):
        SwarmInit(iterations=0)
    with pytest.raises(ValueError, match=r"unknown swarm options \['speed'\]"):
        SwarmInit(speed=1.0)


def _story():
    texts = [Example("", f"the {w} sat on the mat and looked at the {w}") for w in ("cat", "dog", "owl", "fox")]
    return Task("story", "lm", texts, texts[:2], texts[2:])


def test_swarm_init_starts_the_agent_at_the_swarms_best_on_validation(make_population, tx):
    pop = make_population(["a", "b", "c", "new"], {"r": 4, "alpha": 8})
    for i, name in enumerate(("a", "b", "c")):
        tx.randomise(pop, name, 40 + i)
        pop.agents[name].history.append({"round": 0, "event": "trained", "task": "earlier"})
    sources_before = {n: pop.adapter_state(n) for n in ("a", "b", "c")}
    task, enc = _story(), PromptEncoder(pop.tokenizer, 32)
    (rec,) = SwarmInit(start=0, iterations=2).apply(pop, 0, [("new", task)], enc)
    assert rec["sources"] == ["a", "b", "c"] and len(rec["iterations"]) == 2
    pop.activate("new")
    assert evaluate(pop.model, enc, task, "val") == pytest.approx(rec["val"], rel=1e-5)  # the recorded best
    assert rec["val"] <= min(rec["val_sources"].values())  # perplexity: at least as good as the best source
    for n, state in sources_before.items():  # the particles were copies: the sources did not move
        assert all(torch.equal(pop.adapter_state(n)[k], state[k]) for k in state)
    (one,) = SwarmInit(start=0, sources=["a", "b"]).apply(pop, 0, [("c", task)], enc)
    assert one["sources"] == ["a", "b"]
    assert SwarmInit(start=0, sources=["a"]).apply(pop, 0, [("c", task)], enc) == []  # one source: no swarm


def test_a_run_with_the_swarm_transfer_records_its_search(run_lmas, tmp_path):
    results = run_lmas(["model=tiny", "debug=fast", "logger=csv", "population.agents=3", "transfer=swarm",
                        "transfer.start=1", f"paths.output_dir={tmp_path}"], tmp_path / "run")  # fmt: skip
    assert results["complete"]
    swarms = [e for a in results["agents"].values() for e in a["history"] if e["event"] == "swarm"]
    assert swarms and all(len(e["sources"]) == 2 and "val" in e for e in swarms)  # the two other agents


def test_the_config_check_refuses_the_swarm_after_stacked_adapters(compose):
    from lmas.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"transfer._target_=lmas.transfer.swarm.SwarmInit: strategy=inclora"):
        validate(compose(["model=tiny", "strategy=inclora", "transfer=swarm"]))
    validate(compose(["model=tiny", "population.agents=3", "transfer=swarm"]))
