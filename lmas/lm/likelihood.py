"""Answer-only log-likelihoods of a causal LM (the scorers built on them: :mod:`lmas.evaluation.scoring`).

Every sequence is ``head + prompt + tail + answer`` (:class:`lmas.lm.encoding.PromptEncoder`;
``plain``: ``[start] + prompt + " " + answer``, ``chat``: the tokenizer's chat template); the answer
is the only part that carries loss, and only the prompt is ever cut. The LM head is applied only at the
positions that predict an answer token: for SmolLM2 the tied 49k-token head is ~a fifth of the
model, and a prompt is usually much longer than its answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from lmas.lm.batching import label_targets, label_tree, length_batches
from lmas.lm.device import model_device, to_device
from lmas.lm.encoding import IGNORE, PromptEncoder

if TYPE_CHECKING:
    from peft import LoraModel, PeftModel
    from transformers import PreTrainedModel


def causal_lm(model: nn.Module) -> PreTrainedModel:
    """The HF causal LM of ``model``: a peft model's base model, else ``model`` itself."""
    get_base_model = getattr(model, "get_base_model", None)
    return cast("PreTrainedModel", get_base_model() if get_base_model is not None else model)


def trunk_and_head(model: nn.Module) -> tuple[Any, nn.Module]:
    """The transformer body (returns hidden states; its submodules vary by model) and the LM head of an
    HF/peft causal LM."""
    base = causal_lm(model)
    return getattr(base, base.base_model_prefix), base.get_output_embeddings()


def answer_logits(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Logits only at the positions that predict a target (answer) token.

    Returns:
        logits: (N, V) float logits for the N target positions of the batch.
        targets: (N,) the target token ids.
        rows: (N,) the batch row of each target position.

    A batch built on the CPU (:func:`collate`) is moved to the model's device first.
    """
    trunk, head = trunk_and_head(model)
    batch = to_device({k: batch[k] for k in ("input_ids", "attention_mask", "targets")}, model_device(model))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    hidden = trunk(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (B, T, H); no KV cache
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


def mixed_adapters(model: nn.Module, adapter_names: Sequence[str] | None) -> AbstractContextManager:
    """Context in which each batch row of ``model``'s trunk uses its own peft adapter.

    ``adapter_names`` has one adapter name per row (peft's mixed-adapter batches; eval mode
    only). ``None``: the active adapters, as usual.
    """
    if adapter_names is None:
        return nullcontext()
    if model.training:
        raise ValueError("mixed-adapter batches work in eval mode only (call model.eval())")
    lora = cast("LoraModel", cast("PeftModel", model).base_model)  # mixed batches need a peft LoRA model
    return lora._enable_peft_forward_hooks(adapter_names=list(adapter_names))


def label_logprobs(
    model: nn.Module,
    encoder: PromptEncoder,
    prompts: Sequence[str],
    labels: Sequence[str],
    batch_size: int = 32,
    adapter_names: Sequence[str] | None = None,
    grad: bool = False,
) -> Tensor:
    """Log-likelihood of every label after every prompt: (len(prompts), len(labels)).

    Each prompt runs once, with every label's tokens after it in the same pass
    (:func:`lmas.lm.batching.label_tree`: each label sees the prompt and its own earlier tokens
    only), so a K-label task costs one pass of the prompt plus the labels' tokens instead of K
    full passes, and the head runs only where a label token is predicted. Prompts are batched by
    length (:func:`lmas.lm.batching.length_batches`; the result keeps the order of ``prompts``), so
    the score of a label equals the answer log-likelihood of its training encoding
    ``encoder.encode(prompt, label)`` up to float rounding; a prompt too long for its longest
    label is scored once per label length (:func:`by_label_length`), so it is cut exactly as
    training cuts it for each label.

    ``adapter_names`` (one per prompt) scores each prompt with its own peft adapter in one
    mixed batch (:func:`mixed_adapters`); the LM head must not carry LoRA then. ``grad=True``
    keeps the autograd graph (a student's label distribution in distillation).
    """
    if adapter_names is not None and len(adapter_names) != len(prompts):
        raise ValueError(f"label_logprobs: {len(adapter_names)} adapter names for {len(prompts)} prompts")
    label_ids = label_tokens(encoder, labels)

    def score(rows: list[int], cols: list[int]) -> Tensor:
        names = None if adapter_names is None else [adapter_names[r] for r in rows]
        return _label_logprobs(
            model, encoder, [prompts[r] for r in rows], [label_ids[c] for c in cols], batch_size, names
        )

    with torch.set_grad_enabled(grad):
        return by_label_length(encoder, prompts, label_ids, score)


def label_tokens(encoder: PromptEncoder, labels: Sequence[str]) -> list[list[int]]:
    """Each label's answer ids (:meth:`PromptEncoder.answer_tokens`); raises for a label that cannot fit."""
    label_ids = [encoder.answer_tokens(lab) for lab in labels]
    i = max(range(len(label_ids)), key=lambda k: len(label_ids[k]))
    if len(label_ids[i]) > encoder.max_length - encoder.format_length:
        raise encoder.answer_too_long(len(label_ids[i]), labels[i], "label")
    return label_ids


def by_label_length(
    encoder: PromptEncoder,
    prompts: Sequence[str],
    label_ids: Sequence[Sequence[int]],
    score: Callable[[list[int], list[int]], Tensor],
) -> Tensor:
    """``score(rows, cols)`` (a tensor ``(..., len(rows), len(cols))``) over all prompts and labels.

    Prompts that fit before the longest label are scored with all labels at once; a prompt that
    must be cut is scored once per label length ``n`` with room ``max_length - n``, as
    :meth:`PromptEncoder.encode` cuts it for a label of ``n`` tokens. Returns ``(..., P, L)``.
    """
    lengths = [len(t) for t in label_ids]
    all_cols = list(range(len(label_ids)))
    room = encoder.max_length - max(lengths)
    cut = [r for r, p in enumerate(prompts) if encoder.prompt_length(p) > room] if len(set(lengths)) > 1 else []
    if not cut:
        return score(list(range(len(prompts))), all_cols)
    cut_rows = set(cut)
    fits = [r for r in range(len(prompts)) if r not in cut_rows]
    parts = [(fits, all_cols, score(fits, all_cols))] if fits else []
    for n in sorted(set(lengths)):
        cols = [c for c in all_cols if lengths[c] == n]
        parts.append((cut, cols, score(cut, cols)))
    first = parts[0][2]
    out = first.new_zeros(*first.shape[:-2], len(prompts), len(label_ids))
    for rows, cols, part in parts:
        r = torch.tensor(rows, device=out.device)[:, None]
        out[..., r, torch.tensor(cols, device=out.device)] = part
    return out


def _label_logprobs(
    model: nn.Module,
    encoder: PromptEncoder,
    prompts: Sequence[str],
    label_ids: Sequence[Sequence[int]],
    batch_size: int,
    adapter_names: Sequence[str] | None,
) -> Tensor:
    """Every label after every prompt in one pass per batch (:func:`lmas.lm.batching.label_tree`).

    Prompts are grouped by length (:func:`lmas.lm.batching.length_batches`) and the scores put back
    in the order of ``prompts``. Each label token but the last is an input once per prompt; the
    prompt's last position predicts every label's first token.
    """
    trunk, head = trunk_and_head(model)
    device = model_device(model)  # tensors are built on the CPU and moved here once
    dtype = trunk.get_input_embeddings().weight.dtype  # the additive mask's
    room = encoder.max_length - max(len(t) for t in label_ids)
    enc = [encoder.encode_prompt(p, room) for p in prompts]  # cut only in the body, as training cuts it
    inputs = [list(lab[:-1]) for lab in label_ids]
    rel, tgt, owner = label_targets(label_ids)
    first_ids = torch.tensor([lab[0] for lab in label_ids], device=device)
    tgt_t, owner_t = torch.tensor(tgt, dtype=torch.long, device=device), torch.tensor(owner, device=device)
    rel_t = torch.tensor(rel, dtype=torch.long, device=device)
    batches = length_batches([len(e) for e in enc], batch_size)
    scores = []
    for rows in batches:
        part = [enc[r] for r in rows]
        ids, allowed, pos = label_tree(part, inputs, encoder.pad_id)  # (B, T), (B, T, T), (B, T)
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
        ids, pos, mask = ids.to(device), pos.to(device), mask.to(device)
        n = torch.tensor([len(e) for e in part], device=device)  # prompt lengths
        names = None if adapter_names is None else [adapter_names[r] for r in rows]
        with mixed_adapters(model, names):
            h = trunk(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
        at = torch.arange(len(part), device=device)
        total = head(h[at, n - 1]).float().log_softmax(-1)[:, first_ids]  # (B, L): every label's first token
        if rel:
            idx = (n[:, None] + rel_t[None, :])[:, :, None].expand(-1, -1, h.shape[-1])  # (B, C, H)
            logp = head(h.gather(1, idx)).float().log_softmax(-1)  # (B, C, V)
            logp = logp.gather(2, tgt_t[None, :, None].expand(len(part), -1, 1)).squeeze(2)  # (B, C)
            total = total.index_add(1, owner_t, logp)
        scores.append(total)
    order = torch.tensor([r for rows in batches for r in rows], device=device)
    return torch.cat(scores)[torch.argsort(order)]  # back in the order of `prompts`
