"""Log-space modified Bessel functions and the von Mises–Fisher normaliser.

AsymVLM works at CLIP dimensions (d = 512 ... 1152) where the vMF normaliser

    C_d(kappa) = kappa^(d/2 - 1) / ((2 pi)^(d/2) I_{d/2-1}(kappa))

cannot be evaluated through ``scipy.special.ive``: ``ive(255, 10.0)`` underflows to 0 in
float64. Everything here is therefore computed in log space from three exact pieces:

* the power series of the *normalised* Bessel function
  ``F_v(x) = Gamma(v+1) (x/2)^(-v) I_v(x) = 0F1(; v+1; x^2/4)`` (DLMF 10.25.2) for
  ``x <= 2 sqrt(v+1)``, where every term is positive and the series converges like ``1/k!``;
* the uniform asymptotic (Debye) expansion of ``I_v(v z)`` (DLMF 10.41.3, polynomials
  ``u_k`` from the recurrence DLMF 10.41.9) for orders ``v >= 50``, uniformly valid in ``z``;
* for orders ``v < 50`` outside the series region: the Debye value at ``V = v + m >= 50`` and
  the backward recurrence of ratios ``r_{k-1} = 1 / (2k/x + r_k)`` (DLMF 10.29.1), which is
  stable because ``I_v`` is the minimal solution of the recurrence as the order grows.

The vMF functions with one python ``dim >= 102`` (order ``v >= 50``: every CLIP dimension) take
a fast path: the Debye expansion alone (uniform in ``x`` from 0 to infinity), its coefficients
folded with the order once, ``A_d`` from the same pass saved for backward; no branch over ``x``.

All arithmetic runs in float64 (float32 for the small polynomial corrections of float32 inputs)
and the result is cast back to the input dtype, so float32 (and float16/bfloat16) inputs get
correctly rounded values. Gradients with respect to ``x`` are
analytic (``d/dx log I_v(x) = I_{v+1}(x)/I_v(x) + v/x``; ``d/dx r_v = 1 - r_v^2 - (2v+1) r_v/x``)
and differentiable again, so second derivatives work too. The order is not differentiable.

Example:
    >>> import torch
    >>> from asymvlm.special import vmf_log_normalizer, bessel_ratio
    >>> kappa = torch.tensor([0.0, 10.0, 500.0], dtype=torch.float64)
    >>> vmf_log_normalizer(512, kappa).shape
    torch.Size([3])
    >>> float(bessel_ratio(512, torch.tensor(0.0)))
    0.0
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction
from numbers import Real

import torch
from torch import Tensor

from asymvlm.errors import InputError

__all__ = [
    "log_bessel_iv",
    "bessel_ratio",
    "bessel_iv_ratio",
    "vmf_log_normalizer",
    "vmf_log_normalizer_approx",
    "log_sphere_area",
    "vmf_log_density_ratio_at_mode",
]

# Orders at or above this use the Debye expansion directly; lower orders are shifted up to it.
# With _DEBYE_TERMS terms the truncation error at v = 50 is ~1e-17 (max_t |l_11(t)| / 50^11;
# measured against mpmath at 50 digits, see tests/core/test_special.py).
_DEBYE_MIN_ORDER = 50.0
_DEBYE_TERMS = 10
# Terms of the power series of F_v(x); with x^2/4 <= v+1 the k-th term is <= 1/k!.
_SERIES_TERMS = 22
# Fast path (one order for a whole tensor): truncation target in log F for float64 inputs and
# for the others, and the chunk length that keeps its float64 temporaries in cache.
_FAST_TOL = {True: 2e-17, False: 1e-9}
_FAST_CHUNK = 1 << 16


# --------------------------------------------------------------------------------------------
# Debye polynomials u_k(t), DLMF 10.41.9:
#   u_{k+1}(t) = t^2 (1 - t^2) u_k'(t) / 2 + (1/8) int_0^t (1 - 5 s^2) u_k(s) ds
# computed once, exactly, with rational arithmetic; and those of log U = sum_k l_k(t) / v^k.
# --------------------------------------------------------------------------------------------
@functools.cache
def _debye_fractions(n_terms: int) -> tuple[tuple[Fraction, ...], ...]:
    """Exact coefficients (ascending powers of t) of u_0 ... u_{n_terms}."""
    polys: list[list[Fraction]] = [[Fraction(1)]]
    for _ in range(n_terms):
        u = polys[-1]
        deriv = [i * c for i, c in enumerate(u)][1:]  # u'(t)
        nxt = [Fraction(0)] * (len(u) + 3)
        # t^2 (1 - t^2) u'(t) / 2
        for i, c in enumerate(deriv):
            nxt[i + 2] += c / 2
            nxt[i + 4] -= c / 2
        # (1/8) * integral of (1 - 5 s^2) u(s) from 0 to t
        for i, c in enumerate(u):
            nxt[i + 1] += c / (8 * (i + 1))
            nxt[i + 3] -= 5 * c / (8 * (i + 3))
        while len(nxt) > 1 and nxt[-1] == 0:
            nxt.pop()
        polys.append(nxt)
    return tuple(tuple(p) for p in polys)


@functools.cache
def _debye_polynomials(n_terms: int) -> tuple[tuple[float, ...], ...]:
    """Coefficients (ascending powers of t) of u_0 ... u_{n_terms}, as floats."""
    return tuple(tuple(float(c) for c in p) for p in _debye_fractions(n_terms))


@functools.cache
def _log_debye_polynomials() -> tuple[tuple[tuple[Fraction, ...], ...], tuple[float, ...]]:
    """l_0 = 0, l_1 ... l_K with log(sum_k u_k(t) e^k) = sum_k l_k(t) e^k, and max_{0<=t<=1} |l_k(t)|.

    Exact, from U L' = U' in e: k u_k = sum_{j=1}^k j l_j u_{k-j}; l_k has degree 3k.
    """
    u = _debye_fractions(_DEBYE_TERMS)
    logs: list[list[Fraction]] = [[Fraction(0)]]
    for k in range(1, _DEBYE_TERMS + 1):
        acc = list(u[k]) + [Fraction(0)] * (3 * k + 1 - len(u[k]))
        for j in range(1, k):
            for a, cj in enumerate(logs[j]):
                for b, cu in enumerate(u[k - j]):
                    acc[a + b] -= Fraction(j, k) * cj * cu
        logs.append(acc)
    t = torch.linspace(0, 1, 4001, dtype=torch.float64)
    bounds = tuple(float(sum(float(c) * t**j for j, c in enumerate(p)).abs().max()) for p in logs)
    return tuple(tuple(p) for p in logs), bounds


# --------------------------------------------------------------------------------------------
# The uniform asymptotic (Debye) expansion of I_v(v z) (DLMF 10.41.3; F. W. J. Olver, "The
# asymptotic expansion of Bessel functions of large order", Phil. Trans. R. Soc. A 247, 1954):
#   log I_v(v z) = v eta - log(2 pi v)/2 - log(w)/2 + log U,   U = sum_k u_k(t) / v^k,
# with z = x/v, w = sqrt(1 + z^2), t = 1/w, eta = w + log(z / (1 + w)). The v log z terms cancel
# against v log(x/2) in log F_v = log I_v - v log(x/2) + lgamma(v+1), and with log U = L(t) =
# sum_k l_k(t)/v^k the constant lgamma(v+1) - (v log v - v + log(2 pi v)/2) is -L(1) (at t = 1
# the expansion is Stirling's series: l_1(1) = -1/12, l_3(1) = 1/360, ...), so
#
#   log F_v(x) = v (wm1 - log1p(wm1/2)) - log1p(wm1)/2 + L(t) - L(1),   wm1 = w - 1 = z^2/(1 + w),
#
# which is exact for small z, 0 at x = 0, and uniform in z: for v >= 50 it alone is accurate to
# float64 for all x >= 0 (its truncation error is largest at t = 1). Differentiating in x gives
# the ratio (r_v = d/dx log F_v) with no cancellation for small or large z:
#
#   r_v(x) = z / (1 + w) - (z t^2 / v) (1/2 + t L'(t)).
# --------------------------------------------------------------------------------------------
@functools.cache
def _log_debye_matrices(device: torch.device) -> tuple[Tensor, Tensor]:
    """float64 (3K+1, K) matrices whose column k-1 holds the coefficients of l_k(t), t l_k'(t)."""
    logs = _log_debye_polynomials()[0]
    lmat = torch.zeros(3 * _DEBYE_TERMS + 1, _DEBYE_TERMS, dtype=torch.float64)
    for k in range(1, _DEBYE_TERMS + 1):
        lmat[: len(logs[k]), k - 1] = torch.tensor([float(c) for c in logs[k]], dtype=torch.float64)
    dmat = lmat * torch.arange(3 * _DEBYE_TERMS + 1, dtype=torch.float64)[:, None]
    return lmat.to(device), dmat.to(device)


def _debye(v: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(log F_v(x), r_v(x)) from the Debye expansion above, orders v >= 50 element-wise."""
    lmat, dmat = _log_debye_matrices(x.device)
    z = x / v
    w = torch.hypot(torch.ones_like(z), z)
    zw = z / (1 + w)
    wm1 = z * zw
    t = 1 / w
    t_pow = t.unsqueeze(-1) ** torch.arange(lmat.shape[0], dtype=torch.float64, device=x.device)  # (..., 3K+1)
    inv_v = v.unsqueeze(-1) ** -torch.arange(1, _DEBYE_TERMS + 1, dtype=torch.float64, device=x.device)  # (..., K)
    big_l = ((t_pow @ lmat - lmat.sum(0)) * inv_v).sum(-1)  # L(t) - L(1)
    t_dl = ((t_pow @ dmat) * inv_v).sum(-1)  # t L'(t)
    log_f = v * (wm1 - torch.log1p(0.5 * wm1)) - 0.5 * torch.log1p(wm1) + big_l
    return log_f, zw - z * t * t * (0.5 + t_dl) / v


def _log_f_series(v: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """log F_v(x) and log F_{v+1}(x) from the power series (DLMF 10.25.2), x^2/4 <= v+1.

    Term k of F_v is prod_{j<=k} (x^2/4) / (j (v + j)) <= 1/k!, all positive.
    """
    j = torch.arange(1, _SERIES_TERMS + 1, dtype=torch.float64, device=x.device)
    q = (0.25 * x * x).unsqueeze(-1)  # (..., 1)
    vv = v.unsqueeze(-1)
    terms_v = torch.cumprod(q / (j * (vv + j)), dim=-1)  # (..., K)
    terms_v1 = torch.cumprod(q / (j * (vv + 1 + j)), dim=-1)
    return torch.log1p(terms_v.sum(-1)), torch.log1p(terms_v1.sum(-1))


def _core(v: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(log F_v(x), r_v(x) = I_{v+1}(x)/I_v(x)) in float64 for v >= 0, x >= 0 (broadcast)."""
    # number of recurrence steps, from the (small, un-broadcast) order tensor
    m_max = int(torch.clamp(torch.ceil(_DEBYE_MIN_ORDER - v), min=0.0).max()) if v.numel() else 0
    v, x = torch.broadcast_tensors(v, x)
    in_series = x * x <= 4 * (v + 1)
    infinite = torch.isinf(x)

    # Region 1: power series. Elements outside use x = 0 so nothing overflows.
    xs = torch.where(in_series, x, torch.zeros_like(x))
    log_f_s, log_f1_s = _log_f_series(v, xs)
    # r_v = (x/2) / (v+1) * F_{v+1} / F_v
    ratio_s = 0.5 * xs / (v + 1) * torch.exp(log_f1_s - log_f_s)

    # Region 2: Debye at order V = v + m >= 50 (m = 0 when v >= 50), then recur down m steps.
    m = torch.clamp(torch.ceil(_DEBYE_MIN_ORDER - v), min=0.0)
    big_v = v + m
    # Elements in the series region (or at infinity) get a harmless x: the values are dropped.
    xd = torch.where(in_series | infinite, torch.ones_like(x), x)
    log_f_big, ratio = _debye(big_v, xd)
    if m_max > 0:
        sum_log_ratio = torch.zeros_like(x)
        for j in range(m_max):
            k = big_v - j  # current ratio is r_k; produce r_{k-1}
            active = j < m
            new_ratio = 1 / (2 * k / xd + ratio)
            ratio = torch.where(active, new_ratio, ratio)
            sum_log_ratio = sum_log_ratio + torch.where(active, torch.log(new_ratio), torch.zeros_like(x))
        # log I_v = log I_V - sum_{k=v}^{V-1} log r_k, rewritten for log F:
        log_f_d = log_f_big + m * torch.log(0.5 * xd) - (torch.lgamma(big_v + 1) - torch.lgamma(v + 1)) - sum_log_ratio
    else:
        log_f_d = log_f_big

    log_f = torch.where(in_series, log_f_s, log_f_d)
    ratio = torch.where(in_series, ratio_s, ratio)
    log_f = torch.where(infinite, x, log_f)
    ratio = torch.where(infinite, torch.ones_like(ratio), ratio)
    return log_f, ratio


# --------------------------------------------------------------------------------------------
# Fast path: ONE order v >= 50 for the whole tensor (a python ``dim``), all x >= 0, no branch:
# the expansion above with the order folded into the coefficients once per (v, dtype):
#   log F_v(x) = v (wm1 - log1p(wm1/2)) - log1p(wm1)/2 - wm1 t Q(t),  Q = (L(t) - L(1))/(t - 1)
# (1 - t = wm1 t), keeping F_v(0) = 1 exactly, and r_v from M(t) = 1/2 + t L'(t), both by Horner's
# rule; the number of terms K is the least with max|l_{K+1}| / v^(K+1) < _FAST_TOL.
# --------------------------------------------------------------------------------------------
@functools.cache
def _fast_coefficients(v: float, double: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Ascending coefficients of Q(t) and M(t) (see above) for the order v >= 50."""
    logs, bounds = _log_debye_polynomials()
    n = next((k for k in range(1, _DEBYE_TERMS) if bounds[k + 1] / v ** (k + 1) < _FAST_TOL[double]), _DEBYE_TERMS)
    e = 1 / Fraction(v)
    big_l = [Fraction(0)] * (3 * n + 1)  # L(t) = sum_j big_l[j] t^j, big_l[0] = 0
    for k in range(1, n + 1):
        for j, c in enumerate(logs[k]):
            big_l[j] += c * e**k
    q = [sum(big_l[j + 1 :]) for j in range(3 * n)]  # synthetic division by (t - 1)
    m = [Fraction(1, 2)] + [j * c for j, c in enumerate(big_l)][1:]
    return tuple(float(c) for c in q), tuple(float(c) for c in m)


@functools.cache
def _fast_tensors(v: float, dtype: torch.dtype, device: torch.device) -> tuple[tuple[Tensor, ...], ...]:
    """`_fast_coefficients` as 0-dim tensors, made once per (order, dtype, device)."""
    coeffs = _fast_coefficients(v, dtype == torch.float64)
    return tuple(tuple(torch.tensor(c, dtype=dtype, device=device) for c in p) for p in coeffs)


def _horner(t: Tensor, coeffs: tuple[Tensor, ...]) -> Tensor:
    """sum_j coeffs[j] t^j by Horner's rule, one fused addcmul a step (0-dim ascending coefficients, >= 2)."""
    acc = (t * coeffs[-1]).add_(coeffs[-2])
    for c in coeffs[-3::-1]:
        acc = torch.addcmul(c, acc, t, out=acc)
    return acc


def _fast(v: float, x: Tensor, offset: float | None, need_ratio: bool, has_inf: bool):
    """(-log F_v(x) - offset or None, r_v(x) or None) for a float v >= 50 and x >= 0, in float64
    for one chunk; longer inputs go in chunks of _FAST_CHUNK into outputs of x's dtype (the float64
    temporaries of a chunk stay in cache: ~3x faster than one pass over 2^20 elements)."""
    # the polynomials are small corrections (|wm1 t Q| < 1/(12 v)): float32 suffices for float32 input
    poly_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    coeffs = _fast_tensors(v, poly_dtype, _compute_device(x))
    flat, n = x.detach().reshape(-1), x.numel()
    if n <= _FAST_CHUNK:
        outs = _fast_chunk(v, flat, coeffs, offset, need_ratio, has_inf)
    else:
        outs = [None if offset is None else torch.empty_like(flat), torch.empty_like(flat) if need_ratio else None]
        for i in range(0, n, _FAST_CHUNK):
            for o, p in zip(outs, _fast_chunk(v, flat[i : i + _FAST_CHUNK], coeffs, offset, need_ratio, has_inf)):
                if o is not None:
                    o[i : i + _FAST_CHUNK].copy_(p)
    return tuple(o if o is None else o.view(x.shape) for o in outs)


def _fast_chunk(v: float, x: Tensor, coeffs, offset: float | None, need_ratio: bool, has_inf: bool):
    """`_fast` in float64 on one flat chunk (in-place arithmetic on few temporaries)."""
    q, m = coeffs
    x64 = x.to(device=q[0].device, dtype=torch.float64)
    z = x64 * (1 / v) if x64 is x else x64.mul_(1 / v)
    w = torch.hypot(z, z.new_ones(()))  # sqrt(1 + z^2) without overflow
    zw = torch.add(w, 1.0)
    zw = torch.div(z, zw, out=zw)  # z / (1 + w), the leading term of r_v
    wm1 = z * zw  # w - 1 = z^2 / (1 + w), exact for small z
    t = w.reciprocal_()
    tp = t.to(q[0].dtype)  # the polynomials' variable
    out = ratio = None
    if offset is not None:  # -log F - offset = -v (wm1 - log1p(wm1/2)) + log1p(wm1)/2 + wm1 t Q(t) - offset
        out = wm1.mul(0.5).log1p_().sub_(wm1).mul_(v)
        out.add_(torch.log1p(wm1), alpha=0.5).addcmul_(wm1.mul_(t), _horner(tp, q))
        out = out.sub_(offset) if offset else out
    if need_ratio:  # r = z/(1+w) - (z t^2 / v) M(t)
        ratio = zw.addcmul_(_horner(tp, m).mul_(tp).mul_(tp), z, value=-1 / v)
    if has_inf:  # x = inf: log F = inf, r = 1 (the formulas give inf - inf)
        inf = torch.isinf(x64)
        out = None if out is None else out.masked_fill_(inf, -math.inf)
        ratio = None if ratio is None else ratio.masked_fill_(inf, 1.0)
    return out, ratio


# --------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------
def _compute_device(t: Tensor) -> torch.device:
    # float64 is unavailable on MPS: compute there on the CPU and move back.
    return torch.device("cpu") if t.device.type == "mps" else t.device


def _as_order(order: Tensor | Real, like: Tensor) -> Tensor:
    dev = _compute_device(like)
    if isinstance(order, Tensor):
        if order.requires_grad:
            raise InputError("log_bessel_iv is differentiable in x only; order must not require grad")
        o = order.detach().to(device=dev, dtype=torch.float64)
    else:
        o = torch.tensor(float(order), dtype=torch.float64, device=dev)
    if not torch.isfinite(o).all() or (o < 0).any():
        raise InputError(f"order must be finite and >= 0, got {order!r}")
    return o


def _checked(x: Tensor | Real, name: str) -> tuple[Tensor, bool]:
    """``x`` as a floating tensor checked ``>= 0`` (one min/max pass), and whether it may hold +inf."""
    if not isinstance(x, Tensor):
        x = torch.tensor(float(x), dtype=torch.get_default_dtype())
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    if x.numel() == 0:
        return x, False
    lo, hi = torch.stack(torch.aminmax(x.detach())).tolist()
    if not lo >= 0 and (x < 0).any():  # NaN propagates through aminmax: look element-wise then
        bad = torch.nonzero(x < 0)[0].tolist()
        raise InputError(f"{name} must be >= 0; found {float(x[tuple(bad)])} at index {tuple(bad)}")
    return x, not hi < math.inf


def _fast_order(dim: int | Tensor) -> float | None:
    """v = dim/2 - 1 where ``dim`` is a python int with v >= _DEBYE_MIN_ORDER (the fast path)."""
    if isinstance(dim, int) and not isinstance(dim, bool) and dim / 2 - 1 >= _DEBYE_MIN_ORDER:
        return dim / 2 - 1
    return None


def _as_dim_order(dim: int | Tensor, like: Tensor) -> Tensor:
    if isinstance(dim, Tensor):
        d = dim.detach().to(device=_compute_device(like), dtype=torch.float64)
    else:
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"dim must be an int (the ambient dimension), got {dim!r}")
        d = torch.tensor(float(dim), dtype=torch.float64, device=_compute_device(like))
    if (d < 2).any() or (d != torch.round(d)).any():
        raise InputError(f"dim is the ambient dimension and must be an integer >= 2, got {dim!r}")
    return d / 2 - 1


# --------------------------------------------------------------------------------------------
# Autograd functions. Forward in float64; backward uses the analytic derivatives through the
# differentiable ratio function, so double backward works.
# --------------------------------------------------------------------------------------------
class _BesselRatio(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor | float, x: Tensor, has_inf: bool = True) -> Tensor:
        if isinstance(v, float):  # one order >= 50: the fast path
            r = _fast(v, x, None, True, has_inf)[1]
        else:
            _, r = _core(v, x.detach().to(device=v.device, dtype=torch.float64))
        r = r.to(device=x.device, dtype=x.dtype)
        ctx.v, ctx.has_inf = v, has_inf
        ctx.save_for_backward(x, r)
        return r

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, r = ctx.saved_tensors
        v = ctx.v
        if torch.is_grad_enabled():  # double backward: rebuild r differentiably
            r = _BesselRatio.apply(v, x, ctx.has_inf)
        vx = v if isinstance(v, float) else v.to(device=x.device, dtype=x.dtype)
        safe_x = torch.where(x > 0, x, torch.ones_like(x))
        d = 1 - r * r - (2 * vx + 1) * r / safe_x
        d = torch.where(x > 0, d, 1 / (2 * (vx + 1)))  # r_v(x) ~ x / (2(v+1)) at 0
        return None, _reduce_grad(grad * d, x.shape), None


class _LogBesselIv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor, x: Tensor) -> Tensor:
        x64 = x.detach().to(device=v.device, dtype=torch.float64)
        log_f, r = _core(v, x64)
        # log I_v(x) = log F_v(x) + v log(x/2) - lgamma(v+1); xlogy gives 0 at v = 0, x = 0.
        out = log_f + torch.xlogy(v, 0.5 * x64) - torch.lgamma(v + 1)
        ctx.save_for_backward(v, x, r.to(device=x.device, dtype=x.dtype))
        return out.to(device=x.device, dtype=x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        v, x, r = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: rebuild r differentiably
            r = _BesselRatio.apply(v, x, True)
        vx = v.to(device=x.device, dtype=x.dtype)
        safe_x = torch.where(x > 0, x, torch.ones_like(x))
        d = r + vx / safe_x
        at_zero = torch.where(vx == 0, torch.zeros_like(d), torch.full_like(d, math.inf))
        d = torch.where(x > 0, d, at_zero)
        return None, _reduce_grad(grad * d, x.shape)


class _VmfLogNormalizer(torch.autograd.Function):
    """-log F_v(kappa) - offset, v = d/2 - 1, in float64; derivative -A_d(kappa).

    With ``offset = log |S^{d-1}|`` this is log C_d(kappa); with ``offset = 0`` it is
    log(C_d(kappa) |S^{d-1}|), the log-density ratio to the uniform distribution at the mode.
    A float ``v`` (one order >= 50) takes the fast path, which computes A_d in the same pass
    when ``need_ratio`` and saves it for backward.
    """

    @staticmethod
    def forward(ctx, v, kappa: Tensor, offset, need_ratio: bool = True, has_inf: bool = True) -> Tensor:
        if isinstance(v, float):
            out, r = _fast(v, kappa, offset, need_ratio, has_inf)
        else:
            log_f, r = _core(v, kappa.detach().to(device=v.device, dtype=torch.float64))
            out = -log_f - offset
        r = r if r is None else r.to(device=kappa.device, dtype=kappa.dtype)
        ctx.v, ctx.has_inf = v, has_inf
        ctx.save_for_backward(kappa, r)
        return out.to(device=kappa.device, dtype=kappa.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        kappa, r = ctx.saved_tensors
        if r is None or torch.is_grad_enabled():
            r = _BesselRatio.apply(ctx.v, kappa, ctx.has_inf)
        return None, _reduce_grad(-grad * r, kappa.shape), None, None, None


def _reduce_grad(g: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back to the shape of the differentiated input."""
    if g.shape == shape:
        return g
    while g.dim() > len(shape):
        g = g.sum(0)
    for i, s in enumerate(shape):
        if s == 1 and g.shape[i] != 1:
            g = g.sum(i, keepdim=True)
    return g


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def log_bessel_iv(order: Tensor | float, x: Tensor | float) -> Tensor:
    """Logarithm of the modified Bessel function of the first kind, ``log I_order(x)``.

    Accurate to about 1e-15 relative in float64 for orders in [0, 10^4) and x in [0, 10^300]
    (see the module docstring for the method); float32 inputs get the float64 result rounded.

    Args:
        order: order ``v >= 0`` (python number or tensor, broadcast against ``x``). Not
            differentiable.
        x: argument ``x >= 0``. Differentiable (twice); ``log I_v(0) = -inf`` for ``v > 0``.

    Returns:
        Tensor of the broadcast shape and the dtype of ``x``.

    Raises:
        InputError: negative or non-finite order, negative x.

    Example:
        >>> import torch
        >>> x = torch.tensor(1.0, dtype=torch.float64)
        >>> ref = math.log(math.sqrt(2 / math.pi) * math.sinh(1.0))  # I_{1/2}(x) in closed form
        >>> abs(float(log_bessel_iv(0.5, x)) - ref) < 1e-15
        True
    """
    x = _checked(x, "x")[0]
    v = _as_order(order, x)
    return _LogBesselIv.apply(v, x)


def bessel_iv_ratio(order: Tensor | float, x: Tensor | float) -> Tensor:
    """The ratio ``I_{order+1}(x) / I_order(x)`` in (0, 1), exact in log space.

    Example:
        >>> import torch
        >>> x = torch.tensor(2.0, dtype=torch.float64)
        >>> r = bessel_iv_ratio(0.0, x)   # I_1(2)/I_0(2)
        >>> round(float(r), 9)
        0.697774658
    """
    x = _checked(x, "x")[0]
    v = _as_order(order, x)
    return _BesselRatio.apply(v, x, True)


def bessel_ratio(dim: int | Tensor, kappa: Tensor | float) -> Tensor:
    """Mean resultant length of the vMF on ``S^{dim-1}``: ``A_d(kappa) = I_{d/2}(kappa) / I_{d/2-1}(kappa)``.

    It is ``E[mu^T x]`` under ``vMF(mu, kappa)`` and minus the derivative of
    ``vmf_log_normalizer``. ``A_d(0) = 0`` and ``A_d(kappa) -> 1`` as ``kappa -> inf``.

    Args:
        dim: ambient dimension ``d >= 2`` (unit vectors in R^d).
        kappa: concentration ``>= 0``; differentiable.

    Example:
        >>> import torch
        >>> a = bessel_ratio(3, torch.tensor(1.0, dtype=torch.float64))  # coth(1) - 1
        >>> round(float(a), 12)
        0.313035285499
    """
    kappa, has_inf = _checked(kappa, "kappa")
    v = _fast_order(dim)
    return _BesselRatio.apply(_as_dim_order(dim, kappa) if v is None else v, kappa, has_inf)


def log_sphere_area(dim: int | Tensor) -> Tensor | float:
    """log of the surface area of the unit sphere ``S^{dim-1}`` in R^dim: ``log(2 pi^(d/2) / Gamma(d/2))``.

    Example:
        >>> round(log_sphere_area(3), 12) == round(math.log(4 * math.pi), 12)
        True
    """
    if isinstance(dim, Tensor):
        d = dim.to(torch.float64)
        return math.log(2.0) + 0.5 * d * math.log(math.pi) - torch.lgamma(0.5 * d)
    return math.log(2.0) + 0.5 * dim * math.log(math.pi) - math.lgamma(0.5 * dim)


def vmf_log_normalizer(dim: int | Tensor, kappa: Tensor | float) -> Tensor:
    """Exact log-normaliser of the von Mises–Fisher density on ``S^{dim-1}``.

    ``log C_d(kappa) = (d/2 - 1) log kappa - (d/2) log(2 pi) - log I_{d/2-1}(kappa)``, so that
    ``vMF(x; mu, kappa) = C_d(kappa) exp(kappa mu^T x)`` (Mardia & Jupp 2000, eq. 9.3.4).
    At ``kappa = 0`` it is exactly ``-log |S^{d-1}|`` (the uniform density), with no
    cancellation near 0: the function is evaluated as ``-log F_v(kappa) - log |S^{d-1}|``.
    Its derivative in ``kappa`` is ``-bessel_ratio(dim, kappa)``.

    Args:
        dim: ambient dimension ``d >= 2``.
        kappa: concentration ``>= 0`` (tensor of any shape, differentiable twice).

    Returns:
        Tensor like ``kappa``.

    Example:
        >>> import torch
        >>> k = torch.tensor([0.0, 100.0], dtype=torch.float64)
        >>> torch.allclose(vmf_log_normalizer(512, k)[0], -torch.tensor(log_sphere_area(512), dtype=torch.float64))
        True
    """
    return _vmf(dim, kappa, with_area=True)


def vmf_log_density_ratio_at_mode(dim: int | Tensor, kappa: Tensor | float) -> Tensor:
    """``log(C_d(kappa) |S^{d-1}|)``: log of the vMF density at its mode over the uniform density.

    Equal to ``vmf_log_normalizer(dim, kappa) + log_sphere_area(dim) + 0`` but computed without
    the cancellation of those two large terms, so it is accurate to full relative precision
    as ``kappa -> 0`` (where it behaves like ``-kappa^2 / (2 d)``). Used for KL divergences.
    """
    return _vmf(dim, kappa, with_area=False)


def _vmf(dim: int | Tensor, kappa: Tensor | float, with_area: bool) -> Tensor:
    kappa, has_inf = _checked(kappa, "kappa")
    v = _fast_order(dim)
    if v is not None:  # A_d in the same pass when a gradient will be asked for
        need_ratio = kappa.requires_grad and torch.is_grad_enabled()
        return _VmfLogNormalizer.apply(v, kappa, log_sphere_area(dim) if with_area else 0.0, need_ratio, has_inf)
    v = _as_dim_order(dim, kappa)
    # log |S^{d-1}| = log 2 + (d/2) log pi - lgamma(d/2), with d/2 = v + 1; float64.
    offset = math.log(2.0) + (v + 1) * math.log(math.pi) - torch.lgamma(v + 1) if with_area else torch.zeros_like(v)
    return _VmfLogNormalizer.apply(v, kappa, offset, True, has_inf)


def vmf_log_normalizer_approx(dim: int, kappa: Tensor) -> Tensor:
    """The approximate vMF log-normaliser of Scott, Gallagher & Mozer (2021), up to a constant.

    "von Mises–Fisher Loss: An Exploration of Embedding Geometries for Supervised Learning",
    ICCV 2021, https://arxiv.org/abs/2103.15718. It integrates two rational bounds on
    ``A_d(kappa)`` and omits the additive constant, so its *value* is off from the true
    ``log C_d`` (by hundreds of nats at d >= 512) while its derivative is close to ``-A_d``.
    This is the normaliser used by the AsymVLM reference code; it is provided for parity
    (``vmf_normalizer="approx"`` in the loss). With ``a = (d-1)/2``, ``b = (d+1)/2``:

        (a/2) log(a + sqrt(a^2 + k^2)) - sqrt(a^2 + k^2)/2
      + (a/2) log(a + sqrt(b^2 + k^2)) - sqrt(b^2 + k^2)/2
    """
    a, b, k2 = 0.5 * (dim - 1), 0.5 * (dim + 1), kappa * kappa
    sa, sb = torch.sqrt(a * a + k2), torch.sqrt(b * b + k2)
    return 0.5 * a * torch.log(a + sa) - 0.5 * sa + 0.5 * a * torch.log(a + sb) - 0.5 * sb
