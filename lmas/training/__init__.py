"""Training one experience: the Lightning module and data of a fit, and the fit backends."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmas.lm.encoding import PromptEncoder
from lmas.lm.trunk import SharedTrunk
from lmas.population.population import Population
from lmas.schema import TrainConfig
from lmas.training.fit import Experience, FitBackend, FitResult, StepHook


def fit_backends(
    population: Population,
    encoder: PromptEncoder,
    train: TrainConfig,
    trainer: dict[str, Any],
    trunk: SharedTrunk | None = None,
    curve_every: int = 0,
    progress: bool = True,
) -> dict[str, FitBackend]:
    """Every fit backend by the name a strategy gives (``Strategy.fit_backend``)."""
    from lmas.training.avalanche import AvalancheFit
    from lmas.training.fit import LightningFit

    return {
        "lightning": LightningFit(population, encoder, train, trainer, trunk, curve_every, progress),
        "avalanche": AvalancheFit(population, encoder, train),
    }


class RoutedFit:
    """One fit backend over several bases (:mod:`lmas.population.bases`): each experience trains on its agent's
    base with that base's backend."""

    def __init__(self, backends: dict[str, FitBackend], home: dict[str, str]) -> None:
        self.backends, self.home = backends, home

    def fit(self, exp: Experience, on_loss: StepHook, curve: Callable[[], float] | None = None) -> FitResult:
        return self.backends[self.home[exp.agent]].fit(exp, on_loss, curve)
