"""Fed3R: a one-shot, exact federated ridge-regression classifier on frozen embeddings.

Fanì et al. 2024, "Accelerating Heterogeneous Federated Learning with Closed-form Classifiers"
(ICML 2024, https://arxiv.org/abs/2406.01116). Each client sends the sufficient statistics of its
frozen features ``phi`` (with a constant 1 appended for the bias) and one-hot labels ``Y``:
``A_k = sum phi phi^T`` and ``b_k = sum phi y^T``. The server solves
``(sum_k A_k + lambda I) W = sum_k b_k`` — exactly the centralised ridge solution, whatever the
partition (sums commute), in one round. Statistics are accumulated in float64.

Example:
    >>> import torch
    >>> x = torch.nn.functional.normalize(torch.randn(20, 8), dim=-1)
    >>> y = torch.randint(0, 3, (20,))
    >>> stats = [client_statistics(x[:10], y[:10], 3), client_statistics(x[10:], y[10:], 3)]
    >>> head = solve(stats, lam=0.01)
    >>> head.predict(x).shape
    torch.Size([20])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from asymvlm.errors import ConfigError, InputError

__all__ = ["Fed3RStatistics", "Fed3RClassifier", "client_statistics", "solve"]


@dataclass
class Fed3RStatistics:
    """A client's sums: ``A`` (d+1, d+1), ``b`` (d+1, C), and its example count."""

    A: Tensor
    b: Tensor
    count: int

    def __add__(self, other: Fed3RStatistics) -> Fed3RStatistics:
        return Fed3RStatistics(self.A + other.A, self.b + other.b, self.count + other.count)


def client_statistics(features: Tensor, labels: Tensor, num_classes: int) -> Fed3RStatistics:
    """``A = sum phi phi^T``, ``b = sum phi onehot(y)^T`` with ``phi = [features, 1]`` (float64)."""
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise InputError(
            f"features (n, d) and labels (n,) expected, got {tuple(features.shape)} and {tuple(labels.shape)}"
        )
    if not bool(torch.isfinite(features).all()):
        raise InputError("features contain NaN or inf")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise InputError(f"labels must be in [0, {num_classes})")
    phi = torch.cat([features.double(), torch.ones(features.shape[0], 1, dtype=torch.float64)], dim=1)
    y = torch.nn.functional.one_hot(labels.long(), num_classes).double()
    return Fed3RStatistics(phi.T @ phi, phi.T @ y, int(features.shape[0]))


@dataclass
class Fed3RClassifier:
    """A linear head ``logits = features @ weight.T + bias`` (``weight`` (C, d), ``bias`` (C,))."""

    weight: Tensor
    bias: Tensor

    def logits(self, features: Tensor) -> Tensor:
        return features.double() @ self.weight.T + self.bias

    def predict(self, features: Tensor) -> Tensor:
        return self.logits(features).argmax(dim=1)


def solve(stats: Sequence[Fed3RStatistics], lam: float = 0.01, *, normalize: bool = False) -> Fed3RClassifier:
    """The ridge solution from the clients' statistics.

    Args:
        stats: the clients' :class:`Fed3RStatistics` (any number, any order).
        lam: the ridge coefficient (the reference implementation's default 0.01); it also
            regularises the bias row.
        normalize: divide each class's weight and bias by the weight's norm (the reference code's
            ``normalize_W``; changes the argmax, used there for evaluation).
    """
    if not stats:
        raise InputError("no client statistics")
    if lam < 0:
        raise ConfigError(f"lam must be >= 0, got {lam}")
    total = stats[0]
    for s in stats[1:]:
        if s.A.shape != total.A.shape or s.b.shape != total.b.shape:
            raise InputError(f"client statistics of different shapes: {tuple(s.b.shape)} vs {tuple(total.b.shape)}")
        total = total + s
    a = total.A + lam * torch.eye(total.A.shape[0], dtype=torch.float64)
    w = torch.linalg.solve(a, total.b)  # (d+1, C)
    weight, bias = w[:-1].T.contiguous(), w[-1].contiguous()
    if normalize:
        norms = weight.norm(dim=1).clamp_min(1e-30)
        weight, bias = weight / norms.unsqueeze(1), bias / norms
    return Fed3RClassifier(weight, bias)
