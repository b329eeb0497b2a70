"""Task vectors: ``tau = theta_finetuned - theta_base``, read tensor by tensor.

A task vector is the merging counterpart of a federated client delta (``asymvlm.federated.core``'s
convention: a delta is new minus reference, and ``apply_updates`` adds). Sources:

* full checkpoints (``.safetensors`` state dicts of open_clip / transformers / anything):
  :func:`task_vector_from_checkpoints`;
* AsymVLM models (their text heads): :func:`task_vector_from_models`;
* peft LoRA adapters: :func:`task_vector_from_lora`, the exact dense ``Delta W = scaling * B @ A``
  per adapted layer (never combining A and B factors separately, which is what makes peft's
  ``linear``/``ties`` LoRA merges inexact).

Task vectors are saved as safetensors + a JSON sidecar (``base_fingerprint`` of the base tensors
they were computed against, the keys' source) + a ``README.md`` model card, and opened lazily with
:class:`LazyParams`, a
read-only mapping that loads one tensor per access (a fresh copy: safetensors may share storage,
and nothing here edits loaded tensors in place).

Example:
    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> d = tempfile.mkdtemp()
    >>> save_file({"w": torch.zeros(3)}, f"{d}/base.safetensors")
    >>> save_file({"w": torch.ones(3)}, f"{d}/ft.safetensors")
    >>> tv = task_vector_from_checkpoints(f"{d}/base.safetensors", f"{d}/ft.safetensors", f"{d}/tv")
    >>> LazyTaskVector(tv)["w"].tolist()
    [1.0, 1.0, 1.0]
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from asymvlm.errors import MergeInputError
from asymvlm.io import LazyParams, tensor_fingerprint

__all__ = [
    "LazyTaskVector",
    "DiffParams",
    "MemoryParams",
    "MergeInputError",
    "tensor_fingerprint",
    "task_vector_from_checkpoints",
    "task_vector_from_models",
    "task_vector_from_lora",
    "save_task_vector",
    "check_same_base",
    "read_adapter_config",
    "folder_file",
]

TV_TYPE = "asymvlm.task_vector"


class LazyTaskVector(LazyParams):
    """:class:`asymvlm.io.LazyParams` for merge inputs: also opens a task-vector directory (its
    ``task_vector.safetensors``), reports missing or corrupt files as :class:`MergeInputError` and
    reads the JSON sidecar into ``meta`` (``base_fingerprint``, source)."""

    error = MergeInputError

    def __init__(self, path: str | Path, keys: Sequence[str] | None = None, dtype: torch.dtype | None = None):
        path = Path(path)
        if path.is_dir():
            path = folder_file(path, "task_vector.safetensors")
        super().__init__(path, keys, dtype)
        self.meta = _read_meta(path)


def folder_file(folder: str | Path, name: str) -> Path:
    """``folder / name`` for a file an artefact folder holds (a task vector's, a merge output's, a
    saved model's, a peft adapter's): :func:`asymvlm.io.inside_folder`, so a link to another
    artefact's file, or anywhere outside the folder, is a :class:`MergeInputError` naming it."""
    from asymvlm.errors import ArtefactError
    from asymvlm.io import inside_folder

    try:
        return inside_folder(folder, name)
    except ArtefactError as err:
        raise MergeInputError(str(err)) from None


class DiffParams(Mapping):
    """``finetuned - base`` computed key by key from two lazily read checkpoints (a task vector that
    is never written). ``keys`` restricts it (e.g. trainable keys); shapes and dtypes must agree."""

    def __init__(self, base: LazyParams, finetuned: LazyParams, keys: Sequence[str] | None = None):
        self.base, self.finetuned = base, finetuned
        self._keys = list(keys) if keys is not None else list(finetuned)
        missing = [k for k in self._keys if k not in base._shapes]
        if missing:
            raise MergeInputError(f"{finetuned.path} has key(s) {missing[:5]} that the base {base.path} lacks")
        for k in self._keys:
            if base.shape(k) != finetuned.shape(k):
                raise MergeInputError(
                    f"{k!r}: shape {finetuned.shape(k)} in {finetuned.path}, {base.shape(k)} in the base {base.path}"
                )
            if base.stored_dtype(k) != finetuned.stored_dtype(k):
                raise MergeInputError(
                    f"{k!r}: dtype {finetuned.stored_dtype(k)} in {finetuned.path}, {base.stored_dtype(k)} in the "
                    f"base {base.path}"
                )
        self.path = finetuned.path
        self.meta = {"source": "checkpoint", "base": str(base.path)}

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self.finetuned[key] - self.base[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self.base.shape(key)

    def stored_dtype(self, key: str) -> torch.dtype:
        return self.base.stored_dtype(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class MemoryParams(dict):
    """An in-memory task vector with the interface of :class:`LazyParams` (``shape``, ``path``,
    ``meta``)."""

    def __init__(self, tensors: Mapping[str, Tensor], path: str = "<memory>", meta: dict[str, Any] | None = None):
        super().__init__(tensors)
        self.path = path
        self.meta = dict(meta or {})

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self[key].shape)

    def stored_dtype(self, key: str) -> torch.dtype:
        return self[key].dtype


def _read_meta(path: Path) -> dict[str, Any]:
    """The JSON sidecar of a task vector (``{}`` when there is none): an object of this type whose
    ``base_fingerprint`` is a string or null; anything else is a :class:`MergeInputError` naming it."""
    from asymvlm.errors import ArtefactError
    from asymvlm.io import read_json

    side = path.with_name(path.stem + ".json")
    if path.name == "task_vector.safetensors":
        side = folder_file(path.parent, "task_vector.json")
    if not side.is_file():
        return {}
    try:
        doc = read_json(side)
    except ArtefactError as err:
        raise MergeInputError(str(err)) from err
    except RecursionError:
        raise MergeInputError(f"corrupt JSON in {side}: nested too deeply") from None
    if not isinstance(doc, dict):
        raise MergeInputError(f"{side}: expected a JSON object, got a {type(doc).__name__}")
    if doc.get("type", TV_TYPE) != TV_TYPE:
        raise MergeInputError(f"{side}: type is {doc.get('type')!r}, expected {TV_TYPE!r}")
    fp = doc.get("base_fingerprint")
    if fp is not None and not isinstance(fp, str):
        raise MergeInputError(f"{side}: base_fingerprint must be a string or null, got {fp!r}")
    return doc


def save_task_vector(tau: Mapping[str, Tensor], directory: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``task_vector.safetensors`` + ``task_vector.json`` atomically into ``directory``."""
    from asymvlm.io import atomic_directory, atomic_save_safetensors, atomic_write_json, non_finite_key

    bad = non_finite_key(tau)
    if bad is not None:
        raise MergeInputError(f"task vector entry {bad!r} contains NaN or inf")
    from asymvlm.hub import model_card, public_name, write_model_card

    directory = Path(directory)
    record = {k: public_name(v) if k in ("base", "finetuned", "adapter") else v for k, v in meta.items()}
    record.pop("head", None)
    record.pop("encoder", None)
    record["keys"] = len(tau)
    record["parameters"] = sum(v.numel() for v in tau.values())
    card = model_card("task_vector", encoder=meta.get("encoder"), head=meta.get("head"), recipe=record)
    with atomic_directory(directory) as tmp:
        atomic_save_safetensors(dict(tau), tmp / "task_vector.safetensors")
        atomic_write_json({"type": TV_TYPE, "format_version": 1, **meta}, tmp / "task_vector.json")
        write_model_card(tmp, card, replacing=directory)
    return directory


def _select(keys: Sequence[str], include: str | None) -> list[str]:
    if include is None:
        return list(keys)
    pat = re.compile(include)
    chosen = [k for k in keys if pat.search(k)]
    if not chosen:
        raise MergeInputError(f"no key matches {include!r}")
    return chosen


def task_vector_from_checkpoints(
    base: str | Path, finetuned: str | Path, out: str | Path, *, include: str | None = None
) -> Path:
    """``finetuned - base`` for the keys of ``finetuned`` (optionally those matching ``include``,
    e.g. trainable or adapter keys); keys, shapes or dtypes that differ are an error."""
    tau, base_fp = _checkpoint_delta(base, finetuned, include)
    return save_task_vector(
        tau, out, {"source": "checkpoint", "base": str(base), "finetuned": str(finetuned), "base_fingerprint": base_fp}
    )


def _checkpoint_delta(base: str | Path, finetuned: str | Path, include: str | None) -> tuple[dict[str, Tensor], str]:
    """``(finetuned - base, the base's fingerprint)`` (see :func:`task_vector_from_checkpoints`)."""
    b, f = LazyTaskVector(base), LazyTaskVector(finetuned)
    keys = _select(list(f), include)
    missing = [k for k in keys if k not in b._shapes]
    if missing:
        raise MergeInputError(f"{finetuned} has key(s) {missing[:5]} that the base {base} lacks")
    tau = {}
    for k in keys:
        if b.shape(k) != f.shape(k):
            raise MergeInputError(f"{k!r}: shape {f.shape(k)} in {finetuned}, {b.shape(k)} in the base")
        tb, tf = b[k], f[k]
        if tb.dtype != tf.dtype:
            raise MergeInputError(f"{k!r}: dtype {tf.dtype} in {finetuned}, {tb.dtype} in the base")
        tau[k] = tf - tb
    return tau, tensor_fingerprint(b)  # the whole base, so vectors over other key subsets still compare


def task_vector_from_models(base_model: str | Path, finetuned_model: str | Path, out: str | Path) -> Path:
    """The head task vector of two saved AsymVLMs (same architecture and encoder); each a folder
    or a Hugging Face Hub id (:func:`asymvlm.hub.resolve_artefact`)."""
    from asymvlm.hub import resolve_artefact
    from asymvlm.model import WEIGHTS_NAME, AsymVLM

    names = (str(base_model), str(finetuned_model))
    base_model, finetuned_model = resolve_artefact(base_model), resolve_artefact(finetuned_model)
    bm = AsymVLM.from_pretrained(base_model, load_encoder=False)
    fm = AsymVLM.from_pretrained(finetuned_model, load_encoder=False)
    if bm.head.config != fm.head.config:
        raise MergeInputError(f"heads differ: {bm.head.config} vs {fm.head.config}")
    src_b, src_f = bm.encoder_source or {}, fm.encoder_source or {}
    if src_b.get("fingerprint") != src_f.get("fingerprint"):
        raise MergeInputError("the two models were trained on different encoders")
    tau, base_fp = _checkpoint_delta(
        folder_file(base_model, WEIGHTS_NAME), folder_file(finetuned_model, WEIGHTS_NAME), None
    )
    meta = {
        "source": "asymvlm",
        "base": names[0],
        "finetuned": names[1],
        "base_fingerprint": base_fp,
        "head": bm.head.config.to_dict(),
        "encoder": src_f,
    }
    return save_task_vector(tau, out, meta)


def read_adapter_config(adapter_dir: str | Path) -> tuple[dict[str, Any], float]:
    """``(adapter_config.json, scaling)`` of a peft adapter folder, read as untrusted: an object
    whose ``r`` is a positive integer and ``lora_alpha`` a finite number (``scaling = lora_alpha /
    r``, or ``/ sqrt(r)`` with ``use_rslora``); anything else is a :class:`MergeInputError` naming
    the file and the field."""
    from asymvlm.errors import ArtefactError
    from asymvlm.io import read_json

    cfg_path = Path(adapter_dir) / "adapter_config.json"
    if not cfg_path.is_file():
        raise MergeInputError(f"{adapter_dir} is not a peft adapter (no adapter_config.json)")
    try:
        cfg = read_json(cfg_path)
    except ArtefactError as err:
        raise MergeInputError(str(err)) from err
    except RecursionError:
        raise MergeInputError(f"corrupt JSON in {cfg_path}: nested too deeply") from None
    if not isinstance(cfg, dict):
        raise MergeInputError(f"{cfg_path}: expected a JSON object, got a {type(cfg).__name__}")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if r is None or alpha is None:
        raise MergeInputError(f"{cfg_path} lacks r / lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise MergeInputError(f"{cfg_path}: r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise MergeInputError(f"{cfg_path}: lora_alpha must be a finite number, got {alpha!r}")
    rslora = cfg.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise MergeInputError(f"{cfg_path}: use_rslora must be true or false, got {rslora!r}")
    return cfg, float(alpha / (math.sqrt(r) if rslora else r))


def task_vector_from_lora(adapter_dir: str | Path, out: str | Path, *, base_fingerprint: str | None = None) -> Path:
    """The exact dense update of a peft LoRA adapter: ``scaling * B @ A`` per adapted layer
    (``scaling = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA), keyed by the adapted
    module's weight name (``<module>.weight``, peft's ``base_model.model.`` prefix removed)."""
    from asymvlm.lora import split_peft_state

    adapter_dir = Path(adapter_dir)
    cfg, scaling = read_adapter_config(adapter_dir)
    state = LazyTaskVector(folder_file(adapter_dir, "adapter_model.safetensors"))
    try:
        layers = split_peft_state({k: state[k] for k in state})
    except ValueError as err:
        raise MergeInputError(f"{adapter_dir}: {err}") from err
    tau = {}
    for layer, ab in layers.items():
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0] or not a.is_floating_point() or b.dtype != a.dtype:
            raise MergeInputError(
                f"{state.path}: {layer!r} has A {tuple(a.shape)} {a.dtype} and B {tuple(b.shape)} {b.dtype} (LoRA "
                "factors are floating-point matrices of one dtype, B's columns = A's rows)"
            )
        name = layer.removeprefix("base_model.model.") + ".weight"
        tau[name] = scaling * (ab["B"].double() @ ab["A"].double()).to(ab["A"].dtype)
    targets = cfg.get("target_modules")
    return save_task_vector(
        tau,
        out,
        {
            "source": "lora",
            "adapter": str(adapter_dir),
            "scaling": scaling,
            "target_modules": targets if isinstance(targets, (str, list)) else None,
            "base": cfg.get("base_model_name_or_path"),
            "base_fingerprint": base_fingerprint,
        },
    )


def check_same_base(vectors: Sequence[LazyParams]) -> None:
    """All task vectors must come from the same base (fingerprints, where recorded) and carry the
    same keys and shapes (LoRA vectors: the same target modules)."""
    if not vectors:
        raise MergeInputError("no task vectors to merge")
    fps = {v.meta.get("base_fingerprint") for v in vectors} - {None}
    if len(fps) > 1:
        raise MergeInputError(
            f"the task vectors come from different bases (base fingerprints {sorted(f[:12] for f in fps)})"
        )
    first = vectors[0]
    for v in vectors[1:]:
        if set(v) != set(first):
            a, b = sorted(set(first) - set(v)), sorted(set(v) - set(first))
            kind = (
                "LoRA adapters of different target modules"
                if "lora" in (first.meta.get("source"), v.meta.get("source"))
                else "inputs"
            )
            raise MergeInputError(
                f"{kind}: keys differ between {first.path} and {v.path} "
                f"(only in the first: {a[:3]}, only in the other: {b[:3]})"
            )
        for k in first:
            if first.shape(k) != v.shape(k):
                raise MergeInputError(f"{k!r}: shape {first.shape(k)} in {first.path}, {v.shape(k)} in {v.path}")
