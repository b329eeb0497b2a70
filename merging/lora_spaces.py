"""LoRA-native merging: the adapters' updates expressed in one shared basis, merged there.

Merging LoRA adapters entry by entry on their dense ``Delta W_t = s_t B_t A_t`` ignores that each
update lives in a small subspace; merging the factors ``A_t``/``B_t`` separately is not merging
``B_t A_t`` at all. Both methods here first write every task's update in a basis common to all
tasks, merge the small coefficient matrices there (task arithmetic, or TIES), and map back:

* ``knots`` — KnOTS (Stoica et al. 2024, https://arxiv.org/abs/2410.19735, code
  github.com/gstoica27/KnOTS ``task_merger.SVDMerger``): per layer the thin SVD of the updates side
  by side, ``[dW_1, ..., dW_T] = U S [V_1^T, ..., V_T^T]`` (``(m, T n)``), so
  ``dW_t = U S V_t^T`` exactly. Following the authors' code, the task representations are the
  ``S V_t^T`` (``(p, n)``; their ``V = diag(s) @ V``, ``s_model = s / s``), TIES' top-k is taken
  per task over all layers' representations concatenated (their ``ties_masking`` on the stacked
  model-wide vectors: our ``Ties(scope="global")``), and ``dW = U @ merged``. The SVD is computed
  in factored form: QR of ``[s_1 B_1, ..., s_T B_T]`` (``(m, R)``, ``R = sum_t r_t``) and of each
  ``A_t^T``, then the SVD of an ``R x R`` core; never a dense ``(m, T n)`` SVD.
* ``core_space`` — Core Space (Panariello et al. 2025, https://arxiv.org/abs/2509.17786, code
  github.com/apanariello4/core-space-merging ``MatrixPerLayerMerger.get_core_matrices``): per layer
  reference bases ``U_B`` (left singular vectors of ``[B_1, ..., B_T]``, ``(m, R)``) and ``V_A``
  (right singular vectors of ``[A_1; ...; A_T]``, ``(R, n)``); core matrices
  ``M_t = U_B^T (s_t B_t A_t) V_A`` (``R x R``, from the factors); TIES layer by layer (their
  ``_process_ties`` flattens one layer's cores: our ``Ties(scope="global")`` called per layer, which
  keeps the official top-k rule and elects zero signs within the layer); ``dW = U_B M V_A^T``.

Both are lossless for task arithmetic: with ``inner="task_arithmetic"``,
``dW = lam * sum_t w_t s_t B_t A_t`` exactly (up to float64 rounding), since every ``dW_t`` is
represented exactly in the shared basis. The merged ``dW`` has rank ``<= R``, so an adapter of rank
``R`` holds it exactly (:func:`best_rank_factors`, used by
:func:`asymvlm.merging.lora.merge_lora_adapters`).

Weights follow the package's convention (:class:`~asymvlm.federated.core.Sum`,
:class:`~asymvlm.merging.ties.Ties`): each task's aligned matrix is multiplied by its weight (after
TIES' trim, sign elected on the unweighted matrices), then the server step multiplies by ``lam``.
The authors' code multiplies every task by one scaling coefficient, which is ``lam`` here.

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> ab = [(torch.randn(2, 5, generator=g, dtype=torch.float64),
    ...        torch.randn(4, 2, generator=g, dtype=torch.float64)) for _ in range(2)]
    >>> out = merge_lora_factors({"q": ab}, [1.0, 0.5], "knots", inner="task_arithmetic")
    >>> a, b = out["q"]
    >>> exact = ab[0][1] @ ab[0][0] + 0.5 * ab[1][1] @ ab[1][0]
    >>> bool(torch.allclose(b @ a, exact, atol=1e-12)), a.shape[0] <= 4
    (True, True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from asymvlm.errors import ConfigError
from asymvlm.federated.core import Aggregator, Sum
from asymvlm.merging.task_vectors import MergeInputError
from asymvlm.merging.ties import Ties

__all__ = [
    "SPACES",
    "INNER_METHODS",
    "LoraSpaceMerge",
    "merge_lora_factors",
    "knots_basis",
    "core_space_basis",
    "best_rank_factors",
]

SPACES = {"knots": "https://arxiv.org/abs/2410.19735", "core_space": "https://arxiv.org/abs/2509.17786"}
INNER_METHODS = ("task_arithmetic", "ties")
# KnOTS keeps the singular components of the concatenation that are nonzero. The authors' code keeps
# s > 1e-5 (absolute, after a float32 cast); we keep the numerical rank in float64 (s > RANK_RTOL *
# s_max), which does not depend on the scale of the updates. Generic LoRA factors have full rank R.
RANK_RTOL = 1e-12

Factors = Sequence[tuple[Tensor, Tensor]]  # per task (A_t (r_t, n), B_t (m, r_t))


def _check_factors(layer: str, factors: Factors, n_tasks: int) -> None:
    if len(factors) != n_tasks:
        raise MergeInputError(f"{layer!r}: {len(factors)} LoRA factor pairs for {n_tasks} scalings")
    a0, b0 = factors[0]
    for t, (a, b) in enumerate(factors):
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise MergeInputError(f"{layer!r}, task {t}: A {tuple(a.shape)} and B {tuple(b.shape)} are no LoRA pair")
        if (b.shape[0], a.shape[1]) != (b0.shape[0], a0.shape[1]):
            raise MergeInputError(
                f"{layer!r}: Delta W is {(b0.shape[0], a0.shape[1])} in task 0 but {(b.shape[0], a.shape[1])} "
                f"in task {t}"
            )


def knots_basis(factors: Factors, scalings: Sequence[float]) -> tuple[Tensor, Tensor, list[Tensor]]:
    """KnOTS' shared basis of one layer: ``(U, S, [V_t^T])`` with ``s_t B_t A_t = U diag(S) V_t^T``.

    The thin SVD of ``[dW_1, ..., dW_T]`` (``(m, T n)``) from the factors: with
    ``B_cat = [s_1 B_1, ..., s_T B_T] = Q_B R_B`` and ``A_t^T = Q_t R_t``, the concatenation is
    ``Q_B (R_B blockdiag(R_t^T)) blockdiag(Q_t^T)``; the SVD of the small core gives ``U`` and
    ``V^T`` (orthonormal rows, since ``blockdiag(Q_t^T)`` has). Only the components with
    ``S > RANK_RTOL * S_max`` are kept (``p <= R``). Float64.

    Returns:
        ``U`` ``(m, p)``, ``S`` ``(p,)`` (descending), ``[V_t^T]`` each ``(p, n)``.
    """
    b_cat = torch.cat([s * b.double() for (_, b), s in zip(factors, scalings)], 1)  # (m, R)
    q_b, r_b = torch.linalg.qr(b_cat)  # (m, kB), (kB, R)
    q_as, r_ats = [], []
    for a, _ in factors:
        q, r = torch.linalg.qr(a.double().T)  # (n, k_t), (k_t, r_t)
        q_as.append(q)
        r_ats.append(r.T)  # (r_t, k_t)
    core = r_b @ torch.block_diag(*r_ats)  # (kB, K)
    uc, sv, vch = torch.linalg.svd(core, full_matrices=False)
    keep = sv > RANK_RTOL * sv[0] if sv.numel() and sv[0] > 0 else torch.zeros_like(sv, dtype=torch.bool)
    u, sv, vch = q_b @ uc[:, keep], sv[keep], vch[keep]  # (m, p), (p,), (p, K)
    vts, start = [], 0
    for q in q_as:
        vts.append(vch[:, start : start + q.shape[1]] @ q.T)  # (p, n): task t's block of V^T
        start += q.shape[1]
    return u, sv, vts


def core_space_basis(factors: Factors, scalings: Sequence[float]) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Core Space's reference bases of one layer and the tasks' core matrices:
    ``(U_B, V_A^T, [M_t])`` with ``s_t B_t A_t = U_B M_t V_A^T``.

    ``U_B``: the left singular vectors of ``[B_1, ..., B_T]``; ``V_A^T``: the right singular vectors
    of ``[A_1; ...; A_T]`` (the factors as stored, without the LoRA scaling, all components kept, as
    the authors' code); ``M_t = (U_B^T B_t) s_t (A_t V_A)``, never the dense ``Delta W``. Float64.

    Returns:
        ``U_B`` ``(m, kB)``, ``V_A^T`` ``(kA, n)``, ``[M_t]`` each ``(kB, kA)`` (``kB, kA <= R``).
    """
    a_cat = torch.cat([a.double() for a, _ in factors], 0)  # (R, n)
    b_cat = torch.cat([b.double() for _, b in factors], 1)  # (m, R)
    u_b = torch.linalg.svd(b_cat, full_matrices=False)[0]  # (m, kB)
    vh_a = torch.linalg.svd(a_cat, full_matrices=False)[2]  # (kA, n)
    cores = [s * (u_b.T @ b.double()) @ (a.double() @ vh_a.T) for (a, b), s in zip(factors, scalings)]
    return u_b, vh_a, cores


@dataclass
class LoraSpaceMerge(Aggregator):
    """KnOTS or Core Space (module docstring): a merge of LoRA adapters' factors, registered as the
    ``knots``/``core_space`` merge methods. Called on dense task vectors it is an error: the entry
    point is :meth:`merge_factors` (used by :func:`~asymvlm.merging.lora.merge_lora_adapters`).

    Args:
        space: ``"knots"`` or ``"core_space"``.
        inner: the merge in the aligned space: ``"task_arithmetic"`` (weighted sum) or ``"ties"``.
        density: TIES' fraction of entries kept per task (``inner="ties"``).
    """

    space: str = "knots"
    inner: str = "ties"
    density: float = 0.2

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise ConfigError(f"space={self.space!r} is not one of {list(SPACES)}")
        if self.inner not in INNER_METHODS:
            raise ConfigError(f"inner={self.inner!r} is not one of {list(INNER_METHODS)}")
        if not 0 < self.density <= 1:
            raise ConfigError(f"density must be in (0, 1], got {self.density}")

    @property
    def reference(self) -> str:  # type: ignore[override]
        return SPACES[self.space]

    def __call__(self, deltas, weights=None, **_):
        raise MergeInputError(
            f"{self.space} merges LoRA adapters' factors, not dense task vectors: pass peft adapter directories "
            "(adapter_config.json + adapter_model.safetensors) as the inputs"
        )

    def merge_aligned(self, reps: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None) -> dict[str, Tensor]:
        """The inner merge of the tasks' aligned matrices (one mapping per task, same keys)."""
        if self.inner == "task_arithmetic":
            return dict(Sum()(reps, weights).delta)
        return dict(Ties(self.density, scope="global")(reps, weights).delta)

    def merge_factors(
        self,
        layers: Mapping[str, Factors],
        scalings: Sequence[float],
        weights: Sequence[float] | None = None,
        lam: float = 1.0,
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """:func:`merge_lora_factors` with this merge's options."""
        return merge_lora_factors(
            layers, scalings, self.space, inner=self.inner, density=self.density, weights=weights, lam=lam
        )


def merge_lora_factors(
    layers: Mapping[str, Factors],
    scalings: Sequence[float],
    space: str = "knots",
    *,
    inner: str = "ties",
    density: float = 0.2,
    weights: Sequence[float] | None = None,
    lam: float = 1.0,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Merge T LoRA adapters layer by layer in KnOTS' or Core Space's aligned basis.

    Args:
        layers: ``{layer: [(A_t, B_t) for each task]}`` (``A_t`` ``(r_t, n)``, ``B_t`` ``(m, r_t)``).
        scalings: ``s_t`` of each task (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA).
        space: ``"knots"`` or ``"core_space"``.
        inner, density: the merge in the aligned space (:class:`LoraSpaceMerge`).
        weights: per-task weights (default all 1), as :class:`~asymvlm.federated.core.Sum` /
            :class:`~asymvlm.merging.ties.Ties` use them.
        lam: the scaling of the merged update (the server step).

    Returns:
        ``{layer: (A, B)}`` in float64 with ``B @ A`` the merged ``Delta W`` (scaling 1), of rank
        ``<= sum_t r_t``: KnOTS ``B = U``, ``A = lam * merged(S V_t^T)``; Core Space
        ``B = U_B (lam * merged(M_t))``, ``A = V_A^T``.
    """
    spec = LoraSpaceMerge(space, inner, density)  # ConfigError on bad options
    k = len(scalings)
    if weights is not None:
        weights = [float(x) for x in weights]
        if len(weights) != k or not all(math.isfinite(x) for x in weights):
            raise MergeInputError(f"weights must be {k} finite numbers (one per adapter), got {weights}")
    if not layers:
        raise MergeInputError("no LoRA layers to merge")
    for layer, factors in layers.items():
        _check_factors(layer, factors, k)
    out: dict[str, tuple[Tensor, Tensor]] = {}
    if space == "knots":
        bases = {layer: knots_basis(f, scalings) for layer, f in layers.items()}
        live = [layer for layer, (u, _, _) in bases.items() if u.shape[1] > 0]  # a zero update has no basis
        reps = [{layer: bases[layer][1][:, None] * bases[layer][2][t] for layer in live} for t in range(k)]
        merged = spec.merge_aligned(reps, weights) if live else {}
        for layer, (u, _, vts) in bases.items():
            a = lam * merged[layer] if layer in merged else vts[0].new_zeros(0, vts[0].shape[1])
            out[layer] = (a, u)  # (p, n), (m, p)
        return out
    for layer, f in layers.items():
        u_b, vh_a, cores = core_space_basis(f, scalings)
        m = spec.merge_aligned([{layer: c} for c in cores], weights)[layer]  # TIES per layer (authors' code)
        out[layer] = (vh_a, u_b @ (lam * m))  # (kA, n), (m, kA)
    return out


def best_rank_factors(a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor, float, float]:
    """The best rank-``rank`` LoRA pair of ``B @ A`` (Eckart–Young), without forming the product:
    QR of ``B`` and ``A^T``, the SVD of the small ``R_B R_A^T``; singular values split evenly
    between the factors (as :func:`asymvlm.lora.low_rank_factors`). Float64.

    Returns:
        ``(A_r (rank, n), B_r (m, rank), relative Frobenius error, ||B A||_F^2)``; the pair is padded
        with zeros to exactly ``rank`` when ``B @ A`` has fewer singular values.

    Example:
        >>> a, b = torch.eye(2, 3, dtype=torch.float64), torch.diag(torch.tensor([3.0, 4.0], dtype=torch.float64))
        >>> ar, br, err, sq = best_rank_factors(a, b, 1)
        >>> round(err, 6), sq, (br @ ar).tolist()
        (0.6, 25.0, [[0.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    """
    if rank < 1:
        raise ConfigError(f"rank must be >= 1, got {rank}")
    a, b = a.double(), b.double()
    m, n = b.shape[0], a.shape[1]
    a_r, b_r = a.new_zeros(rank, n), a.new_zeros(m, rank)
    if a.shape[0] == 0:
        return a_r, b_r, 0.0, 0.0
    q_b, r_b = torch.linalg.qr(b)  # (m, kb), (kb, k)
    q_a, r_a = torch.linalg.qr(a.T)  # (n, ka), (ka, k)
    u, sv, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # the singular values of B @ A
    r = min(rank, sv.numel())
    root = sv[:r].sqrt()
    b_r[:, :r] = (q_b @ u[:, :r]) * root
    a_r[:r] = root[:, None] * (vh[:r] @ q_a.T)
    sq = float(sv.pow(2).sum())
    err = math.sqrt(float(sv[r:].pow(2).sum()) / sq) if sq > 0 else 0.0
    return a_r, b_r, err, sq
