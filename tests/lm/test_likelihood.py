"""Answer-only masking, head-only-where-needed log-probs, and the three scorers, on a tiny model."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from lmas.data.task import Example, Task
from lmas.lm.encoding import IGNORE, PromptEncoder, collate
from lmas.lm.likelihood import answer_loss, label_logprobs, sequence_logprobs
from lmas.evaluation.scoring import evaluate, greedy_answers, normalise_answer, perplexity, rank_accuracy


@pytest.fixture
def enc(tiny_base):
    return PromptEncoder(tiny_base.tokenizer, max_length=32)


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
    with caplog.at_level(logging.WARNING, logger="lmas.lm.encoding"):
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


# --- one truncation for training, scoring, generation (issue 13, bug 3) ---------------------------
LONG_PROMPT = "News: " + " ".join(f"word{i}" for i in range(40)) + "\nTopic:"


def test_a_cut_prompt_keeps_its_start_token_and_is_the_training_prompt_everywhere(tiny_base, enc):
    labels = ["sport", "business news", "science and technology"]  # 1, 2 and 3 tokens
    assert [len(enc.answer_tokens(lab)) for lab in labels] == [1, 2, 3]
    assert enc.prompt_length(LONG_PROMPT) > enc.max_length
    for lab in labels:
        e = enc.encode(LONG_PROMPT, lab, eos=False)
        assert len(e.ids) == enc.max_length and e.ids[0] == enc.start_id  # the start token survives the cut
        assert list(e.ids[e.target_start - 3 : e.target_start]) == enc.tokens("\nTopic:")[-3:]
        # scoring and generation cut the prompt the same way for the same room
        assert enc.encode_prompt(LONG_PROMPT, enc.max_length - len(enc.answer_tokens(lab))) == list(
            e.ids[: e.target_start])
    assert enc.encode_prompt(LONG_PROMPT)[0] == enc.start_id and len(enc.encode_prompt(LONG_PROMPT)) == enc.max_length
    # each label's score is the answer log-likelihood of its own training encoding, also when the
    # prompt is cut differently for labels of different lengths (mixed with a prompt that fits)
    prompts = ["News: rain\nTopic:", LONG_PROMPT]
    scores = label_logprobs(tiny_base.model, enc, prompts, labels, batch_size=2)
    for i, p in enumerate(prompts):
        for j, lab in enumerate(labels):
            total, _ = sequence_logprobs(tiny_base.model, collate([enc.encode(p, lab, False)], enc.pad_id))
            torch.testing.assert_close(scores[i, j], total[0], rtol=1e-5, atol=1e-5)


# --- prompt formats (issue 13, bug 7) -------------------------------------------------------------
def test_chat_format_is_the_tokenizers_own_template_with_the_answer_as_assistant_turn(tiny_base):
    tok = tiny_base.tokenizer
    enc = PromptEncoder(tok, max_length=96, prompt_format="chat")
    prompt, answer = "Q: 1+1\nA:", "2"
    e = enc.encode(prompt, answer, eos=True)
    user = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True)
    user = list(user["input_ids"] if isinstance(user, dict) or hasattr(user, "keys") else user)
    assert list(e.ids[: e.target_start]) == user == enc.encode_prompt(prompt)
    assert list(e.ids[e.target_start :]) == enc.tokens(answer) + [enc.eos_id]  # no leading space in a turn
    conv = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                                   tokenize=False)
    assert tok.decode(list(e.ids)) + "\n" == conv  # the answer is the assistant turn, ended by <|im_end|>
    assert e.ids[0] == enc.start_id  # SmolLM2's template starts with <|im_start|>
    # a cut keeps the whole template (system turn, role markers, the assistant opening)
    short = PromptEncoder(tok, max_length=40, prompt_format="chat")
    cut = short.encode(LONG_PROMPT, "sport", eos=False)
    assert len(cut.ids) == 40
    assert list(cut.ids[: len(short.head)]) == short.head
    assert list(cut.ids[cut.target_start - len(short.tail) : cut.target_start]) == short.tail
    assert short.encode_prompt(LONG_PROMPT, 40 - len(short.answer_tokens("sport"))) == list(cut.ids[: cut.target_start])
    raw = enc.encode("", "some raw text", eos=False)  # raw text is not a conversation
    assert list(raw.ids) == [enc.start_id] + enc.tokens("some raw text")


def test_chat_scores_equal_the_chat_training_encoding(tiny_base):
    enc = PromptEncoder(tiny_base.tokenizer, max_length=40, prompt_format="chat")
    prompts, labels = ["News: a\nTopic:", LONG_PROMPT], ["sport", "business news"]
    scores = label_logprobs(tiny_base.model, enc, prompts, labels, batch_size=2)
    for i, p in enumerate(prompts):
        for j, lab in enumerate(labels):
            total, _ = sequence_logprobs(tiny_base.model, collate([enc.encode(p, lab, False)], enc.pad_id))
            torch.testing.assert_close(scores[i, j], total[0], rtol=1e-5, atol=1e-5)


def test_prompt_format_errors_name_the_option(tiny_base):
    import copy

    from lmas.models.providers import BaseModel

    with pytest.raises(ValueError, match=r"model.prompt_format='chatml' is not one of \['plain', 'chat'\]"):
        PromptEncoder(tiny_base.tokenizer, 32, "chatml")
    bare = copy.deepcopy(tiny_base.tokenizer)
    bare.chat_template = None
    with pytest.raises(ValueError, match="model.prompt_format=chat: the tokenizer .* has no chat template"):
        PromptEncoder(bare, 32, "chat")
    with pytest.raises(ValueError, match="model.prompt_format=chat: the tokenizer of tiny has no chat template"):
        BaseModel(tiny_base.model, bare, "tiny", prompt_format="chat")
    with pytest.raises(ValueError, match="data.max_length=16 leaves no room for a prompt: the chat prompt format"):
        PromptEncoder(tiny_base.tokenizer, 16, "chat")  # SmolLM2's template alone is 30 tokens


def test_config_check_refuses_a_bad_prompt_format(compose, tmp_path):
    from lmas.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"model.prompt_format=chatml: expected one of plain, chat"):
        validate(compose(["model=tiny", "model.prompt_format=chatml"]))
    folder = tmp_path / "lm"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 512}')
    with pytest.raises(ConfigError, match=r"model.prompt_format=chat: the tokenizer in model.name_or_path=.* has "
                                          r"no chat template"):
        validate(compose(["model=hf", f"model.name_or_path={folder}", "model.prompt_format=chat"]))
    validate(compose(["model=tiny", "model.prompt_format=chat"]))  # SmolLM2's tokenizer has one


def test_the_loop_encodes_with_the_models_prompt_format(tmp_path):
    from lmas.data.stream import Stream
    from lmas.loop import ContinualLoop
    from lmas.models.providers import tiny
    from lmas.population.population import Population
    from lmas.strategies.base import Strategy

    base = tiny(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, prompt_format="chat")
    ex = [Example("News: x\nTopic:", "sport")]
    task = Task("t", "classification", train=ex, val=ex, test=ex, labels=["sport", "tech"])
    loop = ContinualLoop(Population(base, agents=1), Stream("s", [task]), Strategy(), tmp_path, progress=False)
    enc = loop.encoder
    assert enc.prompt_format == "chat"
    e = enc.encode("News: x\nTopic:", "sport", False)
    assert list(e.ids[e.target_start - len(enc.tail) :]) == enc.tail + enc.answer_tokens("sport")
