"""Policy checks over the package source: no unpickling, no shell commands, remote code off."""

from __future__ import annotations

import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "lmas"
FILES = sorted(SRC.rglob("*.py"))


def _hits(pattern: str) -> list[str]:
    rx = re.compile(pattern)
    return [f"{f.relative_to(SRC)}:{i}" for f in FILES for i, line in enumerate(f.read_text().splitlines(), 1)
            if rx.search(line)]


def test_sources_exist():
    assert len(FILES) > 10


def test_no_pickle_loading():
    assert _hits(r"pickle\.loads?\(") == []
    bad = [h for h in _hits(r"torch\.load\(") if "weights_only=True" not in h]
    assert bad == [], f"torch.load without weights_only=True: {bad}"


def test_no_shell_commands():
    assert _hits(r"shell\s*=\s*True|os\.system\(|os\.popen\(") == []


def test_trust_remote_code_defaults_off():
    assert _hits(r"trust_remote_code\s*(:\s*bool\s*)?=\s*True") == []
    conf = Path(__file__).resolve().parents[1] / "conf"
    assert "trust_remote_code: false" in (conf / "model" / "hf.yaml").read_text()
