"""PNG plots of an evaluation report (matplotlib, Agg backend; no display needed).

* ``r1_by_uncertainty.png``: exact t2i R@1 per uncertainty bin for each model, the CLIP
  baseline's overall R@1 as a dashed line.
* ``uncertainty_by_level.png``: mean uncertainty per caption specificity level (ShapeWorld)
  against the level's true ambiguity (log scale).
* ``risk_coverage.png``: zero-shot selective risk vs coverage for every model.

:func:`plot_federated` draws a federated recipe table (``asymvlm-demo``'s ``federated.png``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_report", "plot_federated"]


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
