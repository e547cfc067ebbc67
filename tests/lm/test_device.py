"""Device placement and mixed precision, on a machine without a GPU.

Device: the model is moved to a *fake* CUDA device (``torch._subclasses.FakeTensorMode``: tensors
carry a device and a shape but no data, and an op mixing ``cuda:0`` and ``cpu`` tensors raises
``FakeTensorDeviceMismatchError``, as CUDA does). Scoring, the strategies' extra passes and a
distillation step then run exactly as on a GPU, up to the first host sync (``.item()``,
``.tolist()``), which a fake tensor cannot answer: those calls are run to the point where the
result would be read, and any error other than a data-dependent one fails the test. Greedy
decoding (``model.generate``) syncs before its first forward pass, so only ``tests/gpu`` checks it.

Precision: ``trainer.precision=bf16-mixed`` autocasts on the CPU too, so the precision path runs
here for real: LoRA weights stay float32, losses are finite, scores stay close to float32 ones.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode, ShapeEnv

from lmas.data.stream import Stream
from lmas.data.task import Example, Task
from lmas.distill.strategy import Distill
from lmas.loop import ContinualLoop, EvalConfig, TrainConfig
from lmas.lm.device import autocast, autocast_dtype, model_device, trainer_device
from lmas.training.experience import IncrementalLM
from lmas.lm.encoding import PromptEncoder, collate
from lmas.lm.likelihood import label_logprobs
from lmas.evaluation.scoring import perplexity
from lmas.lm.trunk import SharedTrunk, shared_label_logprobs
from lmas.evaluation.scorer import PopulationScorer
from lmas.population.population import Population
from lmas.strategies.lwf import LwF
from lmas.strategies.olora import OLoRA
from lmas.strategies.regularizers import EWC

LABELS = ["sport", "technology news"]  # one single-token and one multi-token label
TASK = Task("news", "classification",
            [Example(f"Headline {i}: the match ended {i}-{i + 1}\nTopic:", LABELS[i % 2]) for i in range(6)],
            [], [Example("Headline: a goal\nTopic:", "sport")], LABELS)


def _population(base, **lora):
    p = Population(base, agents=["a", "b"], lora={"r": 4, "alpha": 8, **lora}, seed=0)
    with torch.no_grad():  # non-zero B, so adapters change the scores
        gen = torch.Generator().manual_seed(1)
        for n, param in p.model.named_parameters():
            if "lora_B" in n:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    for a in p.names:
        p.agents[a].history.append({"round": -1, "event": "trained", "task": "news"})
    return p


@pytest.fixture
def pop(tiny_base):
    return _population(tiny_base)


def fake_cuda():
    """A fake-tensor mode in which ``.to("cuda")`` works without a GPU and device mixing raises."""
    return FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())


def until_host_sync(fn):
    """Run ``fn``; a data-dependent stop (a host sync on fake data) counts as having got through."""
    try:
        return fn()
    except GuardOnDataDependentSymNode:
        return None


def test_label_scores_follow_the_model_device(pop):
    enc = PromptEncoder(pop.tokenizer, 32)
    pop.model.eval()
    prompts = [ex.prompt for ex in TASK.train[:3]]
    with fake_cuda():
        pop.model.to("cuda")
        assert model_device(pop.model) == torch.device("cuda:0")
        plain = label_logprobs(pop.model, enc, prompts, LABELS)
        mixed = label_logprobs(pop.model, enc, prompts, LABELS, adapter_names=["a", "b", "a"])
        assert plain.device == mixed.device == torch.device("cuda:0")
        assert tuple(plain.shape) == (3, 2)
        scorer = PopulationScorer(pop, enc, batch_size=2)
        assert tuple(scorer.label_logprobs(["a", "b"], prompts, LABELS).shape) == (2, 3, 2)


def test_shared_trunk_and_perplexity_follow_the_model_device(tiny_base):
    pop = _population(tiny_base, layers_to_transform=[1])
    enc = PromptEncoder(pop.tokenizer, 32)
    pop.model.eval()
    trunk = SharedTrunk(pop.model)
    with fake_cuda():
        pop.model.to("cuda")
        out = shared_label_logprobs(trunk, enc, [ex.prompt for ex in TASK.train[:2]], LABELS, ["a", "b"],
                                    pop.activate)
        assert out.device == torch.device("cuda:0") and tuple(out.shape) == (2, 2, 2)
        until_host_sync(lambda: perplexity(pop.model, enc, TASK.train[:3], batch_size=2))


def _module(pop, strategy, agent="b"):
    enc = PromptEncoder(pop.tokenizer, 32)
    pop.activate(agent)
    module = IncrementalLM(pop, agent, strategy, enc)
    module.examples = [(ex, TASK.kind) for ex in TASK.train]
    return module


ROWS = [0, 1, 2, 3]
INDEX = torch.tensor(ROWS)  # a real CPU tensor, made outside the fake mode


def _cuda_batch(module):
    """A batch as Lightning hands it to a step on CUDA (``index`` stays a real CPU tensor: the strategy
    reads it with ``.tolist()``, a host sync a fake tensor cannot answer)."""
    items = [module.encoder.encode_example(*module.examples[i]) for i in ROWS]
    batch = {k: v.to("cuda") for k, v in collate(items, module.encoder.pad_id).items()}
    return {**batch, "index": INDEX}


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("labels", [["sport", "tech"], LABELS], ids=["one-token", "multi-token"])
def test_a_distillation_step_follows_the_model_device(pop, cache, labels):
    task = Task("news", "classification", [Example(ex.prompt, labels[i % 2]) for i, ex in enumerate(TASK.train)],
                [], TASK.test, labels)
    strategy = Distill(teachers=["a"], cache=cache, temperature=2.0)
    module = _module(pop, strategy)
    module.examples = [(ex, task.kind) for ex in task.train]
    with fake_cuda():
        pop.model.to("cuda")
        strategy.before_task(module, task)
        batch = _cuda_batch(module)
        strategy.on_train_batch_start(module, batch)
        from lmas.lm.likelihood import answer_logits

        out = dict(zip(("logits", "targets", "rows"), answer_logits(module.net, batch)))
        terms = until_host_sync(lambda: strategy.loss_terms(module, batch, out))  # multi-token: a masked shape
        assert terms is None or terms["kd"].device == torch.device("cuda:0")


class _CpuTeacher:
    """An external teacher (:class:`lmas.distill.teachers.ExternalTeacher`) with its own model on the CPU:
    label scores from a fixed random projection of the prompt's character counts."""

    name = "cpu-teacher"

    def fit(self, task) -> None:
        self.w = torch.randn(26, len(task.labels), generator=torch.Generator().manual_seed(0))

    def label_scores(self, prompts, labels):
        with torch.device("cpu"):
            counts = torch.tensor([[float(p.lower().count(c)) for c in "abcdefghijklmnopqrstuvwxyz"] for p in prompts])
            return counts @ self.w


def test_external_teachers_outputs_join_the_cache_on_the_model_device(pop):
    """An external teacher's scores come from the CPU; the cache they join is on the student's device."""
    strategy = Distill(teachers=["a"], external=[_CpuTeacher()], cache=True)
    module = _module(pop, strategy)
    with fake_cuda():
        pop.model.to("cuda")
        strategy.before_task(module, TASK)
        assert strategy.current.teachers == ["a", "cpu-teacher"]
        assert strategy.current.label_p.device == torch.device("cuda:0")
        assert tuple(strategy.current.label_p.shape) == (2, len(TASK.train), 2)


def test_strategy_passes_follow_the_model_device(pop):
    """The batches strategies collate themselves (EWC's Fisher, A-GEM's memory), LwF's teacher pass and
    O-LoRA's terms. (Backward passes need a real device: EWC's Fisher and A-GEM's reference gradient
    on CUDA are in tests/gpu.)"""
    lwf, olora = LwF(alpha=1.0), OLoRA(lambda_orth=0.5, lambda_l2=0.1)
    lwf.trained["b"] = olora.trained["b"] = 1
    lwf.before_task(_module(pop, lwf), TASK)  # adapters are added before the fake mode (it cannot add
    olora.before_task(_module(pop, olora), TASK)  # parameters); the run adds them on the base's device
    with fake_cuda():
        pop.model.to("cuda")
        module = _module(pop, EWC())
        own = module.batch_of(module.examples[:3])
        assert {v.device for v in own.values()} == {torch.device("cuda:0")}
        batch = _cuda_batch(module)

        module = _module(pop, lwf)
        lwf.before_task(module, TASK)  # the start-of-task snapshot, on the device
        from lmas.lm.likelihood import answer_logits

        logits, _, _ = answer_logits(module.net, batch)
        assert lwf.loss_terms(module, batch, {"logits": logits})["lwf"].device == torch.device("cuda:0")

        module = _module(pop, olora)
        olora.before_task(module, TASK)
        assert len(pop.agents["b"].adapters) == 2
        assert {p.device for p in pop.parameters_of("b").values()} == {torch.device("cuda:0")}
        terms = olora.loss_terms(module, batch, {})
        assert set(terms) == {"olora_orth", "olora_l2"}
        assert {t.device for t in terms.values()} == {torch.device("cuda:0")}


# --- precision ----------------------------------------------------------------------------------
def test_precision_flags_map_to_autocast_and_unsupported_ones_are_refused():
    assert autocast_dtype("bf16-mixed") is torch.bfloat16 and autocast_dtype("16-mixed") is torch.float16
    assert autocast_dtype("32-true") is None and autocast_dtype(None) is None and autocast_dtype(32) is None
    for bad in ("bf16-true", "16-true", "64-true", "transformer-engine"):
        with pytest.raises(ValueError, match=f"trainer.precision='{bad}'"):
            autocast_dtype(bad)
    with torch.no_grad(), autocast("bf16-mixed", torch.device("cpu")):
        assert torch.nn.Linear(4, 4)(torch.ones(1, 4)).dtype == torch.bfloat16
    assert trainer_device({"accelerator": "cpu", "devices": 1}) == torch.device("cpu")


def test_config_check_refuses_a_half_true_precision(compose):
    from lmas.config import validate

    with pytest.raises(ValueError, match=r"trainer.precision='?bf16-true'?: expected 32-true, bf16-mixed"):
        validate(compose(["model=tiny", "trainer.precision=bf16-true"]))


def _run(base, tmp_path, precision):
    pop = Population(base, agents=["a"], lora={"r": 4, "alpha": 8}, seed=0)
    task = Task("news", "classification", TASK.train, TASK.train[:4], TASK.train[:4], LABELS)
    loop = ContinualLoop(pop, Stream("s", [task]), Distill(teachers="peers"), tmp_path, seed=0,
                         train=TrainConfig(lr=1e-2, max_steps=4, batch_size=3, epochs=2),
                         eval=EvalConfig(batch_size=4, initial=False, next_task=False, curve_every=2),
                         trainer={"precision": precision, "gradient_clip_val": 1.0},
                         progress=False, save_adapters=False)
    results = loop.run()
    scorer = PopulationScorer(pop, loop.encoder, batch_size=4, precision=precision)
    return pop, results, scorer.label_logprobs(["a"], [ex.prompt for ex in task.test], LABELS)


def test_bf16_mixed_trains_fp32_lora_weights_and_scores_close_to_fp32(tmp_path):
    """Four bf16-mixed steps on the CPU (with a learning curve scored inside the fit): LoRA weights and
    the base stay float32; the losses are finite and within 2e-3 (relative) of the float32 run's
    (measured: 4e-5; bf16's rounding step is 8e-3); the label log-likelihoods of the trained
    adapters, scored under the evaluator's autocast, differ from the float32 ones (autocast is on)
    by less than 0.02 nats (measured: 0.002)."""
    from lmas.models.providers import tiny

    def base():
        return tiny(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=0)

    pop16, res16, lp16 = _run(base(), tmp_path / "bf16", "bf16-mixed")
    _, res32, lp32 = _run(base(), tmp_path / "fp32", "32-true")
    lora = [p for n, p in pop16.model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert all(p.dtype == torch.float32 for p in pop16.model.parameters())  # the base is not cast either
    loss16, loss32 = res16["loss_curves"]["a/news"], res32["loss_curves"]["a/news"]
    assert len(loss16) == 4 and all(math.isfinite(v) for v in loss16)
    assert loss16 != loss32 and loss16 == pytest.approx(loss32, rel=2e-3)
    assert lp16.dtype == torch.float32 and lp16.device == torch.device("cpu")
    gap = (lp16 - lp32).abs().max().item()
    assert 0 < gap < 0.02
    assert [s for s, _ in res16["learning_curves"]["a/news"]] == [0, 2, 4]
