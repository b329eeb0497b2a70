"""Drift diagnostics of a federated round: gradient dissimilarity, client drift, delta cosines.

Why heterogeneous clients hurt FedAvg, measured on the run itself (all in float64):

* **Gradient dissimilarity** at the global model w,
  ``G^2 = sum_k p_k ||grad F_k(w) - grad F(w)||^2`` with ``grad F = sum_k p_k grad F_k`` and
  ``p_k`` the clients' weights normalised: the ``G`` of the (G, B)-dissimilarity of SCAFFOLD
  (Karimireddy et al. 2020, https://arxiv.org/abs/1910.06378, Definition A1 with B = 1, where
  it is the variance of the client gradients around their weighted mean) and of FedProx's
  B-local dissimilarity (Li et al. 2020, https://arxiv.org/abs/1812.06127, Definition 3).
  It is zero for IID clients (in expectation) and the term by which local steps drift apart.
* **Client drift** ``||theta_k - theta||``: how far each client's local model moved from the
  global model it started from in the round (the norm of its delta). On quadratic clients
  ``F_k(w) = 1/2 ||w - w_k*||^2``, t local SGD steps of rate eta give
  ``theta_k = w_k* + (1 - eta)^t (w - w_k*)``: the drift ``(1 - (1 - eta)^t) ||w - w_k*||``
  grows with the local steps.
* **Delta cosines**: the pairwise cosine between the flattened client deltas; near 1 when the
  clients agree on a direction, near 0 or negative when they pull apart (CFL's clustering
  criterion, Sattler et al. 2020, https://arxiv.org/abs/1910.01991).

The functions are pure: they take ``Params`` dicts (``{name: tensor}``) and return numbers; the
simulator (:mod:`asymvlm.federated.rounds`, ``diagnostics=True``) logs :func:`round_diagnostics`
into every round's ``metrics.jsonl`` record under ``"diagnostics"``.

Example:
    >>> import torch
    >>> grads = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([-1.0, 0.0])}]
    >>> gradient_dissimilarity(grads, [1, 1])
    1.0
    >>> client_drift([{"w": torch.tensor([3.0, 4.0])}], {"w": torch.zeros(2)})
    [5.0]
    >>> delta_cosines(grads).tolist()
    [[1.0, -1.0], [-1.0, 1.0]]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from asymvlm.errors import InputError
from asymvlm.federated.core.tree import tree_norm

__all__ = [
    "flatten",
    "normalised_weights",
    "gradient_dissimilarity",
    "client_drift",
    "delta_cosines",
    "round_diagnostics",
    "model_gradient",
    "MAX_COSINE_CLIENTS",
]

# the round record carries the full cosine matrix up to this many clients (its summary always)
MAX_COSINE_CLIENTS = 32


def flatten(params: Mapping[str, Tensor], keys: Sequence[str] | None = None) -> Tensor:
    """One float64 vector of ``params`` (in the order of ``keys``, default sorted names)."""
    keys = sorted(params) if keys is None else list(keys)
    if not keys:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([params[k].detach().reshape(-1).to(torch.float64) for k in keys])


def _stack(trees: Sequence[Mapping[str, Tensor]], what: str) -> Tensor:
    """(K, D) float64: every tree flattened over the first tree's keys (all must have the same keys)."""
    if not trees:
        raise InputError(f"{what}: need at least one client")
    keys = sorted(trees[0])
    for i, t in enumerate(trees):
        if sorted(t) != keys:
            raise InputError(f"{what}: client {i} has keys {sorted(t)[:4]}..., client 0 has {keys[:4]}...")
    return torch.stack([flatten(t, keys) for t in trees])


def normalised_weights(weights: Sequence[float] | Tensor, count: int) -> Tensor:
    """``p_k = w_k / sum_j w_j`` in float64 (weights must be >= 0 with a positive sum)."""
    w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    if w.numel() != count:
        raise InputError(f"need one weight per client: {w.numel()} weights for {count} clients")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise InputError(f"client weights must be finite, >= 0 and not all zero, got {w.tolist()}")
    return w / w.sum()


def gradient_dissimilarity(client_grads: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | Tensor) -> float:
    """``G^2 = sum_k p_k ||g_k - sum_j p_j g_j||^2`` of the clients' gradients ``g_k`` at one model.

    Args:
        client_grads: every client's gradient ``grad F_k(w)`` as a ``Params`` dict (same keys).
        weights: the clients' weights (e.g. example counts), normalised to ``p_k``.
    """
    g = _stack(client_grads, "gradient_dissimilarity")
    p = normalised_weights(weights, g.shape[0])
    mean = p @ g
    return float((p * (g - mean).pow(2).sum(dim=1)).sum())


def client_drift(client_params: Sequence[Mapping[str, Tensor]], global_params: Mapping[str, Tensor]) -> list[float]:
    """``||theta_k - theta||`` for every client's local model ``theta_k`` (over ``global_params``' keys)."""
    keys = sorted(global_params)
    base = flatten(global_params, keys)
    return [float((flatten(c, keys) - base).norm()) for c in client_params]


def delta_cosines(deltas: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """(K, K) float64 cosines between the flattened client deltas (a zero delta's cosines are 0,
    its own included)."""
    d = _stack(deltas, "delta_cosines")
    norms = d.norm(dim=1)
    unit = d / torch.where(norms > 0, norms, torch.ones_like(norms)).unsqueeze(1)
    return unit @ unit.T


def _number(x: float) -> float | None:
    """A JSON number (a value that is not finite is logged as null)."""
    return float(x) if math.isfinite(x) else None


def round_diagnostics(
    deltas: Sequence[Mapping[str, Tensor]],
    *,
    clients: Sequence[Any] | None = None,
    grads: Sequence[Mapping[str, Tensor]] | None = None,
    weights: Sequence[float] | None = None,
) -> dict[str, Any]:
    """A round's diagnostics as a JSON-able dict.

    Args:
        deltas: every client's ``theta_k - theta`` of the round (its drift is the delta's norm).
        clients: their ids (keys of ``drift``; default 0..K-1).
        grads: every client's gradient at the round's global model (then ``gradient_dissimilarity``).
        weights: the clients' weights for G^2 (default equal).

    Returns:
        ``{"clients", "drift": {client: norm}, "drift_mean", "drift_max", "cosine_mean"`` (mean
        over the pairs k != j; null with one client)``, "cosine"`` (the matrix, up to
        :data:`MAX_COSINE_CLIENTS` clients)``, "gradient_dissimilarity"`` (with ``grads``)``}``.
    """
    ids = [str(c) for c in (clients if clients is not None else range(len(deltas)))]
    out: dict[str, Any] = {"clients": ids}
    if deltas:
        drift = [tree_norm(d) for d in deltas]
        out["drift"] = {c: _number(v) for c, v in zip(ids, drift)}
        out["drift_mean"] = _number(sum(drift) / len(drift))
        out["drift_max"] = _number(max(drift))
        cos = delta_cosines(deltas)
        k = cos.shape[0]
        off = cos[~torch.eye(k, dtype=torch.bool)]
        out["cosine_mean"] = _number(float(off.mean())) if k > 1 else None
        if k <= MAX_COSINE_CLIENTS:
            out["cosine"] = [[_number(float(v)) for v in row] for row in cos]
    if grads:
        w = weights if weights is not None else [1.0] * len(grads)
        out["gradient_dissimilarity"] = _number(gradient_dissimilarity(grads, w))
    return out


def model_gradient(model: Any, params: Mapping[str, Tensor], batcher: Any, batches: int, *, seed: int = 0) -> dict:
    """``grad F_k(params)``: the mean gradient of ``model.batch_loss`` (the loss a client trains
    with) over the first ``batches`` batches of ``batcher`` (at most an epoch's), for the trained
    parameters (``model.trained_names()``; ``model`` is a :class:`~asymvlm.trainable.TrainableModel`).

    The model is loaded with ``params`` and put in training mode (as a client trains); LoRA dropout
    draws from ``seed`` inside a forked RNG, so the caller's random state is left as it was.
    """
    model.set_params(params)
    model.train()
    names = list(model.trained_names())
    named = model.exchanged()
    tensors = [named[k] for k in names]
    n = max(1, min(batches, getattr(batcher, "num_batches", batches) or 1))
    total = [torch.zeros_like(p, dtype=torch.float64) for p in tensors]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(n):
            loss = model.batch_loss(batcher.batch(i))
            g = torch.autograd.grad(loss, tensors, allow_unused=True)
            total = [t if gi is None else t + gi.detach().to(torch.float64) for t, gi in zip(total, g)]
    return {k: t / n for k, t in zip(names, total)}
