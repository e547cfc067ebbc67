"""The three scorers of a task's metric on one split: rank classification (accuracy), greedy
generation (exact match) and perplexity, on the answer-only likelihoods of :mod:`lmas.lm.likelihood`.

Each scorer also gives its per-example outcomes (:class:`Scored`), from which the metric is recomputed and
resampled later: 1/0 per example for accuracy and exact match; the answer's NLL sum and token count per example
for perplexity (perplexity is token-weighted: ``exp(sum NLL / sum tokens)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from lmas.data.task import Example, Task
from lmas.lm.device import model_device, to_device
from lmas.lm.encoding import PromptEncoder, collate
from lmas.lm.likelihood import label_logprobs, sequence_logprobs


@dataclass
class Scored:
    """A metric on one split and its per-example outcomes (module docstring)."""

    value: float
    per_example: np.ndarray  # (N,) 1/0 for accuracy and exact match; (N, 2) NLL sum and tokens for perplexity


def rank_scored(scores: Tensor, gold: Tensor) -> Scored:
    """Rank classification from label log-likelihoods ``(N, L)`` and gold indices ``(N,)``."""
    correct = scores.argmax(-1) == gold.to(scores.device)
    return Scored(correct.float().mean().item(), correct.cpu().numpy().astype(np.uint8))


@torch.no_grad()
def rank_accuracy_scored(
    model: nn.Module, encoder: PromptEncoder, examples: Sequence[Example], labels: Sequence[str], batch_size: int = 32
) -> Scored:
    """Accuracy of rank classification: predict the label with the highest log-likelihood."""
    scores = label_logprobs(model, encoder, [ex.prompt for ex in examples], labels, batch_size)
    return rank_scored(scores, torch.tensor([list(labels).index(ex.answer) for ex in examples]))


def rank_accuracy(
    model: nn.Module, encoder: PromptEncoder, examples: Sequence[Example], labels: Sequence[str], batch_size: int = 32
) -> float:
    """Accuracy of rank classification: predict the label with the highest log-likelihood."""
    return rank_accuracy_scored(model, encoder, examples, labels, batch_size).value


@torch.no_grad()
def greedy_answers(
    model: nn.Module, encoder: PromptEncoder, prompts: Sequence[str], max_new_tokens: int = 16, batch_size: int = 32
) -> list[str]:
    """Greedy decoding of each prompt; the answer ends at EOS or at the first newline."""
    newline = encoder.tokens("\n")
    stop = [encoder.eos_id] + (newline[-1:] if newline else [])
    answers: list[str] = []
    for i in range(0, len(prompts), batch_size):
        enc = [encoder.encode_prompt(p) for p in prompts[i : i + batch_size]]
        width = max(len(e) for e in enc)
        ids = torch.full((len(enc), width), encoder.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, e in enumerate(enc):  # left padding, so every prompt ends at the same column
            ids[row, width - len(e) :] = torch.tensor(e)
            mask[row, width - len(e) :] = 1
        out = model.generate(  # type: ignore[operator]  # nn.Module types attributes as Tensor | Module
            input_ids=ids.to(model_device(model)),
            attention_mask=mask.to(model_device(model)),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop,
            pad_token_id=encoder.pad_id,
        )
        for row in out[:, width:]:
            text = encoder.tokenizer.decode(row.tolist(), skip_special_tokens=True)
            assert isinstance(text, str)  # one sequence decodes to one string
            answers.append(text.split("\n")[0].strip())
    return answers


def normalise_answer(text: str) -> str:
    """Exact-match normalisation: strip, collapse whitespace, drop a trailing full stop."""
    text = " ".join(text.strip().split())
    return text[:-1] if text.endswith(".") else text


@torch.no_grad()
def exact_match_scored(
    model: nn.Module,
    encoder: PromptEncoder,
    examples: Sequence[Example],
    max_new_tokens: int = 16,
    batch_size: int = 32,
) -> Scored:
    """Share of examples whose greedy answer equals the reference after normalisation."""
    preds = greedy_answers(model, encoder, [ex.prompt for ex in examples], max_new_tokens, batch_size)
    hits = [normalise_answer(p) == normalise_answer(ex.answer) for p, ex in zip(preds, examples, strict=True)]
    return Scored(sum(hits) / len(hits), np.array(hits, dtype=np.uint8))


def exact_match(
    model: nn.Module,
    encoder: PromptEncoder,
    examples: Sequence[Example],
    max_new_tokens: int = 16,
    batch_size: int = 32,
) -> float:
    """Share of examples whose greedy answer equals the reference after normalisation."""
    return exact_match_scored(model, encoder, examples, max_new_tokens, batch_size).value


@torch.no_grad()
def perplexity_scored(
    model: nn.Module, encoder: PromptEncoder, examples: Sequence[Example], batch_size: int = 16
) -> Scored:
    """exp(mean token NLL) over all target tokens of the examples (token-weighted)."""
    items = [encoder.encode(ex.prompt, ex.answer, eos=False) for ex in examples]
    nll, count, rows = 0.0, 0.0, []
    for i in range(0, len(items), batch_size):
        batch = to_device(collate(items[i : i + batch_size], encoder.pad_id), model_device(model))
        total, n = sequence_logprobs(model, batch)
        nll -= total.sum().item()
        count += n.sum().item()
        rows.append(torch.stack([-total, n], 1).double().cpu())
    return Scored(math.exp(nll / count), torch.cat(rows).numpy())


def perplexity(model: nn.Module, encoder: PromptEncoder, examples: Sequence[Example], batch_size: int = 16) -> float:
    """exp(mean token NLL) over all target tokens of the examples (token-weighted)."""
    return perplexity_scored(model, encoder, examples, batch_size).value


def evaluate(
    model: nn.Module,
    encoder: PromptEncoder,
    task: Task,
    split: str = "test",
    labels: Sequence[str] | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 16,
) -> float:
    """The task's metric on one split: accuracy, exact match or perplexity.

    ``labels`` overrides the label set of a classification task (class-incremental scoring).
    """
    return evaluate_scored(model, encoder, task, split, labels, batch_size, max_new_tokens).value


def evaluate_scored(
    model: nn.Module,
    encoder: PromptEncoder,
    task: Task,
    split: str = "test",
    labels: Sequence[str] | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 16,
) -> Scored:
    """:func:`evaluate` with the per-example outcomes."""
    examples = getattr(task, split)
    if not examples:
        raise ValueError(f"task {task.name!r}: the {split} split is empty, nothing to evaluate")
    was_training = model.training
    model.eval()
    try:
        if task.kind == "classification":
            return rank_accuracy_scored(model, encoder, examples, labels or task.class_labels, batch_size)
        if task.kind == "generation":
            return exact_match_scored(model, encoder, examples, max_new_tokens, batch_size)
        return perplexity_scored(model, encoder, examples, batch_size)
    finally:
        model.train(was_training)
