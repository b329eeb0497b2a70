"""Merging peft LoRA adapters exactly: on the dense ``Delta W`` of each adapter, never on its factors.

Every adapter ``k`` adds ``s_k B_k A_k`` to a layer (``s_k = alpha_k / r_k``, or
``alpha_k / sqrt(r_k)`` with rsLoRA). :func:`merge_lora_adapters` merges these dense updates
with any registered method and writes one of three outputs (``output=``):

* ``"dense"`` — the merged ``Delta W`` folded into a base checkpoint (``base=``, safetensors whose
  keys are the adapted modules' ``<module>.weight``), streamed by :func:`asymvlm.merging.methods.merge_files`;
* ``"concat"`` — an exact LoRA adapter of rank ``sum_k r_k``: ``A = [A_1; ...; A_K]``,
  ``B = [c_1 s_1 B_1, ..., c_K s_K B_K] / s`` multiply to ``sum_k c_k s_k B_k A_k`` exactly (the
  stacking of FLoRA, Wang et al. 2024, https://arxiv.org/abs/2409.05976). Only linear methods
  (``task_arithmetic``, ``mean``, ``talos``) have such a factorisation: TIES and DARE produce a
  general dense update, for which ``concat`` is an error;
* ``"svd"`` — the best rank-``rank`` adapter of the merged ``Delta W`` (truncated SVD,
  Eckart–Young), with the relative Frobenius truncation error reported per layer and overall.

``knots`` and ``core_space`` (:mod:`asymvlm.merging.lora_spaces`) merge the adapters' factors in a
shared basis instead of their dense updates; their merged ``Delta W`` has rank at most
``R = sum_k r_k``, so ``svd`` with the default rank ``R`` (and ``concat``, the same output) is exact,
a smaller ``rank`` is the best truncation of it (error reported), and ``dense`` folds it into the base.

The written adapter is in peft's format (``adapter_config.json`` from the first input with the new
rank, ``lora_alpha = r`` so ``s = 1``, rsLoRA off; ``adapter_model.safetensors``) and loads with
``peft.PeftModel.from_pretrained`` on the same base model. Every output also carries ``merge.json``
and a ``README.md`` model card (:func:`asymvlm.hub.model_card`; ``base_model`` is the adapters'
base when it is a Hub model).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from asymvlm.merging.task_vectors import MemoryParams, MergeInputError, read_adapter_config

__all__ = ["LoraAdapter", "read_lora_adapter", "merge_lora_adapters", "LORA_OUTPUTS", "LINEAR_METHODS"]

LORA_OUTPUTS = ("dense", "concat", "svd")
LINEAR_METHODS = {"task_arithmetic": "sum", "talos": "sum", "mean": "mean"}


@dataclass
class LoraAdapter:
    """A peft LoRA adapter read from disk: ``layers[layer] = (A, B)`` (peft's layer names,
    ``base_model.model.`` prefix included), its scaling and its adapter_config.json."""

    path: Path
    config: dict[str, Any]
    layers: dict[str, tuple[Tensor, Tensor]]
    scaling: float

    def dense(self) -> dict[str, Tensor]:
        """``{<module>.weight: scaling * B @ A}`` (float64 product, stored dtype)."""
        return {
            _weight_name(layer): self.scaling * (b.double() @ a.double()).to(a.dtype)
            for layer, (a, b) in self.layers.items()
        }


def _weight_name(layer: str) -> str:
    return layer.removeprefix("base_model.model.") + ".weight"


def read_lora_adapter(adapter_dir: str | Path) -> LoraAdapter:
    """Read a peft adapter directory (clear errors for missing/corrupt files, per-layer patterns)."""
    from asymvlm.lora import split_peft_state
    from asymvlm.merging.task_vectors import LazyTaskVector, folder_file

    adapter_dir = Path(adapter_dir)
    cfg, scaling = read_adapter_config(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise MergeInputError(f"{cfg_path}: per-layer rank_pattern/alpha_pattern are not supported")
    state = LazyTaskVector(folder_file(adapter_dir, "adapter_model.safetensors"))
    try:
        parts = split_peft_state({k: state[k].clone() for k in state})
    except ValueError as err:
        raise MergeInputError(f"{adapter_dir}: {err}") from err
    layers = {layer: (ab["A"], ab["B"]) for layer, ab in parts.items()}
    weights = adapter_dir / "adapter_model.safetensors"
    for layer, (a, b) in layers.items():
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise MergeInputError(f"{adapter_dir}: {layer!r} has A {tuple(a.shape)} and B {tuple(b.shape)}")
        if not (a.is_floating_point() and b.dtype == a.dtype):
            raise MergeInputError(
                f"{weights}: {layer!r} has A of dtype {a.dtype} and B of dtype {b.dtype} (LoRA factors are floating "
                "point, of one dtype)"
            )
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise MergeInputError(f"{adapter_dir}: {layer!r} contains NaN or inf")
    return LoraAdapter(adapter_dir, cfg, layers, float(scaling))


def _check_compatible(adapters: Sequence[LoraAdapter]) -> None:
    if not adapters:
        raise MergeInputError("no LoRA adapters to merge")
    first = adapters[0]
    for ad in adapters[1:]:
        if set(ad.layers) != set(first.layers):
            only_a = sorted(set(first.layers) - set(ad.layers))[:3]
            only_b = sorted(set(ad.layers) - set(first.layers))[:3]
            raise MergeInputError(
                f"LoRA adapters of different target modules: {first.path} and {ad.path} "
                f"(only in the first: {only_a}, only in the other: {only_b})"
            )
        for layer in first.layers:
            s1 = (first.layers[layer][1].shape[0], first.layers[layer][0].shape[1])
            s2 = (ad.layers[layer][1].shape[0], ad.layers[layer][0].shape[1])
            if s1 != s2:
                raise MergeInputError(f"{layer!r}: Delta W is {s1} in {first.path} but {s2} in {ad.path}")
        b1, b2 = first.config.get("base_model_name_or_path"), ad.config.get("base_model_name_or_path")
        if b1 and b2 and b1 != b2:
            raise MergeInputError(f"the adapters were trained on different bases: {b1!r} ({first.path}) vs {b2!r}")


def _card(kind: str, report: dict[str, Any], adapters: Sequence[LoraAdapter]) -> Any:
    """The output's model card: the merge's record, the adapters' base as ``base_model``."""
    from asymvlm.hub import looks_like_hub_id, model_card
    from asymvlm.merging.cards import merge_card

    base = adapters[0].config.get("base_model_name_or_path")
    base = base if isinstance(base, str) and looks_like_hub_id(base) and not Path(base).exists() else None
    tags = ["peft"] if kind == "lora" else ["lora"]
    return model_card(kind, **merge_card(report), base_model=base, tags=tags)


def _write_adapter(
    out: Path,
    template: dict[str, Any],
    layers: dict[str, tuple[Tensor, Tensor]],
    report: dict[str, Any],
    adapters: Sequence[LoraAdapter],
) -> Path:
    from asymvlm.hub import write_model_card
    from asymvlm.io import atomic_directory, atomic_save_safetensors, atomic_write_json
    from asymvlm.lora import join_peft_state

    ranks = {a.shape[0] for a, _ in layers.values()}
    rank = max(ranks)
    if len(ranks) > 1:  # ragged ranks (svd of a layer whose Delta W has smaller rank): pad with zeros
        layers = {
            k: (
                torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])]),
                torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], 1),
            )
            for k, (a, b) in layers.items()
        }
    for k, (a, b) in layers.items():  # the merge output is checked before anything is written
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise MergeInputError(f"the merged adapter's {k!r} is not finite (overflow): scale the inputs or lam down")
    cfg = dict(template)
    cfg.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={})
    with atomic_directory(out) as tmp:
        atomic_save_safetensors(
            {k: v.contiguous() for k, v in join_peft_state(layers).items()}, tmp / "adapter_model.safetensors"
        )
        atomic_write_json(cfg, tmp / "adapter_config.json")
        atomic_write_json(report, tmp / "merge.json")
        write_model_card(tmp, _card("lora", report, adapters), replacing=out)
    return out


def merge_lora_adapters(
    adapter_dirs: Sequence[str | Path],
    out: str | Path,
    method: str = "task_arithmetic",
    *,
    lam: float = 1.0,
    weights: Sequence[float] | None = None,
    output: str = "concat",
    rank: int | None = None,
    base: str | Path | None = None,
    progress: bool = False,
    names: Sequence[str] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Merge peft LoRA adapters; returns the report written next to the output (``merge.json``).

    Args:
        adapter_dirs: peft adapter directories trained on the same base, same target modules.
        out: an adapter directory (``concat``/``svd``) or a directory receiving ``model.safetensors``
            (``dense``).
        method, lam, weights, options: as in :func:`asymvlm.merging.methods.merge_params`.
        output: ``dense``, ``concat`` or ``svd`` (module docstring).
        rank: the adapter rank for ``svd`` (default: the largest input rank; ``knots``/``core_space``:
            the sum of the input ranks, which holds their merge exactly).
        base: the base checkpoint for ``dense``.
        names: how the report and the card name the inputs (default their paths; e.g. Hub ids).
    """
    from asymvlm.merging.lora_spaces import SPACES
    from asymvlm.merging.methods import make_method

    if output not in LORA_OUTPUTS:
        raise MergeInputError(f"unknown LoRA output {output!r}; choose one of {LORA_OUTPUTS}")
    if output == "concat" and method not in LINEAR_METHODS and method not in SPACES:
        raise MergeInputError(
            f"output='concat' is exact only for linear merges {sorted(LINEAR_METHODS)} and the LoRA-space merges "
            f"{sorted(SPACES)}; {method!r} gives a general dense update: use output='svd' (reports the truncation "
            "error) or 'dense'"
        )
    if output == "dense" and base is None:
        raise MergeInputError("output='dense' folds the merged Delta W into a base checkpoint: pass base=")
    adapters = [read_lora_adapter(d) for d in adapter_dirs]
    _check_compatible(adapters)
    k = len(adapters)
    out = Path(out)
    report: dict[str, Any] = {
        "type": "asymvlm.merge",
        "inputs": [str(n) for n in names] if names is not None else [str(a.path) for a in adapters],
        "kind": "lora",
        "method": method,
        "options": options,
        "lam": lam,
        "weights": list(weights) if weights is not None else None,
        "output": output,
    }
    recipe = make_method(method, lam=lam, **options)  # ConfigError on unknown/invalid options, before writing
    if options.get("lines") is not None and (method in SPACES or output == "concat"):
        raise MergeInputError(
            f"LiNeS (lines=) rescales the merged dense updates: use it with output='svd' or 'dense' of a dense-update "
            f"method, not with {method!r} and output={output!r}"
        )
    if method in SPACES:
        return _space_output(
            adapters, out, recipe.aggregator, report, lam=lam, weights=weights, rank=rank, base=base, progress=progress
        )
    if output == "concat":
        w = [1.0] * k if weights is None else [float(x) for x in weights]
        if len(w) != k:
            raise MergeInputError(f"{len(w)} weights for {k} adapters")
        if LINEAR_METHODS[method] == "mean":
            total = sum(w)
            w = [x / total for x in w]
        layers = {}
        for layer in adapters[0].layers:
            a_cat = torch.cat([ad.layers[layer][0] for ad in adapters], 0)
            b_cat = torch.cat([(lam * wk * ad.scaling) * ad.layers[layer][1] for wk, ad in zip(w, adapters)], 1)
            layers[layer] = (a_cat, b_cat)  # scaling of the output adapter: r / r = 1
        report["rank"] = int(sum(ad.layers[next(iter(ad.layers))][0].shape[0] for ad in adapters))
        _write_adapter(out, adapters[0].config, layers, report, adapters)
        return report
    vectors = [MemoryParams(ad.dense(), str(ad.path), {"source": "lora"}) for ad in adapters]
    if output == "dense":
        from asymvlm.merging.methods import merge_files

        report["base"] = str(base)
        from asymvlm.hub import write_model_card
        from asymvlm.io import atomic_directory, atomic_write_json

        with atomic_directory(out) as tmp:
            merge_files(
                base, vectors, tmp / "model.safetensors", method, lam=lam, weights=weights, progress=progress, **options
            )
            atomic_write_json(report, tmp / "merge.json")
            write_model_card(tmp, _card("checkpoint", report, adapters), replacing=out)
        return report
    agg = recipe.aggregator(vectors, weights)
    r = rank or max(a.shape[0] for ad in adapters for a, _ in ad.layers.values())
    from asymvlm.lora import low_rank_factors

    layers, errors, num, den = {}, {}, 0.0, 0.0
    for layer in adapters[0].layers:
        delta = lam * agg.delta[_weight_name(layer)]
        if not bool(torch.isfinite(delta).all()):
            raise MergeInputError(f"the merged update of {layer!r} is not finite")
        a, b, err = low_rank_factors(delta, r, 1.0)
        layers[layer] = (a, b)
        errors[layer] = err
        sq = float(delta.double().pow(2).sum())
        num += err**2 * sq
        den += sq
    report.update(rank=r, truncation_error=_truncation_report(errors, num, den))
    _write_adapter(out, adapters[0].config, layers, report, adapters)
    return report


def _truncation_report(errors: dict[str, float], num: float, den: float) -> dict[str, Any]:
    """The relative Frobenius truncation errors: per layer, overall (``sqrt(sum err_l^2 |dW_l|^2 /
    sum |dW_l|^2)``) and the worst layer's."""
    return {"per_layer": errors, "overall": math.sqrt(num / den) if den > 0 else 0.0, "max": max(errors.values())}


def _space_output(
    adapters: Sequence[LoraAdapter],
    out: Path,
    space: Any,
    report: dict[str, Any],
    *,
    lam: float,
    weights: Sequence[float] | None,
    rank: int | None,
    base: str | Path | None,
    progress: bool,
) -> dict[str, Any]:
    """KnOTS / Core Space (:mod:`asymvlm.merging.lora_spaces`): the factors merged in the aligned
    space; written as an adapter of rank ``rank`` (default ``sum_k r_k``: exact; smaller: the best
    rank-``rank`` truncation of the merged ``Delta W``, its error reported) or folded into ``base``.
    ``output="concat"`` is the exact adapter of rank ``sum_k r_k`` (the merged ``Delta W`` has no
    larger rank)."""
    from asymvlm.merging.lora_spaces import best_rank_factors

    total = sum(ad.layers[next(iter(ad.layers))][0].shape[0] for ad in adapters)  # R = sum_k r_k
    if report["output"] == "concat" and rank not in (None, total):
        raise MergeInputError(
            f"output='concat' of {report['method']} is the exact adapter of rank {total} (the sum of the input "
            f"ranks); for rank {rank} use output='svd'"
        )
    if rank is not None and rank < 1:
        raise MergeInputError(f"rank must be >= 1, got {rank}")
    factors = {layer: [ad.layers[layer] for ad in adapters] for layer in adapters[0].layers}
    merged = space.merge_factors(factors, [ad.scaling for ad in adapters], weights, lam)
    dtype = next(iter(adapters[0].layers.values()))[0].dtype
    report["space"] = {"name": space.space, "inner": space.inner, "reference": space.reference}
    if space.inner == "ties":
        report["space"]["density"] = space.density
    if report["output"] == "dense":
        from asymvlm.hub import write_model_card
        from asymvlm.io import atomic_directory, atomic_write_json
        from asymvlm.merging.methods import merge_files

        report["base"] = str(base)
        delta = MemoryParams(
            {_weight_name(k): (b @ a).to(dtype) for k, (a, b) in merged.items()}, f"<{space.space} merge>"
        )
        with atomic_directory(out) as tmp:  # base + the merged Delta W, streamed with the base's checks
            merge_files(base, [delta], tmp / "model.safetensors", "task_arithmetic", lam=1.0, progress=progress)
            atomic_write_json(report, tmp / "merge.json")
            write_model_card(tmp, _card("checkpoint", report, adapters), replacing=out)
        return report
    r = total if rank is None else rank
    layers, errors, num, den = {}, {}, 0.0, 0.0
    for layer, (a, b) in merged.items():
        a_r, b_r, err, sq = best_rank_factors(a, b, r)
        layers[layer] = (a_r.to(dtype), b_r.to(dtype))
        errors[layer] = err
        num, den = num + err**2 * sq, den + sq
    report.update(rank=r, truncation_error=_truncation_report(errors, num, den))
    _write_adapter(out, adapters[0].config, layers, report, adapters)
    return report
