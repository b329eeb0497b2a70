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
into every round's ``metrics.jsonl`` record under ``"diagnostics"``;
:func:`diagnostics_series` reads the per-round series back from those records and
:func:`plot_diagnostics` draws them (``diagnostics.png``).

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
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from asymvlm.errors import InputError
from asymvlm.federated.core.tree import tree_norm
from asymvlm.federated.seeds import int_seed

__all__ = [
    "flatten",
    "normalised_weights",
    "gradient_dissimilarity",
    "client_drift",
    "delta_cosines",
    "round_diagnostics",
    "model_gradient",
    "initial_g2",
    "diagnostics_series",
    "plot_diagnostics",
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


def _value(x: Any) -> float:
    """A logged number as a float (a null, i.e. a value that was not finite or not computed: NaN)."""
    return float("nan") if x is None else float(x)


def _diagnosed_rounds(records: Sequence[Mapping[str, Any]]) -> list[tuple[int, Mapping[str, Any]]]:
    """``(round, diagnostics)`` of every record that has ``"diagnostics"``, by round (a round logged
    twice, e.g. again after a resume: its last record); an :class:`InputError` when there is none."""
    by_round: dict[int, Mapping[str, Any]] = {}
    for n, r in enumerate(records, 1):
        if not isinstance(r, Mapping) or "diagnostics" not in r:
            continue
        if not isinstance(r.get("round"), int) or isinstance(r.get("round"), bool):
            raise InputError(f"metrics record {n} has diagnostics but no integer 'round' (got {r.get('round')!r})")
        by_round[r["round"]] = r["diagnostics"]
    if not by_round:
        raise InputError("no metrics record has 'diagnostics' (run asymvlm-federate with --diagnostics true)")
    return sorted(by_round.items())


def _cosine_min(d: Mapping[str, Any]) -> float:
    """The smallest off-diagonal cosine of a round (NaN with one client or no logged matrix)."""
    cos = d.get("cosine")
    if not cos or len(cos) < 2:
        return float("nan")
    off = [_value(v) for i, row in enumerate(cos) for j, v in enumerate(row) if i != j]
    finite = [v for v in off if math.isfinite(v)]
    return min(finite) if finite else float("nan")


def diagnostics_series(records: Sequence[Mapping[str, Any]]) -> dict[str, list]:
    """The per-round series of the ``"diagnostics"`` logged in ``metrics.jsonl`` records.

    Records without ``"diagnostics"`` are skipped; a null (a value that was not finite, or G^2
    without gradients, or the cosines of a single client) is NaN. ``cosine_min`` is the smallest
    off-diagonal entry of the logged cosine matrix (NaN when the round had more than
    :data:`MAX_COSINE_CLIENTS` clients, whose matrix is not logged).

    Args:
        records: the records of ``metrics.jsonl`` (:func:`asymvlm.io_read.read_jsonl`).

    Returns:
        ``{"rounds", "g2", "drift_mean", "drift_max", "cosine_mean", "cosine_min"}``, each a list
        with one entry per diagnosed round, in round order.

    Raises:
        InputError: no record has ``"diagnostics"``.

    Example:
        >>> d = {"drift_mean": 1.5, "drift_max": 2.0, "cosine_mean": 0.5,
        ...      "cosine": [[1.0, 0.5], [0.5, 1.0]], "gradient_dissimilarity": 0.25}
        >>> s = diagnostics_series([{"round": 1, "diagnostics": d}, {"final": True}])
        >>> s["rounds"], s["g2"], s["drift_max"], s["cosine_min"]
        ([1], [0.25], [2.0], [0.5])
    """
    rounds = _diagnosed_rounds(records)
    return {
        "rounds": [r for r, _ in rounds],
        "g2": [_value(d.get("gradient_dissimilarity")) for _, d in rounds],
        "drift_mean": [_value(d.get("drift_mean")) for _, d in rounds],
        "drift_max": [_value(d.get("drift_max")) for _, d in rounds],
        "cosine_mean": [_value(d.get("cosine_mean")) for _, d in rounds],
        "cosine_min": [_cosine_min(d) for _, d in rounds],
    }


def _client_drifts(rounds: list[tuple[int, Mapping[str, Any]]], max_clients: int) -> dict[str, tuple[list, list]]:
    """``{client: (rounds, drifts)}`` of the clients sampled in at least half of the diagnosed
    rounds (and at least two), the ``max_clients`` most often sampled."""
    seen: dict[str, tuple[list, list]] = {}
    for rnd, d in rounds:
        for c, v in (d.get("drift") or {}).items():
            seen.setdefault(c, ([], []))
            seen[c][0].append(rnd)
            seen[c][1].append(_value(v))
    need = max(2, math.ceil(len(rounds) / 2))
    often = sorted((c for c in seen if len(seen[c][0]) >= need), key=lambda c: -len(seen[c][0]))
    return {c: seen[c] for c in often[:max_clients]}


def plot_diagnostics(records: Sequence[Mapping[str, Any]], path: str | Path, *, max_clients: int = 50) -> Path:
    """A PNG of a run's drift diagnostics, one panel each: G^2 per round; client drift per round
    (mean and max over the round's clients, and a faint line per client sampled in at least half
    the rounds, at most ``max_clients`` of them); the mean and min pairwise cosine between the
    client deltas per round. Written atomically (a temp file renamed).

    Args:
        records: the records of ``metrics.jsonl`` (:func:`asymvlm.io_read.read_jsonl`); those
            without ``"diagnostics"`` are skipped.
        path: the PNG to write (its folder is created).
        max_clients: the most per-client drift lines drawn.

    Returns:
        The path written.

    Raises:
        InputError: no record has ``"diagnostics"``.

    Example:
        >>> from asymvlm.io_read import read_jsonl
        >>> plot_diagnostics(read_jsonl("runs/fedavg/metrics.jsonl"), "runs/fedavg/diagnostics.png")  # doctest: +SKIP
    """
    import io

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from asymvlm.io import atomic_write_bytes

    rounds = _diagnosed_rounds(records)
    s = diagnostics_series(records)
    x = s["rounds"]
    width = max(6.0, min(0.15 * len(x) + 5, 16.0))
    fig, (g2, drift, cos) = plt.subplots(3, 1, figsize=(width, 9), sharex=True)
    g2.plot(x, s["g2"], "k.-", label="$G^2$ at the global model")
    g2.set_ylabel("gradient dissimilarity $G^2$")
    g2.set_title(f"drift diagnostics over {len(x)} rounds", fontsize=9)
    g2.legend(fontsize=7, loc="upper right")
    for i, (rx, ry) in enumerate(_client_drifts(rounds, max_clients).values()):
        shown = "a client (rounds it was sampled in)" if i == 0 else None
        drift.plot(rx, ry, "-", color="tab:blue", alpha=0.15, linewidth=0.8, label=shown)
    drift.plot(x, s["drift_mean"], "o-", color="tab:blue", label="mean over the round's clients", markersize=3)
    drift.plot(x, s["drift_max"], "s--", color="tab:red", label="max", markersize=3)
    drift.set_ylabel(r"client drift $\|\theta_k - \theta\|$")
    drift.legend(fontsize=7, loc="best")
    cos.axhline(0.0, color="grey", linewidth=0.8)
    cos.plot(x, s["cosine_mean"], "o-", color="tab:green", label="mean pairwise", markersize=3)
    cos.plot(x, s["cosine_min"], "v--", color="tab:purple", label="min pairwise", markersize=3)
    cos.set_ylim(-1.05, 1.05)
    cos.set_ylabel("cosine between client deltas")
    cos.set_xlabel("round")
    cos.xaxis.set_major_locator(MaxNLocator(integer=True))
    cos.legend(fontsize=7, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(buf.getvalue(), Path(path))


def initial_g2(model: Any, batchers: Sequence[Any], num_examples: Sequence[int], seed: int, loss_batches: int) -> float:
    """G^2 (:func:`gradient_dissimilarity`) of every client's gradient at ``model``'s parameters,
    weighted by client size, each client's gradient the mean over its first ``loss_batches``
    batches of the ``diagnostics`` stream of round 0 (the heterogeneity report's ``g2_initial``)."""

    params = model.get_params()
    grads = []
    for c, b in enumerate(batchers):
        s = int_seed(seed, "diagnostics", 0, c)
        b.reseed(s)
        grads.append(model_gradient(model, params, b, loss_batches, seed=s))
    return gradient_dissimilarity(grads, [max(1, n) for n in num_examples])
