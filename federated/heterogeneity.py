"""How heterogeneous a partition is: per-client sizes and label histograms, each client's
Jensen-Shannon divergence to the population, and a plot like flwr-datasets' partition plots.

The divergence reported is the Jensen-Shannon *divergence* in bits (base 2, so in ``[0, 1]``):
``JS(P, Q) = KL(P || M) / 2 + KL(Q || M) / 2`` with ``M = (P + Q) / 2``, which is the square of
``scipy.spatial.distance.jensenshannon(P, Q, base=2)`` (scipy returns the distance, its square
root). ``P`` is a client's label distribution and ``Q`` the population's (all clients' rows
together). 0 means the client looks like the population; JS is convex in ``P``, so the largest a
client can reach is at a single label, ``max_c JS(delta_c, Q)`` (reported as ``js_max_possible``).

Example:
    >>> import numpy as np
    >>> labels = np.repeat([0, 1], 50)
    >>> report = heterogeneity_report([np.arange(50), np.arange(50, 100)], labels)
    >>> report["sizes"], round(report["js_mean"], 4), round(report["js_max_possible"], 4)
    ([50, 50], 0.3113, 0.3113)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from asymvlm.errors import InputError

__all__ = ["js_divergence", "heterogeneity_report", "plot_heterogeneity"]


def _kl_bits(p: np.ndarray, m: np.ndarray) -> float:
    mask = p > 0
    return float(np.sum(p[mask] * np.log2(p[mask] / m[mask])))


def js_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen-Shannon divergence in bits between two histograms (normalised here; zeros allowed).

    Raises:
        InputError: histograms of different lengths, a negative entry, or an empty histogram.
    """
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if p.shape != q.shape or p.ndim != 1:
        raise InputError(f"histograms must be 1-D of one length, got shapes {p.shape} and {q.shape}")
    if (p < 0).any() or (q < 0).any() or p.sum() <= 0 or q.sum() <= 0:
        raise InputError("histograms must be non-negative with a positive total")
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2
    return max(0.0, (_kl_bits(p, m) + _kl_bits(q, m)) / 2)


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def heterogeneity_report(parts: Sequence[np.ndarray], labels: Sequence[Any]) -> dict[str, Any]:
    """Sizes, label histograms and Jensen-Shannon divergences (bits) of a partition.

    Args:
        parts: one array of row indices per client (a partitioner's output).
        labels: one label per row of the whole dataset (any column: labels, domains, clusters).

    Returns:
        A JSON-ready dict: ``num_clients``; ``classes`` (the distinct labels, sorted); ``sizes``
        (rows per client); ``histograms`` (per client, the count of each class, in ``classes``
        order); ``population`` (the fraction of each class over all clients' rows); ``js`` (each
        client's JS divergence to the population; ``nan`` for a client without rows);
        ``js_mean`` (unweighted, over clients with rows); ``js_weighted_mean`` (weighted by
        size); ``js_max_possible`` (the largest JS any client could have against this population).

    Raises:
        InputError: a row index outside ``labels``, or no rows at all.
    """
    labels = np.asarray(labels)
    classes, codes = np.unique(labels, return_inverse=True)
    codes = codes.reshape(-1)
    histograms = []
    for k, p in enumerate(parts):
        idx = np.asarray(p, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(labels)):
            raise InputError(f"client {k} has a row index outside the {len(labels)} labels")
        histograms.append(np.bincount(codes[idx], minlength=len(classes)))
    hist = np.asarray(histograms, dtype=np.int64).reshape(len(histograms), len(classes))
    sizes = hist.sum(axis=1)
    if sizes.sum() == 0:
        raise InputError("the partition has no rows")
    population = hist.sum(axis=0) / sizes.sum()
    js = np.array([js_divergence(h, population) if s else np.nan for h, s in zip(hist, sizes)])
    held = sizes > 0
    worst = max(js_divergence(np.eye(len(classes))[c], population) for c in range(len(classes)))
    return {
        "num_clients": len(hist),
        "classes": [_plain(c) for c in classes],
        "sizes": sizes.tolist(),
        "histograms": hist.tolist(),
        "population": population.tolist(),
        "js": js.tolist(),
        "js_mean": float(js[held].mean()),
        "js_weighted_mean": float(np.sum(js[held] * sizes[held]) / sizes[held].sum()),
        "js_max_possible": float(worst),
    }


def plot_heterogeneity(report: dict[str, Any], path: str | Path, *, max_legend: int = 20) -> Path:
    """A PNG of a :func:`heterogeneity_report`: per-client stacked label counts (the bar's height is
    the client's size) and per-client label fractions with each client's JS divergence.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    hist = np.asarray(report["histograms"], dtype=np.float64)
    sizes = np.asarray(report["sizes"], dtype=np.float64)
    clients = np.arange(len(hist))
    frac = hist / np.maximum(sizes, 1)[:, None]
    cmap = plt.get_cmap("tab20" if hist.shape[1] > 10 else "tab10")
    width = max(6.0, min(0.35 * len(hist) + 3, 24.0))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(width, 7), sharex=True)
    below_counts, below_frac = np.zeros(len(hist)), np.zeros(len(hist))
    for c, name in enumerate(report["classes"]):
        colour = cmap(c % cmap.N)
        shown = str(name) if c < max_legend else None
        top.bar(clients, hist[:, c], bottom=below_counts, color=colour, label=shown, width=0.85)
        bottom.bar(clients, frac[:, c], bottom=below_frac, color=colour, width=0.85)
        below_counts += hist[:, c]
        below_frac += frac[:, c]
    top.set_ylabel("rows (stacked by label)")
    g2 = report.get("g2_initial")
    top.set_title(
        f"{len(hist)} clients: mean JS to population {report['js_mean']:.3f} bits"
        + (f", G^2 at the initial model {g2:.3g}" if isinstance(g2, float) else "")
        + "\n"
        f"(size-weighted {report['js_weighted_mean']:.3f}, max possible {report['js_max_possible']:.3f})",
        fontsize=9,
    )
    if len(report["classes"]):
        top.legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="label")
    bottom.set_ylabel("label fraction")
    bottom.set_xlabel("client")
    twin = bottom.twinx()
    twin.plot(clients, report["js"], "k.-", label="JS to population (bits)")
    twin.set_ylim(0, 1)
    twin.set_ylabel("JS divergence (bits)")
    twin.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
