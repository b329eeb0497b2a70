"""One entry point for every kind of input (what ``asymvlm-merge`` calls), and the merging API in one place.

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

The steps live in their own modules, and every public name of them is importable from here:

* :mod:`asymvlm.merging.inputs` — what an input is (:func:`input_kind`), where it is
  (:func:`local_input`), and whether each expert was fine-tuned from the base (lineage,
  :data:`UNRELATED_RATIO`);
* :mod:`asymvlm.merging.search` — :func:`lambda_search`: ``base + lam * aggregate(taus)`` scored
  over a grid (the aggregate computed once), with the flat-criterion check (:func:`is_flat`,
  :class:`FlatCriterionError`: R@1 of heads with a frozen mean direction is the same for every lambda);
* :mod:`asymvlm.merging.selection` — the criteria of AsymVLM heads (:data:`SELECTION_CRITERIA`:
  ``r1`` :func:`recall_metric`, ``likelihood`` :func:`likelihood_metric`, ``error_auroc``
  :func:`uncertainty_metric`), each over validation caches, one per task (the example of
  :func:`lambda_search` is in :mod:`asymvlm.merging.search`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asymvlm.errors import ConfigError
from asymvlm.merging.inputs import (
    CHECKPOINT_NAME,
    INPUT_KINDS,
    UNRELATED_RATIO,
    asymvlm_task_vectors,
    check_task_vector_bases,
    checkpoint_file,
    input_kind,
    local_input,
    relative_distance,
)
from asymvlm.merging.search import (
    FLAT_TOL,
    ON_FLAT,
    FlatCriterionError,
    FlatCriterionWarning,
    LambdaSearch,
    is_flat,
    lambda_search,
)
from asymvlm.merging.selection import (
    SELECTION_CRITERIA,
    caption_positives,
    likelihood_metric,
    recall_at_1,
    recall_metric,
    retrieval_log_prob,
    selection_metric,
    uncertainty_metric,
)
from asymvlm.merging.task_vectors import MergeInputError

__all__ = [
    "merge",
    "read_report",
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
    _check_arguments(inputs, method, lam, weights, options, lam_grid=lam_grid, select_by=select_by, on_flat=on_flat)
    names = [str(p) for p in inputs]  # as given (Hub ids stay Hub ids in the report and the card)
    base_name = str(base) if base is not None else None
    inputs = [local_input(p) for p in inputs]
    base = local_input(base) if base is not None else None
    kind = _one_kind(inputs)
    out = Path(out)
    report = _new_report(kind, base_name, names, method, options, weights, allow_unrelated)
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
            base=checkpoint_file(base) if base is not None else None,
            progress=progress,
            names=names,
            **options,
        )
        return {**report, **rep}
    if base is None:
        raise MergeInputError(f"merging {kind} inputs needs --base (what they were fine-tuned from)")
    if kind == "asymvlm":
        choice = _LambdaChoice(list(lam_grid), val, select_by or "r1", on_flat or "error", log) if lam_grid else None
        return _merge_heads(
            base, inputs, out, method, report, lam=lam, weights=weights, choice=choice, val=val,
            allow_unrelated=allow_unrelated, options=options,
        )  # fmt: skip
    return _merge_streamed(
        kind, base, inputs, out, method, report, lam=lam, weights=weights, progress=progress,
        allow_unrelated=allow_unrelated, options=options,
    )  # fmt: skip


def _check_arguments(
    inputs: Sequence[str | Path],
    method: str,
    lam: float,
    weights: Sequence[float] | None,
    options: dict[str, Any],
    *,
    lam_grid: Sequence[float] | None,
    select_by: str | None,
    on_flat: str | None,
) -> None:
    """The checks of :func:`merge`'s arguments that read no file (a :class:`MergeInputError` or a
    :class:`~asymvlm.errors.ConfigError` before anything is opened)."""
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
    from asymvlm.merging.methods import POST_OPTIONS

    declared = {k: v for k, v in options.items() if k not in POST_OPTIONS}
    METHODS.resolve(method, {**declared, "lam": lam})  # ConfigError: unknown method, unknown or invalid options
    if select_by is not None:
        SELECTION_CRITERIA.entry(select_by)  # ConfigError naming the valid criteria
    if on_flat is not None and on_flat not in ON_FLAT:
        raise ConfigError(f"on_flat={on_flat!r} is not one of {list(ON_FLAT)}")
    if (select_by is not None or on_flat is not None) and not lam_grid:
        raise MergeInputError("--select_by/--on_flat choose lambda on --lam_grid: give --lam_grid and --val too")


def _one_kind(inputs: Sequence[Path]) -> str:
    """The one :data:`INPUT_KINDS` entry of all ``inputs`` (inputs of several kinds are an error)."""
    kinds = {input_kind(p) for p in inputs}
    if len(kinds) > 1:
        raise MergeInputError(f"inputs of different kinds {sorted(kinds)}: merge one kind at a time")
    return kinds.pop()


def _new_report(
    kind: str,
    base_name: str | None,
    names: list[str],
    method: str,
    options: dict[str, Any],
    weights: Sequence[float] | None,
    allow_unrelated: bool,
) -> dict[str, Any]:
    """The report's first fields (``merge.json``; each path adds its own after them)."""
    from asymvlm.merging.methods import METHODS

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
    return report


@dataclass(frozen=True)
class _LambdaChoice:
    """How :func:`merge` chooses lambda for AsymVLM heads: the grid, the validation caches, the
    criterion (:data:`SELECTION_CRITERIA`), what a flat curve does, and the curve's logger."""

    grid: list[float]
    val: Sequence[str | Path]
    criterion: str
    on_flat: str
    log: Callable[[dict[str, Any]], None] | None


def _merge_heads(
    base: Path,
    inputs: list[Path],
    out: Path,
    method: str,
    report: dict[str, Any],
    *,
    lam: float,
    weights: Sequence[float] | None,
    choice: _LambdaChoice | None,
    val: Sequence[str | Path] | None,
    allow_unrelated: bool,
    options: dict[str, Any],
) -> dict[str, Any]:
    """Saved AsymVLMs: the heads merged in memory (lambda chosen by ``choice`` when given), written
    as an AsymVLM directory with ``merge.json`` and its model card."""
    from asymvlm.hub import write_model_card
    from asymvlm.io import atomic_directory, atomic_write_json
    from asymvlm.merging.cards import merge_card
    from asymvlm.merging.methods import check_task_vectors, merge_params
    from asymvlm.model import AsymVLM

    if input_kind(base) != "asymvlm":
        raise MergeInputError(f"the base of AsymVLM inputs must be a saved AsymVLM, got {base}")
    base_model, experts, b, vectors, warnings, fingerprints = asymvlm_task_vectors(base, inputs, allow_unrelated)
    if warnings:
        report["warnings"] = warnings
    base_params = {k: b[k].clone() for k in b}
    check_task_vectors(vectors, base_params)  # before any lambda is scored
    if method == "fisher":  # each input's saved Fisher; the base's (if saved) as a zero task vector
        from asymvlm.merging.fisher import attach_fishers

        vectors, weights, report["fisher_base"] = attach_fishers(base, inputs, vectors, weights)
    if choice is not None:
        lam = _choose_lambda(choice, report, base_model, experts, base_params, vectors, method, weights, options)
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


def _choose_lambda(
    choice: _LambdaChoice,
    report: dict[str, Any],
    base_model: Any,
    experts: list[Any],
    base_params: dict[str, Any],
    vectors: list[Any],
    method: str,
    weights: Sequence[float] | None,
    options: dict[str, Any],
) -> float:
    """The lambda search of AsymVLM heads on the validation caches, recorded in ``report`` (each
    expert's R@1 on its own cache for ``r1`` with one cache per expert, the curve, a flat warning)."""
    criterion, val = choice.criterion, choice.val
    refs = None
    if criterion == "r1" and len(val) == len(experts):  # each expert on its own task: normalised R@1
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
        choice.grid,
        selection_metric(criterion, base_model.head, val, references=refs),
        method=method,
        weights=weights,
        log=choice.log,
        criterion=criterion,
        on_flat=choice.on_flat,
        **options,
    )
    report["lambda_search"] = {
        "criterion": criterion, "curve": search.curve, "best_lam": search.best_lam, "best_score": search.best_score,
        "flat": search.flat,
    }  # fmt: skip
    if search.warning:
        report["warnings"] = [*report.get("warnings", []), search.warning]
    return search.best_lam


def _merge_streamed(
    kind: str,
    base: Path,
    inputs: list[Path],
    out: Path,
    method: str,
    report: dict[str, Any],
    *,
    lam: float,
    weights: Sequence[float] | None,
    progress: bool,
    allow_unrelated: bool,
    options: dict[str, Any],
) -> dict[str, Any]:
    """Checkpoints and task vectors: streamed into ``out/model.safetensors``, tensor by tensor."""
    from asymvlm.hub import model_card, write_model_card
    from asymvlm.io import atomic_directory, atomic_write_json
    from asymvlm.merging.cards import merge_card
    from asymvlm.merging.methods import merge_files
    from asymvlm.merging.task_vectors import DiffParams, LazyTaskVector

    base = checkpoint_file(base)
    if kind == "checkpoint":
        b = LazyTaskVector(base)
        vectors = [DiffParams(b, LazyTaskVector(checkpoint_file(p))) for p in inputs]
    else:
        vectors = [LazyTaskVector(p) for p in inputs]
        notes = check_task_vector_bases(base, vectors, allow_unrelated)
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
