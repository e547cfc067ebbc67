"""What a sweep computes once (``eval.cache``): the untrained model's scores and the frozen trunk's activations.

Every run of a sweep over strategies or seeds on the same data starts from the same model: a fresh LoRA
adapter (``lora_B = 0``) is an exact no-op, so the untrained model's score on a task is the same number in
every run, and (LoRA on the top layers only) the layers below the adapters compute the same activations for
every test prompt in every round of every run. With ``eval.cache=<dir>`` both are kept in a
content-addressed store shared by every run and process (:class:`lmas.lm.diskcache.DiskCache`: atomic
writes, checksummed entries, a size limit ``eval.cache_mb`` with least-recently-used eviction):

* :class:`ScoreCache`: each task's untrained :class:`~lmas.evaluation.scoring.Scored` (value and
  per-example outcomes; ``Evaluator.initial``), keyed by the base model's weights
  (:func:`lmas.lm.diskcache.base_parameters`, LoRA weights excluded: the adapter must be fresh, else the
  cache is not used and the reason is logged), the task's examples and their token ids (prompt format,
  tokenizer), the label set and its token ids, the metric, ``data.max_length``, ``eval.batch_size``,
  ``eval.max_new_tokens``, the device type, the autocast dtype and the scoring code. Identical results:
  a hit returns the bytes the first run computed.
* the frozen trunk (``train.trunk_cache``, ``eval.shared_trunk``): :class:`lmas.lm.trunk.SharedTrunk`
  with the store as the second level of its per-example cache (:meth:`lmas.lm.trunk.SharedTrunk.context`
  says what its keys hold). With the store configured, every classification score goes through the trunk
  (one agent's too, and the untrained model's): the bottom from the store, the top with the agent's
  adapters; the same log-likelihoods as the plain path up to float rounding. Generation and perplexity
  run the whole model, as without the store.

:func:`build_scoring` builds the scorer and the trunk of a run from ``train.*`` / ``eval.*``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lmas.data.task import Task
from lmas.evaluation.scoring import Scored
from lmas.lm import diskcache
from lmas.lm.device import model_device
from lmas.lm.likelihood import label_tokens
from lmas.lm.trunk import SharedTrunk

if TYPE_CHECKING:
    from lmas.evaluation.scorer import PopulationScorer
    from lmas.lm.encoding import PromptEncoder
    from lmas.population.population import Population
    from lmas.schema import EvalConfig, TrainConfig

log = logging.getLogger(__name__)
SCORING_CODE = (
    "lmas.evaluation.scoring",
    "lmas.evaluation.scorer",
    "lmas.evaluation.cache",
    "lmas.lm.likelihood",
    "lmas.lm.encoding",
    "lmas.lm.trunk",
)


def untrained_reason(population: Population, agent: str) -> str | None:
    """Why ``agent``'s scores are not the untrained base model's (None: every adapter of it is fresh).

    A fresh LoRA adapter has ``lora_B = 0``, so it adds exactly zero; DoRA rescales the base weight
    (not an exact no-op in floats) and any non-zero ``lora_B`` changes the outputs."""
    for adapter in population.agents[agent].adapters:
        for name, p in population.parameters_of(agent, adapter).items():
            if "lora_magnitude" in name:
                return f"adapter {adapter!r} is a DoRA adapter ({name}), not an exact no-op"
            if ("lora_B" in name or "lora_embedding_B" in name) and bool(p.detach().ne(0).any()):
                return f"adapter {adapter!r} is not fresh: {name} is non-zero (a fresh LoRA adapter has lora_B = 0)"
    return None


_TOKENIZERS: dict[int, tuple[Any, str]] = {}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of a tokenizer's class, vocabulary and special tokens (what decoding reads), once per object."""
    memo = _TOKENIZERS.get(id(tokenizer))
    if memo is None or memo[0] is not tokenizer:
        vocab = sorted(tokenizer.get_vocab().items())
        special = {k: str(v) for k, v in tokenizer.special_tokens_map.items()}
        memo = _TOKENIZERS[id(tokenizer)] = (tokenizer, diskcache.key(type(tokenizer).__name__, vocab, special))
    return memo[1]


def score_key(scorer: PopulationScorer, task: Task, split: str, labels: Sequence[str] | None) -> str:
    """The store key of the untrained model's score of ``task`` (module docstring: what it holds).

    Call it under the scorer's autocast (the autocast dtype is part of it)."""
    enc: PromptEncoder = scorer.encoder
    examples = getattr(task, split)
    model = scorer.population.model
    base = diskcache.fingerprint(diskcache.base_parameters(model), getattr(model, "config", None))
    parts: list[Any] = [
        "untrained",
        base,
        diskcache.code_version(*SCORING_CODE),
        diskcache.numerics(model_device(model)),
        tokenizer_fingerprint(enc.tokenizer),
        (enc.prompt_format, enc.max_length, enc.head, enc.tail, enc.start_id, enc.eos_id, enc.pad_id),
        (task.kind, task.metric, split, scorer.batch_size, scorer.max_new_tokens),
        scorer.trunk.split if scorer.through_cache and scorer.trunk is not None else None,  # label scores via the trunk
        [dataclasses.astuple(ex) for ex in examples],
    ]
    if task.kind == "classification":
        names = list(labels or task.class_labels)
        parts += [names, label_tokens(enc, names), [enc.tokens(ex.prompt) for ex in examples]]
    elif task.kind == "generation":
        parts += [[enc.tokens(ex.prompt) for ex in examples], enc.tokens("\n")]
    else:  # perplexity: the sequences scored (encode counts its cuts, as scoring them would)
        parts += [[dataclasses.astuple(enc.encode(ex.prompt, ex.answer, eos=False)) for ex in examples]]
    return diskcache.key(*parts)


class ScoreCache:
    """The untrained model's scores in a :class:`~lmas.lm.diskcache.DiskCache` (module docstring).

    ``hits``, ``misses`` and ``refused`` (adapters not fresh: computed, not stored) count lookups."""

    def __init__(self, store: diskcache.DiskCache) -> None:
        self.store = store
        self.hits = self.misses = self.refused = 0

    def scored(
        self, scorer: PopulationScorer, agent: str, task: Task, split: str, labels: Sequence[str] | None
    ) -> Scored:
        """``scorer.scored(agent, task, split, labels)``, from the store when it holds it (else stored)."""
        reason = untrained_reason(scorer.population, agent)
        if reason is not None:
            if not self.refused:
                log.warning("eval.cache: the untrained model's scores are computed, not cached: %s", reason)
            self.refused += 1
            return scorer.scored(agent, task, split, labels)
        truncated = scorer.encoder.truncated
        with scorer.autocast():
            k = score_key(scorer, task, split, labels)
        payload = self.store.get(k)
        if payload is not None:
            try:
                meta, arrays = diskcache.unpack(payload)
                hit = Scored(float(meta["value"]), arrays["per_example"].numpy())
            except (ValueError, KeyError, TypeError):
                self.store.discard(k)
            else:
                self.hits += 1
                return hit
        self.misses += 1
        scorer.encoder.truncated = truncated  # scoring counts its own cuts
        scored = scorer.scored(agent, task, split, labels)
        self.store.put(
            k, diskcache.pack({"value": scored.value, "task": task.name}, {"per_example": scored.per_example})
        )
        return scored


def build_scoring(
    population: Population,
    encoder: PromptEncoder,
    train: TrainConfig,
    eval: EvalConfig,
    precision: str | int | None = None,
) -> tuple[SharedTrunk | None, PopulationScorer]:
    """A run's shared trunk (``train.trunk_cache`` or ``eval.shared_trunk``; None otherwise) and its scorer,
    both reading and filling the store at ``eval.cache`` when it is set."""
    from lmas.evaluation.scorer import PopulationScorer

    store = diskcache.DiskCache(eval.cache, eval.cache_mb) if eval.cache else None
    trunk = SharedTrunk(population.model, disk=store) if train.trunk_cache or eval.shared_trunk else None
    scorer = PopulationScorer(
        population,
        encoder,
        eval.batch_size,
        eval.max_new_tokens,
        eval.mixed_adapters,
        trunk if eval.shared_trunk else None,
        precision,
        ScoreCache(store) if store is not None else None,
    )
    return trunk, scorer
