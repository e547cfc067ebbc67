"""Config validation (lmas/config.py): bad options fail before training, naming the option and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import open_dict

from lmas.config import ConfigError, validate

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture(name="problems")
def problems_fixture(compose):
    """``problems(overrides)``: the ConfigError message for the default config with ``overrides``."""
    return lambda overrides: _problems(compose, overrides)


def _problems(compose, overrides: list[str]) -> str:
    cfg = compose(["model=tiny", *overrides])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert isinstance(info.value, ValueError)
    return str(info.value)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lr=0", "train.lr=0: the learning rate must be a number > 0"),
        ("train.lr=fast", "train.lr=fast: the learning rate must be a number > 0"),
        ("train.batch_size=0", "train.batch_size=0: expected an integer >= 1"),
        ("train.epochs=0", "train.epochs=0: expected an integer >= 1"),
        ("train.max_steps=0", "train.max_steps=0: expected null (full epochs) or an integer >= 1"),
        ("train.weight_decay=-0.1", "train.weight_decay=-0.1: expected a number >= 0"),
        ("train.warmup_steps=-1", "train.warmup_steps=-1: expected an integer >= 0"),
        ("train.log_every=0", "train.log_every=0: expected an integer >= 1"),
        ("eval.split=train", "eval.split=train: expected one of val, test"),
        ("eval.batch_size=0", "eval.batch_size=0: expected an integer >= 1"),
        ("eval.max_new_tokens=0", "eval.max_new_tokens=0: expected an integer >= 1"),
        ("eval.curve_every=-1", "eval.curve_every=-1: expected an integer >= 0"),
        ("data.max_length=4", "data.max_length=4: expected an integer >= 8"),
        ("seed=1.5", "seed=1.5: expected an integer in [0, 4294967295]"),
        ("seed=-1", "seed=-1: expected an integer in [0, 4294967295]"),
    ],
)
def test_train_eval_data_and_seed_values_are_checked(override, expected, problems):
    assert expected in problems([override])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("population.agents=0", "population.agents=0: expected a positive integer, a non-empty list"),
        ("population.agents=[]", "population.agents=[]: expected a positive integer, a non-empty list"),
        ("population.agents=[a,b,a]", "population.agents=[a,b,a]: agent names must be unique; repeated: a"),
        ("population.agents=[a,1b]", "agent names must match"),
        ("population.lora.r=-2", "population.lora.r=-2: the LoRA rank must be an integer >= 1"),
        ("population.lora.alpha=0", "population.lora.alpha=0: expected a number > 0"),
        ("population.lora.dropout=1.0", "population.lora.dropout=1.0: expected a number in [0, 1)"),
        ("population.lora.target_modules=q_proj", "population.lora.target_modules=q_proj: expected a non-empty list"),
        ("population.lora.target_modules=[]", "population.lora.target_modules=[]: expected a non-empty list"),
        ("population.lora.layers_to_transform=[0,-1]",
         "population.lora.layers_to_transform=[0,-1]: expected null (every layer) or a non-empty list of layer"),
    ],
)
def test_population_values_are_checked(override, expected, problems):
    assert expected in problems([override])


def test_stream_needs_tasks_with_targets_and_unique_names_and_known_scenario_and_order(problems, compose):
    assert "stream.tasks=[]: a stream needs a non-empty list of tasks" in problems(["stream.tasks=[]"])
    assert "stream.tasks[1].name=bbc: task names must be unique in a stream; stream.tasks[0]" in problems(
        ["stream.tasks.1.name=bbc"])
    msg = problems(["stream.scenario=tasks", "stream.order=random"])
    assert "stream.scenario=tasks: expected one of task, class, domain" in msg
    assert "stream.order=random: expected one of fixed, shuffle" in msg

    cfg = compose(["model=tiny"])
    with open_dict(cfg):
        del cfg.stream.tasks[2]["_target_"]
    with pytest.raises(ConfigError, match=r"stream\.tasks\[2\]\._target_: missing"):
        validate(cfg)


def test_every_target_must_import_and_take_its_keys(problems):
    msg = problems(["strategy._target_=lmas.strategies.regularizers.EWCC"])
    assert "strategy._target_=lmas.strategies.regularizers.EWCC: cannot be imported" in msg
    assert "did you mean lmas.strategies.regularizers.EWC?" in msg
    assert "strategy._target_=lmas.strategies.nope.Nope: cannot be imported" in problems(
        ["strategy._target_=lmas.strategies.nope.Nope"])
    # targets nested in lists are found too (a stream's tasks, Compose's parts)
    assert "stream.tasks[0]._target_=lmas.data.sources.bbc_topicz: cannot be imported" in problems(
        ["stream.tasks.0._target_=lmas.data.sources.bbc_topicz"])
    assert "strategy.parts[1]._target_=lmas.strategies.lwf.LwG: cannot be imported" in problems(
        ["strategy=replay_lwf", "strategy.parts.1._target_=lmas.strategies.lwf.LwG"])
    # a key the target does not take (added with +, or misspelt in a preset file)
    msg = problems(["strategy=ewc", "+strategy.ewc_lamda=3"])
    assert "strategy.ewc_lamda: not an argument of lmas.strategies.regularizers.EWC" in msg
    assert "did you mean strategy.ewc_lambda?" in msg and "allowed: ewc_lambda, mode, decay" in msg


def test_misspelt_option_on_the_command_line_is_refused_by_hydra_and_with_plus_by_validate(problems, compose):
    # Hydra's struct mode names the option (it does not list the allowed keys) ...
    with pytest.raises(ConfigCompositionException, match=r"Could not override 'train\.lrr'"):
        compose(["model=tiny", "train.lrr=1"])
    with pytest.raises(ConfigCompositionException, match=r"Could not override 'population\.lora\.rr'"):
        compose(["model=tiny", "population.lora.rr=3"])
    # ... and the same key forced in with + (or misspelt in a preset file) is refused by validate,
    # which lists the allowed keys
    msg = problems(["+train.lrr=1"])
    assert "train.lrr: not an option of train" in msg and "did you mean train.lr?" in msg
    assert "allowed: lr, batch_size, epochs, max_steps, weight_decay, warmup_steps, log_every" in msg
    msg = problems(["+population.lora.rr=3"])
    assert "population.lora.rr: not an option of population.lora" in msg and "allowed: r, alpha, dropout" in msg
    assert "data.max_lenght: not an option of data (conf/train.yaml) (did you mean data.max_length?)" in problems(
        ["+data.max_lenght=64"])
    msg = problems(["+trian.lr=1"])
    assert "trian: not an option of the config" in msg and "did you mean train?" in msg


def test_misspelt_group_choice_is_refused_by_hydra_with_the_available_options(compose):
    with pytest.raises(ConfigCompositionException) as info:
        compose(["model=tiny", "strategy=ewcc"])
    msg = str(info.value)
    assert "Could not find 'strategy/ewcc'" in msg
    assert "Available options in 'strategy'" in msg
    for option in ("agem", "ewc", "lwf", "naive", "replay"):
        assert f"\t{option}\n" in msg


def test_trainer_options_and_incompatible_choices_are_checked(problems):
    msg = problems(["+trainer.max_epochs=3", "+trainer.acelerator=cpu"])
    assert "trainer.max_epochs=3: set by the loop itself; use train.epochs instead" in msg
    assert "trainer.acelerator: not an argument of lightning.Trainer (did you mean trainer.accelerator?)" in msg
    assert "population.agents=2: strategy=seqft fine-tunes the shared base model, so it needs a single agent" in (
        problems(["strategy=seqft", "population.agents=2"]))
    # an Explicit allocation may only name the population's agents and the stream's tasks
    msg = problems(["experiment=knowledge_transfer/forward_transfer", "population.agents=2",
                     "stream.tasks.2.name=news_c"])
    assert "allocation.rounds[1].agent2=news_b: 'agent2' is not an agent; the agents" in msg
    assert "task 'news_b' is not in the stream; its tasks (stream.tasks[*].name) are news_a, chat, news_c" in msg
    msg = problems(["population=hierarchical", "topology.order=[agent0,agent7]"])
    assert "topology.order=[agent0,agent7]: unknown agents agent7" in msg


def test_a_missing_value_and_every_problem_are_reported_at_once(problems):
    msg = problems(["model=hf", "population.lora.r=0", "train.epochs=0"])
    assert msg.startswith("invalid config (3 problems):")
    assert "model.name_or_path=???: this option has no value" in msg


def _presets() -> list[list[str]]:
    experiments = sorted(p.relative_to(CONF / "experiment").with_suffix("").as_posix()
                         for p in (CONF / "experiment").rglob("*.yaml"))
    populations = sorted(p.stem for p in (CONF / "population").glob("*.yaml"))
    return [[]] + [[f"experiment={e}"] for e in experiments] + [[f"population={p}"] for p in populations]


@pytest.mark.parametrize("overrides", _presets(), ids=lambda o: o[0] if o else "default")
def test_the_default_config_and_every_preset_pass(overrides, compose):
    assert any("knowledge_transfer/" in o[0] for o in _presets() if o)  # the rglob reaches sub-folders
    tiny = "model=tiny_encoder" if overrides == ["experiment=encoder_pretraining"] else "model=tiny"  # its agents
    validate(compose(overrides if not overrides else [tiny, *overrides]))


def test_a_bad_option_fails_before_anything_is_built(fast_overrides, tmp_path, run_lmas, monkeypatch):
    import lmas.train

    def no_instantiate(*args, **kwargs):
        raise AssertionError("validate must refuse the config before anything is instantiated")

    monkeypatch.setattr(lmas.train, "instantiate", no_instantiate)
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"population\.lora\.r=-2: the LoRA rank must be an integer >= 1"):
        run_lmas(fast_overrides + ["population.lora.r=-2"], run_dir)
    assert not (run_dir / "results.json").exists()
    assert not run_dir.exists()  # not even the run directory is made


def test_token_level_distillation_between_tokenizers_is_refused(compose):
    from lmas.config import ConfigError, validate

    cfg = compose(["model=tiny", "distill=minilm"])  # the default stream has a math (generation) task
    with pytest.raises(ConfigError, match=r"distill.external.*need token-level distillation"):
        validate(cfg)
    validate(compose(["model=tiny", "distill=minilm", "stream=self_learning"]))  # classification only: fine
    cfg = compose(["model=tiny", "distill=minilm", "stream=self_learning", "distill.on_policy=0.5"])
    with pytest.raises(ConfigError, match=r"distill.on_policy=0.5: on-policy distillation .* another tokenizer"):
        validate(cfg)
