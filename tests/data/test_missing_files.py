"""Files a config names that are not there: the error names the option and the absolute path, and
lmas-train says so before the model is loaded (lmas/paths.py, the config check and every builder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import open_dict

from lmas.config import ConfigError, validate
from lmas.data.files import csv_task, hf_task, jsonl_task, read_csv, read_jsonl

USER_STREAM = """\
_target_: lmas.data.stream.Stream
name: my_stream
tasks:
  - _target_: lmas.data.sources.jsonl_task
    name: sentiment
    path: {first}
    kind: classification
    prompt_field: text
    answer_field: label
  - _target_: lmas.data.sources.jsonl_task
    name: qa
    path: {second}
    kind: generation
"""


def _jsonl(path: Path, n: int = 20) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": f"a{i % 3}", "text": f"t{i}",
                                        "label": "pos" if i % 2 else "neg"}) + "\n" for i in range(n)))
    return path


def _user_conf(tmp_path: Path, first: str, second: str) -> Path:
    """conf/stream/my_stream.yaml as docs/data.md ("A task from your own data") has a new user write it."""
    conf = tmp_path / "myconf"
    (conf / "stream").mkdir(parents=True)
    (conf / "stream" / "my_stream.yaml").write_text(USER_STREAM.format(first=first, second=second))
    return conf


@pytest.mark.slow  # long (a subprocess or a sweep); the slow suite runs it (docs/testing.md)
def test_lmas_train_over_a_user_stream_with_a_missing_jsonl_names_the_file_and_the_option(tmp_path):
    """What a new user does: a stream file naming a JSONL that is not there, then `lmas-train stream=...`."""
    _jsonl(tmp_path / "data" / "sentiment.jsonl")
    conf = _user_conf(tmp_path, "data/sentiment.jsonl", "data/qa.jsonl")  # qa.jsonl was never written
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "lmas.train", f"hydra.searchpath=[file://{conf}]", "stream=my_stream", "model=tiny",
         "logger=csv", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"}, timeout=600)
    assert proc.returncode != 0
    expected = f"stream.tasks[1].path=data/qa.jsonl: no such file: {tmp_path / 'data' / 'qa.jsonl'}"
    assert expected in proc.stderr, proc.stderr[-3000:]
    assert "No such file or directory" not in proc.stderr  # not the bare OSError
    assert "stream.tasks[0]" not in proc.stderr  # the file that exists is not reported
    assert not run_dir.exists() or not any(run_dir.glob("config.yaml"))  # refused before the run started


def _problems(compose, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        validate(compose(["model=tiny", *overrides]))
    return str(info.value)


def test_the_config_check_names_every_missing_task_file_with_its_option(compose, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _jsonl(tmp_path / "data" / "sentiment.jsonl")
    conf = _user_conf(tmp_path, "data/sentiment.jsonl", str(tmp_path / "data" / "qa.jsonl"))
    search = [f"hydra.searchpath=[file://{conf}]", "stream=my_stream"]
    msg = _problems(compose, search + ["+stream.tasks.0.val_path=data/val.jsonl",
                                       "+stream.tasks.1.test_path='~/no-such-lmas-dir/test.jsonl'"])
    data = tmp_path / "data"
    assert f"stream.tasks[1].path={data / 'qa.jsonl'}: no such file: {data / 'qa.jsonl'}" in msg
    assert f"stream.tasks[0].val_path=data/val.jsonl: no such file: {data / 'val.jsonl'}" in msg
    home = Path("~").expanduser()
    assert (f"stream.tasks[1].test_path='~/no-such-lmas-dir/test.jsonl': no such file: "
            f"{home / 'no-such-lmas-dir' / 'test.jsonl'}") in msg
    assert "stream.tasks[0].path" not in msg
    # a folder where a file is expected
    msg = _problems(compose, search + ["stream.tasks.0.path=data"])
    assert f"stream.tasks[0].path=data: {data} is a folder, expected a file" in msg
    # every file there: no problem from the paths (and the stream builds)
    _jsonl(data / "qa.jsonl")
    validate(compose(["model=tiny", *search]))


def _with_task(compose, task: dict):
    """The default config with ``task`` as its third task (a stream file would say the same)."""
    cfg = compose(["model=tiny"])
    with open_dict(cfg):
        cfg.stream.tasks[2] = task
    return cfg


def _task_problems(compose, task: dict) -> str:
    with pytest.raises(ConfigError) as info:
        validate(_with_task(compose, task))
    return str(info.value)


def test_the_config_check_names_missing_hf_datasets_files(compose, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _jsonl(tmp_path / "present.jsonl")
    hfq = {"_target_": "lmas.data.sources.hf_task", "name": "hfq", "kind": "generation"}
    files = {"train": ["present.jsonl", "missing.jsonl"], "test": "nomatch-*.jsonl"}
    msg = _task_problems(compose, {**hfq, "path": "json", "data_files": files})
    assert f"stream.tasks[2].data_files.train[1]=missing.jsonl: no such file: {tmp_path / 'missing.jsonl'}" in msg
    assert (f"stream.tasks[2].data_files.test='nomatch-*.jsonl': no file matches {tmp_path / 'nomatch-*.jsonl'}"
            in msg)
    assert "present.jsonl" not in msg
    # a local dataset folder written as a path; data_files are then relative to it
    in_folder = {**hfq, "path": "./my_dataset", "data_files": "train.jsonl"}
    msg = _task_problems(compose, in_folder)
    assert f"stream.tasks[2].path=./my_dataset: no such file or folder: {tmp_path / 'my_dataset'}" in msg
    _jsonl(tmp_path / "my_dataset" / "other.jsonl")
    msg = _task_problems(compose, in_folder)
    assert (f"stream.tasks[2].data_files=train.jsonl: no such file: {tmp_path / 'my_dataset' / 'train.jsonl'}"
            in msg)
    _jsonl(tmp_path / "my_dataset" / "train.jsonl")
    validate(_with_task(compose, in_folder))
    # a hub dataset id or a builder name is not a path: left to `datasets`
    validate(_with_task(compose, {**hfq, "path": "imdb", "kind": "classification", "prompt_field": "text",
                                  "answer_field": "label"}))


def test_the_config_check_names_a_missing_model_folder_or_teacher_folder(compose, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = _problems(compose, ["model=hf", "model.name_or_path=./models/my-llm"])
    assert f"model.name_or_path=./models/my-llm: no such folder: {tmp_path / 'models' / 'my-llm'}" in msg
    msg = _problems(compose, ["model=hf", "model.name_or_path=models/llms/my-llm"])  # not a hub id (2 slashes)
    assert f"model.name_or_path=models/llms/my-llm: no such folder: {tmp_path / 'models' / 'llms' / 'my-llm'}" in msg
    (tmp_path / "models" / "empty").mkdir(parents=True)
    msg = _problems(compose, ["model=hf", "model.name_or_path=./models/empty"])
    assert f"model.name_or_path=./models/empty: {tmp_path / 'models' / 'empty'} is not a model folder" in msg
    # a hub id is not a path: no config error (loading it needs internet, and says so)
    validate(compose(["model=hf", "model.name_or_path=HuggingFaceTB/SmolLM2-135M"]))
    # the encoder teacher's folder is always local
    msg = _problems(compose, ["distill=minilm", "+distill.external.0.path=minilm"])
    assert f"distill.external[0].path=minilm: no such folder: {tmp_path / 'minilm'}" in msg


def test_the_config_check_refuses_output_and_cache_paths_that_are_files(compose, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").write_text("a file")
    msg = _problems(compose, ["paths.output_dir=outputs", f"paths.cache_dir={tmp_path / 'outputs'}"])
    assert f"paths.output_dir=outputs: {tmp_path / 'outputs'} is a file; expected a folder" in msg
    assert f"paths.cache_dir={tmp_path / 'outputs'}: {tmp_path / 'outputs'} is a file" in msg


# --- the builders themselves, called from Python ------------------------------------------------
def test_file_builders_called_from_python_name_the_missing_file_and_parameter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = _jsonl(tmp_path / "good.jsonl")
    with pytest.raises(FileNotFoundError) as info:
        jsonl_task("qa", "nope.jsonl", "generation")
    assert str(info.value) == f"task 'qa': path=nope.jsonl: no such file: {tmp_path / 'nope.jsonl'}"
    with pytest.raises(FileNotFoundError, match=f"task 'qa': val_path=v.jsonl: no such file: {tmp_path}/v.jsonl"):
        jsonl_task("qa", good, "generation", val_path="v.jsonl")
    with pytest.raises(FileNotFoundError, match=f"task 'c': test_path=t.csv: no such file: {tmp_path}/t.csv"):
        csv_task("c", good, "generation", test_path="t.csv")
    with pytest.raises(FileNotFoundError, match=f"path=gone.jsonl: no such file: {tmp_path}/gone.jsonl"):
        list(read_jsonl("gone.jsonl"))
    with pytest.raises(FileNotFoundError, match=f"path=gone.csv: no such file: {tmp_path}/gone.csv"):
        list(read_csv("gone.csv"))
    with pytest.raises(FileNotFoundError, match=f"task 'h': data_files.test\\[0\\]=x.jsonl: no such file: "
                                                f"{tmp_path}/x.jsonl"):
        hf_task("h", "json", "generation", data_files={"train": str(good), "test": ["x.jsonl"]})


def test_a_missing_model_or_teacher_folder_from_python_names_it(tmp_path, monkeypatch):
    from lmas.distill.encoder_teacher import EncoderTeacher
    from lmas.models.providers import hf

    import huggingface_hub.constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no minute of network retries
    with pytest.raises(FileNotFoundError, match=f"model.name_or_path=./m: no such folder: {tmp_path}/m$"):
        hf("./m")
    with pytest.raises(OSError, match=f"model.name_or_path=no-such-org/no-such-model: not a local folder "
                                      f"\\(no {tmp_path}/no-such-org/no-such-model\\)"):
        hf("no-such-org/no-such-model")
    with pytest.raises(FileNotFoundError, match=f"teacher 'mini': path=enc: no such folder: {tmp_path}/enc$"):
        EncoderTeacher("mini", path="enc")


def test_resume_of_a_folder_that_does_not_exist_names_it(tmp_path, monkeypatch):
    from lmas.train import resume_config

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"resume=runs/x: no such folder: {tmp_path}/runs/x$"):
        resume_config("runs/x", [])
