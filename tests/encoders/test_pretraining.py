"""MLM and NSP for encoder agents: the masking rule's proportions, the next-sentence pairs, the losses and the
pseudo-perplexity against hand computations on a tiny BERT (and Hugging Face's own pretraining loss), the
packaged MiniLM's heads initialised with the decoder tied, and a short run on it that lowers its pseudo-perplexity."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from lmas.encoders.pretraining import (
    IGNORE,
    IS_NEXT,
    NOT_NEXT,
    load_pretraining_model,
    masked_token_accuracy,
    mlm_mask,
    nsp_pairs,
    pretraining_batch,
    pretraining_losses,
    pseudo_perplexity,
    sentences,
)

TEXTS = [
    "Shares rose in London. The bank held its rates. Investors were calm. Oil prices fell again.",
    "The striker scored twice. The coach praised the team! Fans sang until late. The cup is theirs.",
    "A new phone was launched. Its battery lasts two days? Reviewers liked the camera. Sales start soon.",
]


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from lmas.distill.encoder_teacher import minilm_folder

    return AutoTokenizer.from_pretrained(str(minilm_folder()))


@pytest.fixture
def tiny_bert(minilm_tokenizer):
    from transformers import BertConfig, BertForPreTraining

    config = BertConfig(vocab_size=len(minilm_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return BertForPreTraining(config).eval()


def test_the_masking_rule_selects_15_percent_and_replaces_80_10_10():
    gen = torch.Generator().manual_seed(0)
    vocab, mask_id = 1000, 3
    ids = torch.randint(10, vocab, (400, 120), generator=gen)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True  # [CLS], [SEP]
    special[::3, 100:] = True  # padding
    inputs, labels = mlm_mask(ids, special, vocab, mask_id, gen)
    selected = labels != IGNORE
    n = int((~special).sum())
    assert not (selected & special).any()  # special positions are never selected
    assert torch.equal(labels[selected], ids[selected])  # the labels are the original tokens
    assert torch.equal(inputs[~selected], ids[~selected])  # nothing else changes
    assert selected.sum().item() / n == pytest.approx(0.15, abs=4 * math.sqrt(0.15 * 0.85 / n))
    k = int(selected.sum())
    masked = (inputs[selected] == mask_id).sum().item() / k
    kept = (inputs[selected] == ids[selected]).sum().item() / k
    swapped = 1 - masked - kept
    sd = 4 * math.sqrt(0.1 * 0.9 / k)
    assert masked == pytest.approx(0.8, abs=4 * math.sqrt(0.8 * 0.2 / k))
    assert kept == pytest.approx(0.1 + 0.1 / vocab, abs=sd)  # a random draw may hit the original token
    assert swapped == pytest.approx(0.1, abs=sd)
    with pytest.raises(ValueError, match="probability=1.5"):
        mlm_mask(ids, special, vocab, mask_id, gen, probability=1.5)


def test_next_sentence_pairs_are_half_consecutive_and_half_from_another_text():
    texts = [" ".join(f"Text {t} sentence {s}." for s in range(30)) for t in range(4)]
    pairs = nsp_pairs(texts, random.Random(0))
    assert len(pairs) == 4 * 29
    share = sum(lab == IS_NEXT for _, _, lab in pairs) / len(pairs)
    assert share == pytest.approx(0.5, abs=4 * math.sqrt(0.25 / len(pairs)))
    for a, b, lab in pairs:
        ta, sa = a.split()[1], int(a.split()[3].rstrip("."))
        tb, sb = b.split()[1], int(b.split()[3].rstrip("."))
        assert (tb, sb) == (ta, sa + 1) if lab == IS_NEXT else (lab == NOT_NEXT and tb != ta)
    assert sentences("One. Two!  Three? four") == ["One.", "Two!", "Three?", "four"]
    with pytest.raises(ValueError, match="at least two texts"):
        nsp_pairs(["Only one text. With two sentences."], random.Random(0))


def test_losses_match_a_hand_computation_and_hugging_faces_pretraining_loss(tiny_bert, minilm_tokenizer):
    gen = torch.Generator().manual_seed(1)
    batch = pretraining_batch(minilm_tokenizer, nsp_pairs(TEXTS, random.Random(1)), gen, probability=0.3)
    got = pretraining_losses(tiny_bert, batch)
    out = tiny_bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    token_type_ids=batch["token_type_ids"])
    logp = out.prediction_logits.log_softmax(-1)  # (B, T, V): every position, as HF scores them
    picked = [logp[b, t, batch["labels"][b, t]].item() for b, t in (batch["labels"] != IGNORE).nonzero().tolist()]
    assert got["mlm"].item() == pytest.approx(-sum(picked) / len(picked), rel=1e-5)
    nsp_logp = out.seq_relationship_logits.log_softmax(-1)
    nsp = -sum(nsp_logp[i, y].item() for i, y in enumerate(batch["next_sentence_label"].tolist())) / len(nsp_logp)
    assert got["nsp"].item() == pytest.approx(nsp, rel=1e-5)
    hf = tiny_bert(**batch).loss  # Hugging Face's MLM + NSP loss over the same batch
    assert got["loss"].item() == pytest.approx(hf.item(), rel=1e-5)
    acc = masked_token_accuracy(tiny_bert, batch)
    want = (out.prediction_logits.argmax(-1)[batch["labels"] != IGNORE] == batch["labels"][batch["labels"] != IGNORE])
    assert acc == pytest.approx(want.float().mean().item())


def test_pseudo_perplexity_masks_each_token_once(tiny_bert, minilm_tokenizer):
    text = "The bank held its rates."
    ids = minilm_tokenizer(text)["input_ids"]
    logps = []
    for pos in range(1, len(ids) - 1):  # [CLS] and [SEP] are not scored
        masked = torch.tensor([ids[:pos] + [minilm_tokenizer.mask_token_id] + ids[pos + 1 :]])
        logits = tiny_bert(input_ids=masked).prediction_logits[0, pos]
        logps.append(F.log_softmax(logits, -1)[ids[pos]].item())
    want = math.exp(-sum(logps) / len(logps))
    assert pseudo_perplexity(tiny_bert, minilm_tokenizer, [text], batch_size=3) == pytest.approx(want, rel=1e-4)


def test_the_packaged_minilm_gets_its_mlm_and_nsp_heads_initialised_with_a_tied_decoder(smollm2_folder):
    from lmas.distill.encoder_teacher import minilm_folder

    model, fresh = load_pretraining_model(str(minilm_folder()))
    assert any(k.startswith("cls.predictions.transform") for k in fresh)
    assert any(k.startswith("cls.seq_relationship") for k in fresh)
    assert all(k.startswith("cls.") for k in fresh)  # the encoder itself comes from the checkpoint
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    with pytest.raises(ValueError, match="model_type 'llama'"):
        load_pretraining_model(str(smollm2_folder))


@pytest.mark.slow
def test_a_short_mlm_nsp_run_lowers_minilms_pseudo_perplexity_on_held_out_text(minilm_tokenizer):
    from lmas.data.sources import bbc_text
    from lmas.distill.encoder_teacher import minilm_folder

    task = bbc_text("text_business", topics=["business"], n_train=64, n_val=4, n_test=6, max_chars=300)
    train, held_out = [ex.answer for ex in task.train], [ex.answer for ex in task.test]
    torch.manual_seed(0)
    model, _ = load_pretraining_model(str(minilm_folder()))
    before = pseudo_perplexity(model.eval(), minilm_tokenizer, held_out)
    pairs = nsp_pairs(train, random.Random(0))
    gen, opt = torch.Generator().manual_seed(0), torch.optim.AdamW(model.parameters(), lr=2e-4)
    model.train()
    for step in range(30):
        batch = pretraining_batch(minilm_tokenizer, [pairs[(8 * step + i) % len(pairs)] for i in range(8)], gen)
        loss = pretraining_losses(model, batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = pseudo_perplexity(model.eval(), minilm_tokenizer, held_out)
    assert after < 0.5 * before, (before, after)
