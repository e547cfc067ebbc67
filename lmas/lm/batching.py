"""Which sequences share a batch: length-grouped batches, and the share of computed tokens that are useful.

A padded batch computes ``rows × longest`` tokens; only the sequences' own tokens are useful. Grouping
sequences of similar length wastes less (benchmarks/padding.py measures it on the default stream and the
long-sequence benchmark):

* evaluation (:func:`length_batches`): the sequences sorted by length and cut into batches of at most
  ``batch_size`` rows where the padding saved pays for another pass; every result is put back in the
  original order, and a row's result does not depend on its batch (up to float rounding);
* training (:class:`LengthGroupedSampler`, ``train.length_grouping``): a seeded shuffle, sorted by
  length, cut into batches whose order is shuffled, so batches hold similar lengths while their
  order (and, among equal lengths, their members) still varies per epoch and seed.

Rank classification scores every label in the prompt's own pass (:func:`label_tree`): the prompt,
then each label's tokens side by side, each label seeing only the prompt and its own earlier tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Sampler

# A pass over a batch costs about this many tokens' work beyond its tokens: SmolLM2 on this CPU with 1 thread
# takes ~76 ms for a 1-token pass and ~2.8 ms per token in a batch of 8 x 64, i.e. ~28 tokens
# (benchmarks/padding.py, scoring.pass). A GPU's fixed cost per pass is worth far more tokens.
BATCH_COST = 32


def padded_tokens(lengths: Sequence[int]) -> int:
    """Tokens a right- or left-padded batch of these sequence lengths computes: rows × longest."""
    return len(lengths) * max(lengths) if lengths else 0


def token_ratio(batches: Iterable[Sequence[int]]) -> float:
    """Useful / computed tokens of padded batches, each given as its sequences' lengths.

    Useful tokens are the sequences' own; computed ones include the padding up to each batch's longest
    sequence: ``sum(lengths) / sum(rows * longest)``. 1.0 means no padding; 1.0 for no tokens at all.
    """
    useful = computed = 0
    for lengths in batches:
        useful += sum(lengths)
        computed += padded_tokens(lengths)
    return useful / computed if computed else 1.0


def split_batches(n: int, batch_size: int) -> list[list[int]]:
    """Indices ``0 .. n-1`` in order, cut into batches of ``batch_size`` (the last one shorter)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be a positive integer")
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


def length_batches(lengths: Sequence[int], batch_size: int, batch_cost: int = BATCH_COST) -> list[list[int]]:
    """Indices of ``lengths`` in batches of similar length: at most ``batch_size`` rows each.

    The indices are sorted by length (ties keep their order) and cut where the cost is least, a batch
    costing its padded tokens plus ``batch_cost`` (the work of one more pass, in tokens): exact
    dynamic programming over the cut points, ``O(n × batch_size)``. ``batch_cost=0`` would give
    batches of one length each. Returns the batches shortest first; every index appears once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be a positive integer")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    s = [lengths[i] for i in order]
    best = [0.0] + [float("inf")] * len(s)  # best[i]: least cost of the first i sorted sequences
    cut = [0] * (len(s) + 1)  # where the last batch of that best starts
    for i in range(1, len(s) + 1):
        for j in range(max(0, i - batch_size), i):  # the last batch is s[j:i]; its longest is s[i-1]
            cost = best[j] + (i - j) * s[i - 1] + batch_cost
            if cost < best[i]:
                best[i], cut[i] = cost, j
    out: list[list[int]] = []
    i = len(s)
    while i > 0:
        out.append(order[cut[i] : i])
        i = cut[i]
    return out[::-1]


def grouped_order(lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> list[int]:
    """One epoch's order of the indices of ``lengths``: consecutive runs of ``batch_size`` have similar length.

    A seeded shuffle is sorted by length (equal lengths stay shuffled) and cut into batches of
    ``batch_size``; the short batch (``n mod batch_size`` rows) takes a random place in the sorted
    order and is served last, so that every run of ``batch_size`` before it is one full batch; the
    full batches are served in a random order. All draws come from ``generator``.
    """
    n = len(lengths)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be a positive integer")
    perm = torch.randperm(n, generator=generator).tolist()
    ranked = sorted(perm, key=lambda i: lengths[i])  # stable: ties keep the shuffled order
    n_full, rest = divmod(n, batch_size)
    short_at = int(torch.randint(n_full + 1, (1,), generator=generator)) if rest else n_full
    sizes = [batch_size] * short_at + ([rest] if rest else []) + [batch_size] * (n_full - short_at)
    batches, start = [], 0
    for size in sizes:
        batches.append(ranked[start : start + size])
        start += size
    short = batches.pop(short_at) if rest else []
    served = [batches[k] for k in torch.randperm(len(batches), generator=generator).tolist()]
    return [i for b in served for i in b] + short


class LengthGroupedSampler(Sampler[int]):
    """Indices in :func:`grouped_order`, drawn anew each epoch from ``generator`` (``train.length_grouping``).

    Meant for a ``DataLoader`` with the same ``batch_size``, ``shuffle=False`` and ``drop_last=False``:
    its consecutive runs of ``batch_size`` indices are then exactly the length-grouped batches.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> None:
        self.lengths, self.batch_size, self.generator = list(lengths), batch_size, generator

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(grouped_order(self.lengths, self.batch_size, self.generator))


# --- rank classification: every label in the prompt's own pass --------------------------------------
def label_targets(label_ids: Sequence[Sequence[int]]) -> tuple[list[int], list[int], list[int]]:
    """Where the label tokens after the first are predicted in :func:`label_tree`'s columns.

    The labels' inputs (each label without its last token) follow the prompt side by side; label
    ``j``'s token ``k >= 1`` is predicted at offset ``rel`` after the prompt's last column (which itself
    predicts every label's first token). Returns ``rel``, the predicted token ids and their label ``j``.
    """
    rel: list[int] = []
    tgt: list[int] = []
    owner: list[int] = []
    off = 0
    for j, lab in enumerate(label_ids):
        rel += [off + k for k in range(len(lab) - 1)]
        tgt += list(lab[1:])
        owner += [j] * (len(lab) - 1)
        off += len(lab) - 1
    return rel, tgt, owner


def label_tree(
    prompts: Sequence[Sequence[int]], inputs: Sequence[Sequence[int]], pad_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """One right-padded row per prompt: the prompt, then every label's ``inputs`` side by side.

    Label ``j``'s tokens see the prompt and their own earlier tokens only, at the positions they take
    right after the prompt, so each label is scored as if it followed the prompt alone. A row's real
    tokens never see padding. Returns ids (B, T), allowed attention (B, T, T) (query, key) and
    positions (B, T); padding positions see themselves only, so no softmax row is empty.
    """
    flat = [t for lab in inputs for t in lab]
    b, total = len(prompts), max(len(p) for p in prompts) + len(flat)
    ids = torch.full((b, total), pad_id, dtype=torch.long)
    pos = torch.zeros((b, total), dtype=torch.long)
    allowed = torch.zeros((b, total, total), dtype=torch.bool)
    for row, e in enumerate(prompts):
        p = len(e)
        ids[row, : p + len(flat)] = torch.tensor(list(e) + flat, dtype=torch.long)
        pos[row, :p] = torch.arange(p)
        allowed[row, :p, :p] = torch.ones(p, p, dtype=torch.bool).tril()
        col = p
        for lab in inputs:
            n = len(lab)
            pos[row, col : col + n] = p + torch.arange(n)
            allowed[row, col : col + n, :p] = True
            allowed[row, col : col + n, col : col + n] = torch.ones(n, n, dtype=torch.bool).tril()
            col += n
    allowed |= torch.eye(total, dtype=torch.bool)
    return ids, allowed, pos
