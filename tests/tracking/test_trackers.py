"""Trackers: W&B tables, images and adapter artifacts with lineage (fake and real offline W&B), CSV."""

from __future__ import annotations

import glob
import json
import struct
from pathlib import Path

import pytest

from lmas.tracking.trackers import CSVTracker, Tracker, WandbTracker


def _adapter(tmp_path: Path, name: str) -> Path:
    p = tmp_path / f"{name}.safetensors"
    p.write_bytes(b"x" * 16)
    return p


def _log_two_versions(tracker: WandbTracker, tmp_path: Path) -> None:
    tracker.log_artifact(_adapter(tmp_path, "a0"), "adapter-a", "adapter", {"agent": "a"}, aliases=["round000"])
    tracker.log_artifact(_adapter(tmp_path, "b0"), "adapter-b", "adapter", {"agent": "b"}, aliases=["round000"])
    tracker.log_artifact(_adapter(tmp_path, "b1"), "adapter-b", "adapter", {"agent": "b"}, aliases=["round001"],
                         parents=["adapter-b:round000", "adapter-a:round000"])


def test_base_tracker_methods_are_no_ops(tmp_path):
    t = Tracker()
    t.start(tmp_path, {}, "x")
    t.log({"a": 1.0}, "round", 0)
    t.log_table("k", ["c"], [[1]], 0)
    t.log_image("k", tmp_path / "none.png", 0)
    t.log_artifact(tmp_path / "none", "n", "adapter", {}, aliases=["round000"], parents=["n:round000"])
    t.finish()


def test_online_each_version_is_logged_by_its_own_run_that_uses_its_parents(fake_wandb, tmp_path):
    t = WandbTracker(mode="online", group="exp", job_type="naive")
    t.start(tmp_path, {"seed": 0}, "main")
    _log_two_versions(t, tmp_path)
    main, *children = fake_wandb.runs
    assert main.kwargs["group"] == "exp" and main.kwargs["job_type"] == "naive" and not main.finished
    assert main.logged == [] and main.used == []
    assert len(children) == 3 and all(c.finished for c in children)
    assert [c.kwargs["job_type"] for c in children] == ["adapter"] * 3
    assert {c.kwargs["group"] for c in children} == {"exp"} and children[0].kwargs["reinit"] == "create_new"
    assert [c.name for c in children] == ["main/adapter-a:round000", "main/adapter-b:round000",
                                          "main/adapter-b:round001"]
    a0, b0, b1 = (c.logged[0] for c in children)
    assert children[2].used == [b0, a0]  # the parents, as the committed artifact objects
    assert children[0].used == [] and children[1].used == []
    assert b1.metadata["parents"] == ["adapter-b:round000", "adapter-a:round000"]
    assert b1.aliases == ["latest", "round001"] and b1.files == [str(tmp_path / "b1.safetensors")]
    assert t.run is main


def test_online_without_lineage_runs_the_main_run_uses_and_logs(fake_wandb, tmp_path):
    t = WandbTracker(mode="online", lineage_runs=False)
    t.start(tmp_path, {}, "main")
    _log_two_versions(t, tmp_path)
    (main,) = fake_wandb.runs
    a0, b0, b1 = main.logged
    assert main.used == [b0, a0]


def test_online_a_parent_from_before_a_resume_is_used_by_name_and_a_missing_one_is_skipped(fake_wandb, tmp_path):
    fake_wandb.missing.add("adapter-gone:round000")
    t = WandbTracker(mode="online", lineage_runs=False)
    t.start(tmp_path, {}, "main")
    t.log_artifact(_adapter(tmp_path, "x"), "adapter-x", "adapter", {}, aliases=["round004"],
                   parents=["adapter-x:round003", "adapter-gone:round000"])
    (main,) = fake_wandb.runs
    assert main.used == ["adapter-x:round003"]
    assert len(main.logged) == 1 and t.run is main  # the tracker stays on


def test_offline_parents_go_to_the_metadata_and_nothing_is_used(fake_wandb, tmp_path):
    t = WandbTracker(mode="offline")
    t.start(tmp_path, {}, "main")
    _log_two_versions(t, tmp_path)
    (main,) = fake_wandb.runs
    assert main.used == [] and len(main.logged) == 3
    assert main.logged[2].metadata == {"agent": "b", "parents": ["adapter-b:round000", "adapter-a:round000"]}
    assert main.logged[2].description == "from adapter-b:round000, adapter-a:round000"


def test_round_keys_are_plotted_against_the_round_axis(fake_wandb, tmp_path):
    t = WandbTracker()
    t.start(tmp_path, {}, "main")
    m = fake_wandb.runs[0].metrics
    assert m["train/*"] == "step"
    for key in ("eval/*", "cl/*", "comm/*", "similarity/*", "cascade/*", "knowledge_matrix", "knowledge_table"):
        assert m[key] == "round", key
    t.log_table("knowledge_table", ["round", "agent"], [(2, "a0")], 2)
    assert fake_wandb.runs[0].history[-1] == {"knowledge_table": {"table": ["round", "agent"], "data": [[2, "a0"]]},
                                              "round": 2}


def test_csv_tracker_writes_scalars_and_ignores_tables(tmp_path):
    t = CSVTracker()
    t.start(tmp_path, {}, "x")
    t.log({"similarity/a~b/weights": 0.5}, "round", 1)
    t.log_table("knowledge_table", ["a"], [[1]], 1)
    t.log_artifact(tmp_path / "none", "n", "adapter", {}, aliases=["round001"], parents=[])
    t.finish()
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["axis,step,key,value",
                                                                  "round,1,similarity/a~b/weights,0.5"]


def test_csv_tracker_log_before_start_names_the_file():
    with pytest.raises(RuntimeError, match=r"CSVTracker.log before start\(\): metrics.csv is not open"):
        CSVTracker().log({"x": 1.0}, "round", 0)


# --- real W&B, offline ------------------------------------------------------------------------------
def _records(path: str):
    """The records of an offline run's transaction log (.wandb: W&B's LevelDB-style log of protobufs)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = Path(path).read_bytes()
    assert raw[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            continue
        buf += data
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def test_real_offline_wandb_logs_tables_and_artifacts_with_parents(tmp_path):
    import wandb  # a hard dependency: no skip

    t = WandbTracker(mode="offline", group="g", job_type="naive")
    t.start(tmp_path, {"x": 1}, "main")
    assert t.run is not None
    t.log_table("knowledge_table", ["round", "agent", "task", "metric", "value", "trained"],
                [[0, "agent0", "bbc", "accuracy", 0.5, True]], 0)
    _log_two_versions(t, tmp_path)
    assert t.run is not None, "a W&B call failed and turned the tracker off"
    t.finish()
    # run.finish() returns once the exit record is handled, but wandb-core flushes the log's buffered tail
    # when it closes the stream, a moment later (under load, after this test read it): wait for that
    wandb.teardown()
    (log,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "*.wandb"))
    arts = [r.artifact for r in _records(log) if r.WhichOneof("record_type") == "artifact"]
    adapters = [(a.name, sorted(a.aliases), json.loads(a.metadata)) for a in arts if a.type == "adapter"]
    assert adapters == [
        ("adapter-a", ["latest", "round000"], {"agent": "a", "parents": []}),
        ("adapter-b", ["latest", "round000"], {"agent": "b", "parents": []}),
        ("adapter-b", ["latest", "round001"], {"agent": "b", "parents": ["adapter-b:round000", "adapter-a:round000"]}),
    ]
    (table,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "files" / "media" / "table" / "*.table.json"))
    assert json.loads(Path(table).read_text())["data"] == [[0, "agent0", "bbc", "accuracy", 0.5, True]]


def test_online_when_a_lineage_run_cannot_start_versions_come_from_the_main_run(fake_wandb, tmp_path):
    t = WandbTracker(mode="online")
    t.start(tmp_path, {}, "main")
    real_init = fake_wandb.init

    def init(**kwargs):
        if kwargs.get("reinit") == "create_new":
            raise RuntimeError("no second run")
        return real_init(**kwargs)

    fake_wandb.init = init
    _log_two_versions(t, tmp_path)
    (main,) = fake_wandb.runs
    assert len(main.logged) == 3 and main.used == main.logged[1::-1] and t.run is main


def test_a_wandb_dir_that_cannot_be_written_does_not_stop_training(tmp_path, run_lmas, caplog):
    out = tmp_path / "run"
    out.mkdir()
    (out / "wandb").write_text("a file where W&B wants its folder")  # W&B cannot create its dir
    over = ["model=tiny", "debug=fast", "logger=wandb", f"paths.output_dir={tmp_path}"]
    with caplog.at_level("WARNING"):
        results = run_lmas(over, out)
    assert results["complete"] and (out / "results.json").is_file()
    assert any("W&B" in r.getMessage() for r in caplog.records)


@pytest.mark.slow  # W&B waits for its init timeout before giving up
def test_an_unreachable_wandb_server_in_online_mode_does_not_stop_training(tmp_path, run_lmas, caplog,
                                                                           monkeypatch):
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "15")
    monkeypatch.setenv("WANDB_MODE", "online")
    over = ["model=tiny", "debug=fast", "logger=wandb", "logger.mode=online", f"paths.output_dir={tmp_path}"]
    with caplog.at_level("WARNING"):
        results = run_lmas(over, tmp_path / "online")
    assert results["complete"]
    assert any("W&B" in r.getMessage() for r in caplog.records)
