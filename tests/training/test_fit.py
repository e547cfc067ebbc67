"""Fit backends: a strategy names how its experiences are trained; the loop dispatches by that name."""

from __future__ import annotations

import pytest
import torch

from lmas.data.stream import Stream
from lmas.data.task import Example, Task
from lmas.loop import ContinualLoop
from lmas.population.population import Population
from lmas.schema import TrainConfig
from lmas.strategies.base import Strategy
from lmas.strategies.compose import Compose
from lmas.training.avalanche import AvalancheFit, AvalancheStrategy
from lmas.training.fit import Experience, LightningFit


def _task() -> Task:
    rows = [Example(f"item {i} is", ["odd", "even"][i % 2]) for i in range(8)]
    return Task("parity", "classification", rows, rows[:2], rows[:4], ["odd", "even"])


def test_lightning_fit_trains_the_agents_adapter_only(tiny_base):
    pop = Population(tiny_base, agents=1, lora={"r": 2})
    loop = ContinualLoop(pop, Stream("s", [_task()]), Strategy(), "unused", progress=False)
    fit = loop.backends["lightning"]
    assert isinstance(fit, LightningFit) and isinstance(loop.backends["avalanche"], AvalancheFit)
    base = {n: p.detach().clone() for n, p in pop.model.named_parameters() if "lora_" not in n}
    before = {k: v.clone() for k, v in pop.adapter_state("agent0").items()}
    fit.train = TrainConfig(lr=1e-2, batch_size=4, epochs=2, max_steps=3, log_every=1)  # 2 batches per epoch
    losses: list[tuple[int, float]] = []
    result = fit.fit(Experience("agent0", _task(), [(ex, "classification") for ex in _task().train], Strategy(), 0),
                     lambda step, loss: losses.append((step, loss)))
    assert result.steps == 3 and len(result.losses) == 3 and [s for s, _ in losses] == [1, 2, 3]
    assert all(torch.equal(p, base[n]) for n, p in pop.model.named_parameters() if n in base)
    assert any(not torch.equal(v, before[k]) for k, v in pop.adapter_state("agent0").items())


def test_strategies_name_their_backend_and_compose_keeps_one():
    assert Strategy.fit_backend == "lightning" and AvalancheStrategy("ewc").fit_backend == "avalanche"
    assert Compose([AvalancheStrategy("naive")]).fit_backend == "avalanche"
    with pytest.raises(ValueError, match=r"avalanche/ewc trains with its own fit backend"):
        Compose([AvalancheStrategy("ewc"), Strategy()])


def test_the_loop_dispatches_each_fit_to_its_strategy_s_backend(tiny_base, tmp_path):
    pop = Population(tiny_base, agents=1, lora={"r": 2})
    loop = ContinualLoop(pop, Stream("s", [_task()]), Strategy(), tmp_path, train=TrainConfig(max_steps=2),
                         progress=False)
    used: list[str] = []
    for name, backend in loop.backends.items():
        real = backend.fit
        backend.fit = lambda exp, on_loss, curve=None, real=real, name=name: (used.append(name),
                                                                               real(exp, on_loss, curve))[1]
    loop.fit("agent0", _task(), [], 0)
    loop.fit("agent0", _task(), [], 1, strategy=AvalancheStrategy("naive"))
    assert used == ["lightning", "avalanche"]
    assert [e["event"] for e in pop.agents["agent0"].history] == ["trained", "trained"]
    assert loop.state.step == sum(e["steps"] for e in pop.agents["agent0"].history) >= 2
