"""Reading the ``CL_Benchmark`` folder of :mod:`lmas.data.cl_benchmark`: finding its task folders in the SAPT
(``Long_Sequence/``, ``SuperNI/``) and O-LoRA (``<family>/<Task>/``) layouts, and reading their split files,
``labels.json`` and ``instruction_config.json`` into rows, with errors naming the file and instance."""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV = "LMAS_CL_BENCHMARK"
SPLIT_FILES = ("train", "dev", "test")
UNLABELED = "-"  # GLUE's answer of an item without a gold label (classification files)
# the instruction family (key of instruction_config.json, O-LoRA's folder) of each Long_Sequence task
FAMILIES = {
    **dict.fromkeys(("agnews", "dbpedia", "yahoo"), "TC"),
    **dict.fromkeys(("amazon", "yelp", "imdb", "sst2"), "SC"),
    **dict.fromkeys(("mnli", "cb", "rte"), "NLI"),
    "qqp": "QQP",
    "boolq": "BoolQA",
    "copa": "COPA",
    "multirc": "MultiRC",
    "wic": "WiC",
}
ALIASES = {"boolqa": "boolq"}  # O-LoRA folder names (after canonical()) whose task has another name in SAPT's copy
EXPECTED = (
    "Long_Sequence/<task>/{train,dev,test}.json + labels.json or SuperNI/<task>/{train,dev,test}.json (SAPT), or "
    "<family>/<Task>/{train,dev,test}.json + labels.json (O-LoRA)"
)

Row = tuple[str, str, list[str]]  # (where, input, acceptable answers)


@dataclass(frozen=True)
class TaskDir:
    """One task folder: its lmas name, folder, layout (``long``, ``superni``, ``olora``) and instruction family."""

    name: str
    path: Path
    layout: str
    family: str | None

    @property
    def files(self) -> dict[str, Path]:
        """The split files present, by split name."""
        return {s: self.path / f"{s}.json" for s in SPLIT_FILES if (self.path / f"{s}.json").is_file()}


def canonical(folder: str) -> str:
    """The lmas task name of an O-LoRA task folder: lower case, letters and digits only, SAPT's spelling."""
    name = re.sub(r"[^a-z0-9]", "", folder.lower())
    return ALIASES.get(name, name)


def benchmark_root(data_dir: str | os.PathLike | None) -> Path:
    """``data_dir`` (or ``$LMAS_CL_BENCHMARK``) as an absolute folder; its ``CL_Benchmark/`` if it holds one."""
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get(ENV) or None
    if data_dir is None:
        raise ValueError(
            f"data_dir is not set: pass data_dir=/path/to/CL_Benchmark (stream.data_dir=... in a config) or set "
            f"the environment variable {ENV}; expected a folder with {EXPECTED}"
        )
    root = Path(data_dir).expanduser().absolute()
    if not root.is_dir():
        what = "is a file" if root.exists() else "does not exist"
        raise FileNotFoundError(f"data_dir={data_dir}: {root} {what}; expected a folder with {EXPECTED}")
    return root / "CL_Benchmark" if (root / "CL_Benchmark").is_dir() else root


def find_tasks(data_dir: str | os.PathLike | None = None) -> tuple[Path, dict[str, TaskDir], dict[str, Path]]:
    """``(root, tasks, incomplete)``: the task folders of ``data_dir`` with at least one split file, by name,
    and those with none (e.g. a folder holding only ``labels.json``)."""
    root = benchmark_root(data_dir)
    folders: list[tuple[Path, str]] = []
    for sub, layout in (("Long_Sequence", "long"), ("SuperNI", "superni")):
        if (root / sub).is_dir():
            folders += [(p, layout) for p in sorted((root / sub).iterdir()) if p.is_dir()]
    if not folders:  # O-LoRA: <family>/<Task>/
        for group in sorted(p for p in root.iterdir() if p.is_dir()):
            folders += [
                (p, "olora")
                for p in sorted(group.iterdir())
                if p.is_dir() and any((p / f"{s}.json").is_file() for s in (*SPLIT_FILES, "labels"))
            ]
    tasks: dict[str, TaskDir] = {}
    incomplete: dict[str, Path] = {}
    for folder, layout in folders:
        name = canonical(folder.name) if layout == "olora" else folder.name
        family = folder.parent.name if layout == "olora" else FAMILIES.get(name) if layout == "long" else None
        task = TaskDir(name, folder, layout, family)
        if name in tasks or name in incomplete:
            other = tasks[name].path if name in tasks else incomplete[name]
            raise ValueError(f"data_dir={root}: two folders give the task name {name!r}: {other} and {folder}")
        if task.files:
            tasks[name] = task
        else:
            incomplete[name] = folder
    if not tasks:
        seen = sorted(p.name for p in root.iterdir())[:12]
        raise FileNotFoundError(f"data_dir={root}: no task there; expected {EXPECTED}; found {seen}")
    return root, tasks, incomplete


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} line {err.lineno}: not valid JSON: {err.msg} (column {err.colno})") from None


def _string(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: {field!r} must be a non-empty string, got {value!r:.80}")
    return value


def read_split(path: Path, layout: str) -> tuple[str, list[Row]]:
    """``(definition, rows)`` of one split file; ValueError naming the file (and instance) for bad input."""
    data = _load_json(path)
    if layout == "olora":
        if not isinstance(data, list):
            raise ValueError(
                f'{path}: expected a JSON list of {{"sentence", "label"}} records (O-LoRA layout), '
                f"got a {type(data).__name__}"
            )
        records, definition, keys = data, "", ("sentence", "label")
    else:
        if not isinstance(data, dict) or not isinstance(data.get("Instances"), list):
            got = sorted(data)[:6] if isinstance(data, dict) else type(data).__name__
            raise ValueError(
                f"{path}: expected a JSON object with 'Definition' and an 'Instances' list (SAPT layout), got {got}"
            )
        records, keys = data["Instances"], ("input", "output")
        definition = data.get("Definition") or ""
        definition = definition[0] if isinstance(definition, list) and definition else definition
        if not isinstance(definition, str):
            raise ValueError(f"{path}: 'Definition' must be a string or a list of strings, got {definition!r:.80}")
    return definition.strip(), parse_records(records, str(path), keys, layout == "superni")


def parse_records(records: Any, source: str, keys: tuple[str, str], several: bool) -> list[Row]:
    """Rows of one split's records (dicts with ``keys`` = (input, answer)); ``several``: an answer may be a list
    of acceptable answers (SuperNI), and ``"-"`` is not an unlabeled mark. Errors name ``source`` and instance."""
    if not records:
        raise ValueError(f"{source}: no instances")
    rows: list[Row] = []
    for i, record in enumerate(records):
        where = f"{source} instance {i}"
        if not isinstance(record, dict) or any(k not in record for k in keys):
            raise ValueError(f"{where}: expected an object with {list(keys)}, got {record!r:.120}")
        text, out = _string(record[keys[0]], where, keys[0]), record[keys[1]]
        outs = out if several and isinstance(out, list) else [out]
        if not all(isinstance(o, str) for o in outs):
            raise ValueError(f"{where}: {keys[1]!r} must be a string or a list of strings, got {out!r:.80}")
        answers = [o.strip() for o in outs if o.strip() and (several or o.strip() != UNLABELED)]
        rows.append((where, text, answers))  # no answers: an unlabeled instance, dropped and counted
    return rows


def read_instructions(root: Path) -> dict[str, str]:
    """The first zero-shot instruction per family of ``root/instruction_config.json`` (empty if absent)."""
    path = root / "instruction_config.json"
    if not path.is_file():
        return {}
    data = _load_json(path)
    shape = 'expected {"<family>": [{"instruction_type": "zero-shot", "instruction": str}, ...], ...}'
    if not isinstance(data, dict):
        raise ValueError(f"{path}: {shape}")
    out = {}
    for family, entries in data.items():
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ValueError(f"{path}: family {family!r}: {shape}")
        zero = [e.get("instruction") for e in entries if e.get("instruction_type") == "zero-shot"]
        if zero:
            out[family] = _string(zero[0], f"{path} family {family!r}", "instruction")
    return out


def read_labels(task: TaskDir, pools: dict[str, list[Row]]) -> tuple[list[str], str | None]:
    """The label set (``labels.json``, checked against every answer) and a note when the file was replaced."""
    path = task.path / "labels.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"task {task.name!r}: {path}: no such file; a classification task folder needs "
            f"labels.json (a JSON list of its label strings) next to {sorted(task.files)} files"
        )
    labels = _load_json(path)
    if not isinstance(labels, list) or not labels or len(set(map(str, labels))) != len(labels):
        raise ValueError(f"{path}: expected a non-empty JSON list of distinct label strings, got {labels!r:.120}")
    labels = [_string(lab, str(path), "label").strip() for lab in labels]
    answers = {a for rows in pools.values() for _, _, outs in rows for a in outs}
    if not answers & set(labels):
        note = f"{path} lists {labels} but the instances answer {sorted(answers)}: the instances' answers are used"
        log.warning("task %r: %s", task.name, note)
        return sorted(answers), note
    for rows in pools.values():
        for where, _, outs in rows:
            if outs[0] not in labels:
                raise ValueError(f"{where}: answer {outs[0]!r} is not one of the labels {labels} of {path}")
    return labels, None
