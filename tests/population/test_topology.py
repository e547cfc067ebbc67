"""Topologies: neighbour graphs, the peer-to-peer exchange (real merges, counted messages),
and the population's joint answer of each topology on given label distributions."""

from __future__ import annotations

import pytest
import torch

from lmas.data.task import Example, Task
from lmas.population.messages import MessageLog
from lmas.population.population import Population
from lmas.population.topology import Hierarchical, MasterWorker, PeerToPeer, TaskView, Topology
from lmas.transfer.factors import delta, lora_layers, read_factors


def test_neighbour_graphs():
    agents = ["a", "b", "c", "d"]
    assert PeerToPeer("ring").neighbours(agents, 0) == {"a": ["d", "b"], "b": ["a", "c"], "c": ["b", "d"],
                                                        "d": ["c", "a"]}
    assert PeerToPeer("ring").neighbours(["a", "b"], 0) == {"a": ["b"], "b": ["a"]}
    assert PeerToPeer("all_to_all").neighbours(agents, 3)["c"] == ["a", "b", "d"]
    g = PeerToPeer("gossip", fanout=2, seed=5)
    r0, r0_again, r1 = g.neighbours(agents, 0), g.neighbours(agents, 0), g.neighbours(agents, 1)
    assert r0 == r0_again and r0 != r1  # seeded per round
    assert sum(len(s) for s in r0.values()) == 4 * 2  # every agent sent to two peers
    assert all(b not in senders for b, senders in r0.items() if b in senders)
    with pytest.raises(ValueError, match="graph='star'"):
        PeerToPeer("star")


def _shared_a_population(tiny_base, names):
    """Agents whose A factors are equal, so the sum of their updates has rank r (merges are exact)."""
    pop = Population(tiny_base, agents=names, lora={"r": 4, "alpha": 8})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        a_weights = {}
        for n, p in pop.model.named_parameters():
            if ".lora_A." in n:
                key = n.split(".lora_A.")[0]
                a_weights.setdefault(key, torch.randn(p.shape, generator=gen))
                p.copy_(a_weights[key])
            elif ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=gen))
    return pop


def test_p2p_exchange_merges_neighbours_and_counts_adapter_messages(tiny_base):
    pop = _shared_a_population(tiny_base, ["a", "b", "c"])
    before = {n: read_factors(pop, n) for n in pop.names}
    log = MessageLog()
    # a and b have learnt something, c has not: c only receives, and takes the mean of what it gets
    records = PeerToPeer("all_to_all", self_weight=0.5).exchange(pop, 0, ["a", "b"], log)
    assert {r["agent"] for r in records} == {"a", "b", "c"}
    after = {n: read_factors(pop, n) for n in pop.names}
    for module, (a0, b0) in before["a"].items():
        da, db = delta(a0, b0), delta(*before["b"][module])
        torch.testing.assert_close(delta(*after["a"][module]), 0.5 * da + 0.5 * db, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(delta(*after["b"][module]), 0.5 * db + 0.5 * da, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(delta(*after["c"][module]), 0.5 * da + 0.5 * db, rtol=1e-4, atol=1e-5)
    size = sum(a.numel() + b.numel() for a, b in before["a"].values()) * 4
    size += sum(len(m.encode()) for m in before["a"])  # module-name keys travel too
    summary = log.round_summary(0)
    assert summary["by_kind"] == {"adapter": {"messages": 4, "bytes": 4 * size}}  # a<->b, a->c, b->c
    rec_c = next(r for r in records if r["agent"] == "c")
    assert rec_c["sources"] == ["a", "b"] and rec_c["weights"] == [0.5, 0.5]
    assert all(r["residual"] < 1e-6 and r["rank"] == 4 for r in records)  # shared A: the sum has rank 4


def test_p2p_exchange_respects_its_period(tiny_base):
    pop = _shared_a_population(tiny_base, ["a", "b"])
    log = MessageLog()
    assert PeerToPeer("ring", every=2).exchange(pop, 0, ["a", "b"], log) == []
    assert len(PeerToPeer("ring", every=2).exchange(pop, 1, ["a", "b"], log)) == 2


def _random_population(tiny_base, names, r=4):
    """Agents with independent random A and B (different A's: a sum of two updates has rank 2r);
    agent ``names[0]`` stacks a second random task adapter (IncLoRA)."""
    pop = Population(tiny_base, agents=names, lora={"r": r, "alpha": 2 * r})
    pop.add_task_adapter(names[0])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pop.model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return pop


def _update(pop, agent, adapters=None):
    """Σ s·B·A over the agent's adapters (default: all of them), per module, from peft's modules."""
    out = {}
    for name, layer in lora_layers(pop).items():
        out[name] = sum(layer.lora_B[ad].weight @ layer.lora_A[ad].weight * layer.scaling[ad]
                        for ad in (adapters or pop.agents[agent].adapters))
    return out


def _eckart_young(want: torch.Tensor, rank: int) -> tuple[float, float]:
    """(‖best rank-k error‖_F, relative error) of approximating ``want``."""
    s = torch.linalg.svdvals(want.double())
    cut = float(s[rank:].square().sum().sqrt())
    return cut, cut / float(s.square().sum().sqrt())


def _exchange_case(tiny_base, max_rank):
    names = ["a", "b", "c"]
    pop = _random_population(tiny_base, names)
    whole = {n: _update(pop, n) for n in names}
    trainable = {n: _update(pop, n, [pop.agents[n].trainable]) for n in names}
    frozen = _update(pop, "a", ["a"])
    records = PeerToPeer("all_to_all", self_weight=0.5, max_rank=max_rank).exchange(pop, 0, names, MessageLog())
    return pop, names, whole, trainable, frozen, {r["agent"]: r for r in records}


def test_p2p_exchange_of_different_a_and_stacked_agents_is_the_weighted_sum_up_to_max_rank(tiny_base):
    pop, names, whole, _, frozen, rec = _exchange_case(tiny_base, max_rank=64)
    for x in names:  # ΔW_x <- ½ ΔW_x + ¼ Σ ΔW_peer, every ΔW the sum of ALL the agent's adapters
        want = {m: 0.5 * whole[x][m] + 0.25 * sum(whole[p][m] for p in names if p != x) for m in whole[x]}
        got = _update(pop, x)
        for m in want:
            torch.testing.assert_close(got[m], want[m], rtol=1e-5, atol=1e-5)
        assert rec[x]["residual"] == 0.0
    # ranks grew to own trainable + what arrived: a 4 + 4 + 4; b and c 4 + 8 (a's two adapters) + 4
    assert {x: rec[x]["rank"] for x in names} == {"a": 12, "b": 16, "c": 16}
    assert pop.model.peft_config["b"].r == 16 and pop.model.peft_config["b"].lora_alpha == 32  # same scaling
    after = _update(pop, "a", ["a"])  # a's frozen adapter kept, scaled by its own weight
    for m in frozen:
        torch.testing.assert_close(after[m], 0.5 * frozen[m], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("max_rank, rank", [(None, 4), (8, 8)])
def test_p2p_exchange_cut_to_a_rank_records_its_residual(tiny_base, max_rank, rank):
    pop, names, whole, trainable, frozen, rec = _exchange_case(tiny_base, max_rank)
    for x in names:
        # the trainable adapter gets ½ its own update + ¼ Σ peers' whole updates, cut to `rank`
        want = {m: 0.5 * trainable[x][m] + 0.25 * sum(whole[p][m] for p in names if p != x) for m in whole[x]}
        kept = {m: 0.5 * frozen[m] for m in frozen} if x == "a" else {m: 0 for m in whole[x]}
        got = _update(pop, x)
        worst = 0.0
        for m in want:
            cut, rel = _eckart_young(want[m], rank)
            err = float((got[m] - kept[m] - want[m]).double().norm())
            assert err == pytest.approx(cut, rel=1e-3, abs=1e-5)  # the best rank-k approximation
            worst = max(worst, rel)
        assert rec[x]["rank"] == rank and pop.model.peft_config[pop.agents[x].trainable].r == rank
        assert rec[x]["residual"] == pytest.approx(worst, rel=1e-4) and worst > 0.05


def test_a_grown_adapter_is_saved_and_loaded_at_its_rank(tiny_base, tmp_path):
    from lmas.models.providers import tiny

    pop, names, _, _, _, _ = _exchange_case(tiny_base, max_rank=64)
    want = {n: _update(pop, n) for n in names}
    for n in names:
        pop.save_adapter(n, tmp_path / f"{n}.safetensors")
    fresh = Population(tiny(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=0), agents=names,
                       lora={"r": 4, "alpha": 8})
    for n in names:
        fresh.load_adapter(n, tmp_path / f"{n}.safetensors")
        got = _update(fresh, n)
        for m in want[n]:
            torch.testing.assert_close(got[m], want[n][m], rtol=1e-6, atol=1e-6)
    assert [fresh.model.peft_config[fresh.agents[n].trainable].r for n in names] == [12, 16, 16]


def test_max_rank_is_checked():
    with pytest.raises(ValueError, match="topology.max_rank=0: must be >= 1"):
        PeerToPeer(max_rank=0)


def _view(logprobs, gold, agents, val=None, kind="classification"):
    rows = [Example(f"p{i}", "x") for i in range(len(gold))]
    task = Task("t", "classification", rows, rows, rows, labels=["x", "y"])
    values = {a: (logprobs[i].argmax(-1) == gold).float().mean().item() for i, a in enumerate(agents)}
    return TaskView(task, agents, values, logprobs, gold, lambda a: (val or {}).get(a, 0.5), "test")


def test_master_worker_fuses_distributions_and_counts_them():
    # a is right on examples 0 and 1; b is right on 2 only but very sure of its wrong answer on 0
    lp = torch.tensor([[[0.9, 0.1], [0.8, 0.2], [0.6, 0.4]], [[0.01, 0.99], [0.3, 0.7], [0.1, 0.9]]]).log()
    gold = torch.tensor([0, 0, 1])
    log = MessageLog()
    value, info = MasterWorker("val_acc").answer(_view(lp, gold, ["a", "b"], {"a": 0.75, "b": 0.25}), 0, log)
    # val_acc weights a 3:1, fused p(y): 0.75*[0.1,0.2,0.4] + 0.25*[0.99,0.7,0.9] = [0.32, 0.325, 0.525]
    assert value == pytest.approx(1.0)
    assert info["val_acc"] == [0.75, 0.25]
    by_kind = log.round_summary(0)["by_kind"]
    assert by_kind["label_distribution"] == {"messages": 2, "bytes": 2 * 3 * 2 * 4}
    assert by_kind["report"]["messages"] == 2
    uniform, _ = MasterWorker("uniform").answer(_view(lp, gold, ["a", "b"]), 0, MessageLog())
    assert uniform == pytest.approx(2 / 3)  # uniform p(y) = [0.545, 0.45, 0.65]: example 0 goes wrong


def test_hierarchical_cascade_escalates_and_logs_its_rate():
    lp = torch.tensor([[[0.95, 0.05], [0.6, 0.4], [0.55, 0.45], [0.9, 0.1]],
                       [[0.1, 0.9], [0.2, 0.8], [0.5, 0.5], [0.5, 0.5]]]).log()
    gold = torch.tensor([0, 1, 1, 0])
    log = MessageLog()
    value, info = Hierarchical(threshold=0.7, order=["b", "a"]).answer(_view(lp, gold, ["a", "b"]), 2, log)
    # b first: confident on examples 0 (0.9 -> y, wrong) and 1 (0.8 -> y, right); 2 and 3 go to a
    assert info["order"] == ["b", "a"]
    assert info["answered_by"] == {"b": 2, "a": 2}
    assert info["escalation_rate"] == 0.5
    assert value == pytest.approx(2 / 4)  # ex0 wrong (b says y), ex1 right, ex2 a says x (wrong), ex3 right
    assert log.round_summary(2)["by_kind"] == {"examples": {"messages": 1, "bytes": 2 * (2 + 1)}}


def test_generation_tasks_are_routed_to_the_best_validation_agent():
    rows = [Example("q", "a")]
    task = Task("gen", "generation", rows, rows, rows)
    view = TaskView(task, ["a", "b"], {"a": 0.1, "b": 0.4}, None, None, {"a": 0.2, "b": 0.9}.get, "test")
    for topo in (MasterWorker(), PeerToPeer(), Hierarchical()):
        value, info = topo.answer(view, 0, MessageLog())
        assert value == 0.4 and info["routed_to"] == "b"
    ppl = TaskView(task, ["a", "b"], {"a": 10.0, "b": 20.0}, None, None, {"a": 9.0, "b": 30.0}.get, "test",
                   higher_is_better=False)
    assert MasterWorker().answer(ppl, 0, MessageLog())[0] == 10.0
    assert Topology().answer(view, 0, MessageLog()) is None


def test_hierarchical_order_is_checked():
    with pytest.raises(ValueError, match=r"unknown agents \['zz'\]"):
        Hierarchical(order=["zz"]).check(["a", "b"])


@pytest.mark.slow
def test_p2p_run_records_each_merges_residual_in_results_and_tracker(fast_overrides, tmp_path, run_lmas):
    """A run with stacked agents (IncLoRA): every exchange is recorded with its residual and rank in
    results.json and as transfer/<agent>/merged_residual in the tracker; exact (0) while under max_rank."""
    import csv

    out = tmp_path / "p2p"
    res = run_lmas(fast_overrides + ["population=peer_to_peer", "strategy=inclora",
                                     "topology.max_rank=12"], out)
    merged = {(a, e["round"]): e for a, v in res["agents"].items() for e in v["history"] if e["event"] == "merged"}
    assert set(merged) == {("agent1", 0), ("agent2", 0), ("agent0", 1), ("agent1", 1), ("agent2", 1),
                           ("agent0", 2), ("agent1", 2), ("agent2", 2)}
    assert merged[("agent1", 0)]["residual"] == 0.0 and merged[("agent1", 0)]["rank"] == 8  # agent0's r=8
    assert all(e["rank"] <= 12 for e in merged.values())
    assert any(e["residual"] > 0 for e in merged.values())  # by round 2 the exact merge outgrows rank 12
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    logged = {(row["key"], int(row["step"])): float(row["value"]) for row in rows
              if row.get("key", "").endswith("/merged_residual")}
    assert logged == {(f"transfer/{a}/merged_residual", r): e["residual"] for (a, r), e in merged.items()}
