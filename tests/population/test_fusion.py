"""Result fusion and the cascade, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from lmas.population.fusion import cascade, entropy, fuse, fusion_weights, label_distributions


def _lp(probs):
    """Label log-likelihoods whose label softmax is ``probs`` (A, N, L)."""
    return torch.tensor(probs).log()


def test_uniform_fusion_is_the_mean_distribution():
    lp = _lp([[[0.9, 0.1]], [[0.3, 0.7]]])
    torch.testing.assert_close(fuse(lp, "uniform"), torch.tensor([[0.6, 0.4]]))


def test_label_distributions_normalise_unnormalised_log_likelihoods():
    lp = torch.tensor([[[-1.0, -3.0]]])  # log-likelihoods of two labels, not a distribution
    p = label_distributions(lp)
    torch.testing.assert_close(p, torch.tensor([[[1 / (1 + math.exp(-2)), math.exp(-2) / (1 + math.exp(-2))]]]))


def test_val_acc_weights_follow_validation_accuracy():
    lp = _lp([[[0.9, 0.1]], [[0.2, 0.8]]])
    # agent 1 is three times as accurate: weights 0.25 / 0.75
    torch.testing.assert_close(fuse(lp, "val_acc", [0.2, 0.6]), torch.tensor([[0.25 * 0.9 + 0.75 * 0.2,
                                                                                0.25 * 0.1 + 0.75 * 0.8]]))
    # all zero: uniform
    torch.testing.assert_close(fuse(lp, "val_acc", [0.0, 0.0]), fuse(lp, "uniform"))
    with pytest.raises(ValueError, match="one validation accuracy per agent"):
        fuse(lp, "val_acc", [0.5])


def test_confidence_weights_are_a_softmax_of_negative_entropy_per_example():
    probs = torch.tensor([[[0.5, 0.5], [0.99, 0.01]], [[0.9, 0.1], [0.5, 0.5]]])
    w = fusion_weights("confidence", probs)
    h = entropy(probs)
    expected = torch.stack([(-h[:, n]).softmax(0) for n in range(2)], 1)
    torch.testing.assert_close(w, expected)
    assert w[1, 0] > w[0, 0] and w[0, 1] > w[1, 1]  # the confident agent weighs more, per example
    torch.testing.assert_close(w.sum(0), torch.ones(2))


def test_best_picks_the_lowest_entropy_agent_per_example():
    probs = torch.tensor([[[0.5, 0.5], [0.99, 0.01]], [[0.9, 0.1], [0.5, 0.5]]])
    fused = fuse(probs.log(), "best")
    torch.testing.assert_close(fused, torch.tensor([[0.9, 0.1], [0.99, 0.01]]))


def test_select_answers_with_the_agent_best_on_validation_for_every_example():
    lp = _lp([[[0.9, 0.1], [0.6, 0.4]], [[0.2, 0.8], [0.3, 0.7]], [[0.5, 0.5], [0.5, 0.5]]])
    torch.testing.assert_close(fuse(lp, "select", [0.5, 0.75, 0.75]), lp[1].exp())  # ties: the first best
    torch.testing.assert_close(fusion_weights("select", lp.exp(), [0.9, 0.1, 0.0]), torch.tensor([[1.0, 1.0],
                               [0.0, 0.0], [0.0, 0.0]]))  # fmt: skip
    with pytest.raises(ValueError, match="fusion='select' needs one validation accuracy per agent"):
        fuse(lp, "select")


def test_unknown_fusion_is_named():
    with pytest.raises(ValueError, match="fusion='vote'"):
        fuse(torch.zeros(2, 1, 2), "vote")


def test_cascade_escalates_unconfident_examples():
    # agent 0 is sure of example 0 only; agent 1 sure of example 1; example 2 reaches the last agent
    probs = [[[0.95, 0.05], [0.6, 0.4], [0.55, 0.45]],
             [[0.1, 0.9], [0.2, 0.8], [0.6, 0.4]],
             [[0.3, 0.7], [0.3, 0.7], [0.4, 0.6]]]
    pred, level = cascade(_lp(probs), threshold=0.7)
    assert level.tolist() == [0, 1, 2]
    assert pred.tolist() == [0, 1, 1]
    # threshold 0: the first agent answers everything; threshold 1: everything goes to the last
    assert cascade(_lp(probs), 0.0)[1].tolist() == [0, 0, 0]
    assert cascade(_lp(probs), 1.0)[1].tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="threshold"):
        cascade(_lp(probs), 1.5)
