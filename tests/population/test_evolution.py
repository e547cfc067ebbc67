"""Populations that evolve (loop=evolution): PBT's exploit/explore, CycleQD's crossover and SVD mutation, the
MAP-Elites archive and Model Swarms' velocity by hand; runs on the tiny model with lineage, messages and the
per-agent settings (resume: tests/test_resume.py)."""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

from lmas.population.evolution import Evolution, strategy_values
from lmas.population.search import (
    Archive,
    Elite,
    copy_agent,
    crossover,
    exploit_pairs,
    explore,
    sample_hparams,
    set_rank,
    svd_mutation,
    swarm_velocity,
)
from lmas.transfer.factors import delta, read_factors

FAST = ["model=tiny", "debug=fast", "logger=csv", "experiment=evolution", "population.agents=3"]


def _factors(seed: int, rank: int = 2, shape: tuple[int, int] = (6, 5)) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {m: (torch.randn(rank, shape[1], generator=g, dtype=torch.float64),
                torch.randn(shape[0], rank, generator=g, dtype=torch.float64)) for m in ("q", "v")}  # fmt: skip


def test_sampled_hyperparameters_are_log_uniform_within_the_space():
    rng = random.Random(0)
    draws = [sample_hparams({"lr": [1e-4, 1e-2], "rank": [2, 16]}, rng) for _ in range(4000)]
    lrs, ranks = [d["lr"] for d in draws], [d["rank"] for d in draws]
    assert min(lrs) >= 1e-4 and max(lrs) <= 1e-2 and {r for r in ranks} <= set(map(float, range(2, 17)))
    assert statistics.median(lrs) == pytest.approx(1e-3, rel=0.1)  # the geometric midpoint
    below = sum(lr < 1e-3 for lr in lrs) / len(lrs)
    assert below == pytest.approx(0.5, abs=0.03)


def test_exploit_pairs_the_bottom_quantile_with_the_top_one_capped_at_half():
    fitness = {"a": 0.1, "b": 0.9, "c": 0.5, "d": 0.4}
    assert exploit_pairs(fitness, 0.25, random.Random(0)) == [("a", "b")]  # ceil(4 * 0.25) = 1
    pairs = exploit_pairs(fitness, 0.5, random.Random(0))
    assert [p[0] for p in pairs] == ["a", "d"] and {p[1] for p in pairs} <= {"b", "c"}
    assert len(exploit_pairs({"a": 0.0, "b": 1.0, "c": 0.5}, 0.5, random.Random(0))) == 1  # ceil(1.5)=2, at most 3//2
    assert exploit_pairs({"x": 0.3, "y": 0.3}, 0.5, random.Random(0)) == [("x", "y")]  # ties rank by name


def test_explore_perturbs_by_the_ray_factors_or_resamples_within_the_space():
    space = {"lr": [1e-4, 1e-2], "rank": [2, 16], "strategy.lam": [0.01, 10.0]}
    start = {"lr": 1e-3, "rank": 8.0, "strategy.lam": 1.0}
    rng = random.Random(1)
    for _ in range(50):
        new = explore(start, space, 0.0, rng)
        assert any(new["lr"] == pytest.approx(start["lr"] * f) for f in (0.8, 1.2))
        assert new["rank"] in (6.0, 10.0) and any(new["strategy.lam"] == pytest.approx(f) for f in (0.8, 1.2))
    clipped = explore({"lr": 1e-2, "rank": 16.0, "strategy.lam": 10.0}, space, 0.0, random.Random(3))
    assert clipped["lr"] <= 1e-2 and clipped["rank"] <= 16 and clipped["strategy.lam"] <= 10.0
    resampled = [explore(start, space, 1.0, rng)["lr"] for _ in range(200)]
    assert len(set(resampled)) > 150 and all(1e-4 <= v <= 1e-2 for v in resampled)


def test_crossover_is_the_weighted_merge_of_the_updates():
    a, b = _factors(0), _factors(1, rank=3)
    child = crossover(a, b, 0.3)
    for m in a:
        torch.testing.assert_close(delta(*child[m]), 0.3 * delta(*a[m]) + 0.7 * delta(*b[m]))


def test_svd_mutation_scales_singular_values_within_sigma_and_keeps_singular_vectors():
    f = _factors(2, rank=3)
    same = svd_mutation(f, 0.0, torch.Generator().manual_seed(0))
    for m in f:
        torch.testing.assert_close(delta(*same[m]), delta(*f[m]))
    mutated = svd_mutation(f, 0.5, torch.Generator().manual_seed(0))
    for m in f:
        u, s, vh = torch.linalg.svd(delta(*f[m]))
        core = u[:, :3].T @ delta(*mutated[m]) @ vh[:3].T  # the update in the original singular basis
        torch.testing.assert_close(core, torch.diag(torch.diagonal(core)), atol=1e-9, rtol=0)  # vectors kept
        ratio = torch.diagonal(core) / s[:3]
        assert torch.all(ratio >= 0.5) and torch.all(ratio <= 1.5)
        assert not torch.allclose(ratio, torch.ones(3, dtype=ratio.dtype))
        assert torch.linalg.matrix_rank(delta(*mutated[m])) == 3


def test_swarm_velocity_by_hand():
    x, v, p, g, w = ({"t": torch.tensor([float(i)])} for i in (1, 2, 3, 5, -1))
    phi, r = (0.2, 0.3, 0.4, 0.05), (1.0, 0.5, 0.25, 1.0)
    c = [0.2, 0.15, 0.1, 0.05]
    expected = (c[0] * 2 + c[1] * (3 - 1) + c[2] * (5 - 1) - c[3] * (-1 - 1)) / sum(c)
    assert swarm_velocity(x, v, p, g, w, phi, r)["t"].item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="sum to 0"):
        swarm_velocity(x, v, p, g, w, (0, 0, 0, 0), r)


def test_the_archive_keeps_the_fittest_per_cell():
    archive = Archive(bins=2)
    e = lambda key, fit, d: Elite(key, fit, d, {}, [key])  # noqa: E731
    assert archive.add(e("a", 0.5, (0.1, 0.9)))
    assert not archive.add(e("b", 0.4, (0.2, 0.8)))  # same cell (0, 1), less fit
    assert archive.add(e("c", 0.6, (0.3, 0.7)))  # same cell, fitter: replaces a
    assert archive.add(e("d", 0.1, (1.0, 0.0)))  # descriptor 1.0 falls in the last bin
    assert archive.cell((1.0, 0.0)) == (1, 0) and archive.cell((-0.2, 2.0)) == (0, 1)
    assert [x.key for x in archive.elites()] == ["c", "d"] and archive.coverage() == 0.5


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="loop.method='ga'"):
        Evolution(method="ga")
    with pytest.raises(ValueError, match=r"loop.pbt: unknown option\(s\) \['quantile'\]"):
        Evolution(pbt={"quantile": 0.2})
    with pytest.raises(ValueError, match="loop.pbt.space.momentum: expected lr, rank or strategy"):
        Evolution(pbt={"space": {"momentum": [0.1, 0.9]}})
    with pytest.raises(ValueError, match=r"loop.pbt.space.lr=\[0.0, 1.0\]"):
        Evolution(pbt={"space": {"lr": [0.0, 1.0]}})
    with pytest.raises(ValueError, match="loop.qd.descriptors"):
        Evolution(method="qd", qd={"descriptors": ["a"]})


def test_strategy_values_set_the_composed_part_and_restore_it():
    from lmas.strategies.compose import Compose
    from lmas.strategies.olora import OLoRA

    olora = OLoRA(lambda_orth=0.5)
    composed = Compose([olora])
    with strategy_values(composed, {"lambda_orth": 0.01}):
        assert olora.lambda_orth == 0.01
    assert olora.lambda_orth == 0.5


def test_copy_is_exact_across_ranks_and_set_rank_refactorises(tiny_base):
    from lmas.population.population import Population

    pop = Population(tiny_base, agents=["a", "b"], lora={"r": 4, "alpha": 8})
    with torch.no_grad():
        for p in pop.parameters_of("a").values():
            p.normal_(0, 0.3)
    pop.resize_adapter("b", 2)
    assert copy_agent(pop, "a", "b") == 0.0  # b takes a's rank and weights
    assert pop.lora_of(pop.agents["b"].trainable).r == 4
    for m, (a, b) in read_factors(pop, "a").items():
        torch.testing.assert_close(delta(*read_factors(pop, "b")[m]), delta(a, b))
    before = {m: delta(a, b) for m, (a, b) in read_factors(pop, "b").items()}
    residual = set_rank(pop, "b", 2)
    worst = 0.0
    for m, (a, b) in read_factors(pop, "b").items():
        u, s, vh = torch.linalg.svd(before[m].double())
        torch.testing.assert_close(delta(a, b).double(), (u[:, :2] * s[:2]) @ vh[:2], atol=1e-5, rtol=0)
        worst = max(worst, math.sqrt(float(s[2:].square().sum() / s.square().sum())))
    assert residual == pytest.approx(worst, rel=1e-4) and residual > 0


def test_a_pbt_run_gives_each_agent_its_own_settings_and_records_every_exploit(run_lmas, tmp_path, monkeypatch):
    from lmas.loop import ContinualLoop

    used: dict[tuple[int, str], tuple] = {}
    fit = ContinualLoop.fit

    def spy(self, agent, task, seen, round_idx, strategy=None, lr=None):
        used[round_idx, agent] = (lr, self.strategy.ewc_lambda)  # what this fit trains with
        return fit(self, agent, task, seen, round_idx, strategy, lr)

    monkeypatch.setattr(ContinualLoop, "fit", spy)
    res = run_lmas([*FAST, "strategy=ewc", "+loop.pbt.space.strategy.ewc_lambda=[1,1000]",
                    "loop.pbt.quantile_fraction=0.5", f"paths.output_dir={tmp_path}"], tmp_path / "pbt")  # fmt: skip
    steps = res["evolution"]["steps"]
    assert [s["round"] for s in steps] == [0, 1, 2] and all(len(s["exploits"]) == 1 for s in steps)
    for r, hparams in enumerate([None] + [s["hparams"] for s in steps[:-1]]):  # round r trains with the last step's
        for agent in ("agent0", "agent1", "agent2"):
            if hparams is None:  # round 0: the sampled start, each agent its own
                assert len({used[0, a][0] for a in ("agent0", "agent1", "agent2")}) == 3
                continue
            assert used[r, agent] == pytest.approx((hparams[agent]["lr"], hparams[agent]["strategy.ewc_lambda"]))
    assert res["strategy"] == "ewc" and 100.0 not in {v[1] for v in used.values()}  # never the preset's value
    for s in steps:
        (ex,) = s["exploits"]
        assert s["fitness"][ex["loser"]] <= min(s["fitness"].values()) + 1e-12
        assert s["fitness"][ex["winner"]] >= max(s["fitness"].values()) - 1e-12
    for s in steps:  # the lineage edge in the receiving agent's history
        (ex,) = s["exploits"]
        history = res["agents"][ex["loser"]]["history"]
        assert {"round": s["round"], "event": "pbt", "sources": [ex["winner"]]}.items() <= next(
            e for e in history if e["event"] == "pbt" and e["round"] == s["round"]
        ).items()
    comm = res["population"]["communication"]
    assert all(c["by_kind"]["adapter"]["messages"] == 1 and c["bytes"] > 0 for c in comm)


@pytest.mark.parametrize("method", ["qd", "swarm"])
def test_qd_and_swarm_runs_record_their_search_and_never_lower_the_best_fitness(method, run_lmas, tmp_path):
    res = run_lmas([*FAST, f"loop.method={method}", f"paths.output_dir={tmp_path}"], tmp_path / method)
    steps = res["evolution"]["steps"]
    assert len(steps) == 3
    if method == "qd":
        assert steps[0] == {"round": 0, "method": "qd", "skipped": "one task met"}  # one task: no descriptors yet
        for s in steps[1:]:
            assert len(s["children"]) == 2 and 0 < s["coverage"] <= 1
            assert all(set(c["parents"]) <= {"agent0", "agent1", "agent2", "child0.0"} for c in s["children"])
            fits = [c["fitness"] for c in s["archive"]]
            assert fits == sorted(fits, reverse=True)
            assert set(s["population"]) == {"agent0", "agent1", "agent2"}
    else:
        for s in steps:
            start = s["iterations"][0]["fitness"]
            assert len(s["iterations"]) == 2 and s["global_best"] >= max(s["personal_best"].values()) - 1e-12
            assert all(s["personal_best"][a] >= 0 for a in start)
            assert s["iterations"][1]["step"] == pytest.approx(0.5 * 0.95)
        assert all(c["by_kind"]["adapter"]["messages"] > 0 for c in res["population"]["communication"])


def test_stacking_strategies_and_one_agent_are_refused(run_lmas, tmp_path):
    with pytest.raises(ValueError, match="loop.method=swarm: strategy=inclora stacks one adapter per task"):
        run_lmas([*FAST, "loop.method=swarm", "strategy=inclora", f"paths.output_dir={tmp_path}"], tmp_path / "a")
    with pytest.raises(ValueError, match="evolution needs 2 or more"):
        run_lmas([*FAST, "population.agents=1", f"paths.output_dir={tmp_path}"], tmp_path / "b")
    for strategy in ("ewc", "lwf"):  # LwF: its teacher copy is a spare adapter at the population's rank
        with pytest.raises(ValueError, match=f"loop.pbt.space.rank: strategy={strategy} keeps per-agent state of the"):
            run_lmas([*FAST, f"strategy={strategy}", "+loop.pbt.space.rank=[2,8]", f"paths.output_dir={tmp_path}"],
                     tmp_path / f"d{strategy}")  # fmt: skip
    with pytest.raises(ValueError, match=r"loop.method=pbt: strategy=\S+ trains with Avalanche"):
        run_lmas([*FAST, "strategy=avalanche/ewc", f"paths.output_dir={tmp_path}"], tmp_path / "e")
    with pytest.raises(ValueError, match=r"loop.pbt.space.strategy.lam: strategy=naive has no 'lam'"):
        run_lmas([*FAST, "+loop.pbt.space.strategy.lam=[0.1,1]", f"paths.output_dir={tmp_path}"], tmp_path / "c")


def test_copy_agent_hands_every_per_agent_state_over():
    from lmas.strategies.compose import Compose
    from lmas.strategies.regularizers import EWC
    from lmas.strategies.replay import Replay

    ewc, replay = EWC(), Replay(capacity=4)
    ewc.consolidated = {"a": {"w": (torch.ones(2), torch.zeros(2))}, "b": {"w": (torch.zeros(3), torch.ones(3))}}
    replay.trained = {"a": 2}
    replay.buffers = {"b": object()}
    Compose([ewc, replay]).copy_agent("a", "b")
    assert torch.equal(ewc.consolidated["b"]["w"][0], torch.ones(2))
    assert ewc.consolidated["b"]["w"][0] is not ewc.consolidated["a"]["w"][0]  # a copy, not a shared tensor
    assert replay.trained == {"a": 2, "b": 2} and "b" not in replay.buffers  # a had no buffer: b's is dropped
