"""KD losses and top-k reconstruction, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from lmas.distill.losses import dense, divergence, kd_loss, soften, topk
from lmas.distill.teachers import aggregate

P = torch.tensor([[0.7, 0.2, 0.1]])
Q = torch.tensor([[0.5, 0.25, 0.25]])


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_forward_reverse_kl_and_jsd_match_hand_computation():
    p, q = P[0].tolist(), Q[0].tolist()
    # student = Q, teacher = P
    assert divergence(Q.log(), P, "forward_kl").item() == pytest.approx(_kl(p, q), rel=1e-5)
    assert divergence(Q.log(), P, "reverse_kl").item() == pytest.approx(_kl(q, p), rel=1e-5)
    m = [(a + b) / 2 for a, b in zip(p, q)]
    assert divergence(Q.log(), P, "jsd").item() == pytest.approx(0.5 * _kl(p, m) + 0.5 * _kl(q, m), rel=1e-5)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert divergence(P.log(), P, kind).item() == pytest.approx(0.0, abs=1e-6)
    # JSD is symmetric and below ln 2 even for disjoint supports
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    jsd = divergence(b.clamp_min(1e-30).log(), a, "jsd").item()
    assert jsd == pytest.approx(math.log(2), rel=1e-4)
    with pytest.raises(ValueError, match="distill.loss='kl'"):
        divergence(Q.log(), P, "kl")


def test_generalized_jsd_and_skew_kls_match_hand_computation():
    p, q = P[0].tolist(), Q[0].tolist()  # teacher P, student Q
    for beta in (0.1, 0.5, 0.9):
        m = [beta * a + (1 - beta) * b for a, b in zip(p, q)]
        want = beta * _kl(p, m) + (1 - beta) * _kl(q, m)
        assert divergence(Q.log(), P, "gjsd", beta=beta).item() == pytest.approx(want, rel=1e-5), beta
    assert divergence(Q.log(), P, "gjsd", beta=0.5).item() == pytest.approx(divergence(Q.log(), P, "jsd").item())
    assert divergence(Q.log(), P, "gjsd", beta=0.0).item() == pytest.approx(_kl(p, q), rel=1e-5)  # forward KL
    assert divergence(Q.log(), P, "gjsd", beta=1.0).item() == pytest.approx(_kl(q, p), rel=1e-5)  # reverse KL
    for alpha in (0.1, 0.5):
        skewed = [alpha * a + (1 - alpha) * b for a, b in zip(p, q)]  # alpha p_T + (1 - alpha) p_S
        assert divergence(Q.log(), P, "skew_kl", skew=alpha).item() == pytest.approx(_kl(p, skewed), rel=1e-5)
        rskewed = [(1 - alpha) * a + alpha * b for a, b in zip(p, q)]  # (1 - alpha) p_T + alpha p_S
        assert divergence(Q.log(), P, "skew_rkl", skew=alpha).item() == pytest.approx(_kl(q, rskewed), rel=1e-5)
    assert divergence(Q.log(), P, "skew_kl", skew=0.0).item() == pytest.approx(_kl(p, q), rel=1e-5)
    assert divergence(Q.log(), P, "skew_rkl", skew=0.0).item() == pytest.approx(_kl(q, p), rel=1e-5)
    # the skew bounds the loss where the student misses the teacher's mass: KL(p || a p + ...) <= -log a
    miss = torch.tensor([[1e-30, 1.0]]).log()
    assert divergence(miss, torch.tensor([[1.0, 0.0]]), "skew_kl", skew=0.1).item() == pytest.approx(-math.log(0.1))
    with pytest.raises(ValueError, match=r"distill\.beta=1\.5"):
        divergence(Q.log(), P, "gjsd", beta=1.5)
    with pytest.raises(ValueError, match=r"distill\.skew=1\.0"):
        divergence(Q.log(), P, "skew_kl", skew=1.0)


def test_generalized_jsd_equals_trls_gkd_loss():
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 11, generator=gen) * 2, torch.randn(6, 11, generator=gen) * 2
    for beta in (0.0, 0.3, 0.5, 1.0):
        for t in (1.0, 2.0):
            want = gkd.GKDTrainer.generalized_jsd_loss(student, teacher, beta=beta, temperature=t)
            got = divergence((student / t).log_softmax(-1), soften(teacher, t), "gjsd", beta=beta).mean()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_kd_loss_softens_the_student_and_scales_by_t_squared():
    z = torch.tensor([[2.0, 0.0, -1.0]])
    t = 2.0
    student = (z / t).softmax(-1)
    expected = _kl(P[0].tolist(), student[0].tolist()) * t * t
    assert kd_loss(z, P, "forward_kl", t).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="differ in shape"):
        kd_loss(z, torch.ones(1, 4) / 4)


def test_kd_gradient_moves_the_student_towards_the_teacher():
    z = torch.zeros(1, 3, requires_grad=True)
    kd_loss(z, P, "forward_kl", 1.0).backward()
    assert z.grad[0, 0] < 0 < z.grad[0, 2]  # raise the teacher's favourite, lower its least liked


def test_topk_and_dense_keep_the_top_mass_and_spread_the_rest():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0, -2.0]])
    values, indices = topk(logits, 2, temperature=1.0)
    full = soften(logits)
    assert indices.tolist() == [[0, 1]]
    d = dense(values, indices, 5)
    torch.testing.assert_close(d[0, :2], full[0, :2])
    assert d.sum().item() == pytest.approx(1.0, abs=1e-6)
    rest = (1 - full[0, :2].sum()) / 3
    torch.testing.assert_close(d[0, 2:], rest.expand(3))


def test_aggregate_uses_the_fusion_weights():
    tp = torch.stack([P, Q])  # (K=2, N=1, C=3)
    torch.testing.assert_close(aggregate(tp, "uniform"), (P + Q) / 2)
    torch.testing.assert_close(aggregate(tp, "val_acc", [3.0, 1.0]), 0.75 * P + 0.25 * Q)
    torch.testing.assert_close(aggregate(tp, "best"), P)  # P has the lower entropy
    with pytest.raises(ValueError, match="distill.aggregation"):
        aggregate(tp, "route")
