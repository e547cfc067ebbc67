"""Compose strategies: e.g. replay + LwF = replayed data and a distillation term."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import Tensor

from lmas.data.task import Example, Task
from lmas.strategies.base import Strategy

if TYPE_CHECKING:
    from lmas.population.population import Population
    from lmas.training.experience import IncrementalLM


def overrides(part: Strategy, method: str) -> bool:
    """True if ``part``'s class defines its own ``method`` (rather than the base Strategy's)."""
    return getattr(type(part), method) is not getattr(Strategy, method)


class Compose(Strategy):
    """Run several strategies as one.

    Hooks are called on every part in order; the loss terms are the union of the parts' terms (a
    name given by two parts is an error); the training data comes from the one part that changes
    it (two such parts are an error; a part with its own fit backend, e.g. Avalanche, must be alone); the
    state is one entry per part.

    Args:
        parts: the strategies, in call order.
        name: the composed strategy's name (default: the parts' names joined by ``+``).
    """

    name = "compose"

    def __init__(self, parts: Sequence[Strategy], name: str | None = None) -> None:
        parts = list(parts)
        if not parts:
            raise ValueError("Compose needs at least one strategy in `parts`")
        changing = [p.name for p in parts if overrides(p, "train_examples")]
        if len(changing) > 1:
            raise ValueError(f"Compose: {changing} all override train_examples; at most one part may")
        other = [p.name for p in parts if p.fit_backend != Strategy.fit_backend]
        if other and len(parts) > 1:
            raise ValueError(
                f"Compose: {other[0]} trains with its own fit backend, which cannot add the terms of "
                f"{[p.name for p in parts if p.name != other[0]]}; use it alone"
            )
        self.fit_backend = parts[0].fit_backend if len(parts) == 1 else Strategy.fit_backend
        self.parts = parts
        self.shape_bound = any(p.shape_bound for p in parts)
        self.name = name or "+".join(p.name for p in parts)

    def _one(self, method: str) -> Strategy | None:
        return next((p for p in self.parts if overrides(p, method)), None)

    def train_examples(self, agent: str, task: Task, seen: list[Task]) -> list[tuple[Example, str]]:
        part = self._one("train_examples")
        return (part or Strategy()).train_examples(agent, task, seen)

    def before_task(self, module: IncrementalLM, task: Task) -> None:
        for p in self.parts:
            p.before_task(module, task)

    def on_train_batch_start(self, module: IncrementalLM, batch: dict[str, Tensor]) -> None:
        for p in self.parts:
            p.on_train_batch_start(module, batch)

    def loss_terms(self, module: IncrementalLM, batch: dict[str, Tensor], out: dict[str, Tensor]) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        for p in self.parts:
            for key, value in p.loss_terms(module, batch, out).items():
                if key in terms:
                    raise ValueError(f"Compose({self.name}): two parts return the loss term {key!r}")
                terms[key] = value
        return terms

    def on_before_optimizer_step(self, module: IncrementalLM) -> None:
        for p in self.parts:
            p.on_before_optimizer_step(module)

    def after_task(self, module: IncrementalLM, task: Task) -> None:
        for p in self.parts:
            p.after_task(module, task)

    def fit_info(self) -> dict:
        info: dict = {}
        for p in self.parts:
            info.update(p.fit_info())
        return info

    def copy_agent(self, src: str, dst: str) -> None:
        for p in self.parts:
            p.copy_agent(src, dst)

    def state_dict(self) -> dict:
        return {"parts": [{"name": p.name, "state": p.state_dict()} for p in self.parts]}

    def load_state_dict(self, state: dict) -> None:
        saved = state["parts"]
        if [s["name"] for s in saved] != [p.name for p in self.parts]:
            raise ValueError(f"Compose: saved parts {[s['name'] for s in saved]} != {[p.name for p in self.parts]}")
        for p, s in zip(self.parts, saved, strict=True):
            p.load_state_dict(s["state"])

    def restore_model(self, population: Population) -> None:
        for p in self.parts:
            p.restore_model(population)
