"""Runs on CUDA: every strategy and population config, distillation (cached and live), learning
curves and self-learning, the base kept on the GPU across fits, and CPU = GPU scores.

Selected by ``make test-gpu`` (``-m gpu``), deselected by ``make test``; every test skips with the
reason when ``torch.cuda.is_available()`` is False. Runs use the tiny model (``model=tiny
debug=fast``) with ``trainer=gpu`` (bf16-mixed autocast, float32 LoRA weights), except the
equality checks, which compare float32 on both devices.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lmas.data.sources import bbc_topics
from lmas.data.stream import Stream
from lmas.data.task import Example, Task
from lmas.loop import ContinualLoop, EvalConfig, TrainConfig
from lmas.lm.device import model_device
from lmas.lm.encoding import PromptEncoder, collate
from lmas.lm.likelihood import answer_loss, label_logprobs
from lmas.evaluation.scoring import greedy_answers, perplexity
from lmas.lm.trunk import SharedTrunk, shared_label_logprobs
from lmas.population.population import Population

CONF = Path(__file__).resolve().parents[2] / "conf"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs CUDA (torch.cuda.is_available() is False); run `make test-gpu` on a GPU machine"),
]
GPU = ["model=tiny", "debug=fast", "logger=csv", "trainer=gpu"]


def configs(group: str, skip: tuple[str, ...] = ()) -> list[str]:
    """Every config of a group, found by glob (sub-folders too: ``avalanche/ewc``)."""
    return sorted(str(p.relative_to(CONF / group).with_suffix("")) for p in (CONF / group).rglob("*.yaml")
                  if p.stem not in skip)


def _check(results: dict) -> None:
    assert results["complete"]
    values = [v for row in results["matrix"]["values"] for agent in row for v in agent if v is not None]
    assert values and all(math.isfinite(v) for v in values)
    for curve in results["loss_curves"].values():
        assert all(math.isfinite(v) for v in curve)


@pytest.mark.parametrize("name", configs("strategy"))
def test_every_strategy_runs_on_cuda(name, run_lmas, tmp_path):
    _check(run_lmas(GPU + [f"strategy={name}", f"paths.output_dir={tmp_path}"], tmp_path / "run"))


@pytest.mark.parametrize("name", configs("population"))
def test_every_population_runs_on_cuda(name, run_lmas, tmp_path):
    _check(run_lmas(GPU + [f"population={name}", f"paths.output_dir={tmp_path}"], tmp_path / "run"))


# external teachers give label distributions only: their presets need a classification stream
CLASSIFICATION_ONLY = {"minilm": ["stream=self_learning"]}


@pytest.mark.parametrize("name", configs("distill", skip=("none",)))
def test_distillation_runs_on_cuda(name, run_lmas, tmp_path):
    """Every distillation preset (peers and specialists cache the teachers, dml runs them live,
    minilm adds an external CPU teacher) with two agents, so the second learns from the first."""
    res = run_lmas(GPU + [f"distill={name}", "population.agents=2", f"paths.output_dir={tmp_path}"]
                   + CLASSIFICATION_ONLY.get(name, []), tmp_path / "run")
    _check(res)
    taught = [e for e in res["agents"]["agent1"]["history"] if e.get("teachers")]
    assert taught, "agent1 should have had agent0 as a teacher"


@pytest.mark.parametrize("name", configs("experiment/distillation"))
def test_distillation_experiments_run_on_cuda(name, run_lmas, tmp_path):
    _check(run_lmas(GPU + [f"experiment=distillation/{name}", f"paths.output_dir={tmp_path}"], tmp_path / "run"))


def test_cached_and_live_teachers_give_the_same_kd_terms_on_cuda(run_lmas, tmp_path):
    """Two agents, the second distils the first: cached and live teachers give the same run (the
    teacher does not train during the student's fit) up to float rounding."""
    runs = [run_lmas(GPU + ["distill=peers", f"distill.cache={c}", "population.agents=2", "trainer.precision=32-true",
                            f"paths.output_dir={tmp_path / c}"], tmp_path / c) for c in ("true", "false")]
    a, b = (r["loss_curves"] for r in runs)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5)


def test_learning_curves_on_cuda(run_lmas, tmp_path):
    res = run_lmas(GPU + ["eval.curve_every=1", f"paths.output_dir={tmp_path}"], tmp_path / "run")
    _check(res)
    assert res["learning_curves"]
    for points in res["learning_curves"].values():
        assert [s for s, _ in points] == [0, 1, 2] and all(math.isfinite(v) for _, v in points)


def test_self_learning_on_cuda(run_lmas, tmp_path):
    small = ["experiment=self_learning", "loop.seed_labels=4", "loop.chunk=6", "loop.cycles=2"]
    res = run_lmas(GPU + small + [f"paths.output_dir={tmp_path}"], tmp_path / "run")
    assert [c["cycle"] for c in res["self_learning"]] == [0, 1, 2]


# --- the base stays on the GPU -------------------------------------------------------------------
@pytest.fixture
def tiny_news():
    return bbc_topics("news", topics=["sports", "tech"], n_train=8, n_val=4, n_test=4, max_chars=60)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "32-true"])
def test_the_base_stays_on_cuda_across_fits_and_lora_stays_float32(precision, tiny_base, tiny_news, tmp_path):
    """No copy per fit: after two fits and evaluations the base weights are the same CUDA storage as
    right after the loop moved them there; under mixed precision the LoRA weights stay float32."""
    from lmas.strategies.base import Strategy

    pop = Population(tiny_base, agents=2, lora={"r": 4, "alpha": 8}, seed=0)
    t2 = Task("news2", "classification", tiny_news.train, tiny_news.val, tiny_news.test, tiny_news.labels)
    loop = ContinualLoop(pop, Stream("s", [tiny_news, t2]), Strategy(), tmp_path,
                         train=TrainConfig(lr=1e-2, max_steps=2, batch_size=4),
                         eval=EvalConfig(batch_size=8, curve_every=1),
                         trainer={"accelerator": "gpu", "devices": 1, "precision": precision},
                         progress=False, save_adapters=False)
    weight = next(p for n, p in pop.model.named_parameters() if "lora_" not in n)
    assert weight.device.type == "cuda"
    ptr = weight.data_ptr()
    results = loop.run()
    assert all(p.device.type == "cuda" for p in pop.model.parameters())
    assert weight.data_ptr() == ptr  # never moved: no CPU round trip per fit
    assert all(p.dtype == torch.float32 for n, p in pop.model.named_parameters() if "lora_" in n)
    assert all(math.isfinite(v) for c in results["loss_curves"].values() for v in c)


# --- CPU and GPU agree ---------------------------------------------------------------------------
def _population(base, **lora):
    pop = Population(base, agents=["a", "b"], lora={"r": 4, "alpha": 8, **lora}, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pop.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return pop


PROMPTS = [f"Headline {i}: the match ended {i}-{i + 1}, " + "and more " * i + "\nTopic:" for i in range(6)]
LABELS = ["sport", "technology news", "business"]


def _scores(pop, enc, trunk=None):
    pop.model.eval()
    out = {"labels": label_logprobs(pop.model, enc, PROMPTS, LABELS, batch_size=4),
           "mixed": label_logprobs(pop.model, enc, PROMPTS, LABELS, batch_size=4,
                                   adapter_names=["a", "b"] * 3)}
    items = [enc.encode(p, LABELS[i % 3], eos=False) for i, p in enumerate(PROMPTS)]
    out["loss"] = answer_loss(pop.model, collate(items, enc.pad_id)).detach()
    out["ppl"] = torch.tensor(perplexity(pop.model, enc, [Example(p, "sport") for p in PROMPTS], batch_size=4))
    if trunk is not None:
        out["trunk"] = shared_label_logprobs(trunk, enc, PROMPTS, LABELS, ["a", "b"], pop.activate, batch_size=4)
    return {k: v.float().cpu() for k, v in out.items()}


def test_cpu_and_gpu_scores_agree_on_the_same_adapters(tiny_base):
    """Label log-likelihoods (plain, mixed-adapter, shared trunk), the answer loss and perplexity of
    the same adapters, float32 on both devices, agree within 1e-4 (relative 1e-5 on the loss);
    greedy answers are the same strings."""
    pop = _population(tiny_base, layers_to_transform=[1])
    enc = PromptEncoder(pop.tokenizer, 32)  # short: some prompts are truncated
    trunk = SharedTrunk(pop.model)
    pop.activate("a")
    cpu = _scores(pop, enc, trunk)
    answers_cpu = greedy_answers(pop.model, enc, PROMPTS[:3], max_new_tokens=4)
    pop.model.to("cuda")
    assert model_device(pop.model).type == "cuda"
    pop.activate("a")
    gpu = _scores(pop, enc, trunk)
    answers_gpu = greedy_answers(pop.model, enc, PROMPTS[:3], max_new_tokens=4)
    for k in cpu:
        assert torch.allclose(cpu[k], gpu[k], rtol=1e-5, atol=1e-4), k
    assert answers_cpu == answers_gpu


def test_one_training_step_gives_the_same_gradient_on_cpu_and_gpu(tiny_base):
    pop = _population(tiny_base)
    enc = PromptEncoder(pop.tokenizer, 32)
    items = [enc.encode(p, LABELS[i % 3], eos=False) for i, p in enumerate(PROMPTS)]
    batch = collate(items, enc.pad_id)
    pop.activate("a")
    pop.model.train()

    def grads():
        pop.model.zero_grad()
        answer_loss(pop.model, batch).backward()
        return torch.cat([p.grad.flatten().cpu() for p in pop.model.parameters() if p.requires_grad])

    cpu = grads()
    pop.model.to("cuda")
    gpu = grads()
    assert torch.allclose(cpu, gpu, rtol=1e-4, atol=1e-6)
