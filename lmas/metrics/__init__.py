"""Continual-learning metrics (:mod:`lmas.metrics.cl`) and the population knowledge matrix."""

from lmas.metrics.cl import (
    accuracy_after_each,
    average_accuracy,
    bwt,
    forgetting,
    forgetting_per_task,
    forward_transfer,
    forward_transfer_per_task,
    plasticity,
)
from lmas.metrics.knowledge import HIGHER_IS_BETTER, METRICS, KnowledgeMatrix

__all__ = [
    "HIGHER_IS_BETTER",
    "METRICS",
    "KnowledgeMatrix",
    "accuracy_after_each",
    "average_accuracy",
    "bwt",
    "forgetting",
    "forgetting_per_task",
    "forward_transfer",
    "forward_transfer_per_task",
    "plasticity",
]
