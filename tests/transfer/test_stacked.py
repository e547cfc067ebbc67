"""Transfers between agents that stack adapters (IncLoRA/O-LoRA): an agent's knowledge is the sum of
ALL its adapters, every transfer reads it so (merges, merge-init, LoraHub), writes into a stacked
receiver without counting anything twice, and refuses what peft cannot honour (here and in the
config check)."""

from __future__ import annotations

import pytest
import torch

from lmas.config import ConfigError, validate
from lmas.data.task import Example, Task
from lmas.lm.encoding import PromptEncoder
from lmas.population.population import lora_config
from lmas.transfer import init_from_merge, merge_adapters
from lmas.transfer.factors import agent_factors, delta, lora_layers
from lmas.transfer.init import MergeInit
from lmas.transfer.lorahub import _Scratch
from lmas.transfer.policy import LoraHub, Merge

R = 4


def _knowledge(pop, agent: str) -> dict[str, torch.Tensor]:
    """The agent's whole update, computed here from peft's modules: Σ over its adapters of s·B·A."""
    out = {}
    for name, layer in lora_layers(pop).items():
        parts = [layer.lora_B[ad].weight @ layer.lora_A[ad].weight * layer.scaling[ad]
                 for ad in pop.agents[agent].adapters if ad in layer.lora_A]
        if parts:
            out[name] = sum(parts)
    return out


def _randomise(pop, agent: str, adapter: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pop.parameters_of(agent, adapter).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _stacked(make_population, extra=("other", "t")):
    """`inc` holds two random task adapters (different A's), `other` one; `t` is stacked too."""
    pop = make_population(["inc", *extra], {"r": R, "alpha": 2 * R})
    _randomise(pop, "inc", "inc", 1)
    pop.add_task_adapter("inc")
    _randomise(pop, "inc", pop.agents["inc"].trainable, 2)
    for i, name in enumerate(extra):
        _randomise(pop, name, name, 10 + i)
    return pop


def _weighted(pop, names, weights):
    ks = [_knowledge(pop, n) for n in names]
    return {m: sum(w * k[m] for k, w in zip(ks, weights)) for m in ks[0]}


def _close(got: dict, want: dict, atol=1e-5):
    assert set(got) == set(want)
    for m in want:
        torch.testing.assert_close(got[m], want[m], atol=atol, rtol=1e-5)


def _only_trainable(pop, agent):
    name = pop.agents[agent].trainable
    return {n: l.lora_B[name].weight @ l.lora_A[name].weight * l.scaling[name] for n, l in lora_layers(pop).items()}


def test_agent_factors_are_the_exact_sum_of_all_adapters(make_population):
    pop = _stacked(make_population)
    factors = agent_factors(pop, "inc")
    assert all(a.shape[0] == 2 * R for a, _ in factors.values())
    _close({m: delta(a, b) for m, (a, b) in factors.items()}, _knowledge(pop, "inc"))
    first = _only_trainable(pop, "inc")
    assert max(float((first[m] - _knowledge(pop, "inc")[m]).norm()) for m in first) > 0.1  # the first adapter counts


@pytest.mark.parametrize("method", ["exact", "task_arithmetic", "cat", "svd"])
def test_merging_a_stacked_agent_merges_both_its_adapters(make_population, method):
    pop = _stacked(make_population)
    want = _weighted(pop, ["inc", "other"], [0.6, -0.4])
    residual = merge_adapters(pop, ["inc", "other"], [0.6, -0.4], "new", method,
                              rank=3 * R if method == "svd" else None)
    assert pop.model.peft_config["new"].r == 3 * R and residual < 1e-6
    _close(_knowledge(pop, "new"), want)


def test_svd_of_stacked_agents_cuts_at_the_largest_adapter_rank_like_peft(make_population):
    pop = _stacked(make_population)
    want = _weighted(pop, ["inc", "other"], [0.5, 0.5])
    residual = merge_adapters(pop, ["inc", "other"], [0.5, 0.5], "new", "svd")
    assert pop.model.peft_config["new"].r == R
    got, worst = _knowledge(pop, "new"), 0.0
    for m, w in want.items():
        s = torch.linalg.svdvals(w.double())
        cut = float(s[R:].square().sum().sqrt())
        assert float((got[m].double() - w.double()).norm()) == pytest.approx(cut, rel=1e-3, abs=1e-5)  # Eckart-Young
        worst = max(worst, cut / float(s.square().sum().sqrt()))
    assert residual == pytest.approx(worst, rel=1e-4) and residual > 0.05


@pytest.mark.parametrize("method", ["linear", "ties", "dare_linear", "magnitude_prune", "ties_svd", "dare_ties_svd"])
def test_single_adapter_peft_methods_refuse_stacked_agents(make_population, method):
    pop = _stacked(make_population)
    with pytest.raises(ValueError, match=rf"merge method '{method}'.*\['inc'\].*stacked.*exact, task_arithmetic"):
        merge_adapters(pop, ["inc", "other"], [0.5, 0.5], "new", method, density=0.5)
    assert "new" not in pop.agents


def test_merge_into_a_stacked_target_replaces_its_whole_update(make_population):
    pop = _stacked(make_population)
    pop.add_task_adapter("t")
    _randomise(pop, "t", pop.agents["t"].trainable, 7)
    assert merge_adapters(pop, ["other"], [1.0], "t", "exact") == 0.0  # rank 4 into rank 4: exact
    _close(_knowledge(pop, "t"), _knowledge(pop, "other"))  # t's first adapter no longer counts
    assert all(float(l.lora_B["t"].weight.abs().max()) == 0.0 for l in lora_layers(pop).values())


def test_consensus_merge_with_a_stacked_target_among_sources_records_its_residual(make_population):
    pop = _stacked(make_population)
    want = _weighted(pop, ["inc", "other"], [0.5, 0.5])
    records = Merge(method="exact", sources=["inc", "other"], targets=["inc"], start=0).apply(pop, 0)
    got, worst = _knowledge(pop, "inc"), 0.0
    for m, w in want.items():  # rank 12 cut into inc's rank-4 trainable adapter: the best rank-4 ΔW
        s = torch.linalg.svdvals(w.double())
        assert float((got[m].double() - w.double()).norm()) == pytest.approx(float(s[R:].square().sum().sqrt()),
                                                                               rel=1e-3, abs=1e-5)
        worst = max(worst, float(s[R:].square().sum().sqrt() / s.square().sum().sqrt()))
    assert records[0]["residual"] == pytest.approx(worst, rel=1e-4) and worst > 0.05


def test_init_from_merge_reads_whole_sources_and_keeps_the_targets_frozen_adapters(make_population):
    pop = _stacked(make_population)
    init_from_merge(pop, "new", ["inc", "other"])
    _close(_knowledge(pop, "new"), _weighted(pop, ["inc", "other"], [0.5, 0.5]))
    first = _knowledge(pop, "t")
    pop.add_task_adapter("t")  # a new task adapter, initialised from a merge: ΔW_t = first + merge(other)
    init_from_merge(pop, "t", ["other"], [1.0])
    _close(_knowledge(pop, "t"), {m: first[m] + _knowledge(pop, "other")[m] for m in first})
    with pytest.raises(ValueError, match="'t' is one of its own sources.*twice"):
        init_from_merge(pop, "t", ["t", "other"])


def _task(name="new"):
    rows = [Example(f"Item {i}: colour?", "crimson") for i in range(4)]
    return Task(name, "generation", rows, rows, rows)


def test_merge_init_policy_starts_an_agent_from_whole_stacked_sources(make_population):
    pop = _stacked(make_population, extra=("other",))
    pop.add_agent("wide", lora_config(r=4 * R, alpha=8 * R))  # room for the exact merge (rank 12)
    for n in ("inc", "other"):
        pop.agents[n].history.append({"event": "trained"})
    records = MergeInit(start=0).apply(pop, 0, [("wide", _task())])
    assert records[0]["sources"] == ["inc", "other"] and records[0]["residual"] == 0.0
    _close(_knowledge(pop, "wide"), _weighted(pop, ["inc", "other"], [0.5, 0.5]))


def test_lorahub_searches_and_writes_whole_stacked_sources(make_population):
    pop = _stacked(make_population, extra=("other",))
    scratch = _Scratch(pop, ["inc", "other"])  # what every candidate of the search is scored with
    scratch.set_weights([0.3, -0.7])
    _close(_knowledge(pop, scratch.name), _weighted(pop, ["inc", "other"], [0.3, -0.7]))
    scratch.close()

    pop.add_agent("wide", lora_config(r=4 * R, alpha=8 * R))
    for n in ("inc", "other"):
        pop.agents[n].history.append({"event": "trained"})
    enc = PromptEncoder(pop.tokenizer, 32)
    records = LoraHub(shots=2, budget=1, start=0).apply(pop, 0, [("wide", _task())], enc)  # budget 1: uniform
    assert records[0]["weights"] == [0.5, 0.5] and records[0]["residual"] == 0.0
    _close(_knowledge(pop, "wide"), _weighted(pop, ["inc", "other"], [0.5, 0.5]))


# --- the config check ----------------------------------------------------------------------------
def _errors(compose, overrides) -> str:
    cfg = compose(["model=tiny", *overrides])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    return str(info.value)


@pytest.mark.parametrize("overrides, expected", [
    (["strategy=inclora", "transfer=merge_methods"],
     "strategy=inclora stacks one adapter per task, and merge method(s) linear, ties, ties_svd, dare_linear, "
     "dare_ties, magnitude_prune (peft's"),
    (["strategy=olora", "transfer=merge", "transfer.method=ties", "transfer.density=0.5"],
     "transfer.method=ties: strategy=olora stacks one adapter per task"),
    (["strategy=olora", "transfer=merge_init"],
     "transfer._target_=lmas.transfer.init.MergeInit: strategy=olora stacks one adapter per task"),
    (["strategy=inclora", "transfer=lorahub"], "it would overwrite that task"),
    (["population=peer_to_peer", "topology.max_rank=32", "strategy=ewc"],
     "topology.max_rank=32: grows an agent's adapter during the run, but strategy ewc"),
    (["population=peer_to_peer", "topology.max_rank=32", "strategy=replay_lwf"],
     "but strategy lwf keeps per-parameter state"),
    (["population=peer_to_peer", "topology.max_rank=32", "strategy=opcm"], "but strategy opcm keeps per-parameter"),
    (["population=peer_to_peer", "topology.max_rank=32", "strategy=avalanche/ewc"], "but strategy avalanche keeps"),
])
def test_config_check_refuses_transfers_a_strategy_cannot_follow(compose, overrides, expected):
    assert expected in _errors(compose, overrides)


@pytest.mark.parametrize("overrides", [
    ["strategy=inclora", "transfer=merge"],  # exact
    ["strategy=olora", "transfer=merge", "transfer.method=svd"],
    ["strategy=olora", "transfer=merge_methods", "transfer.methods=[exact,cat,svd]"],
    ["population=peer_to_peer", "topology.max_rank=32", "strategy=inclora"],
    ["population=peer_to_peer", "strategy=ewc"],
])
def test_config_check_accepts_what_the_transfers_honour(compose, overrides):
    validate(compose(["model=tiny", *overrides]))


def test_merge_init_tunes_the_merge_coefficient_on_the_validation_split(make_population):
    """Each candidate λ is scored with the agent holding λ·merge (re-checked here), the first best is kept and
    written; perplexity: lower is better."""
    from lmas.evaluation.scoring import evaluate

    pop = make_population(["a", "b"], {"r": R, "alpha": 2 * R})
    pop.add_agent("new", lora_config(r=2 * R, alpha=4 * R))  # room for the exact merge (rank 2R)
    for i, name in enumerate(("a", "b")):
        _randomise(pop, name, name, 20 + i)
        pop.agents[name].history.append({"event": "trained"})
    texts = [Example("", f"the {w} sat on the mat and looked at the {w}") for w in ("cat", "dog", "owl", "fox")]
    task = Task("story", "lm", texts, texts[:2], texts[2:])
    enc = PromptEncoder(pop.tokenizer, 32)
    scales = [0.0, 0.5, 1.0, 2.0]
    (rec,) = MergeInit(start=0, scales=scales).apply(pop, 0, [("new", task)], enc)
    scores = rec["val_scores"]
    assert list(scores) == ["0.0", "0.5", "1.0", "2.0"] and len(set(scores.values())) == 4
    assert rec["scale"] == min(scales, key=lambda lam: scores[str(lam)])
    _close(_knowledge(pop, "new"), _weighted(pop, ["a", "b"], [0.5 * rec["scale"], 0.5 * rec["scale"]]))
    for lam in scales:  # the recorded score is the agent's with λ·merge
        merge_adapters(pop, ["a", "b"], [0.5 * lam, 0.5 * lam], "new", "exact", keep_frozen=True)
        pop.activate("new")
        assert evaluate(pop.model, enc, task, "val") == pytest.approx(scores[str(lam)], rel=1e-5)
    with pytest.raises(ValueError, match=r"tasks \['bare'\] have no validation split"):
        MergeInit(start=0, scales=[1.0]).apply(pop, 0, [("new", Task("bare", "lm", texts, [], texts))], enc)
