"""CL_Benchmark loaders (lmas.data.cl_benchmark) on small files written in both layouts, and the cl_* presets."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from lmas.data.cl_benchmark import ORDERS, cl_stream, cl_task
from lmas.data.cl_layouts import ENV, canonical, find_tasks
from lmas.data.task import Example

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data" / "cl_benchmark"
TOPICS = ["World", "Sports", "Business", "Science or Technology"]
INSTRUCTIONS = {
    "TC": [{"instruction_type": "zero-shot", "instruction": "What is the topic? Choose one from the option.\n"}],
    "SC": [{"instruction_type": "zero-shot", "instruction": "What is the sentiment? Choose one from the option.\n"}],
}


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _sapt(definition: str, rows: list[tuple[str, object]]) -> dict:
    return {
        "Definition": [definition],
        "Positive Examples": [],
        "Negative Examples": [],
        "Instances": [{"input": i, "output": o} for i, o in rows],
    }


def _rows(prefix: str, n: int, labels: list[str]) -> list[tuple[str, str]]:
    return [(f"Text: {prefix} item {i}\n", labels[i % len(labels)]) for i in range(n)]


def _long_task(
    root: Path,
    name: str,
    labels: list[str],
    files: dict[str, int],
    definition: str = "Classify.\n",
    answers: list[str] | None = None,
) -> None:
    folder = root / "Long_Sequence" / name
    _write(folder / "labels.json", labels)
    for split, n in files.items():
        shared = "test" if split == "dev" else split  # dev.json and test.json are the same file, as published
        _write(folder / f"{split}.json", _sapt(definition, _rows(f"{name} {shared}", n, answers or labels)))


@pytest.fixture
def sapt_dir(tmp_path: Path) -> Path:
    """A SAPT-layout CL_Benchmark: Long_Sequence with the shared copy's gaps, two SuperNI tasks, instructions."""
    root = tmp_path / "CL_Benchmark"
    _long_task(root, "agnews", TOPICS, {"train": 120, "dev": 40, "test": 40})
    _long_task(root, "amazon", ["negative", "positive"], {"train": 80, "dev": 30, "test": 30})
    _long_task(root, "dbpedia", ["Company", "Artist"], {"dev": 100, "test": 100})  # no train.json
    _long_task(root, "imdb", ["Good", "Bad"], {"train": 80})  # no dev/test
    _long_task(root, "qqp", ["False", "True"], {"train": 60, "test": 20}, answers=["no", "yes"])
    _long_task(root, "copa", ["A", "B"], {"train": 60, "test": 20}, definition="")
    _write(root / "Long_Sequence" / "yahoo" / "labels.json", ["Health", "Sports"])  # labels only
    mnli = _rows("mnli", 60, ["neutral", "entailment", "contradiction", "-"])
    _write(root / "Long_Sequence" / "mnli" / "labels.json", ["neutral", "entailment", "contradiction"])
    _write(
        root / "Long_Sequence" / "mnli" / "train.json",
        _sapt("NLI.", _rows("mnli train", 60, ["neutral", "entailment"])),
    )
    _write(root / "Long_Sequence" / "mnli" / "test.json", _sapt("NLI.", mnli))
    for name in ("task001_sum", "task002_qa"):
        rows = [(f"{name} question {i}", [f"answer {i}", f"alt {i}"]) for i in range(70)]
        _write(root / "SuperNI" / name / "train.json", _sapt(f"Do {name}.", rows[:50]))
        _write(root / "SuperNI" / name / "test.json", _sapt(f"Do {name}.", rows[50:]))
    _write(root / "instruction_config.json", INSTRUCTIONS)
    return tmp_path  # a folder holding CL_Benchmark/, like a clone of the papers' repositories


@pytest.fixture
def olora_dir(tmp_path: Path) -> Path:
    """An O-LoRA-layout CL_Benchmark: <family>/<Task>/ with lists of {"sentence", "label"}."""
    root = tmp_path / "olora"
    for family, task, labels in (
        ("TC", "agnews", TOPICS),
        ("SC", "SST-2", ["Good", "Bad"]),
        ("BoolQA", "BoolQA", ["True", "False"]),
        ("COPA", "COPA", ["A", "B"]),
    ):
        folder = root / family / task
        _write(folder / "labels.json", labels)
        for split, n in (("train", 70), ("dev", 20), ("test", 20)):
            rows = _rows(f"{task} {'test' if split == 'dev' else split}", n, labels)
            _write(folder / f"{split}.json", [{"sentence": s, "label": lab} for s, lab in rows])
    _write(root / "instruction_config.json", INSTRUCTIONS)
    return root


# ---------------------------------------------------------------------------- layouts and prompts


def test_sapt_layout_classification_prompt_labels_and_sizes(sapt_dir):
    task = cl_task("agnews", data_dir=sapt_dir, val_size=10)
    assert task.kind == "classification" and task.labels == TOPICS
    assert (len(task.train), len(task.val), len(task.test)) == (110, 10, 40)
    ex = task.test[0]
    item = ex.prompt.split("Option: World, Sports, Business, Science or Technology \n")[1]
    assert ex.prompt == (
        "Task:TC\nDataset:agnews\nWhat is the topic? Choose one from the option.\n"
        f"Option: World, Sports, Business, Science or Technology \n{item}"
    )
    assert item.startswith("Text: agnews test item ") and item.endswith("\nAnswer:")
    assert task.meta["benchmark_layout"] == "long" and task.meta["family"] == "TC"
    assert task.meta["split_note"] is None and task.meta["files"] == ["dev", "test", "train"]
    assert task.meta["available"] == {"train": 120, "test": 40}


def test_olora_layout_names_families_and_same_prompt_format(olora_dir):
    root, tasks, incomplete = find_tasks(olora_dir)
    assert root == olora_dir and sorted(tasks) == ["agnews", "boolq", "copa", "sst2"] and not incomplete
    assert (tasks["sst2"].family, tasks["boolq"].family) == ("SC", "BoolQA")
    assert canonical("SST-2") == "sst2" and canonical("BoolQA") == "boolq"
    sst2 = cl_task("sst2", data_dir=olora_dir, val_size=5)
    assert sst2.labels == ["Good", "Bad"] and (len(sst2.train), len(sst2.val), len(sst2.test)) == (65, 5, 20)
    assert sst2.test[0].prompt.startswith(
        "Task:SC\nDataset:SST-2\nWhat is the sentiment? Choose one from the option.\nOption: Good, Bad \nText: SST-2 "
    )
    boolq = cl_task("boolq", data_dir=olora_dir)  # no instruction for BoolQA in this config: no Definition either
    assert boolq.test[0].prompt.startswith("Task:BoolQA\nDataset:BoolQA\nText: BoolQA test item")


def test_definition_when_no_instruction_config_and_copa_without_instruction(sapt_dir):
    (sapt_dir / "CL_Benchmark" / "instruction_config.json").unlink()
    amazon = cl_task("amazon", data_dir=sapt_dir, task_prefix=False)
    assert amazon.test[0].prompt.startswith("Classify.\nOption: negative, positive \nText: amazon test item")
    copa = cl_task("copa", data_dir=sapt_dir)  # empty Definition, no instruction: O-LoRA's COPA format
    assert copa.test[0].prompt.startswith("Task:COPA\nDataset:copa\nText: copa test item")
    assert copa.test[0].prompt.endswith("\nAnswer:") and "Option:" not in copa.test[0].prompt


def test_sapt_prompt_style_and_max_chars(sapt_dir):
    task = cl_task("amazon", data_dir=sapt_dir, prompt_style="sapt", max_chars=12)
    ex = task.test[0]
    assert ex.prompt == "Definition: Classify.\n\nNow complete the following example -\nInput: Text: amazon\nOutput:"
    assert ex.answer in ("negative", "positive") and task.meta["prompt_style"] == "sapt"


def test_superni_generation_answers_kept_aligned(sapt_dir):
    task = cl_task("task002_qa", data_dir=sapt_dir, val_size=5, max_eval=7)
    assert task.kind == "generation" and task.labels is None and task.metric == "rouge_l"  # the papers' metric
    assert cl_task("task002_qa", data_dir=sapt_dir, val_size=5, generation_metric="exact_match").metric == "exact_match"
    assert (len(task.train), len(task.val), len(task.test)) == (45, 5, 7)
    for split in ("val", "test"):
        for ex, answers in zip(getattr(task, split), task.meta["answers"][split], strict=True):
            i = answers[0].split()[1]
            assert answers == [f"answer {i}", f"alt {i}"] and ex.answer == f"answer {i}"
            assert ex.answers == (f"answer {i}", f"alt {i}")  # every reference travels with its example
            assert ex.prompt == (
                f"Definition: Do task002_qa.\n\nNow complete the following example -\nInput: task002_qa question {i}"
                "\nOutput:"
            )


def test_classification_scoring_generate_is_the_same_task_scored_by_exact_match(sapt_dir, tiny_base):
    """classification_scoring=generate: the same items and prompts (labels listed), a generation task scored by the
    greedy answer's exact match with the label; every per-example 1/0 is that comparison, recomputed here."""
    from lmas.evaluation.scoring import evaluate_scored, greedy_answers, normalise_answer
    from lmas.lm.encoding import PromptEncoder

    ranked = cl_task("agnews", data_dir=sapt_dir, val_size=10)
    task = cl_task("agnews", data_dir=sapt_dir, val_size=10, classification_scoring="generate")
    assert (task.kind, task.metric, task.labels) == ("generation", "exact_match", None)
    assert task.meta["class_labels"] == TOPICS and "exact match" in task.describe()["scoring_note"]
    for split in ("train", "val", "test"):
        assert getattr(task, split) == getattr(ranked, split)  # same examples, prompts listing the options
    enc = PromptEncoder(tiny_base.tokenizer, 64)
    answers = greedy_answers(tiny_base.model, enc, [ex.prompt for ex in task.test], 4, 8)
    # an untrained model writes no label: make every other item's gold its own answer, so both outcomes occur
    task.test = [Example(ex.prompt, a if i % 2 == 0 else ex.answer) for i, (a, ex) in
                 enumerate(zip(answers, task.test, strict=True))]  # fmt: skip
    scored = evaluate_scored(tiny_base.model, enc, task, "test", batch_size=8, max_new_tokens=4)
    want = [float(normalise_answer(a) == normalise_answer(ex.answer)) for a, ex in zip(answers, task.test, strict=True)]
    assert set(want[::2]) == {1.0} and 0.0 in want  # hits and misses
    assert scored.per_example.tolist() == want and scored.value == pytest.approx(sum(want) / len(want))
    superni = cl_task("task002_qa", data_dir=sapt_dir, val_size=5, classification_scoring="generate")
    assert superni.metric == "rouge_l" and "class_labels" not in superni.meta  # generation_metric scores SuperNI
    with pytest.raises(ValueError, match=r"classification_scoring='greedy': expected rank or generate"):
        cl_task("agnews", data_dir=sapt_dir, classification_scoring="greedy")


# ---------------------------------------------------------------------------- splits


def test_val_held_out_of_train_and_test_fixed_across_seeds(sapt_dir):
    a = cl_task("agnews", data_dir=sapt_dir, val_size=20, split_seed=0, max_eval=15)
    b = cl_task("agnews", data_dir=sapt_dir, val_size=20, split_seed=1, max_eval=15)
    for t in (a, b):
        train, val, test = ({e.prompt for e in s} for s in (t.train, t.val, t.test))
        assert len(val) == 15 and not train & val and not (train | val) & test  # val_size 20, max_eval 15
        assert all("agnews train item" in p for p in train | val)  # validation never comes from dev/test
    assert [e.prompt for e in a.test] == [e.prompt for e in b.test]  # paired: test does not follow split_seed
    assert [e.prompt for e in a.val] != [e.prompt for e in b.val] and a.train != b.train
    full = cl_task("agnews", data_dir=sapt_dir, split_seed=1)
    assert [e.prompt for e in full.test[:15]] == [e.prompt for e in a.test]  # max_eval: a prefix of one shuffle
    capped = cl_task("agnews", data_dir=sapt_dir, val_size=20, split_seed=1, max_train=30)
    assert capped.train == b.train[:30] and capped.val[:15] == b.val and len(capped.val) == 20
    short = cl_task("agnews", data_dir=sapt_dir, val_size=20, split_seed=1, max_eval=6)  # as Stream's max_eval
    assert short.val == b.val[:6] and short.test == full.test[:6] and short.train == b.train


def test_missing_splits_cut_with_fixed_seed_and_recorded(sapt_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="lmas.data.cl_benchmark"):
        imdb = cl_task("imdb", data_dir=sapt_dir, val_size=10, split_seed=3)
        dbpedia = cl_task("dbpedia", data_dir=sapt_dir, val_size=10, cut_fraction=0.3)
    assert imdb.meta["available"] == {"train": 60, "test": 20} and len(imdb.test) == 20 and len(imdb.train) == 50
    assert imdb.meta["split_note"].startswith("no dev.json/test.json: the test split is a fixed-seed cut")
    assert dbpedia.meta["available"] == {"train": 30, "test": 70} and len(dbpedia.train) == 20
    assert dbpedia.meta["split_note"].startswith("no train.json: the train pool is a fixed-seed cut (seed 0) of 30")
    assert "task 'imdb': no dev.json/test.json" in caplog.text and "task 'dbpedia': no train.json" in caplog.text
    other = cl_task("imdb", data_dir=sapt_dir, val_size=10, split_seed=4)
    assert other.test == imdb.test and other.train != imdb.train  # the cut is fixed, the resampling is not
    assert not {e.prompt for e in imdb.test} & {e.prompt for e in imdb.train + imdb.val}


def test_unlabeled_dropped_and_mismatched_labels_file_replaced(sapt_dir, caplog):
    mnli = cl_task("mnli", data_dir=sapt_dir)
    assert mnli.meta["unlabeled_dropped"] == 15 and len(mnli.test) == 45
    assert {e.answer for e in mnli.test} == {"neutral", "entailment", "contradiction"}
    with caplog.at_level(logging.WARNING, logger="lmas.data.cl_benchmark"):
        qqp = cl_task("qqp", data_dir=sapt_dir)
    assert qqp.labels == ["no", "yes"] and "lists ['False', 'True'] but the instances answer" in qqp.meta["labels_note"]
    assert "Option: no, yes \n" in qqp.test[0].prompt and "instances' answers are used" in caplog.text


def test_train_records_repeated_or_in_test_are_dropped(tmp_path):
    folder = tmp_path / "Long_Sequence" / "sst2"
    _write(folder / "labels.json", ["Good", "Bad"])
    train = _rows("sst2 train", 30, ["Good", "Bad"])
    _write(folder / "train.json", _sapt("S.", train + train[:3] + [("Text: shared\n", "Good")]))
    _write(folder / "test.json", _sapt("S.", [("Text: shared\n", "Good")] + _rows("sst2 test", 9, ["Good", "Bad"])))
    task = cl_task("sst2", data_dir=tmp_path, val_size=5)
    assert task.meta["train_dropped_repeats"] == 4 and len(task.train) == 25 and len(task.test) == 10


# ---------------------------------------------------------------------------- streams and orders


def test_published_orders():
    assert ORDERS["standard"][1] == ["dbpedia", "amazon", "yahoo", "agnews"]
    assert ORDERS["long"][4][:3] == ["yelp", "amazon", "mnli"] and ORDERS["long"][5][:3] == ["mnli", "cb", "wic"]
    assert all(sorted(o) == sorted(ORDERS["long"][4]) and len(o) == 15 for o in ORDERS["long"].values())
    assert all(sorted(o) == sorted(ORDERS["superni"][1]) and len(o) == 15 for o in ORDERS["superni"].values())
    assert ORDERS["superni"][2][0] == "task748_glucose_reverse_cause_event_detection"


def test_stream_missing_task_refused_unless_skipped_or_excluded(sapt_dir, caplog):
    with pytest.raises(
        ValueError,
        match=r"tasks \['yahoo'\] are not in data_dir=.*yahoo has no train/dev/test\.json"
        r".*available tasks: \['agnews'.*skip_missing=true",
    ):
        cl_stream("standard", order=1, data_dir=sapt_dir)
    with caplog.at_level(logging.WARNING, logger="lmas.data.cl_benchmark"):
        stream = cl_stream("standard", order=3, data_dir=sapt_dir, skip_missing=True, val_size=5)
    assert stream.task_names == ["amazon", "agnews", "dbpedia"] and stream.name == "cl_standard"
    assert stream.meta["skipped"] == ["yahoo"] and stream.meta["order"] == 3 and "skipping tasks" in caplog.text
    excluded = cl_stream("standard", order=2, data_dir=sapt_dir, exclude=["yahoo"], val_size=5, max_eval=4)
    assert excluded.task_names == ["dbpedia", "amazon", "agnews"] and excluded.meta["excluded"] == ["yahoo"]
    assert [len(t.test) for t in excluded] == [4, 4, 4] and excluded.meta["skipped"] == []
    own = cl_stream("long", order=None, tasks=["copa", "agnews"], data_dir=sapt_dir, name="mine")
    assert own.task_names == ["copa", "agnews"] and own.name == "mine"


def test_data_dir_from_environment(sapt_dir, monkeypatch):
    monkeypatch.setenv(ENV, str(sapt_dir))
    assert cl_task("amazon").source == str(sapt_dir / "CL_Benchmark" / "Long_Sequence" / "amazon")
    monkeypatch.delenv(ENV)
    with pytest.raises(ValueError, match=rf"data_dir is not set: .*set the environment variable {ENV}"):
        cl_task("amazon")


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda d: cl_task("agnews", data_dir=d / "nope"),
            FileNotFoundError,
            r"data_dir=.*nope: .* does not exist; "
            r"expected a folder with Long_Sequence/<task>",
        ),
        (
            lambda d: cl_task("agnwes", data_dir=d),
            ValueError,
            r"task 'agnwes' is not in data_dir=.*no such task; "
            r"available tasks: \['agnews', 'amazon'",
        ),
        (lambda d: cl_task("yahoo", data_dir=d), ValueError, r"task 'yahoo' .*yahoo has no train/dev/test\.json"),
        (
            lambda d: cl_stream("long", order=7, data_dir=d),
            ValueError,
            r"order=7: benchmark 'long' has the orders "
            r"\[4, 5, 6\]",
        ),
        (lambda d: cl_stream("medium", order=1, data_dir=d), ValueError, r"benchmark='medium': expected one of"),
        (lambda d: cl_stream("long", order=4, tasks=["cb"], data_dir=d), ValueError, r"give one of them"),
        (lambda d: cl_stream("standard", order=1, exclude=["cb"], data_dir=d), ValueError, r"\['cb'\] not in the"),
        (
            lambda d: cl_stream("long", tasks=["agnews", "agnwes"], skip_missing=True, data_dir=d),
            ValueError,
            r"tasks \['agnwes'\] are not in data_dir=.*agnwes: no folder",
        ),
        (
            lambda d: cl_task("agnews", data_dir=d, val_size=120),
            ValueError,
            r"val_size=120 leaves no training "
            r"examples: the train pool of .*agnews has 120 records",
        ),
        (
            lambda d: cl_task("agnews", data_dir=d, max_eval=0),
            ValueError,
            r"max_eval=0: expected null \(all\) or an "
            r"integer >= 1",
        ),
        (lambda d: cl_task("agnews", data_dir=d, prompt_style="t5"), ValueError, r"prompt_style='t5': expected olora"),
    ],
)
def test_bad_options_name_the_option_and_what_is_expected(sapt_dir, call, error, message):
    with pytest.raises(error, match=message):
        call(sapt_dir)


def test_folder_without_the_layout(tmp_path):
    (tmp_path / "something").mkdir()
    (tmp_path / "something" / "notes.txt").write_text("x")
    with pytest.raises(
        FileNotFoundError,
        match=r"no task there; expected Long_Sequence/<task>/\{train,dev,test\}"
        r"\.json \+ labels\.json or SuperNI.*found \['something'\]",
    ):
        find_tasks(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"Definition": ["x"], "Instances": [', r"train\.json line 1: not valid JSON"),
        (
            '[{"sentence": "a", "label": "Good"}]',
            r"train\.json: expected a JSON object with 'Definition' and an "
            r"'Instances' list \(SAPT layout\), got list",
        ),
        (
            '{"Definition": ["x"], "Instances": [{"input": "a"}]}',
            r"train\.json instance 0: expected an object with "
            r"\['input', 'output'\]",
        ),
        (
            '{"Definition": ["x"], "Instances": [{"input": "", "output": "Good"}]}',
            r"instance 0: 'input' must be a "
            r"non-empty string",
        ),
        ('{"Definition": ["x"], "Instances": [{"input": "a", "output": 3}]}', r"instance 0: 'output' must be a string"),
        (
            '{"Definition": ["x"], "Instances": [{"input": "a", "output": "Good"}, {"input": "b", "output": "Great"}]}',
            r"instance 1: answer 'Great' is not one of the labels \['Good', 'Bad'\] of .*labels\.json",
        ),
        ('{"Definition": ["x"], "Instances": []}', r"train\.json: no instances"),
    ],
)
def test_malformed_files_and_instances_name_file_and_instance(sapt_dir, content, message):
    path = sapt_dir / "CL_Benchmark" / "Long_Sequence" / "imdb" / "train.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        cl_task("imdb", data_dir=sapt_dir)


def test_malformed_olora_file_and_missing_labels(olora_dir):
    _write(olora_dir / "TC" / "agnews" / "test.json", {"Instances": []})
    with pytest.raises(
        ValueError,
        match=r"agnews/test\.json: expected a JSON list of \{\"sentence\", \"label\"\} "
        r"records \(O-LoRA layout\), got a dict",
    ):
        cl_task("agnews", data_dir=olora_dir)
    (olora_dir / "SC" / "SST-2" / "labels.json").unlink()
    with pytest.raises(
        FileNotFoundError,
        match=r"task 'sst2': .*SST-2/labels\.json: no such file; a classification "
        r"task folder needs labels\.json",
    ):
        cl_task("sst2", data_dir=olora_dir)


# ---------------------------------------------------------------------------- presets


@pytest.mark.parametrize(
    ("preset", "order", "first"),
    [("cl_standard", 2, "dbpedia"), ("cl_long", 5, "mnli"), ("cl_superni", 1, "task001_sum")],
)
def test_presets_instantiate_the_stream(sapt_dir, preset, order, first):
    """Each preset alone (its own options; the full lmas-train compose needs the schema to admit them)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    tasks = "[task001_sum,task002_qa]" if preset == "cl_superni" else "null"
    overrides = [
        f"data_dir={sapt_dir}",
        "split_seed=2",
        f"order={order if tasks == 'null' else 'null'}",
        f"tasks={tasks}",
        "skip_missing=true",
        "val_size=5",
        "max_eval=8",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf" / "stream"), version_base="1.3"):
        cfg = compose(preset, overrides=overrides)
    stream = instantiate(cfg, _convert_="all")
    assert stream.name == preset and stream.task_names[0] == first and all(len(t.test) <= 8 for t in stream)
    assert all(t.meta["split_seed"] == 2 for t in stream)


def test_compose_cl_long_with_lmas_train(sapt_dir, compose):
    import lmas.schema  # noqa: F401  (registers train_schema, as lmas-train does)

    cfg = compose(
        [
            "stream=cl_long",
            f"stream.data_dir={sapt_dir}",
            "stream.skip_missing=true",
            "seed=3",
            "stream.order=5",
            "stream.val_size=5",
        ]
    )
    from hydra.utils import instantiate

    stream = instantiate(cfg.stream, _convert_="all")
    assert stream.meta["order"] == 5 and stream.task_names[:2] == ["mnli", "copa"]
    assert all(t.meta["split_seed"] == 3 for t in stream)


# ---------------------------------------------------------------------------- the shared copy


@pytest.mark.slow
def test_shared_copy_long_and_superni():
    data_dir = os.environ.get(ENV) or (str(SHARED) if SHARED.is_dir() else None)
    if data_dir is None:
        pytest.skip(f"no CL_Benchmark copy: set {ENV} or provide {SHARED}")
    long = cl_stream("long", order=4, data_dir=data_dir, skip_missing=True, max_eval=400)
    assert long.meta["skipped"] == ["yahoo"] and len(long) == 14
    sizes = {t.name: (len(t.train), len(t.val), len(t.test)) for t in long}
    assert sizes["dbpedia"] == (1850, 50, 400) and sizes["cb"] == (200, 50, 56) and sizes["imdb"] == (1450, 50, 400)
    assert long[long.index("qqp")].labels == ["no", "yes"] and long[long.index("mnli")].meta["unlabeled_dropped"] == 131
    superni = cl_stream("superni", order=2, data_dir=data_dir)
    assert len(superni) == 15 and all(t.kind == "generation" for t in superni)
    assert superni[superni.index("task511_reddit_tifu_long_text_summarization")].meta["unlabeled_dropped"] == 6


@pytest.mark.slow
def test_superni_rouge_l_and_long_sequence_rank_scoring_on_smollm2():
    """The shared copy scored by the embedded model: ROUGE-L per example on two SuperNI tasks (greedy answers;
    the untrained model often ends a summary at once with EOS, which scores 0) and rank classification on two
    long-sequence tasks, with per-example records that give the task scores."""
    data_dir = os.environ.get(ENV) or (str(SHARED) if SHARED.is_dir() else None)
    if data_dir is None:
        pytest.skip(f"no CL_Benchmark copy: set {ENV} or provide {SHARED}")
    from lmas.evaluation.scoring import evaluate_scored, greedy_answers, rouge_l
    from lmas.lm.encoding import PromptEncoder
    from lmas.models.providers import smollm2

    base = smollm2()
    enc = PromptEncoder(base.tokenizer, 256)
    superni = cl_stream("superni", order=1, data_dir=data_dir, max_eval=6, max_chars=600)
    long = cl_stream("long", order=4, data_dir=data_dir, skip_missing=True, max_eval=12, max_chars=400)
    for task in [superni[0], superni[1], long[0], long[1]]:
        scored = evaluate_scored(base.model, enc, task, "test", batch_size=6, max_new_tokens=24)
        assert len(scored.per_example) == len(task.test)
        assert scored.value == pytest.approx(float(scored.per_example.astype("float64").mean()))
        assert 0.0 <= scored.per_example.min() and scored.per_example.max() <= 1.0
        if task.metric == "rouge_l":  # each item: ROUGE-L of the greedy answer against its best reference
            preds = greedy_answers(base.model, enc, [ex.prompt for ex in task.test], 24, 6)
            want = [rouge_l(p, ex.answers) for p, ex in zip(preds, task.test, strict=True)]
            assert scored.per_example.tolist() == pytest.approx(want, abs=1e-6)
        else:
            assert task.kind == "classification" and set(scored.per_example.tolist()) <= {0, 1}
