"""Inter-agent similarity: cosine of adapter updates ΔW = B·A·s, and prediction agreement."""

from __future__ import annotations

import math

import pytest
import torch

from lmas.data.stream import Stream
from lmas.data.task import Example, Task
from lmas.metrics import similarity as sim
from lmas.population.population import Population
from lmas.transfer.factors import agent_factors, delta, lora_layers
from lmas.transfer.merge import merge_adapters


def _set(population, adapter: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write raw (A, B) factors (B without the scaling) into one adapter."""
    for name, layer in lora_layers(population).items():
        if name in factors:
            a, b = factors[name]
            layer.lora_A[adapter].weight.data.copy_(a)
            layer.lora_B[adapter].weight.data.copy_(b)


def _explicit_delta(population, agent: str) -> torch.Tensor:
    """The agent's whole update, flattened: Σ over its adapters of B @ A * scaling, every module."""
    parts = []
    for layer in lora_layers(population).values():
        total = 0
        for adapter in population.agents[agent].adapters:
            if adapter in layer.lora_A:
                total = total + (layer.lora_B[adapter].weight.double() @ layer.lora_A[adapter].weight.double()) \
                    * layer.scaling[adapter]
        parts.append(torch.as_tensor(total).reshape(-1) if torch.is_tensor(total) else torch.zeros(0))
    return torch.cat(parts)


def _cos(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(x @ y / (x.norm() * y.norm()))


@pytest.fixture
def population(tiny_base):
    pop = Population(tiny_base, agents=["a", "b", "c", "d", "e", "f", "g", "h"], lora={"r": 4, "alpha": 8})
    g = torch.Generator().manual_seed(0)
    base = {}
    for name, layer in lora_layers(pop).items():
        a = layer.lora_A["a"].weight
        b = layer.lora_B["a"].weight
        base[name] = (torch.randn(a.shape, generator=g), torch.randn(b.shape, generator=g))
    first = next(iter(base))
    m = torch.randn(4, 4, generator=g) + 4 * torch.eye(4)  # invertible
    _set(pop, "a", base)
    _set(pop, "b", {n: (a, 3 * b) for n, (a, b) in base.items()})  # same direction, 3x longer
    _set(pop, "c", {n: (a, -b) for n, (a, b) in base.items()})  # opposite
    _set(pop, "d", {n: (m @ a, b @ torch.linalg.inv(m)) for n, (a, b) in base.items()})  # same ΔW, other factors
    # e: untouched (B = 0, no update)
    _set(pop, "f", {first: base[first]})  # a's update on the first module only
    _set(pop, "g", {n: (torch.randn(a.shape, generator=g), torch.randn(b.shape, generator=g))
                    for n, (a, b) in base.items()})
    # h: two stacked adapters (IncLoRA) whose updates add up to a's
    pop.add_task_adapter("h")
    _set(pop, "h", {n: (a, b / 2) for n, (a, b) in base.items()})
    _set(pop, pop.agents["h"].trainable, {n: (a, b / 2) for n, (a, b) in base.items()})
    return pop


def _factors(pop, agent):
    return agent_factors(pop, agent)


def test_weight_cosine_of_constructed_adapters(population):
    f = {n: _factors(population, n) for n in population.names}
    assert sim.weight_cosine(f["a"], f["b"]) == pytest.approx(1.0, abs=1e-9)
    assert sim.weight_cosine(f["a"], f["c"]) == pytest.approx(-1.0, abs=1e-9)
    assert sim.weight_cosine(f["a"], f["d"]) == pytest.approx(1.0, abs=1e-9)  # ΔW, not the factors
    assert math.isnan(sim.weight_cosine(f["a"], f["e"]))
    assert sim.weight_cosine(f["a"], f["h"]) == pytest.approx(1.0, abs=1e-9)  # stacked adapters add up
    first = _explicit_delta(population, "f")
    whole = _explicit_delta(population, "a")
    assert sim.weight_cosine(f["a"], f["f"]) == pytest.approx(float(first.norm() / whole.norm()), rel=1e-6)
    assert 0 < sim.weight_cosine(f["a"], f["f"]) < 1


def test_weight_cosine_equals_the_cosine_of_the_flattened_delta_w(population):
    f = {n: _factors(population, n) for n in ("a", "c", "f", "g", "h")}
    for x, y in [("a", "g"), ("c", "g"), ("f", "g"), ("h", "g")]:
        expected = _cos(_explicit_delta(population, x), _explicit_delta(population, y))
        assert sim.weight_cosine(f[x], f[y]) == pytest.approx(expected, abs=1e-9), (x, y)
    assert sim.weight_norm(f["a"]) == pytest.approx(float(_explicit_delta(population, "a").norm()), rel=1e-9)


def test_weight_similarity_keys_every_pair_in_order(population):
    f = {n: _factors(population, n) for n in ("a", "b", "c")}
    out = sim.weight_similarity(f)
    assert list(out) == ["a~b", "a~c", "b~c"]
    assert out["b~c"] == pytest.approx(-1.0, abs=1e-9)


def test_prediction_agreement_is_the_share_of_equal_argmax_labels():
    lp = torch.log(torch.tensor([
        [[.7, .2, .1], [.1, .8, .1], [.1, .1, .8], [.2, .6, .2]],  # predicts 0 1 2 1
        [[.6, .3, .1], [.1, .1, .8], [.2, .1, .7], [.3, .5, .2]],  # predicts 0 2 2 1
        [[.1, .8, .1], [.8, .1, .1], [.8, .1, .1], [.8, .1, .1]],  # predicts 1 0 0 0
    ]))
    out = sim.prediction_agreement(["x", "y", "z"], lp)
    assert out == {"x~y": 0.75, "x~z": 0.0, "y~z": 0.0}
    with pytest.raises(ValueError, match="agents=2"):
        sim.prediction_agreement(["x", "y"], lp)


def _stream(n_test: int = 20) -> Stream:
    gen = Task("gen", "generation", [Example("1+1=", "2")], [], [Example("2+2=", "4")])
    labels = ["sport", "tech"]
    cls = Task("news", "classification", [Example(f"text {i}", labels[i % 2]) for i in range(4)], [],
               [Example(f"test {i}", labels[i % 2]) for i in range(n_test)], labels=labels)
    return Stream("s", [gen, cls])


def test_probe_set_is_the_first_test_examples_of_the_first_classification_task():
    task, prompts, labels = sim.probe_set(_stream())
    assert task.name == "news" and prompts == [f"test {i}" for i in range(sim.PROBE_SIZE)]
    assert labels == ["sport", "tech"]
    assert len(sim.probe_set(_stream(5))[1]) == 5
    only_gen = Stream("g", [Task("gen", "generation", [Example("a", "b")], [], [Example("c", "d")])])
    assert sim.probe_set(only_gen) is None


def test_measure_reads_every_adapter_and_scores_the_probe(population):
    class Scorer:  # label log-probs chosen so that a and b agree on 3 of 4 probe examples
        def label_logprobs(self, agents, prompts, labels):
            self.called = (list(agents), list(prompts), list(labels))
            preds = {"a": [0, 1, 1, 0], "b": [0, 1, 0, 0], "h": [0, 1, 1, 0]}
            return torch.stack([torch.nn.functional.one_hot(torch.tensor(preds[x]), 2).float() for x in agents])

    scorer = Scorer()
    probe = sim.probe_set(_stream(4))
    out = sim.measure(population, scorer, ["a", "b", "h"], probe)
    assert scorer.called == (["a", "b", "h"], [f"test {i}" for i in range(4)], ["sport", "tech"])
    assert out["predictions"] == {"a~b": 0.75, "a~h": 1.0, "b~h": 0.75}
    assert out["weights"]["a~h"] == pytest.approx(1.0, abs=1e-9) and out["probe"] == {"task": "news", "examples": 4}
    assert "predictions" not in sim.measure(population, scorer, ["a", "b"], None)


def test_measure_with_the_real_scorer_identical_agents_agree(population):
    from lmas.lm.encoding import PromptEncoder
    from lmas.evaluation.scorer import PopulationScorer

    scorer = PopulationScorer(population, PromptEncoder(population.tokenizer, 64), batch_size=8)
    out = sim.measure(population, scorer, ["a", "d", "g"], sim.probe_set(_stream(6)))
    assert out["predictions"]["a~d"] == 1.0  # the same ΔW gives the same predictions
    assert 0.0 <= out["predictions"]["a~g"] <= 1.0


def test_similarity_and_merges_read_an_agent_the_same_way(population):
    """h stacks two adapters; a merge of h copies its whole update, and similarity sees that same update."""
    merge_adapters(population, ["h"], [1.0], "hcopy", "exact")
    assert population.agents["hcopy"].adapters == ["hcopy"]  # one adapter of rank 4 + 4
    whole = _explicit_delta(population, "h")
    copied = _explicit_delta(population, "hcopy")
    torch.testing.assert_close(copied, whole, rtol=0, atol=1e-5)
    out = sim.measure(population, None, ["h", "hcopy", "g"], None)["weights"]
    assert out["h~hcopy"] == pytest.approx(1.0, abs=1e-6)
    assert out["h~g"] == pytest.approx(out["hcopy~g"], abs=1e-6)
    assert out["h~g"] == pytest.approx(_cos(whole, _explicit_delta(population, "g")), abs=1e-6)
    for module, (a, b) in agent_factors(population, "h").items():  # the stacked factors are the sum, rank 8
        assert a.shape[0] == 8
        layer = dict(population.model.named_modules())[module]
        want = sum(layer.lora_B[ad].weight @ layer.lora_A[ad].weight * layer.scaling[ad]
                   for ad in population.agents["h"].adapters)
        torch.testing.assert_close(delta(a, b), want, rtol=1e-6, atol=1e-5)
