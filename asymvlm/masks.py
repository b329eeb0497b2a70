"""Sparse training masks: parameters change only where their boolean mask is True.

A mask file is a safetensors file ``{parameter name: bool tensor of the parameter's shape}``
(names as in the trained module, e.g. ``head.mlp.0.weight``). Before each optimizer step the
gradients outside the masks are zeroed (so optimizer moments never accumulate there), and after
it the entries outside the masks are restored to their previous values, which also undoes any
weight decay (decoupled or not) and momentum there: updates and weight decay are exactly zero
outside the mask, whatever the optimizer. Parameters without a mask train normally. This is the
hook the TaLoS sparse fine-tuning of the merging package uses.

Example:
    >>> import torch
    >>> lin = torch.nn.Linear(2, 2)
    >>> masks = SparseMasks({"weight": torch.tensor([[True, False], [False, True]])}, lin)
    >>> before = lin.weight.detach().clone()
    >>> opt = torch.optim.SGD(lin.parameters(), lr=1.0, weight_decay=0.1)
    >>> lin(torch.ones(1, 2)).sum().backward()
    >>> masks.before_step(); opt.step(); masks.after_step()
    >>> bool(lin.weight[0, 1] == before[0, 1]) and bool(lin.weight[0, 0] != before[0, 0])
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from asymvlm.errors import ArtefactError, InputError

__all__ = ["SparseMasks", "load_masks", "save_masks", "mask_density", "MASKS_TYPE"]

MASKS_TYPE = "asymvlm.masks"


def load_masks(path: str | Path) -> dict[str, Tensor]:
    """Read a mask file (bool tensors) with clear errors."""
    from asymvlm.io import load_safetensors

    masks = load_safetensors(path, mmap=False)
    bad = [k for k, v in masks.items() if v.dtype != torch.bool]
    if bad:
        raise ArtefactError(f"{path}: masks must be bool tensors; {bad} are not")
    return masks


class SparseMasks:
    """Apply boolean masks to a module's parameters around optimizer steps."""

    def __init__(self, masks: dict[str, Tensor], module: nn.Module):
        params = dict(module.named_parameters())
        unknown = sorted(set(masks) - set(params))
        if unknown:
            raise InputError(f"mask names not among the trained parameters: {unknown}; known: {sorted(params)[:8]}...")
        self.entries: list[tuple[str, nn.Parameter, Tensor]] = []
        for name, mask in masks.items():
            p = params[name]
            if tuple(mask.shape) != tuple(p.shape):
                raise InputError(f"mask {name!r} has shape {tuple(mask.shape)}, the parameter {tuple(p.shape)}")
            self.entries.append((name, p, mask.to(p.device)))
        self._saved: list[Tensor] = []

    def before_step(self) -> None:
        """Zero gradients outside the masks and remember the current values."""
        self._saved = []
        for _, p, mask in self.entries:
            if p.grad is not None:
                p.grad.mul_(mask)
            self._saved.append(p.detach().clone())

    @torch.no_grad()
    def after_step(self) -> None:
        """Restore every entry outside the masks to its value before the step."""
        for (_, p, mask), old in zip(self.entries, self._saved):
            p.copy_(torch.where(mask, p, old))
        self._saved = []

    def density(self) -> float:
        total = sum(m.numel() for _, _, m in self.entries)
        return float(sum(int(m.sum()) for _, _, m in self.entries)) / max(1, total)


def mask_density(masks: Mapping[str, Tensor]) -> float:
    """Fraction of entries that are trainable."""
    total = sum(m.numel() for m in masks.values())
    return float(sum(int(m.sum()) for m in masks.values())) / max(1, total)


def save_masks(masks: Mapping[str, Tensor], path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write the masks as bool safetensors (atomically) with a JSON sidecar ``<name>.json``
    (density and the calibration settings)."""
    from asymvlm.io import atomic_save_safetensors, atomic_write_json

    bad = [k for k, v in masks.items() if v.dtype != torch.bool]
    if bad:
        raise InputError(f"masks must be bool tensors; {bad[:4]} are not")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors({k: v.contiguous() for k, v in masks.items()}, path)
    atomic_write_json(
        {"type": MASKS_TYPE, "format_version": 1, "density": mask_density(masks), **(meta or {})},
        path.with_name(path.stem + ".json"),
    )
    return path
