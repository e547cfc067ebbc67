"""The frozen trunk's activations on disk (eval.cache): shared across trunk objects (runs), same numbers as the
plain path, and a changed base or token is never served from a stale entry."""

from __future__ import annotations

import pytest
import torch

from lmas.evaluation.scorer import PopulationScorer
from lmas.lm.diskcache import DiskCache
from lmas.lm.encoding import PromptEncoder, collate
from lmas.lm.likelihood import answer_loss, label_logprobs
from lmas.lm.trunk import SharedTrunk
from lmas.population.population import Population

TOP = [2, 3]
LABELS = ["sport", "business news", "science and technology"]  # 1- to 3-token labels
PROMPTS = [
    "News: the striker scored twice in the cup final\nTopic:",
    "News: shares rose\nTopic:",
    "News: a new telescope found water on a distant planet, the agency said on Monday\nTopic:",
    "News: rain\nTopic:",
    "News: the central bank held interest rates as inflation eased again\nTopic:",
]


@pytest.fixture
def pop():
    from lmas.models.providers import tiny

    base = tiny(hidden_size=32, num_layers=4, num_heads=2, intermediate_size=64, seed=0)
    p = Population(base, agents=2, lora={"r": 4, "alpha": 8, "layers_to_transform": TOP})
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking adapters: non-zero B
        for name in p.names:
            for pname, w in p.parameters_of(name).items():
                if "lora_B" in pname:
                    w.copy_(torch.randn(w.shape, generator=gen) * 0.3)
    return p


def test_single_agent_label_scores_through_the_disk_cached_trunk_equal_the_plain_path(pop, tmp_path, one_thread):
    enc = PromptEncoder(pop.tokenizer, max_length=24)  # the longest prompt is cut: scored per label length
    pop.activate("agent1")
    pop.model.eval()
    want = label_logprobs(pop.model, enc, PROMPTS, LABELS, batch_size=2)
    store = DiskCache(tmp_path)
    cold = PopulationScorer(pop, enc, batch_size=2, trunk=SharedTrunk(pop.model, disk=store))
    got = cold.label_logprobs(["agent1"], PROMPTS, LABELS)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert cold.trunk.misses > 0 and store.stores == cold.trunk.misses
    # another run (a fresh trunk, nothing in memory), other batches: every bottom comes from disk
    warm_trunk = SharedTrunk(pop.model, disk=DiskCache(tmp_path))
    warm_scorer = PopulationScorer(pop, enc, batch_size=3, trunk=warm_trunk)
    warm = warm_scorer.label_logprobs(["agent1", "agent0"], PROMPTS, LABELS)
    assert warm_trunk.misses == 0 and warm_trunk.disk.hits == cold.trunk.misses
    torch.testing.assert_close(warm[0], want, rtol=0, atol=1e-5)
    pop.activate("agent0")
    torch.testing.assert_close(warm[1], label_logprobs(pop.model, enc, PROMPTS, LABELS), rtol=0, atol=1e-5)


def test_training_rows_come_from_disk_in_a_later_run_and_a_changed_base_misses(pop, tmp_path, one_thread):
    enc = PromptEncoder(pop.tokenizer, max_length=48)
    batch = collate([enc.encode(p, a, eos=False) for p, a in zip(PROMPTS, ["sport"] * 5, strict=True)], enc.pad_id)
    pop.activate("agent0")
    first = SharedTrunk(pop.model, disk=DiskCache(tmp_path))
    loss = torch.nn.functional.cross_entropy(*first.answer_logits(batch)[:2])
    later = SharedTrunk(pop.model, disk=DiskCache(tmp_path))
    again = torch.nn.functional.cross_entropy(*later.answer_logits(batch)[:2])
    assert later.misses == 0 and later.hits == len(PROMPTS) and torch.equal(loss, again)
    torch.testing.assert_close(again, answer_loss(pop.model, batch), rtol=1e-5, atol=1e-6)
    # one number of a shared (bottom) layer changed: every row is recomputed, never read stale
    with torch.no_grad():
        pop.model.get_base_model().model.layers[0].mlp.down_proj.weight[0, 0] += 0.5
    changed = SharedTrunk(pop.model, disk=DiskCache(tmp_path))
    changed.answer_logits(batch)
    assert changed.hits == 0 and changed.misses == len(PROMPTS)
    # a change above the split (layer 2's base weight) does not change the bottom: its rows still hit
    with torch.no_grad():
        pop.model.get_base_model().model.layers[2].mlp.down_proj.weight[0, 0] += 0.5
    above = SharedTrunk(pop.model, disk=DiskCache(tmp_path))
    above.answer_logits(batch)
    assert above.misses == 0
    # a changed token is its own entry
    other = collate([enc.encode(PROMPTS[0] + " x", "sport", eos=False)], enc.pad_id)
    above.answer_logits(other)
    assert above.misses == 1


def test_lmas_train_with_the_disk_cache_gives_the_run_without_it(fast_overrides, tmp_path, run_lmas):
    """One agent, the trunk on and a cache dir: the plain run's matrix; a second run reads the cache."""
    import math

    common = fast_overrides + ["population.lora.layers_to_transform=[1]", "model.num_layers=2", "stream.max_eval=4"]
    plain = run_lmas(common, tmp_path / "plain")
    cache = ["train.trunk_cache=true", "eval.shared_trunk=true", f"eval.cache={tmp_path / 'cache'}"]
    cold = run_lmas(common + cache, tmp_path / "cold")
    warm = run_lmas(common + cache, tmp_path / "warm")
    assert cold["config"]["eval"]["cache"] == str(tmp_path / "cache")
    for a, b, c in zip(_flat(plain["matrix"]), _flat(cold["matrix"]), _flat(warm["matrix"]), strict=True):
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-6)
        assert (math.isnan(b) and math.isnan(c)) or b == c
    for key, curve in plain["loss_curves"].items():
        assert cold["loss_curves"][key] == pytest.approx(curve, rel=1e-4, abs=1e-5)
        assert warm["loss_curves"][key] == cold["loss_curves"][key]


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
