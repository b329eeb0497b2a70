"""Zero-shot metrics: accuracy, and selective accuracy as the most uncertain predictions are dropped.

Selective prediction keeps the ``coverage`` fraction of samples with the lowest uncertainty. The
risk–coverage curve has risk = 1 - accuracy on the kept samples at coverage ``k/N`` for
``k = 1..N``; AURC is its mean over those N points (lower is better; a random order of the
samples scores about the overall error rate, an order that puts every error last scores least).

Example:
    >>> import torch
    >>> correct = torch.tensor([True, True, False, True])
    >>> unc = torch.tensor([0.1, 0.2, 0.9, 0.3])      # the error is the most uncertain
    >>> cov, acc = risk_coverage(unc, correct)
    >>> acc.tolist()
    [1.0, 1.0, 1.0, 0.75]
    >>> round(aurc(unc, correct), 4)
    0.0625
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from asymvlm.errors import ConfigError, InputError

__all__ = ["accuracy", "risk_coverage", "aurc", "selective_accuracy_at"]


def accuracy(predictions: Tensor, labels: Tensor) -> float:
    """Fraction of ``predictions == labels`` (abstentions, -1, count as wrong)."""
    if predictions.shape != labels.shape or predictions.numel() == 0:
        raise InputError(f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} must match")
    return float((predictions == labels).double().mean())


def risk_coverage(uncertainty: Tensor, correct: Tensor) -> tuple[Tensor, Tensor]:
    """(coverage (N,), selective accuracy (N,)): keep the k least uncertain, k = 1..N (stable ties)."""
    u = torch.as_tensor(uncertainty, dtype=torch.float64).reshape(-1)
    c = torch.as_tensor(correct).reshape(-1).to(torch.float64)
    if u.shape != c.shape or u.numel() == 0:
        raise InputError(f"uncertainty ({u.numel()}) and correct ({c.numel()}) must be non-empty and match")
    if not bool(torch.isfinite(u).all()):
        raise InputError("uncertainty contains NaN or inf")
    order = torch.from_numpy(np.argsort(u.numpy(), kind="stable"))
    kept = torch.arange(1, u.numel() + 1, dtype=torch.float64)
    return kept / u.numel(), torch.cumsum(c[order], 0) / kept


def aurc(uncertainty: Tensor, correct: Tensor) -> float:
    """Area under the risk–coverage curve (mean selective risk over coverages k/N)."""
    _, acc = risk_coverage(uncertainty, correct)
    return float((1 - acc).mean())


def selective_accuracy_at(uncertainty: Tensor, correct: Tensor, coverage: float) -> float:
    """Accuracy on the ``coverage`` fraction of least uncertain samples (at least one sample)."""
    if not 0 < coverage <= 1:
        raise ConfigError(f"coverage must be in (0, 1], got {coverage}")
    cov, acc = risk_coverage(uncertainty, correct)
    k = max(1, int(round(coverage * cov.numel())))
    return float(acc[k - 1])
