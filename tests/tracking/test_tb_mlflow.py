"""logger=tensorboard and logger=mlflow on real short runs (tiny model, 2 agents peer-to-peer, offline):
read back, they hold what logger=csv writes to metrics.csv for the same seed (every key, step axis,
value), the knowledge matrix of every round, and a broken dir leaves training running."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest

from lmas.tracking.local_trackers import csv_text, flatten, markdown_table, mlflow_key

P2P = ["population=peer_to_peer", "population.agents=2", "stream.max_train=4", "train.max_steps=1"]


def _over(logger: str, tmp: Path) -> list[str]:
    return ["model=tiny", "debug=fast", f"logger={logger}", f"paths.output_dir={tmp}", *P2P]


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory, request):
    """The same run with logger=csv: metrics.csv rows as {(axis, key): {step: value}}, and results.json."""
    from lmas.train import run

    conftest = request.config.pluginmanager.get_plugin(str(Path(__file__).resolve().parents[1] / "conftest.py"))
    compose = conftest.compose  # (the `compose` fixture is per test; this run is shared by the module)

    tmp = tmp_path_factory.mktemp("csv")
    res = run(compose(_over("csv", tmp), tmp / "run"), tmp / "run")
    series: dict[tuple[str, str], dict[int, float]] = {}
    with open(tmp / "run" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            series.setdefault((row["axis"], row["key"]), {})[int(row["step"])] = float(row["value"])
    return series, res


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7)  # TB keeps float32


def _table_rows(res: dict, r: int) -> list[list]:
    """The knowledge table the loop logs at round r, from results.json's matrix."""
    m, trained = res["matrix"], {tuple(t) for t in res["matrix"]["trained"]}
    return [[r, a, t, m["metrics"][t], m["values"][r][i][j], (r, a, t) in trained]
            for i, a in enumerate(m["agents"]) for j, t in enumerate(m["tasks"]) if m["values"][r][i][j] is not None]


def test_pure_helpers():
    assert mlflow_key("similarity/agent0~agent1/weights") == "similarity/agent0_agent1/weights"
    assert mlflow_key("eval/agent-0/bbc:x y.z") == "eval/agent-0/bbc:x y.z"
    assert markdown_table(["a", "v"], [["x", 0.123456], ["y", 2]]) == "| a | v |\n|---|---|\n| x | 0.1235 |\n| y | 2 |"
    assert csv_text(["a", "v"], [["x", 0.5]]) == "a,v\nx,0.5\n"
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": "1", "a.c": "[1, 2]", "d": "None"}


def test_tensorboard_holds_the_csv_metrics_and_the_matrix(csv_run, tmp_path, run_lmas):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series, csv_res = csv_run
    res = run_lmas(_over("tensorboard", tmp_path), tmp_path / "run")
    assert res["matrix"] == csv_res["matrix"]  # same seed, same run
    ea = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0,
                                                                                "images": 0})
    ea.Reload()
    tags = ea.Tags()
    assert set(tags["scalars"]) == {key for _, key in series}
    assert any(k.startswith("similarity/agent0~agent1/") for k in tags["scalars"])
    for (axis, key), values in series.items():
        got = {e.step: e.value for e in ea.Scalars(key)}
        assert got.keys() == values.keys(), (axis, key)  # the step axis: rounds 0..2, or training steps
        assert all(_same(got[s], v) for s, v in values.items()), (key, got, values)
    m = res["matrix"]
    assert [e.value for e in ea.Scalars("eval/agent1/chat")] == pytest.approx(
        [m["values"][r][1][1] for r in range(3)], rel=1e-6)
    # the knowledge matrix of each round, as a markdown table at that round
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in ea.Tensors("knowledge_table/text_summary")}
    assert sorted(texts) == [0, 1, 2]
    for r, text in texts.items():
        assert text == markdown_table(["round", "agent", "task", "metric", "value", "trained"], _table_rows(res, r))
    assert [e.step for e in ea.Images("knowledge_matrix")] == [0, 1, 2]


def test_mlflow_holds_the_csv_metrics_and_the_matrix(csv_run, tmp_path, run_lmas):
    from mlflow.tracking import MlflowClient

    series, csv_res = csv_run
    res = run_lmas(_over("mlflow", tmp_path), tmp_path / "run")
    assert res["matrix"] == csv_res["matrix"]
    uri = f"file:{tmp_path / 'run' / 'mlruns'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(res["stream"])  # no experiment preset: the stream's name
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.tags["strategy"] == "naive" and run.data.params["seed"] == "0"
    assert set(run.data.metrics) == {mlflow_key(key) for _, key in series}
    assert "similarity/agent0_agent1/weights" in run.data.metrics
    for (axis, key), values in series.items():
        got = {h.step: h.value for h in client.get_metric_history(run.info.run_id, mlflow_key(key))}
        assert got.keys() == values.keys(), (axis, key)
        assert all(_same(got[s], v) for s, v in values.items()), (key, got, values)
    assert [h.value for h in client.get_metric_history(run.info.run_id, "cl/agent0/avg_acc")][-1] == \
        pytest.approx(res["metrics"]["agent0"]["avg_acc"], rel=1e-9)
    # the knowledge matrix of each round as a CSV artifact, the heatmaps, adapter versions with parents
    root = Path(client.download_artifacts(run.info.run_id, ""))
    for r in range(3):
        rows = list(csv.reader(io.StringIO((root / "knowledge_table" / f"round{r:03d}.csv").read_text())))
        assert rows[0] == ["round", "agent", "task", "metric", "value", "trained"]
        assert rows[1:] == [[str(v) for v in row] for row in _table_rows(res, r)]
        assert (root / "knowledge_matrix" / f"round{r:03d}" / "knowledge_matrix.png").is_file()
    b1 = json.loads((root / "adapter-agent1" / "round001" / "metadata.json").read_text())
    assert b1["parents"] == ["adapter-agent1:round000", "adapter-agent0:round000"]
    assert b1["agent"] == "agent1" and b1["aliases"] == ["round001"] and b1["kind"] == "adapter"
    assert list((root / "adapter-agent1" / "round001").glob("*.safetensors"))


@pytest.mark.parametrize("logger,blocked", [("tensorboard", "tensorboard"), ("mlflow", "mlruns")])
def test_an_unwritable_tracker_dir_does_not_stop_training(logger, blocked, tmp_path, run_lmas, caplog):
    out = tmp_path / "run"
    out.mkdir()
    (out / blocked).write_text("a file where the tracker wants its folder")
    with caplog.at_level("WARNING"):
        res = run_lmas(["model=tiny", "debug=fast", f"logger={logger}", f"paths.output_dir={tmp_path}",
                        "stream.max_train=4", "train.max_steps=1"], out)
    assert res["complete"] and (out / "results.json").is_file()
    name = {"tensorboard": "TensorBoard", "mlflow": "MLflow"}[logger]
    assert any(name in r.getMessage() and "continuing without" in r.getMessage() for r in caplog.records)


@pytest.mark.slow  # MLflow creates its database tables (~6 s)
@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")  # SQLAlchemy, in MLflow
def test_mlflow_sqlite_store_keeps_the_round_axis(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from lmas.tracking.local_trackers import MLflowTracker

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # MLflow's own default for database stores would put artifacts in ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = MLflowTracker(tracking_uri=uri, experiment="exp")
    t.start(tmp_path, {"seed": 3, "strategy": {"name": "ewc"}}, "r")
    for r in range(2):
        t.log({"eval/a/t": 0.5 + r, "similarity/a~b/weights": 0.25 * r}, "round", r)
        t.log_table("knowledge_table", ["round", "value"], [[r, 0.5 + r]], r)
    t.finish()
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params == {"seed": "3", "strategy.name": "ewc"}
    assert [(h.step, h.value) for h in client.get_metric_history(run.info.run_id, "eval/a/t")] == [(0, 0.5), (1, 1.5)]
    assert [(h.step, h.value) for h in client.get_metric_history(run.info.run_id, "similarity/a_b/weights")] == \
        [(0, 0.0), (1, 0.25)]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "knowledge_table")] == \
        ["knowledge_table/round000.csv", "knowledge_table/round001.csv"]
    assert not any(cwd.iterdir())  # the artifacts live beside the database
    assert sorted(p.name for p in (tmp_path / "mlartifacts").rglob("round*.csv")) == ["round000.csv", "round001.csv"]
