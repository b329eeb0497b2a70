"""LiNeS: post-merge layer scaling, composable after any merge method.

LiNeS (Wang et al., ICLR 2025, "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances
Model Merging", https://arxiv.org/abs/2410.17146) scales the merged task vector by a factor that
grows linearly with depth: shallow layers, which hold the general features every task (and the base
domain) relies on, keep little of the update; deep, task-specific layers keep more. For a multi-task
merge ``tau_m`` of ``T`` task vectors the paper (and its code) scales block ``l`` of ``L`` by

    ``lambda(l) = alpha + beta * l / (L - 1)``,  ``alpha = |sum_t tau_t|_1 / (T |tau_m|_1)``,

and tensors outside the blocks (embeddings, final norms and projections) by ``alpha``; ``beta`` is
the one tuned coefficient (on validation), and the merge's own ``lam`` is left at 1 by the paper.
``alpha`` makes the shallowest block's update the size of the task vectors' mean (``sum / T`` in L1).

A tensor's block is the first ``.N.`` component of its name (``transformer.resblocks.3.attn...``,
``text_model.encoder.layers.3...``, ``mlp.2.weight`` of an AsymVLM head's ``nn.Sequential``); ``L``
is one more than the largest block index present unless ``blocks`` is given. Implemented as an
aggregator wrapping the method's (:class:`LinesScaled`): it reads the task vectors once more, key by
key, for the L1 norm of their sum, so it stays memory-bounded like the method it wraps.

Example:
    >>> import torch
    >>> from asymvlm.federated.core import Sum
    >>> taus = [{"mlp.0.weight": torch.ones(2), "mlp.2.weight": torch.ones(2)}] * 2
    >>> out = LinesScaled(Sum(), beta=0.5)(taus).delta  # alpha = 4 / (2 * 4) = 0.5
    >>> out["mlp.0.weight"].tolist(), out["mlp.2.weight"].tolist()
    ([1.0, 1.0], [2.0, 2.0])
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from asymvlm.errors import ConfigError
from asymvlm.federated.core import AggregateResult, Aggregator, keys_of, stack_key

__all__ = ["LinesScaled", "block_index", "lines_scales"]

_BLOCK = re.compile(r"\.(\d+)\.")


def block_index(key: str) -> int | None:
    """The block of a parameter: the first ``.N.`` component of its name (None outside blocks).

    Example:
        >>> block_index("transformer.resblocks.11.mlp.c_fc.weight"), block_index("ln_final.weight")
        (11, None)
    """
    m = _BLOCK.search(f".{key}.")
    return int(m.group(1)) if m else None


def lines_scales(keys: Iterable[str], alpha: float, beta: float, blocks: int = 0) -> dict[str, float]:
    """``{key: alpha + beta * l / (L - 1)}`` for keys in block ``l``, ``alpha`` for the others
    (``L = blocks``, or one more than the largest block index; a single block gets ``alpha + beta``).

    Example:
        >>> lines_scales(["mlp.0.weight", "mlp.4.weight", "scale"], alpha=1.0, beta=1.0)
        {'mlp.0.weight': 1.0, 'mlp.4.weight': 2.0, 'scale': 1.0}
    """
    keys = list(keys)
    found = [b for b in map(block_index, keys) if b is not None]
    n = blocks or (max(found) + 1 if found else 0)
    if found and max(found) >= n:
        raise ConfigError(f"lines_blocks={blocks} but a key is in block {max(found)}")
    out = {}
    for k in keys:
        b = block_index(k)
        out[k] = alpha if b is None else alpha + beta * (b / (n - 1) if n > 1 else 1.0)
    return out


@dataclass
class LinesScaled(Aggregator):
    """Any aggregator's output rescaled per block by LiNeS (module docstring).

    Args:
        inner: the merge method's aggregator.
        beta: the depth coefficient (the paper's tuned one; 0 = a uniform ``alpha``).
        blocks: the number of blocks ``L`` (0: inferred from the key names).
        alpha: the shallowest scale; ``None`` = the paper's multi-task rule
            ``|sum_t tau_t|_1 / (T |tau_m|_1)``.
    """

    inner: Aggregator
    beta: float = 0.0
    blocks: int = 0
    alpha: float | None = None
    reference = "https://arxiv.org/abs/2410.17146"

    def __post_init__(self) -> None:
        if not math.isfinite(self.beta):
            raise ConfigError(f"lines beta must be a finite number, got {self.beta}")
        if self.blocks < 0:
            raise ConfigError(f"lines_blocks must be >= 0 (0: inferred), got {self.blocks}")

    def __call__(self, deltas, weights=None, **info):
        res = self.inner(deltas, weights, **info)
        alpha = self.alpha
        if alpha is None:
            # L1 norms accumulated in float64 (the sums over tasks in the tensors' dtype: alpha is one ratio)
            summed = sum(float(stack_key(deltas, k).sum(0).abs().sum(dtype=torch.float64)) for k in keys_of(deltas))
            merged = sum(float(v.abs().sum(dtype=torch.float64)) for v in res.delta.values())
            alpha = summed / (len(deltas) * merged) if merged > 0 else 1.0
        scales = lines_scales(res.delta.keys(), alpha, self.beta, self.blocks)
        out = {k: v * scales[k] if v.is_floating_point() else v for k, v in res.delta.items()}
        lo, hi = min(scales.values(), default=alpha), max(scales.values(), default=alpha)
        return AggregateResult(out, {**res.info, "lines": {"alpha": alpha, "beta": self.beta, "scales": [lo, hi]}})


def _check_float(name: str, value: object) -> float:
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    return out


def wrap(aggregator: Aggregator, lines: object, blocks: object = 0) -> Aggregator:
    """``aggregator`` followed by LiNeS with ``beta = lines`` (None: unchanged)."""
    if lines is None:
        return aggregator
    b = _check_float("lines_blocks", blocks)
    if b != int(b):
        raise ConfigError(f"lines_blocks must be an integer, got {blocks!r}")
    return LinesScaled(aggregator, beta=_check_float("lines", lines), blocks=int(b))
