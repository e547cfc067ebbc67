"""An installable package: a wheel built from the repository ships conf/ as lmas/conf/ (setup.py), and
the installed lmas-train / lmas-compare work from a directory outside the repository, with user
streams (a JSONL and a CSV file) added through ``--config-dir`` and ``hydra.searchpath``.

The wheel is built from a copy of the sources (so the repository's build/ is not touched) and
installed with ``--no-deps`` into a fresh venv that sees the project venv's packages through a
``.pth`` line (which does not load the project's editable-install finder).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SOURCES = ("setup.py", "setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md", "lmas", "conf")
ENV = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
GROUPS = sorted({str(p.parent.relative_to(CONF)) for p in CONF.rglob("*.yaml")} - {".", "hydra/launcher"})

JSONL_STREAM = """\
_target_: lmas.data.stream.Stream
name: my_jsonl
tasks:
  - _target_: lmas.data.sources.jsonl_task
    name: reviews
    path: data/reviews.jsonl
    kind: classification
    prompt_field: text
    answer_field: label
"""
CSV_STREAM = """\
_target_: lmas.data.stream.Stream
name: my_csv
tasks:
  - _target_: lmas.data.sources.csv_task
    name: qa
    path: data/qa.csv
    kind: generation
    prompt_field: question
    answer_field: answer
"""


def _copy_sources(dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(src, dest / name)
    return dest


def _build_wheel(src: Path, out: Path) -> Path:
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "--disable-pip-version-check", "-w", str(out), str(src)],
                          cwd=src, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = out.glob("lmas-*.whl")
    return wheel


def _yaml_in_wheel(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        return {n[len("lmas/conf/"):] for n in z.namelist() if n.startswith("lmas/conf/") and n.endswith(".yaml")}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """A wheel built from a copy of the sources, installed into a fresh venv: its paths."""
    tmp = tmp_path_factory.mktemp("pkg")
    wheel = _build_wheel(_copy_sources(tmp / "src"), tmp / "dist")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch, hydra, ...
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                           "--no-deps", "--disable-pip-version-check", str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"wheel": wheel, "bin": venv / "bin", "site": site}


@pytest.fixture
def user_dir(tmp_path) -> Path:
    """A user's working dir outside the repository: data files and a config dir with two streams."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "reviews.jsonl").write_text("".join(
        json.dumps({"text": f"review {i}: {'great' if i % 2 else 'awful'}", "label": "pos" if i % 2 else "neg"}) + "\n"
        for i in range(40)))
    with open(data / "qa.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["question", "answer"])
        writer.writerows([f"what is {i} plus 1?", str(i + 1)] for i in range(40))
    (tmp_path / "my_conf" / "stream").mkdir(parents=True)
    (tmp_path / "my_conf" / "stream" / "my_jsonl.yaml").write_text(JSONL_STREAM)
    (tmp_path / "my_conf" / "stream" / "my_csv.yaml").write_text(CSV_STREAM)
    assert ROOT not in tmp_path.parents
    return tmp_path


def test_a_source_checkout_reads_the_repository_conf_in_place():
    from lmas.confdir import config_dir, primary_config

    assert config_dir() == CONF  # editable install: no copy in the package, edits to conf/ count at once
    assert primary_config() == CONF / "train.yaml"
    assert not (ROOT / "lmas" / "conf").exists()  # the build copies into build/, never into the sources


def test_the_wheel_ships_every_config_of_conf(installed):
    expected = {str(p.relative_to(CONF)) for p in CONF.rglob("*.yaml")}
    assert "train.yaml" in expected and "strategy/naive.yaml" in expected
    assert _yaml_in_wheel(installed["wheel"]) == expected
    with zipfile.ZipFile(installed["wheel"]) as z:
        assert z.read("lmas/conf/train.yaml") == (CONF / "train.yaml").read_bytes()


def test_a_config_deleted_from_conf_leaves_the_next_wheel(tmp_path):
    src = _copy_sources(tmp_path / "src")
    assert "strategy/l2.yaml" in _yaml_in_wheel(_build_wheel(src, tmp_path / "a"))
    (src / "conf" / "strategy" / "l2.yaml").unlink()
    second = _yaml_in_wheel(_build_wheel(src, tmp_path / "b"))  # same build/ dir as the first build
    assert "strategy/l2.yaml" not in second and "strategy/naive.yaml" in second


def test_the_installed_package_finds_its_own_configs(installed, tmp_path):
    code = "import lmas, lmas.confdir as c; print(lmas.__file__); print(c.config_dir())"
    proc = subprocess.run([str(installed["bin"] / "python"), "-c", code], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=120, check=True)
    module, conf = proc.stdout.split()
    assert Path(module) == installed["site"] / "lmas" / "__init__.py"  # the wheel's lmas, not the repo's
    assert Path(conf) == installed["site"] / "lmas" / "conf"


def test_installed_lmas_train_help_lists_every_group_and_the_user_configs(installed, user_dir):
    proc = subprocess.run([str(installed["bin"] / "lmas-train"), "--config-dir", "my_conf", "--help"],
                          cwd=user_dir, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith("lmas-train: ") and "--config-dir DIR" in out
    listed = dict(line.split(": ", 1) for line in out.split("== Configuration groups ==")[1]
                  .split("== Config ==")[0].splitlines() if ": " in line and not line.startswith("Compose"))
    assert set(GROUPS) <= set(listed)  # (schemas registered in Hydra's ConfigStore may add more)
    for group in GROUPS:
        options = {p.stem for p in (CONF / group).glob("*.yaml")}
        if group == "stream":
            options |= {"my_csv", "my_jsonl"}  # the user's, next to lmas's own
        assert options <= set(listed[group].split(", ")), group


@pytest.mark.parametrize("way,stream", [("config-dir", "my_jsonl"), ("searchpath", "my_csv")])
def test_installed_lmas_train_runs_a_user_stream_outside_the_repository(installed, user_dir, way, stream):
    add = ["--config-dir", "my_conf"] if way == "config-dir" else [f"hydra.searchpath=[file://{user_dir / 'my_conf'}]"]
    cmd = [str(installed["bin"] / "lmas-train"), *add, f"stream={stream}", "model=tiny", "debug=fast",
           "logger=csv", "hydra.run.dir=run"]
    proc = subprocess.run(cmd, cwd=user_dir, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((user_dir / "run" / "results.json").read_text())
    assert results["complete"] is True and results["stream"] == stream
    task = {"my_jsonl": "reviews", "my_csv": "qa"}[stream]
    assert [t["name"] for t in results["tasks"]] == [task]
    assert 0.0 <= results["metrics"]["agent0"]["avg_acc"] <= 1.0
    proc = subprocess.run([str(installed["bin"] / "lmas-compare"), "run", "--out", "cmp"], cwd=user_dir, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"stream {stream}" in proc.stdout and (user_dir / "cmp" / "comparison.csv").is_file()
