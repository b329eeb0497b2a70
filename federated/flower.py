"""asymvlm on Flower's deployment engine: a ServerApp whose strategy is asymvlm's one server step,
and a ClientApp that runs asymvlm's client update on the node's own data.

What runs where:

* **SuperLink host** — the :data:`server_app` (``asymvlm.federated.flower:server_app``): the
  recipe's aggregator, server transform and its state (optimizer moments, GHBM momentum,
  AdaFedAdam's initial losses, DP accounting), the exact LoRA modes, the per-round checkpoint
  (asymvlm's format: ``output_dir/checkpoints``, ``metrics.jsonl``) and the final model
  (``output_dir/model``). It never sees data: the clients report their sizes, the embedding
  width and the encoder's fingerprint in a handshake, and every node must agree.
* **each SuperNode** — the :data:`client_app` (``asymvlm.federated.flower:client_app``): its node
  config names its partition (``partition-id``, Flower's convention) and, for a real data holder,
  its own embedding cache (``cache-dir``); without ``cache-dir`` it takes partition
  ``partition-id`` of the run's dataset exactly as ``asymvlm-federate`` partitions it (simulation
  and tests). A SuperNode may start a fresh ClientApp process per message, so the client keeps
  nothing between messages: what a round needs (the global parameters, the GHBM momentum, the
  exact-LoRA base weights, the round's seed) travels in the message.

The run config (``[tool.flwr.app.config]`` or ``flwr run --run-config``) holds
``asymvlm-federate``'s config keys, dashes or underscores (``recipe``, ``rounds``, ``num-clients``,
``server-lr``...), plus ``config`` (a YAML file of them, on the SuperLink host and every node);
unknown keys are an error. ``num-server-rounds`` is accepted for ``rounds`` (Flower's templates).

Randomness is asymvlm's (every stream a function of seed, stream name and round), so a Flower run
equals the in-process run to float rounding and a restarted ServerApp (``resume = true``)
continues bit-identically from its last checkpoint.

Interop: :data:`client_app` also answers Flower's own strategies (``flwr.serverapp.strategy``
FedAvg, FedAdam...): without asymvlm's keys in the train config it replies with the updated
parameters and ``num-examples``, as those strategies expect.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from asymvlm.errors import ClientUpdateError, ConfigError
from asymvlm.federated.core.tree import first_non_finite
from asymvlm.heads import MAX_HEAD_PARAMETERS, MAX_WIDTH
from asymvlm.io import is_json_number

__all__ = [
    "server_app",
    "client_app",
    "parse_run_config",
    "run_flower_server",
    "LocalGrid",
    "ROUNDS_ALIAS",
]

# a child of Flower's logger: its console handler prints it, and the ServerApp process mirrors that
# output to the SuperLink, so ``flwr run --stream`` / ``flwr log`` show the run's progress
log = logging.getLogger("flwr").getChild("asymvlm")

ROUNDS_ALIAS = "num_server_rounds"  # Flower's templates name the round count so
PROG = "asymvlm (Flower run config)"
# message types: Flower's "train" / "evaluate", and a "query" for the handshake and initial losses
TRAIN, EVALUATE, QUERY = "train", "evaluate", "query"
LEGACY_FITINS = "fitins.parameters"  # the record of Flower's FitIns (what SecAgg+'s workflow sends)
DELTA_KEY = "asymvlm.send-delta"  # train config: reply with the delta (asymvlm's server) or the new weights
# run-config keys of the ServerApp itself (not asymvlm-federate's): its wait, and Flower's SecAgg+
SECAGG_DEFAULTS = {
    "secure_aggregation": False,
    "secagg_num_shares": 1.0,  # Flower's meaning: an int > 2 is a count, a float a fraction of the sampled
    "secagg_reconstruction_threshold": 0.5,
    "secagg_clipping_range": 8.0,
    "secagg_quantization_range": 2**22,
}
SERVER_KEYS = ("round_timeout", *SECAGG_DEFAULTS)
# what a run config may ask the ServerApp and the nodes to allocate (checked before anything is built)
MAX_CLIENTS = 100_000  # partitions of a Flower federation
MAX_LORA_R = 4096
MAX_EXAMPLES = 2**53  # a reported client size (exact as a float)
ENCODER_KEYS = ("spec", "pretrained", "fingerprint", "dim")  # a cache's record of its encoder, sent in the handshake
NODE_WAIT = 120.0  # seconds the ServerApp waits for num-clients SuperNodes to join, and at least for the handshake


def _groups() -> tuple[type, ...]:
    from asymvlm.config import DataArguments, HeadArguments
    from asymvlm.federated.config import FederatedArguments, RecipeArguments

    return (DataArguments, HeadArguments, FederatedArguments, RecipeArguments)


def _flat(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Run-config keys with underscores; ``""`` is "not set" (a Flower app must declare every key it
    lets ``--run-config`` override, so unset ones hold ``""``)."""
    return {str(k).replace("-", "_"): v for k, v in run_config.items() if v != ""}


def parse_run_config(run_config: Mapping[str, Any]) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(data args, head args, federated args, recipe options) from a Flower run config.

    Keys are ``asymvlm-federate``'s config keys (dashes or underscores); an empty string means "not
    set" (asymvlm's default); :data:`SERVER_KEYS` are the ServerApp's own; ``config`` names a YAML file
    of keys (read first; the other keys override it); a list-valued key (``hidden_dims``) may be a
    string (``"[256, 256]"`` or ``"256,256"``). Unknown keys are a :class:`ConfigError`."""
    import dataclasses

    import yaml

    from asymvlm.config import config_fields, dataclasses_from_values, load_yaml
    from asymvlm.federated.config import recipe_options

    types = _groups()
    known = config_fields(types)
    values: dict[str, Any] = {}
    flat = _flat(run_config)
    for key in SERVER_KEYS:  # the ServerApp's, not asymvlm-federate's
        flat.pop(key, None)
    if ROUNDS_ALIAS in flat:
        if "rounds" in flat and flat["rounds"] != flat[ROUNDS_ALIAS]:
            raise ConfigError(f"run config: rounds={flat['rounds']} and {ROUNDS_ALIAS}={flat[ROUNDS_ALIAS]} differ")
        flat["rounds"] = flat.pop(ROUNDS_ALIAS)
    if flat.get("config"):
        values.update(load_yaml(flat.pop("config"), types, PROG))
    flat.pop("config", None)
    unknown = sorted(set(flat) - set(known))
    if unknown:
        raise ConfigError(f"run config: unknown key(s) {unknown}; the keys are asymvlm-federate's (--help)")
    hints = {f.name: f.type for t in types for f in dataclasses.fields(t)}
    for k, v in flat.items():
        if isinstance(v, str) and "list" in str(hints.get(k, "")).lower():
            text = v.strip()
            v = yaml.safe_load(text if text.startswith("[") else f"[{text}]")
        values[k] = v
    data_args, head, fed, rargs = dataclasses_from_values(types, values, PROG)
    if fed.attack != "none":
        raise ConfigError("attacks are simulated by asymvlm-federate only; a Flower run has real clients")
    _check_sizes(head, fed)
    server_options(run_config)
    return data_args, head, fed, recipe_options(rargs)


def _check_sizes(head: Any, fed: Any) -> None:
    """What the run config makes the ServerApp and every node allocate, checked before anything is
    built (types are checked by the config dataclasses)."""
    for i, h in enumerate(head.hidden_dims):
        if h > MAX_WIDTH:
            raise ConfigError(f"run config: hidden_dims[{i}] = {h} exceeds {MAX_WIDTH}")
    between = sum((a + 1) * b for a, b in zip(head.hidden_dims, head.hidden_dims[1:]))
    if between > MAX_HEAD_PARAMETERS:
        raise ConfigError(
            f"run config: hidden_dims {list(head.hidden_dims)} make a head of more than {MAX_HEAD_PARAMETERS:,} "
            "parameters"
        )
    if fed.num_clients > MAX_CLIENTS:
        raise ConfigError(f"run config: num_clients = {fed.num_clients} exceeds {MAX_CLIENTS:,}")
    if fed.lora_r > MAX_LORA_R:
        raise ConfigError(f"run config: lora_r = {fed.lora_r} exceeds {MAX_LORA_R}")


def check_head_size(head: Any, dim: int) -> int:
    """The head's parameter count on ``dim``-wide embeddings (a :class:`ConfigError` above
    :data:`MAX_HEAD_PARAMETERS`), before the head is built: the width comes from the nodes."""
    widths = [int(dim), *head.hidden_dims, int(dim) + 1]  # the last layer: direction and concentration
    n = sum((a + 1) * b for a, b in zip(widths, widths[1:]))
    if n > MAX_HEAD_PARAMETERS:
        raise ConfigError(
            f"hidden_dims {list(head.hidden_dims)} on {dim}-d embeddings make a head of {n:,} parameters, more "
            f"than {MAX_HEAD_PARAMETERS:,}"
        )
    return n


def server_options(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The ServerApp's own run-config values (:data:`SERVER_KEYS`), checked: ``round_timeout`` (seconds,
    default 3600) and Flower's SecAgg+ parameters; a bad one is a :class:`ConfigError` naming the key."""
    flat = _flat(run_config)
    opts: dict[str, Any] = {"round_timeout": 3600.0, **SECAGG_DEFAULTS}
    opts.update({k: flat[k] for k in SERVER_KEYS if k in flat})

    def bad(key: str, want: str) -> ConfigError:
        return ConfigError(f"run config: {key.replace('_', '-')} must be {want}, got {opts[key]!r}")

    for key in ("round_timeout", "secagg_num_shares", "secagg_reconstruction_threshold", "secagg_clipping_range"):
        v = opts[key]
        if not (is_json_number(v) and math.isfinite(v) and v > 0):
            raise bad(key, "a finite number > 0")
        opts[key] = float(v) if key in ("round_timeout", "secagg_clipping_range") else v
    if not isinstance(opts["secure_aggregation"], bool):
        raise bad("secure_aggregation", "true or false")
    q = opts["secagg_quantization_range"]
    if not (is_json_number(q) and math.isfinite(q) and q == int(q) and 1 <= q <= 2**31):
        raise bad("secagg_quantization_range", "an integer in [1, 2**31]")
    opts["secagg_quantization_range"] = int(q)
    return opts


# -- the node side ------------------------------------------------------------------------------


@dataclass
class _Node:
    """What a ClientApp process builds once: the client's model, options and batcher."""

    run: Any  # a Federation over this node's data (one or all partitions)
    batcher: Any
    num_examples: int
    partition: int


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
        batcher, n = data.batchers[0], data.num_examples[0]
    else:
        if c >= fed.num_clients:
            raise ConfigError(f"node config partition-id {c} >= num_clients {fed.num_clients}")
        data = get_federated_data(data_args, fed)
        batcher, n = data.batchers[c], data.num_examples[c]
    client_data = FederatedData([batcher], [n], data.dim, data.encoder_source, data.encoder)
    check_head_size(head, data.dim)
    run = Federation.build(fed, client_data, head, ropts)
    node = _Node(run, batcher, n, c)
    _NODES[key] = node
    return node


def _to_arrays(params: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in params.items()})


def _from_arrays(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict())


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
    from asymvlm.federated.rounds import int_seed

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
        node.run.model.set_params(_from_arrays(msg.content["arrays"]))
        node.batcher.reseed(int_seed(fed.seed, "initial_loss", node.partition))
        metrics["loss"] = client_loss(node.run.model, node.batcher, node.run.options.loss_batches)[0]
    return Message(RecordDict({"metrics": MetricRecord(metrics), "info": config}), reply_to=msg)


@client_app.train()
def _client_train(msg: Message, context: Context) -> Message:
    """asymvlm's client update from the message's global parameters; the delta (asymvlm's server) or
    the updated parameters and ``num-examples`` (Flower's strategies)."""
    from asymvlm.federated.client import client_update, set_base
    from asymvlm.federated.rounds import int_seed

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
        params = _from_arrays(content["arrays"])
        config = content.config_records.get("config", ConfigRecord())
    asym = bool(config.get(DELTA_KEY, False))
    if "base" in content.array_records:
        set_base(run.model, _from_arrays(content["base"]))
    rnd = int(config.get("asymvlm.round", config.get("server-round", 1) - 1))
    seed = int_seed(fed.seed, "client", rnd, node.partition)
    node.batcher.reseed(seed)
    momentum = _from_arrays(content["ghbm-momentum"]) if "ghbm-momentum" in content.array_records else None
    needs = run.recipe.needs if asym else set()
    result = client_update(
        run.model, params, node.batcher, run.options, client=node.partition, num_examples=node.num_examples,
        seed=seed, ghbm_momentum=momentum, need_loss_before=bool(needs & {"loss_before", "loss_initial"}),
        need_grad_norm="grad_norm" in needs,
    )  # fmt: skip
    metrics: dict[str, Any] = {"num-examples": node.num_examples, "partition-id": node.partition}
    for name in ("loss_before", "loss_after", "grad_norm"):
        value = getattr(result, name)
        if value is not None:
            metrics[name.replace("_", "-")] = float(value)
    sent = result.delta if asym else {k: params[k] + d for k, d in result.delta.items()}
    if legacy:
        from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

        clip = float(config.get("asymvlm.secagg-clipping-range", math.inf))
        worst = max(float(v.abs().max()) for v in sent.values())
        if not worst <= clip:  # SecAgg+ would clip it silently; the aggregate would be wrong
            raise ValueError(f"update entry {worst:.3g} exceeds SecAgg+'s clipping range {clip:g} (raise it)")
        # as 1-d at least: Flower 1.42's SecAgg+ garbles 0-d arrays (measured: the temperature came back 24 off)
        arrays = [sent[n].numpy().reshape(-1) if sent[n].dim() == 0 else sent[n].numpy() for n in names]
        weight = int(config.get("asymvlm.secagg-weight", node.num_examples))  # the recipe's weight of this client
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), weight, metrics)
        return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
    return Message(RecordDict({"arrays": _to_arrays(sent), "metrics": MetricRecord(metrics)}), reply_to=msg)


@client_app.evaluate()
def _client_evaluate(msg: Message, context: Context) -> Message:
    """The client's loss at the global model (asymvlm's fairness report; Flower's ``eval_loss``)."""
    from asymvlm.federated.client import client_loss
    from asymvlm.federated.rounds import int_seed

    node = _node(context)
    fed = node.run.fed
    node.run.model.set_params(_from_arrays(msg.content["arrays"]))
    node.batcher.reseed(int_seed(fed.seed, "fairness", node.partition))
    loss = client_loss(node.run.model, node.batcher, fed.fairness_batches)[0]
    metrics = {"eval_loss": float(loss), "num-examples": node.num_examples, "partition-id": node.partition}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


# -- replies: every field of every reply is untrusted ------------------------------------------
MAX_REASON = 300  # characters of a recorded reason (a node's own text is part of some)


def _short(text: Any, limit: int = MAX_REASON) -> str:
    text = str(text).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show(value: Any) -> str:
    return _short(repr(value), 40)


def _metrics(reply: Message) -> dict[str, Any]:
    record = reply.content.metric_records.get("metrics")
    if record is None:
        raise ClientUpdateError("no 'metrics' record (a MetricRecord) in the reply")
    return dict(record)


def _integer(m: Mapping[str, Any], key: str, low: int, high: int) -> int:
    v = m.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise ClientUpdateError(f"{key} must be an integer in [{low}, {high}], got {_show(v)}")
    return int(v)


# A training statistic a client reports (its loss, its gradient's norm) above this is not one of a
# head on unit embeddings but a diverged or lying client: rejected. q-FFL and AdaFedAdam weight
# clients by these reports, so within the bound a client still chooses its own weight (documented).
MAX_REPORTED = 1e6


def _loss(m: Mapping[str, Any], key: str, *, positive: bool = False) -> float | None:
    """A reported loss or norm (None when absent): a finite number >= 0 (> 0 with ``positive``) and at
    most :data:`MAX_REPORTED`."""
    if key not in m:
        return None
    v = m[key]
    try:
        ok = is_json_number(v) and math.isfinite(float(v)) and (v > 0 if positive else v >= 0) and v <= MAX_REPORTED
    except OverflowError:  # an int beyond float's range
        ok = False
    if not ok:
        raise ClientUpdateError(
            f"{key} must be a finite number {'>' if positive else '>='} 0 and <= {MAX_REPORTED:g}, got {_show(v)}"
        )
    return float(v)


def _own_partition(m: Mapping[str, Any], client: int) -> None:
    pid = m.get("partition-id")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid != client:
        raise ClientUpdateError(f"partition-id {_show(pid)} is not this node's ({client})")


@dataclass(frozen=True)
class _Hello:
    """A node's checked handshake."""

    partition: int
    num_examples: int
    dim: int
    encoder: dict[str, Any]  # the node's cache's record of its encoder (spec, pretrained, fingerprint, dim)

    def data_key(self) -> tuple:
        """What nodes must agree on: the width and the encoder (by fingerprint, else by name)."""
        fp = self.encoder.get("fingerprint")
        return (self.dim, fp) if fp else (self.dim, None, self.encoder.get("spec"), self.encoder.get("pretrained"))

    def describe(self) -> str:
        fp = self.encoder.get("fingerprint")
        return _short(
            f"{self.dim}-d embeddings, encoder {self.encoder.get('spec')!r} "
            f"{'fingerprint ' + str(fp)[:16] + '...' if fp else 'of unknown fingerprint'}",
            160,
        )


def _handshake_reply(reply: Message, num_clients: int) -> _Hello:
    """A node's handshake (partition, size, width, encoder), checked field by field."""
    m = _metrics(reply)
    pid = _integer(m, "partition-id", 0, num_clients - 1)
    n = _integer(m, "num-examples", 1, MAX_EXAMPLES)
    dim = _integer(m, "dim", 1, MAX_WIDTH)
    info = reply.content.config_records.get("info")
    if info is None:
        raise ClientUpdateError("no 'info' record (a ConfigRecord) in the handshake")
    fp, text = info.get("encoder-fingerprint"), info.get("encoder")
    source = None
    if isinstance(text, str) and len(text) <= 4096:
        try:
            source = json.loads(text)
        except (ValueError, RecursionError):
            source = None
    plain = str | int | float | bool | None
    if (
        not isinstance(source, dict)
        or len(source) > 32
        or not all(isinstance(k, str) and isinstance(v, plain) for k, v in source.items())
    ):
        raise ClientUpdateError(f"info's encoder must be a JSON object of plain values, got {_show(text)}")
    if not isinstance(fp, str) or fp != str(source.get("fingerprint") or ""):
        raise ClientUpdateError(f"info's encoder-fingerprint {_show(fp)} differs from its encoder record")
    if source.get("dim") is not None and source["dim"] != dim:
        raise ClientUpdateError(f"its encoder record says dim {_show(source['dim'])}, its metrics {dim}")
    return _Hello(pid, n, dim, source)


def _train_reply(reply: Message, client: int, num_examples: int, needs: Iterable[str]) -> Any:
    """A client's training reply as a :class:`~asymvlm.federated.client.ClientResult`, checked field
    by field. Its ``num-examples`` must be the handshake's: the weight is the handshake's count, and
    a client whose size changes mid-run is rejected (a liar could otherwise take the round's weight)."""
    from asymvlm.federated.client import ClientResult

    m = _metrics(reply)
    _own_partition(m, client)
    n = m.get("num-examples")
    if isinstance(n, bool) or not isinstance(n, int):
        raise ClientUpdateError(f"num-examples must be an integer, got {_show(n)}")
    if n != num_examples:
        raise ClientUpdateError(f"num-examples {n} is not the {num_examples} of its handshake")
    values = {key: _loss(m, key) for key in ("loss-before", "loss-after", "grad-norm")}
    for need, key in (("loss_before", "loss-before"), ("loss_initial", "loss-before"), ("grad_norm", "grad-norm")):
        if need in needs and values[key] is None:
            raise ClientUpdateError(f"no {key} in the reply (the recipe needs it)")
    record = reply.content.array_records.get("arrays")
    if record is None:
        raise ClientUpdateError("no 'arrays' record (an ArrayRecord) in the reply")
    try:
        delta = _from_arrays(record)
    except Exception as err:  # a malformed record: rejected like a bad delta
        raise ClientUpdateError(f"unreadable arrays: {type(err).__name__}: {err}") from None
    return ClientResult(client, delta, num_examples, values["loss-before"], values["loss-after"], values["grad-norm"])


def _loss_reply(reply: Message, client: int, key: str, *, positive: bool = False) -> float:
    """A client's reported loss (the initial loss, the fairness report's), checked."""
    m = _metrics(reply)
    _own_partition(m, client)
    value = _loss(m, key, positive=positive)
    if value is None:
        raise ClientUpdateError(f"no {key} in the reply")
    return value


# -- the server side ----------------------------------------------------------------------------


class FederationError(ConfigError):
    """The federation cannot go on (nodes disagree, too few clients answered)."""


def _send(grid: Grid, kind: str, contents: Mapping[int, RecordDict], rnd: int, timeout: float) -> tuple[dict, dict]:
    """Send one message per node; (replies by node id, errors by node id). Missing replies are errors."""
    messages = [Message(content, node, kind, group_id=str(rnd)) for node, content in contents.items()]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    by_id = {m.metadata.message_id: node for m, node in zip(messages, contents)}
    ok, errors = {}, {}
    for reply in replies:
        node = by_id.get(reply.metadata.reply_to_message_id)
        if node is None:
            continue
        if reply.has_error():
            errors[node] = _short(f"error reply (Flower code {reply.error.code}): {reply.error.reason}")
        else:
            ok[node] = reply
    for node in contents:
        if node not in ok and node not in errors:
            errors[node] = f"no reply within {timeout:g} s"
    return ok, errors


def _plain_round(grid: Grid, run: Any, state: Any, active: list[int], where: dict[int, int], sizes: dict[int, int],
                 rnd: int, timeout: float) -> tuple[list, list[dict]]:  # fmt: skip
    """One training round's messages: every active client's own update (or the reason it has none)."""
    from asymvlm.federated.recipes import ghbm_server_momentum

    cfg = ConfigRecord({DELTA_KEY: True, "asymvlm.round": rnd, "server-round": rnd + 1})
    content = {"arrays": _to_arrays(state.params), "config": cfg}
    if state.base:
        content["base"] = _to_arrays(state.base)
    momentum = ghbm_server_momentum(run.recipe, state.opt_state, state.params)
    if momentum is not None:
        content["ghbm-momentum"] = _to_arrays(momentum)
    ok, errors = _send(grid, TRAIN, {where[c]: RecordDict(content) for c in active}, rnd + 1, timeout)
    node_to_pid = {where[c]: c for c in active}
    results, rejected = [], [{"client": node_to_pid[n], "reason": why} for n, why in sorted(errors.items())]
    for node in sorted(ok, key=lambda n: node_to_pid[n]):
        c = node_to_pid[node]
        try:
            results.append(_train_reply(ok[node], c, sizes[c], run.recipe.needs))
        except ClientUpdateError as err:
            rejected.append({"client": c, "reason": _short(err)})
    return results, rejected


def check_secure_aggregation(recipe: Any, fed: Any) -> None:
    """SecAgg+ releases only the weighted sum of the updates: a :class:`ConfigError` naming why when
    ``recipe`` needs more (individual updates, per-client losses or norms, server-side clipping)."""
    from asymvlm.federated.core import WeightedMean

    why = ""
    if type(recipe.aggregator) is not WeightedMean:
        why = f"its aggregator ({type(recipe.aggregator).__name__}) needs the individual updates"
    elif recipe.aggregator.weighting == "capped" and float(recipe.aggregator.cap or 0) != int(
        recipe.aggregator.cap or 0
    ):
        why = "SecAgg+ weights are whole numbers: give weighting_cap as one"
    elif recipe.needs:
        why = f"it needs each client's {', '.join(sorted(recipe.needs))}"
    elif recipe.ghbm_beta > 0:
        why = "GHBM's momentum is sent in asymvlm's own messages, not in SecAgg+'s"
    elif recipe.dp is not None:
        why = "central DP clips each client's update on the server"
    elif fed.trainable != "head" and fed.lora_mode not in ("factors", "frozen_a"):
        why = f"the exact LoRA mode {fed.lora_mode!r} aggregates each client's factor products"
    if why:
        raise ConfigError(
            f"secure aggregation (SecAgg+) releases only the weighted sum of the updates; recipe "
            f"{recipe.name!r} cannot run under it: {why}"
        )


def secagg_error_bound(
    sizes: Iterable[int], clipping_range: float, quantization_range: int, max_weight: float
) -> float:
    """The most a coordinate of SecAgg+'s aggregate can differ from the exact weighted mean.

    Flower's SecAgg+ (client mod ``secaggplus_mod``) scales client k's update by its weight
    ``q_k = round(n_k / max_weight * R) / R``, clips to ``[-c, c]`` and rounds stochastically onto
    ``R`` levels (step ``2c / R``); the server divides the sum by ``D = sum q_k``. Stochastic rounding
    is off by less than one step per client (``n 2c / (R D)`` in all); the rounded weights move a
    weighted mean of values within ``[-c, c]`` by at most ``sum |q_k - n_k / max_weight| 2c / D'``
    with ``D' = D - n / (2R)`` (``n c / (R D')``); float32 adds ``c 2^-23``."""
    sizes = list(sizes)
    n, c, r = len(sizes), float(clipping_range), int(quantization_range)
    d = sum(round(k / max_weight * r) / r for k in sizes)
    d_low = d - n / (2 * r)
    return n * 2 * c / (r * d) + n * c / (r * d_low) + c * 2.0**-23


def _secagg_workflow(run_config: Mapping[str, Any], recipe: Any, fed: Any, sizes: dict[int, int], timeout: float):
    """Flower's SecAggPlusWorkflow from the run config, or None when ``secure-aggregation`` is off."""
    opts = server_options(run_config)
    if not opts["secure_aggregation"]:
        return None
    check_secure_aggregation(recipe, fed)
    from flwr.server.workflow import SecAggPlusWorkflow

    try:
        workflow = SecAggPlusWorkflow(
            num_shares=opts["secagg_num_shares"], reconstruction_threshold=opts["secagg_reconstruction_threshold"],
            max_weight=float(max(sizes.values())), clipping_range=float(opts["secagg_clipping_range"]),
            quantization_range=int(opts["secagg_quantization_range"]), timeout=timeout,
        )  # fmt: skip
    except (TypeError, ValueError) as err:
        raise ConfigError(f"secure aggregation: {err}") from err
    return workflow


def _secure_round(grid: Grid, workflow: Any, run: Any, state: Any, active: list[int], where: dict[int, int],
                  sizes: list[int], rnd: int) -> tuple[list, list[dict], dict]:  # fmt: skip
    """One round through Flower's SecAgg+ workflow: the clients' masked, quantised updates are summed
    without the server seeing any one of them; returns the aggregate as the round's single update."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import Strategy
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey

    from asymvlm.federated.client import ClientResult

    # SecAgg+ tolerates clients dropping out mid-protocol, not a sampled node that is already gone
    # (its neighbours are asked for key shares they never received): ping the sampled nodes first
    alive, _ = _send(grid, QUERY, {where[c]: RecordDict() for c in active}, rnd + 1, workflow.timeout or 3600.0)
    gone = [c for c in active if where[c] not in alive]
    sizes = [n for c, n in zip(active, sizes) if c not in gone]
    active = [c for c in active if c not in gone]
    # the recipe's weights (examples, uniform or capped), sent to each client as SecAgg+'s weight
    weights = [int(w) for w in run.recipe.aggregator.effective_weights([max(1, n) for n in sizes], len(sizes))]
    workflow.max_weight = float(max(weights, default=1))
    names = sorted(state.params)
    config = {DELTA_KEY: True, "asymvlm.round": rnd, "server-round": rnd + 1,
              "asymvlm.secagg-clipping-range": float(workflow.clipping_range)}  # fmt: skip
    got: dict[str, Any] = {}

    class _Round(Strategy):  # the legacy strategy SecAgg+'s workflow drives: sample, then hand over the sum
        def initialize_parameters(self, client_manager):
            return None

        def configure_fit(self, server_round, parameters, client_manager):
            return [
                (GridClientProxy(where[c], grid, 0), FitIns(parameters, {**config, "asymvlm.secagg-weight": w}))
                for c, w in zip(active, weights)
            ]

        def aggregate_fit(self, server_round, results, failures):
            got["results"], got["failures"] = results, failures
            if results:
                got["sum"] = parameters_to_ndarrays(results[0][1].parameters)
            return None, {}

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            return None

    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            strategy=_Round())  # fmt: skip
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd + 1})
    params = ndarrays_to_parameters([state.params[n].numpy() for n in names])
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(params, keep_input=True)
    if len(active) >= 2:  # else SecAgg+ cannot hide one update among others: nothing is aggregated
        workflow(grid, context)
    node_to_pid = {where[c]: c for c in active}
    answered = sorted(node_to_pid[p.node_id] for p, _ in got.get("results", []))
    rejected = [{"client": c, "reason": "no reply to the round's ping (not entered into SecAgg+)"} for c in gone]
    rejected += [{"client": c, "reason": "no masked update (dropped or failed during SecAgg+)"}
                 for c in active if c not in answered]  # fmt: skip
    info = {"clients": answered, "error_bound": None}
    if "sum" not in got:
        return [], rejected, {**info, "halted": "SecAgg+ halted (too few clients kept up; see the server log)"}
    dtype = {n: state.params[n].dtype for n in names}
    aggregate = {n: torch.from_numpy(a).to(dtype[n]).reshape(state.params[n].shape) for n, a in zip(names, got["sum"])}
    kept = [weights[active.index(c)] for c in answered]
    info["error_bound"] = secagg_error_bound(
        kept, workflow.clipping_range, workflow.quantization_range, workflow.max_weight
    )
    # one update standing for the answered clients (WeightedMean of one input is that input)
    return [ClientResult("secure-aggregate", aggregate, max(1, sum(kept)))], rejected, info


def _wait_for_nodes(grid: Grid, want: int, wait: float) -> None:
    """Wait up to ``wait`` seconds for ``want`` nodes to have joined (a run submitted right after its
    SuperNodes started must not miss one that is still connecting); then go on with those present."""
    if getattr(grid, "fixed_nodes", False):  # LocalGrid: every node is there from the start
        return
    end = time.monotonic() + wait
    have = len(list(grid.get_node_ids()))
    if have < want:
        log.info("waiting up to %.0f s for %d SuperNodes to join (%d so far)", wait, want, have)
    while have < want and time.monotonic() < end:
        time.sleep(1.0)
        have = len(list(grid.get_node_ids()))


def _handshake(grid: Grid, fed: Any, timeout: float) -> tuple[dict[int, int], dict[int, _Hello], list[dict]]:
    """Which node holds which partition, and what their data look like: (partition -> node, node ->
    its checked handshake, the nodes left out with the reason). A node whose handshake is malformed,
    that claims a partition another node claims too (which one holds it cannot be told), or whose
    data (width, encoder) differ from the majority's is left out of the run; nodes that disagree with
    no majority, or no usable node, is a :class:`FederationError`."""
    _wait_for_nodes(grid, fed.num_clients, min(timeout, NODE_WAIT))
    # a node's first message starts its first ClientApp process (imports, its data): at least NODE_WAIT
    ok, errors = _send(grid, QUERY, {n: RecordDict() for n in grid.get_node_ids()}, 0, max(timeout, NODE_WAIT))
    excluded = [{"node": n, "reason": _short(f"handshake: {why}")} for n, why in sorted(errors.items())]
    hello: dict[int, _Hello] = {}
    for node in sorted(ok):
        try:
            hello[node] = _handshake_reply(ok[node], fed.num_clients)
        except ClientUpdateError as err:
            excluded.append({"node": node, "reason": _short(f"handshake: {err}")})
    claims: dict[int, list[int]] = {}
    for node, h in hello.items():
        claims.setdefault(h.partition, []).append(node)
    for pid, holders in sorted(claims.items()):
        if len(holders) > 1:
            why = f"nodes {holders[0]} and {holders[1]} both hold partition-id {pid}"
            for node in holders:
                del hello[node]
                excluded.append({"node": node, "partition": pid, "reason": why})
    groups: dict[tuple, list[int]] = {}
    for node, h in hello.items():
        groups.setdefault(h.data_key(), []).append(node)
    if len(groups) > 1:
        best = max(groups, key=lambda k: len(groups[k]))
        if 2 * len(groups[best]) <= len(hello):
            raise FederationError(
                "nodes disagree on the data and no majority agrees: "
                + "; ".join(f"nodes {v}: {hello[v[0]].describe()}" for v in groups.values())
            )
        for key, holders in groups.items():
            for node in holders if key != best else []:
                excluded.append({"node": node, "partition": hello[node].partition,
                                 "reason": f"its data ({hello[node].describe()}) differ from the majority's "
                                           f"({hello[groups[best][0]].describe()})"})  # fmt: skip
                del hello[node]
    for x in excluded:
        log.error("node %s left out of the run: %s", x["node"], x["reason"])
    if not hello:
        why = "; ".join(f"node {x['node']}: {x['reason']}" for x in excluded)
        raise FederationError(f"no node answered the handshake with a usable reply ({why or 'no nodes'})")
    return {h.partition: node for node, h in hello.items()}, hello, excluded


def _initial_losses(grid: Grid, state: Any, where: dict[int, int], timeout: float, excluded: list[dict]) -> None:
    """Every client's loss at the initial model (AdaFedAdam's F_k(theta_0)) into ``state``; a client
    whose reply is missing or malformed is left out of the run (``where``, ``excluded``)."""
    theta0 = _to_arrays(state.params)
    ok, errors = _send(grid, QUERY, {where[p]: RecordDict({"arrays": theta0}) for p in sorted(where)}, 0, timeout)
    for c in sorted(where):
        node = where[c]
        try:
            if node not in ok:
                raise ClientUpdateError(errors.get(node, "no reply"))
            state.initial_losses[str(c)] = _loss_reply(ok[node], c, "loss", positive=True)
        except ClientUpdateError as err:
            excluded.append({"node": node, "partition": c, "reason": _short(f"initial loss: {err}")})
            log.error("node %s (partition %d) left out of the run: initial loss: %s", node, c, _short(err))
            del where[c]


def _fairness_report(grid: Grid, state: Any, where: dict[int, int], rnd: int, timeout: float, record: dict) -> None:
    """Every reachable client's loss at the new global model into the round's record; a missing or
    malformed reply is left out of the report and named in ``eval_rejected``."""
    from asymvlm.federated.rounds import fairness

    arrays = _to_arrays(state.params)
    ok, errors = _send(grid, EVALUATE, {where[p]: RecordDict({"arrays": arrays}) for p in sorted(where)}, rnd + 1,
                       timeout)  # fmt: skip
    losses, rejected = {}, []
    for c in sorted(where):
        try:
            if where[c] not in ok:
                raise ClientUpdateError(errors.get(where[c], "no reply"))
            losses[c] = _loss_reply(ok[where[c]], c, "eval_loss")
        except ClientUpdateError as err:
            rejected.append({"client": c, "reason": _short(err)})
    if losses:
        record["client_loss"] = {str(k): losses[k] for k in sorted(losses)}
        record["fairness"] = fairness([losses[k] for k in sorted(losses)])
    if rejected:
        record["eval_rejected"] = rejected


def _step(run: Any, state: Any, accepted: list, rnd: int, record: dict) -> Any:
    """The server step on the round's accepted updates (:meth:`Federation.apply_updates`, which
    skips a step that would give a value that is not finite), not taken either when the recipe
    fails on them (a value no per-update check foresaw): the round is recorded as skipped with the
    reason, the state stays as it was, and the run goes on."""
    from asymvlm.federated.client import set_base

    params, opt_state, base = state.params, state.opt_state, dict(state.base)
    try:
        return run.apply_updates(state, accepted, rnd, record)
    except (ArithmeticError, ValueError) as err:
        state.params, state.opt_state, state.base = params, opt_state, base
        if base:  # the step may have folded its update into the live model's base weights
            set_base(run.model, base)
        for key in ("aggregator_info", "lora_info", "client_loss_after", "loss_after"):
            record.pop(key, None)
        record["skipped"] = f"the recipe failed on this round's updates ({type(err).__name__}: {_short(err, 200)})"
        record["server_step"] = False
        state.skipped_rounds = sorted({*state.skipped_rounds, rnd + 1})
        state.round = rnd + 1
        return state


def run_flower_server(grid: Grid, run_config: Mapping[str, Any], *, timeout: float = 3600.0) -> Any:
    """The ServerApp's body: asymvlm's rounds over the grid's nodes; returns the final
    :class:`~asymvlm.federated.checkpoint.ServerState` (the model is saved in ``output_dir/model``).

    Every field of every reply is untrusted: a node whose handshake (or AdaFedAdam's initial loss) is
    malformed is left out of the run, a malformed training reply rejects that client for the round,
    a malformed loss report leaves that client out of the fairness report; each is recorded with the
    reason in ``metrics.jsonl`` (``excluded`` in the first round this ServerApp runs, ``rejected``,
    ``eval_rejected``) and logged, and the run goes on. A round whose server step would give a value
    that is not finite is skipped; a run in which no round stepped the model saves no model."""
    from asymvlm.encoders import load_encoder
    from asymvlm.federated.checkpoint import federated_card, save_federated_model
    from asymvlm.federated.data import FederatedData
    from asymvlm.federated.rounds import Federation, federation_recipe, sample_clients
    from asymvlm.io import read_jsonl

    data_args, head, fed, ropts = parse_run_config(run_config)
    recipe = federation_recipe(fed, ropts)  # an unknown option fails before any message
    where, hello, excluded = _handshake(grid, fed, timeout)
    sizes = {p: hello[n].num_examples for p, n in where.items()}
    first = hello[min(hello)]
    dim, source = first.dim, dict(first.encoder)  # what every node's cache records: the model's encoder
    log.info("partitions on nodes: %s; data: %s", {p: where[p] for p in sorted(where)}, first.describe())
    if not source.get("fingerprint"):
        log.warning("the nodes' caches record no encoder fingerprint: the saved model cannot check its encoder")
    check_head_size(head, dim)
    encoder = None
    if fed.trainable != "head":
        encoder = load_encoder(data_args.encoder, data_args.pretrained or None)
        if source.get("fingerprint") and encoder.fingerprint != source["fingerprint"]:
            raise FederationError(
                f"the run config's encoder {encoder.spec!r} (fingerprint {encoder.fingerprint[:16]}...) is not the "
                f"one the nodes' caches were built with ({first.describe()})"
            )
    server_data = FederatedData(
        [None] * fed.num_clients, [sizes.get(c, 0) for c in range(fed.num_clients)], dim, source, encoder
    )
    run = Federation.build(fed, server_data, head, ropts)
    out = Path(fed.output_dir)
    config = run.config(head)
    state = run.start(config, lambda r: log.info("%s", r))
    out.mkdir(parents=True, exist_ok=True)
    dp = recipe.dp is not None
    secagg = _secagg_workflow(run_config, recipe, fed, sizes, timeout)
    if "loss_initial" in recipe.needs:
        if not state.initial_losses:
            _initial_losses(grid, state, where, timeout, excluded)
        for c in [c for c in sorted(where) if str(c) not in state.initial_losses]:  # resumed: lost its loss
            excluded.append({"node": where.pop(c), "partition": c, "reason": "no initial loss recorded"})
        if not where:
            raise FederationError(f"initial losses: no usable answer ({recipe.name} needs each client's)")
    for rnd in range(state.round, fed.rounds):
        t0 = time.time()
        active, who = sample_clients(fed, rnd, poisson=dp)
        unreachable = [c for c in active if c not in where]
        active = [c for c in active if c in where]
        record: dict[str, Any] = {"round": rnd + 1, **who, "unreachable": unreachable}
        if excluded:  # once per ServerApp start: the nodes left out, with the reason
            record["excluded"], excluded = excluded, []
        if secagg is None:
            results, rejected = _plain_round(grid, run, state, active, where, sizes, rnd, timeout)
        else:
            results, rejected, record["secure_aggregation"] = _secure_round(
                grid, secagg, run, state, active, where, [sizes[c] for c in active], rnd
            )
        accepted, bad = run.validate(state, results)
        record["rejected"] = rejected + [{**r, "reason": _short(r["reason"])} for r in bad]
        for r in record["rejected"]:
            log.error("round %d: update of client %s rejected: %s", rnd + 1, r["client"], r["reason"])
        state = _step(run, state, accepted, rnd, record)  # SecAgg+'s sum carries no client loss
        if "skipped" in record:
            log.error("round %d skipped: %s", rnd + 1, record["skipped"])
        if not dp and ((fed.eval_every > 0 and (rnd + 1) % fed.eval_every == 0) or rnd + 1 == fed.rounds):
            _fairness_report(grid, state, where, rnd, timeout, record)
        record["seconds"] = round(time.time() - t0, 3)
        run.save_round(state, record, config)
        loss = record.get("fairness", record.get("loss_after", {})).get("mean")
        log.info(
            "round %d/%d: %d updates, %d rejected%s%s (%.1f s)", rnd + 1, fed.rounds, len(accepted),
            len(record["rejected"]), "" if loss is None else f", mean client loss {loss:.4f}",
            ", skipped" if "skipped" in record else "", record["seconds"],
        )  # fmt: skip
    rounds = [r for r in read_jsonl(out / "metrics.jsonl") if isinstance(r, dict) and "round" in r]
    if not any("skipped" not in r for r in rounds):
        raise FederationError(
            f"no round stepped the model (all {len(rounds)} skipped; see {out / 'metrics.jsonl'}): nothing saved as "
            f"{out / 'model'}"
        )
    bad = first_non_finite(state.params)
    if bad is not None:  # a resumed checkpoint that was not finite: never saved as a model
        raise FederationError(f"the model is not finite ({bad}); nothing saved as {out / 'model'}")
    run.model.set_params(state.params)
    card = federated_card(fed, state, ropts, data_args=data_args, data=server_data)
    save_federated_model(run.model, state, server_data, out / "model", init_from=fed.init_from or None, card=card)
    log.info("model saved to %s (%d rounds)", out / "model", state.round)
    return state


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    try:
        run_flower_server(grid, context.run_config, timeout=server_options(context.run_config)["round_timeout"])
    except ConfigError as err:  # one line first in the run's log (``flwr log``); Flower marks the run failed
        log.error("%s: %s", type(err).__name__, err)
        raise


# -- an in-process grid (tests, debugging a ServerApp without a SuperLink) ------------------------


class LocalGrid(Grid):
    """A :class:`flwr.serverapp.Grid` that delivers each message to a ClientApp in this process,
    one node per ``node_configs`` entry (node ids 1, 2, ...), each with its own node config and a
    persistent ``Context.state`` as a SuperNode keeps it; ``apps`` gives some nodes another ClientApp.
    Nodes in ``drop`` never answer; nodes in ``lost`` answer their first message only (the handshake:
    they die after it).
    A ClientApp's exception becomes an error reply, as a SuperNode sends it."""

    fixed_nodes = True  # every node is there from the start: the ServerApp does not wait for more

    def __init__(
        self,
        app: ClientApp,
        run_config: Mapping[str, Any],
        node_configs: Iterable[Mapping[str, Any]],
        apps: Mapping[int, ClientApp] | None = None,
    ):
        self.app = app
        self.apps = dict(apps or {})
        self.lost: set[int] = set()
        self._seen: dict[int, int] = {}
        self.contexts = {
            i + 1: Context(
                run_id=1, node_id=i + 1, node_config=dict(nc), state=RecordDict(), run_config=dict(run_config)
            )
            for i, nc in enumerate(node_configs)
        }
        self._run: Any = None
        # Flower's Message takes the run and node ids from the process's task identity (set by the
        # SuperLink / SuperNode runtimes); here one process plays the server and every node
        from flwr.supercore.task_identity import TaskIdentity

        self._identity = TaskIdentity
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
        self.drop: set[int] = set()
        self._replies: dict[str, Message] = {}
        self._counter = 0

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            self._counter += 1
            mid = f"local-{self._counter}"
            msg.metadata.__dict__["_message_id"] = mid
            ids.append(mid)
            node = msg.metadata.dst_node_id
            if node in self.drop or node not in self.contexts:
                continue
            self._seen[node] = self._seen.get(node, 0) + 1
            if node in self.lost and self._seen[node] > 1:  # it answered its first message only
                continue
            self._identity.node_id = node
            try:
                # a SuperNode receives its own deserialised copy (SecAgg+'s mod edits its records in place)
                self._replies[mid] = self.apps.get(node, self.app)(copy.deepcopy(msg), self.contexts[node])
            except Exception as err:  # what a SuperNode replies when its ClientApp raises
                from flwr.app import Error

                log.warning("node %d: %s raised %s: %s", node, msg.metadata.message_type, type(err).__name__, err)
                self._replies[mid] = Message(Error(code=2, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            finally:
                self._identity.node_id = 0
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(m) for m in list(message_ids) if m in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return list(self.pull_messages(list(self.push_messages(messages))))
