"""Tokenisation, answer-only log-likelihoods and the three scorers (rank, exact match, perplexity).

Every sequence is ``[start] + prompt + answer``: the answer (with a leading space, and an EOS for
generation tasks) is the only part that carries loss. The LM head is applied only at the
positions that predict an answer token: for SmolLM2 the tied 49k-token head is ~a fifth of the
model, and a prompt is usually much longer than its answer.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmas.data.task import Example, Task

IGNORE = -100

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Encoded:
    """Token ids of one sequence and the index where its target (answer) tokens start."""

    ids: tuple[int, ...]
    target_start: int


class Encoder:
    """Turns examples into token ids the same way for training and for scoring.

    Args:
        tokenizer: an HF tokenizer.
        max_length: longest sequence (``data.max_length``). Over-long examples: a prompt loses
            tokens from its *start* (the instruction and the text's beginning go first, the
            ``Answer:`` cue is kept) and the answer is kept whole; an answer that alone does not
            fit raises ``ValueError``. Raw text (empty prompt, ``lm`` tasks) longer than the window
            keeps its beginning. Each shortened example is counted in ``truncated``; the first one
            is logged as a warning.
    """

    def __init__(self, tokenizer, max_length: int = 128) -> None:
        if max_length < 8:
            raise ValueError(f"data.max_length={max_length} is too small (need >= 8)")
        self.tokenizer = tokenizer
        self.max_length = max_length
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.start_id: int = int(start)
        self.eos_id: int = int(tokenizer.eos_token_id)
        self.pad_id: int = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id)
        self.truncated = 0  # number of examples shortened so far (results: truncated_prompts)

    def tokens(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def answer_too_long(self, n_tokens: int, answer: str, where: str = "") -> ValueError:
        """The error for an answer of ``n_tokens`` that leaves no room in ``max_length``."""
        head = answer if len(answer) <= 60 else answer[:57] + "..."
        return ValueError(
            f"{where or 'example'}: the answer {head!r} alone is {n_tokens} tokens, more than the "
            f"{self.max_length - 1} that data.max_length={self.max_length} leaves after the start token; "
            f"raise data.max_length or shorten the answers"
        )

    def _count_truncation(self, what: str, before: int, after: int, where: str) -> None:
        self.truncated += 1
        if self.truncated == 1:
            log.warning(
                "%s%s of %d tokens cut to %d to fit data.max_length=%d (%s); further cuts are only "
                "counted (truncated_prompts in the results)",
                f"{where}: " if where else "", what, before, after, self.max_length,
                "its start dropped, the answer kept whole" if what == "prompt" else "its beginning kept",
            )

    def encode(self, prompt: str, answer: str, eos: bool, where: str = "") -> Encoded:
        """Encode one prompt/answer pair; ``eos`` appends EOS to the answer.

        ``where`` names the example (task, split, index) in the error and the log line.
        """
        answer_ids = self.tokens((" " + answer) if prompt else answer)
        if eos:
            answer_ids.append(self.eos_id)
        prompt_ids = self.tokens(prompt)
        room = self.max_length - 1 - len(answer_ids)
        if room < 0:
            if prompt:
                raise self.answer_too_long(len(answer_ids), answer, where)
            # raw text longer than the window: keep its beginning
            self._count_truncation("text", len(answer_ids), self.max_length - 1, where)
            answer_ids = answer_ids[: self.max_length - 1]
            room = 0
        if len(prompt_ids) > room:
            self._count_truncation("prompt", len(prompt_ids), room, where)
            prompt_ids = prompt_ids[len(prompt_ids) - room :]
        ids = [self.start_id] + prompt_ids + answer_ids
        return Encoded(tuple(ids), 1 + len(prompt_ids))

    def encode_example(self, ex: Example, kind: str, where: str = "") -> Encoded:
        return self.encode(ex.prompt, ex.answer, eos=(kind == "generation"), where=where)

    def encode_prompt(self, prompt: str) -> list[int]:
        """Prompt ids for generation, truncated from the start like :meth:`encode`."""
        ids = self.tokens(prompt)[-(self.max_length - 1) :]
        return [self.start_id] + ids


def collate(items: Sequence[Encoded], pad_id: int) -> dict[str, Tensor]:
    """Right-pad a batch. ``targets`` holds the token id at answer positions and -100 elsewhere."""
    width = max(len(it.ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    targets = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it.ids)
        ids[row, :n] = torch.tensor(it.ids)
        mask[row, :n] = 1
        targets[row, it.target_start : n] = ids[row, it.target_start : n]
    return {"input_ids": ids, "attention_mask": mask, "targets": targets}


def trunk_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The transformer body (returns hidden states) and the LM head of an HF/peft causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    trunk = getattr(base, base.base_model_prefix)
    return trunk, base.get_output_embeddings()


def answer_logits(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Logits only at the positions that predict a target (answer) token.

    Returns:
        logits: (N, V) float logits for the N target positions of the batch.
        targets: (N,) the target token ids.
        rows: (N,) the batch row of each target position.
    """
    trunk, head = trunk_and_head(model)
    hidden = trunk(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state  # (B, T, H)
    return logits_at_targets(head, hidden, batch["targets"])


def logits_at_targets(head: nn.Module, hidden: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The LM head at the positions of ``hidden`` (B, T, H) that predict a target; see :func:`answer_logits`."""
    targets = targets[:, 1:]  # (B, T-1): token t+1 is predicted at position t
    keep = targets != IGNORE  # (B, T-1)
    logits = head(hidden[:, :-1][keep]).float()  # (N, V)
    return logits, targets[keep], keep.nonzero()[:, 0]


def target_logprobs(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Log-probabilities of the target tokens, computing the head only where needed.

    Returns:
        logp: (N,) log p(target token) for the N target positions of the batch.
        rows: (N,) the batch row of each target position.
    """
    logits, tgt, rows = answer_logits(model, batch)  # (N, V), (N,), (N,)
    logp = logits.log_softmax(-1).gather(1, tgt[:, None]).squeeze(1)  # (N,)
    return logp, rows


def answer_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean negative log-likelihood over all answer tokens of the batch (the task loss)."""
    logp, _ = target_logprobs(model, batch)
    return -logp.mean()


def sequence_logprobs(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Per-row sum of target log-probs (B,) and per-row number of target tokens (B,)."""
    logp, rows = target_logprobs(model, batch)
    n_rows = batch["input_ids"].shape[0]
    total = torch.zeros(n_rows, dtype=logp.dtype, device=logp.device).index_add_(0, rows, logp)
    count = torch.zeros(n_rows, dtype=logp.dtype, device=logp.device).index_add_(0, rows, torch.ones_like(logp))
    return total, count


def mixed_adapters(model: nn.Module, adapter_names: Sequence[str] | None):
    """Context in which each batch row of ``model``'s trunk uses its own peft adapter.

    ``adapter_names`` has one adapter name per row (peft's mixed-adapter batches; eval mode
    only). ``None``: the active adapters, as usual.
    """
    if adapter_names is None:
        return nullcontext()
    if model.training:
        raise ValueError("mixed-adapter batches work in eval mode only (call model.eval())")
    return model.base_model._enable_peft_forward_hooks(adapter_names=list(adapter_names))


def label_logprobs(
    model: nn.Module,
    encoder: Encoder,
    prompts: Sequence[str],
    labels: Sequence[str],
    batch_size: int = 32,
    adapter_names: Sequence[str] | None = None,
    grad: bool = False,
) -> Tensor:
    """Log-likelihood of every label after every prompt: (len(prompts), len(labels)).

    Each prompt runs once; its KV cache is shared by all labels, so a K-label task costs about
    one prompt pass plus K short label passes instead of K full passes. Prompts are left-padded
    with explicit positions, so the scores equal those of separate ``[start] + prompt + label``
    sequences up to float rounding (prompts are truncated for the longest label).

    ``adapter_names`` (one per prompt) scores each prompt with its own peft adapter in one
    mixed batch (:func:`mixed_adapters`); the LM head must not carry LoRA then. ``grad=True``
    keeps the autograd graph (a student's label distribution in distillation).
    """
    with torch.set_grad_enabled(grad):
        return _label_logprobs(model, encoder, prompts, labels, batch_size, adapter_names)


def _label_logprobs(model, encoder, prompts, labels, batch_size, adapter_names) -> Tensor:
    if adapter_names is not None and len(adapter_names) != len(prompts):
        raise ValueError(f"label_logprobs: {len(adapter_names)} adapter names for {len(prompts)} prompts")
    trunk, head = trunk_and_head(model)
    label_ids = [encoder.tokens(" " + lab) for lab in labels]
    n_lab, lab_w = len(label_ids), max(len(t) for t in label_ids)
    if lab_w > encoder.max_length - 1:
        i = max(range(n_lab), key=lambda k: len(label_ids[k]))
        raise encoder.answer_too_long(lab_w, labels[i], "label")
    lab = torch.full((n_lab, lab_w), encoder.pad_id, dtype=torch.long)  # (L, W)
    lab_mask = torch.zeros_like(lab)
    for i, t in enumerate(label_ids):
        lab[i, : len(t)] = torch.tensor(t)
        lab_mask[i, : len(t)] = 1
    room = encoder.max_length - lab_w
    scores = []
    for i in range(0, len(prompts), batch_size):
        enc = [encoder.encode_prompt(p)[-room:] for p in prompts[i : i + batch_size]]
        b, width = len(enc), max(len(e) for e in enc)
        ids = torch.full((b, width), encoder.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, e in enumerate(enc):  # left padding: every prompt ends in the last column
            ids[row, width - len(e) :] = torch.tensor(e)
            mask[row, width - len(e) :] = 1
        pos = (mask.cumsum(1) - 1).clamp(min=0)  # (B, P)
        names = None if adapter_names is None else list(adapter_names[i : i + batch_size])
        with mixed_adapters(model, names):
            out = trunk(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        first = head(out.last_hidden_state[:, -1]).float().log_softmax(-1)  # (B, V): predicts label token 0
        total = first[:, lab[:, 0]]  # (B, L)
        if lab_w > 1:
            cache = out.past_key_values
            cache.batch_repeat_interleave(n_lab)  # (B*L, ...) rows ordered prompt-major
            lab_in = lab.repeat(b, 1)  # (B*L, W)
            att = torch.cat([mask.repeat_interleave(n_lab, 0), lab_mask.repeat(b, 1)], 1)  # (B*L, P+W)
            lab_pos = pos[:, -1:].repeat_interleave(n_lab, 0) + 1 + torch.arange(lab_w)  # (B*L, W)
            with mixed_adapters(model, None if names is None else [n for n in names for _ in range(n_lab)]):
                h = trunk(input_ids=lab_in, attention_mask=att, position_ids=lab_pos, past_key_values=cache,
                          use_cache=True).last_hidden_state  # (B*L, W, H)
            nxt = lab_in[:, 1:]  # (B*L, W-1): token k+1 is predicted at label position k
            keep = lab_mask.repeat(b, 1)[:, 1:].bool()
            logp = head(h[:, :-1][keep]).float().log_softmax(-1).gather(1, nxt[keep][:, None]).squeeze(1)
            rest = torch.zeros(b * n_lab).index_add_(0, keep.nonzero()[:, 0], logp)
            total = total + rest.view(b, n_lab)
        scores.append(total)
    return torch.cat(scores)


@torch.no_grad()
def rank_accuracy(
    model: nn.Module, encoder: Encoder, examples: Sequence[Example], labels: Sequence[str], batch_size: int = 32
) -> float:
    """Accuracy of rank classification: predict the label with the highest log-likelihood."""
    scores = label_logprobs(model, encoder, [ex.prompt for ex in examples], labels, batch_size)
    gold = torch.tensor([list(labels).index(ex.answer) for ex in examples])
    return (scores.argmax(1) == gold).float().mean().item()


@torch.no_grad()
def greedy_answers(
    model: nn.Module, encoder: Encoder, prompts: Sequence[str], max_new_tokens: int = 16, batch_size: int = 32
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
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop,
            pad_token_id=encoder.pad_id,
        )
        for row in out[:, width:]:
            text = encoder.tokenizer.decode(row.tolist(), skip_special_tokens=True)
            answers.append(text.split("\n")[0].strip())
    return answers


def normalise_answer(text: str) -> str:
    """Exact-match normalisation: strip, collapse whitespace, drop a trailing full stop."""
    text = " ".join(text.strip().split())
    return text[:-1] if text.endswith(".") else text


@torch.no_grad()
def exact_match(
    model: nn.Module, encoder: Encoder, examples: Sequence[Example], max_new_tokens: int = 16, batch_size: int = 32
) -> float:
    """Share of examples whose greedy answer equals the reference after normalisation."""
    preds = greedy_answers(model, encoder, [ex.prompt for ex in examples], max_new_tokens, batch_size)
    hits = [normalise_answer(p) == normalise_answer(ex.answer) for p, ex in zip(preds, examples)]
    return sum(hits) / len(hits)


@torch.no_grad()
def perplexity(model: nn.Module, encoder: Encoder, examples: Sequence[Example], batch_size: int = 16) -> float:
    """exp(mean token NLL) over all target tokens of the examples (token-weighted)."""
    items = [encoder.encode(ex.prompt, ex.answer, eos=False) for ex in examples]
    nll, count = 0.0, 0.0
    for i in range(0, len(items), batch_size):
        total, n = sequence_logprobs(model, collate(items[i : i + batch_size], encoder.pad_id))
        nll -= total.sum().item()
        count += n.sum().item()
    return math.exp(nll / count)


def evaluate(
    model: nn.Module,
    encoder: Encoder,
    task: Task,
    split: str = "test",
    labels: Sequence[str] | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 16,
) -> float:
    """The task's metric on one split: accuracy, exact match or perplexity.

    ``labels`` overrides the label set of a classification task (class-incremental scoring).
    """
    examples = getattr(task, split)
    if not examples:
        raise ValueError(f"task {task.name!r}: the {split} split is empty, nothing to evaluate")
    was_training = model.training
    model.eval()
    try:
        if task.kind == "classification":
            return rank_accuracy(model, encoder, examples, labels or task.labels, batch_size)
        if task.kind == "generation":
            return exact_match(model, encoder, examples, max_new_tokens, batch_size)
        return perplexity(model, encoder, examples, batch_size)
    finally:
        model.train(was_training)
