"""Scoring a population: mixed-adapter batches give the same numbers as switching adapters."""

from __future__ import annotations

import torch

from lmas.lm.encoding import PromptEncoder

from lmas.lm.likelihood import label_logprobs
from lmas.evaluation.scorer import PopulationScorer
from lmas.population.population import Population

PROMPTS = ["News: rain stops play\nTopic:", "News: shares fall\nTopic:", "Hello there, how are you\nTopic:"]
LABELS = ["sport", "business", "tech talk"]


def _randomise(pop: Population) -> None:
    """Give every adapter non-zero, distinct weights (fresh LoRA B = 0 makes all agents equal)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pop.model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def test_mixed_adapter_batch_equals_one_agent_at_a_time(tiny_base):
    pop = Population(tiny_base, agents=["a", "b", "c"], lora={"r": 4, "alpha": 8})
    _randomise(pop)
    enc = PromptEncoder(pop.tokenizer, 48)
    mixed = PopulationScorer(pop, enc, batch_size=4, mixed=True)
    assert mixed.can_mix(["a", "b", "c"])
    got = mixed.label_logprobs(["a", "b", "c"], PROMPTS, LABELS)  # (3, 3, 3), batches mix agents
    for i, agent in enumerate(["a", "b", "c"]):
        pop.activate(agent)
        pop.model.eval()
        ref = label_logprobs(pop.model, enc, PROMPTS, LABELS)
        torch.testing.assert_close(got[i], ref, rtol=1e-4, atol=1e-4)
    # agents really differ, so the test would catch rows scored with the wrong adapter
    assert (got[0] - got[1]).abs().max() > 1e-2
    switching = PopulationScorer(pop, enc, batch_size=4, mixed=False)
    torch.testing.assert_close(switching.label_logprobs(["a", "b", "c"], PROMPTS, LABELS), got, rtol=1e-4, atol=1e-4)


def test_agents_with_stacked_adapters_are_scored_one_by_one(tiny_base):
    pop = Population(tiny_base, agents=["a", "b"], lora={"r": 4, "alpha": 8})
    pop.add_task_adapter("a")  # IncLoRA-style: two active adapters
    _randomise(pop)
    enc = PromptEncoder(pop.tokenizer, 48)
    scorer = PopulationScorer(pop, enc, batch_size=4)
    assert not scorer.can_mix(["a", "b"])
    got = scorer.label_logprobs(["a", "b"], PROMPTS, LABELS)
    pop.activate("a")
    pop.model.eval()
    torch.testing.assert_close(got[0], label_logprobs(pop.model, enc, PROMPTS, LABELS))


def test_classify_returns_accuracy_from_the_same_scores(tiny_base):
    from lmas.data.task import Example, Task

    pop = Population(tiny_base, agents=["a", "b"], lora={"r": 4, "alpha": 8})
    _randomise(pop)
    rows = [Example(p, LABELS[i % 3]) for i, p in enumerate(PROMPTS * 2)]
    task = Task("t", "classification", rows, [], rows, labels=LABELS)
    scorer = PopulationScorer(pop, PromptEncoder(pop.tokenizer, 48))
    acc, lp, gold = scorer.classify(["a", "b"], task, "test", LABELS)
    assert gold.tolist() == [0, 1, 2, 0, 1, 2]
    for i, a in enumerate(["a", "b"]):
        assert acc[a] == (lp[i].argmax(-1) == gold).float().mean().item()
        assert abs(acc[a] - scorer.score(a, task, "test", LABELS)) < 1e-6


def test_mixed_adapters_auto_mixes_on_cuda_only(tiny_base, compose):
    import pytest

    from lmas.config import ConfigError, validate

    pop = Population(tiny_base, agents=["a", "b"], lora={"r": 4, "alpha": 8})
    enc = PromptEncoder(pop.tokenizer, 48)
    assert PopulationScorer(pop, enc).mixed == "auto"
    assert not PopulationScorer(pop, enc).can_mix(["a", "b"])  # the model is on the CPU
    assert PopulationScorer(pop, enc, mixed=True).can_mix(["a", "b"])
    assert compose([]).eval.mixed_adapters == "auto"
    with pytest.raises(ConfigError, match="eval.mixed_adapters.*expected auto, true or false"):
        validate(compose(["eval.mixed_adapters=sometimes"]))
