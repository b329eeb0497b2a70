"""The one trainable model: a text head and the loss temperature, plus a LoRA-adapted text tower.

:class:`TrainableModel` is what ``asymvlm-train`` optimises, what every federated client trains
and exchanges, and what TaLoS calibrates masks on, so its parameter names are the one naming
scheme of the package: ``head.*`` (the :class:`~asymvlm.heads.TextHead`), ``loss_fn.logit_scale``
(the temperature of :class:`~asymvlm.losses.AsymVLMLoss`) and ``peft_model.*`` (the peft LoRA
adapter on the frozen text tower). A mask file (``{name: bool tensor}``) written by
:func:`asymvlm.merging.talos.calibrate_mask` therefore applies unchanged to training and to
federated clients.

``forward(text, images, ids)`` returns the global contrastive loss: under several processes the
text distributions and image embeddings of every process are gathered *with gradient*
(``all_gather`` whose backward sums the gradients and hands back each process's slice), so P
processes compute exactly the loss and gradient of one process on the same global batch.

Example:
    >>> import torch
    >>> from asymvlm.heads import HeadConfig, TextHead
    >>> from asymvlm.losses import AsymVLMLoss
    >>> model = TrainableModel(TextHead(config=HeadConfig(dim=8, hidden_dims=(16,))), AsymVLMLoss())
    >>> x = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    >>> model(x, x, torch.arange(4)).shape
    torch.Size([])
    >>> sorted(model.exchanged())[-1]
    'loss_fn.logit_scale'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asymvlm.errors import ConfigError
from asymvlm.heads import TextHead, family_class
from asymvlm.losses import AsymVLMLoss, positives_from_ids

__all__ = ["TrainableModel", "Trainable", "all_gather_with_grad"]

Trainable = Literal["head", "lora", "both"]


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums every process's gradient of the gathered
    tensor and hands each process the slice of its own input (works on gloo and nccl)."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        world = torch.distributed.get_world_size()
        parts = [torch.empty_like(t) for _ in range(world)]
        torch.distributed.all_gather(parts, t.contiguous())
        ctx.rank, ctx.rows = torch.distributed.get_rank(), t.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(t: Tensor) -> Tensor:
    """Concatenate ``t`` from every process along dim 0, differentiably (identity on one process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return t
    if torch.distributed.get_world_size() == 1:
        return t
    if not t.requires_grad:  # ids and frozen image embeddings: a plain gather
        parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=0)
    return _GatherWithGrad.apply(t)


class TrainableModel(nn.Module):
    """Head + loss temperature (+ a peft LoRA adapter on the frozen text tower).

    Args:
        head: the text head.
        loss_fn: the AsymVLM loss (holds the learnable temperature ``logit_scale``).
        encoder: the frozen encoder whose text tower ``peft_model`` adapts (not a submodule: its
            model is inside ``peft_model``).
        peft_model: the peft model returned by :func:`asymvlm.lora.add_text_lora`, or None.
        trainable: what is trained and exchanged: ``"head"`` (head and temperature), ``"lora"``
            (the LoRA factors) or ``"both"``; default: ``"both"`` with an adapter, else ``"head"``.
        freeze_lora_a: keep every LoRA ``A`` fixed (FFA-LoRA): it is exchanged but not trained.
    """

    def __init__(
        self,
        head: TextHead,
        loss_fn: AsymVLMLoss,
        encoder: Any = None,
        peft_model: nn.Module | None = None,
        *,
        trainable: Trainable | None = None,
        freeze_lora_a: bool = False,
    ):
        super().__init__()
        trainable = trainable or ("both" if peft_model is not None else "head")
        if trainable not in ("head", "lora", "both"):
            raise ConfigError(f"trainable must be head, lora or both, got {trainable!r}")
        if trainable != "head" and peft_model is None:
            raise ConfigError(f"trainable={trainable!r} needs a LoRA adapter on the text tower (peft_model)")
        self.head = head
        self.loss_fn = loss_fn
        self.peft_model = peft_model
        self._encoder = encoder
        self.trainable = trainable
        self.freeze_lora_a = freeze_lora_a
        # (3,) min, median, max concentration of the last batch, detached; read (host sync) only when logged
        self.last_concentration: Tensor | None = None

    @property
    def encoder(self) -> Any:
        return self._encoder

    def no_weight_decay(self) -> set[str]:
        return {"loss_fn.logit_scale"}

    # -- the loss ---------------------------------------------------------------------------------
    def embed_text(self, text: Tensor | dict[str, Tensor]) -> Tensor:
        """What the head sees: cached unit embeddings as given, or token ids through the adapted tower."""
        if self.peft_model is None:
            return text
        from asymvlm.lora import text_features

        return F.normalize(text_features(self._encoder, text).float(), dim=-1)

    def forward(
        self, text: Tensor | dict[str, Tensor], images: Tensor, ids: Tensor, positives: Tensor | None = None
    ) -> Tensor:
        """The loss of a batch: texts (this process's slice), the image of each, their image ids,
        and optionally the (B, B) positives of the *global* batch (an
        :class:`~asymvlm.batching.IndexBatcher` batch has them: identical captions of different
        images are positives); without them, positives are the pairs of equal image id."""
        q = self.head(self.embed_text(text))
        loc, kappa = all_gather_with_grad(q.loc), all_gather_with_grad(q.concentration)
        images, ids = all_gather_with_grad(images.to(loc.dtype)), all_gather_with_grad(ids)
        q_all = family_class(self.head.family)(loc, kappa, validate_args=False)
        with torch.no_grad():  # what the log shows of the batch's concentrations (no host sync here)
            k = kappa.detach().float()
            self.last_concentration = torch.stack([k.min(), k.median(), k.max()])
        if self.loss_fn.positive_mode == "diagonal":
            positives = None
        elif positives is None:
            positives = positives_from_ids(ids, ids)
        return self.loss_fn(q_all, images, positives)

    def batch_loss(self, batch: Mapping[str, Any]) -> Tensor:
        """``forward`` on an :class:`~asymvlm.batching.IndexBatcher` batch."""
        return self(batch["text"], batch["images"], batch["ids"], batch.get("positives"))

    # -- what is exchanged (federated clients) ----------------------------------------------------
    def exchanged(self) -> dict[str, nn.Parameter]:
        """The parameters a federated client sends, by name (head and temperature and/or the LoRA
        factors, per ``trainable``; FFA-LoRA's frozen A included)."""
        out: dict[str, nn.Parameter] = {}
        if self.trainable in ("head", "both"):
            out.update({f"head.{k}": p for k, p in self.head.named_parameters()})
            out["loss_fn.logit_scale"] = self.loss_fn.logit_scale
        if self.peft_model is not None and self.trainable in ("lora", "both"):
            out.update({f"peft_model.{k}": p for k, p in self.peft_model.named_parameters() if "lora_" in k})
        return out

    def trained_names(self) -> list[str]:
        """The exchanged parameters that clients change (FFA-LoRA's frozen A excluded)."""
        return [k for k in self.exchanged() if not (self.freeze_lora_a and ".lora_A." in k)]

    def get_params(self) -> dict[str, Tensor]:
        """A copy of the exchanged state."""
        return {k: p.detach().clone() for k, p in self.exchanged().items()}

    @torch.no_grad()
    def set_params(self, params: Mapping[str, Tensor]) -> None:
        """Load the exchanged state (every exchanged name must be present)."""
        named = self.exchanged()
        missing = sorted(set(named) - set(params))
        if missing:
            raise KeyError(f"global state misses {missing[:4]}")
        for k, p in named.items():
            p.copy_(params[k])
