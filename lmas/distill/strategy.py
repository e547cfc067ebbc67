"""The Distill strategy: a student agent learns its task and, at the same time, its teachers' outputs.

``loss = task loss + weight · T² · D(aggregate(teachers) || student)`` on the rows of the current
task (replayed rows of other tasks carry no distillation term); ``D`` is one of
:mod:`lmas.distill.losses` (forward/reverse KL, JSD, GKD's generalized JSD, DistiLLM's skew KLs), and on
generation tasks a fraction ``on_policy`` of the batches is distilled on the student's own samples (GKD).
Compose it with any CL strategy (``distill=<preset>`` does ``Compose([strategy, distill])``).

Teachers (``teachers``):

* ``peers`` — every other agent that has learnt something (trained or received knowledge);
* ``specialists`` — per-task routing: the agents that trained the current task in an earlier round teach it;
* a list of agent names;
* plus ``external`` teachers (label distributions from another architecture, e.g. MiniLM). With several bases
  (``population=bases``), teachers on another base than the student teach classification like external ones, by
  their own scorer's label distribution (:func:`lmas.population.bases.bind_teachers`).

With ``cache=True`` every teacher's outputs for the whole experience are computed once before
training (label distributions for classification, top-``k`` token probabilities per answer token
for generation), so the student's epochs never run the teachers again. ``cache=False`` computes
them at every step from the teachers' *current* adapters: among peers that train in the same round
this is (sequential) deep mutual learning — each agent learns from the others as they are then.
The teachers' outputs (cached or live) live on the student's device, where the batch's ``index``
is; an external teacher's scores, computed by its own model on the CPU, are moved there.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lmas.data.task import Example, Task
from lmas.distill.losses import LOSSES, divergence, kd_loss, soften
from lmas.distill.teachers import (
    AGGREGATIONS,
    ExternalTeacher,
    TeacherCache,
    agent_label_distributions,
    agent_token_topk,
    aggregate,
    first_positions,
    route_to_gold,
)
from lmas.evaluation.scoring import evaluate, greedy_answers
from lmas.lm.device import model_device, to_device
from lmas.lm.encoding import collate
from lmas.lm.likelihood import answer_logits, label_logprobs
from lmas.strategies.base import Strategy

if TYPE_CHECKING:
    from lmas.lm.encoding import PromptEncoder
    from lmas.population.population import Population
    from lmas.training.experience import IncrementalLM

log = logging.getLogger(__name__)
TEACHER_SETS = ("peers", "specialists")


def external_accuracy(teacher: ExternalTeacher, rows: Sequence[Example], labels: Sequence[str]) -> float:
    """An external teacher's accuracy (argmax of its label scores) on ``rows``."""
    scores = teacher.label_scores([ex.prompt for ex in rows], labels)
    gold = torch.tensor([list(labels).index(ex.answer) for ex in rows], device=scores.device)
    return (scores.argmax(-1) == gold).float().mean().item()


def single_token_labels(encoder: PromptEncoder, task: Task) -> Tensor | None:
    """The label token ids (L,) of a classification task whose labels are one token each, else None.

    Then the student's label log-likelihoods are the log-softmax of the task-loss pass's logits at
    each row's first answer position (the answer is encoded as :meth:`PromptEncoder.answer_tokens`), gathered at these
    ids: distillation costs no extra forward pass. Longer labels are scored by :func:`label_logprobs`.
    """
    if task.kind != "classification":
        return None
    ids = [encoder.answer_tokens(lab) for lab in task.class_labels]
    return torch.tensor([t[0] for t in ids]) if all(len(t) == 1 for t in ids) else None


class Distill(Strategy):
    """Multi-teacher distillation into the training agent (see the module docstring).

    Args:
        teachers: ``peers`` | ``specialists`` | a list of agent names.
        loss: ``forward_kl`` | ``reverse_kl`` | ``jsd`` | ``gjsd`` (generalized JSD, weight ``beta``) |
            ``skew_kl`` | ``skew_rkl`` (skew ``skew``): :mod:`lmas.distill.losses`.
        beta: the generalized JSD's ``β`` (0 = forward KL, 1 = reverse KL; GKD's semantics).
        skew: the skew KLs' ``α`` in [0, 1) (DistiLLM uses 0.1).
        on_policy: ``λ``, the fraction of a generation task's batches distilled on the student's own samples
            (GKD's ``lmbda``): each batch, with probability ``λ`` (torch's random state, seeded per fit), the
            student samples an answer to each of the batch's prompts at ``temperature`` (whole distribution),
            the agent teachers score those answers live (full token distributions, no top-k), and the
            distillation term is taken on them instead of on the reference answers; the task loss stays on
            the reference answers. Classification tasks score every label already: ``λ`` has no effect.
        on_policy_tokens: the most tokens a sampled answer has.
        temperature: softens teachers and student alike (losses are scaled by ``T²``).
        weight: multiplies the distillation term.
        aggregation: ``uniform`` | ``val_acc`` | ``confidence`` | ``best``.
        routing: ``None`` (every teacher, by ``aggregation``) or ``gold``: per-example routing, each example taught
            by the one teacher that gives its gold answer the highest likelihood (:func:`route_to_gold`; the
            label's probability, or the answer's summed token log-likelihood). The examples routed to each
            teacher are counted in the agent's history (``routed``). On-policy batches (the student's own
            samples have no gold answer) fall back to ``aggregation``.
        cache: compute the teachers' outputs once per experience (else at every step).
        top_k: token probabilities kept per answer position for generation tasks.
        external: extra teachers outside the population (classification only).
        batch_size: batch size of the teachers' forward passes.
        students: the agents that distil (``None``: every agent that trains); the others train
            with the task loss alone.
    """

    name = "distill"

    def __init__(
        self,
        teachers: str | Sequence[str] = "peers",
        loss: str = "forward_kl",
        temperature: float = 2.0,
        weight: float = 1.0,
        aggregation: str = "uniform",
        cache: bool = True,
        top_k: int = 32,
        external: Sequence[ExternalTeacher] | None = None,
        batch_size: int = 32,
        students: Sequence[str] | None = None,
        beta: float = 0.5,
        skew: float = 0.1,
        on_policy: float = 0.0,
        on_policy_tokens: int = 16,
        routing: str | None = None,
    ) -> None:
        if loss not in LOSSES:
            raise ValueError(f"distill.loss={loss!r}: expected one of {LOSSES}")
        divergence(torch.zeros(1, 2), torch.full((1, 2), 0.5), loss, beta, skew)  # beta and skew in range
        self.beta, self.skew = beta, skew
        if not 0.0 <= on_policy <= 1.0 or on_policy_tokens < 1:
            raise ValueError(
                f"distill.on_policy={on_policy}, distill.on_policy_tokens={on_policy_tokens}: "
                "need 0 <= on_policy <= 1 and on_policy_tokens >= 1"
            )
        self.on_policy, self.on_policy_tokens = on_policy, on_policy_tokens
        self.on_policy_steps = 0  # batches of the last experience distilled on the student's samples
        self._policy: tuple[dict[str, Tensor], Tensor] | None = None  # this batch's (sampled batch, teacher target)
        if routing not in (None, "gold"):
            raise ValueError(f"distill.routing={routing!r}: expected null (aggregate every teacher) or 'gold'")
        self.routing = routing
        self.routed: dict[str, int] = {}  # teacher -> examples routed to it in the current experience
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"distill.aggregation={aggregation!r}: expected one of {AGGREGATIONS}")
        if temperature <= 0 or weight < 0 or top_k < 1:
            raise ValueError("distill: need temperature > 0, weight >= 0 and top_k >= 1")
        if isinstance(teachers, str) and teachers not in TEACHER_SETS:
            raise ValueError(f"distill.teachers={teachers!r}: expected one of {TEACHER_SETS} or a list of agents")
        self.teachers, self.loss, self.temperature, self.weight = teachers, loss, temperature, weight
        self.aggregation, self.cache, self.top_k, self.batch_size = aggregation, cache, top_k, batch_size
        self.external = list(external or [])
        self.students = None if students is None else list(students)
        self.current: TeacherCache | None = None
        self.val_acc: list[float] | None = None
        self.task: Task | None = None
        self.round: int | None = None  # the round of the experience being trained (None outside a loop: any round)
        self._rows: set[tuple[str, str]] = set()
        self._live: TeacherCache | None = None  # uncached: this batch's teachers' outputs
        self._taught: list[str] = []  # teachers of the last experience (for the agent's history)
        self._bytes_per_token: float | None = None  # the last experience's top-k token cache, per token
        self._label_ids: Tensor | None = None  # (L,) when every label of the task is one token
        # external teacher -> task -> split -> accuracy, for every task it was fitted on
        self.external_accuracy: dict[str, dict[str, dict[str, float]]] = {}
        # population=bases (bind_teachers): (student, task) -> its teachers on other bases; every agent of every base
        self.cross: Callable[[str, Task], list[ExternalTeacher]] | None = None
        self.everyone: list[str] = []

    @property
    def _task(self) -> Task:
        """The task of the current experience (set by :meth:`before_task`)."""
        if self.task is None:
            raise RuntimeError("Distill: no task yet; before_task sets it")
        return self.task

    # --- who teaches -----------------------------------------------------------------------
    def teachers_for(self, population: Population, agent: str, task: Task) -> list[str]:
        """The agent teachers of ``agent`` for ``task`` (never the student itself)."""
        if self.teachers == "peers":
            return [n for n, a in population.agents.items() if n != agent and a.history]
        if self.teachers == "specialists":  # trained it before this round: the round's order never decides who teaches
            before = self.round if self.round is not None else float("inf")
            done = lambda a: any(e.event == "trained" and e.task == task.name and e.round < before for e in a.history)  # noqa: E731
            return [n for n, a in population.agents.items() if n != agent and done(a)]
        everyone = self.everyone or population.names
        unknown = [t for t in self.teachers if t not in everyone]
        if unknown:
            raise ValueError(f"distill.teachers: unknown agents {unknown}; the population has {everyone}")
        return [t for t in self.teachers if t != agent and t in population.agents]  # others teach through `cross`

    # --- hooks -------------------------------------------------------------------------------
    def before_task(self, module: IncrementalLM, task: Task) -> None:
        pop, agent = module.population, module.agent
        self.task, self.current, self.on_policy_steps, self.routed = task, None, 0, {}
        self.round = getattr(module, "round_idx", None)  # None: a module outside a loop (any round)
        if self.students is not None and agent not in self.students:
            return
        self._rows = {(ex.prompt, ex.answer) for ex in task.train}
        self._label_ids = single_token_labels(module.encoder, task)
        teachers = self.teachers_for(pop, agent, task)
        if task.kind != "classification" and self.external and not teachers:
            raise ValueError(
                f"distill: task {task.name!r} is {task.kind}: token-level distillation needs teachers "
                "with the student's tokenizer (agents of the population); external teachers give "
                "label distributions only"
            )
        cross = self.cross(agent, task) if self.cross is not None and task.kind == "classification" else []
        external = [*self.external, *cross] if task.kind == "classification" else []
        for t in external:
            if task.name not in self.external_accuracy.get(t.name, {}) or t in cross:  # an agent keeps learning
                t.fit(task)
                acc = {
                    split: external_accuracy(t, rows, task.class_labels)
                    for split, rows in (("val", task.val), ("test", task.test))
                    if rows
                }
                self.external_accuracy.setdefault(t.name, {})[task.name] = acc
                log.info("distill: external teacher %s on %s: accuracy %s", t.name, task.name, acc)
        self.current = TeacherCache(
            teachers + [t.name for t in external],
            labels=list(task.class_labels) if task.kind == "classification" else None,
        )
        self._agents, self._external = teachers, external
        log.info(
            "distill: %s learns %s from %s (%s, cache=%s)",
            agent,
            task.name,
            self.current.teachers or "nobody",
            self.aggregation,
            self.cache,
        )
        try:
            if self.current.teachers and self.aggregation == "val_acc":
                self.val_acc = self._val_acc(pop, module.encoder, task)
            if self.current.teachers and self.cache:
                self._fill(self.current, pop, module.encoder, module.examples)
        finally:
            pop.activate(agent)  # the student's adapter is the trainable one again

    def _val_acc(self, pop: Population, encoder: PromptEncoder, task: Task) -> list[float]:
        split = task.val or task.train[:32]
        view = dataclasses.replace(task, val=split)
        out = []
        for t in self._agents:
            pop.activate(t)
            out.append(evaluate(pop.model, encoder, view, "val", batch_size=self.batch_size))
        for ext in self._external:  # measured on task.val when it was fitted (before_task)
            known = self.external_accuracy[ext.name][task.name].get("val") if task.val else None
            out.append(known if known is not None else external_accuracy(ext, split, task.class_labels))
        return out

    def _fill(
        self, cache: TeacherCache, pop: Population, encoder: PromptEncoder, examples: Sequence[tuple[Example, str]]
    ) -> None:
        """The teachers' outputs for ``examples`` ((example, kind) pairs), into ``cache``."""
        if self._task.kind == "classification":
            cache.label_p = self._label_p(pop, encoder, [ex.prompt for ex, _ in examples])
        else:
            cache.tokens = [
                agent_token_topk(pop, t, encoder, examples, self.top_k, self.temperature, self.batch_size)
                for t in self._agents
            ]

    def _label_p(self, pop: Population, encoder: PromptEncoder, prompts: list[str]) -> Tensor:
        """``(K, N, L)`` distributions of every teacher (agents, then external) at the temperature."""
        parts = []
        if self._agents:
            parts.append(
                agent_label_distributions(
                    pop, self._agents, encoder, prompts, self._task.class_labels, self.temperature, self.batch_size
                )
            )
        device = model_device(pop.model)  # external teachers run their own models (on the CPU)
        for t in self._external:
            with torch.no_grad():
                parts.append(
                    soften(t.label_scores(prompts, self._task.class_labels), self.temperature)[None].to(device)
                )
        return torch.cat(parts).to(device)  # the cache lives on the student's device, like batch["index"]

    def on_train_batch_start(self, module: IncrementalLM, batch: dict[str, Tensor]) -> None:
        self._policy = None
        if not self.current or not self.current.teachers:
            return
        if self.on_policy and self._task.kind == "generation" and torch.rand(()).item() < self.on_policy:
            self._policy = self._on_policy(module, batch)
            if self._policy is not None:
                return  # this batch distils on the student's samples: no teachers' pass on the references
        if self.cache:
            return
        pop = module.population
        self._live = TeacherCache(self.current.teachers, self.current.labels)
        try:  # the teachers' current outputs, computed before the student's forward pass
            self._fill(self._live, pop, module.encoder, [module.examples[i] for i in batch["index"].tolist()])
        finally:
            pop.activate(module.agent)
            module.net.train()

    def _on_policy(self, module: IncrementalLM, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor] | None:
        """The student's sampled answers to the batch's current-task prompts, and the teachers' target on them."""
        rows = [module.examples[i][0] for i in batch["index"].tolist()]
        prompts = [ex.prompt for ex in rows if (ex.prompt, ex.answer) in self._rows]
        if not prompts:
            return None
        pop, enc, net = module.population, module.encoder, module.net
        try:
            net.eval()
            answers = greedy_answers(
                net, enc, prompts, self.on_policy_tokens, len(prompts), sample_temperature=self.temperature
            )
            items = [enc.encode_example(Example(p, a), "generation") for p, a in zip(prompts, answers, strict=True)]
            sampled = to_device(collate(items, enc.pad_id), model_device(net))
            with torch.no_grad():
                teacher = []
                for t in self._agents:
                    pop.activate(t)
                    teacher.append(soften(answer_logits(net, sampled)[0], self.temperature))  # (N, V)
        finally:
            pop.activate(module.agent)
            net.train()
        self.on_policy_steps += 1
        return sampled, aggregate(torch.stack(teacher), self.aggregation, self.val_acc)

    def loss_terms(self, module: IncrementalLM, batch: dict[str, Tensor], out: dict[str, Tensor]) -> dict[str, Tensor]:
        if not self.current or not self.current.teachers or self.weight == 0:
            return {}
        if self._policy is not None:  # on-policy: the student's own samples, the teachers' live distributions
            sampled, target = self._policy
            self._policy = None
            student = answer_logits(module.net, sampled)[0]  # (N, V), with gradients
            return {"kd": self.weight * kd_loss(student, target, self.loss, self.temperature, self.beta, self.skew)}
        rows = [module.examples[i][0] for i in batch["index"].tolist()]
        device = out["logits"].device
        mine = [(ex.prompt, ex.answer) in self._rows for ex in rows]  # rows of the current task
        if not any(mine):
            return {}
        own = torch.tensor(mine, device=device)
        index = batch["index"].to(device) if self.cache else torch.arange(len(rows), device=device)
        cache = self.current if self.cache else self._live
        if cache is None:
            raise RuntimeError("Distill.loss_terms: no teachers' outputs for this batch (on_train_batch_start not run)")
        if self._task.kind == "classification":
            if self._label_ids is not None:  # one-token labels: the task-loss pass already scored them
                first = first_positions(out["rows"])  # each row's first answer position
                student = out["logits"][first][own].log_softmax(-1)[:, self._label_ids.to(device)]  # (B', L)
            else:
                prompts = [ex.prompt for ex, keep in zip(rows, mine, strict=True) if keep]
                student = label_logprobs(
                    module.net, module.encoder, prompts, self._task.class_labels, batch_size=len(prompts), grad=True
                )  # (B', L)
            teacher = cache.labels_for(index)[:, own]  # (K, B', L)
            labels = self._task.class_labels
            gold = torch.tensor([labels.index(ex.answer) for ex, m in zip(rows, mine, strict=True) if m], device=device)
            positions = None
        else:
            keep = own[out["rows"]]  # answer positions of the current task's rows
            student = out["logits"][keep]  # (N', V)
            teacher = cache.tokens_for(index, out["logits"].shape[-1])[:, keep]  # (K, N', V)
            gold, positions = out["targets"][keep], out["rows"][keep]
        target = self._target(cache.teachers, teacher, gold, positions)
        return {"kd": self.weight * kd_loss(student, target, self.loss, self.temperature, self.beta, self.skew)}

    def _target(self, names: Sequence[str], teacher: Tensor, gold: Tensor, positions: Tensor | None) -> Tensor:
        """The distillation target: the teachers aggregated, or each example's routed teacher (``routing``)."""
        if self.routing is None or len(names) == 1:
            return aggregate(teacher, self.aggregation, self.val_acc)
        w = route_to_gold(teacher, gold, positions)  # (K, N)
        firsts = w if positions is None else w[:, first_positions(positions)]  # one column per example
        for name, n in zip(names, firsts.sum(1).tolist(), strict=True):
            self.routed[name] = self.routed.get(name, 0) + int(n)
        return (w[..., None] * teacher).sum(0)

    def after_task(self, module: IncrementalLM, task: Task) -> None:
        self._taught = list(self.current.teachers) if self.current else []
        self._bytes_per_token = self.current.bytes_per_token() if self.current and self.cache else None
        self.current, self._live, self.val_acc = None, None, None

    def fit_info(self) -> dict:
        """The teachers of the experience just trained (lineage: distilled-from edges)."""
        if not self._taught:
            return {}
        external = {t: self.external_accuracy[t][self._task.name] for t in self._taught if t in self.external_accuracy}
        info: dict = {"teachers": self._taught}
        if external:
            info["external_teacher_accuracy"] = external
        if self._bytes_per_token is not None:  # generation tasks: the compressed top-k cache's size
            info["teacher_cache_bytes_per_token"] = self._bytes_per_token
        if self.on_policy and self._task.kind == "generation":
            info["on_policy_steps"] = self.on_policy_steps
        if self.routing is not None and self.routed:  # examples per teacher, summed over the epochs' batches
            info["routed"] = dict(self.routed)
        return info
