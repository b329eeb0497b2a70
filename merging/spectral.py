"""Spectral merges of 2-D weights: Iso-C, Iso-CTS and TSV-M.

Each works per 2-D weight on the task matrices of that weight only (one key of all tasks resident);
tensors that are not 2-D (biases, norms, the temperature) have no spectrum and are averaged
(``non_matrix="mean"``, what the authors' code does) or summed (``"sum"``, task arithmetic). The
method's ``lam`` (the papers' alpha) scales the result. Task weights, where given, scale each task
matrix before anything else. SVDs run in the tensors' dtype, at least float32 (the authors' code
runs float32; float64 inputs stay float64, which is what the tests compare at 1e-12).

Iso-C (Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces", https://arxiv.org/abs/2502.04959): for every 2-D weight, the summed task
matrix ``M = sum_t tau_t`` is decomposed ``M = U diag(s) V^T`` and its spectrum is flattened to the
mean singular value, ``iso(M) = mean(s) U V^T``: the directions every task contributes keep equal
weight instead of the dominant tasks' few. Tensors that are not 2-D (biases, norms, the temperature)
have no spectrum: ``non_matrix="mean"`` (the default: what ports of the authors' code do) averages
them, ``"sum"`` adds them (task arithmetic); an explicit option because implementations differ.

Iso-CTS (same paper, Algorithm 2): the top ``k = common * r`` singular directions of ``M`` (the
common subspace) plus, for every task, the top ``(r - k) / T`` directions of its matrix projected off
the common subspace (``tau_t - U_k U_k^T tau_t``); the stacked left and right bases are made
orthonormal by their polar factor (``P Q^T`` of ``P S Q^T``) and every direction gets the mean of
the stacked singular values. ``k`` is rounded as in the authors' code so the task-specific part
divides evenly among the tasks.

TSV-M (Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference in Model Merging",
https://arxiv.org/abs/2412.00081): each task matrix keeps its top ``int(fraction * r)`` singular
triplets (``fraction = 1/T`` by default); the tasks' left and right singular vectors are stacked side
by side and replaced by their polar factors (the orthogonal matrices nearest to them: the
interference between tasks' subspaces is removed), and the merge is ``U_perp diag(S) V_perp^T`` with
the tasks' own singular values.

Example:
    >>> import torch
    >>> out = IsoC()([{"w": torch.diag(torch.tensor([3.0, 1.0]))}]).delta["w"]
    >>> out.tolist()
    [[2.0, 0.0], [0.0, 2.0]]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from asymvlm.federated.core import AggregateResult, Aggregator, Params, keys_of, stack_key

__all__ = ["IsoC", "IsoCTS", "TsvM", "isotropic", "iso_cts_sizes", "polar", "svd"]


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``(U, S, V^T)`` of ``m`` (batched over leading dimensions), in ``m``'s dtype.

    LAPACK's divide-and-conquer SVD can fail on a finite float32 matrix whose singular values span
    many orders of magnitude (measured: MKL, one thread, a 1024 x 1024 stack of two head task
    vectors' singular vectors, singular values 1.41 down to 7e-8: "failed to converge"); such a
    matrix is decomposed again in float64 and the factors rounded back.

    Example:
        >>> u, s, vh = svd(torch.diag(torch.tensor([3.0, 1.0])))
        >>> s.tolist()
        [3.0, 1.0]
    """
    try:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        if bool(torch.isfinite(s).all()):
            return u, s, vh
    except torch.linalg.LinAlgError:
        if m.dtype == torch.float64:
            raise
    if m.dtype == torch.float64:
        raise torch.linalg.LinAlgError("the SVD returned non-finite singular values")
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    return u.to(m.dtype), s.to(m.dtype), vh.to(m.dtype)


def polar(m: torch.Tensor) -> torch.Tensor:
    """The polar factor ``P Q^T`` of ``m = P diag(s) Q^T`` (thin SVD): the matrix with orthonormal
    columns (or rows) nearest to ``m`` in Frobenius norm (the orthogonal Procrustes solution).

    Example:
        >>> polar(torch.tensor([[2.0, 0.0], [0.0, 0.5]])).tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """
    p, _, qh = svd(m)
    return p @ qh


def isotropic(m: torch.Tensor) -> torch.Tensor:
    """``mean(s) U V^T`` of a 2-D ``m = U diag(s) V^T`` (thin SVD in float64 for float64 input, else
    in float32; returned in ``m``'s dtype): Iso-C's flattened spectrum.

    Example:
        >>> m = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
        >>> isotropic(m).tolist()  # singular values (2, 0): both become their mean, 1
        [[1.0, 0.0], [0.0, 1.0]]
    """
    u, s, vh = svd(m.to(_work_dtype(m)))
    return (s.mean() * (u @ vh)).to(m.dtype)


def _check_non_matrix(value: str) -> None:
    if value not in ("mean", "sum"):
        from asymvlm.errors import ConfigError

        raise ConfigError(f"non_matrix={value!r} is not one of ('mean', 'sum')")


@dataclass
class _Spectral(Aggregator):
    """Per key: the weighted task matrices of all tasks (K, m, n) to :meth:`matrix`; other tensors
    averaged or summed (``non_matrix``)."""

    non_matrix: str = "mean"

    def __post_init__(self) -> None:
        _check_non_matrix(self.non_matrix)

    def matrix(self, stack: torch.Tensor) -> torch.Tensor:  # (K, m, n) weighted task matrices -> (m, n)
        raise NotImplementedError

    def __call__(self, deltas, weights=None, **_):
        k = len(deltas)
        w = torch.tensor([1.0] * k if weights is None else [float(x) for x in weights], dtype=torch.float64)
        out: Params = {}
        for key in keys_of(deltas):
            stack = stack_key(deltas, key)  # (K, ...) of this key only
            weighted = stack.to(torch.float64 if stack.dtype == torch.float64 else torch.float32)
            weighted = weighted * w.to(weighted.dtype).view(-1, *([1] * (stack.dim() - 1)))
            if not bool(torch.isfinite(weighted).all()):
                from asymvlm.merging.task_vectors import MergeInputError

                raise MergeInputError(f"{key!r}: the weighted task vectors are not finite")
            if stack.dim() == 3:
                total = self.matrix(weighted)
            else:
                total = weighted.sum(0) / (float(w.sum()) if self.non_matrix == "mean" else 1.0)
            out[key] = total.to(stack.dtype)
        return AggregateResult(out, {})


@dataclass
class IsoC(_Spectral):
    """Iso-C (https://arxiv.org/abs/2502.04959): per 2-D key the isotropic sum of the task vectors
    (:func:`isotropic`), other keys averaged or summed (``non_matrix``). Task weights, where given,
    weight the sum."""

    reference = "https://arxiv.org/abs/2502.04959"

    def matrix(self, stack):
        return isotropic(stack.sum(0))


def iso_cts_sizes(r: int, tasks: int, common: float) -> tuple[int, int]:
    """``(k, s)``: Iso-CTS's common-subspace size and per-task size for rank ``r`` (``k + T s = r``),
    rounded as the authors' code does (Python's ``round`` of the per-task share).

    Example:
        >>> iso_cts_sizes(768, 8, 0.8)
        (616, 19)
    """
    share = round((r - int(r * common)) / tasks)
    if share * tasks > r:
        share = r // tasks
    return r - share * tasks, share


@dataclass
class IsoCTS(_Spectral):
    """Iso-CTS (https://arxiv.org/abs/2502.04959): the common subspace of the summed task matrix
    plus each task's own top directions off it, orthonormalised, with an isotropic spectrum."""

    common: float = 0.8
    reference = "https://arxiv.org/abs/2502.04959"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.common <= 1.0:
            from asymvlm.errors import ConfigError

            raise ConfigError(f"common={self.common} must lie in [0, 1]")

    def matrix(self, stack):
        tasks, r = stack.shape[0], min(stack.shape[1:])
        k, share = iso_cts_sizes(r, tasks, self.common)
        u, s, vh = svd(stack.sum(0))
        us, ss, vs = [u[:, :k]], [s[:k]], [vh[:k]]
        if share > 0:
            uk = u[:, :k]
            off = stack - uk @ (uk.T @ stack)  # (K, m, n): each task off the common subspace
            ut, st, vt = svd(off)
            us += list(ut[:, :, :share].unbind(0))
            ss += list(st[:, :share].unbind(0))
            vs += list(vt[:, :share].unbind(0))
        u_all, s_all, v_all = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 0)  # (m, r), (r,), (r, n)
        return s_all.mean() * (polar(u_all) @ polar(v_all))


@dataclass
class TsvM(_Spectral):
    """TSV-M (https://arxiv.org/abs/2412.00081): each task's top singular triplets, its singular
    vectors orthogonalised across tasks by their polar factors, its singular values kept."""

    fraction: float = 0.0  # 0: 1/T, the paper's
    reference = "https://arxiv.org/abs/2412.00081"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.fraction <= 1.0:
            from asymvlm.errors import ConfigError

            raise ConfigError(f"fraction={self.fraction} must lie in [0, 1] (0: 1/T, the paper's)")

    def matrix(self, stack):
        tasks, r = stack.shape[0], min(stack.shape[1:])
        frac = self.fraction or 1.0 / tasks
        if frac * tasks > 1.0 + 1e-12:
            from asymvlm.errors import ConfigError

            raise ConfigError(f"tsv_m: fraction={frac} keeps more than the rank for {tasks} tasks (at most 1/T)")
        keep = int(r * frac)
        if keep == 0:  # narrower than the task count: nothing of any task fits (the paper's int())
            return stack.new_zeros(stack.shape[1:])
        u, s, vh = svd(stack)  # batched over the tasks
        u_all = torch.cat(u[:, :, :keep].unbind(0), 1)  # (m, T keep)
        v_all = torch.cat(vh[:, :keep].unbind(0), 0)  # (T keep, n)
        return polar(u_all) @ (s[:, :keep].reshape(-1, 1) * polar(v_all))
