"""Merge methods: recipes of the federated core, one server step with a stateless ``scale(lam)``.

``merged = base + lam * aggregate(task_vectors)``: task vectors are pseudo-gradients, and a merge
method is a :class:`~asymvlm.federated.core.Recipe` like FedAvg: an aggregator (``Sum``,
``WeightedMean``, or the TIES and DARE rules below) and the server transform ``scale(lam)``.
Merging calls the same :func:`~asymvlm.federated.core.server_update` as a federated round.
Registry (:data:`METHODS`, each entry with its paper and declared options; an option a method
does not declare is a :class:`~asymvlm.errors.ConfigError`):

=================  ====================================================================
``task_arithmetic``  ``sum_i tau_i`` (Ilharco et al. 2023, https://arxiv.org/abs/2212.04089)
``mean``           model soup: the uniform mean (Wortsman et al. 2022, https://arxiv.org/abs/2203.05482)
``ties``           trim, elect sign, disjoint mean (Yadav et al. 2023, https://arxiv.org/abs/2306.01708)
``dare``           drop with probability p, rescale 1/(1-p), sum (Yu et al. 2024, https://arxiv.org/abs/2311.03099)
``dare_ties``      DARE's drop-and-rescale, then TIES' sign election and disjoint mean
``talos``          task arithmetic of sparse (TaLoS-masked) task vectors (Iurada et al., ICLR 2025)
``iso_c``          isotropic spectrum of the summed task matrix (Marczak et al. 2025, :mod:`.spectral`)
``iso_cts``        Iso-C on common + task-specific subspaces (same paper, :mod:`.spectral`)
``tsv_m``          task singular vectors, orthogonalised across tasks (Gargiulo et al. 2025, :mod:`.spectral`)
``fisher``         Fisher-weighted average with the heads' Fisher (Matena & Raffel 2022, :mod:`.fisher`)
``knots``          LoRA: merge in the shared SVD basis of the updates (Stoica et al. 2025, :mod:`.lora_spaces`)
``core_space``     LoRA: merge in the core space of the stacked factors (Panariello et al. 2025)
=================  ====================================================================

After any method, ``lines=beta`` rescales the merged task vector by depth (LiNeS, :mod:`.lines`).

TIES options (explicit, since implementations differ): ``scope`` — ``global`` (the paper's: one
magnitude threshold per task over the whole model) or ``per_tensor`` (peft's); ``sign`` —
``total`` (sign of the sum, the paper) or ``frequency``; ``sign_weighted`` — elect on weighted or
unweighted trimmed vectors (peft: unweighted); ``normalize`` — divide the agreeing sum by their
``count`` (paper, peft) or their total ``weight``; ``zero_sign`` — a coordinate whose sum is exactly
0: ``majority`` (the paper: the sign of the summed signs over the whole model), ``positive``
(peft), or ``none`` (no update there).

The global threshold is exact without flattening the model: for each task a radix selection over
the bit patterns of ``|tau|`` (16 bits per pass, a histogram of 65,536 counts) finds the k-th
smallest magnitude in two passes over its tensors, one tensor at a time. Merging then goes tensor
by tensor, holding the K tasks' copies of one tensor only.

Example:
    >>> import torch
    >>> taus = [{"w": torch.tensor([1.0, -2.0, 0.1])}, {"w": torch.tensor([1.0, 3.0, -0.1])}]
    >>> merge_params({"w": torch.zeros(3)}, taus, "ties", density=0.34, lam=1.0)["w"].tolist()
    [1.0, 3.0, 0.0]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from asymvlm.federated.core import (
    Aggregator,
    Params,
    Recipe,
    Sum,
    WeightedMean,
    keys_of,
    scale,
    server_update,
)
from asymvlm.merging.spectral import IsoC
from asymvlm.merging.ties import Dare, Ties, kth_smallest_magnitude, ties_thresholds
from asymvlm.registry import Param, Registry, in_range, probability

__all__ = [
    "Ties",
    "Dare",
    "METHODS",
    "make_method",
    "POST_OPTIONS",
    "validate_task_vectors",
    "check_task_vectors",
    "merge_params",
    "merge_files",
    "kth_smallest_magnitude",
    "ties_thresholds",
]


# ----------------------------------------------------------------------------------------------
# the registry and merging
# ----------------------------------------------------------------------------------------------
METHODS = Registry("merge method")
_LAM = Param(
    "lam", float, 1.0, "Scaling lambda of the merged task vector (the server step).", check=in_range(-1e6, 1e6)
)
_TIES_SIGN = (
    Param("sign", Literal["total", "frequency"], "total", "TIES sign election: sign of the sum, or majority vote."),
    Param("sign_weighted", bool, False, "Elect the sign on weighted (True) or unweighted trimmed vectors (peft)."),
    Param("normalize", Literal["count", "weight"], "count", "Disjoint mean: divide by the agreeing count or weight."),
    Param(
        "zero_sign",
        Literal["majority", "positive", "none"],
        "majority",
        "A coordinate whose sum is exactly 0: the model-wide majority sign (paper), + (peft), or no update.",
    ),
)
_DARE = (
    Param("p", float, 0.9, "DARE drop probability in [0, 1).", check=probability),
    Param("seed", int, 0, "DARE drop-mask seed."),
)


def _recipe(aggregator: Aggregator, lam: float) -> dict[str, Any]:
    return {"aggregator": aggregator, "server": scale(lam)}


@METHODS.register("task_arithmetic", params=(_LAM,), help="sum of the task vectors",
                  reference="https://arxiv.org/abs/2212.04089")  # fmt: skip
def _task_arithmetic(lam):
    return _recipe(Sum(), lam)


@METHODS.register("mean", params=(_LAM,), help="model soup: the (weighted) mean of the task vectors",
                  reference="https://arxiv.org/abs/2203.05482")  # fmt: skip
def _mean(lam):
    return _recipe(WeightedMean("examples"), lam)  # uniform unless weighted


@METHODS.register(
    "ties",
    help="trim, elect sign, disjoint mean",
    reference="https://arxiv.org/abs/2306.01708",
    params=(
        _LAM,
        Param(
            "density", float, 0.2, "Fraction of entries kept per task, in (0, 1].", check=in_range(0, 1, lo_open=True)
        ),
        Param("scope", Literal["global", "per_tensor"], "global", "Top-k over the whole model (paper) or per tensor."),
        *_TIES_SIGN,
    ),
)
def _ties(lam, density, scope, sign, sign_weighted, normalize, zero_sign):
    return _recipe(Ties(density, scope, sign, sign_weighted, normalize, zero_sign), lam)


@METHODS.register("dare", params=(_LAM, *_DARE), help="drop with probability p, rescale 1/(1-p), sum",
                  reference="https://arxiv.org/abs/2311.03099")  # fmt: skip
def _dare(lam, p, seed):
    return _recipe(Dare(p=p, seed=seed), lam)


@METHODS.register("dare_ties", params=(_LAM, *_DARE, *_TIES_SIGN),
                  help="DARE's drop-and-rescale, then TIES' sign election and disjoint mean",
                  reference="https://arxiv.org/abs/2311.03099")  # fmt: skip
def _dare_ties(lam, p, seed, sign, sign_weighted, normalize, zero_sign):
    ties = {"sign": sign, "sign_weighted": sign_weighted, "normalize": normalize, "zero_sign": zero_sign}
    return _recipe(Dare(p=p, seed=seed, then="ties", ties_options=ties), lam)


@METHODS.register("talos", params=(_LAM,), help="task arithmetic of sparse (TaLoS-masked) task vectors",
                  reference="https://arxiv.org/abs/2504.02620")  # fmt: skip
def _talos(lam):
    return _recipe(Sum(), lam)


_NON_MATRIX = Param("non_matrix", Literal["mean", "sum"], "mean",
                    "Tensors that are not 2-D (no spectrum): their mean (the authors' code) or their sum.")  # fmt: skip


@METHODS.register(
    "iso_c",
    help="per 2-D weight the summed task matrix with its singular values replaced by their mean",
    reference="https://arxiv.org/abs/2502.04959",
    params=(
        _LAM,
        _NON_MATRIX,
    ),
)  # fmt: skip
def _iso_c(lam, non_matrix):
    return _recipe(IsoC(non_matrix=non_matrix), lam)


@METHODS.register(
    "tsv_m",
    help="per 2-D weight each task's top 1/T singular triplets, the bases orthogonalised across tasks",
    reference="https://arxiv.org/abs/2412.00081",
    params=(
        _LAM,
        Param("fraction", float, 0.0, "Singular components kept per task as a fraction of min(m, n); 0: 1/T (paper).",
              check=in_range(0, 1)),
        _NON_MATRIX,
    ),
)  # fmt: skip
def _tsv_m(lam, fraction, non_matrix):
    from asymvlm.merging.spectral import TsvM

    return _recipe(TsvM(fraction=fraction, non_matrix=non_matrix), lam)


@METHODS.register(
    "iso_cts",
    help="Iso-C on a common subspace of the summed task matrix plus each task's own subspace",
    reference="https://arxiv.org/abs/2502.04959",
    params=(
        _LAM,
        Param("common", float, 0.8, "Fraction of the rank given to the common subspace (paper: 0.8).",
              check=in_range(0, 1)),
        _NON_MATRIX,
    ),
)  # fmt: skip
def _iso_cts(lam, common, non_matrix):
    from asymvlm.merging.spectral import IsoCTS

    return _recipe(IsoCTS(common=common, non_matrix=non_matrix), lam)


@METHODS.register(
    "fisher",
    help="Fisher-weighted average: each task's delta weighted by its head's diagonal Fisher information",
    reference="https://arxiv.org/abs/2111.09832",
    params=(
        _LAM,
        Param("floor", float, 1e-6, "Fisher floor relative to each tensor's mean Fisher (where all are ~0).",
              check=in_range(0, 1)),
    ),
)  # fmt: skip
def _fisher(lam, floor):
    from asymvlm.merging.fisher import FisherWeighted

    return _recipe(FisherWeighted(floor=floor), lam)


_INNER = (
    Param("inner", Literal["task_arithmetic", "ties"], "ties", "The merge applied in the aligned low-rank space."),
    Param("density", float, 0.2, "TIES density in the aligned space.", check=in_range(0, 1, lo_open=True)),
)


@METHODS.register("knots", params=(_LAM, *_INNER), reference="https://arxiv.org/abs/2410.19735",
                  help="LoRA: SVD of the side-by-side updates to a shared basis, the merge in it")  # fmt: skip
def _knots(lam, inner, density):
    from asymvlm.merging.lora_spaces import LoraSpaceMerge

    return _recipe(LoraSpaceMerge("knots", inner=inner, density=density), lam)


@METHODS.register("core_space", params=(_LAM, *_INNER), reference="https://arxiv.org/abs/2509.17786",
                  help="LoRA: the factors projected on the stacked A/B bases, the merge in that core")  # fmt: skip
def _core_space(lam, inner, density):
    from asymvlm.merging.lora_spaces import LoraSpaceMerge

    return _recipe(LoraSpaceMerge("core_space", inner=inner, density=density), lam)


POST_OPTIONS = ("lines", "lines_blocks")


def make_method(name: str, **options: Any) -> Recipe:
    """The recipe of a registered merge method (``lam`` and the method's declared options; any other
    option is a :class:`~asymvlm.errors.ConfigError` naming it and the valid ones). The options of
    :data:`POST_OPTIONS` compose after any method: ``lines`` (LiNeS' depth coefficient beta,
    :mod:`asymvlm.merging.lines`) and ``lines_blocks`` (its block count, 0 = from the key names)."""
    from asymvlm.merging.lines import wrap

    post = {k: options.pop(k) for k in POST_OPTIONS if k in options}
    entry = METHODS.entry(name)
    resolved = METHODS.resolve(name, options)
    parts = entry.factory(**resolved)
    if post.get("lines") is not None:
        parts["aggregator"] = wrap(parts["aggregator"], post["lines"], post.get("lines_blocks", 0))
        resolved = {**resolved, **post}
    return Recipe(name=name, reference=entry.reference, options=resolved, **parts)


def validate_task_vectors(deltas: Sequence[Mapping[str, Tensor]], base: Mapping[str, Tensor] | None) -> None:
    """Task vectors with the same keys, all present in ``base`` (a :class:`MergeInputError` otherwise)."""
    from asymvlm.merging.task_vectors import MergeInputError

    if not deltas:
        raise MergeInputError("no task vectors to merge")
    keys = list(deltas[0].keys())
    for i, d in enumerate(deltas[1:], 1):
        if set(d.keys()) != set(keys):
            raise MergeInputError(f"task vector {i} has other keys than task vector 0")
    if base is not None:
        missing = [k for k in keys if k not in base]
        if missing:
            raise MergeInputError(f"the base lacks key(s) {missing[:5]} of the task vectors")


def check_task_vectors(task_vectors: Sequence[Mapping[str, Tensor]], base: Mapping[str, Tensor]) -> None:
    """In-memory merge inputs read from files: :func:`validate_task_vectors`, then every tensor of
    the base and of each task vector finite and of the base's dtype (an int or float64 tensor in a
    float32 model is no weight update of it). A :class:`MergeInputError` names the input (its file
    where it has one) and the key.

    Example:
        >>> check_task_vectors([{"w": torch.tensor([1, 2])}], {"w": torch.zeros(2)})
        Traceback (most recent call last):
        ...
        asymvlm.errors.MergeInputError: task vector 0: 'w' has dtype torch.int64, the base's is torch.float32
    """
    from asymvlm.merging.task_vectors import MergeInputError

    validate_task_vectors(task_vectors, base)
    for k in keys_of(task_vectors):
        b = base[k]
        if b.is_floating_point() and not bool(torch.isfinite(b).all()):
            raise MergeInputError(f"the base's {k!r} contains NaN or inf")
    for i, d in enumerate(task_vectors):
        where = f"task vector {i}" + (f" ({d.path})" if getattr(d, "path", None) else "")
        for k in d:
            t = d[k]
            if t.dtype != base[k].dtype:
                raise MergeInputError(f"{where}: {k!r} has dtype {t.dtype}, the base's is {base[k].dtype}")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise MergeInputError(f"{where}: {k!r} contains NaN or inf")


def merge_params(
    base: Mapping[str, Tensor],
    task_vectors: Sequence[Mapping[str, Tensor]],
    method: str = "ties",
    *,
    lam: float = 1.0,
    weights: Sequence[float] | None = None,
    **options: Any,
) -> Params:
    """``base + lam * aggregate(task_vectors)`` in memory (keys of the base that no task vector
    touches are copied unchanged). Non-finite task-vector entries are an error naming the key."""
    from asymvlm.io import non_finite_key
    from asymvlm.merging.task_vectors import MergeInputError

    check_task_vectors(task_vectors, base)
    recipe = make_method(method, lam=lam, **options)
    if weights is not None and not all(math.isfinite(float(w)) for w in weights):
        raise MergeInputError(f"weights must be finite numbers, got {list(weights)}")
    merged, _, _ = server_update(recipe, task_vectors, weights, recipe.server.init(base), base)
    bad = non_finite_key(merged)
    if bad is not None:
        raise MergeInputError(f"the merge of {bad!r} is not finite (overflow): scale the inputs or lam down")
    return dict(merged)


def merge_files(
    base_path: str | Path,
    vector_paths: Sequence[str | Path],
    out_path: str | Path,
    method: str = "ties",
    *,
    lam: float = 1.0,
    weights: Sequence[float] | None = None,
    progress: bool = False,
    **options: Any,
) -> Path:
    """Merge task vectors into a base checkpoint, streaming tensor by tensor and writing ``out_path``
    atomically (nothing is written if any input is invalid). ``vector_paths`` are task-vector files
    or directories, or mappings with ``LazyTaskVector``' interface (:class:`~asymvlm.merging.task_vectors.DiffParams`
    for checkpoints never turned into task-vector files, :class:`~asymvlm.merging.task_vectors.MemoryParams`)."""
    from asymvlm.io import SafetensorsStreamWriter, non_finite_key
    from asymvlm.merging.task_vectors import LazyTaskVector, MergeInputError, check_same_base

    base = LazyTaskVector(base_path)
    vectors = [p if isinstance(p, Mapping) else LazyTaskVector(p) for p in vector_paths]
    check_same_base(vectors)
    validate_task_vectors(vectors, base)
    for v in vectors:
        for k in v:
            if v.shape(k) != base.shape(k):
                raise MergeInputError(f"{k!r}: shape {v.shape(k)} in {v.path}, {base.shape(k)} in the base {base.path}")
            if v.stored_dtype(k) != base.stored_dtype(k):
                raise MergeInputError(
                    f"{k!r}: dtype {v.stored_dtype(k)} in {v.path}, {base.stored_dtype(k)} in the base {base.path}"
                )
    recipe = make_method(method, lam=lam, **options)
    if weights is not None and not all(math.isfinite(float(w)) for w in weights):
        raise MergeInputError(f"weights must be finite numbers, got {list(weights)}")
    agg = recipe.aggregator(vectors, weights)
    bad = non_finite_key(agg.delta)
    if bad is not None:  # NaN/inf in an input propagate into the merge: name the input
        if not bool(torch.isfinite(base[bad]).all()):  # a checkpoint's difference to a NaN base is NaN
            raise MergeInputError(f"the base {base.path}: {bad!r} contains NaN or inf")
        for i, v in enumerate(vectors):
            if not bool(torch.isfinite(v[bad]).all()):
                raise MergeInputError(f"task vector {i} ({v.path}): {bad!r} contains NaN or inf")
        raise MergeInputError(f"the merge of {bad!r} overflowed (inf); scale the inputs or lam down")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    specs = {k: (base.stored_dtype(k), base.shape(k)) for k in base}
    from tqdm.auto import tqdm

    # the server step, applied lazily: each merged tensor is computed when it is written
    merged, _, _ = server_update(recipe, vectors, weights, {}, base, aggregated=agg, lazy=True)
    try:
        with SafetensorsStreamWriter(tmp, specs) as w:
            for k in tqdm(base, desc="writing", disable=not progress, unit="tensor"):
                t = merged[k].reshape(base.shape(k))
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):  # checked before it is written
                    where = f"the base {base.path}" if not bool(torch.isfinite(base[k]).all()) else "the merge"
                    raise MergeInputError(f"{where}: {k!r} is not finite (NaN or overflow); nothing was written")
                w.write(k, t)
        import os

        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out_path
