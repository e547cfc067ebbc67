"""Adapter merging: a (LoRA config x method) matrix walked by invariants, exactness, peft facts, errors."""

from __future__ import annotations

import pytest
import torch

from lmas.transfer import init_from_merge, merge_adapters, merged_model
from lmas.transfer.factors import factorise, pad_rank
from lmas.transfer.merge import METHODS, NEEDS_DENSITY, PEFT_METHODS
from lmas.transfer.policy import Merge
from lmas.transfer.task_vectors import METHODS as TASK_VECTOR_METHODS

CONFIGS = ["r2-qv", "r4-qv", "r4-all"]
MATRIX = [(c, m) for c in CONFIGS for m in METHODS]
SVD_FAMILY = [m for m in PEFT_METHODS if m.endswith("svd")]


def _density(method: str, value: float = 1.0) -> float | None:
    return value if method in NEEDS_DENSITY else None


def _close(x, y, atol=1e-5):
    torch.testing.assert_close(x, y, atol=atol, rtol=0)


def _deltas_close(got: dict, want: dict, atol=1e-5):
    assert set(got) == set(want)
    for m in want:
        _close(got[m], want[m], atol)


def _weighted(tx, pop, names, weights):
    ds = [tx.deltas(pop, n) for n in names]
    return {m: sum(w * d[m] for d, w in zip(ds, weights)) for m in ds[0]}


# --- the matrix -------------------------------------------------------------------------------
@pytest.mark.parametrize("config,method", MATRIX)
def test_merge_invariants(make_population, tx, config, method):
    """Every (LoRA config, method) case, one population, three invariants:

    1. one adapter at weight 1 is reproduced (logits and ΔW). Holds for every method: with one
       adapter peft runs `linear` whatever the type (density is ignored, so 0.5 prunes nothing
       either); exact/task_arithmetic factor the one product at full rank;
    2. merging two adapters (into a new agent and into an existing one, density 0.5 where used)
       changes neither the base (torch.equal) nor the sources, nor the global RNG, and leaves no
       temporary peft adapter; only the target's LoRA weights are trainable afterwards;
    3. merge_and_unload on a copy (:func:`merged_model`) gives the adapter's logits and leaves the
       population's base bit-identical.
    """
    pop = make_population(["src", "other", "c"], tx.CONFIGS[config])
    tx.randomise(pop, "src", 1)
    tx.randomise(pop, "other", 2)
    base, src, other = tx.base_state(pop), pop.adapter_state("src"), pop.adapter_state("other")
    rng = torch.random.get_rng_state()

    if method not in TASK_VECTOR_METHODS:  # those prune one adapter too, or need two (model_stock): own tests
        ref = tx.logits(pop, "src")
        merge_adapters(pop, ["src"], [1.0], "one", method, density=_density(method, 0.5))
        assert pop.model.active_adapters == ["one"]
        _close(tx.logits(pop), ref)
        _deltas_close(tx.deltas(pop, "one"), tx.deltas(pop, "src"))
    else:
        merge_adapters(pop, ["src", "other"], [1.0, 1.0], "one", method, density=_density(method, 0.5))

    merge_adapters(pop, ["src", "other"], [0.7, -0.5], "new", method, density=_density(method, 0.5))
    merge_adapters(pop, ["src", "other"], [0.6, 0.4], "c", method, density=_density(method, 0.5))
    assert torch.equal(torch.random.get_rng_state(), rng)  # peft's RNG use ran on a forked RNG
    after = tx.base_state(pop)
    assert set(after) == set(base) and all(torch.equal(after[k], base[k]) for k in base)
    for name, state in (("src", src), ("other", other)):
        assert all(torch.equal(v, state[k]) for k, v in pop.adapter_state(name).items())
    assert set(pop.model.peft_config) == {"src", "other", "c", "one", "new"}
    trainable = {n for n, p in pop.model.named_parameters() if p.requires_grad}
    assert trainable and trainable == set(pop.parameters_of("c"))
    assert any(d.abs().max() > 1e-3 for d in tx.deltas(pop, "c").values())

    want = tx.logits(pop, "new")
    standalone = merged_model(pop, "new")
    assert not any("lora_" in n for n, _ in standalone.named_parameters())
    b = tx.batch_of(pop)
    with torch.no_grad():
        got = standalone(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    _close(got, want, atol=1e-4)
    after = tx.base_state(pop)
    assert all(torch.equal(after[k], base[k]) for k in base)
    _close(tx.logits(pop, "new"), want, atol=0)


def test_in_place_merge_unmerge_is_exact_only_up_to_rounding(make_population, tx):
    """peft's merge_adapter()/unmerge_adapter() computes W + ΔW - ΔW in float: equal up to
    rounding, not bit-identical in general (use :func:`merged_model` to keep the base exact)."""
    pop = make_population(["a"], {"r": 4, "alpha": 8})
    tx.randomise(pop, "a", 1)
    base, ref = tx.base_state(pop), tx.logits(pop, "a")
    pop.model.merge_adapter()
    _close(tx.logits(pop), ref, atol=1e-4)
    pop.model.unmerge_adapter()
    after = tx.base_state(pop)
    assert all(torch.allclose(after[k], base[k], atol=1e-6, rtol=0) for k in base)


# --- exactness ----------------------------------------------------------------------------------
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("method", ["exact", "task_arithmetic", "cat", "svd"])
def test_exact_methods_equal_the_weighted_sum_of_products(make_population, tx, config, method):
    """exact/task_arithmetic (ours) and peft's cat and svd at rank = sum of ranks are exact."""
    pop = make_population(["a", "b", "c"], tx.CONFIGS[config])
    for i, n in enumerate(pop.names):
        tx.randomise(pop, n, i + 1)
    weights = [0.7, -1.3, 0.4]
    r = tx.CONFIGS[config]["r"]
    merge_adapters(pop, ["a", "b", "c"], weights, "m", method, rank=3 * r if method == "svd" else None)
    assert pop.model.peft_config["m"].r == 3 * r
    _deltas_close(tx.deltas(pop, "m"), _weighted(tx, pop, ["a", "b", "c"], weights))


@pytest.mark.parametrize("config", CONFIGS)
def test_task_arithmetic_negation_is_exact(make_population, tx, config):
    pop = make_population(["a", "b", "fresh"], tx.CONFIGS[config])
    tx.randomise(pop, "a", 1)
    tx.randomise(pop, "b", 2)
    merge_adapters(pop, ["a", "a"], [1.0, -1.0], "zero", "task_arithmetic")
    assert all(d.abs().max() < 1e-6 for d in tx.deltas(pop, "zero").values())
    _close(tx.logits(pop, "zero"), tx.logits(pop, "fresh"))
    merge_adapters(pop, ["a", "b"], [1.0, 1.0], "ab", "task_arithmetic")
    merge_adapters(pop, ["ab", "b"], [1.0, -1.0], "back", "task_arithmetic")  # (a + b) - b = a
    _deltas_close(tx.deltas(pop, "back"), tx.deltas(pop, "a"))


@pytest.mark.parametrize("config", CONFIGS)
def test_linear_on_factors_differs_from_the_exact_merge(make_population, tx, config):
    pop = make_population(["a", "b"], tx.CONFIGS[config])
    tx.randomise(pop, "a", 1)
    tx.randomise(pop, "b", 2)
    merge_adapters(pop, ["a", "b"], [0.5, 0.5], "lin", "linear")
    merge_adapters(pop, ["a", "b"], [0.5, 0.5], "ex", "exact")
    want = _weighted(tx, pop, ["a", "b"], [0.5, 0.5])
    _deltas_close(tx.deltas(pop, "ex"), want)
    lin = tx.deltas(pop, "lin")
    rel = max(float((lin[m] - want[m]).norm() / want[m].norm()) for m in want)
    assert rel > 0.1  # the cross terms B_a A_b, B_b A_a of averaging the factors


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_peft_with_a_no_op_partner(make_population, tx, method):
    """[src, fresh adapter (B = 0)] at weights [1, 1], density 1: the methods on products (cat,
    *_svd) give src back exactly (TIES' sign election drops the zero entries); the ones on factors
    mix the fresh adapter's A into src's and change ΔW."""
    pop = make_population(["src", "fresh"], {"r": 4, "alpha": 8})
    tx.randomise(pop, "src", 1)
    merge_adapters(pop, ["src", "fresh"], [1.0, 1.0], "m", method, density=_density(method))
    got, want = tx.deltas(pop, "m"), tx.deltas(pop, "src")
    if method == "cat" or method in SVD_FAMILY:
        _deltas_close(got, want)
    else:
        assert max(float((got[m] - want[m]).norm() / want[m].norm()) for m in want) > 0.1


def test_rank_cut_is_the_best_approximation_and_fits_existing_targets(make_population, tx):
    from lmas.population.population import lora_config

    pop = make_population(["a", "b"], {"r": 4, "alpha": 8})
    pop.add_agent("wide", lora_config(r=8, alpha=4))  # other rank and scaling
    tx.randomise(pop, "a", 1)
    tx.randomise(pop, "b", 2)
    want = _weighted(tx, pop, ["a", "b"], [1.0, 0.5])
    merge_adapters(pop, ["a", "b"], [1.0, 0.5], "wide", "exact")  # rank 8 fits exactly
    _deltas_close(tx.deltas(pop, "wide"), want)
    merge_adapters(pop, ["a", "b"], [1.0, 0.5], "cut", "exact", rank=3)
    assert pop.model.peft_config["cut"].r == 3
    for m, d in tx.deltas(pop, "cut").items():
        s = torch.linalg.svdvals(want[m].double())
        err = (d.double() - want[m].double()).norm()
        assert abs(float(err) - float(s[3:].square().sum().sqrt())) < 1e-4  # Eckart-Young
    merge_adapters(pop, ["a"], [1.0], "wide", "exact")  # rank 4 into rank 8: padded, exact
    _deltas_close(tx.deltas(pop, "wide"), tx.deltas(pop, "a"))
    assert all(p.abs().sum() > 0 for n, p in pop.parameters_of("wide").items() if "lora_A" in n)


def test_mixed_ranks(make_population, tx):
    from lmas.population.population import lora_config

    pop = make_population(["a"], {"r": 4, "alpha": 8})
    pop.add_agent("b", lora_config(r=2, alpha=4))
    tx.randomise(pop, "a", 1)
    tx.randomise(pop, "b", 2)
    want = _weighted(tx, pop, ["a", "b"], [0.5, 2.0])
    for method, rank in (("exact", 6), ("cat", 6), ("svd", 4)):
        merge_adapters(pop, ["a", "b"], [0.5, 2.0], method, method)
        assert pop.model.peft_config[method].r == rank
    _deltas_close(tx.deltas(pop, "exact"), want)
    _deltas_close(tx.deltas(pop, "cat"), want)
    with pytest.raises(ValueError, match="one LoRA rank"):
        merge_adapters(pop, ["a", "b"], [0.5, 0.5], "lin", "linear")


def test_dare_is_seeded(make_population, tx):
    pop = make_population(["a", "b"], {"r": 4, "alpha": 8})
    tx.randomise(pop, "a", 1)
    tx.randomise(pop, "b", 2)
    for name, seed in (("x", 0), ("y", 0), ("z", 1)):
        merge_adapters(pop, ["a", "b"], [0.5, 0.5], name, "dare_ties_svd", density=0.5, seed=seed)
    x, y, z = (tx.deltas(pop, n) for n in "xyz")
    assert all(torch.equal(x[m], y[m]) for m in x)
    assert any(not torch.allclose(x[m], z[m]) for m in x)


def test_bad_requests_are_named(make_population, tx):
    pop = make_population(["a", "b"], {"r": 4, "alpha": 8})
    with pytest.raises(ValueError, match="unknown; allowed: linear, svd.*exact, task_arithmetic"):
        merge_adapters(pop, ["a", "b"], [1, 1], "m", "average")
    with pytest.raises(ValueError, match="needs `density`"):
        merge_adapters(pop, ["a", "b"], [1, 1], "m", "ties")
    with pytest.raises(ValueError, match="2 sources but 1 weights"):
        merge_adapters(pop, ["a", "b"], [1], "m", "exact")
    with pytest.raises(ValueError, match=r"unknown source agents \['zz'\]"):
        merge_adapters(pop, ["a", "zz"], [1, 1], "m", "exact")
    with pytest.raises(ValueError, match="never truncates"):
        merge_adapters(pop, ["a", "b"], [1, 1], "m", "task_arithmetic", rank=2)
    with pytest.raises(ValueError, match="density=1.5"):
        merge_adapters(pop, ["a", "b"], [1, 1], "m", "dare_linear", density=1.5)
    assert pop.names == ["a", "b"] and set(pop.model.peft_config) == {"a", "b"}


def test_factorise_and_pad_are_exact_at_full_rank():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 12, generator=gen), torch.randn(9, 5, generator=gen)
    a2, b2, res = factorise(a, b, 5)
    _close(b2 @ a2, b @ a)
    assert res < 1e-6
    a3, b3 = pad_rank(a2, b2, 7, gen)
    assert a3.shape == (7, 12) and b3.shape == (9, 7)
    _close(b3 @ a3, b @ a)
    za, zb, res0 = factorise(a, torch.zeros_like(b), 3)
    assert res0 == 0.0 and torch.equal(zb @ za, torch.zeros(9, 12))


def test_init_from_merge_and_the_merge_policy(make_population, tx):
    pop = make_population(["a", "b", "c"], {"r": 4, "alpha": 8})
    for i, n in enumerate(pop.names):
        tx.randomise(pop, n, i + 1)
    init_from_merge(pop, "new", ["a", "b"])  # uniform weights, exact
    _deltas_close(tx.deltas(pop, "new"), _weighted(tx, pop, ["a", "b"], [0.5, 0.5]))
    first = pop.adapter_state("c")
    pop.add_task_adapter("c")
    init_from_merge(pop, "c", ["a"], [1.0])  # into c's new task adapter; its first one is kept
    _deltas_close(tx.deltas(pop, "c"), tx.deltas(pop, "a"))
    assert all(torch.equal(v, first[k]) for k, v in pop.adapter_state("c", "c").items())

    policy = Merge(method="svd", sources=["a", "b"], targets=["a", "b", "new"], start=1, every=2)
    assert policy.apply(pop, 0) == [] and policy.apply(pop, 2) == []
    records = policy.apply(pop, 1)
    assert [r["agent"] for r in records] == ["a", "b", "new"]
    da = tx.deltas(pop, "a")
    for n in ("b", "new"):
        _deltas_close(tx.deltas(pop, n), da)


def test_transfer_run_counts_each_adapter_read_from_another_agent(tiny_base):
    from lmas.population.messages import MessageLog, nbytes
    from lmas.population.population import Population
    from lmas.transfer.policy import Merge, Transfer

    pop = Population(tiny_base, ["a", "b", "c"], lora={"r": 2})
    log = MessageLog()
    records = Merge(method="exact", sources=["a", "b"], targets=["c"], start=0).run(pop, 0, [], None, log)
    assert [r["event"] for r in records] == ["merge"] and records[0]["agent"] == "c"
    summary = log.round_summary(0)
    assert summary["by_kind"]["adapter"]["messages"] == 2  # a -> c and b -> c
    assert summary["bytes"] == nbytes(pop.adapter_state("a")) + nbytes(pop.adapter_state("b"))
    assert Transfer().run(pop, 0, [], None, log) == [] and log.round_summary(0)["messages"] == 2
