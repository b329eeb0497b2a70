"""Spectral merges of 2-D weights: task arithmetic's sum with an isotropic spectrum (Iso-C).

Iso-C (Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces", https://arxiv.org/abs/2502.04959): for every 2-D weight, the summed task
matrix ``M = sum_t tau_t`` is decomposed ``M = U diag(s) V^T`` and its spectrum is flattened to the
mean singular value, ``iso(M) = mean(s) U V^T``: the directions every task contributes keep equal
weight instead of the dominant tasks' few. Tensors that are not 2-D (biases, norms, the temperature)
have no spectrum: ``non_matrix="mean"`` (the default: what ports of the authors' code do) averages
them, ``"sum"`` adds them (task arithmetic); an explicit option because implementations differ. The
method's ``lam`` (the paper's alpha) scales the result. One key of all tasks is resident at a time.

Example:
    >>> import torch
    >>> out = IsoC()([{"w": torch.diag(torch.tensor([3.0, 1.0]))}]).delta["w"]
    >>> out.tolist()
    [[2.0, 0.0], [0.0, 2.0]]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from asymvlm.federated.core import AggregateResult, Aggregator, Params, keys_of, stack_key

__all__ = ["IsoC", "isotropic"]


def isotropic(m: torch.Tensor) -> torch.Tensor:
    """``mean(s) U V^T`` of a 2-D ``m = U diag(s) V^T`` (thin SVD, computed in float64, returned in
    ``m``'s dtype): Iso-C's flattened spectrum.

    Example:
        >>> m = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
        >>> isotropic(m).tolist()  # singular values (2, 0): both become their mean, 1
        [[1.0, 0.0], [0.0, 1.0]]
    """
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    return (s.mean() * (u @ vh)).to(m.dtype)


@dataclass
class IsoC(Aggregator):
    """Iso-C (https://arxiv.org/abs/2502.04959): per 2-D key the isotropic sum of the task vectors
    (:func:`isotropic`), other keys averaged or summed (``non_matrix``). Task weights, where given,
    weight the sum."""

    non_matrix: str = "mean"
    reference = "https://arxiv.org/abs/2502.04959"

    def __post_init__(self) -> None:
        if self.non_matrix not in ("mean", "sum"):
            from asymvlm.errors import ConfigError

            raise ConfigError(f"non_matrix={self.non_matrix!r} is not one of ('mean', 'sum')")

    def __call__(self, deltas, weights=None, **_):
        k = len(deltas)
        w = torch.tensor([1.0] * k if weights is None else [float(x) for x in weights], dtype=torch.float64)
        out: Params = {}
        for key in keys_of(deltas):
            stack = stack_key(deltas, key)  # (K, ...) of this key only
            total = (stack.double() * w.view(-1, *([1] * (stack.dim() - 1)))).sum(0)
            if not bool(torch.isfinite(total).all()):
                from asymvlm.merging.task_vectors import MergeInputError

                raise MergeInputError(f"{key!r}: the task vectors' sum is not finite")
            if total.dim() == 2:
                total = isotropic(total)
            elif self.non_matrix == "mean":
                total = total / w.sum()
            out[key] = total.to(stack.dtype)
        return AggregateResult(out, {})
