"""Every strategy runs end to end through ContinualLoop on the tiny model and does what it claims.

Two BBC topic tasks (8 training examples each), two optimisation steps per task. A recorder
wraps the strategy instance's hooks to capture the training data, the loss terms of every step
and adapter weights at task boundaries.
"""

from __future__ import annotations

import json

import pytest
import torch

from lmas.data.sources import bbc_topics
from lmas.data.stream import Stream
from lmas.loop import ContinualLoop, EvalConfig, TrainConfig
from lmas.training.experience import IncrementalLM
from lmas.lm.encoding import PromptEncoder
from lmas.population.population import Population
from lmas.strategies.agem import AGEM, flat_grads
from lmas.strategies.base import Strategy
from lmas.strategies.compose import Compose
from lmas.strategies.joint import Joint
from lmas.strategies.lwf import LwF
from lmas.strategies.olora import IncLoRA, OLoRA
from lmas.strategies.regularizers import EWC, L2
from lmas.strategies.replay import Replay
from lmas.strategies.seqft import SeqFT

STRATEGY_CONFIGS = ["replay", "ewc", "lwf", "agem", "olora", "inclora", "l2", "joint", "seqft", "replay_lwf"]


@pytest.fixture(scope="module")
def tasks():
    t1 = bbc_topics("t1", topics=["sports", "tech"], n_train=8, n_val=2, n_test=4, max_chars=60)
    t2 = bbc_topics("t2", topics=["business", "politics"], n_train=8, n_val=2, n_test=4, max_chars=60)
    return [t1, t2]


class Recorder:
    """Wraps a strategy instance's hooks (instance attributes) and records what happens."""

    def __init__(self, strategy: Strategy) -> None:
        self.examples: list[list] = []  # per experience: the (example, kind) pairs trained on
        self.terms: list[tuple[str, dict[str, float]]] = []  # (task, {term: value}) per step
        self.adapters_at_start: list[dict[str, dict[str, torch.Tensor]]] = []  # per experience
        self.task = None
        train_examples, before, loss_terms = strategy.train_examples, strategy.before_task, strategy.loss_terms

        def _train_examples(agent, task, seen):
            rows = train_examples(agent, task, seen)
            self.examples.append(rows)
            return rows

        def _before(module, task):
            self.task = task.name
            before(module, task)
            pop = module.population
            self.adapters_at_start.append({a: pop.adapter_state(module.agent, a)
                                           for a in pop.agents[module.agent].adapters})

        def _loss_terms(module, batch, out):
            terms = loss_terms(module, batch, out)
            self.terms.append((self.task, {k: v.item() for k, v in terms.items()}))
            return terms

        strategy.train_examples, strategy.before_task, strategy.loss_terms = _train_examples, _before, _loss_terms

    def of(self, task: str) -> list[dict[str, float]]:
        return [t for name, t in self.terms if name == task]


def _run(strategy, tiny_base, tasks, tmp_path, agents=1):
    pop = Population(tiny_base, agents=agents, lora={"r": 4, "alpha": 8}, seed=0)
    base = {n: p.detach().clone() for n, p in pop.model.named_parameters() if "lora_" not in n}
    rec = Recorder(strategy)
    loop = ContinualLoop(pop, Stream("two", tasks), strategy, tmp_path, seed=0,
                         train=TrainConfig(lr=1e-2, max_steps=2, batch_size=4),
                         eval=EvalConfig(batch_size=8),
                         max_length=48, progress=False, save_adapters=False)
    results = loop.run()
    return pop, base, rec, results


def _base_unchanged(pop, base) -> bool:
    return all(torch.equal(p, base[n]) for n, p in pop.model.named_parameters() if "lora_" not in n)


def _prompts(rows) -> set[str]:
    return {ex.prompt for ex, _ in rows}


def _round_trip(strategy: Strategy, fresh: Strategy) -> Strategy:
    fresh.load_state_dict(strategy.state_dict())
    return fresh


# --- data strategies --------------------------------------------------------------------------
def test_replay_trains_on_earlier_items_and_resumes(tiny_base, tasks, tmp_path):
    strategy = Replay(buffer="task_balanced", capacity=6, replay_ratio=1.0, seed=0)
    pop, base, rec, _ = _run(strategy, tiny_base, tasks, tmp_path)
    assert _base_unchanged(pop, base)
    t1, t2 = tasks
    assert _prompts(rec.examples[0]) == _prompts([(e, "") for e in t1.train])
    replayed = _prompts(rec.examples[1]) - _prompts([(e, "") for e in t2.train])
    assert len(rec.examples[1]) == 8 + 6 and len(replayed) == 6 and replayed <= _prompts([(e, "") for e in t1.train])
    assert strategy.buffers["agent0"].sizes() == {"t1": 3, "t2": 3}
    assert pop.agents["agent0"].history[1]["examples"] == 14
    # the JSON state resumes the same buffer and the same next sample
    fresh = _round_trip(strategy, Replay(buffer="task_balanced", capacity=6, replay_ratio=1.0, seed=0))
    fresh.load_state_dict(json.loads(json.dumps(strategy.state_dict())))
    assert fresh.buffers["agent0"].items() == strategy.buffers["agent0"].items()
    assert fresh.train_examples("agent0", t1, [t2]) == strategy.train_examples("agent0", t1, [t2])


def test_joint_trains_on_all_seen_tasks(tiny_base, tasks, tmp_path):
    pop, base, rec, _ = _run(Joint(), tiny_base, tasks, tmp_path)
    t1, t2 = tasks
    assert len(rec.examples[0]) == 8 and len(rec.examples[1]) == 16
    assert _prompts(rec.examples[1]) == {e.prompt for e in t1.train + t2.train}
    assert pop.agents["agent0"].history[1]["examples"] == 16
    assert _base_unchanged(pop, base)


# --- regularizers -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ewc_online", "ewc_separate", "l2"])
def test_regularizer_terms_appear_on_task_two(kind, tiny_base, tasks, tmp_path):
    if kind == "l2":
        strategy, term = L2(l2_lambda=10.0), "l2"
    else:
        strategy, term = EWC(ewc_lambda=1e4, mode=kind.split("_")[1], fisher_batch_size=4), "ewc"
    pop, base, rec, results = _run(strategy, tiny_base, tasks, tmp_path)
    assert _base_unchanged(pop, base)
    assert all(term not in t for t in rec.of("t1"))
    steps = rec.of("t2")
    assert len(steps) == 2 and all(term in t for t in steps)
    assert steps[0][term] == pytest.approx(0.0, abs=1e-8)  # the weights start at the anchor
    assert steps[1][term] > 0
    if kind.startswith("ewc"):
        fisher = strategy.consolidated["agent0"][0]["fisher"]
        assert set(fisher) == set(pop.parameters_of("agent0"))
        assert sum(f.sum().item() for f in fisher.values()) > 0
        fresh = _round_trip(strategy, EWC(mode=strategy.mode))
        for a, b in zip(fresh.consolidated["agent0"], strategy.consolidated["agent0"]):
            for part in ("anchors", "fisher"):
                for n in a[part]:
                    assert torch.equal(a[part][n], b[part][n])
        assert len(strategy.consolidated["agent0"]) == (2 if kind == "ewc_separate" else 1)
    else:
        assert _round_trip(strategy, L2()).trained == {"agent0": 2}


# --- LwF ----------------------------------------------------------------------------------------
def test_lwf_distils_the_start_of_task_model_from_task_two_on(tiny_base, tasks, tmp_path):
    strategy = LwF(alpha=1.0, temperature=2.0)
    pop, base, rec, _ = _run(strategy, tiny_base, tasks, tmp_path)
    assert _base_unchanged(pop, base)
    assert all("lwf" not in t for t in rec.of("t1"))
    steps = rec.of("t2")
    assert all("lwf" in t for t in steps)
    assert steps[0]["lwf"] == pytest.approx(0.0, abs=1e-6)  # the teacher is the model at the task's start
    assert steps[1]["lwf"] > 0
    spare = LwF.spare_name("agent0")
    assert pop.agents["agent0"].adapters == ["agent0"]  # the spare is never one of the agent's adapters
    assert spare in pop.model.peft_config
    spare_params = [p for n, p in pop.model.named_parameters() if f".{spare}." in n]
    assert spare_params and not any(p.requires_grad for p in spare_params)
    # the spare holds the agent's adapter as it was when task 2 started
    start = rec.adapters_at_start[1]["agent0"]
    for k, v in pop.adapter_state("agent0", spare).items():
        assert torch.equal(v, start[k])
    pop.activate("agent0")
    trainable = {n for n, p in pop.model.named_parameters() if p.requires_grad}
    assert trainable == set(pop.parameters_of("agent0"))
    assert _round_trip(strategy, LwF()).trained == {"agent0": 2}


# --- A-GEM --------------------------------------------------------------------------------------
def test_agem_projects_against_the_memory(tiny_base, tasks, tmp_path):
    strategy = AGEM(patterns_per_task=4, sample_size=4, seed=0)
    pop, base, rec, _ = _run(strategy, tiny_base, tasks, tmp_path)
    assert _base_unchanged(pop, base)
    stats = strategy.stats["agent0"]
    assert stats["checked"] == 2  # both steps of task 2 had a reference gradient, none of task 1
    assert 0 <= stats["projected"] <= 2
    assert [len(g) for g in strategy.memory["agent0"]] == [4, 4]
    # the hooks on a conflicting gradient: the reference leaves .grad alone, the projection fixes it
    pop.activate("agent0")
    module = IncrementalLM(pop, "agent0", strategy, PromptEncoder(pop.tokenizer, 48))
    params = [p for p in pop.model.parameters() if p.requires_grad]
    batch = module.batch_of([(e, "classification") for e in tasks[1].train[:4]])
    before = dict(strategy.stats["agent0"])
    for p in params:
        p.grad = None  # (the last training step left its gradients)
    strategy.on_train_batch_start(module, batch)
    assert all(p.grad is None for p in params)
    ref = strategy.reference("agent0").clone()
    for p, g in zip(params, torch.split(-ref, [p.numel() for p in params])):
        p.grad = g.view_as(p).clone()
    strategy.on_before_optimizer_step(module)
    assert torch.dot(flat_grads(params), ref).item() == pytest.approx(0.0, abs=1e-6 * ref.dot(ref).item())
    assert strategy.stats["agent0"] == {"checked": before["checked"] + 1, "projected": before["projected"] + 1}
    fresh = _round_trip(strategy, AGEM(patterns_per_task=4, sample_size=4, seed=0))
    fresh.load_state_dict(json.loads(json.dumps(strategy.state_dict())))
    assert fresh.memory == strategy.memory
    assert fresh.memory_sample("agent0") == strategy.memory_sample("agent0")


# --- adapter growth -----------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [IncLoRA, OLoRA])
def test_adapter_per_task_keeps_the_first_adapter_frozen(cls, tiny_base, tasks, tmp_path):
    strategy = cls()
    pop, base, rec, _ = _run(strategy, tiny_base, tasks, tmp_path)
    assert _base_unchanged(pop, base)
    assert pop.agents["agent0"].adapters == ["agent0", "agent0-t1"]
    first_at_start = rec.adapters_at_start[1]["agent0"]
    for k, v in pop.adapter_state("agent0", "agent0").items():
        assert torch.equal(v, first_at_start[k])
    new = pop.adapter_state("agent0", "agent0-t1")
    assert any(not torch.equal(v, rec.adapters_at_start[1]["agent0-t1"][k]) for k, v in new.items())
    if cls is OLoRA:
        assert all("olora_orth" not in t for t in rec.of("t1"))
        assert all(t["olora_orth"] > 0 for t in rec.of("t2"))
        pairs = strategy.layer_pairs(pop, "agent0")
        assert len(pairs) == 2 * 2  # q_proj and v_proj of 2 layers
        assert all(cur.requires_grad and not prev[0].requires_grad for cur, prev in pairs)
    else:
        assert all(t == {} for _, t in rec.terms)
    assert _round_trip(strategy, cls()).trained == {"agent0": 2}


# --- SeqFT --------------------------------------------------------------------------------------
def test_seqft_trains_the_base_and_refuses_populations(tiny_base, tasks, tmp_path):
    pop, base, rec, _ = _run(SeqFT(), tiny_base, tasks, tmp_path)
    assert not _base_unchanged(pop, base)
    assert not any(p.requires_grad for n, p in pop.model.named_parameters() if "lora_" not in n)


def test_seqft_state_holds_the_fine_tuned_base_and_restore_model_writes_it_back(tiny_base, tasks, tmp_path):
    """A checkpoint of SeqFT carries every base parameter; a fresh SeqFT loaded from it writes them into an untrained
    base at restore_model (what the loader calls right after load_state_dict, before anything scores the model).
    A checkpoint without them (lmas before it saved them) or of another model is refused with a message."""
    from lmas.models.providers import tiny
    from lmas.strategies.seqft import base_parameters

    strategy = SeqFT()
    pop, base, _, _ = _run(strategy, tiny_base, tasks, tmp_path)
    state = strategy.state_dict()
    trained = {n: p.detach().clone() for n, p in base_parameters(pop.model).items()}
    assert state["tasks"] == len(tasks) and state["base"].keys() == trained.keys()
    assert all(torch.equal(state["base"][n], t) for n, t in trained.items())
    untrained = tiny(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=0)  # as tiny_base
    fresh, other = SeqFT(), Population(untrained, agents=1, lora={"r": 4, "alpha": 8}, seed=0)
    fresh.load_state_dict(state)
    assert not all(torch.equal(p, trained[n]) for n, p in base_parameters(other.model).items())  # untrained
    fresh.restore_model(other)
    assert all(torch.equal(p, trained[n]) for n, p in base_parameters(other.model).items())
    assert torch.equal(fresh.state_dict()["base"][next(iter(trained))], next(iter(trained.values())))
    with pytest.raises(ValueError, match="cannot be resumed exactly"):
        SeqFT().load_state_dict({"tasks": 1})
    wrong = SeqFT()
    wrong.load_state_dict({"tasks": 1, "base": {"not.a.parameter": torch.zeros(1)}})
    with pytest.raises(ValueError, match="'not.a.parameter'"):
        wrong.restore_model(other)


def test_seqft_refuses_more_than_one_agent(tiny_base, tasks, tmp_path):
    with pytest.raises(ValueError, match="single-agent"):
        _run(SeqFT(), tiny_base, tasks, tmp_path, agents=2)


# --- Compose ------------------------------------------------------------------------------------
def test_replay_plus_lwf_composes(tiny_base, tasks, tmp_path):
    strategy = Compose([Replay(capacity=4, replay_ratio=0.5), LwF()])
    assert strategy.name == "replay+lwf"
    pop, base, rec, results = _run(strategy, tiny_base, tasks, tmp_path)
    assert results["strategy"] == "replay+lwf"
    assert _base_unchanged(pop, base)
    assert len(rec.examples[1]) == 8 + 4
    assert _prompts(rec.examples[1]) & {e.prompt for e in tasks[0].train}
    assert all("lwf" not in t for t in rec.of("t1")) and all("lwf" in t for t in rec.of("t2"))
    fresh = Compose([Replay(capacity=4, replay_ratio=0.5), LwF()])
    fresh.load_state_dict(strategy.state_dict())
    assert fresh.parts[0].buffers["agent0"].items() == strategy.parts[0].buffers["agent0"].items()


class _Term(Strategy):
    name = "term"

    def loss_terms(self, module, batch, out):
        return {"x": torch.ones(())}


def test_compose_refuses_conflicts():
    with pytest.raises(ValueError, match="train_examples"):
        Compose([Replay(), Joint()])
    with pytest.raises(ValueError, match="loss term 'x'"):
        Compose([_Term(), _Term()]).loss_terms(None, {}, {})
    both = Compose([_Term(), L2()], name="mine")
    assert both.name == "mine" and both.loss_terms(type("M", (), {"agent": "a"})(), {}, {}) == {"x": torch.ones(())}


# --- configs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", STRATEGY_CONFIGS)
def test_strategy_configs_instantiate(name, compose, tmp_path):
    from hydra.utils import instantiate

    cfg = compose([f"strategy={name}", "model=tiny"], tmp_path)
    strategy = instantiate(cfg.strategy, _convert_="all")
    assert isinstance(strategy, Strategy)
    assert strategy.name == ("replay+lwf" if name == "replay_lwf" else name)


@pytest.mark.parametrize("order", ["lwf_first", "inclora_first"])
def test_lwf_teacher_is_the_start_of_task_model_with_adapter_growth(order, tiny_base, tasks, tmp_path):
    parts = [LwF(), IncLoRA()] if order == "lwf_first" else [IncLoRA(), LwF()]
    pop, base, rec, _ = _run(Compose(parts), tiny_base, tasks, tmp_path)
    assert pop.agents["agent0"].adapters == ["agent0", "agent0-t1"]
    steps = rec.of("t2")
    assert steps[0]["lwf"] == pytest.approx(0.0, abs=1e-6) and steps[1]["lwf"] > 0


def test_seqft_scores_the_same_with_and_without_the_sweep_cache(run_lmas, fast_overrides, tmp_path):
    """SeqFT trains the layers that eval.cache's trunk holds: every score must be of the weights as they are now
    (a regression: the trunk's memory level once returned rows of the untrained base after training)."""
    common = [*fast_overrides, "strategy=seqft", "population.lora.layers_to_transform=[1]", "train.lr=0.05",
              "train.max_steps=8"]  # fmt: skip
    cached = run_lmas([*common, f"eval.cache={tmp_path / 'cache'}", "eval.shared_trunk=true"], tmp_path / "cached")
    plain = run_lmas(common, tmp_path / "plain")
    assert cached["matrix"]["values"] == plain["matrix"]["values"]  # accuracies: the same answers
    assert cached["matrix"]["values"][-1] != cached["matrix"]["values"][0]  # the base did change
