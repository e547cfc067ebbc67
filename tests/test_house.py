"""House rules that keep the code easy to see and change (issue 14): module sizes."""

from __future__ import annotations

from pathlib import Path

LMAS = Path(__file__).parents[1] / "lmas"


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_no_module_is_over_400_lines():
    big = {str(p.relative_to(LMAS)): n for p in LMAS.rglob("*.py") if (n := _lines(p)) > 400}
    assert not big, f"split these modules by concept: {big}"


def test_the_loop_reads_in_a_page_and_the_config_check_keeps_only_cross_option_rules():
    assert _lines(LMAS / "loop.py") <= 200
    assert _lines(LMAS / "config.py") <= 200
