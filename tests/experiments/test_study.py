"""experiments/study.py: a study runs in parts; finished jobs are kept and skipped."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[2]


def _study_module():
    spec = importlib.util.spec_from_file_location("study", ROOT / "experiments" / "study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_jobs_are_the_grid_and_the_extras_once(tmp_path):
    study = _study_module()
    path = tmp_path / "s.yaml"
    extra = [{"strategy": ["naive"], "seed": [0]}, {"strategy": ["joint"], "seed": [3]}]
    spec = {"name": "s", "overrides": ["model=tiny"], "grid": {"strategy": ["naive", "avalanche/ewc"], "seed": [0, 1]},
            "extra": extra}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    names = [j["name"] for j in study.jobs(study.load_study(path))]
    assert names == ["strategy=naive,seed=0", "strategy=naive,seed=1", "strategy=avalanche_ewc,seed=0",
                     "strategy=avalanche_ewc,seed=1", "strategy=joint,seed=3"]
    assert study.jobs(study.load_study(path))[2]["overrides"] == ["model=tiny", "strategy=avalanche/ewc", "seed=0"]
    path.write_text(yaml.safe_dump({"name": "s", "grid": {"seed": []}}))
    with pytest.raises(SystemExit, match="non-empty list"):
        study.load_study(path)


def test_a_study_keeps_finished_runs_and_skips_them(tmp_path, capsys):
    study = _study_module()
    spec = {"name": "t", "runs": "runs", "grid": {"seed": [0, 1]},
            "overrides": ["model=tiny", "debug=fast", "logger=csv", "stream.max_train=8", "train.max_steps=1"]}
    path = tmp_path / "study" / "study.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(spec))
    scratch = tmp_path / "scratch"
    argv = [str(path), "--scratch", str(scratch), "--train", f"{sys.executable} -m lmas.train"]
    assert study.main(argv) == 0
    for seed in (0, 1):
        kept = path.parent / "runs" / f"seed={seed}"
        assert json.loads((kept / "results.json").read_text())["seed"] == seed
        assert (kept / "config.yaml").is_file() and (kept / "per_example" / "initial.npz").is_file()
        assert not (kept / "checkpoint").exists()  # only the small files are kept
        assert yaml.safe_load((kept / "overrides.yaml").read_text()) == [*spec["overrides"], f"seed={seed}"]
    (path.parent / "runs" / "seed=1" / "overrides.yaml").unlink()  # as an older study.py kept it
    capsys.readouterr()
    # a later session without the scratch dir: nothing runs again (a command that fails would fail the study)
    assert study.main([str(path), "--scratch", str(tmp_path / "gone"), "--train", "false"]) == 0
    assert capsys.readouterr().out.count("skipped") == 2
    assert (path.parent / "runs" / "seed=1" / "overrides.yaml").is_file()  # written back from the study
    assert study.main([str(path), "--list"]) == 0
    assert capsys.readouterr().out.split() == ["done", "seed=0", "done", "seed=1"]
    # the study edited after its runs finished: they are stale, neither skipped as done nor run again
    before = {f: f.read_bytes() for f in (path.parent / "runs").rglob("*") if f.is_file()}
    path.write_text(yaml.safe_dump({**spec, "overrides": [*spec["overrides"][:3], "stream.max_train=16",
                                                          "train.max_steps=1"]}))  # fmt: skip
    assert study.main([str(path), "--list"]) == 1
    out = capsys.readouterr().out
    assert out.count("stale seed=") == 2 and "stream.max_train: 8 -> 16" in out and "neither skipped" in out
    assert study.main([str(path), "--scratch", str(tmp_path / "gone"), "--train", "false"]) == 1
    assert {f: f.read_bytes() for f in (path.parent / "runs").rglob("*") if f.is_file()} == before
    # nor is a finished or interrupted scratch run of the old options kept or resumed under the new ones
    (path.parent / "runs").rename(path.parent / "old_runs")
    capsys.readouterr()
    assert study.main([str(path), "--scratch", str(scratch), "--train", "false"]) == 1
    assert capsys.readouterr().out.count("neither kept nor resumed") == 2
    assert not list((path.parent / "runs").rglob("results.json"))
    (path.parent / "old_runs").rename(path.parent / "runs")
    # an option that only changes speed or where files go does not make a run stale
    path.write_text(yaml.safe_dump({**spec, "overrides": [*spec["overrides"], "eval.mixed_adapters=false"]}))
    assert study.main([str(path), "--list"]) == 0


STUDIES = sorted(p for p in (ROOT / "experiments").rglob("*.yaml") if "grid" in yaml.safe_load(p.read_text()) or {})


@pytest.mark.parametrize("path", STUDIES, ids=[str(p.relative_to(ROOT / "experiments")) for p in STUDIES])
def test_every_job_of_every_committed_study_composes_and_passes_the_config_check(path, compose):
    """A typo in a study (an option, a value, a group) fails here, not hours into a sweep."""
    from lmas.config import validate

    study = _study_module()
    checked = set()
    for job in study.jobs(study.load_study(path)):
        kept = tuple(o for o in job["overrides"] if not o.startswith("seed="))  # a seed cannot make a job invalid
        if kept not in checked:
            checked.add(kept)
            validate(compose(list(kept)))


@pytest.mark.parametrize("path", STUDIES, ids=[str(p.relative_to(ROOT / "experiments")) for p in STUDIES])
def test_every_committed_run_is_what_its_study_gives_now(path):
    """A preset or a study edited after some of its runs were committed would mix two protocols in one table:
    every kept run's config.yaml must still be what its job composes to (speed and path options aside)."""
    study = _study_module()
    spec = study.load_study(path)
    runs = spec["dir"] / spec.get("runs", "runs")
    for job in study.jobs(spec):
        if study.finished(runs / job["name"]):
            assert study.stale(job, runs / job["name"]) == [], f"{path.name}: {job['name']}"
            kept = yaml.safe_load((runs / job["name"] / "overrides.yaml").read_text())  # what lmas-compare groups by
            assert kept == job["overrides"], f"{path.name}: {job['name']}"
