"""Task builders over user data: JSONL files, CSV files and Hugging Face ``datasets``.

Every record goes through :func:`record_to_example`:

* ``classification`` / ``generation``: prompt = ``template`` filled with the record's fields plus ``prompt`` (the
  ``prompt_field`` value cut to ``max_chars``); answer = ``answer_field`` value, stripped.
* ``lm``: prompt ``""``, answer = the ``answer_field`` value cut to ``max_chars``; ``metric`` picks perplexity
  (the default) or an encoder agent's ``pseudo_perplexity`` / ``masked_accuracy``.

Splits: ``path`` (exact repeats of a prompt/answer pair kept once) is split by ``split_seed`` into test, val and
train (cut in that order, so growing ``n_train`` keeps the evaluation splits). ``val_path`` / ``test_path`` give a
split its own file instead; then it is the whole file, or a seeded sample of ``n_val`` / ``n_test`` records. Sizes:
an int is a count, a float in (0, 1) a fraction, ``None`` the default (10 % val, 10 % test, the rest train). For
classification, ``labels`` default to the sorted answers of the train split.

A file that does not exist (or is a folder) -> ``FileNotFoundError`` naming the option and the absolute path,
``task 'NAME': val_path=data/v.jsonl: no such file: /abs/data/v.jsonl`` (:func:`lmas.paths.require`; ``lmas-train``
reports it earlier, from the config check, with the full option path ``stream.tasks[i].val_path``). For
``hf_task`` the same holds for every ``data_files`` entry (a glob must match a file) and for a ``path`` written as
a path.

Bad input -> what happens. Every other error is a ``ValueError`` whose message starts with the place:
``<file> line N`` (1-based; for CSV the line where the row starts, the header being line 1),
``<dataset> split 'S' row I`` for ``hf_task``, or ``task 'NAME'``:

* bytes that are not UTF-8 -> error naming file and line; a JSONL line that is not valid JSON, or valid JSON but
  not an object -> error naming file and line. Blank lines are skipped (and still counted).
* CSV row with more or fewer values than the header has columns, a header that repeats a column, or a row the
  ``csv`` module cannot parse -> error naming file and line. Blank rows are skipped.
* record without the ``prompt_field`` / ``answer_field`` (absent or JSON ``null``), or without a
  field the ``template`` needs -> error naming file, line and field, listing the fields present.
* field that is a JSON object or list (not a string or number) -> error naming file, line and
  field; an answer that is empty after stripping -> error naming file, line and field.
* empty file (nothing but blank lines, or only a CSV header) -> error naming the file; a task whose train or test
  split ends up empty after splitting -> error naming the task, the source file and the split sizes.
* classification labels: with ``labels=None`` the label set is the train split's answers, so a
  val/test answer never seen in training -> error naming the task, split, labels and file (pass
  ``labels=[...]`` to keep it); with explicit ``labels`` an answer outside them -> error naming
  file, line and answer, while a label of the set that appears in val/test but never in train is
  kept (rank classification scores over the whole label set) and logged as a warning naming the
  task, split and labels (:class:`lmas.data.task.Task`).
* over-long examples (prompt + answer longer than ``data.max_length`` tokens) are handled when
  encoded (:class:`lmas.lm.encoding.PromptEncoder`): the prompt loses tokens from its start, the answer
  is kept whole, each case is counted (``PromptEncoder.truncated``, ``truncated_prompts`` in the
  results) and the first one is logged as a warning; an answer that alone does not fit ->
  error naming the example and ``data.max_length``; raw ``lm`` text longer than the window
  keeps its beginning (counted the same way). ``max_chars`` cuts texts earlier, at load time.
"""

from __future__ import annotations

import csv
import functools
import json
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from lmas import paths
from lmas.data.common import Size, fill_template, resolve_sizes, template_fields, truncate
from lmas.data.task import METRIC_OF_KIND, Example, Task

# (where, record): ``where`` names the file and line (or row) for error messages.
Located = tuple[str, Mapping[str, Any]]
Reader = Callable[[str | Path], Iterator[Located]]  # a file's records (read_jsonl, read_csv)


def _value(record: Mapping[str, Any], field: str, where: str) -> str:
    if field not in record or record[field] is None:
        present = sorted(k for k, v in record.items() if k is not None and v is not None)
        raise ValueError(f"{where}: missing field {field!r}; fields present: {present}")
    value = record[field]
    if isinstance(value, (dict, list, tuple)):
        raise ValueError(f"{where}: field {field!r} must be a string or number, got {type(value).__name__}")
    return str(value)


def record_to_example(
    record: Mapping[str, Any],
    where: str,
    kind: str,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    template: str = "{prompt}",
    max_chars: int | None = None,
) -> Example:
    """One record (a dict of fields) -> :class:`Example`; errors name ``where`` and the field."""
    answer = _value(record, answer_field, where).strip()
    if not answer:
        raise ValueError(f"{where}: field {answer_field!r} is empty")
    if kind == "lm":
        return Example("", truncate(answer, max_chars))
    values = {k: str(v) for k, v in record.items() if isinstance(k, str) and v is not None}
    if "prompt" in template_fields(template):
        values["prompt"] = truncate(_value(record, prompt_field, where).strip(), max_chars)
    return Example(fill_template(template, values, where), answer)


def _not_utf8(path: str | Path) -> ValueError:
    """The error for a file that does not decode as UTF-8, naming the line of the first bad byte."""
    data = Path(path).read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        return ValueError(f"{path} line {line}: not valid UTF-8 ({err.reason} at byte {err.start}); save it as UTF-8")
    return ValueError(f"{path}: not valid UTF-8")


def read_jsonl(path: str | Path) -> Iterator[Located]:
    """Records of a JSON Lines file (blank lines skipped) with ``"<file> line N"`` locations."""
    with open(paths.require(path, paths.FILE, "path"), encoding="utf-8-sig") as fh:
        try:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                where = f"{path} line {lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{where}: not valid JSON: {err.msg} (column {err.colno})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
                yield where, record
        except UnicodeDecodeError:
            raise _not_utf8(path) from None


def read_csv(path: str | Path, delimiter: str = ",") -> Iterator[Located]:
    """Records of a CSV file with a header row, with ``"<file> line N"`` locations.

    N is the line where the row starts (the header is line 1; a quoted value may span lines).
    Blank rows are skipped; a row with more or fewer values than the header has columns raises.
    """
    with open(paths.require(path, paths.FILE, "path"), encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        header: list[str] | None = None
        header_line = end = 0
        try:
            for row in reader:
                start, end = end + 1, reader.line_num
                if not any(value.strip() for value in row):
                    continue  # a blank row
                if header is None:
                    header, header_line = row, start
                    repeated = sorted({c for c in header if header.count(c) > 1})
                    if repeated:
                        raise ValueError(f"{path} line {start}: the header repeats column(s) {repeated}")
                    continue
                where = f"{path} line {start}"
                if len(row) != len(header):
                    more = "more" if len(row) > len(header) else "fewer"
                    raise ValueError(
                        f"{where}: {len(row)} values, {more} than the {len(header)} columns of the header "
                        f"(line {header_line}) {header} (wrong delimiter {delimiter!r}, or a value with "
                        f"{delimiter!r} or a line break that is not quoted?)"
                    )
                yield where, dict(zip(header, row, strict=True))
        except csv.Error as err:
            raise ValueError(f"{path} line {reader.line_num}: malformed CSV: {err}") from None
        except UnicodeDecodeError:
            raise _not_utf8(path) from None


def _examples(rows: Iterable[Located], source: str, **conv: Any) -> list[tuple[str, Example]]:
    out = [(where, record_to_example(record, where, **conv)) for where, record in rows]
    if not out:
        raise ValueError(f"{source}: no records (empty file or only a header)")
    return out


def _check_kind(name: str, kind: str) -> None:
    if kind not in METRIC_OF_KIND:
        raise ValueError(f"task {name!r}: kind={kind!r} is not one of {sorted(METRIC_OF_KIND)}")


def _sample(rows: list, n: Size, seed: int, name: str) -> list:
    """All of ``rows`` (``None``) or a seeded sample of ``n`` of them, in their original order."""
    if n is None:
        return list(rows)
    count = resolve_sizes(len(rows), 0, 0, n, name)[2]
    keep = sorted(random.Random(seed).sample(range(len(rows)), count))
    return [rows[i] for i in keep]


def build_file_task(
    name: str,
    kind: str,
    train_rows: list[tuple[str, Example]],
    source: str,
    val_rows: list[tuple[str, Example]] | None = None,
    test_rows: list[tuple[str, Example]] | None = None,
    val_source: str | None = None,
    test_source: str | None = None,
    labels: list[str] | None = None,
    n_train: Size = None,
    n_val: Size = None,
    n_test: Size = None,
    split_seed: int = 0,
    meta: dict | None = None,
    metric: str = "",
) -> Task:
    """Cut the splits (see module doc), check the labels and build the :class:`Task` (``metric``: "" = the kind's)."""
    _check_kind(name, kind)
    seen: set[Example] = set()
    pool = []
    for where, ex in train_rows:  # keep the first of exact repeats, so splits stay disjoint
        if ex not in seen:
            seen.add(ex)
            pool.append((where, ex))
    duplicates = len(train_rows) - len(pool)
    random.Random(split_seed).shuffle(pool)
    sizes = resolve_sizes(
        len(pool), n_train, 0 if val_rows is not None else n_val, 0 if test_rows is not None else n_test, name
    )
    n_tr, n_va, n_te = sizes
    test = _sample(test_rows, n_test, split_seed, name) if test_rows is not None else pool[:n_te]
    val = _sample(val_rows, n_val, split_seed + 1, name) if val_rows is not None else pool[n_te : n_te + n_va]
    train = pool[n_te + n_va : n_te + n_va + n_tr]
    for split, rows, src in (("train", train, source), ("test", test, test_source or source)):
        if not rows:
            raise ValueError(
                f"task {name!r}: the {split} split (from {src}) is empty after splitting: {len(pool)} distinct "
                f"records in {source}, n_train={n_train}, n_val={n_val}, n_test={n_test} -> "
                f"{len(train)} train, {len(val)} val, {len(test)} test"
            )
    if kind == "classification":
        train_labels = sorted({ex.answer for _, ex in train})
        if labels is None:
            labels = train_labels
            for split, rows, src in (("val", val, val_source or source), ("test", test, test_source or source)):
                unseen = sorted({ex.answer for _, ex in rows} - set(labels))
                if unseen:
                    raise ValueError(
                        f"task {name!r}: {split} labels {unseen} (from {src}) never appear in the "
                        f"train split (from {source}); train labels: {labels} (pass `labels` with every "
                        f"label to score them anyway)"
                    )
        else:
            labels = [str(lab) for lab in labels]
            for where, ex in train + val + test:
                if ex.answer not in labels:
                    raise ValueError(f"{where}: answer {ex.answer!r} is not one of labels {labels}")
    return Task(
        name=name,
        kind=kind,  # type: ignore[arg-type]
        train=[ex for _, ex in train],
        val=[ex for _, ex in val],
        test=[ex for _, ex in test],
        labels=labels if kind == "classification" else None,
        source=source,
        meta={"split_seed": split_seed, "available": len(pool), "duplicates_dropped": duplicates, **(meta or {})},
        metric=metric,
    )


def _split_options(labels: list[str] | None, n_train: Size, n_val: Size, n_test: Size, seed: int, metric: str) -> dict:
    sizes = {"n_train": n_train, "n_val": n_val, "n_test": n_test}
    return {"labels": labels, **sizes, "split_seed": seed, "metric": metric}


def _file_task(
    name: str,
    kind: str,
    reader: Reader,
    path: str | Path,
    val_path: str | Path | None,
    test_path: str | Path | None,
    conv: dict,
    **split: Any,
) -> Task:
    _check_kind(name, kind)
    for option, value in (("path", path), ("val_path", val_path), ("test_path", test_path)):
        if value is not None or option == "path":
            paths.require(value, paths.FILE, f"task {name!r}: {option}")
    rows = {p: _examples(reader(p), str(p), kind=kind, **conv) for p in (path, val_path, test_path) if p is not None}
    return build_file_task(
        name,
        kind,
        rows[path],
        str(path),
        val_rows=None if val_path is None else rows[val_path],
        test_rows=None if test_path is None else rows[test_path],
        val_source=None if val_path is None else str(val_path),
        test_source=None if test_path is None else str(test_path),
        **split,
    )


def jsonl_task(
    name: str,
    path: str | Path,
    kind: str,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    labels: list[str] | None = None,
    template: str = "{prompt}",
    val_path: str | Path | None = None,
    test_path: str | Path | None = None,
    n_train: Size = None,
    n_val: Size = None,
    n_test: Size = None,
    split_seed: int = 0,
    max_chars: int | None = None,
    metric: str = "",
) -> Task:
    """Task from a JSON Lines file (one object per line); see the module doc for fields and splits."""
    conv = {"prompt_field": prompt_field, "answer_field": answer_field, "template": template, "max_chars": max_chars}
    split = _split_options(labels, n_train, n_val, n_test, split_seed, metric)
    return _file_task(name, kind, read_jsonl, path, val_path, test_path, conv, **split, meta={"format": "jsonl"})


def csv_task(
    name: str,
    path: str | Path,
    kind: str,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    labels: list[str] | None = None,
    template: str = "{prompt}",
    val_path: str | Path | None = None,
    test_path: str | Path | None = None,
    n_train: Size = None,
    n_val: Size = None,
    n_test: Size = None,
    split_seed: int = 0,
    max_chars: int | None = None,
    delimiter: str = ",",
    metric: str = "",
) -> Task:
    """Task from a CSV file with a header row (``delimiter``: ``","``, ``"\\t"``, ...)."""
    conv = {"prompt_field": prompt_field, "answer_field": answer_field, "template": template, "max_chars": max_chars}
    split = _split_options(labels, n_train, n_val, n_test, split_seed, metric)
    reader = functools.partial(read_csv, delimiter=delimiter)
    return _file_task(name, kind, reader, path, val_path, test_path, conv, **split, meta={"format": "csv"})


def hf_task(
    name: str,
    path: str,
    kind: str,
    config_name: str | None = None,
    data_files: Any = None,
    split: str = "train",
    val_split: str | None = None,
    test_split: str | None = None,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    labels: list[str] | None = None,
    template: str = "{prompt}",
    n_train: Size = None,
    n_val: Size = None,
    n_test: Size = None,
    split_seed: int = 0,
    max_chars: int | None = None,
    cache_dir: str | None = None,
    metric: str = "",
) -> Task:
    """Task from ``datasets.load_dataset(path, config_name, data_files=..., split=...)``.

    ``split`` is the pool cut into train/val/test; ``val_split`` / ``test_split`` name dataset
    splits to use instead. Works offline on local files, e.g. ``hf_task(name, "json",
    "generation", data_files="data.jsonl")``.
    """
    _check_kind(name, kind)
    missing = paths.node_problems("lmas.data.files.hf_task", {"path": path, "data_files": data_files}.get)
    if missing:
        option, value, what = missing[0]
        raise FileNotFoundError(f"task {name!r}: {option}={value}: {what}")
    import datasets  # heavy and optional: imported only here

    label = path if data_files is None else f"{path}:{data_files}"

    def rows(which: str) -> Iterator[Located]:
        ds = datasets.load_dataset(path, config_name, data_files=data_files, split=which, cache_dir=cache_dir)
        feature = (ds.features or {}).get(answer_field)
        names = feature.names if isinstance(feature, datasets.ClassLabel) else None
        for i, record in enumerate(ds):
            value = record.get(answer_field)
            if names is not None and isinstance(value, int) and 0 <= value < len(names):
                record = {**record, answer_field: names[value]}  # ClassLabel id -> label name
            yield f"{label} split {which!r} row {i}", record

    conv = {"prompt_field": prompt_field, "answer_field": answer_field, "template": template, "max_chars": max_chars}
    loaded = {
        s: _examples(rows(s), f"{label} split {s!r}", kind=kind, **conv) for s in (split, val_split, test_split) if s
    }
    return build_file_task(
        name,
        kind,
        loaded[split],
        f"{label} split {split!r}",
        val_rows=loaded.get(val_split) if val_split else None,
        test_rows=loaded.get(test_split) if test_split else None,
        val_source=val_split and f"{label} split {val_split!r}",
        test_source=test_split and f"{label} split {test_split!r}",
        meta={"format": "hf", "config_name": config_name, "split": split},
        **_split_options(labels, n_train, n_val, n_test, split_seed, metric),
    )
