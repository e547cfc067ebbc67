"""Avalanche's own strategies on an lmas stream: they train the adapter only, report lmas' results,
and Avalanche's Naive reproduces lmas' Naive step for step."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lmas.data.sources import bbc_topics
from lmas.data.stream import Stream
from lmas.loop import ContinualLoop, EvalConfig, TrainConfig
from lmas.training.experience import ExperienceData
from lmas.lm.encoding import PromptEncoder, collate
from lmas.population.population import Population
from lmas.training.avalanche import AdapterLM, AvalancheStrategy, answer_loss, encode_experience
from lmas.strategies.base import Strategy

MAX_LEN = 48


@pytest.fixture(scope="module")
def stream():
    kw = dict(n_train=8, n_val=2, n_test=4, max_chars=60)
    return Stream("bbc2", [bbc_topics("bt", topics=["business", "tech"], **kw),
                           bbc_topics("sp", topics=["sports", "politics"], **kw)])


def _population():
    from lmas.models.providers import tiny

    base = tiny(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=0)
    return Population(base, agents=1, seed=0)


def _run(strategy, stream, tmp_path, train: TrainConfig, trainer: dict | None = None):
    pop = _population()
    before = {n: p.detach().clone() for n, p in pop.model.named_parameters()}
    loop = ContinualLoop(pop, stream, strategy, tmp_path, seed=0, train=train, eval=EvalConfig(batch_size=16),
                         max_length=MAX_LEN, progress=False, trainer=trainer)
    return pop, before, loop.run()


@pytest.fixture(scope="module")
def lmas_naive_results(stream, tmp_path_factory):
    return _run(Strategy(), stream, tmp_path_factory.mktemp("lmas"), TrainConfig(lr=1e-2, batch_size=4, max_steps=2))[2]


@pytest.mark.parametrize("method", ["naive", "ewc", "lwf", "replay", "agem"])
def test_avalanche_method_trains_the_adapter_only_and_reports_lmas_results(method, stream, tmp_path,
                                                                           lmas_naive_results):
    strategy = AvalancheStrategy(method, ewc_lambda=100.0, mode="online", decay_factor=1.0, mem_size=8,
                                 patterns_per_exp=4, sample_size=4)
    pop, before, results = _run(strategy, stream, tmp_path, TrainConfig(lr=1e-2, batch_size=4, max_steps=2))
    for n, p in pop.model.named_parameters():
        if "lora_B" in n:
            assert not torch.equal(p, before[n]), n  # B starts at 0 and is trained
        elif "lora_" not in n:
            assert torch.equal(p, before[n]), n  # the frozen base never moves
    assert results["strategy"] == f"avalanche/{method}"
    assert [len(v) for v in results["loss_curves"].values()] == [2, 2]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved) == set(lmas_naive_results)
    assert set(saved["metrics"]["agent0"]) == set(lmas_naive_results["metrics"]["agent0"])
    assert saved["matrix"].keys() == lmas_naive_results["matrix"].keys()
    # one Avalanche strategy per agent, its plugin state kept over both experiences
    avl, model, n_exps = strategy.agents["agent0"]
    assert n_exps == 2 and avl.clock.train_exp_counter == 2
    adapter = set(model.names.values())
    assert adapter == set(pop.parameters_of("agent0")) and {id(p) for p in avl.optimizer.param_groups[0]["params"]} \
        == {id(p) for p in pop.parameters_of("agent0").values()}
    plugin = next((p for p in avl.plugins if type(p).__name__.lower().startswith(method[:3])), None)
    if method == "ewc":
        assert {k.split(".", 1)[1].replace(":", ".") for k in plugin.importances[1]} == adapter
    if method == "lwf":
        teacher = plugin.lwf.prev_model
        assert isinstance(teacher, AdapterLM) and teacher.runner.lm is pop.model  # shares the base
        assert not list(teacher.parameters()) and len(teacher.snapshot) == len(adapter)
    if method == "replay":
        assert len(plugin.storage_policy.buffer) == 8
    if method == "agem":
        assert [len(b) for b in plugin.buffers] == [4, 4]


def test_teacher_copy_keeps_old_adapter_values_and_shares_the_base(stream):
    pop = _population()
    enc = PromptEncoder(pop.tokenizer, MAX_LEN)
    x, y, _ = encode_experience([(ex, "classification") for ex in stream[0].train[:3]], enc)
    with torch.no_grad():
        for p in pop.parameters_of("agent0").values():
            p.normal_(0, 0.05)
    student = AdapterLM(pop.model)
    out = student(x)
    assert out.shape == ((y[:, 1:] != -100).sum().item(), pop.model.config.vocab_size)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in pop.parameters_of("agent0").values():
            p.add_(0.1)
        assert torch.allclose(teacher(x), out) and not torch.allclose(student(x), out)
    # the loss is lmas' task loss on the same examples
    from lmas.lm.likelihood import answer_loss as lmas_loss

    items = [enc.encode_example(ex, "classification") for ex in stream[0].train[:3]]
    torch.testing.assert_close(answer_loss(student(x), y), lmas_loss(pop.model, collate(items, enc.pad_id)))


def test_avalanche_naive_matches_lmas_naive(stream, tmp_path, monkeypatch):
    """Same data, seed, batch order (shuffling off in both), AdamW (lr, weight decay, fresh state per
    task), warm-up, gradient-norm clipping and steps -> the same adapter, bit for bit.

    Two tasks, two epochs of two batches each (8 steps). Tolerance: none (exact equality). Both
    frameworks run the same float32 ops in the same order on one CPU process (lmas' ``answer_logits``
    on identically padded batches, ``torch.optim.AdamW``, ``clip_grad_norm_``), so nothing is left
    to round differently; measured max difference 0.0. (Another device or thread count could
    reorder reductions; then ~1e-6 absolute would be the right bound, far below one step's change.)
    """
    def ordered(self):  # lmas' loader without its shuffling
        return torch.utils.data.DataLoader(self.items, batch_size=self.batch_size, shuffle=False,
                                           collate_fn=lambda items: collate(items, self.encoder.pad_id))

    monkeypatch.setattr(ExperienceData, "train_dataloader", ordered)
    train = TrainConfig(lr=1e-2, batch_size=4, epochs=2, weight_decay=0.01, warmup_steps=3)
    clip = 0.05  # small enough to clip every step of this random tiny model
    pop_l, before, res_l = _run(Strategy(), stream, tmp_path / "lmas", train, {"gradient_clip_val": clip})
    strategy = AvalancheStrategy("naive", shuffle=False, gradient_clip_val=clip)
    pop_a, _, res_a = _run(strategy, stream, tmp_path / "avl", train)
    lmas_w, avl_w = pop_l.adapter_state("agent0"), pop_a.adapter_state("agent0")
    assert lmas_w.keys() == avl_w.keys()
    moved = max((lmas_w[k] - before[n]).abs().max().item()
                for k in lmas_w for n in before if n.replace(".agent0", "") == k)
    assert moved > 1e-3  # training did change the adapter
    for k in lmas_w:
        assert torch.equal(avl_w[k], lmas_w[k]), (k, (avl_w[k] - lmas_w[k]).abs().max().item())
    assert [len(c) for c in res_l["loss_curves"].values()] == [4, 4]
    assert res_a["loss_curves"] == res_l["loss_curves"]
    assert res_a["matrix"]["values"] == res_l["matrix"]["values"]


def test_config_avalanche_ewc_runs_end_to_end(tmp_path, run_lmas):
    over = ["model=tiny", "debug=fast", "logger=csv", f"paths.output_dir={tmp_path}", "strategy=avalanche/ewc",
            "stream.max_eval=2"]  # evaluation kept small
    results = run_lmas(over, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["complete"] and saved["strategy"] == "avalanche/ewc"
    assert saved["config"]["strategy"]["gradient_clip_val"] == 1.0  # taken from trainer.*
    assert all(len(c) == 2 for c in saved["loss_curves"].values()) and len(saved["loss_curves"]) == 3
    assert results["metrics"] == saved["metrics"]
