"""The lambda search: ``base + lam * aggregate(taus)`` scored over a grid, and the flat-criterion check.

:func:`lambda_search` scores ``base + lam * aggregate(taus)`` over a grid with a metric callback
(the aggregate is computed once; the metrics of AsymVLM heads are in :mod:`asymvlm.merging.selection`).

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

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from asymvlm.errors import ConfigError, InputError
from asymvlm.merging.selection import SELECTION_CRITERIA

__all__ = [
    "lambda_search",
    "LambdaSearch",
    "is_flat",
    "FlatCriterionError",
    "FlatCriterionWarning",
    "ON_FLAT",
    "FLAT_TOL",
]

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
            raise InputError("a metric returning a dict must include 'score'")
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
        ConfigError: an empty grid, or an unknown ``on_flat``.
        InputError: a metric that is not finite for any lambda (or a dict without ``score``).

    Example:
        >>> import torch, warnings
        >>> base, taus = {"w": torch.zeros(1)}, [{"w": torch.ones(1)}]
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     res = lambda_search(base, taus, [0.5, 1.0], lambda p: 1.0, on_flat="warn")
        >>> res.flat, res.best_lam
        (True, 0.5)
        >>> lambda_search(base, taus, [0.5, 1.0], lambda p: 1.0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        asymvlm.merging.search.FlatCriterionError: the selection criterion is flat over lambda in [0.5, 1.0]: ...
    """
    from asymvlm.federated.core import server_update
    from asymvlm.merging.methods import check_task_vectors, make_method

    if not grid:
        raise ConfigError("empty lambda grid")
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
        raise InputError(f"the metric is not finite for any lambda of {list(grid)}: {result.curve}")
    result.flat = is_flat([_score(e) for e in result.curve], flat_tol)
    if result.flat:
        result.warning = _flat_message(criterion, grid, result.best_score, result.best_lam)
        if on_flat == "error":
            raise FlatCriterionError(result.warning)
        warnings.warn(result.warning, FlatCriterionWarning, stacklevel=2)
    return result
