"""A population over several bases (lmas/population/bases.py): agents routed to their own base's model, scorer
and fit; the loop, allocation and checkpoints see the union; what cannot cross bases is refused by the check."""

from __future__ import annotations

import pytest
import torch

from lmas.evaluation.scorer import PopulationScorer
from lmas.lm.encoding import PromptEncoder
from lmas.models.providers import tiny
from lmas.population.bases import Bases, parts
from lmas.population.population import Population

SMALL = "{_target_:lmas.models.providers.tiny,hidden_size:48,num_layers:2,num_heads:2,intermediate_size:64,seed:1}"
TWO_BASES = ["population=bases", f"+population.bases.small={SMALL}", "population.agents={a:model,b:small,c:model}"]


def _bases() -> Bases:
    big = tiny(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=0)
    small = tiny(hidden_size=48, num_layers=2, num_heads=2, intermediate_size=64, seed=1)
    return Bases(big, {"a": "model", "b": "small", "c": "model"}, {"small": small}, {"r": 2, "alpha": 4}, seed=3)


def test_agents_live_on_their_own_base_and_the_facade_routes_every_call(tmp_path):
    pop = _bases()
    assert pop.names == ["a", "b", "c"] and list(pop.agents) == ["a", "b", "c"] and len(pop.agents) == 3
    assert set(parts(pop)) == {"model", "small"}
    assert pop.of("a") is pop.of("c") is not pop.of("b")
    assert pop.of("a").names == ["a", "c"] and pop.of("b").names == ["b"]
    assert [pop.base_name(x) for x in pop.names] == ["model", "small", "model"]
    # each agent's adapter is in its base's model: its shapes are that base's (hidden 32 vs 48)
    widths = {x: {v.shape[-1] for k, v in pop.adapter_state(x).items() if "lora_A" in k} for x in pop.names}
    assert widths == {"a": {32}, "b": {48}, "c": {32}}
    with torch.no_grad():
        next(iter(pop.parameters_of("b").values())).add_(1.0)  # write b through the facade, read it back
    path = pop.save_adapter("b", tmp_path / "b.safetensors")
    other = _bases()
    other.load_adapter("b", path)
    for k, v in pop.adapter_state("b").items():
        assert torch.equal(v, other.adapter_state("b")[k])
    assert pop.lora_of("b").r == 2
    with pytest.raises(KeyError, match="unknown agent 'z'"):
        pop.of("z")
    with pytest.raises(ValueError, match="need one base"):
        pop.add_agent("d")
    with pytest.raises(AttributeError, match="no single model"):
        _ = pop.model
    with pytest.raises(ValueError, match="population.agents.d='nope': no such base; the bases are model, small"):
        Bases(pop.of("a").base, {"d": "nope"}, {"small": pop.of("b").base})
    assert isinstance(Population(tiny(hidden_size=32, num_layers=1, num_heads=2, seed=0)).of("agent0"), Population)


def test_routed_scores_are_each_bases_own(one_thread):
    from lmas.evaluation.scorer import RoutedScorer

    pop = _bases()
    own = {n: PopulationScorer(p, PromptEncoder(p.tokenizer, 64)) for n, p in pop.parts.items()}
    routed = RoutedScorer(pop, own, {x: pop.base_name(x) for x in pop.names})
    prompts, labels = ["the cat sat on the", "one two three"], ["mat", "four", "dog"]
    lp = routed.label_logprobs(["b", "a", "c"], prompts, labels)
    assert lp.shape == (3, 2, 3)
    assert torch.equal(lp[0], own["small"].label_logprobs(["b"], prompts, labels)[0])
    assert torch.equal(lp[1:], own["model"].label_logprobs(["a", "c"], prompts, labels))
    assert not torch.allclose(lp[0], lp[1])  # two different random bases
    assert routed.of("b") is own["small"] and routed.initial_groups(["a", "b", "c", "population"]) == [
        ("a", ["a", "c", "population"]),
        ("b", ["b"]),
    ]


def test_a_run_over_two_bases_scores_each_base_and_selects_by_competence(fast_overrides, tmp_path, run_lmas):
    out = tmp_path / "run"
    res = run_lmas(fast_overrides + TWO_BASES + ["topology=master_worker"], out)  # fused answers across bases
    assert {n: a["base"] for n, a in res["agents"].items()} == {"a": "tiny-llama", "b": "tiny-llama", "c": "tiny-llama"}
    assert res["population"]["allocation"] == "competence"
    assigned = [x for rnd in res["population"]["assignments"] for x, _ in rnd]
    assert len(assigned) == 3 and set(assigned) <= {"a", "b", "c"}
    m = res["matrix"]
    assert m["agents"] == ["a", "b", "c", "population"]
    assert all(
        m["values"][r][3][m["tasks"].index(t)] is not None
        for r, rnd in enumerate(res["population"]["assignments"])
        for _, t in rnd
    )  # the population answered each task it met, fusing agents of both bases
    last = res["similarity"][-1]  # all three have trained: weights only within one base, predictions of all
    assert set(last["weights"]) == {"a~c"} and set(last["predictions"]) == {"a~b", "a~c", "b~c"}
    init = {row: m["initial"][m["agents"].index(row)] for row in m["agents"]}
    assert init["a"] == init["c"] and init["a"] != init["b"]  # the untrained model of each base
    import numpy as np

    with np.load(out / "per_example" / "initial.npz") as f:
        assert {k.split("/")[0] for k in f.files} == {"a", "b", "c", "population"}  # every row, its own base's
        assert all((f[f"c/{t}"] == f[f"a/{t}"]).all() for t in m["tasks"])  # one scoring agent per base
    saved = sorted(p.name for p in (out / "adapters").rglob("*.safetensors"))
    assert saved  # versions of the trained agents, each from its own base


@pytest.mark.parametrize(
    ("extra", "bad"),
    [
        (["transfer=merge_init"], "transfer._target_"),
        (["population=bases", "topology=peer_to_peer"], "topology._target_"),
        (["loop=federated", "allocation=broadcast"], "loop._target_"),
        (["distill=peers"], "distill.teachers"),
    ],
)
def test_what_cannot_cross_bases_is_refused_naming_the_agents(extra, bad, compose):
    from lmas.config import ConfigError, validate

    with pytest.raises(ConfigError) as err:
        validate(compose(["model=tiny", *TWO_BASES, *extra]))
    line = next(p for p in err.value.problems if p.startswith(bad))
    assert "model: a, c; small: b" in line


def test_an_agent_on_an_unknown_base_is_refused_before_loading(compose):
    from lmas.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"population.agents.b=large: no such base; the bases are model, small"):
        validate(compose(["model=tiny", *TWO_BASES[:2], "population.agents={a:model,b:large}"]))


@pytest.mark.slow
def test_smollm2_and_minilm_agents_in_one_run(tmp_path, run_lmas):
    """The README's two-base command on the real embedded models (debug=fast): SmolLM2 answers zero-shot, MiniLM's
    untrained head cannot, so competence gives every task to the SmolLM2 agent (docs/models.md)."""
    out = tmp_path / "real"
    overrides = ["debug=fast", "logger=csv", f"paths.output_dir={tmp_path}", "population=bases",
                 "+population.bases.minilm={_target_:lmas.models.providers.encoder}",
                 "population.agents={agent0:model,agent1:minilm}", "stream=bbc_class_incremental"]  # fmt: skip
    res = run_lmas(overrides, out)
    assert {n: a["base"] for n, a in res["agents"].items()} == {"agent0": "smollm2-135m-instruct",
                                                                "agent1": "all-MiniLM-L6-v2"}  # fmt: skip
    assert [x for rnd in res["population"]["assignments"] for x, _ in rnd] == ["agent0"] * 3
    m = res["matrix"]
    # MiniLM's untrained head: every label scores 0, so the first label of the class-incremental space (business)
    # wins: right on half of the first task's items, on none of the later tasks'
    assert m["initial"][1] == [0.5, 0.0, 0.0] and min(m["initial"][0]) > 0.5


def test_a_teacher_on_another_base_teaches_its_label_distribution(one_thread):
    """bind_teachers: a student's peers on another base teach classification through their own scorer's label
    log-likelihoods (AgentTeacher); its own base's peers stay agent teachers; untrained peers do not teach."""
    from lmas.data.task import Example, Task
    from lmas.distill.strategy import Distill
    from lmas.models.providers import tiny_encoder
    from lmas.population.bases import AgentTeacher, bind_teachers, machinery
    from lmas.population.events import Event
    from lmas.schema import EvalConfig, TrainConfig
    from lmas.strategies.base import Strategy
    from lmas.strategies.compose import Compose

    big = tiny(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=0)
    bases = Bases(big, {"a": "model", "c": "model", "e": "enc"}, {"enc": tiny_encoder(seed=1)}, {"r": 2}, seed=0)
    _, _, scorer, _ = machinery(bases, 32, TrainConfig(), EvalConfig(), {}, progress=False)
    distill = Distill(teachers="peers", students=["a"])
    bind_teachers(Compose([Strategy(), distill]), bases, scorer)
    rows = [Example("an apple", "fruit"), Example("a bus", "vehicle")]
    task = Task("toy", "classification", rows, rows, rows, labels=["fruit", "vehicle"])
    assert distill.cross is not None and distill.cross("a", task) == []  # nobody has learnt anything yet
    for name in ("c", "e"):
        bases.agents[name].history.append(Event(0, "trained", "toy"))
    (teacher,) = distill.cross("a", task)
    assert isinstance(teacher, AgentTeacher) and teacher.name == "e"
    assert distill.teachers_for(bases.of("a"), "a", task) == ["c"]  # same base: an agent teacher as before
    bases.of("e").set_head("e", ["fruit", "vehicle"], torch.randn(2, 33, generator=torch.Generator().manual_seed(0)))
    want = scorer.of("e").label_logprobs(["e"], ["an apple", "a bus"], ["fruit", "vehicle"])[0]
    torch.testing.assert_close(teacher.label_scores(["an apple", "a bus"], ["fruit", "vehicle"]), want)
    assert not torch.allclose(want, want.new_full(want.shape, -0.6931), atol=1e-3)  # a head that says something
    bind_teachers(distill, bases.of("a"), scorer)  # one base: nothing to bind


def test_model_selection_answers_with_the_best_agent_on_validation_and_keeps_every_rows_records(tmp_path, run_lmas):
    """experiment=model_selection on tiny bases: the population row answers each task with the agent of the better
    validation accuracy (fusion=select); every row has per-example records (the untrained model of its own base,
    the population's fused answers), so paired differences between rows of the same runs come out of the items."""
    import numpy as np

    from lmas.metrics.stats import item_intervals, load_run, paired_difference

    enc = "population.bases.minilm={_target_:lmas.models.providers.tiny_encoder}"
    res = run_lmas(["model=tiny", "debug=fast", "logger=csv", f"paths.output_dir={tmp_path}",
                    "experiment=model_selection", enc], tmp_path / "run")  # fmt: skip
    m = res["matrix"]
    assert m["agents"] == ["smollm2", "minilm", "population"]
    values = np.array(m["values"], dtype=float)  # (round, row, task)
    for r, answers in enumerate(res["population"]["answers"]):
        for task, answer in answers.items():
            j, best = m["tasks"].index(task), int(np.argmax(answer["val_acc"]))
            assert answer["fusion"] == "select" and "predictions" not in answer
            assert values[r, 2, j] == values[r, best, j]  # the selected agent's own answers
    run = load_run(tmp_path / "run")
    with np.load(tmp_path / "run" / "per_example" / "initial.npz") as f:
        assert {"smollm2/bbc_tech", "minilm/bbc_tech", "population/bbc_tech"} <= set(f.files)
    rows = {a: item_intervals(run, agent=a, n_resamples=99)["avg_acc"].estimate for a in m["agents"]}
    assert rows == pytest.approx({a: res["metrics"][a]["avg_acc"] for a in m["agents"]})
    diff = paired_difference([run], [run], agent="population", agent_b="minilm", n_resamples=99)["avg_acc"]
    assert diff.estimate == pytest.approx(rows["population"] - rows["minilm"])
