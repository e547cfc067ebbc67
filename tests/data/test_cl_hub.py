"""The CL_Benchmark from Hugging Face datasets (lmas.data.cl_hub), on local files in the hub's forms: the same
tasks as from a folder, through ``datasets.load_dataset``, with no network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmas.data.cl_benchmark import cl_stream, cl_task

SUPERNI = ["task001_alpha", "task002_beta"]
TOPICS = ["Business", "Sports", "World"]


def _superni_rows(name: str, split: str, n: int) -> list[dict]:
    return [
        {"input": f"{name} {split} item {i}", "output": [f"answer {i}", f"alt {i}"], "definition": f"Do {name}."}
        for i in range(n)
    ]


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def superni_both(tmp_path: Path) -> tuple[Path, str]:
    """The same two SuperNI tasks as a SAPT folder and as one local dataset per task (``.../{task}``)."""
    folder, hub = tmp_path / "CL_Benchmark", tmp_path / "hub"
    for name in SUPERNI:
        for split, n in (("train", 30), ("test", 10)):
            rows = _superni_rows(name, split, n)
            _jsonl(hub / name / f"{split}.jsonl", rows)
            sapt = {
                "Definition": [f"Do {name}."],
                "Instances": [{"input": r["input"], "output": r["output"]} for r in rows],
            }
            (folder / "SuperNI" / name).mkdir(parents=True, exist_ok=True)
            (folder / "SuperNI" / name / f"{split}.json").write_text(json.dumps(sapt), encoding="utf-8")
    return folder, str(hub / "{task}")


def test_one_dataset_per_task_gives_the_folders_tasks(superni_both):
    folder, hub = superni_both
    opts = {"val_size": 5, "max_eval": 8, "split_seed": 3}
    from_hub = cl_stream("superni", tasks=SUPERNI, hf_dataset=hub, **opts)
    from_dir = cl_stream("superni", tasks=SUPERNI, data_dir=folder, **opts)
    assert from_hub.meta["hf_dataset"] == hub and from_hub.meta["data_dir"] is None
    for a, b in zip(from_hub, from_dir, strict=True):
        assert (a.name, a.kind, a.metric) == (b.name, "generation", "rouge_l")
        assert (a.train, a.val, a.test) == (b.train, b.val, b.test)  # prompts, answers, references, order
        assert a.test[0].prompt.startswith(f"Definition: Do {a.name}.\n\nNow complete the following example -")
        assert a.meta["answers"] == b.meta["answers"] and a.meta["files"] == ["test", "train"]
        assert a.source == hub.format(task=a.name)


def _config_readme(root: Path, configs: dict[str, dict[str, str]]) -> None:
    lines = ["---", "configs:"]
    for name, files in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        lines += [f"  - split: {split}\n    path: {path}" for split, path in files.items()]
    (root / "README.md").write_text("\n".join(lines + ["---", ""]), encoding="utf-8")


def _labelled(prefix: str, n: int) -> list[dict]:
    return [{"sentence": f"{prefix} text {i}", "label": TOPICS[i % 3]} for i in range(n)]


def test_one_config_per_task_with_olora_columns_and_a_validation_split(tmp_path):
    hub, folder = tmp_path / "hub", tmp_path / "olora"
    _jsonl(hub / "agnews" / "train.jsonl", _labelled("agnews train", 40))
    _jsonl(hub / "agnews" / "validation.jsonl", _labelled("agnews test", 12))  # no test split: validation is it
    _config_readme(hub, {"agnews": {"train": "agnews/train.jsonl", "validation": "agnews/validation.jsonl"}})
    for split, rows in (("train", _labelled("agnews train", 40)), ("dev", _labelled("agnews test", 12))):
        (folder / "TC" / "agnews").mkdir(parents=True, exist_ok=True)
        (folder / "TC" / "agnews" / f"{split}.json").write_text(json.dumps(rows), encoding="utf-8")
    (folder / "TC" / "agnews" / "labels.json").write_text(json.dumps(TOPICS), encoding="utf-8")
    a = cl_task("agnews", hf_dataset=str(hub), val_size=4)
    b = cl_task("agnews", data_dir=folder, val_size=4)
    assert a.kind == "classification" and a.labels == TOPICS == b.labels  # the sorted answers, no labels.json
    assert a.meta["labels_note"].endswith("the labels are the answers of all splits")
    assert (a.train, a.val, a.test) == (b.train, b.val, b.test)
    assert "Task:TC\nDataset:agnews\nagnews test text 0\nAnswer:" in {ex.prompt for ex in a.test}
    assert len(a.test) == 12 and a.meta["family"] == "TC" and a.source == str(hub / "agnews")


def test_classlabel_answers_are_read_as_label_names(tmp_path):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=TOPICS)})
    for split, n in (("train", 30), ("test", 9)):
        ds = datasets.Dataset.from_dict(
            {"text": [f"{split} {i}" for i in range(n)], "label": [i % 3 for i in range(n)]}, features=features
        )
        (tmp_path / "dbpedia").mkdir(exist_ok=True)
        ds.to_parquet(str(tmp_path / "dbpedia" / f"{split}.parquet"))
    task = cl_task("dbpedia", hf_dataset=str(tmp_path / "{task}"), val_size=3)
    assert task.labels == TOPICS and task.meta["labels_note"] is None
    for ex in task.test:  # "test i" was stored as the id i % 3
        assert ex.answer == TOPICS[int(ex.prompt.split("\n")[-2].split()[1]) % 3]
    assert (len(task.train), len(task.val), len(task.test)) == (27, 3, 9)


def test_unknown_columns_name_the_dataset_and_the_columns_expected(tmp_path):
    _jsonl(tmp_path / "sst2" / "train.jsonl", [{"review": "good", "stars": 5}] * 4)
    with pytest.raises(
        ValueError,
        match=r"hf_dataset=.* task 'sst2' split 'train': columns \['review', 'stars'\]; "
        r"expected the columns input\+output or sentence\+label",
    ):
        cl_task("sst2", hf_dataset=str(tmp_path / "{task}"))


def test_a_task_the_hub_lacks_is_an_error_or_skipped(superni_both):
    _, hub = superni_both
    names = SUPERNI + ["task999_absent"]
    with pytest.raises(ValueError, match=r"hf_dataset=.*: task 'task999_absent' could not be loaded"):
        cl_stream("superni", tasks=names, hf_dataset=hub, val_size=5)
    stream = cl_stream("superni", tasks=names, hf_dataset=hub, val_size=5, skip_missing=True)
    assert stream.task_names == SUPERNI and stream.meta["skipped"] == ["task999_absent"]


def test_unknown_option_is_named(superni_both):
    _, hub = superni_both
    with pytest.raises(ValueError, match=r"stream 'superni': unknown options \['val_szie'\]"):
        cl_stream("superni", tasks=SUPERNI, hf_dataset=hub, val_szie=5)
    with pytest.raises(ValueError, match=r"generation_metric='bleu': expected rouge_l or exact_match"):
        cl_stream("superni", tasks=SUPERNI, hf_dataset=hub, generation_metric="bleu")
