"""peft LoRA on the frozen text tower (open_clip and transformers backends), and LoRA factor helpers.

Default target modules (a regex that peft full-matches against module names):

* open_clip: ``transformer.resblocks.<i>.attn`` (the ``nn.MultiheadAttention``: peft adapts its
  fused q/k/v projection and output projection) and ``mlp.c_fc`` / ``mlp.c_proj`` of every text
  block; the vision tower (``visual.*``) is never touched.
* transformers: ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` and ``mlp.fc1`` / ``mlp.fc2`` of
  every ``text_model.encoder.layers.<i>``.

The adapter is saved in peft's own format (``adapter_config.json`` + ``adapter_model.safetensors``)
and loaded back with ``peft.PeftModel.from_pretrained`` (see :func:`asymvlm.model.apply_text_adapter`).

Helpers shared by federated LoRA aggregation and LoRA merging: :func:`dense_delta` (the exact
``sum_k p_k s_k B_k A_k``), :func:`low_rank_factors` (best rank-r pair by SVD),
:func:`split_peft_state` / :func:`join_peft_state` (peft state dicts <-> ``{layer: (A, B)}``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from asymvlm.errors import ConfigError, InputError

__all__ = [
    "DEFAULT_TARGETS",
    "add_text_lora",
    "text_features",
    "dense_delta",
    "low_rank_factors",
    "split_peft_state",
    "join_peft_state",
]

DEFAULT_TARGETS = {
    "open_clip": r"transformer\.resblocks\.\d+\.(attn|mlp\.c_fc|mlp\.c_proj)",
    "hf": r"text_model\.encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))",
}


def add_text_lora(
    encoder: Any, *, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, target_modules: str = ""
) -> nn.Module:
    """Inject LoRA layers into ``encoder.model``'s text tower (in place) and return the peft model.

    Only the LoRA parameters require gradients; the encoder keeps working (its text embeddings now
    go through the adapter).
    """
    from peft import LoraConfig, get_peft_model

    if getattr(encoder.model, "peft_config", None):  # peft injects in place: a second adapter would stack
        raise InputError(
            f"the text tower of {encoder.spec} already carries a LoRA adapter (injected in place by an earlier "
            "run): load a fresh encoder for each model that adapts it"
        )
    target = target_modules or DEFAULT_TARGETS[encoder.backend]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target, bias="none")
    try:
        peft_model = get_peft_model(encoder.model, config)
    except ValueError as err:
        raise ConfigError(f"LoRA target_modules {target!r} matched no module of {encoder.spec}: {err}") from err
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    if not trainable or any(".visual." in n or "vision_model" in n for n in trainable):
        raise ConfigError(f"LoRA targets must select text-tower modules only, got {trainable[:4]}")
    return peft_model


def text_features(encoder: Any, tokens: Tensor | dict[str, Tensor]) -> Tensor:
    """Differentiable (unnormalised) text features through the (adapted) text tower."""
    if isinstance(tokens, Tensor):
        tokens = {"input_ids": tokens}
    return encoder._text_features(tokens)


def dense_delta(
    A: Sequence[Tensor], B: Sequence[Tensor], weights: Sequence[float], scalings: Sequence[float] | float
) -> Tensor:
    """The exact ``sum_k p_k s_k B_k A_k`` (float64 accumulation)."""
    s = [scalings] * len(A) if isinstance(scalings, (int, float)) else list(scalings)
    out = None
    for a, b, p, sk in zip(A, B, weights, s):
        term = (p * sk) * (b.double() @ a.double())
        out = term if out is None else out + term
    return out.to(A[0].dtype)


def low_rank_factors(delta: Tensor, rank: int, scaling: float = 1.0) -> tuple[Tensor, Tensor, float]:
    """The best rank-``rank`` LoRA pair for a dense update (Eckart–Young, by SVD in float64):
    ``scaling * B @ A`` is the truncated SVD of ``delta``, the singular values split evenly
    between the factors. Returns ``(A, B, relative Frobenius error of the truncation)``."""
    if rank < 1:
        raise ConfigError(f"rank must be >= 1, got {rank}")
    u, sv, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank, sv.numel())
    root = sv[:r].sqrt()
    b = (u[:, :r] * root / scaling**0.5).to(delta.dtype)
    a = (root.unsqueeze(1) * vh[:r] / scaling**0.5).to(delta.dtype)
    err = float(sv[r:].pow(2).sum().sqrt() / sv.pow(2).sum().sqrt().clamp_min(1e-300))
    return a, b, err


_PEFT_KEY = re.compile(r"^(?P<layer>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def split_peft_state(state: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """``{layer: {"A": tensor, "B": tensor}}`` from a peft LoRA state dict
    (keys ``<layer>.lora_A[.<adapter>].weight``); other keys are an error."""
    out: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise InputError(f"{key!r} is not a LoRA factor (<layer>.lora_A/B[.adapter].weight)")
        out.setdefault(m.group("layer"), {})[m.group("ab")] = value
    incomplete = [layer for layer, ab in out.items() if set(ab) != {"A", "B"}]
    if incomplete:
        raise InputError(f"LoRA layers without both A and B: {incomplete[:4]}")
    return out


def join_peft_state(layers: Mapping[str, tuple[Tensor, Tensor]], adapter: str | None = None) -> dict[str, Tensor]:
    """Inverse of :func:`split_peft_state` for ``{layer: (A, B)}``."""
    mid = f".{adapter}" if adapter else ""
    out = {}
    for layer, (a, b) in layers.items():
        out[f"{layer}.lora_A{mid}.weight"] = a
        out[f"{layer}.lora_B{mid}.weight"] = b
    return out
