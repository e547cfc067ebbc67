"""lmas.metrics.stats: CIs over test items and over runs, paired tests, Holm, gap closure, the table.

Runs are built by hand in tmp_path: per-item outcomes written as per_example/*.npz, the matrix
values computed from them, results.json ``metrics`` from KnowledgeMatrix.summary.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from lmas.metrics import KnowledgeMatrix, stats
from lmas.metrics.records import Slot
from lmas.metrics.stats import Interval, holm, item_intervals, load_run, paired_difference, run_interval

AGENT = "agent0"


def _value(outcomes: np.ndarray, metric: str = "") -> float:
    """A task's metric from its per-item outcomes: mean (1/0), exp(sum NLL / sum tokens), or (masked accuracy)
    sum hits / sum tokens."""
    a = np.asarray(outcomes, dtype=float)
    if a.ndim == 1:
        return float(a.mean())
    ratio = a[:, 0].sum() / a[:, 1].sum()
    return float(ratio if metric == "masked_accuracy" else np.exp(ratio))


def write_run(
    path: Path,
    metrics: dict[str, str],
    initial: dict[str, np.ndarray],
    rounds: list[dict[str, np.ndarray]],
    plan: list[list[str]],
    seed: int = 0,
    stream: str = "s",
) -> Path:
    """A finished run: results.json (matrix + metrics) and per_example/*.npz, one task set per round."""
    tasks = list(metrics)
    km = KnowledgeMatrix([AGENT], tasks, metrics)
    for t, arr in initial.items():
        km.record_initial(AGENT, t, _value(arr, metrics[t]))
    for r, (outs, trained) in enumerate(zip(rounds, plan, strict=True)):
        km.start_round()
        for t, arr in outs.items():
            km.record(r, AGENT, t, _value(arr, metrics[t]))
        for t in trained:
            km.mark_trained(r, AGENT, t)
    path.mkdir(parents=True)
    (path / "per_example").mkdir()
    np.savez(path / "per_example" / "initial.npz", **initial)
    for r, outs in enumerate(rounds):
        np.savez(path / "per_example" / f"round{r:03d}.npz", **{f"{AGENT}/{t}": a for t, a in outs.items()})
    results = {"complete": True, "stream": stream, "seed": seed, "matrix": km.to_dict(), "metrics": km.summaries()}
    (path / "results.json").write_text(json.dumps(results))
    return path


def sequence_run(path: Path, seed: int = 0, n: int = 200, skill: float = 0.0, stream: str = "s") -> Path:
    """Three tasks trained in rounds 0..2 (a, b accuracy; c perplexity) with forgetting and transfer.

    Items are drawn with ``seed``; ``skill`` raises every trained accuracy (a better strategy).
    """
    rng = np.random.default_rng(seed)
    u = rng.random((3, 2, n))  # round, accuracy task, item: one uniform per outcome
    ppl = np.stack([rng.uniform(1.0, 3.0, n), rng.integers(2, 6, n).astype(float)], axis=1)

    def acc(p: float, r: int, j: int) -> np.ndarray:
        return (u[r, j] < min(1.0, p + skill)).astype(np.uint8)

    base = (rng.random((2, n)) < 0.3).astype(np.uint8)
    rounds = [
        {"a": acc(0.8, 0, 0), "b": acc(0.4, 0, 1), "c": ppl * [1.2, 1.0]},
        {"a": acc(0.6, 1, 0), "b": acc(0.9, 1, 1), "c": ppl * [1.1, 1.0]},
        {"a": acc(0.5, 2, 0), "b": acc(0.7, 2, 1), "c": ppl * [0.8, 1.0]},
    ]
    metrics = {"a": "accuracy", "b": "exact_match", "c": "perplexity"}
    return write_run(
        path,
        metrics,
        {"a": base[0], "b": base[1], "c": ppl * [1.3, 1.0]},
        rounds,
        [["a"], ["b"], ["c"]],
        seed=seed,
        stream=stream,
    )


def single_task_run(path: Path, correct: np.ndarray, seed: int = 0) -> Path:
    """One accuracy task trained in round 0: avg_acc is the share of correct items."""
    return write_run(path, {"a": "accuracy"}, {"a": np.zeros_like(correct)}, [{"a": correct}], [["a"]], seed=seed)


# ---------------------------------------------------------------------------- records
def test_metrics_recomputed_from_records_equal_results_json(tmp_path):
    run = load_run(sequence_run(tmp_path / "r"))
    want = run.results["metrics"][AGENT]
    assert set(want) >= {"avg_acc", "forgetting", "bwt", "fwt", "plasticity", "avg_ppl", "ppl_forgetting"}
    slot = Slot(run)
    got = slot.summaries({t: np.ones((1, n)) for t, n in slot.sizes.items()}, list(want))[0]
    assert got == pytest.approx([want[k] for k in want], abs=1e-12)
    ivs = item_intervals(run, n_resamples=199)
    assert {k: iv.estimate for k, iv in ivs.items()} == pytest.approx(want, abs=1e-12)
    assert all(iv.low <= iv.estimate <= iv.high for iv in ivs.values())
    assert ivs["avg_acc"].low < ivs["avg_acc"].high and ivs["ppl_forgetting"].high == 0.0  # c is trained last


def test_item_weights_rebuild_a_resampled_matrix(tmp_path):
    # weights 2, 0, 1, ... on items = the metric on the resample that drew item 0 twice and item 1 never
    run = load_run(sequence_run(tmp_path / "r", n=5))
    slot = Slot(run)
    w = {t: np.array([[2.0, 0.0, 1.0, 1.0, 1.0]]) for t in slot.sizes}
    vals = slot.entries(w)[0]  # (1 + rounds, tasks)
    x = slot.x["a"][:, 3, 0]  # task a after round 2
    assert vals[3, 0] == pytest.approx((2 * x[0] + x[2] + x[3] + x[4]) / 5)
    nll, tok = slot.x["c"][:, 0, 0], slot.x["c"][:, 0, 1]  # task c, initial
    assert vals[0, 2] == pytest.approx(math.exp((2 * nll[0] + nll[2:].sum()) / (2 * tok[0] + tok[2:].sum())))


def test_an_encoders_raw_text_metrics_resample_token_weighted(tmp_path):
    """pseudo_perplexity pools like perplexity (exp of NLL over tokens); masked_accuracy as hits over tokens."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 9, 6).astype(float)
    hits = np.floor(tokens * rng.random(6))
    mask = np.stack([hits, tokens], 1)
    pppl = np.stack([tokens * rng.uniform(1, 4, 6), tokens], 1)
    metrics = {"m": "masked_accuracy", "p": "pseudo_perplexity"}
    path = write_run(tmp_path / "r", metrics, {"m": mask * [0.5, 1], "p": pppl * [2, 1]}, [{"m": mask, "p": pppl}],
                     [["m", "p"]])  # fmt: skip
    run = load_run(path)
    assert {"avg_acc", "avg_ppl"} <= set(run.results["metrics"][AGENT])
    slot = Slot(run)
    w = {t: np.array([[3.0, 0.0, 1.0, 0.0, 1.0, 1.0]]) for t in slot.sizes}
    vals = slot.entries(w)[0]  # (initial + 1 round, tasks m, p)
    wt = w["m"][0]
    assert vals[1, 0] == pytest.approx((wt @ hits) / (wt @ tokens))
    assert vals[1, 1] == pytest.approx(math.exp((wt @ pppl[:, 0]) / (wt @ tokens)))
    ones = {t: np.ones((1, 6)) for t in slot.sizes}
    got = slot.summaries(ones, ["avg_acc", "avg_ppl"])[0]
    assert got == pytest.approx([hits.sum() / tokens.sum(), math.exp(pppl[:, 0].sum() / tokens.sum())])


def test_missing_or_foreign_records_are_errors_naming_the_file(tmp_path):
    path = sequence_run(tmp_path / "r")
    (path / "per_example" / "round001.npz").unlink()
    with pytest.raises(ValueError, match=r"round001\.npz: no array 'agent0/a'"):
        item_intervals(path)
    other = sequence_run(tmp_path / "other", seed=5)
    for f in (other / "per_example").iterdir():
        f.replace(path / "per_example" / f.name)
    with pytest.raises(ValueError, match="do not belong to this run"):
        item_intervals(path)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "results.json").write_text((path / "results.json").read_text())
    with pytest.raises(ValueError, match="no per_example/ records"):
        item_intervals(bare)
    with pytest.raises(ValueError, match="no results.json"):
        load_run(tmp_path / "nothing")


def test_one_agents_outcomes_of_a_round_are_read_and_checked_against_the_matrix(tmp_path):
    path = sequence_run(tmp_path / "r", n=50)
    run = load_run(path)
    with np.load(path / "per_example" / "round001.npz") as f:
        stored = f["agent0/b"]
    x = run.outcomes(1, "agent0", "b")
    assert x.dtype == float and np.array_equal(x, stored)
    assert x.mean() == pytest.approx(run.results["matrix"]["values"][1][0][1], rel=1e-6)
    with pytest.raises(ValueError, match=r"round007\.npz: no such per-example record \(rounds: \[0, 1, 2\]\)"):
        run.outcomes(7, "agent0", "a")
    with pytest.raises(ValueError, match=r"round001\.npz: no array 'agent0/z'"):
        run.outcomes(1, "agent0", "z")
    run.rounds[1]["agent0/b"] = 1 - stored  # records of another run: the matrix disagrees
    with pytest.raises(ValueError, match=r"round001\.npz: agent0/b gives .* but the matrix has"):
        run.outcomes(1, "agent0", "b")
    with pytest.raises(ValueError, match=r"shape \(50, 2\)"):  # a perplexity task is not a per-item score
        run.outcomes(1, "agent0", "c")


def test_a_perplexity_array_of_the_wrong_shape_is_an_error(tmp_path):
    path = sequence_run(tmp_path / "r")
    f = path / "per_example" / "round000.npz"
    arrays = dict(np.load(f))
    arrays["agent0/c"] = arrays["agent0/c"][:, 0]
    np.savez(f, **arrays)
    with pytest.raises(ValueError, match=r"round000\.npz\['agent0/c'\]: a perplexity or masked-accuracy task needs \(N, 2\)"):
        item_intervals(path)


# ---------------------------------------------------------------------------- intervals
def test_constant_values_give_a_zero_width_interval(tmp_path):
    iv = run_interval([0.5, 0.5, 0.5, 0.5])
    assert (iv.estimate, iv.low, iv.high, iv.n) == (0.5, 0.5, 0.5, 4)
    one = run_interval([0.7])
    assert one.estimate == 0.7 and math.isnan(one.low) and math.isnan(one.high)
    ivs = item_intervals(single_task_run(tmp_path / "r", np.ones(50, dtype=np.uint8)), n_resamples=199)
    assert (ivs["avg_acc"].low, ivs["avg_acc"].high) == (1.0, 1.0)
    assert (ivs["forgetting"].low, ivs["forgetting"].high) == (0.0, 0.0)


def test_t_interval_by_hand():
    iv = run_interval([0.1, 0.2, 0.3])
    half = scipy.stats.t.ppf(0.975, 2) * 0.1 / math.sqrt(3)  # sd of (0.1, 0.2, 0.3) is 0.1
    assert (iv.estimate, iv.low, iv.high) == pytest.approx((0.2, 0.2 - half, 0.2 + half))
    assert half == pytest.approx(0.2484, abs=1e-4)
    assert iv.p == pytest.approx(2 * scipy.stats.t.sf(0.2 / (0.1 / math.sqrt(3)), 2))
    boot = run_interval([0.1, 0.2, 0.3, 0.4, 0.5], method="bootstrap", n_resamples=999)
    assert 0.1 <= boot.low < 0.3 < boot.high <= 0.5
    with pytest.raises(ValueError, match="method must be"):
        run_interval([0.1], method="z")


def test_binomial_bootstrap_interval_is_close_to_wilson(tmp_path):
    n, k = 2000, 1400
    correct = np.zeros(n, dtype=np.uint8)
    correct[np.random.default_rng(0).permutation(n)[:k]] = 1
    iv = item_intervals(single_task_run(tmp_path / "r", correct), keys=["avg_acc"], n_resamples=2999)["avg_acc"]
    wilson = scipy.stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
    assert iv.estimate == pytest.approx(0.7)
    assert iv.low == pytest.approx(wilson.low, abs=0.004)
    assert iv.high == pytest.approx(wilson.high, abs=0.004)
    assert iv.n == n


def test_item_intervals_are_deterministic_with_a_seed(tmp_path):
    path = sequence_run(tmp_path / "r")
    a = item_intervals(path, n_resamples=199, seed=3)
    b = item_intervals(path, n_resamples=199, seed=3)
    c = item_intervals(path, n_resamples=199, seed=4)
    assert a == b
    assert a["avg_acc"].low != c["avg_acc"].low


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005, 3*0.01, 2*0.03, max(0.06, 1*0.04)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adj = holm([math.nan, 0.02, 0.04, 0.9])  # NaN is not in the family: m = 3
    assert math.isnan(adj[0]) and adj[1:] == pytest.approx([0.06, 0.08, 0.9])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])


def test_run_values_equal_up_to_float32_rounding_are_not_a_significant_difference():
    """Three seeds that each differ by one test item of 80 (float32 matrix values: equal up to ~1e-8) once gave a
    paired t of p < 0.001; they are equal values, a zero-width interval and no test."""
    iv = run_interval([-0.012499988079071045, -0.012499988079071045, -0.012500017881393433])
    assert iv.method == "3 equal values" and iv.low == iv.high == pytest.approx(-0.0125) and math.isnan(iv.p)
    assert run_interval([1e-9, -1e-9, 0.0]).p == 1.0  # equal to 0
    assert run_interval([0.0125, 0.0125, 0.025]).p == pytest.approx(0.0572, abs=1e-3)  # a real spread: a t-test


def test_interval_text_for_tables():
    iv = Interval(0.0123, -0.0311, 0.0554, 3, "t", 0.4121)
    assert iv.show() == "0.012 [-0.031, 0.055]"
    assert iv.show(signed=True, p=True) == "+0.012 [-0.031, +0.055] p=0.412"
    assert Interval(0.5, math.nan, math.nan, 1, "one run").show(signed=True, p=True) == "+0.500"  # no interval, no p


# ---------------------------------------------------------------------------- comparisons
def test_paired_difference_has_the_known_sign(tmp_path):
    better = [load_run(sequence_run(tmp_path / f"good{s}", seed=s, skill=0.15)) for s in range(3)]
    worse = [load_run(sequence_run(tmp_path / f"base{s}", seed=s)) for s in range(3)]
    runs = paired_difference(better, worse, keys=["avg_acc", "plasticity", "avg_ppl"])
    items = paired_difference(better[:1], worse[:1], keys=["avg_acc", "plasticity"], n_resamples=999)
    for d in (runs, items):
        assert d["avg_acc"].estimate > 0 and d["avg_acc"].low > 0 and d["avg_acc"].resolved
        assert d["plasticity"].low > 0 and d["avg_acc"].p < 0.01
    assert runs["avg_acc"].method == "paired t, 3 run pairs"
    assert items["avg_acc"].method.startswith("paired item bootstrap, 1 run pair")
    diffs = [x.metric("avg_acc") - y.metric("avg_acc") for x, y in zip(better, worse, strict=True)]
    assert runs["avg_acc"].estimate == pytest.approx(np.mean(diffs))
    assert runs["avg_acc"].p == pytest.approx(
        scipy.stats.ttest_rel([r.metric("avg_acc") for r in better], [r.metric("avg_acc") for r in worse]).pvalue
    )
    assert runs["avg_ppl"].estimate == pytest.approx(0.0, abs=1e-12)  # the perplexity task is the same
    assert not runs["avg_ppl"].resolved
    same = paired_difference(worse[:1], worse[:1], keys=["avg_acc"], n_resamples=199)["avg_acc"]
    assert (same.estimate, same.low, same.high, same.p) == (0.0, 0.0, 0.0, 1.0)


def test_unpaired_runs_are_an_error(tmp_path):
    a = [load_run(sequence_run(tmp_path / "a0", seed=0)), load_run(sequence_run(tmp_path / "a1", seed=1))]
    b = [load_run(sequence_run(tmp_path / "b0", seed=0))]
    with pytest.raises(ValueError, match=r"without a partner.*a1"):
        paired_difference(a, b)
    other = [load_run(single_task_run(tmp_path / "c0", np.ones(7, dtype=np.uint8)))]
    with pytest.raises(ValueError, match="not paired item by item"):
        paired_difference(a[:1], other, level="items")
    # as many items, but not the same ones (another test subsample): the digests in results.json tell them apart
    for name, digest in (("d0", "1111"), ("e0", "2222"), ("f0", "1111")):
        sequence_run(tmp_path / name, seed=0)
        results = json.loads((tmp_path / name / "results.json").read_text())
        results["tasks"] = [{"name": "a", "test_digest": digest}, {"name": "b", "test_digest": "3333"}]
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    d, e, f = (load_run(tmp_path / n) for n in ("d0", "e0", "f0"))
    with pytest.raises(ValueError, match=r"e0 and .*d0 are not paired item by item: the test items of \['a'\] differ"):
        paired_difference([d], [e], level="items", n_resamples=99)
    assert paired_difference([d], [f], level="items", n_resamples=99)["avg_acc"].estimate == 0.0


def test_gap_closure_by_hand(tmp_path):
    # one task of 100 items: baseline 40 correct, multitask 80, method 60 -> (0.6 - 0.4) / (0.8 - 0.4) = 0.5
    def run(name: str, k: int, seed: int) -> stats.RunRecords:
        correct = (np.arange(100) < k).astype(np.uint8)
        return load_run(single_task_run(tmp_path / f"{name}{k}_{seed}", correct, seed=seed))

    m, s, u = [run("one_m", 60, 0)], [run("one_s", 40, 0)], [run("one_u", 80, 0)]
    gc = stats.gap_closure(m, s, u, n_resamples=999)
    assert gc.estimate == pytest.approx(0.5)
    assert gc.low < 0.5 < gc.high and gc.method.startswith("paired item bootstrap")
    triples = [[run(x, k + d, seed) for seed, d in enumerate((0, 2, -2))] for x, k in (("m", 60), ("s", 40), ("u", 80))]
    gr = stats.gap_closure(*triples, n_resamples=999)
    assert gr.estimate == pytest.approx((0.6 - 0.4) / (0.8 - 0.4))  # ratio of the means over seeds
    assert gr.n == 3 and gr.method == "Fieller (t), 3 run triples"
    assert gr.low <= 0.5 <= gr.high
    assert (gr.low, gr.high) == pytest.approx((0.5, 0.5))  # every seed shifts all three alike: no spread
    # Fieller's interval of the ratio of paired means, by hand: a = m - s = (.20, .21, .21), b = u - s = (.40, .39, .39)
    spread = [[run(x, k + d, seed) for seed, d in enumerate(ds)] for x, k, ds in
              (("m2", 60, (0, 3, -1)), ("s2", 40, (0, 2, -2)), ("u2", 80, (0, 1, -3)))]  # fmt: skip
    gs = stats.gap_closure(*spread, n_resamples=999)
    a, b = np.array([0.20, 0.21, 0.21]), np.array([0.40, 0.39, 0.39])
    va, vb, vab = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 3, np.cov(a, b)[0, 1] / 3  # 1/90000, 1/90000, -1/90000
    t2 = scipy.stats.t.ppf(0.975, 2) ** 2
    qa, qb, qc = b.mean() ** 2 - t2 * vb, a.mean() * b.mean() - t2 * vab, a.mean() ** 2 - t2 * va
    lo, hi = ((qb - r * math.sqrt(qb * qb - qa * qc)) / qa for r in (1, -1))
    assert gs.estimate == pytest.approx(0.62 / 1.18) and (lo, hi) == pytest.approx((0.47176, 0.58315), abs=1e-5)
    assert (gs.low, gs.high) == pytest.approx((lo, hi), abs=1e-6)
    assert gs.p == pytest.approx(scipy.stats.ttest_1samp(a, 0.0).pvalue)  # the paired t of method - baseline
    # a study in progress: the method and the baseline have a seed the upper bound does not have yet
    extra = [*m, run("one_m", 70, 1)], [*s, run("one_s", 40, 1)]
    partial = stats.gap_closure(*extra, u, n_resamples=999)
    assert partial.n == 1 and partial.estimate == pytest.approx(0.5)  # seed 1 left out of the ratio
    with pytest.raises(ValueError, match="without a partner"):  # a method run the baseline lacks is still an error
        stats.gap_closure([*m, run("one_m", 70, 2)], s, [*u, run("one_u", 80, 2)], n_resamples=99)


def test_ratio_interval_is_the_set_of_ratios_the_paired_t_test_does_not_reject():
    rng = np.random.default_rng(3)
    for n, noise in ((3, 0.02), (5, 0.03), (5, 0.01), (8, 0.05)):
        b = 0.1 + rng.normal(0.0, noise, n)  # multitask - SeqLoRA per run
        a = 0.02 + 0.5 * (b - 0.1) + rng.normal(0.0, noise, n)  # method - SeqLoRA, correlated with b
        iv = stats.ratio_interval(a, b)
        assert iv.estimate == pytest.approx(a.mean() / b.mean()) and iv.n == n
        grid = np.linspace(-3.0, 3.0, 6001)
        kept = grid[[scipy.stats.ttest_1samp(a - r * b, 0.0).pvalue >= 0.05 for r in grid]]
        if math.isinf(iv.low):
            assert kept[0] == grid[0] or kept[-1] == grid[-1]  # the accepted set runs off the grid
            continue
        assert iv.low == pytest.approx(kept[0], abs=1e-3) and iv.high == pytest.approx(kept[-1], abs=1e-3)
        # 0 is outside exactly when the paired t of a rejects: the gap closure agrees with the difference's test
        assert iv.resolved == (scipy.stats.ttest_1samp(a, 0.0).pvalue < 0.05)


def test_ratio_interval_is_unbounded_when_the_denominator_is_not_resolved_and_checks_its_input():
    iv = stats.ratio_interval([0.01, 0.03, -0.02], [0.05, -0.04, 0.02])
    assert (iv.low, iv.high) == (-math.inf, math.inf) and "unbounded" in iv.method and not iv.resolved
    assert math.isnan(stats.ratio_interval([0.1], [0.2]).low)
    assert stats.ratio_interval([0.1, 0.1], [0.2, 0.2]).show() == "0.500 [0.500, 0.500]"  # equal runs: no spread
    with pytest.raises(ValueError, match="paired 1-d values"):
        stats.ratio_interval([0.1, 0.2], [0.2])


def test_comparison_table_marks_verdicts_and_outputs(tmp_path):
    groups = {
        "naive": [sequence_run(tmp_path / f"naive{s}", seed=s) for s in range(3)],
        "replay": [sequence_run(tmp_path / f"replay{s}", seed=s, skill=0.15) for s in range(3)],
        "joint": [sequence_run(tmp_path / f"joint{s}", seed=s, skill=0.3) for s in range(3)],
    }
    # the same runs copied: the difference is exactly 0 in every metric
    twin = []
    for s, p in enumerate(groups["naive"]):
        q = tmp_path / f"twin{s}"
        q.mkdir()
        for f in ("results.json", "per_example/initial.npz", *(f"per_example/round{r:03d}.npz" for r in range(3))):
            (q / f).parent.mkdir(exist_ok=True)
            (q / f).write_bytes((p / f).read_bytes())
        twin.append(q)
    groups["twin"] = twin
    rows = stats.comparison_table(groups, baseline="naive", upper="joint", n_resamples=499)
    at = {(r["group"], r["metric"]): r for r in rows}
    assert at["naive", "avg_acc"]["paper"] == "AP" and at["naive", "forgetting"]["paper"] == "F.Ra"
    assert "diff" not in at["naive", "avg_acc"]
    assert at["naive", "avg_acc"]["ci"] == "t, 3 runs"
    good = at["replay", "avg_acc"]
    assert good["diff"] > 0 and good["verdict"] == "better" and good["mark"] in ("*", "**", "***")
    assert good["p_holm"] >= good["p"]
    assert at["twin", "avg_acc"]["verdict"] == stats.NOT_RESOLVED and at["twin", "avg_acc"]["mark"] == ""
    assert at["replay", "bwt"]["p_holm"] == at["replay", "forgetting"]["p_holm"]
    tested = [r for r in rows if "p" in r and r["metric"] != "bwt" and not math.isnan(r["p"])]
    assert max(r["p_holm"] for r in tested) <= 1.0
    assert ("replay", "gap_closure") in at and ("naive", "gap_closure") not in at
    assert 0.0 < at["replay", "gap_closure"]["mean"] < 1.0
    md = stats.to_markdown(rows, "naive")
    assert "| group | avg_acc (AP) | forgetting (F.Ra) | bwt (BWT) | fwt (FWT) | plasticity | gap_closure |" in md
    assert "Difference to naive" in md and "n.r." in md
    out = stats.to_csv(rows, tmp_path / "stats.csv")
    back = list(csv.DictReader(out.open()))
    assert len(back) == len(rows) and back[0]["group"] == "naive" and set(back[0]) == set(stats.CSV_FIELDS)
    with pytest.raises(ValueError, match="no group 'seqlora'"):
        stats.comparison_table(groups, baseline="seqlora")


def test_interval_resolved_only_when_zero_is_outside():
    assert Interval(0.1, 0.05, 0.2, 3, "t").resolved
    assert not Interval(0.1, -0.05, 0.2, 3, "t").resolved
    assert not Interval(0.1, math.nan, math.nan, 1, "one run").resolved


def test_runs_without_records_get_run_level_statistics(tmp_path):
    groups = {}
    for g, skill in (("naive", 0.0), ("replay", 0.15)):
        groups[g] = []
        for seed in range(2):
            path = sequence_run(tmp_path / f"{g}{seed}", seed=seed, skill=skill)
            for f in (path / "per_example").iterdir():
                f.unlink()
            (path / "per_example").rmdir()
            groups[g].append(path)
    rows = stats.comparison_table(groups, baseline="naive", keys=["avg_acc"])
    (base, other) = rows
    assert base["ci"] == "t, 2 runs" and other["test"] == "paired t, 2 run pairs"
    one = stats.comparison_table({g: rs[:1] for g, rs in groups.items()}, baseline="naive", keys=["avg_acc"])
    assert one[1]["ci"] == "one run: no interval" and one[1]["verdict"] == stats.NOT_RESOLVED


def test_plot_intervals_draws_one_bar_per_metric_and_agent():
    from matplotlib.figure import Figure

    ax = Figure().add_subplot()
    ivs = {
        "agent0": {"avg_acc": Interval(0.6, 0.5, 0.7, 9, "x"), "fwt": Interval(0.1, -0.1, 0.3, 9, "x")},
        "agent1": {"avg_acc": Interval(0.4, 0.3, 0.5, 9, "x")},
    }
    assert stats.plot_intervals(ax, ivs)
    assert [len(c.lines[0].get_xdata()) for c in ax.containers] == [2, 1]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["avg_acc (AP)", "fwt (FWT)"]
    assert not stats.plot_intervals(Figure().add_subplot(), {"agent0": {}})


def test_runs_pair_by_stream_task_order_and_seed(tmp_path):
    from lmas.metrics.stats import _pairs

    def run(name: str, order: list[str], seed: int):
        r = load_run(sequence_run(tmp_path / name, seed=seed))
        r.results["tasks"] = [{"name": t} for t in order]  # two published orders of one benchmark share its name
        return r

    a = [run("a4", ["x", "y"], 0), run("a5", ["y", "x"], 0)]
    b = [run("b5", ["y", "x"], 0), run("b4", ["x", "y"], 0)]
    pairs = _pairs(a, b)
    assert [(p.path.name, q.path.name) for p, q in pairs] == [("a4", "b4"), ("a5", "b5")]


def test_item_mean_difference_averages_runs_then_items_then_strata_and_resamples_each_stratum():
    from lmas.metrics.intervals import item_mean_difference

    a = np.array([[1, 0, 0, 1], [1, 1, 0, 1]])  # stratum 1: 2 runs x 4 items -> run means 0.5, 0.75
    b = np.array([[0, 0, 0, 0, 0, 1], [0, 0, -1, 0, 0, 0]])  # stratum 2: run means 1/6, -1/6
    iv = item_mean_difference([a, b], resamples=999)
    assert iv.estimate == pytest.approx((0.625 + 0.0) / 2) and iv.n == 10
    assert iv.low <= iv.estimate <= iv.high and iv.low < iv.high and 0 <= iv.p <= 1
    assert "2 run(s), 10 items" in iv.method
    same = item_mean_difference([np.zeros((3, 5)), np.zeros((3, 2))])
    assert (same.estimate, same.low, same.high, same.p) == (0.0, 0.0, 0.0, 1.0)
    ones = item_mean_difference([np.ones((1, 40))], resamples=999)  # every item +1: nothing can move it
    assert ones.estimate == ones.low == ones.high == 1.0 and ones.p < 0.01
    with pytest.raises(ValueError, match=r"same runs, got \[\(2, 4\), \(1, 6\)\]"):
        item_mean_difference([a, b[:1]])
