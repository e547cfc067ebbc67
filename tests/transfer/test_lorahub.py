"""LoraHub-style composition: the ES, the few-shot search on a constructed case, the policies, configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmas.data.task import Example, Task
from lmas.lm.encoding import PromptEncoder, collate
from lmas.lm.likelihood import answer_loss
from lmas.transfer import compose_adapter, lorahub_weights, merge_adapters
from lmas.transfer.lorahub import answer_nll, few_shot_batches, l1_objective, one_plus_one_es
from lmas.transfer.policy import LoraHub, Merge, Transfer

CONF = Path(__file__).resolve().parents[2] / "conf" / "transfer"
TASK_A = [Example(f"Item {i}: which colour?", "crimson") for i in range(8)]


def test_one_plus_one_es_is_seeded_bounded_and_converges():
    calls = []

    def f(x):
        calls.append(list(x))
        return (x[0] - 0.7) ** 2 + (x[1] + 0.2) ** 2

    best, fbest, history = one_plus_one_es(f, [0.0, 0.0], budget=60, bounds=(-1.0, 1.0), seed=3)
    assert len(calls) == 60 and len(history) == 60
    assert all(-1.0 <= v <= 1.0 for x in calls for v in x)
    assert history == sorted(history, reverse=True)  # best-so-far never gets worse
    assert fbest < 1e-2 and abs(best[0] - 0.7) < 0.1
    assert one_plus_one_es(f, [0.0, 0.0], budget=60, bounds=(-1.0, 1.0), seed=3)[0] == best
    assert l1_objective(1.0, [0.5, -1.5], 0.1) == pytest.approx(1.1)
    with pytest.raises(ValueError, match="budget"):
        one_plus_one_es(f, [0.0], budget=0)


@pytest.fixture
def hub(make_population, tx):
    """Agents: `taskA` trained 30 steps on TASK_A, `rand` a random adapter, `fresh` a no-op.

    The tiny random base's logits are small (tied embeddings of std 0.02 after an RMSNorm), so
    training moves the answer NLL from ~10.75 only to ~10.38; the margins below are sized to that.
    """
    pop = make_population(["taskA", "rand", "fresh"], {"r": 4, "alpha": 8})
    enc = PromptEncoder(pop.tokenizer, 32)
    batch = collate([enc.encode_example(ex, "generation") for ex in TASK_A], enc.pad_id)
    pop.activate("taskA")
    params = list(pop.parameters_of("taskA").values())
    torch.manual_seed(0)
    with torch.no_grad():  # start from a non-zero B so that the A's train too
        for n, p in pop.parameters_of("taskA").items():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    opt = torch.optim.Adam(params, lr=2e-2)
    for _ in range(30):
        opt.zero_grad()
        answer_loss(pop.model, batch).backward()
        opt.step()
    tx.randomise(pop, "rand", 5, std=0.5)
    pop.activate("fresh")
    return pop, enc


def _nll_at(pop, enc, sources, weights, name):
    merge_adapters(pop, sources, weights, name, "exact")
    return answer_nll(pop.model.eval(), few_shot_batches(enc, TASK_A, "generation"))


def test_lorahub_finds_the_useful_adapter_deterministically(hub, tx):
    pop, enc = hub
    states = {n: pop.adapter_state(n) for n in pop.names}
    w = lorahub_weights(pop, ["taskA", "rand"], TASK_A, "generation", enc, budget=30, seed=0)
    assert w == lorahub_weights(pop, ["taskA", "rand"], TASK_A, "generation", enc, budget=30, seed=0)
    assert w[0] > w[1] + 0.5, w
    # the population is as it was: same agents, adapters, active agent
    assert pop.names == ["taskA", "rand", "fresh"] and set(pop.model.peft_config) == set(pop.names)
    assert pop.model.active_adapters == ["fresh"]
    for n, state in states.items():
        assert all(torch.equal(v, state[k]) for k, v in pop.adapter_state(n).items())
    found = _nll_at(pop, enc, ["taskA", "rand"], w, "found")
    uniform = _nll_at(pop, enc, ["taskA", "rand"], [0.5, 0.5], "uniform")
    assert found < uniform - 0.1, (found, uniform)  # ~10.39 vs ~10.57


def test_compose_adapter_merges_exactly_with_the_found_weights(hub, tx):
    pop, enc = hub
    w = compose_adapter(pop, ["taskA", "rand"], TASK_A, "generation", enc, "composed", budget=12, seed=1)
    assert pop.model.peft_config["composed"].r == 8
    da, dr, dc = tx.deltas(pop, "taskA"), tx.deltas(pop, "rand"), tx.deltas(pop, "composed")
    for m in dc:
        torch.testing.assert_close(dc[m], w[0] * da[m] + w[1] * dr[m], atol=1e-5, rtol=0)
    # the composed agent's loss is the search's loss at w (the scratch adapter is exact too)
    nll = answer_nll(pop.model.eval(), few_shot_batches(enc, TASK_A, "generation"))
    assert nll == pytest.approx(_nll_at(pop, enc, ["taskA", "rand"], w, "again"), abs=1e-5)


def test_lorahub_policy_composes_for_assigned_agents(hub):
    pop, enc = hub
    task = Task("colours", "generation", train=TASK_A, val=[], test=TASK_A[:2])
    policy = LoraHub(sources=["taskA", "rand"], shots=4, budget=8, seed=0)
    assert policy.apply(pop, 0, [("fresh", task)], enc) == []
    records = policy.apply(pop, 1, [("fresh", task)], enc)
    assert [r["agent"] for r in records] == ["fresh"] and len(records[0]["weights"]) == 2
    assert any(float(p.abs().max()) > 0 for n, p in pop.parameters_of("fresh").items() if "lora_B" in n)
    with pytest.raises(ValueError, match="encoder"):
        policy.apply(pop, 1, [("fresh", task)], None)


@pytest.mark.parametrize("name,cls", [("none", Transfer), ("merge", Merge), ("lorahub", LoraHub)])
def test_transfer_configs_instantiate(name, cls):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"seed": 3, "transfer": OmegaConf.load(CONF / f"{name}.yaml")})
    policy = instantiate(cfg.transfer, _convert_="all")
    assert type(policy) is cls and policy.apply(None, 0) == []
    if name == "merge":
        assert policy.options["seed"] == 3 and policy.method == "exact"
    if name == "lorahub":
        assert policy.search["seed"] == 3 and policy.search["bounds"] == (-1.5, 1.5)
