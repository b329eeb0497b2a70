"""Federated multi-task learning: several server models, every client a task of its own.

Two entries of :data:`~asymvlm.federated.clustered.CLUSTERERS` (``asymvlm-federate --cluster``),
built on the clustered rounds (each server model stepped by the recipe with its own optimizer
state, checkpointed in the server state's ``extra``), in the simulator and over Flower (a FedEM
node receives every component and replies with one update per component, ``arrays-<m>``; a MOCHA
node receives its own model and the relationship term the server computed):

* ``fedem`` — FedEM (Marfoq et al. 2021, https://arxiv.org/abs/2108.10252, Algorithm 1): ``M``
  shared components; each client keeps its mixture weights ``pi_k`` (client-side state, never
  uploaded). A round's E-step weighs each of its captions by the components' likelihood of its
  image, ``q_im ~ pi_km p_m(x_i | t_i)`` (the head's own vMF / Power Spherical density), sets
  ``pi_k = mean_i q_i``, and the M-step trains every component on batches drawn with probability
  ``q_im`` (a stochastic form of the weighted objective ``sum_i q_im loss_i``); the client uploads
  one update per component, averaged per component by the server. A client's model is the
  mixture: images ranked by ``log sum_m pi_km p_m(x | t)``, uncertainty ``1 / sum_m pi_km kappa_m(t)``.
* ``mocha`` — a MOCHA-style relationship-regularised objective (Smith et al. 2017,
  https://arxiv.org/abs/1705.10467): one model ``w_k`` per client and
  ``sum_k F_k(w_k) + lam tr(W Omega^-1 W^T)``; every local step adds the regulariser's gradient
  (client term ``relationship``), and after each round the server re-estimates the task
  covariance in closed form, ``Omega = (W^T W)^(1/2) / tr((W^T W)^(1/2))`` (Zhang & Yeung 2010),
  with ``eps`` (relative to the mean squared model norm) added to the Gram's eigenvalues; a run
  whose step on the regulariser could diverge (``local_lr x 2 lam x K / sqrt(eps) >= 2``: the
  bound on the curvature) is refused. The saved model is the mean of the task models.
  Unlike the personalised methods, every client's model is at the server (MOCHA's design).

Example:
    >>> w = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)  # two tasks' models (rows)
    >>> task_covariance(w, eps=0.0)
    tensor([[0.3333, 0.0000],
            [0.0000, 0.6667]], dtype=torch.float64)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from asymvlm.errors import ConfigError
from asymvlm.federated.client import client_update, update_needs
from asymvlm.federated.cluster_base import CLUSTERERS, Clusterer, fresh_models
from asymvlm.federated.core import Params
from asymvlm.registry import Param, at_least, non_negative, positive

__all__ = ["FedEM", "MOCHA", "WeightedBatches", "task_covariance", "responsibilities"]


class WeightedBatches:
    """An :class:`~asymvlm.batching.IndexBatcher`'s data with batches drawn with replacement,
    caption ``i`` with probability proportional to ``weights[i]`` (seeded per batch index)."""

    def __init__(self, batcher: Any, weights: Tensor, seed: int):
        self.base, self.weights, self.seed = batcher, weights.double().clamp_min(0), int(seed)
        if not float(self.weights.sum()) > 0:
            self.weights = torch.ones_like(self.weights)
        self.batch_size = batcher.batch_size
        self.num_batches = batcher.num_batches

    def reseed(self, seed: int) -> None:
        self.seed = int(seed)

    def batch(self, i: int) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        rows = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=g)
        b = self.base
        ids = b.owner[rows]
        text = {k: v[rows] for k, v in b.text.items()} if isinstance(b.text, dict) else b.text[rows]
        return {"text": text, "images": b.images[ids], "ids": ids, "positives": b.positives(rows)}


@torch.no_grad()
def responsibilities(model: Any, components: list[Params], pi: Tensor, batcher: Any, chunk: int = 512) -> Tensor:
    """FedEM's E-step over every caption of ``batcher``: ``(T, M)`` with rows
    ``softmax_m(log pi_m + log p_m(x_i | t_i))``."""
    logp = []
    was = model.training
    model.eval()
    rows_all = torch.arange(batcher.num_texts)
    for params in components:
        model.set_params(params)
        parts = []
        for s in range(0, len(rows_all), chunk):
            rows = rows_all[s : s + chunk]
            text = (
                {k: v[rows] for k, v in batcher.text.items()} if isinstance(batcher.text, dict) else batcher.text[rows]
            )
            q = model.head(model.embed_text(text))
            parts.append(q.log_prob(batcher.images[batcher.owner[rows]].to(q.loc.dtype)).double())
        logp.append(torch.cat(parts))
    model.train(was)
    return torch.softmax(torch.log(pi.double()).unsqueeze(0) + torch.stack(logp, dim=1), dim=1)


def task_covariance(w: Tensor, eps: float = 1e-2) -> Tensor:
    """``Omega = (G + e I)^(1/2) / tr(...)`` with ``G = W^T W`` the Gram of the tasks' flattened
    models (the rows of ``w``, ``(K, d)``), float64, and ``e = eps tr(G) / K``: ``eps`` relative to
    the mean squared model norm, so the ridge does not depend on the models' scale. It bounds the
    largest eigenvalue of ``Omega^-1`` by ``K / sqrt(eps)``: tasks that are nearly the same (a Gram
    of rank one) would otherwise make the relationship term's curvature explode."""
    gram = w.double() @ w.double().T
    ridge = eps * float(torch.trace(gram)) / gram.shape[0]
    s, v = torch.linalg.eigh(gram)
    root = (v * torch.sqrt(s.clamp_min(0) + ridge)) @ v.T
    return root / torch.trace(root)


def _flat(params: Mapping[str, Tensor], keys: list[str]) -> Tensor:
    return torch.cat([params[k].double().reshape(-1) for k in keys])


@dataclass
class FedEM(Clusterer):
    """FedEM (see the module docstring)."""

    components: int = 3
    name: ClassVar[str] = "fedem"
    store: Any = field(default=None, repr=False)  # the clients' ClientStates (their mixture weights)
    client_chooses: ClassVar[bool] = True  # it receives every component (and trains them all)

    def initial(self, run, params):
        return fresh_models(run, params, self.components)  # distinct initialisations, as IFCA's

    def _pi(self, client: int, rnd: int) -> Tensor:
        saved = self.store.load(client, upto=rnd) if self.store is not None else None
        return saved["pi"] if saved is not None else torch.full((self.components,), 1.0 / self.components)

    def client_round(self, run, extra, client, rnd, client_config, slot=None):
        from asymvlm.federated.seeds import int_seed

        at = client if slot is None else slot
        batcher = run.data.batchers[at]
        q = responsibilities(run.model, extra["models"], self._pi(client, rnd), batcher)
        if self.store is not None:
            self.store.save(client, rnd + 1, {"pi": q.mean(0).float()})
        extra["assign"][str(client)] = int(q.mean(0).argmax())
        needs = run.recipe.needs
        out = []
        for m, params in enumerate(extra["models"]):
            seed = int_seed(run.fed.seed, "client", rnd, client, m)
            res = client_update(
                run.model, params, WeightedBatches(batcher, q[:, m], seed), run.options, client=client,
                num_examples=run.data.num_examples[at], seed=seed, client_config=client_config,
                **update_needs(needs),
            )  # fmt: skip
            res.group = m
            out.append(res)
        return out

    def representative(self, extra, sizes):
        return dict(extra["models"][0])

    def client_encoder(self, run, extra, client, rnd, batcher=None):
        from asymvlm.federated.personal import encode_with
        from asymvlm.losses import log_likelihood

        pi = self._pi(client, rnd + 1)
        encoders = [encode_with(run.model, p, distribution=True) for p in extra["models"]]

        def encode(text: Any) -> tuple[Tensor, Tensor, Any]:
            dists = [e(text) for e in encoders]
            kappa = sum(float(pi[m]) * d.concentration.float() for m, d in enumerate(dists))
            best = int(pi.argmax())

            def scores(images: Tensor) -> Tensor:
                per = [torch.log(pi[m].double()) + log_likelihood(d, images.to(d.loc.dtype)).double()
                       for m, d in enumerate(dists)]  # fmt: skip
                return torch.logsumexp(torch.stack(per), dim=0)

            return dists[best].loc.float(), kappa, scores

        return encode


@dataclass
class MOCHA(Clusterer):
    """MOCHA-style multi-task learning (see the module docstring)."""

    lam: float = 1e-3
    eps: float = 1e-2
    name: ClassVar[str] = "mocha"

    def check(self, fed):
        bound = fed.local_lr * 2 * self.lam * fed.num_clients / self.eps**0.5  # step x the curvature bound
        if not bound < 2:
            raise ConfigError(
                f"mocha: local_lr x 2 lam x K / sqrt(eps) = {bound:g} must be < 2 (the relationship term's steps "
                "could diverge); lower lam or raise eps"
            )

    def initial(self, run, params):
        return [{k: v.clone() for k, v in params.items()} for _ in range(run.fed.num_clients)]

    def initial_extra(self, run, params, opt_init):
        extra = super().initial_extra(run, params, opt_init)
        k = run.fed.num_clients
        extra["omega"] = torch.eye(k, dtype=torch.float64) / k  # independent tasks until re-estimated
        extra["assign"] = {str(c): c for c in range(k)}
        return extra

    def choose(self, run, extra, client, seed, batcher=None):
        return int(extra["assign"].get(str(client), client))  # task k's model (a Flower node holds only its own)

    def client_config(self, extra, client, client_config):
        """The recipe's terms and the relationship term of task ``client`` (the server computes it)."""
        if "relationship" in (client_config or {}):  # already computed (a Flower node receives it)
            return client_config
        inv = torch.linalg.inv(extra["omega"])
        models = extra["models"]
        others = {
            k: sum(float(inv[client, j]) * models[j][k].double() for j in range(len(models)) if j != client).float()
            for k in models[client]
        }
        term = {"relationship": {"lam": self.lam, "self_weight": float(inv[client, client]), "others": others}}
        return {**(client_config or {}), **term}

    def after_step(self, run, extra, rnd):
        keys = run.model.trained_names()
        w = torch.stack([_flat(m, keys) for m in extra["models"]])
        extra["omega"] = task_covariance(w, self.eps)

    def representative(self, extra, sizes):
        models = extra["models"]
        return {k: torch.stack([m[k] for m in models]).mean(0) for k in models[0]}


CLUSTERERS.register(
    "fedem",
    params=[Param("components", int, 3, "Mixture components M.", check=at_least(1))],
    help="FedEM (multi-task): M shared components, per-client mixture weights by EM.",
    reference="https://arxiv.org/abs/2108.10252",
)(lambda components: FedEM(components=components))
CLUSTERERS.register(
    "mocha",
    params=[
        Param("lam", float, 1e-3, "Strength of the task-relationship term lam.", check=non_negative),
        Param(
            "eps",
            float,
            1e-2,
            "Ridge on the Gram when Omega is re-estimated (relative to the mean squared norm).",
            check=positive,
        ),
    ],
    help="MOCHA-style multi-task: a model per client, lam tr(W Omega^-1 W^T), Omega re-estimated each round.",
    reference="https://arxiv.org/abs/1705.10467",
)(lambda lam, eps: MOCHA(lam=lam, eps=eps))
