"""The ``CL_Benchmark`` of the LLM continual-learning papers (O-LoRA, SAPT, N-LoRA, GainLoRA) as lmas tasks and streams.

Layouts read (by :mod:`lmas.data.cl_layouts`) from ``data_dir`` (default: the environment variable
``LMAS_CL_BENCHMARK``; a folder that holds ``CL_Benchmark/`` is accepted too):

* SAPT: ``Long_Sequence/<task>/{train,dev,test}.json`` + ``labels.json`` (classification) and
  ``SuperNI/<task>/{train,dev,test}.json`` (generation). Each file is one object
  ``{"Definition": [str], "Instances": [{"input": str, "output": str | [str, ...]}, ...]}``.
* O-LoRA: ``<family>/<Task>/{train,dev,test}.json`` + ``labels.json``, each file a list of
  ``{"sentence": str, "label": str}``; the family folders are TC, SC, NLI, QQP, BoolQA, COPA, MultiRC, WiC. A task's
  name is its folder name lower-cased without punctuation (``SST-2`` -> ``sst2``; ``BoolQA`` -> ``boolq``).
* Hugging Face ``datasets`` (``hf_dataset`` instead of ``data_dir``): the same tasks by the same names, read by
  :mod:`lmas.data.cl_hub` (its docstring: where each task is looked up, the splits and columns expected).

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

Scoring (``classification_scoring``): ``rank`` (default) scores a classification task by rank classification over
its labels (the highest log-likelihood label after the prompt; a model cannot answer outside the label set);
``generate`` scores it as the papers do, by the greedy answer's exact match with the label (cut at the first
newline, normalised as :func:`lmas.evaluation.scoring.normalise_answer`): the task becomes a ``generation`` task
with metric ``exact_match``, its labels still listed in the prompt and kept in ``Task.meta["class_labels"]``, so an
answer that is no label at all scores 0 (a loss of the answer format counts, as in the papers). SuperNI tasks are
scored by ``generation_metric``.

Data quirks handled: instances answered ``"-"`` (MNLI's items without a gold label) or with no non-empty answer
(six of SuperNI's reddit_tifu train instances) are dropped and counted (``meta["unlabeled_dropped"]``); a
``labels.json`` that shares no label with the instances (SAPT's qqp lists False/True, its instances answer no/yes)
is replaced by the instances' answers, with a warning and ``meta["labels_note"]``; any other answer outside
``labels.json`` is an error naming the file and instance. Train records whose input repeats, or also occurs in the
test pool, are dropped and counted (``meta["train_dropped_repeats"]``).
"""

from __future__ import annotations

import functools
import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lmas.data import cl_hub
from lmas.data.cl_layouts import SPLIT_FILES, Row, TaskDir, find_tasks, read_instructions, read_labels, read_split
from lmas.data.cl_orders import ORDERS
from lmas.data.common import truncate
from lmas.data.stream import Stream
from lmas.data.task import Example, Task, TaskKind

log = logging.getLogger(__name__)

CUT_SEED = 0  # the seed of the cut that makes a missing split (never split_seed: the test set stays fixed)
TEST_SEED = 0  # the seed of the shuffle before max_eval
PromptStyle = Literal["olora", "sapt"]
GENERATION_METRICS = ("rouge_l", "exact_match")
CLASSIFICATION_SCORING = ("rank", "generate")


@dataclass
class Source:
    """One task's data as read: its folder (or hub stand-in), splits (``train``/``test``/``dev`` -> definition,
    rows), how its label set is found from the labelled pools, and the split names listed in ``meta["files"]``."""

    task: TaskDir
    read: dict[str, tuple[str, list[Row]]]
    labels_of: Callable[[dict[str, list[Row]]], tuple[list[str], str | None]]
    files: list[str]
    unit: str = "{}.json"  # how the notes name a split: a file, or a dataset split


def _from_dir(task: TaskDir) -> Source:
    files = task.files
    read = {s: read_split(path, task.layout) for s, path in files.items() if s != "dev" or "test" not in files}
    return Source(task, read, functools.partial(read_labels, task), sorted(files))


def _from_hub(dataset: str, task: TaskDir, cache_dir: str | None) -> Source:
    read, names = cl_hub.read_hub(dataset, task, cache_dir)
    return Source(task, read, functools.partial(cl_hub.hub_labels, task, names), sorted(read), "split {!r}")


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


@dataclass
class Options:
    """The per-task options of :func:`cl_task` / :func:`cl_stream` (module doc), checked by :meth:`check`."""

    val_size: int = 50
    max_train: int | None = None
    max_eval: int | None = None
    split_seed: int = 0
    prompt_style: PromptStyle = "olora"
    task_prefix: bool = True
    max_chars: int | None = None
    cut_fraction: float = 0.25
    generation_metric: str = "rouge_l"
    classification_scoring: str = "rank"

    def check(self) -> None:
        def count(v: Any, lo: int) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= lo

        cut, cap = self.cut_fraction, "null (all) or an integer >= 1"
        for option, value, ok, allowed in (
            ("val_size", self.val_size, count(self.val_size, 0), "an integer >= 0"),
            ("max_train", self.max_train, self.max_train is None or count(self.max_train, 1), cap),
            ("max_eval", self.max_eval, self.max_eval is None or count(self.max_eval, 1), cap),
            ("prompt_style", self.prompt_style, self.prompt_style in ("olora", "sapt"), "olora or sapt"),
            ("cut_fraction", cut, isinstance(cut, float) and 0 < cut < 1, "a number in (0, 1)"),
            (
                "generation_metric",
                self.generation_metric,
                self.generation_metric in GENERATION_METRICS,
                "rouge_l or exact_match",
            ),
            (
                "classification_scoring",
                self.classification_scoring,
                self.classification_scoring in CLASSIFICATION_SCORING,
                "rank or generate",
            ),
        ):
            if not ok:
                raise ValueError(f"{option}={value!r}: expected {allowed}")


def _options(options: dict[str, Any], where: str) -> Options:
    known = set(Options.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{where}: unknown options {unknown}; the task options are {sorted(known)}")
    opts = Options(**options)
    opts.check()
    return opts


def cl_task(
    name: str,
    data_dir: str | os.PathLike | None = None,
    hf_dataset: str | None = None,
    cache_dir: str | None = None,
    **options: Any,
) -> Task:
    """One ``CL_Benchmark`` task of ``data_dir``, or of the Hugging Face dataset(s) ``hf_dataset``
    (:mod:`lmas.data.cl_hub`); ``options`` are :class:`Options` (module doc: splits, prompts, meta)."""
    opts = _options(options, f"cl_task({name!r})")
    if hf_dataset is not None:
        return _build(_from_hub(hf_dataset, cl_hub.hub_task_dir(hf_dataset, name), cache_dir), {}, opts)
    root, tasks, incomplete = find_tasks(data_dir)
    if name not in tasks:
        why = (
            f"its folder {incomplete[name]} has no {'/'.join(SPLIT_FILES)}.json"
            if name in incomplete
            else "no such task"
        )
        raise ValueError(f"task {name!r} is not in data_dir={root}: {why}; available tasks: {sorted(tasks)}")
    return _build(_from_dir(tasks[name]), read_instructions(root), opts)


def _build(source: Source, instructions: dict[str, str], opts: Options) -> Task:
    task, read, unit = source.task, source.read, source.unit.format
    definition = next(d for d, _ in read.values())
    pools = {split: [r for r in rows if r[2]] for split, (_, rows) in read.items()}
    unlabeled = sum(len(rows) for _, rows in read.values()) - sum(map(len, pools.values()))
    kind: TaskKind = "generation" if task.layout == "superni" else "classification"
    labels, labels_note = source.labels_of(pools) if kind == "classification" else (None, None)
    test_from = "test" if "test" in pools else "dev" if "dev" in pools else None
    note = None
    if "train" in pools and test_from:
        train_pool, test_pool = pools["train"], pools[test_from]
    elif "train" in pools:
        train_pool, test_pool = _cut(pools["train"], opts.cut_fraction)
        note = (
            f"no {unit('dev')}/{unit('test')}: the test split is a fixed-seed cut (seed {CUT_SEED}) of "
            f"{len(test_pool)} of the {len(pools['train'])} records of {unit('train')}, the rest is the train pool"
        )
    else:
        assert test_from is not None  # find_tasks keeps folders with a split file only; read_hub checks it
        test_pool, train_pool = _cut(pools[test_from], opts.cut_fraction)
        note = (
            f"no {unit('train')}: the train pool is a fixed-seed cut (seed {CUT_SEED}) of {len(train_pool)} of the "
            f"{len(pools[test_from])} records of {unit(test_from)}, the rest is the test pool"
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
    random.Random(opts.split_seed).shuffle(train_rows)
    if opts.val_size >= len(train_rows):
        raise ValueError(
            f"task {task.name!r}: val_size={opts.val_size} leaves no training examples: the train pool "
            f"of {task.path} has {len(train_rows)} records"
        )
    val_rows, train_rows = train_rows[: opts.val_size], train_rows[opts.val_size :][: opts.max_train]
    test_rows = list(test_pool)
    random.Random(TEST_SEED).shuffle(test_rows)
    test_rows, val_rows = test_rows[: opts.max_eval], val_rows[: opts.max_eval]
    instruction = instructions.get(task.family or "")
    style, prefix = opts.prompt_style, opts.task_prefix

    def examples(rows: Sequence[Row]) -> list[Example]:
        return [
            Example(
                _prompt(task, truncate(text, opts.max_chars), definition, labels, instruction, style, prefix),
                outs[0],
                tuple(outs) if len(outs) > 1 else (),
            )
            for _, text, outs in rows
        ]

    meta: dict[str, Any] = {
        "benchmark_layout": task.layout,
        "family": task.family,
        "files": source.files,
        "split_seed": opts.split_seed,
        "val_size": opts.val_size,
        "available": {"train": len(train_pool), "test": len(test_pool)},
        "split_note": note,
        "labels_note": labels_note,
        "unlabeled_dropped": unlabeled,
        "train_dropped_repeats": dropped,
        "prompt_style": "sapt" if task.layout == "superni" else style,
    }
    if kind == "generation":
        meta["answers"] = {"val": [outs for _, _, outs in val_rows], "test": [outs for _, _, outs in test_rows]}
    generated = kind == "classification" and opts.classification_scoring == "generate"
    if generated:  # the papers' scoring: the label set stays in the prompt, the model must write the label
        meta["class_labels"] = labels
        meta["scoring_note"] = "classification_scoring=generate: greedy answer, exact match with the label"
    return Task(
        name=task.name,
        kind="generation" if generated else kind,
        train=examples(train_rows),
        val=examples(val_rows),
        test=examples(test_rows),
        labels=None if generated else labels,
        source=str(task.path),
        meta=meta,
        metric="exact_match" if generated else opts.generation_metric if kind == "generation" else "",
    )


def _names(benchmark: str, order: int | None, tasks: list[str] | None, exclude: list[str] | None) -> list[str]:
    """The stream's task names: a published order or ``tasks``, less ``exclude`` (checked, errors name them)."""
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
    return [n for n in names if n not in (exclude or [])]


def cl_stream(
    benchmark: str,
    order: int | None = None,
    tasks: list[str] | None = None,
    exclude: list[str] | None = None,
    skip_missing: bool = False,
    data_dir: str | os.PathLike | None = None,
    name: str | None = None,
    scenario: str = "task",
    hf_dataset: str | None = None,
    cache_dir: str | None = None,
    **options: Any,
) -> Stream:
    """A stream of ``CL_Benchmark`` tasks in a published order (``order``) or in the order of ``tasks``.

    ``exclude`` drops named tasks of the order; ``skip_missing`` drops (with a warning, listed in
    ``Stream.meta["skipped"]``) the tasks of the benchmark that ``data_dir`` (or ``hf_dataset``) lacks, which are
    an error otherwise. ``hf_dataset`` reads the tasks from Hugging Face datasets instead of ``data_dir``
    (:mod:`lmas.data.cl_hub`; ``cache_dir`` is ``datasets``'). ``options`` are :class:`Options`, applied to every
    task. With ``data_dir``, every check runs before any task is read.
    """
    names = _names(benchmark, order, tasks, exclude)
    label = name or benchmark
    opts = _options(options, f"stream {label!r}")
    published = {t for o in ORDERS[benchmark].values() for t in o}
    if hf_dataset is not None:
        layout = "superni" if benchmark == "superni" else "long"
        sources, why = [], {}
        for n in names:
            try:
                sources.append(_from_hub(hf_dataset, cl_hub.hub_task_dir(hf_dataset, n, layout), cache_dir))
            except ValueError as err:
                if not skip_missing or "could not be loaded" not in str(err):
                    raise
                why[n] = str(err)
        where, instructions, missing, data_root = f"hf_dataset={hf_dataset!r}", {}, list(why), None
        listing = "; ".join(why.values())
    else:
        root, found, incomplete = find_tasks(data_dir)
        missing = [n for n in names if n not in found]
        reasons = {
            n: f"{incomplete[n]} has no {'/'.join(SPLIT_FILES)}.json" if n in incomplete else "no folder"
            for n in missing
        }
        listing = "; ".join(f"{n}: {w}" for n, w in reasons.items())
        strangers = [n for n in missing if n not in published]
        if strangers or (missing and not skip_missing):
            fix = (
                ""
                if strangers
                else " Drop them with skip_missing=true (recorded in the stream's meta) or exclude=[...]."
            )
            raise ValueError(
                f"stream {label!r}: tasks {strangers or missing} are not in data_dir={root} "
                f"({listing}); available tasks: {sorted(found)}.{fix}"
            )
        where, instructions, data_root = f"data_dir={root}", read_instructions(root), str(root)
        sources = [_from_dir(found[n]) for n in names if n in found]
    if missing:
        log.warning("stream %r: skipping tasks missing from %s (%s)", label, where, listing)
    built = [_build(source, instructions, opts) for source in sources]
    if not built:
        raise ValueError(f"stream {label!r}: none of the tasks {names} could be read from {where} ({listing})")
    meta = {
        "benchmark": benchmark,
        "order": order,
        "tasks": [t.name for t in built],
        "skipped": missing,
        "excluded": list(exclude or []),
        "data_dir": data_root,
        "hf_dataset": hf_dataset,
    }
    return Stream(name=name or f"cl_{benchmark}", tasks=built, scenario=scenario, meta=meta)  # type: ignore[arg-type]
