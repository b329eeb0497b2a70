"""Step 6 of ``asymvlm-demo``: the report. :func:`build_report` gathers the figures (with their
:func:`provenance`), :func:`write_report` writes ``report.json``, ``metrics.json`` and the PNG plots,
:func:`print_summary` prints the tables.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from asymvlm.training.demo_federated import federated_table
from asymvlm.training.demo_steps import EVAL_SEEDS, DemoData, say

__all__ = ["provenance", "PROVENANCE_PACKAGES", "build_report", "write_report", "print_summary"]

# the distributions whose versions the report records (importlib.metadata names)
PROVENANCE_PACKAGES = ("asymvlm", "torch", "numpy", "scipy", "open_clip_torch", "transformers", "safetensors", "flwr")
# CPU features that select torch's kernels (and so change float results): /proc/cpuinfo flags
CPU_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def _cpu_info() -> dict[str, Any]:
    """The CPU model and the :data:`CPU_FLAGS` it has (Linux's /proc/cpuinfo; None elsewhere)."""
    model, flags = None, None
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return {"cpu_model": None, "cpu_flags": None}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and flags is None:
            present = set(value.split())
            flags = [f for f in CPU_FLAGS if f in present]
        if model is not None and flags is not None:
            break
    return {"cpu_model": model, "cpu_flags": flags}


def _source_commit() -> str | None:
    """The git commit of the source tree the package runs from (an editable install), else None;
    read from ``.git`` without running git."""
    root = Path(__file__).resolve().parents[1] / ".git"
    try:
        head = (root / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head or None
        ref = head[5:]
        if (root / ref).is_file():
            return (root / ref).read_text().strip() or None
        for line in (root / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        return None
    return None


def provenance(encoder: Any, seed: int, toy_clip_dir: Path | None = None) -> dict[str, Any]:
    """What a figure of the demo depends on besides the code: package versions, the encoder's weights
    fingerprint (the toy CLIP is built on each machine and float training is not bit-reproducible
    across CPUs, so two machines can hold different toy CLIPs under the same name), the seeds,
    the machine (CPU model and the kernel-selecting flags, torch's threads and CPU capability) and
    the date. No paths and no host name (``report.json`` may be shared).

    Example:
        >>> from types import SimpleNamespace
        >>> p = provenance(SimpleNamespace(fingerprint="abc"), seed=0)
        >>> p["encoder"]["fingerprint"], p["seeds"]["run"], "torch" in p["packages"]
        ('abc', 0, True)
    """
    import datetime
    import importlib.metadata as md
    import json
    import os
    import platform

    import torch

    packages: dict[str, str | None] = {}
    for name in PROVENANCE_PACKAGES:
        try:
            packages[name] = md.version(name)
        except md.PackageNotFoundError:
            packages[name] = None  # not installed
    toy: dict[str, Any] | None = None
    if toy_clip_dir is not None:
        toy = {"directory": Path(toy_clip_dir).name}  # the recipe's cache key, never the path
        try:
            built = json.loads((Path(toy_clip_dir) / "recipe.json").read_text())
        except (OSError, ValueError):
            built = None
        if isinstance(built, dict):  # how and with what this machine's toy CLIP was built
            toy.update({k: built.get(k) for k in ("recipe", "build_seconds", "torch")})
    cpu_capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: None)()
    return {
        "packages": packages,
        "source_commit": _source_commit(),
        "encoder": {"fingerprint": getattr(encoder, "fingerprint", None), "toy_clip": toy},
        "seeds": {"run": seed, "data": seed, "merge_domains": seed + 1, **EVAL_SEEDS},
        "machine": {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            **_cpu_info(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "torch_cpu_capability": cpu_capability,
            "mkldnn": bool(torch.backends.mkldnn.is_available()),
            "thread_env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _toy_clip_dir(toy_steps: int | None, world: int) -> Path:
    from asymvlm.worlds.toyclip import ToyCLIPRecipe, toy_clip_dir

    steps = {} if toy_steps is None else {"steps": toy_steps}
    return toy_clip_dir(ToyCLIPRecipe(world_version=world, **steps))


def build_report(
    data: DemoData,
    metrics: dict[str, Any],
    confidence: dict[str, Any],
    fed_rows: list[dict],
    merged: dict[str, dict[str, Any]],
    s: dict,
    seed: int,
    timings: dict[str, float],
    start: float,
) -> dict[str, Any]:
    """``report.json``'s content: the central heads' figures next to CLIP's, the federated table
    (each recipe's validation-chosen run on the test split), the merges, the central heads'
    confidence, the settings, the :func:`provenance`, the step ``timings`` and the seconds since ``start``."""
    top = int(data.eval_data.levels.max())
    fed = {r["name"]: metrics[f"fed-{r['name']}"] for r in fed_rows}
    return {
        "uncertainty_ambiguity_spearman": {f: metrics[f]["uncertainty_ambiguity_spearman"] for f in ("vmf", "ps")},
        "r1_uncertainty_pearson": {f: metrics[f]["bin_pearson"] for f in ("vmf", "ps")},
        "r1_uncertainty_spearman": {f: metrics[f]["bin_spearman"] for f in ("vmf", "ps")},
        "t2i_r1": {m: metrics[m]["t2i_R@1"] for m in ("clip", "vmf", "ps")},
        "i2t_r1": {m: metrics[m]["i2t_R@1"] for m in ("clip", "vmf", "ps")},
        "consistent_t2i_r1": {m: metrics[m]["consistent_t2i_R@1"] for m in ("clip", "vmf", "ps")},
        # the most specific level: exact t2i and i2t (captions of that level only, identical texts as one)
        "t2i_r1_most_specific": {m: metrics[m][f"t2i_R@1_level{top}"] for m in ("clip", "vmf", "ps")},
        "i2t_r1_most_specific": {m: metrics[m][f"i2t_R@1_level{top}"] for m in ("clip", "vmf", "ps")},
        "world_version": s["world"],
        # the federated table: test metrics of each recipe's validation-chosen run (rows "centralized"
        # and "fedavg-iid" are the references at the same budget); t2i R@1 = all levels, as above
        "federated_t2i_r1": {name: m["t2i_R@1"] for name, m in fed.items()},
        "federated_t2i_r1_most_specific": {name: m[f"t2i_R@1_level{top}"] for name, m in fed.items()},
        "federated_uncertainty_ambiguity_spearman": {
            name: m["uncertainty_ambiguity_spearman"] for name, m in fed.items()
        },
        "federated_table": [
            {
                **r,
                "test_t2i_R@1_most_specific": fed[r["name"]][f"t2i_R@1_level{top}"],
                "test_uncertainty_ambiguity_spearman": fed[r["name"]]["uncertainty_ambiguity_spearman"],
            }
            for r in fed_rows
        ],
        "merged_normalized_r1": {k: v["mean_normalized_R@1"] for k, v in merged.items()},
        "merged_uncertainty_ambiguity_spearman": {
            k: metrics[f"merged-{k}"]["uncertainty_ambiguity_spearman"] for k in merged
        },
        "merges": merged,
        "uncertainty_by_level": {f: metrics[f]["uncertainty_by_level"] for f in ("vmf", "ps")},
        # p_correct and the parts of each central head's uncertainty (asymvlm.eval.confidence)
        "confidence": {f: {k: v for k, v in r.items() if k != "outcomes"} for f, r in confidence.items()},
        "settings": {**s, "seed": seed, "encoder": data.spec[0]},
        "provenance": provenance(data.encoder, seed, _toy_clip_dir(s["toy_steps"], s["world"])),
        "timings": timings,
        "seconds": round(time.time() - start, 1),
    }


def write_report(
    report: dict[str, Any], metrics: dict[str, Any], confidence: dict[str, Any], main_models: list[str], top: int,
    out: Path, world: int,
) -> list[Path]:  # fmt: skip
    """``report.json``, ``metrics.json`` and the plots (the ``main_models``' figures, the federated
    table, the central vMF's risk-coverage on the level-``top`` captions and its reliability) into
    ``out``; returns the plots' paths."""
    from asymvlm.eval.plots import plot_federated, plot_reliability, plot_report, plot_risk_coverage
    from asymvlm.io import atomic_write_json, json_safe
    from asymvlm.worlds import shapeworld as sw

    atomic_write_json(json_safe(report), out / "report.json")
    atomic_write_json(json_safe({"metrics": metrics}), out / "metrics.json")
    label = (
        "true ambiguity of the caption (probability that a scene satisfies it)"
        if world == 3
        else "true ambiguity of the caption (consistent attribute combinations)"
    )
    plots = plot_report(
        {k: metrics[k] for k in main_models}, out, level_ambiguity=sw.level_ambiguity(world), ambiguity_label=label
    )
    plots.append(plot_federated(report["federated_table"], out / "federated.png", top))
    o = confidence["vmf"]["outcomes"]
    rows = o["levels"] == top
    plots.append(
        plot_risk_coverage(
            {k: (v[rows], o["correct"][rows]) for k, v in o["scores"].items()},
            out / "risk_coverage_specific.png",
            title=f"central vMF: level-{top} captions (most specific)",
        )
    )
    plots.append(
        plot_reliability(
            o["p_correct"].clamp(0, 1), o["correct"], out / "reliability.png", title="central vMF: p_correct"
        )
    )
    return plots


def print_summary(
    report: dict[str, Any], metrics: dict[str, Any], confidence: dict[str, Any], main_models: list[str],
    eval_data: Any, out: Path, plots: list[Path],
) -> None:  # fmt: skip
    """The summary table (the most specific captions), the federated table, the uncertainty by
    caption level, the central vMF's confidence table and the merges."""
    from asymvlm.eval.benchmark import specific_table
    from asymvlm.eval.confidence import confidence_table

    top = int(eval_data.levels.max())
    say("")
    say(specific_table(metrics, main_models, eval_data))
    say("")
    say(federated_table(report["federated_table"], top))
    say("")
    by_level = "; ".join(
        f"{f}: " + ", ".join(f"{u:.4f}" for u in report["uncertainty_by_level"][f]) for f in ("vmf", "ps")
    )
    say(f"mean uncertainty by caption level (vague -> exact): {by_level}")
    say("")
    say("central vMF: does it know when its answer is right?")
    say(confidence_table(confidence["vmf"]))
    say(
        "merged (mean normalised R@1 over the caption styles): "
        + ", ".join(f"{k} {v['mean_normalized_R@1']:.3f} (lam {v['lam']})" for k, v in report["merges"].items())
    )
    say(f"wrote {out / 'report.json'}, {out / 'metrics.json'}" + "".join(f", {q.name}" for q in plots))
    say(f"done in {report['seconds']:.0f} s")
