"""Model providers: embedded SmolLM2 conversion is atomic and reused; hf loads local folders; tiny."""

from __future__ import annotations

import pytest
import torch

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


def test_conversion_crash_leaves_no_folder_and_a_retry_succeeds(tmp_path, monkeypatch, smollm2_folder):
    real_save = providers.AutoModelForCausalLM.from_config

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash during conversion")

    monkeypatch.setattr(providers.AutoModelForCausalLM, "from_config", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        providers.ensure_smollm2_folder(tmp_path)
    assert not (tmp_path / providers.SMOLLM2_FOLDER).exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no half-written temp folder either
    monkeypatch.setattr(providers.AutoModelForCausalLM, "from_config", real_save)


def test_converted_folder_is_reused_and_matches_the_gguf_weights(smollm2_folder):
    assert providers.ensure_smollm2_folder(smollm2_folder.parent) == smollm2_folder
    base = providers.smollm2(cache=str(smollm2_folder.parent))
    assert base.info["parameters"] == 134_515_008
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

    def fake_load(path, name, dtype, revision, trust_remote_code):
        seen["trust"] = trust_remote_code
        raise RuntimeError("stop")

    monkeypatch.setattr(providers, "_load", fake_load)
    with pytest.raises(RuntimeError):
        providers.hf("some/hub-id")
    assert seen["trust"] is False
