"""The model card's record of a merge output (:func:`asymvlm.hub.model_card`'s ``recipe``,
``metrics`` and ``evaluation``), from the merge's report: one function for every output kind
(AsymVLM heads, checkpoints, task vectors, LoRA adapters)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["merge_card"]


def merge_card(
    report: Mapping[str, Any], fingerprints: Mapping[str, Any] | None = None, *, val: Sequence[Any] | None = None
) -> dict[str, Any]:
    """The model card's record of a merge (:func:`asymvlm.hub.model_card`'s ``recipe``, ``metrics``
    and ``evaluation``) from its report: method, paper, options, lambda, weights, the base and the
    experts (names as given, fingerprints of their weights where known) and the lambda search
    (its grid, criterion and whether the curve was flat; the selected lambda's scores).

    Example:
        >>> merge_card({"method": "ties", "lam": 1.0, "inputs": ["alice/a", "alice/b"]})["recipe"]["experts"]
        [{'name': 'alice/a'}, {'name': 'alice/b'}]
    """
    from asymvlm.hub import public_name

    fingerprints = dict(fingerprints or {})
    expert_fps = fingerprints.get("experts") or [None] * len(report.get("inputs") or [])
    base_fps = fingerprints.get("base_fingerprints") or [None] * len(expert_fps)
    experts = []
    for name, fp, bfp in zip(report.get("inputs") or [], expert_fps, base_fps):
        entry = {"name": public_name(name)}
        if fp:
            entry["fingerprint"] = fp
        if bfp:
            entry["base_fingerprint"] = bfp
        experts.append(entry)
    recipe: dict[str, Any] = {
        "method": report.get("method"),
        "reference": report.get("reference"),
        "lam": report.get("lam"),
        "options": dict(report.get("options") or {}),
        "weights": report.get("weights"),
        "input_kind": report.get("kind"),
    }
    if report.get("base") is not None:
        recipe["base"] = {"name": public_name(report["base"]), **({"fingerprint": fingerprints["base"]} if
                                                                   fingerprints.get("base") else {})}  # fmt: skip
    recipe["experts"] = experts
    for key in ("output", "rank"):
        if report.get(key) is not None:
            recipe[key] = report[key]
    metrics: dict[str, Any] = {}
    evaluation = None
    search = report.get("lambda_search")
    if search:
        recipe["lambda_grid"] = [entry["lam"] for entry in search["curve"]]
        if search.get("criterion") is not None:  # reports before issue 25 selected by R@1 and did not say
            recipe["lambda_selected_by"] = search["criterion"]
        if search.get("flat") is not None:  # the criterion scored every lambda the same (first one kept)
            recipe["lambda_curve_flat"] = bool(search["flat"])
        best = next((e for e in search["curve"] if e["lam"] == search["best_lam"]), {})
        metrics.update(best_lam=search["best_lam"], best_score=search["best_score"])
        if report.get("expert_R@1") is not None:
            metrics["expert_R@1"] = report["expert_R@1"]
        caches = ", ".join(str(public_name(v)) for v in (val or ())) or "validation caches"
        evaluation = {"dataset": caches, "split": "validation", "lam": search["best_lam"],
                      "metrics": {k: v for k, v in best.items() if k != "lam"}}  # fmt: skip
    if report.get("truncation_error"):
        metrics["truncation_error"] = {k: report["truncation_error"][k] for k in ("overall", "max")}
    return {"recipe": recipe, "metrics": metrics, "evaluation": evaluation}
