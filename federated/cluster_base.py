"""What every clustered or multi-task method is: the :class:`Clusterer` base and the registry.

:data:`CLUSTERERS` holds the methods of ``asymvlm-federate --cluster``: the clustered ones
(:mod:`asymvlm.federated.clustered`: ``ifca``, ``cfl``) and the multi-task ones
(:mod:`asymvlm.federated.multitask`: ``fedem``, ``mocha``), each registered by its module; import
:mod:`asymvlm.federated.clustered` (it imports the multi-task module) for the complete registry.

Example:
    >>> Clusterer().choose(None, {"assign": {"3": 1}}, 3, seed=0)
    1
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from asymvlm.federated.client import ClientResult, client_update, update_needs
from asymvlm.federated.core import Params
from asymvlm.registry import Registry

__all__ = ["Clusterer", "CLUSTERERS", "fresh_models", "model_losses"]

CLUSTERERS = Registry("clustering method")


def model_losses(run: Any, models: Sequence[Params], batcher: Any, seed: int) -> list[float]:
    """Every model's loss on a client's data: the mean over its first ``loss_batches`` batches of
    the batch order ``seed`` (the same batches for every model)."""
    from asymvlm.federated.client import client_loss

    losses = []
    for params in models:
        run.model.set_params(params)
        batcher.reseed(seed)
        losses.append(client_loss(run.model, batcher, run.options.loss_batches)[0])
    return losses


def fresh_models(run: Any, params: Params, count: int) -> list[Params]:
    """``count`` server models: ``params`` and ``count - 1`` copies whose head is a fresh
    initialisation of another seed (seeded by the run's seed; every other parameter copied)."""
    from asymvlm.heads import TextHead

    out = [dict(params)]
    for j in range(1, count):
        torch.manual_seed(int(run.fed.seed) * 7919 + j)
        head = TextHead(config=run.model.head.config, validate=False)
        fresh = {f"head.{k}": v.detach().clone() for k, v in head.state_dict().items()}
        out.append({k: fresh.get(k, v).clone() for k, v in params.items()})
    return out


class Clusterer:
    """Which cluster model a client trains, and when clusters change (base: never)."""

    name: ClassVar[str] = "clusterer"
    #: whether the Flower ServerApp runs it (CFL with drift re-clustering: simulator only)
    on_flower: ClassVar[bool] = True

    def check(self, fed: Any) -> None:
        """Refuse a run this method cannot do (a :class:`~asymvlm.errors.ConfigError`); base: none."""

    def initial(self, run: Any, params: Params) -> list[Params]:
        return [dict(params)]

    def initial_extra(self, run: Any, params: Params, opt_init: Any) -> dict[str, Any]:
        """The server state's ``extra`` at round 0: the models, an optimizer state each, memberships."""
        models = self.initial(run, params)
        return {"models": models, "opt": [copy.deepcopy(opt_init) for _ in models], "assign": {}}

    #: whether the client chooses its cluster (it then receives every cluster model)
    client_chooses: ClassVar[bool] = False

    def choose(self, run: Any, extra: Mapping[str, Any], client: int, seed: int, batcher: Any = None) -> int:
        """The cluster client ``client`` trains (``batcher``: its data, default ``run.data``'s)."""
        return int(extra["assign"].get(str(client), 0))

    def regroup(self, extra: dict[str, Any], results: list[ClientResult], rnd: int) -> dict[str, Any] | None:
        return None

    def client_round(
        self, run: Any, extra: dict[str, Any], client: int, rnd: int, client_config: Any, slot: int | None = None
    ) -> list:
        """Client ``client``'s round ``rnd``: the updates it uploads, each a
        :class:`~asymvlm.federated.client.ClientResult` whose ``group`` names the server model it
        updates (base: one update of the cluster :meth:`choose` picks). Its data are ``run.data``'s
        entry ``slot`` (default ``client``; a Flower node holds one client, at 0)."""
        from asymvlm.federated.seeds import int_seed

        needs, at = run.recipe.needs, client if slot is None else slot
        batcher = run.data.batchers[at]
        j = self.choose(run, extra, client, int_seed(run.fed.seed, "cluster", rnd, client), batcher=batcher)
        extra["assign"][str(client)] = j
        seed = int_seed(run.fed.seed, "client", rnd, client)
        batcher.reseed(seed)
        terms = self.client_config(extra, client, client_config)
        res = client_update(
            run.model, extra["models"][j], batcher, run.options, client=client,
            num_examples=run.data.num_examples[at], seed=seed, client_config=terms,
            **update_needs(needs),
        )  # fmt: skip
        res.group = j
        return [res]

    def client_config(self, extra: Mapping[str, Any], client: int, client_config: Any) -> Any:
        """The client-side terms client ``client`` trains with: the recipe's (MOCHA adds its own)."""
        return client_config

    def message(self, extra: Mapping[str, Any], client: int) -> tuple[dict[str, Params], dict[str, Any]]:
        """What a Flower train message carries for client ``client`` besides the recipe's: named
        parameter sets and config numbers. Base: the client's cluster model as ``arrays`` (it does
        not choose), or every model as ``cluster-<j>`` with their count (it chooses)."""
        models = extra["models"]
        if self.client_chooses:
            return {f"cluster-{j}": m for j, m in enumerate(models)}, {"asymvlm.clusters": len(models)}
        return {"arrays": models[int(extra["assign"].get(str(client), 0))]}, {}

    def after_step(self, run: Any, extra: dict[str, Any], rnd: int) -> None:
        """After the round's server steps (MOCHA re-estimates its task relationships here)."""

    def representative(self, extra: Mapping[str, Any], sizes: Sequence[int]) -> Params:
        """The one model the run saves and evaluates globally: the largest cluster's."""
        return dict(extra["models"][int(np.argmax(sizes)) if any(sizes) else 0])

    def client_encoder(self, run: Any, extra: Mapping[str, Any], client: int, rnd: int, batcher: Any = None) -> Any:
        """``encode(text)`` of client ``client``'s model for per-client evaluation: its cluster's
        (re-estimated on its own data now, ``batcher``, for a client that chooses)."""
        from asymvlm.federated.personal import encode_with
        from asymvlm.federated.seeds import int_seed

        j = self.choose(run, extra, client, int_seed(run.fed.seed, "cluster_eval", rnd, client), batcher=batcher)
        return encode_with(run.model, extra["models"][j])
