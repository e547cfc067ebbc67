"""Encoder agents: a LoRA adapter and a label head on a BERT-style encoder base (``model=encoder``, in a
``population=bases`` population; :mod:`lmas.population.bases` gives an encoder base these parts).

* :class:`EncoderPopulation`: the agents' adapters on the encoder (``population.lora``'s ``q_proj``/``k_proj``/
  ``v_proj`` are BERT's ``query``/``key``/``value``) and, per agent, a label head: a weight vector and a bias per
  label string. A text's score for label ``l`` is ``w_l · h + b_l`` with ``h`` the mean of the encoder's last
  hidden states over the text's tokens (as sentence-transformers pool MiniLM); a label the agent never trained on
  has ``w_l = 0, b_l = 0``. Keyed by label string, one head serves every task and a class-incremental label space
  that grows. The head is saved with the adapters (keys ``extra/head``, its labels in the file's metadata).
* :class:`EncoderScorer`: label log-likelihoods ``log_softmax`` over the asked labels' scores, so encoder agents
  take part in the knowledge matrix, fusion and competence allocation (by the metric) like any agent; they score
  classification tasks only.
* :class:`EncoderFit`: one experience: cross-entropy over the experience's labels, AdamW on the trainable
  adapter and those labels' head rows (``train.lr``, ``batch_size``, ``epochs``, ``max_steps``,
  ``weight_decay``), batches shuffled by the fit's seed. Strategies: the data-level ones (naive, joint); the
  config check refuses the rest, whose loss terms and hooks read a causal LM's outputs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig
from safetensors import safe_open
from torch import Tensor

from lmas.data.task import Task
from lmas.evaluation.scorer import Classifier
from lmas.evaluation.scoring import Scored, rank_scored
from lmas.models.providers import BaseModel
from lmas.population.population import EXTRA, Population, lora_config
from lmas.schema import TrainConfig
from lmas.training.fit import Experience, FitResult, StepHook

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
        meta = {**(metadata or {}), "head_labels": json.dumps(labels)}
        return super().save_adapter(name, path, meta, extra)

    def load_adapter(self, name: str, path: str | Path) -> None:
        super().load_adapter(name, path)
        with safe_open(str(path), "pt") as f:
            labels = json.loads((f.metadata() or {}).get("head_labels", "[]"))
            self.heads[name] = {}
            if labels:
                self.set_head(name, labels, f.get_tensor(f"{EXTRA}head"))


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
        if task.kind != "classification":
            raise ValueError(
                f"agent {agent!r} is an encoder agent: it scores classification tasks only, and task "
                f"{task.name!r} is {task.kind}"
            )
        _, lp, gold = self.classify([agent], task, split, list(labels or task.class_labels))
        return rank_scored(lp[0], gold)


class EncoderFit:
    """The fit backend of encoder agents (module docstring)."""

    def __init__(self, population: EncoderPopulation, train: TrainConfig, max_length: int) -> None:
        self.population, self.train, self.max_length = population, train, max_length

    def fit(self, exp: Experience, on_loss: StepHook, curve: Callable[[], float] | None = None) -> FitResult:
        pop, cfg = self.population, self.train
        examples = [ex for ex, _ in exp.examples]
        labels = list(dict.fromkeys([*exp.task.class_labels, *(ex.answer for ex in examples)]))
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
