"""Training one experience: the Lightning module and data of a fit, and the fit backends."""

from __future__ import annotations

from typing import Any

from lmas.lm.encoding import PromptEncoder
from lmas.lm.trunk import SharedTrunk
from lmas.population.population import Population
from lmas.schema import TrainConfig
from lmas.training.fit import FitBackend


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
