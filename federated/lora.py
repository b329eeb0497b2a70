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

import torch
from torch import Tensor

from asymvlm.lora import dense_delta, low_rank_factors

__all__ = [
    "LORA_MODES",
    "LoraAggregate",
    "aggregate_lora",
]

LORA_MODES = {
    "factors": "FedIT, https://arxiv.org/abs/2305.05644 (inexact)",
    "frozen_a": "FFA-LoRA, https://arxiv.org/abs/2403.12313",
    "stack": "FLoRA, https://arxiv.org/abs/2409.05976",
    "residual": "FedEx-LoRA, https://arxiv.org/abs/2410.09432",
    "svd": "exact Delta W + truncated SVD (Eckart-Young)",
}


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
        raise ValueError(f"need {k} non-negative weights, got {w}")
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
    if mode not in LORA_MODES:
        raise ValueError(f"unknown LoRA aggregation mode {mode!r}; choose one of {sorted(LORA_MODES)}")
    first = next(iter(layers.values()), None)
    if first is None:
        raise ValueError("no LoRA layers to aggregate")
    k = len(first[0])
    p = _normalise(weights, k)
    s = [float(scaling)] * k if isinstance(scaling, (int, float)) else [float(x) for x in scaling]
    if len(s) != k:
        raise ValueError(f"{len(s)} scalings for {k} clients")
    common = s[0] if all(abs(x - s[0]) < 1e-12 for x in s) else None
    out_scaling = new_scaling if new_scaling is not None else (common if common is not None else 1.0)
    gen = torch.Generator().manual_seed(seed)
    adapters, base, info = {}, {}, {}
    for name, (A, B) in layers.items():
        if len(A) != k or len(B) != k:
            raise ValueError(f"layer {name!r}: {len(A)} A and {len(B)} B factors for {k} clients")
        for i, (a, b) in enumerate(zip(A, B)):
            if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
                raise ValueError(
                    f"layer {name!r}, client {i}: A {tuple(a.shape)} and B {tuple(b.shape)} do not "
                    f"form a LoRA pair (B @ A)"
                )
        exact = dense_delta(A, B, p, s)
        ranks = {a.shape[0] for a in A}
        if mode in ("factors", "frozen_a", "residual") and (len(ranks) > 1 or common is None):
            raise ValueError(
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
                raise ValueError(f"mode 'frozen_a' needs the same frozen A on every client (layer {name!r})")
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
