"""Local training of one simulated client: from the global state to a delta.

A :class:`FederatedTask` owns the trained module (the AsymVLM head and loss temperature, plus a
peft LoRA adapter on the text tower when LoRA is federated) and moves flat parameter dicts in
and out of it. :func:`client_update` loads the global parameters, optionally measures the loss and
the full gradient norm at the global model (q-FFL, AdaFedAdam), runs ``local_steps`` of SGD on
index-drawn batches of the client's data with the recipe's client-side terms (FedProx's proximal
gradient ``mu (theta - theta_global)``, GHBM's momentum ``beta / (eta_l J) m_t``) and returns
``delta = theta_local - theta_global`` with the client's diagnostics. With ``options.masks``
(TaLoS sparse fine-tuning, :mod:`asymvlm.merging.talos`) only the masked entries move, so the delta is
exactly zero elsewhere and a client need only send the masked values (:func:`mask_for_task`,
:func:`upload_bytes`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from asymvlm.federated.core import Params
from torch import Tensor, nn

from asymvlm.heads import HeadConfig, TextHead
from asymvlm.losses import AsymVLMLoss

__all__ = [
    "ClientOptions",
    "ClientResult",
    "FederatedTask",
    "client_update",
    "client_loss",
    "mask_for_task",
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


class FederatedTask:
    """The module trained by every client, and how its parameters are exchanged.

    Args:
        head_config: the text head's architecture.
        trainable: ``"head"``, ``"lora"`` or ``"both"`` (which parameters clients train and send;
            the loss temperature always travels with the head).
        encoder: the frozen encoder (needed for LoRA).
        lora: ``dict(r, alpha, dropout, target_modules)`` for the text tower.
        freeze_lora_a: keep every LoRA ``A`` fixed (FFA-LoRA).
        loss_kwargs: options of :class:`~asymvlm.losses.AsymVLMLoss`.
    """

    def __init__(
        self,
        head_config: HeadConfig,
        *,
        trainable: str = "head",
        encoder: Any = None,
        lora: dict[str, Any] | None = None,
        freeze_lora_a: bool = False,
        seed: int = 0,
        loss_kwargs: dict[str, Any] | None = None,
    ):
        if trainable not in ("head", "lora", "both"):
            raise ValueError(f"trainable must be head, lora or both, got {trainable!r}")
        torch.manual_seed(seed)
        self.trainable = trainable
        self.head = TextHead(config=head_config, validate=False)
        self.loss_fn = AsymVLMLoss(**(loss_kwargs or {}))
        self.encoder = encoder
        self.peft_model: nn.Module | None = None
        if trainable in ("lora", "both"):
            if encoder is None:
                raise ValueError("federating a LoRA adapter needs the encoder")
            from asymvlm.lora import add_text_lora

            self.peft_model = add_text_lora(encoder, **(lora or {}))
        self.freeze_lora_a = freeze_lora_a
        self.module = nn.ModuleDict({"head": self.head, "loss": self.loss_fn})
        if self.peft_model is not None:
            self.module["text"] = self.peft_model

    def _named(self) -> dict[str, nn.Parameter]:
        out = {}
        if self.trainable in ("head", "both"):
            out.update({f"head.{k}": p for k, p in self.head.named_parameters()})
            out["loss.logit_scale"] = self.loss_fn.logit_scale
        if self.peft_model is not None and self.trainable in ("lora", "both"):
            out.update({f"text.{k}": p for k, p in self.peft_model.named_parameters() if "lora_" in k})
        return out

    def trained_names(self) -> list[str]:
        """The parameters clients change (FFA-LoRA's frozen A excluded)."""
        return [k for k in self._named() if not (self.freeze_lora_a and ".lora_A." in k)]

    def get_params(self) -> Params:
        """The exchanged state (every trainable parameter, frozen LoRA A included)."""
        return {k: p.detach().clone() for k, p in self._named().items()}

    @torch.no_grad()
    def set_params(self, params: Mapping[str, Tensor]) -> None:
        named = self._named()
        missing = sorted(set(named) - set(params))
        if missing:
            raise KeyError(f"global state misses {missing[:4]}")
        for k, p in named.items():
            p.copy_(params[k])

    def text(self, batch_text: Any) -> Tensor:
        """Text embeddings of a batch: cached embeddings, or token ids through the adapted tower."""
        if self.peft_model is None:
            return batch_text
        from asymvlm.lora import text_features

        return nn.functional.normalize(text_features(self.encoder, batch_text).float(), dim=-1)

    def loss(self, batch: Mapping[str, Any]) -> Tensor:
        from asymvlm.losses import positives_from_ids

        q = self.head(self.text(batch["text"]))
        ids = batch["ids"]
        positives = None if self.loss_fn.positive_mode == "diagonal" else positives_from_ids(ids, ids)
        return self.loss_fn(q, batch["images"], positives)


def client_loss(task: FederatedTask, batcher: Any, batches: int, *, grad: bool = False) -> tuple[float, float | None]:
    """Mean loss over the first ``batches`` batches of a client's data (and the norm of the mean
    gradient there when ``grad``); the model is left unchanged."""
    params = [p for k, p in task._named().items() if k in set(task.trained_names())]
    total, n = 0.0, 0
    grads = None
    for i in range(batches):
        batch = batcher.batch(i)
        if grad:
            loss = task.loss(batch)
            g = torch.autograd.grad(loss, params, allow_unused=True)
            g = [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params)]
            grads = g if grads is None else [a + b for a, b in zip(grads, g)]
        else:
            with torch.no_grad():
                loss = task.loss(batch)
        total += float(loss.detach())
        n += 1
    norm = None
    if grads is not None:
        norm = math.sqrt(sum(float((g / n).double().pow(2).sum()) for g in grads))
    return total / n, norm


def client_update(
    task: FederatedTask,
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
    task.set_params(global_params)
    task.module.train()
    names = task.trained_names()
    named = task._named()
    params = [named[k] for k in names]
    loss_before = grad_norm = None
    lb = min(options.loss_batches, max(1, getattr(batcher, "num_batches", options.loss_batches)))
    if need_loss_before or need_grad_norm:
        loss_before, grad_norm = client_loss(task, batcher, lb, grad=need_grad_norm)
    opt = torch.optim.SGD(params, lr=options.local_lr, momentum=options.momentum)
    anchor = {k: global_params[k] for k in names}
    ghbm = None
    if ghbm_momentum is not None and options.ghbm_beta > 0:
        # GHBM: every local step adds beta / (eta_l J) * m_t to the gradient (Zaccone et al. 2024)
        c = options.ghbm_beta / (options.local_lr * options.local_steps)
        ghbm = {k: c * ghbm_momentum[k] for k in names}
    loss = None
    for step in range(options.local_steps):
        batch = batcher.batch(step)
        loss = task.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            for k, p in zip(names, params):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                if options.proximal_mu > 0:  # FedProx: grad of mu/2 ||theta - theta_global||^2
                    p.grad.add_(p.detach() - anchor[k], alpha=options.proximal_mu)
                if ghbm is not None:
                    p.grad.add_(ghbm[k])
                if options.masks is not None and k in options.masks:
                    p.grad.mul_(options.masks[k])
        saved = {k: named[k].detach().clone() for k in names if options.masks is not None and k in options.masks}
        opt.step()
        if saved:  # entries outside the mask keep their value exactly (whatever the optimizer does there)
            with torch.no_grad():
                for k, old in saved.items():
                    named[k].copy_(torch.where(options.masks[k], named[k], old))
    loss_after, _ = client_loss(task, batcher, lb)
    new = task.get_params()
    delta = {k: new[k] - global_params[k] for k in global_params}
    return ClientResult(
        client, delta, int(num_examples if num_examples is not None else 0), loss_before, loss_after, grad_norm
    )


# names of ``asymvlm.training.loop.TrainModel`` (what asymvlm-train and calibrate_mask use) -> exchanged names
_MASK_PREFIXES = (("peft_model.", "text."), ("loss_fn.", "loss."))


def mask_for_task(task: FederatedTask, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Masks keyed like the exchanged state (``TrainModel`` names such as ``peft_model.*`` and
    ``loss_fn.*`` are accepted and renamed); unknown names or wrong shapes are errors."""
    named = task._named()
    out = {}
    for name, m in masks.items():
        key = name
        for a, b in _MASK_PREFIXES:
            if key.startswith(a):
                key = b + key[len(a) :]
        if key not in named:
            raise ValueError(f"mask {name!r} names no exchanged parameter; known: {sorted(named)[:6]}...")
        if m.dtype != torch.bool:
            raise ValueError(f"mask {name!r} must be a bool tensor, got {m.dtype}")
        if tuple(m.shape) != tuple(named[key].shape):
            raise ValueError(f"mask {name!r} has shape {tuple(m.shape)}, the parameter {tuple(named[key].shape)}")
        out[key] = m
    return out


def upload_bytes(params: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None) -> dict[str, float]:
    """Bytes one client uploads per round: dense (every exchanged value) and sparse (only the values
    inside the masks: server and clients share the mask, so no indices travel)."""
    dense = sum(v.numel() * v.element_size() for v in params.values())
    sent = sum(
        (int(masks[k].sum()) if masks is not None and k in masks else v.numel()) * v.element_size()
        for k, v in params.items()
    )
    return {"dense_bytes": dense, "sent_bytes": sent, "saving": 1.0 - sent / dense if dense else 0.0}
