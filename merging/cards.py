"""Model cards of merging's outputs: their kinds, and the record of a merge.

Importing this module registers, in the core's card registry (:mod:`asymvlm.cards`), the card kinds
of what merging writes (``merged``: an AsymVLM merged from experts; ``checkpoint``: a merged state
dict; ``task_vector``; ``lora``: a merged peft adapter) and the files that make a folder a merge output
(``merge.json``) or a task vector (``task_vector.json``). This module is declared under the
entry-point group ``asymvlm.cards`` (``pyproject.toml``), so such a card is read even before merging is imported.

:func:`merge_card` is the model card's record of a merge output (:func:`asymvlm.hub.model_card`'s
``recipe``, ``metrics`` and ``evaluation``), from the merge's report: one function for every output
kind (AsymVLM heads, checkpoints, task vectors, LoRA adapters).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from asymvlm.cards import ArtefactFile, CardKind, asymvlm_card_kind, register_artefact_file, register_card_kind
from asymvlm.merging.task_vectors import TV_TYPE

__all__ = ["merge_card"]

_LOAD_CHECKPOINT = """from huggingface_hub import hf_hub_download
from safetensors.torch import load_file

state = load_file(hf_hub_download("{repo}", "model.safetensors"))  # the merged state dict"""
_LOAD_TASK_VECTOR = """from asymvlm.hub import resolve_artefact
from asymvlm.merging.task_vectors import LazyTaskVector

tau = LazyTaskVector(resolve_artefact("{repo}"))  # {{name: fine-tuned minus base}}, read lazily
# or merge it: asymvlm-merge --base BASE --inputs {repo} OTHER --method ties --output_dir merged"""
_LOAD_LORA = """from peft import PeftModel

model = PeftModel.from_pretrained(base_model, "{repo}")  # base_model: what the adapters were trained on"""

register_card_kind(
    "merged",
    asymvlm_card_kind(
        "AsymVLM (merged)",
        "An AsymVLM model merged from separately fine-tuned experts of one base (`asymvlm-merge`): ",
        ("merge",),
    ),
)
register_card_kind(
    "checkpoint",
    CardKind(
        "Merged checkpoint",
        "A checkpoint (`model.safetensors`) merged by `asymvlm-merge` from fine-tuned checkpoints, task vectors "
        "or LoRA updates of one base.",
        ("merge",),
        _LOAD_CHECKPOINT,
    ),
)
register_card_kind(
    "task_vector",
    CardKind(
        "Task vector",
        "A task vector (fine-tuned minus base weights, `task_vector.safetensors`) written by asymvlm: an input "
        "of `asymvlm-merge`.",
        ("task-vector",),
        _LOAD_TASK_VECTOR,
    ),
)
register_card_kind(
    "lora",
    CardKind(
        "Merged LoRA adapter",
        "A peft LoRA adapter merged by `asymvlm-merge` from adapters of one base, on their exact `B @ A` updates.",
        ("merge", "lora", "peft"),
        _LOAD_LORA,
    ),
)
register_artefact_file(ArtefactFile("merge.json", "asymvlm.merge", "merge output"))
register_artefact_file(ArtefactFile("task_vector.json", TV_TYPE, "task vector"))


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
