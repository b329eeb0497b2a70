"""Named federated algorithms: an aggregator, a server transform and client-side options.

Every recipe is built on :mod:`asymvlm.federated.core`; the fairness-aware and momentum methods need
per-client information (loss at the global model, gradient norm, ...) which the round loop
collects when ``Recipe.needs`` asks for it.

=================  =================================================================  =====
name               what                                                               ref
=================  =================================================================  =====
``fedavg``         weighted mean, server step 1                                       [1]
``fedavgm``        weighted mean, server momentum                                     [2]
``fedprox``        weighted mean; clients add ``mu/2 ||w - w_global||^2``             [3]
``fedadam``        weighted mean, Adam on the pseudo-gradient                         [4]
``fedyogi``        weighted mean, Yogi                                                [4]
``fedadagrad``     weighted mean, Adagrad                                             [4]
``adafedadam``     normalised, fairness-weighted updates; Adam with certainty         [5]
``qffl``           q-fair aggregation from the losses at the global model             [6]
``ghbm``           weighted mean; clients add generalised heavy-ball momentum         [7]
``fedmedian``      coordinate-wise median                                             [8]
``fedtrimmedavg``  coordinate-wise trimmed mean                                       [8]
``krum``           (multi-)Krum                                                       [9]
=================  =================================================================  =====

[1] McMahan et al. 2017 https://arxiv.org/abs/1602.05629  [2] Hsu et al. 2019
https://arxiv.org/abs/1909.06335  [3] Li et al. 2020 https://arxiv.org/abs/1812.06127
[4] Reddi et al. 2021 https://arxiv.org/abs/2003.00295  [5] Ju et al. 2024
https://arxiv.org/abs/2301.09357  [6] Li et al. 2020 https://arxiv.org/abs/1905.10497
[7] Zaccone et al. 2024 https://arxiv.org/abs/2311.18578  [8] Yin et al. 2018
https://arxiv.org/abs/1803.01498  [9] Blanchard et al. 2017 https://arxiv.org/abs/1703.02757

Example:
    >>> r = make_recipe("fedadam", server_lr=0.1)
    >>> r.name, type(r.aggregator).__name__
    ('fedadam', 'WeightedMean')
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from asymvlm.federated.core import (
    AggregateResult,
    Aggregator,
    CoordinateMedian,
    Krum,
    Params,
    Sum,
    Transform,
    TrimmedMean,
    WeightedMean,
    _keys,
    _weights,
    chain,
    scale,
    scale_by_adagrad,
    scale_by_adam,
    scale_by_yogi,
    trace,
    tree_norm,
    tree_zeros_like,
)
from torch import Tensor

__all__ = [
    "Recipe",
    "RECIPES",
    "make_recipe",
    "AdaFedAdamAggregate",
    "adafedadam_adam",
    "QFFLAggregate",
    "ghbm_history",
    "ghbm_momentum",
]


@dataclass(frozen=True)
class Recipe:
    """A federated algorithm.

    Attributes:
        name, reference: registry name and paper.
        aggregator: combines client deltas (stateless).
        server: the server transform (stateful through its returned state).
        proximal_mu: FedProx's client proximal coefficient (0 = off).
        ghbm_beta, ghbm_tau: GHBM's client momentum (beta = 0 = off).
        needs: per-client information the round must collect: ``loss_before`` (loss at the global
            model before local training), ``grad_norm`` (norm of the full local gradient there),
            ``loss_initial`` (the loss at the initial model, kept by the server).
    """

    name: str
    reference: str
    aggregator: Aggregator
    server: Transform
    proximal_mu: float = 0.0
    ghbm_beta: float = 0.0
    ghbm_tau: int = 1
    needs: frozenset[str] = field(default_factory=frozenset)


# ----------------------------------------------------------------------------------------------
# AdaFedAdam
# ----------------------------------------------------------------------------------------------
@dataclass
class AdaFedAdamAggregate(Aggregator):
    """AdaFedAdam's aggregation (Ju et al. 2024, https://arxiv.org/abs/2301.09357).

    With ``delta_k = theta_k - theta_t`` and ``g_k`` the client's full gradient at ``theta_t``:
    effective learning rate ``eta'_k = ||delta_k|| / ||g_k||``, normalised update
    ``U_k = delta_k / eta'_k`` (the size of a gradient, the direction of the local progress),
    certainty ``C_k = ln(eta'_k / eta_l) + 1``, fairness weights
    ``w_k ∝ (n_k / N) (F_k(theta_t) / F_k(theta_0))^alpha``; the result is ``sum_k w_k U_k`` with
    ``info["certainty"] = sum_k w_k C_k`` for :func:`adafedadam_adam`.

    (The reference implementation uses ``w_k ∝ n_k F_k(theta_t)``, i.e. alpha = 1 without the
    division by the initial loss; pass ``alpha=1, use_initial_loss=False`` for that.)
    """

    local_lr: float = 0.1
    alpha: float = 1.0
    use_initial_loss: bool = True
    reference = "https://arxiv.org/abs/2301.09357"

    def __call__(self, deltas, weights=None, *, loss_before=None, grad_norm=None, loss_initial=None, **_):
        k = len(deltas)
        if loss_before is None or grad_norm is None:
            raise ValueError("adafedadam needs loss_before and grad_norm of every client")
        n = _weights(weights, k)
        norms = [tree_norm({key: d[key] for key in _keys(deltas)}) for d in deltas]
        eff = [dn / max(gn, 1e-30) for dn, gn in zip(norms, grad_norm)]
        certainty = [math.log(max(e, 1e-30) / self.local_lr) + 1.0 for e in eff]
        base = [
            (loss / loss0) if (self.use_initial_loss and loss_initial) else loss
            for loss, loss0 in zip(loss_before, loss_initial or [1.0] * k)
        ]
        raw = [nk * max(b, 0.0) ** self.alpha for nk, b in zip(n, base)]
        if sum(raw) <= 0:
            raw = list(n)
        w = [x / sum(raw) for x in raw]
        coef = [wk / max(e, 1e-30) for wk, e in zip(w, eff)]  # w_k U_k = (w_k / eta'_k) delta_k
        delta = Sum()(deltas, coef).delta
        return AggregateResult(
            delta,
            {
                "certainty": sum(wk * ck for wk, ck in zip(w, certainty)),
                "fairness_weights": w,
                "effective_lr": eff,
                "client_certainty": certainty,
            },
        )


def adafedadam_adam(lr: float = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Transform:
    """AdaFedAdam's server Adam: ``b1^C``, ``b2^C`` with the round's certainty C, bias correction
    by the accumulated products of those betas, step ``C * lr`` (Ju et al. 2024)."""

    def init(params):
        return {"m": tree_zeros_like(params), "v": tree_zeros_like(params), "c1": 1.0, "c2": 1.0}

    def update(delta, state, params=None, certainty: float = 1.0, **_):
        c = float(certainty)
        beta1, beta2 = b1**c, b2**c
        m = {k: beta1 * state["m"][k] + (1 - beta1) * delta[k] for k in delta}
        v = {k: beta2 * state["v"][k] + (1 - beta2) * delta[k] * delta[k] for k in delta}
        c1, c2 = state["c1"] * beta1, state["c2"] * beta2
        step = {k: (c * lr) * (m[k] / (1 - c1)) / ((v[k] / (1 - c2)).sqrt() + eps) for k in delta}
        return step, {"m": m, "v": v, "c1": c1, "c2": c2}

    return Transform(init, update)


# ----------------------------------------------------------------------------------------------
# q-FFL
# ----------------------------------------------------------------------------------------------
@dataclass
class QFFLAggregate(Aggregator):
    """q-FedAvg (Li et al. 2020, https://arxiv.org/abs/1905.10497, Algorithm 3), as a delta to add.

    With ``L = 1 / local_lr``, ``F_k`` the loss at the global model (plus 1e-10) and
    ``Delta w_k = L (w_t - w_k) = -L delta_k``: ``Delta_k = F_k^q Delta w_k``,
    ``h_k = q F_k^(q-1) ||Delta w_k||^2 + L F_k^q`` and ``w_{t+1} = w_t - sum Delta_k / sum h_k``,
    i.e. the returned delta is ``L sum_k F_k^q delta_k / sum_k h_k``. q = 0 is FedAvg with uniform
    weights. (Flower's QFedAvg uses one server-side loss F for every client: pass equal losses.)
    """

    q: float = 0.2
    local_lr: float = 0.1
    reference = "https://arxiv.org/abs/1905.10497"

    def __call__(self, deltas, weights=None, *, loss_before=None, **_):
        if loss_before is None:
            raise ValueError("qffl needs loss_before (the loss at the global model) of every client")
        big_l = 1.0 / self.local_lr
        f = [float(x) + 1e-10 for x in loss_before]
        norms = [tree_norm({key: d[key] for key in _keys(deltas)}) for d in deltas]
        h = [self.q * fk ** (self.q - 1) * (big_l * nk) ** 2 + big_l * fk**self.q for fk, nk in zip(f, norms)]
        coef = [big_l * fk**self.q / sum(h) for fk in f]
        return AggregateResult(Sum()(deltas, coef).delta, {"h": h})


# ----------------------------------------------------------------------------------------------
# GHBM
# ----------------------------------------------------------------------------------------------
def ghbm_history(tau: int) -> Transform:
    """Keeps the last ``tau`` global models (GHBM's server state) and passes the delta through."""
    if tau < 1:
        raise ValueError(f"tau must be >= 1, got {tau}")

    def init(params):
        return {"history": []}

    def update(delta, state, params=None, **_):
        history = list(state["history"]) + [{k: v.detach().clone() for k, v in params.items()}]
        return dict(delta), {"history": history[-tau:]}

    return Transform(init, update)


def ghbm_momentum(history: Sequence[Mapping[str, Tensor]], params: Mapping[str, Tensor], tau: int) -> Params | None:
    """``m_t = (theta_{t-tau} - theta_t) / tau``, sent to clients; None until tau models exist
    (Zaccone et al. 2024). ``history`` holds the models before each past server step, oldest first."""
    if len(history) < tau:
        return None
    oldest = history[-tau]
    return {k: (oldest[k] - params[k]) / tau for k in params}


def _find_ghbm_state(state: Any) -> dict | None:
    if isinstance(state, dict) and "history" in state:
        return state
    if isinstance(state, (tuple, list)):
        for s in state:
            found = _find_ghbm_state(s)
            if found is not None:
                return found
    return None


# ----------------------------------------------------------------------------------------------
# the registry
# ----------------------------------------------------------------------------------------------
def _fedopt(direction: Transform, server_lr: float) -> Transform:
    return chain(direction, scale(server_lr))


RECIPES: dict[str, tuple[str, Callable[..., Recipe]]] = {}


def _register(name: str, reference: str):
    def deco(fn):
        RECIPES[name] = (reference, fn)
        return fn

    return deco


@_register("fedavg", "https://arxiv.org/abs/1602.05629")
def _fedavg(server_lr: float = 1.0, weighting: str = "examples", **_):
    return dict(aggregator=WeightedMean(weighting), server=scale(server_lr))


@_register("fedavgm", "https://arxiv.org/abs/1909.06335")
def _fedavgm(server_lr: float = 1.0, server_momentum: float = 0.9, nesterov: bool = False, **_):
    return dict(aggregator=WeightedMean(), server=chain(trace(server_momentum, nesterov), scale(server_lr)))


@_register("fedprox", "https://arxiv.org/abs/1812.06127")
def _fedprox(proximal_mu: float = 0.01, server_lr: float = 1.0, **_):
    return dict(aggregator=WeightedMean(), server=scale(server_lr), proximal_mu=proximal_mu)


@_register("fedadam", "https://arxiv.org/abs/2003.00295")
def _fedadam(
    server_lr: float = 0.1,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-9,
    bias_correction: bool = False,
    **_,
):
    return dict(aggregator=WeightedMean(), server=_fedopt(scale_by_adam(beta1, beta2, tau, bias_correction), server_lr))


@_register("fedyogi", "https://arxiv.org/abs/2003.00295")
def _fedyogi(
    server_lr: float = 1e-2,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
    bias_correction: bool = False,
    **_,
):
    return dict(aggregator=WeightedMean(), server=_fedopt(scale_by_yogi(beta1, beta2, tau, bias_correction), server_lr))


@_register("fedadagrad", "https://arxiv.org/abs/2003.00295")
def _fedadagrad(server_lr: float = 0.1, tau: float = 1e-9, **_):
    return dict(aggregator=WeightedMean(), server=_fedopt(scale_by_adagrad(0.0, tau), server_lr))


@_register("adafedadam", "https://arxiv.org/abs/2301.09357")
def _adafedadam(
    server_lr: float = 1e-3,
    beta1: float = 0.9,
    beta2: float = 0.999,
    tau: float = 1e-8,
    local_lr: float = 0.1,
    fairness_alpha: float = 1.0,
    **_,
):
    return dict(
        aggregator=AdaFedAdamAggregate(local_lr, fairness_alpha),
        server=adafedadam_adam(server_lr, beta1, beta2, tau),
        needs=frozenset({"loss_before", "grad_norm", "loss_initial"}),
    )


@_register("qffl", "https://arxiv.org/abs/1905.10497")
def _qffl(q: float = 0.2, local_lr: float = 0.1, **_):
    return dict(aggregator=QFFLAggregate(q, local_lr), server=scale(1.0), needs=frozenset({"loss_before"}))


@_register("ghbm", "https://arxiv.org/abs/2311.18578")
def _ghbm(ghbm_beta: float = 0.9, ghbm_tau: int = 10, server_lr: float = 1.0, **_):
    return dict(
        aggregator=WeightedMean(),
        server=chain(ghbm_history(ghbm_tau), scale(server_lr)),
        ghbm_beta=ghbm_beta,
        ghbm_tau=ghbm_tau,
    )


@_register("fedmedian", "https://arxiv.org/abs/1803.01498")
def _fedmedian(**_):
    return dict(aggregator=CoordinateMedian(), server=scale(1.0))


@_register("fedtrimmedavg", "https://arxiv.org/abs/1803.01498")
def _fedtrimmedavg(trim_beta: float = 0.2, **_):
    return dict(aggregator=TrimmedMean(trim_beta), server=scale(1.0))


@_register("krum", "https://arxiv.org/abs/1703.02757")
def _krum(num_malicious: int = 0, krum_keep: int = 1, **_):
    return dict(aggregator=Krum(num_malicious, krum_keep), server=scale(1.0))


def make_recipe(name: str, **options: Any) -> Recipe:
    """Build a registered recipe; options not used by it are ignored (one config serves all)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    reference, factory = RECIPES[name]
    return Recipe(name=name, reference=reference, **factory(**options))
