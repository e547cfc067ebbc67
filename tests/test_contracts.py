"""Contract tests: every config of conf/strategy/** (avalanche/ included), conf/transfer/, conf/topology/ and
conf/distill/, found by glob when the tests are collected, on the tiny model and a 2-task stream.

In the setting it is made for (a strategy: one agent; a transfer or distillation: two agents; a topology: the
population preset that picks it), each config

* trains a few steps; the base model stays frozen (bit-identical weights, no ``requires_grad``; SeqFT, which
  fine-tunes the base on purpose, changes it and refreezes it) and every loss term the strategy adds is finite;
* stopped after its first round's checkpoint and resumed, ends with the uninterrupted run's knowledge matrix,
  adapter weights and strategy state (or the resume is refused by an error naming ``strategy=``);

and, composed with replay (a strategy: ``Compose([replay, it])`` as conf/strategy/replay_lwf.yaml does; the
other groups: next to ``strategy=replay``) or put in the other population (a strategy: two agents; the rest: one
agent), it trains as above (with replay: the replay part replays) or is refused at config time, before the
model is loaded, by an error naming the option. A new config is picked up by the glob: there is no list to edit.
"""

from __future__ import annotations

import copy
import functools
import math
from pathlib import Path

import pytest
import torch
import yaml
from hydra.errors import HydraException
from omegaconf import OmegaConf
from safetensors.torch import load_file

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("strategy", "transfer", "topology", "distill")
# A few-second run: tiny model made smaller, 2 steps per task, 4 training and 2 test examples per task.
FAST = ["model=tiny", "model.hidden_size=16", "model.num_heads=2", "model.num_layers=1", "model.intermediate_size=32",
        "debug=fast", "logger=none", "progress=false", "stream.max_train=4", "stream.max_eval=2",
        "train.max_steps=2", "train.batch_size=2", "eval.initial=false", "eval.next_task=false",
        "data.max_length=48"]
TASKS = 2  # the first two tasks of the default stream (both classification: every distill preset applies)
TOL = 1e-6
TOKENIZERS: dict[tuple, object] = {}  # loaded once for every test of this module (see fast_outputs)
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one torch thread (tests/conftest.py)


def options(group: str) -> list[str]:
    """Every config of ``conf/<group>/`` and its subfolders, as the group option that selects it."""
    folder = CONF / group
    return sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.yaml"))


CASES = [(group, option) for group in GROUPS for option in options(group)]
IDS = [f"{group}={option}" for group, option in CASES]


def _preset_of(topology: str) -> str | None:
    """The population preset whose defaults list picks ``topology`` (it has the agents the topology needs)."""
    for path in sorted((CONF / "population").glob("*.yaml")):
        for entry in yaml.safe_load(path.read_text()).get("defaults") or []:
            # "topology: x", "override /topology: x", "override /topology@_global_.topology: x"
            if isinstance(entry, dict) and any(k.replace("override", "").strip(" /").split("@")[0] == "topology"
                                               and v == topology for k, v in entry.items()):
                return path.stem
    return None


def setting(group: str, option: str) -> list[str]:
    """The overrides that select ``group=option`` where it can work: transfers and distillation get two agents
    (they move knowledge between agents), a topology gets the population preset that uses it."""
    if group == "strategy":
        return [f"strategy={option}"]
    if group == "topology":
        preset = _preset_of(option)
        return ([f"population={preset}"] if preset else []) + [f"topology={option}"]
    return [f"{group}={option}", "population.agents=2"]


class Probe:
    """Wraps the tiny model provider: the base models built (each with a copy of its weights), and whether any
    was built at all (a refusal at config time comes before that)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from lmas.models import providers

        self.bases: list[tuple[dict[str, torch.nn.Parameter], dict[str, torch.Tensor]]] = []
        provider = providers.tiny

        @functools.wraps(provider)
        def recording(*args, **kwargs):
            base = provider(*args, **kwargs)
            params = dict(base.model.named_parameters())
            self.bases.append((params, {n: p.detach().clone() for n, p in params.items()}))
            return base

        monkeypatch.setattr(providers, "tiny", recording)

    def check_base(self, trains_base: bool) -> None:
        """The last run's base: no parameter trainable after the run, weights unchanged (changed for SeqFT)."""
        params, before = self.bases[-1]
        assert not [n for n, p in params.items() if p.requires_grad], "base parameters left trainable"
        changed = [n for n, p in params.items() if not torch.equal(p.detach(), before[n])]
        if trains_base:
            assert changed, "a strategy that fine-tunes the base left it unchanged"
        else:
            assert not changed, f"the frozen base changed: {changed[:5]}"


@pytest.fixture
def probe(monkeypatch) -> Probe:
    return Probe(monkeypatch)


@pytest.fixture
def loss_terms(monkeypatch) -> list[dict[str, float]]:
    """Every loss term the strategy returns during training, one dict per training step."""
    from lmas.training.experience import IncrementalLM

    logged: list[dict[str, float]] = []
    step = IncrementalLM.training_step

    def recording_step(self, batch, batch_idx):
        strategy_terms = self.strategy.loss_terms

        def recording(module, b, out):
            terms = strategy_terms(module, b, out)
            logged.append({k: float(v.detach()) for k, v in terms.items()})
            return terms

        self.strategy.loss_terms = recording  # the instance's hook, for this step only
        try:
            return step(self, batch, batch_idx)
        finally:
            del self.strategy.loss_terms

    monkeypatch.setattr(IncrementalLM, "training_step", recording_step)
    return logged


@pytest.fixture(autouse=True)
def fast_outputs(monkeypatch):
    """No pictures (heatmaps, the HTML report's figures: a third of a tiny run's time), and the tokenizer
    loaded once for all runs (another sixth): the contracts are about training, not about the outputs."""
    from lmas.metrics.knowledge import KnowledgeMatrix
    from lmas.models import providers
    from lmas.tracking import html_report

    monkeypatch.setattr(KnowledgeMatrix, "heatmap", lambda self, *args, **kwargs: None)
    monkeypatch.setattr(html_report, "figures", lambda results: {})
    load = providers.AutoTokenizer.from_pretrained

    def once(path: str, **kwargs):
        key = (path, tuple(sorted(kwargs.items())))
        if key not in TOKENIZERS:
            TOKENIZERS[key] = load(path, **kwargs)
        return TOKENIZERS[key]

    monkeypatch.setattr(providers.AutoTokenizer, "from_pretrained", once)


def build(compose, overrides: list[str], run_dir: Path, tasks: int | None = TASKS):
    """The composed config on the fast settings, with a stream of its first ``tasks`` tasks (None: all)."""
    import lmas.train  # noqa: F401 - as lmas-train, registers the config schema that conf/train.yaml starts with

    cfg = compose(FAST + [f"paths.output_dir={run_dir.parent}"] + overrides, run_dir)
    if tasks is not None:
        del cfg.stream.tasks[tasks:]
    return cfg


def strategy_classes(cfg) -> list[type]:
    """The classes of the config's strategy and of its parts (a Compose and what it composes)."""
    from hydra.utils import get_object

    def targets(node):
        if isinstance(node, dict):
            if "_target_" in node:
                yield node["_target_"]
            for value in node.values():
                yield from targets(value)
        elif isinstance(node, list):
            for value in node:
                yield from targets(value)

    return [c for c in map(get_object, targets(OmegaConf.to_container(cfg.strategy))) if isinstance(c, type)]


def trains_base(cfg) -> bool:
    """Whether the config's strategy (or a part of it) fine-tunes the base model (SeqFT)."""
    from lmas.strategies.seqft import SeqFT

    return any(issubclass(c, SeqFT) for c in strategy_classes(cfg))


def run_or_refused(cfg, run_dir: Path, probe: Probe, names: tuple[str, ...]) -> dict | None:
    """Run ``cfg``; None if lmas refused it at config time (before any model was built) with an error naming
    one of the options ``names``. Any other failure fails the test."""
    from lmas.train import run

    try:
        return run(cfg, run_dir)
    except (ValueError, HydraException) as err:
        if probe.bases:
            raise AssertionError(f"refused after the model was loaded, not at config time: {err}") from err
        assert any(name in str(err) for name in names), f"the refusal does not name {' or '.join(names)}: {err}"
        return None


def check_trained(results: dict, terms: list[dict[str, float]], cfg) -> None:
    """Every task was trained, and every loss (per-step totals and the strategy's terms) is finite; the terms
    were seen at every step, except for a strategy with another fit backend than Lightning (Avalanche's)."""
    from lmas.strategies.base import Strategy
    from lmas.strategies.compose import Compose

    trained = {key.split("/")[-1] for key, losses in results["loss_curves"].items() if losses}
    assert trained == {t["name"] for t in results["tasks"]}
    assert all(math.isfinite(v) for losses in results["loss_curves"].values() for v in losses)
    parts = [c for c in strategy_classes(cfg) if not issubclass(c, Compose)]  # Compose only delegates
    external = any(c.fit_backend != Strategy.fit_backend for c in parts)
    assert len(terms) == (0 if external else sum(map(len, results["loss_curves"].values())))
    assert all(math.isfinite(v) for step in terms for v in step.values()), terms


class Interrupted(BaseException):
    """Stops a run right after a checkpoint (a kill between rounds)."""


def close(a, b, where: str = "") -> None:
    """``a == b`` for nested dicts/lists, floats and tensors within :data:`TOL`."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            close(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, where
        torch.testing.assert_close(b, a, atol=TOL, rtol=0, msg=where)
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, abs=TOL, nan_ok=True), where
    else:
        assert a == b, where


def check_resume(cfg, reference: dict, reference_dir: Path, run_dir: Path, monkeypatch, stop_after: int = 0) -> None:
    """Stop a run of ``cfg`` right after the checkpoint of round ``stop_after``, resume it, and compare it with
    the uninterrupted ``reference`` run."""
    from lmas import checkpoint
    from lmas.train import resume_config, run

    save, saved = checkpoint.save, []

    def save_then_stop(*args, **kwargs):
        save(*args, **kwargs)
        saved.append(True)
        if len(saved) > stop_after:
            raise Interrupted

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "save", save_then_stop)
        with pytest.raises(Interrupted):
            run(cfg, run_dir)
    assert checkpoint.load(run_dir)[0]["round"] == stop_after
    try:
        resumed = run(resume_config(run_dir, []), run_dir, resume=True)
    except ValueError as err:  # a strategy whose state is not checkpointed refuses the resume, before training
        assert "strategy=" in str(err) and "resume" in str(err), err
        assert checkpoint.load(run_dir)[0]["round"] == stop_after
        return
    assert resumed["complete"]
    close(reference["matrix"], resumed["matrix"], "matrix")
    want, want_dir = checkpoint.load(reference_dir)
    got, got_dir = checkpoint.load(run_dir)
    assert got["round"] == want["round"] > stop_after
    close(want["strategy"], got["strategy"], "strategy")
    adapters = sorted(p.name for p in (want_dir / "adapters").glob("*.safetensors"))
    assert adapters and adapters == sorted(p.name for p in (got_dir / "adapters").glob("*.safetensors"))
    for name in adapters:
        close(load_file(str(want_dir / "adapters" / name)), load_file(str(got_dir / "adapters" / name)), name)


@pytest.mark.parametrize(("group", "option"), CASES, ids=IDS)
def test_config_trains_frozen_and_finite_and_resumes_exactly(group, option, compose, probe, loss_terms, tmp_path,
                                                             monkeypatch):
    from lmas.train import run

    cfg = build(compose, setting(group, option), tmp_path / "reference")
    results = run(copy.deepcopy(cfg), tmp_path / "reference")
    assert results["complete"]
    check_trained(results, loss_terms, cfg)
    probe.check_base(trains_base(cfg))
    check_resume(cfg, results, tmp_path / "reference", tmp_path / "resumed", monkeypatch)


@pytest.mark.slow  # 3 tasks (one a generation task), the default evaluation, 3 steps a task: ~1 min in all
@pytest.mark.parametrize(("group", "option"), CASES, ids=IDS)
def test_config_on_the_whole_default_stream_resumes_exactly_from_its_middle(group, option, compose, probe,
                                                                            loss_terms, tmp_path, monkeypatch):
    cfg = build(compose, setting(group, option) + ["train.max_steps=3"], tmp_path / "reference", tasks=None)
    cfg.eval.initial = cfg.eval.next_task = True
    results = run_or_refused(copy.deepcopy(cfg), tmp_path / "reference", probe, (group,))
    if results is None:  # e.g. a teacher with another tokenizer cannot teach the generation task
        return
    assert results["complete"] and len(results["tasks"]) == 3
    check_trained(results, loss_terms, cfg)
    probe.check_base(trains_base(cfg))
    check_resume(cfg, results, tmp_path / "reference", tmp_path / "resumed", monkeypatch, stop_after=1)


def with_replay(compose, group: str, option: str, run_dir: Path):
    """``group=option`` composed with replay: a strategy as a part of ``Compose`` next to conf/strategy/replay.yaml,
    anything else next to ``strategy=replay``."""
    if group != "strategy":
        return build(compose, setting(group, option) + ["strategy=replay", "train.max_steps=1"], run_dir)
    cfg = build(compose, setting(group, option) + ["train.max_steps=1"], run_dir)
    cfg.strategy = {"_target_": "lmas.strategies.compose.Compose",
                    "parts": [OmegaConf.load(CONF / "strategy" / "replay.yaml"), cfg.strategy]}
    return cfg


@pytest.mark.parametrize(("group", "option"), CASES, ids=IDS)
def test_config_composes_with_replay(group, option, compose, probe, loss_terms, tmp_path):
    cfg = with_replay(compose, group, option, tmp_path / "run")
    results = run_or_refused(cfg, tmp_path / "run", probe, (group, "strategy"))
    if results is None:
        return
    assert results["complete"]
    check_trained(results, loss_terms, cfg)
    probe.check_base(trains_base(cfg))
    n_train = {t["name"]: t["n_train"] for t in results["tasks"]}
    again = 0  # experiences of an agent that had trained before: replay adds remembered examples to them
    for agent in results["agents"].values():
        fits = [e for e in agent["history"] if e.get("event") == "trained"]
        for fit in fits[1:]:
            again += 1
            assert fit["examples"] > n_train[fit["task"]], f"nothing replayed: {fit}"
    assert again or group == "topology", "no agent trained twice, so replay was not exercised"


def elsewhere(group: str, option: str) -> list[str]:
    """The other population: a strategy with two agents, anything else with one (population=single)."""
    return [f"strategy={option}", "population.agents=2"] if group == "strategy" else [f"{group}={option}"]


@pytest.mark.parametrize(("group", "option"), CASES, ids=IDS)
def test_config_in_the_other_population_trains_or_is_refused_at_config_time(group, option, compose, probe,
                                                                               loss_terms, tmp_path):
    cfg = build(compose, elsewhere(group, option) + ["train.max_steps=1"], tmp_path / "run")
    results = run_or_refused(cfg, tmp_path / "run", probe, (group,))
    if results is None:
        return
    assert results["complete"]
    check_trained(results, loss_terms, cfg)
    probe.check_base(trains_base(cfg))


def test_the_glob_finds_every_group_and_subfolder():
    found = {group for group, _ in CASES}
    assert found == {group for group in GROUPS if (CONF / group).is_dir()} >= {"strategy", "transfer", "distill"}
    assert "avalanche/naive" in options("strategy") and "none" in options("transfer")
