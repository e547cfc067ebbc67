"""The typed schema (lmas/schema.py): conf/train.yaml composes on top of it, so a misspelt key or a value of the
wrong type fails while Hydra composes, with Hydra's message naming the option; the allocation and topology groups."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import lmas.schema  # registers train_schema with Hydra's ConfigStore
from lmas.config import ConfigError, validate


def _compose_error(compose, overrides: list[str]) -> str:
    """Hydra's message for a config that does not compose, with its cause (what the command line prints)."""
    with pytest.raises(ConfigCompositionException) as info:
        compose(["model=tiny", *overrides])
    return f"{info.value}\n{info.value.__cause__}"


def test_the_config_composes_on_the_typed_sections(compose):
    cfg = compose(["model=tiny"])
    assert OmegaConf.get_type(cfg) is lmas.schema.RootConfig
    assert OmegaConf.get_type(cfg.train) is lmas.schema.TrainConfig
    assert OmegaConf.get_type(cfg.population.lora) is lmas.schema.PopulationLoraConfig
    assert OmegaConf.get_type(cfg.stream) is dict  # a stream factory takes its own keys: checked by validate()
    assert cfg.train.lr == 2e-3 and cfg.population.lora.r == 8  # conf/ gives the values, the schema the types
    assert lmas.schema.TrainConfig(**cfg.train).batch_size == 8  # what the loop is given


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lrr=1", "Could not override 'train.lrr'"),
        ("trian.lr=1", "Could not override 'trian.lr'"),
        ("population.lora.rr=3", "Could not override 'population.lora.rr'"),
        ("eval.batch_size=abc", "'abc' of type 'str' could not be converted to Integer\n    full_key: eval.batch_size"),
        ("train.epochs=1.5", "full_key: train.epochs"),
        ("progress=maybe", "Value 'maybe' is not a valid bool (type str)\n    full_key: progress"),
        ("population.lora.dropout=high", "full_key: population.lora.dropout"),
        ("stream.max_train=x", "full_key: stream.max_train"),
    ],
)
def test_a_misspelt_key_or_a_wrong_type_fails_while_composing(override, expected, compose):
    msg = _compose_error(compose, [override])
    assert override in msg or override.split("=")[0] in msg  # the option is named
    assert expected in msg


def test_a_misspelt_key_in_a_config_file_fails_while_composing(compose, tmp_path):
    """A user's files (``--config-dir``/``hydra.searchpath``) are held to the schema too, top level included; the
    stream section (whose keys depend on its factory: Stream, cl_stream, ...) is held to it by validate()."""
    (tmp_path / "stream").mkdir()
    (tmp_path / "experiment").mkdir()
    stream = OmegaConf.load(Path(__file__).parents[1] / "conf" / "stream" / "default.yaml")
    stream.scenaro = "class"
    OmegaConf.save(stream, tmp_path / "stream" / "mine.yaml")
    (tmp_path / "experiment" / "mine.yaml").write_text("# @package _global_\ntrian:\n  lr: 0.1\n")
    search = f"hydra.searchpath=[file://{tmp_path}]"
    with pytest.raises(ConfigError, match=r"stream\.scenaro"):
        validate(compose(["model=tiny", search, "stream=mine"]))
    msg = _compose_error(compose, [search, "experiment=mine"])
    assert "Key 'trian' not in 'RootConfig'" in msg


def test_the_loop_group_is_open_and_the_old_selflearn_key_is_gone(compose):
    cfg = compose(["model=tiny", "loop=self_learning", "loop.cycles=2"])  # checked against its _target_ by validate
    assert cfg.loop.cycles == 2 and cfg.loop._target_ == "lmas.selflearn.SelfLearning"
    assert "Key 'selflearn' not in 'RootConfig'" in _compose_error(compose, ["model=tiny", "selflearn.cycles=2"])


def test_keys_added_with_plus_are_named_by_the_check_with_what_is_allowed(compose):
    with pytest.raises(ConfigError) as info:
        validate(compose(["model=tiny", "+stream.scenaro=class", "+eval.splitt=val"]))
    msg = str(info.value)
    assert "stream.scenaro: not an option of stream (conf/stream/) (did you mean stream.scenario?)" in msg
    assert "eval.splitt: not an option of eval (conf/train.yaml) (did you mean eval.split?)" in msg


def test_population_presets_pick_their_allocation_and_topology_and_the_command_line_wins(compose):
    def picked(*overrides: str) -> tuple[str, str]:
        cfg = compose(["model=tiny", *overrides])
        return cfg.allocation._target_.rpartition(".")[2], cfg.topology._target_.rpartition(".")[2]

    assert picked() == ("Broadcast", "Topology")
    assert picked("population=master_worker") == ("Competence", "MasterWorker")
    assert picked("population=peer_to_peer") == ("RoundRobin", "PeerToPeer")
    assert picked("population=hierarchical") == ("RoundRobin", "Hierarchical")
    assert picked("population=peer_to_peer", "allocation=broadcast") == ("Broadcast", "PeerToPeer")
    assert picked("topology=hierarchical", "population=master_worker") == ("Competence", "Hierarchical")
    assert picked("experiment=knowledge_transfer/forward_transfer") == ("Explicit", "Topology")
    cfg = compose(["model=tiny", "population=peer_to_peer", "topology.max_rank=16"])
    assert cfg.topology.max_rank == 16 and cfg.topology.seed == cfg.seed and "topology" not in cfg.population


def test_every_allocation_and_topology_config_instantiates(compose):
    from hydra.utils import instantiate

    from lmas.population.allocation import Allocation
    from lmas.population.topology import Topology

    conf = Path(__file__).parents[1] / "conf"
    for group, base in (("allocation", Allocation), ("topology", Topology)):
        names = sorted(p.stem for p in (conf / group).glob("*.yaml"))
        assert len(names) >= 4, names
        for name in names:
            extra = ["allocation.rounds=[{agent0: bbc}]"] if name == "explicit" else []
            assert isinstance(instantiate(compose(["model=tiny", f"{group}={name}", *extra])[group]), base)


def test_an_explicit_allocation_needs_its_rounds(compose):
    with pytest.raises(ConfigError, match=r"allocation\.rounds=\?\?\?: this option has no value"):
        validate(compose(["model=tiny", "allocation=explicit"]))
