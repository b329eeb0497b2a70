"""Exact top-k over a low-precision copy of a gallery: a certified bfloat16 scan, then exact re-scoring.

A text -> image query over N x d unit vectors reads the whole gallery once; on a CPU that pass is
bound by memory bandwidth (one query) or by the GEMM (a batch). A bfloat16 copy halves the bytes
of a float32 (or float16) gallery and runs the batched GEMM on the CPU's bf16 units; float16 on a
CPU is the slow choice (torch's fp16 GEMV and fp16 -> fp32 conversion run at ~2 and ~0.7 GB/s
here against bf16's ~11+ GB/s: the design notes' measured traps).

The scan is approximate, the answer is not. For a query ``q`` and a row ``x`` with exact score
``s = q . x``, the scan's ``s~`` (inputs rounded to bf16, products accumulated in float32, the
result rounded to bf16) satisfies the standard floating-point bound (Higham, *Accuracy and
Stability of Numerical Algorithms*, 2nd ed., 2002, eq. 3.5 for the dot product, plus one rounding
of each input and of the output)::

    |s~ - s| <= eps = ((1 + u_q)(1 + u_x)(1 + gamma_2d)(1 + u_out) - 1) * |q| * max_j |x_j|

with ``u = 2^-8`` for each rounding to bfloat16 (``u_x = 0`` when the gallery already is bf16)
and ``gamma_n = n 2^-24 / (1 - n 2^-24)`` for the float32 accumulation (``2d`` leaves room for a
kernel that adds pairs of products before accumulating). If the k-th best scanned score is
``t~``, every member of the exact top-k has ``s~ >= t~ - 2 eps`` (at least k rows have
``s >= t~ - eps``, and each member has ``s~ >= s - eps``). So the scan keeps only the rows with
``s~ >= t~ - 2 eps`` against a *running* ``t~`` (rows below it are discarded as they are scored:
no (Q, N) matrix, no per-row top-k of each chunk after the first), and those candidates are
re-scored in float64 from the gallery as stored: the ids are the exact top-k of the stored
vectors. A block whose candidates outnumber ``max_candidates`` (a gallery of near-duplicates:
everything is within the window) is scored by the exact float32 path instead.

The retrieval distribution's normaliser and entropy (:class:`~asymvlm.topk.OnlineSoftmax`) are
accumulated from the scanned scores (in float32) and then corrected with the candidates' exact
scores: the mass that decides the posterior (the rows near the top) is exact, and every other
row's logit is off by at most ``kappa * eps`` before averaging (measured in ``bench/limits.py``).
``scan_dtype="float32"`` on the index keeps the single exact float32 pass.

Example:
    >>> import torch
    >>> g = torch.nn.functional.normalize(torch.randn(5000, 64, generator=torch.Generator().manual_seed(0)), dim=1)
    >>> q = g[:3] + 0.01
    >>> idx, _ = scan_topk(q, g, g.bfloat16(), k=5, chunk_size=1024)
    >>> exact = (q.double() @ g.double().T).topk(5, dim=1).indices
    >>> bool((idx == exact).all())
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from asymvlm.topk import OnlineSoftmax

__all__ = [
    "scan_error_factor",
    "scan_topk",
    "bf16_copy",
    "int8_copy",
    "int8_window",
    "Int8Scan",
    "stored_max_norm",
    "SCAN_DTYPES",
]

SCAN_DTYPES = ("auto", "bfloat16", "int8", "float32")

_U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits), round to nearest


def scan_error_factor(dim: int, storage: torch.dtype, scan: torch.dtype = torch.bfloat16) -> float:
    """The factor ``f`` of the scan's error bound ``|s~ - s| <= f |q| max|x|`` (module docstring).

    Example:
        >>> round(scan_error_factor(512, torch.float16), 5)
        0.01183
    """
    if scan != torch.bfloat16:
        raise ValueError(f"scan dtype {scan} has no error bound here (only bfloat16 scans are certified)")
    n = 2 * dim * 2.0**-24
    gamma = n / (1.0 - n)
    u_x = 0.0 if storage == torch.bfloat16 else _U_BF16
    return (1 + _U_BF16) * (1 + u_x) * (1 + gamma) * (1 + _U_BF16) - 1.0


def _below(t: Tensor) -> Tensor:
    """A bf16 tensor whose every value is <= ``t`` (float32): ``t`` lowered by a bf16 ulp, then rounded."""
    return (t - t.abs() * 2.0**-7 - 1e-30).to(torch.bfloat16)


def _hits(scores: Tensor, thr: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(rows, cols, float32 values) of the entries of ``scores`` (B, c) bf16 at or above ``thr`` (B,),
    row-major. NumPy's flatnonzero: torch's CPU nonzero measured 4-14x slower here."""
    tb = _below(thr).unsqueeze(1)  # (B, 1) bf16: compared bf16 to bf16, no per-element promotion
    if bool((tb.view(torch.int16) >= 0).all()):  # thresholds >= +0: a positive bf16's bits order as int16,
        mask = scores.view(torch.int16) >= tb.view(torch.int16)  # a negative's are below; 1.9x faster
    else:
        mask = scores >= tb
    flat = (
        torch.from_numpy(np.flatnonzero(mask.numpy())) if mask.device.type == "cpu" else mask.view(-1).nonzero()[:, 0]
    )
    c = scores.shape[1]
    return flat // c, flat % c, scores.reshape(-1)[flat].float()


def _slots(rows: Tensor, nrows: int) -> tuple[Tensor, int]:
    """Each entry's slot within its row (``rows`` sorted) and the widest row's count: the entries of
    each row side by side in a (nrows, width) grid, ``grid[rows, slots] = values``."""
    counts = torch.bincount(rows, minlength=nrows)
    start = torch.cumsum(counts, 0) - counts
    return torch.arange(rows.numel(), device=rows.device) - start[rows], int(counts.max())


def _grid(rows: Tensor, slots: Tensor, shape: tuple[int, int], values: Tensor, fill: float) -> Tensor:
    """The (nrows, width) grid of :func:`_slots` holding ``values``, ``fill`` where a row has fewer."""
    out = torch.full((shape[0], max(shape[1], 1)), fill, dtype=values.dtype, device=values.device)
    out[rows, slots] = values
    return out


def _merge_top(best: Tensor, rows: Tensor, vals: Tensor, k: int) -> Tensor:
    """The (B, k) running top-k values ``best`` with the extra ``vals`` of rows ``rows`` (sorted)."""
    slots, width = _slots(rows, best.shape[0])
    if width == 0:
        return best
    pad = _grid(rows, slots, (best.shape[0], width), vals, -math.inf)
    return torch.cat([best, pad], dim=1).topk(k, dim=1).values


class _Block:
    """The scan of one block of queries: running top-k values, candidates, and the distribution."""

    def __init__(self, xq: Tensor, eps2: Tensor, k: int, logits: Callable[[Tensor], Tensor] | None):
        self.xq = xq.to(torch.bfloat16)  # (B, d)
        self.eps2 = eps2  # (B,) float32: the window 2 eps of each query
        self.k = k
        self.best = torch.full((xq.shape[0], 0), -math.inf)  # (B, <=k) scanned values, best first
        self.rows: list[Tensor] = []
        self.cols: list[Tensor] = []
        self.vals: list[Tensor] = []
        self.count = 0
        self.logits = logits
        self.acc = OnlineSoftmax(xq.shape[0]) if logits is not None else None

    def threshold(self) -> Tensor:
        return self.best[:, -1] - self.eps2

    def add(self, scores: Tensor, start: int, f32: Tensor | None) -> None:
        """One chunk of scanned scores (B, c) bf16 starting at gallery row ``start``."""
        if self.best.shape[1] < self.k:  # the first chunk(s): a top-k starts the running threshold
            v = scores.float().topk(min(self.k, scores.shape[1]), dim=1).values
            self.best = (
                torch.cat([self.best, v], dim=1).topk(min(self.k, self.best.shape[1] + v.shape[1]), dim=1).values
            )
            thr = self.threshold() if self.best.shape[1] == self.k else torch.full_like(self.best[:, 0], -math.inf)
            rows, cols, vals = _hits(scores, thr)
        else:
            rows, cols, vals = _hits(scores, self.threshold())
            self.best = _merge_top(self.best, rows, vals, self.k)
        if rows.numel():
            self.rows.append(rows)
            self.cols.append(cols + start)
            self.vals.append(vals)
            self.count += rows.numel()
        if self.acc is not None:  # the distribution over every row, from the scanned scores
            f32.copy_(scores)
            self.acc.update(self.logits(f32), scratch=True)

    def candidates(self) -> tuple[Tensor, Tensor, Tensor]:
        """(rows, cols, scanned values) of the final window ``s~ >= t~ - 2 eps``."""
        rows, cols, vals = torch.cat(self.rows), torch.cat(self.cols), torch.cat(self.vals)
        keep = vals >= self.threshold()[rows]
        rows, cols, vals = rows[keep], cols[keep], vals[keep]
        order = torch.argsort(rows, stable=True)  # grouped by query (the chunks came one after another)
        return rows[order], cols[order], vals[order]


def _exact_scores(q: Tensor, stored: Tensor, rows: Tensor, cols: Tensor, step: int = 65536) -> Tensor:
    """float64 ``q[rows] . stored[cols]`` in pieces (the gallery as stored, e.g. memory-mapped float16)."""
    out = torch.empty(rows.numel(), dtype=torch.float64)
    qd = q.double()
    for s in range(0, rows.numel(), step):
        x = stored[cols[s : s + step]].double()
        out[s : s + step] = (qd[rows[s : s + step]] * x).sum(dim=1)
    return out


def _correct(acc: OnlineSoftmax, rows: Tensor, approx: Tensor, exact: Tensor) -> None:
    """Swap the candidates' scanned logits for their exact ones in the accumulated sums (float64)."""
    m = acc.m.clone().scatter_reduce_(0, rows, exact, "amax")  # the new maximum, at least the old one
    shift = acc.m - m  # <= 0
    scale = torch.exp(shift)
    s = scale * acc.s
    t = scale * (acc.t + shift * acc.s)
    za, ze = approx - m[rows], exact - m[rows]
    wa, we = torch.exp(za), torch.exp(ze)
    # the rest (the non-candidates): what is left when the candidates' scanned terms are taken out;
    # its rounding is relative to the whole sum, which the exact candidates then dominate
    rest_s = (s - torch.zeros_like(s).index_add_(0, rows, wa)).clamp_min(0.0)
    rest_t = (t - torch.zeros_like(t).index_add_(0, rows, wa * za)).clamp_max(0.0)
    acc.s = rest_s.index_add_(0, rows, we)
    acc.t = rest_t.index_add_(0, rows, we * ze)
    acc.m = m


def scan_topk(
    queries: Tensor,
    stored: Tensor,
    scan: Tensor | Int8Scan,
    k: int,
    chunk_size: int,
    *,
    max_norm: float | None = None,
    query_block: int = 1024,
    logits: Callable[[slice, Tensor], Tensor] | None = None,
    max_candidates: int = 1 << 22,
    fallback: Callable[[slice], tuple[Tensor, OnlineSoftmax | None]] | None = None,
) -> tuple[Tensor, OnlineSoftmax | None]:
    """The exact top-k rows of ``stored`` (N, d) by ``queries`` (Q, d) inner product, scanning the
    bf16 copy ``scan`` (module docstring); ``(indices (Q, k), stats or None)``.

    Args:
        queries: (Q, d) float32 (or float64) query vectors.
        stored: (N, d) the gallery as stored: the candidates are re-scored from it in float64.
        scan: (N, d) bfloat16 copy of ``stored`` (the same tensor when it is bf16 already), or its
            :class:`Int8Scan` (:func:`int8_window`'s bound instead of :func:`scan_error_factor`'s).
        k: results per query.
        chunk_size: gallery rows scored per GEMM.
        max_norm: the largest row norm of ``stored`` (computed, one pass, when not given).
        query_block: queries scored at once.
        logits: ``logits(rows, cos)`` the retrieval distribution's unnormalised log-density from a
            chunk's (B, c) float32 cosines (may work in place); with it the distribution's
            statistics come back (exact at the candidates, module docstring).
        max_candidates: a block with more candidates than this is handed to ``fallback(rows)``.
        fallback: the exact path for a block of queries, ``(indices, stats)``.
    """
    n = stored.shape[0]
    int8 = isinstance(scan, Int8Scan)
    factor = 0.0 if int8 else scan_error_factor(stored.shape[1], stored.dtype)
    if max_norm is None:
        max_norm = scan.max_norm if int8 else float(stored_max_norm(stored))
    indices, stats = [], []
    block = min(query_block, queries.shape[0])
    f32 = torch.empty(block * min(chunk_size, n)) if logits is not None else None
    for s in range(0, queries.shape[0], block):
        xq = queries[s : s + block].float()
        rows_of = slice(s, s + xq.shape[0])
        if int8:
            eps2 = int8_window(xq, scan)
        else:
            eps2 = 2.0 * factor * max_norm * xq.double().norm(dim=1).float() * (1 + 2.0**-20)
        fn = None if logits is None else (lambda sc, r=rows_of: logits(r, sc))
        blk = _Block(xq, eps2, k, fn)
        overflow = False
        for a in range(0, n, chunk_size):
            e = min(n, a + chunk_size)
            if int8:  # (B, c) bf16 either way
                sc = torch._weight_int8pack_mm(blk.xq, scan.values[a:e], scan.scales[a:e])
            else:
                sc = torch.mm(blk.xq, scan[a:e].T)
            blk.add(sc, a, None if f32 is None else f32[: xq.shape[0] * (e - a)].view(xq.shape[0], e - a))
            if blk.count > max_candidates and fallback is not None:
                overflow = True
                break
        if overflow:
            idx, st = fallback(rows_of)
            indices.append(idx)
            stats.append(st)
            continue
        rows, cols, vals = blk.candidates()
        exact = _exact_scores(xq, stored, rows, cols)
        slots, width = _slots(rows, xq.shape[0])
        shape = (xq.shape[0], width)  # each query's candidates side by side
        best = _grid(rows, slots, shape, exact, -math.inf).topk(k, dim=1).indices
        indices.append(_grid(rows, slots, shape, cols, 0).gather(1, best))
        if blk.acc is not None:  # the candidates' logits, scanned and exact, through the block's logits map
            scanned, exact_logits = (
                logits(rows_of, _grid(rows, slots, shape, c.double(), 0.0))[rows, slots] for c in (vals, exact)
            )
            _correct(blk.acc, rows, scanned, exact_logits)
            stats.append(blk.acc)
    return torch.cat(indices), (OnlineSoftmax.cat(stats) if logits is not None else None)


def bf16_copy(stored: Tensor, step: int = 1 << 16) -> tuple[Tensor, float]:
    """``(bf16 copy, largest row norm)`` of ``stored`` in one pass (a bf16 gallery is not copied).

    Example:
        >>> copy, top = bf16_copy(torch.eye(3, dtype=torch.float16))
        >>> copy.dtype, top
        (torch.bfloat16, 1.0)
    """
    if stored.dtype == torch.bfloat16:
        return stored, float(stored_max_norm(stored))
    copy = torch.empty(stored.shape, dtype=torch.bfloat16, device=stored.device)
    top = 0.0
    for s in range(0, stored.shape[0], step):
        part = stored[s : s + step].float()
        top = max(top, float(part.double().norm(dim=1).max()))
        copy[s : s + part.shape[0]] = part
    return copy, top


@dataclass(frozen=True)
class Int8Scan:
    """A per-row int8 copy of a gallery: row ``j`` is ``values[j] * scales[j]``, each element within
    ``scales[j] / 2`` of the stored one (round to nearest; the bf16 scales are rounded up so that
    ``|values| <= 127``). Half the bytes of bf16: one query reads it at the same rate
    (``torch._weight_int8pack_mm``, the weight-only int8 GEMV of LLM decoding), in half the time."""

    values: Tensor  # (N, d) int8
    scales: Tensor  # (N,) bf16
    max_scale: float
    max_norm: float


def int8_copy(stored: Tensor, step: int = 1 << 16) -> Int8Scan:
    """The :class:`Int8Scan` of ``stored`` (N, d) in one pass (CPU).

    Example:
        >>> x = torch.nn.functional.normalize(torch.randn(100, 16, generator=torch.Generator().manual_seed(0)), dim=1)
        >>> c = int8_copy(x)
        >>> scale = c.scales.float().unsqueeze(1)
        >>> bool(((c.values.float() * scale - x).abs() <= scale / 2 + 1e-6).all())
        True
    """
    values = torch.empty(stored.shape, dtype=torch.int8)
    scales = torch.empty(stored.shape[0], dtype=torch.bfloat16)
    top_scale, top_norm = 0.0, 0.0
    for s in range(0, stored.shape[0], step):
        part = stored[s : s + step].float()
        amax = part.abs().amax(dim=1)
        # rounded up: bf16(y) >= y (1 - 2^-8), so y = amax/127 (1 + 2^-7) keeps |x / scale| <= 127
        sc = torch.where(amax > 0, amax / 127.0 * (1 + 2.0**-7), 1.0).to(torch.bfloat16)
        values[s : s + part.shape[0]] = torch.round(part / sc.float().unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
        scales[s : s + part.shape[0]] = sc
        top_scale = max(top_scale, float(sc.float().max()))
        top_norm = max(top_norm, float(part.double().norm(dim=1).max()))
    return Int8Scan(values, scales, top_scale, top_norm)


def int8_window(q: Tensor, scan: Int8Scan) -> Tensor:
    """(Q,) ``2 eps`` of each query over an :class:`Int8Scan`: the int8 kernel multiplies the bf16
    query by the int8 row exactly in float32, sums in float32, scales in float32 and rounds to bf16,
    so ``|s~ - s| <= E2 + u (|q| R + E2)`` with ``E2 = E1 + (gamma_2d + 2^-24) 1.01 M``,
    ``E1 = u |q| R' + |q|_1 S (1/2 + 1e-5)``, ``M = (1 + u) |q| R'``, ``R' = R + sqrt(d) S / 2``
    (``S`` the largest scale, ``R`` the largest row norm; the ``1e-5`` covers the float32 division
    before rounding to an integer). Same derivation as :func:`scan_error_factor`, Higham (2002)."""
    d = q.shape[1]
    qd = q.double()
    qn, q1 = qd.norm(dim=1), qd.abs().sum(dim=1)
    n = 2 * d * 2.0**-24
    gamma = n / (1 - n)
    r2 = scan.max_norm + math.sqrt(d) * scan.max_scale / 2 * (1 + 2e-5)
    e1 = _U_BF16 * qn * r2 + q1 * scan.max_scale * (0.5 + 1e-5)
    e2 = e1 + (gamma + 2.0**-24) * 1.01 * (1 + _U_BF16) * qn * r2
    return (2.0 * (e2 + _U_BF16 * (qn * scan.max_norm + e2)) * (1 + 2.0**-20)).float()


def stored_max_norm(stored: Tensor, step: int = 1 << 16) -> Tensor:
    """The largest row norm of ``stored`` (float64), in pieces."""
    best = torch.zeros((), dtype=torch.float64)
    for s in range(0, stored.shape[0], step):
        best = torch.maximum(best, stored[s : s + step].double().norm(dim=1).max())
    return best
