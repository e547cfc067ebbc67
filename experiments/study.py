"""Run a study in parts: a grid of lmas-train jobs whose finished runs are kept in the repository.

    python experiments/study.py experiments/reproduction/study.yaml            # run what is not finished
    python experiments/study.py experiments/reproduction/study.yaml --list     # the jobs and their state
    python experiments/study.py experiments/reproduction/study.yaml --only strategy=olora

A study file (YAML) names the fixed overrides and the axes of its grid::

    name: reproduction
    runs: runs                      # where finished runs are kept, relative to the study file
    overrides: [experiment=reproduction/fast, stream.order=4]
    grid:                           # every combination is one job
      strategy: [naive, olora]
      seed: [0, 1, 2]
    extra:                          # more jobs: each entry is a grid of its own (e.g. one order, fewer seeds)
      - {strategy: [seqft], seed: [0, 1]}

A job runs in a scratch directory (``--scratch``, default ``outputs/studies/<name>/<job>``) and, once complete,
its ``results.json``, ``config.yaml`` and ``per_example/`` (small) are copied to ``<runs>/<job>/``, with the
job's overrides in ``overrides.yaml`` (what lmas-compare groups the runs by). A job whose
``<runs>/<job>/results.json`` is complete is skipped, so a study continues on another machine from what the
repository holds; an interrupted job resumes from its scratch checkpoint when the scratch dir is still there. A
kept run whose config.yaml differs from what its job composes to now (the study or a preset edited since) is
reported as stale, never skipped as done nor overwritten.
Tables regenerate from ``<runs>`` alone (``lmas-compare``, ``experiments/tables.py``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from lmas.compare import WHERE_AND_SPEED, flat_config

KEPT = ("results.json", "config.yaml", "per_example")  # what a finished run keeps in the repository


def load_study(path: str | Path) -> dict[str, Any]:
    """The study file, checked: ``name``, ``runs``, ``overrides`` (list), ``grid`` and ``extra`` (axes -> values)."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"{path}: no such study file")
    study = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(study) - {"name", "runs", "overrides", "grid", "extra"})
    if unknown or not isinstance(study.get("name"), str):
        raise SystemExit(f"{path}: expected keys name, runs, overrides, grid, extra (got unknown {unknown} or no name)")
    for key, grid in [("grid", study.get("grid") or {})] + [(f"extra[{i}]", g) for i, g in
                                                            enumerate(study.get("extra") or [])]:
        if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
            raise SystemExit(f"{path}: {key} must map each override key to a non-empty list of values")
    study["dir"] = path.parent
    return study


def jobs(study: dict[str, Any]) -> list[dict[str, Any]]:
    """Every job of the grid and the extras, in order, each ``{"name", "overrides"}`` (duplicates once)."""
    out, seen = [], set()
    for grid in [study.get("grid") or {}] + list(study.get("extra") or []):
        keys = list(grid)
        for values in itertools.product(*(grid[k] for k in keys)):
            axes = [f"{k}={v}" for k, v in zip(keys, values, strict=True)]
            name = ",".join(a.replace("/", "_") for a in axes) or "default"
            if name not in seen:
                seen.add(name)
                out.append({"name": name, "overrides": list(study.get("overrides") or []) + axes})
    return out


def finished(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a complete run's results.json."""
    f = run_dir / "results.json"
    try:
        return f.is_file() and bool(json.loads(f.read_text()).get("complete"))
    except json.JSONDecodeError:
        return False


def composed(overrides: list[str]) -> dict[str, Any]:
    """The config lmas-train composes from ``overrides`` now, resolved and flat (``train.lr``: value)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import lmas  # noqa: F401 - registers the typed config sections with Hydra's ConfigStore
    from lmas.confdir import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return flat_config(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]


def stale(job: dict[str, Any], run_dir: Path) -> list[str]:
    """How the finished run in ``run_dir`` differs from what ``job`` composes to now: ``key: kept -> now`` for every
    option both configs have, except :data:`lmas.compare.WHERE_AND_SPEED` (an option only one side has comes from
    another lmas version and is not compared). Empty: the kept run is this job's. A study edited after some of its
    runs finished (another preset, a changed override) would otherwise mix two protocols in one table."""
    kept = flat_config(yaml.safe_load((run_dir / "config.yaml").read_text()) or {})
    now = composed(job["overrides"])
    return [f"{k}: {kept[k]!r} -> {now[k]!r}" for k in kept
            if k in now and kept[k] != now[k] and not k.startswith(WHERE_AND_SPEED)]  # fmt: skip


def keep(scratch: Path, dest: Path, overrides: list[str]) -> None:
    """Copy a finished run's kept files (:data:`KEPT`) from ``scratch`` to ``dest`` and write the job's
    ``overrides`` to ``dest/overrides.yaml`` (lmas-compare groups runs by them); results.json last."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    for name in KEPT[1:]:
        src = scratch / name
        if src.is_dir():
            shutil.copytree(src, dest / name, dirs_exist_ok=True)
        elif src.is_file():
            shutil.copy2(src, dest / name)
    shutil.copy2(scratch / "results.json", dest / "results.json")  # last: its presence marks the job done


def run_job(job: dict[str, Any], scratch: Path, dest: Path, train: list[str]) -> int:
    """Run (or resume) one job with lmas-train in ``scratch``; keep its files in ``dest`` once complete."""
    started = (scratch / "checkpoint").is_dir() or (scratch / "checkpoint.new").is_dir()
    changed = stale(job, scratch) if (finished(scratch) or started) and (scratch / "config.yaml").is_file() else []
    if changed:
        print(f"study: {job['name']}: the run in {scratch} has other options than the study gives now "
              f"({'; '.join(changed)}); neither kept nor resumed: move it away to start the job afresh", flush=True)
        return 1
    if finished(scratch):
        keep(scratch, dest, job["overrides"])
        return 0
    if started:
        cmd = [*train, f"resume='{scratch}'"]  # quoted: job names hold '=' and ','
    else:
        cmd = [*train, *job["overrides"], f"hydra.run.dir='{scratch}'"]
    print("study:", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd)
    if rc == 0 and finished(scratch):
        keep(scratch, dest, job["overrides"])
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="the study file (YAML)")
    parser.add_argument("--list", action="store_true", help="list the jobs and whether they are finished")
    parser.add_argument("--only", action="append", default=[], help="run only jobs with this override (repeatable)")
    parser.add_argument("--scratch", help="where jobs run (default: outputs/studies/<name>)")
    parser.add_argument("--train", default=f"{sys.executable} -m lmas.train", help="the lmas-train command")
    args = parser.parse_args(argv)
    study = load_study(args.study)
    runs = study["dir"] / study.get("runs", "runs")
    scratch = Path(args.scratch or Path("outputs") / "studies" / study["name"])
    selected = [j for j in jobs(study) if all(o in j["overrides"] for o in args.only)]
    failed, outdated = [], []
    for job in selected:
        done = finished(runs / job["name"])
        changed = stale(job, runs / job["name"]) if done else []
        if changed:
            outdated.append(job["name"])
            print(f"stale {job['name']}: kept in {runs / job['name']} with other options than the study gives now "
                  f"({'; '.join(changed)}); it is neither skipped as done nor overwritten: restore the study's "
                  "options, or move the run away to run the job again", flush=True)  # fmt: skip
            continue
        if args.list:
            print(f"{'done' if done else 'todo'}  {job['name']}")
            continue
        if done:
            if not (runs / job["name"] / "overrides.yaml").is_file():  # kept by an older study.py: it matches the job
                (runs / job["name"] / "overrides.yaml").write_text(yaml.safe_dump(job["overrides"]))
            print(f"study: {job['name']} finished (kept in {runs / job['name']}); skipped", flush=True)
            continue
        if run_job(job, scratch / job["name"], runs / job["name"], args.train.split()) != 0:
            failed.append(job["name"])
    if failed:
        print(f"study: {len(failed)} job(s) failed: {', '.join(failed)}", file=sys.stderr)
    if outdated:
        print(f"study: {len(outdated)} kept run(s) stale: {', '.join(outdated)}", file=sys.stderr)
    return 1 if failed or outdated else 0


if __name__ == "__main__":
    sys.exit(main())
