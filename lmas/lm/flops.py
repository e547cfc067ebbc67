"""Model FLOPs of a Llama-style decoder, counted from its shapes (the roofline benchmark's numerator).

A matmul of ``(m, k) x (k, n)`` is ``2 m k n`` FLOPs; only matmuls are counted (norms, RoPE, softmax,
activations and the optimizer are a few per cent on these shapes and run far below the matmul rate).
Per decoder layer and forward call on ``rows`` sequences of ``q`` new tokens attending to ``kv`` keys
(``kv = q`` without a KV cache):

* ``linear``: the q/k/v/o projections (grouped-query shapes: k/v map ``hidden`` to ``kv_heads * head_dim``)
  and the MLP's gate/up/down, ``2 * rows * q * d_in * d_out`` each;
* ``attention``: scores ``Q K^T`` and values ``P V``, ``2 * rows * heads * q * kv * head_dim`` each; the
  whole ``q x kv`` rectangle is counted, as the kernels compute it under a mask (a causal kernel that
  skips the upper triangle would do about half);
* ``lora``: ``x A^T`` and ``h B^T`` of every adapted module, ``2 * rows * q * r * (d_in + d_out)``;
* ``head``: the LM head at the positions where it is applied, ``2 * positions * hidden * vocab``.

The backward pass of LoRA training on a frozen base (:func:`lora_backward`) computes no weight
gradient for base weights: each linear costs one activation gradient (as much as its forward), each
attention matmul two (one per input that needs a gradient), each LoRA module its two weight
gradients plus the gradient flowing through it. Gradients stop at the lowest adapted module: below
it nothing requires a gradient (the embeddings are frozen), so autograd computes nothing there.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

PARTS = ("linear", "attention", "lora", "head")

# The order in which a layer's modules see the data: a module's input needs a gradient only if a
# module of an earlier stage of the same layer (or a lower layer) is adapted.
STAGE = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 2, "up_proj": 2, "down_proj": 3}


def matmul(m: int, k: int, n: int) -> int:
    """FLOPs of an ``(m, k) x (k, n)`` matrix product (a multiply and an add per term)."""
    return 2 * m * k * n


@dataclass(frozen=True)
class DecoderShape:
    """The sizes of a Llama-style decoder that its FLOPs depend on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, config: Any) -> DecoderShape:
        """From an HF ``LlamaConfig``-like config (``head_dim`` defaults to ``hidden / heads``)."""
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            hidden=config.hidden_size,
            layers=config.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
        )

    def linears(self) -> dict[str, tuple[int, int]]:
        """``(d_in, d_out)`` of each linear module of a layer, by its HF name."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


@dataclass(frozen=True)
class Lora:
    """Where LoRA adapters of rank ``r`` sit: module names (``target_modules``) in ``layers`` (None: all)."""

    r: int
    targets: tuple[str, ...]
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        unknown = [t for t in self.targets if t not in STAGE]
        if unknown or not self.targets:
            raise ValueError(f"lora.target_modules={list(self.targets)}: FLOPs are counted for {list(STAGE)} only")
        if self.r <= 0:
            raise ValueError(f"lora.r={self.r}: must be positive")

    def in_layer(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def lowest_layer(self) -> int:
        return 0 if self.layers is None else min(self.layers)


def _zero() -> dict[str, float]:
    return dict.fromkeys(PARTS, 0.0)


def add(*counts: dict[str, float]) -> dict[str, float]:
    """The part-wise sum of FLOP counts."""
    out = _zero()
    for c in counts:
        for k, v in c.items():
            out[k] += v
    return out


def total(count: dict[str, float]) -> float:
    return sum(count.values())


def forward(
    shape: DecoderShape, calls: Iterable[tuple[int, int, int]], head_positions: int, lora: Lora | None = None
) -> dict[str, float]:
    """FLOPs of forward calls ``(rows, q, kv)`` through every layer, plus the LM head at ``head_positions``.

    Returns the count by part (:data:`PARTS`).
    """
    out = _zero()
    lin = shape.linears()
    for rows, q, kv in calls:
        if kv < q:
            raise ValueError(f"a forward call with {q} new tokens cannot attend to only {kv} keys")
        tokens = rows * q
        out["linear"] += shape.layers * sum(matmul(tokens, i, o) for i, o in lin.values())
        out["attention"] += shape.layers * 2 * matmul(rows * shape.heads * q, shape.head_dim, kv)
        if lora is not None:
            adapted = sum(1 for layer in range(shape.layers) if lora.in_layer(layer))
            out["lora"] += adapted * sum(
                matmul(tokens, lin[t][0], lora.r) + matmul(tokens, lora.r, lin[t][1]) for t in lora.targets
            )
    out["head"] += matmul(head_positions, shape.hidden, shape.vocab)
    return out


def lora_backward(shape: DecoderShape, rows: int, seq: int, head_positions: int, lora: Lora) -> dict[str, float]:
    """FLOPs of the backward pass of a LoRA training step on ``rows`` sequences of ``seq`` tokens.

    The base is frozen: activation gradients only, from the LM head (``head_positions`` positions) down
    to the lowest adapted module; weight gradients for the LoRA ``A``/``B`` matrices only. In the lowest
    adapted layer, modules of an earlier stage than the lowest adapted one (:data:`STAGE`) get no
    gradient, the adapted modules of that stage none for their input, and of the attention's four
    gradient matmuls only those for adapted inputs run (``dQ`` if ``q_proj`` is adapted, ``dK`` for
    ``k_proj``; ``dP`` for either; ``dV`` for ``v_proj``).
    """
    out = _zero()
    lin, tokens = shape.linears(), rows * seq
    att = matmul(rows * shape.heads * seq, shape.head_dim, seq)  # one of the attention's matmuls
    low = lora.lowest_layer()
    low_stage = min(STAGE[t] for t in lora.targets)
    for layer in range(low, shape.layers):
        first = layer == low  # the lowest adapted layer: gradients stop inside it
        for name, (d_in, d_out) in lin.items():
            if not first or STAGE[name] > low_stage:  # the input of this module needs a gradient
                out["linear"] += matmul(tokens, d_out, d_in)  # dX = dY W
        if not first:
            out["attention"] += 4 * att  # dP, dV, dQ, dK
        elif low_stage == 0:
            needs = {t for t in lora.targets if STAGE[t] == 0}
            out["attention"] += att * (("q_proj" in needs) + ("k_proj" in needs) + bool(needs & {"q_proj", "k_proj"}))
            out["attention"] += att * ("v_proj" in needs)
        if lora.in_layer(layer):
            for name in lora.targets:
                d_in, d_out = lin[name]
                grads = matmul(lora.r, tokens, d_out) + matmul(d_in, tokens, lora.r)  # dB, dA
                through = matmul(tokens, d_out, lora.r)  # dH = dY B
                if not first or STAGE[name] > low_stage:
                    through += matmul(tokens, lora.r, d_in)  # dX = dH A
                out["lora"] += grads + through
    out["head"] += matmul(head_positions, shape.vocab, shape.hidden)  # dX only: the head is frozen
    return out


def lora_training_step(shape: DecoderShape, rows: int, seq: int, head_positions: int, lora: Lora) -> dict[str, float]:
    """Forward plus backward FLOPs of one LoRA training step on a ``(rows, seq)`` batch (no KV cache)."""
    return add(
        forward(shape, [(rows, seq, seq)], head_positions, lora), lora_backward(shape, rows, seq, head_positions, lora)
    )


def lora_of(targets: Sequence[str], r: int, layers: Sequence[int] | None = None) -> Lora:
    """A :class:`Lora` from lmas's ``population.lora`` options (``target_modules``, ``r``, ``layers_to_transform``)."""
    return Lora(r=r, targets=tuple(targets), layers=None if layers is None else tuple(layers))
