"""The AsymVLM objective: symmetric InfoNCE over a (text x image) log-likelihood matrix.

For texts with distributions ``q_t`` (from a :class:`~asymvlm.heads.TextHead`) and frozen unit
image embeddings ``x_i``, the logits are ``s * log q_t(x_i)`` with a learnable scale
``s = exp(logit_scale)`` (Ju et al., NeurIPS 2025, https://arxiv.org/abs/2505.11029; the
reference code multiplies by a plain learnable scalar initialised to 1, which is
``logit_scale = 0`` here). The loss averages the text->image and image->text cross-entropies.

Positives. Batches built from captioned datasets hold several captions of the same image. The
reference code uses the diagonal only, so a second caption of the same image is a *negative*.
Here a boolean ``positives`` mask ``(T, I)`` says which pairs match, with three modes
(``positive_mode``):

* ``"exclude"`` (default): every positive pair ``(t, i)`` is its own InfoNCE term whose
  denominator holds that pair and the row's *negatives* only; other positives are neither
  numerator nor negatives: ``softplus(logsumexp_{j not in P_t} l_tj - l_ti)``. Averaged over
  the positives of a row, then over rows (and likewise over columns).
* ``"sum"``: the row's positives share the numerator (multi-positive NCE):
  ``-(logsumexp_{j in P_t} l_tj - logsumexp_j l_tj)``.
* ``"diagonal"``: positives are the diagonal, every other pair is a negative (reference parity;
  ``positives`` must be None).

With one positive per row and column all three equal the plain symmetric InfoNCE.

Example:
    >>> import torch
    >>> from asymvlm.heads import TextHead
    >>> from asymvlm.losses import AsymVLMLoss
    >>> head, loss_fn = TextHead(dim=16, hidden_dims=(32,)), AsymVLMLoss()
    >>> t = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    >>> i = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    >>> ids = torch.tensor([0, 0, 1, 2])          # texts 0 and 1 describe the same image
    >>> loss = loss_fn(head(t), i, positives=positives_from_ids(ids, ids))
    >>> loss.backward()
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asymvlm.distributions import SphericalDistribution, VonMisesFisher
from asymvlm.errors import ConfigError, InputError
from asymvlm.heads import check_embeddings
from asymvlm.registry import Registry
from asymvlm.special import vmf_log_normalizer, vmf_log_normalizer_approx

__all__ = [
    "VMF_NORMALIZER_REGISTRY",
    "POSITIVE_MODES",
    "log_likelihood",
    "positives_from_ids",
    "symmetric_infonce",
    "asymvlm_loss",
    "AsymVLMLoss",
    "parameter_groups",
]

# vMF log-normalisers: ``VMF_NORMALIZER_REGISTRY.build(name)`` returns ``log C_d(kappa)`` as a
# function ``(dim, kappa (T,)) -> (T,)``. Neither takes options: both are parameter-free formulas
# (Power Spherical has its own exact closed form and ignores this choice).
VMF_NORMALIZER_REGISTRY = Registry("vmf_normalizer")
VMF_NORMALIZER_REGISTRY.register(
    "exact",
    help="Exact log C_d(kappa) from log-space Bessel functions (series + uniform Debye expansion).",
    reference="Mardia & Jupp 2000 eq. 9.3.4; DLMF 10.25.2, 10.41.3 https://dlmf.nist.gov/10.41; "
    "Banerjee et al. 2005 https://jmlr.org/papers/v6/banerjee05a.html",
    fn=vmf_log_normalizer,
)(lambda: vmf_log_normalizer)
VMF_NORMALIZER_REGISTRY.register(
    "approx",
    help="Integrated rational bounds on A_d(kappa), up to an additive constant (the AsymVLM reference code's).",
    reference="Scott, Gallagher & Mozer 2021 https://arxiv.org/abs/2103.15718",
    fn=vmf_log_normalizer_approx,
)(lambda: vmf_log_normalizer_approx)

POSITIVE_MODES = ("exclude", "sum", "diagonal")


def log_likelihood(
    text_distribution: SphericalDistribution,
    image_embeddings: Tensor,
    *,
    vmf_normalizer: str = "exact",
    chunk_size: int | None = 65536,
    validate: bool = True,
) -> Tensor:
    """Log-likelihood matrix ``L[t, i] = log q_t(x_i)`` of shape ``(T, I)``.

    Args:
        text_distribution: a :class:`VonMisesFisher` or :class:`PowerSpherical` with batch
            shape ``(T,)``.
        image_embeddings: unit vectors ``(I, d)``.
        vmf_normalizer: ``"exact"`` or ``"approx"`` (vMF only; see :data:`VMF_NORMALIZER_REGISTRY`).
        chunk_size: images per matmul; bounds the temporaries to ``T * chunk_size`` entries.
            ``None`` computes in one go.
        validate: check shapes, finiteness and unit norm of ``image_embeddings``.

    Returns:
        ``(T, I)`` tensor in the distribution's dtype.

    Raises:
        InputError: wrong shapes, dimension mismatch, NaN/inf or non-unit rows (named).
        ConfigError: an unknown ``vmf_normalizer`` (the message lists the valid ones).
    """
    q = text_distribution
    if not isinstance(q, SphericalDistribution):
        raise TypeError(f"text_distribution must be a VonMisesFisher or PowerSpherical, got {type(q).__name__}")
    if len(q.batch_shape) != 1:
        raise InputError(f"text_distribution must have batch shape (T,), got {tuple(q.batch_shape)}")
    if validate:
        check_embeddings(image_embeddings, q.dim, "image embeddings", unit=True)
    normalizer = VMF_NORMALIZER_REGISTRY.build(vmf_normalizer)  # ConfigError if unknown, even for PS
    log_norm = None
    if isinstance(q, VonMisesFisher):
        log_norm = normalizer(q.dim, q.concentration)
    n = image_embeddings.shape[0]
    if chunk_size is None or n <= chunk_size:
        return q.pairwise_log_prob(image_embeddings, log_norm)
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    parts = [q.pairwise_log_prob(image_embeddings[s : s + chunk_size], log_norm) for s in range(0, n, chunk_size)]
    return torch.cat(parts, dim=-1)


def positives_from_ids(text_ids: Tensor, image_ids: Tensor) -> Tensor:
    """Boolean ``(T, I)`` mask, True where a text and an image carry the same id.

    Example:
        >>> positives_from_ids(torch.tensor([7, 7, 9]), torch.tensor([7, 9])).tolist()
        [[True, False], [True, False], [False, True]]
    """
    if text_ids.dim() != 1 or image_ids.dim() != 1:
        raise InputError(f"ids must be 1-D, got shapes {tuple(text_ids.shape)} and {tuple(image_ids.shape)}")
    return text_ids.unsqueeze(1) == image_ids.unsqueeze(0)


def _directional_nce(logits: Tensor, positives: Tensor) -> Tensor:
    """Mean over rows (that have a positive) of the row's NCE term ("sum" mode)."""
    neg_inf = torch.finfo(logits.dtype).min
    has_pos = positives.any(dim=1)
    pos_lse = torch.logsumexp(logits.masked_fill(~positives, neg_inf), dim=1)
    per_row = torch.logsumexp(logits, dim=1) - pos_lse
    return per_row[has_pos].mean()


def _exclude_nce(logits: Tensor, positives: Tensor) -> Tensor:
    """Both directions of the "exclude" NCE: for each positive pair ``-log p(pair | pair + the row's
    negatives)`` (and the column's), averaged per row (column) and then over rows (columns) with a
    positive. The softplus runs at the positive pairs only and the negatives' log-sum-exp of both
    directions reads one masked copy: measured 2.5-2.8x faster than over the whole (T, I) matrix at
    B = 1024-2048, equal in float64 to 2e-15 (the whole-matrix form is the test's reference)."""
    negatives = logits.masked_fill(positives, torch.finfo(logits.dtype).min)  # (T, I)
    r, c = positives.nonzero(as_tuple=True)  # (P,) the positive pairs
    pair = logits[r, c]
    halves = []
    for dim, own in ((1, r), (0, c)):
        neg_lse = torch.logsumexp(negatives, dim=dim)  # (T,) or (I,)
        neg_lse = torch.where((~positives).any(dim=dim), neg_lse, -math.inf)  # no negatives: the term is 0
        count = positives.sum(dim)
        per = torch.zeros_like(neg_lse).index_add(0, own, F.softplus(neg_lse[own] - pair)) / count.clamp_min(1)
        halves.append(per[count > 0].mean())
    return 0.5 * (halves[0] + halves[1])


def symmetric_infonce(logits: Tensor, positives: Tensor | None = None, *, positive_mode: str = "exclude") -> Tensor:
    """Symmetric InfoNCE over a ``(T, I)`` logit matrix: mean of both directions.

    Args:
        logits: ``(T, I)``; row t scores texts against images.
        positives: boolean ``(T, I)``; None means the diagonal (needs T == I).
        positive_mode: ``"exclude"``, ``"sum"`` or ``"diagonal"`` (module docstring).
    """
    if logits.dim() != 2:
        raise InputError(f"logits must be (T, I), got {tuple(logits.shape)}")
    if positive_mode not in POSITIVE_MODES:
        raise ConfigError(f"unknown positive_mode {positive_mode!r}; choose one of {POSITIVE_MODES}")
    t, i = logits.shape
    if positives is None or positive_mode == "diagonal":
        if positive_mode == "diagonal" and positives is not None:
            raise InputError("positive_mode='diagonal' ignores a positives mask; pass positives=None")
        if t != i:
            raise InputError(f"without a positives mask the logits must be square, got {tuple(logits.shape)}")
        labels = torch.arange(t, device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    if positives.shape != logits.shape or positives.dtype != torch.bool:
        raise InputError(
            f"positives must be a bool tensor of shape {tuple(logits.shape)}, got "
            f"{positives.dtype} {tuple(positives.shape)}"
        )
    if not bool(positives.any()):
        raise InputError("positives mask has no True entry")
    if positive_mode == "exclude":
        return _exclude_nce(logits, positives)
    return 0.5 * (
        _directional_nce(logits, positives) + _directional_nce(logits.T, positives.T)
    )


def asymvlm_loss(
    text_distribution: SphericalDistribution,
    image_embeddings: Tensor,
    logit_scale: Tensor,
    *,
    positives: Tensor | None = None,
    positive_mode: str = "exclude",
    vmf_normalizer: str = "exact",
    validate: bool = True,
) -> Tensor:
    """Functional form of :class:`AsymVLMLoss` (``logits = exp(logit_scale) * L``)."""
    ll = log_likelihood(
        text_distribution, image_embeddings, vmf_normalizer=vmf_normalizer, chunk_size=None, validate=validate
    )
    return symmetric_infonce(logit_scale.exp() * ll, positives, positive_mode=positive_mode)


class AsymVLMLoss(nn.Module):
    """AsymVLM loss with a learnable temperature in log space.

    Args:
        vmf_normalizer: ``"exact"`` (default) or ``"approx"`` (Scott et al. 2021, the
            reference code's choice; ignored for Power Spherical, which is exact in closed form).
        positive_mode: ``"exclude"`` (default), ``"sum"`` or ``"diagonal"`` (reference parity).
        init_logit_scale: initial ``log s``; 0 reproduces the reference's scale of 1.
        learn_logit_scale: make ``logit_scale`` a parameter (else a buffer).
        max_logit_scale: optional clamp of ``logit_scale`` in the forward pass (CLIP uses
            log 100); None = no clamp, as in the reference.

    ``logit_scale`` is listed by :meth:`no_weight_decay` so :func:`parameter_groups` keeps it out
    of weight decay.
    """

    def __init__(
        self,
        *,
        vmf_normalizer: str = "exact",
        positive_mode: str = "exclude",
        init_logit_scale: float = 0.0,
        learn_logit_scale: bool = True,
        max_logit_scale: float | None = None,
    ):
        super().__init__()
        VMF_NORMALIZER_REGISTRY.entry(vmf_normalizer)  # ConfigError "unknown vmf_normalizer ..."
        if positive_mode not in POSITIVE_MODES:
            raise ConfigError(f"unknown positive_mode {positive_mode!r}; choose one of {POSITIVE_MODES}")
        self.vmf_normalizer = vmf_normalizer
        self.positive_mode = positive_mode
        self.max_logit_scale = max_logit_scale
        value = torch.tensor(float(init_logit_scale))
        if learn_logit_scale:
            self.logit_scale = nn.Parameter(value)
        else:
            self.register_buffer("logit_scale", value)

    def no_weight_decay(self) -> set[str]:
        return {"logit_scale"}

    def scale(self) -> Tensor:
        ls = self.logit_scale
        if self.max_logit_scale is not None:
            ls = ls.clamp(max=self.max_logit_scale)
        return ls.exp()

    def forward(
        self, text_distribution: SphericalDistribution, image_embeddings: Tensor, positives: Tensor | None = None
    ) -> Tensor:
        ll = log_likelihood(text_distribution, image_embeddings, vmf_normalizer=self.vmf_normalizer, chunk_size=None)
        return symmetric_infonce(self.scale().to(ll.dtype) * ll, positives, positive_mode=self.positive_mode)


def parameter_groups(modules: nn.Module | Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """Optimizer parameter groups: weight decay on everything except names listed by each
    module's ``no_weight_decay()`` (e.g. the loss's ``logit_scale``).

    Example:
        >>> from asymvlm.heads import TextHead
        >>> groups = parameter_groups([TextHead(dim=4, hidden_dims=(8,)), AsymVLMLoss()], 5e-4)
        >>> [len(g["params"]) for g in groups], [g["weight_decay"] for g in groups]
        ([4, 1], [0.0005, 0.0])
    """
    if isinstance(modules, nn.Module):
        modules = [modules]
    decay, no_decay = [], []
    for module in modules:
        skip = module.no_weight_decay() if hasattr(module, "no_weight_decay") else set()
        for name, p in module.named_parameters():
            if p.requires_grad:
                (no_decay if name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
