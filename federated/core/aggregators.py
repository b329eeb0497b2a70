"""Aggregators: stateless rules ``aggregate(deltas, weights) -> AggregateResult``.

Deltas may be lazy mappings (tensors read one at a time from safetensors); every rule works key
by key, and the rules that only need a weighted sum stream over clients, so memory stays at one
tensor per key (plus K copies of it for the rules that must see all clients at once: median,
trimmed mean, Krum distances).

Example:
    >>> import torch
    >>> deltas = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 3.0])}]
    >>> WeightedMean()(deltas, weights=[3, 1]).delta["w"].tolist()
    [0.75, 0.75]
    >>> CoordinateMedian()(deltas + [{"w": torch.tensor([5.0, 1.0])}]).delta["w"].tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from asymvlm.errors import ConfigError, InputError
from asymvlm.federated.core.tree import Params, ScaledView, keys_of, stack_key

__all__ = [
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
]


@dataclass
class AggregateResult:
    """The combined delta and what the rule learned on the way (selected clients, norms, ...)."""

    delta: Params
    info: dict[str, Any] = field(default_factory=dict)


def check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """``n`` finite, non-negative weights, not all zero (all ones when None)."""
    if weights is None:
        return [1.0] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise InputError(f"{len(w)} weights for {n} deltas")
    if any(x < 0 or not math.isfinite(x) for x in w) or sum(w) <= 0:
        raise InputError(f"weights must be finite, >= 0 and not all zero, got {w}")
    return w


class Aggregator:
    """Base class: ``__call__(deltas, weights=None, **client_info) -> AggregateResult``.

    ``mean_type`` marks rules whose output is a (weighted) mean of the deltas: only those compose
    with differential privacy (:mod:`asymvlm.federated.core.dp`), whose Gaussian mechanism
    bounds a sum of clipped updates. Robust rules (median, trimmed mean, Krum) select or order
    individual updates and have no such analysis."""

    reference = ""
    mean_type = False

    def __call__(
        self, deltas: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None = None, **client_info: Any
    ) -> AggregateResult:
        raise NotImplementedError


@dataclass
class WeightedMean(Aggregator):
    """``sum_k p_k delta_k`` with ``p_k`` proportional to the weights (FedAvg, McMahan et al. 2017,
    https://arxiv.org/abs/1602.05629). Streams over clients: one accumulator per key.

    Args:
        weighting: ``"examples"`` (the given weights, e.g. example counts), ``"uniform"`` or
            ``"capped"`` (``min(weight, cap)``, limiting any single client's influence).
        cap: the cap for ``"capped"``.
    """

    weighting: str = "examples"
    cap: float | None = None
    reference = "https://arxiv.org/abs/1602.05629"
    mean_type = True

    def effective_weights(self, weights: Sequence[float] | None, n: int) -> list[float]:
        """The clients' weights under this rule, before normalisation."""
        if self.weighting == "uniform":
            return [1.0] * n
        if self.weighting == "capped":
            if self.cap is None or self.cap <= 0:
                raise ConfigError("weighting='capped' needs cap > 0")
            return [min(x, self.cap) for x in check_weights(weights, n)]
        if self.weighting == "examples":
            return check_weights(weights, n)
        raise ConfigError(f"unknown weighting {self.weighting!r}")

    def normalised(self, weights: Sequence[float] | None, n: int) -> list[float]:
        """``p_k``: the effective weights divided by their sum."""
        w = self.effective_weights(weights, n)
        total = sum(w)
        return [x / total for x in w]

    def __call__(self, deltas, weights=None, **client_info):
        p = self.normalised(weights, len(deltas))
        return AggregateResult(Sum()(deltas, p).delta, {"weights": p})  # sum_k p_k delta_k


@dataclass
class Sum(Aggregator):
    """``sum_k delta_k`` (task arithmetic; weights, if given, multiply each delta)."""

    reference = "https://arxiv.org/abs/2212.04089"

    def __call__(self, deltas, weights=None, **client_info):
        w = [1.0] * len(deltas) if weights is None else [float(x) for x in weights]
        out: Params = {}
        for key in keys_of(deltas):
            acc = None
            for wk, d in zip(w, deltas):
                t = d[key]
                acc = t * wk if acc is None else acc.add_(t, alpha=wk)
            out[key] = acc
        return AggregateResult(out, {})


def client_norms(deltas: Sequence[Mapping[str, Tensor]]) -> list[float]:
    """Each delta's global L2 norm over every key (float64 accumulation, key by key)."""
    sq = [0.0] * len(deltas)
    for key in keys_of(deltas):
        for i, d in enumerate(deltas):
            sq[i] += float(d[key].double().pow(2).sum())
    return [math.sqrt(s) for s in sq]


@dataclass
class ClippedMean(Aggregator):
    """Clip each client's delta to global L2 norm ``max_norm``, then the weighted mean
    (norm clipping as a robustness and differential-privacy primitive; Sun et al. 2019,
    https://arxiv.org/abs/1911.07963). Two streaming passes: norms, then the sum."""

    max_norm: float = 1.0
    weighting: str = "examples"
    reference = "https://arxiv.org/abs/1911.07963"
    mean_type = True

    def __call__(self, deltas, weights=None, **client_info):
        if self.max_norm <= 0:
            raise ConfigError(f"max_norm must be > 0, got {self.max_norm}")
        norms = client_norms(deltas)
        factors = [min(1.0, self.max_norm / n) if n > 0 else 1.0 for n in norms]
        p = WeightedMean(self.weighting).normalised(weights, len(deltas))
        res = WeightedMean("uniform")([ScaledView(d, f * pk * len(deltas)) for d, f, pk in zip(deltas, factors, p)])
        return AggregateResult(res.delta, {"norms": norms, "clip_factors": factors, "weights": p})


@dataclass
class CoordinateMedian(Aggregator):
    """Coordinate-wise median (Yin et al. 2018, https://arxiv.org/abs/1803.01498); the mean of the
    two middle values for an even number of clients (numpy's convention). Unweighted."""

    reference = "https://arxiv.org/abs/1803.01498"

    def __call__(self, deltas, weights=None, **client_info):
        out: Params = {}
        k = len(deltas)
        for key in keys_of(deltas):
            s = stack_key(deltas, key).sort(dim=0).values
            out[key] = s[k // 2] if k % 2 else 0.5 * (s[k // 2 - 1] + s[k // 2])
        return AggregateResult(out, {})


@dataclass
class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean: drop the ``int(beta * K)`` smallest and largest values of each
    coordinate, average the rest (Yin et al. 2018, https://arxiv.org/abs/1803.01498;
    scipy.stats.trim_mean's convention). Unweighted."""

    beta: float = 0.2
    reference = "https://arxiv.org/abs/1803.01498"

    def __call__(self, deltas, weights=None, **client_info):
        k = len(deltas)
        cut = int(self.beta * k)
        if not 0 <= self.beta < 0.5 or k - 2 * cut < 1:
            raise ConfigError(f"beta={self.beta} leaves no clients among {k}")
        out: Params = {}
        for key in keys_of(deltas):
            s = stack_key(deltas, key).sort(dim=0).values
            out[key] = s[cut : k - cut].mean(dim=0)
        return AggregateResult(out, {"trimmed_per_side": cut})


@dataclass
class Krum(Aggregator):
    """Krum / multi-Krum (Blanchard et al. 2017, https://arxiv.org/abs/1703.02757).

    Each client's score is the sum of squared L2 distances to its ``K - f - 2`` nearest other
    clients; Krum keeps the best-scoring client, multi-Krum the ``to_keep`` best and averages them
    (weighted by the weights, like FedAvg). Pairwise distances are accumulated key by key.

    Args:
        num_malicious: ``f``, the number of Byzantine clients tolerated.
        to_keep: clients averaged (1 = Krum).
    """

    num_malicious: int = 0
    to_keep: int = 1
    reference = "https://arxiv.org/abs/1703.02757"

    def __call__(self, deltas, weights=None, **client_info):
        k = len(deltas)
        if k < 2:
            raise InputError("Krum needs at least 2 clients")
        n_near = max(1, k - self.num_malicious - 2)
        dist = torch.zeros(k, k, dtype=torch.float64)
        for key in keys_of(deltas):
            s = stack_key(deltas, key).reshape(k, -1).double()
            dist += torch.cdist(s, s).pow(2)
        scores = [float(row[torch.arange(k) != i].sort().values[:n_near].sum()) for i, row in enumerate(dist)]
        order = sorted(range(k), key=lambda i: (scores[i], i))
        keep = order[: max(1, min(self.to_keep, k))]
        w = check_weights(weights, k)
        res = WeightedMean()([deltas[i] for i in keep], [w[i] for i in keep])
        return AggregateResult(res.delta, {"scores": scores, "selected": keep})


# name -> factory (options as keyword arguments)
AGGREGATORS: dict[str, Callable[..., Aggregator]] = {
    "weighted_mean": WeightedMean,
    "sum": Sum,
    "clipped_mean": ClippedMean,
    "median": CoordinateMedian,
    "trimmed_mean": TrimmedMean,
    "krum": Krum,
}
