"""Local training of one simulated client: from the global state to a delta.

Every client trains a :class:`~asymvlm.trainable.TrainableModel` (the AsymVLM head and loss
temperature, plus a peft LoRA adapter on the text tower when LoRA is federated) and exchanges its
:meth:`~asymvlm.trainable.TrainableModel.exchanged` parameters, named as in training
(``head.*``, ``loss_fn.logit_scale``, ``peft_model.*``). :func:`client_update` loads the global
parameters, optionally measures the loss and the full gradient norm at the global model (q-FFL,
AdaFedAdam), runs ``local_steps`` of SGD on index-drawn batches of the client's data with the
recipe's client-side terms (FedProx's proximal gradient ``mu (theta - theta_global)``, GHBM's
momentum: a displacement ``-beta / J m_t`` per step, outside the local optimizer's momentum) and
returns ``delta = theta_local - theta_global`` with the client's diagnostics. With
``options.masks`` (TaLoS sparse fine-tuning) only the masked entries move
(:class:`asymvlm.masks.SparseMasks`, the mechanism ``asymvlm-train --mask_file`` uses), so the delta
is exactly zero elsewhere and a client need only send the masked values (:func:`upload_bytes`).

Example:
    >>> import torch
    >>> from asymvlm.batching import IndexBatcher
    >>> from asymvlm.heads import HeadConfig
    >>> model = build_client_model(HeadConfig(dim=8, hidden_dims=(16,)), seed=0)
    >>> x = torch.nn.functional.normalize(torch.randn(32, 8), dim=-1)
    >>> data = IndexBatcher(x, x, torch.arange(32), batch_size=8, seed=0)
    >>> res = client_update(model, model.get_params(), data, ClientOptions(local_steps=2), client=0)
    >>> sorted(res.delta) == sorted(model.exchanged()) and res.loss_after > 0
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from asymvlm.federated.core import Params
from asymvlm.heads import HeadConfig, TextHead
from asymvlm.losses import AsymVLMLoss
from asymvlm.masks import SparseMasks
from asymvlm.trainable import Trainable, TrainableModel

__all__ = [
    "ClientOptions",
    "ClientResult",
    "build_client_model",
    "client_update",
    "client_loss",
    "check_masks",
    "upload_bytes",
]


@dataclass(frozen=True)
class ClientOptions:
    """Local training of a round."""

    local_steps: int = 10
    local_lr: float = 0.1
    batch_size: int = 256
    momentum: float = 0.0
    proximal_mu: float = 0.0
    ghbm_beta: float = 0.0
    loss_batches: int = 4  # batches used for the loss / gradient norm at the global model
    masks: Mapping[str, Tensor] | None = None  # sparse fine-tuning (TaLoS): {exchanged name: bool}, True = trained


@dataclass
class ClientResult:
    client: Any
    delta: Params
    num_examples: int
    loss_before: float | None = None
    loss_after: float | None = None
    grad_norm: float | None = None


def build_client_model(
    head_config: HeadConfig,
    *,
    trainable: Trainable = "head",
    encoder: Any = None,
    lora: dict[str, Any] | None = None,
    freeze_lora_a: bool = False,
    seed: int = 0,
    loss_kwargs: dict[str, Any] | None = None,
) -> TrainableModel:
    """The model every client trains: a fresh head (seeded), the loss temperature and, for
    ``trainable`` in (lora, both), a peft LoRA adapter on ``encoder``'s text tower
    (``lora = dict(r, alpha, dropout, target_modules)``)."""
    if trainable not in ("head", "lora", "both"):
        raise ValueError(f"trainable must be head, lora or both, got {trainable!r}")
    torch.manual_seed(seed)
    head = TextHead(config=head_config, validate=False)
    loss_fn = AsymVLMLoss(**(loss_kwargs or {}))
    peft_model = None
    if trainable in ("lora", "both"):
        if encoder is None:
            raise ValueError("federating a LoRA adapter needs the encoder")
        from asymvlm.lora import add_text_lora

        peft_model = add_text_lora(encoder, **(lora or {}))
    return TrainableModel(head, loss_fn, encoder, peft_model, trainable=trainable, freeze_lora_a=freeze_lora_a)


def client_loss(model: TrainableModel, batcher: Any, batches: int, *, grad: bool = False) -> tuple[float, float | None]:
    """Mean loss over the first ``batches`` batches of a client's data (and the norm of the mean
    gradient there when ``grad``); the model is left unchanged."""
    trained = set(model.trained_names())
    params = [p for k, p in model.exchanged().items() if k in trained]
    total, n = 0.0, 0
    grads = None
    for i in range(batches):
        batch = batcher.batch(i)
        if grad:
            loss = model.batch_loss(batch)
            g = torch.autograd.grad(loss, params, allow_unused=True)
            g = [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params)]
            grads = g if grads is None else [a + b for a, b in zip(grads, g)]
        else:
            with torch.no_grad():
                loss = model.batch_loss(batch)
        total += float(loss.detach())
        n += 1
    norm = None
    if grads is not None:
        norm = math.sqrt(sum(float((g / n).double().pow(2).sum()) for g in grads))
    return total / n, norm


def client_update(
    model: TrainableModel,
    global_params: Mapping[str, Tensor],
    batcher: Any,
    options: ClientOptions,
    *,
    client: Any = None,
    num_examples: int | None = None,
    seed: int = 0,
    ghbm_momentum: Mapping[str, Tensor] | None = None,
    need_loss_before: bool = False,
    need_grad_norm: bool = False,
) -> ClientResult:
    """Train one client locally from ``global_params`` and return its delta.

    ``batcher`` yields this client's batches by index (``batcher.batch(i)``; seeded, so the same
    round replays identically). ``seed`` seeds anything else random (LoRA dropout).
    """
    torch.manual_seed(seed)
    model.set_params(global_params)
    model.train()
    names = model.trained_names()
    named = model.exchanged()
    params = [named[k] for k in names]
    loss_before = grad_norm = None
    lb = min(options.loss_batches, max(1, getattr(batcher, "num_batches", options.loss_batches)))
    if need_loss_before or need_grad_norm:
        loss_before, grad_norm = client_loss(model, batcher, lb, grad=need_grad_norm)
    opt = torch.optim.SGD(params, lr=options.local_lr, momentum=options.momentum)
    anchor = {k: global_params[k] for k in names}
    ghbm = None
    if ghbm_momentum is not None and options.ghbm_beta > 0:
        # GHBM (Zaccone et al. 2024, Algorithm 1): every local step adds beta / (eta_l J) m_t to the
        # gradient, so the J steps move the client by exactly -beta m_t (the heavy-ball term). Applied
        # here as that displacement, eta_l * beta / (eta_l J) m_t = beta / J m_t per step, outside the
        # optimizer: through SGD's momentum buffer (the clients' --local_momentum mu) it would be
        # multiplied by (1/J) sum_j (1 - mu^j) / (1 - mu) (3.6 at mu 0.9, J 8), a heavy-ball
        # coefficient of 3.2 for beta 0.9: unstable at server lr 1 and on the edge at 0.3
        # (issue 26: the demo's GHBM at chance on another machine). Without local momentum the
        # two are the same algorithm (tests/test_ghbm.py).
        c = options.ghbm_beta / options.local_steps
        ghbm = {k: c * ghbm_momentum[k] for k in names}
    masks = SparseMasks(dict(options.masks), model) if options.masks else None
    loss = None
    for step in range(options.local_steps):
        batch = batcher.batch(step)
        loss = model.batch_loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            for k, p in zip(names, params):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                if options.proximal_mu > 0:  # FedProx: grad of mu/2 ||theta - theta_global||^2
                    p.grad.add_(p.detach() - anchor[k], alpha=options.proximal_mu)
        if masks is not None:  # entries outside the mask keep their value exactly, whatever SGD does there
            masks.before_step()
        opt.step()
        if ghbm is not None:
            with torch.no_grad():
                for k, p in zip(names, params):
                    p.sub_(ghbm[k].to(p.dtype))
        if masks is not None:
            masks.after_step()
    loss_after, _ = client_loss(model, batcher, lb)
    new = model.get_params()
    delta = {k: new[k] - global_params[k] for k in global_params}
    return ClientResult(
        client, delta, int(num_examples if num_examples is not None else 0), loss_before, loss_after, grad_norm
    )


def check_masks(model: TrainableModel, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Masks for federated clients: bool tensors named like the model's parameters (a mask file
    from :func:`asymvlm.merging.talos.calibrate_mask` or for ``asymvlm-train --mask_file``), each
    naming a parameter the clients train; anything else is a :class:`ValueError` naming it."""
    trained = set(model.trained_names())
    named = dict(model.named_parameters())
    for name, m in masks.items():
        if name not in trained:
            where = "is not trained by the clients" if name in named else "names no parameter"
            raise ValueError(f"mask {name!r} {where}; the clients train: {sorted(trained)[:6]}...")
        if m.dtype != torch.bool:
            raise ValueError(f"mask {name!r} must be a bool tensor, got {m.dtype}")
    SparseMasks(dict(masks), model)  # shapes
    return dict(masks)


def upload_bytes(params: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None) -> dict[str, float]:
    """Bytes one client uploads per round: dense (every exchanged value) and sparse (only the values
    inside the masks: server and clients share the mask, so no indices travel)."""
    dense = sum(v.numel() * v.element_size() for v in params.values())
    sent = sum(
        (int(masks[k].sum()) if masks is not None and k in masks else v.numel()) * v.element_size()
        for k, v in params.items()
    )
    return {"dense_bytes": dense, "sent_bytes": sent, "saving": 1.0 - sent / dense if dense else 0.0}


# ----------------------------------------------------------------------------------------------
# the LoRA layers of a client model, and the frozen base weights the exact modes fold into
# ----------------------------------------------------------------------------------------------
_PEFT_ROOT = "peft_model.base_model.model."


def lora_layer_keys(params: Mapping[str, Tensor]) -> dict[str, tuple[str, str]]:
    """``{layer: (key of A, key of B)}`` for the LoRA factors among exchanged ``params``."""
    out: dict[str, dict[str, str]] = {}
    for k in params:
        for ab in ("A", "B"):
            marker = f".lora_{ab}."
            if marker in k:
                out.setdefault(k.split(marker)[0], {})[ab] = k
    return {layer: (d["A"], d["B"]) for layer, d in out.items()}


def module_path(layer: str) -> str:
    """The adapted module's path in the encoder's own model (peft's wrapper prefix removed)."""
    return layer[len(_PEFT_ROOT) :] if layer.startswith(_PEFT_ROOT) else layer


def get_base(model: TrainableModel, layers: Mapping[str, Any]) -> Params:
    """The current frozen base weight of every adapted layer."""
    named = dict(model.named_parameters())
    return {layer: named[f"{layer}.base_layer.weight"].detach().clone() for layer in layers}


@torch.no_grad()
def set_base(model: TrainableModel, base: Mapping[str, Tensor]) -> None:
    """Write the frozen base weights (the exact LoRA modes fold the server's Delta W into them)."""
    named = dict(model.named_parameters())
    for layer, w in base.items():
        named[f"{layer}.base_layer.weight"].copy_(w)
