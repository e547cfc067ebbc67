"""The self-learning loop: pseudo-labelling by agreement or confidence, precision against the
withheld labels, consolidation into the student, the validation gate and its rollback."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lmas.loop import ContinualLoop
from lmas.selflearn import SelfLearning

SMALL = ["experiment=self_learning", "loop.seed_labels=4", "loop.chunk=6", "loop.cycles=2"]


def test_cycles_label_train_consolidate_and_log(fast_overrides, tmp_path, run_lmas):
    res = run_lmas(fast_overrides + SMALL, tmp_path / "sl")
    cycles = res["self_learning"]
    assert [c["cycle"] for c in cycles] == [0, 1, 2]
    assert cycles[0]["tasks"]["bbc"] == {"arrived": 4, "kept": 4, "coverage": 1.0, "precision": 1.0}
    for c in cycles[1:]:
        for st in c["tasks"].values():
            assert st["arrived"] == 6 and 0 <= st["kept"] <= 6 and st["coverage"] == st["kept"] / 6
            assert st["precision"] is None or 0.0 <= st["precision"] <= 1.0
        assert isinstance(c["accepted"], bool) and set(c["drops"]) == {"bbc", "chat"}
    comm = res["population"]["communication"][1]["by_kind"]
    assert comm["label_distribution"]["messages"] == 2 * 2  # 2 workers x 2 tasks
    assert comm["pseudo_labels"]["messages"] == 3 * 2  # to the 2 workers and the student, per task
    student = res["agents"]["student"]["history"]
    assert [e["task"] for e in student if e["event"] == "trained"][:2] == ["bbc", "chat"]  # distilled per task
    assert res["matrix"]["agents"] == ["agent0", "agent1", "student"]


def test_a_rejected_cycle_restores_every_adapter(fast_overrides, tmp_path, run_lmas, monkeypatch):
    calls = {"n": 0}

    def falling(self):  # calls: round 0 after, then (before, after) per cycle: every cycle loses 0.5
        calls["n"] += 1
        return {t.name: 1.0 if calls["n"] % 2 == 0 else 0.5 for t in self.loop.stream.tasks}

    monkeypatch.setattr(SelfLearning, "_val_scores", falling)
    out = tmp_path / "rej"
    res = run_lmas(fast_overrides + SMALL + ["loop.tolerance=0.1"], out)
    assert [c["accepted"] for c in res["self_learning"]] == [True, False, False]
    assert any(e["event"] == "rejected" for e in res["agents"]["agent0"]["history"])
    # the final adapters are the ones of round 0 (every later cycle was rolled back)
    for agent in ("agent0", "student"):
        first = sorted((out / "adapters" / agent).glob("round000-*.safetensors"))[0]
        final = out / "checkpoint" / "adapters" / f"{agent}.safetensors"
        a, b = load_file(str(first)), load_file(str(final))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _loop_with_votes(run_lmas, fast_overrides, tmp_path, monkeypatch, votes, labelling, chunk, threshold=0.8):
    """A run whose workers label the bbc chunk of cycle 1 with the given table (A, N, L)."""
    from lmas.evaluation.scorer import PopulationScorer

    real = PopulationScorer.label_logprobs

    def fake(self, agents, prompts, labels):
        if list(prompts) == chunk:
            return votes.log()
        return real(self, agents, prompts, labels)

    monkeypatch.setattr(PopulationScorer, "label_logprobs", fake)
    res = run_lmas(fast_overrides + SMALL + [f"loop.labelling={labelling}",
                                            f"loop.threshold={threshold}", "loop.cycles=1"],
                   tmp_path / labelling)
    return res["self_learning"][1]["tasks"]["bbc"]


def test_agreement_and_confidence_labelling(fast_overrides, tmp_path, run_lmas, monkeypatch):
    from lmas.data.sources import bbc_topics

    # conf/stream/self_learning.yaml, resampled as experiment=self_learning does (stream.split_seed: ${seed}, 0)
    task = bbc_topics("bbc", n_train=160, n_val=20, n_test=40, max_chars=160).resampled(0)
    gold = [task.labels.index(ex.answer) for ex in task.train[4:10]]
    n_lab = len(task.labels)
    votes = torch.full((2, 6, n_lab), 0.01)
    for i, g in enumerate(gold):
        wrong = (g + 1) % n_lab
        votes[0, i, g] = 0.95  # worker 0 always right and sure
        votes[1, i, g if i < 4 else wrong] = 0.9 if i < 2 else 0.3  # worker 1 agrees on 0..3, sure on 0..1
    votes = votes / votes.sum(-1, keepdim=True)
    chunk = [ex.prompt for ex in task.train[4:10]]
    agree = _loop_with_votes(run_lmas, fast_overrides, tmp_path, monkeypatch, votes, "agreement", chunk)
    assert agree["kept"] == 4 and agree["precision"] == 1.0
    conf = _loop_with_votes(run_lmas, fast_overrides, tmp_path, monkeypatch, votes, "confidence", chunk, 0.94)
    assert conf["kept"] == 2 and conf["precision"] == 1.0  # only the two where both are sure


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="loop.labelling='vote'"):
        SelfLearning(labelling="vote")
    with pytest.raises(ValueError, match="loop.consolidate"):
        SelfLearning(consolidate="average")


def _constant_gate(accept: bool):
    """A validation gate that accepts (constant scores) or rejects (every cycle loses 0.5) each cycle."""
    calls = {"n": 0}

    def scores(self):
        calls["n"] += 1
        return {t.name: 1.0 if accept or calls["n"] % 2 == 0 else 0.5 for t in self.loop.stream.tasks}

    return scores


@pytest.mark.parametrize("accept", [True, False])
def test_strategies_see_only_the_labelled_pool_never_the_withheld_labels(fast_overrides, tmp_path, run_lmas,
                                                                         monkeypatch, accept):
    """strategy=joint trains on `seen` tasks: in self-learning those hold the seed's true labels and
    the pseudo-labels of accepted cycles only."""
    from lmas.strategies.joint import Joint

    seen_log = []
    real = Joint.train_examples

    def recording(self, agent, task, seen):
        seen_log.append((agent, task.name, {t.name: [(ex.prompt, ex.answer) for ex in t.train] for t in seen}))
        return real(self, agent, task, seen)

    monkeypatch.setattr(Joint, "train_examples", recording)
    monkeypatch.setattr(SelfLearning, "_val_scores", _constant_gate(accept))
    res = run_lmas(fast_overrides + SMALL + ["strategy=joint"], tmp_path / "sl")
    from lmas.data.sources import bbc_topics

    bbc = bbc_topics("bbc", n_train=160, n_val=20, n_test=40, max_chars=160).resampled(0)  # split_seed: ${seed}
    seed_rows = [(ex.prompt, ex.answer) for ex in bbc.train[:4]]
    kept = [c["tasks"]["bbc"]["kept"] for c in res["self_learning"]]
    # training chat in cycle r, the bbc rows a strategy sees: the seed, plus accepted cycles' pseudo-labels
    chat_fits = [s for a, t, s in seen_log if a == "student" and t == "chat"]
    assert len(chat_fits) == 3 and chat_fits[0] == {"bbc": seed_rows}
    for r, seen in enumerate(chat_fits):
        expect = 4 + (sum(kept[1:r]) if accept else 0)
        assert len(seen["bbc"]) == expect and seen["bbc"][:4] == seed_rows
        chunk = {ex.prompt for ex in bbc.train[4:4 + 6 * max(r - 1, 0)]}
        assert all(p in chunk for p, _ in seen["bbc"][4:])  # pseudo-labelled rows of earlier cycles only


def test_a_rejected_cycle_also_restores_the_strategy_state(fast_overrides, tmp_path, run_lmas, monkeypatch):
    from lmas.checkpoint import load

    monkeypatch.setattr(SelfLearning, "_val_scores", _constant_gate(False))
    out = tmp_path / "replay"
    res = run_lmas(fast_overrides + SMALL + ["strategy=replay"], out)
    assert [c["accepted"] for c in res["self_learning"]] == [True, False, False]
    state, _ = load(out)
    buffers = state["strategy"]["buffers"]
    assert set(buffers) == {"agent0", "agent1", "student"}  # the student replays too
    for agent, buf in buffers.items():  # only round 0's seed examples (4 per task) are remembered
        items = [it for _, group in buf["groups"] for it in group["items"]]
        assert len(items) == 8, agent
    assert state["strategy"]["trained"] == {"agent0": 2, "agent1": 2, "student": 2}


def test_selflearn_refuses_a_second_distillation_term(compose):
    from lmas.config import validate

    with pytest.raises(ValueError, match="loop.distill"):
        validate(compose(["experiment=self_learning", "distill=peers"]))


def test_a_drop_equal_to_the_tolerance_passes_despite_float32_rounding(fast_overrides, tmp_path, run_lmas,
                                                                         monkeypatch):
    """Accuracies are float32 means: 0.8 - 0.7 reads 0.10000002. A drop of exactly `tolerance` (2 of
    20 val examples) is accepted, a larger one is not."""
    assert float(torch.tensor(0.8)) - float(torch.tensor(0.7)) > 0.1
    calls = {"n": 0}

    def scores(self):  # cycle 1 drops by exactly 2/20 on every task, cycle 2 by 3/20
        calls["n"] += 1
        after = {1: 0.8, 2: 0.8, 3: 0.7, 4: 0.8, 5: 0.65}[calls["n"]]
        return {t.name: float(torch.tensor(after)) for t in self.loop.stream.tasks}

    monkeypatch.setattr(SelfLearning, "_val_scores", scores)
    res = run_lmas(fast_overrides + SMALL + ["loop.tolerance=0.1"], tmp_path / "eps")
    assert [c["accepted"] for c in res["self_learning"]] == [True, True, False]


# --- the whole population is rolled back; withheld labels never decide; unused options refused -----
def _tiny_loop(tiny_base, tmp_path, strategy):
    from lmas.data.stream import Stream
    from lmas.data.task import Example, Task
    from lmas.population.population import Population

    labels = ["red", "blue"]
    rows = [Example(f"colour {i}?", labels[i % 2]) for i in range(12)]
    stream = Stream("colours", [Task("c", "classification", rows, [], rows[:4], labels)])
    pop = Population(tiny_base, ["agent0", "student"], lora={"r": 2})
    return ContinualLoop(pop, stream, strategy, tmp_path, body=SelfLearning(seed_labels=3, chunk=3),
                         progress=False, save_adapters=False)


@pytest.mark.parametrize("name", ["inclora", "olora"])
def test_rollback_deletes_added_adapters_and_restores_weights_bit_identical(tiny_base, tmp_path, name):
    """What a rejected IncLoRA/O-LoRA cycle does to the population, undone: a task adapter added and
    trained, an existing adapter's weights changed, history and strategy state grown."""
    from lmas.strategies.olora import IncLoRA, OLoRA

    loop = _tiny_loop(tiny_base, tmp_path, IncLoRA() if name == "inclora" else OLoRA())
    pop, model = loop.population, loop.population.model
    pop.add_task_adapter("agent0")  # as after round 0: two task adapters
    loop.strategy.trained = {"agent0": 2, "student": 1}
    with torch.no_grad():  # trained-looking weights (B != 0)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    before = {a: {ad: pop.adapter_state(a, ad) for ad in pop.agents[a].adapters} for a in pop.names}
    names_before = {a: list(pop.agents[a].adapters) for a in pop.names}
    configs_before = set(model.peft_config)
    snap = loop.body.snapshot()
    # the cycle: a new task adapter per agent (IncLoRA's before_task), trained; events; strategy counts
    for agent in pop.names:
        pop.add_task_adapter(agent)
        pop.agents[agent].history.append({"round": 1, "event": "trained", "task": "c"})
    with torch.no_grad():  # every adapter, old and new, trained further
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.5)
    loop.strategy.trained = {"agent0": 3, "student": 2}
    loop.body.rollback(snap, 1)
    assert {a: pop.agents[a].adapters for a in pop.names} == names_before
    assert set(model.peft_config) == configs_before  # the added adapters are gone from the model
    for agent in pop.names:
        for ad, state in before[agent].items():
            now = pop.adapter_state(agent, ad)
            assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
        (event,) = pop.agents[agent].history
        assert event["event"] == "rejected" and event["undone"] == [{"round": 1, "event": "trained", "task": "c"}]
    assert loop.strategy.trained == {"agent0": 2, "student": 1}
    pop.activate("agent0")  # what is active and trainable is the pre-cycle set
    assert model.base_model.active_adapter == ["agent0", "agent0-t1"]
    assert all(("agent0-t1" in n) == p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_the_fallback_val_split_is_seed_labelled(tiny_base, tmp_path):
    """A task without a val split: every val view the loop builds holds seed-labelled examples only."""
    from lmas.strategies.base import Strategy

    loop = _tiny_loop(tiny_base, tmp_path, Strategy())
    task = loop.stream.tasks[0]
    assert loop.eval_cfg.val_fallback > loop.body.seed_labels  # the base loop would cut 12 training rows
    assert loop.evaluator.val_view(task).val == task.train[:3]
    assert loop.body._task(task, task.train[5:8]).val == task.train[:3]  # what fits and Distill's val_acc see


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["inclora", "olora"])
def test_a_rejected_inclora_cycle_ends_with_the_pre_cycle_adapters(fast_overrides, tmp_path, run_lmas, monkeypatch,
                                                                    strategy):
    monkeypatch.setattr(SelfLearning, "_val_scores", _constant_gate(False))
    out = tmp_path / strategy
    res = run_lmas(fast_overrides + SMALL + [f"strategy={strategy}", "loop.cycles=1"], out)
    assert [c["accepted"] for c in res["self_learning"]] == [True, False]
    for agent in ("agent0", "agent1", "student"):
        first = sorted((out / "adapters" / agent).glob("round000-*.safetensors"))[0]
        final = out / "checkpoint" / "adapters" / f"{agent}.safetensors"
        a, b = load_file(str(first)), load_file(str(final))
        assert {k.split("/")[0] for k in a} == {"0", "1"}  # two tasks in round 0: two adapters
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        history = res["agents"][agent]["history"]
        assert [e["event"] for e in history if e["round"] == 1] == ["rejected"]
    # the rejected cycle's training is not marked in the matrix; its messages were sent and counted
    assert {r for r, _, _ in res["matrix"]["trained"]} == {0}
    assert res["population"]["communication"][1]["by_kind"]["pseudo_labels"]["messages"] > 0


@pytest.mark.slow
def test_no_withheld_label_enters_the_gate_or_the_teacher_weights(fast_overrides, tmp_path, run_lmas, monkeypatch,
                                                                   compose):
    """Tasks without a val split, distillation weighted by teachers' val accuracy: every example
    scored as validation is one of the seed's labelled examples."""
    from hydra.utils import instantiate

    import lmas.distill.strategy as distill_strategy
    from lmas.evaluation.scorer import PopulationScorer

    scored: list[str] = []
    real_score, real_eval = PopulationScorer.score, distill_strategy.evaluate

    def score(self, agent, task, split, labels=None):
        if split == "val":
            scored.extend(ex.prompt for ex in task.val)
        return real_score(self, agent, task, split, labels)

    def evaluate(model, encoder, task, split, **kw):
        if split == "val":
            scored.extend(ex.prompt for ex in task.val)
        return real_eval(model, encoder, task, split, **kw)

    monkeypatch.setattr(PopulationScorer, "score", score)
    monkeypatch.setattr(distill_strategy, "evaluate", evaluate)
    no_val = ["stream.tasks.0.n_val=0", "stream.tasks.1.n_val=0", "loop.distill.aggregation=val_acc"]
    res = run_lmas(fast_overrides + SMALL + no_val, tmp_path / "noval")
    assert len(res["self_learning"]) == 3 and scored
    stream = instantiate(compose(fast_overrides + SMALL + no_val).stream, _convert_="all")  # the run's tasks
    assert all(not t.val for t in stream.tasks)
    labelled = {ex.prompt for t in stream.tasks for ex in t.train[:4]}
    withheld = {ex.prompt for t in stream.tasks for ex in t.train[4:]}
    assert set(scored) <= labelled and not set(scored) & withheld


@pytest.mark.parametrize("override, option", [
    ("transfer=merge_init", "transfer._target_"),
    ("population=peer_to_peer", "topology._target_"),
    ("population=peer_to_peer", "allocation._target_"),
    ("population=master_worker", "allocation._target_"),
])
def test_options_the_loop_does_not_use_are_refused_by_name(compose, override, option):
    from lmas.config import ConfigError, validate

    with pytest.raises(ConfigError, match=rf"{option}=\S+: is not used by the self-learning loop"):
        validate(compose(["experiment=self_learning", override]))
    validate(compose(["experiment=self_learning"]))  # the preset itself is fine
