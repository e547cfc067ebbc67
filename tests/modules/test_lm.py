"""Answer-only masking, head-only-where-needed log-probs, and the three scorers, on a tiny model."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from lmas.data.task import Example, Task
from lmas.modules.lm import (
    IGNORE,
    Encoder,
    answer_loss,
    collate,
    evaluate,
    greedy_answers,
    label_logprobs,
    normalise_answer,
    perplexity,
    rank_accuracy,
    sequence_logprobs,
)


@pytest.fixture
def enc(tiny_base):
    return Encoder(tiny_base.tokenizer, max_length=32)


def test_encode_puts_start_prompt_answer_and_marks_answer(enc):
    e = enc.encode("News: rain\nTopic:", "sport", eos=False)
    prompt = enc.tokens("News: rain\nTopic:")
    answer = enc.tokens(" sport")
    assert list(e.ids) == [enc.start_id] + prompt + answer
    assert e.target_start == 1 + len(prompt)
    g = enc.encode("Q: 1+1\nA:", "2", eos=True)
    assert g.ids[-1] == enc.eos_id and g.target_start == 1 + len(enc.tokens("Q: 1+1\nA:"))


def test_encode_truncates_prompt_from_the_start_and_keeps_answer(enc, caplog):
    prompt = " ".join(["word"] * 100) + "\nTopic:"
    with caplog.at_level(logging.WARNING, logger="lmas.modules.lm"):
        e = enc.encode(prompt, "business", eos=False, where="task 'news' train[3]")
        enc.encode(prompt, "sport", eos=False)
    answer = enc.tokens(" business")
    assert len(e.ids) == enc.max_length
    assert list(e.ids[-len(answer):]) == answer
    cue = enc.tokens("\nTopic:")
    assert list(e.ids[e.target_start - len(cue): e.target_start]) == cue
    assert enc.truncated == 2  # every cut is counted, only the first is logged
    (record,) = caplog.records
    assert record.getMessage().startswith("task 'news' train[3]: prompt of ")
    assert "to fit data.max_length=32 (its start dropped, the answer kept whole)" in record.getMessage()


def test_encode_answer_longer_than_max_length_raises_and_raw_text_keeps_its_beginning(tiny_base, enc):
    long = " ".join(f"w{i}" for i in range(60))
    with pytest.raises(ValueError, match=r"task 'qa' test\[7\]: the answer 'w0 w1 .*' alone is \d+ tokens, more than "
                                         r"the 31 that data.max_length=32 leaves"):
        enc.encode_example(Example("Q: count\nA:", long), "generation", where="task 'qa' test[7]")
    with pytest.raises(ValueError, match=r"label: the answer 'w0 w1 .*' alone is \d+ tokens"):  # rank scoring too
        label_logprobs(tiny_base.model, enc, ["Q: count\nA:"], ["short", long])
    assert enc.truncated == 0
    e = enc.encode("", long, eos=False)  # lm text: cut to the window, beginning kept, counted
    assert len(e.ids) == enc.max_length and list(e.ids[1:]) == enc.tokens(long)[: enc.max_length - 1]
    assert enc.truncated == 1


def test_lm_example_has_whole_text_as_target(enc):
    e = enc.encode("", "some raw text here", eos=False)
    assert e.target_start == 1 and list(e.ids[1:]) == enc.tokens("some raw text here")


def test_collate_masks_everything_but_answers(enc):
    items = [enc.encode("a b c", "x", eos=False), enc.encode("a", "y z", eos=True)]
    b = collate(items, enc.pad_id)
    assert b["input_ids"].shape == b["targets"].shape == b["attention_mask"].shape
    for row, it in enumerate(items):
        n = len(it.ids)
        assert b["attention_mask"][row].sum() == n
        t = b["targets"][row]
        assert (t[: it.target_start] == IGNORE).all() and (t[n:] == IGNORE).all()
        assert t[it.target_start: n].tolist() == list(it.ids[it.target_start:])


def _full_logits_logprobs(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B,T,V)
    logp = logits[:, :-1].float().log_softmax(-1)
    tgt = batch["targets"][:, 1:]
    keep = tgt != IGNORE
    return logp[keep].gather(1, tgt[keep][:, None]).squeeze(1), keep


def test_answer_loss_equals_full_logits_cross_entropy_on_answers(tiny_base, enc):
    model = tiny_base.model
    items = [enc.encode("News: stocks fell\nTopic:", "business", False), enc.encode("Q: 2+3\nA:", "5", True)]
    b = collate(items, enc.pad_id)
    ref, keep = _full_logits_logprobs(model, b)
    loss = answer_loss(model, b)
    assert keep.sum() == sum(len(i.ids) - i.target_start for i in items)
    torch.testing.assert_close(loss, -ref.mean(), rtol=1e-5, atol=1e-6)
    # prompt tokens do not enter the loss: a full-sequence CE differs
    full = F.cross_entropy(model(input_ids=b["input_ids"]).logits[:, :-1].reshape(-1, len(enc.tokenizer)),
                           b["input_ids"][:, 1:].reshape(-1))
    assert abs(full.item() - loss.item()) > 1e-3


def test_sequence_logprobs_sums_per_row(tiny_base, enc):
    items = [enc.encode("p", "one two", False), enc.encode("p q r", "three", False)]
    b = collate(items, enc.pad_id)
    total, count = sequence_logprobs(tiny_base.model, b)
    ref, keep = _full_logits_logprobs(tiny_base.model, b)
    rows = keep.nonzero()[:, 0]
    for r in range(2):
        torch.testing.assert_close(total[r], ref[rows == r].sum(), rtol=1e-5, atol=1e-5)
        assert count[r] == len(items[r].ids) - items[r].target_start


def test_rank_classification_picks_the_most_likely_label(tiny_base, enc):
    # prompts of different lengths (left padding) and labels of one and several tokens
    prompts = ["News: a\nTopic:", "News: the markets rallied on Monday\nTopic:", "c"]
    labels = ["sport", "business news", "tech"]
    scores = label_logprobs(tiny_base.model, enc, prompts, labels, batch_size=2)
    assert scores.shape == (3, 3)
    for i, p in enumerate(prompts):  # each entry equals the single-sequence log-likelihood
        for j, lab in enumerate(labels):
            total, _ = sequence_logprobs(tiny_base.model, collate([enc.encode(p, lab, False)], enc.pad_id))
            torch.testing.assert_close(scores[i, j], total[0], rtol=1e-5, atol=1e-5)
    best = scores.argmax(1).tolist()
    right = [Example(p, labels[k]) for p, k in zip(prompts, best)]
    wrong = [Example(p, labels[(k + 1) % 3]) for p, k in zip(prompts, best)]
    assert rank_accuracy(tiny_base.model, enc, right, labels) == 1.0
    assert rank_accuracy(tiny_base.model, enc, wrong, labels) == 0.0


def test_greedy_answers_match_a_manual_argmax_loop(tiny_base, enc):
    model = tiny_base.model
    prompts = ["Question: 1+1\nAnswer:", "Q: hi"]
    got = greedy_answers(model, enc, prompts, max_new_tokens=5, batch_size=2)
    for prompt, answer in zip(prompts, got):
        ids = torch.tensor([enc.encode_prompt(prompt)])
        out = []
        for _ in range(5):
            nxt = model(input_ids=ids).logits[0, -1].argmax().item()
            if nxt == enc.eos_id or nxt in enc.tokens("\n"):
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        expected = enc.tokenizer.decode(out, skip_special_tokens=True).split("\n")[0].strip()
        assert answer == expected


def test_normalise_answer():
    assert normalise_answer("  -3.5. ") == "-3.5"
    assert normalise_answer("a   b") == "a b"


def test_perplexity_is_exp_of_token_mean_nll(tiny_base, enc):
    exs = [Example("", "the cat sat on the mat"), Example("", "stocks fell sharply")]
    ppl = perplexity(tiny_base.model, enc, exs, batch_size=1)
    b = collate([enc.encode(e.prompt, e.answer, False) for e in exs], enc.pad_id)
    ref, _ = _full_logits_logprobs(tiny_base.model, b)
    assert ppl == pytest.approx(math.exp(-ref.mean().item()), rel=1e-5)
    # a random 49k-vocab model is near-uniform: perplexity is in the tens of thousands
    assert 1e4 < ppl < 1e5


def test_evaluate_dispatches_on_kind_and_rejects_empty_split(tiny_base, enc):
    ex = [Example("News: x\nTopic:", "sport")]
    task = Task("t", "classification", train=ex, val=[], test=ex, labels=["sport", "tech"])
    acc = evaluate(tiny_base.model, enc, task)
    assert acc in (0.0, 1.0)
    with pytest.raises(ValueError, match="val split is empty"):
        evaluate(tiny_base.model, enc, task, split="val")
