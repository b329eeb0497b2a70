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
(the aggregate is computed once); :func:`recall_metric` is the usual callback for AsymVLM heads:
mean (normalised) text->image R@1 over validation caches, one per task.

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

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from asymvlm.merging.task_vectors import MergeInputError

logger = logging.getLogger(__name__)

__all__ = [
    "merge",
    "input_kind",
    "local_input",
    "lambda_search",
    "LambdaSearch",
    "recall_metric",
    "recall_at_1",
    "INPUT_KINDS",
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
    ``model.safetensors``."""
    return p / CHECKPOINT_NAME if p.is_dir() else p


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


@dataclass
class LambdaSearch:
    """The metric over the grid (``curve``: one dict per lambda) and the best lambda."""

    curve: list[dict[str, Any]] = field(default_factory=list)
    best_lam: float = float("nan")
    best_score: float = -float("inf")


def _score(value: Any) -> float:
    if isinstance(value, Mapping):
        if "score" not in value:
            raise ValueError("a metric returning a dict must include 'score'")
        return float(value["score"])
    return float(value)


def lambda_search(
    base: Mapping[str, Tensor],
    task_vectors: Sequence[Mapping[str, Tensor]],
    grid: Sequence[float],
    metric: Callable[[dict[str, Tensor]], Any],
    *,
    method: str = "task_arithmetic",
    weights: Sequence[float] | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
    **options: Any,
) -> LambdaSearch:
    """Evaluate ``metric(base + lam * aggregate(task_vectors))`` for every ``lam`` in ``grid``
    (higher is better; a metric may return a float or a dict with ``score`` and anything else to
    log). The aggregate is computed once."""
    from asymvlm.federated.core import server_update
    from asymvlm.merging.methods import make_method, validate_task_vectors

    if not grid:
        raise ValueError("empty lambda grid")
    validate_task_vectors(task_vectors, base)
    options.pop("lam", None)
    agg = make_method(method, **options).aggregator(task_vectors, weights)  # once for the whole grid
    result = LambdaSearch()
    for lam in grid:
        recipe = make_method(method, lam=float(lam), **options)
        params, _, _ = server_update(recipe, task_vectors, weights, {}, base, aggregated=agg)
        value = metric(params)
        entry = {"lam": float(lam), **(dict(value) if isinstance(value, Mapping) else {"score": float(value)})}
        result.curve.append(entry)
        if log is not None:
            log(entry)
        s = _score(value)
        if math.isfinite(s) and s > result.best_score:
            result.best_lam, result.best_score = float(lam), s
    if not math.isfinite(result.best_score):
        raise ValueError(f"the metric is not finite for any lambda of {list(grid)}: {result.curve}")
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


def recall_metric(
    head_template: Any, val_caches: Sequence[str | Path], *, references: Sequence[float] | None = None
) -> Callable[[dict[str, Tensor]], dict[str, Any]]:
    """A metric callback for AsymVLM heads: R@1 on each validation cache and their mean, normalised
    by ``references`` (each task's expert R@1 on its own cache) when given: the score is the mean
    normalised R@1 (Ilharco et al. 2023's normalised accuracy)."""
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


def _asymvlm_vectors(base: Path, inputs: Sequence[Path]):
    from asymvlm.io import tensor_fingerprint
    from asymvlm.merging.task_vectors import DiffParams, LazyTaskVector
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
        started = (m.lineage or {}).get("init_from_fingerprint")
        if started is not None and started != base_weights:
            raise MergeInputError(
                f"{p} was fine-tuned from {m.lineage.get('init_from')!r}, whose head weights are not those of the "
                f"base {base}: its difference to the base is not its task vector"
            )
        if started is None:
            warnings.append(f"{p} does not record what it was fine-tuned from: its base could not be checked")
        experts.append(m)
    for w in warnings:
        logger.warning(w)
    b = LazyTaskVector(base / WEIGHTS_NAME)
    vectors = [DiffParams(b, LazyTaskVector(Path(p) / WEIGHTS_NAME)) for p in inputs]
    fingerprints = {"base": base_weights, "experts": [tensor_fingerprint(m.head.state_dict()) for m in experts]}
    return base_model, experts, b, vectors, warnings, fingerprints


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
    progress: bool = False,
    log: Callable[[dict[str, Any]], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Merge ``inputs`` into ``base`` with ``method`` (see the module docstring for the input kinds)
    and write ``out`` atomically; returns the report (also written to ``out/merge.json``).

    ``lam_grid`` + ``val`` (AsymVLM inputs): pick lambda by :func:`lambda_search` with
    :func:`recall_metric` on the validation caches (one per input, in order: the score is the mean
    normalised R@1; otherwise the mean R@1), and merge with the best one.
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
        from asymvlm.merging.methods import merge_params
        from asymvlm.model import AsymVLM

        if input_kind(base) != "asymvlm":
            raise MergeInputError(f"the base of AsymVLM inputs must be a saved AsymVLM, got {base}")
        base_model, experts, b, vectors, warnings, fingerprints = _asymvlm_vectors(base, inputs)
        if warnings:
            report["warnings"] = warnings
        base_params = {k: b[k].clone() for k in b}
        if lam_grid:
            refs = None
            if len(val) == len(inputs):  # each expert on its own task: normalised R@1
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
                recall_metric(base_model.head, val, references=refs),
                method=method,
                weights=weights,
                log=log,
                **options,
            )
            lam = search.best_lam
            report["lambda_search"] = {"curve": search.curve, "best_lam": lam, "best_score": search.best_score}
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
    """The ``merge.json`` of a merge output."""
    return json.loads((Path(out) / "merge.json").read_text())
