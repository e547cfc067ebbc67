"""Topologies: neighbour graphs, the peer-to-peer exchange (real merges, counted messages),
and the population's joint answer of each topology on given label distributions."""

from __future__ import annotations

import pytest
import torch

from lmas.data.task import Example, Task
from lmas.population.messages import MessageLog
from lmas.population.population import Population
from lmas.population.topology import Hierarchical, MasterWorker, PeerToPeer, TaskView, Topology
from lmas.transfer.merge import delta, read_factors


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


def test_p2p_exchange_respects_its_period(tiny_base):
    pop = _shared_a_population(tiny_base, ["a", "b"])
    log = MessageLog()
    assert PeerToPeer("ring", every=2).exchange(pop, 0, ["a", "b"], log) == []
    assert len(PeerToPeer("ring", every=2).exchange(pop, 1, ["a", "b"], log)) == 2


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
