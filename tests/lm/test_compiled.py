"""train.compile: the compiled decoder layers give the eager model's losses, LoRA gradients and label scores, and
a run with the option trains and evaluates. Slow: Inductor compiles C++ kernels on the CPU (tens of seconds)."""

from __future__ import annotations

import json

import pytest
import torch

from lmas.lm.compiled import compile_layers
from lmas.lm.encoding import PromptEncoder, collate
from lmas.lm.likelihood import answer_loss, label_logprobs
from lmas.population.population import Population

pytestmark = pytest.mark.slow
LABELS = ["sport", "business news", "science"]
PROMPTS = ["News: the striker scored twice\nTopic:", "News: shares rose\nTopic:", "News: a new telescope\nTopic:"]


def _pop(tiny_base):
    p = Population(tiny_base, agents=1, lora={"r": 4, "alpha": 8})
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking adapters: non-zero B
        for pname, w in p.parameters_of(p.names[0]).items():
            if "lora_B" in pname:
                w.copy_(torch.randn(w.shape, generator=gen) * 0.3)
    return p


def _loss_and_grads(pop, batch):
    pop.model.zero_grad(set_to_none=True)
    loss = answer_loss(pop.model, batch)
    loss.backward()
    return loss.detach(), {k: v.grad.clone() for k, v in pop.parameters_of(pop.names[0]).items()}


def test_compiled_layers_give_the_eager_loss_gradients_and_label_scores(tiny_base, one_thread):
    pop = _pop(tiny_base)
    pop.activate(pop.names[0])
    enc = PromptEncoder(pop.tokenizer, max_length=32)
    batch = collate([enc.encode(p, a, eos=False) for p, a in zip(PROMPTS, LABELS)], enc.pad_id)
    pop.model.train()
    want_loss, want_grads = _loss_and_grads(pop, batch)
    pop.model.eval()
    want_scores = label_logprobs(pop.model, enc, PROMPTS, LABELS, batch_size=2)

    assert compile_layers(pop.model) == 2
    pop.model.train()
    got_loss, got_grads = _loss_and_grads(pop, batch)
    pop.model.eval()
    got_scores = label_logprobs(pop.model, enc, PROMPTS, LABELS, batch_size=2)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    assert want_grads.keys() == got_grads.keys() and len(want_grads) == 8  # A and B of q/v in 2 layers
    for name, g in want_grads.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_scores, want_scores, rtol=1e-5, atol=1e-5)
    assert set(pop.model.state_dict()) == set(_pop_keys(tiny_base))  # checkpoints and adapters load as before


def _pop_keys(tiny_base):
    from lmas.models.providers import tiny

    return Population(tiny(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), agents=1,
                      lora={"r": 4, "alpha": 8}).model.state_dict()


def test_a_model_without_decoder_layers_is_refused_naming_the_option():
    with pytest.raises(ValueError, match=r"train\.compile=true.*no decoder layers"):
        compile_layers(torch.nn.Linear(2, 2))


def test_a_run_with_train_compile_trains_and_evaluates(run_lmas, fast_overrides, tmp_path):
    eager = run_lmas([*fast_overrides], tmp_path / "eager")
    compiled = run_lmas([*fast_overrides, "train.compile=true"], tmp_path / "compiled")
    saved = json.loads((tmp_path / "compiled" / "results.json").read_text())
    assert saved["config"]["train"]["compile"] is True
    assert compiled["complete"] and compiled["metrics"]["agent0"]
    for key, value in eager["metrics"]["agent0"].items():  # the same training and scores, up to float rounding
        assert compiled["metrics"]["agent0"][key] == pytest.approx(value, abs=1e-4, nan_ok=True), key
