"""lmas' strategy math agrees with avalanche-lib's own objects on the same model, data and seed.

Avalanche is driven through its plugins and buffers with minimal strategy stand-ins (the
attributes each hook reads), on a small tensor classifier; our pure functions get the same model
and data:

* EWC: ``EWCPlugin.after_training_exp`` (``compute_importances`` + ``update_importances``) on two
  experiences, then ``before_backward`` — Fisher (separate and online) and the penalty;
* LwF: ``LearningWithoutForgetting.__call__`` with every output unit active;
* A-GEM: ``AGEMPlugin.before_training_iteration`` (reference gradient) and ``after_backward``
  (projection), both when the gradients conflict and when they do not;
* replay: ``ReservoirSamplingBuffer`` selection frequencies, ``ExperienceBalancedBuffer`` sizes.

Tolerance: 1e-5 relative / 1e-7 absolute for float32 math done in a different order (the same
operations, so agreement is usually exact); frequencies within a binomial bound (see below).
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from avalanche.benchmarks.utils import AvalancheDataset
from avalanche.training import LearningWithoutForgetting
from avalanche.training.plugins import AGEMPlugin, EWCPlugin
from avalanche.training.storage_policy import ExperienceBalancedBuffer, ReservoirSamplingBuffer

from lmas.data.task import Example
from lmas.strategies.agem import agem_project, flat_grads
from lmas.strategies.lwf import lwf_loss
from lmas.strategies.regularizers import diagonal_fisher, ewc_penalty, online_fisher
from lmas.strategies.replay import ReservoirBuffer, TaskBalancedBuffer

RTOL, ATOL = 1e-5, 1e-7


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))


def _data(seed: int, n: int = 20):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen)
    y = torch.randint(0, 4, (n,), generator=gen)
    return x, y


def _dataset(x, y):
    return TensorDataset(x, y, torch.zeros(len(y), dtype=torch.long))  # (x, y, task label)


def _our_fisher(model, x, y, batch_size):
    batches = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)]
    loss = nn.CrossEntropyLoss()
    model.eval()
    try:
        return diagonal_fisher(lambda b: loss(model(b[0]), b[1]), batches, dict(model.named_parameters()))
    finally:
        model.train()


def _perturb(model, scale: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("mode,decay", [("separate", None), ("online", 0.6)])
def test_ewc_fisher_and_penalty_match_avalanche(mode, decay):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plugin = EWCPlugin(ewc_lambda=3.5, mode=mode, decay_factor=decay)
    strategy = SimpleNamespace(model=model, _criterion=nn.CrossEntropyLoss(), optimizer=opt, device="cpu",
                               train_mb_size=6, clock=SimpleNamespace(train_exp_counter=0))
    ours_entries = []
    for exp, seed in enumerate([1, 2]):
        x, y = _data(seed)
        strategy.experience = SimpleNamespace(dataset=_dataset(x, y))
        strategy.clock.train_exp_counter = exp
        fisher = _our_fisher(model, x, y, batch_size=6)  # 20 rows -> batches of 6, 6, 6, 2
        anchors = {n: p.detach().clone() for n, p in model.named_parameters()}
        plugin.after_training_exp(strategy)
        if mode == "separate":
            ref = plugin.importances[exp]
            for n, f in fisher.items():
                torch.testing.assert_close(f, ref[n].data, rtol=RTOL, atol=ATOL)
            ours_entries.append((anchors, fisher))
        else:
            merged = fisher if not ours_entries else online_fisher(ours_entries[0][1], fisher, decay)
            for n, f in merged.items():
                torch.testing.assert_close(f, plugin.importances[exp][n].data, rtol=RTOL, atol=ATOL)
            ours_entries = [(anchors, merged)]
        _perturb(model, 0.3, seed=10 + exp)  # "training" on the next experience moves the weights
    # the penalty during the third experience
    strategy.clock.train_exp_counter = 2
    strategy.loss = torch.zeros(())
    plugin.before_backward(strategy)
    params = dict(model.named_parameters())
    ours = 3.5 * sum(ewc_penalty(params, a, f) for a, f in ours_entries)
    assert strategy.loss.item() > 0
    assert ours.item() == pytest.approx(strategy.loss.item(), rel=RTOL)


def test_lwf_loss_matches_avalanche():
    student = _model(0)
    teacher = copy.deepcopy(student)
    _perturb(teacher, 0.5, seed=3)
    x, _ = _data(4)
    lwf = LearningWithoutForgetting(alpha=0.7, temperature=2.5)
    lwf.prev_model = teacher
    lwf.prev_classes_by_task[0] = set(range(4))  # every unit active (an LM head has no class split)
    out = student(x)
    theirs = lwf(x, out, student)
    with torch.no_grad():
        teacher_out = teacher(x)
    ours = 0.7 * lwf_loss(out, teacher_out, 2.5)
    assert ours.item() == pytest.approx(theirs.item(), rel=RTOL)
    # gradients w.r.t. the student agree too
    g_theirs = torch.autograd.grad(theirs, list(student.parameters()), retain_graph=True)
    g_ours = torch.autograd.grad(ours, list(student.parameters()))
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_agem_reference_gradient_and_projection_match_avalanche(sign):
    model = _model(0)
    loss_fn = nn.CrossEntropyLoss()
    xref, yref = _data(5, n=8)
    plugin = AGEMPlugin(patterns_per_experience=8, sample_size=8)
    plugin.buffers = [_dataset(xref, yref)]  # non-empty memory
    plugin.buffer_dliter = iter([(xref, yref, torch.zeros(8, dtype=torch.long))])
    strategy = SimpleNamespace(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                               device="cpu", _criterion=loss_fn)
    plugin.before_training_iteration(strategy)
    params = list(model.parameters())
    ref = flat_grads(params, list(torch.autograd.grad(loss_fn(model(xref), yref), params)))
    torch.testing.assert_close(ref, plugin.reference_gradients, rtol=RTOL, atol=ATOL)
    # a current gradient that conflicts with (sign -1) or agrees with (sign +1) the reference
    gen = torch.Generator().manual_seed(7)
    current = sign * ref + 0.3 * ref.norm() * torch.randn(ref.shape, generator=gen) / math.sqrt(ref.numel())
    assert (torch.dot(current, ref) < 0) == (sign < 0)
    offset = 0
    for p in params:
        p.grad = current[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    plugin.after_backward(strategy)
    ours = agem_project(current, ref)
    torch.testing.assert_close(ours, flat_grads(params), rtol=RTOL, atol=1e-6)
    assert torch.dot(ours, ref) >= -1e-6


def _ids(n: int, start: int = 0) -> AvalancheDataset:
    return AvalancheDataset([TensorDataset(torch.arange(start, start + n), torch.zeros(n, dtype=torch.long))])


def test_reservoir_selection_probabilities_match_avalanche():
    # 16 items in two arrivals of 8, capacity 4: every item kept with p = 1/4 by both buffers.
    # 800 runs each: a count is Binomial(800, .25) (sd 12.2); the difference of two independent
    # counts has sd 17.3. Bounds: 5 sd from 200 for each, 5 sd between them (chance failure
    # < 1e-5 over the 16 items; the seeds are fixed so the test is deterministic).
    n, cap, runs = 16, 4, 800
    theirs, ours = [0] * n, [0] * n
    items = [(Example(str(i), "a"), "classification") for i in range(n)]
    for seed in range(runs):
        torch.manual_seed(seed)
        buf = ReservoirSamplingBuffer(cap)
        buf.update_from_dataset(_ids(8))
        buf.update_from_dataset(_ids(8, 8))
        for i in range(len(buf.buffer)):
            theirs[int(buf.buffer[i][0])] += 1
        mine = ReservoirBuffer(cap, seed)
        mine.add(items[:8], "t")
        mine.add(items[8:], "t")
        for ex, _ in mine.items():
            ours[int(ex.prompt)] += 1
    sd = math.sqrt(runs * 0.25 * 0.75)
    assert sum(theirs) == sum(ours) == runs * cap
    for a, b in zip(ours, theirs):
        assert abs(a - 200) < 5 * sd and abs(b - 200) < 5 * sd
        assert abs(a - b) < 5 * sd * math.sqrt(2)


@pytest.mark.parametrize("capacity,arrivals", [(7, [10, 3, 10]), (20, [30, 5, 12, 40, 2]), (5, [4, 4, 4, 4, 4, 4])])
def test_task_balanced_sizes_match_experience_balanced_buffer(capacity, arrivals):
    theirs = ExperienceBalancedBuffer(capacity)
    ours = TaskBalancedBuffer(capacity, seed=0)
    for t, n in enumerate(arrivals):
        theirs.post_adapt(None, SimpleNamespace(dataset=_ids(n)))
        ours.add([(Example(f"{t}-{i}", "a"), "generation") for i in range(n)], f"task{t}")
        assert list(ours.sizes().values()) == [len(g.buffer) for g in theirs.buffer_groups.values()]
    assert len(ours) == len(theirs.buffer)
