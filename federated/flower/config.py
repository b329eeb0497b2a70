"""The Flower run config and the messages both sides share: what a run config may hold, its
limits (checked before anything is built), and how parameters travel (an ``ArrayRecord``).

The run config (``[tool.flwr.app.config]`` or ``flwr run --run-config``) holds
``asymvlm-federate``'s config keys, dashes or underscores (``recipe``, ``rounds``, ``num-clients``,
``server-lr``...), plus ``config`` (a YAML file of them, on the SuperLink host and every node);
unknown keys are an error. ``num-server-rounds`` is accepted for ``rounds`` (Flower's templates).
The ServerApp's own keys (:data:`SERVER_KEYS`: its wait and Flower's SecAgg+ parameters) are read
by :func:`server_options`.

Example:
    >>> data, head, fed, options = parse_run_config({"num-server-rounds": 3, "num-clients": 2, "recipe": "fedavg"})
    >>> fed.rounds, fed.num_clients, options
    (3, 2, {})
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord

from asymvlm.errors import ConfigError
from asymvlm.heads import MAX_HEAD_PARAMETERS, MAX_WIDTH
from asymvlm.io import is_json_number

__all__ = [
    "parse_run_config",
    "server_options",
    "check_head_size",
    "to_arrays",
    "from_arrays",
    "log",
    "ROUNDS_ALIAS",
    "SERVER_KEYS",
    "SECAGG_DEFAULTS",
    "MAX_CLIENTS",
    "MAX_LORA_R",
    "MAX_EXAMPLES",
    "NODE_WAIT",
    "ENCODER_KEYS",
    "TRAIN",
    "EVALUATE",
    "QUERY",
    "LEGACY_FITINS",
    "DELTA_KEY",
    "CLIENT_CONFIG",
    "client_config_from",
]


# a child of Flower's logger: its console handler prints it, and the ServerApp process mirrors that
# output to the SuperLink, so ``flwr run --stream`` / ``flwr log`` show the run's progress
log = logging.getLogger("flwr").getChild("asymvlm")

ROUNDS_ALIAS = "num_server_rounds"  # Flower's templates name the round count so
PROG = "asymvlm (Flower run config)"
# message types: Flower's "train" / "evaluate", and a "query" for the handshake and initial losses
TRAIN, EVALUATE, QUERY = "train", "evaluate", "query"
LEGACY_FITINS = "fitins.parameters"  # the record of Flower's FitIns (what SecAgg+'s workflow sends)
# the recipe's client configuration (``Recipe.client_config``, packed by
# :func:`~asymvlm.federated.client.pack_client_config`): its numbers in the train config and its tensors
# as ArrayRecords, each under this prefix and ``<term>.<option>``
CLIENT_CONFIG = "asymvlm.client."
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
    from asymvlm.config import DataArguments
    from asymvlm.federated.config import FederatedArguments, RecipeArguments
    from asymvlm.heads import HeadConfig

    return (DataArguments, HeadConfig, FederatedArguments, RecipeArguments)


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
    import typing

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
    hints = {k: typing.get_type_hints(t)[k] for k, t in known.items()}
    for k, v in flat.items():
        if isinstance(v, str) and typing.get_origin(hints.get(k)) in (list, tuple):  # hidden_dims
            text = v.strip()
            v = yaml.safe_load(text if text.startswith("[") else f"[{text}]")
        values[k] = v
    data_args, head, fed, rargs = dataclasses_from_values(types, values, PROG)
    if fed.attack != "none":
        raise ConfigError("attacks are simulated by asymvlm-federate only; a Flower run has real clients")
    simulated = {
        "asynchronous": "none", "availability": "uniform", "participation_correction": "none", "compression": "none",
    }  # fmt: skip
    set_ = [f"{k}={getattr(fed, k)}" for k, default in simulated.items() if getattr(fed, k) != default]
    if set_:
        raise ConfigError(f"run config: {', '.join(set_)} is simulated by asymvlm-federate only, not over Flower yet")
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


# -- parameters on the wire ---------------------------------------------------------------------


def to_arrays(params: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Parameters as a Flower ``ArrayRecord`` (detached, on the CPU, contiguous)."""
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in params.items()})


def from_arrays(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """An ``ArrayRecord``'s arrays as a ``{name: tensor}`` dict."""
    return dict(record.to_torch_state_dict())


def client_config_from(config: Mapping[str, Any], arrays: Mapping[str, ArrayRecord]) -> dict[str, Any]:
    """The recipe's client configuration a train message carries (:data:`CLIENT_CONFIG` keys of its
    train config and ArrayRecords), as ``Recipe.client_config`` returned it; ``{}`` without one."""
    from asymvlm.federated.client import unpack_client_config

    n = len(CLIENT_CONFIG)
    numbers = {k[n:]: v for k, v in config.items() if k.startswith(CLIENT_CONFIG)}
    tensors = {k[n:]: from_arrays(r) for k, r in arrays.items() if k.startswith(CLIENT_CONFIG)}
    return unpack_client_config(numbers, tensors)
