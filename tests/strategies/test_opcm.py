"""OPCM: the projection and the adaptive scaling by hand, the strategy's merge on a population (a fresh adapter per
task, the merge written back as the best approximation at max_rank), and a run with resume."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lmas.population.population import Population
from lmas.strategies.opcm import OPCM, global_norm, opcm_step, principal_split, project_out
from lmas.transfer.factors import delta, read_factors


def test_the_projection_drops_the_diagonal_and_the_principal_block():
    merged = torch.diag(torch.tensor([3.0, 2.0, 1.0]))  # U = V = I, singular values 3, 2, 1 (shares .5, .83, 1)
    assert principal_split(torch.tensor([3.0, 2.0, 1.0]), 0.6) == 1
    assert principal_split(torch.tensor([3.0, 2.0, 1.0]), 0.9) == 2
    task = torch.ones(3, 3)
    torch.testing.assert_close(project_out(merged, task, 0.9),
                               torch.tensor([[0.0, 0, 1], [0, 0, 1], [1, 1, 0]]))  # fmt: skip
    torch.testing.assert_close(project_out(merged, task, 0.6), torch.ones(3, 3) - torch.eye(3))


def test_the_adaptive_scaling_keeps_the_mean_task_vector_norm():
    merged, task = {"m": torch.tensor([[2.0, 0.0], [0.0, 1.0]])}, {"m": torch.ones(2, 2)}
    new, lam = opcm_step(merged, task, lam=1.0, mean_norm=2.0, alpha=0.5)
    raw = torch.tensor([[2.0, 1.0], [1.0, 1.0]])  # 1 * M + (the task without its diagonal)
    assert lam == pytest.approx(math.sqrt(7) / 2)
    torch.testing.assert_close(new["m"], raw / lam)
    assert global_norm(new) == pytest.approx(2.0)


def test_each_task_starts_fresh_and_the_merge_is_written_at_max_rank(tiny_base):
    pop = Population(tiny_base, agents=1, lora={"r": 2, "alpha": 4})
    agent = pop.names[0]
    module = SimpleNamespace(population=pop, agent=agent)
    strategy = OPCM(alpha=0.5, max_rank=4)
    gen = torch.Generator().manual_seed(0)

    def train():  # stands in for a fit: a random update of the trainable adapter
        with torch.no_grad():
            for p in pop.parameters_of(agent).values():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    strategy.before_task(module, None)
    train()
    tau1 = {m: delta(a, b) for m, (a, b) in read_factors(pop, agent).items()}
    strategy.after_task(module, None)
    strategy.before_task(module, None)
    assert all(delta(a, b).abs().max() == 0 for a, b in read_factors(pop, agent).values())  # from the base
    train()
    tau2 = {m: delta(a, b) for m, (a, b) in read_factors(pop, agent).items()}
    strategy.after_task(module, None)
    want, lam = opcm_step(tau1, tau2, 1.0, (global_norm(tau1) + global_norm(tau2)) / 2, 0.5)
    assert strategy.lam[agent] == pytest.approx(lam) and pop.lora_of(pop.agents[agent].trainable).r == 4
    worst = 0.0
    for m, (a, b) in read_factors(pop, agent).items():
        u, s, vh = torch.linalg.svd(want[m].double())
        torch.testing.assert_close(delta(a, b).double(), (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5, rtol=0)
        worst = max(worst, (s[4:].square().sum() / s.square().sum()).sqrt().item())
    assert strategy.fit_info()["opcm_residual"] == pytest.approx(worst, rel=1e-4)
    strategy.before_task(module, None)  # the third task trains a fresh rank-2 adapter again
    assert pop.lora_of(pop.agents[agent].trainable).r == 2
    with pytest.raises(ValueError, match="strategy.alpha=1"):
        OPCM(alpha=1)
