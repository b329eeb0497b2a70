"""The lambda-search criteria of AsymVLM heads: metric callbacks over validation caches.

Each criterion scores a head's parameters on validation caches, one per task (higher is better);
:func:`~asymvlm.merging.search.lambda_search` calls it once per lambda. :data:`SELECTION_CRITERIA`
names them (``merge(select_by=...)``, ``asymvlm-merge --select_by``):

=================  ===============================================================================
``r1``             :func:`recall_metric`: mean (normalised) exact text->image R@1 (the default)
``likelihood``     :func:`likelihood_metric`: mean log-probability of a caption's correct images
                   under the head's retrieval distribution over the validation gallery
``error_auroc``    :func:`uncertainty_metric`: AUROC of ``1/kappa`` for detecting R@1 misses
=================  ===============================================================================

With the package's default frozen mean direction R@1 does not move with lambda (every text ranks
the images by the frozen cosine, whatever ``kappa`` is); the likelihood depends on ``kappa`` and
moves (:mod:`asymvlm.merging.search` detects a flat curve).

Example:
    >>> sorted(SELECTION_CRITERIA)
    ['error_auroc', 'likelihood', 'r1']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from asymvlm.errors import InputError
from asymvlm.registry import Registry

__all__ = [
    "recall_at_1",
    "caption_positives",
    "retrieval_log_prob",
    "recall_metric",
    "likelihood_metric",
    "uncertainty_metric",
    "SELECTION_CRITERIA",
    "selection_metric",
]


def recall_at_1(head: Any, text: Tensor, images: Tensor, text_image_index: Tensor) -> float:
    """Text->image R@1 of a head (log-likelihood scores) on cached embeddings: the one definition
    of R@1, :func:`asymvlm.eval.retrieval.t2i_recall_at_1` (rank-based, a tie with a negative is
    a miss)."""
    from asymvlm.eval.retrieval import t2i_recall_at_1
    from asymvlm.losses import log_likelihood

    with torch.no_grad():
        q = head(text.float())
        ll = log_likelihood(q, images.float())
    return t2i_recall_at_1(ll, text_image_index, images.shape[0])


def caption_positives(text_image_index: Tensor, num_images: int, captions: Sequence[str] | None = None) -> Tensor:
    """(T, I) bool: the correct images of each caption: its own image, and (``captions`` given)
    every image that has an identical caption (design note: the same text describing several
    images is not a negative). Without ``captions``: the caption's own image only.

    Example:
        >>> caption_positives(torch.tensor([0, 1, 2]), 3, ["a dog", "a cat", "a dog"]).int().tolist()
        [[1, 0, 1], [0, 1, 0], [1, 0, 1]]
    """
    from asymvlm.batching import caption_groups
    from asymvlm.eval.retrieval import positives_from_index

    own = positives_from_index(text_image_index, num_images)  # (T, I), checks the index
    if captions is None:
        return own
    if len(captions) != own.shape[0]:
        raise InputError(f"{len(captions)} captions for {own.shape[0]} caption rows")
    groups = caption_groups(list(captions))  # (T,)
    by_group = torch.zeros(int(groups.max()) + 1, num_images, dtype=torch.bool)  # (G, I)
    by_group[groups, torch.as_tensor(text_image_index, dtype=torch.int64)] = True
    return by_group[groups]


def _retrieval_scores(
    head: Any, text: Tensor, images: Tensor, positives: Tensor, text_image_index: Tensor | None, chunk_size: int
) -> tuple[Tensor, Tensor | None]:
    """Per caption: ``log p(correct images | text)`` (T,) float64 and (``text_image_index`` given)
    the exact R@1 hit (T,) bool, from one log-likelihood matrix, ``chunk_size`` captions at a time."""
    from asymvlm.eval.retrieval import positive_ranks, positives_from_index
    from asymvlm.losses import log_likelihood

    images = images.float()
    log_p, hits = [], []
    with torch.no_grad():
        for s in range(0, text.shape[0], chunk_size):
            ll = log_likelihood(head(text[s : s + chunk_size].float()), images)  # (c, I) log q_t(x_i)
            # p(i | t) = softmax_i(log q_t(x_i)): the head's retrieval distribution over the gallery;
            # log of the probability summed over the caption's correct images, in float64
            log_post = torch.log_softmax(ll.double(), dim=1)  # (c, I)
            pos = positives[s : s + chunk_size]
            log_p.append(torch.logsumexp(log_post.masked_fill(~pos, float("-inf")), dim=1))
            if text_image_index is not None:
                exact = positives_from_index(text_image_index[s : s + chunk_size], images.shape[0])
                hits.append(positive_ranks(ll, exact) == 0)  # the R@1 of recall_at_1 (ties are misses)
    return torch.cat(log_p), (torch.cat(hits) if text_image_index is not None else None)


def retrieval_log_prob(head: Any, text: Tensor, images: Tensor, positives: Tensor, *, chunk_size: int = 1024) -> Tensor:
    """Per caption (T,) float64: ``log sum_{i in positives} p(i | t)``, with the head's retrieval
    distribution over the gallery ``p(i | t) = softmax_i(log q_t(x_i))`` (``q_t = head(text)``,
    :func:`asymvlm.losses.log_likelihood`). Unlike R@1 it depends on ``kappa``: a head that is
    surer of the right images scores higher even when every ranking is the frozen cosine's.

    Args:
        head: a text head (``head(text) -> distribution``).
        text: (T, d) text embeddings.
        images: (I, d) unit image embeddings (the gallery).
        positives: (T, I) bool, each caption's correct images (:func:`caption_positives`).
        chunk_size: captions per log-likelihood matrix.

    Example:
        >>> from asymvlm.heads import TextHead
        >>> head = TextHead(dim=4, hidden_dims=(8,))
        >>> x = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
        >>> lp = retrieval_log_prob(head, x, x, torch.eye(3, dtype=torch.bool))
        >>> lp.shape, bool((lp <= 0).all())
        (torch.Size([3]), True)
    """
    if positives.shape != (text.shape[0], images.shape[0]) or positives.dtype != torch.bool:
        raise InputError(
            f"positives must be a bool ({text.shape[0]}, {images.shape[0]}) tensor, got {positives.dtype} "
            f"{tuple(positives.shape)}"
        )
    if not bool(positives.any(1).all()):
        raise InputError(f"caption {int(torch.nonzero(~positives.any(1))[0, 0])} has no correct image")
    return _retrieval_scores(head, text, images, positives, None, chunk_size)[0]


def _load_val(val_caches: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Each validation cache's tensors and caption-identity positives (computed once per search)."""
    from asymvlm.cache import EmbeddingCache

    out = []
    for p in val_caches:
        c = EmbeddingCache.load(p)
        idx = torch.as_tensor(c.text_image_index, dtype=torch.int64)
        out.append({
            "text": c.text_embeddings, "images": c.image_embeddings, "index": idx,
            "positives": caption_positives(idx, c.image_embeddings.shape[0], c.captions),
        })  # fmt: skip
    return out


def recall_metric(
    head_template: Any, val_caches: Sequence[str | Path], *, references: Sequence[float] | None = None
) -> Callable[[dict[str, Tensor]], dict[str, Any]]:
    """A metric callback for AsymVLM heads: R@1 on each validation cache and their mean, normalised
    by ``references`` (each task's expert R@1 on its own cache) when given: the score is the mean
    normalised R@1 (Ilharco et al. 2023's normalised accuracy). Flat over lambda when the heads'
    mean direction is frozen (module docstring)."""
    import copy

    from asymvlm.cache import EmbeddingCache

    caches = [EmbeddingCache.load(p) for p in val_caches]
    if references is not None and len(references) != len(caches):
        raise InputError(f"{len(references)} reference R@1 for {len(caches)} validation caches")
    head = copy.deepcopy(head_template)

    def metric(params: dict[str, Tensor]) -> dict[str, Any]:
        head.load_state_dict(params)
        r1 = [recall_at_1(head, c.text_embeddings, c.image_embeddings, c.text_image_index) for c in caches]
        out: dict[str, Any] = {"R@1": r1, "mean_R@1": sum(r1) / len(r1)}
        if references is not None:
            norm = [r / ref if ref > 0 else float("nan") for r, ref in zip(r1, references)]
            out["normalised_R@1"] = norm
            out["score"] = sum(norm) / len(norm)
        else:
            out["score"] = out["mean_R@1"]
        return out

    return metric


def likelihood_metric(
    head_template: Any, val_caches: Sequence[str | Path], *, chunk_size: int = 1024
) -> Callable[[dict[str, Tensor]], dict[str, Any]]:
    """A metric callback for AsymVLM heads that moves with ``kappa``: on each validation cache the
    mean over captions of ``log p(correct images | text)`` (:func:`retrieval_log_prob`; correct =
    the caption's own image and every image with an identical caption, :func:`caption_positives`,
    when the cache holds the caption strings), and their mean as the score (higher is better;
    ``log(1/I)`` is a uniform guess over I images).

    Returns ``score``, ``log_p`` (per cache), ``mean_log_p`` (= score), and the exact ``R@1`` of
    the same likelihood matrices with ``mean_R@1``, so the curve shows both.

    Example:
        >>> from asymvlm.cache import write_cache
        >>> from asymvlm.heads import TextHead
        >>> import tempfile
        >>> x = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
        >>> head = TextHead(dim=4, hidden_dims=(8,))
        >>> with tempfile.TemporaryDirectory() as d:
        ...     path = write_cache(Path(d) / "val", x, x, torch.arange(6)).path
        ...     out = likelihood_metric(head, [path])(head.state_dict())
        >>> sorted(out), out["score"] == out["mean_log_p"]
        (['R@1', 'log_p', 'mean_R@1', 'mean_log_p', 'score'], True)
    """
    return _per_cache_metric(head_template, val_caches, chunk_size, "log_p", lambda head, d, lp, hits: float(lp.mean()))


def uncertainty_metric(
    head_template: Any, val_caches: Sequence[str | Path], *, chunk_size: int = 1024
) -> Callable[[dict[str, Tensor]], dict[str, Any]]:
    """A metric callback for AsymVLM heads that scores the uncertainty: on each validation cache the
    AUROC of ``1/kappa`` for detecting the captions whose exact R@1 is a miss
    (:func:`asymvlm.eval.uncertainty.error_auroc`; 0.5 = no better than chance), and their mean
    as the score (higher is better). A cache where every caption hits (or every one misses) has no
    AUROC (NaN), and so has the score: such a lambda is never selected.

    Returns ``score``, ``error_AUROC`` (per cache), ``mean_error_AUROC`` (= score), ``R@1`` and
    ``mean_R@1``.
    """
    from asymvlm.eval.uncertainty import error_auroc

    def auroc(head: Any, d: dict[str, Any], lp: Tensor, hits: Tensor) -> float:
        with torch.no_grad():
            u = head.uncertainty(d["text"].float())  # (T,) 1 / kappa
        return error_auroc(u, hits.double())  # NaN when a cache has no hit or no miss

    return _per_cache_metric(head_template, val_caches, chunk_size, "error_AUROC", auroc)


def _per_cache_metric(
    head_template: Any,
    val_caches: Sequence[str | Path],
    chunk_size: int,
    name: str,
    statistic: Callable[[Any, dict[str, Any], Tensor, Tensor], float],
) -> Callable[[dict[str, Tensor]], dict[str, Any]]:
    """A metric callback: ``statistic(head, cache, log p(correct) (T,), exact hits (T,))`` per
    validation cache, their mean as ``score`` (and ``mean_<name>``), with each cache's exact ``R@1``."""
    import copy

    data = _load_val(val_caches)
    head = copy.deepcopy(head_template)

    def metric(params: dict[str, Tensor]) -> dict[str, Any]:
        head.load_state_dict(params)
        values, r1 = [], []
        for d in data:
            lp, hits = _retrieval_scores(head, d["text"], d["images"], d["positives"], d["index"], chunk_size)
            values.append(statistic(head, d, lp, hits))
            r1.append(float(hits.double().mean()))
        mean = sum(values) / len(values)  # NaN when any cache's statistic is
        return {"score": mean, name: values, f"mean_{name}": mean, "R@1": r1, "mean_R@1": sum(r1) / len(r1)}

    return metric


# The lambda-search criteria of AsymVLM heads: ``SELECTION_CRITERIA.build(name)`` is a metric
# factory ``(head_template, val_caches, *, references=None) -> metric`` (a criterion has no options);
# ``flat_hint`` says when it is flat.
def _r1(head: Any, val: Sequence[str | Path], *, references: Sequence[float] | None = None) -> Callable[..., Any]:
    return recall_metric(head, val, references=references)


def _likelihood(
    head: Any, val: Sequence[str | Path], *, references: Sequence[float] | None = None
) -> Callable[..., Any]:
    return likelihood_metric(head, val)


def _error_auroc(
    head: Any, val: Sequence[str | Path], *, references: Sequence[float] | None = None
) -> Callable[..., Any]:
    return uncertainty_metric(head, val)


SELECTION_CRITERIA = Registry("selection criterion")
SELECTION_CRITERIA.register(
    "r1", help="mean normalised R@1", reference="https://arxiv.org/abs/2212.04089",
    flat_hint="with a frozen mean direction every text ranks the images by the frozen cosine, whatever lambda",
)(lambda: _r1)  # fmt: skip
SELECTION_CRITERIA.register(
    "likelihood", help="mean log p(correct image | text) over the validation gallery",
    flat_hint="kappa and the mean direction did not change with lambda",
)(lambda: _likelihood)  # fmt: skip
SELECTION_CRITERIA.register(
    "error_auroc", help="mean AUROC of 1/kappa for R@1 misses",
    flat_hint="the order of 1/kappa over the captions did not change with lambda",
)(lambda: _error_auroc)  # fmt: skip


def selection_metric(
    select_by: str, head_template: Any, val_caches: Sequence[str | Path], *, references: Sequence[float] | None = None
) -> Callable[[dict[str, Tensor]], dict[str, Any]]:
    """The metric callback of a :data:`SELECTION_CRITERIA` entry (an unknown name is a
    :class:`~asymvlm.errors.ConfigError` listing the valid ones); ``references`` (each expert's R@1
    on its own cache) normalise ``r1`` and are not used by the others."""
    return SELECTION_CRITERIA.build(select_by)(head_template, val_caches, references=references)
