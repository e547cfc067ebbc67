"""Generated mathematics tasks (mathematics-dataset with lmas's compatibility shims)."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

import mathematics_dataset  # noqa: F401  (a hard dependency: failing to import it fails the tests)

from lmas.data import mathgen
from lmas.data.mathgen import list_math_problems, math_task

ROOT = Path(__file__).resolve().parents[2]


def _rows(task):
    return task.train + task.val + task.test


def test_math_task_deterministic_and_well_formed():
    a = math_task("add", n_train=60, n_val=10, n_test=30, split_seed=3)
    b = math_task("add", n_train=60, n_val=10, n_test=30, split_seed=3)
    assert (a.train, a.val, a.test) == (b.train, b.val, b.test)
    assert a.kind == "generation" and a.source == "mathematics_dataset:arithmetic__add_or_sub"
    rows = _rows(a)
    assert len(rows) == 100 and len({ex.prompt for ex in rows}) == 100  # distinct: disjoint splits
    for ex in rows:
        assert ex.prompt.startswith("Question: ") and ex.prompt.endswith("\nAnswer:")
        assert isinstance(ex.answer, str) and ex.answer and ex.answer == ex.answer.strip()
    assert all(Decimal(ex.answer) == Decimal(ex.answer) for ex in rows)  # numeric answers


def test_math_answers_are_correct_products():
    task = math_task("mul", problem="arithmetic__mul", n_train=40, n_val=0, n_test=10)
    for ex in _rows(task):
        numbers = re.findall(r"-?\d+(?:\.\d+)?", ex.prompt)
        assert len(numbers) == 2, ex.prompt
        assert Decimal(numbers[0]) * Decimal(numbers[1]) == Decimal(ex.answer), ex


def test_math_task_seed_difficulty_and_template():
    base = math_task("m", problem="numbers__place_value", n_train=20, n_val=0, n_test=10)
    other = math_task("m", problem="numbers__place_value", n_train=20, n_val=0, n_test=10, split_seed=1)
    assert base.test != other.test
    hard = math_task("m", problem="numbers__place_value", n_train=20, n_val=0, n_test=10, difficulty=1.0)
    digits = lambda t: np.mean([len(ex.prompt.split(" of ")[-1]) for ex in _rows(t)])  # noqa: E731
    assert digits(hard) > digits(base)  # harder = longer numbers
    short = math_task("m", problem="arithmetic__mul", n_train=5, n_val=0, n_test=5, template="{text} =")
    assert all(ex.prompt.endswith("=") and "Question" not in ex.prompt for ex in _rows(short))


def test_math_task_growing_train_keeps_eval_splits():
    small = math_task("m", problem="comparison__pair", n_train=10, n_val=5, n_test=10)
    big = math_task("m", problem="comparison__pair", n_train=40, n_val=5, n_test=10)
    assert big.test == small.test and big.val == small.val


def test_math_task_leaves_global_rng_alone():
    random.seed(7)
    np.random.seed(7)
    expected = (random.random(), np.random.rand())
    random.seed(7)
    np.random.seed(7)
    math_task("m", problem="numbers__round_number", n_train=10, n_val=0, n_test=5)
    assert (random.random(), np.random.rand()) == expected
    assert "object" not in vars(np)  # the np.object alias exists only while generating


def test_math_task_same_output_under_other_hash_seed():
    """Symbol letters come from sets of strings; the shim makes them hash-seed independent."""
    here = math_task("m", problem="algebra__linear_1d", n_train=15, n_val=0, n_test=5)
    code = (
        "import json; from lmas.data.mathgen import math_task; "
        "t = math_task('m', problem='algebra__linear_1d', n_train=15, n_val=0, n_test=5); "
        "print(json.dumps([[e.prompt, e.answer] for e in t.train + t.test]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [[e.prompt, e.answer] for e in here.train + here.test]


def test_math_errors():
    with pytest.raises(ValueError, match="unknown math problem 'arithmetic__pow'"):
        math_task("m", problem="arithmetic__pow", n_train=1, n_val=0, n_test=1)
    with pytest.raises(ValueError, match=r"difficulty=2.0 must be in \[0, 1\]"):
        math_task("m", n_train=1, n_val=0, n_test=1, difficulty=2.0)
    with pytest.raises(ValueError, match="n_train=-1"):
        math_task("m", n_train=-1, n_val=0, n_test=1)


def test_list_math_problems():
    ok = list_math_problems()
    assert len(ok) == 49 and ok == sorted(ok)
    for name in ("arithmetic__add_or_sub", "arithmetic__mul", "numbers__place_value", "comparison__pair"):
        assert name in ok
    failures = mathgen.math_problem_failures()
    assert set(failures) | set(ok) == set(mathgen.all_math_problems())
    assert "polynomials__add" in failures and "itemset" in failures["polynomials__add"]
