"""Positions and masking against Hugging Face's own forward with ``labels``, on the real SmolLM2.

The random tiny model cannot see an off-by-one: its log-probabilities are nearly uniform and move
by less than the other tests' tolerances. SmolLM2-135M's do not. The reference for every number
here is HF's forward on ONE unpadded sequence, the training encoding
``PromptEncoder.encode(prompt, answer)``, with ``labels`` = the sequence with -100 before the answer
(HF shifts the labels itself): answer log-likelihood = ``-loss * n_answer_tokens``.

Compared with it, at ``TOL`` nats: rank scores (:func:`label_logprobs`, left-padded prompts,
1-token labels scored from the prompt pass and multi-token labels through the KV-cache path, one
adapter or a mixed-adapter batch), the shared trunk's scores and training loss, and the
answer-only loss of right-padded training batches (:func:`collate`, :func:`answer_loss`), for
short prompts and prompts longer than ``max_length`` (cut), in both prompt formats.
:func:`test_an_off_by_one_moves_the_answer_loglik_far_beyond_the_tolerance` measures what an
off-by-one (label positions shifted by one, targets read one position late, the start token
cut) does to the same reference, so a pass here means none of them happened.
"""

from __future__ import annotations

import pytest
import torch

from lmas.lm.encoding import IGNORE, Encoded, PromptEncoder, collate

from lmas.lm.likelihood import answer_loss, label_logprobs, sequence_logprobs
from lmas.lm.trunk import SharedTrunk, shared_label_logprobs
from lmas.population.population import Population

TOL = 2e-3  # nats; float32 rounding between padded/cached and single-sequence passes is ~1e-4
MAX = {"plain": 40, "chat": 72}  # the chat template alone is 30 tokens
AGENTS = ["a", "b"]
TOP = [26, 27, 28, 29]  # LoRA in the top 4 of 30 layers: the trunk shares layers 0-25
LABELS = ["sport", "business news", "science and technology"]
PROMPTS = [
    "News: rain stops play\nTopic:",
    "News: shares rose sharply after the results\nTopic:",
    "News: The government said on Monday that the new budget would raise spending on schools and hospitals "
    "while cutting taxes for small firms, and the opposition called it a gamble with the public finances "
    "that the country could not afford.\nTopic:",  # longer than max_length: cut
]


@pytest.fixture(scope="module")
def pop(smollm2_folder):
    from lmas.models.providers import smollm2

    p = Population(smollm2(), agents=AGENTS, lora={"r": 4, "alpha": 8, "layers_to_transform": TOP})
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero, different adapters (fresh ones are exact no-ops)
        for name in p.names:
            for pname, w in p.parameters_of(name).items():
                if "lora_B" in pname:
                    w.copy_(torch.randn(w.shape, generator=gen) * 0.1)
    p.model.eval()
    return p


@torch.no_grad()
def hf_answer_logprob(model, e: Encoded, position_ids: torch.Tensor | None = None) -> float:
    """HF's own forward with ``labels`` on one unpadded sequence: the answer's log-likelihood."""
    ids = torch.tensor([e.ids])
    labels = ids.clone()
    labels[0, : e.target_start] = IGNORE
    out = model(input_ids=ids, labels=labels, position_ids=position_ids)
    return -out.loss.item() * (len(e.ids) - e.target_start)


@pytest.fixture(scope="module")
def reference(pop):
    """ref[fmt][agent]: (prompts, labels) HF answer log-likelihoods of the training encodings."""
    ref = {}
    for fmt in MAX:
        enc = PromptEncoder(pop.tokenizer, MAX[fmt], fmt)
        assert enc.prompt_length(PROMPTS[-1]) > MAX[fmt]  # the last prompt is cut
        assert enc.prompt_length(PROMPTS[0]) + len(enc.answer_tokens(LABELS[-1])) <= MAX[fmt]  # the first is not
        ref[fmt] = {}
        for agent in AGENTS:
            pop.activate(agent)
            ref[fmt][agent] = torch.tensor([[hf_answer_logprob(pop.model, enc.encode(p, lab, eos=False))
                                             for lab in LABELS] for p in PROMPTS])
    assert (ref["plain"]["a"] - ref["plain"]["b"]).abs().median() > 10 * TOL  # the adapters really differ
    return ref


@pytest.mark.parametrize("fmt", ["plain", "chat"])
def test_rank_scores_equal_hf_answer_loglik_single_and_mixed_adapters(pop, reference, fmt):
    enc = PromptEncoder(pop.tokenizer, MAX[fmt], fmt)
    assert {len(enc.answer_tokens(lab)) for lab in LABELS} >= {2, 3}  # multi-token labels: the KV-cache path
    for agent in AGENTS:
        pop.activate(agent)
        got = label_logprobs(pop.model, enc, PROMPTS, LABELS, batch_size=3)  # left-padded batch
        torch.testing.assert_close(got, reference[fmt][agent], rtol=0, atol=TOL)
    mixed = label_logprobs(pop.model, enc, PROMPTS * 2, LABELS, batch_size=6,
                           adapter_names=["a", "b", "a", "b", "a", "b"])
    want = torch.stack([reference[fmt][AGENTS[r % 2]][r % 3] for r in range(6)])
    torch.testing.assert_close(mixed, want, rtol=0, atol=TOL)


@pytest.mark.parametrize("fmt", ["plain", "chat"])
def test_shared_trunk_scores_equal_hf_answer_loglik(pop, reference, fmt):
    enc = PromptEncoder(pop.tokenizer, MAX[fmt], fmt)
    trunk = SharedTrunk(pop.model)
    assert trunk.split == TOP[0]
    got = shared_label_logprobs(trunk, enc, PROMPTS, LABELS, AGENTS, pop.activate, batch_size=3)
    torch.testing.assert_close(got, torch.stack([reference[fmt][a] for a in AGENTS]), rtol=0, atol=TOL)


@pytest.mark.parametrize("fmt", ["plain", "chat"])
def test_answer_loss_of_right_padded_batches_equals_hf_labels_loss(pop, fmt):
    enc = PromptEncoder(pop.tokenizer, MAX[fmt], fmt)
    items = [enc.encode(PROMPTS[0], "sport", eos=False), enc.encode(PROMPTS[2], "business news", eos=False),
             enc.encode("Q: 2+3\nA:", "5", eos=True)]  # short, cut, generation (EOS is a target)
    assert len({len(it.ids) for it in items}) == 3  # right padding in two rows
    n = torch.tensor([len(it.ids) - it.target_start for it in items], dtype=torch.float)
    batch = collate(items, enc.pad_id)
    trunk = SharedTrunk(pop.model)
    for agent in AGENTS:
        pop.activate(agent)
        ref = torch.tensor([hf_answer_logprob(pop.model, it) for it in items])  # (3,) unpadded, one at a time
        with torch.no_grad():
            total, count = sequence_logprobs(pop.model, batch)
            loss = answer_loss(pop.model, batch)
            hf_batch = pop.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 labels=batch["targets"]).loss  # HF's own loss on our padded batch
            cached = torch.nn.functional.cross_entropy(*trunk.answer_logits(batch)[:2])
        assert count.tolist() == n.tolist()
        torch.testing.assert_close(total, ref, rtol=0, atol=TOL)
        want = torch.tensor(-ref.sum().item() / n.sum().item())  # token-weighted mean NLL
        for got in (loss, hf_batch, cached):
            torch.testing.assert_close(got, want, rtol=0, atol=TOL / n.sum().item())


def test_an_off_by_one_moves_the_answer_loglik_far_beyond_the_tolerance(pop):
    """What each off-by-one would do to the references above: every variant is > 20 * TOL away."""
    enc = PromptEncoder(pop.tokenizer, MAX["plain"], "plain")
    pop.activate("a")
    for prompt, lab in ((PROMPTS[0], "science and technology"), (PROMPTS[2], "business news")):  # short; cut
        e = enc.encode(prompt, lab, eos=False)
        ref = hf_answer_logprob(pop.model, e)
        shifted = torch.arange(len(e.ids))[None].clone()
        shifted[0, e.target_start :] += 1  # the answer's positions off by one
        no_start = Encoded(e.ids[1:], e.target_start - 1)  # the start token cut (bug 3)
        with torch.no_grad():  # targets read one position late: logits at t scored against token t
            logp = pop.model(input_ids=torch.tensor([e.ids])).logits[0].float().log_softmax(-1)
        late = logp[e.target_start :].gather(1, torch.tensor(e.ids[e.target_start :])[:, None]).sum().item()
        for variant in (hf_answer_logprob(pop.model, e, shifted), hf_answer_logprob(pop.model, no_start), late):
            assert abs(variant - ref) > 20 * TOL, (prompt[:20], lab, variant, ref)
