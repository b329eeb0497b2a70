"""TIES and DARE aggregators, and the exact streaming magnitude selection behind global TIES.

Registered as merge methods in :mod:`asymvlm.merging.methods` (whose docstring describes the
options); kept here so each module stays one idea.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from asymvlm.errors import ConfigError
from asymvlm.federated.core import AggregateResult, Aggregator, Params, Sum, keys_of, stack_key

__all__ = ["Ties", "Dare", "kth_smallest_magnitude", "ties_thresholds"]


# ----------------------------------------------------------------------------------------------
# exact streaming selection
# ----------------------------------------------------------------------------------------------
def _magnitude_bits(t: Tensor) -> tuple[Tensor, int]:
    """Non-negative magnitudes as order-preserving integer bit patterns (the sign bit is 0):
    int32 for float32 and narrower, int64 for float64."""
    if t.dtype == torch.float64:
        return t.abs().view(torch.int64), 64
    return t.float().abs().view(torch.int32), 32


def kth_smallest_magnitude(tensors: Callable[[], Any], k: int, bits: int = 32) -> float:
    """The k-th smallest ``|x|`` (1-based) over all tensors yielded by ``tensors()`` (called once per
    pass), exact, with O(65536) memory. Non-negative IEEE floats order like their bit patterns."""
    prefix, remaining = 0, k
    shift = bits
    while shift > 0:
        shift -= 16
        hist = torch.zeros(1 << 16, dtype=torch.int64)
        for t in tensors():
            b, _ = _magnitude_bits(t.reshape(-1))
            if shift + 16 < bits:  # keep only values whose higher bits equal the prefix found so far
                b = b[(b >> (shift + 16)) == prefix]
            hist += torch.bincount(((b >> shift) & 0xFFFF), minlength=1 << 16)
        cum = torch.cumsum(hist, 0)
        digit = int(torch.searchsorted(cum, torch.tensor(remaining)))
        remaining -= int(cum[digit - 1]) if digit > 0 else 0
        prefix = (prefix << 16) | digit
    if bits == 64:
        return float(torch.tensor([prefix], dtype=torch.int64).view(torch.float64))
    return float(torch.tensor([prefix], dtype=torch.int32).view(torch.float32))


def ties_thresholds(deltas: Sequence[Mapping[str, Tensor]], density: float) -> list[float]:
    """Per task, the magnitude threshold of the paper's global top-k: the ``(N - int(N density))``-th
    smallest ``|tau|`` over the whole model (entries ``>=`` it are kept); 0 when nothing is trimmed."""
    out = []
    for d in deltas:
        keys = list(d.keys())
        n = sum(d[k].numel() for k in keys)
        m = n - int(n * density)
        if m <= 0:
            out.append(0.0)
            continue
        bits = 64 if d[keys[0]].dtype == torch.float64 else 32
        out.append(kth_smallest_magnitude(lambda d=d, keys=keys: (d[k] for k in keys), m, bits))
    return out


# ----------------------------------------------------------------------------------------------
# TIES and DARE aggregators
# ----------------------------------------------------------------------------------------------
def _topk_masks(stack: Tensor, density: float) -> Tensor:
    """peft's per-tensor pruning of each task's copy: exactly ``int(density * numel)`` largest
    magnitudes. Found with one batched ``kthvalue`` (linear time) instead of ``topk``; a task whose
    threshold value occurs more than once falls back to ``topk`` so exactly k entries are kept."""
    k_tasks = stack.shape[0]
    flat = stack.reshape(k_tasks, -1).abs()
    n = flat.shape[1]
    k = int(density * n)
    if k <= 0:
        return torch.zeros_like(stack, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(stack, dtype=torch.bool)
    th = flat.kthvalue(n - k + 1, dim=1, keepdim=True).values  # the k-th largest
    mask = flat >= th
    for i in torch.nonzero(mask.sum(1) != k).flatten().tolist():  # ties at the threshold
        row = torch.zeros(n, dtype=torch.bool)
        row[torch.topk(flat[i], k=k, largest=True).indices] = True
        mask[i] = row
    return mask.reshape(stack.shape)


def _disjoint(stack: Tensor, weighted: Tensor, ww: Tensor, sign: Tensor, normalize: str) -> Tensor:
    """The mean of the (weighted) entries that agree with ``sign`` (nonzero, same sign), by count or
    by weight. ``sign`` is -1, 0 or +1 per coordinate; 0 agrees with nothing."""
    agree = (stack * sign) > 0
    num = weighted.masked_fill(~agree, 0).sum(0)
    if normalize == "count":
        return num / agree.sum(0).to(stack.dtype).clamp_min(1.0)
    return num / (ww * agree).sum(0).clamp_min(torch.finfo(stack.dtype).tiny)


@dataclass
class Ties(Aggregator):
    """TIES-merging (Yadav et al. 2023, https://arxiv.org/abs/2306.01708); options in the module
    docstring. Returns the merged task vector (before the ``lam`` scaling)."""

    density: float = 0.2
    scope: str = "global"
    sign: str = "total"
    sign_weighted: bool = False
    normalize: str = "count"
    zero_sign: str = "majority"
    trim: bool = True  # False: no magnitude trim (DARE+TIES)
    reference = "https://arxiv.org/abs/2306.01708"

    def __post_init__(self) -> None:
        if not 0 < self.density <= 1:
            raise ConfigError(f"density must be in (0, 1], got {self.density}")
        for name, value, allowed in (
            ("scope", self.scope, ("global", "per_tensor")),
            ("sign", self.sign, ("total", "frequency")),
            ("normalize", self.normalize, ("count", "weight")),
            ("zero_sign", self.zero_sign, ("majority", "positive", "none")),
        ):
            if value not in allowed:
                raise ConfigError(f"{name}={value!r} is not one of {allowed}")

    def __call__(self, deltas, weights=None, **_):
        k = len(deltas)
        w = torch.tensor([1.0] * k if weights is None else [float(x) for x in weights], dtype=torch.float64)
        thresholds = ties_thresholds(deltas, self.density) if (self.trim and self.scope == "global") else None
        out: Params = {}
        pending_zero: list[tuple[str, Tensor, Tensor, Tensor]] = []  # key, index, value if +, value if -
        sign_total = 0.0
        for key in keys_of(deltas):
            stack = stack_key(deltas, key)  # (K, ...) of this tensor only
            shape = stack.shape[1:]
            # NaN/inf in any task propagate into the plain sum: one check of one tensor, the culprit
            # is looked for only on failure (trimming would otherwise hide a NaN: NaN >= t is False)
            if not bool(torch.isfinite(stack.sum(0)).all()):
                from asymvlm.merging.task_vectors import MergeInputError

                finite = torch.isfinite(stack.reshape(k, -1)).all(1)
                if bool(finite.all()):
                    raise MergeInputError(f"{key!r}: the task vectors' sum overflows")
                raise MergeInputError(f"task vector {int((~finite).nonzero()[0, 0])}: {key!r} contains NaN or inf")
            if self.trim and self.density < 1:
                if thresholds is not None:
                    th = torch.tensor(thresholds, dtype=stack.dtype).view(-1, *([1] * len(shape)))
                    stack = stack.masked_fill(stack.abs() < th, 0)
                else:
                    stack = stack.masked_fill(~_topk_masks(stack, self.density), 0)
            ww = w.to(stack.dtype).view(-1, *([1] * len(shape)))
            weighted = stack if bool((w == 1).all()) else stack * ww
            votes = weighted if self.sign_weighted else stack
            mass = votes.sum(0) if self.sign == "total" else votes.sign().sum(0)
            elected = mass.sign()
            sign_total += float(elected.sum())

            if self.zero_sign == "positive":
                elected = torch.where(elected == 0, torch.ones_like(elected), elected)
            merged = _disjoint(stack, weighted, ww, elected, self.normalize)
            if self.zero_sign == "majority" and bool((elected == 0).any()):
                zero = (elected == 0) & (stack != 0).any(0)
                if bool(zero.any()):
                    idx = torch.nonzero(zero.reshape(-1)).squeeze(1)
                    ones = torch.ones_like(elected)
                    pos = _disjoint(stack, weighted, ww, ones, self.normalize).reshape(-1)[idx]
                    neg = _disjoint(stack, weighted, ww, -ones, self.normalize).reshape(-1)[idx]
                    pending_zero.append((key, idx, pos, neg))
            out[key] = merged
        if pending_zero:  # resolve exact ties with the model-wide majority sign (the paper's rule)
            majority = 1.0 if sign_total >= 0 else -1.0
            for key, idx, pos, neg in pending_zero:
                flat = out[key].reshape(-1)
                flat[idx] = pos if majority > 0 else neg
        return AggregateResult(out, {"thresholds": thresholds})


@dataclass
class Dare(Aggregator):
    """DARE (Yu et al. 2024, https://arxiv.org/abs/2311.03099): drop each entry of each task vector
    with probability ``p`` and rescale the rest by ``1/(1-p)``; then ``sum`` (or TIES without
    magnitude trim, ``then="ties"``). The drop mask of (task i, key) is seeded by ``(seed, i, key)``,
    so it does not depend on the order in which tensors are read."""

    p: float = 0.9
    seed: int = 0
    then: str = "sum"
    ties_options: dict[str, Any] | None = None
    reference = "https://arxiv.org/abs/2311.03099"

    def __post_init__(self) -> None:
        if not 0 <= self.p < 1:
            raise ConfigError(f"drop probability p must be in [0, 1), got {self.p}")
        if self.then not in ("sum", "ties"):
            raise ConfigError(f"then must be 'sum' or 'ties', got {self.then!r}")

    def dropped(self, deltas: Sequence[Mapping[str, Tensor]]) -> list[Mapping[str, Tensor]]:
        return [_Dropped(d, i, self.p, self.seed) for i, d in enumerate(deltas)]

    def __call__(self, deltas, weights=None, **_):
        views = self.dropped(deltas)
        if self.then == "sum":
            return Sum()(views, weights)
        return Ties(**{"density": 1.0, **(self.ties_options or {}), "trim": False})(views, weights)


class _Dropped(Mapping):
    def __init__(self, base: Mapping[str, Tensor], index: int, p: float, seed: int):
        self.base, self.index, self.p, self.seed = base, index, p, seed

    def __getitem__(self, key: str) -> Tensor:
        t = self.base[key]
        digest = int.from_bytes(
            __import__("hashlib").sha256(f"{self.seed}|{self.index}|{key}".encode()).digest()[:8], "little"
        )
        g = torch.Generator().manual_seed(digest)
        keep = torch.rand(t.shape, generator=g) >= self.p
        return torch.where(keep, t / (1 - self.p), torch.zeros_like(t))

    def __iter__(self):
        return iter(self.base)

    def __len__(self):
        return len(self.base)
