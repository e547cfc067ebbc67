"""Model providers: embedded SmolLM2 conversion is atomic and reused; hf loads local folders; tiny."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.torch import load_file
from transformers import PreTrainedModel

from lmas.models import providers


def test_tiny_model_is_deterministic_and_uses_the_smollm2_tokenizer():
    a = providers.tiny(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=1)
    b = providers.tiny(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=1)
    c = providers.tiny(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=2)
    assert len(a.tokenizer) == 49152 and a.model.config.vocab_size == 49152
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert not any(p.requires_grad for p in a.model.parameters())  # the base is frozen


def _crash(*args, **kwargs):
    raise RuntimeError("simulated crash during conversion")


def test_conversion_crash_leaves_no_folder(tmp_path, monkeypatch, smollm2_folder):
    monkeypatch.setattr(providers.AutoModelForCausalLM, "from_pretrained", _crash)  # before the slow GGUF read
    with pytest.raises(RuntimeError, match="simulated crash"):
        providers.ensure_smollm2_folder(tmp_path)
    assert not (tmp_path / providers.SMOLLM2_FOLDER).exists()
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []  # no half-written temp folder either (a lock file may stay)


@pytest.mark.slow  # two conversions of the GGUF (~25 s each on 2 cores)
def test_a_retry_after_a_crash_mid_write_converts_the_same_model(tmp_path, monkeypatch, smollm2_folder):
    real_save = PreTrainedModel.save_pretrained

    def save_then_crash(self, *args, **kwargs):  # the weights are on disk when the crash comes
        real_save(self, *args, **kwargs)
        raise RuntimeError("simulated crash after writing the weights")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash after writing"):
        providers.ensure_smollm2_folder(tmp_path)
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []  # the half-written folder is gone
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", real_save)
    folder = providers.ensure_smollm2_folder(tmp_path)  # the retry
    assert folder == tmp_path / providers.SMOLLM2_FOLDER and (folder / "config.json").is_file()
    ours, ref = load_file(str(folder / "model.safetensors")), load_file(str(smollm2_folder / "model.safetensors"))
    assert sorted(ours) == sorted(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)
    assert (folder / "tokenizer.json").read_text() == (smollm2_folder / "tokenizer.json").read_text()


# GGUF tensor names -> HF names (llama.cpp's convert_hf_to_gguf.py tensor map, Llama architecture)
_GGUF_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
_GGUF_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[gguf_name]
    _, layer, kind, suffix = gguf_name.split(".")
    return f"model.layers.{layer}.{_GGUF_BLOCK[kind]}.{suffix}"


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (``reshape(n_head, 2, d // n_head // 2, ...).swapaxes(1, 2)``,
    which turns HF's rotate-half RoPE layout into GGML's interleaved one)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_converted_folder_is_reused_and_matches_the_gguf_weights(smollm2_folder):
    assert providers.ensure_smollm2_folder(smollm2_folder.parent) == smollm2_folder
    # every tensor of the folder is the GGUF file's dequantised tensor (gguf's own reader), exactly
    reader = GGUFReader(str(providers.smollm2_gguf_path()))
    heads = {k: int(reader.fields[f"llama.attention.{k}"].parts[-1][0]) for k in ("head_count", "head_count_kv")}
    assert heads == {"head_count": 9, "head_count_kv": 3}
    folder = load_file(str(smollm2_folder / "model.safetensors"))
    seen, types = set(), set()
    for t in reader.tensors:
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        name = _hf_name(t.name)
        if ".attn_q." in t.name or ".attn_k." in t.name:
            n_head = heads["head_count"] if ".attn_q." in t.name else heads["head_count_kv"]
            assert not torch.equal(w, folder[name]), f"{t.name}: the Q/K permutation was not undone"
            w = _unpermute(w, n_head)
        assert w.shape == folder[name].shape and torch.equal(w, folder[name]), t.name
        seen.add(name)
        types.add(t.tensor_type.name)
    assert seen == set(folder)  # lm_head is tied to the embeddings: no tensor of its own in either
    assert types == {"Q4_1", "Q8_0", "F32"}
    base = providers.smollm2(cache=str(smollm2_folder.parent))
    assert base.info["parameters"] == 134_515_008
    assert base.model.get_output_embeddings().weight.data_ptr() == base.model.get_input_embeddings().weight.data_ptr()
    tok = base.tokenizer
    ids = torch.tensor([tok("The capital of France is", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        nxt = base.model(input_ids=ids).logits[0, -1].argmax().item()
    assert tok.decode([nxt]).strip() == "Paris"  # the real pretrained model, not random weights


def test_hf_provider_loads_a_local_folder(tmp_path):
    tiny = providers.tiny(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    loaded = providers.hf(str(tmp_path / "m"))
    s0, s1 = tiny.model.state_dict(), loaded.model.state_dict()
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    assert loaded.name == "m" and loaded.info["path"].endswith("m")


def test_hf_provider_rejects_bad_paths_and_keeps_remote_code_off(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="name_or_path is empty"):
        providers.hf("")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        providers.hf(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="model.dtype"):
        providers._dtype("float64")
    seen = {}

    def fake_load(path, name, dtype, revision, trust_remote_code, *rest):
        seen["trust"] = trust_remote_code
        raise RuntimeError("stop")

    monkeypatch.setattr(providers, "_load", fake_load)
    with pytest.raises(RuntimeError):
        providers.hf("some/hub-id")
    assert seen["trust"] is False
