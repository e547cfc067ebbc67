"""Adapter-level knowledge transfer between agents: merging, LoraHub composition, merge-initialisation."""

from lmas.transfer.init import init_from_merge
from lmas.transfer.lorahub import compose_adapter, lorahub_weights
from lmas.transfer.merge import METHODS, merge_adapters, merged_model
from lmas.transfer.policy import LoraHub, Merge, Transfer

__all__ = [
    "METHODS",
    "LoraHub",
    "Merge",
    "Transfer",
    "compose_adapter",
    "init_from_merge",
    "lorahub_weights",
    "merge_adapters",
    "merged_model",
]
