"""One entry point for every kind of input, and the lambda search (what ``asymvlm-merge`` calls).

:func:`merge` looks at its inputs and picks the path:

=============================  ==================================  =====================================
inputs                         base                                output (``out``)
=============================  ==================================  =====================================
saved AsymVLMs (heads)         the AsymVLM they were tuned from    an AsymVLM directory
``.safetensors`` checkpoints   the base checkpoint                 ``out/model.safetensors`` (streamed)
task-vector directories        the base checkpoint                 ``out/model.safetensors`` (streamed)
peft LoRA adapters             base checkpoint (``dense`` only)    ``dense`` / ``concat`` / ``svd``
=============================  ==================================  =====================================

Every output directory is written atomically and carries ``merge.json`` (inputs, method,
options, lambda, and for LoRA the truncation error) and a ``README.md`` model card
(:func:`asymvlm.hub.model_card`: the method, lambda, the base's and the experts' fingerprints, the
lambda search's scores). ``base`` and every input may also be a Hugging Face Hub model id
(``user/repo[@revision]``, fetched into the Hub cache, :func:`asymvlm.hub.resolve_artefact`); a
folder holding a ``model.safetensors`` (a merged checkpoint, e.g. from the Hub) is a checkpoint.

:func:`lambda_search` scores ``base + lam * aggregate(taus)`` over a grid with a metric callback
(the aggregate is computed once). The callbacks for AsymVLM heads (:data:`SELECTION_CRITERIA`,
``merge(select_by=...)``, ``asymvlm-merge --select_by``), each over validation caches, one per task:

=================  ===============================================================================
``r1``             :func:`recall_metric`: mean (normalised) exact text->image R@1 (the default)
``likelihood``     :func:`likelihood_metric`: mean log-probability of a caption's correct images
                   under the head's retrieval distribution over the validation gallery
``error_auroc``    :func:`uncertainty_metric`: AUROC of ``1/kappa`` for detecting R@1 misses
=================  ===============================================================================

A flat criterion (design note "Known traps"): with the package's default frozen mean direction
(``HeadConfig(direction="frozen")``: ``loc`` is the frozen text embedding, only ``kappa`` is
learned) every text ranks the images by the frozen cosine whatever ``kappa`` is, so R@1 is the same
for every lambda and the search would silently return the first lambda of the grid.
:func:`lambda_search` detects a curve that did not move (:func:`is_flat`) and by default raises a
:class:`FlatCriterionError` naming the criterion and the fix (``on_flat="warn"``: a
:class:`FlatCriterionWarning` and the first lambda); the likelihood depends on ``kappa`` and moves.

Example:
    >>> import torch
    >>> base = {"w": torch.zeros(2)}
    >>> taus = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}]
    >>> res = lambda_search(base, taus, [0.5, 1.0], lambda p: -float((p["w"] - 0.5).abs().sum()),
    ...                     method="task_arithmetic")
    >>> res.best_lam
    0.5
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from asymvlm.errors import ConfigError
from asymvlm.merging.task_vectors import MergeInputError
from asymvlm.registry import Registry

logger = logging.getLogger(__name__)

__all__ = [
    "merge",
    "input_kind",
    "local_input",
    "lambda_search",
    "LambdaSearch",
    "is_flat",
    "FlatCriterionError",
    "FlatCriterionWarning",
    "recall_metric",
    "recall_at_1",
    "likelihood_metric",
    "uncertainty_metric",
    "selection_metric",
    "caption_positives",
    "retrieval_log_prob",
    "SELECTION_CRITERIA",
    "ON_FLAT",
    "FLAT_TOL",
    "INPUT_KINDS",
    "UNRELATED_RATIO",
    "relative_distance",
]

INPUT_KINDS = ("asymvlm", "checkpoint", "task_vector", "lora")
CHECKPOINT_NAME = "model.safetensors"  # what a merge of checkpoints writes (a folder holding one is a checkpoint)


def local_input(name: str | Path) -> Path:
    """A merge input or base as a local path: an existing path as it is, a Hub id
    (``user/repo[@revision]``) as its snapshot in the Hub cache (downloaded unless ``HF_HUB_OFFLINE``)."""
    from asymvlm.errors import ArtefactError
    from asymvlm.hub import looks_like_hub_id, resolve_artefact, split_revision

    p = Path(name)
    if p.exists() or not looks_like_hub_id(split_revision(str(name))[0]):
        return p
    try:
        return resolve_artefact(str(name), what="merge input")
    except ArtefactError as err:
        raise MergeInputError(str(err)) from err


def _checkpoint_file(p: Path) -> Path:
    """A checkpoint given as a folder (a merged checkpoint's output, a Hub snapshot) is its
    ``model.safetensors`` (inside it: a link to another folder's is refused)."""
    from asymvlm.merging.task_vectors import folder_file

    return folder_file(p, CHECKPOINT_NAME) if p.is_dir() else p


def input_kind(path: str | Path) -> str:
    """``asymvlm``, ``checkpoint``, ``task_vector`` or ``lora`` (an error for anything else)."""
    p = Path(path)
    if p.is_dir():
        if (p / "asymvlm_config.json").is_file():
            return "asymvlm"
        if (p / "adapter_config.json").is_file():
            return "lora"
        if (p / "task_vector.safetensors").is_file():
            return "task_vector"
        if (p / CHECKPOINT_NAME).is_file():
            return "checkpoint"
        raise MergeInputError(
            f"{p} is neither a saved AsymVLM, a peft adapter, a task vector nor a checkpoint (no asymvlm_config.json, "
            f"adapter_config.json, task_vector.safetensors or {CHECKPOINT_NAME})"
        )
    if p.is_file() and p.suffix == ".safetensors":
        return "checkpoint"
    if not p.exists():
        raise MergeInputError(f"missing input: {p}")
    raise MergeInputError(f"{p}: expected a .safetensors checkpoint or a directory")


ON_FLAT = ("error", "warn")  # what lambda_search does when its criterion did not move over the grid
# A curve is flat when its finite scores span at most FLAT_TOL * max(1, |best score|): equal up to
# float64 rounding of a mean (R@1 on a flat curve is exactly equal: the same ranks give the same
# count). A criterion that moves by less than this did not measure anything about lambda.
FLAT_TOL = 1e-9


class FlatCriterionError(ConfigError):
    """The lambda-search criterion scored every lambda of the grid the same (it cannot select)."""


class FlatCriterionWarning(UserWarning):
    """``on_flat="warn"``: the criterion was flat and the first lambda of the grid was kept."""


@dataclass
class LambdaSearch:
    """The result of :func:`lambda_search`.

    Attributes:
        curve: one dict per lambda, in grid order: ``lam``, ``score`` and the metric's details.
        best_lam: the selected lambda (the first in grid order among equal best scores).
        best_score: its score.
        flat: whether the finite scores did not move over the grid (:func:`is_flat`).
        criterion: the criterion's name, as given to :func:`lambda_search` (None: unnamed).
        warning: the flat-criterion message when ``flat`` (raised, or warned and kept).
    """

    curve: list[dict[str, Any]] = field(default_factory=list)
    best_lam: float = float("nan")
    best_score: float = -float("inf")
    flat: bool = False
    criterion: str | None = None
    warning: str | None = None


def _score(value: Any) -> float:
    if isinstance(value, Mapping):
        if "score" not in value:
            raise ValueError("a metric returning a dict must include 'score'")
        return float(value["score"])
    return float(value)


def _check_flat_tol(tol: Any) -> None:
    if isinstance(tol, bool) or not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise ConfigError(f"flat_tol must be a finite number >= 0, got {tol!r}")


def is_flat(scores: Sequence[float], tol: float = FLAT_TOL) -> bool:
    """Whether the finite ``scores`` did not move: at least two of them, spanning at most
    ``tol * max(1, |best|)`` (non-finite scores are left out; fewer than two finite scores are
    never flat: there is nothing to compare).

    Example:
        >>> is_flat([1.0, 1.0, float("nan"), 1.0]), is_flat([-2.31, -2.30]), is_flat([0.5])
        (True, False, False)
    """
    _check_flat_tol(tol)
    finite = [float(x) for x in scores if math.isfinite(float(x))]
    if len(finite) < 2:
        return False
    best = max(finite)
    return best - min(finite) <= tol * max(1.0, abs(best))


def _flat_message(criterion: str | None, grid: Sequence[float], best: float, best_lam: float) -> str:
    """One line: what was flat, why it usually is, and the two ways out."""
    entry = SELECTION_CRITERIA.get(criterion) if criterion is not None else None
    name = f" {criterion} ({entry.help})" if entry is not None else (f" {criterion}" if criterion else "")
    why = f" ({entry.extra['flat_hint']})" if entry is not None else ""
    if criterion == "likelihood":
        fix = "the merged heads do not change with lambda (are the task vectors zero?)"
    else:
        fix = "select by likelihood (--select_by likelihood, select_by='likelihood')"
    return (
        f"the selection criterion{name} is flat over lambda in {[float(x) for x in grid]}: every lambda scores "
        f"{best:.3f}{why}; {fix}, or keep lambda={best_lam:g} (the first) with --on_flat warn (on_flat='warn')"
    )


def lambda_search(
    base: Mapping[str, Tensor],
    task_vectors: Sequence[Mapping[str, Tensor]],
    grid: Sequence[float],
    metric: Callable[[dict[str, Tensor]], Any],
    *,
    method: str = "task_arithmetic",
    weights: Sequence[float] | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
    criterion: str | None = None,
    on_flat: str = "error",
    flat_tol: float = FLAT_TOL,
    **options: Any,
) -> LambdaSearch:
    """Evaluate ``metric(base + lam * aggregate(task_vectors))`` for every ``lam`` in ``grid``
    and select the best (higher is better). The aggregate is computed once.

    Ties: the first lambda in grid order among equal best scores wins (pass the grid in the order
    you prefer on ties, e.g. ascending for the smallest). A curve that did not move at all
    (:func:`is_flat` with ``flat_tol``) is a criterion that cannot select: ``on_flat="error"``
    raises a :class:`FlatCriterionError`; ``"warn"`` warns (:class:`FlatCriterionWarning`) and
    keeps the first lambda. Either way ``flat`` is recorded.

    Args:
        base: the base parameters.
        task_vectors: one delta per expert (``theta_expert - theta_base``).
        grid: the lambdas to try, in order.
        metric: ``params -> float`` or ``-> dict`` with ``score`` and anything else to log
            (:func:`recall_metric`, :func:`likelihood_metric`, :func:`uncertainty_metric`).
        method: a merge method (:data:`~asymvlm.merging.methods.METHODS`); ``options`` are its own.
        weights: per-expert weights (default equal).
        log: called with each curve entry as it is computed.
        criterion: the metric's name for messages (a key of :data:`SELECTION_CRITERIA` adds why it
            may be flat).
        on_flat: ``"error"`` or ``"warn"`` (:data:`ON_FLAT`).
        flat_tol: relative tolerance of the flat test (:data:`FLAT_TOL`).

    Raises:
        FlatCriterionError: the curve is flat and ``on_flat="error"``.
        ValueError: an empty grid, or a metric that is not finite for any lambda.

    Example:
        >>> import warnings
        >>> base, taus = {"w": torch.zeros(1)}, [{"w": torch.ones(1)}]
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     res = lambda_search(base, taus, [0.5, 1.0], lambda p: 1.0, on_flat="warn")
        >>> res.flat, res.best_lam
        (True, 0.5)
        >>> lambda_search(base, taus, [0.5, 1.0], lambda p: 1.0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        asymvlm.merging.api.FlatCriterionError: the selection criterion is flat over lambda in [0.5, 1.0]: ...
    """
    from asymvlm.federated.core import server_update
    from asymvlm.merging.methods import check_task_vectors, make_method

    if not grid:
        raise ValueError("empty lambda grid")
    if on_flat not in ON_FLAT:
        raise ConfigError(f"on_flat={on_flat!r} is not one of {list(ON_FLAT)}")
    _check_flat_tol(flat_tol)
    check_task_vectors(task_vectors, base)
    options.pop("lam", None)
    agg = make_method(method, **options).aggregator(task_vectors, weights)  # once for the whole grid
    result = LambdaSearch(criterion=criterion)
    for lam in grid:
        recipe = make_method(method, lam=float(lam), **options)
        params, _, _ = server_update(recipe, task_vectors, weights, {}, base, aggregated=agg)
        value = metric(params)
        entry = {"lam": float(lam), **(dict(value) if isinstance(value, Mapping) else {"score": float(value)})}
        result.curve.append(entry)
        if log is not None:
            log(entry)
        s = _score(value)
        if math.isfinite(s) and s > result.best_score:  # strict: the first of equal scores wins
            result.best_lam, result.best_score = float(lam), s
    if not math.isfinite(result.best_score):
        raise ValueError(f"the metric is not finite for any lambda of {list(grid)}: {result.curve}")
    result.flat = is_flat([_score(e) for e in result.curve], flat_tol)
    if result.flat:
        result.warning = _flat_message(criterion, grid, result.best_score, result.best_lam)
        if on_flat == "error":
            raise FlatCriterionError(result.warning)
        warnings.warn(result.warning, FlatCriterionWarning, stacklevel=2)
    return result


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
        raise ValueError(f"{len(captions)} captions for {own.shape[0]} caption rows")
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
        raise ValueError(
            f"positives must be a bool ({text.shape[0]}, {images.shape[0]}) tensor, got {positives.dtype} "
            f"{tuple(positives.shape)}"
        )
    if not bool(positives.any(1).all()):
        raise ValueError(f"caption {int(torch.nonzero(~positives.any(1))[0, 0])} has no correct image")
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
        raise ValueError(f"{len(references)} reference R@1 for {len(caches)} validation caches")
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


# The lambda-search criteria of AsymVLM heads: name -> metric factory
# ``(head_template, val_caches, *, references=None) -> metric``; ``flat_hint`` says when it is flat.
SELECTION_CRITERIA = Registry("selection criterion")
SELECTION_CRITERIA.register(
    "r1", help="mean normalised R@1", reference="https://arxiv.org/abs/2212.04089",
    flat_hint="with a frozen mean direction every text ranks the images by the frozen cosine, whatever lambda",
)(lambda head, val, *, references=None: recall_metric(head, val, references=references))  # fmt: skip
SELECTION_CRITERIA.register(
    "likelihood", help="mean log p(correct image | text) over the validation gallery",
    flat_hint="kappa and the mean direction did not change with lambda",
)(lambda head, val, *, references=None: likelihood_metric(head, val))  # fmt: skip
SELECTION_CRITERIA.register(
    "error_auroc", help="mean AUROC of 1/kappa for R@1 misses",
    flat_hint="the order of 1/kappa over the captions did not change with lambda",
)(lambda head, val, *, references=None: uncertainty_metric(head, val))  # fmt: skip


def selection_metric(
    select_by: str, head_template: Any, val_caches: Sequence[str | Path], *, references: Sequence[float] | None = None
) -> Callable[[dict[str, Tensor]], dict[str, Any]]:
    """The metric callback of a :data:`SELECTION_CRITERIA` entry (an unknown name is a
    :class:`~asymvlm.errors.ConfigError` listing the valid ones); ``references`` (each expert's R@1
    on its own cache) normalise ``r1`` and are not used by the others."""
    return SELECTION_CRITERIA.entry(select_by).factory(head_template, val_caches, references=references)


# An expert that records no lineage and differs from the base by at least this fraction of the base's
# weights (``||expert - base|| / ||base||``) is no fine-tune of it: two independent random inits of a
# head differ by ~1.4 (sqrt 2), a fine-tune moves the weights far less than their own size.
UNRELATED_RATIO = 1.0
ALLOW_UNRELATED_HINT = "pass --allow_unrelated (allow_unrelated=True) to merge it anyway"


def relative_distance(expert: Mapping[str, Tensor], base: Mapping[str, Tensor]) -> float:
    """``||expert - base|| / ||base||`` over the base's tensors (float64; inf for an all-zero base).

    Example:
        >>> relative_distance({"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([0.0, 4.0])})
        0.75
    """
    num = sum(float((expert[k].double() - base[k].double()).pow(2).sum()) for k in base)
    den = sum(float(base[k].double().pow(2).sum()) for k in base)
    return math.sqrt(num / den) if den > 0 else math.inf


def _expert_base_problem(
    p: Path, m: Any, base: Path, base_model: Any, base_weights: str
) -> tuple[str | None, str | None]:
    """``(refusal, warning)`` about whether the expert ``m`` (at ``p``) was fine-tuned from the base:
    its recorded lineage first (trained from scratch, or from other weights: a refusal), and for an
    expert that records none, how far it is from the base (:data:`UNRELATED_RATIO`)."""
    lineage = m.lineage or {}
    started = lineage.get("init_from_fingerprint")
    scratch = lineage.get("init") == "scratch" or ("init_from" in lineage and lineage["init_from"] is None)
    if scratch and not started:
        return (
            f"{p} was trained from scratch (its lineage records no init_from), not fine-tuned from the base {base}: "
            "its difference to the base is not a task vector",
            None,
        )
    if started is not None:
        if started != base_weights:
            return (
                f"{p} was fine-tuned from {lineage.get('init_from')!r}, whose head weights are not those of the "
                f"base {base}: its difference to the base is not its task vector",
                None,
            )
        return None, None
    ratio = relative_distance(m.head.state_dict(), base_model.head.state_dict())
    if ratio >= UNRELATED_RATIO:  # (NaN weights pass here and are named by the finiteness check)
        return (
            f"{p} does not record what it was fine-tuned from, and it differs from the base {base} by {ratio:.2f} "
            f"times the base's weights (a fine-tune moves them far less): it was not fine-tuned from the base",
            None,
        )
    return None, (
        f"{p} does not record what it was fine-tuned from: its base could not be checked (it differs from the "
        f"base by {ratio:.1%} of the base's weights)"
    )


def _asymvlm_vectors(base: Path, inputs: Sequence[Path], allow_unrelated: bool = False):
    from asymvlm.io import tensor_fingerprint
    from asymvlm.merging.task_vectors import DiffParams, LazyTaskVector, folder_file
    from asymvlm.model import WEIGHTS_NAME, AsymVLM

    base_model = AsymVLM.from_pretrained(base, load_encoder=False)
    fp = (base_model.encoder_source or {}).get("fingerprint")
    base_weights = tensor_fingerprint(base_model.head.state_dict())
    experts, warnings = [], []
    for p in inputs:
        m = AsymVLM.from_pretrained(p, load_encoder=False)
        if m.head.config != base_model.head.config:
            raise MergeInputError(f"{p}: head {m.head.config} differs from the base's {base_model.head.config}")
        if (m.encoder_source or {}).get("fingerprint") != fp:
            raise MergeInputError(f"{p} was trained on another encoder than the base {base}")
        if m.adapts_text_tower:
            raise MergeInputError(
                f"{p} carries a text-tower adapter: merge its text_adapter/ directories as LoRA inputs and the "
                "heads separately"
            )
        refusal, warning = _expert_base_problem(p, m, base, base_model, base_weights)
        if refusal is not None and not allow_unrelated:
            raise MergeInputError(f"{refusal}; {ALLOW_UNRELATED_HINT}")
        if refusal is not None:
            warnings.append(f"{refusal}; merged anyway (allow_unrelated)")
        if warning is not None:
            warnings.append(warning)
        experts.append(m)
    for w in warnings:
        logger.warning("warning: %s", w)
    b = LazyTaskVector(folder_file(base, WEIGHTS_NAME))
    vectors = [DiffParams(b, LazyTaskVector(folder_file(p, WEIGHTS_NAME))) for p in inputs]
    fingerprints = {"base": base_weights, "experts": [tensor_fingerprint(m.head.state_dict()) for m in experts]}
    return base_model, experts, b, vectors, warnings, fingerprints


def _task_vector_bases(base: Path, vectors: Sequence[Any], allow_unrelated: bool) -> list[str]:
    """Task vectors record the fingerprint of the base they were computed against: it must be that
    of ``base`` (a refusal, or with ``allow_unrelated`` a warning); one that records none is a warning."""
    from asymvlm.io import tensor_fingerprint
    from asymvlm.merging.task_vectors import LazyTaskVector

    recorded = [v.meta.get("base_fingerprint") for v in vectors]
    if all(fp is None for fp in recorded):
        notes = [
            f"{v.path} does not record the fingerprint of its base: its base could not be checked" for v in vectors
        ]
    else:
        actual = tensor_fingerprint(LazyTaskVector(base))
        notes = []
        for v, fp in zip(vectors, recorded):
            if fp is None:
                notes.append(f"{v.path} does not record the fingerprint of its base: its base could not be checked")
            elif fp != actual:
                refusal = (
                    f"{v.path} was computed against another base than {base} (its base_fingerprint "
                    f"{fp[:12]}..., the base's {actual[:12]}...): it is not a task vector of this base"
                )
                if not allow_unrelated:
                    raise MergeInputError(f"{refusal}; {ALLOW_UNRELATED_HINT}")
                notes.append(f"{refusal}; merged anyway (allow_unrelated)")
    for w in notes:
        logger.warning("warning: %s", w)
    return notes


def merge(
    base: str | Path | None,
    inputs: Sequence[str | Path],
    out: str | Path,
    method: str = "ties",
    *,
    lam: float = 1.0,
    weights: Sequence[float] | None = None,
    lora_output: str = "concat",
    rank: int | None = None,
    lam_grid: Sequence[float] | None = None,
    val: Sequence[str | Path] | None = None,
    select_by: str | None = None,
    on_flat: str | None = None,
    progress: bool = False,
    log: Callable[[dict[str, Any]], None] | None = None,
    allow_unrelated: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Merge ``inputs`` into ``base`` with ``method`` (see the module docstring for the input kinds)
    and write ``out`` atomically; returns the report (also written to ``out/merge.json``).

    ``lam_grid`` + ``val`` (AsymVLM inputs): pick lambda by :func:`lambda_search` on the validation
    caches and merge with the best one. ``select_by`` (:data:`SELECTION_CRITERIA`, default
    ``"r1"``): ``r1`` scores the mean normalised R@1 when there is one cache per input, in order
    (each expert's R@1 on its own cache, ``expert_R@1`` in the report), otherwise the mean R@1;
    ``likelihood`` the mean log-probability of the correct images; ``error_auroc`` the mean AUROC
    of ``1/kappa`` for R@1 misses. ``on_flat`` (default ``"error"``): a criterion that scores every
    lambda the same (R@1 of heads with a frozen mean direction) raises a
    :class:`FlatCriterionError` and writes nothing; ``"warn"`` keeps the first lambda, with the
    warning in the report. The report's ``lambda_search`` holds the curve, the criterion and ``flat``.

    Every expert must have been fine-tuned from ``base``: an AsymVLM whose lineage records that it
    was trained from scratch or from other weights, one that records nothing and differs from the
    base by as much as the base's weights (:data:`UNRELATED_RATIO`), or a task vector computed
    against another base is a :class:`MergeInputError`; ``allow_unrelated=True`` merges it anyway
    with a warning (logged and in the report's ``warnings``). Inputs are read as untrusted: keys,
    shapes, dtypes and finiteness are checked (naming the file and the key), and so is the merge
    before it is written.
    """
    from asymvlm.merging.methods import METHODS

    if not inputs:
        raise MergeInputError("no inputs to merge")
    if weights is not None and len(weights) != len(inputs):
        raise MergeInputError(f"{len(weights)} weights for {len(inputs)} inputs")
    if weights is not None and not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise MergeInputError(f"weights must be finite numbers, got {list(weights)}")
    if not (isinstance(lam, (int, float)) and math.isfinite(lam)):
        raise MergeInputError(f"lam must be a finite number, got {lam}")
    if "density" in options and not 0 < float(options["density"]) <= 1:
        raise MergeInputError(f"density must be in (0, 1], got {options['density']}")
    if "p" in options and not 0 <= float(options["p"]) < 1:
        raise MergeInputError(f"the DARE drop probability p must be in [0, 1), got {options['p']}")
    METHODS.resolve(method, {**options, "lam": lam})  # ConfigError: unknown method, unknown or invalid options
    if select_by is not None:
        SELECTION_CRITERIA.entry(select_by)  # ConfigError naming the valid criteria
    if on_flat is not None and on_flat not in ON_FLAT:
        raise ConfigError(f"on_flat={on_flat!r} is not one of {list(ON_FLAT)}")
    if (select_by is not None or on_flat is not None) and not lam_grid:
        raise MergeInputError("--select_by/--on_flat choose lambda on --lam_grid: give --lam_grid and --val too")
    names = [str(p) for p in inputs]  # as given (Hub ids stay Hub ids in the report and the card)
    base_name = str(base) if base is not None else None
    inputs = [local_input(p) for p in inputs]
    base = local_input(base) if base is not None else None
    kinds = {input_kind(p) for p in inputs}
    if len(kinds) > 1:
        raise MergeInputError(f"inputs of different kinds {sorted(kinds)}: merge one kind at a time")
    kind = kinds.pop()
    out = Path(out)
    report: dict[str, Any] = {
        "type": "asymvlm.merge",
        "kind": kind,
        "base": base_name,
        "inputs": names,
        "method": method,
        "reference": METHODS[method].reference,
        "options": options,
        "weights": list(weights) if weights is not None else None,
    }
    if allow_unrelated:
        report["allow_unrelated"] = True
    if (lam_grid or val) and kind != "asymvlm":
        raise MergeInputError("--lam-grid/--val evaluate AsymVLM heads: use them with saved AsymVLM inputs")
    if lam_grid and not val:
        raise MergeInputError("--lam-grid needs --val (validation embedding caches) to score each lambda")
    if kind == "lora":
        from asymvlm.merging.lora import merge_lora_adapters

        rep = merge_lora_adapters(
            inputs,
            out,
            method,
            lam=lam,
            weights=weights,
            output=lora_output,
            rank=rank,
            base=_checkpoint_file(base) if base is not None else None,
            progress=progress,
            names=names,
            **options,
        )
        return {**report, **rep}
    if base is None:
        raise MergeInputError(f"merging {kind} inputs needs --base (what they were fine-tuned from)")
    from asymvlm.hub import model_card, write_model_card
    from asymvlm.io import atomic_directory, atomic_write_json
    from asymvlm.merging.cards import merge_card

    if kind == "asymvlm":
        from asymvlm.merging.methods import check_task_vectors, merge_params
        from asymvlm.model import AsymVLM

        if input_kind(base) != "asymvlm":
            raise MergeInputError(f"the base of AsymVLM inputs must be a saved AsymVLM, got {base}")
        base_model, experts, b, vectors, warnings, fingerprints = _asymvlm_vectors(base, inputs, allow_unrelated)
        if warnings:
            report["warnings"] = warnings
        base_params = {k: b[k].clone() for k in b}
        check_task_vectors(vectors, base_params)  # before any lambda is scored
        if lam_grid:
            criterion = select_by or "r1"
            refs = None
            if criterion == "r1" and len(val) == len(inputs):  # each expert on its own task: normalised R@1
                from asymvlm.cache import EmbeddingCache

                refs = []
                for m, v in zip(experts, val):
                    c = EmbeddingCache.load(v)
                    refs.append(recall_at_1(m.head, c.text_embeddings, c.image_embeddings, c.text_image_index))
                report["expert_R@1"] = refs
                if min(refs) <= 0:  # normalisation undefined: score by the plain mean R@1
                    report["note"] = "an expert has R@1 = 0 on its own validation cache: scored by mean R@1"
                    refs = None
            search = lambda_search(
                base_params,
                vectors,
                list(lam_grid),
                selection_metric(criterion, base_model.head, val, references=refs),
                method=method,
                weights=weights,
                log=log,
                criterion=criterion,
                on_flat=on_flat or "error",
                **options,
            )
            lam = search.best_lam
            report["lambda_search"] = {
                "criterion": criterion, "curve": search.curve, "best_lam": lam, "best_score": search.best_score,
                "flat": search.flat,
            }  # fmt: skip
            if search.warning:
                report["warnings"] = [*report.get("warnings", []), search.warning]
        merged = merge_params(base_params, vectors, method, lam=lam, weights=weights, **options)
        model = AsymVLM(
            base_model.head,
            encoder_source=base_model.encoder_source,
            logit_scale=sum(m.logit_scale for m in experts) / len(experts),
        )
        model.head.load_state_dict(merged)
        report.update(lam=lam, keys=len(merged), parameters=sum(v.numel() for v in merged.values()))
        card = model.model_card("merged", **merge_card(report, fingerprints, val=val))
        with atomic_directory(out) as tmp:
            model.save_pretrained(tmp, card=False)
            atomic_write_json(report, tmp / "merge.json")
            write_model_card(tmp, card, replacing=out)
        return report
    # checkpoints and task vectors: streamed into out/model.safetensors
    from asymvlm.merging.methods import merge_files
    from asymvlm.merging.task_vectors import DiffParams, LazyTaskVector

    base = _checkpoint_file(base)
    if kind == "checkpoint":
        b = LazyTaskVector(base)
        vectors = [DiffParams(b, LazyTaskVector(_checkpoint_file(p))) for p in inputs]
    else:
        vectors = [LazyTaskVector(p) for p in inputs]
        notes = _task_vector_bases(base, vectors, allow_unrelated)
        if notes:
            report["warnings"] = notes
    report.update(lam=lam, keys=len(vectors[0]), parameters=sum(math.prod(vectors[0].shape(k)) for k in vectors[0]))
    experts = {"base_fingerprints": [v.meta.get("base_fingerprint") for v in vectors]} if kind == "task_vector" else {}
    card = model_card("checkpoint", **merge_card(report, experts))
    with atomic_directory(out) as tmp:
        merge_files(
            base, vectors, tmp / CHECKPOINT_NAME, method, lam=lam, weights=weights, progress=progress, **options
        )
        atomic_write_json(report, tmp / "merge.json")
        write_model_card(tmp, card, replacing=out)
    return report


def read_report(out: str | Path) -> dict[str, Any]:
    """The ``merge.json`` of a merge output (a JSON object); a missing, corrupt or linked-in file is
    one :class:`~asymvlm.errors.ArtefactError` naming it."""
    from asymvlm.errors import ArtefactError
    from asymvlm.io import inside_folder, read_json

    path = inside_folder(Path(out), "merge.json")
    doc = read_json(path)
    if not isinstance(doc, dict):
        raise ArtefactError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    return doc
