"""The saved layout of an :class:`asymvlm.AsymVLM`, and the checks of a saved model before anything
is built from it.

``save_pretrained`` writes :data:`CONFIG_NAME` (type :data:`MODEL_TYPE`, format version
:data:`MODEL_VERSION`: the head config, the encoder record of :data:`ENCODER_KEYS`, the log
temperature, the lineage of :data:`LINEAGE_KEYS`), :data:`WEIGHTS_NAME` (the head's weights; their
metadata record the head config, the tensors and the provenance they were saved with: what
:func:`config_json`, :func:`tensors_json` and :func:`provenance_json` write), and optionally
:data:`ADAPTER_DIR` and :data:`BASE_DELTA_NAME` (the text tower's LoRA adapter / folded updates).

``from_pretrained`` checks every field and every header here first (:func:`head_config_of`,
:func:`check_model_config`, :func:`check_weights_header`, :func:`check_delta_header`,
:func:`config_file`): types and ranges, shapes against the config, what the metadata recorded; a
tampered or foreign file is one :class:`~asymvlm.errors.ArtefactError` naming the file and the
field, before a tensor is allocated. :mod:`asymvlm.model` exports the file names.

Example:
    >>> logit_scale_problem(2.5) is None, logit_scale_problem(100.0)
    (True, 'is 100.0: a log temperature beyond +-88.0 (exp() overflows)')
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from asymvlm.errors import ArtefactError, ConfigError
from asymvlm.heads import HeadConfig, TextHead
from asymvlm.io import inside_folder, parse_json, read_safetensors_header

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "ADAPTER_DIR",
    "BASE_DELTA_NAME",
    "MODEL_TYPE",
    "MODEL_VERSION",
    "ENCODER_KEYS",
    "LINEAGE_KEYS",
    "MAX_ABS_LOGIT_SCALE",
    "config_json",
    "tensors_json",
    "provenance_json",
    "head_config_of",
    "logit_scale_problem",
    "encoder_problem",
    "lineage_problem",
    "check_model_config",
    "check_weights_header",
    "check_delta_header",
    "config_file",
]


CONFIG_NAME = "asymvlm_config.json"
WEIGHTS_NAME = "head.safetensors"
ADAPTER_DIR = "text_adapter"  # a peft LoRA adapter of the text tower, in peft's format
BASE_DELTA_NAME = "text_base_delta.safetensors"  # dense updates added to the frozen text tower
MODEL_TYPE = "asymvlm"
MODEL_VERSION = 1
ENCODER_KEYS = ("spec", "pretrained", "fingerprint", "dim")  # what ``encoder`` records (all written, all required)
LINEAGE_KEYS = ("init_from", "init_from_fingerprint", "init")
# |logit_scale| above this: exp() of it overflows float32 (a temperature no training produces)
MAX_ABS_LOGIT_SCALE = 88.0
_ST_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def config_json(config: HeadConfig) -> str:
    """The head config as the weights' metadata record it (key-sorted JSON)."""
    import json

    return json.dumps(config.to_dict(), sort_keys=True)


def head_config_of(head_cfg: Any, cfg_path: Path) -> HeadConfig:
    """The :class:`HeadConfig` of a saved config's ``head`` object, every field checked (types and
    ranges, before anything is allocated); an :class:`ArtefactError` naming the file and field."""
    if not isinstance(head_cfg, dict):
        raise ArtefactError(f"{cfg_path}: 'head' must be an object, got {type(head_cfg).__name__}")
    fields = set(HeadConfig.__dataclass_fields__)
    unknown = sorted(str(k) for k in set(head_cfg) - fields)
    if unknown:
        warnings.warn(f"{cfg_path}: ignoring unknown head key(s) {unknown}", stacklevel=3)
    for key in ("dim", "hidden_dims"):  # no default could fit the saved weights
        if key not in head_cfg:
            raise ArtefactError(f"{cfg_path}: head config misses required key {key!r}")
    head_cfg = {k: v for k, v in head_cfg.items() if k in fields}
    head_cfg.setdefault("direction", "learned")  # saved before the option existed: the paper's head
    if isinstance(head_cfg.get("hidden_dims"), list):
        head_cfg["hidden_dims"] = tuple(head_cfg["hidden_dims"])  # checked with every other field below
    try:
        return HeadConfig(**head_cfg)
    except (ConfigError, ValueError, TypeError) as err:
        raise ArtefactError(f"{cfg_path}: head: {err}") from None


def _optional_str(value: Any) -> bool:
    return value is None or isinstance(value, str)


def tensors_json(tensors: Mapping[str, Tensor]) -> str:
    """``{key: [dtype, shape]}`` of the tensors a file holds (recorded in its metadata at save time
    and compared on load: another dtype, shape or set of tensors is a tampered or foreign file)."""
    import json

    return json.dumps(
        {k: [_ST_DTYPE.get(v.dtype, str(v.dtype)), list(v.shape)] for k, v in tensors.items()}, sort_keys=True
    )


def _check_recorded_tensors(path: Path, tensors: dict[str, tuple[str, list[int]]], meta: dict[str, str]) -> None:
    """The tensors of a file equal what its metadata recorded at save time (where it records them:
    files saved before this was recorded are not compared); an :class:`ArtefactError` naming the key."""
    recorded = meta.get("tensors")
    if recorded is None:
        return
    want = parse_json(recorded, f"the 'tensors' metadata of {path}", allow_nan=False)
    if not isinstance(want, dict):
        raise ArtefactError(f"{path}: corrupt 'tensors' metadata (not an object)")
    have = {k: [dt, list(shape)] for k, (dt, shape) in tensors.items()}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        raise ArtefactError(
            f"{path}: holds other tensors than it was saved with: missing {missing[:4]}, unexpected {extra[:4]}"
        )
    for k in sorted(have):
        if have[k] != want[k]:
            raise ArtefactError(
                f"{path}: tensor {k!r} is {have[k][0]} {have[k][1]}, it was saved as {want[k][0]} {want[k][1]}"
            )


def logit_scale_problem(scale: Any) -> str | None:
    """What is wrong with a log temperature (to follow its name), or None: a finite number within
    +-:data:`MAX_ABS_LOGIT_SCALE`."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        return f"must be a finite number, got {scale!r}"
    if abs(scale) > MAX_ABS_LOGIT_SCALE:
        return f"is {scale!r}: a log temperature beyond +-{MAX_ABS_LOGIT_SCALE} (exp() overflows)"
    return None


def encoder_problem(source: Any, dim: int, *, allow_null_fingerprint: bool) -> str | None:
    """What is wrong with an ``encoder`` record (``": ..."`` / ``".key ..."``, to follow its name),
    or None. Every key of :data:`ENCODER_KEYS` is present and no other; ``dim`` is the head's; spec
    and pretrained are strings or null; the fingerprint is a string, null only for features of
    unknown origin (spec null too) or when the caller waives the check."""
    if not isinstance(source, Mapping):
        return f" must be an object or null, got {type(source).__name__}"
    missing = [k for k in ENCODER_KEYS if k not in source]
    unknown = sorted(str(k) for k in set(source) - set(ENCODER_KEYS))
    if missing or unknown:
        return f": missing key(s) {missing}, unknown key(s) {unknown}; it records {list(ENCODER_KEYS)}"
    for key in ("spec", "pretrained", "fingerprint"):
        value = source[key]
        if not _optional_str(value) or value == "":
            return f".{key} must be a non-empty string or null, got {value!r}"
    d = source["dim"]
    if isinstance(d, bool) or not isinstance(d, int) or d != dim:
        return f".dim is {d!r}, the head's dim {dim}"
    if source["fingerprint"] is None and source["spec"] is not None and not allow_null_fingerprint:
        return (
            f".fingerprint is null: the embeddings of {source['spec']!r} it was trained on cannot be checked; "
            "pass check_fingerprint=False to load it anyway"
        )
    return None


def lineage_problem(lineage: Any) -> str | None:
    """What is wrong with a ``lineage`` record (to follow its name), or None. Its two forms are those
    training writes: ``{"init_from": path, "init_from_fingerprint": sha256}`` (a fine-tune) and
    ``{"init_from": null, "init": "scratch"}`` (a head trained from scratch)."""
    if not isinstance(lineage, Mapping):
        return f" must be an object, got {type(lineage).__name__}"
    unknown = sorted(str(k) for k in set(lineage) - set(LINEAGE_KEYS))
    if unknown:
        return f": unknown key(s) {unknown}; it records {list(LINEAGE_KEYS)}"
    if "init_from" not in lineage:
        return ": missing key 'init_from'"
    start = lineage["init_from"]
    if start is None:
        if lineage.get("init") != "scratch" or "init_from_fingerprint" in lineage:
            return ': init_from null (trained from scratch) needs "init": "scratch" and no init_from_fingerprint'
        return None
    if not isinstance(start, str) or not start:
        return f".init_from must be a non-empty string or null, got {start!r}"
    fp = lineage.get("init_from_fingerprint")
    if not isinstance(fp, str) or not fp:
        return f".init_from_fingerprint must be the fingerprint of {start!r}'s head weights, got {fp!r}"
    if "init" in lineage:
        return f".init is {lineage['init']!r}: a head fine-tuned from init_from records none"
    return None


def check_model_config(cfg: dict[str, Any], cfg_path: Path, head: HeadConfig, *, check_fingerprint: bool) -> None:
    """The fields of ``asymvlm_config.json`` beside ``head``: types and ranges, one
    :class:`ArtefactError` naming the file and the field."""
    problem = logit_scale_problem(cfg["logit_scale"])
    if problem:
        raise ArtefactError(f"{cfg_path}: logit_scale {problem}")
    source = cfg["encoder"]
    if source is not None:  # null: an embeddings-only model of unknown origin
        problem = encoder_problem(source, head.dim, allow_null_fingerprint=not check_fingerprint)
        if problem:
            raise ArtefactError(f"{cfg_path}: encoder{problem}")
    if "lineage" in cfg:  # absent: a model of unknown origin (merges then check its distance to the base)
        problem = lineage_problem(cfg["lineage"])
        if problem:
            raise ArtefactError(f"{cfg_path}: lineage{problem}")
    if "confidence" in cfg and (not isinstance(cfg["confidence"], str) or not cfg["confidence"]):
        raise ArtefactError(f"{cfg_path}: confidence must be a file name, got {cfg['confidence']!r}")


def provenance_json(encoder_source: Mapping[str, Any] | None, lineage: Mapping[str, Any] | None) -> str:
    """What ``head.safetensors`` records of the config's provenance: the encoder's fingerprint and
    what the head was fine-tuned from (its weights' fingerprint, or "scratch"). Paths and specs are
    left out: a moved local encoder and a Hub upload (which names paths by their last parts) change them."""
    import json

    fp = (encoder_source or {}).get("fingerprint") if encoder_source is not None else None
    if not lineage:
        start = None
    elif lineage.get("init_from") is None:
        start = "scratch"
    else:
        start = lineage.get("init_from_fingerprint")
    spec = encoder_source is not None and encoder_source.get("spec") is not None
    return json.dumps(
        {"encoder": encoder_source is not None, "encoder_fingerprint": fp, "spec": spec, "lineage": start}
    )


def _check_provenance(path: Path, cfg: dict[str, Any], meta: dict[str, str], check_fingerprint: bool) -> None:
    """The config's encoder and lineage are those the weights were saved with (where recorded)."""
    recorded = meta.get("provenance")
    if recorded is None:
        return
    want = parse_json(recorded, f"the 'provenance' metadata of {path}", allow_nan=False)
    have = parse_json(provenance_json(cfg["encoder"], cfg.get("lineage")), path)
    if not isinstance(want, dict):
        raise ArtefactError(f"{path}: corrupt 'provenance' metadata (not an object)")
    keys = ["encoder", "spec", "encoder_fingerprint", "lineage"]
    if not check_fingerprint:  # the caller waives the encoder check (a spec nulled is still refused)
        keys = ["spec", "lineage"]
    differ = [k for k in keys if want.get(k) != have.get(k)]
    if differ:
        field = {"spec": "encoder.spec", "encoder_fingerprint": "encoder.fingerprint"}.get(differ[0], differ[0])
        raise ArtefactError(
            f"{path.parent / CONFIG_NAME}: {field} differs from the one {path.name} was saved with "
            f"({str(have.get(differ[0]))[:16]!r} in the config, {str(want.get(differ[0]))[:16]!r} in "
            "the weights)"
        )


def check_weights_header(path: Path, config: HeadConfig, cfg: dict[str, Any], *, check_fingerprint: bool) -> None:
    """``head.safetensors`` fits ``config`` before anything is allocated: the keys and shapes of a
    head of that config, floating dtypes, and (where recorded at save time) the same head config,
    dtypes and provenance (encoder fingerprint, lineage)."""
    import json

    tensors, meta = read_safetensors_header(path)
    _check_provenance(path, cfg, meta, check_fingerprint)
    with torch.device("meta"):  # shapes without memory
        expected = {k: list(v.shape) for k, v in TextHead(config=config).state_dict().items()}
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ArtefactError(
            f"{path} does not fit the head config in {CONFIG_NAME}: missing tensors {missing[:4]}, unexpected "
            f"tensors {extra[:4]}"
        )
    for key, (dtype, shape) in tensors.items():
        if dtype not in ("F32", "F16", "BF16", "F64"):
            raise ArtefactError(f"{path}: tensor {key!r} is {dtype}, a head's weights are floating point")
        if shape != expected[key]:
            raise ArtefactError(
                f"{path} does not fit the head config in {CONFIG_NAME}: tensor {key!r} has shape {shape}, the "
                f"config needs {expected[key]}"
            )
    saved = meta.get("head_config")
    if saved is not None:
        try:
            saved_cfg = json.loads(saved)
        except (ValueError, RecursionError):
            raise ArtefactError(f"{path}: corrupt head_config in its metadata") from None
        now = config.to_dict()
        differ = sorted(k for k in now if not isinstance(saved_cfg, dict) or saved_cfg.get(k) != now[k])
        if differ:
            shown = ", ".join(f"{k} ({saved_cfg.get(k)!r} in the weights, {now[k]!r} in the config)"
                              for k in differ[:4]) if isinstance(saved_cfg, dict) else str(differ)  # fmt: skip
            raise ArtefactError(
                f"{path.parent / CONFIG_NAME}: head config differs from the one {path.name} was saved with: {shown}"
            )
    _check_recorded_tensors(path, tensors, meta)


def check_delta_header(path: Path) -> None:
    """``text_base_delta.safetensors``: floating tensors, and those it was saved with (its metadata)."""
    tensors, meta = read_safetensors_header(path)
    for key, (dtype, _) in tensors.items():
        if dtype not in ("F32", "F16", "BF16", "F64"):
            raise ArtefactError(f"{path}: tensor {key!r} is {dtype}, the text tower's updates are floating point")
    _check_recorded_tensors(path, tensors, meta)


def config_file(directory: Path, cfg_path: Path, key: str, cfg: dict[str, Any], default: str | None) -> Path | None:
    """The path the config field ``key`` names inside the model folder (:func:`asymvlm.io.inside_folder`),
    or None when the config has no such field. Written only with a file name, so null or "" is an
    error; so is a folder holding ``default`` (what save_pretrained writes) that the config does not name."""
    if key not in cfg:
        if default is not None and ((directory / default).exists() or (directory / default).is_symlink()):
            raise ArtefactError(
                f"{cfg_path}: missing key {key!r}, but the folder holds {default}: the model would load without it"
            )
        return None
    value = cfg[key]
    if not isinstance(value, str) or not value:
        raise ArtefactError(f"{cfg_path}: {key} must be a file name inside the model folder, got {value!r}")
    return inside_folder(directory, value, source=cfg_path, field=key)
