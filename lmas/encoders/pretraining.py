"""Self-supervised objectives of BERT-style encoders: masked language modelling (MLM) and next-sentence prediction
(NSP), as the system description writes them (Devlin et al. 2019), with their metrics.

* :func:`mlm_mask`: each non-special token is selected with probability 0.15; a selected token is replaced by
  ``[MASK]`` with probability 0.8, by a random token of the vocabulary with probability 0.1, and kept with
  probability 0.1; the labels hold the original token at selected positions and -100 elsewhere.
* :func:`nsp_pairs`: for each pair of consecutive sentences (a, b) of a raw text, with probability ½ the pair
  itself (label 0, IsNext) and otherwise (a, a sentence of another text) (label 1, NotNext), BERT's labels.
* :func:`pretraining_losses`: the MLM cross-entropy over the selected positions and the NSP cross-entropy,
  with the MLM head applied at the selected positions only (the same values as Hugging Face's
  ``BertForPreTraining`` loss, which scores every position; tested).
* :func:`pseudo_perplexity` (Salazar et al. 2020): ``exp(-mean_i log p(w_i | the text with w_i masked))`` over
  every non-special token, one masked copy per token; :func:`masked_scores` gives it per text, with the tokens
  the head recovers (an encoder agent's ``pseudo_perplexity`` and ``masked_accuracy`` metrics);
  :func:`masked_token_accuracy` on a masked batch.
* :class:`PretrainingHeads`: an encoder agent's own MLM and NSP heads (the functions above take them, or the
  heads of a ``BertForPreTraining``).

:func:`load_pretraining_model` loads an encoder folder as ``BertForPreTraining``. The packaged
all-MiniLM-L6-v2 ships a bare ``BertModel``: its MLM head (transform and bias) and NSP classifier are
initialised here (the MLM decoder's weight is tied to the word embeddings), and the returned list says which.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE = -100
MLM_PROBABILITY = 0.15
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # of the selected tokens; the remaining 0.1 are kept
IS_NEXT, NOT_NEXT = 0, 1  # BERT's next-sentence labels
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def mlm_mask(
    input_ids: Tensor,
    special: Tensor,
    vocab_size: int,
    mask_id: int,
    generator: torch.Generator,
    probability: float = MLM_PROBABILITY,
) -> tuple[Tensor, Tensor]:
    """BERT's masking of ``input_ids`` (B, T): returns ``(inputs, labels)``.

    ``special`` (B, T, bool): positions never selected ([CLS], [SEP], padding). Draws come from ``generator``.
    """
    if not 0.0 < probability < 1.0:
        raise ValueError(f"mlm probability={probability}: must be in (0, 1)")
    if special.shape != input_ids.shape:
        raise ValueError(f"mlm_mask: special {tuple(special.shape)} and input_ids {tuple(input_ids.shape)} differ")
    select = (torch.rand(input_ids.shape, generator=generator) < probability) & ~special.bool()
    how = torch.rand(input_ids.shape, generator=generator)
    inputs = input_ids.clone()
    inputs[select & (how < MASK_SHARE)] = mask_id
    swap = select & (how >= MASK_SHARE) & (how < MASK_SHARE + RANDOM_SHARE)
    inputs[swap] = torch.randint(vocab_size, input_ids.shape, generator=generator)[swap]
    labels = torch.where(select, input_ids, torch.full_like(input_ids, IGNORE))
    return inputs, labels


def sentences(text: str) -> list[str]:
    """A raw text cut into sentences (after ``.``, ``!`` or ``?`` and white space); empty pieces dropped."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def nsp_pairs(texts: Sequence[str], rng: random.Random) -> list[tuple[str, str, int]]:
    """Next-sentence pairs ``(a, b, label)`` from consecutive sentences of each text (module docstring).

    A NotNext ``b`` is a sentence drawn from another text. Needs two texts with a sentence each and one text
    with two sentences (else ``ValueError``).
    """
    docs = [sentences(t) for t in texts]
    if sum(1 for d in docs if d) < 2 or not any(len(d) >= 2 for d in docs):
        raise ValueError(
            "next-sentence pairs need at least two texts and one text of two sentences or more "
            f"(got {len(texts)} texts, sentences per text {[len(d) for d in docs]})"
        )
    pairs = []
    for i, doc in enumerate(docs):
        for a, b in zip(doc, doc[1:], strict=False):
            if rng.random() < 0.5:
                pairs.append((a, b, IS_NEXT))
            else:
                j = rng.choice([k for k, d in enumerate(docs) if d and k != i])
                pairs.append((a, rng.choice(docs[j]), NOT_NEXT))
    return pairs


def pretraining_batch(
    tokenizer: Any,
    pairs: Sequence[tuple[str, str, int]],
    generator: torch.Generator,
    max_length: int = 128,
    probability: float = MLM_PROBABILITY,
) -> dict[str, Tensor]:
    """Tokenised, masked sentence pairs: ``input_ids`` (masked), ``token_type_ids``, ``attention_mask``,
    ``labels`` (MLM targets, -100 elsewhere) and ``next_sentence_label`` (B,)."""
    enc = tokenizer(
        [a for a, _, _ in pairs],
        [b for _, b, _ in pairs],
        truncation=True,
        max_length=max_length,
        padding=True,
        return_special_tokens_mask=True,
        return_tensors="pt",
    )
    special = enc.pop("special_tokens_mask").bool() | (enc["attention_mask"] == 0)
    vocab, mask_id = len(tokenizer), tokenizer.mask_token_id
    inputs, labels = mlm_mask(enc["input_ids"], special, vocab, mask_id, generator, probability)
    return {
        "input_ids": inputs,
        "token_type_ids": enc["token_type_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": labels,
        "next_sentence_label": torch.tensor([lab for _, _, lab in pairs], dtype=torch.long),
    }


class PretrainingHeads(nn.Module):
    """BERT's MLM and NSP heads for a bare encoder (an encoder agent's own, :mod:`lmas.encoders.agents`).

    :meth:`predictions`: the transform (dense, the encoder's activation, LayerNorm), then the decoder, whose weight
    is the encoder's word embeddings (tied: shared and not a parameter of these heads), plus a bias per token.
    :meth:`seq_relationship`: the NSP classifier on the pooled [CLS] output. Initialised as BERT initialises
    them (normal weights with the config's ``initializer_range``, zero biases, unit LayerNorm), from ``seed``.
    The method names are those of Hugging Face's ``BertPreTrainingHeads``: the functions below take either.
    """

    def __init__(self, config: Any, embeddings: nn.Embedding, seed: int = 0) -> None:
        from transformers.activations import ACT2FN

        super().__init__()
        hidden, vocab = int(config.hidden_size), int(embeddings.weight.shape[0])
        self.dense = nn.Linear(hidden, hidden)
        self.act = ACT2FN[config.hidden_act] if isinstance(config.hidden_act, str) else config.hidden_act
        self.norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(vocab))
        self.nsp = nn.Linear(hidden, 2)
        self._tied = (embeddings,)  # a tuple: not registered, so not trained, saved or counted here
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in (self.dense, self.nsp):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * config.initializer_range)
                layer.bias.zero_()

    def predictions(self, hidden: Tensor) -> Tensor:
        """Token logits ``(..., vocab)`` of hidden states ``(..., hidden)``."""
        return F.linear(self.norm(self.act(self.dense(hidden))), self._tied[0].weight, self.bias)

    def seq_relationship(self, pooled: Tensor) -> Tensor:
        """IsNext/NotNext logits ``(B, 2)`` of pooled outputs ``(B, hidden)``."""
        return self.nsp(pooled)


def _parts(model: nn.Module, heads: Any = None) -> tuple[Any, Any]:
    """The encoder body and the heads: ``(model, heads)`` when heads are given (an encoder agent: ``model`` its
    peft-wrapped ``BertModel``), else the ``bert`` body and ``cls`` heads of a ``BertForPreTraining``."""
    if heads is not None:
        return model, heads
    get_base: Any = getattr(model, "get_base_model", None)
    base: Any = get_base() if get_base is not None else model
    if not (hasattr(base, "bert") and hasattr(base, "cls")):
        raise TypeError(f"{type(base).__name__} is not a BertForPreTraining (needs .bert and .cls heads)")
    return base.bert, base.cls


def _encode(bert: Any, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
    """Last hidden states and the pooled output (None for an encoder without a pooler)."""
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    out = bert(**kwargs)
    return out.last_hidden_state, getattr(out, "pooler_output", None)


def pretraining_losses(model: nn.Module, batch: dict[str, Tensor], heads: Any = None) -> dict[str, Tensor]:
    """``{"mlm", "nsp", "loss" = mlm + nsp}``: cross-entropies of the masked tokens and of the NSP labels.

    ``heads``: an encoder agent's :class:`PretrainingHeads` on ``model`` (else ``model`` is a ``BertForPreTraining``).
    """
    bert, heads = _parts(model, heads)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    hidden, pooled = _encode(bert, batch)
    if pooled is None:
        raise ValueError("next-sentence prediction needs the encoder's pooled [CLS] output; this encoder has no pooler")
    masked = batch["labels"] != IGNORE
    if not masked.any():
        raise ValueError("pretraining_losses: the batch has no masked token (too short, or probability too low)")
    mlm = F.cross_entropy(heads.predictions(hidden[masked]), batch["labels"][masked])
    nsp = F.cross_entropy(heads.seq_relationship(pooled), batch["next_sentence_label"])
    return {"mlm": mlm, "nsp": nsp, "loss": mlm + nsp}


@torch.no_grad()
def masked_token_accuracy(model: nn.Module, batch: dict[str, Tensor], heads: Any = None) -> float:
    """The share of masked positions whose original token is the MLM head's argmax."""
    bert, heads = _parts(model, heads)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    hidden, _ = _encode(bert, batch)
    masked = batch["labels"] != IGNORE
    return (heads.predictions(hidden[masked]).argmax(-1) == batch["labels"][masked]).float().mean().item()


@torch.no_grad()
def masked_scores(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int = 128,
    batch_size: int = 64,
    heads: Any = None,
) -> np.ndarray:
    """Per text ``(N, 3)``: the NLL sum of its tokens each masked once in its own copy, the token count, and the
    tokens the MLM head's argmax recovers (non-special tokens of the first ``max_length``; a text with none gets
    zeros). :func:`pseudo_perplexity` and the masked accuracy pool them token-weighted."""
    bert, heads = _parts(model, heads)
    device = next(model.parameters()).device
    copies: list[tuple[list[int], int, int, int]] = []  # (ids with one token masked, position, the token, its text)
    for n, text in enumerate(texts):
        enc = tokenizer(text, truncation=True, max_length=max_length, return_special_tokens_mask=True)
        ids, special = enc["input_ids"], enc["special_tokens_mask"]
        for pos, (tok, sp) in enumerate(zip(ids, special, strict=True)):
            if not sp:
                masked = list(ids)
                masked[pos] = tokenizer.mask_token_id
                copies.append((masked, pos, tok, n))
    out = np.zeros((len(texts), 3))
    for i in range(0, len(copies), batch_size):
        part = copies[i : i + batch_size]
        width = max(len(ids) for ids, _, _, _ in part)
        ids = torch.full((len(part), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (row, _, _, _) in enumerate(part):
            ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
        hidden, _ = _encode(bert, {"input_ids": ids.to(device), "attention_mask": mask.to(device)})  # (B, T, H)
        rows = torch.arange(len(part), device=device)
        at = hidden[rows, torch.tensor([p for _, p, _, _ in part], device=device)]  # (B, H): the masked positions
        logp = heads.predictions(at).float().log_softmax(-1)  # (B, V)
        gold = torch.tensor([t for _, _, t, _ in part], device=device)
        nll, hit = (-logp[rows, gold]).double().cpu().numpy(), (logp.argmax(-1) == gold).double().cpu().numpy()
        which = np.array([n for _, _, _, n in part])
        for col, value in enumerate((nll, np.ones_like(nll), hit)):
            out[:, col] += np.bincount(which, weights=value, minlength=len(texts))
    return out


def pseudo_perplexity(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int = 128,
    batch_size: int = 64,
    heads: Any = None,
) -> float:
    """Pseudo-perplexity of ``texts`` (module docstring): every non-special token masked once, in its own copy."""
    scores = masked_scores(model, tokenizer, texts, max_length, batch_size, heads)
    if not scores[:, 1].sum():
        raise ValueError("pseudo_perplexity: the texts have no token to score")
    return math.exp(scores[:, 0].sum() / scores[:, 1].sum())


def load_pretraining_model(folder: str) -> tuple[nn.Module, list[str]]:
    """A ``BertForPreTraining`` from an encoder folder, and the names of the head parameters initialised here.

    Raises ``ValueError`` naming the folder when it holds no BERT encoder.
    """
    from transformers import AutoConfig, BertForPreTraining

    config = AutoConfig.from_pretrained(folder)
    if config.model_type != "bert":
        raise ValueError(f"{folder}: model_type {config.model_type!r}; MLM/NSP pretraining needs a BERT encoder")
    loaded: Any = BertForPreTraining.from_pretrained(folder, output_loading_info=True)
    model, info = loaded
    fresh = sorted(info["missing_keys"])
    outside = [k for k in fresh if not k.startswith("cls.")]
    if outside:
        raise ValueError(f"{folder}: encoder weights missing from the checkpoint: {outside[:5]}")
    return model, fresh
