"""Breadcrumbs, DELLA and Model Stock merges of task vectors: each step by hand on small matrices, then through
merge_adapters on a population (the merge factored back, its truncation error the SVD tail of the hand merge)."""

from __future__ import annotations

import math

import pytest
import torch

from lmas.transfer import merge_adapters
from lmas.transfer.task_vectors import (
    breadcrumbs_mask,
    della_drop,
    della_keep_probabilities,
    elect_and_fuse,
    merge,
    model_stock_ratio,
)


def test_breadcrumbs_drops_the_largest_outliers_and_the_small_tail():
    tau = torch.tensor([float(i) * (-1) ** i for i in range(1, 101)]).view(10, 10)  # magnitudes 1..100
    mask = breadcrumbs_mask(tau, density=0.5, gamma=0.01)
    kept = sorted(int(v) for v in tau.abs()[mask].tolist())
    assert kept == list(range(50, 100))  # 100 (the top 1%) dropped, the next 50 kept, 1..49 dropped
    got = merge([tau, 2 * tau], [1.0, -0.5], "breadcrumbs", density=0.5)
    assert torch.equal(got, torch.zeros_like(tau))  # 1 * m tau - 0.5 * m (2 tau) = 0
    with pytest.raises(ValueError, match="breadcrumbs: density=1.0, gamma=0.01"):
        breadcrumbs_mask(tau, 1.0)


def test_della_keeps_larger_entries_more_often_and_is_unbiased():
    row = torch.tensor([[1.0, -3.0, 2.0]])
    p = della_keep_probabilities(row, density=0.5, epsilon=0.2)
    torch.testing.assert_close(p, torch.tensor([[0.4, 0.6, 0.5]]))  # ranks 0, 2, 1 of |.| within the row
    gen = torch.Generator().manual_seed(0)
    tau = torch.randn(8, 16, generator=gen, dtype=torch.float64)
    draws = torch.stack([della_drop(tau, 0.3, gen) for _ in range(4000)])
    kept = (draws != 0).double().mean(0)
    torch.testing.assert_close(kept, della_keep_probabilities(tau, 0.3), atol=0.04, rtol=0)
    torch.testing.assert_close(draws.mean(0), tau, atol=4 * tau.abs().max().item() / math.sqrt(4000 * 0.25), rtol=0)
    with pytest.raises(ValueError, match="della: density=0.05, epsilon=0.2"):
        della_keep_probabilities(row, 0.05, 0.2)


def test_sign_election_keeps_the_mean_of_the_agreeing_entries():
    a, b = torch.tensor([1.0, -2.0, 0.0, 1.0]), torch.tensor([3.0, 1.0, -1.0, -1.0])
    torch.testing.assert_close(elect_and_fuse([a, b]), torch.tensor([2.0, -2.0, -1.0, 0.0]))


def test_model_stock_ratio_follows_the_angle():
    x, y = torch.tensor([1.0, 0.0]), torch.tensor([0.5, math.sqrt(3) / 2])  # cos = 0.5
    assert model_stock_ratio([x, y]) == pytest.approx(2 * 0.5 / (1 + 0.5))
    assert model_stock_ratio([x, torch.tensor([0.0, 2.0])]) == 0.0  # orthogonal: back to the base
    assert model_stock_ratio([x, 3 * x, 2 * x]) == pytest.approx(1.0)  # aligned: kept
    got = merge([x, y], [1.0, 3.0], "model_stock")
    torch.testing.assert_close(got, (2 / 3) * (x + 3 * y) / 4)
    with pytest.raises(ValueError, match="at least two"):
        model_stock_ratio([x])


def test_task_vector_merges_on_a_population(make_population, tx):
    pop = make_population(["a", "b"], tx.CONFIGS["r2-qv"])
    tx.randomise(pop, "a", 1)
    tx.randomise(pop, "b", 2)
    da, db = tx.deltas(pop, "a"), tx.deltas(pop, "b")
    worst = merge_adapters(pop, ["a", "b"], [1.0, 1.0], "stock", "model_stock")
    assert worst == pytest.approx(0.0, abs=1e-6)  # a mean of two rank-2 updates has rank <= 4 = the sum of ranks
    for m, d in tx.deltas(pop, "stock").items():
        t = model_stock_ratio([da[m], db[m]])
        torch.testing.assert_close(d, t * (da[m] + db[m]) / 2, atol=1e-5, rtol=0)
    worst = merge_adapters(pop, ["a", "b"], [1.0, 0.5], "crumbs", "breadcrumbs", density=0.8)
    tails = []
    for m in da:  # the pruned merge is not low-rank: its rank-4 factors are the best rank-4 approximation
        want = merge([da[m].double(), db[m].double()], [1.0, 0.5], "breadcrumbs", density=0.8)
        s = torch.linalg.svdvals(want)
        tails.append((s[4:].square().sum() / s.square().sum()).sqrt().item())
        u, sv, vh = torch.linalg.svd(want)
        best = (u[:, :4] * sv[:4]) @ vh[:4]
        torch.testing.assert_close(tx.deltas(pop, "crumbs")[m].double(), best, atol=1e-5, rtol=0)
    assert worst == pytest.approx(max(tails), rel=1e-4) and worst > 0.01
    merge_adapters(pop, ["a", "b"], [1.0, 1.0], "d1", "della", density=0.5, seed=3)
    merge_adapters(pop, ["a", "b"], [1.0, 1.0], "d2", "della", density=0.5, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(tx.deltas(pop, "d1").values(), tx.deltas(pop, "d2").values()))
    with pytest.raises(ValueError, match="model_stock' needs at least two source agents"):
        merge_adapters(pop, ["a"], [1.0], "x", "model_stock")
    with pytest.raises(ValueError, match="'della' needs `density`"):
        merge_adapters(pop, ["a", "b"], [1.0, 1.0], "x", "della")


def test_merge_methods_records_each_merges_residual_and_runtime(make_population, tx):
    from lmas.transfer.policy import MergeMethods

    pop = make_population(["a", "b"], tx.CONFIGS["r2-qv"])
    tx.randomise(pop, "a", 1)
    tx.randomise(pop, "b", 2)
    for name in ("a", "b"):
        pop.agents[name].history.append({"round": 0, "event": "trained", "task": "t"})
    policy = MergeMethods(methods=["exact", "breadcrumbs", "model_stock"], start=1, density=0.5)
    records = policy.apply(pop, 1)
    assert [r["agent"] for r in records] == ["merged_exact", "merged_breadcrumbs", "merged_model_stock"]
    assert all(r["merge_s"] > 0 and r["sources"] == ["a", "b"] for r in records)
    assert records[0]["residual"] == 0 and records[1]["residual"] > 0  # pruning is not low-rank


def test_knots_aligns_the_task_vectors_in_one_basis_before_ties():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 2, generator=gen, dtype=torch.float64) @ torch.randn(2, 5, generator=gen, dtype=torch.float64)
    b = torch.randn(6, 2, generator=gen, dtype=torch.float64) @ torch.randn(2, 5, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(merge([a], [1.0], "knots_ties", density=1.0), a)  # one task, nothing trimmed
    torch.testing.assert_close(merge([a, a], [1.0, 1.0], "knots_ties", density=1.0), a)  # agreeing: their mean
    u, s, vh = torch.linalg.svd(torch.cat([a, b], dim=1), full_matrices=False)
    va, vb = vh[:4, :5], vh[:4, 5:]  # rank 4: a = U S Va^T, b = U S Vb^T in the shared basis
    torch.testing.assert_close((u[:, :4] * s[:4]) @ va, a)
    want = (u[:, :4] * s[:4]) @ elect_and_fuse([0.5 * va, 2.0 * vb])
    torch.testing.assert_close(merge([a, b], [0.5, 2.0], "knots_ties", density=1.0), want)
    trimmed = merge([a, b], [1.0, 1.0], "knots_ties", density=0.25)
    assert not torch.allclose(trimmed, merge([a, b], [1.0, 1.0], "knots_ties", density=1.0))
