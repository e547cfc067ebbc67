"""``lmas-train``: the one Hydra entry point. Compose the config, build everything, run the loop.

lmas-train                                  # the default experiment on the embedded model
lmas-train experiment=bbc_class_incremental seed=1
lmas-train -m strategy=naive seed=0,1,2     # a sweep (multirun)
lmas-train --config-dir ~/my_conf stream=my_stream   # your own configs next to lmas's (lmas.confdir)
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lmas import checkpoint
from lmas.confdir import PRIMARY_NAME, config_dir
from lmas.config import validate
from lmas.loop import ContinualLoop
from lmas.schema import EvalConfig, TrainConfig
from lmas.strategies.compose import Compose
from lmas.tracking import report
from lmas.tracking.trackers import Tracker

log = logging.getLogger("lmas")
CONFIG = "config.yaml"  # the resolved config of a run, in its run dir


def run(cfg: DictConfig, run_dir: str | Path, resume: bool = False) -> dict:
    """Build model, stream, population, strategy and tracker from ``cfg``; run; return results.

    ``resume``: continue the run in ``run_dir`` from its last checkpoint (``cfg`` must be its config).
    """
    run_dir = Path(run_dir)
    rank = worker_rank()
    if rank:  # a data-parallel rank that Lightning started by re-running this job (trainer.strategy=ddp)
        run_dir = run_dir / f".rank{rank}"  # its own copy of the outputs; rank 0 writes the run's
    check_run_dir(run_dir, resume)
    loop = build(cfg, run_dir, save_config=not resume, track=not rank)
    results = loop.run(resume=resume)
    print(summary(results, run_dir))
    return results


def build(cfg: DictConfig, run_dir: Path, save_config: bool = True, track: bool = True) -> ContinualLoop:
    """The run's loop, built from ``cfg`` (checked first); ``save_config``: write the resolved config to
    ``run_dir/config.yaml``; ``track``: start ``cfg.logger`` (else no tracker)."""
    import lightning as L

    validate(cfg)  # bad options fail here, before any data or model is loaded
    L.seed_everything(cfg.seed, verbose=False)
    # the cheap objects first: their own argument checks fail in a second, before the model and the stream load
    strategy = instantiate(cfg.strategy, _convert_="all")
    if (cfg.get("distill") or {}).get("_target_"):  # distill=<preset>: a distillation term next to the CL strategy
        strategy = Compose([strategy, instantiate(cfg.distill, _convert_="all")])
    transfer = instantiate(cfg.transfer, _convert_="all")
    allocation = instantiate(cfg.allocation, _convert_="all")
    topology = instantiate(cfg.topology, _convert_="all")
    body = instantiate(cfg.loop, _convert_="all")  # what a round learns (conf/loop/)
    train, evaluation = TrainConfig(**cfg.train), EvalConfig(**cfg.eval)
    run_dir.mkdir(parents=True, exist_ok=True)
    if save_config:
        OmegaConf.save(cfg, run_dir / CONFIG, resolve=True)  # what resume=<run dir> rebuilds the run from
    os.environ.setdefault("WANDB_DIR", str(run_dir))
    stream = instantiate(cfg.stream, _convert_="all")
    if cfg.get("probes"):
        stream = stream.with_probes(instantiate(cfg.probes, _convert_="all"))
    log.info(
        "stream %s (%s-incremental): %s",
        stream.name,
        stream.scenario,
        ", ".join(f"{t.name}[{t.kind}, {len(t.train)}/{len(t.val)}/{len(t.test)}]" for t in stream),
    )
    base = instantiate(cfg.model)
    log.info("base model %s (%s parameters)", base.name, f"{base.info.get('parameters', 0):,}")
    population = instantiate(cfg.population, _partial_=True, _convert_="all")(base=base)
    tracker = instantiate(cfg.logger, _convert_="all") if track else Tracker()
    config = _plain(cfg)
    tracker.start(run_dir, config, name=run_dir.name)
    return ContinualLoop(
        population=population,
        stream=stream,
        strategy=strategy,
        run_dir=run_dir,
        seed=cfg.seed,
        train=train,
        eval=evaluation,
        trainer=_plain(cfg.trainer),
        max_length=cfg.data.max_length,
        tracker=tracker,
        allocation=allocation,
        topology=topology,
        transfer=transfer,
        config=config,
        body=body,
        progress=cfg.progress,
    )


def _plain(node: DictConfig) -> dict:
    """A config mapping as a plain dict, interpolations resolved."""
    return dict(OmegaConf.to_container(node, resolve=True))  # type: ignore[arg-type]


def worker_rank() -> str:
    """'' in the main process; the rank (e.g. '1') in a process that a data-parallel launcher started.

    Lightning's ``ddp`` launcher re-runs the whole job in each extra local process with
    ``LOCAL_RANK`` set; torchrun sets ``RANK``, multi-node Lightning ``NODE_RANK``.
    """
    node, local = os.environ.get("NODE_RANK", "0"), os.environ.get("LOCAL_RANK", "0")
    rank = os.environ.get("RANK") or (f"{node}-{local}" if node != "0" else local)
    return "" if rank in ("", "0") else rank


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse to overwrite a run; for a resume, check there is something to resume."""
    results = run_dir / "results.json"
    if resume:
        if checkpoint.find(run_dir) is None or not (run_dir / CONFIG).is_file():
            raise FileNotFoundError(
                f"resume={run_dir}: no checkpoint/ and {CONFIG} there; nothing to resume "
                "(it resumes a run dir of lmas-train that completed at least one round)"
            )
        if results.is_file() and json.loads(results.read_text()).get("complete"):
            raise FileExistsError(f"resume={run_dir}: that run is complete; nothing to resume")
        return
    if results.exists() or checkpoint.find(run_dir) is not None:
        raise FileExistsError(
            f"{run_dir} already holds the results of another run (results.json/checkpoint); lmas never "
            f"overwrites a run: choose another hydra.run.dir or paths.output_dir, or continue it with "
            f"resume={run_dir}"
        )


def resume_config(run_dir: str | Path, overrides: list[str]) -> DictConfig:
    """The saved config of the run to resume; other command-line overrides are refused."""
    extra = [o for o in overrides if not o.startswith(("resume=", "hydra."))]
    if extra:
        raise ValueError(
            f"resume={run_dir} continues that run with its own saved config ({CONFIG}); "
            f"drop the other overrides {extra}"
        )
    path = Path(run_dir).expanduser().resolve() / CONFIG
    if not path.parent.is_dir():
        raise FileNotFoundError(f"resume={run_dir}: no such folder: {path.parent}")
    if not path.is_file():
        raise FileNotFoundError(f"resume={run_dir}: {path} not found (not an lmas run dir?)")
    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"resume={run_dir}: {path} is not a config mapping")
    for key in ("allocation", "topology"):  # a run saved while these were options of population
        if key not in cfg and key in (cfg.get("population") or {}):
            cfg[key] = cfg.population.pop(key)
    if "selflearn" in cfg:  # a run saved before the loop group: `selflearn:` held the self-learning options
        old = cfg.pop("selflearn")
        cfg.loop = {"_target_": "lmas.selflearn.SelfLearning", **old} if old else {"_target_": "lmas.loop.Continual"}
    if "train" in cfg and "length_grouping" not in cfg.train:  # saved before length-grouped batches (the default
        cfg.train.length_grouping = False  # now): its later rounds train on the plain shuffle its earlier ones had
    return cfg


def summary(results: dict, run_dir: Path) -> str:
    """What the run prints at the end: where the outputs are and the metrics table."""
    tasks = [t["name"] for t in results["tasks"]]
    lines = [
        "",
        f"lmas: stream {results['stream']} ({len(tasks)} tasks: {', '.join(tasks)}), "
        f"strategy {results['strategy']}, seed {results['seed']}, "
        f"{results['timings']['wall_s']:.0f} s",
        report.metrics_table(results),
        "",
        f"results:  {run_dir / 'results.json'}",
        f"matrix:   {run_dir / 'knowledge_matrix.csv'}  {run_dir / 'knowledge_matrix.png'}",
    ]
    if (run_dir / "report.html").is_file():
        lines.append(f"report:   {run_dir / 'report.html'}")
    return "\n".join(lines)


def job(cfg: DictConfig) -> float | None:
    """The Hydra job of one run; returns the first agent's average accuracy (for sweepers). An optimising sweeper
    (Optuna) must not select on a test split: with ``eval.split=test`` it is refused before the run."""
    sweeper = str(OmegaConf.select(OmegaConf.structured(HydraConfig.get()), "sweeper._target_", default=""))
    if "optuna" in sweeper.lower() and cfg.eval.split == "test":
        raise ValueError(
            "hparams_search: the search would maximise a score on the test split (eval.split=test); set "
            "eval.split=val (conf/hparams_search/optuna.yaml does) and report the chosen setting's test score "
            "from a separate run"
        )
    if cfg.get("resume"):
        saved = resume_config(cfg.resume, list(HydraConfig.get().overrides.task))
        log.info("resuming %s (this invocation's Hydra logs: %s)", cfg.resume, HydraConfig.get().runtime.output_dir)
        results = run(saved, cfg.resume, resume=True)
    else:
        results = run(cfg, HydraConfig.get().runtime.output_dir)
    first: dict = next(iter(results["metrics"].values()), {})
    return first.get("avg_acc")


def main() -> None:
    """Console entry point (``lmas-train``): Hydra's command line over the configs of
    :func:`lmas.confdir.config_dir` (the packaged ``lmas/conf`` or the repository's ``conf/``), plus any
    ``--config-dir DIR`` or ``hydra.searchpath`` the user adds; ``--help`` lists the config groups."""
    hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=PRIMARY_NAME)(job)()


if __name__ == "__main__":
    main()
