"""The scorers of a task's metric on one split: rank classification (accuracy), greedy generation (exact match
or ROUGE-L) and perplexity, on the answer-only likelihoods of :mod:`lmas.lm.likelihood`.

Each scorer also gives its per-example outcomes (:class:`Scored`), from which the metric is recomputed and
resampled later: 1/0 per example for accuracy and exact match; the example's ROUGE-L in ``[0, 1]`` (float32) for
ROUGE-L; the answer's NLL sum and token count per example for perplexity (perplexity is token-weighted:
``exp(sum NLL / sum tokens)``). Generation scores take the best over an example's acceptable answers
(:attr:`lmas.data.task.Example.answers`), as SuperNI's evaluation does.

ROUGE-L (:func:`rouge_l`) is SuperNI's setting, which SAPT and O-LoRA reuse: the ``rouge-score`` package's
``RougeScorer(["rougeL"], use_stemmer=True)`` with its default tokenizer (lower case, every character outside
``a-z0-9`` a separator, Porter stemming of tokens longer than 3 characters), the F-measure of the longest common
subsequence of tokens, the best over the references, the mean over examples. No other normalisation: the
tokenizer already drops case and punctuation, and those scripts score the raw prediction. The papers print it
×100; lmas keeps it in ``[0, 1]`` like accuracy, so the two pool into ``avg_acc``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lmas.data.task import Example, Task
from lmas.lm.batching import length_batches
from lmas.lm.device import model_device, to_device
from lmas.lm.encoding import PromptEncoder, collate
from lmas.lm.likelihood import label_logprobs, sequence_logprobs


@dataclass
class Scored:
    """A metric on one split and its per-example outcomes (module docstring)."""

    value: float
    per_example: np.ndarray  # (N,) 1/0 (accuracy, exact match) or ROUGE-L floats; (N, 2) NLL sum, tokens (perplexity)


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
    model: nn.Module,
    encoder: PromptEncoder,
    prompts: Sequence[str],
    max_new_tokens: int = 16,
    batch_size: int = 32,
    sample_temperature: float | None = None,
) -> list[str]:
    """Greedy decoding of each prompt; the answer ends at EOS or at the first newline.

    ``sample_temperature``: sample instead, from the whole distribution at this temperature (no top-k or
    top-p cut; torch's global random state, which the loop seeds per fit), as on-policy distillation does.
    """
    if sample_temperature is not None and sample_temperature <= 0:
        raise ValueError(f"sample_temperature={sample_temperature}: must be positive (None: greedy)")
    sampling: dict[str, Any] = {"do_sample": False}
    if sample_temperature is not None:
        sampling = {"do_sample": True, "temperature": sample_temperature, "top_k": 0, "top_p": 1.0}
    newline = encoder.tokens("\n")
    stop = [encoder.eos_id] + (newline[-1:] if newline else [])
    encoded = [encoder.encode_prompt(p) for p in prompts]
    answers = [""] * len(prompts)
    for rows in length_batches([len(e) for e in encoded], batch_size):  # prompts of similar length together
        enc = [encoded[r] for r in rows]
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
            **sampling,
            eos_token_id=stop,
            pad_token_id=encoder.pad_id,
        )
        for r, row in zip(rows, out[:, width:], strict=True):
            text = encoder.tokenizer.decode(row.tolist(), skip_special_tokens=True)
            assert isinstance(text, str)  # one sequence decodes to one string
            answers[r] = text.split("\n")[0].strip()
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
    """Share of examples whose greedy answer equals one of the acceptable answers after normalisation."""

    def hit(p: str, ex: Example) -> bool:
        return any(normalise_answer(p) == normalise_answer(a) for a in ex.answers)

    return _greedy_scored(model, encoder, examples, max_new_tokens, batch_size, hit, np.uint8)


def _greedy_scored(
    model: nn.Module,
    encoder: PromptEncoder,
    examples: Sequence[Example],
    max_new_tokens: int,
    batch_size: int,
    score: Callable[[str, Example], float],
    dtype: type,
) -> Scored:
    """The greedy answers scored one by one (``score(answer, example)``); the mean over examples."""
    preds = greedy_answers(model, encoder, [ex.prompt for ex in examples], max_new_tokens, batch_size)
    per: np.ndarray = np.array([score(p, ex) for p, ex in zip(preds, examples, strict=True)], dtype=dtype)
    return Scored(float(per.astype(np.float64).mean()), per)


@functools.cache
def _rouge_scorer():  # the package (and nltk under it) is imported on first use only
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure of ``prediction`` against the best of ``references`` (module docstring: the setting).

    ``2PR / (P + R)`` with ``P = LCS / len(prediction tokens)``, ``R = LCS / len(reference tokens)``; 0 when
    either side has no token. ``references`` must not be empty.
    """
    if not references:
        raise ValueError("rouge_l: no reference answer to score against")
    scorer = _rouge_scorer()
    return max(scorer.score(target=ref, prediction=prediction)["rougeL"].fmeasure for ref in references)


@torch.no_grad()
def rouge_l_scored(
    model: nn.Module,
    encoder: PromptEncoder,
    examples: Sequence[Example],
    max_new_tokens: int = 16,
    batch_size: int = 32,
) -> Scored:
    """Mean ROUGE-L (:func:`rouge_l`) of the greedy answers, in ``[0, 1]``; per example its ROUGE-L."""
    return _greedy_scored(
        model, encoder, examples, max_new_tokens, batch_size, lambda p, ex: rouge_l(p, ex.answers), np.float32
    )


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
    per = torch.zeros(len(items), 2, dtype=torch.float64)  # per example: NLL sum, tokens
    for rows in length_batches([len(it.ids) for it in items], batch_size):  # sequences of similar length together
        batch = to_device(collate([items[r] for r in rows], encoder.pad_id), model_device(model))
        total, n = sequence_logprobs(model, batch)
        per[rows] = torch.stack([-total, n], 1).double().cpu()
    return Scored(math.exp(per[:, 0].sum().item() / per[:, 1].sum().item()), per.numpy())


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
    """The task's metric (``task.metric``) on one split: accuracy, exact match, ROUGE-L or perplexity.

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
        if task.metric == "rouge_l":
            return rouge_l_scored(model, encoder, examples, max_new_tokens, batch_size)
        if task.kind == "generation":
            return exact_match_scored(model, encoder, examples, max_new_tokens, batch_size)
        if task.metric != "perplexity":
            raise ValueError(
                f"task {task.name!r}: metric={task.metric} is an encoder agent's masked-LM score of raw text "
                "(lmas.encoders.agents); a causal LM scores raw text by perplexity"
            )
        return perplexity_scored(model, encoder, examples, batch_size)
    finally:
        model.train(was_training)
