"""Naive references of the spectral merges, transcribed the way the authors' code runs them.

All task vectors are loaded fully into memory (a list of dicts, safetensors ``load_file``), then
the keys are looped over; every SVD is ``torch.linalg.svd`` in float32 (the authors' dtype);
tensors that are not 2-D are averaged (the authors' running mean). The authors also route keys
named ``text_projection`` to the mean; the benchmark's visual tower has none, and asymvlm treats
every 2-D tensor as a matrix.

* Iso-C and Iso-CTS: Marczak et al. 2025, https://arxiv.org/abs/2502.04959, after
  ``src/utils/iso.py`` of https://github.com/danielm1405/iso-merging (``iso_c``, ``iso_cts``).
* TSV-M: Gargiulo et al. 2025, https://arxiv.org/abs/2412.00081, after
  ``compute_and_sum_svd_mem_reduction`` in ``src/utils/TSVM_utils.py`` of
  https://github.com/AntoAndGar/task_singular_vectors.
* Fisher merging: Matena & Raffel 2022, https://arxiv.org/abs/2111.09832, after
  ``_merge_with_coeffs`` of https://github.com/mmatena/model_merging (``model_merging/merging.py``:
  per variable ``sum_t c_t max(F_t, floor) theta_t / sum_t c_t max(F_t, floor)``), float64, with
  asymvlm's scale-free floor ``floor * m`` (``m``: the tensor's mean of the mean Fisher).
* LiNeS: Wang et al. 2025, https://arxiv.org/abs/2410.17146, after ``LiNeS_scaling`` in
  ``src/eval/eval.py`` of https://github.com/wang-kee/LiNeS (block ``l`` = the first ``.{i}.``,
  ``i = 0..L-1``, found in the key; others scaled by ``alpha``) with the multi-task
  ``alpha = |sum_t tau_t|_1 / (T |tau_m|_1)`` (their ``norm_summed_tvs / norm_mtv / num_tasks``).

These are benchmark baselines (no asymvlm import, so a subprocess running one measures only
torch + the algorithm); asymvlm's own implementation is ``asymvlm.merging.spectral``.

Example:
    >>> import torch
    >>> naive_iso_c([{"w": torch.diag(torch.tensor([3.0, 1.0]))}])["w"].tolist()
    [[2.0, 0.0], [0.0, 2.0]]
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["NAIVE", "naive_fisher", "naive_iso_c", "naive_iso_cts", "naive_lines", "naive_tsv_m", "run_naive"]

Params = dict[str, torch.Tensor]


RETRIES: list[str] = []  # the SVDs that failed in float32 (printed by the bench)


def _svd(m: torch.Tensor):
    try:
        return torch.linalg.svd(m.float(), full_matrices=False)
    except torch.linalg.LinAlgError:  # the authors' float32 SVD fails to converge here: redo it in float64
        RETRIES.append(f"{tuple(m.shape)}")  # (so the comparison exists; the authors' code would stop)
        u, s, v = torch.linalg.svd(m.double(), full_matrices=False)
        return u.float(), s.float(), v.float()


def _running_mean(tvs: list[Params], key: str) -> torch.Tensor:
    """The authors' average of a non-matrix key: ``new += (vec - new) / (i + 1)``."""
    out = tvs[0][key].clone()
    for i, tv in enumerate(tvs[1:], 1):
        out += (tv[key] - out) / (i + 1)
    return out


@torch.no_grad()
def naive_iso_c(tvs: list[Params]) -> Params:
    """Iso-C: per 2-D key the SVD of the summed task matrices with every singular value replaced
    by their mean (``iso_c`` of the authors' code); other keys averaged."""
    new = {}
    for key in tvs[0]:
        ts = [tv[key] for tv in tvs]
        new[key] = sum(ts) / len(ts)
        if new[key].dim() == 2:
            new[key] *= len(ts)
            u, s, v = _svd(new[key])
            s_mean = torch.ones_like(s) * s.mean()
            new[key] = torch.linalg.multi_dot((u, torch.diag(s_mean), v))
    return new


def _iso_cts_matrix(ws: list[torch.Tensor], common: float) -> torch.Tensor:
    """One 2-D key of Iso-CTS (``iso_cts`` of the authors' code)."""
    tasks, r = len(ws), min(ws[0].shape)
    combined = sum(ws)
    k = int(r * common)  # the common-space size, rounded so the rest divides among the tasks
    k = r - round((r - k) / tasks) * tasks
    u, s, v = _svd(combined)
    cu, cs, cv = u[:, :k], s[:k], v[:k, :]
    n = int((r - k) / tasks)  # per-task dimensions
    for i, w in enumerate(ws):
        w_ts = w - cu @ cu.T @ w  # off the common subspace
        ut, st, vt = _svd(w_ts)
        if i == 0:
            all_u, all_s, all_v = torch.zeros_like(ut), torch.zeros_like(st), torch.zeros_like(vt)
        all_u[:, i * n : (i + 1) * n] = ut[:, :n]
        all_s[i * n : (i + 1) * n] = st[:n]
        all_v[i * n : (i + 1) * n, :] = vt[:n, :]
    all_u[:, tasks * n : tasks * n + k] = cu
    all_s[tasks * n : tasks * n + k] = cs
    all_v[tasks * n : tasks * n + k, :] = cv
    pu, _, qu = _svd(all_u)  # orthogonalise: polar factors P Q^T
    pv, _, qv = _svd(all_v)
    all_u, all_v = pu @ qu, pv @ qv
    all_s = torch.ones_like(all_s) * all_s.mean()
    return torch.linalg.multi_dot((all_u, torch.diag(all_s), all_v))


@torch.no_grad()
def naive_iso_cts(tvs: list[Params], common: float = 0.8) -> Params:
    """Iso-CTS: the common subspace (top ``k`` of the sum's SVD) plus each task's top ``(r - k)/T``
    directions off it, orthonormalised by polar factors, all singular values -> their mean."""
    new = {}
    for key in tvs[0]:
        if tvs[0][key].dim() != 2:
            new[key] = _running_mean(tvs, key)
        else:
            new[key] = _iso_cts_matrix([tv[key] for tv in tvs], common)
    return new


@torch.no_grad()
def naive_tsv_m(tvs: list[Params]) -> Params:
    """TSV-M: per task the top ``int(r/T)`` singular triplets written into zero buffers, the stacked
    U and V replaced by their polar factors, merged ``polar(U) diag(S) polar(V)``."""
    reduction = 1 / len(tvs)
    new = {}
    for key in tvs[0]:
        if tvs[0][key].dim() != 2:
            new[key] = _running_mean(tvs, key)
            continue
        for i, tv in enumerate(tvs):
            u, s, v = _svd(tv[key])
            if i == 0:
                sum_u, sum_s, sum_v = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(v)
            n = int(s.shape[0] * reduction)
            sum_u[:, i * n : (i + 1) * n] = u[:, :n]
            sum_s[i * n : (i + 1) * n] = s[:n]
            sum_v[i * n : (i + 1) * n, :] = v[:n, :]
        u_u, _, v_u = _svd(sum_u)
        u_v, _, v_v = _svd(sum_v)
        new[key] = torch.linalg.multi_dot((u_u, v_u, torch.diag(sum_s), u_v, v_v))
    return new


@torch.no_grad()
def naive_fisher(tvs: list[Params], fishers: list[Params], floor: float = 1e-6) -> Params:
    """Fisher-weighted averaging, every coefficient 1: per key ``sum_t F'_t tau_t / sum_t F'_t`` with
    ``F'_t = max(F_t, floor * m)``, ``m`` the mean over the tensor of ``sum_t F_t / T`` (float64,
    returned in the task vectors' dtype)."""
    new = {}
    for key in tvs[0]:
        diags = [f[key].double() for f in fishers]
        m = float(sum(diags).mean()) / len(diags)
        lhs, rhs = [], []
        for tv, diag in zip(tvs, diags):
            diag = torch.clamp(diag, min=floor * m)  # the authors' tf.maximum(diag, fisher_floor)
            lhs.append(diag)
            rhs.append(diag * tv[key].double())
        new[key] = (sum(rhs) / sum(lhs)).to(tvs[0][key].dtype)
    return new


@torch.no_grad()
def naive_lines(tvs: list[Params], beta: float = 0.5, num_blocks: int = 12) -> Params:
    """Task arithmetic (the sum, lam 1) followed by LiNeS: ``alpha + beta * l / (L - 1)`` for the
    keys of block ``l``, ``alpha`` for the others, ``alpha = |sum|_1 / (T |merged|_1)`` (float64 norms)."""
    merged = {key: sum(tv[key] for tv in tvs) for key in tvs[0]}
    norm_summed = sum(float(v.double().abs().sum()) for v in merged.values())
    norm_mtv = norm_summed  # task arithmetic: the merged task vector is the sum
    alpha = norm_summed / norm_mtv / len(tvs)
    key_blocks = [f".{i}." for i in range(num_blocks)]
    scalings = {}
    for k in merged:
        for layer, block in enumerate(key_blocks):
            if block in k:
                # the authors divide by L - 1; with one block asymvlm (and this reference) scale it by alpha + beta
                scalings[k] = alpha + beta * (layer / (num_blocks - 1) if num_blocks > 1 else 1.0)
                break
    return {k: v * scalings.get(k, alpha) for k, v in merged.items()}


NAIVE = {
    "iso_c": naive_iso_c,
    "iso_cts": naive_iso_cts,
    "tsv_m": naive_tsv_m,
    "fisher": naive_fisher,
    "lines": naive_lines,
}


def run_naive(
    name: str, base_path: Path, vector_files: list[Path], out: Path, fisher_files: list[Path] | None = None, **options
) -> None:
    """Load every task vector (and, for ``fisher``, every Fisher), merge with ``NAIVE[name]`` (lam 1,
    ``options`` passed on) and save ``base + merged``."""
    tvs = [load_file(str(f)) for f in vector_files]
    if fisher_files is not None:
        options["fishers"] = [load_file(str(f)) for f in fisher_files]
    delta = NAIVE[name](tvs, **options)
    base = load_file(str(base_path))
    save_file({k: base[k] + delta[k].to(base[k].dtype) for k in base}, str(out))
    if RETRIES:
        print(f"  {name}: the authors' float32 SVD failed to converge on {len(RETRIES)} matrices {RETRIES[:3]}; "
              "redone in float64", flush=True)  # fmt: skip
