"""The ``CL_Benchmark`` tasks from Hugging Face ``datasets`` instead of a local folder (``hf_dataset``), read into
the same rows as :mod:`lmas.data.cl_layouts` so that :mod:`lmas.data.cl_benchmark` builds the same tasks.

``hf_dataset`` names where every task lives, by the lmas task name (``sst2``, ``task1572_samsum_summary``):

* with ``{task}`` in it, one dataset per task: ``datasets.load_dataset(hf_dataset.format(task=name))``, e.g.
  ``Lots-of-LoRAs/{task}`` (one hub repository per Super-NaturalInstructions task, columns ``input``, ``output``
  (a list of answers), ``id``; splits train/valid/test) or a local ``/data/cl/{task}`` folder of
  ``train.jsonl`` / ``test.jsonl`` files;
* otherwise one dataset with a configuration per task: ``datasets.load_dataset(hf_dataset, name)``.

Splits: ``train``; ``test``; ``validation`` / ``valid`` / ``dev`` is read only where there is no ``test`` (it is
the test pool then, as ``dev.json`` is for a folder). Columns (the first pair found): ``input`` + ``output`` (SAPT's
instances; ``output`` a string or a list of acceptable answers), ``sentence`` + ``label`` (O-LoRA's records),
``inputs`` + ``targets`` (the natural-instructions exports), ``text`` + ``label`` (most classification datasets);
a ``ClassLabel`` answer column is read as its label names. An optional ``definition`` (or ``Definition``) column
gives the task's instruction. A classification task's label set is its ``ClassLabel`` names, else the sorted
answers of all its splits (there is no ``labels.json``; ``instruction_config.json`` neither, so O-LoRA-style
prompts carry the definition column's instruction, or none).

A dataset that cannot be loaded is an error naming ``hf_dataset``, the task and the cause; a split without one of
those column pairs an error naming the dataset, split, its columns and the pairs expected.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lmas.data.cl_layouts import FAMILIES, Row, TaskDir, parse_records

COLUMNS = (("input", "output"), ("sentence", "label"), ("inputs", "targets"), ("text", "label"))
DEV_SPLITS = ("validation", "valid", "dev")
EXPECTED_COLUMNS = " or ".join("+".join(pair) for pair in COLUMNS)
Read = dict[str, tuple[str, list[Row]]]  # split -> (definition, rows), as read_split gives for a folder


def is_superni(name: str) -> bool:
    """Whether a task name is a Super-NaturalInstructions one (``task<digits>_...``): a generation task."""
    return re.match(r"task\d+_", name) is not None


def hub_task_dir(dataset: str, name: str, layout: str | None = None) -> TaskDir:
    """The :class:`TaskDir` standing for task ``name`` of ``dataset`` (its path names it in messages and
    ``Task.source``; nothing is read from it). ``layout``: ``superni`` or ``long``, from the name when omitted."""
    layout = layout or ("superni" if is_superni(name) else "long")
    path = Path(dataset.format(task=name)) if "{task}" in dataset else Path(dataset) / name
    return TaskDir(name, path, layout, FAMILIES.get(name))


def load(dataset: str, name: str, cache_dir: str | None = None) -> Any:
    """The ``DatasetDict`` of task ``name`` (module docstring); ValueError naming the dataset and task."""
    import datasets  # heavy and optional: imported only here

    target, config = (dataset.format(task=name), None) if "{task}" in dataset else (dataset, name)
    try:
        loaded = datasets.load_dataset(target, config, cache_dir=cache_dir)
    except Exception as err:  # the hub, a config or a file not found, offline: all mean "not loadable here"
        raise ValueError(
            f"hf_dataset={dataset!r}: task {name!r} could not be loaded "
            f"(datasets.load_dataset({target!r}{'' if config is None else f', {config!r}'})): "
            f"{type(err).__name__}: {str(err)[:300]}"
        ) from err
    if not isinstance(loaded, datasets.DatasetDict):
        raise ValueError(f"hf_dataset={dataset!r}: task {name!r}: expected a dataset with splits, got {type(loaded)}")
    return loaded


def read_hub(dataset: str, task: TaskDir, cache_dir: str | None = None) -> tuple[Read, list[str] | None]:
    """``(read, label_names)``: the task's splits as rows (the ``train`` / ``test`` / ``dev`` keys of a folder's
    files) and the ``ClassLabel`` names of its answer column (None without one)."""
    import datasets

    splits = load(dataset, task.name, cache_dir)
    dev = next((s for s in DEV_SPLITS if s in splits), None)
    wanted = {"train": "train" if "train" in splits else None, "test": "test" if "test" in splits else None}
    if wanted["test"] is None and dev is not None:
        wanted["dev"] = dev
    found = {split: hf for split, hf in wanted.items() if hf is not None}
    if "train" not in found and not ({"test", "dev"} & set(found)):
        raise ValueError(
            f"hf_dataset={dataset!r}: task {task.name!r} has the splits {sorted(splits)}; expected train and/or "
            f"test (or one of {list(DEV_SPLITS)})"
        )
    read: Read = {}
    names: list[str] | None = None
    for split, hf in found.items():
        ds = splits[hf]
        where = f"hf_dataset={dataset!r} task {task.name!r} split {hf!r}"
        columns = list(ds.column_names)
        keys = next((pair for pair in COLUMNS if set(pair) <= set(columns)), None)
        if keys is None:
            raise ValueError(f"{where}: columns {columns}; expected the columns {EXPECTED_COLUMNS}")
        feature = (ds.features or {}).get(keys[1])
        if isinstance(feature, datasets.ClassLabel):
            names = list(feature.names)
        records = [_named(r, keys[1], names if isinstance(feature, datasets.ClassLabel) else None) for r in ds]
        rows = parse_records(records, where, keys, task.layout == "superni")
        read[split] = (_definition(records, where), rows)
    return read, names


def _named(record: dict, field: str, names: list[str] | None) -> dict:
    """A record with its ClassLabel id replaced by the label name."""
    value = record.get(field)
    if names is not None and isinstance(value, int) and 0 <= value < len(names):
        return {**record, field: names[value]}
    return record


def _definition(records: list[dict], where: str) -> str:
    """The task's instruction: the first row's ``definition`` / ``Definition`` value (a string or a list)."""
    if not records:
        return ""
    first = records[0]
    value = first.get("definition", first.get("Definition")) or ""
    value = value[0] if isinstance(value, list) and value else value
    if not isinstance(value, str):
        raise ValueError(f"{where} row 0: 'definition' must be a string or a list of strings, got {value!r:.80}")
    return value.strip()


def hub_labels(task: TaskDir, names: list[str] | None, pools: dict[str, list[Row]]) -> tuple[list[str], str | None]:
    """The label set of a classification task read from a dataset: its ClassLabel names, else its answers sorted
    (with a note: no ``labels.json`` on the hub). An answer outside the ClassLabel names is an error."""
    answers = {outs[0] for rows in pools.values() for _, _, outs in rows}
    if names is None:
        return sorted(answers), f"{task.path}: no ClassLabel answer column; the labels are the answers of all splits"
    for rows in pools.values():
        for where, _, outs in rows:
            if outs[0] not in names:
                raise ValueError(f"{where}: answer {outs[0]!r} is not one of the ClassLabel names {names}")
    return names, None
