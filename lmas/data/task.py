"""Tasks: a dataset as prompt -> answer pairs with fixed splits and one metric.

A :class:`Task` is plain data; every source in :mod:`lmas.data.sources` returns one.
Three kinds exist, each with its own metric:

* ``classification``: the answer is one of ``labels``; scored by rank classification
  (the label with the highest log-likelihood after the prompt), metric ``accuracy``.
* ``generation``: free-form answer; scored after greedy decoding by exact match (metric
  ``exact_match``, the default) or by ROUGE-L (``rouge_l``, set with ``Task(metric="rouge_l")``: SuperNI);
  an example may carry several acceptable answers (``Example.references``), the best one counts.
* ``lm``: raw text for continual pretraining; the prompt is empty and the loss covers
  the whole text, metric ``perplexity`` (lower is better). Encoder agents train raw text by masked language
  modelling and next-sentence prediction (:mod:`lmas.encoders.pretraining`) and score it by
  ``pseudo_perplexity`` (lower is better) or ``masked_accuracy`` (each token masked once, the share predicted):
  :data:`ENCODER_METRICS`, set with ``Task(metric=...)``.

Metrics of :data:`TOKEN_WEIGHTED` keep, per example, a sum over its tokens and the token count, and pool them
token-weighted: ``exp(sum NLL / sum tokens)`` for the perplexities, ``sum hits / sum tokens`` for masked accuracy.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

TaskKind = Literal["classification", "generation", "lm"]
METRIC_OF_KIND: dict[str, str] = {
    "classification": "accuracy",
    "generation": "exact_match",
    "lm": "perplexity",
}
METRICS_OF_KIND: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy",),
    "generation": ("exact_match", "rouge_l"),
    "lm": ("perplexity", "pseudo_perplexity", "masked_accuracy"),
}
METRICS: tuple[str, ...] = tuple(dict.fromkeys(m for ms in METRICS_OF_KIND.values() for m in ms))
HIGHER_IS_BETTER: dict[str, bool] = {
    "accuracy": True,
    "exact_match": True,
    "rouge_l": True,
    "perplexity": False,
    "pseudo_perplexity": False,
    "masked_accuracy": True,
}
TOKEN_WEIGHTED: dict[str, str] = {"perplexity": "exp", "pseudo_perplexity": "exp", "masked_accuracy": "ratio"}
ENCODER_METRICS: tuple[str, ...] = ("pseudo_perplexity", "masked_accuracy")  # raw text scored by encoder agents

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One prompt -> answer pair. For ``lm`` tasks the prompt is ``""``.

    ``references``: every acceptable answer of a generation example that has several (SuperNI's outputs; the
    model trains on ``answer``, the first); empty means ``answer`` alone. Scoring takes the best over them.
    """

    prompt: str
    answer: str
    references: tuple[str, ...] = ()

    @property
    def answers(self) -> tuple[str, ...]:
        """The acceptable answers: ``references``, or ``(answer,)`` when there are none."""
        return self.references or (self.answer,)


def items_digest(rows: Sequence[Example]) -> str:
    """A short fingerprint of ``rows`` in order (prompts, answers, references): equal digests, the same items."""
    h = hashlib.sha256()
    for ex in rows:
        h.update(repr((ex.prompt, ex.answer, ex.references)).encode())
    return h.hexdigest()[:16]


@dataclass
class Task:
    """A named task with fixed train/val/test splits.

    Attributes:
        name: unique name inside a stream (used as key in results and logs).
        kind: ``classification`` | ``generation`` | ``lm``.
        train, val, test: the splits.
        labels: the label set (answers) of a classification task, in a fixed order. Every answer
            must be one of them (``ValueError`` naming the split and answers otherwise); a label
            that is a val/test answer but never a train answer is logged as a warning and kept.
        source: short free-text provenance (package, file, generator), kept in results.
        meta: the builder's notes (``*_note`` keys go to results.json), seeds, sizes.
        metric: the metric; ``""`` (default) is the kind's (:data:`METRIC_OF_KIND`), otherwise one of
            :data:`METRICS_OF_KIND` for the kind (a generation task may be scored by ``rouge_l``).
        pool: every example the train and val splits may be drawn from (the builder's non-test examples),
            for :meth:`resampled`; empty means ``train + val``.
        balanced: :meth:`resampled` deals the pool out balanced over answers (as :func:`stratified_split`).
    """

    name: str
    kind: TaskKind
    train: list[Example]
    val: list[Example]
    test: list[Example]
    labels: list[str] | None = None
    source: str = ""
    meta: dict = field(default_factory=dict)
    metric: str = ""
    pool: list[Example] = field(default_factory=list, repr=False)
    balanced: bool = False

    def __post_init__(self) -> None:
        if self.kind not in METRIC_OF_KIND:
            raise ValueError(f"task {self.name!r}: kind={self.kind!r} is not one of {sorted(METRIC_OF_KIND)}")
        self.metric = self.metric or METRIC_OF_KIND[self.kind]
        if self.metric not in METRICS_OF_KIND[self.kind]:
            raise ValueError(
                f"task {self.name!r}: metric={self.metric!r} does not score a {self.kind} task; "
                f"expected one of {list(METRICS_OF_KIND[self.kind])}"
            )
        for split, rows in (("train", self.train), ("test", self.test)):
            if not rows:
                raise ValueError(f"task {self.name!r}: the {split} split is empty")
        if self.kind == "classification":
            if not self.labels:
                raise ValueError(f"task {self.name!r}: a classification task needs a non-empty `labels` list")
            if len(set(self.labels)) != len(self.labels):
                raise ValueError(f"task {self.name!r}: `labels` has duplicates: {self.labels}")
            known = set(self.labels)
            for split, rows in (("train", self.train), ("val", self.val), ("test", self.test)):
                bad = sorted({ex.answer for ex in rows} - known)
                if bad:
                    raise ValueError(f"task {self.name!r}: {split} answers {bad[:5]} are not in labels {self.labels}")
            trained = {ex.answer for ex in self.train}
            for split, rows in (("val", self.val), ("test", self.test)):
                unseen = sorted({ex.answer for ex in rows} - trained)
                if unseen:  # still scoreable: rank classification scores over all of `labels`
                    log.warning(
                        "task %r: %s labels %s never appear in the train split (the model is not trained on "
                        "them); they are still scored, over labels %s",
                        self.name,
                        split,
                        unseen,
                        self.labels,
                    )

    def describe(self) -> dict:
        """Name, kind, metric, source, split sizes, the test items' digest (:func:`items_digest`: runs are paired
        item by item only where it is equal) and the loader's notes (``meta`` keys ending in ``_note``, e.g. how a
        missing split was cut): results.json's ``tasks`` entry."""
        notes = {k: v for k, v in self.meta.items() if k.endswith("_note")}
        return {
            "name": self.name,
            "kind": self.kind,
            "metric": self.metric,
            "source": self.source,
            "n_train": len(self.train),
            "n_val": len(self.val),
            "n_test": len(self.test),
            "test_digest": items_digest(self.test),
            **notes,
        }

    @property
    def class_labels(self) -> list[str]:
        """The labels of a classification task; a ValueError naming the task for other kinds."""
        if self.labels is None:
            raise ValueError(f"task {self.name!r} is a {self.kind} task; only classification tasks have labels")
        return self.labels

    def limited(self, max_train: int | None = None, max_eval: int | None = None) -> Task:
        """A copy with at most ``max_train`` train and ``max_eval`` val/test examples (prefixes)."""

        def cut(rows: list[Example], n: int | None) -> list[Example]:
            return list(rows) if n is None else list(rows[:n])

        return Task(
            name=self.name,
            kind=self.kind,
            train=cut(self.train, max_train),
            val=cut(self.val, max_eval),
            test=cut(self.test, max_eval),
            labels=self.labels,
            source=self.source,
            meta=dict(self.meta),
            metric=self.metric,
            pool=self.pool,
            balanced=self.balanced,
        )

    def resampled(self, seed: int) -> Task:
        """A copy whose train and val splits are drawn anew, with ``seed``, from :attr:`pool` (``train + val``
        when empty), at their current sizes; the test split is untouched, so runs with different seeds score the
        same test items (:class:`lmas.data.stream.Stream`'s ``split_seed``). Balanced over answers when
        :attr:`balanced`, a plain shuffle otherwise."""
        pool = self.pool or [*self.train, *self.val]
        cut = stratified_split if self.balanced else split_examples
        train, val, _ = cut(pool, len(self.train), len(self.val), 0, seed=seed, name=self.name)
        return Task(
            name=self.name,
            kind=self.kind,
            train=train,
            val=val,
            test=list(self.test),
            labels=self.labels,
            source=self.source,
            meta={**self.meta, "resample_seed": seed},
            metric=self.metric,
            pool=self.pool,
            balanced=self.balanced,
        )


def non_test(examples: Sequence[Example], test: Sequence[Example]) -> list[Example]:
    """The examples that are not in ``test``, in order: a builder's :attr:`Task.pool` (train/val resampling)."""
    held = set(test)
    return [ex for ex in examples if ex not in held]


def split_examples(
    examples: Sequence[Example],
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int,
    name: str = "task",
) -> tuple[list[Example], list[Example], list[Example]]:
    """Shuffle ``examples`` with ``seed`` and cut disjoint train/val/test splits.

    The test split is cut first, then val, then train, so growing ``n_train`` never
    changes the evaluation splits. Raises if there are too few examples.
    """
    need = n_train + n_val + n_test
    if len(examples) < need:
        raise ValueError(
            f"task {name!r}: needs {need} examples (n_train={n_train}, n_val={n_val}, "
            f"n_test={n_test}) but the source has only {len(examples)}"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    rows = [examples[i] for i in order]
    test = rows[:n_test]
    val = rows[n_test : n_test + n_val]
    train = rows[n_test + n_val : need]
    return train, val, test


def stratified_split(
    examples: Sequence[Example],
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int,
    name: str = "task",
) -> tuple[list[Example], list[Example], list[Example]]:
    """Like :func:`split_examples` but balanced over answers (labels), round-robin per label.

    Each split receives examples of every label in turn, so small splits are balanced.
    """
    by_label: dict[str, list[Example]] = {}
    for ex in examples:
        by_label.setdefault(ex.answer, []).append(ex)
    rng = random.Random(seed)
    pools = []
    for label in sorted(by_label):
        rows = list(by_label[label])
        rng.shuffle(rows)
        pools.append(rows)
    # interleave labels: a, b, c, a, b, c, ... so every prefix is near-balanced
    interleaved: list[Example] = []
    depth = max((len(p) for p in pools), default=0)
    for i in range(depth):
        for pool in pools:
            if i < len(pool):
                interleaved.append(pool[i])
    need = n_train + n_val + n_test
    if len(interleaved) < need:
        raise ValueError(
            f"task {name!r}: needs {need} examples (n_train={n_train}, n_val={n_val}, "
            f"n_test={n_test}) but the source has only {len(interleaved)}"
        )
    # deal round-robin so each split is itself balanced
    test: list[Example] = []
    val: list[Example] = []
    train: list[Example] = []
    cursor = 0
    for target, n in ((test, n_test), (val, n_val), (train, n_train)):
        target.extend(interleaved[cursor : cursor + n])
        cursor += n
    rng.shuffle(train)
    return train, val, test
