"""experiments/tables.py reproduction: the study's main table from runs on disk alone; every number is
lmas.metrics.stats' on the same runs, and missing strategies or a missing baseline are clear errors."""

from __future__ import annotations

import csv
import importlib.util
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from lmas.metrics import stats

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tables = _load("experiment_tables_repro", ROOT / "experiments" / "tables.py")
table = _load("reproduction_table_test", ROOT / "experiments" / "reproduction" / "table.py")
STRATEGIES = ("naive", "replay", "inclora", "joint")
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """2 strategies + naive + joint, 2 seeds each, on the tiny model; kept as experiments/study.py keeps them."""
    from lmas.train import run

    compose = _load("tests_conftest_compose", ROOT / "tests" / "conftest.py").compose  # module scope: no fixture

    root = tmp_path_factory.mktemp("study")
    for strategy in STRATEGIES:
        for seed in SEEDS:
            scratch = root / "scratch" / f"{strategy}{seed}"
            overrides = ["model=tiny", "debug=fast", "logger=csv", f"paths.output_dir={root / 'out'}",
                         f"strategy={strategy}", f"seed={seed}", "train.max_steps=2", "stream.max_train=4"]
            run(compose(overrides, scratch), scratch)
            kept = root / "runs" / f"strategy={strategy},seed={seed}"
            kept.mkdir(parents=True)
            for name in ("results.json", "config.yaml"):
                shutil.copy2(scratch / name, kept / name)
            shutil.copytree(scratch / "per_example", kept / "per_example")
    return root / "runs"


def _rows(md: str, header: str) -> list[list[str]]:
    """The body rows of the markdown table whose header line starts with ``header``."""
    lines = md.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(header))
    body = []
    for ln in lines[start + 2 :]:
        if not ln.startswith("|"):
            break
        body.append([c.strip() for c in ln.strip("|").split("|")])
    return body


def _ci(v: float, lo: float, hi: float, signed: bool = False) -> str:
    def f(x: float) -> str:
        return "–" if math.isnan(x) else f"{x:+.3f}" if signed else f"{x:.3f}"

    return f"{f(v)} (no CI)" if math.isnan(lo) else f"{f(v)} [{f(lo)}, {f(hi)}]"


def test_the_table_is_lmas_metrics_stats_on_the_same_runs(runs, tmp_path, capsys):
    built = table.build(runs, "strategy=naive", "strategy=joint", n_resamples=499)
    groups = {s: sorted(runs.glob(f"strategy={s},seed=*")) for s in ("naive", "inclora", "replay", "joint")}
    want = stats.comparison_table(groups, "naive", "joint", keys=table.KEYS, n_resamples=499)
    assert [(r["group"], r["metric"]) for r in built["rows"]] == [(r["group"], r["metric"]) for r in want]
    for got, exp in zip(built["rows"], want, strict=True):
        for key in ("mean", "low", "high", "diff", "diff_low", "diff_high", "p", "p_holm"):
            if key in exp:
                assert got[key] == pytest.approx(exp[key], nan_ok=True), (exp["group"], exp["metric"], key)
    at = {(r["group"], r["metric"]): r for r in want}
    md = table.markdown(built)

    main = _rows(md, "| strategy | in the papers | runs")
    assert [r[0] for r in main] == ["naive", "inclora", "replay", "joint"]  # table order: SeqLoRA first
    results = stats.load_run(groups["naive"][0]).results
    n_items = [len(v) for v in np.load(groups["naive"][0] / "per_example" / "initial.npz").values()]
    for row in main:
        s = row[0]
        assert row[1] == table.PAPER_METHOD[s]
        span = str(n_items[0]) if min(n_items) == max(n_items) else f"{min(n_items)}–{max(n_items)}"
        assert row[2] == f"2 (2 seeds, 1 order); {span} test items/task"
        for cell, key in zip(row[3:], table.KEYS, strict=True):
            r = at[s, key]
            assert cell == _ci(r["mean"], r["low"], r["high"]), (s, key)
    assert f"Stream `{results['stream']}`" in md

    diffs = _rows(md, "| strategy | metric | difference")
    assert {r[0] for r in diffs} == {"inclora", "replay", "joint"}
    for row in diffs:
        key = row[1].split(" ")[0]
        r = at[row[0], key]
        assert row[2] == _ci(r["diff"], r["diff_low"], r["diff_high"], signed=True)
        resolved = r["diff_low"] > 0 or r["diff_high"] < 0
        assert row[5].startswith("resolved") == (resolved and r["p_holm"] < 0.05)
        if not resolved:
            assert row[5] == "not resolved at this sample size"
        assert row[6] == r["test"] == "paired t, 2 run pairs"

    gaps = _rows(md, "| strategy | gap closure")
    assert [r[0] for r in gaps] == ["inclora", "replay"]
    for row in gaps:
        r = at[row[0], stats.GAP]
        assert row[1] == _ci(r["mean"], r["low"], r["high"])
        called = at[row[0], "avg_acc"]["verdict"] in ("better", "worse")  # its difference, after Holm
        assert row[2].startswith("resolved") == ((r["low"] > 0 or r["high"] < 0) and called)
        if (r["low"] > 0 or r["high"] < 0) and not called:
            assert row[2].startswith("CI excludes 0, but the avg_acc difference is ")
        assert row[2].startswith("undefined") == math.isnan(r["mean"])  # multitask = SeqLoRA: no ratio
        published = {"inclora": ((66.4 - 43.7) / (80.0 - 43.7), (61.2 - 1.6) / (76.5 - 1.6)),
                     "replay": ((57.8 - 43.7) / (80.0 - 43.7), (54.2 - 1.6) / (76.5 - 1.6))}[row[0]]
        assert row[3] == "; ".join(f"{g:.2f} ({e['setting']})" for g, (_, e) in
                                   zip(published, table.published_ratios(row[0]), strict=True))  # O-LoRA's Table 1
    # the CLI prints the same and writes the CSV with stats' unrounded numbers
    tables.main(["reproduction", str(runs), "--out", str(tmp_path / "t.csv")])
    printed = capsys.readouterr().out
    assert "| naive | SeqLoRA |" in printed and "avg_acc (AP)" in printed and "forgetting (F.Ra)" in printed
    back = list(csv.DictReader((tmp_path / "t.csv").open()))
    row = next(r for r in back if r["strategy"] == "replay" and r["metric"] == "avg_acc")
    assert float(row["diff"]) == pytest.approx(at["replay", "avg_acc"]["diff"])
    assert row["runs"] == "2" and row["paper"] == "AP" and row["paper_name"] == "Replay"


def test_published_ratios_need_the_method_seqlora_and_multitask_of_one_source(monkeypatch):
    standard, long, logs = table.PUBLISHED  # O-LoRA's Table 1 (standard, long sequence), its run logs (no MTL)
    assert table.published_ratios("olora") == [(pytest.approx((75.8 - 43.7) / (80.0 - 43.7)), standard),
                                               (pytest.approx((69.6 - 1.6) / (76.5 - 1.6)), long)]
    assert table.published_ratios("nlora") == [(pytest.approx((72.4 - 1.6) / (76.5 - 1.6)), long)]
    assert table.published_ratios("opcm") == [] and table.published_ratios("joint") == []
    entry = {"source": "a paper", "setting": "x", "avg_acc": {"olora": 75.0, "naive": 60.0, "joint": 80.0}}
    monkeypatch.setattr(table, "PUBLISHED", (entry,))
    assert table.published_ratios("olora") == [(pytest.approx(0.75), entry)]
    assert table.published_ratios("nlora") == [] and table.published_ratios("naive") == []


def test_missing_strategies_or_baseline_are_clear_errors(runs, tmp_path):
    with pytest.raises(ValueError, match=r"no complete run of strategy 'seqlora' \(--baseline \(SeqLoRA\)\); "
                                         r"strategies there: naive, inclora, replay, joint"):
        table.build(runs, "strategy=seqlora", n_resamples=99)
    with pytest.raises(ValueError, match=r"strategy 'olora' \(--strategies\)"):
        table.build(runs, strategies=["naive", "olora"], n_resamples=99)
    with pytest.raises(ValueError, match="groups runs by strategy; give strategy=<name>"):
        table.build(runs, "model=tiny", n_resamples=99)
    with pytest.raises(SystemExit, match="reproduction: .*no complete run of strategy 'joint' \\(--upper"):
        partial = tmp_path / "partial"
        for d in runs.glob("strategy=naive,*"):
            shutil.copytree(d, partial / d.name)
        tables.main(["reproduction", str(partial)])
    # a strategy with a seed its baseline lacks: the unpaired run is named
    lone = tmp_path / "lone"
    for d in [*runs.glob("strategy=naive,seed=0"), *runs.glob("strategy=replay,*"), *runs.glob("strategy=joint,*")]:
        shutil.copytree(d, lone / d.name)
    with pytest.raises(ValueError, match=r"without a partner.*strategy=replay,seed=1"):
        table.build(lone, n_resamples=99)
    with pytest.raises(ValueError, match="no results.json under it"):
        table.build(tmp_path / "partial" / "strategy=naive,seed=0" / "per_example")


def test_one_strategy_at_two_settings_is_two_rows_never_pooled(runs, tmp_path):
    """The protocol check keeps N-LoRA at the authors' λ1 and at the tuned one in one folder: runs of one strategy
    whose settings differ are separate rows (named by the setting), each paired with SeqLoRA on its own seeds."""
    import json

    both = tmp_path / "both"
    for d in runs.iterdir():
        shutil.copytree(d, both / d.name)
    for d in runs.glob("strategy=replay,*"):  # the same runs again, as if at another buffer size
        copy = both / d.name.replace("replay", "replay,strategy.capacity=7")
        shutil.copytree(d, copy)
        results = json.loads((copy / "results.json").read_text())
        results["config"]["strategy"]["capacity"] = 7
        (copy / "results.json").write_text(json.dumps(results))
    capacity = stats.load_run(next(runs.glob("strategy=replay,*"))).results["config"]["strategy"]["capacity"]
    groups = table.load_groups(both)
    assert list(groups) == ["naive", "inclora", f"replay capacity={capacity}", "replay capacity=7", "joint"]
    assert all(len(g) == 2 for g in groups.values())
    built = table.build(both, n_resamples=99)
    at = {(r["group"], r["metric"]): r for r in built["rows"]}
    # identical records: both settings have the same difference from SeqLoRA as the one-setting table
    one = {(r["group"], r["metric"]): r for r in table.build(runs, n_resamples=99)["rows"]}
    for name in (f"replay capacity={capacity}", "replay capacity=7"):
        assert at[name, "avg_acc"]["diff"] == pytest.approx(one["replay", "avg_acc"]["diff"])
    md = table.markdown(built)
    assert "| replay capacity=7 | Replay |" in md
    assert table.build(both, strategies=["replay capacity=7"], n_resamples=99)["info"].keys() == {
        "naive", "replay capacity=7", "joint"}
    # a folder with one setting, compared with one that has two, names its runs as the other folder does
    every = [json.loads(f.read_text()) for f in both.rglob("results.json")]
    assert f"replay capacity={capacity}" in table.load_groups(runs, context=every)
    assert "replay" in table.load_groups(runs)


def test_protocol_check_sets_the_two_protocols_verdicts_side_by_side(runs, tmp_path, capsys):
    def row(group: str, metric: str, diff: float, lo: float, hi: float, verdict: str) -> dict:
        return {"group": group, "metric": metric, "diff": diff, "diff_low": lo, "diff_high": hi, "verdict": verdict,
                "test": "t"}

    def built(rows: list[dict], strategies: tuple[str, ...]) -> dict:
        return {"rows": rows, "baseline": "naive", "dir": "x", "info": {s: {"runs": 2} for s in strategies}}

    fast = built([row("joint", "avg_acc", 0.2, 0.1, 0.3, "better"), row("joint", "forgetting", -0.1, -0.2, 0.1, "n"),
                  row("olora", "avg_acc", 0.01, -0.1, 0.1, "n"), row("olora", "forgetting", 0.0, -0.1, 0.1, "n")],
                 ("naive", "olora", "joint", "replay"))  # fmt: skip
    every = built([row("joint", "avg_acc", 0.1, -0.1, 0.3, "not resolved at this sample size"),
                   row("joint", "forgetting", -0.2, -0.3, -0.1, "better"),
                   row("olora", "avg_acc", -0.02, -0.1, 0.1, "n"), row("olora", "forgetting", 0.03, -0.1, 0.1, "n")],
                  ("naive", "olora", "joint"))  # fmt: skip
    got = table.agreement({"fast": fast, "all layers": every})
    assert [(r["strategy"], r["metric"]) for r in got] == [("olora", "avg_acc"), ("olora", "forgetting"),
                                                           ("joint", "avg_acc"), ("joint", "forgetting")]  # fmt: skip
    assert [r["agree"] for r in got] == [True, True, False, False]  # replay: only in one protocol, left out
    assert [r["same_sign"] for r in got] == [False, False, True, True]  # a difference of exactly 0 has no side
    assert got[2]["calls"] == {"fast": "better", "all layers": "unresolved"}
    # on real runs (the same folder twice): every verdict agrees with itself
    tables.main(["protocol_check", str(runs), str(runs), "--resamples", "99"])
    printed = capsys.readouterr().out
    assert "| inclora | avg_acc (AP) |" in printed and "The verdicts agree on 6 of 6 comparisons" in printed
    # a strategy only one folder has is left out of both tables (Holm then corrects over the same family)
    partial = tmp_path / "partial"
    for d in runs.iterdir():
        if "inclora" not in d.name:
            shutil.copytree(d, partial / d.name)
    tables.main(["protocol_check", str(runs), str(partial), "--resamples", "99"])
    printed = capsys.readouterr().out
    assert "| inclora |" not in printed and "The verdicts agree on 4 of 4 comparisons" in printed
    # one seed: each strategy's single run against SeqLoRA's of that seed (an item bootstrap)
    tables.main(["protocol_check", str(runs), str(partial), "--resamples", "99", "--seeds", "1"])
    printed = capsys.readouterr().out
    assert "fast: 3 runs" in printed and "Tests: fast: paired item bootstrap" in printed
    one = table.build(runs, seeds=[1], n_resamples=99)
    assert {i["runs"] for i in one["info"].values()} == {1} and "item bootstrap" in one["rows"][-2]["test"]
    no_upper = table.build(runs, upper=None, strategies=["naive", "replay"], n_resamples=99)
    assert set(no_upper["info"]) == {"naive", "replay"} and all(r["metric"] != stats.GAP for r in no_upper["rows"])
