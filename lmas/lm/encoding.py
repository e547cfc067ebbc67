"""Token ids of prompt/answer pairs: one :class:`PromptEncoder` for training, scoring, generation and the trunk.

A sequence is ``head + body + tail + answer``, ``body`` being the prompt's tokens:

* ``model.prompt_format=plain``: ``head = [start]``, ``tail = []``, answer ``" " + answer``;
* ``model.prompt_format=chat``: the tokenizer's chat template, ``apply_chat_template([user: prompt],
  add_generation_prompt=True) = head + body + tail``, answer ``answer`` (the assistant turn);

plus EOS for generation tasks. A sequence longer than ``data.max_length`` loses tokens from the start
of ``body`` only: ``len(head) + len(body_kept) + len(tail) + len(answer) <= max_length``.
:func:`collate` right-pads a batch and marks the answer tokens as targets (``IGNORE`` elsewhere).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lmas.data.task import Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE = -100

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Encoded:
    """Token ids of one sequence and the index where its target (answer) tokens start."""

    ids: tuple[int, ...]
    target_start: int


PROMPT_FORMATS = ("plain", "chat")


def chat_template_parts(tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """The text of ``tokenizer``'s chat template before and after a user turn's content.

    ``apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)`` is
    ``before + prompt + after``: ``after`` closes the user turn and opens the assistant turn.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"model.prompt_format=chat: the tokenizer {type(tokenizer).__name__} "
            f"({getattr(tokenizer, 'name_or_path', '?')}) has no chat template; "
            f"use model.prompt_format=plain"
        )
    marker = "\x00lmas-prompt\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
    )
    if not isinstance(text, str) or text.count(marker) != 1:  # (tokenize=False gives a str)
        raise ValueError(
            "model.prompt_format=chat: the tokenizer's chat template does not put the user turn's "
            "text in the prompt verbatim; use model.prompt_format=plain"
        )
    before, after = text.split(marker)
    return before, after


class PromptEncoder:
    """Turns examples into token ids the same way for training, scoring, generation and the trunk.

    A sequence is ``head + body + tail + answer``: ``body`` is the prompt's tokens, the only part
    ever cut. ``model.prompt_format``:

    * ``plain``: ``head = [start]``, ``tail = []``, answer ``" " + answer``;
    * ``chat``: the tokenizer's own chat template with the prompt as the user turn and the answer
      as the assistant turn: ``head``/``tail`` are its text before/after the user's content
      (system turn, role markers, the assistant turn's opening), answer ``answer`` as is.

    An empty prompt (raw text, ``lm`` tasks) is ``[start] + text`` in both formats.

    Args:
        tokenizer: an HF tokenizer.
        max_length: longest sequence (``data.max_length``). Over-long examples: the prompt body
            loses tokens from its *start* (the instruction and the text's beginning go first, the
            ``Answer:`` cue, the start token and the chat template are kept) and the answer is kept
            whole; an answer that alone does not fit raises ``ValueError``. Raw text longer than
            the window keeps its beginning. Each shortened example is counted in ``truncated``;
            the first one is logged as a warning.
        prompt_format: ``plain`` | ``chat`` (``model.prompt_format``).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int = 128, prompt_format: str = "plain") -> None:
        if max_length < 8:
            raise ValueError(f"data.max_length={max_length} is too small (need >= 8)")
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"model.prompt_format={prompt_format!r} is not one of {list(PROMPT_FORMATS)}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.prompt_format = prompt_format
        # a decoder's bos (else eos) and eos; a BERT-style tokenizer has neither: [CLS] and [SEP]
        sep, cls = getattr(tokenizer, "sep_token_id", None), getattr(tokenizer, "cls_token_id", None)
        end = next((t for t in (tokenizer.eos_token_id, sep) if t is not None), None)
        if end is None:
            raise ValueError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos or [SEP] token to end a sequence"
            )
        start = next(t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, cls, end) if t is not None)
        self.start_id: int = int(start)
        self.eos_id: int = int(end)
        self.pad_id: int = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id)
        if prompt_format == "chat":
            before, after = chat_template_parts(tokenizer)
            self.head, self.tail = self.tokens(before), self.tokens(after)
            if not self.head:
                raise ValueError("model.prompt_format=chat: the chat template puts nothing before the user turn")
        else:
            self.head, self.tail = [self.start_id], []
        if len(self.head) + len(self.tail) + 1 > max_length:
            raise ValueError(
                f"data.max_length={max_length} leaves no room for a prompt: the {prompt_format} prompt "
                f"format alone takes {len(self.head) + len(self.tail)} tokens"
            )
        self.truncated = 0  # number of examples shortened so far (results: truncated_prompts)

    def tokens(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def answer_tokens(self, answer: str, eos: bool = False) -> list[int]:
        """The answer's ids after a prompt (``" " + answer`` in ``plain``); ``eos`` appends EOS."""
        ids = self.tokens(" " + answer if self.prompt_format == "plain" else answer)
        return ids + [self.eos_id] if eos else ids

    @property
    def format_length(self) -> int:
        """Tokens of a prompt's ``head + tail`` (the part of the prompt format never cut)."""
        return len(self.head) + len(self.tail)

    def prompt_length(self, prompt: str) -> int:
        """Length of the uncut prompt encoding ``head + body + tail``."""
        return self.format_length + len(self.tokens(prompt))

    def _prompt(self, prompt: str, room: int) -> tuple[list[int], int]:
        """``head + body[-k:] + tail`` of at most ``room`` tokens, and the number of body tokens cut."""
        body = self.tokens(prompt)
        keep = max(0, min(len(body), room - self.format_length))
        return self.head + body[len(body) - keep :] + self.tail, len(body) - keep

    def answer_too_long(self, n_tokens: int, answer: str, where: str = "") -> ValueError:
        """The error for an answer of ``n_tokens`` that leaves no room in ``max_length``."""
        head = answer if len(answer) <= 60 else answer[:57] + "..."
        room = self.max_length - self.format_length
        return ValueError(
            f"{where or 'example'}: the answer {head!r} alone is {n_tokens} tokens, more than the "
            f"{room} that data.max_length={self.max_length} leaves after the {self.prompt_format} prompt format's "
            f"{self.format_length} token(s) (start token / chat template); raise data.max_length or shorten the answers"
        )

    def _count_truncation(self, what: str, before: int, after: int, where: str) -> None:
        self.truncated += 1
        if self.truncated == 1:
            log.warning(
                "%s%s of %d tokens cut to %d to fit data.max_length=%d (%s); further cuts are only "
                "counted (truncated_prompts in the results)",
                f"{where}: " if where else "",
                what,
                before,
                after,
                self.max_length,
                "its start dropped, the answer kept whole" if what == "prompt" else "its beginning kept",
            )

    def encode(self, prompt: str, answer: str, eos: bool, where: str = "") -> Encoded:
        """Encode one prompt/answer pair; ``eos`` appends EOS to the answer.

        ``where`` names the example (task, split, index) in the error and the log line.
        """
        if not prompt:  # raw text: [start] + text, longer text keeps its beginning
            text = self.tokens(answer) + ([self.eos_id] if eos else [])
            if len(text) > self.max_length - 1:
                self._count_truncation("text", len(text), self.max_length - 1, where)
                text = text[: self.max_length - 1]
            return Encoded(tuple([self.start_id] + text), 1)
        answer_ids = self.answer_tokens(answer, eos)
        room = self.max_length - len(answer_ids)
        if room < self.format_length:
            raise self.answer_too_long(len(answer_ids), answer, where)
        prompt_ids, cut = self._prompt(prompt, room)
        if cut:
            self._count_truncation(
                "prompt", len(prompt_ids) + cut - self.format_length, len(prompt_ids) - self.format_length, where
            )
        return Encoded(tuple(prompt_ids + answer_ids), len(prompt_ids))

    def encode_example(self, ex: Example, kind: str, where: str = "") -> Encoded:
        return self.encode(ex.prompt, ex.answer, eos=(kind == "generation"), where=where)

    def encode_prompt(self, prompt: str, room: int | None = None) -> list[int]:
        """A prompt's ids for scoring and generation: at most ``room`` tokens (default
        ``max_length``), cut like :meth:`encode` (only the body, from its start)."""
        return self._prompt(prompt, self.max_length if room is None else room)[0]


def collate(items: Sequence[Encoded], pad_id: int) -> dict[str, Tensor]:
    """Right-pad a batch. ``targets`` holds the token id at answer positions and -100 elsewhere."""
    width = max(len(it.ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    targets = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it.ids)
        ids[row, :n] = torch.tensor(it.ids)
        mask[row, :n] = 1
        targets[row, it.target_start : n] = ids[row, it.target_start : n]
    return {"input_ids": ids, "attention_mask": mask, "targets": targets}
