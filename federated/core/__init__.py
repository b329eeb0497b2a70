"""The FedOpt core, shared by federated training and model merging.

Conventions (stated once, used everywhere):

* ``Params = dict[str, Tensor]``: a flat state dict.
* A **delta** is ``theta_new - theta_ref``: a client update in federated learning
  (``theta_local - theta_global``) or a task vector in merging (``theta_finetuned - theta_base``).
* :func:`apply_updates` **adds**: ``params + step``. A server step that follows the average delta
  is therefore ``+delta`` (FedAvg), never ``-delta``.
* An **aggregator** is stateless: ``aggregate(deltas, weights) -> AggregateResult`` (the combined
  delta plus diagnostics). Deltas may be lazy mappings (e.g. tensors read one at a time from
  safetensors); every rule works key by key, and the rules that only need a weighted sum stream
  over clients, so memory stays at one tensor per key (plus K copies of it for the rules that
  must see all clients at once: median, trimmed mean, Krum distances).
* A **server optimizer** is a pure transform ``(init, update)``: ``init(params) -> state``,
  ``update(delta, state, params, **info) -> (step, new_state)``, composable with :func:`chain`.
  State lives in the returned value, never on an object (optax's design:
  https://github.com/google-deepmind/optax).

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

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from asymvlm.errors import ClientUpdateError

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
    "check_delta",
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
    "Transform",
    "chain",
    "identity",
    "scale",
    "trace",
    "scale_by_adam",
    "scale_by_yogi",
    "scale_by_adagrad",
    "flatten_state",
    "unflatten_state",
]

Params = dict[str, Tensor]


# ----------------------------------------------------------------------------------------------
# tree utilities (Params in, new Params out; nothing is modified in place)
# ----------------------------------------------------------------------------------------------
def tree_map(fn: Callable[..., Tensor], tree: Mapping[str, Tensor], *rest: Mapping[str, Tensor]) -> Params:
    return {k: fn(v, *(r[k] for r in rest)) for k, v in tree.items()}


def apply_updates(params: Mapping[str, Tensor], updates: Mapping[str, Tensor]) -> Params:
    """``params + updates`` (in the dtype of ``params``)."""
    return {k: (v + updates[k].to(v.dtype)) if k in updates else v.clone() for k, v in params.items()}


def tree_sub(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Params:
    return {k: a[k] - b[k] for k in a}


def tree_add(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Params:
    return {k: a[k] + b[k] for k in a}


def tree_scale(a: Mapping[str, Tensor], s: float) -> Params:
    return {k: v * s for k, v in a.items()}


def tree_zeros_like(a: Mapping[str, Tensor]) -> Params:
    return {k: torch.zeros_like(v) for k, v in a.items()}


def tree_norm(a: Mapping[str, Tensor]) -> float:
    """Global L2 norm over every tensor (float64 accumulation)."""
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in a.values()))


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def check_delta(reference: Mapping[str, Tensor], delta: Mapping[str, Tensor], client: Any) -> None:
    """Raise :class:`ClientUpdateError` if ``delta`` has other keys, shapes or dtypes than
    ``reference`` or holds NaN/inf; the message names the client and the key."""
    ref_keys, keys = set(reference), set(delta)
    if keys != ref_keys:
        missing, extra = sorted(ref_keys - keys), sorted(keys - ref_keys)
        raise ClientUpdateError(
            f"client {client!r}: keys differ from the global state (missing {missing[:5]}, unexpected {extra[:5]})",
            client,
            (missing or extra)[0],
        )
    for k in reference:
        r, d = reference[k], delta[k]
        if tuple(d.shape) != tuple(r.shape):
            raise ClientUpdateError(
                f"client {client!r}: {k!r} has shape {tuple(d.shape)}, the global state {tuple(r.shape)}", client, k
            )
        if d.dtype != r.dtype:
            raise ClientUpdateError(
                f"client {client!r}: {k!r} has dtype {d.dtype}, the global state {r.dtype}", client, k
            )
        if d.is_floating_point() and not bool(torch.isfinite(d).all()):
            raise ClientUpdateError(f"client {client!r}: {k!r} contains NaN or inf", client, k)


def validate_deltas(
    reference: Mapping[str, Tensor], deltas: Sequence[Mapping[str, Tensor]], clients: Sequence[Any] | None = None
) -> tuple[list[int], list[tuple[Any, str]]]:
    """Indices of the valid deltas and ``(client, reason)`` for each rejected one."""
    clients = list(range(len(deltas))) if clients is None else list(clients)
    ok, rejected = [], []
    for i, (c, d) in enumerate(zip(clients, deltas)):
        try:
            check_delta(reference, d, c)
            ok.append(i)
        except ClientUpdateError as err:
            rejected.append((c, str(err)))
    return ok, rejected


# ----------------------------------------------------------------------------------------------
# aggregators
# ----------------------------------------------------------------------------------------------
@dataclass
class AggregateResult:
    """The combined delta and what the rule learned on the way (selected clients, norms, ...)."""

    delta: Params
    info: dict[str, Any] = field(default_factory=dict)


def _keys(deltas: Sequence[Mapping[str, Tensor]]) -> list[str]:
    if not deltas:
        raise ValueError("no client deltas to aggregate")
    return list(deltas[0].keys())


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"{len(w)} weights for {n} deltas")
    if any(x < 0 or not math.isfinite(x) for x in w) or sum(w) <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all zero, got {w}")
    return w


class Aggregator:
    """Base class: ``__call__(deltas, weights=None) -> AggregateResult``."""

    reference = ""

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

    def normalised(self, weights: Sequence[float] | None, n: int) -> list[float]:
        if self.weighting == "uniform":
            w = [1.0] * n
        elif self.weighting == "capped":
            if self.cap is None or self.cap <= 0:
                raise ValueError("weighting='capped' needs cap > 0")
            w = [min(x, self.cap) for x in _weights(weights, n)]
        elif self.weighting == "examples":
            w = _weights(weights, n)
        else:
            raise ValueError(f"unknown weighting {self.weighting!r}")
        total = sum(w)
        return [x / total for x in w]

    def __call__(self, deltas, weights=None, **client_info):
        p = self.normalised(weights, len(deltas))
        out: Params = {}
        for key in _keys(deltas):
            acc = None
            for pk, d in zip(p, deltas):
                t = d[key]
                acc = t * pk if acc is None else acc.add_(t, alpha=pk)
            out[key] = acc
        return AggregateResult(out, {"weights": p})


@dataclass
class Sum(Aggregator):
    """``sum_k delta_k`` (task arithmetic; weights, if given, multiply each delta)."""

    reference = "https://arxiv.org/abs/2212.04089"

    def __call__(self, deltas, weights=None, **client_info):
        w = [1.0] * len(deltas) if weights is None else [float(x) for x in weights]
        out: Params = {}
        for key in _keys(deltas):
            acc = None
            for wk, d in zip(w, deltas):
                t = d[key]
                acc = t * wk if acc is None else acc.add_(t, alpha=wk)
            out[key] = acc
        return AggregateResult(out, {})


def _client_norms(deltas: Sequence[Mapping[str, Tensor]]) -> list[float]:
    sq = [0.0] * len(deltas)
    for key in _keys(deltas):
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

    def __call__(self, deltas, weights=None, **client_info):
        if self.max_norm <= 0:
            raise ValueError(f"max_norm must be > 0, got {self.max_norm}")
        norms = _client_norms(deltas)
        factors = [min(1.0, self.max_norm / n) if n > 0 else 1.0 for n in norms]
        p = WeightedMean(self.weighting).normalised(weights, len(deltas))
        res = WeightedMean("uniform")([_Scaled(d, f * pk * len(deltas)) for d, f, pk in zip(deltas, factors, p)])
        return AggregateResult(res.delta, {"norms": norms, "clip_factors": factors, "weights": p})


class _Scaled(Mapping):
    """A lazy view ``s * delta`` (no copy until a key is read)."""

    def __init__(self, base: Mapping[str, Tensor], s: float):
        self.base, self.s = base, s

    def __getitem__(self, k):
        return self.base[k] * self.s

    def __iter__(self):
        return iter(self.base)

    def __len__(self):
        return len(self.base)


def _stack(deltas: Sequence[Mapping[str, Tensor]], key: str) -> Tensor:
    return torch.stack([d[key] for d in deltas])  # (K, ...) for one key only


@dataclass
class CoordinateMedian(Aggregator):
    """Coordinate-wise median (Yin et al. 2018, https://arxiv.org/abs/1803.01498); the mean of the
    two middle values for an even number of clients (numpy's convention). Unweighted."""

    reference = "https://arxiv.org/abs/1803.01498"

    def __call__(self, deltas, weights=None, **client_info):
        out: Params = {}
        k = len(deltas)
        for key in _keys(deltas):
            s = _stack(deltas, key).sort(dim=0).values
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
            raise ValueError(f"beta={self.beta} leaves no clients among {k}")
        out: Params = {}
        for key in _keys(deltas):
            s = _stack(deltas, key).sort(dim=0).values
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
            raise ValueError("Krum needs at least 2 clients")
        n_near = max(1, k - self.num_malicious - 2)
        dist = torch.zeros(k, k, dtype=torch.float64)
        for key in _keys(deltas):
            s = _stack(deltas, key).reshape(k, -1).double()
            dist += torch.cdist(s, s).pow(2)
        scores = [float(row[torch.arange(k) != i].sort().values[:n_near].sum()) for i, row in enumerate(dist)]
        order = sorted(range(k), key=lambda i: (scores[i], i))
        keep = order[: max(1, min(self.to_keep, k))]
        w = _weights(weights, k)
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


# ----------------------------------------------------------------------------------------------
# server optimizers: pure (init, update) transforms
# ----------------------------------------------------------------------------------------------
class Transform(NamedTuple):
    """``init(params) -> state``; ``update(delta, state, params, **info) -> (step, state)``."""

    init: Callable[[Params], Any]
    update: Callable[..., tuple[Params, Any]]


def identity() -> Transform:
    return Transform(lambda params: {}, lambda delta, state, params=None, **info: (dict(delta), state))


def scale(factor: float) -> Transform:
    """Multiply the step by ``factor`` (a server learning rate; 1 = FedAvg)."""
    return Transform(lambda params: {}, lambda delta, state, params=None, **info: (tree_scale(delta, factor), state))


def chain(*transforms: Transform) -> Transform:
    """Apply transforms in order; the state is a tuple of their states."""

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(delta, state, params=None, **info):
        new_states = []
        for t, s in zip(transforms, state):
            delta, s = t.update(delta, s, params, **info)
            new_states.append(s)
        return delta, tuple(new_states)

    return Transform(init, update)


def trace(momentum: float, nesterov: bool = False) -> Transform:
    """Server momentum ``v = momentum * v + delta``; step ``v`` (or ``delta + momentum * v`` with
    Nesterov). FedAvgM (Hsu et al. 2019, https://arxiv.org/abs/1909.06335)."""

    def init(params):
        return {"v": tree_zeros_like(params)}

    def update(delta, state, params=None, **info):
        v = {k: momentum * state["v"][k] + delta[k] for k in delta}
        step = {k: delta[k] + momentum * v[k] for k in delta} if nesterov else v
        return step, {"v": v}

    return Transform(init, update)


def _moments_init(params: Params) -> dict[str, Any]:
    return {"m": tree_zeros_like(params), "v": tree_zeros_like(params), "count": 0}


def _adaptive(
    second_moment: Callable[[Tensor, Tensor, float], Tensor],
    b1: float,
    b2: float,
    eps: float,
    bias_correction: bool,
    bias_correction_offset: int = 0,
) -> Transform:
    """Shared body of Adam / Yogi / Adagrad on the pseudo-gradient ``delta`` (Reddi et al. 2021,
    "Adaptive Federated Optimization", https://arxiv.org/abs/2003.00295, Algorithm 2):
    ``m = b1 m + (1 - b1) delta``, ``v = second_moment(v, delta)`` (m, v start at zero), step
    ``m / (sqrt(v) + eps)``; with bias correction times ``sqrt(1 - b2^e) / (1 - b1^e)`` where
    ``e = t + bias_correction_offset`` and t counts updates from 1 (Kingma & Ba: offset 0;
    Flower's FedAdam uses its round number + 1, i.e. offset 1). The paper itself has no bias
    correction (the default)."""

    def update(delta, state, params=None, b1_override: float | None = None, b2_override: float | None = None, **info):
        beta1 = b1 if b1_override is None else b1_override
        beta2 = b2 if b2_override is None else b2_override
        t = state["count"] + 1
        m = {k: beta1 * state["m"][k] + (1 - beta1) * delta[k] for k in delta}
        v = {k: second_moment(state["v"][k], delta[k], beta2) for k in delta}
        e = t + bias_correction_offset
        corr = math.sqrt(1 - beta2**e) / (1 - beta1**e) if bias_correction else 1.0
        step = {k: corr * m[k] / (v[k].sqrt() + eps) for k in delta}
        return step, {"m": m, "v": v, "count": t}

    return Transform(_moments_init, update)


def scale_by_adam(
    b1: float = 0.9, b2: float = 0.99, eps: float = 1e-9, bias_correction: bool = False, bias_correction_offset: int = 0
) -> Transform:
    """FedAdam's direction: ``v = b2 v + (1 - b2) delta^2`` (Reddi et al. 2021). Flower's FedAdam is
    ``bias_correction=True, bias_correction_offset=1``."""
    return _adaptive(
        lambda v, d, beta2: beta2 * v + (1 - beta2) * d * d, b1, b2, eps, bias_correction, bias_correction_offset
    )


def scale_by_yogi(b1: float = 0.9, b2: float = 0.99, eps: float = 1e-9, bias_correction: bool = False) -> Transform:
    """FedYogi's direction: ``v = v - (1 - b2) delta^2 sign(v - delta^2)`` (Reddi et al. 2021)."""
    return _adaptive(lambda v, d, beta2: v - (1 - beta2) * d * d * torch.sign(v - d * d), b1, b2, eps, bias_correction)


def scale_by_adagrad(b1: float = 0.0, eps: float = 1e-9, bias_correction: bool = False) -> Transform:
    """FedAdagrad's direction: ``v = v + delta^2`` (Reddi et al. 2021; momentum b1, 0 by default)."""
    return _adaptive(lambda v, d, beta2: v + d * d, b1, 0.0, eps, bias_correction)


# ----------------------------------------------------------------------------------------------
# state <-> (tensors, JSON) for checkpoints
# ----------------------------------------------------------------------------------------------
def flatten_state(state: Any, prefix: str = "") -> tuple[dict[str, Tensor], Any]:
    """Split a nested state (dicts, tuples, lists, tensors, numbers, strings, None) into a flat
    ``{path: tensor}`` dict and a JSON skeleton referencing those paths."""
    tensors: dict[str, Tensor] = {}

    def walk(obj: Any, path: str) -> Any:
        if isinstance(obj, Tensor):
            tensors[path] = obj.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(obj, dict):
            return {"__dict__": {str(k): walk(v, f"{path}/{k}") for k, v in obj.items()}}
        if isinstance(obj, (tuple, list)):
            return {"__list__": [walk(v, f"{path}/{i}") for i, v in enumerate(obj)], "tuple": isinstance(obj, tuple)}
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {path or '/'}")

    return tensors, walk(state, prefix)


def unflatten_state(tensors: Mapping[str, Tensor], skeleton: Any) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]].clone()
        if "__dict__" in skeleton:
            return {k: unflatten_state(tensors, v) for k, v in skeleton["__dict__"].items()}
        if "__list__" in skeleton:
            items = [unflatten_state(tensors, v) for v in skeleton["__list__"]]
            return tuple(items) if skeleton.get("tuple") else items
    return skeleton
