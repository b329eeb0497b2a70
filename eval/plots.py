"""PNG plots of an evaluation report (matplotlib, Agg backend; no display needed).

* ``r1_by_uncertainty.png``: exact t2i R@1 per uncertainty bin for each model, the CLIP
  baseline's overall R@1 as a dashed line.
* ``uncertainty_by_level.png``: mean uncertainty per caption specificity level (ShapeWorld)
  against the level's true ambiguity (log scale).
* ``risk_coverage.png``: zero-shot selective risk vs coverage for every model.

:func:`plot_federated` draws a federated recipe table (``asymvlm-demo``'s ``federated.png``);
:func:`plot_risk_coverage` compares uncertainties by their risk-coverage curves against the oracle;
:func:`plot_reliability` draws the reliability diagram of a probability of being right.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from asymvlm.errors import InputError
from asymvlm.eval.uncertainty import expected_calibration_error, reliability_curve
from asymvlm.eval.zeroshot import aurc, risk_coverage

__all__ = ["plot_report", "plot_federated", "plot_risk_coverage", "plot_reliability"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, ax, path: Path, written: list[Path]) -> None:
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)


def plot_report(
    report: dict[str, dict[str, Any]],
    out_dir: str | Path,
    *,
    level_ambiguity: dict[int, float] | None = None,
    ambiguity_label: str = "true ambiguity of the caption (consistent attribute combinations)",
    zero_shot_task: str = "shape",
) -> list[Path]:
    """Write the plots that the report has data for; return their paths."""
    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    models = {k: v for k, v in report.items() if "bin_recall" in v}
    if models:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, m in models.items():
            bins = list(range(1, len(m["bin_recall"]) + 1))
            ax.plot(bins, m["bin_recall"], marker="o", label=f"{name} (rho={m['bin_spearman']:.2f})")
        if "clip" in report:
            ax.axhline(report["clip"]["t2i_R@1"], color="grey", linestyle="--", label="CLIP (overall)")
        ax.set_xlabel("uncertainty bin (1 = most certain)")
        ax.set_ylabel("exact text->image R@1")
        ax.set_title("R@1 by uncertainty level")
        ax.set_ylim(0, 1.02)
        _save(plt, fig, ax, out / "r1_by_uncertainty.png", written)

    levels = {k: v for k, v in report.items() if "uncertainty_by_level" in v}
    if levels and level_ambiguity:
        fig, ax = plt.subplots(figsize=(6, 4))
        amb = [level_ambiguity[lv] for lv in sorted(level_ambiguity)]
        for name, m in levels.items():
            unc = m["uncertainty_by_level"]
            ax.plot(
                amb[: len(unc)],
                unc,
                marker="o",
                label=f"{name} (rho={m.get('uncertainty_ambiguity_spearman', float('nan')):.2f})",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(ambiguity_label)
        ax.set_ylabel("mean uncertainty 1/kappa")
        ax.set_title("Uncertainty vs true ambiguity")
        _save(plt, fig, ax, out / "uncertainty_by_level.png", written)

    key = f"zeroshot_{zero_shot_task}_risk_coverage"
    curves = {k: v[key] for k, v in report.items() if key in v}
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, curve in curves.items():
            aurc = report[name].get(f"zeroshot_{zero_shot_task}_aurc", float("nan"))
            ax.plot(curve["coverage"], curve["risk"], label=f"{name} (AURC={aurc:.3g})")
        ax.set_xlabel("coverage (most confident first)")
        ax.set_ylabel("selective risk (1 - accuracy)")
        ax.set_title(f"Zero-shot {zero_shot_task}: risk-coverage")
        _save(plt, fig, ax, out / "risk_coverage.png", written)
    return written


def plot_federated(rows: list[dict[str, Any]], path: str | Path, level: int) -> Path:
    """Bars: each recipe's test exact t2i R@1 on the most specific captions (its validation-chosen
    run), the references (``centralized``, ``fedavg-iid``) as dashed lines; returns ``path``."""
    plt = _plt()
    path = Path(path)
    refs = {r["name"]: r["test_t2i_R@1_most_specific"] for r in rows if r["setup"] != "non-iid"}
    bars = [r for r in rows if r["setup"] == "non-iid"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([r["name"] for r in bars], [r["test_t2i_R@1_most_specific"] for r in bars], color="tab:blue")
    for (name, value), style in zip(refs.items(), ("--", ":")):
        ax.axhline(value, color="grey", linestyle=style, label=f"{name} ({value:.3f})")
    ax.set_xlabel("server recipe (non-IID clients; hyperparameters chosen on validation)")
    ax.set_ylabel(f"exact text->image R@1, level-{level} captions")
    ax.set_title("Federated recipes at the same budget")
    ax.tick_params(axis="x", labelrotation=30)
    written: list[Path] = []
    _save(plt, fig, ax, path, written)
    return path


def plot_risk_coverage(curves: dict[str, tuple[Any, Any]], path: str | Path, title: str | None = None) -> Path:
    """Selective risk (1 - accuracy on the kept items) vs coverage, least uncertain first, for each
    ``{name: (uncertainty (N,), correct (N,))}``, with the oracle curve of the first entry's
    ``correct`` (every correct item first) dashed; the legend gives each AURC. Returns ``path``.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = plot_risk_coverage({"1/kappa": ([0.1, 0.9, 0.3], [1, 0, 1])}, f"{d}/rc.png")
        ...     p.stat().st_size > 0
        True
    """
    if not curves:
        raise InputError("curves is empty: give at least one {name: (uncertainty, correct)}")
    plt = _plt()
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (unc, correct) in curves.items():
        unc, correct = torch.as_tensor(unc, dtype=torch.float64), torch.as_tensor(correct, dtype=torch.float64)
        cov, acc = risk_coverage(unc, correct)
        ax.plot(cov, 1 - acc, label=f"{name} (AURC={aurc(unc, correct):.3g})")
    correct = torch.as_tensor(next(iter(curves.values()))[1], dtype=torch.float64)
    cov, acc = risk_coverage(-correct, correct)  # the ideal order: every correct item first
    ax.plot(cov, 1 - acc, color="grey", linestyle="--", label=f"oracle (AURC={aurc(-correct, correct):.3g})")
    ax.set_xlabel("coverage (least uncertain first)")
    ax.set_ylabel("selective risk (1 - accuracy)")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_title(title or "Risk-coverage (lower is better)")
    _save(plt, fig, ax, path, [])
    return path


def plot_reliability(
    probability: Any, correct: Any, path: str | Path, n_bins: int = 15, title: str | None = None
) -> Path:
    """Reliability diagram of a probability of being right: accuracy per equal-width bin (bars) against
    the diagonal of perfect calibration, ECE in the legend, and a histogram of the probabilities below.
    Returns ``path``.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = plot_reliability([0.2, 0.7, 0.9, 0.95], [0, 1, 1, 1], f"{d}/rel.png", n_bins=5)
        ...     p.stat().st_size > 0
        True
    """
    curve = reliability_curve(probability, correct, n_bins)  # validates: empty, NaN, outside [0, 1]
    ece = expected_calibration_error(probability, correct, n_bins)
    plt = _plt()
    path = Path(path)
    edges = curve["edges"].numpy()
    left, right = edges[curve["bin"].numpy()], edges[curve["bin"].numpy() + 1]
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(
        left,
        curve["accuracy"].numpy(),
        width=right - left,
        align="edge",
        edgecolor="black",
        color="tab:blue",
        alpha=0.7,
        label=f"accuracy per bin (ECE={ece:.3f})",
    )
    ax.plot(
        curve["confidence"].numpy(),
        curve["accuracy"].numpy(),
        "o",
        color="tab:red",
        markersize=4,
        label="(mean probability, accuracy)",
    )
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    ax.set_ylabel("observed accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title or "Reliability diagram (lower ECE is better)")
    p = torch.as_tensor(probability, dtype=torch.float64).reshape(-1).numpy()
    hist.hist(p, bins=edges, color="tab:grey", edgecolor="black")
    hist.set_xlabel("predicted probability of being right")
    hist.set_ylabel("count")
    _save(plt, fig, ax, path, [])
    return path
