"""Column (c) of ``bench/federated_sim.py``: the same workload on Flower's simulation engine (Ray).

Run by the benchmark as a subprocess with the interpreter of the separate environment that
``bench/setup_flower_sim.sh`` makes (flwr[simulation] 1.42 pins ray 2.55.1)::

    build/venv-flwrsim/bin/python bench/flower_sim_app.py SPEC.json

``SPEC.json`` (written by the benchmark) names the workload file (``workload.safetensors``: the
embeddings and the clients' image rows), the initial parameters, the federation's sizes and the
output folder; this writes ``final.safetensors`` (the global model after the last round) and
``rounds.jsonl`` (a line per round as it ends) and ``result.json`` (versions, handshake seconds,
the clients' torch threads) there; the benchmark samples the memory of this process tree itself.

What runs is Flower's own machinery with its documented defaults, doing exactly the work of
asymvlm's clients:

* ``flwr.simulation.run_simulation`` with the Ray backend: one virtual SuperNode per client of the
  population (node config ``partition-id``), ``client_resources = {"num_cpus": C}`` (the spec's
  ``client_cpus``; Flower's default is 2, one actor on a 2-core machine), Ray's other defaults.
* the ServerApp runs Flower's :class:`flwr.serverapp.strategy.FedAvg` (weighted by
  ``num-examples``, evaluation off) whose only change is *which* nodes a round samples: the
  clients :func:`asymvlm.federated.sampling.sample_clients` picks for that round (the same as
  asymvlm's rounds), found through a one-off ``query`` message per node (node ids are random).
* the ClientApp runs :func:`asymvlm.federated.client.client_update` (the same head, loss and SGD
  steps) on the client's own :class:`~asymvlm.batching.IndexBatcher`, reseeded exactly as
  :meth:`asymvlm.federated.rounds.Federation.train_clients` does
  (``int_seed(seed, "client", round, client)``), and replies with its trained parameters and
  ``num-examples`` (its images), as Flower's FedAvg expects.

FedAvg here averages the clients' parameters (Flower's ``aggregate_arrayrecords``, float32), asymvlm
adds the weighted mean of their deltas: the same model up to float32 rounding.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

QUERY = "query"
SPEC_ENV = "ASYMVLM_FLWRSIM_SPEC"  # the spec's path: every Ray worker inherits it

_CLIENTS: dict[str, Any] = {}  # per process (a Ray actor serves many clients): the workload and model


def load_spec(path: str | os.PathLike | None = None) -> dict[str, Any]:
    return json.loads(Path(path or os.environ[SPEC_ENV]).read_text())


# ----------------------------------------------------------------------------------------------
# ClientApp
# ----------------------------------------------------------------------------------------------
def _process_state() -> dict[str, Any]:
    """The workload, the model and the client options, built once per process."""
    if not _CLIENTS:
        from federated_sim import Workload, load_tensors

        from asymvlm.federated.client import ClientOptions, build_client_model

        spec = load_spec()
        w = Workload(**spec["workload"])
        _CLIENTS["spec"], _CLIENTS["workload"] = spec, w
        _CLIENTS["tensors"] = load_tensors(spec["data"])
        _CLIENTS["model"] = build_client_model(w.head(), seed=w.seed)
        _CLIENTS["options"] = ClientOptions(
            local_steps=w.local_steps, local_lr=w.lr, batch_size=w.batch, momentum=w.momentum
        )
        _CLIENTS["batchers"] = {}
    return _CLIENTS


def _batcher(state: dict[str, Any], c: int) -> Any:
    if c not in state["batchers"]:
        from federated_sim import client_batcher

        state["batchers"][c] = client_batcher(state["tensors"], c, state["workload"])
    return state["batchers"][c]


client_app = ClientApp()


@client_app.query()
def _query(msg: Message, context: Context) -> Message:
    """The handshake: this node's partition (client index)."""
    pid = int(context.node_config["partition-id"])
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid})}), reply_to=msg)


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    """asymvlm's client update from the message's global parameters; the trained parameters and
    ``num-examples`` back (Flower's FedAvg)."""
    from asymvlm.federated.client import client_update
    from asymvlm.federated.seeds import int_seed

    state = _process_state()
    w = state["workload"]
    c = int(context.node_config["partition-id"])
    batcher = _batcher(state, c)
    params = {k: v.clone() for k, v in msg.content["arrays"].to_torch_state_dict().items()}
    rnd = int(msg.content["config"]["server-round"]) - 1
    seed = int_seed(w.seed, "client", rnd, c)  # as Federation.train_clients
    batcher.reseed(seed)
    res = client_update(
        state["model"], params, batcher, state["options"], client=c, num_examples=w.images_per_client, seed=seed
    )
    trained = state["model"].get_params()
    metrics = MetricRecord(
        {"num-examples": w.images_per_client, "loss": float(res.loss_after), "threads": torch.get_num_threads()}
    )
    return Message(RecordDict({"arrays": ArrayRecord(trained), "metrics": metrics}), reply_to=msg)


# ----------------------------------------------------------------------------------------------
# ServerApp
# ----------------------------------------------------------------------------------------------
class SampledFedAvg(FedAvg):
    """Flower's FedAvg whose rounds train the clients asymvlm's sampling picks; it timestamps
    every round's end (``ends``) and keeps the clients' thread counts."""

    def __init__(self, where: dict[int, int], fed: Any, progress: Path, ready: float, **kwargs: Any):
        super().__init__(**kwargs)
        self.where, self.fed, self.progress, self.ready = where, fed, progress, ready
        self.threads: set[int] = set()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        from asymvlm.federated.sampling import sample_clients

        active, _ = sample_clients(self.fed, server_round - 1)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, [self.where[c] for c in active], "train")

    def aggregate_train(self, server_round: int, replies: Any):
        replies = list(replies)
        self.threads |= {int(m.content["metrics"]["threads"]) for m in replies if not m.has_error()}
        failed = [m.error.reason for m in replies if m.has_error()]
        if failed:
            raise RuntimeError(f"round {server_round}: {len(failed)} client(s) failed, e.g. {failed[0]}")
        out = super().aggregate_train(server_round, replies)
        with open(self.progress, "a") as f:  # read by the benchmark even if a later round never ends
            f.write(json.dumps({"round": server_round, "ready": self.ready, "end": time.perf_counter()}) + "\n")
        return out


server_app = ServerApp()


@server_app.main()
def _server(grid: Grid, context: Context) -> None:
    from safetensors.torch import load_file, save_file

    from asymvlm.federated.config import FederatedArguments

    spec = load_spec()
    w = spec["workload"]
    out = Path(spec["out_dir"])
    t0 = time.perf_counter()
    nodes = list(grid.get_node_ids())
    while len(nodes) < w["population"]:
        time.sleep(0.05)
        nodes = list(grid.get_node_ids())
    replies = grid.send_and_receive([Message(RecordDict(), dst_node_id=n, message_type=QUERY) for n in nodes])
    where = {int(m.content["metrics"]["partition-id"]): m.metadata.src_node_id for m in replies}
    if len(where) != w["population"]:
        raise RuntimeError(f"the handshake reached {len(where)} of {w['population']} nodes")
    t_ready = time.perf_counter()
    fed = FederatedArguments(num_clients=w["population"], clients_per_round=w["per_round"], seed=w["seed"])
    k = w["per_round"]
    strategy = SampledFedAvg(
        where, fed, out / "rounds.jsonl", t_ready, fraction_train=k / w["population"], fraction_evaluate=0.0,
        min_train_nodes=k, min_available_nodes=w["population"],
    )  # fmt: skip
    init = {k_: v for k_, v in load_file(spec["init"]).items()}
    result = strategy.start(grid, ArrayRecord(init), num_rounds=w["rounds"], timeout=spec.get("round_timeout", 3600))
    final = {k_: v.contiguous() for k_, v in result.arrays.to_torch_state_dict().items()}
    save_file(final, str(out / "final.safetensors"))
    (out / "server.json").write_text(
        json.dumps({"handshake_s": t_ready - t0, "client_threads": sorted(strategy.threads)})
    )


# ----------------------------------------------------------------------------------------------
# the driver (the benchmark samples the memory of this process and its descendants, Ray's included)
# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: flower_sim_app.py SPEC.json")
    os.environ[SPEC_ENV] = str(Path(argv[0]).resolve())
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    import flower_sim_app as app  # by module name, so Ray's workers import it rather than unpickle a copy
    import flwr
    import ray
    from flwr.simulation import run_simulation

    spec = load_spec()
    out = Path(spec["out_dir"])
    backend = {"client_resources": {"num_cpus": spec["client_cpus"]}}
    t0 = time.perf_counter()
    run_simulation(app.server_app, app.client_app, num_supernodes=spec["workload"]["population"],
                   backend_config=backend)  # fmt: skip
    server = json.loads((out / "server.json").read_text()) if (out / "server.json").exists() else {}
    result = {
        **server, "simulation_s": time.perf_counter() - t0, "backend_config": backend,
        "finished": (out / "final.safetensors").exists(),
        "versions": {"flwr": flwr.__version__, "ray": ray.__version__, "torch": torch.__version__,
                     "python": sys.version.split()[0]},
    }  # fmt: skip
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return 0 if result["finished"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
