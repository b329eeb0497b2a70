"""Uncertainty metrics: does a higher uncertainty mean a worse retrieval or a vaguer caption?

Conventions (stated once, used everywhere):

* uncertainty: larger = less certain (``1/kappa`` for AsymVLM heads).
* Bins: queries sorted by uncertainty, split into ``n_bins`` equal-count bins; bin 0 is the
  *most certain*. ``binned_recall`` gives R@1 per bin.
* Bin correlations: Spearman and Pearson correlation between the bin index and the bin's R@1.
  **Negative is good**: recall falls as uncertainty rises (the AsymVLM/PCME convention).
* AUROC: uncertainty as a score for detecting retrieval *errors* (label 1 = miss); 0.5 is
  chance, 1 is perfect. Ties are handled by average ranks (Mann–Whitney U).
* Ambiguity correlation: Spearman between uncertainty and a caption's true ambiguity
  (ShapeWorld); positive is good.
* Calibration of a probability of being right: ECE and the reliability curve (lower ECE is
  better); selective prediction: AURC against its oracle floor, selective accuracy at a coverage;
  OOD AUROC of an unfamiliarity score. :data:`LEGEND` states every sign convention in one place,
  and :func:`uncertainty_direction` turns an inverted or flat uncertainty into a warning.

Example:
    >>> import torch
    >>> unc = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    >>> hits = torch.tensor([True, True, True, False, True, False])
    >>> binned_recall(unc, hits, n_bins=3)["recall"].tolist()
    [1.0, 0.5, 0.5]
    >>> round(error_auroc(unc, hits), 4)
    0.875
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from asymvlm.errors import ConfigError, InputError
from asymvlm.eval.zeroshot import aurc, selective_accuracy_at

__all__ = [
    "LEGEND",
    "binned_recall",
    "bin_correlations",
    "error_auroc",
    "ambiguity_spearman",
    "uncertainty_report",
    "expected_calibration_error",
    "reliability_curve",
    "ood_auroc",
    "selective_report",
    "uncertainty_direction",
]

LEGEND = """\
Sign conventions (uncertainty: larger = less confident):
  bin Spearman / Pearson (bin index vs bin R@1): negative is good (recall falls as uncertainty rises)
  error AUROC (uncertainty detects retrieval misses): 0.5 = chance, above 0.5 is good, 1 = perfect
  ambiguity Spearman (uncertainty vs true ambiguity): positive is good
  ECE (probability of being right vs observed accuracy): lower is good, 0 = perfectly calibrated
  AURC (mean selective risk over coverages): lower is good; oracle AURC is the floor for that accuracy
  OOD AUROC (unfamiliarity score, out-of-distribution = positive): 0.5 = chance, above 0.5 is good
  selective accuracy@C (accuracy on the C% least uncertain): higher is good"""


def _vec(x, name: str) -> np.ndarray:
    a = np.asarray(x.detach().cpu().double() if isinstance(x, Tensor) else x, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise InputError(f"{name} is empty")
    if not np.isfinite(a).all():
        raise InputError(f"{name} contains NaN or inf (first at {int(np.nonzero(~np.isfinite(a))[0][0])})")
    return a


def binned_recall(uncertainty: Tensor, hits: Tensor, n_bins: int = 10) -> dict[str, Tensor]:
    """R@1 per equal-count uncertainty bin (bin 0 = most certain).

    Returns ``recall`` (B,), ``mean_uncertainty`` (B,), ``count`` (B,) and ``edges`` (B+1,)
    (uncertainty at the bin boundaries). Ties in uncertainty are split by a stable sort.
    """
    u = _vec(uncertainty, "uncertainty")
    h = _vec(hits, "hits")
    if u.shape != h.shape:
        raise InputError(f"uncertainty has {u.size} entries, hits {h.size}")
    if not 1 <= n_bins <= u.size:
        raise ConfigError(f"n_bins must be in [1, {u.size}], got {n_bins}")
    order = np.argsort(u, kind="stable")
    splits = np.array_split(order, n_bins)
    recall = torch.tensor([h[s].mean() for s in splits])
    mean_u = torch.tensor([u[s].mean() for s in splits])
    count = torch.tensor([len(s) for s in splits])
    edges = torch.tensor([u[splits[0][0]]] + [u[s[-1]] for s in splits])
    return {"recall": recall, "mean_uncertainty": mean_u, "count": count, "edges": edges}


def bin_correlations(bin_values: Tensor) -> dict[str, float]:
    """Spearman and Pearson correlation between bin index and the per-bin value (R@1).

    Negative means recall falls as uncertainty rises (good). NaN when the values are constant.
    """
    v = _vec(bin_values, "bin values")
    idx = np.arange(v.size, dtype=np.float64)
    if v.size < 2 or np.all(v == v[0]):
        return {"spearman": math.nan, "pearson": math.nan}
    return {"spearman": float(stats.spearmanr(idx, v).statistic), "pearson": float(stats.pearsonr(idx, v).statistic)}


def error_auroc(uncertainty: Tensor, hits: Tensor) -> float:
    """AUROC of uncertainty for detecting misses: P(u_miss > u_hit) + P(tie)/2 (Mann–Whitney U)."""
    u = _vec(uncertainty, "uncertainty")
    h = _vec(hits, "hits")
    if u.shape != h.shape:
        raise InputError(f"uncertainty has {u.size} entries, hits {h.size}")
    return _auroc(u, h == 0)


def _auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(s_pos > s_neg) + P(tie)/2 from average ranks (Mann–Whitney U / (n_pos n_neg)); NaN for one class."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = stats.rankdata(scores)  # average ranks for ties
    u_stat = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u_stat / (n_pos * n_neg))


def ambiguity_spearman(uncertainty: Tensor, ambiguity: Tensor) -> float:
    """Spearman correlation between uncertainty and true ambiguity (positive is good)."""
    u = _vec(uncertainty, "uncertainty")
    a = _vec(ambiguity, "ambiguity")
    if u.shape != a.shape:
        raise InputError(f"uncertainty has {u.size} entries, ambiguity {a.size}")
    return float(stats.spearmanr(u, a).statistic)


def uncertainty_report(uncertainty: Tensor, hits: Tensor, n_bins: int = 10) -> dict[str, object]:
    """Binned R@1, its correlations with the bin index and the error AUROC, JSON-ready."""
    b = binned_recall(uncertainty, hits, n_bins)
    corr = bin_correlations(b["recall"])
    return {
        "bin_recall": b["recall"].tolist(),
        "bin_mean_uncertainty": b["mean_uncertainty"].tolist(),
        "bin_spearman": corr["spearman"],
        "bin_pearson": corr["pearson"],
        "error_auroc": error_auroc(uncertainty, hits),
    }


# ---------------------------------------------------------------------------------------------
# calibration of a probability of being right, selective prediction, OOD detection
# ---------------------------------------------------------------------------------------------
def _pair(x, y, x_name: str, y_name: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = _vec(x, x_name), _vec(y, y_name)
    if a.shape != b.shape:
        raise InputError(f"{x_name} has {a.size} entries, {y_name} {b.size}")
    return a, b


def _labels(correct, name: str = "correct") -> np.ndarray:
    c = _vec(correct, name)
    bad = (c != 0) & (c != 1)
    if bad.any():
        raise InputError(f"{name} must be 0/1 or bool, got {c[bad][0]} at index {int(np.nonzero(bad)[0][0])}")
    return c


def _uniform_edges(p: np.ndarray, n_bins: int) -> np.ndarray:
    # i / n_bins, correctly rounded: np.linspace gives 3 * 0.1 = 0.30000000000000004, which would put
    # a probability of 0.3 in the [0.2, 0.3) bin
    return np.arange(n_bins + 1, dtype=np.float64) / n_bins


def _quantile_edges(p: np.ndarray, n_bins: int) -> np.ndarray:
    # equal-count bins (Nixon et al. 2019, https://arxiv.org/abs/1904.01685); tied probabilities
    # share a bin, so counts are only as equal as the ties allow and repeated edges leave empty bins
    return np.quantile(p, np.linspace(0.0, 1.0, n_bins + 1))


# strategy -> edges of the n_bins bins (n_bins + 1,)
_BIN_EDGES = {"uniform": _uniform_edges, "quantile": _quantile_edges}


def reliability_curve(probability, correct, n_bins: int = 15, strategy: str = "uniform") -> dict[str, Tensor]:
    """The data of a reliability diagram: mean probability and accuracy per non-empty bin.

    Bins are left-closed ``[e_i, e_{i+1})`` and the last one is closed, so a probability of exactly
    1.0 falls in the last bin (Guo et al. close bins on the right; only values on an edge differ).

    Args:
        probability: (N,) predicted probability of being correct, in [0, 1].
        correct: (N,) 0/1 or bool, whether the prediction was right.
        n_bins: number of bins (>= 1).
        strategy: ``"uniform"`` (equal-width bins on [0, 1]) or ``"quantile"`` (equal-count bins).

    Returns:
        ``confidence`` (B,) mean probability and ``accuracy`` (B,) mean of ``correct`` per non-empty
        bin, ``count`` (B,), ``bin`` (B,) the index of each of those bins among all ``n_bins`` and
        ``edges`` (n_bins + 1,) the edges of all bins (bin ``bin[i]`` spans
        ``edges[bin[i]]..edges[bin[i] + 1]``).

    Example:
        >>> curve = reliability_curve([0.25, 0.25, 0.75, 1.0], [False, True, True, True], n_bins=2)
        >>> curve["confidence"].tolist(), curve["accuracy"].tolist(), curve["count"].tolist()
        ([0.25, 0.875], [0.5, 1.0], [2, 2])
        >>> curve["edges"].tolist()  # 1.0 falls in the last bin
        [0.0, 0.5, 1.0]
    """
    if strategy not in _BIN_EDGES:
        raise ConfigError(f"unknown strategy {strategy!r}; valid: {', '.join(sorted(_BIN_EDGES))}")
    if not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise ConfigError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    p, c = _pair(probability, correct, "probability", "correct")
    _labels(c)
    outside = (p < 0) | (p > 1)
    if outside.any():
        i = int(np.nonzero(outside)[0][0])
        raise InputError(f"probability must be in [0, 1], got {p[i]} at index {i}")
    edges = _BIN_EDGES[strategy](p, n_bins)  # (n_bins + 1,)
    # bin i holds edges[i] <= p < edges[i + 1]; the last bin also holds p == edges[-1]
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins - 1)  # (N,)
    count = np.bincount(which, minlength=n_bins)
    nonempty = np.nonzero(count)[0]
    conf = np.bincount(which, weights=p, minlength=n_bins)[nonempty] / count[nonempty]
    acc = np.bincount(which, weights=c, minlength=n_bins)[nonempty] / count[nonempty]
    return {
        "confidence": torch.from_numpy(conf),
        "accuracy": torch.from_numpy(acc),
        "count": torch.from_numpy(count[nonempty].astype(np.int64)),
        "bin": torch.from_numpy(nonempty.astype(np.int64)),
        "edges": torch.from_numpy(edges.astype(np.float64)),
    }


def expected_calibration_error(probability, correct, n_bins: int = 15, strategy: str = "uniform") -> float:
    """Expected calibration error of a predicted probability of being correct (lower is better).

    ECE = sum over non-empty bins of ``count/N * |accuracy - mean probability|``
    (Guo et al. 2017, https://arxiv.org/abs/1706.04599); bins as in :func:`reliability_curve`.

    Args:
        probability: (N,) predicted probability of being correct, in [0, 1].
        correct: (N,) 0/1 or bool.
        n_bins: number of bins (>= 1).
        strategy: ``"uniform"`` (equal width) or ``"quantile"`` (equal count, Nixon et al. 2019).

    Example:
        >>> expected_calibration_error([0.8, 0.8, 0.8, 0.8, 0.8], [1, 1, 1, 1, 0])  # calibrated
        0.0
        >>> round(expected_calibration_error([0.9, 0.9, 0.9, 0.9], [1, 1, 0, 0]), 4)  # overconfident
        0.4
    """
    curve = reliability_curve(probability, correct, n_bins, strategy)
    weight = curve["count"].double() / curve["count"].sum()
    return float((weight * (curve["accuracy"] - curve["confidence"]).abs()).sum())


def ood_auroc(score_in, score_out) -> float:
    """AUROC of an unfamiliarity score (larger = more unfamiliar) for detecting out-of-distribution
    items: P(s_out > s_in) + P(tie)/2, i.e. Mann–Whitney U / (n_in n_out). 0.5 is chance, above is good.

    Example:
        >>> ood_auroc([0.1, 0.2, 0.3], [0.25, 0.4])
        0.8333333333333334
    """
    s_in, s_out = _vec(score_in, "score_in"), _vec(score_out, "score_out")
    positive = np.concatenate([np.zeros(s_in.size, dtype=bool), np.ones(s_out.size, dtype=bool)])
    return _auroc(np.concatenate([s_in, s_out]), positive)


def _oracle_aurc(c: np.ndarray) -> float:
    # every correct item first: with K correct out of N the risk at coverage k/N is max(0, k - K)/k
    # (the floor of AURC at this accuracy; Geifman et al. 2019, https://arxiv.org/abs/1805.08206)
    n, k_correct = c.size, int(c.sum())
    k = np.arange(k_correct + 1, n + 1, dtype=np.float64)
    return float(np.sum(1.0 - k_correct / k) / n)


def selective_report(uncertainty, correct, coverages: tuple[float, ...] = (0.5, 0.8)) -> dict[str, float]:
    """Error AUROC, AURC, its oracle floor and selective accuracy at each coverage, JSON-ready.

    ``selective_accuracy@C`` (C = ``int(round(100 * coverage))``) is the accuracy on the ``coverage``
    fraction of least uncertain items (:func:`asymvlm.eval.zeroshot.selective_accuracy_at`).

    Args:
        uncertainty: (N,) larger = less confident.
        correct: (N,) 0/1 or bool.
        coverages: fractions in (0, 1], distinct after rounding to a percent.

    Example:
        >>> r = selective_report([0.1, 0.2, 0.9, 0.3], [True, True, False, True])
        >>> r["aurc"] == r["oracle_aurc"], r["selective_accuracy@50"], r["error_auroc"]
        (True, 1.0, 1.0)
    """
    u, c = _pair(uncertainty, correct, "uncertainty", "correct")
    c = _labels(c)
    report = {"error_auroc": error_auroc(u, c), "aurc": aurc(u, c), "oracle_aurc": _oracle_aurc(c)}
    for cov in coverages:
        key = f"selective_accuracy@{int(round(100 * cov))}"
        if key in report:
            raise ConfigError(f"coverages {tuple(coverages)} give the key {key!r} twice")
        report[key] = selective_accuracy_at(u, c, cov)
    return report


_GOOD_AUROC = "(0.5 = chance, above 0.5 = uncertain captions fail more, which is the good direction)"
_GOOD_RHO = "(0 = no relation, positive = vaguer captions get more uncertainty, which is the good direction)"


def uncertainty_direction(
    uncertainty, correct=None, ambiguity=None, *, flat: float = 0.03, min_count: int = 20
) -> list[str]:
    """Never silently wrong: one-line warnings when uncertainty points the wrong way or nowhere.

        With ``correct`` (retrieval success per caption) the error AUROC of the uncertainty is checked:
        below ``0.5 - flat`` is *inverted*, within ``flat`` of 0.5 is *flat*. With ``ambiguity`` (true
        ambiguity, a caption level where higher = vaguer, or a caption frequency) the Spearman rho is
        checked: below ``-flat`` is inverted, within ``flat`` of 0 is flat. Only what the sample can
        show is said: *inverted* also needs the statistic two standard errors below no relation (the
        AUROC's null standard error ``sqrt((n1 + n0 + 1) / (12 n1 n0))``, Hanley & McNeil 1982; rho's
        ``1 / sqrt(n - 1)``), and *flat* needs two standard errors within ``flat`` (a constant uncertainty
    is flat at any size). A check is skipped
        (no warning) with fewer than ``min_count`` items, one class in ``correct`` or a constant
        ``ambiguity``.

        Returns:
            The warnings, each one line starting with ``"uncertainty"``; empty when all is fine, e.g.
            ``uncertainty is inverted against retrieval success: error AUROC 0.00 over 40 captions (0.5 =
            chance, above 0.5 = uncertain captions fail more, which is the good direction)``.

        Example:
            >>> unc = [0.1 * i for i in range(40)]
            >>> [w.split(":")[0] for w in uncertainty_direction(unc, correct=[i >= 20 for i in range(40)])]
            ['uncertainty is inverted against retrieval success']
            >>> uncertainty_direction(unc, correct=[i < 20 for i in range(40)], ambiguity=list(range(40)))
            []
    """
    if not 0 <= flat < 0.5:
        raise ConfigError(f"flat must be in [0, 0.5), got {flat}")
    u = _vec(uncertainty, "uncertainty")
    warnings: list[str] = []
    if correct is not None:
        _, c = _pair(u, correct, "uncertainty", "correct")
        c = _labels(c)
        if u.size >= min_count and 0 < c.sum() < c.size:
            auc = error_auroc(u, c)
            n1, n0 = float(c.sum()), float(c.size - c.sum())
            se = math.sqrt((n1 + n0 + 1) / (12 * n1 * n0))  # the AUROC's standard error under no relation
            where = f"error AUROC {auc:.2f} over {u.size:,} captions {_GOOD_AUROC}"
            constant = bool(np.all(u == u[0]))  # no information whatever the sample size
            if auc < 0.5 - max(flat, 2 * se):
                warnings.append(f"uncertainty is inverted against retrieval success: {where}")
            elif constant or (abs(auc - 0.5) <= flat and 2 * se <= flat):
                warnings.append(f"uncertainty is flat against retrieval success: {where}")
    if ambiguity is not None:
        _, a = _pair(u, ambiguity, "uncertainty", "ambiguity")
        if u.size >= min_count and not np.all(a == a[0]):
            # a constant uncertainty has no Spearman rho (scipy: NaN) and no information: flat
            rho = 0.0 if np.all(u == u[0]) else ambiguity_spearman(u, a)
            se = 1 / math.sqrt(u.size - 1)  # Spearman's rho's standard error under no relation
            where = f"Spearman rho {rho:.2f} over {u.size:,} captions {_GOOD_RHO}"
            if rho < -max(flat, 2 * se):
                warnings.append(f"uncertainty is inverted against caption ambiguity: {where}")
            elif np.all(u == u[0]) or (abs(rho) <= flat and 2 * se <= flat):
                warnings.append(f"uncertainty is flat against caption ambiguity: {where}")
    return warnings
