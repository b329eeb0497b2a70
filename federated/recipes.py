"""Named federated algorithms: each one registry entry, its whole algorithm in one place.

A recipe's factory returns its aggregator, its server transform (state of its own is a named
member of a :func:`~asymvlm.federated.core.chain`, read with
:func:`~asymvlm.federated.core.named_state`), a ``client_config(state, params)`` hook that tells
the round's clients which client-side terms to apply (:data:`asymvlm.federated.client.CLIENT_TERMS`;
Flower's ``configure_fit`` pattern) and a ``check_clients(clients_per_round)`` feasibility check.
Every recipe is built on :mod:`asymvlm.federated.core`; the fairness-aware methods need
per-client information (loss at the global model, gradient norm, ...) which the round loop
collects when ``Recipe.needs`` asks for it. ``docs/architecture/new-recipe.md`` is the template
for a new one.

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

Every recipe declares its options (:data:`RECIPES`, an :class:`asymvlm.registry.Registry`):
``make_recipe("fedadam", sever_lr=1)`` is a :class:`~asymvlm.errors.ConfigError` naming the key,
the recipe and the valid options. Flower's FedAdam is ``make_recipe("fedadam", server_tau=1e-3,
bias_correction=True, bias_correction_offset=1)`` (its eta, eta_l, beta_1, beta_2 defaults are
ours). ``make_recipe(name, dp=DifferentialPrivacy(...))`` wraps the aggregation in the Gaussian
mechanism; recipes whose rule has no DP analysis refuse it (:data:`DP_RECIPES` lists those that
accept it).

Example:
    >>> r = make_recipe("fedadam", server_lr=0.1)
    >>> r.name, type(r.aggregator).__name__, r.options["server_tau"]
    ('fedadam', 'WeightedMean', 1e-09)
    >>> prox = make_recipe("fedprox", proximal_mu=0.3)
    >>> prox.client_config(prox.server.init({}), {})
    {'proximal': {'mu': 0.3}}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from asymvlm.errors import ConfigError, InputError
from asymvlm.federated.core import (
    AggregateResult,
    Aggregator,
    CoordinateMedian,
    DifferentialPrivacy,
    Krum,
    Params,
    Recipe,
    Sum,
    Transform,
    TrimmedMean,
    WeightedMean,
    chain,
    check_weights,
    keys_of,
    named_state,
    scale,
    scale_by_adagrad,
    scale_by_adam,
    scale_by_yogi,
    trace,
    tree_norm,
    tree_zeros_like,
)
from asymvlm.registry import Param, Registry, at_least, in_range, non_negative, positive

__all__ = [
    "Recipe",
    "RECIPES",
    "DP_RECIPES",
    "make_recipe",
    "AdaFedAdamAggregate",
    "adafedadam_adam",
    "QFFLAggregate",
    "ghbm_history",
    "ghbm_momentum",
    "ghbm_client_config",
    "proximal_client_config",
]


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
            raise InputError("adafedadam needs loss_before and grad_norm of every client")
        n = check_weights(weights, k)
        norms = [tree_norm({key: d[key] for key in keys_of(deltas)}) for d in deltas]
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
            raise InputError("qffl needs loss_before (the loss at the global model) of every client")
        big_l = 1.0 / self.local_lr
        f = [float(x) + 1e-10 for x in loss_before]
        norms = [tree_norm({key: d[key] for key in keys_of(deltas)}) for d in deltas]
        h = [self.q * fk ** (self.q - 1) * (big_l * nk) ** 2 + big_l * fk**self.q for fk, nk in zip(f, norms)]
        coef = [big_l * fk**self.q / sum(h) for fk in f]
        return AggregateResult(Sum()(deltas, coef).delta, {"h": h})


# ----------------------------------------------------------------------------------------------
# GHBM
# ----------------------------------------------------------------------------------------------
def ghbm_history(tau: int) -> Transform:
    """Keeps the last ``tau`` global models (GHBM's server state) and passes the delta through."""
    if tau < 1:
        raise ConfigError(f"tau must be >= 1, got {tau}")

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


def ghbm_client_config(server: Transform, beta: float, tau: int) -> Callable[[Any, Mapping[str, Tensor]], dict]:
    """GHBM's ``client_config``: the momentum ``m_t`` the server sends (:func:`ghbm_momentum` of the
    history kept by ``server``'s member named ``"history"``), over every exchanged key (zero for keys
    the server does not step), for the clients' ``heavy_ball`` term; nothing until ``tau`` models
    exist (and nothing at beta 0)."""

    def client_config(state: Any, params: Mapping[str, Tensor]) -> dict[str, Any]:
        history = named_state(server, state, "history")["history"]
        if beta == 0 or not history:
            return {}
        owned = {k: v for k, v in params.items() if k in history[0]}
        momentum = ghbm_momentum(history, owned, tau)
        if momentum is None:
            return {}
        full = {k: momentum[k] if k in momentum else torch.zeros_like(v) for k, v in params.items()}
        return {"heavy_ball": {"beta": beta, "momentum": full}}

    return client_config


# ----------------------------------------------------------------------------------------------
# FedProx
# ----------------------------------------------------------------------------------------------
def proximal_client_config(mu: float) -> Callable[[Any, Mapping[str, Tensor]], dict]:
    """FedProx's ``client_config``: every round the clients' ``proximal`` term with ``mu``
    (nothing at mu 0)."""

    def client_config(state: Any, params: Mapping[str, Tensor]) -> dict[str, Any]:
        return {"proximal": {"mu": mu}} if mu > 0 else {}

    return client_config


# ----------------------------------------------------------------------------------------------
# the registry: every recipe declares its options
# ----------------------------------------------------------------------------------------------
RECIPES = Registry("recipe")
_beta = in_range(0.0, 1.0, hi_open=True)


def _lr(default: float) -> Param:
    return Param("server_lr", float, default, "Server learning rate (the step on the aggregate).", check=positive)


def _betas(b2: float) -> tuple[Param, Param]:
    return (
        Param("server_beta1", float, 0.9, "Server first-moment decay beta1 in [0, 1).", check=_beta),
        Param("server_beta2", float, b2, "Server second-moment decay beta2 in [0, 1).", check=_beta),
    )


def _tau(default: float) -> Param:
    return Param("server_tau", float, default, "Adaptivity tau: the epsilon of the server's division.", check=positive)


_BIAS = (
    Param("bias_correction", bool, False, "Bias-correct the moments (Kingma & Ba; Flower's FedAdam: true)."),
    Param(
        "bias_correction_offset",
        int,
        0,
        "Rounds added to the correction's exponent (Flower's FedAdam: 1, its round number + 1).",
        check=at_least(0),
    ),
)
_LOCAL_LR = Param("local_lr", float, 0.1, "The clients' learning rate eta_l (a run passes its own).", check=positive)


def _fedopt(name: str, direction: Transform, server_lr: float) -> Transform:
    """Reddi et al.'s server optimizers: the adaptive direction (its moments under ``name``), then the lr."""
    return chain((name, direction), ("lr", scale(server_lr)))


@RECIPES.register(
    "fedavg",
    help="weighted mean, server step server_lr",
    reference="https://arxiv.org/abs/1602.05629",
    params=(
        _lr(1.0),
        Param("weighting", Literal["examples", "uniform", "capped"], "examples", "Client weights in the mean."),
        Param("weighting_cap", float, None, "The cap of weighting='capped' (min(examples, cap)).", check=positive),
    ),
)
def _fedavg(server_lr, weighting, weighting_cap):
    if (weighting == "capped") != (weighting_cap is not None):
        raise ConfigError("recipe 'fedavg': weighting='capped' and weighting_cap go together")
    return dict(aggregator=WeightedMean(weighting, weighting_cap), server=scale(server_lr))


@RECIPES.register(
    "fedavgm",
    help="weighted mean, server momentum",
    reference="https://arxiv.org/abs/1909.06335",
    params=(
        _lr(1.0),
        Param("server_momentum", float, 0.9, "Server momentum in [0, 1).", check=_beta),
        Param("server_nesterov", bool, False, "Nesterov server momentum."),
    ),
)
def _fedavgm(server_lr, server_momentum, server_nesterov):
    return dict(
        aggregator=WeightedMean(),
        server=chain(("momentum", trace(server_momentum, server_nesterov)), ("lr", scale(server_lr))),
    )


@RECIPES.register(
    "fedprox",
    help="weighted mean; clients add mu/2 ||w - w_global||^2",
    reference="https://arxiv.org/abs/1812.06127",
    params=(Param("proximal_mu", float, 0.01, "FedProx proximal coefficient mu.", check=non_negative), _lr(1.0)),
)
def _fedprox(proximal_mu, server_lr):
    return dict(
        aggregator=WeightedMean(),
        server=scale(server_lr),
        client_config=proximal_client_config(proximal_mu),
        client_terms=frozenset({"proximal"}),
    )


@RECIPES.register(
    "fedadam",
    help="weighted mean, Adam on the pseudo-gradient",
    reference="https://arxiv.org/abs/2003.00295",
    params=(_lr(0.1), *_betas(0.99), _tau(1e-9), *_BIAS),
)
def _fedadam(server_lr, server_beta1, server_beta2, server_tau, bias_correction, bias_correction_offset):
    direction = scale_by_adam(server_beta1, server_beta2, server_tau, bias_correction, bias_correction_offset)
    return dict(aggregator=WeightedMean(), server=_fedopt("adam", direction, server_lr))


@RECIPES.register(
    "fedyogi",
    help="weighted mean, Yogi on the pseudo-gradient",
    reference="https://arxiv.org/abs/2003.00295",
    params=(_lr(1e-2), *_betas(0.99), _tau(1e-3), *_BIAS),
)
def _fedyogi(server_lr, server_beta1, server_beta2, server_tau, bias_correction, bias_correction_offset):
    direction = scale_by_yogi(server_beta1, server_beta2, server_tau, bias_correction, bias_correction_offset)
    return dict(aggregator=WeightedMean(), server=_fedopt("yogi", direction, server_lr))


@RECIPES.register(
    "fedadagrad",
    help="weighted mean, Adagrad on the pseudo-gradient",
    reference="https://arxiv.org/abs/2003.00295",
    params=(_lr(0.1), _tau(1e-9)),
)
def _fedadagrad(server_lr, server_tau):
    return dict(aggregator=WeightedMean(), server=_fedopt("adagrad", scale_by_adagrad(0.0, server_tau), server_lr))


@RECIPES.register(
    "adafedadam",
    help="normalised, fairness-weighted updates; Adam with certainty",
    reference="https://arxiv.org/abs/2301.09357",
    params=(
        _lr(1e-3),
        *_betas(0.999),
        _tau(1e-8),
        _LOCAL_LR,
        Param("fairness_alpha", float, 1.0, "Fairness exponent alpha of the loss ratios.", check=non_negative),
    ),
)
def _adafedadam(server_lr, server_beta1, server_beta2, server_tau, local_lr, fairness_alpha):
    return dict(
        aggregator=AdaFedAdamAggregate(local_lr, fairness_alpha),
        server=adafedadam_adam(server_lr, server_beta1, server_beta2, server_tau),
        needs=frozenset({"loss_before", "grad_norm", "loss_initial"}),
    )


@RECIPES.register(
    "qffl",
    help="q-fair aggregation from the losses at the global model",
    reference="https://arxiv.org/abs/1905.10497",
    params=(Param("qffl_q", float, 0.2, "q-FFL fairness exponent q (0 = FedAvg).", check=non_negative), _LOCAL_LR),
)
def _qffl(qffl_q, local_lr):
    return dict(aggregator=QFFLAggregate(qffl_q, local_lr), server=scale(1.0), needs=frozenset({"loss_before"}))


@RECIPES.register(
    "ghbm",
    help="weighted mean; clients add generalised heavy-ball momentum",
    reference="https://arxiv.org/abs/2311.18578",
    params=(
        Param("ghbm_beta", float, 0.9, "GHBM momentum beta in [0, 1).", check=_beta),
        Param("ghbm_tau", int, 10, "GHBM history length tau (about 1 / participation).", check=at_least(1)),
        _lr(1.0),
    ),
)
def _ghbm(ghbm_beta, ghbm_tau, server_lr):
    server = chain(("history", ghbm_history(ghbm_tau)), ("lr", scale(server_lr)))
    return dict(
        aggregator=WeightedMean(),
        server=server,
        client_config=ghbm_client_config(server, ghbm_beta, ghbm_tau),
        client_terms=frozenset({"heavy_ball"}),
    )


@RECIPES.register("fedmedian", help="coordinate-wise median", reference="https://arxiv.org/abs/1803.01498")
def _fedmedian():
    return dict(aggregator=CoordinateMedian(), server=scale(1.0))


@RECIPES.register(
    "fedtrimmedavg",
    help="coordinate-wise trimmed mean",
    reference="https://arxiv.org/abs/1803.01498",
    params=(
        Param(
            "trim_beta",
            float,
            0.2,
            "Fraction cut from each end of every coordinate, in [0, 0.5).",
            check=in_range(0.0, 0.5, hi_open=True),
        ),
    ),
)
def _fedtrimmedavg(trim_beta):
    return dict(aggregator=TrimmedMean(trim_beta), server=scale(1.0))


@RECIPES.register(
    "krum",
    help="(multi-)Krum",
    reference="https://arxiv.org/abs/1703.02757",
    params=(
        Param("krum_num_malicious", int, 0, "Byzantine clients f that Krum tolerates.", check=at_least(0)),
        Param("krum_keep", int, 1, "Clients averaged (1 = Krum, more = multi-Krum).", check=at_least(1)),
    ),
)
def _krum(krum_num_malicious, krum_keep):
    def check_clients(clients_per_round: int) -> None:
        f = krum_num_malicious
        if clients_per_round <= 2 * f + 2:
            raise ConfigError(
                f"Krum tolerates f Byzantine clients among n only when n > 2f + 2 (Blanchard et al. 2017): "
                f"krum_num_malicious={f} needs more than {2 * f + 2} clients per round, got {clients_per_round}"
            )

    return dict(aggregator=Krum(krum_num_malicious, krum_keep), server=scale(1.0), check_clients=check_clients)


def make_recipe(name: str, *, dp: DifferentialPrivacy | None = None, **options: Any) -> Recipe:
    """Build a registered recipe with its declared options (an option it does not declare is a
    :class:`~asymvlm.errors.ConfigError`); ``dp`` wraps its aggregation in the Gaussian mechanism
    (a :class:`~asymvlm.federated.core.DPCompositionError` for recipes without a DP analysis)."""
    entry = RECIPES.entry(name)
    resolved = RECIPES.resolve(name, options)
    recipe = Recipe(name=name, reference=entry.reference, options=resolved, **entry.factory(**resolved))
    return recipe.with_dp(dp, DP_RECIPES) if dp is not None else recipe


# the recipes whose aggregation is a (weighted) mean: the ones that compose with DP
DP_RECIPES = tuple(name for name in RECIPES if getattr(make_recipe(name).aggregator, "mean_type", False))
