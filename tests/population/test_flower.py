"""Federated rounds over Flower (loop.transport=flower): the wire format by hand, the options' errors, and a run
whose two clients are separate Flower client processes ending with the same adapters as the in-process run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from lmas.population.federated import Federated  # noqa: E402
from lmas.population.flower import FlowerServer, free_port, from_arrays, to_arrays  # noqa: E402


def test_an_adapter_state_crosses_the_wire_exactly_in_sorted_key_order():
    state = {"b.lora_B": torch.arange(6.0).reshape(3, 2), "a.lora_A": torch.tensor([[0.1, -2.5]])}
    arrays = to_arrays(state)
    assert [a.shape for a in arrays] == [(1, 2), (3, 2)]  # a... before b...
    assert all(a.dtype == np.float32 for a in arrays)
    back = from_arrays(arrays, state)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    arrays[0][0, 0] = 9.0  # the copy does not alias the received buffer
    assert back["a.lora_A"][0, 0].item() == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"b.lora_B has shape \(2, 3\), the adapter's is \(3, 2\)"):
        from_arrays([arrays[0], np.zeros((2, 3), np.float32)], state)
    with pytest.raises(ValueError, match="1 arrays for an adapter of 2 tensors"):
        from_arrays(arrays[:1], state)


def test_bad_transport_options_are_named():
    with pytest.raises(ValueError, match="loop.transport='grpc'"):
        Federated(transport="grpc")
    with pytest.raises(ValueError, match="loop.flower.clients='cloud'"):
        FlowerServer(None, "127.0.0.1:0", "cloud", 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="loop.flower.address='localhost'"):
        FlowerServer(None, "localhost", "spawn", 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="external clients need a fixed port"):
        FlowerServer(None, "127.0.0.1:0", "external", 10)  # type: ignore[arg-type]
    assert 0 < free_port("127.0.0.1") < 65536


FAST = ["model=tiny", "debug=fast", "logger=csv", "loop=federated", "population.agents=2", "loop.rounds=2"]


def test_a_stateful_strategy_is_refused_before_any_client_starts(run_lmas, tmp_path):
    with pytest.raises(ValueError, match="loop.transport=flower: strategy 'ewc' keeps per-agent state"):
        run_lmas([*FAST, "strategy=ewc", "loop.transport=flower", f"paths.output_dir={tmp_path}"], tmp_path / "ewc")
    assert not (tmp_path / "ewc" / "flower").exists()  # refused before the server spawned anything


def _adapters(run_dir):
    from safetensors.torch import load_file

    files = sorted((run_dir / "adapters").rglob("*.safetensors"))
    return {f.relative_to(run_dir).as_posix(): load_file(f) for f in files}


@pytest.mark.parametrize("aggregator", ["fedavgm", pytest.param("flexlora", marks=pytest.mark.slow)])
def test_two_flower_client_processes_give_the_in_process_run(aggregator, run_lmas, tmp_path):
    opts = [*FAST, f"loop.aggregator={aggregator}", f"paths.output_dir={tmp_path}"]
    here = run_lmas(opts, tmp_path / "inprocess")
    over = run_lmas([*opts, "loop.transport=flower", "loop.flower.timeout=300"], tmp_path / "flower")
    assert over["complete"] and over["federated_setup"]["transport"] == "flower"
    logs = sorted(p.name for p in (tmp_path / "flower" / "flower").glob("*.log"))
    assert logs == ["agent0.log", "agent1.log"]  # one client process per agent
    a, b = _adapters(tmp_path / "inprocess"), _adapters(tmp_path / "flower")
    assert sorted(a) == sorted(b) and len(a) >= 6  # every agent's adapter after every round
    for name in a:
        for k in a[name]:
            torch.testing.assert_close(b[name][k], a[name][k], atol=1e-6, rtol=1e-5, msg=f"{name} {k}")
    assert over["federated"] == here["federated"]  # clients, examples, bytes, residual per server round
    assert over["population"]["communication"] == here["population"]["communication"]
    for agent, m in here["metrics"].items():
        assert over["metrics"][agent]["avg_acc"] == pytest.approx(m["avg_acc"], abs=1e-9)
    saved = json.loads((tmp_path / "flower" / "results.json").read_text())
    trained = [e for e in saved["agents"]["agent1"]["history"] if e["event"] == "trained"]
    assert len(trained) == 2 * len(saved["tasks"])  # the clients' fits, mirrored into the server's histories
