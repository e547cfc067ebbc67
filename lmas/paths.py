"""Local files and folders that a config names: checked before anything is loaded, named in every error.

A missing file is an error naming the option that points at it, its value and the absolute path:

    stream.tasks[1].path=data/qa.jsonl: no such file: /home/me/exp/data/qa.jsonl

:func:`problems` gives these lines to the config check (:func:`lmas.config.validate`, before the
model loads); the builders call :func:`require` themselves, so a call from Python says the same
(``task 'qa': path=...``). Relative paths are taken from the current directory (lmas-train does
not change it).

Which options are paths (:data:`PATH_OPTIONS`, by the function or class a ``_target_`` names):

=============================================  ==============================  ===========================
target                                          option                          must be
=============================================  ==============================  ===========================
``lmas.data.files.jsonl_task`` / ``csv_task``  ``path``, ``val_path``,         a file
                                                ``test_path``
``lmas.data.files.hf_task``                    ``data_files`` (a path, a list  files; a glob matches one
                                                or ``{split: path(s)}``)        at least (relative to
                                                                                ``path`` if a folder)
``lmas.data.files.hf_task``                    ``path``, written as a path     a file or folder
``lmas.models.providers.hf``                   ``name_or_path``, as a path     a model folder
``lmas.distill.encoder_teacher.EncoderTeacher`` ``path``                       a model folder
=============================================  ==============================  ===========================

"Written as a path": absolute, starting with ``.`` or ``~``, with two or more ``/`` (a hub id has
one at most), or ending in a data file suffix; other values of these options may be hub ids or
``datasets`` builder names and are left to the loader. A model folder holds ``config.json``.
``paths.output_dir`` and ``paths.cache_dir`` must not be existing files (they are folders lmas makes).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

FILE, FILES, ANY, MODEL = "file", "files", "file or folder", "model folder"
_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".txt", ".parquet", ".arrow", ".py")
_TASK_FILES = {"path": FILE, "val_path": FILE, "test_path": FILE}
PATH_OPTIONS: dict[str, dict[str, str]] = {
    "lmas.data.files.jsonl_task": _TASK_FILES,
    "lmas.data.files.csv_task": _TASK_FILES,
    "lmas.data.files.hf_task": {"data_files": FILES, "path": ANY},
    "lmas.models.providers.hf": {"name_or_path": MODEL},
    "lmas.distill.encoder_teacher.EncoderTeacher": {"path": MODEL},
}
_ALWAYS_LOCAL = {("lmas.distill.encoder_teacher.EncoderTeacher", "path")}  # never a hub id


def written_as_path(value: str) -> bool:
    """True if ``value`` can only mean a local path (not a hub id or a ``datasets`` builder name)."""
    return (
        os.path.isabs(value) or value.startswith((".", "~")) or value.count("/") >= 2 or value.endswith(_DATA_SUFFIXES)
    )


def absolute(value: str | os.PathLike, base: Path | None = None) -> Path:
    """``value`` with ``~`` expanded, made absolute against ``base`` (default: the current directory)."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(os.path.abspath((base or Path.cwd()) / path))


def problem(value: Any, kind: str, base: Path | None = None) -> str | None:
    """What is wrong with ``value`` as a ``kind`` (:data:`FILE`, :data:`ANY`, :data:`MODEL`), or None."""
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        return f"expected a path to a {kind}"
    path = absolute(value, base)
    if glob.has_magic(str(value)):
        return None if glob.glob(str(path), recursive=True) else f"no file matches {path}"
    if not path.exists():
        what = "folder" if kind == MODEL else "file" if kind == FILE else "file or folder"
        return f"no such {what}: {path}"
    if kind == FILE and path.is_dir():
        return f"{path} is a folder, expected a file"
    if kind == MODEL and not (path / "config.json").is_file():
        return f"{path} is not a model folder (no config.json there)"
    return None


def data_file_values(data_files: Any) -> list[tuple[str, Any]]:
    """``(suffix of the option path, path)`` of every entry of a ``datasets`` ``data_files`` value."""
    if data_files is None:
        return []
    if isinstance(data_files, dict):
        return [(f".{split}{sub}", v) for split, files in data_files.items() for sub, v in data_file_values(files)]
    if isinstance(data_files, (list, tuple)):
        return [(f"[{i}]", v) for i, v in enumerate(data_files)]
    return [("", data_files)]


def option_problems(target: str, option: str, value: Any) -> list[tuple[str, Any, str]]:
    """``(option suffix, value, what is wrong)`` for one option of a ``_target_`` (empty if fine)."""
    kind = PATH_OPTIONS.get(target, {}).get(option)
    if kind is None or value is None:
        return []
    if kind == FILES:
        return []  # checked with its `path` by node_problems
    if not isinstance(value, (str, os.PathLike)):
        return []  # a wrong type is the builder's own error
    if (target, option) not in _ALWAYS_LOCAL and not written_as_path(str(value)) and not absolute(value).exists():
        return []  # a hub id or a builder name
    what = problem(value, kind)
    return [("", value, what)] if what else []


def node_problems(target: str, get: Callable[[str], Any]) -> list[tuple[str, Any, str]]:
    """``(option, value, what is wrong)`` for every path option of the node of ``target``;
    ``get(option)`` returns the node's resolved value of an option (None if absent)."""
    out = []
    for option in PATH_OPTIONS.get(target, {}):
        value = get(option)
        out += [(option + suffix, v, what) for suffix, v, what in option_problems(target, option, value)]
    if PATH_OPTIONS.get(target, {}).get("data_files") == FILES:
        root = get("path")
        base = absolute(root) if isinstance(root, str) and root and absolute(root).is_dir() else None
        for suffix, value in data_file_values(get("data_files")):
            what = problem(value, FILE, base)
            if what:
                out.append((f"data_files{suffix}", value, what))
    return out


def require(value: object, kind: str, option: str, base: Path | None = None) -> Path:
    """``value`` as an absolute path; FileNotFoundError naming ``option`` and the path if it is not a ``kind``."""
    what = problem(value, kind, base)
    if what or not isinstance(value, (str, os.PathLike)):  # problem() names every non-path value
        raise FileNotFoundError(f"{option}={value}: {what}")
    return absolute(value, base)
