"""The strategies' math, by hand: EWC, L2, A-GEM, O-LoRA, LwF, and the replay buffers' sampling."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from lmas.data.task import Example
from lmas.strategies.agem import agem_project
from lmas.strategies.lwf import lwf_loss
from lmas.strategies.olora import layer_key, olora_l2, olora_orthogonality
from lmas.strategies.regularizers import diagonal_fisher, ewc_penalty, l2_penalty, online_fisher
from lmas.strategies.replay import ReservoirBuffer, TaskBalancedBuffer, balanced_shares


def _items(n: int, tag: str = "x") -> list[tuple[Example, str]]:
    return [(Example(f"{tag}{i}", "a"), "classification") for i in range(n)]


# --- EWC / L2 ---------------------------------------------------------------------------------
def test_ewc_penalty_by_hand():
    params = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[3.0]]), "new": torch.tensor([9.0])}
    anchors = {"w": torch.tensor([0.0, 1.0]), "b": torch.tensor([[1.0]])}
    fisher = {"w": torch.tensor([2.0, 3.0]), "b": torch.tensor([[0.5]])}
    # 2*(1-0)^2 + 3*(2-1)^2 + 0.5*(3-1)^2 = 2 + 3 + 2; "new" has no anchor and does not count
    assert ewc_penalty(params, anchors, fisher).item() == pytest.approx(7.0)
    assert l2_penalty(params, anchors).item() == pytest.approx(1 + 1 + 4)
    assert ewc_penalty(params, {}, {}).item() == 0.0


def test_diagonal_fisher_is_the_mean_of_squared_batch_gradients():
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    batches = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])]
    # loss = (w * b).sum() + w0^2  ->  grad = b + [2 w0, 0] = b + [2, 0]
    fisher = diagonal_fisher(lambda b: (w * b).sum() + w[0] ** 2, batches, {"w": w})
    grads = [b + torch.tensor([2.0, 0.0]) for b in batches]
    torch.testing.assert_close(fisher["w"], sum(g**2 for g in grads) / 3)
    assert w.grad is None  # autograd.grad: .grad untouched
    with pytest.raises(ValueError, match="no batches"):
        diagonal_fisher(lambda b: b, [], {"w": w})


def test_online_fisher_decays_the_old_estimate():
    old = {"a": torch.tensor([4.0]), "gone": torch.tensor([1.0])}
    new = {"a": torch.tensor([1.0]), "head": torch.tensor([2.0])}
    out = online_fisher(old, new, decay=0.5)
    assert out["a"].item() == 3.0 and out["head"].item() == 2.0 and "gone" not in out


# --- A-GEM ------------------------------------------------------------------------------------
def test_agem_projection_by_hand_and_its_invariants():
    g, ref = torch.tensor([1.0, -1.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(agem_project(g, ref), torch.tensor([1.0, 0.0]))
    gen = torch.Generator().manual_seed(0)
    conflicts = 0
    for _ in range(200):
        g, ref = torch.randn(50, generator=gen), torch.randn(50, generator=gen)
        out = agem_project(g, ref)
        if torch.dot(g, ref) >= 0:
            assert out is g  # unchanged when it does not conflict with the memory
        else:
            conflicts += 1
            assert torch.dot(out, ref).item() >= -1e-5  # projected onto the half-space g.ref >= 0
            assert torch.dot(out, ref).item() == pytest.approx(0.0, abs=1e-5)
            # the projection is the closest such vector: g - out is parallel to ref
            diff = g - out
            assert abs(torch.dot(diff, ref).item()) == pytest.approx((diff.norm() * ref.norm()).item(), rel=1e-4)
    assert 50 < conflicts < 150


# --- O-LoRA -----------------------------------------------------------------------------------
def test_olora_orthogonality_is_zero_for_orthogonal_subspaces_and_l1_otherwise():
    e = torch.eye(4)
    assert olora_orthogonality([e[:2]], e[2:]).item() == 0.0
    prev = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    cur = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, -2.0, 0.0, 0.0]])
    # prev @ cur^T = [[1, -2]] -> |.| summed = 3; two earlier tasks add up
    assert olora_orthogonality([prev], cur).item() == pytest.approx(3.0)
    assert olora_orthogonality([prev, 2 * prev, e[2:]], cur).item() == pytest.approx(9.0)
    assert olora_orthogonality([], cur).item() == 0.0
    # the L2 term is the sum of unsquared Frobenius norms
    assert olora_l2([torch.tensor([[3.0, 4.0]]), torch.tensor([1.0])]).item() == pytest.approx(6.0)
    cur.requires_grad_(True)
    olora_orthogonality([prev], cur).backward()
    assert cur.grad.abs().sum() > 0


def test_layer_key_matches_peft_names():
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.agent0-t1.weight"
    assert layer_key(name, "agent0-t1") == "base_model.model.model.layers.0.self_attn.q_proj"
    assert layer_key(name, "agent0") is None
    assert layer_key(name.replace("lora_A", "lora_B"), "agent0-t1") is None


# --- LwF --------------------------------------------------------------------------------------
def test_lwf_loss_is_batchmean_kl_at_temperature_without_t_squared():
    s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    t = torch.tensor([[0.0, 2.0, 0.0], [1.0, -1.0, 0.0]])
    T = 2.0
    p = torch.softmax(t / T, -1)
    by_hand = (p * (p.log() - torch.log_softmax(s / T, -1))).sum() / 2
    assert lwf_loss(s, t, T).item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert lwf_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-7)


# --- replay buffers ---------------------------------------------------------------------------
def test_reservoir_keeps_every_item_with_equal_probability():
    # 20 items offered in 3 calls, capacity 5: each item is kept with p = 5/20 = 0.25. Over 2000
    # seeds an item's keep count is Binomial(2000, 0.25): mean 500, sd sqrt(2000*.25*.75) = 19.4.
    # A bound of 5 sd (97) fails by chance with probability < 20 * 6e-7 for the 20 items; the
    # seeds are fixed, so the test is deterministic. A biased reservoir (e.g. keeping the first
    # or last items) puts items at 0 or 2000.
    n, cap, runs = 20, 5, 2000
    items = _items(n)
    counts = {ex.prompt: 0 for ex, _ in items}
    for seed in range(runs):
        buf = ReservoirBuffer(cap, seed)
        buf.add(items[:3], "t")
        buf.add(items[3:12], "t")
        buf.add(items[12:], "t")
        kept = buf.items()
        assert len(kept) == cap and len({ex.prompt for ex, _ in kept}) == cap
        for ex, _ in kept:
            counts[ex.prompt] += 1
    expected = runs * cap / n
    sd = math.sqrt(runs * (cap / n) * (1 - cap / n))
    assert max(abs(c - expected) for c in counts.values()) < 5 * sd
    # and the spread is binomial-like, not degenerate: chi-square-like statistic near n (1 - p)
    stat = sum((c - expected) ** 2 for c in counts.values()) / expected
    assert stat < 3 * n


def test_reservoir_under_capacity_keeps_everything_in_order_and_sample_is_capped():
    buf = ReservoirBuffer(10, 0)
    buf.add(_items(4), "t")
    assert [ex.prompt for ex, _ in buf.items()] == ["x0", "x1", "x2", "x3"]
    got = buf.sample(100, random.Random(0))
    assert len(got) == 4 and len(set(got)) == 4
    assert buf.sample(0, random.Random(0)) == []


def test_task_balanced_shares_follow_avalanche_rule():
    assert balanced_shares(10, 3) == [4, 3, 3]
    assert balanced_shares(7, 2) == [4, 3]
    assert balanced_shares(5, 6) == [1, 1, 1, 1, 1, 0]
    buf = TaskBalancedBuffer(10, seed=1)
    buf.add(_items(8, "a"), "a")
    assert buf.sizes() == {"a": 8}
    buf.add(_items(8, "b"), "b")
    assert buf.sizes() == {"a": 5, "b": 5}
    buf.add(_items(2, "c"), "c")
    assert buf.sizes() == {"a": 4, "b": 3, "c": 2}
    buf.add(_items(9, "d"), "d")
    assert buf.sizes() == {"a": 3, "b": 3, "c": 2, "d": 2}
    # each group only holds its own task's items
    for name, group in buf.groups.items():
        assert all(ex.prompt.startswith(name) for ex, _ in group.items())


def test_task_balanced_keeps_each_item_of_a_task_equally_likely():
    counts = [0] * 12
    for seed in range(600):
        buf = TaskBalancedBuffer(6, seed)
        buf.add(_items(12, "a"), "a")  # 6 of 12 kept
        buf.add(_items(12, "b"), "b")  # a shrinks to 3 of 12
        for ex, _ in buf.groups["a"].items():
            counts[int(ex.prompt[1:])] += 1
    # Binomial(600, 0.25): mean 150, sd 10.6; 5 sd bound as above
    assert max(abs(c - 150) for c in counts) < 5 * 10.6


@pytest.mark.parametrize("kind", [ReservoirBuffer, TaskBalancedBuffer])
def test_buffer_state_is_json_and_resumes_identically(kind):
    a = kind(5, 3)
    a.add(_items(9, "p"), "p")
    state = json.loads(json.dumps(a.state_dict()))
    b = kind(1, 0)
    b.load_state_dict(state)
    assert b.items() == a.items()
    a.add(_items(9, "q"), "q")
    b.add(_items(9, "q"), "q")
    assert b.items() == a.items()
    assert a.sample(3, random.Random(1)) == b.sample(3, random.Random(1))
