"""The FedOpt core, shared by federated training and model merging.

Conventions (stated once, used everywhere):

* ``Params = dict[str, Tensor]``: a flat state dict.
* A **delta** is ``theta_new - theta_ref``: a client update in federated learning
  (``theta_local - theta_global``) or a task vector in merging (``theta_finetuned - theta_base``).
* :func:`apply_updates` **adds**: ``params + step``. A server step that follows the average delta
  is therefore ``+delta`` (FedAvg), never ``-delta``.
* An **aggregator** is stateless: ``aggregate(deltas, weights) -> AggregateResult`` (the combined
  delta plus diagnostics); it works key by key on lazy mappings (:mod:`.aggregators`).
* A **server optimizer** is a pure transform ``(init, update)``: ``init(params) -> state``,
  ``update(delta, state, params, **info) -> (step, new_state)``, composable with :func:`chain`
  whose members may be named and their state read by name (:func:`named_state`)
  (:mod:`.transforms`; optax's design, https://github.com/google-deepmind/optax).
* A **recipe** is an aggregator plus a server transform (plus a ``client_config`` hook for its
  clients' local terms and a feasibility check of the clients per round); a federated
  algorithm and a merge method are both recipes, and :func:`server_update` is the one function
  that turns deltas into a new model (:mod:`.server`), with differential privacy as a wrapper
  inside it (:mod:`.dp`) and exact LoRA aggregation (:mod:`.lora`).

FedAvg is ``(weighted_mean, scale(1))``; FedAdam ``(weighted_mean, chain(scale_by_adam,
scale(server_lr)))``; task arithmetic ``(sum, scale(lambda))``.

Example:
    >>> import torch
    >>> params = {"w": torch.zeros(2)}
    >>> deltas = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 3.0])}]
    >>> agg = WeightedMean()(deltas, weights=[3, 1])
    >>> agg.delta["w"].tolist()
    [0.75, 0.75]
    >>> tx = chain(scale_by_adam(b1=0.9, b2=0.99, eps=1e-3), scale(0.1))
    >>> state = tx.init(params)
    >>> step, state = tx.update(agg.delta, state, params)
    >>> apply_updates(params, step)["w"].shape
    torch.Size([2])
"""

from asymvlm.federated.core.aggregators import (
    AGGREGATORS,
    AggregateResult,
    Aggregator,
    ClippedMean,
    CoordinateMedian,
    Krum,
    Sum,
    TrimmedMean,
    WeightedMean,
    check_weights,
    client_norms,
)
from asymvlm.federated.core.dp import DifferentialPrivacy, DPCompositionError, check_dp_compatible, dp_epsilon
from asymvlm.federated.core.lora import EXACT_MODES, LORA_MODES, LoraAggregate, LoraLayers, aggregate_lora
from asymvlm.federated.core.server import LazyUpdate, Recipe, server_owned, server_update
from asymvlm.federated.core.transforms import (
    Transform,
    chain,
    flatten_state,
    identity,
    named_state,
    scale,
    scale_by_adagrad,
    scale_by_adam,
    scale_by_yogi,
    trace,
    unflatten_state,
)
from asymvlm.federated.core.tree import (
    ClientUpdateError,
    Params,
    ScaledView,
    apply_updates,
    check_delta,
    check_stacked,
    keys_of,
    stack_key,
    tree_add,
    tree_map,
    tree_norm,
    tree_scale,
    tree_sub,
    tree_zeros_like,
    validate_deltas,
)

__all__ = [
    "Params",
    "ClientUpdateError",
    "apply_updates",
    "tree_sub",
    "tree_add",
    "tree_scale",
    "tree_zeros_like",
    "tree_norm",
    "tree_map",
    "keys_of",
    "stack_key",
    "ScaledView",
    "check_delta",
    "check_stacked",
    "validate_deltas",
    "AggregateResult",
    "Aggregator",
    "WeightedMean",
    "Sum",
    "ClippedMean",
    "CoordinateMedian",
    "TrimmedMean",
    "Krum",
    "AGGREGATORS",
    "check_weights",
    "client_norms",
    "Transform",
    "chain",
    "named_state",
    "identity",
    "scale",
    "trace",
    "scale_by_adam",
    "scale_by_yogi",
    "scale_by_adagrad",
    "flatten_state",
    "unflatten_state",
    "Recipe",
    "server_update",
    "server_owned",
    "LazyUpdate",
    "DifferentialPrivacy",
    "DPCompositionError",
    "check_dp_compatible",
    "dp_epsilon",
    "LORA_MODES",
    "EXACT_MODES",
    "LoraAggregate",
    "LoraLayers",
    "aggregate_lora",
]
