"""Distributions on the unit sphere S^{d-1} following the ``torch.distributions`` contract.

All three classes take ``d`` as the **ambient** dimension: samples are unit vectors in R^d,
i.e. points of the (d-1)-dimensional sphere S^{d-1}; ``event_shape == (d,)``.

* :class:`VonMisesFisher` ``vMF(mu, kappa)``: density ``C_d(kappa) exp(kappa mu^T x)``
  (Mardia & Jupp, *Directional Statistics*, 2000, sec. 9.3) with the exact log-normaliser of
  :mod:`asymvlm.special`; sampling by Wood's rejection algorithm (Wood 1994,
  https://doi.org/10.1080/03610919408813161), written in the cancellation-free form derived below.
* :class:`PowerSpherical` ``PS(mu, kappa)``: density ``C(kappa) (1 + mu^T x)^kappa`` with
  ``C^{-1} = 2^(a+b) pi^b Gamma(a) / Gamma(a+b)``, ``a = (d-1)/2 + kappa``, ``b = (d-1)/2``
  (De Cao & Aziz 2020, https://arxiv.org/abs/2006.04437); exact reparameterised sampling.
* :class:`HypersphericalUniform` on S^{d-1}.

KL divergences are registered with :func:`torch.distributions.kl.register_kl` for every pair
with a closed form: vMF||U, PS||U, U||vMF, U||PS, vMF||vMF, PS||vMF. The sphere constraint, the
base class and the uniform distribution are :mod:`asymvlm.spherical`'s (exported here too).

Example:
    >>> import torch
    >>> from asymvlm.distributions import VonMisesFisher, HypersphericalUniform
    >>> mu = torch.nn.functional.normalize(torch.randn(4, 512), dim=-1)
    >>> q = VonMisesFisher(mu, torch.full((4,), 100.0))
    >>> x = q.sample((8,))                     # (8, 4, 512), unit rows
    >>> q.log_prob(x).shape
    torch.Size([8, 4])
    >>> kl = torch.distributions.kl_divergence(q, HypersphericalUniform(512))
    >>> bool((kl >= 0).all())
    True
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor
from torch.distributions import Distribution, Gamma
from torch.distributions.kl import register_kl

from asymvlm.errors import InputError
from asymvlm.special import (
    bessel_ratio,
    log_sphere_area,
    vmf_log_density_ratio_at_mode,
    vmf_log_normalizer,
)
from asymvlm.spherical import HypersphericalUniform, SphericalDistribution, sphere, tangent_uniform

__all__ = [
    "sphere",
    "VonMisesFisher",
    "PowerSpherical",
    "HypersphericalUniform",
    "SphericalDistribution",
    "power_spherical_log_normalizer",
]


# --------------------------------------------------------------------------------------------
# The Power Spherical normaliser
# --------------------------------------------------------------------------------------------
def power_spherical_log_normalizer(dim: int, concentration: Tensor) -> Tensor:
    """``log C(kappa) = -[(a+b) log 2 + b log pi + lgamma(a) - lgamma(a+b)]``, a = (d-1)/2 + kappa,
    b = (d-1)/2 (De Cao & Aziz 2020, eq. 4). Computed in float64 (the two lgamma terms are
    ~1e7 at kappa = 1e6), returned in the dtype of ``concentration``; differentiable.
    """
    k = concentration.to(torch.float64)
    b = 0.5 * (dim - 1)
    a = b + k
    out = -((a + b) * math.log(2.0) + b * math.log(math.pi) + torch.lgamma(a) - torch.lgamma(a + b))
    return out.to(concentration.dtype)


# --------------------------------------------------------------------------------------------
# von Mises–Fisher
# --------------------------------------------------------------------------------------------
class VonMisesFisher(SphericalDistribution):
    """von Mises–Fisher distribution on S^{d-1}: ``p(x) = C_d(kappa) exp(kappa mu^T x)``.

    ``mean = A_d(kappa) mu`` with ``A_d = I_{d/2}/I_{d/2-1}`` (:func:`asymvlm.special.bessel_ratio`);
    ``entropy = -log C_d - kappa A_d``. ``sample`` is exact (Wood 1994) for any d >= 2 and
    kappa >= 0 and runs in float64 internally. ``rsample`` is not provided (use
    :class:`PowerSpherical` when reparameterised samples are needed).

    Example:
        >>> import torch
        >>> mu = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
        >>> q = VonMisesFisher(mu, torch.tensor(2.0, dtype=torch.float64))
        >>> round(float(q.log_prob(mu)), 9)  # d = 3: log(kappa / (2 pi (1 - exp(-2 kappa))))
        -1.126244439
    """

    has_rsample = False
    family = "vmf"

    @property
    def log_normalizer(self) -> Tensor:
        """``log C_d(kappa)``, exact (see :func:`asymvlm.special.vmf_log_normalizer`)."""
        return vmf_log_normalizer(self.dim, self.concentration)

    @staticmethod
    def _log_prob_from_cosine(cos: Tensor, kappa: Tensor, log_norm: Tensor) -> Tensor:
        return kappa * cos + log_norm

    @classmethod
    def _unnormalized_log_prob_(cls, cos: Tensor, kappa: Tensor) -> Tensor:
        return cos.mul_(kappa)

    def _mean_cosine(self) -> Tensor:
        return bessel_ratio(self.dim, self.concentration)

    def _mean_cosine_sq(self) -> Tensor:
        # E[t^2] = 1 - (d-1) A_d(kappa) / kappa, with A_d(kappa)/kappa -> 1/d as kappa -> 0
        kappa = self.concentration
        a = bessel_ratio(self.dim, kappa)
        safe = torch.where(kappa > 0, kappa, torch.ones_like(kappa))
        a_over_k = torch.where(kappa > 0, a / safe, torch.full_like(kappa, 1.0 / self.dim))
        return 1 - (self.dim - 1) * a_over_k

    def entropy(self) -> Tensor:
        kappa = self.concentration
        return -self.log_normalizer - kappa * bessel_ratio(self.dim, kappa)

    @torch.no_grad()
    def sample(self, sample_shape=()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        loc = self.loc.to(torch.float64).expand(shape)
        kappa = self.concentration.to(torch.float64).expand(shape[:-1]).contiguous()
        cos, sin = _wood_sample_cosine(self.dim, kappa)  # (sample + batch,) each
        x = cos.unsqueeze(-1) * loc + sin.unsqueeze(-1) * tangent_uniform(loc, shape)
        return x.to(self.loc.dtype)


def _wood_sample_cosine(dim: int, kappa: Tensor, max_rounds: int = 10_000) -> tuple[Tensor, Tensor]:
    """Sample ``w = mu^T x`` under vMF (Wood 1994), returning ``(w, sqrt(1 - w^2))`` in float64.

    Wood's proposal: ``z ~ Beta((d-1)/2, (d-1)/2)``, ``w = (1 - (1+b) z) / (1 - (1-b) z)``,
    accept when ``kappa w + (d-1) log(1 - x0 w) - c >= log u`` with
    ``b = (d-1) / (2 kappa + sqrt(4 kappa^2 + (d-1)^2))``, ``x0 = (1-b)/(1+b)``,
    ``c = kappa x0 + (d-1) log(1 - x0^2)``. Every quantity is rewritten to avoid cancellation:
    with ``z = g_a / (g_a + g_b)`` (two Gamma draws), ``den = g_b + b g_a``:
    ``1 - w = 2 b g_a / den``, ``1 + w = 2 g_b / den``, ``1 - x0 = 2b/(1+b)``,
    ``w - x0 = (1 - x0) - (1 - w)``, ``1 - x0 w = (1 - x0) + x0 (1 - w)``,
    ``1 - x0^2 = 4b/(1+b)^2``. At kappa = 0, b = 1 and every proposal is accepted, so there is
    no slow-down at tiny kappa; the acceptance rate is bounded away from 0 for all d, kappa.
    """
    m = float(dim - 1)
    s = torch.sqrt(4 * kappa * kappa + m * m)
    b = m / (2 * kappa + s)
    one_minus_x0 = 2 * b / (1 + b)
    x0 = 1 - one_minus_x0
    log_1mx0sq = torch.log(4 * b) - 2 * torch.log1p(b)
    half = torch.full_like(kappa, 0.5 * m)
    w = torch.empty_like(kappa)
    sin = torch.empty_like(kappa)
    pending = torch.ones_like(kappa, dtype=torch.bool)
    for _ in range(max_rounds):
        idx = pending.nonzero(as_tuple=True)
        if idx[0].numel() == 0:
            return w, sin
        k, bb, omx0, xx0, l0, h = (t[idx] for t in (kappa, b, one_minus_x0, x0, log_1mx0sq, half))
        ga = Gamma(h, torch.ones_like(h)).sample()
        gb = Gamma(h, torch.ones_like(h)).sample()
        den = gb + bb * ga
        one_minus_w = 2 * bb * ga / den
        w_prop = (gb - bb * ga) / den
        log_accept = k * (omx0 - one_minus_w) + m * (torch.log(omx0 + xx0 * one_minus_w) - l0)
        u = torch.rand_like(k)
        ok = log_accept >= torch.log(u)
        sel = tuple(i[ok] for i in idx)
        w[sel] = w_prop[ok]
        sin[sel] = (2 * torch.sqrt(bb * ga * gb) / den)[ok]
        pending[sel] = False
    raise RuntimeError(f"vMF sampling did not finish in {max_rounds} rounds (d={dim})")


# --------------------------------------------------------------------------------------------
# Power Spherical
# --------------------------------------------------------------------------------------------
class PowerSpherical(SphericalDistribution):
    """Power Spherical distribution (De Cao & Aziz 2020): ``p(x) = C(kappa) (1 + mu^T x)^kappa``.

    ``(1 + mu^T x) / 2 ~ Beta(a, b)`` with ``a = (d-1)/2 + kappa``, ``b = (d-1)/2``, which
    gives exact reparameterised samples, ``mean = (kappa / (kappa + d - 1)) mu`` and
    ``entropy = -log C - kappa (log 2 + digamma(a) - digamma(a + b))``.

    Example:
        >>> import torch
        >>> mu = torch.tensor([1.0, 0.0, 0.0])
        >>> q = PowerSpherical(mu, torch.tensor(5.0, requires_grad=True))
        >>> x = q.rsample((3,))
        >>> x.shape
        torch.Size([3, 3])
    """

    has_rsample = True
    family = "ps"

    @property
    def log_normalizer(self) -> Tensor:
        return power_spherical_log_normalizer(self.dim, self.concentration)

    @staticmethod
    def _log_prob_from_cosine(cos: Tensor, kappa: Tensor, log_norm: Tensor) -> Tensor:
        # kappa = 0 is the uniform density, also at the antipode (0 * log 0 := 0); rounding can
        # put cos a hair below -1, where log1p would be NaN
        term = kappa * torch.log1p(cos.clamp_min(-1.0))
        return torch.where(kappa == 0, torch.zeros_like(term), term) + log_norm

    @classmethod
    def _unnormalized_log_prob_(cls, cos: Tensor, kappa: Tensor) -> Tensor:
        out = cos.clamp_(min=-1.0).log1p_().mul_(kappa)  # as _log_prob_from_cosine, in place
        return out.masked_fill_((kappa == 0).expand_as(out), 0.0)

    def _beta_params(self) -> tuple[Tensor, float]:
        b = 0.5 * (self.dim - 1)
        return b + self.concentration, b

    def _mean_cosine(self) -> Tensor:
        kappa = self.concentration
        return kappa / (kappa + (self.dim - 1))

    def _mean_cosine_sq(self) -> Tensor:
        a, b = self._beta_params()
        n = a + b
        var_t = 4 * a * b / (n * n * (n + 1))
        m1 = (a - b) / n
        return var_t + m1 * m1

    def entropy(self) -> Tensor:
        # H = -log C - kappa E[log(1 + mu^T x)] = log|S^{d-1}| - KL(PS || U), the latter
        # computed without cancellation at small kappa
        kl = _power_spherical_kl_uniform(self.dim, self.concentration)
        return (log_sphere_area(self.dim) - kl).to(self.concentration.dtype)

    def rsample(self, sample_shape=()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        a, b = self._beta_params()
        a = a.expand(shape[:-1])
        # (1 + t)/2 = g_a / (g_a + g_b); t and 1 - t^2 = 4 g_a g_b / s^2 without cancellation
        ga = Gamma(a, torch.ones_like(a)).rsample()
        gb = Gamma(torch.full_like(a, b), torch.ones_like(a)).rsample()
        s = ga + gb
        t = ((ga - gb) / s).unsqueeze(-1)
        sin = (2 * torch.sqrt(ga * gb) / s).unsqueeze(-1)
        loc = self.loc.expand(shape)
        return t * loc + sin * tangent_uniform(loc, shape)


# --------------------------------------------------------------------------------------------
# KL divergences (closed forms)
# --------------------------------------------------------------------------------------------
def _check_same_dim(p: Distribution, q: Distribution) -> None:
    if p.event_shape != q.event_shape:
        raise InputError(
            f"KL between distributions on different spheres: {tuple(p.event_shape)} vs {tuple(q.event_shape)}"
        )


@register_kl(VonMisesFisher, HypersphericalUniform)
def _kl_vmf_uniform(p: VonMisesFisher, q: HypersphericalUniform) -> Tensor:
    # KL = log C_d + kappa A_d + log|S| = log(C_d |S|) + kappa A_d; the first term is computed
    # without cancelling log C_d against log|S| (asymvlm.special.vmf_log_density_ratio_at_mode).
    _check_same_dim(p, q)
    kappa = p.concentration
    kl = vmf_log_density_ratio_at_mode(p.dim, kappa) + kappa * bessel_ratio(p.dim, kappa)
    return kl.clamp_min(0.0)  # >= 0 exactly; the clamp removes rounding at kappa ~ 0


@functools.lru_cache(maxsize=64)
def _ps_kl_series_coefficients(dim: int) -> tuple[float, ...]:
    """c_n = -(psi^(n-1)(2b) - psi^(n-1)(b)) (n-1)/n!, n = 2..31, b = (d-1)/2 (scipy: torch's
    trigamma is only accurate to ~5e-10 at small arguments)."""
    from scipy.special import factorial, polygamma

    b = 0.5 * (dim - 1)
    return tuple(
        float(-(polygamma(n - 1, 2 * b) - polygamma(n - 1, b)) * (n - 1) / factorial(n, exact=True))
        for n in range(2, 32)
    )


def _power_spherical_kl_uniform(dim: int, concentration: Tensor) -> Tensor:
    """KL(PS(mu, kappa) || U(S^{d-1})) in float64, accurate to full relative precision at small kappa.

    With b = (d-1)/2 and G(k) = lgamma(2b + k) - lgamma(b + k) - k log 2 one has
    log C(k) + log|S^{d-1}| = G(k) - G(0) and E[log(1 + mu^T x)] = -G'(k), so
    KL = G(k) - G(0) - k G'(k). Evaluated directly this cancels to ~1e-13 absolute as k -> 0;
    for k <= b/4 the Taylor series KL = sum_{n>=2} c_n k^n (radius of convergence b; 30 terms
    leave < 4^-30 relative) is used instead.
    """
    k = concentration.to(torch.float64)
    b = 0.5 * (dim - 1)
    direct = (
        (torch.lgamma(2 * b + k) - math.lgamma(2 * b))
        - (torch.lgamma(b + k) - math.lgamma(b))
        - k * (torch.digamma(2 * b + k) - torch.digamma(b + k))
    )
    ks = torch.where(k <= 0.25 * b, k, torch.zeros_like(k))
    series = torch.zeros_like(k)
    for c in reversed(_ps_kl_series_coefficients(dim)):  # Horner in k, lowest power k^2
        series = (series + c) * ks
    series = series * ks
    return torch.where(k <= 0.25 * b, series, direct)


@register_kl(PowerSpherical, HypersphericalUniform)
def _kl_ps_uniform(p: PowerSpherical, q: HypersphericalUniform) -> Tensor:
    _check_same_dim(p, q)
    kl = _power_spherical_kl_uniform(p.dim, p.concentration)
    return kl.clamp_min(0.0).to(p.concentration.dtype)


@register_kl(HypersphericalUniform, VonMisesFisher)
def _kl_uniform_vmf(p: HypersphericalUniform, q: VonMisesFisher) -> Tensor:
    # E_U[log U - log q] = -log|S| - log C_d(kappa) - kappa mu^T E_U[x] = -log(C_d |S|)
    _check_same_dim(p, q)
    return (-vmf_log_density_ratio_at_mode(q.dim, q.concentration)).clamp_min(0.0)


@register_kl(HypersphericalUniform, PowerSpherical)
def _kl_uniform_ps(p: HypersphericalUniform, q: PowerSpherical) -> Tensor:
    # Under U, (1 + mu^T x)/2 ~ Beta(b, b): E[log(1 + mu^T x)] = log 2 + digamma(b) - digamma(2b)
    _check_same_dim(p, q)
    b = 0.5 * (q.dim - 1)
    e_log = (
        math.log(2.0)
        + torch.special.digamma(torch.tensor(b, dtype=torch.float64))
        - torch.special.digamma(torch.tensor(2 * b, dtype=torch.float64))
    )
    kappa = q.concentration.to(torch.float64)
    kl = -log_sphere_area(q.dim) - q.log_normalizer.to(torch.float64) - kappa * e_log.to(kappa.device)
    return kl.clamp_min(0.0).to(q.concentration.dtype)


@register_kl(VonMisesFisher, VonMisesFisher)
def _kl_vmf_vmf(p: VonMisesFisher, q: VonMisesFisher) -> Tensor:
    # E_p[log p - log q] = log C(kp) - log C(kq) + A(kp) (kp - kq mu_q^T mu_p)
    _check_same_dim(p, q)
    a = bessel_ratio(p.dim, p.concentration)
    cos = (p.loc * q.loc).sum(-1)
    kl = p.log_normalizer - q.log_normalizer + a * (p.concentration - q.concentration * cos)
    return kl.clamp_min(0.0)


@register_kl(PowerSpherical, VonMisesFisher)
def _kl_ps_vmf(p: PowerSpherical, q: VonMisesFisher) -> Tensor:
    # E_p[log p - log q] = -H(p) - log C_q - kappa_q mu_q^T E_p[x]
    _check_same_dim(p, q)
    cos = (p.loc * q.loc).sum(-1)
    kl = -p.entropy() - q.log_normalizer - q.concentration * p._mean_cosine() * cos
    return kl.clamp_min(0.0)
