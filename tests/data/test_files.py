"""JSONL / CSV / Hugging Face ``datasets`` task builders, on files written to tmp_path."""

from __future__ import annotations

import csv
import json
import logging
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from lmas.data.files import csv_task, hf_task, jsonl_task, record_to_example

LABELS = ["neg", "pos", "neu"]


def _records(n: int) -> list[dict]:
    return [{"id": i, "text": f"review number {i} " + "words " * (i % 7), "label": LABELS[i % 3]} for i in range(n)]


def _write_jsonl(path: Path, records: list, extra_lines: list[str] = ()) -> Path:
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _write_csv(path: Path, records: list[dict], delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(records[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(records)
    return path


def _all(task):
    return task.train + task.val + task.test


# ---------------------------------------------------------------- record_to_example


def test_record_to_example_kinds():
    rec = {"q": "  What is two plus two? ", "a": 4, "ctx": "math"}
    ex = record_to_example(
        rec, "f line 1", "generation", prompt_field="q", answer_field="a", template="[{ctx}] {prompt} "
    )
    assert ex.prompt == "[math] What is two plus two?" and ex.answer == "4"
    lm = record_to_example({"body": "a long text here"}, "f line 2", "lm", answer_field="body", max_chars=8)
    assert lm.prompt == "" and lm.answer == "a long"


# ---------------------------------------------------------------- JSONL


def test_jsonl_default_split_labels_and_template(tmp_path):
    path = _write_jsonl(tmp_path / "data.jsonl", _records(50))
    task = jsonl_task("rev", path, "classification", prompt_field="text", answer_field="label",
                      template="Review: {prompt}\nSentiment:", max_chars=20)
    assert (len(task.train), len(task.val), len(task.test)) == (40, 5, 5)
    assert task.labels == ["neg", "neu", "pos"]  # sorted answers of the train split
    assert len({ex.prompt for ex in _all(task)}) == 50
    assert all(ex.prompt.startswith("Review: review number") for ex in _all(task))
    assert all(ex.prompt.endswith("\nSentiment:") for ex in _all(task))
    assert all(len(ex.prompt) <= len("Review: \nSentiment:") + 20 for ex in _all(task))
    again = jsonl_task("rev", path, "classification", prompt_field="text", answer_field="label",
                       template="Review: {prompt}\nSentiment:", max_chars=20)
    assert (again.train, again.val, again.test) == (task.train, task.val, task.test)
    other = jsonl_task("rev", path, "classification", prompt_field="text", answer_field="label", split_seed=1)
    assert {ex.prompt for ex in other.test} != {ex.prompt for ex in task.test}


def test_jsonl_counts_fractions_and_growing_train(tmp_path):
    path = _write_jsonl(tmp_path / "data.jsonl", _records(40))
    kw = {"prompt_field": "text", "answer_field": "label"}
    small = jsonl_task("t", path, "generation", n_train=10, n_val=0.25, n_test=5, **kw)
    assert (len(small.train), len(small.val), len(small.test)) == (10, 10, 5)
    big = jsonl_task("t", path, "generation", n_train=None, n_val=0.25, n_test=5, **kw)
    assert len(big.train) == 25 and big.test == small.test and big.val == small.val
    with pytest.raises(ValueError, match="needs 45 examples .* only 40"):
        jsonl_task("t", path, "generation", n_train=30, n_val=10, n_test=5, **kw)


def test_jsonl_explicit_val_and_test_files(tmp_path):
    recs = _records(30)
    train = _write_jsonl(tmp_path / "train.jsonl", recs[:20])
    test = _write_jsonl(tmp_path / "test.jsonl", recs[20:])
    task = jsonl_task("t", train, "classification", prompt_field="text", answer_field="label",
                      test_path=test, n_val=2)
    assert (len(task.train), len(task.val), len(task.test)) == (18, 2, 10)
    assert [ex.prompt for ex in task.test] == [r["text"].strip() for r in recs[20:]]  # file order
    sampled = jsonl_task("t", train, "classification", prompt_field="text", answer_field="label",
                         val_path=test, test_path=test, n_val=3, n_test=4)
    assert len(sampled.val) == 3 and len(sampled.test) == 4 and len(sampled.train) == 20


def test_jsonl_lm_kind_reads_answer_field(tmp_path):
    path = _write_jsonl(tmp_path / "corpus.jsonl", [{"text": f"document {i} " * 20} for i in range(10)])
    task = jsonl_task("lm", path, "lm", answer_field="text", max_chars=30)
    assert task.labels is None and all(ex.prompt == "" and len(ex.answer) <= 30 for ex in _all(task))
    assert task.metric == "perplexity"
    for build, file in ((jsonl_task, path), (csv_task, _write_csv(tmp_path / "c.csv", [{"text": f"a {i}. b."} for i in range(3)]))):
        encoder_text = build("raw", file, "lm", answer_field="text", metric="pseudo_perplexity", n_val=0, n_test=1)
        assert encoder_text.metric == "pseudo_perplexity"  # raw text for encoder agents
    with pytest.raises(ValueError, match="metric='rouge_l' does not score a lm task"):
        jsonl_task("lm", path, "lm", answer_field="text", metric="rouge_l")


def test_jsonl_bad_json_names_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "data.jsonl", _records(5), ['{"text": "x", "label": '])
    with pytest.raises(ValueError, match=r"data\.jsonl line 6: not valid JSON: Expecting value"):
        jsonl_task("t", path, "classification", prompt_field="text", answer_field="label")


def test_jsonl_blank_lines_count_and_non_objects(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(_records(1)[0]) + "\n\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"data\.jsonl line 3: expected a JSON object, got list"):
        jsonl_task("t", path, "generation", prompt_field="text", answer_field="label")


def test_jsonl_missing_field_names_file_line_field_and_present(tmp_path):
    recs = _records(6)
    del recs[3]["label"]
    path = _write_jsonl(tmp_path / "data.jsonl", recs)
    message = r"data\.jsonl line 4: missing field 'label'; fields present: \['id', 'text'\]"
    with pytest.raises(ValueError, match=message):
        jsonl_task("t", path, "classification", prompt_field="text", answer_field="label")
    with pytest.raises(ValueError, match=r"data\.jsonl line 1: template .* needs field 'title'"):
        jsonl_task("t", path, "generation", answer_field="id", template="{title}: {text}")


def test_empty_file_names_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no records"):
        jsonl_task("t", path, "generation")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        jsonl_task("t", tmp_path / "missing.jsonl", "generation")
    path = tmp_path / "d.csv"
    for content in ("", "\n\n", "prompt,answer\n", "prompt,answer\n,\n\n"):
        path.write_text(content, encoding="utf-8")
        with pytest.raises(ValueError, match=r"d\.csv: no records"):
            csv_task("t", path, "generation")


def test_empty_split_after_splitting_names_task_file_and_sizes(tmp_path):
    one = _write_jsonl(tmp_path / "one.jsonl", [{"prompt": "p", "answer": "a"}])
    with pytest.raises(ValueError, match=r"task 't': the test split \(from .*one\.jsonl\) is empty after splitting: "
                                         r"1 distinct records .* -> 1 train, 0 val, 0 test"):
        jsonl_task("t", one, "generation")
    path = _write_jsonl(tmp_path / "data.jsonl", _records(10))
    with pytest.raises(ValueError, match=r"task 't': the train split \(from .*data\.jsonl\) is empty .* n_train=0"):
        jsonl_task("t", path, "generation", prompt_field="text", answer_field="label", n_train=0)


def test_not_utf8_names_file_and_line(tmp_path):
    good = json.dumps({"prompt": "p", "answer": "a"}).encode()
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good + b"\n" + good + b"\n" + '{"prompt": "caf\u00e9", "answer": "x"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.jsonl line 3: not valid UTF-8"):
        jsonl_task("t", path, "generation")
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"prompt,answer\np,a\n" + "caf\u00e9,x\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.csv line 3: not valid UTF-8"):
        csv_task("t", path, "generation")


def test_wrong_type_or_empty_answer_names_file_line_and_field(tmp_path):
    recs = _records(6)
    recs[2]["label"] = ["pos", "neg"]
    path = _write_jsonl(tmp_path / "data.jsonl", recs)
    with pytest.raises(ValueError, match=r"data\.jsonl line 3: field 'label' must be a string or number, got list"):
        jsonl_task("t", path, "classification", prompt_field="text", answer_field="label")
    recs = _records(6)
    recs[1]["text"] = {"title": "x"}
    path = _write_jsonl(tmp_path / "data.jsonl", recs)
    with pytest.raises(ValueError, match=r"data\.jsonl line 2: field 'text' must be a string or number, got dict"):
        jsonl_task("t", path, "classification", prompt_field="text", answer_field="label")
    recs = _records(6)
    recs[4]["label"] = "  "
    path = _write_jsonl(tmp_path / "data.jsonl", recs)
    with pytest.raises(ValueError, match=r"data\.jsonl line 5: field 'label' is empty"):
        jsonl_task("t", path, "classification", prompt_field="text", answer_field="label")
    path = tmp_path / "d.csv"
    path.write_text("prompt,answer\nhello,world\n\"multi\nline\",x\nbye,\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"d\.csv line 5: field 'answer' is empty"):
        csv_task("t", path, "generation")


def test_jsonl_unseen_labels_in_test_file(tmp_path):
    yes_no = [{"prompt": f"p{i}", "answer": "yes" if i % 2 else "no"} for i in range(8)]
    train = _write_jsonl(tmp_path / "train.jsonl", yes_no)
    test = _write_jsonl(tmp_path / "test.jsonl", [{"prompt": "q1", "answer": "maybe"}, {"prompt": "q2", "answer": "yes"}])
    with pytest.raises(ValueError, match=r"test labels \['maybe'\] \(from .*test\.jsonl\) never appear in the train"):
        jsonl_task("t", train, "classification", test_path=test)
    with pytest.raises(ValueError, match=r"test\.jsonl line 1: answer 'maybe' is not one of labels \['no', 'yes'\]"):
        jsonl_task("t", train, "classification", test_path=test, labels=["no", "yes"])


def test_label_in_label_set_but_not_in_train_is_kept_with_a_warning(tmp_path, caplog):
    yes_no = [{"prompt": f"p{i}", "answer": "yes" if i % 2 else "no"} for i in range(8)]
    train = _write_jsonl(tmp_path / "train.jsonl", yes_no)
    test = _write_jsonl(tmp_path / "test.jsonl", [{"prompt": "q1", "answer": "maybe"}, {"prompt": "q2", "answer": "yes"}])
    with caplog.at_level(logging.WARNING, logger="lmas.data.task"):
        task = jsonl_task("t", train, "classification", test_path=test, labels=["no", "yes", "maybe"], n_val=0)
    assert [ex.answer for ex in task.test] == ["maybe", "yes"] and task.labels == ["no", "yes", "maybe"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "task 't': test labels ['maybe'] never appear in the train split (the model is not trained on them); "
        "they are still scored, over labels ['no', 'yes', 'maybe']"
    ]


def test_jsonl_repeats_kept_once_and_bad_kind(tmp_path):
    recs = _records(20)
    path = _write_jsonl(tmp_path / "data.jsonl", recs + recs[:5])
    task = jsonl_task("t", path, "generation", prompt_field="text", answer_field="label")
    assert task.meta["duplicates_dropped"] == 5 and task.meta["available"] == 20
    assert len({ex.prompt for ex in _all(task)}) == len(_all(task)) == 20
    with pytest.raises(ValueError, match="kind='regression' is not one of"):
        jsonl_task("t", path, "regression")


def test_jsonl_explicit_labels_keep_order(tmp_path):
    path = _write_jsonl(tmp_path / "data.jsonl", _records(30))
    kw = {"prompt_field": "text", "answer_field": "label"}
    task = jsonl_task("t", path, "classification", labels=["pos", "neu", "neg"], **kw)
    assert task.labels == ["pos", "neu", "neg"]
    assert set(Counter(ex.answer for ex in task.train)) == {"pos", "neu", "neg"}


# ---------------------------------------------------------------- CSV


def test_csv_task_matches_jsonl_task(tmp_path):
    recs = _records(30)
    kw = {"prompt_field": "text", "answer_field": "label"}
    from_csv = csv_task("t", _write_csv(tmp_path / "d.csv", recs), "classification", **kw)
    from_jsonl = jsonl_task("t", _write_jsonl(tmp_path / "d.jsonl", recs), "classification", **kw)
    assert (from_csv.train, from_csv.val, from_csv.test) == (from_jsonl.train, from_jsonl.val, from_jsonl.test)
    tsv = csv_task("t", _write_csv(tmp_path / "d.tsv", recs, "\t"), "classification", prompt_field="text",
                   answer_field="label", delimiter="\t")
    assert tsv.test == from_csv.test


def test_csv_wrong_number_of_columns_names_file_and_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,answer\na,b\n\n\"two\nlines\",c\nd,e,f\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"d\.csv line 6: 3 values, more than the 2 columns of the header \(line 1\)"):
        csv_task("t", path, "generation")
    path.write_text("prompt,answer\nhello,world\n\"two\nlines\"\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"d\.csv line 3: 1 values, fewer than the 2 columns of the header"):
        csv_task("t", path, "generation")
    path.write_text("prompt,answer,prompt\na,b,c\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"d\.csv line 1: the header repeats column\(s\) \['prompt'\]"):
        csv_task("t", path, "generation")


def test_csv_missing_field_names_file_line_and_field(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt;answer\na;b\n", encoding="utf-8")  # wrong delimiter: one column
    with pytest.raises(ValueError, match=r"d\.csv line 2: missing field 'answer'; fields present: \['prompt;answer'\]"):
        csv_task("t", path, "generation")
    path.write_text("text,label\nfine day,pos\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"d\.csv line 2: missing field 'question'; fields present: \['label', 'text'\]"):
        csv_task("t", path, "generation", prompt_field="question", answer_field="label")


# ---------------------------------------------------------------- Hugging Face datasets


class _FakeClassLabel:
    def __init__(self, names):
        self.names = names


def _fake_datasets(monkeypatch, splits: dict[str, list[dict]], features: dict | None = None):
    """A stand-in ``datasets`` module: load_dataset returns a list-like with ``features``."""

    class _DS(list):
        pass

    calls = []

    def load_dataset(path, name=None, data_files=None, split=None, cache_dir=None):
        calls.append((path, name, data_files, split))
        ds = _DS(splits[split])
        ds.features = features
        return ds

    module = types.SimpleNamespace(load_dataset=load_dataset, ClassLabel=_FakeClassLabel)
    monkeypatch.setitem(sys.modules, "datasets", module)
    return calls


def test_hf_task_wiring_with_fake_datasets(monkeypatch):
    rows = [{"sentence": f"s{i}", "label": i % 2} for i in range(20)]
    calls = _fake_datasets(monkeypatch, {"train": rows, "test": rows[:4]}, {"label": _FakeClassLabel(["bad", "good"])})
    task = hf_task("sst", "glue", "classification", config_name="sst2", test_split="test",
                   prompt_field="sentence", answer_field="label", n_val=2)
    assert calls == [("glue", "sst2", None, "train"), ("glue", "sst2", None, "test")]
    assert task.labels == ["bad", "good"]  # ClassLabel ids mapped to names
    assert [ex.answer for ex in task.test] == ["bad", "good", "bad", "good"]
    assert (len(task.train), len(task.val), len(task.test)) == (18, 2, 4)


def test_hf_task_errors_name_split_and_row(monkeypatch):
    _fake_datasets(monkeypatch, {"train": [{"prompt": "a", "answer": "b"}, {"prompt": "c"}]})
    message = r"local split 'train' row 1: missing field 'answer'; fields present: \['prompt'\]"
    with pytest.raises(ValueError, match=message):
        hf_task("t", "local", "generation")


def test_hf_task_real_json_loader(tmp_path):
    import datasets  # noqa: F401  (a hard dependency with pandas, pyarrow: no skip)
    path = _write_jsonl(tmp_path / "data.jsonl", _records(30))
    task = hf_task("t", "json", "classification", data_files=str(path), prompt_field="text",
                   answer_field="label", cache_dir=str(tmp_path / "cache"))
    same = jsonl_task("t", path, "classification", prompt_field="text", answer_field="label")
    assert (task.train, task.val, task.test) == (same.train, same.val, same.test)
