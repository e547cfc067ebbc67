"""The strategy objects a run uses agree with avalanche-lib 0.6's plugins, on the LM's LoRA adapter.

Every test builds a tiny Llama with a peft LoRA adapter (the population's own), an
:class:`IncrementalLM` around it (what ``Trainer.fit`` trains), and drives lmas's strategy
objects through the hooks the loop calls (``after_task``, ``before_task``, ``loss_terms``,
``on_train_batch_start``, ``on_before_optimizer_step``, ``train_examples``). Avalanche sees the
*same* peft model through :class:`AnswerModel`: its input ``x`` is a tensor of example indices,
its output the (N, V) logits at the answer positions, computed with Hugging Face's own forward
(``model(input_ids, attention_mask).logits``; not lmas's ``answer_logits``), and its criterion is
the mean cross-entropy over those N tokens — lmas's task loss. Avalanche is driven through its
real plugin methods with minimal strategy stand-ins (the attributes each hook reads).

Conventions that differ, checked explicitly rather than papered over:

* Avalanche keeps importances / reference gradients for *every* parameter of ``strategy.model``
  (zeros for the frozen base); lmas keeps the trainable adapter only. The tests check that
  Avalanche's extra entries are exactly zero, so the penalties and projections are equal.
* LwF: Avalanche distils only the units of classes seen before (``prev_classes_by_task``); an LM
  head has no class partition, so every vocabulary unit is active (set by hand: ``post_adapt``
  reads class targets an LM experience does not have; its other step, ``prev_model =
  deepcopy(model)`` at the end of the previous experience, is done here as it does it).
* A-GEM memory: both keep ``min(patterns_per_experience, len(task))`` random examples per task
  and sample ``sample_size // n_tasks`` per task for the reference gradient; the random draws
  use different generators (Python's global ``random`` vs a seeded ``random.Random``), so the
  test compares sizes and per-task counts, and feeds both projections the same sample.
* Replay: lmas's ``task_balanced`` buffer has ``ExperienceBalancedBuffer``'s per-task sizes
  (checked size for size). How the buffer is used differs by design: Avalanche's ``ReplayPlugin``
  concatenates a memory mini-batch to every new mini-batch, lmas adds
  ``round(replay_ratio * len(task.train))`` distinct buffer items to the experience's data
  once; the test checks that documented invariant. Reservoir frequencies are compared within a
  binomial bound.

Tolerance: float32 math done in a different order — 1e-5 relative, 1e-7 absolute (1e-6 for
projected gradients).
"""

from __future__ import annotations

import copy
import math
import random
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from avalanche.benchmarks.utils import AvalancheDataset
from avalanche.training import LearningWithoutForgetting
from avalanche.training.plugins import AGEMPlugin, EWCPlugin
from avalanche.training.storage_policy import ExperienceBalancedBuffer, ReservoirSamplingBuffer

from lmas.data.task import Example, Task
from lmas.training.experience import IncrementalLM
from lmas.lm.encoding import IGNORE, PromptEncoder, collate
from lmas.lm.likelihood import answer_logits
from lmas.population.population import Population
from lmas.strategies.agem import AGEM, flat_grads
from lmas.strategies.lwf import LwF
from lmas.strategies.regularizers import EWC, trainable_params
from lmas.strategies.replay import Replay

RTOL, ATOL = 1e-5, 1e-7
AGENT = "agent0"


# --- the LM, its tasks, and Avalanche's view of it -----------------------------------------------
def _task(name: str, n: int, offset: int = 0) -> Task:
    rows = [Example(f"{name}: what is {i + offset} plus {2 * i + 1}?", f" {3 * i + 1 + offset}") for i in range(n)]
    return Task(name, "generation", train=rows, val=[], test=rows[:2])


class AnswerModel(nn.Module):
    """Avalanche's view of the population's peft model: example indices (B,) -> answer logits (N, V).

    ``last_targets`` holds the N target tokens of the last forward (the criterion reads them).
    """

    def __init__(self, net: nn.Module, encoder: PromptEncoder, rows: list[tuple[Example, str]]) -> None:
        super().__init__()
        self.net = net
        self.encoder = encoder
        self.rows = rows
        self.last_targets: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        items = [self.encoder.encode_example(*self.rows[int(i)]) for i in x]
        batch = collate(items, self.encoder.pad_id)
        logits = self.net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        targets = batch["targets"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
        keep = targets != IGNORE
        self.last_targets = targets[keep]  # (N,)
        return logits[:, :-1][keep].float()  # (N, V)


class LM:
    """A tiny population (one agent, LoRA r=4 on q/v) with its training module and Avalanche's view."""

    def __init__(self, base, strategy, tasks: list[Task]) -> None:
        self.pop = Population(base, agents=1, lora={"r": 4, "alpha": 8}, seed=0)
        self.encoder = PromptEncoder(base.tokenizer, max_length=48)
        self.module = IncrementalLM(self.pop, AGENT, strategy, self.encoder)
        self.rows = [(ex, t.kind) for t in tasks for ex in t.train]  # global index -> (example, kind)
        self.index = {ex.prompt: i for i, (ex, _) in enumerate(self.rows)}
        self.model = AnswerModel(self.pop.model, self.encoder, self.rows)
        self.criterion = lambda out, y: F.cross_entropy(out, self.model.last_targets)

    def ids(self, task: Task) -> Tensor:
        return torch.tensor([self.index[ex.prompt] for ex in task.train])

    def dataset(self, task: Task) -> TensorDataset:
        """(x, y, task label) rows as Avalanche loads them; y is unused (targets come from x)."""
        ids = self.ids(task)
        return TensorDataset(ids, ids, torch.zeros(len(ids), dtype=torch.long))

    def params(self) -> dict[str, Tensor]:
        return trainable_params(self.module)

    def train_step(self, seed: int, scale: float = 0.05) -> None:
        """Stand-in for training: move the trainable adapter (LoRA B starts at 0, so A's gradient is 0)."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.params().values():
                p.add_(scale * torch.randn(p.shape, generator=gen))

    def zero_grad(self) -> None:
        for p in self.pop.model.parameters():
            p.grad = None


def _split(avalanche: dict, lm: LM, frozen_zero: bool = True) -> dict[str, Tensor]:
    """Avalanche's per-parameter dict (keys ``net.<peft name>``): the trainable entries, by peft name;
    with ``frozen_zero``, asserts every frozen parameter's entry is exactly zero."""
    trainable = lm.params()
    out = {}
    for key, value in avalanche.items():
        tensor = value if isinstance(value, Tensor) else value.data  # ParamData
        name = key.removeprefix("net.")
        if name in trainable:
            out[name] = tensor
        elif frozen_zero:
            assert not tensor.any(), f"Avalanche has a non-zero entry for the frozen parameter {name}"
    assert sorted(out) == sorted(trainable)
    return out


# --- EWC -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,decay", [("separate", None), ("online", 0.6)])
def test_ewc_fisher_and_penalty_match_ewc_plugin(tiny_base, mode, decay):
    tasks = [_task("a", 7), _task("b", 5, offset=40)]
    ewc = EWC(ewc_lambda=3.5, mode=mode, decay=decay or 1.0, fisher_batch_size=3)
    lm = LM(tiny_base, ewc, tasks)
    plugin = EWCPlugin(ewc_lambda=3.5, mode=mode, decay_factor=decay)
    opt = torch.optim.SGD(list(lm.params().values()), lr=0.1)
    strategy = SimpleNamespace(model=lm.model, _criterion=lm.criterion, optimizer=opt, device="cpu",
                               train_mb_size=3, clock=SimpleNamespace(train_exp_counter=0))
    for exp, task in enumerate(tasks):
        lm.train_step(seed=exp)  # "training" on the task moves the adapter
        ewc.after_task(lm.module, task)  # 7 rows -> batches of 3, 3, 1; 5 rows -> 3, 2
        strategy.clock.train_exp_counter = exp
        strategy.experience = SimpleNamespace(dataset=lm.dataset(task))
        plugin.after_training_exp(strategy)
        lm.zero_grad()
        entries = ewc.consolidated[AGENT]
        assert len(entries) == (exp + 1 if mode == "separate" else 1)
        theirs = _split(plugin.importances[exp], lm)
        for name, fisher in entries[-1]["fisher"].items():
            assert fisher.abs().sum() > 0, name  # every trainable LoRA tensor has a non-zero Fisher
            torch.testing.assert_close(fisher, theirs[name], rtol=RTOL, atol=ATOL)
        anchors = _split(plugin.saved_params[exp], lm, frozen_zero=False)
        for name, anchor in entries[-1]["anchors"].items():
            assert torch.equal(anchor, anchors[name])
    # the penalty during the third experience, after the adapter moved again
    lm.train_step(seed=7)
    batch = lm.module.batch_of(lm.rows[:4])
    ours = ewc.loss_terms(lm.module, batch, {})["ewc"]
    strategy.clock.train_exp_counter = 2
    strategy.loss = torch.zeros(())
    plugin.before_backward(strategy)
    assert strategy.loss.item() > 0
    assert ours.item() == pytest.approx(strategy.loss.item(), rel=RTOL)
    # and its gradient w.r.t. the adapter
    params = list(lm.params().values())
    g_ours = torch.autograd.grad(ours, params)
    g_theirs = torch.autograd.grad(strategy.loss, params)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


# --- LwF -----------------------------------------------------------------------------------------
def test_lwf_teacher_and_loss_match_learning_without_forgetting(tiny_base):
    tasks = [_task("a", 6), _task("b", 6, offset=40)]
    lwf = LwF(alpha=0.7, temperature=2.5)
    lm = LM(tiny_base, lwf, tasks)
    theirs = LearningWithoutForgetting(alpha=0.7, temperature=2.5)
    # experience 0
    lwf.before_task(lm.module, tasks[0])
    lm.train_step(seed=0, scale=0.2)
    lwf.after_task(lm.module, tasks[0])
    theirs.prev_model = copy.deepcopy(lm.model)  # what LearningWithoutForgetting.post_adapt does
    theirs.prev_classes_by_task[0] = set(range(lm.pop.model.config.vocab_size))  # every unit active
    theirs.expcount += 1
    # experience 1: the student moves away from the start-of-task model
    lwf.before_task(lm.module, tasks[1])
    lm.train_step(seed=1, scale=0.2)
    x = lm.ids(tasks[1])[:4]
    batch = lm.module.batch_of([lm.rows[int(i)] for i in x])
    flags = {n: p.requires_grad for n, p in lm.pop.model.named_parameters()}
    lm.pop.model.train()
    logits, targets, rows = answer_logits(lm.pop.model, batch)  # (N, V): the student's forward pass
    teacher = lwf.teacher_logits(lm.module, batch)
    with torch.no_grad():
        prev = theirs.prev_model(x)
    torch.testing.assert_close(teacher, prev, rtol=RTOL, atol=1e-5)
    assert (teacher - logits.detach()).abs().max() > 1e-3  # the teacher is not the current student
    ours = lwf.loss_terms(lm.module, batch, {"logits": logits, "targets": targets, "rows": rows})["lwf"]
    assert {n: p.requires_grad for n, p in lm.pop.model.named_parameters()} == flags  # the student is restored
    assert lm.pop.model.training
    student = lm.model(x)  # Avalanche's mb_pred for the same rows (HF forward)
    torch.testing.assert_close(student, logits, rtol=RTOL, atol=1e-5)
    value = theirs(x, logits, lm.model)
    assert ours.item() > 0
    assert ours.item() == pytest.approx(value.item(), rel=RTOL)
    params = list(lm.params().values())
    g_ours = torch.autograd.grad(ours, params, retain_graph=True)
    g_theirs = torch.autograd.grad(value, params)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


# --- A-GEM ---------------------------------------------------------------------------------------
def _avalanche_ids(x: Tensor) -> AvalancheDataset:
    return AvalancheDataset([TensorDataset(x, x, torch.zeros(len(x), dtype=torch.long))])


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_agem_memory_and_projection_match_agem_plugin(tiny_base, sign):
    tasks = [_task("a", 8), _task("b", 3, offset=40), _task("c", 6, offset=80)]
    agem = AGEM(patterns_per_task=5, sample_size=6, seed=0)
    lm = LM(tiny_base, agem, tasks)
    plugin = AGEMPlugin(patterns_per_experience=5, sample_size=6)
    random.seed(0)  # AGEMPlugin.update_memory shuffles with Python's global generator
    for exp, task in enumerate(tasks[:2]):
        lm.train_step(seed=exp)
        agem.after_task(lm.module, task)
        plugin.update_memory(_avalanche_ids(lm.ids(task)))
    # memory: min(patterns_per_experience, len(task)) distinct examples of each task
    ours = agem.memory[AGENT]
    assert [len(g) for g in ours] == [len(b) for b in plugin.buffers] == [5, 3]
    for group, task in zip(ours, tasks):
        prompts = [ex.prompt for ex, _ in group]
        assert len(set(prompts)) == len(prompts) and set(prompts) <= {ex.prompt for ex in task.train}
    # a reference sample: sample_size // n_tasks from each task's memory
    state = agem._rng(AGENT).getstate()
    sample = agem.memory_sample(AGENT)
    agem._rng(AGENT).setstate(state)  # on_train_batch_start below draws this same sample
    theirs = next(plugin.buffer_dliter)[0]
    task_of = {ex.prompt: t.name for t in tasks for ex in t.train}
    assert Counter(task_of[ex.prompt] for ex, _ in sample) == Counter(task_of[lm.rows[int(i)][0].prompt] for i in theirs)
    assert Counter(task_of[ex.prompt] for ex, _ in sample) == {"a": 3, "b": 3}
    # the reference gradient on that sample (training mode, as in a fit and in AGEMPlugin)
    lm.pop.model.train()
    batch = lm.module.batch_of(lm.rows[lm.index[ex.prompt]] for ex in tasks[2].train[:4])
    agem.on_train_batch_start(lm.module, batch)
    xref = torch.tensor([lm.index[ex.prompt] for ex, _ in sample])
    plugin.buffer_dliter = iter([(xref, xref, torch.zeros_like(xref))])
    strategy = SimpleNamespace(model=lm.model, _criterion=lm.criterion, device="cpu",
                               optimizer=torch.optim.SGD(list(lm.params().values()), lr=0.1))
    plugin.before_training_iteration(strategy)
    ref = agem.reference(AGENT)
    mask = torch.cat([torch.full((p.numel(),), p.requires_grad) for p in lm.model.parameters()])
    assert not plugin.reference_gradients[~mask].any()  # Avalanche's frozen-parameter zeros
    torch.testing.assert_close(ref, plugin.reference_gradients[mask], rtol=RTOL, atol=ATOL)
    # the current gradient: the real task loss (sign -1: its negation) on the current batch
    lm.zero_grad()
    logits, targets, _ = answer_logits(lm.pop.model, batch)
    (sign * F.cross_entropy(logits, targets)).backward()
    params = list(lm.params().values())
    current = flat_grads(params).clone()
    dot = torch.dot(current, ref).item()
    assert dot != 0  # so one of the two signs conflicts with the reference and the other does not
    conflict = dot < 0
    agem.on_before_optimizer_step(lm.module)
    projected = flat_grads(params).clone()
    assert agem.stats[AGENT] == {"checked": 1, "projected": int(conflict)}
    for p, g in zip(params, torch.split(current, [p.numel() for p in params])):
        p.grad = g.view_as(p).clone()
    plugin.after_backward(strategy)
    torch.testing.assert_close(projected, flat_grads(params), rtol=RTOL, atol=1e-6)
    if conflict:
        assert not torch.allclose(projected, current) and torch.dot(projected, ref).abs() < 1e-5 * ref.norm() ** 2
    else:
        assert torch.equal(projected, current)


# --- replay --------------------------------------------------------------------------------------
@pytest.mark.parametrize("capacity,sizes", [(7, [10, 3, 10]), (20, [30, 5, 12, 40, 2])])
def test_replay_task_balanced_contents_match_experience_balanced_buffer(tiny_base, capacity, sizes):
    tasks = [_task(f"t{k}", n, offset=100 * k) for k, n in enumerate(sizes)]
    replay = Replay(buffer="task_balanced", capacity=capacity, replay_ratio=0.5, seed=0)
    lm = LM(tiny_base, replay, tasks)
    theirs = ExperienceBalancedBuffer(capacity)
    torch.manual_seed(0)
    for k, task in enumerate(tasks):
        rows = replay.train_examples(AGENT, task, tasks[:k])
        new = [(ex, task.kind) for ex in task.train]
        extra = rows[len(new):]
        assert rows[: len(new)] == new
        held = replay.buffers[AGENT].items() if k else []
        # round(replay_ratio * new), capped by the buffer; distinct items of the buffer
        assert len(extra) == min(round(0.5 * len(new)), len(held))
        assert len({ex.prompt for ex, _ in extra}) == len(extra) and all(it in held for it in extra)
        replay.after_task(lm.module, task)
        theirs.post_adapt(None, SimpleNamespace(dataset=_avalanche_ids(lm.ids(task))))
        buffer = replay.buffers[AGENT]
        assert list(buffer.sizes().values()) == [len(g.buffer) for g in theirs.buffer_groups.values()]
        for group, t in zip(buffer.groups.values(), tasks):  # each share: distinct items of its task
            prompts = [ex.prompt for ex, _ in group.items()]
            assert len(set(prompts)) == len(prompts) and set(prompts) <= {ex.prompt for ex in t.train}
        for g, t in zip(theirs.buffer_groups.values(), tasks):
            ids = [int(g.buffer[i][0]) for i in range(len(g.buffer))]
            assert set(ids) <= set(lm.ids(t).tolist())
    # neither gives a short task's unused share to the others (capacity 20 over 5 tasks, the last has 2: 18)
    assert len(replay.buffers[AGENT]) == len(theirs.buffer) <= capacity


def test_replay_reservoir_selection_frequencies_match_reservoir_sampling_buffer(tiny_base):
    # 16 items in two tasks of 8, capacity 4: every item kept with p = 1/4 by both. 600 runs each:
    # a count is Binomial(600, .25) (sd 10.6); bounds of 5 sd around 150 for each, 5 sd * sqrt(2)
    # between them (chance failure < 1e-5 over the 16 items; seeds fixed, so deterministic).
    n, cap, runs = 16, 4, 600
    tasks = [_task("a", 8), _task("b", 8, offset=40)]
    lm = LM(tiny_base, Replay(), tasks)
    theirs, ours = [0] * n, [0] * n
    for seed in range(runs):
        torch.manual_seed(seed)
        buf = ReservoirSamplingBuffer(cap)
        for task in tasks:
            buf.update_from_dataset(_avalanche_ids(lm.ids(task)))
        for i in range(len(buf.buffer)):
            theirs[int(buf.buffer[i][0])] += 1
        replay = Replay(buffer="reservoir", capacity=cap, seed=seed)
        for task in tasks:
            replay.after_task(lm.module, task)
        for ex, _ in replay.buffers[AGENT].items():
            ours[lm.index[ex.prompt]] += 1
    sd = math.sqrt(runs * 0.25 * 0.75)
    assert sum(theirs) == sum(ours) == runs * cap
    for a, b in zip(ours, theirs):
        assert abs(a - runs / 4) < 5 * sd and abs(b - runs / 4) < 5 * sd
        assert abs(a - b) < 5 * sd * math.sqrt(2)
