"""Aggregating LoRA adapters exactly (or knowingly not).

A LoRA layer adds ``s * B @ A`` to a frozen weight ``W`` (``A``: (r, in), ``B``: (out, r),
``s = alpha / r``). With client weights ``p_k`` (summing to 1) the update the clients agree on is
the dense ``Delta W = sum_k p_k s_k B_k A_k``, which averaging ``A`` and ``B`` separately does
*not* give (DESIGN.md, known traps). Modes (:data:`LORA_MODES`):

* ``factors`` — FedIT (Zhang et al. 2024, https://arxiv.org/abs/2305.05644): average ``A`` and
  ``B`` separately; the common, inexact baseline (its error is reported).
* ``frozen_a`` — FFA-LoRA (Sun et al. 2024, https://arxiv.org/abs/2403.12313): every client
  keeps the same frozen ``A``; averaging ``B`` is then exact.
* ``stack`` — FLoRA (Wang et al. 2024, https://arxiv.org/abs/2409.05976): concatenate the
  clients' ranks (``A`` rows, ``p_k s_k B_k`` columns), which multiply to ``Delta W`` exactly; it
  is folded into the frozen base and the adapter re-initialised (clients may use different ranks).
* ``residual`` — FedEx-LoRA (Singhal et al. 2025, https://arxiv.org/abs/2410.09432): average
  ``A`` and ``B`` and fold the residual ``Delta W - s avg(B) avg(A)`` into the frozen base; exact.
* ``svd`` — the exact ``Delta W`` then its best rank-r factorisation by SVD (Eckart–Young; clients
  may use different ranks); optimal at rank r, the truncation error is reported.

Every mode returns the new adapter factors and a ``base_delta`` to add to the frozen weights, so
that ``W + base_delta + s B A`` is what the server model computes.

In a federated round the server model keeps each adapted layer's factors and, for the exact modes,
its frozen base weight (:class:`LoraLayers` says where they are in the params). Linear
aggregation (a weighted mean without DP) folds the clients' factors directly
(:func:`aggregate_lora`). Every other rule, robust aggregators and DP included, acts on each
client's *message* (:func:`with_dense_updates`): its parameter deltas plus, per adapted layer, the
change ``s (B_k A_k - B A)`` of the layer's dense update, so that a median, Krum or the Gaussian
mechanism applies to the dense update the clients agree on (Delta W space), not only to factors;
:func:`fold_message` turns the aggregated message into the new factors and base weights.

Example:
    >>> import torch
    >>> A = [torch.randn(2, 5), torch.randn(2, 5)]
    >>> B = [torch.randn(3, 2), torch.randn(3, 2)]
    >>> out = aggregate_lora({"layer": (A, B)}, weights=[0.5, 0.5], mode="residual", scaling=2.0)
    >>> dense = sum(0.5 * 2.0 * b @ a for a, b in zip(A, B))
    >>> torch.allclose(out.effective_delta("layer"), dense, atol=1e-5)
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from asymvlm.errors import ConfigError, InputError
from asymvlm.lora import dense_delta, low_rank_factors
from asymvlm.registry import Param, Registry, at_least

__all__ = [
    "LORA_MODES",
    "EXACT_MODES",
    "LoraAggregate",
    "LoraLayers",
    "aggregate_lora",
    "with_dense_updates",
    "fold_message",
    "dense_key",
]

LORA_MODES = Registry("LoRA aggregation mode")
_RANK = Param("rank", int, None, "Rank of the new adapter (default: the clients' largest rank).", check=at_least(1))
_MODES = (
    # name, help, reference, parameters, exact (folds Delta W into the frozen base)
    ("factors", "FedIT: average A and B separately (inexact; the error is reported)",
     "https://arxiv.org/abs/2305.05644", (), False),
    ("frozen_a", "FFA-LoRA: A frozen and shared by every client, average B (exact)",
     "https://arxiv.org/abs/2403.12313", (), False),
    ("stack", "FLoRA: stack the clients' ranks, fold Delta W into the base, re-initialise the adapter",
     "https://arxiv.org/abs/2409.05976", (_RANK,), True),
    ("residual", "FedEx-LoRA: average A and B, fold the exact residual into the base",
     "https://arxiv.org/abs/2410.09432", (), True),
    ("svd", "the exact Delta W, then its best rank-r factors (Eckart-Young; the error is reported)",
     "https://doi.org/10.1007/BF02288367", (_RANK,), True),
)  # fmt: skip
for _name, _help, _ref, _params, _exact in _MODES:
    LORA_MODES.register(_name, params=_params, help=_help, reference=_ref, exact=_exact)(dict)
EXACT_MODES = tuple(name for name, e in LORA_MODES.items() if e.extra["exact"])


@dataclass
class LoraAggregate:
    """The aggregated adapter per layer: ``adapters[layer] = (A, B)``, the dense update to fold into
    the frozen base ``base_delta[layer]`` (zero for factors/frozen_a), the LoRA scaling of the new
    adapter, and per-layer diagnostics (relative error vs the exact Delta W for ``factors`` and
    ``svd``)."""

    adapters: dict[str, tuple[Tensor, Tensor]]
    base_delta: dict[str, Tensor]
    scaling: float
    info: dict[str, dict[str, float]] = field(default_factory=dict)

    def effective_delta(self, layer: str) -> Tensor:
        """``base_delta + s B A``: what the aggregated model adds to the original frozen weight."""
        a, b = self.adapters[layer]
        return self.base_delta[layer] + self.scaling * (b @ a)


def _normalise(weights: Sequence[float] | None, k: int) -> list[float]:
    w = [1.0] * k if weights is None else [float(x) for x in weights]
    if len(w) != k or any(x < 0 for x in w) or sum(w) <= 0:
        raise InputError(f"need {k} non-negative weights, got {w}")
    total = sum(w)
    return [x / total for x in w]


def aggregate_lora(
    layers: Mapping[str, tuple[Sequence[Tensor], Sequence[Tensor]]],
    weights: Sequence[float] | None = None,
    *,
    mode: str = "residual",
    scaling: float | Sequence[float] = 1.0,
    rank: int | None = None,
    new_scaling: float | None = None,
    seed: int = 0,
) -> LoraAggregate:
    """Aggregate client LoRA factors layer by layer.

    Args:
        layers: ``{layer: ([A_1..A_K], [B_1..B_K])}``; ``A_k`` (r_k, in), ``B_k`` (out, r_k).
        weights: client weights (normalised to sum 1); uniform if None.
        mode: one of :data:`LORA_MODES`.
        scaling: LoRA scaling ``alpha / r`` of the clients' adapters (one value or one per client).
        rank: rank of the returned adapter (``svd``; ``stack`` re-initialises at this rank; default:
            the clients' rank).
        new_scaling: scaling of the returned adapter (default: the clients' common scaling).
        seed: seed of the re-initialised ``A`` (``stack``; Kaiming-uniform like peft, ``B`` = 0).
    """
    LORA_MODES.entry(mode)  # a ConfigError naming the valid modes
    first = next(iter(layers.values()), None)
    if first is None:
        raise InputError("no LoRA layers to aggregate")
    k = len(first[0])
    p = _normalise(weights, k)
    s = [float(scaling)] * k if isinstance(scaling, (int, float)) else [float(x) for x in scaling]
    if len(s) != k:
        raise InputError(f"{len(s)} scalings for {k} clients")
    common = s[0] if all(abs(x - s[0]) < 1e-12 for x in s) else None
    out_scaling = new_scaling if new_scaling is not None else (common if common is not None else 1.0)
    gen = torch.Generator().manual_seed(seed)
    adapters, base, info = {}, {}, {}
    for name, (A, B) in layers.items():
        if len(A) != k or len(B) != k:
            raise InputError(f"layer {name!r}: {len(A)} A and {len(B)} B factors for {k} clients")
        for i, (a, b) in enumerate(zip(A, B)):
            if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
                raise InputError(
                    f"layer {name!r}, client {i}: A {tuple(a.shape)} and B {tuple(b.shape)} do not "
                    f"form a LoRA pair (B @ A)"
                )
        exact = dense_delta(A, B, p, s)
        ranks = {a.shape[0] for a in A}
        if mode in ("factors", "frozen_a", "residual") and (len(ranks) > 1 or common is None):
            raise InputError(
                f"mode {mode!r} needs every client at the same rank and scaling (layer {name!r}); use 'stack' or 'svd'"
            )
        if mode == "factors" or mode == "residual":
            a_bar = sum(pk * a for pk, a in zip(p, A))
            b_bar = sum(pk * b for pk, b in zip(p, B))
            approx = common * (b_bar @ a_bar)
            adapters[name] = (a_bar, b_bar)
            if mode == "residual":
                base[name] = exact - approx
            else:
                base[name] = torch.zeros_like(exact)
                info[name] = {"relative_error": float((approx - exact).norm() / exact.norm().clamp_min(1e-30))}
        elif mode == "frozen_a":
            if any(not torch.equal(a, A[0]) for a in A[1:]):
                raise InputError(f"mode 'frozen_a' needs the same frozen A on every client (layer {name!r})")
            adapters[name] = (A[0].clone(), sum(pk * b for pk, b in zip(p, B)))
            base[name] = torch.zeros_like(exact)
        elif mode == "stack":
            r = rank or max(ranks)
            base[name] = exact  # the stacked product B_stack @ A_stack == exact, folded into the base
            a0 = torch.empty(r, A[0].shape[1], dtype=A[0].dtype)
            torch.nn.init.kaiming_uniform_(a0, a=5**0.5, generator=gen)
            adapters[name] = (a0, torch.zeros(B[0].shape[0], r, dtype=B[0].dtype))
            info[name] = {"stacked_rank": float(sum(a.shape[0] for a in A))}
        else:  # svd
            a_new, b_new, err = low_rank_factors(exact, rank or max(ranks), out_scaling)
            adapters[name] = (a_new, b_new)
            base[name] = torch.zeros_like(exact)
            info[name] = {"relative_error": err, "rank": float(a_new.shape[0])}
    return LoraAggregate(adapters, base, out_scaling, info)


# ----------------------------------------------------------------------------------------------
# the server model's LoRA layers, and aggregation in Delta-W space
# ----------------------------------------------------------------------------------------------
BASE_PREFIX = "lora_base/"  # key of an adapted layer's frozen base weight in the server's params


def dense_key(layer: str) -> str:
    """Key of a layer's dense update change in a client message."""
    return f"lora_delta_w/{layer}"


@dataclass(frozen=True)
class LoraLayers:
    """Where the LoRA layers live in a server model's params, and how they are aggregated.

    Attributes:
        mode: a :data:`LORA_MODES` name.
        layers: ``{layer: (key of A, key of B)}`` in the exchanged params.
        scaling: the LoRA scaling ``alpha / r`` of every client.
        rank: the rank of a re-initialised (``stack``) or factorised (``svd``) adapter.
        seed: seed of ``stack``'s re-initialised A (per round: the caller passes seed + round).
    """

    mode: str
    layers: Mapping[str, tuple[str, str]]
    scaling: float
    rank: int | None = None
    seed: int = 0

    @property
    def exact(self) -> bool:
        """Does the mode fold an exact Delta W into the frozen base weights?"""
        return self.mode in EXACT_MODES

    @property
    def factor_keys(self) -> set[str]:
        return {k for pair in self.layers.values() for k in pair}

    @property
    def frozen_keys(self) -> set[str]:
        """Exchanged but never changed by clients (FFA-LoRA's A): not part of what clients release."""
        return {a for a, _ in self.layers.values()} if self.mode == "frozen_a" else set()

    @staticmethod
    def base_key(layer: str) -> str:
        return BASE_PREFIX + layer

    @property
    def base_keys(self) -> list[str]:
        return [self.base_key(layer) for layer in self.layers] if self.exact else []


def with_dense_updates(
    params: Mapping[str, Tensor], delta: Mapping[str, Tensor], lora: LoraLayers
) -> dict[str, Tensor]:
    """A client's message in an exact LoRA mode: its parameter deltas plus, per adapted layer,
    ``s (B_k A_k - B A)`` under :func:`dense_key` (computed in float64, stored in the factors'
    dtype): the change of the layer's dense update that the client's new factors make."""
    out = dict(delta)
    s = lora.scaling
    for layer, (ka, kb) in lora.layers.items():
        a, b = params[ka].double(), params[kb].double()
        a_k, b_k = a + delta[ka].double(), b + delta[kb].double()
        out[dense_key(layer)] = (s * (b_k @ a_k - b @ a)).to(params[ka].dtype)
    return out


def fold_message(
    params: Mapping[str, Tensor], agg: Mapping[str, Tensor], lora: LoraLayers
) -> tuple[dict[str, Tensor], dict[str, dict[str, float]]]:
    """New factor and base-weight values from an aggregated message (see :func:`with_dense_updates`):
    the agreed dense update is ``s B A + agg[dense_key(layer)]``; ``residual`` moves the factors by
    their aggregated deltas and folds the exact remainder into the base, ``stack`` folds it all and
    re-initialises the adapter, ``svd`` refactorises it at rank r."""
    out: dict[str, Tensor] = {}
    info: dict[str, dict[str, float]] = {}
    gen = torch.Generator().manual_seed(lora.seed)
    s = lora.scaling
    for layer, (ka, kb) in lora.layers.items():
        a, b, w = params[ka], params[kb], params[lora.base_key(layer)]
        agreed = s * (b.double() @ a.double()) + agg[dense_key(layer)].double()  # what the clients agree on
        if lora.mode == "residual":
            a_new, b_new = a + agg[ka], b + agg[kb]
            out[ka], out[kb] = a_new, b_new
            out[lora.base_key(layer)] = w + (agreed - s * (b_new.double() @ a_new.double())).to(w.dtype)
        elif lora.mode == "stack":
            r = lora.rank or a.shape[0]
            a0 = torch.empty(r, a.shape[1], dtype=a.dtype)
            torch.nn.init.kaiming_uniform_(a0, a=5**0.5, generator=gen)
            out[ka], out[kb] = a0, torch.zeros(b.shape[0], r, dtype=b.dtype)
            out[lora.base_key(layer)] = w + agreed.to(w.dtype)
        elif lora.mode == "svd":
            a_new, b_new, err = low_rank_factors(agreed, lora.rank or a.shape[0], s)
            out[ka], out[kb] = a_new.to(a.dtype), b_new.to(b.dtype)
            out[lora.base_key(layer)] = w.clone()
            info[layer] = {"relative_error": err, "rank": float(a_new.shape[0])}
        else:
            raise ConfigError(f"fold_message is for the exact modes {EXACT_MODES}, got {lora.mode!r}")
    return out, info


def fold_linear(
    params: Mapping[str, Tensor], deltas: Sequence[Mapping[str, Tensor]], p: Sequence[float], lora: LoraLayers
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The exact modes under a weighted mean (no DP): :func:`aggregate_lora` on the clients' own
    factors with normalised weights ``p`` (identical to the dense oracle ``sum_k p_k s B_k A_k``)."""
    layers = {
        layer: ([params[a] + d[a] for d in deltas], [params[b] + d[b] for d in deltas])
        for layer, (a, b) in lora.layers.items()
    }
    lo = aggregate_lora(layers, p, mode=lora.mode, scaling=lora.scaling, rank=lora.rank, seed=lora.seed)
    out: dict[str, Tensor] = {}
    for layer, (a, b) in lora.layers.items():
        out[a], out[b] = lo.adapters[layer]
        out[lora.base_key(layer)] = params[lora.base_key(layer)] + lo.base_delta[layer]
    return out, lo.info
