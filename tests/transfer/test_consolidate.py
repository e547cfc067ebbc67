"""transfer=consolidate: duplicates by cosine, the smallest rank within an error budget by hand, and a
consolidation on a population (duplicates fused TIES-style, a low-rank unit re-ranked, the library shrinks)."""

from __future__ import annotations

import math

import pytest
import torch

from lmas.transfer.consolidate import Consolidate, cosine, duplicate_pairs, library, smallest_rank
from lmas.transfer.task_vectors import elect_and_fuse


def test_duplicates_are_the_most_similar_disjoint_pairs():
    x = {"m": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
    assert cosine(x, {"m": 2 * x["m"]}) == pytest.approx(1.0)
    assert cosine(x, {"m": torch.tensor([[0.0, 1.0], [1.0, 0.0]])}) == pytest.approx(0.0)
    units = {"a": x, "b": {"m": x["m"] + 0.1}, "c": {"m": -x["m"]}, "d": {"m": x["m"] + 0.11}}
    cos = {(p, q): cosine(units[p], units[q]) for p, q in (("a", "b"), ("a", "d"), ("b", "d"))}
    assert cos[("b", "d")] > cos[("a", "b")] > cos[("a", "d")] > 0.9
    pairs = duplicate_pairs(units, 0.9)
    assert [(a, b) for a, b, _ in pairs] == [("b", "d")]  # the most similar pair; a is left (b is taken), c differs
    assert pairs[0][2] == pytest.approx(cos[("b", "d")])


def test_smallest_rank_within_the_budget():
    w = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.1]))
    k, err = smallest_rank(w, 0.05)
    assert k == 3 and err == pytest.approx(math.sqrt(0.01 / 14.01))
    assert smallest_rank(w, 0.0) == (4, 0.0)
    assert smallest_rank(w, 0.6)[0] == 1


def test_a_consolidation_fuses_duplicates_reranks_and_shrinks_the_library(make_population, tx):
    pop = make_population(["a", "b", "c"], tx.CONFIGS["r4-qv"])
    tx.randomise(pop, "a", 1)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # b: a near copy of a; c: a rank-1 update in a rank-4 adapter
        for (name, p), q in zip(pop.parameters_of("b").items(), pop.parameters_of("a").values()):
            p.copy_(q + 0.01 * torch.randn(q.shape, generator=gen))
        for name, p in pop.parameters_of("c").items():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            if "lora_B" in name:
                p[:, 1:] = 0
    for n in pop.names:
        pop.agents[n].history.append({"round": 0, "event": "trained", "task": "t"})
    da, db = tx.deltas(pop, "a"), tx.deltas(pop, "b")
    before = library(pop, pop.names)
    records = Consolidate(every=2, threshold=0.9, budget=0.01).apply(pop, 2)
    fused = [r for r in records if r["method"] == "ties_fuse"]
    assert sorted(r["agent"] for r in fused) == ["a", "b"] and all(r["cosine"] > 0.99 for r in fused)
    worst = 0.0
    for m in da:  # both hold the TIES fusion of the pair, at their rank: its best rank-4 approximation
        u, s, vh = torch.linalg.svd(elect_and_fuse([da[m], db[m]]).double())
        want = (u[:, :4] * s[:4]) @ vh[:4]
        torch.testing.assert_close(tx.deltas(pop, "a")[m].double(), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(tx.deltas(pop, "b")[m].double(), want, atol=1e-5, rtol=0)
        worst = max(worst, (s[4:].square().sum() / s.square().sum()).sqrt().item())
    assert fused[0]["residual"] == pytest.approx(worst, rel=1e-3)
    rerank = [r for r in records if r["method"] == "rerank" and r["agent"] == "c"]
    assert rerank and rerank[0]["rank_before"] == 4 and rerank[0]["rank"] == 1 and rerank[0]["residual"] < 1e-5
    after = library(pop, pop.names)
    assert (before["units"], after["units"]) == (3, 2) and after["bytes"] < before["bytes"]
    assert records[0]["library"] == {"before": before, "after": after}
    assert Consolidate(every=2).apply(pop, 1) == []  # not due


def test_every_run_records_its_library_per_round_and_consolidation_shrinks_it(run_lmas, fast_overrides, tmp_path):
    """results.json ``library``: after each round, the knowing agents' units and bytes; without consolidation every
    unit keeps its size, with re-ranking (a budget of 0.5) the library after a consolidating round is its record's
    ``after`` (smaller than its ``before``) plus the units of agents that learnt for the first time in that round."""
    base = fast_overrides + ["population.agents=2", "allocation=round_robin"]
    plain = run_lmas(base, tmp_path / "none")
    knowing = [len({a for rnd in plain["population"]["assignments"][: r + 1]
                   for a, _ in rnd}) for r in range(len(plain["library"]))]
    assert [e["round"] for e in plain["library"]] == list(range(len(plain["matrix"]["values"])))
    assert [e["units"] for e in plain["library"]] == knowing and knowing[-1] == 2
    unit = plain["library"][0]["bytes"]
    assert unit > 0 and all(e["bytes"] == e["units"] * unit for e in plain["library"])
    merged = run_lmas(base + ["transfer=consolidate", "transfer.every=1", "transfer.budget=0.5"], tmp_path / "cons")
    reranked = {e["round"]: e for a in merged["agents"].values() for e in a["history"] if e.get("method") == "rerank"}
    assert reranked, "the 0.5 budget re-ranks some unit"
    for r, rec in reranked.items():  # consolidated before the round's training; an agent new in round r adds a unit
        assert rec["library"]["after"]["bytes"] < rec["library"]["before"]["bytes"]
        new = knowing[r] - knowing[r - 1]
        assert merged["library"][r]["bytes"] == rec["library"]["after"]["bytes"] + new * unit
    assert merged["library"][-1]["bytes"] < plain["library"][-1]["bytes"]
