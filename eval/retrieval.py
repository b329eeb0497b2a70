"""Retrieval metrics computed from ranks (never from thresholded scores).

Conventions:

* ``scores`` is a (Q, G) matrix, higher = better; it may be negative (log-likelihoods are).
* ``positives`` is a (Q, G) bool matrix; a query may have several positives (image -> text: all
  captions of the image; ShapeWorld "consistent" hits: every image satisfying the caption).
* The rank of a query is the 0-based rank of its *best* positive, counted pessimistically:
  ``rank = #{negatives j : s_j >= s_best_positive}``, so ties with negatives count against the
  query and a constant score matrix scores R@1 = 0 rather than 1. A hit at K means rank < K.
* Queries without any positive are an error (they have no rank).

Everything is processed ``chunk_size`` query rows at a time, so memory stays bounded by the
scores themselves.

Example:
    >>> import torch
    >>> scores = torch.tensor([[-1.0, -3.0, -2.0], [-5.0, -4.0, -6.0]])
    >>> positives = torch.tensor([[False, False, True], [False, True, False]])
    >>> positive_ranks(scores, positives).tolist()
    [1, 0]
    >>> recall_at_k(positive_ranks(scores, positives), (1, 2))
    {'R@1': 0.5, 'R@2': 1.0}
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from asymvlm.errors import InputError

__all__ = [
    "positive_ranks",
    "recall_at_k",
    "rank_summary",
    "retrieval_metrics",
    "positives_from_index",
    "t2i_recall_at_1",
]


def _check(scores: Tensor, positives: Tensor) -> None:
    if scores.dim() != 2:
        raise InputError(f"scores must be (Q, G), got {tuple(scores.shape)}")
    if positives.shape != scores.shape or positives.dtype != torch.bool:
        raise InputError(
            f"positives must be a bool tensor of shape {tuple(scores.shape)}, got "
            f"{positives.dtype} {tuple(positives.shape)}"
        )
    if not bool(torch.isfinite(scores).all()):
        row = int(torch.nonzero(~torch.isfinite(scores).all(1))[0, 0])
        raise InputError(f"scores: row {row} contains NaN or inf")


def positive_ranks(scores: Tensor, positives: Tensor, *, chunk_size: int = 1024) -> Tensor:
    """0-based pessimistic rank of each query's best positive, (Q,) int64 (module docstring)."""
    _check(scores, positives)
    out = torch.empty(scores.shape[0], dtype=torch.int64)
    for s in range(0, scores.shape[0], chunk_size):
        sc, pos = scores[s : s + chunk_size].float(), positives[s : s + chunk_size]
        has = pos.any(1)
        if not bool(has.all()):
            raise InputError(f"query {s + int(torch.nonzero(~has)[0, 0])} has no positive")
        best = sc.masked_fill(~pos, float("-inf")).max(1, keepdim=True).values  # (q, 1)
        out[s : s + chunk_size] = ((sc >= best) & ~pos).sum(1).cpu()
    return out


def recall_at_k(ranks: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """``{"R@k": fraction of queries with rank < k}`` (counted exactly: a float64 mean of the hits,
    so 121 hits of 1000 queries is 0.121, not float32's 0.12099999934)."""
    if ranks.numel() == 0:
        raise InputError("no ranks")
    return {f"R@{k}": float((ranks < k).double().mean()) for k in ks}


def rank_summary(ranks: Tensor) -> dict[str, float]:
    """Mean and median 1-based rank."""
    r = ranks.double() + 1
    return {"mean_rank": float(r.mean()), "median_rank": float(r.median())}


def positives_from_index(text_image_index: Tensor, num_images: int) -> Tensor:
    """(T, I) bool positives of captions -> images from the caption -> image row map."""
    idx = torch.as_tensor(text_image_index, dtype=torch.int64)
    if idx.dim() != 1 or (idx < 0).any() or (idx >= num_images).any():
        raise InputError(f"text_image_index must be 1-D with values in [0, {num_images})")
    pos = torch.zeros(idx.shape[0], num_images, dtype=torch.bool)
    pos[torch.arange(idx.shape[0]), idx] = True
    return pos


def t2i_recall_at_1(scores: Tensor, text_image_index: Tensor, num_images: int | None = None) -> float:
    """Text -> image R@1 from a (T, I) score matrix and the image row of each text.

    The one definition of R@1: :func:`recall_at_k` at k = 1 of the :func:`positive_ranks` of the
    :func:`positives_from_index` positives. A text hits only if its image scores strictly above
    every other image; a negative tied with the positive is a miss (pessimistic ties), so a
    constant score matrix gives 0, where ``argmax`` (first index wins) would count text rows whose
    image comes first as hits. Several texts may share one image (e.g. COCO's five captions per
    image): each is its own query with that image as its positive.

    Args:
        scores: (T, I), higher = better; any sign (log-likelihoods are negative).
        text_image_index: (T,) int, the image row of each text, in ``[0, num_images)``.
        num_images: I; defaults to ``scores.shape[1]`` and must equal it when given.

    Example:
        >>> scores = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.2, 0.7], [0.3, -0.4]])
        >>> index = torch.tensor([0, 0, 1, 0])      # texts 0, 1 and 3 describe image 0
        >>> t2i_recall_at_1(scores, index)          # text 1 ties with image 1: a miss
        0.75
        >>> float((scores.argmax(1) == index).float().mean())  # argmax would call the tie a hit
        1.0
        >>> t2i_recall_at_1(torch.zeros(4, 3), torch.tensor([0, 1, 2, 0]))
        0.0
    """
    if scores.dim() != 2:
        raise InputError(f"scores must be (T, I), got {tuple(scores.shape)}")
    idx = torch.as_tensor(text_image_index)
    if idx.dim() != 1 or idx.shape[0] != scores.shape[0]:
        raise InputError(
            f"text_image_index must be ({scores.shape[0]},) for scores {tuple(scores.shape)}, got {tuple(idx.shape)}"
        )
    if num_images is None:
        num_images = scores.shape[1]
    elif num_images != scores.shape[1]:
        raise InputError(f"num_images={num_images} but scores has {scores.shape[1]} image columns")
    return recall_at_k(positive_ranks(scores, positives_from_index(idx, num_images)), (1,))["R@1"]


def retrieval_metrics(
    scores: Tensor, positives: Tensor, ks: Sequence[int] = (1, 5, 10), *, chunk_size: int = 1024
) -> dict[str, float]:
    """Both directions from one (T, I) text x image score matrix.

    Returns ``t2i_R@k``, ``i2t_R@k`` (an image hits if any of its positive captions is in its top
    k), mean/median ranks per direction and ``rsum`` (the sum of all six recalls for k = 1, 5, 10).
    Images without any positive caption are skipped in the image -> text direction.
    """
    _check(scores, positives)
    t2i = positive_ranks(scores, positives, chunk_size=chunk_size)
    keep = positives.any(0)
    i2t = positive_ranks(scores.T[keep], positives.T[keep], chunk_size=chunk_size)
    out: dict[str, float] = {}
    for prefix, ranks in (("t2i", t2i), ("i2t", i2t)):
        out.update({f"{prefix}_{k}": v for k, v in recall_at_k(ranks, ks).items()})
        out.update({f"{prefix}_{k}": v for k, v in rank_summary(ranks).items()})
    out["rsum"] = sum(out[f"{p}_R@{k}"] for p in ("t2i", "i2t") for k in (1, 5, 10) if f"{p}_R@{k}" in out)
    return out
