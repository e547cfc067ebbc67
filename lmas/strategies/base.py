"""The strategy interface: what a continual-learning method may change in one experience.

A strategy changes training in three places only, each a small method:

* ``train_examples`` — the data of an experience (replay adds buffer items, joint adds all seen tasks);
* ``loss_terms`` — extra loss tensors added to the task loss (EWC, LwF, O-LoRA, L2, ...);
* ``before_task`` / ``after_task`` / ``on_before_optimizer_step`` — state updates (Fisher,
  buffers, gradient projection for A-GEM).

``Naive`` (SeqLoRA: one adapter keeps training on each new task) is the base class itself.
Strategies keep their state per agent, in dict attributes keyed by agent name (so :meth:`Strategy.copy_agent`
can hand one agent's state to another), and expose it through ``state_dict`` for checkpoints.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from torch import Tensor

from lmas.data.task import Example, Task

if TYPE_CHECKING:  # pragma: no cover
    from lmas.population.population import Population
    from lmas.training.experience import IncrementalLM


class Strategy:
    """Naive sequential fine-tuning of the agent's adapter (no protection against forgetting)."""

    name = "naive"
    fit_backend = "lightning"  # how an experience is trained: lmas.training.fit.LightningFit (or "avalanche")
    # per-agent state tied to the shape of the agent's adapter (anchors, a teacher copy): its rank must stay, so the
    # config check refuses topology.max_rank and PBT refuses loop.pbt.space.rank with it
    shape_bound = False

    def train_examples(self, agent: str, task: Task, seen: list[Task]) -> list[tuple[Example, str]]:
        """(example, task kind) pairs to train on in this experience; ``seen`` excludes ``task``."""
        return [(ex, task.kind) for ex in task.train]

    def before_task(self, module: IncrementalLM, task: Task) -> None:
        """Called before ``Trainer.fit`` of an experience."""

    def on_train_batch_start(self, module: IncrementalLM, batch: dict[str, Tensor]) -> None:
        """Before the forward pass of a training batch (A-GEM computes its reference gradient here)."""

    def loss_terms(self, module: IncrementalLM, batch: dict[str, Tensor], out: dict[str, Tensor]) -> dict[str, Tensor]:
        """Extra scalar losses for this batch, by name; the module adds them to the task loss.

        ``out`` holds the student's forward pass: ``logits`` (N, V) at the N answer positions,
        ``targets`` (N,) and ``rows`` (N,) (the batch row of each position).
        """
        return {}

    def on_before_optimizer_step(self, module: IncrementalLM) -> None:
        """Gradient surgery hook (A-GEM); gradients are populated when this runs."""

    def after_task(self, module: IncrementalLM, task: Task) -> None:
        """Called after ``Trainer.fit`` of an experience (consolidation: Fisher, buffers, ...)."""

    def fit_info(self) -> dict:
        """What the agent's history should record about the experience just trained (e.g. its
        distillation teachers, which the lineage graph draws as edges); JSON-safe."""
        return {}

    def copy_agent(self, src: str, dst: str) -> None:
        """Give ``dst`` a copy of ``src``'s per-agent state (population-based training copies one agent into
        another): every dict attribute keyed by agent name gets ``dst``'s entry replaced by a deep copy of
        ``src``'s, or removed when ``src`` has none. A strategy that keeps per-agent state otherwise overrides it."""
        for value in vars(self).values():
            if isinstance(value, dict) and src in value:
                value[dst] = copy.deepcopy(value[src])
            elif isinstance(value, dict) and dst in value:
                del value[dst]

    def state_dict(self) -> dict:
        """Everything needed to resume this strategy (tensors and JSON-safe values)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""

    def restore_model(self, population: Population) -> None:
        """Right after :meth:`load_state_dict` (a resume, a self-learning rollback): write into the population's model
        what the state holds of the model itself (SeqFT's fine-tuned base), before anything scores it."""
