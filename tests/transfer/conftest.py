"""One tiny base per session; each test gets a population over a fresh copy of its weights."""

from __future__ import annotations

import copy

import pytest
import torch



@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread avoids OpenMP start-up and contention; restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "r2-qv": {"r": 2, "alpha": 4},
    "r4-qv": {"r": 4, "alpha": 8},
    "r4-all": {"r": 4, "alpha": 8, "target_modules": ALL_LINEAR},
}


@pytest.fixture(scope="session")
def tiny_once():
    from lmas.models.providers import tiny

    return tiny(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=0)


@pytest.fixture
def make_population(tiny_once):
    """``make(agents, lora)``: a Population over a fresh copy of the session's tiny base."""
    from lmas.models.providers import BaseModel
    from lmas.population.population import Population

    def make(agents, lora=None, seed=0):
        base = BaseModel(copy.deepcopy(tiny_once.model), tiny_once.tokenizer, tiny_once.name)
        return Population(base, agents=agents, lora=lora, seed=seed)

    return make


def randomise(population, name: str, seed: int, std: float = 0.3) -> None:
    """Give an agent's trainable adapter random A and B (a fresh LoRA has B = 0, a no-op)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in population.parameters_of(name).values():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def base_state(population) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in population.model.named_parameters() if "lora_" not in n}


def deltas(population, name: str) -> dict[str, torch.Tensor]:
    """Per-module ΔW = s·B·A of an agent's trainable adapter."""
    from lmas.transfer.factors import delta, read_factors

    return {m: delta(a, b) for m, (a, b) in read_factors(population, name).items()}


def batch_of(population):
    from lmas.lm.encoding import PromptEncoder, collate

    enc = PromptEncoder(population.tokenizer, 32)
    items = [enc.encode("News: rain falls\nTopic:", "weather", False), enc.encode("Q: 2+2", "4", True)]
    return collate(items, enc.pad_id)


@torch.no_grad()
def logits(population, name: str | None = None) -> torch.Tensor:
    if name is not None:
        population.activate(name)
    b = batch_of(population)
    return population.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


@pytest.fixture(scope="session")
def tx():
    """The helpers above, for test modules (``--import-mode=importlib`` cannot import conftest)."""
    from types import SimpleNamespace

    return SimpleNamespace(CONFIGS=CONFIGS, randomise=randomise, base_state=base_state, deltas=deltas,
                           batch_of=batch_of, logits=logits)
