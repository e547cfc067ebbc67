"""Federated rounds (loop=federated): the partition, FedAvg, FedAvgM and FedProx by hand, FlexLoRA's
aggregate-then-refactorise, and runs on the tiny model in which every agent ends holding the global adapter."""

from __future__ import annotations

import json

import pytest
import torch

from lmas.data.task import Example
from lmas.population.federated import Federated, bytes_to_target, fedavg, fedavgm, partition, proximal_term


def _rows(n_per_label: dict[str, int]) -> list[Example]:
    return [Example(f"{lab} {i}", lab) for lab, n in n_per_label.items() for i in range(n)]


def test_iid_partition_deals_every_example_once_evenly():
    rows = _rows({"a": 50, "b": 53})
    parts = partition(rows, 4, None, seed=0)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(len(rows)))  # disjoint and complete
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert partition(rows, 4, None, seed=0) == parts and partition(rows, 4, None, seed=1) != parts


def test_label_skew_follows_the_dirichlet_concentration():
    labels = [str(k) for k in range(5)]
    rows = _rows({lab: 400 for lab in labels})

    def top_share(alpha: float) -> float:  # mean over clients of the share of its most frequent label
        shares = []
        for p in partition(rows, 4, alpha, seed=3, labels=labels):
            counts = [sum(rows[i].answer == lab for i in p) for lab in labels]
            shares.append(max(counts) / max(1, len(p)))
        return sum(shares) / len(shares)

    assert sorted(i for p in partition(rows, 4, 0.1, seed=3, labels=labels) for i in p) == list(range(2000))
    assert top_share(0.05) > 0.5  # each label goes almost whole to one client (IID: 0.2)
    assert top_share(1000.0) == pytest.approx(0.2, abs=0.05)  # near IID: each label about 1/5
    with pytest.raises(ValueError, match="loop.alpha=0"):
        partition(rows, 4, 0.0, seed=0, labels=labels)
    with pytest.raises(ValueError, match="classification task"):
        partition(rows, 4, 0.5, seed=0)


def test_fedavg_fedavgm_and_the_proximal_term_by_hand():
    a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}
    torch.testing.assert_close(fedavg([a, b], [1, 3])["w"], torch.tensor([2.5, 5.0]))  # (1 * a + 3 * b) / 4
    with pytest.raises(ValueError, match="differ in their parameters"):
        fedavg([a, {"v": torch.zeros(2)}], [1, 1])
    g, v = fedavgm({"w": torch.tensor([1.0])}, {"w": torch.tensor([0.5])}, None, lr=1.0, momentum=0.9)
    torch.testing.assert_close((g["w"], v["w"]), (torch.tensor([0.5]), torch.tensor([0.5])))
    g, v = fedavgm(g, {"w": torch.tensor([0.25])}, v, lr=1.0, momentum=0.9)  # v = 0.9 * 0.5 + 0.25
    torch.testing.assert_close((g["w"], v["w"]), (torch.tensor([-0.2]), torch.tensor([0.7])))
    g, _ = fedavgm({"w": torch.tensor([1.0])}, {"w": torch.tensor([0.3])}, None, lr=1.0, momentum=0.0)
    torch.testing.assert_close(g["w"], torch.tensor([0.3]))  # momentum 0, lr 1: FedAvg
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    term = proximal_term({"w": p}, {"w": torch.zeros(2)}, mu=0.5)
    term.backward()
    assert term.item() == pytest.approx(0.25 * 5)
    torch.testing.assert_close(p.grad, 0.5 * p.detach())  # mu (theta - anchor)


def test_bytes_to_target_counts_the_bytes_until_the_first_server_round_that_reaches_it():
    recs = [{"task": "a", "fl_round": 0, "bytes": 10, "val": 0.4}, {"task": "a", "fl_round": 1, "bytes": 10, "val": 0.7},
            {"task": "a", "fl_round": 2, "bytes": 10, "val": 0.9}, {"task": "b", "fl_round": 0, "bytes": 5, "val": 0.2},
            {"task": "b", "fl_round": 1, "bytes": 5, "val": 0.5}, {"task": "p", "fl_round": 0, "bytes": 7, "val": 30.0},
            {"task": "p", "fl_round": 1, "bytes": 7, "val": 12.0}]  # fmt: skip
    got = bytes_to_target(recs, 0.6, lower={"p"})
    assert got["a"] == {"reached": True, "fl_round": 1, "bytes": 20, "val": 0.7}  # rounds 0 and 1 sent
    assert got["b"] == {"reached": False, "fl_round": None, "bytes": 10, "val": None}  # never: all its bytes
    assert got["p"] == {"reached": False, "fl_round": None, "bytes": 14, "val": None}  # perplexity 12 > 0.6
    assert bytes_to_target(recs, 15.0, lower={"p"})["p"] == {"reached": True, "fl_round": 1, "bytes": 14, "val": 12.0}


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="loop.aggregator='fedsgd'"):
        Federated(aggregator="fedsgd")
    with pytest.raises(ValueError, match="loop.alpha=-1"):
        Federated(alpha=-1)
    with pytest.raises(ValueError, match="loop.target=0.5: the bytes to a target need loop.val_curve=true"):
        Federated(val_curve=False, target=0.5)


FAST = ["model=tiny", "debug=fast", "logger=csv", "loop=federated", "population.agents=3", "loop.rounds=2"]


def _same_adapters(run_dir):
    from safetensors.torch import load_file

    files = sorted((run_dir / "adapters").glob("agent*/round002-*.safetensors"))  # after the last task
    states = [load_file(f) for f in files]
    return len(files) == 3 and all(set(s) == set(states[0]) and all(torch.equal(s[k], states[0][k]) for k in s)
                                   for s in states)


@pytest.mark.parametrize("aggregator", ["fedavg", pytest.param("flexlora", marks=pytest.mark.slow)])
def test_a_federated_run_ends_with_every_agent_holding_the_global_adapter(aggregator, run_lmas, tmp_path):
    run_dir = tmp_path / aggregator
    results = run_lmas([*FAST, f"loop.aggregator={aggregator}", "loop.target=0.0", f"paths.output_dir={tmp_path}"],
                       run_dir)  # fmt: skip
    assert results["complete"]
    saved = json.loads((run_dir / "results.json").read_text())
    records = saved["federated"]
    assert len(records) == 2 * len(saved["tasks"])  # two server-client rounds per task
    assert all(r["clients"] == ["agent0", "agent1", "agent2"] and r["bytes"] > 0 for r in records)
    for task in [t["name"] for t in saved["tasks"]]:  # every client trains its whole shard: the shards add up to the task's data
        sizes = {tuple(r["examples"]) for r in records if r["task"] == task}
        assert len(sizes) == 1 and sum(next(iter(sizes))) == 16  # debug=fast: 16 training examples per task
    sent = sum(r["bytes"] for r in saved["population"]["communication"])
    assert sent >= sum(r["bytes"] for r in records) > 0  # uploads and broadcasts, counted per round
    assert all(0.0 <= r["val"] <= 1.0 for r in records)  # the global model's validation accuracy per server round
    assert saved["federated_to_target"] == bytes_to_target(records, 0.0)  # every task reaches 0 at its first round
    assert all(t["reached"] and t["fl_round"] == 0 for t in saved["federated_to_target"].values())
    accs = {a: m["avg_acc"] for a, m in saved["metrics"].items() if a.startswith("agent")}
    assert len(set(accs.values())) == 1  # one global model: every agent scores the same
    if aggregator == "fedavg":
        assert _same_adapters(run_dir)


@pytest.mark.slow
def test_fedprox_and_label_skew_on_a_classification_stream(run_lmas, tmp_path):
    results = run_lmas([*FAST, "stream=self_learning", "loop.aggregator=fedprox", "loop.alpha=0.5", "loop.mu=0.1",
                        "loop.clients_per_round=2", f"paths.output_dir={tmp_path}"], tmp_path / "prox")
    records = results["federated"]
    assert all(len(r["clients"]) == 2 for r in records)  # sampled clients
    assert results["federated_setup"]["aggregator"] == "fedprox"


def test_the_config_check_refuses_one_client_and_stacked_adapters(compose):
    from lmas.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"population.agents=1: loop=federated splits each task"):
        validate(compose(["model=tiny", "loop=federated"]))
    with pytest.raises(ConfigError, match=r"loop=federated: strategy=inclora stacks one adapter per task"):
        validate(compose(["model=tiny", "loop=federated", "population.agents=3", "strategy=inclora"]))
    with pytest.raises(ConfigError, match=r"allocation._target_=\S+: is not used by the federated loop"):
        validate(compose(["model=tiny", "loop=federated", "population=peer_to_peer"]))  # round robin, exchange
    validate(compose(["model=tiny", "loop=federated", "population.agents=3", "strategy=ewc"]))


def test_flexlora_gives_each_agent_the_best_approximation_of_the_mean_at_its_own_rank(tiny_base):
    from peft import LoraConfig

    from lmas.population.federated import flexlora
    from lmas.population.population import Population
    from lmas.transfer.factors import delta, read_factors

    pop = Population(tiny_base, agents=["a"], lora={"r": 2, "alpha": 4})
    pop.add_agent("b", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in ("a", "b"):
            for p in pop.parameters_of(name).values():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    before = {n: {m: delta(a, b) for m, (a, b) in read_factors(pop, n).items()} for n in ("a", "b")}
    residual = flexlora(pop, ["a", "b"], [1, 3], ["a", "b"])
    worst = 0.0
    for name, rank in (("a", 2), ("b", 4)):
        got = {m: delta(a, b) for m, (a, b) in read_factors(pop, name).items()}
        for m in got:
            mean = 0.25 * before["a"][m] + 0.75 * before["b"][m]  # rank <= 6: cut to the agent's rank
            u, s, vh = torch.linalg.svd(mean.double())
            best = (u[:, :rank] * s[:rank]) @ vh[:rank]
            torch.testing.assert_close(got[m].double(), best, atol=1e-5, rtol=0)
            worst = max(worst, (s[rank:].square().sum() / s.square().sum()).sqrt().item())
    assert residual == pytest.approx(worst, rel=1e-4) and residual > 0


def test_the_local_only_baseline_exchanges_nothing_after_the_common_start(run_lmas, tmp_path):
    results = run_lmas([*FAST, "loop.aggregator=local", "loop.rounds=1", f"paths.output_dir={tmp_path}"],
                       tmp_path / "local")
    comm = results["population"]["communication"]
    assert comm[0]["messages"] == 2 and all(c["messages"] == 0 for c in comm[1:])  # round 0: the start, to 2 agents
    assert all(r["bytes"] == 0 for r in results["federated"])
    assert not _same_adapters(tmp_path / "local")  # each client keeps the model of its own shard
