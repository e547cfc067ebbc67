"""Length-grouped batches (evaluation and training) and the useful/computed token ratio."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from lmas.data.task import Example
from lmas.lm.batching import (
    grouped_order,
    label_targets,
    label_tree,
    length_batches,
    padded_tokens,
    split_batches,
    token_ratio,
)
from lmas.lm.encoding import PromptEncoder
from lmas.training.experience import ExperienceData


def test_token_ratio_is_own_tokens_over_rows_times_longest():
    assert padded_tokens([3, 5, 1]) == 15 and padded_tokens([]) == 0
    assert token_ratio([[3, 5], [2]]) == pytest.approx(10 / 12)
    assert token_ratio([[4, 4, 4]]) == 1.0
    assert token_ratio([]) == 1.0
    assert split_batches(5, 2) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="batch_size=0"):
        split_batches(5, 0)


def _cost(batches, lengths, batch_cost):
    return sum(padded_tokens([lengths[i] for i in b]) + batch_cost for b in batches)


@pytest.mark.parametrize("batch_cost", [0, 3, 40])
def test_length_batches_is_the_cheapest_cut_of_the_sorted_lengths(batch_cost):
    rng = random.Random(batch_cost)
    for _ in range(30):
        lengths = [rng.randint(1, 20) for _ in range(rng.randint(1, 9))]
        cap = rng.randint(1, 4)
        got = length_batches(lengths, cap, batch_cost)
        assert sorted(i for b in got for i in b) == list(range(len(lengths)))  # every index once
        assert all(1 <= len(b) <= cap for b in got)
        flat = [lengths[i] for b in got for i in b]
        assert flat == sorted(lengths)  # shortest first, contiguous in the sorted order
        # brute force over every cut of the sorted order into batches of at most `cap`
        s, n = sorted(lengths), len(lengths)
        best = min(
            sum(padded_tokens(s[a:b]) + batch_cost for a, b in itertools.pairwise([0, *cuts, n]))
            for k in range(n)
            for cuts in itertools.combinations(range(1, n), k)
            if all(b - a <= cap for a, b in itertools.pairwise([0, *cuts, n]))
        )
        assert _cost(got, lengths, batch_cost) == best


def test_length_batches_by_hand():
    assert length_batches([10, 1, 10, 1], 2, batch_cost=0) == [[1, 3], [0, 2]]
    assert length_batches([10, 1, 10, 1], 4, batch_cost=0) == [[1, 3], [0, 2]]  # 2+20+2 passes < 40
    assert length_batches([10, 1, 10, 1], 4, batch_cost=100) == [[1, 3, 0, 2]]  # a pass costs more than padding
    assert length_batches([], 4) == []
    with pytest.raises(ValueError, match="batch_size=0"):
        length_batches([1], 0)


def test_grouped_order_serves_similar_lengths_together_in_a_seeded_random_order():
    rng = random.Random(0)
    lengths = [rng.randint(5, 200) for _ in range(43)]
    gen = torch.Generator().manual_seed(1)
    epochs = [grouped_order(lengths, 8, gen) for _ in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(43))
        batches = [order[i : i + 8] for i in range(0, 43, 8)]
        assert [len(b) for b in batches] == [8] * 5 + [3]  # the short batch comes last
        s = sorted(lengths)
        for b in batches:  # each batch is a run of neighbours in the sorted lengths
            mine = sorted(lengths[i] for i in b)
            assert any(s[k : k + len(b)] == mine for k in range(len(s) - len(b) + 1))
        assert token_ratio([[lengths[i] for i in b] for b in batches]) > 0.85
    assert epochs[0] != epochs[1] != epochs[2]  # the order varies per epoch
    again = torch.Generator().manual_seed(1)
    assert grouped_order(lengths, 8, again) == epochs[0]  # and depends only on the seed
    other = torch.Generator().manual_seed(2)
    assert grouped_order(lengths, 8, other) != epochs[0]
    shuffled = split_batches(43, 8)
    plain = token_ratio([[lengths[i] for i in b] for b in shuffled])
    assert plain < 0.7  # what grouping saves on these lengths


def test_grouped_order_varies_equal_length_members_and_the_short_batchs_place():
    lengths = [1] * 6 + [2] * 6 + [3]
    seen_first, seen_short = set(), set()
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        order = grouped_order(lengths, 4, gen)
        seen_short.add(tuple(sorted(lengths[i] for i in order[12:])))
        seen_first.add(tuple(sorted(order[:4])))
    assert len(seen_short) > 1 and len(seen_first) > 3


def test_experience_data_with_length_grouping_gives_grouped_batches_of_every_example(tiny_base):
    enc = PromptEncoder(tiny_base.tokenizer, max_length=64)
    rng = random.Random(0)
    examples = [(Example(" ".join(["w"] * rng.randint(1, 40)) + "\nA:", "yes"), "classification") for _ in range(30)]
    grouped = ExperienceData(enc, examples, batch_size=4, seed=3, length_grouping=True)
    plain = ExperienceData(enc, examples, batch_size=4, seed=3, length_grouping=False)

    def epoch(data):
        batches = list(data.train_dataloader())
        assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(30))
        return [b["attention_mask"].sum(1).tolist() for b in batches]

    g, p = epoch(grouped), epoch(plain)
    assert [len(b) for b in g] == [4] * 7 + [2]
    assert token_ratio(g) > 0.9 > 0.8 > token_ratio(p)
    loader = grouped.train_dataloader()
    assert [b["index"].tolist() for b in loader] != [b["index"].tolist() for b in loader]  # new order each epoch


def test_label_tree_rows_see_the_prompt_and_their_own_label_only():
    ids, allowed, pos = label_tree([[5, 6, 7], [8]], [[1], [], [2, 3]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 1, 2, 3], [8, 1, 2, 3, 0, 0]]
    assert pos.tolist() == [[0, 1, 2, 3, 3, 4], [0, 1, 1, 2, 0, 0]]
    a = allowed[0].int().tolist()
    assert a[3] == [1, 1, 1, 1, 0, 0]  # label 0's token: the prompt and itself
    assert a[5] == [1, 1, 1, 0, 1, 1]  # label 2's second token: the prompt and label 2's tokens
    assert allowed[1, 4].int().tolist() == [0, 0, 0, 0, 1, 0]  # padding sees itself only
    assert label_targets([[9], [4, 5], [6, 7, 8]]) == ([0, 1, 2], [5, 7, 8], [1, 2, 2])


def test_the_loop_trains_on_length_grouped_batches_when_asked(tiny_base, tmp_path, one_thread):
    from lmas.data.stream import Stream
    from lmas.data.task import Task
    from lmas.loop import ContinualLoop, TrainConfig
    from lmas.population.population import Population
    from lmas.strategies.base import Strategy

    class Recorder(Strategy):
        def __init__(self) -> None:
            self.batches: list[list[int]] = []

        def on_train_batch_start(self, module, batch) -> None:
            self.batches.append(batch["index"].tolist())

    rng = random.Random(1)
    train = [Example(" ".join(["w"] * rng.randint(1, 30)) + "\nA:", "yes") for _ in range(14)]
    task = Task("t", "classification", train, [], train[:2], labels=["yes", "no"])
    pop = Population(tiny_base, agents=1, lora={"r": 2, "alpha": 4})
    seen = {}
    for flag in (False, True):
        rec = Recorder()
        loop = ContinualLoop(pop, Stream("s", [task]), rec, tmp_path / str(flag), seed=0, progress=False,
                             train=TrainConfig(batch_size=4, epochs=2, length_grouping=flag), max_length=64,
                             trainer={"accelerator": "cpu", "devices": 1}, save_adapters=False)
        loop.fit(pop.names[0], task, [], 0)
        seen[flag] = rec.batches
    lengths = [len(loop.encoder.encode_example(ex, "classification").ids) for ex in train]
    gen = torch.Generator().manual_seed(0)  # ContinualLoop.fit's seed for seed 0, round 0, the first agent
    want = [grouped_order(lengths, 4, gen) for _ in range(2)]
    assert seen[True] == [e[i : i + 4] for e in want for i in range(0, 14, 4)]
    assert seen[False] != seen[True] and sorted(sum(seen[False][:4], [])) == list(range(14))
