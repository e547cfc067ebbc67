"""Generated mathematics tasks from DeepMind's ``mathematics-dataset`` (PyPI ``mathematics-dataset``).

Problems are named as in the dataset, ``<module>__<problem>`` (e.g. ``arithmetic__add_or_sub``).
The generator draws from the global ``random`` and ``numpy.random`` states; :func:`math_task`
seeds both from ``split_seed`` (and the problem and difficulty) and restores them afterwards, so
results are deterministic and the caller's global RNG is left untouched.

Compatibility shims (applied only here, documented in :func:`_patch_sympy`,
:func:`_numpy_object_alias` and :func:`_patch_determinism`): the package (1.0.1, 2019) predates
sympy >= 1.6 and numpy 2, and some of its choices depend on set iteration order (string hashes,
object ids), which would make algebra and ``*_composed`` problems differ between processes.
Problems that call ``ndarray.itemset`` (removed in numpy 2) still fail; :func:`list_math_problems`
returns only the problems that generate here.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import random
import warnings
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from lmas.data.common import clean_text, fill_template
from lmas.data.task import Example, Task

# limits the dataset's own generator applies (mathematics_dataset.generate_settings)
MAX_QUESTION_LENGTH = 160
MAX_ANSWER_LENGTH = 30


def _patch_sympy() -> None:
    """``mathematics_dataset.sample.polynomials`` does
    ``from sympy.solvers.diophantine import base_solution_linear``; since sympy 1.6
    ``sympy.solvers.diophantine`` is a package and the function lives in its submodule
    ``diophantine``. Re-expose it at the old place (adds one attribute, changes nothing else)."""
    package = importlib.import_module("sympy.solvers.diophantine")  # the module, not the function
    if not hasattr(package, "base_solution_linear"):
        inner = importlib.import_module("sympy.solvers.diophantine.diophantine")
        package.base_solution_linear = inner.base_solution_linear  # type: ignore[attr-defined]  # the patch


class _SortedSet(set):
    """A set that iterates in sorted order; ``difference`` keeps the type."""

    def __iter__(self) -> Iterator:
        return iter(sorted(set.__iter__(self)))

    def difference(self, *others) -> _SortedSet:
        return _SortedSet(set.difference(self, *others))


def _stable_entity_hash(entity: Any) -> int:
    # equal hashes only tie; ties keep insertion order, which the seeded RNG decides
    return zlib.crc32(str(getattr(entity, "_description", "")).encode())


def _patch_determinism(composition: Any) -> None:
    """Make ``mathematics_dataset.util.composition`` independent of hash seeds and addresses:
    ``Context.pop`` draws a symbol with ``random.choice(list(<set of letters>))`` and
    ``expand_entities`` shuffles ``list(set(<entities>))`` (hashed by id). Iterate the letters
    sorted and hash entities by their text, so the seeded RNG alone decides the output."""
    if not isinstance(composition._ALLOWED_SYMBOLS, _SortedSet):
        composition._ALLOWED_SYMBOLS = _SortedSet(composition._ALLOWED_SYMBOLS)
    composition.Entity.__hash__ = _stable_entity_hash


@contextlib.contextmanager
def _numpy_object_alias() -> Iterator[None]:
    """While generating, provide ``np.object`` (removed in numpy 1.24; the package uses it as a
    dtype) as the builtin ``object``; removed again afterwards so the rest of the program sees
    numpy unchanged."""
    added = "object" not in vars(np)
    if added:
        np.object = object  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if added:
            del np.object  # type: ignore[attr-defined]


@functools.lru_cache(maxsize=1)
def _modules():
    """``mathematics_dataset.modules.modules`` (imported once, after the sympy shim)."""
    _patch_sympy()
    try:
        modules = importlib.import_module("mathematics_dataset.modules.modules")
    except ImportError as err:
        raise ImportError(
            f"mathematics_dataset could not be imported ({err}); pip install mathematics-dataset absl-py six"
        ) from err
    _patch_determinism(importlib.import_module("mathematics_dataset.util.composition"))
    return modules


def _entropy_fn(difficulty: float) -> Callable[[tuple[float, float]], tuple[float, float]]:
    """Map ``difficulty`` in [0, 1] to a third of each problem's training entropy range:
    0 -> lowest third (the dataset's ``train-easy``), 0.5 -> ``train-medium``, 1 -> ``train-hard``."""
    if not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"difficulty={difficulty} must be in [0, 1]")
    lower = difficulty * 2.0 / 3.0
    upper = lower + 1.0 / 3.0

    def modify(range_: tuple[float, float]) -> tuple[float, float]:
        lo, hi = range_
        return (lo + lower * (hi - lo), lo + upper * (hi - lo))

    return modify


def _flatten(tree: dict, prefix: str = "") -> dict[str, Callable]:
    out: dict[str, Callable] = {}
    for key, value in tree.items():
        full = f"{prefix}__{key}" if prefix else key
        if isinstance(value, dict):
            out.update(_flatten(value, full))
        else:
            out[full] = value
    return out


def all_math_problems() -> list[str]:
    """Every training problem name the package defines (some may fail here, see
    :func:`list_math_problems`)."""
    return sorted(_flatten(_modules().train(_entropy_fn(0.0))))


def _problem_fn(problem: str, difficulty: float) -> Callable:
    group = problem.split("__", 1)[0]
    mods = _modules()
    if group not in mods.all_:
        raise ValueError(f"unknown math problem {problem!r}; known: {all_math_problems()}")
    fns = _flatten(mods.all_[group].train(_entropy_fn(difficulty)), group)
    if problem not in fns:
        raise ValueError(f"unknown math problem {problem!r}; known: {all_math_problems()}")
    return fns[problem]


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed the global ``random`` and ``numpy.random`` states, restore them on exit."""
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        with warnings.catch_warnings(), _numpy_object_alias():
            warnings.simplefilter("ignore")
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _stable_seed(problem: str, difficulty: float, split_seed: int) -> int:
    return zlib.crc32(f"{problem}|{difficulty!r}|{split_seed}".encode())


def _generate(problem: str, n: int, seed: int, difficulty: float) -> tuple[list[tuple[str, str]], int]:
    """(pairs, skipped): ``skipped`` counts draws that hit ``ndarray.itemset`` (see below)."""
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    skipped = 0
    max_draws = 20 * n + 100
    with _seeded(seed):
        fn = _problem_fn(problem, difficulty)
        for _ in range(max_draws):
            if len(pairs) == n:
                break
            try:
                sample = fn()
            except AttributeError as err:
                # numpy 2 removed ndarray.itemset, used by the package's polynomial sampler; some
                # problems reach it only in some draws (e.g. via composed sub-expressions).
                if "itemset" not in str(err):
                    raise
                skipped += 1
                if skipped >= 50 and not pairs:
                    raise
                continue
            question, answer = clean_text(str(sample.question)), clean_text(str(sample.answer))
            if len(question) > MAX_QUESTION_LENGTH or len(answer) > MAX_ANSWER_LENGTH or not answer:
                continue
            if question not in seen:
                seen.add(question)
                pairs.append((question, answer))
    if len(pairs) < n:
        raise ValueError(
            f"math problem {problem!r} (difficulty={difficulty}): only {len(pairs)} distinct "
            f"questions in {max_draws} draws ({skipped} failed), {n} needed; lower the split sizes "
            "or raise difficulty"
        )
    return pairs, skipped


def generate_math(problem: str, n: int, seed: int = 0, difficulty: float = 0.0) -> list[tuple[str, str]]:
    """``n`` distinct (question, answer) pairs of ``problem``, deterministic for ``seed``.

    Like the dataset's generator, questions over 160 characters or answers over 30 are skipped;
    so are draws that fail on numpy 2 (``ndarray.itemset``), which biases a few problems slightly
    (``math_task`` records the count in ``meta["skipped_draws"]``). Raises ``ValueError`` if ``n``
    distinct questions cannot be drawn.
    """
    return _generate(problem, n, seed, difficulty)[0]


@functools.lru_cache(maxsize=1)
def _problem_status() -> dict[str, str]:
    status: dict[str, str] = {}
    for problem in all_math_problems():
        try:
            for difficulty in (0.0, 1.0):
                generate_math(problem, 10, seed=0, difficulty=difficulty)
            status[problem] = "ok"
        except Exception as err:  # noqa: BLE001 - any failure means "does not work here"
            status[problem] = f"{type(err).__name__}: {err}".split("\n")[0][:200]
    return status


def list_math_problems() -> list[str]:
    """Names of the problems that generate on this installation (sorted; checked once per process
    by drawing 10 examples at difficulty 0 and 1, a few seconds)."""
    return [p for p, s in _problem_status().items() if s == "ok"]


def math_problem_failures() -> dict[str, str]:
    """Problems that fail here, with the error (first line)."""
    return {p: s for p, s in _problem_status().items() if s != "ok"}


def math_task(
    name: str = "math",
    problem: str = "arithmetic__add_or_sub",
    n_train: int = 500,
    n_val: int = 100,
    n_test: int = 200,
    split_seed: int = 0,
    difficulty: float = 0.0,
    template: str = "Question: {text}\nAnswer:",
) -> Task:
    """Generation task of one mathematics-dataset problem; disjoint splits of distinct questions.

    The test split is generated first, then val, then train, so growing ``n_train`` keeps the
    evaluation splits. ``difficulty`` in [0, 1] selects the entropy range (0 = easiest).
    """
    for what, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"task {name!r}: {what}={n!r} must be an int >= 0")
    seed = _stable_seed(problem, difficulty, split_seed)
    pairs, skipped = _generate(problem, n_test + n_val + n_train, seed, difficulty)
    rows = [Example(fill_template(template, {"text": q}, f"task {name!r}"), a) for q, a in pairs]
    test, val, train = rows[:n_test], rows[n_test : n_test + n_val], rows[n_test + n_val :]
    return Task(
        name=name,
        kind="generation",
        train=train,
        val=val,
        test=test,
        source=f"mathematics_dataset:{problem}",
        meta={"problem": problem, "difficulty": difficulty, "split_seed": split_seed, "skipped_draws": skipped},
    )
