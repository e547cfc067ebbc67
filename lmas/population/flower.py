"""Federated rounds over Flower (``loop=federated loop.transport=flower``): each client a separate process that
talks to the server through Flower's gRPC fleet API, so a federated population can outgrow one machine on an
existing federated engine rather than on lmas's own transport.

The server is the lmas run: :class:`~lmas.population.federated.Federated` samples the clients, aggregates
(FedAvg, FedProx, FedAvgM, FlexLoRA: the same functions as in one process), evaluates and records. Only the
clients' local training moves: :class:`FlowerServer` sends each chosen client its current adapter and the
(round, task) to learn as a Flower ``FitIns``; the client process (``lmas-flower-client``, :func:`client_main`)
holds the same population, stream and strategy, built from the run's saved ``config.yaml``, trains its shard with
the same seed as the in-process fit and answers with its new adapter, its losses and its ``trained`` event. The
server mirrors that into its own copy of the population, so every aggregator, the evaluation and resume work as
in one process, and a run over Flower ends with the same adapters as the in-process run (tested, two client
processes).

``loop.flower.clients``: ``spawn`` starts one client process per agent on this machine (their logs under
``<run dir>/flower/``); ``external`` waits for clients started elsewhere with the commands the server logs::

    lmas-flower-client --config <run dir>/config.yaml --agent agent1 --server <host>:<port>

(the other machine needs the same model and data paths as the config names).

Deviation, said here: this uses Flower's gRPC-bidi transport (``start_client``; the server side built from
``start_grpc_server`` and a client manager, as Flower's deprecated ``start_server`` is), because the server side
must stay inside the lmas loop between rounds. Flower's newer SuperLink/SuperNode deployment (``flwr run``) and
its simulation engine (which needs Ray, not installable here) are not used.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from lmas.population.events import Event

if TYPE_CHECKING:
    from lmas.loop import ContinualLoop
    from lmas.population.federated import Federated

log = logging.getLogger(__name__)
CLIENTS = ("spawn", "external")


# --- the wire format: an adapter state as Flower's list of arrays -------------------------------------------
def to_arrays(state: dict[str, Tensor]) -> list[np.ndarray]:
    """The adapter's tensors as float32 arrays, in sorted key order (both ends sort the same keys)."""
    return [state[k].detach().to("cpu", torch.float32).numpy() for k in sorted(state)]


def from_arrays(arrays: list[np.ndarray], like: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`to_arrays`, with the keys, shapes and dtypes of ``like`` (checked)."""
    keys = sorted(like)
    if len(arrays) != len(keys):
        raise ValueError(f"flower: {len(arrays)} arrays for an adapter of {len(keys)} tensors")
    out = {}
    for k, a in zip(keys, arrays, strict=True):
        if tuple(a.shape) != tuple(like[k].shape):
            raise ValueError(f"flower: {k} has shape {tuple(a.shape)}, the adapter's is {tuple(like[k].shape)}")
        out[k] = torch.from_numpy(np.array(a, copy=True)).to(like[k].dtype)
    return out


def free_port(host: str) -> int:
    """A port that is free on ``host`` now."""
    host = host.strip("[]")  # an IPv6 host is written [::1]:port
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_flower() -> None:
    """Fail with the install command when Flower is missing."""
    try:
        import flwr  # noqa: F401
    except ImportError as e:
        raise ImportError("loop.transport=flower needs the Flower package (flwr): pip install 'lmas[flower]'") from e


# --- the server side: lmas's loop drives, Flower carries -------------------------------------------------------
class FlowerServer:
    """The server end: a Flower gRPC server inside the lmas run, one client per agent (module docstring)."""

    def __init__(self, loop: ContinualLoop, address: str, clients: str, timeout: float) -> None:
        if clients not in CLIENTS:
            raise ValueError(f"loop.flower.clients={clients!r}: expected one of {CLIENTS}")
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"loop.flower.address={address!r}: expected host:port (port 0: a free one)")
        if port == "0" and clients == "external":
            raise ValueError("loop.flower.address: external clients need a fixed port to connect to, not 0")
        self.config = loop.run_dir / "config.yaml"
        if not self.config.is_file():
            raise FileNotFoundError(
                f"loop.transport=flower: the clients build the run from {self.config}, which lmas-train writes; "
                "not found (run it through lmas-train)"
            )
        self.loop, self.timeout, self.clients = loop, timeout, clients
        self.address = f"{host}:{free_port(host) if port == '0' else port}"
        self.agents = list(loop.population.names)
        self.procs: dict[str, subprocess.Popen] = {}
        self.proxies: dict[str, Any] = {}
        self.grpc: Any = None

    def command(self, agent: str) -> list[str]:
        return ["lmas-flower-client", "--config", str(self.config), "--agent", agent, "--server", self.address]

    def start(self) -> FlowerServer:
        from flwr.common import GetPropertiesIns
        from flwr.server.client_manager import SimpleClientManager
        from flwr.server.superlink.fleet.grpc_bidi.grpc_server import start_grpc_server

        manager = SimpleClientManager()
        self.grpc = start_grpc_server(client_manager=manager, server_address=self.address)
        atexit.register(self.close)
        logs = self.loop.run_dir / "flower"
        logs.mkdir(parents=True, exist_ok=True)
        for agent in self.agents:
            if self.clients == "spawn":
                cmd = [sys.executable, "-m", "lmas.population.flower", *self.command(agent)[1:]]
                with open(logs / f"{agent}.log", "ab") as out:
                    self.procs[agent] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
            else:
                log.info("flower: start the client of %s with: %s", agent, " ".join(self.command(agent)))
        deadline = time.monotonic() + self.timeout
        while not manager.wait_for(len(self.agents), timeout=1):
            dead = {a: p.returncode for a, p in self.procs.items() if p.poll() is not None}
            if dead or time.monotonic() > deadline:
                self.close()
                why = f"client processes exited: {dead}" if dead else f"{self.timeout:.0f} s passed"
                raise RuntimeError(
                    f"loop.transport=flower: {len(manager)} of {len(self.agents)} clients connected to "
                    f"{self.address} ({why}); their logs: {logs}"
                )
        for proxy in manager.all().values():
            props = proxy.get_properties(GetPropertiesIns(config={}), timeout=self.timeout, group_id=None)
            self.proxies[str(props.properties["agent"])] = proxy
        if sorted(self.proxies) != sorted(self.agents):
            self.close()
            raise RuntimeError(f"flower: the clients are {sorted(self.proxies)}, the population {self.agents}")
        log.info("flower: %d clients connected to %s", len(self.proxies), self.address)
        return self

    def fit(self, chosen: list[str], j: int, r: int) -> dict[str, list[float]]:
        """The chosen clients' local training on task ``j`` in loop round ``r``, in their processes (in
        parallel); their adapters, events and step counts mirrored here as the in-process fit leaves them."""
        from flwr.common import Code, FitIns, ndarrays_to_parameters, parameters_to_ndarrays

        loop, pop = self.loop, self.loop.population

        def one(agent: str) -> Any:
            ins = FitIns(ndarrays_to_parameters(to_arrays(pop.adapter_state(agent))), {"round": r, "task": j})
            res = self.proxies[agent].fit(ins, timeout=self.timeout, group_id=r)
            if res.status.code != Code.OK:
                raise RuntimeError(f"flower: client {agent} failed: {res.status.message}")
            return res

        with ThreadPoolExecutor(max_workers=len(chosen)) as pool:
            replies = dict(zip(chosen, pool.map(one, chosen), strict=True))
        task, losses = loop.stream[j].name, {}
        for agent in chosen:  # in the clients' order, as the in-process loop would
            res, metrics = replies[agent], replies[agent].metrics
            pop.load_adapter_state(agent, from_arrays(parameters_to_ndarrays(res.parameters), pop.adapter_state(agent)))
            losses[agent], details = json.loads(str(metrics["losses"])), json.loads(str(metrics["details"]))
            for i, loss in enumerate(losses[agent]):
                loop.log.train_loss(agent, loop.state.step + i, loss)
            curve = json.loads(str(metrics["curve"]))
            if curve is not None:
                loop.state.curves[f"{agent}/{task}"] = curve
            loop.state.step += int(details["steps"])
            pop.agents[agent].history.append(Event(r, "trained", task, details=details))
        return losses

    def close(self) -> None:
        """Disconnect the clients, stop the server, wait for the spawned processes (idempotent)."""
        if self.grpc is None:
            return
        from flwr.common import ReconnectIns

        for proxy in self.proxies.values():
            try:
                proxy.reconnect(ReconnectIns(seconds=None), timeout=30, group_id=None)
            except Exception as e:  # noqa: BLE001 - a client already gone: nothing to disconnect
                log.debug("flower: disconnecting a client: %s", e)
        self.grpc.stop(grace=1)
        self.grpc = None
        atexit.unregister(self.close)  # the run (and its model) need not live until exit
        for agent, proc in self.procs.items():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                log.warning("flower: the client of %s did not exit; killed", agent)
                proc.kill()


# --- the client side ---------------------------------------------------------------------------------------
def make_client(loop: ContinualLoop, body: Federated, agent: str) -> Any:
    """A Flower NumPyClient that trains ``agent`` of ``loop`` as the in-process federated round would."""
    from flwr.client import NumPyClient

    pop = loop.population

    class AgentClient(NumPyClient):
        def get_properties(self, config: dict) -> dict:
            return {"agent": agent}

        def get_parameters(self, config: dict) -> list[np.ndarray]:
            return to_arrays(pop.adapter_state(agent))

        def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
            pop.load_adapter_state(agent, from_arrays(parameters, pop.adapter_state(agent)))
            r, j = int(config["round"]), int(config["task"])
            losses = body.fit_client(loop, agent, j, r)
            task = loop.stream[j]
            event = pop.agents[agent].history[-1]  # the "trained" event the fit appended
            metrics = {"losses": json.dumps(losses), "details": json.dumps(event.details),
                       "curve": json.dumps(loop.state.curves.get(f"{agent}/{task.name}"))}  # fmt: skip
            return to_arrays(pop.adapter_state(agent)), len(body.shard(task, agent).train), metrics

    return AgentClient().to_client()


def client_main(argv: list[str] | None = None) -> int:
    """``lmas-flower-client``: one agent of a federated lmas run as a Flower client process."""
    parser = argparse.ArgumentParser(description=client_main.__doc__)
    parser.add_argument("--config", required=True, help="the run's config.yaml (in the server's run dir)")
    parser.add_argument("--agent", required=True, help="the agent (client) this process trains")
    parser.add_argument("--server", required=True, help="the server's host:port")
    parser.add_argument("--run-dir", help="this client's outputs (default: <config's dir>/flower/<agent>)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to keep retrying the connection")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # mlflow's imports announce their plugins
    logging.getLogger("flwr").propagate = False  # Flower prints its own lines
    from flwr.client import start_client
    from omegaconf import DictConfig, OmegaConf

    from lmas.population.federated import Federated
    from lmas.train import build

    path = Path(args.config)
    if not path.is_file():
        parser.error(f"--config {path}: no such file (the server's run dir holds config.yaml)")
    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig) or "loop" not in cfg:
        parser.error(f"--config {path}: not the config.yaml of an lmas run")
    cfg.loop.transport = "inprocess"  # this process trains; the server aggregates
    cfg.logger = {"_target_": "lmas.tracking.trackers.Tracker"}
    loop = build(cfg, Path(args.run_dir or path.parent / "flower" / args.agent), save_config=False, track=False)
    if not isinstance(loop.body, Federated):
        parser.error(f"--config {path}: loop._target_ is not the federated loop")
    if args.agent not in loop.population.names:
        parser.error(f"--agent {args.agent}: not an agent of the run ({loop.population.names})")
    start_client(server_address=args.server, client=make_client(loop, loop.body, args.agent), insecure=True,
                 max_wait_time=args.timeout)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(client_main())
