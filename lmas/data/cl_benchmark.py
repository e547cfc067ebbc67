"""The ``CL_Benchmark`` of the LLM continual-learning papers (O-LoRA, SAPT, N-LoRA, GainLoRA) as lmas tasks and streams.

Layouts read (by :mod:`lmas.data.cl_layouts`) from ``data_dir`` (default: the environment variable
``LMAS_CL_BENCHMARK``; a folder that holds ``CL_Benchmark/`` is accepted too):

* SAPT: ``Long_Sequence/<task>/{train,dev,test}.json`` + ``labels.json`` (classification) and
  ``SuperNI/<task>/{train,dev,test}.json`` (generation). Each file is one object
  ``{"Definition": [str], "Instances": [{"input": str, "output": str | [str, ...]}, ...]}``.
* O-LoRA: ``<family>/<Task>/{train,dev,test}.json`` + ``labels.json``, each file a list of
  ``{"sentence": str, "label": str}``; the family folders are TC, SC, NLI, QQP, BoolQA, COPA, MultiRC, WiC. A task's
  name is its folder name lower-cased without punctuation (``SST-2`` -> ``sst2``; ``BoolQA`` -> ``boolq``).

Splits: ``dev.json`` and ``test.json`` are the same file in the published copies, so validation is always held
out of the train pool (``val_size`` examples after a shuffle with ``split_seed``) and ``dev.json`` is read only as
the test split of a task without ``test.json``. A task missing its train or its dev/test file gets that pool cut
from the other file (``cut_fraction`` of it, seed :data:`CUT_SEED`), logged and recorded in
``Task.meta["split_note"]``. ``max_eval`` caps val and test as :class:`lmas.data.stream.Stream`'s does: the test
split is the first items after a shuffle with :data:`TEST_SEED`, so it never depends on ``split_seed``.
``max_train`` caps the train split after the val cut.

Prompts (``prompt_style``): ``olora`` (default for classification) is O-LoRA's ``Task:<family>\\nDataset:<folder>\\n``
(``task_prefix``) + the family's instruction (``instruction_config.json`` in ``data_dir``, else the task's
``Definition``) + ``Option: <labels> \\n<input>\\nAnswer:``; a task with neither (COPA) is ``<input>\\nAnswer:``.
``sapt`` (always used for SuperNI) is ``Definition: <definition>\\n\\nNow complete the following example -\\n
Input: <input>\\nOutput:``. The answer is the label (SuperNI: the first acceptable output; all of them are kept,
aligned with the val/test examples, in ``Task.meta["answers"]``).

Data quirks handled: instances answered ``"-"`` (MNLI's items without a gold label) or with no non-empty answer
(six of SuperNI's reddit_tifu train instances) are dropped and counted (``meta["unlabeled_dropped"]``); a
``labels.json`` that shares no label with the instances (SAPT's qqp lists False/True, its instances answer no/yes)
is replaced by the instances' answers, with a warning and ``meta["labels_note"]``; any other answer outside
``labels.json`` is an error naming the file and instance. Train records whose input repeats, or also occurs in the
test pool, are dropped and counted (``meta["train_dropped_repeats"]``).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from typing import Any, Literal

from lmas.data.cl_layouts import SPLIT_FILES, Row, TaskDir, find_tasks, read_instructions, read_labels, read_split
from lmas.data.common import truncate
from lmas.data.stream import Stream
from lmas.data.task import Example, Task, TaskKind

log = logging.getLogger(__name__)

CUT_SEED = 0  # the seed of the cut that makes a missing split (never split_seed: the test set stays fixed)
TEST_SEED = 0  # the seed of the shuffle before max_eval
PromptStyle = Literal["olora", "sapt"]

# Published task orders (O-LoRA's and SAPT's scripts; "6" is the third long-sequence order of Progressive Prompts,
# found in a PIKA/GainLoRA-style script as its order 5: see docs/data-cl-benchmark.md for the numbering).
ORDERS: dict[str, dict[int, list[str]]] = {
    "standard": {
        1: ["dbpedia", "amazon", "yahoo", "agnews"],
        2: ["dbpedia", "amazon", "agnews", "yahoo"],
        3: ["yahoo", "amazon", "agnews", "dbpedia"],
    },
    "long": {
        4: "yelp amazon mnli cb copa qqp rte imdb sst2 dbpedia agnews yahoo multirc boolq wic".split(),
        5: "mnli cb wic copa qqp boolq rte imdb yelp amazon sst2 dbpedia agnews multirc yahoo".split(),
        6: "multirc boolq wic mnli cb copa qqp rte imdb sst2 dbpedia agnews yelp amazon yahoo".split(),
    },
    "superni": {
        1: (
            "task1572_samsum_summary task363_sst2_polarity_classification task1290_xsum_summarization "
            "task181_outcome_extraction task002_quoref_answer_generation task1510_evalution_relation_extraction "
            "task639_multi_woz_user_utterance_generation task1729_personachat_generate_next "
            "task073_commonsenseqa_answer_generation task1590_diplomacy_text_generation "
            "task748_glucose_reverse_cause_event_detection task511_reddit_tifu_long_text_summarization "
            "task591_sciq_answer_generation task1687_sentiment140_classification task875_emotion_classification "
        ).split(),
        2: (
            "task748_glucose_reverse_cause_event_detection task073_commonsenseqa_answer_generation "
            "task1590_diplomacy_text_generation task639_multi_woz_user_utterance_generation "
            "task1572_samsum_summary task1687_sentiment140_classification task591_sciq_answer_generation "
            "task363_sst2_polarity_classification task1510_evalution_relation_extraction "
            "task1729_personachat_generate_next task181_outcome_extraction "
            "task511_reddit_tifu_long_text_summarization task002_quoref_answer_generation "
            "task1290_xsum_summarization task875_emotion_classification "
        ).split(),
    },
}


def _cut(rows: list[Row], fraction: float) -> tuple[list[Row], list[Row]]:
    """``(rest, cut)``: a fixed-seed (:data:`CUT_SEED`) cut of ``fraction`` of ``rows``, both in file order."""
    k = max(1, min(len(rows) - 1, int(fraction * len(rows) + 0.5)))
    chosen = set(random.Random(CUT_SEED).sample(range(len(rows)), k))
    return [r for i, r in enumerate(rows) if i not in chosen], [r for i, r in enumerate(rows) if i in chosen]


def _prompt(
    task: TaskDir,
    text: str,
    definition: str,
    labels: list[str] | None,
    instruction: str | None,
    style: PromptStyle,
    task_prefix: bool,
) -> str:
    if style == "sapt" or task.layout == "superni":
        head = f"Definition: {definition}\n\n" if definition else ""
        return f"{head}Now complete the following example -\nInput: {text}\nOutput:"
    instruction = instruction or (definition + "\n" if definition else "")
    prefix = f"Task:{task.family}\nDataset:{task.path.name}\n" if task_prefix and task.family else ""
    options = f"{instruction}Option: {', '.join(labels or [])} \n" if instruction else ""
    return f"{prefix}{options}{text}\nAnswer:"


def cl_task(
    name: str,
    data_dir: str | os.PathLike | None = None,
    val_size: int = 50,
    max_train: int | None = None,
    max_eval: int | None = None,
    split_seed: int = 0,
    prompt_style: PromptStyle = "olora",
    task_prefix: bool = True,
    max_chars: int | None = None,
    cut_fraction: float = 0.25,
) -> Task:
    """One ``CL_Benchmark`` task of ``data_dir`` (see the module doc for splits, prompts and meta)."""
    root, tasks, incomplete = find_tasks(data_dir)
    if name not in tasks:
        why = (
            f"its folder {incomplete[name]} has no {'/'.join(SPLIT_FILES)}.json"
            if name in incomplete
            else "no such task"
        )
        raise ValueError(f"task {name!r} is not in data_dir={root}: {why}; available tasks: {sorted(tasks)}")
    return _build(
        tasks[name],
        read_instructions(root),
        val_size,
        max_train,
        max_eval,
        split_seed,
        prompt_style,
        task_prefix,
        max_chars,
        cut_fraction,
    )


def _check_options(val_size: Any, max_train: Any, max_eval: Any, prompt_style: Any, cut_fraction: Any) -> None:
    def count(v: Any, lo: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= lo

    for option, value, ok, allowed in (
        ("val_size", val_size, count(val_size, 0), "an integer >= 0"),
        ("max_train", max_train, max_train is None or count(max_train, 1), "null (all) or an integer >= 1"),
        ("max_eval", max_eval, max_eval is None or count(max_eval, 1), "null (all) or an integer >= 1"),
        ("prompt_style", prompt_style, prompt_style in ("olora", "sapt"), "olora or sapt"),
        ("cut_fraction", cut_fraction, isinstance(cut_fraction, float) and 0 < cut_fraction < 1, "a number in (0, 1)"),
    ):
        if not ok:
            raise ValueError(f"{option}={value!r}: expected {allowed}")


def _build(
    task: TaskDir,
    instructions: dict[str, str],
    val_size: int,
    max_train: int | None,
    max_eval: int | None,
    split_seed: int,
    prompt_style: PromptStyle,
    task_prefix: bool,
    max_chars: int | None,
    cut_fraction: float,
) -> Task:
    _check_options(val_size, max_train, max_eval, prompt_style, cut_fraction)
    files = task.files
    read = {
        split: read_split(path, task.layout) for split, path in files.items() if split != "dev" or "test" not in files
    }
    definition = next(d for d, _ in read.values())
    pools = {split: [r for r in rows if r[2]] for split, (_, rows) in read.items()}
    unlabeled = sum(len(rows) for _, rows in read.values()) - sum(map(len, pools.values()))
    kind: TaskKind = "generation" if task.layout == "superni" else "classification"
    labels, labels_note = read_labels(task, pools) if kind == "classification" else (None, None)
    test_from = "test" if "test" in pools else "dev" if "dev" in pools else None
    note = None
    if "train" in pools and test_from:
        train_pool, test_pool = pools["train"], pools[test_from]
    elif "train" in pools:
        train_pool, test_pool = _cut(pools["train"], cut_fraction)
        note = (
            f"no dev.json/test.json: the test split is a fixed-seed cut (seed {CUT_SEED}) of {len(test_pool)} of "
            f"the {len(pools['train'])} records of train.json, the rest is the train pool"
        )
    else:
        assert test_from is not None  # find_tasks keeps folders with a split file only
        test_pool, train_pool = _cut(pools[test_from], cut_fraction)
        note = (
            f"no train.json: the train pool is a fixed-seed cut (seed {CUT_SEED}) of {len(train_pool)} of the "
            f"{len(pools[test_from])} records of {test_from}.json, the rest is the test pool"
        )
    if note:
        log.warning("task %r: %s", task.name, note)
    test_inputs = {text for _, text, _ in test_pool}
    kept: dict[str, Row] = {}
    for row in train_pool:
        if row[1] not in test_inputs:
            kept.setdefault(row[1], row)
    dropped = len(train_pool) - len(kept)
    train_rows = list(kept.values())
    random.Random(split_seed).shuffle(train_rows)
    if val_size >= len(train_rows):
        raise ValueError(
            f"task {task.name!r}: val_size={val_size} leaves no training examples: the train pool "
            f"of {task.path} has {len(train_rows)} records"
        )
    val_rows, train_rows = train_rows[:val_size], train_rows[val_size:][:max_train]
    test_rows = list(test_pool)
    random.Random(TEST_SEED).shuffle(test_rows)
    test_rows, val_rows = test_rows[:max_eval], val_rows[:max_eval]

    def examples(rows: Sequence[Row]) -> list[Example]:
        instruction = instructions.get(task.family or "")
        return [
            Example(
                _prompt(task, truncate(text, max_chars), definition, labels, instruction, prompt_style, task_prefix),
                outs[0],
            )
            for _, text, outs in rows
        ]

    meta: dict[str, Any] = {
        "benchmark_layout": task.layout,
        "family": task.family,
        "files": sorted(files),
        "split_seed": split_seed,
        "val_size": val_size,
        "available": {"train": len(train_pool), "test": len(test_pool)},
        "split_note": note,
        "labels_note": labels_note,
        "unlabeled_dropped": unlabeled,
        "train_dropped_repeats": dropped,
        "prompt_style": "sapt" if task.layout == "superni" else prompt_style,
    }
    if kind == "generation":
        meta["answers"] = {"val": [outs for _, _, outs in val_rows], "test": [outs for _, _, outs in test_rows]}
    return Task(
        name=task.name,
        kind=kind,
        train=examples(train_rows),
        val=examples(val_rows),
        test=examples(test_rows),
        labels=labels,
        source=str(task.path),
        meta=meta,
    )


def cl_stream(
    benchmark: str,
    order: int | None = None,
    tasks: list[str] | None = None,
    exclude: list[str] | None = None,
    skip_missing: bool = False,
    data_dir: str | os.PathLike | None = None,
    name: str | None = None,
    scenario: str = "task",
    val_size: int = 50,
    max_train: int | None = None,
    max_eval: int | None = None,
    split_seed: int = 0,
    prompt_style: PromptStyle = "olora",
    task_prefix: bool = True,
    max_chars: int | None = None,
    cut_fraction: float = 0.25,
) -> Stream:
    """A stream of ``CL_Benchmark`` tasks in a published order (``order``) or in the order of ``tasks``.

    ``exclude`` drops named tasks of the order; ``skip_missing`` drops (with a warning, listed in
    ``Stream.meta["skipped"]``) the tasks of the benchmark that ``data_dir`` lacks, which are an error otherwise.
    The other options are :func:`cl_task`'s, applied to every task. Every check runs before any task is read.
    """
    if benchmark not in ORDERS:
        raise ValueError(f"benchmark={benchmark!r}: expected one of {sorted(ORDERS)}")
    orders = ORDERS[benchmark]
    if tasks is not None and order is not None:
        raise ValueError(
            f"order={order} and tasks={tasks}: give one of them (tasks: your own order; order: "
            f"one of the published orders {sorted(orders)} of {benchmark!r})"
        )
    if tasks is None:
        if order not in orders:
            raise ValueError(
                f"order={order!r}: benchmark {benchmark!r} has the orders {sorted(orders)} "
                f"(or give tasks=[...] in your own order)"
            )
        names = list(orders[order])
    elif not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise ValueError(f"tasks={tasks!r}: expected a non-empty list of task names")
    else:
        names = list(tasks)
    unknown = sorted(set(exclude or []) - set(names))
    if unknown:
        raise ValueError(f"exclude={exclude}: {unknown} not in the stream's tasks {names}")
    names = [n for n in names if n not in (exclude or [])]
    _check_options(val_size, max_train, max_eval, prompt_style, cut_fraction)
    root, found, incomplete = find_tasks(data_dir)
    published = {t for o in orders.values() for t in o}
    missing = [n for n in names if n not in found]
    why = {
        n: f"{incomplete[n]} has no {'/'.join(SPLIT_FILES)}.json" if n in incomplete else "no folder" for n in missing
    }
    listing = "; ".join(f"{n}: {w}" for n, w in why.items())
    strangers = [n for n in missing if n not in published]
    if strangers or (missing and not skip_missing):
        fix = "" if strangers else " Drop them with skip_missing=true (recorded in the stream's meta) or exclude=[...]."
        raise ValueError(
            f"stream {name or benchmark!r}: tasks {strangers or missing} are not in data_dir={root} "
            f"({listing}); available tasks: {sorted(found)}.{fix}"
        )
    if missing:
        log.warning("stream %r: skipping tasks missing from data_dir=%s (%s)", name or benchmark, root, listing)
    instructions = read_instructions(root)
    built = [
        _build(
            found[n],
            instructions,
            val_size,
            max_train,
            max_eval,
            split_seed,
            prompt_style,
            task_prefix,
            max_chars,
            cut_fraction,
        )
        for n in names
        if n in found
    ]
    meta = {
        "benchmark": benchmark,
        "order": order,
        "tasks": [t.name for t in built],
        "skipped": missing,
        "excluded": list(exclude or []),
        "data_dir": str(root),
    }
    return Stream(name=name or f"cl_{benchmark}", tasks=built, scenario=scenario, meta=meta)  # type: ignore[arg-type]
