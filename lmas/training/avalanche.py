"""Run Avalanche's own strategies (Naive, EWC, LwF, Replay, A-GEM) on an lmas stream.

``strategy=avalanche/<method>`` (:class:`AvalancheStrategy`) names this module's fit backend
(:class:`AvalancheFit`): each experience is trained with ``avalanche.training.<Method>.train``; lmas still
evaluates with its own scorers and writes the same results.json, so one sweep compares the two frameworks.

How lmas data is shown to Avalanche (one Avalanche experience per lmas experience):

* ``x`` (per example, ``(2, L)`` int64, ``L = encoder.max_length``): row 0 the token ids of
  ``[start] + prompt + answer`` right-padded, row 1 a code per position (0 pad, 1 prompt,
  2 answer). A fixed ``L`` lets Avalanche's loaders stack examples of any experience (the replay
  and A-GEM buffers mix experiences); the model trims each batch back to its longest sequence,
  so it computes exactly what lmas' ``collate`` + ``answer_logits`` compute.
* ``y`` (``(L,)``): lmas' ``targets`` row, the token id at answer positions and -100 elsewhere.
* ``model(x)`` returns ``(N, V)`` logits at the N answer-predicting positions of the batch (row
  major, as :func:`lmas.lm.likelihood.answer_logits`); the LM head never runs on prompt tokens or
  padding, so memory is N*V floats, not B*T*V. The criterion is cross-entropy of those rows
  against ``y``'s non-ignored entries (same order): lmas' task loss. A 2-D output is what
  Avalanche's LwF distils (``out[:, units]``) and what EWC/A-GEM/replay feed to the criterion.
* The ``targets`` data attribute (what Avalanche calls an example's class) is the example's first
  answer token id. LwF distils only over the "previous classes" units, so here it distils the
  vocabulary columns of tokens that began an answer in earlier experiences (the old label tokens
  of classification tasks), at every answer position of the current batch.
* Task label 0 for every experience: an agent has one shared adapter (a single head), and
  Avalanche's LwF on a model that is not a ``MultiTaskModule`` only distils the units of task 0.

The wrapper registers only the agent's trainable adapter parameters (the same ``Parameter``
objects as the peft model's), so Avalanche's optimizer, EWC importances, A-GEM gradient vectors
and ``model.to`` see ~the adapter, never the 135M frozen base. LwF snapshots the model with
``copy.deepcopy`` after each experience; the wrapper's ``__deepcopy__`` returns a teacher that
shares the frozen base and holds only cloned adapter tensors, which it swaps in with
``torch.func.functional_call`` (so a snapshot costs the adapter's size, not the base's).

Training matches lmas' Lightning path: AdamW on the adapter with ``train.lr``/``weight_decay``, a
fresh optimizer state per experience, ``train.batch_size``/``epochs``/``max_steps``, the same
linear warm-up, and gradient-norm clipping at ``trainer.gradient_clip_val`` (from the config).
Batch order differs unless ``shuffle=False``: Avalanche's sampler draws from torch's global RNG
(seeded by the loop per experience), lmas' loader from its own generator.
"""

from __future__ import annotations

import dataclasses
import math
import random
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmas.data.task import Example
from lmas.lm.encoding import IGNORE, PromptEncoder, collate
from lmas.lm.likelihood import answer_logits
from lmas.population.population import Population
from lmas.schema import TrainConfig
from lmas.strategies.base import Strategy
from lmas.strategies.compose import Compose
from lmas.training.fit import Experience, FitResult, StepHook

if TYPE_CHECKING:
    from avalanche.training.templates import SupervisedTemplate

METHODS = ("naive", "ewc", "lwf", "replay", "agem")
PAD, PROMPT, ANSWER = 0, 1, 2  # position codes of x[:, 1]


class _Runner(nn.Module):
    """Holds the peft model; decodes x and returns answer-position logits (N, V)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, x: Tensor) -> Tensor:
        ids, code = x[:, 0], x[:, 1]  # (B, L), (B, L)
        width = int((code > PAD).sum(1).max())
        ids, code = ids[:, :width], code[:, :width]
        batch = {
            "input_ids": ids,
            "attention_mask": (code > PAD).long(),
            "targets": torch.where(code == ANSWER, ids, torch.full_like(ids, IGNORE)),
        }
        return answer_logits(self.lm, batch)[0]


class AdapterLM(nn.Module):
    """The module Avalanche trains: parameters = the agent's trainable adapter only.

    With ``snapshot`` (a teacher made by ``deepcopy``) it has no parameters and runs the shared
    model with the snapshot's adapter tensors in place of the live ones.
    """

    runner: _Runner  # set with object.__setattr__: not a submodule

    def __init__(self, lm: nn.Module, snapshot: dict[str, Tensor] | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "runner", _Runner(lm))  # not a submodule: its base is not ours
        self.snapshot = snapshot
        live = {} if snapshot is not None else {n: p for n, p in lm.named_parameters() if p.requires_grad}
        self.adapter = nn.ParameterDict({n.replace(".", ":"): p for n, p in live.items()})
        self.names = {n.replace(".", ":"): n for n in live}

    def forward(self, x: Tensor) -> Tensor:
        if self.snapshot is None:
            return self.runner(x)
        lm = self.runner.lm
        was_training = lm.training
        lm.eval()
        try:
            return torch.func.functional_call(self.runner, self.snapshot, (x,))
        finally:
            lm.train(was_training)

    def train(self, mode: bool = True) -> AdapterLM:
        super().train(mode)
        if self.snapshot is None:  # Avalanche switches modes on this module; follow on the LM
            self.runner.lm.train(mode)
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> AdapterLM:
        """A frozen teacher sharing the base model: only the adapter tensors are copied."""
        if self.snapshot is not None:
            return self
        snap = {f"lm.{self.names[k]}": p.detach().clone() for k, p in self.adapter.items()}
        return AdapterLM(self.runner.lm, snapshot=snap)


def answer_loss(out: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of the (N, V) answer logits against y's answer tokens (lmas' task loss)."""
    tgt = y[:, 1:]
    return F.cross_entropy(out, tgt[tgt != IGNORE])


def encode_experience(examples: list[tuple[Example, str]], encoder: PromptEncoder) -> tuple[Tensor, Tensor, list[int]]:
    """x (n, 2, L), y (n, L) and each example's first answer token (its Avalanche class)."""
    items = [encoder.encode_example(ex, kind) for ex, kind in examples]
    b = collate(items, encoder.pad_id)
    n, width, length = len(items), b["input_ids"].shape[1], encoder.max_length
    x = torch.zeros((n, 2, length), dtype=torch.long)
    x[:, 0] = encoder.pad_id
    x[:, 0, :width] = b["input_ids"]
    x[:, 1, :width] = b["attention_mask"] + (b["targets"] != IGNORE).long()  # 1 prompt, 2 answer
    y = torch.full((n, length), IGNORE, dtype=torch.long)
    y[:, :width] = b["targets"]
    return x, y, [int(it.ids[it.target_start]) for it in items]


def _experience(x: Tensor, y: Tensor, classes: list[int], index: int):
    from avalanche.benchmarks.scenarios.dataset_scenario import DatasetExperience
    from avalanche.benchmarks.utils.classification_dataset import (
        TaskAwareSupervisedClassificationDataset,
    )
    from avalanche.benchmarks.utils.data_attribute import DataAttribute

    data = TaskAwareSupervisedClassificationDataset(
        [torch.utils.data.TensorDataset(x, y)],
        data_attributes=[
            DataAttribute(classes, "targets"),
            DataAttribute([0] * len(classes), "targets_task_labels", use_in_getitem=True),
        ],
    )
    exp = DatasetExperience(dataset=data, current_experience=index)
    exp.task_label, exp.task_labels = 0, [0]
    return exp


def _control_plugin(train: TrainConfig, clip: float | None):
    """Avalanche plugin: lmas' max_steps, warm-up and clipping; records the per-step loss."""
    from avalanche.core import SupervisedPlugin

    class _Control(SupervisedPlugin):
        def __init__(self) -> None:
            super().__init__()
            self.losses: list[float] = []

        def before_update(self, strategy: SupervisedTemplate, **kwargs: Any) -> None:
            if train.warmup_steps > 0:
                factor = min(1.0, (len(self.losses) + 1) / train.warmup_steps)
                for group in strategy.optimizer.param_groups:
                    group["lr"] = train.lr * factor
            if clip:
                torch.nn.utils.clip_grad_norm_(strategy.model.parameters(), clip)

        def after_training_iteration(self, strategy: SupervisedTemplate, **kwargs: Any) -> None:
            loss = strategy.loss.item()
            if not math.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss} at step {len(self.losses)} (avalanche)")
            self.losses.append(loss)
            if train.max_steps and len(self.losses) >= train.max_steps:
                strategy.stop_training()

    return _Control()


class AvalancheStrategy(Strategy):
    """An lmas strategy whose training is one of Avalanche's strategies (its backend: :class:`AvalancheFit`).

    Args:
        method: ``naive`` | ``ewc`` | ``lwf`` | ``replay`` | ``agem``.
        ewc_lambda, mode, decay_factor: ``avalanche.training.EWC`` options.
        alpha, temperature: ``avalanche.training.LwF`` options.
        mem_size: ``avalanche.training.Replay`` buffer size (examples, balanced over experiences).
        patterns_per_exp, sample_size: ``avalanche.training.AGEM`` options.
        gradient_clip_val: gradient-norm clip (the config passes ``trainer.gradient_clip_val``).
        shuffle: shuffle each experience's batches (Avalanche's own sampler).
    """

    name = "avalanche"  # each instance: avalanche/<method>
    fit_backend = "avalanche"
    shape_bound = True  # Avalanche's own strategy object holds per-parameter state (importances, anchors)

    def __init__(
        self,
        method: str = "naive",
        ewc_lambda: float = 1.0,
        mode: str = "separate",
        decay_factor: float | None = None,
        alpha: float = 1.0,
        temperature: float = 2.0,
        mem_size: int = 200,
        patterns_per_exp: int = 64,
        sample_size: int = 8,
        gradient_clip_val: float | None = None,
        shuffle: bool = True,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"strategy.method={method!r}: expected one of {METHODS}")
        self.method = method
        self.name = f"avalanche/{method}"
        decay_factor = decay_factor if mode == "online" else None  # Avalanche refuses it otherwise
        options: dict[str, dict[str, Any]] = {
            "ewc": {"ewc_lambda": ewc_lambda, "mode": mode, "decay_factor": decay_factor},
            "lwf": {"alpha": alpha, "temperature": temperature},
            "replay": {"mem_size": mem_size},
            "agem": {"patterns_per_exp": patterns_per_exp, "sample_size": sample_size},
            "naive": {},
        }
        self.options = options[method]  # the Avalanche strategy's own keyword arguments
        self.gradient_clip_val = gradient_clip_val
        self.shuffle = shuffle
        self.agents: dict[str, list] = {}  # agent -> [avalanche strategy, wrapper, experiences so far]
        self.resumed: dict[str, int] = {}  # agent -> experiences before a resume (load_state_dict)

    def copy_agent(self, src: str, dst: str) -> None:
        raise ValueError(f"strategy={self.name}: Avalanche keeps an agent's state in its own strategy object, bound to "
                         "the agent's model; it cannot be copied to another agent")  # fmt: skip

    def state_dict(self) -> dict:
        """Avalanche keeps its plugins' state (Fisher, buffers, previous model) in objects lmas
        does not serialise; only the number of experiences per agent is saved."""
        return {"method": self.method, "experiences": {a: s[2] for a, s in self.agents.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Resuming is exact only when there is no Avalanche state to restore (``naive``)."""
        if self.method != "naive" and any(state.get("experiences", {}).values()):
            raise ValueError(
                f"strategy={self.name}: Avalanche's {self.method} state (its plugins' buffers, Fisher or "
                "previous model) is not checkpointed, so this run cannot be resumed exactly; start it again, "
                "or use lmas's own strategy=" + self.method
            )
        self.resumed = {a: int(n) for a, n in state.get("experiences", {}).items()}


class AvalancheFit:
    """The fit backend of :class:`AvalancheStrategy`: one ``avalanche.training.<Method>.train`` per experience.

    Each agent keeps its Avalanche strategy object (with its plugins' state) in the lmas strategy's
    ``agents`` across experiences; a fresh optimizer state per experience, as lmas's own path.
    """

    def __init__(self, population: Population, encoder: PromptEncoder, train: TrainConfig) -> None:
        self.population, self.encoder, self.train = population, encoder, train

    def _make(self, strategy: AvalancheStrategy, agent: str) -> list:
        import avalanche.training as avl
        from avalanche.training.plugins import EvaluationPlugin

        population, train = self.population, self.train
        model = AdapterLM(population.model)
        if not len(model.adapter):
            raise RuntimeError(f"agent {agent!r} has no trainable parameters")
        opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="No loggers specified")
            evaluator = EvaluationPlugin(loggers=[])  # no metrics, no printing: lmas evaluates
        cls = {"naive": avl.Naive, "ewc": avl.EWC, "lwf": avl.LwF, "replay": avl.Replay, "agem": avl.AGEM}
        device = next(population.model.parameters()).device
        avl_strategy = cls[strategy.method](
            model=model,
            optimizer=opt,
            criterion=answer_loss,
            train_mb_size=train.batch_size,
            train_epochs=train.epochs,
            eval_mb_size=train.batch_size,
            device=device,
            evaluator=evaluator,
            eval_every=-1,
            **strategy.options,
        )
        return [avl_strategy, model, strategy.resumed.pop(agent, 0)]

    def fit(self, exp: Experience, on_loss: StepHook, curve: Callable[[], float] | None = None) -> FitResult:
        """Train ``exp`` with Avalanche (learning curves are not drawn on this backend)."""
        strategy, agent, population = exp.strategy, exp.agent, self.population
        if isinstance(strategy, Compose):  # a composition of one part (Compose refuses more with this backend)
            strategy = strategy.parts[0]
        if not isinstance(strategy, AvalancheStrategy):
            raise TypeError(f"the avalanche fit backend trains AvalancheStrategy only, not {type(strategy).__name__}")
        if not exp.examples:
            raise ValueError("an experience needs at least one training example")
        population.activate(agent)
        state = strategy.agents.get(agent)
        if state is None or state[1].runner.lm is not population.model:
            state = strategy.agents[agent] = self._make(strategy, agent)
        avl_strategy, model, index = state
        expected = {n for n, p in population.model.named_parameters() if p.requires_grad}
        if set(model.names.values()) != expected:
            raise RuntimeError(f"agent {agent!r}: trainable parameters changed since its Avalanche strategy was built")
        exp_data = _experience(*encode_experience(exp.examples, self.encoder), index)
        torch.manual_seed(exp.seed)  # the loop seeded these with the fit's seed already; direct calls get the same
        random.seed(exp.seed)  # A-GEM's memory sampling
        train = dataclasses.replace(self.train, lr=exp.lr) if exp.lr else self.train
        for group in avl_strategy.optimizer.param_groups:  # the fit's own rate (population evolution sets it)
            group["lr"] = train.lr
        control = _control_plugin(train, strategy.gradient_clip_val)
        avl_strategy.plugins.append(control)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                avl_strategy.train(exp_data, eval_streams=[], shuffle=strategy.shuffle, reset_optimizer_state=True)
            for w in caught:  # Avalanche's replay buffer calls its own deprecated API: drop only that
                if not str(w.message).startswith("Call to deprecated"):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        finally:
            avl_strategy.plugins.remove(control)
        state[2] = index + 1
        population.model.eval()
        for i, loss in enumerate(control.losses, 1):  # the same step axis as the Lightning path
            if i % self.train.log_every == 0:
                on_loss(i, loss)
        return FitResult(control.losses, len(control.losses))
