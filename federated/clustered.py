"""Clustered federated learning: the server keeps several models, each client trains one.

A :class:`Clusterer` (entries of :data:`CLUSTERERS`, ``asymvlm-federate --cluster NAME``) decides
which cluster model a sampled client trains and when the clusters change; the rounds
(:mod:`asymvlm.federated.rounds`) hand each cluster's updates to the recipe's server step with
that cluster's own optimizer state. The cluster models, their optimizer states and the
memberships are the server state's ``extra`` (checkpointed with it, resumed bit-identically):

* ``ifca`` — IFCA (Ghosh et al. 2020, https://arxiv.org/abs/2006.04088, Algorithm 2, model
  averaging): ``clusters`` models, the first the run's initial model and the others fresh heads
  of other seeds; every sampled client estimates its cluster as the model with the lowest loss on
  its own data (the first ``loss_batches`` batches) and trains that one.
* ``cfl`` — CFL (Sattler et al. 2021, https://arxiv.org/abs/1910.01991, Algorithm 1): one
  cluster at first; when a cluster's averaged update is small (``||mean delta|| < eps1``: the
  joint model is near a stationary point) while some client's is large (``max ||delta|| > eps2``:
  it is not stationary for everyone), the cluster is split in two by the cosine similarities of
  its clients' updates, minimising the largest similarity across the cut (complete linkage, as
  in the authors' code). Needs every client every round (``client_fraction`` 1).

:func:`adjusted_rand_index` scores recovered memberships against planted groups.

Example:
    >>> adjusted_rand_index([0, 0, 1, 1], [1, 1, 0, 0]), round(adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]), 12)
    (1.0, -0.5)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from asymvlm.errors import ArtefactError, ConfigError
from asymvlm.federated import multitask  # noqa: F401  (registers fedem and mocha: CLUSTERERS is complete here)
from asymvlm.federated.client import ClientResult, server_inputs
from asymvlm.federated.cluster_base import CLUSTERERS, Clusterer, fresh_models, model_losses
from asymvlm.federated.core import Params, server_update
from asymvlm.registry import Param, at_least, non_negative

__all__ = ["IFCA", "CFL", "CLUSTERERS", "Clusterer", "ClusterRun", "adjusted_rand_index", "bipartition"]


def adjusted_rand_index(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Hubert & Arabie's adjusted Rand index of two labelings (1 = the same partition, about 0 = chance).
    Hand-written (scikit-learn is not a dependency) from the contingency-table formula; tested
    against a transcription of the pair-counting definition."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 1:
        raise ConfigError(f"labelings must be two 1-D sequences of one length, got {a.shape} and {b.shape}")
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    table = np.zeros((ia.max() + 1, ib.max() + 1), dtype=np.int64)
    np.add.at(table, (ia, ib), 1)

    def pairs(x: np.ndarray) -> float:
        return float((x * (x - 1) // 2).sum())

    index, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), pairs(np.array([len(a)]))
    expected = rows * cols / total if total else 0.0
    best = (rows + cols) / 2
    return 1.0 if best == expected else float((index - expected) / (best - expected))


def bipartition(similarity: np.ndarray) -> tuple[list[int], list[int]]:
    """The two groups of a complete-linkage clustering on ``1 - similarity`` cut at two clusters:
    CFL's split (the largest cross-group similarity is as small as the linkage finds)."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    n = similarity.shape[0]
    if n < 2:
        raise ConfigError("a bipartition needs at least two clients")
    dist = np.clip(1.0 - similarity, 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    labels = fcluster(linkage(squareform((dist + dist.T) / 2, checks=False), method="complete"), 2, "maxclust")
    return [i for i in range(n) if labels[i] == labels[0]], [i for i in range(n) if labels[i] != labels[0]]


@dataclass
class IFCA(Clusterer):
    """IFCA (see the module docstring)."""

    clusters: int = 2
    name: ClassVar[str] = "ifca"
    client_chooses: ClassVar[bool] = True

    def initial(self, run, params):
        return fresh_models(run, params, self.clusters)  # the paper's random initialisations

    def choose(self, run, extra, client, seed, batcher=None):
        batcher = batcher if batcher is not None else run.data.batchers[client]
        return int(np.argmin(model_losses(run, extra["models"], batcher, seed)))


@dataclass
class CFL(Clusterer):
    """CFL (see the module docstring)."""

    eps1: float = 0.4
    eps2: float = 1.6
    warmup: int = 5
    max_clusters: int = 8
    min_size: int = 2
    drift: float = 0.0
    name: ClassVar[str] = "cfl"

    def __post_init__(self) -> None:
        if self.drift > 0:  # the client compares every cluster model's loss: simulator only
            self.on_flower = False  # type: ignore[misc]

    def check(self, fed):
        if fed.sample_rate < 1:
            raise ConfigError("cluster 'cfl' needs every client every round: client_fraction 1 (clients_per_round 0)")

    def client_round(self, run, extra, client, rnd, client_config, slot=None):
        """CFL's round; with ``drift`` > 0 a client whose loss at its cluster model (at the round's
        start) rose by more than ``drift`` (relative) since its last round moves to the cluster
        model with the lowest loss on its data (logged under the round's ``cluster_event``)."""
        if self.drift > 0:
            from asymvlm.federated.seeds import int_seed

            seed = int_seed(run.fed.seed, "cluster", rnd, client)
            batcher = run.data.batchers[client if slot is None else slot]
            losses = model_losses(run, extra["models"], batcher, seed)
            j = int(extra["assign"].get(str(client), 0))
            seen = extra.setdefault("seen_loss", {})
            prev = seen.get(str(client))
            if prev is not None and losses[j] > prev * (1 + self.drift) and int(np.argmin(losses)) != j:
                new = int(np.argmin(losses))
                extra.setdefault("reassigned", []).append(
                    {"client": int(client), "from": j, "to": new, "loss": losses[j], "previous": prev}
                )
                extra["assign"][str(client)] = j = new
            seen[str(client)] = losses[j]
        return super().client_round(run, extra, client, rnd, client_config, slot)

    def regroup(self, extra, results, rnd):
        """Split at most one cluster this round; returns every updated cluster's update norms
        (``norms``: ``[||mean delta||, max ||delta||]``) and the split, if any."""
        report: dict[str, Any] = {"norms": {}}
        if extra.get("reassigned"):
            report["reassigned"] = extra.pop("reassigned")
        for j in sorted({r.group for r in results}):
            mine = [r for r in results if r.group == j]
            flat = torch.stack([torch.cat([v.double().reshape(-1) for v in r.delta.values()]) for r in mine])
            w = torch.tensor([max(1, r.num_examples) for r in mine], dtype=torch.float64)
            mean_norm = float(torch.linalg.vector_norm((w / w.sum()) @ flat))
            max_norm = float(torch.linalg.vector_norm(flat, dim=1).max())
            report["norms"][str(j)] = [mean_norm, max_norm]
            stalled = mean_norm < self.eps1 and max_norm > self.eps2
            if "split" in report or not stalled or rnd + 1 < self.warmup or len(mine) < 2 * self.min_size:
                continue
            if len(extra["models"]) >= self.max_clusters:
                continue
            unit = flat / torch.linalg.vector_norm(flat, dim=1, keepdim=True).clamp_min(1e-30)
            first, second = bipartition((unit @ unit.T).numpy())
            if min(len(first), len(second)) < self.min_size:
                continue
            new = len(extra["models"])
            extra["models"].append({k: v.clone() for k, v in extra["models"][j].items()})
            extra["opt"].append(copy.deepcopy(extra["opt"][j]))
            for i in second:
                extra["assign"][str(mine[i].client)] = new
                mine[i].group = new
            report["split"] = {"cluster": j, "into": [j, new], "moved": sorted(int(mine[i].client) for i in second)}
        return report


CLUSTERERS.register(
    "ifca",
    params=[Param("clusters", int, 2, "Cluster models k.", check=at_least(1))],
    help="IFCA: k models; each client trains the one with the lowest loss on its data.",
    reference="https://arxiv.org/abs/2006.04088",
)(IFCA)
CLUSTERERS.register(
    "cfl",
    params=[
        Param("eps1", float, 0.4, "Split when the cluster's mean update norm is below this ...", check=non_negative),
        Param("eps2", float, 1.6, "... and its largest client update norm above this.", check=non_negative),
        Param("warmup", int, 5, "Rounds before the first split.", check=at_least(1)),
        Param("max_clusters", int, 8, "Most clusters.", check=at_least(1)),
        Param("min_size", int, 2, "Fewest clients on each side of a split.", check=at_least(1)),
        Param(
            "drift",
            float,
            0.0,
            "Re-assign a client whose loss jumps by this much (relative; 0 = off).",
            check=non_negative,
        ),
    ],
    help="CFL: split a cluster by the cosines of its clients' updates when it stalls for some.",
    reference="https://arxiv.org/abs/1910.01991",
)(CFL)


@dataclass
class ClusterRun:
    """The rounds' clustered side: train each client on its cluster's model, step each cluster."""

    clusterer: Clusterer

    @classmethod
    def build(cls, fed: Any) -> ClusterRun:
        clusterer = CLUSTERERS.build(fed.cluster, **fed.cluster_kwargs())
        clusterer.check(fed)
        if fed.trainable != "head" and fed.lora_mode != "factors":
            raise ConfigError(
                "clustered FL keeps one model per cluster: federated LoRA needs lora_mode factors, "
                f"got {fed.lora_mode!r}"
            )
        if hasattr(clusterer, "store"):  # FedEM's mixture weights: client-side state
            from pathlib import Path

            from asymvlm.federated.personal_store import ClientStates

            clusterer.store = ClientStates(Path(fed.output_dir) / "clients")
        return cls(clusterer)

    def init_extra(self, run: Any, params: Params, opt_init: Any) -> dict[str, Any]:
        return self.clusterer.initial_extra(run, params, opt_init)

    def check(self, extra: Any, params: Params, where: Any) -> None:
        """A resumed state's clusters: models with the live model's keys and shapes, one optimizer
        state per model, memberships naming existing clusters."""
        ok = isinstance(extra, dict) and {"models", "opt", "assign"} <= set(extra)
        ok = ok and isinstance(extra["models"], list) and len(extra["opt"]) == len(extra["models"]) > 0
        if not ok:
            raise ArtefactError(f"{where}: the clustered run's server state (extra) is missing or malformed")
        for j, m in enumerate(extra["models"]):
            if not isinstance(m, dict) or set(m) != set(params) or any(m[k].shape != params[k].shape for k in m):
                raise ArtefactError(f"{where}: cluster model {j} does not match the live model's parameters")
        if any(not (isinstance(v, int) and 0 <= v < len(extra["models"])) for v in extra["assign"].values()):
            raise ArtefactError(f"{where}: a cluster membership names no cluster")

    def train(self, run: Any, state: Any, active: list[int], rnd: int, client_config: Any) -> list[ClientResult]:
        """Every active client's uploads (one per server model it updates)."""
        return [r for c in active for r in self.clusterer.client_round(run, state.extra, c, rnd, client_config)]

    def server_step(self, run: Any, state: Any, results: list[ClientResult], rnd: int, record: dict) -> Any:
        """Each cluster's updates through the recipe's server step with its own optimizer state;
        ``state.params`` becomes the model of the largest cluster (what is saved and globally evaluated)."""
        import dataclasses

        extra = {**state.extra, "models": list(state.extra["models"]), "opt": list(state.extra["opt"]),
                 "assign": dict(state.extra["assign"])}  # fmt: skip
        event = self.clusterer.regroup(extra, results, rnd)
        if event is not None:
            record["cluster_event"] = event
        info_all = {}
        for j in sorted({r.group for r in results}):
            mine = [r for r in results if r.group == j]
            kw = server_inputs(run.recipe.needs, mine, state.initial_losses)
            new, opt, info = server_update(
                run.recipe, [r.delta for r in mine], [max(1, r.num_examples) for r in mine], extra["opt"][j],
                extra["models"][j], round_index=rnd, **kw,
            )  # fmt: skip
            extra["models"][j], extra["opt"][j] = dict(new), opt
            info_all[str(j)] = len(mine)
        self.clusterer.after_step(run, extra, rnd)
        sizes = [sum(1 for v in extra["assign"].values() if v == j) for j in range(len(extra["models"]))]
        record["clusters"] = {"count": len(extra["models"]), "sizes": sizes, "updated": info_all,
                              "assign": dict(sorted(extra["assign"].items(), key=lambda kv: int(kv[0])))}  # fmt: skip
        params = self.clusterer.representative(extra, sizes)
        return dataclasses.replace(
            state, round=rnd, params=params, extra=extra, skipped_rounds=list(state.skipped_rounds)
        )

    def evaluate(self, run: Any, state: Any, evaluate_client: Any, rnd: int) -> dict[str, Any]:
        from asymvlm.federated.personal_run import client_summary

        per = {str(c): evaluate_client(c, self.clusterer.client_encoder(run, state.extra, c, rnd))
               for c in range(run.fed.num_clients)}  # fmt: skip
        run.model.set_params(state.params)
        return {"client_metrics": {"cluster": per}, "client_eval": {"cluster": client_summary(per)}}
