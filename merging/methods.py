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
=================  ====================================================================

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from asymvlm.errors import ConfigError
from asymvlm.federated.core import (
    AggregateResult,
    Aggregator,
    Params,
    Recipe,
    Sum,
    WeightedMean,
    keys_of,
    scale,
    server_update,
    stack_key,
)
from asymvlm.merging.spectral import IsoC
from asymvlm.registry import Param, Registry, in_range, probability

__all__ = [
    "Ties",
    "Dare",
    "METHODS",
    "make_method",
    "validate_task_vectors",
    "check_task_vectors",
    "merge_params",
    "merge_files",
    "kth_smallest_magnitude",
    "ties_thresholds",
]


# ----------------------------------------------------------------------------------------------
# exact streaming selection
# ----------------------------------------------------------------------------------------------
def _magnitude_bits(t: Tensor) -> tuple[Tensor, int]:
    """Non-negative magnitudes as order-preserving integer bit patterns (the sign bit is 0):
    int32 for float32 and narrower, int64 for float64."""
    if t.dtype == torch.float64:
        return t.abs().view(torch.int64), 64
    return t.float().abs().view(torch.int32), 32


def kth_smallest_magnitude(tensors: Callable[[], Any], k: int, bits: int = 32) -> float:
    """The k-th smallest ``|x|`` (1-based) over all tensors yielded by ``tensors()`` (called once per
    pass), exact, with O(65536) memory. Non-negative IEEE floats order like their bit patterns."""
    prefix, remaining = 0, k
    shift = bits
    while shift > 0:
        shift -= 16
        hist = torch.zeros(1 << 16, dtype=torch.int64)
        for t in tensors():
            b, _ = _magnitude_bits(t.reshape(-1))
            if shift + 16 < bits:  # keep only values whose higher bits equal the prefix found so far
                b = b[(b >> (shift + 16)) == prefix]
            hist += torch.bincount(((b >> shift) & 0xFFFF), minlength=1 << 16)
        cum = torch.cumsum(hist, 0)
        digit = int(torch.searchsorted(cum, torch.tensor(remaining)))
        remaining -= int(cum[digit - 1]) if digit > 0 else 0
        prefix = (prefix << 16) | digit
    if bits == 64:
        return float(torch.tensor([prefix], dtype=torch.int64).view(torch.float64))
    return float(torch.tensor([prefix], dtype=torch.int32).view(torch.float32))


def ties_thresholds(deltas: Sequence[Mapping[str, Tensor]], density: float) -> list[float]:
    """Per task, the magnitude threshold of the paper's global top-k: the ``(N - int(N density))``-th
    smallest ``|tau|`` over the whole model (entries ``>=`` it are kept); 0 when nothing is trimmed."""
    out = []
    for d in deltas:
        keys = list(d.keys())
        n = sum(d[k].numel() for k in keys)
        m = n - int(n * density)
        if m <= 0:
            out.append(0.0)
            continue
        bits = 64 if d[keys[0]].dtype == torch.float64 else 32
        out.append(kth_smallest_magnitude(lambda d=d, keys=keys: (d[k] for k in keys), m, bits))
    return out


# ----------------------------------------------------------------------------------------------
# TIES and DARE aggregators
# ----------------------------------------------------------------------------------------------
def _topk_masks(stack: Tensor, density: float) -> Tensor:
    """peft's per-tensor pruning of each task's copy: exactly ``int(density * numel)`` largest
    magnitudes. Found with one batched ``kthvalue`` (linear time) instead of ``topk``; a task whose
    threshold value occurs more than once falls back to ``topk`` so exactly k entries are kept."""
    k_tasks = stack.shape[0]
    flat = stack.reshape(k_tasks, -1).abs()
    n = flat.shape[1]
    k = int(density * n)
    if k <= 0:
        return torch.zeros_like(stack, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(stack, dtype=torch.bool)
    th = flat.kthvalue(n - k + 1, dim=1, keepdim=True).values  # the k-th largest
    mask = flat >= th
    for i in torch.nonzero(mask.sum(1) != k).flatten().tolist():  # ties at the threshold
        row = torch.zeros(n, dtype=torch.bool)
        row[torch.topk(flat[i], k=k, largest=True).indices] = True
        mask[i] = row
    return mask.reshape(stack.shape)


def _disjoint(stack: Tensor, weighted: Tensor, ww: Tensor, sign: Tensor, normalize: str) -> Tensor:
    """The mean of the (weighted) entries that agree with ``sign`` (nonzero, same sign), by count or
    by weight. ``sign`` is -1, 0 or +1 per coordinate; 0 agrees with nothing."""
    agree = (stack * sign) > 0
    num = weighted.masked_fill(~agree, 0).sum(0)
    if normalize == "count":
        return num / agree.sum(0).to(stack.dtype).clamp_min(1.0)
    return num / (ww * agree).sum(0).clamp_min(torch.finfo(stack.dtype).tiny)


@dataclass
class Ties(Aggregator):
    """TIES-merging (Yadav et al. 2023, https://arxiv.org/abs/2306.01708); options in the module
    docstring. Returns the merged task vector (before the ``lam`` scaling)."""

    density: float = 0.2
    scope: str = "global"
    sign: str = "total"
    sign_weighted: bool = False
    normalize: str = "count"
    zero_sign: str = "majority"
    trim: bool = True  # False: no magnitude trim (DARE+TIES)
    reference = "https://arxiv.org/abs/2306.01708"

    def __post_init__(self) -> None:
        if not 0 < self.density <= 1:
            raise ConfigError(f"density must be in (0, 1], got {self.density}")
        for name, value, allowed in (
            ("scope", self.scope, ("global", "per_tensor")),
            ("sign", self.sign, ("total", "frequency")),
            ("normalize", self.normalize, ("count", "weight")),
            ("zero_sign", self.zero_sign, ("majority", "positive", "none")),
        ):
            if value not in allowed:
                raise ConfigError(f"{name}={value!r} is not one of {allowed}")

    def __call__(self, deltas, weights=None, **_):
        k = len(deltas)
        w = torch.tensor([1.0] * k if weights is None else [float(x) for x in weights])
        thresholds = ties_thresholds(deltas, self.density) if (self.trim and self.scope == "global") else None
        out: Params = {}
        pending_zero: list[tuple[str, Tensor, Tensor, Tensor]] = []  # key, index, value if +, value if -
        sign_total = 0.0
        for key in keys_of(deltas):
            stack = stack_key(deltas, key)  # (K, ...) of this tensor only
            shape = stack.shape[1:]
            # NaN/inf in any task propagate into the plain sum: one check of one tensor, the culprit
            # is looked for only on failure (trimming would otherwise hide a NaN: NaN >= t is False)
            if not bool(torch.isfinite(stack.sum(0)).all()):
                from asymvlm.merging.task_vectors import MergeInputError

                finite = torch.isfinite(stack.reshape(k, -1)).all(1)
                if bool(finite.all()):
                    raise MergeInputError(f"{key!r}: the task vectors' sum overflows")
                raise MergeInputError(f"task vector {int((~finite).nonzero()[0, 0])}: {key!r} contains NaN or inf")
            if self.trim and self.density < 1:
                if thresholds is not None:
                    th = torch.tensor(thresholds, dtype=stack.dtype).view(-1, *([1] * len(shape)))
                    stack = stack.masked_fill(stack.abs() < th, 0)
                else:
                    stack = stack.masked_fill(~_topk_masks(stack, self.density), 0)
            ww = w.to(stack.dtype).view(-1, *([1] * len(shape)))
            weighted = stack if bool((w == 1).all()) else stack * ww
            votes = weighted if self.sign_weighted else stack
            mass = votes.sum(0) if self.sign == "total" else votes.sign().sum(0)
            elected = mass.sign()
            sign_total += float(elected.sum())

            if self.zero_sign == "positive":
                elected = torch.where(elected == 0, torch.ones_like(elected), elected)
            merged = _disjoint(stack, weighted, ww, elected, self.normalize)
            if self.zero_sign == "majority" and bool((elected == 0).any()):
                zero = (elected == 0) & (stack != 0).any(0)
                if bool(zero.any()):
                    idx = torch.nonzero(zero.reshape(-1)).squeeze(1)
                    ones = torch.ones_like(elected)
                    pos = _disjoint(stack, weighted, ww, ones, self.normalize).reshape(-1)[idx]
                    neg = _disjoint(stack, weighted, ww, -ones, self.normalize).reshape(-1)[idx]
                    pending_zero.append((key, idx, pos, neg))
            out[key] = merged
        if pending_zero:  # resolve exact ties with the model-wide majority sign (the paper's rule)
            majority = 1.0 if sign_total >= 0 else -1.0
            for key, idx, pos, neg in pending_zero:
                flat = out[key].reshape(-1)
                flat[idx] = pos if majority > 0 else neg
        return AggregateResult(out, {"thresholds": thresholds})


@dataclass
class Dare(Aggregator):
    """DARE (Yu et al. 2024, https://arxiv.org/abs/2311.03099): drop each entry of each task vector
    with probability ``p`` and rescale the rest by ``1/(1-p)``; then ``sum`` (or TIES without
    magnitude trim, ``then="ties"``). The drop mask of (task i, key) is seeded by ``(seed, i, key)``,
    so it does not depend on the order in which tensors are read."""

    p: float = 0.9
    seed: int = 0
    then: str = "sum"
    ties_options: dict[str, Any] | None = None
    reference = "https://arxiv.org/abs/2311.03099"

    def __post_init__(self) -> None:
        if not 0 <= self.p < 1:
            raise ConfigError(f"drop probability p must be in [0, 1), got {self.p}")
        if self.then not in ("sum", "ties"):
            raise ConfigError(f"then must be 'sum' or 'ties', got {self.then!r}")

    def dropped(self, deltas: Sequence[Mapping[str, Tensor]]) -> list[Mapping[str, Tensor]]:
        return [_Dropped(d, i, self.p, self.seed) for i, d in enumerate(deltas)]

    def __call__(self, deltas, weights=None, **_):
        views = self.dropped(deltas)
        if self.then == "sum":
            return Sum()(views, weights)
        return Ties(**{"density": 1.0, **(self.ties_options or {}), "trim": False})(views, weights)


class _Dropped(Mapping):
    def __init__(self, base: Mapping[str, Tensor], index: int, p: float, seed: int):
        self.base, self.index, self.p, self.seed = base, index, p, seed

    def __getitem__(self, key: str) -> Tensor:
        t = self.base[key]
        digest = int.from_bytes(
            __import__("hashlib").sha256(f"{self.seed}|{self.index}|{key}".encode()).digest()[:8], "little"
        )
        g = torch.Generator().manual_seed(digest)
        keep = torch.rand(t.shape, generator=g) >= self.p
        return torch.where(keep, t / (1 - self.p), torch.zeros_like(t))

    def __iter__(self):
        return iter(self.base)

    def __len__(self):
        return len(self.base)


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


@METHODS.register(
    "iso_c",
    help="per 2-D weight the summed task matrix with its singular values replaced by their mean",
    reference="https://arxiv.org/abs/2502.04959",
    params=(
        _LAM,
        Param("non_matrix", Literal["mean", "sum"], "mean",
              "Tensors that are not 2-D (no spectrum): their mean (ports of the authors' code) or their sum."),
    ),
)  # fmt: skip
def _iso_c(lam, non_matrix):
    return _recipe(IsoC(non_matrix=non_matrix), lam)


def make_method(name: str, **options: Any) -> Recipe:
    """The recipe of a registered merge method (``lam`` and the method's declared options; any other
    option is a :class:`~asymvlm.errors.ConfigError` naming it and the valid ones)."""
    entry = METHODS.entry(name)
    resolved = METHODS.resolve(name, options)
    return Recipe(name=name, reference=entry.reference, options=resolved, **entry.factory(**resolved))


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
