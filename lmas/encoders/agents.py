"""Encoder agents: a LoRA adapter and a label head on a BERT-style encoder base (``model=encoder``, in a
``population=bases`` population; :mod:`lmas.population.bases` gives an encoder base these parts).

* :class:`EncoderPopulation`: the agents' adapters on the encoder (``population.lora``'s ``q_proj``/``k_proj``/
  ``v_proj`` are BERT's ``query``/``key``/``value``) and, per agent, a label head: a weight vector and a bias per
  label string. A text's score for label ``l`` is ``w_l · h + b_l`` with ``h`` the mean of the encoder's last
  hidden states over the text's tokens (as sentence-transformers pool MiniLM); a label the agent never trained on
  has ``w_l = 0, b_l = 0``. Keyed by label string, one head serves every task and a class-incremental label space
  that grows. The head is saved with the adapters (keys ``extra/head``, its labels in the file's metadata).
  Raw text (``lm`` tasks) trains each agent's own MLM and NSP heads
  (:class:`lmas.encoders.pretraining.PretrainingHeads`, saved as ``extra/mlm/*``): the base ships without them
  (MiniLM is a bare ``BertModel``), so every agent starts from the same heads, initialised from the population's
  seed, and the untrained model's scores are those of these fresh heads.
* :class:`EncoderScorer`: label log-likelihoods ``log_softmax`` over the asked labels' scores, so encoder agents
  take part in the knowledge matrix, fusion and competence allocation (by the metric) like any agent. Raw text
  is scored by the task's metric, ``pseudo_perplexity`` or ``masked_accuracy`` (every token masked once in its
  own copy, :func:`lmas.encoders.pretraining.masked_scores`); generation tasks are refused.
* :class:`EncoderFit`: one experience. Classification: cross-entropy over the experience's labels, AdamW on the
  trainable adapter and those labels' head rows (older labels' rows are left as they are, which protects them in
  a class-incremental stream; an experience of a single label has a constant loss and learns nothing: logged).
  Raw text: BERT's MLM + NSP loss on next-sentence pairs of the experience's texts (drawn anew each epoch, masked
  anew each batch: 15%, 80/10/10), AdamW on the adapter and the agent's MLM/NSP heads. Both read ``train.lr``,
  ``batch_size``, ``epochs``, ``max_steps`` and ``weight_decay`` and shuffle by the fit's seed. Strategies: the
  data-level ones (naive, joint); the config check refuses the rest, whose loss terms and hooks read a causal
  LM's outputs.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig
from safetensors import safe_open
from torch import Tensor

from lmas.data.task import ENCODER_METRICS, Task
from lmas.encoders.pretraining import (
    IGNORE,
    PretrainingHeads,
    masked_scores,
    nsp_pairs,
    pretraining_batch,
    pretraining_losses,
)
from lmas.evaluation.scorer import Classifier
from lmas.evaluation.scoring import Scored, rank_scored
from lmas.models.providers import BaseModel
from lmas.population.population import EXTRA, Population, lora_config
from lmas.schema import TrainConfig
from lmas.training.fit import Experience, FitResult, StepHook

log = logging.getLogger(__name__)
BERT_NAMES = {"q_proj": "query", "k_proj": "key", "v_proj": "value"}
ENCODER_PROVIDERS = ("lmas.models.providers.encoder", "lmas.models.providers.tiny_encoder")
DATA_LEVEL = ("Strategy", "Joint")  # strategies that only choose the examples (encoder agents train with these)


class EncoderPopulation(Population):
    """Agents of an encoder base: LoRA adapters plus a label head each (module docstring)."""

    def __init__(
        self,
        base: BaseModel,
        agents: int | list[str] = 1,
        lora: dict | None = None,
        seed: int = 0,
        bases: dict | None = None,
    ) -> None:
        self.heads: dict[str, dict[str, Tensor]] = {}  # agent -> label -> (hidden + 1,): weights, then the bias
        self.mlm: dict[str, PretrainingHeads] = {}  # agent -> its MLM/NSP heads (made on first use)
        super().__init__(base, agents, lora, seed, bases)
        self.hidden = int(base.model.config.hidden_size)
        self.model.eval()  # peft leaves its wrapper in train mode; the encoder's dropout is on only in a fit

    def lora_from(self, options: dict) -> LoraConfig:
        options = dict(options)
        targets = options.get("target_modules") or ["q_proj", "v_proj"]
        options["target_modules"] = [BERT_NAMES.get(t, t) for t in targets]
        config = lora_config(**options)
        config.task_type = "FEATURE_EXTRACTION"
        return config

    def head(self, agent: str, labels: Sequence[str]) -> Tensor:
        """``(L, hidden + 1)``: the rows of ``labels`` in ``agent``'s head (zeros for labels it never trained)."""
        rows = self.heads.get(agent, {})
        zero = torch.zeros(self.hidden + 1)
        return torch.stack([rows.get(label, zero) for label in labels])

    def set_head(self, agent: str, labels: Sequence[str], rows: Tensor) -> None:
        table = self.heads.setdefault(agent, {})
        table.update({label: rows[i].detach().clone() for i, label in enumerate(labels)})

    def mlm_heads(self, agent: str) -> PretrainingHeads:
        """``agent``'s MLM and NSP heads; an agent without them gets fresh ones, the same for every agent."""
        if agent not in self.mlm:
            embeddings: Any = self.base.model.get_input_embeddings()
            device = next(self.model.parameters()).device
            self.mlm[agent] = PretrainingHeads(self.base.model.config, embeddings, self.seed).to(device)
        return self.mlm[agent]

    def embed(self, encoded: dict[str, Tensor]) -> Tensor:
        """Mean of the last hidden states over each text's tokens, ``(B, hidden)``, with the active adapters."""
        out = self.model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
        mask = encoded["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
        return (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def save_adapter(
        self, name: str, path: str | Path, metadata: dict[str, str] | None = None, extra: dict | None = None
    ) -> Path:
        labels = list(self.heads.get(name, {}))
        extra = {**(extra or {}), **({f"{EXTRA}head": self.head(name, labels)} if labels else {})}
        if name in self.mlm:
            extra.update({f"{EXTRA}mlm/{k}": v.detach().cpu() for k, v in self.mlm[name].state_dict().items()})
        meta = {**(metadata or {}), "head_labels": json.dumps(labels)}
        return super().save_adapter(name, path, meta, extra)

    def load_adapter(self, name: str, path: str | Path) -> None:
        super().load_adapter(name, path)
        with safe_open(str(path), "pt") as f:
            labels = json.loads((f.metadata() or {}).get("head_labels", "[]"))
            self.heads[name] = {}
            if labels:
                self.set_head(name, labels, f.get_tensor(f"{EXTRA}head"))
            mlm = {k[len(f"{EXTRA}mlm/") :]: f.get_tensor(k) for k in f.keys() if k.startswith(f"{EXTRA}mlm/")}
        self.mlm.pop(name, None)
        if mlm:
            self.mlm_heads(name).load_state_dict(mlm)


def logits(pop: EncoderPopulation, agent: str, encoded: dict[str, Tensor], head: Tensor) -> Tensor:
    """``(B, L)`` label scores of ``agent`` for a batch (``head``: its ``(L, hidden + 1)`` rows)."""
    return pop.embed(encoded) @ head[:, :-1].T + head[:, -1]


def encode(pop: EncoderPopulation, texts: Sequence[str], max_length: int) -> dict[str, Tensor]:
    device = next(pop.model.parameters()).device
    enc = pop.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


class EncoderScorer(Classifier):
    """Label log-likelihoods and metrics of encoder agents (classification tasks only)."""

    def __init__(self, population: EncoderPopulation, max_length: int, batch_size: int = 32) -> None:
        self.population, self.max_length, self.batch_size = population, max_length, batch_size

    @torch.no_grad()
    def label_logprobs(self, agents: Sequence[str], prompts: Sequence[str], labels: Sequence[str]) -> Tensor:
        pop, out = self.population, []
        was_training = pop.model.training
        pop.model.eval()
        try:
            for agent in agents:
                pop.activate(agent)
                head = pop.head(agent, labels).to(next(pop.model.parameters()).device)
                rows = [
                    logits(pop, agent, encode(pop, prompts[i : i + self.batch_size], self.max_length), head)
                    for i in range(0, len(prompts), self.batch_size)
                ]
                out.append(torch.cat(rows).float().log_softmax(-1).cpu())
        finally:
            pop.model.train(was_training)
        return torch.stack(out)

    def scored(self, agent: str, task: Task, split: str = "test", labels: Sequence[str] | None = None) -> Scored:
        if task.kind == "lm":
            return self.masked_scored(agent, task, split)
        if task.kind != "classification":
            raise ValueError(
                f"agent {agent!r} is an encoder agent: it scores classification and raw-text tasks, and task "
                f"{task.name!r} is {task.kind}"
            )
        _, lp, gold = self.classify([agent], task, split, list(labels or task.class_labels))
        return rank_scored(lp[0], gold)

    @torch.no_grad()
    def masked_scored(self, agent: str, task: Task, split: str) -> Scored:
        """Raw text: ``pseudo_perplexity`` or ``masked_accuracy``; per text its ``(N, 2)`` token sum and count."""
        if task.metric not in ENCODER_METRICS:
            raise ValueError(
                f"agent {agent!r} is an encoder agent: it scores raw text by {' or '.join(ENCODER_METRICS)}, and "
                f"task {task.name!r} asks for {task.metric} (set the task's metric)"
            )
        pop, texts = self.population, [ex.answer for ex in getattr(task, split)]
        if not texts:
            raise ValueError(f"task {task.name!r}: the {split} split is empty, nothing to evaluate")
        pop.activate(agent)
        was_training = pop.model.training
        pop.model.eval()
        try:
            heads = pop.mlm_heads(agent)
            per = masked_scores(pop.model, pop.tokenizer, texts, self.max_length, self.batch_size, heads)
        finally:
            pop.model.train(was_training)
        if not per[:, 1].sum():
            raise ValueError(f"task {task.name!r}: the {split} texts have no token to score")
        nll, tokens, hits = per.sum(0)
        if task.metric == "masked_accuracy":
            return Scored(float(hits / tokens), per[:, [2, 1]])
        return Scored(math.exp(nll / tokens), per[:, [0, 1]])


class EncoderFit:
    """The fit backend of encoder agents (module docstring)."""

    def __init__(self, population: EncoderPopulation, train: TrainConfig, max_length: int) -> None:
        self.population, self.train, self.max_length = population, train, max_length

    def fit(self, exp: Experience, on_loss: StepHook, curve: Callable[[], float] | None = None) -> FitResult:
        if exp.task.kind == "lm":
            return self.pretrain(exp, on_loss)
        pop, cfg = self.population, self.train
        examples = [ex for ex, _ in exp.examples]
        labels = list(dict.fromkeys([*exp.task.class_labels, *(ex.answer for ex in examples)]))
        if len(labels) == 1:
            log.warning(
                "encoder agent %s: task %r has one label (%r): cross-entropy over the experience's labels is constant, "
                "so this fit changes nothing (a class-incremental task of one new class)",
                exp.agent,
                exp.task.name,
                labels[0],
            )
        pop.activate(exp.agent)
        device = next(pop.model.parameters()).device
        head = torch.nn.Parameter(pop.head(exp.agent, labels).to(device))
        params = [p for p in pop.model.parameters() if p.requires_grad] + [head]
        opt = torch.optim.AdamW(params, lr=exp.lr or cfg.lr, weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(exp.seed)
        per_epoch = math.ceil(len(examples) / cfg.batch_size)
        total = min(cfg.max_steps or per_epoch * cfg.epochs, per_epoch * cfg.epochs)
        losses: list[float] = []
        pop.model.train()
        try:
            while len(losses) < total:
                order = torch.randperm(len(examples), generator=gen).tolist()
                for i in range(0, len(order), cfg.batch_size):
                    if len(losses) == total:
                        break
                    batch = [examples[k] for k in order[i : i + cfg.batch_size]]
                    enc = encode(pop, [ex.prompt for ex in batch], self.max_length)
                    gold = torch.tensor([labels.index(ex.answer) for ex in batch], device=device)
                    loss = F.cross_entropy(logits(pop, exp.agent, enc, head), gold)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    losses.append(loss.item())
                    on_loss(len(losses) - 1, losses[-1])
        finally:
            pop.model.eval()
        pop.set_head(exp.agent, labels, head.detach().cpu())
        return FitResult(losses, len(losses), {"labels": len(labels)})

    def pretrain(self, exp: Experience, on_loss: StepHook) -> FitResult:
        """Raw text: MLM + NSP on next-sentence pairs of the experience's texts (module docstring)."""
        pop, cfg = self.population, self.train
        texts = [ex.answer for ex, _ in exp.examples]
        pop.activate(exp.agent)
        heads = pop.mlm_heads(exp.agent)
        params = [p for p in pop.model.parameters() if p.requires_grad] + list(heads.parameters())
        opt = torch.optim.AdamW(params, lr=exp.lr or cfg.lr, weight_decay=cfg.weight_decay)
        rng, gen = random.Random(exp.seed), torch.Generator().manual_seed(exp.seed)
        n_pairs = len(nsp_pairs(texts, random.Random(0)))  # the same count every epoch: one per consecutive pair
        per_epoch = math.ceil(n_pairs / cfg.batch_size)
        total = min(cfg.max_steps or per_epoch * cfg.epochs, per_epoch * cfg.epochs)
        losses: list[float] = []
        parts: dict[str, list[float]] = {"mlm": [], "nsp": []}
        pop.model.train()
        try:
            while len(losses) < total:
                pairs, before = nsp_pairs(texts, rng), len(losses)
                order = torch.randperm(len(pairs), generator=gen).tolist()
                for i in range(0, len(order), cfg.batch_size):
                    if len(losses) == total:
                        break
                    chosen = [pairs[k] for k in order[i : i + cfg.batch_size]]
                    batch = pretraining_batch(pop.tokenizer, chosen, gen, self.max_length)
                    if not (batch["labels"] != IGNORE).any():
                        continue  # no token drawn for masking (a batch of very short pairs): nothing to learn
                    out = pretraining_losses(pop.model, batch, heads)
                    opt.zero_grad()
                    out["loss"].backward()
                    opt.step()
                    losses.append(out["loss"].item())
                    for key in parts:
                        parts[key].append(out[key].item())
                    on_loss(len(losses) - 1, losses[-1])
                if len(losses) == before:
                    raise ValueError(f"task {exp.task.name!r}: no token of its texts was masked in an epoch")
        finally:
            pop.model.eval()
        info = {"pairs": n_pairs, **{f"{k}_loss": sum(v) / len(v) for k, v in parts.items() if v}}
        return FitResult(losses, len(losses), info)
