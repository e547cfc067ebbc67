"""One frozen base, named adapters: activation, isolation, no-op init, safetensors round trip."""

from __future__ import annotations

import pytest
import torch

from lmas.lm.encoding import PromptEncoder, collate

from lmas.lm.likelihood import answer_loss
from lmas.population.population import Population


def _batch(base):
    enc = PromptEncoder(base.tokenizer, 32)
    return collate([enc.encode("News: rain\nTopic:", "sport", False)], enc.pad_id)


def test_agents_share_one_base_and_only_the_active_adapter_trains(tiny_base):
    pop = Population(tiny_base, agents=["a", "b"], lora={"r": 4, "alpha": 8})
    base_before = {n: p.clone() for n, p in pop.model.named_parameters() if "lora_" not in n}
    pop.activate("b")
    trainable = [n for n, p in pop.model.named_parameters() if p.requires_grad]
    assert trainable and all(".b." in n and "lora_" in n for n in trainable)
    assert set(trainable) == set(pop.parameters_of("b"))
    # one optimisation step on b changes b only
    a_before = pop.adapter_state("a")
    opt = torch.optim.SGD([p for p in pop.model.parameters() if p.requires_grad], lr=1.0)
    answer_loss(pop.model, _batch(tiny_base)).backward()
    opt.step()
    for n, p in pop.model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), f"base weight {n} changed"
    for k, v in pop.adapter_state("a").items():
        assert torch.equal(v, a_before[k])
    assert any(not torch.equal(v, pop.adapter_state("a")[k]) for k, v in pop.adapter_state("b").items())


def test_fresh_adapter_is_a_no_op(tiny_base):
    batch = _batch(tiny_base)
    with torch.no_grad():
        ref = tiny_base.model(input_ids=batch["input_ids"]).logits.clone()
    pop = Population(tiny_base, agents=2)
    with torch.no_grad():
        for name in pop.names:
            pop.activate(name)
            torch.testing.assert_close(pop.model(input_ids=batch["input_ids"]).logits, ref)


def test_adapter_save_load_round_trip_is_exact(tiny_base, tmp_path):
    pop = Population(tiny_base, agents=["x", "y"])
    with torch.no_grad():
        for p in pop.parameters_of("x").values():
            p.normal_()
    path = pop.save_adapter("x", tmp_path / "x.safetensors", metadata={"task": "t"})
    assert path.read_bytes()[:8] != b"\x80\x02\x8a\x0a"  # not a pickle
    pop.load_adapter("y", path)
    for k, v in pop.adapter_state("x").items():
        assert torch.equal(v, pop.adapter_state("y")[k])
    with pytest.raises(ValueError, match="safetensors"):
        pop.load_adapter("y", tmp_path / "x.bin")


def test_bad_population_options_are_named(tiny_base):
    with pytest.raises(ValueError, match="population.lora.r"):
        Population(tiny_base, agents=1, lora={"r": 0})
    with pytest.raises(ValueError, match="agent name"):
        Population(tiny_base, agents=["has.dot"])
    with pytest.raises(KeyError, match="unknown agent"):
        Population(tiny_base, agents=1).activate("nobody")


def test_task_adapters_stack_and_only_the_newest_trains(tiny_base, tmp_path):
    pop = Population(tiny_base, agents=["a", "b"], lora={"r": 2, "alpha": 4})
    first = pop.adapter_state("a")
    new = pop.add_task_adapter("a")
    assert new == "a-t1" and pop.agents["a"].adapters == ["a", "a-t1"]
    assert pop.model.active_adapters == ["a", "a-t1"]
    trainable = {n for n, p in pop.model.named_parameters() if p.requires_grad}
    assert trainable == set(pop.parameters_of("a")) and all(".a-t1." in n for n in trainable)
    with torch.no_grad():
        for p in pop.parameters_of("a").values():
            p.normal_()
    pop.activate("b")
    assert pop.model.active_adapters == ["b"]
    # save both adapters of a, load them into b: b gets a task adapter too and the same weights
    pop.save_adapter("a", tmp_path / "a.safetensors")
    pop.load_adapter("b", tmp_path / "a.safetensors")
    assert pop.agents["b"].adapters == ["b", "b-t1"]
    for adapter_a, adapter_b in zip(pop.agents["a"].adapters, pop.agents["b"].adapters):
        sa, sb = pop.adapter_state("a", adapter_a), pop.adapter_state("b", adapter_b)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(torch.equal(v, pop.adapter_state("a", "a")[k]) for k, v in first.items())
