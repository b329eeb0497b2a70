"""The inputs of a merge: what each one is, where it is, and whether it was fine-tuned from the base.

* :func:`input_kind` — ``asymvlm`` (a saved AsymVLM), ``checkpoint`` (a ``.safetensors`` file or a
  folder holding ``model.safetensors``), ``task_vector`` or ``lora`` (a peft adapter);
* :func:`local_input` — an existing path as it is, a Hub id as its snapshot in the Hub cache;
* the lineage checks: an AsymVLM expert's recorded ``init_from_fingerprint`` must be the base's
  head weights, one that records none must lie within :data:`UNRELATED_RATIO` of the base
  (:func:`relative_distance`), and a task vector's recorded ``base_fingerprint`` must be the base's.

Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     input_kind(d)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    asymvlm.errors.MergeInputError: ... is neither a saved AsymVLM, a peft adapter, a task vector nor a checkpoint ...
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from asymvlm.merging.task_vectors import MergeInputError

logger = logging.getLogger(__name__)

__all__ = [
    "INPUT_KINDS",
    "CHECKPOINT_NAME",
    "input_kind",
    "local_input",
    "UNRELATED_RATIO",
    "relative_distance",
    "checkpoint_file",
    "asymvlm_task_vectors",
    "check_task_vector_bases",
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


def checkpoint_file(p: Path) -> Path:
    """A checkpoint given as a folder (a merged checkpoint's output, a Hub snapshot) is its
    ``model.safetensors`` (inside it: a link to another folder's is refused)."""
    from asymvlm.merging.task_vectors import folder_file

    return folder_file(p, CHECKPOINT_NAME) if p.is_dir() else p


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


# An expert that records no lineage and differs from the base by at least this fraction of the base's
# weights (``||expert - base|| / ||base||``) is no fine-tune of it: two independent random inits of a
# head differ by ~1.4 (sqrt 2), a fine-tune moves the weights far less than their own size.
UNRELATED_RATIO = 1.0
ALLOW_UNRELATED_HINT = "pass --allow_unrelated (allow_unrelated=True) to merge it anyway"


def relative_distance(expert: Mapping[str, Tensor], base: Mapping[str, Tensor]) -> float:
    """``||expert - base|| / ||base||`` over the base's tensors (float64; inf for an all-zero base).

    Example:
        >>> import torch
        >>> relative_distance({"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([0.0, 4.0])})
        0.75
    """
    num = sum(float((expert[k].double() - base[k].double()).pow(2).sum()) for k in base)
    den = sum(float(base[k].double().pow(2).sum()) for k in base)
    return math.sqrt(num / den) if den > 0 else math.inf


def _expert_base_problem(
    p: Path, m: Any, base: Path, base_model: Any, base_weights: str
) -> tuple[str | None, str | None]:
    """``(refusal, warning)`` about whether the expert ``m`` (at ``p``) was fine-tuned from the base:
    its recorded lineage first (trained from scratch, or from other weights: a refusal), and for an
    expert that records none, how far it is from the base (:data:`UNRELATED_RATIO`)."""
    lineage = m.lineage or {}
    started = lineage.get("init_from_fingerprint")
    scratch = lineage.get("init") == "scratch" or ("init_from" in lineage and lineage["init_from"] is None)
    if scratch and not started:
        return (
            f"{p} was trained from scratch (its lineage records no init_from), not fine-tuned from the base {base}: "
            "its difference to the base is not a task vector",
            None,
        )
    if started is not None:
        if started != base_weights:
            return (
                f"{p} was fine-tuned from {lineage.get('init_from')!r}, whose head weights are not those of the "
                f"base {base}: its difference to the base is not its task vector",
                None,
            )
        return None, None
    ratio = relative_distance(m.head.state_dict(), base_model.head.state_dict())
    if ratio >= UNRELATED_RATIO:  # (NaN weights pass here and are named by the finiteness check)
        return (
            f"{p} does not record what it was fine-tuned from, and it differs from the base {base} by {ratio:.2f} "
            f"times the base's weights (a fine-tune moves them far less): it was not fine-tuned from the base",
            None,
        )
    return None, (
        f"{p} does not record what it was fine-tuned from: its base could not be checked (it differs from the "
        f"base by {ratio:.1%} of the base's weights)"
    )


def asymvlm_task_vectors(
    base: Path, inputs: Sequence[Path], allow_unrelated: bool = False
) -> tuple[Any, list[Any], Any, list[Any], list[str], dict[str, Any]]:
    """Saved AsymVLM experts of ``base`` as lazy task vectors of their heads: ``(base model, expert
    models, base weights, task vectors, warnings, fingerprints)``. Each expert must share the base's
    head configuration and encoder, carry no text-tower adapter, and have been fine-tuned from the
    base (its lineage, or its distance to the base: :data:`UNRELATED_RATIO`); ``allow_unrelated``
    turns an unrelated expert into a warning (logged and returned)."""
    from asymvlm.io import tensor_fingerprint
    from asymvlm.merging.task_vectors import DiffParams, LazyTaskVector, folder_file
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
        refusal, warning = _expert_base_problem(p, m, base, base_model, base_weights)
        if refusal is not None and not allow_unrelated:
            raise MergeInputError(f"{refusal}; {ALLOW_UNRELATED_HINT}")
        if refusal is not None:
            warnings.append(f"{refusal}; merged anyway (allow_unrelated)")
        if warning is not None:
            warnings.append(warning)
        experts.append(m)
    for w in warnings:
        logger.warning("warning: %s", w)
    b = LazyTaskVector(folder_file(base, WEIGHTS_NAME))
    vectors = [DiffParams(b, LazyTaskVector(folder_file(p, WEIGHTS_NAME))) for p in inputs]
    fingerprints = {"base": base_weights, "experts": [tensor_fingerprint(m.head.state_dict()) for m in experts]}
    return base_model, experts, b, vectors, warnings, fingerprints


def check_task_vector_bases(base: Path, vectors: Sequence[Any], allow_unrelated: bool) -> list[str]:
    """Task vectors record the fingerprint of the base they were computed against: it must be that
    of ``base`` (a refusal, or with ``allow_unrelated`` a warning); one that records none is a warning."""
    from asymvlm.io import tensor_fingerprint
    from asymvlm.merging.task_vectors import LazyTaskVector

    recorded = [v.meta.get("base_fingerprint") for v in vectors]
    if all(fp is None for fp in recorded):
        notes = [
            f"{v.path} does not record the fingerprint of its base: its base could not be checked" for v in vectors
        ]
    else:
        actual = tensor_fingerprint(LazyTaskVector(base))
        notes = []
        for v, fp in zip(vectors, recorded):
            if fp is None:
                notes.append(f"{v.path} does not record the fingerprint of its base: its base could not be checked")
            elif fp != actual:
                refusal = (
                    f"{v.path} was computed against another base than {base} (its base_fingerprint "
                    f"{fp[:12]}..., the base's {actual[:12]}...): it is not a task vector of this base"
                )
                if not allow_unrelated:
                    raise MergeInputError(f"{refusal}; {ALLOW_UNRELATED_HINT}")
                notes.append(f"{refusal}; merged anyway (allow_unrelated)")
    for w in notes:
        logger.warning("warning: %s", w)
    return notes
