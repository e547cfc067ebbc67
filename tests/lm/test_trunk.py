"""The shared frozen trunk: same losses, gradients and label scores as the plain path, on a tiny model."""

from __future__ import annotations

import pytest
import torch

from lmas.data.task import Example, Task
from lmas.lm.encoding import PromptEncoder, collate
from lmas.lm.likelihood import answer_loss, label_logprobs, trunk_and_head
from lmas.lm.trunk import SharedTrunk, TrunkError, shared_label_logprobs
from lmas.evaluation.scorer import PopulationScorer
from lmas.population.population import Population, lora_config

TOP = [2, 3]  # LoRA in the top 2 of 4 layers: layers 0-1 are shared
LABELS = ["sport", "business news", "science and technology"]  # 1- to 3-token labels
PAIRS = [
    ("News: the striker scored twice in the cup final\nTopic:", "sport"),
    ("News: shares rose\nTopic:", "business news"),
    ("News: a new telescope found water on a distant planet, the agency said on Monday\nTopic:",
     "science and technology"),
    ("News: rain\nTopic:", "sport"),
    ("News: the central bank held interest rates as inflation eased again\nTopic:", "business news"),
]


def randomise(pop: Population, seed: int = 1) -> None:
    """Non-zero LoRA B matrices (fresh adapters are exact no-ops), different per agent."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in pop.names:
            for adapter in pop.agents[name].adapters:
                for pname, p in pop.parameters_of(name, adapter).items():
                    if "lora_B" in pname:
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.fixture
def deep_base():
    from lmas.models.providers import tiny

    return tiny(hidden_size=32, num_layers=4, num_heads=2, intermediate_size=64, seed=0)


@pytest.fixture
def pop(deep_base):
    p = Population(deep_base, agents=3, lora={"r": 4, "alpha": 8, "layers_to_transform": TOP})
    randomise(p)
    return p


@pytest.fixture
def enc(deep_base):
    return PromptEncoder(deep_base.tokenizer, max_length=48)


def batch_of(enc, pairs):
    return collate([enc.encode(p, a, eos=False) for p, a in pairs], enc.pad_id)


def test_split_is_the_lowest_lora_layer_and_halves_equal_the_model_trunk(pop, enc):
    trunk = SharedTrunk(pop.model)
    assert trunk.split == 2 and trunk.n_layers == 4
    batch = batch_of(enc, PAIRS)
    pop.activate("agent1")
    body, _ = trunk_and_head(pop.model)
    with torch.no_grad():
        want = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        got = trunk.top(trunk.bottom(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"])
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)


def test_cached_training_path_gives_the_same_loss_and_gradients(pop, enc):
    trunk = SharedTrunk(pop.model)
    pop.activate("agent0")
    pop.model.train()
    batch = batch_of(enc, PAIRS)
    params = pop.parameters_of("agent0")
    assert params and all(p.requires_grad for p in params.values())

    want = answer_loss(pop.model, batch)
    want_grads = torch.autograd.grad(want, list(params.values()))
    for _ in range(2):  # the first pass fills the cache, the second reads it
        logits, targets, _ = trunk.answer_logits(batch)
        got = torch.nn.functional.cross_entropy(logits, targets)
        got_grads = torch.autograd.grad(got, list(params.values()))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert trunk.misses == len(PAIRS) and trunk.hits == len(PAIRS)
    assert all(g.abs().sum() > 0 for g in want_grads)


def test_cache_entries_are_per_example_so_reshuffled_batches_hit_it(pop, enc):
    trunk = SharedTrunk(pop.model)
    pop.activate("agent2")
    first = batch_of(enc, PAIRS[:3])
    trunk.answer_logits(first)
    # another grouping, other padding width, a duplicate row: only the two new examples miss
    regrouped = batch_of(enc, [PAIRS[3], PAIRS[1], PAIRS[4], PAIRS[1]])
    assert trunk.misses == 3
    got = trunk.answer_logits(regrouped)[0]
    assert trunk.misses == 5 and trunk.hits == 2
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(*trunk.answer_logits(regrouped)[:2])
        plain = answer_loss(pop.model, regrouped)
    torch.testing.assert_close(want, plain, rtol=1e-5, atol=1e-6)
    assert got.shape[0] == int((regrouped["targets"] != -100).sum())
    trunk.clear()
    assert not trunk.cache and trunk.cache_bytes == 0


def test_rows_in_memory_are_dropped_when_the_shared_layers_change(pop, enc):
    """A strategy that trains the base (seqft) changes the bottom layers under the cache: no stale row comes back."""
    trunk = SharedTrunk(pop.model)
    pop.activate("agent0")
    batch = batch_of(enc, PAIRS[:3])
    before = trunk.cached_bottom(batch).clone()
    with torch.no_grad():
        trunk.body.layers[0].mlp.down_proj.weight.mul_(1.5)  # an in-place update, as an optimizer step makes
    after = trunk.cached_bottom(batch)
    assert trunk.misses == 6 and not torch.allclose(before, after)
    torch.testing.assert_close(after, trunk.bottom(batch["input_ids"], batch["attention_mask"]) * (
        batch["attention_mask"][..., None]), rtol=1e-5, atol=1e-6)  # fmt: skip


def test_cache_size_limit_evicts_the_oldest(pop, enc):
    pop.activate("agent0")
    full = SharedTrunk(pop.model)
    full.answer_logits(batch_of(enc, PAIRS))
    trunk = SharedTrunk(pop.model, max_cache_mb=full.cache_bytes / 2 / 2**20)  # room for about half
    for pair in PAIRS:
        trunk.answer_logits(batch_of(enc, [pair]))
    assert 0 < len(trunk.cache) < len(PAIRS) and trunk.cache_bytes <= trunk.max_cache_bytes
    loss = torch.nn.functional.cross_entropy(*trunk.answer_logits(batch_of(enc, PAIRS))[:2])
    torch.testing.assert_close(loss, answer_loss(pop.model, batch_of(enc, PAIRS)), rtol=1e-5, atol=1e-6)


def test_shared_label_logprobs_equal_each_agents_own_scores(pop, enc):
    trunk = SharedTrunk(pop.model)
    prompts = [p for p, _ in PAIRS] * 2
    pop.model.eval()
    want = []
    for a in pop.names:
        pop.activate(a)
        want.append(label_logprobs(pop.model, enc, prompts, LABELS, batch_size=4))
    want = torch.stack(want)
    got = shared_label_logprobs(trunk, enc, prompts, LABELS, pop.names, pop.activate, batch_size=4)
    assert got.shape == (3, len(prompts), len(LABELS))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (want[0] - want[1]).abs().max() > 1e-2  # the agents really differ


def test_population_scorer_with_trunk_matches_mixed_and_switching(pop, enc):
    prompts, agents = [p for p, _ in PAIRS], pop.names
    plain = PopulationScorer(pop, enc, batch_size=4, mixed=False).label_logprobs(agents, prompts, LABELS)
    mixed = PopulationScorer(pop, enc, batch_size=4, mixed=True).label_logprobs(agents, prompts, LABELS)
    shared = PopulationScorer(pop, enc, batch_size=4, trunk=SharedTrunk(pop.model)).label_logprobs(
        agents, prompts, LABELS)
    torch.testing.assert_close(mixed, plain, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(shared, plain, rtol=1e-4, atol=1e-4)
    # agents with stacked adapters (IncLoRA) are scored through the trunk as well
    pop.add_task_adapter("agent1")
    randomise(pop, seed=2)
    plain = PopulationScorer(pop, enc, batch_size=4, mixed=False).label_logprobs(agents, prompts, LABELS)
    shared = PopulationScorer(pop, enc, batch_size=4, trunk=SharedTrunk(pop.model)).label_logprobs(
        agents, prompts, LABELS)
    torch.testing.assert_close(shared, plain, rtol=1e-4, atol=1e-4)


def test_refuses_lora_in_a_shared_layer(deep_base):
    every = Population(deep_base, agents=1, lora={"r": 4, "alpha": 8})  # LoRA in every layer
    with pytest.raises(TrunkError, match="layers_to_transform"):
        SharedTrunk(every.model)


def test_refuses_an_explicit_split_above_a_lora_layer(pop):
    with pytest.raises(TrunkError, match=r"adapter\(s\) 'agent0', 'agent1', 'agent2' have LoRA modules in layer\(s\) \[2\]"):
        SharedTrunk(pop.model, split=3)


def test_refuses_a_later_adapter_that_touches_a_shared_layer(pop, enc):
    trunk = SharedTrunk(pop.model)
    pop.add_agent("intruder", lora_config(r=4, alpha=8, layers_to_transform=[1, 2]))
    with pytest.raises(TrunkError, match=r"adapter\(s\) 'intruder' have LoRA modules in layer\(s\) \[1\]"):
        trunk.check()
    with pytest.raises(TrunkError, match="intruder"):
        shared_label_logprobs(trunk, enc, ["News: rain\nTopic:"], LABELS, pop.names, pop.activate)


def test_refuses_a_trainable_base_layer_below_the_split(pop):
    trunk = SharedTrunk(pop.model)
    body, _ = trunk_and_head(pop.model)
    body.layers[0].mlp.up_proj.weight.requires_grad_(True)
    with pytest.raises(TrunkError, match=r"layers\.0\.mlp\.up_proj\.weight is trainable"):
        trunk.check(training=True)


def test_training_through_the_loop_with_the_cache_gives_the_same_adapters(deep_base, tmp_path):
    """Two epochs for two agents on one task: identical adapters with and without the cache."""
    from lmas.data.stream import Stream
    from lmas.loop import ContinualLoop, TrainConfig
    from lmas.strategies.base import Strategy

    task = Task("news", "classification", [Example(p, a) for p, a in PAIRS * 3], [], [Example(*PAIRS[0])],
                sorted(set(a for _, a in PAIRS)))
    pop = Population(deep_base, agents=2, lora={"r": 4, "alpha": 8, "layers_to_transform": TOP})
    init = {a: pop.adapter_state(a) for a in pop.names}
    states = {}
    for cache in (False, True):
        for a in pop.names:
            pop.load_adapter_state(a, init[a])
        loop = ContinualLoop(pop, Stream("s", [task]), Strategy(), tmp_path / str(cache), seed=0,
                             train=TrainConfig(lr=1e-2, batch_size=4, epochs=2, trunk_cache=cache),
                             max_length=48, progress=False, save_adapters=False)
        losses = [loop.fit(a, task, [], 0) for a in pop.names]
        states[cache] = ({a: pop.adapter_state(a) for a in pop.names}, losses, loop.trunk)
    (plain, plain_losses, _), (cached, cached_losses, trunk) = states[False], states[True]
    for a in pop.names:
        torch.testing.assert_close(cached[a], plain[a], rtol=1e-4, atol=1e-5)
        assert (cached[a]["base_model.model.model.layers.2.self_attn.q_proj.lora_B.weight"] != 0).any()
    torch.testing.assert_close(torch.tensor(cached_losses), torch.tensor(plain_losses), rtol=1e-4, atol=1e-5)
    # the five distinct examples (three copies each) ran through the bottom once, in the first agent's
    # first epoch; the second epoch and the second agent read every row from the cache
    assert trunk.misses == len(PAIRS)
    assert trunk.hits >= 2 * 2 * len(task.train) - len(task.train)


def test_config_refuses_the_trunk_without_layers_to_transform(compose, tmp_path):
    from lmas.config import ConfigError, validate

    with pytest.raises(ConfigError) as err:
        validate(compose(["train.trunk_cache=true", "eval.shared_trunk=true", "model=tiny"], tmp_path))
    text = str(err.value)
    assert "train.trunk_cache=true: the shared trunk computes the layers below every LoRA layer once" in text
    assert "eval.shared_trunk=true" in text
    validate(compose(["train.trunk_cache=true", "eval.shared_trunk=true", "model=tiny",
                      "population.lora.layers_to_transform=[1]"], tmp_path))


def test_lmas_train_with_the_trunk_gives_the_run_without_it(fast_overrides, tmp_path, run_lmas):
    """The default stream, 2 agents, LoRA in the top of the tiny model's 2 layers: same results either way."""
    import math

    common = fast_overrides + ["population.agents=2", "population.lora.layers_to_transform=[1]",
                               "model.num_layers=2", "stream.max_eval=4", "eval.next_task=false"]
    plain = run_lmas(common, tmp_path / "plain")
    shared = run_lmas(common + ["train.trunk_cache=true", "eval.shared_trunk=true"], tmp_path / "shared")
    assert shared["config"]["train"]["trunk_cache"] and shared["config"]["eval"]["shared_trunk"]
    for a, b in zip(_flat(plain["matrix"]), _flat(shared["matrix"])):
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-6)
    for key, curve in plain["loss_curves"].items():
        assert shared["loss_curves"][key] == pytest.approx(curve, rel=1e-4, abs=1e-5)


def _flat(value):
    if isinstance(value, dict):
        for k in sorted(value):
            yield from _flat(value[k])
    elif isinstance(value, list):
        for v in value:
            yield from _flat(v)
    elif isinstance(value, (int, float)):
        yield float(value)
    elif value is None:
        yield float("nan")
