"""The ClientApp: asymvlm's client update on a SuperNode's own data.

Each SuperNode runs :data:`client_app` (``asymvlm.federated.flower.client:client_app``). Its node
config names its partition (``partition-id``, Flower's convention) and, for a real data holder, its
own embedding cache (``cache-dir``); without ``cache-dir`` it takes partition ``partition-id`` of the
run's dataset exactly as ``asymvlm-federate`` partitions it (simulation and tests). A SuperNode may
start a fresh ClientApp process per message, so the client keeps nothing between messages: what a
round needs (the global parameters, the GHBM momentum, the exact-LoRA base weights, the round's
seed) travels in the message.

Interop: :data:`client_app` also answers Flower's own strategies (``flwr.serverapp.strategy``
FedAvg, FedAdam...): without asymvlm's keys in the train config it replies with the updated
parameters and ``num-examples``, as those strategies expect.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from asymvlm.errors import ConfigError
from asymvlm.federated.flower.config import (
    DELTA_KEY,
    ENCODER_KEYS,
    LEGACY_FITINS,
    TRAIN,
    check_head_size,
    client_config_from,
    from_arrays,
    parse_run_config,
    to_arrays,
)

__all__ = ["client_app"]


@dataclass
class _Node:
    """What a ClientApp process builds once: the client's model, options and batcher."""

    run: Any  # a Federation over this node's data (one or all partitions)
    batcher: Any
    num_examples: int
    partition: int
    tests: Any = None  # the clients' test splits this node can see (--client_test_fraction)
    test_slot: int = 0  # its own entry there (its partition, or 0 with its own cache)


_NODES: dict[tuple, _Node] = {}  # per process: a SuperNode may reuse its ClientApp process


def _partition_id(context: Context) -> int:
    pid = context.node_config.get("partition-id", context.node_config.get("partition_id"))
    if pid is None:
        raise ConfigError("node config needs partition-id (this data holder's client index, 0 .. num-clients-1)")
    if isinstance(pid, bool) or not isinstance(pid, int | float) or int(pid) != pid or pid < 0:
        raise ConfigError(f"node config partition-id must be an integer >= 0, got {pid!r}")
    return int(pid)


def _node(context: Context) -> _Node:
    from asymvlm.federated.data import FederatedData, get_federated_data
    from asymvlm.federated.rounds import Federation

    key = (
        json.dumps(dict(context.run_config), sort_keys=True, default=str),
        json.dumps(dict(context.node_config), sort_keys=True, default=str),
    )
    if key in _NODES:
        return _NODES[key]
    data_args, head, fed, ropts = parse_run_config(context.run_config)
    c = _partition_id(context)
    cache_dir = context.node_config.get("cache-dir", context.node_config.get("cache_dir"))
    if cache_dir:  # a real data holder: its own embedding cache, one client
        import dataclasses as dc

        own = dc.replace(data_args, cache_dir=str(cache_dir))
        single = dc.replace(
            fed, num_clients=1, partition="iid", min_clients=1, clients_per_round=0, client_fraction=1.0
        )
        data = get_federated_data(own, single)  # the round's seed reseeds the batcher (client_update)
        batcher, n, slot = data.batchers[0], data.num_examples[0], 0
    else:
        if c >= fed.num_clients:
            raise ConfigError(f"node config partition-id {c} >= num_clients {fed.num_clients}")
        data = get_federated_data(data_args, fed)
        batcher, n, slot = data.batchers[c], data.num_examples[c], c
    client_data = FederatedData([batcher], [n], data.dim, data.encoder_source, data.encoder)
    check_head_size(head, data.dim)
    run = Federation.build(fed, client_data, head, ropts)
    where = context.node_config.get("state-dir", context.node_config.get("state_dir"))
    if where and run.cluster is not None and hasattr(run.cluster.clusterer, "store"):
        from asymvlm.federated.personal_store import ClientStates

        run.cluster.clusterer.store = ClientStates(where)  # FedEM's mixture weights stay on this node
    node = _Node(run, batcher, n, c, data.tests, slot)
    _NODES[key] = node
    return node


def _secagg_when_asked(msg: Message, context: Context, call_next: Any) -> Message:
    """Flower's SecAgg+ client mod for the messages of a secure-aggregation round; others pass."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if msg.metadata.message_type == TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


client_app = ClientApp(mods=[_secagg_when_asked])


@client_app.query()
def _client_query(msg: Message, context: Context) -> Message:
    """The handshake (partition, size, embedding width, encoder) and, with parameters, the loss at them."""
    from asymvlm.federated.client import client_loss
    from asymvlm.federated.seeds import int_seed

    node = _node(context)
    fed = node.run.fed
    metrics: dict[str, Any] = {
        "partition-id": node.partition,
        "num-examples": node.num_examples,
        "dim": node.run.data.dim,
    }
    # the cache's record of the encoder that made it: what the saved model will name as its encoder
    source = {k: v for k, v in (node.run.data.encoder_source or {}).items() if k in ENCODER_KEYS}
    config = ConfigRecord(
        {"encoder-fingerprint": str(source.get("fingerprint") or ""), "encoder": json.dumps(source, sort_keys=True)}
    )
    if "arrays" in msg.content.array_records:
        node.run.model.set_params(from_arrays(msg.content["arrays"]))
        node.batcher.reseed(int_seed(fed.seed, "initial_loss", node.partition))
        metrics["loss"] = client_loss(node.run.model, node.batcher, node.run.options.loss_batches)[0]
    return Message(RecordDict({"metrics": MetricRecord(metrics), "info": config}), reply_to=msg)


@client_app.train()
def _client_train(msg: Message, context: Context) -> Message:
    """asymvlm's client update from the message's global parameters; the delta (asymvlm's server) or
    the updated parameters and ``num-examples`` (Flower's strategies)."""
    from asymvlm.federated.client import client_update, set_base, update_needs
    from asymvlm.federated.seeds import int_seed

    node = _node(context)
    run, fed = node.run, node.run.fed
    content = msg.content
    legacy = LEGACY_FITINS in content.array_records  # a SecAgg+ round: Flower's FitIns / FitRes records
    if legacy:
        import flwr.compat.common.recorddict_compat as compat
        from flwr.common import parameters_to_ndarrays

        fitins = compat.recorddict_to_fitins(content, keep_input=True)
        names = sorted(run.model.get_params())
        arrays = parameters_to_ndarrays(fitins.parameters)
        if len(arrays) != len(names):
            raise ConfigError(f"the server sent {len(arrays)} arrays; this client's model has {len(names)}")
        params = {n: torch.from_numpy(a.copy()) for n, a in zip(names, arrays)}
        config = dict(fitins.config)
    else:
        params = from_arrays(content["arrays"])
        config = content.config_records.get("config", ConfigRecord())
    asym = bool(config.get(DELTA_KEY, False))
    if "base" in content.array_records:
        set_base(run.model, from_arrays(content["base"]))
    rnd = int(config.get("asymvlm.round", config.get("server-round", 1) - 1))
    if hasattr(node.batcher, "set_round"):  # temporal skew: this round's data
        node.batcher.set_round(rnd)
    seed = int_seed(fed.seed, "client", rnd, node.partition)
    node.batcher.reseed(seed)
    needs = run.recipe.needs if asym else set()
    terms = client_config_from(config, content.array_records)  # the recipe's client-side terms this round
    personal = run.personal is not None and run.personal.personalizer.name != "none"
    if personal and (not asym or legacy):
        raise ConfigError(
            f"personalize {fed.personalize!r} needs asymvlm's ServerApp without secure aggregation: the client "
            "uploads only its shared parameters"
        )
    if run.cluster is not None and asym and not legacy:  # clustered / multi-task FL: the method's own round
        return _cluster_train(msg, node, params, config, rnd, terms, context)
    if personal:  # its personal state stays on this node (node config state-dir, else <output_dir>/clients)
        from asymvlm.federated.personal_store import ClientStates

        where = context.node_config.get("state-dir", context.node_config.get("state_dir"))
        result = run.personal.client_round(
            run, params, node.partition, rnd, terms, seed, slot=0, store=ClientStates(where) if where else None
        )
    else:
        result = client_update(
            run.model, params, node.batcher, run.options, client=node.partition, num_examples=node.num_examples,
            seed=seed, client_config=terms, **update_needs(needs),
        )  # fmt: skip
    metrics = _train_metrics(node, result)
    sent = result.delta if asym else {k: params[k] + d for k, d in result.delta.items()}
    if legacy:
        from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

        clip = float(config.get("asymvlm.secagg-clipping-range", math.inf))
        worst = max(float(v.abs().max()) for v in sent.values())
        if not worst <= clip:  # SecAgg+ would clip it silently; the aggregate would be wrong
            raise ConfigError(f"update entry {worst:.3g} exceeds SecAgg+'s clipping range {clip:g} (raise it)")
        # as 1-d at least: Flower 1.42's SecAgg+ garbles 0-d arrays (measured: the temperature came back 24 off)
        arrays = [sent[n].numpy().reshape(-1) if sent[n].dim() == 0 else sent[n].numpy() for n in names]
        weight = int(config.get("asymvlm.secagg-weight", node.num_examples))  # the recipe's weight of this client
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), weight, metrics)
        return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
    return Message(RecordDict({"arrays": to_arrays(sent), "metrics": MetricRecord(metrics)}), reply_to=msg)


def _train_metrics(node: _Node, result: Any) -> dict[str, Any]:
    metrics: dict[str, Any] = {"num-examples": node.num_examples, "partition-id": node.partition}
    for name in ("loss_before", "loss_after", "grad_norm"):
        value = getattr(result, name)
        if value is not None:
            metrics[name.replace("_", "-")] = float(value)
    return metrics


def _cluster_train(
    msg: Message, node: _Node, params: Any, config: Any, rnd: int, terms: Any, context: Context
) -> Message:
    """A clustered / multi-task round on this node: the method's client round
    (:meth:`~asymvlm.federated.cluster_base.Clusterer.client_round`) on the models the server sent
    (every ``cluster-<j>``, or its own as ``arrays``); one update (``arrays``; ``cluster``: the one
    it chose, when it chooses) or one per model (``arrays-<m>``, ``groups``: FedEM)."""
    clusterer = node.run.cluster.clusterer
    if "asymvlm.clusters" in config:
        models = [from_arrays(msg.content[f"cluster-{j}"]) for j in range(int(config["asymvlm.clusters"]))]
    else:
        models = [params]
    extra = {"models": models, "assign": {} if len(models) > 1 else {str(node.partition): 0}}  # its own model
    results = clusterer.client_round(node.run, extra, node.partition, rnd, terms, slot=0)
    metrics = _train_metrics(node, results[0])
    if len(results) == 1:
        if clusterer.client_chooses:
            metrics["cluster"] = int(results[0].group)
        return Message(
            RecordDict({"arrays": to_arrays(results[0].delta), "metrics": MetricRecord(metrics)}), reply_to=msg
        )
    metrics["groups"] = len(results)
    arrays = {f"arrays-{r.group}": to_arrays(r.delta) for r in results}
    return Message(RecordDict({**arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)


@client_app.evaluate()
def _client_evaluate(msg: Message, context: Context) -> Message:
    """The client's loss at the global model (asymvlm's fairness report; Flower's ``eval_loss``)."""
    from asymvlm.federated.client import client_loss
    from asymvlm.federated.seeds import int_seed

    node = _node(context)
    fed = node.run.fed
    node.run.model.set_params(from_arrays(msg.content["arrays"]))
    node.batcher.reseed(int_seed(fed.seed, "fairness", node.partition))
    loss = client_loss(node.run.model, node.batcher, fed.fairness_batches)[0]
    metrics = {"eval_loss": float(loss), "num-examples": node.num_examples, "partition-id": node.partition}
    config = msg.content.config_records.get("config", ConfigRecord())
    if config.get("asymvlm.client-eval") and node.tests is not None:  # its own test split (personal FL)
        for model, values in _own_test_metrics(node, msg, config, context).items():
            metrics.update({f"{model}.{k}": float(v) for k, v in values.items()})
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def _own_test_metrics(node: _Node, msg: Message, config: Any, context: Context) -> dict[str, dict[str, float]]:
    """The node's client's metrics on its own test split, as the simulator computes them
    (:meth:`~asymvlm.federated.personal_run.PersonalRun.client_metrics`; a clustered run: its
    cluster model, sent as ``cluster-<j>`` with its membership in ``asymvlm.cluster``)."""
    from asymvlm.federated.personal_run import client_evaluator_factory
    from asymvlm.federated.personal_store import ClientStates

    run, c = node.run, node.partition
    evaluate = client_evaluator_factory()(node.tests)

    def own(client: int, encode: Any) -> dict[str, float]:
        return evaluate(node.test_slot, encode)

    rnd = int(config.get("asymvlm.round", 0))
    params = from_arrays(msg.content["arrays"])
    if "asymvlm.clusters" in config:
        models = [from_arrays(msg.content[f"cluster-{j}"]) for j in range(int(config["asymvlm.clusters"]))]
        extra = {"models": models, "assign": {str(c): int(config.get("asymvlm.cluster", 0))}}
        return {"cluster": own(c, run.cluster.clusterer.client_encoder(run, extra, c, rnd, batcher=node.batcher))}
    where = context.node_config.get("state-dir", context.node_config.get("state_dir"))
    store = ClientStates(where) if where else None
    return run.personal.client_metrics(run, params, c, rnd, rnd + 1, own, slot=0, store=store)
