"""A fake ``wandb`` module that records what a tracker does, with W&B's offline restriction."""

from __future__ import annotations

import sys
import types

import pytest


class FakeArtifact:
    def __init__(self, name, type, metadata=None, description=None):
        self.name, self.type, self.metadata, self.description = name, type, dict(metadata or {}), description
        self.files, self.aliases, self.logged_by, self.waited = [], [], None, False

    def add_file(self, path):
        self.files.append(str(path))

    def is_draft(self):
        return self.logged_by is None

    def wait(self):
        assert self.logged_by is not None, "wait() on an artifact that was never logged"
        self.waited = True
        return self


class FakeRun:
    def __init__(self, module, **kwargs):
        self.module, self.kwargs = module, kwargs
        self.name, self.id = kwargs.get("name"), f"id{len(module.runs)}"
        self.history, self.metrics, self.used, self.logged, self.finished = [], {}, [], [], False

    def define_metric(self, name, step_metric=None):
        self.metrics[name] = step_metric

    def log(self, data):
        assert not self.finished
        self.history.append(data)

    def use_artifact(self, artifact):
        assert not self.finished
        if self.kwargs.get("mode") == "offline":  # what wandb 0.31 does
            raise TypeError("Cannot use artifact when in offline mode.")
        if isinstance(artifact, str):
            if artifact in self.module.missing:
                raise ValueError(f"artifact {artifact} not found")
        elif artifact.is_draft() or not artifact.waited:
            raise AssertionError("used an artifact that is not committed")
        self.used.append(artifact)
        return artifact

    def log_artifact(self, artifact, aliases=None):
        assert not self.finished
        artifact.logged_by, artifact.aliases = self, list(aliases or [])
        self.logged.append(artifact)
        return artifact

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    """``import wandb`` gives this recorder; ``fake_wandb.runs`` are the runs, in init order."""
    mod = types.ModuleType("wandb")
    mod.runs, mod.missing = [], set()

    def init(**kwargs):
        if kwargs.get("reinit") == "finish_previous":
            for r in mod.runs:
                r.finished = True
        run = FakeRun(mod, **kwargs)
        mod.runs.append(run)
        return run

    mod.init = init
    mod.Artifact = FakeArtifact
    mod.Table = lambda columns, data: {"table": columns, "data": data}
    mod.Image = lambda path: {"image": path}
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return mod
