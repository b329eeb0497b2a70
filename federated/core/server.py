"""One server step for every algorithm: :func:`server_update` turns deltas into a new model.

A :class:`Recipe` is an aggregator (stateless), a server transform (stateful through its returned
state) and, for federated clients, a ``client_config`` hook naming their local terms. A federated
algorithm is a recipe (FedAvg = weighted mean + ``scale(server_lr)``); so is a merge method (task arithmetic = sum +
``scale(lam)``, TIES = TIES + ``scale(lam)``). Federated rounds, the in-memory and streamed
merges and the lambda search all call :func:`server_update`; differential privacy is a wrapper
inside it (:mod:`asymvlm.federated.core.dp`), never a branch that replaces the recipe's rule.

Example (one FedAvg round with uniform weights and server_lr 1 is the model soup):
    >>> import torch
    >>> from asymvlm.federated.core import WeightedMean, scale
    >>> fedavg = Recipe("fedavg", "", WeightedMean("uniform"), scale(1.0))
    >>> params = {"w": torch.zeros(2)}
    >>> deltas = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 0.0])}]
    >>> new, state, info = server_update(fedavg, deltas, [5, 1], fedavg.server.init(params), params)
    >>> new["w"].tolist()
    [2.0, 1.0]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from asymvlm.federated.core.aggregators import AggregateResult, Aggregator, WeightedMean
from asymvlm.federated.core.dp import DifferentialPrivacy, check_dp_compatible
from asymvlm.federated.core.lora import LoraLayers, fold_linear, fold_message, with_dense_updates
from asymvlm.federated.core.transforms import Transform
from asymvlm.federated.core.tree import ClientUpdateError, Params

__all__ = ["Recipe", "server_update", "server_owned", "LazyUpdate"]


def _no_client_config(state: Any, params: Mapping[str, Tensor]) -> dict[str, Any]:
    """The client configuration of a recipe without client-side terms: none."""
    return {}


def _any_client_count(clients_per_round: int) -> None:
    """The feasibility check of a rule that works with any number of clients."""


@dataclass(frozen=True)
class Recipe:
    """A federated algorithm or a merge method: one registry entry's whole algorithm.

    Attributes:
        name, reference: registry name and paper.
        aggregator: combines the deltas (stateless).
        server: the server transform (its state is returned, never kept); a recipe with state of
            its own names it in a :func:`~asymvlm.federated.core.transforms.chain` and reads it
            with :func:`~asymvlm.federated.core.transforms.named_state`.
        options: the resolved declared options the recipe was built with (for reports).
        client_config: ``client_config(state, params) -> {term: {option: value}}``, what the
            clients of a round need (Flower's ``configure_fit`` pattern), from the server
            transform's ``state`` and the global ``params``: each key names a registered client
            term (:data:`asymvlm.federated.client.CLIENT_TERMS`; FedProx's ``proximal``, GHBM's
            ``heavy_ball``), its value that term's options (numbers, or ``{key: tensor}``).
        client_terms: the terms ``client_config`` may name (declared, so a run can refuse a
            transport that cannot carry them before the first round).
        check_clients: ``check_clients(clients_per_round)`` raises a
            :class:`~asymvlm.errors.ConfigError` when the rule cannot work with that many clients
            (Krum's n > 2f + 2); the round code calls it before any work.
        needs: per-client information the round must collect: ``loss_before`` (loss at the global
            model before local training), ``grad_norm`` (norm of the full local gradient there),
            ``loss_initial`` (the loss at the initial model, kept by the server).
        dp: the differential-privacy wrapper of the aggregation (None = off); see :meth:`with_dp`.
    """

    name: str
    reference: str
    aggregator: Aggregator
    server: Transform
    options: Mapping[str, Any] = field(default_factory=dict)
    client_config: Callable[[Any, Mapping[str, Tensor]], dict[str, Any]] = _no_client_config
    client_terms: frozenset[str] = field(default_factory=frozenset)
    check_clients: Callable[[int], None] = _any_client_count
    needs: frozenset[str] = field(default_factory=frozenset)
    dp: DifferentialPrivacy | None = None

    def with_dp(self, dp: DifferentialPrivacy | None, valid: Sequence[str] = ()) -> Recipe:
        """This recipe under ``dp`` (a :class:`~asymvlm.federated.core.dp.DPCompositionError`
        naming the ``valid`` recipes when its aggregator is not mean-type)."""
        if dp is not None:
            check_dp_compatible(self.aggregator, self.name, valid)
        return dataclasses.replace(self, dp=dp)


class LazyUpdate(Mapping):
    """``params + step`` computed key by key on access (a streamed merge writes it tensor by tensor)."""

    def __init__(self, params: Mapping[str, Tensor], step: Mapping[str, Tensor]):
        self.params, self.step = params, step

    def __getitem__(self, k: str) -> Tensor:
        v = self.params[k]
        return v + self.step[k].to(v.dtype) if k in self.step else v

    def __iter__(self) -> Iterator[str]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)


def server_owned(params: Mapping[str, Tensor], lora: LoraLayers | None = None) -> dict[str, Tensor]:
    """The parameters the server transform steps (its state is ``recipe.server.init`` of these):
    all of them, except in the exact LoRA modes the LoRA factors and base weights, which the
    aggregation sets directly."""
    if lora is None or not lora.exact:
        return dict(params)
    skip = lora.factor_keys | set(lora.base_keys)
    return {k: v for k, v in params.items() if k not in skip}


def _check_structure(params: Mapping[str, Tensor], deltas: Sequence[Mapping[str, Tensor]]) -> None:
    if not deltas:
        raise ClientUpdateError("no deltas to aggregate")
    keys = list(deltas[0].keys())
    for i, d in enumerate(deltas):
        if set(d.keys()) != set(keys):
            raise ClientUpdateError(f"update {i} has other keys than update 0", i)
    for k in keys:
        if k not in params:
            raise ClientUpdateError(f"{k!r} is updated but not part of the model", None, k)


def server_update(
    recipe: Recipe,
    deltas: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float] | None,
    state: Any,
    params: Mapping[str, Tensor],
    *,
    lora: LoraLayers | None = None,
    aggregated: AggregateResult | None = None,
    lazy: bool = False,
    round_index: int = 0,
    **client_info: Any,
) -> tuple[Mapping[str, Tensor], Any, dict[str, Any]]:
    """Turn deltas into a new model: aggregate (under DP if the recipe has it), step the server
    transform, apply; returns ``(new_params, new_state, info)``.

    Args:
        recipe: the algorithm or merge method.
        deltas: one mapping per client / task vector (``theta_new - theta_ref``), the same keys,
            a subset of ``params``' keys (keys no delta touches are kept).
        weights: per-delta weights (example counts), or None.
        state: the server transform's state (``recipe.server.init(params)`` the first time).
        params: the current model. With ``lora`` in an exact mode it also holds each adapted
            layer's frozen base weight under ``LoraLayers.base_key(layer)``.
        lora: the model's LoRA layers and aggregation mode (federated LoRA).
        aggregated: a precomputed aggregate of ``deltas`` (the lambda search reuses one).
        lazy: return ``new_params`` as a view computed key by key (streamed merges).
        round_index: the round (DP's insecure test stream is seeded by it).
        client_info: per-client information the aggregator needs (``loss_before``, ...).

    ``info`` holds the aggregator's diagnostics under ``"aggregator"``, LoRA diagnostics under
    ``"lora"`` and the DP parameters of the step under ``"dp"``.
    """
    if aggregated is None:
        _check_structure(params, deltas)
    info: dict[str, Any] = {}
    factor_keys = lora.factor_keys if lora is not None else set()
    exact = lora is not None and lora.exact
    linear_exact = exact and recipe.dp is None and type(recipe.aggregator) is WeightedMean
    folded: Params = {}

    if aggregated is not None:
        agg = aggregated
    elif exact and not linear_exact:
        # robust rules and DP act on each client's whole message, in Delta-W space
        messages = [with_dense_updates(params, d, lora) for d in deltas]
        agg = _aggregate(recipe, messages, weights, lora, round_index, client_info)
        folded, info["lora"] = fold_message(params, agg.delta, lora)
    else:
        head_deltas = [{k: v for k, v in d.items() if k not in factor_keys} for d in deltas] if exact else deltas
        agg = _aggregate(recipe, head_deltas, weights, lora, round_index, client_info)
        if linear_exact:
            raw = recipe.aggregator.effective_weights(weights, len(deltas))
            folded, info["lora"] = fold_linear(params, deltas, raw, lora)

    # the server transform steps the parameters it owns (in the exact modes: all but the LoRA layers)
    owned = server_owned(params, lora) if exact else params
    delta = {k: v for k, v in agg.delta.items() if k in owned}
    step, new_state = recipe.server.update(delta, state, owned, **agg.info)
    if lazy:
        new_params: Mapping[str, Tensor] = LazyUpdate(params, step)
    else:
        new_params = {k: (v + step[k].to(v.dtype)) if k in step else v.clone() for k, v in owned.items()}
        new_params = {k: new_params[k] if k in new_params else folded[k] for k in params}
    info["aggregator"] = agg.info
    if recipe.dp is not None:
        info["dp"] = recipe.dp.describe()
    return new_params, new_state, info


def _aggregate(
    recipe: Recipe,
    deltas: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float] | None,
    lora: LoraLayers | None,
    round_index: int,
    client_info: Mapping[str, Any],
) -> AggregateResult:
    if recipe.dp is not None:
        frozen = lora.frozen_keys if lora is not None else set()
        return recipe.dp.aggregate(deltas, frozen=frozen, round_index=round_index)
    return recipe.aggregator(deltas, weights, **client_info)
