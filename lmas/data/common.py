"""Small helpers shared by the task builders: text cleaning, prompt templates, split sizes."""

from __future__ import annotations

import string
from collections.abc import Mapping

# A split size: an int is a count, a float in (0, 1) a fraction of the available examples,
# None the default (val/test: 10 %, train: everything left).
Size = int | float | None
DEFAULT_EVAL_FRACTION = 0.1


def clean_text(text: str) -> str:
    """Collapse every run of whitespace (newlines included) into one space and strip."""
    return " ".join(text.split())


def truncate(text: str, max_chars: int | None) -> str:
    """Cut ``text`` to at most ``max_chars`` characters, at a word boundary when one is near.

    ``None`` keeps the text whole. The result never ends with whitespace.
    """
    if max_chars is None or len(text) <= max_chars:
        return text.rstrip()
    if max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    cut = text[:max_chars]
    space = cut.rfind(" ")
    if space >= max_chars // 2:  # a word boundary in the second half: do not split a word
        cut = cut[:space]
    return cut.rstrip()


def template_fields(template: str) -> list[str]:
    """The ``{field}`` names a ``str.format`` template refers to, in order, without repeats."""
    names: list[str] = []
    for _, field, _, _ in string.Formatter().parse(template):
        if field is not None:
            if field == "" or field.isdigit():
                raise ValueError(f"template {template!r}: use named fields such as {{text}}, not {{{field}}}")
            if field not in names:
                names.append(field)
    return names


def fill_template(template: str, values: Mapping[str, str], where: str = "template") -> str:
    """Fill ``template`` with ``values`` and drop trailing spaces (the tokenizer adds the space
    before the answer). A missing field raises ``ValueError`` naming ``where`` and the field."""
    missing = [f for f in template_fields(template) if f not in values]
    if missing:
        raise ValueError(f"{where}: template {template!r} needs field {missing[0]!r}; available: {sorted(values)}")
    return template.format_map(dict(values)).rstrip(" \t")


def _count(n: Size, total: int, what: str, name: str) -> int | None:
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        raise TypeError(f"task {name!r}: {what} must be an int, a float fraction or None, got {n!r}")
    if isinstance(n, float):
        if not 0.0 < n < 1.0:
            raise ValueError(f"task {name!r}: {what}={n} is a float, so a fraction in (0, 1)")
        return int(n * total + 0.5)
    if n < 0:
        raise ValueError(f"task {name!r}: {what}={n} must be >= 0")
    return n


def resolve_sizes(total: int, n_train: Size, n_val: Size, n_test: Size, name: str) -> tuple[int, int, int]:
    """Turn counts / fractions / ``None`` into three counts for ``total`` available examples.

    ``None`` means 10 % for val and test (test at least 1) and all the rest for train.
    Raises ``ValueError`` if the counts do not fit into ``total``.
    """
    test = _count(n_test, total, "n_test", name)
    val = _count(n_val, total, "n_val", name)
    train = _count(n_train, total, "n_train", name)
    if test is None:
        test = max(1, int(DEFAULT_EVAL_FRACTION * total + 0.5)) if total > 1 else 0
    if val is None:
        val = int(DEFAULT_EVAL_FRACTION * total + 0.5)
    if train is None:
        train = total - test - val
    if train < 0 or train + val + test > total:
        raise ValueError(
            f"task {name!r}: needs {max(train, 0) + val + test} examples (n_train={n_train}, "
            f"n_val={n_val}, n_test={n_test}) but the source has only {total}"
        )
    return train, val, test
