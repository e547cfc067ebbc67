"""A shared frozen trunk: the decoder layers below every LoRA adapter, computed once.

When LoRA sits only in the top ``k`` of ``L`` decoder layers (``population.lora.layers_to_transform``),
layers ``0 .. L-k-1`` (and the token embedding) are the same function for every agent and never
change: the base is frozen. :class:`SharedTrunk` splits the decoder at ``split = L - k`` (the lowest
layer that holds a LoRA module of any adapter):

* :meth:`SharedTrunk.bottom` runs the embedding and layers ``0 .. split-1`` (no adapter involved,
  no autograd graph) and returns the hidden states entering layer ``split``;
* :meth:`SharedTrunk.top` runs layers ``split .. L-1`` with whatever adapters are active, then the
  final norm: the same last hidden states as the model's own trunk.

Two uses:

* evaluation of N agents (:func:`shared_label_logprobs`): the bottom runs once per batch of prompts,
  the top once per agent: ``split + N·k`` layer passes instead of ``N·L``;
* training (:meth:`SharedTrunk.cached_bottom`, ``train.trunk_cache``): the bottom's output is kept per
  example (keyed by its token ids, so the per-epoch reshuffling and other agents training on the
  same examples hit it), so later epochs and later agents run only the top layers. A right-padded
  example's hidden states do not depend on the rest of its batch (causal attention, padding last),
  so batches are re-collated from per-example entries.

With a disk cache (``eval.cache``: :class:`lmas.lm.diskcache.DiskCache`), per-example entries are also
kept on disk for every run and process of a sweep: training examples (second level behind the in-memory
cache) and evaluation prompts (each prompt's label tree, :func:`lmas.lm.batching.label_tree`), so evaluation of
one agent goes through the trunk too and a later run computes only the top layers.

Supported: decoder-only HF models built like Llama (``model.embed_tokens``, ``model.layers``,
``model.norm``, ``model.rotary_emb``, full causal attention in every layer; SmolLM2, Llama, the tiny
test model). Anything the bottom would change refuses with a :class:`TrunkError`: a LoRA module in
a cached layer or outside the decoder layers, a trainable base parameter there (SeqFT), attention
dropout while training.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from lmas.lm import diskcache
from lmas.lm.batching import label_targets, label_tree, length_batches
from lmas.lm.device import model_device
from lmas.lm.encoding import PromptEncoder
from lmas.lm.likelihood import by_label_length, causal_lm, label_tokens, logits_at_targets, trunk_and_head

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class TrunkError(ValueError):
    """The model or its adapters do not allow sharing the bottom layers."""


class SharedTrunk(diskcache.RowCache):
    """The frozen layers below the lowest LoRA layer of ``model``, computed once and cached.

    Args:
        model: the population's peft model (or a plain HF causal LM).
        split: first decoder layer that runs per agent (default: the lowest layer holding a LoRA
            module of any adapter). Every LoRA module must sit in a layer ``>= split``.
        max_cache_mb: size limit of the per-example cache of :meth:`cached_bottom`; the oldest
            entries go first when it is full.
        disk: a :class:`lmas.lm.diskcache.DiskCache` (``eval.cache``): the second level of the
            per-example cache, shared by every run and process of a sweep; evaluation uses it too.
    """

    def __init__(
        self,
        model: nn.Module,
        split: int | None = None,
        max_cache_mb: float = 2048.0,
        disk: diskcache.DiskCache | None = None,
    ) -> None:
        self.model = model
        self.body, self.head = trunk_and_head(model)
        base = causal_lm(model)
        missing = [a for a in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(self.body, a)]
        mask_fn = getattr(sys.modules[type(self.body).__module__], "create_causal_mask", None)
        if missing or mask_fn is None:
            raise TrunkError(
                f"{type(base).__name__}: a shared trunk needs a Llama-style decoder "
                f"(embed_tokens, layers, norm, rotary_emb, create_causal_mask); missing "
                f"{', '.join(missing) or 'create_causal_mask'}"
            )
        self._mask_fn: Callable[..., Tensor | None] = mask_fn
        config = self.body.config
        kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"}:
            raise TrunkError(
                f"{type(base).__name__}: a shared trunk supports full causal attention in every "
                f"layer; this model has {sorted(kinds)}"
            )
        self.n_layers = len(self.body.layers)
        lowest = self._lowest_lora_layer()
        self.split = lowest if split is None else split
        if not 0 < self.split < self.n_layers:
            raise TrunkError(
                f"shared trunk: split={self.split} must be in 1..{self.n_layers - 1} "
                f"(LoRA restricted to the top layers: population.lora.layers_to_transform)"
            )
        self._adapters: frozenset[str] | None = None
        self.check()
        super().__init__(max_cache_mb, disk, lambda: model_device(model))

    # --- checks ----------------------------------------------------------------------------
    def _lora_layers(self) -> dict[str, set[int]]:
        """Decoder layer indices holding LoRA modules, per adapter name; raises for LoRA outside them."""
        from peft.tuners.lora import LoraLayer

        layers: dict[str, set[int]] = {}
        for name, module in self.model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            adapters = set(module.lora_A) | set(getattr(module, "lora_embedding_A", {}))
            if not adapters:
                continue
            m = _LAYER.search(name)
            if m is None:
                raise TrunkError(
                    f"shared trunk: adapter(s) {sorted(adapters)} put LoRA on {name}, outside the "
                    f"decoder layers; the trunk can only share layers below every LoRA module"
                )
            for a in adapters:
                layers.setdefault(a, set()).add(int(m.group(1)))
        return layers

    def _lowest_lora_layer(self) -> int:
        layers = self._lora_layers()
        return min((min(v) for v in layers.values()), default=self.n_layers)

    def check(self, training: bool = False) -> None:
        """Raise :class:`TrunkError` if anything below ``split`` is not the same frozen function.

        Checked: no adapter has a LoRA module in layers ``< split`` (re-checked whenever the set of
        adapters changes), no embedding or bottom-layer parameter is trainable, and (``training``)
        no attention dropout.
        """
        adapters = frozenset(getattr(self.model, "peft_config", {}) or {})
        if adapters != self._adapters:
            bad = {a: {i for i in v if i < self.split} for a, v in self._lora_layers().items()}
            bad = {a: v for a, v in bad.items() if v}
            if bad:
                names = ", ".join(repr(a) for a in sorted(bad))
                v = sorted(set().union(*bad.values()))
                raise TrunkError(
                    f"shared trunk: adapter(s) {names} have LoRA modules in layer(s) {v}, below the shared layers' "
                    f"end (layers 0..{self.split - 1} are computed once for every agent and cached); restrict "
                    f"LoRA to layers >= {self.split} (population.lora.layers_to_transform) or turn the trunk "
                    f"off (train.trunk_cache=false, eval.shared_trunk=false)"
                )
            self._adapters = adapters
        for p_name, p in self._bottom_parameters():
            if p.requires_grad:
                raise TrunkError(
                    f"shared trunk: {p_name} is trainable, but the layers below {self.split} must "
                    f"stay frozen to be shared (a strategy that trains the base, e.g. seqft, "
                    f"cannot use train.trunk_cache)"
                )
        if training and float(getattr(self.body.config, "attention_dropout", 0.0) or 0.0) > 0:
            raise TrunkError(
                "shared trunk: the base model has attention dropout; cached bottom layers "
                "would differ from a training forward pass"
            )

    def _bottom_parameters(self):
        yield from (("embed_tokens." + n, p) for n, p in self.body.embed_tokens.named_parameters())
        for i in range(self.split):
            yield from ((f"layers.{i}.{n}", p) for n, p in self.body.layers[i].named_parameters())

    # --- the two halves --------------------------------------------------------------------
    def _mask(self, hidden: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor | None:
        if attention_mask.dim() == 4:  # a prepared additive mask (B, 1, T, T)
            return attention_mask.to(hidden.dtype)
        return self._mask_fn(
            config=self.body.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            cache=None,
            position_ids=position_ids,
        )

    def _layers(
        self, hidden: Tensor, layers: Sequence[nn.Module], attention_mask: Tensor, position_ids: Tensor | None
    ) -> Tensor:
        if position_ids is None:
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = self._mask(hidden, attention_mask, position_ids)
        rotary = self.body.rotary_emb(hidden, position_ids=position_ids)
        for layer in layers:
            hidden = layer(
                hidden, attention_mask=mask, position_embeddings=rotary, position_ids=position_ids, use_cache=False
            )
        return hidden

    @torch.no_grad()
    def bottom(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """Hidden states entering layer ``split``: (B, T, H), no autograd graph.

        ``attention_mask``: (B, T) padding mask, or a prepared additive (B, 1, T, T) float mask.
        ``position_ids``: (B, T); default ``0 .. T-1`` (right padding).
        """
        hidden = self.body.embed_tokens(input_ids)
        return self._layers(hidden, self.body.layers[: self.split], attention_mask, position_ids)

    def top(self, hidden: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """Layers ``split .. L-1`` (with the active adapters) and the final norm: (B, T, H)."""
        hidden = self._layers(hidden, self.body.layers[self.split :], attention_mask, position_ids)
        return self.body.norm(hidden)

    # --- the per-example cache (training; evaluation with a disk cache) -------------------------
    def cached_bottom(self, batch: dict[str, Tensor]) -> Tensor:
        """:meth:`bottom` of a right-padded batch (:func:`lmas.lm.likelihood.collate`), per-example cached.

        Each row's entry is its hidden states at its real tokens, keyed by its token ids; rows not
        in the cache run through the bottom together and are stored. Returns (B, T, H), zeros at
        padding (which no real token attends to).
        """
        ids, mask = batch["input_ids"], batch["attention_mask"]
        lengths = mask.sum(1)
        if not bool((mask.cumprod(1).sum(1) == lengths).all()):
            raise TrunkError("shared trunk: the per-example cache needs right-padded batches (lmas collate)")
        ids_cpu, n_cpu = ids.cpu(), lengths.tolist()
        keys = [b"c" + ids_cpu[r, :n].numpy().tobytes() for r, n in enumerate(n_cpu)]

        def compute(rows: list[int]) -> list[Tensor]:
            width = max(n_cpu[r] for r in rows)
            sub = self.bottom(ids[rows, :width], mask[rows, :width])
            return [sub[i, : n_cpu[r]] for i, r in enumerate(rows)]

        return _assemble(self.rows(keys, compute), ids.shape[1])

    def context(self) -> tuple:
        """What the bottom's numbers depend on besides its input: the embedding's and bottom layers'
        weights and the model config (:func:`lmas.lm.diskcache.fingerprint`), the split, the device
        type, the autocast dtype in force, the weights' dtype and the code."""
        return (
            "trunk",
            diskcache.fingerprint(self._bottom_parameters(), self.body.config),
            self.split,
            diskcache.numerics(model_device(self.model)),
            str(self.body.embed_tokens.weight.dtype),
            diskcache.code_version("lmas.lm.trunk"),
        )

    def answer_logits(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """:func:`lmas.lm.likelihood.answer_logits` through the cached bottom and the active adapters."""
        hidden = self.top(self.cached_bottom(batch), batch["attention_mask"])
        return logits_at_targets(self.head, hidden, batch["targets"])


def _assemble(entries: Sequence[Tensor], width: int) -> Tensor:
    """Per-row entries (n_i, H) as one right-padded (B, width, H) batch, zeros at padding."""
    out = entries[0].new_zeros(len(entries), width, entries[0].shape[-1])
    for r, e in enumerate(entries):
        out[r, : e.shape[0]] = e
    return out


# --- evaluation: N agents from one bottom pass ------------------------------------------------
@torch.no_grad()
def shared_label_logprobs(
    trunk: SharedTrunk,
    encoder: PromptEncoder,
    prompts: Sequence[str],
    labels: Sequence[str],
    agents: Sequence[str],
    activate: Callable[[str], None],
    batch_size: int = 32,
) -> Tensor:
    """Label log-likelihoods of every agent after every prompt: (A, len(prompts), len(labels)).

    The bottom layers run once per batch of prompts; for each agent, ``activate(agent)`` switches
    to its adapters and only the top layers run. Equal to :func:`lmas.lm.likelihood.label_logprobs`
    of each agent up to float rounding (the same prompt truncation, :func:`by_label_length`, and positions).
    """
    trunk.check()
    label_ids = label_tokens(encoder, labels)
    return by_label_length(
        encoder,
        prompts,
        label_ids,
        lambda rows, cols: _shared_label_logprobs(
            trunk, encoder, [prompts[r] for r in rows], [label_ids[c] for c in cols], agents, activate, batch_size
        ),
    )


def _shared_label_logprobs(
    trunk: SharedTrunk,
    encoder: PromptEncoder,
    prompts: Sequence[str],
    label_ids: Sequence[Sequence[int]],
    agents: Sequence[str],
    activate: Callable[[str], None],
    batch_size: int,
) -> Tensor:
    room = encoder.max_length - max(len(t) for t in label_ids)
    enc = [encoder.encode_prompt(p, room) for p in prompts]  # cut only in the body, as training cuts it
    inputs = [lab[:-1] for lab in label_ids]
    flat = [t for lab in inputs for t in lab]
    layout = repr([len(lab) for lab in inputs]).encode()
    rel, tgt, owner = label_targets(label_ids)  # the prompt's last column predicts every label's first token
    device = model_device(trunk.model)  # the prompts' tensors are built on the CPU and moved here
    dtype = trunk.body.embed_tokens.weight.dtype
    first_ids = torch.tensor([lab[0] for lab in label_ids], device=device)
    tgt_t, owner_t = torch.tensor(tgt, dtype=torch.long, device=device), torch.tensor(owner, device=device)
    rel_t = torch.tensor(rel, dtype=torch.long, device=device)
    scores, order = [], []
    for batch in length_batches([len(e) for e in enc], batch_size):  # similar lengths: little padding
        part = [enc[r] for r in batch]
        order += batch
        ids, allowed, pos = label_tree(part, inputs, encoder.pad_id)
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
        ids, pos, mask = ids.to(device), pos.to(device), mask.to(device)
        n = torch.tensor([len(e) for e in part], device=device)  # prompt lengths
        if trunk.disk is None:
            base = trunk.bottom(ids, mask, pos)  # (B, T, H), once for every agent
        else:  # per prompt from the disk cache (eval.cache): the same for every agent, run and process

            def compute(
                rows: list[int], ids: Tensor = ids, mask: Tensor = mask, pos: Tensor = pos, part: list = part
            ) -> list[Tensor]:
                w = max(len(part[r]) for r in rows) + len(flat)
                sub = trunk.bottom(ids[rows, :w], mask[rows, :, :w, :w], pos[rows, :w])
                return [sub[k, : len(part[r]) + len(flat)] for k, r in enumerate(rows)]

            keys = [
                b"t" + layout + b"|" + ids[r, : len(e) + len(flat)].cpu().numpy().tobytes() for r, e in enumerate(part)
            ]
            base = _assemble(trunk.rows(keys, compute), ids.shape[1])
        rows_t = torch.arange(len(part), device=device)
        at = n[:, None] + rel_t[None, :]  # (B, C)
        per_agent = []
        for agent in agents:
            activate(agent)
            h = trunk.top(base, mask, pos)  # (B, T, H)
            total = trunk.head(h[rows_t, n - 1]).float().log_softmax(-1)[:, first_ids]  # (B, L)
            if rel:
                hc = h.gather(1, at[:, :, None].expand(-1, -1, h.shape[-1]))  # (B, C, H)
                logp = trunk.head(hc).float().log_softmax(-1)  # (B, C, V)
                logp = logp.gather(2, tgt_t[None, :, None].expand(h.shape[0], -1, 1)).squeeze(2)  # (B, C)
                total = total.index_add(1, owner_t, logp)
            per_agent.append(total)
        scores.append(torch.stack(per_agent))  # (A, B, L)
    return torch.cat(scores, 1)[:, torch.argsort(torch.tensor(order, device=device))]  # the prompts' order
