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

All arithmetic runs in float64 and the result is cast back to the input dtype, so float32 (and
float16/bfloat16) inputs get correctly rounded values. Gradients with respect to ``x`` are
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
# With _DEBYE_TERMS terms the truncation error at v = 50 is below 1e-18 relative (measured
# against mpmath at 50 digits, see tests/core/test_special.py).
_DEBYE_MIN_ORDER = 50.0
_DEBYE_TERMS = 10
# Terms of the power series of F_v(x); with x^2/4 <= v+1 the k-th term is <= 1/k!.
_SERIES_TERMS = 22


# --------------------------------------------------------------------------------------------
# Debye polynomials u_k(t), DLMF 10.41.9:
#   u_{k+1}(t) = t^2 (1 - t^2) u_k'(t) / 2 + (1/8) int_0^t (1 - 5 s^2) u_k(s) ds
# computed once, exactly, with rational arithmetic.
# --------------------------------------------------------------------------------------------
@functools.cache
def _debye_polynomials(n_terms: int) -> tuple[tuple[float, ...], ...]:
    """Coefficients (ascending powers of t) of u_0 ... u_{n_terms}, as floats."""
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
    return tuple(tuple(float(c) for c in p) for p in polys)


@functools.cache
def _debye_matrices(device: str) -> tuple[Tensor, Tensor]:
    """(U, P) float64 matrices of shape (3K+1, K+1) with the ascending coefficients of u_k and
    of p_k = u_k/2 + t u_k' (column k), so that ``t_powers @ U`` evaluates every u_k at once."""
    polys = _debye_polynomials(_DEBYE_TERMS)
    n = 3 * _DEBYE_TERMS + 1
    u = torch.zeros(n, _DEBYE_TERMS + 1, dtype=torch.float64)
    p = torch.zeros(n, _DEBYE_TERMS + 1, dtype=torch.float64)
    for k, coeffs in enumerate(polys):
        for i, c in enumerate(coeffs):
            u[i, k] = c
            p[i, k] = (i + 0.5) * c
    return u.to(device), p.to(device)


def _debye_sums(v: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """U = sum_{k=0}^K u_k(t) / v^k and P = sum_{k=1}^K p_{k-1}(t) / v^k."""
    u_mat, p_mat = _debye_matrices(str(t.device))
    exponents = torch.arange(u_mat.shape[0], dtype=torch.float64, device=t.device)
    t_pow = t.unsqueeze(-1) ** exponents  # (..., 3K+1)
    k = torch.arange(_DEBYE_TERMS + 1, dtype=torch.float64, device=t.device)
    inv_v_pow = v.unsqueeze(-1) ** (-k)  # (..., K+1): v^-k
    big_u = ((t_pow @ u_mat) * inv_v_pow).sum(-1)
    # p_{k-1} / v^k: shift the columns by one power of 1/v
    big_p = ((t_pow @ p_mat[:, :-1]) * inv_v_pow[..., 1:]).sum(-1)
    return big_u, big_p


def _stirling_remainder(v: Tensor) -> Tensor:
    """lgamma(v+1) - (v log v - v + log(2 pi v)/2), for v > 0 (the Stirling series remainder)."""
    return torch.lgamma(v + 1) - (v * torch.log(v) - v + 0.5 * torch.log(2 * math.pi * v))


def _debye(v: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(log F_v(x), r_v(x)) from the uniform asymptotic (Debye) expansions, for v >= 50.

    log F. With z = x/v, w = sqrt(1 + z^2), t = 1/w, eta = w + log(z / (1 + w)) (DLMF 10.41.3)

        log I_v(v z) = v eta - log(2 pi v)/2 - log(w)/2 + log U,   U = sum_k u_k(t) / v^k,

    and the v log z terms cancel analytically against v log(x/2), leaving

        log F_v(x) = v (w - 1 - log((1 + w)/2)) + stirling_remainder(v) - log(w)/2 + log U,

    where ``w - 1 = z^2 / (1 + w)`` and ``log((1+w)/2) = log1p((w-1)/2)`` keep small z exact.

    Ratio. DLMF 10.41.4 gives I_v'(vz)/I_v(vz) = (w/z) V/U with V = sum v_k(t)/v^k and
    v_k - u_k = t (t^2 - 1) (u_{k-1}/2 + t u_{k-1}') (DLMF 10.41.10). With r_v = I_v'/I_v - v/x,
    t^2 - 1 = -z^2 t^2 and w t = 1:

        r_v(x) = z / (1 + w) - z t^2 P / U,   P = sum_{k>=1} p_{k-1}(t) / v^k,
        p_j(t) = u_j(t)/2 + t u_j'(t),

    which has no cancellation for small or large z (unlike exp(log I_{v+1} - log I_v), whose
    error grows like eps * x).
    """
    z = x / v
    w = torch.hypot(torch.ones_like(z), z)
    t = 1 / w
    wm1 = z * z / (1 + w)
    big_u, big_p = _debye_sums(v, t)
    log_f = v * (wm1 - torch.log1p(0.5 * wm1)) + _stirling_remainder(v) - 0.5 * torch.log(w) + torch.log(big_u)
    ratio = z / (1 + w) - z * t * t * big_p / big_u
    return log_f, ratio


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


def _as_arg(x: Tensor | Real, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        x = torch.tensor(float(x), dtype=torch.get_default_dtype())
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    if (x < 0).any():
        bad = torch.nonzero(x < 0)[0].tolist()
        raise InputError(f"{name} must be >= 0; found {float(x[tuple(bad)])} at index {tuple(bad)}")
    return x


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
    def forward(ctx, v: Tensor, x: Tensor) -> Tensor:
        x64 = x.detach().to(device=v.device, dtype=torch.float64)
        _, r = _core(v, x64)
        r = r.to(device=x.device, dtype=x.dtype)
        ctx.save_for_backward(v, x, r)
        return r

    @staticmethod
    def backward(ctx, grad: Tensor):
        v, x, r = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: rebuild r differentiably
            r = _BesselRatio.apply(v, x)
        vx = v.to(device=x.device, dtype=x.dtype)
        safe_x = torch.where(x > 0, x, torch.ones_like(x))
        d = 1 - r * r - (2 * vx + 1) * r / safe_x
        d = torch.where(x > 0, d, 1 / (2 * (vx + 1)))  # r_v(x) ~ x / (2(v+1)) at 0
        return None, _reduce_grad(grad * d, x.shape)


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
        r = _ratio_for_backward(v, x, r)
        vx = v.to(device=x.device, dtype=x.dtype)
        safe_x = torch.where(x > 0, x, torch.ones_like(x))
        d = r + vx / safe_x
        at_zero = torch.where(vx == 0, torch.zeros_like(d), torch.full_like(d, math.inf))
        d = torch.where(x > 0, d, at_zero)
        return None, _reduce_grad(grad * d, x.shape)


def _ratio_for_backward(v: Tensor, x: Tensor, saved: Tensor) -> Tensor:
    """The ratio saved by the forward pass, or rebuilt differentiably for double backward."""
    return _BesselRatio.apply(v, x) if torch.is_grad_enabled() else saved


class _VmfLogNormalizer(torch.autograd.Function):
    """-log F_v(kappa) - offset, v = d/2 - 1, in float64; derivative -A_d(kappa).

    With ``offset = log |S^{d-1}|`` this is log C_d(kappa); with ``offset = 0`` it is
    log(C_d(kappa) |S^{d-1}|), the log-density ratio to the uniform distribution at the mode.
    """

    @staticmethod
    def forward(ctx, v: Tensor, kappa: Tensor, offset: Tensor) -> Tensor:
        k64 = kappa.detach().to(device=v.device, dtype=torch.float64)
        log_f, r = _core(v, k64)
        ctx.save_for_backward(v, kappa, r.to(device=kappa.device, dtype=kappa.dtype))
        return (-log_f - offset).to(device=kappa.device, dtype=kappa.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        v, kappa, r = ctx.saved_tensors
        return None, _reduce_grad(-grad * _ratio_for_backward(v, kappa, r), kappa.shape), None


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
    x = _as_arg(x, "x")
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
    x = _as_arg(x, "x")
    v = _as_order(order, x)
    return _BesselRatio.apply(v, x)


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
    kappa = _as_arg(kappa, "kappa")
    v = _as_dim_order(dim, kappa)
    return _BesselRatio.apply(v, kappa)


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
    kappa = _as_arg(kappa, "kappa")
    v = _as_dim_order(dim, kappa)
    return _VmfLogNormalizer.apply(v, kappa, _log_area_from_order(v))


def vmf_log_density_ratio_at_mode(dim: int | Tensor, kappa: Tensor | float) -> Tensor:
    """``log(C_d(kappa) |S^{d-1}|)``: log of the vMF density at its mode over the uniform density.

    Equal to ``vmf_log_normalizer(dim, kappa) + log_sphere_area(dim) + 0`` but computed without
    the cancellation of those two large terms, so it is accurate to full relative precision
    as ``kappa -> 0`` (where it behaves like ``-kappa^2 / (2 d)``). Used for KL divergences.
    """
    kappa = _as_arg(kappa, "kappa")
    v = _as_dim_order(dim, kappa)
    return _VmfLogNormalizer.apply(v, kappa, torch.zeros_like(v))


def _log_area_from_order(v: Tensor) -> Tensor:
    # log |S^{d-1}| = log 2 + (d/2) log pi - lgamma(d/2), with d/2 = v + 1; float64.
    return math.log(2.0) + (v + 1) * math.log(math.pi) - torch.lgamma(v + 1)


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
    a = 0.5 * (dim - 1)
    b = 0.5 * (dim + 1)
    k2 = kappa * kappa
    sa = torch.sqrt(a * a + k2)
    sb = torch.sqrt(b * b + k2)
    return 0.5 * a * torch.log(a + sa) - 0.5 * sa + 0.5 * a * torch.log(a + sb) - 0.5 * sb
