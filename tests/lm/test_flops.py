"""The FLOP counter (lmas/lm/flops.py): by hand on a tiny shape, and against torch's FlopCounterMode on a
tiny random Llama with peft LoRA (eager attention, so that the attention's matmuls are visible ops)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lmas.lm import flops
from lmas.lm.encoding import IGNORE
from lmas.lm.likelihood import logits_at_targets

SHAPE = flops.DecoderShape(hidden=4, layers=2, heads=2, kv_heads=1, head_dim=2, intermediate=6, vocab=10)
QV = flops.Lora(r=1, targets=("q_proj", "v_proj"))


def test_forward_by_hand():
    count = flops.forward(SHAPE, [(1, 3, 3)], head_positions=1, lora=QV)
    # per layer, 3 tokens: q 2*3*4*4=96, k 2*3*4*2=48, v 48, o 96, gate 2*3*4*6=144, up 144, down 144 -> 720
    assert count["linear"] == 2 * 720
    # per layer: scores and values, each 2 * (1 row * 2 heads * 3 queries) * 2 head_dim * 3 keys = 72
    assert count["attention"] == 2 * 144
    # per layer: q 2*3*4*1 + 2*3*1*4 = 48, v 2*3*4*1 + 2*3*1*2 = 36
    assert count["lora"] == 2 * 84
    assert count["head"] == 2 * 1 * 4 * 10
    assert flops.total(count) == 1976


def test_backward_by_hand():
    count = flops.lora_backward(SHAPE, rows=1, seq=3, head_positions=1, lora=QV)
    # layer 1: every linear's dX (720); attention dP, dV, dQ, dK (4 * 72); LoRA q: dB 24 + dA 24 + dH 24 + dX 24,
    # v: dB 12 + dA 24 + dH 12 + dX 24
    # layer 0 (the lowest adapted): dX of o, gate, up, down only (96 + 3 * 144); attention dP, dQ, dV (3 * 72), no dK
    # (k_proj is not adapted); LoRA without dX (the layer's input needs no gradient): q 24 + 24 + 24, v 12 + 24 + 12
    assert count["linear"] == 720 + 528
    assert count["attention"] == 288 + 216
    assert count["lora"] == (96 + 72) + (72 + 48)
    assert count["head"] == 80  # dX of the frozen head only
    assert flops.total(flops.lora_training_step(SHAPE, 1, 3, 1, QV)) == 1976 + 2120


def test_gradients_stop_at_the_lowest_adapted_module():
    top_mlp = flops.Lora(r=1, targets=("down_proj",), layers=(1,))
    count = flops.lora_backward(SHAPE, rows=1, seq=3, head_positions=1, lora=top_mlp)
    # nothing below down_proj of layer 1 needs a gradient: no linear dX, no attention;
    # down: dB 2*1*3*4, dA 2*6*3*1, dH 2*3*4*1
    assert count == {"linear": 0, "attention": 0, "lora": 24 + 36 + 24, "head": 80}


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="lora.target_modules"):
        flops.Lora(r=8, targets=("embed_tokens",))
    with pytest.raises(ValueError, match="lora.r"):
        flops.Lora(r=0, targets=("q_proj",))
    with pytest.raises(ValueError, match="keys"):
        flops.forward(SHAPE, [(1, 4, 3)], head_positions=0)


def tiny_llama(lora: dict):
    """A random GQA Llama (eager attention) with peft LoRA; returns (peft model, its config)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(lora_alpha=2 * lora["r"], **lora))
    return model, config


def measured(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


LORAS = [
    {"r": 2, "target_modules": ["q_proj", "v_proj"]},
    {"r": 3, "target_modules": ["k_proj", "o_proj", "up_proj"], "layers_to_transform": [1, 2]},
    {"r": 2, "target_modules": ["down_proj"], "layers_to_transform": [2]},
]


@pytest.mark.parametrize("lora", LORAS, ids=["qv-all", "k-o-up-top2", "down-top1"])
def test_training_step_matches_torch_flop_counter(lora):
    model, config = tiny_llama(lora)
    shape = flops.DecoderShape.from_config(config)
    spec = flops.lora_of(lora["target_modules"], lora["r"], lora.get("layers_to_transform"))
    rows, seq = 3, 7
    ids = torch.randint(0, 40, (rows, seq))
    targets = torch.full((rows, seq), IGNORE)
    targets[:, 5:] = ids[:, 5:]  # two answer tokens per row: the head runs at 2 * rows positions
    base = model.get_base_model()
    hidden = {}

    def fwd():
        hidden["h"] = base.model(input_ids=ids).last_hidden_state

    def step():
        logits, tgt, _ = logits_at_targets(base.get_output_embeddings(), hidden["h"], targets)
        torch.nn.functional.cross_entropy(logits, tgt).backward()

    expected_fwd = flops.forward(shape, [(rows, seq, seq)], 0, spec)
    assert measured(fwd) == flops.total(expected_fwd)  # exactly: every matmul accounted for
    expected_rest = flops.add({"head": flops.matmul(2 * rows, shape.hidden, shape.vocab)},
                              flops.lora_backward(shape, rows, seq, 2 * rows, spec))  # fmt: skip
    assert measured(step) == flops.total(expected_rest)


def test_cached_forward_matches_torch_flop_counter():
    model, config = tiny_llama(LORAS[0])
    shape = flops.DecoderShape.from_config(config)
    base = model.get_base_model()
    prompt, label = torch.randint(0, 40, (2, 6)), torch.randint(0, 40, (2, 3))
    model.eval()

    def score():  # a prompt pass, then 3 tokens attending to the prompt's KV cache (as label scoring does)
        with torch.no_grad():
            out = base.model(input_ids=prompt, use_cache=True)
            h = base.model(input_ids=label, past_key_values=out.past_key_values, use_cache=True).last_hidden_state
            base.get_output_embeddings()(h[:, :-1])

    expected = flops.forward(
        shape, [(2, 6, 6), (2, 3, 9)], head_positions=2 * 2, lora=flops.lora_of(["q_proj", "v_proj"], 2)
    )
    assert measured(score) == flops.total(expected)
