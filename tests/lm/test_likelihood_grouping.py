"""Rank scoring in length-grouped batches, every label in the prompt's own pass: the same scores as before."""

from __future__ import annotations

import math
import random

import pytest
import torch

from lmas.lm.batching import length_batches
from lmas.lm.encoding import PromptEncoder, collate
from lmas.lm.likelihood import label_logprobs, sequence_logprobs, trunk_and_head
from lmas.population.population import Population

LABELS = ["sport", "business news", "science and technology", "tech"]  # 1, 2, 3 and 1 tokens


def _prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "rain shares fall the markets rallied on monday a goal in extra time".split()
    return ["News: " + " ".join(rng.choice(words) for _ in range(rng.randint(0, 30))) + "\nTopic:" for _ in range(n)]


def _reference(model, enc, prompts, labels):
    """Each (prompt, label) as its own training encoding, alone in its batch: no padding, no sharing."""
    return torch.stack(
        [torch.cat([sequence_logprobs(model, collate([enc.encode(p, lab, False)], enc.pad_id))[0] for lab in labels])
         for p in prompts]
    )


def test_grouped_one_pass_scores_equal_each_prompt_alone_and_the_training_encoding(tiny_base, one_thread):
    enc = PromptEncoder(tiny_base.tokenizer, max_length=36)  # some prompts get cut: by_label_length too
    model = tiny_base.model.eval()
    prompts = _prompts(11)
    lengths = [enc.prompt_length(p) for p in prompts]
    assert len(set(lengths)) > 6 and max(lengths) > enc.max_length - 3  # mixed lengths, the longest cut
    with torch.no_grad():
        grouped = label_logprobs(model, enc, prompts, LABELS, batch_size=4)
        alone = torch.cat([label_logprobs(model, enc, [p], LABELS) for p in prompts])  # unsorted, no padding
        ref = _reference(model, enc, prompts, LABELS)
    # log-likelihoods of ~-30 here: 1e-6 relative is a few float32 ulps
    torch.testing.assert_close(grouped, alone, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grouped, ref, rtol=1e-6, atol=1e-6)
    assert grouped.argmax(1).tolist() == alone.argmax(1).tolist() == ref.argmax(1).tolist()
    reordered = [prompts[i] for i in reversed(range(len(prompts)))]
    with torch.no_grad():  # results follow the prompts, whatever their order
        torch.testing.assert_close(label_logprobs(model, enc, reordered, LABELS, 4), grouped.flip(0), rtol=1e-6, atol=1e-6)


def test_multi_token_labels_take_one_pass_per_batch(tiny_base, one_thread):
    enc = PromptEncoder(tiny_base.tokenizer, max_length=64)  # nothing is cut: one call of the scorer
    model = tiny_base.model.eval()
    prompts = _prompts(10, seed=1)
    trunk, head = trunk_and_head(model)
    calls: list[tuple[int, int]] = []
    hook = trunk.register_forward_hook(lambda m, args, kwargs, out: calls.append(tuple(kwargs["input_ids"].shape)),
                                       with_kwargs=True)
    try:
        with torch.no_grad():
            label_logprobs(model, enc, prompts, LABELS, batch_size=4)
    finally:
        hook.remove()
    batches = length_batches([enc.prompt_length(p) for p in prompts], 4)
    inputs = sum(len(enc.answer_tokens(lab)) - 1 for lab in LABELS)  # every label token but the last
    assert calls == [(len(b), max(enc.prompt_length(prompts[r]) for r in b) + inputs) for b in batches]


def test_grouped_mixed_adapter_rows_keep_their_own_adapter(tiny_base, one_thread):
    pop = Population(tiny_base, agents=["a", "b"], lora={"r": 4, "alpha": 8})
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pop.model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    enc = PromptEncoder(pop.tokenizer, 64)
    prompts = _prompts(8, seed=2)
    names = ["a", "b"] * 4  # grouping by length reorders rows: each must keep its adapter
    pop.model.eval()
    with torch.no_grad():
        mixed = label_logprobs(pop.model, enc, prompts, LABELS, batch_size=3, adapter_names=names)
        for agent in ("a", "b"):
            pop.activate(agent)
            own = label_logprobs(pop.model, enc, prompts, LABELS, batch_size=3)
            rows = [i for i, n in enumerate(names) if n == agent]
            torch.testing.assert_close(mixed[rows], own[rows], rtol=1e-5, atol=1e-5)
    assert (mixed[0] - own[0]).abs().max() > 1e-2  # the agents really differ


@pytest.mark.parametrize("batch_size", [3, 32])
def test_gradients_through_grouped_scores_equal_the_training_encodings(tiny_base, one_thread, batch_size):
    pop = Population(tiny_base, agents=["a"], lora={"r": 4, "alpha": 8})
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in pop.model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    enc = PromptEncoder(pop.tokenizer, 64)
    prompts = _prompts(7, seed=3)
    weights = torch.randn(len(prompts), len(LABELS), generator=gen)
    params = [p for n, p in pop.model.named_parameters() if p.requires_grad]
    scores = label_logprobs(pop.model, enc, prompts, LABELS, batch_size=batch_size, grad=True)
    got = torch.autograd.grad((scores * weights).sum(), params)
    ref = torch.autograd.grad((_reference(pop.model, enc, prompts, LABELS) * weights).sum(), params)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_generation_and_perplexity_in_grouped_batches_keep_each_examples_result(tiny_base, one_thread):
    from lmas.data.task import Example
    from lmas.evaluation.scoring import greedy_answers, perplexity_scored

    enc = PromptEncoder(tiny_base.tokenizer, max_length=64)
    model = tiny_base.model.eval()
    prompts = _prompts(9, seed=4)
    together = greedy_answers(model, enc, prompts, max_new_tokens=4, batch_size=4)
    assert together == [greedy_answers(model, enc, [p], max_new_tokens=4)[0] for p in prompts]
    examples = [Example(p, lab) for p, lab in zip(prompts, LABELS * 3)]
    scored = perplexity_scored(model, enc, examples, batch_size=4)
    alone = [perplexity_scored(model, enc, [ex]).per_example[0] for ex in examples]
    torch.testing.assert_close(torch.tensor(scored.per_example), torch.tensor(alone), rtol=1e-6, atol=1e-5)
    assert scored.value == pytest.approx(math.exp(sum(a[0] for a in alone) / sum(a[1] for a in alone)), rel=1e-6)
