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
with a closed form: vMF||U, PS||U, U||vMF, U||PS, vMF||vMF, PS||vMF.

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
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Distribution, Gamma, constraints
from torch.distributions.kl import register_kl

from asymvlm.special import (
    bessel_ratio,
    log_sphere_area,
    vmf_log_density_ratio_at_mode,
    vmf_log_normalizer,
)

__all__ = [
    "sphere",
    "VonMisesFisher",
    "PowerSpherical",
    "HypersphericalUniform",
    "SphericalDistribution",
    "power_spherical_log_normalizer",
]


# --------------------------------------------------------------------------------------------
# The sphere constraint
# --------------------------------------------------------------------------------------------
def _unit_tolerance(dtype: torch.dtype) -> float:
    # 10 sqrt(eps): 3.5e-3 in float32, 1.5e-7 in float64. Generous enough for vectors that were
    # normalised in that precision and then went through a matmul, strict enough to catch
    # un-normalised inputs.
    return 10.0 * math.sqrt(torch.finfo(dtype).eps)


class _Sphere(constraints.Constraint):
    """Unit vectors along the last dimension (``event_dim = 1``)."""

    event_dim = 1

    def check(self, value: Tensor) -> Tensor:
        tol = _unit_tolerance(value.dtype)
        norm = torch.linalg.vector_norm(value, dim=-1)
        return ((norm - 1).abs() <= tol) & torch.isfinite(value).all(-1)

    def __repr__(self) -> str:
        return "sphere()"


sphere = _Sphere()


def _first_bad(mask: Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.nonzero(mask)[0].tolist())


def _check_unit(value: Tensor, name: str) -> None:
    """Raise ValueError naming the first non-finite or non-unit vector and its norm."""
    if value.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (the event dimension)")
    finite = torch.isfinite(value).all(-1)
    if not bool(finite.all()):
        idx = _first_bad(~finite)
        raise ValueError(f"{name} has non-finite entries in the vector at batch index {idx}")
    norm = torch.linalg.vector_norm(value, dim=-1)
    bad = (norm - 1).abs() > _unit_tolerance(value.dtype)
    if bool(bad.any()):
        idx = _first_bad(bad)
        raise ValueError(
            f"{name} must be unit vectors along the last dimension; found norm "
            f"{float(norm[idx]):.6g} at batch index {idx} (tolerance "
            f"{_unit_tolerance(value.dtype):.1e} for {value.dtype}). Normalise it, e.g. "
            f"torch.nn.functional.normalize({name}, dim=-1)."
        )


def _check_concentration(kappa: Tensor) -> None:
    bad = ~torch.isfinite(kappa) | (kappa < 0)
    if bool(bad.any()):
        idx = _first_bad(bad) if kappa.dim() else ()
        raise ValueError(f"concentration must be finite and >= 0; found {float(kappa[idx])} at index {idx}")


def _finite_or_none(x: Any) -> Any:
    """Nested lists with every non-finite float replaced by None (strict JSON has no inf)."""
    if isinstance(x, list):
        return [_finite_or_none(v) for v in x]
    return x if math.isfinite(x) else None


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


def _tangent_uniform(loc: Tensor, shape: torch.Size, generator: Any = None) -> Tensor:
    """Uniform unit vectors orthogonal to ``loc`` (the sphere S^{d-2} of the tangent space).

    The projection of an isotropic Gaussian onto the orthogonal complement of ``loc`` is an
    isotropic Gaussian there, so normalising it is uniform on that sphere. This avoids the
    Householder reflection and its special case at ``loc = e1``.
    """
    g = torch.randn(shape, dtype=loc.dtype, device=loc.device, generator=generator)
    g = g - (g * loc).sum(-1, keepdim=True) * loc
    return torch.nn.functional.normalize(g, dim=-1)


# --------------------------------------------------------------------------------------------
# Shared base class
# --------------------------------------------------------------------------------------------
class SphericalDistribution(Distribution):
    """Base for rotationally symmetric distributions ``p(x) = f(mu^T x)`` on S^{d-1}.

    Args:
        loc: mean direction, unit vectors of shape ``(..., d)``.
        concentration: ``kappa >= 0`` of shape ``(...)`` (the batch shape; no trailing event
            dim). Broadcast against ``loc.shape[:-1]``.
        validate_args: check that ``loc`` is unit, ``concentration`` finite and ``>= 0`` and
            samples passed to ``log_prob`` are unit vectors (torch's global default if None).
    """

    arg_constraints = {"loc": sphere, "concentration": constraints.nonnegative}
    support = sphere

    def __init__(self, loc: Tensor, concentration: Tensor | float, validate_args: bool | None = None):
        loc = torch.as_tensor(loc)
        if not loc.is_floating_point():
            loc = loc.to(torch.get_default_dtype())
        concentration = torch.as_tensor(concentration, device=loc.device)
        dtype = torch.promote_types(loc.dtype, concentration.dtype) if concentration.is_floating_point() else loc.dtype
        loc, concentration = loc.to(dtype), concentration.to(dtype)
        if loc.dim() < 1 or loc.shape[-1] < 2:
            raise ValueError(f"loc must have shape (..., d) with ambient dimension d >= 2, got {tuple(loc.shape)}")
        if concentration.dim() == loc.dim() and concentration.shape[-1] == 1:
            raise ValueError(
                f"concentration has shape {tuple(concentration.shape)}, with a trailing 1 like an "
                f"event dim; it must have the batch shape {tuple(loc.shape[:-1])} "
                f"(use concentration.squeeze(-1))"
            )
        validate = Distribution._validate_args if validate_args is None else validate_args
        if validate:
            _check_unit(loc, "loc")
            _check_concentration(concentration)
        try:
            batch_shape = torch.broadcast_shapes(loc.shape[:-1], concentration.shape)
        except RuntimeError as err:
            raise ValueError(
                f"loc batch shape {tuple(loc.shape[:-1])} and concentration shape "
                f"{tuple(concentration.shape)} do not broadcast"
            ) from err
        d = loc.shape[-1]
        self.loc = loc.expand(batch_shape + (d,))
        self.concentration = concentration.expand(batch_shape)
        super().__init__(batch_shape, torch.Size((d,)), validate_args=validate_args)

    family: str = ""  # the registry name of the family (asymvlm.heads.FAMILY_REGISTRY): "vmf", "ps"

    @property
    def dim(self) -> int:
        """Ambient dimension d (samples live on S^{d-1} in R^d)."""
        return self.event_shape[0]

    def to_dict(self) -> dict[str, Any]:
        """Plain Python (JSON-ready) form: ``family``, ``dim``, and ``mu``, ``kappa``, ``uncertainty``
        (``1/kappa``; None where ``kappa == 0``) as nested lists of the batch shape (floats for a
        scalar batch). The one serialisation of distributions, used by ``asymvlm-serve`` too.

        Example:
            >>> import torch
            >>> q = VonMisesFisher(torch.tensor([[0.0, 1.0]]), torch.tensor([4.0]))
            >>> q.to_dict()
            {'family': 'vmf', 'dim': 2, 'mu': [[0.0, 1.0]], 'kappa': [4.0], 'uncertainty': [0.25]}
        """
        kappa = self.concentration.detach().cpu()
        unc = torch.where(kappa > 0, 1.0 / kappa, torch.full_like(kappa, math.inf))
        return {
            "family": self.family or type(self).__name__,
            "dim": self.dim,
            "mu": self.loc.detach().cpu().tolist(),
            "kappa": kappa.tolist(),
            "uncertainty": _finite_or_none(unc.tolist()),
        }

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(type(self), _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        new.concentration = self.concentration.expand(batch_shape)
        Distribution.__init__(new, batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def _validate_sample(self, value: Tensor) -> None:
        if not isinstance(value, Tensor):
            raise ValueError("The value argument to log_prob must be a Tensor")
        if value.dim() < 1 or value.shape[-1] != self.dim:
            raise ValueError(
                f"value must have shape (..., {self.dim}) to match the distribution's event "
                f"shape, got {tuple(value.shape)}"
            )
        try:
            torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        except RuntimeError as err:
            raise ValueError(
                f"value batch shape {tuple(value.shape[:-1])} does not broadcast with the "
                f"distribution's batch shape {tuple(self.batch_shape)}"
            ) from err
        _check_unit(value, "value")

    def _cosine(self, value: Tensor) -> Tensor:
        """mu^T x (rounding may put it slightly outside [-1, 1]; families clamp if they must)."""
        return (value.to(self.loc.dtype) * self.loc).sum(-1)

    # moments of t = mu^T x; subclasses define them
    def _mean_cosine(self) -> Tensor:
        raise NotImplementedError

    def _mean_cosine_sq(self) -> Tensor:
        raise NotImplementedError

    @property
    def mean(self) -> Tensor:
        """``E[x] = E[mu^T x] mu``."""
        return self._mean_cosine().unsqueeze(-1) * self.loc

    @property
    def mode(self) -> Tensor:
        """``mu`` (for ``kappa = 0`` every point is a mode; ``mu`` is returned)."""
        return self.loc

    @property
    def variance(self) -> Tensor:
        """Per-coordinate variances, the diagonal of ``Cov[x]``.

        With ``t = mu^T x`` and the tangent part uniform on the orthogonal sphere:
        ``E[x x^T] = E[t^2] mu mu^T + (1 - E[t^2]) (I - mu mu^T) / (d - 1)``.
        """
        d = self.dim
        m1 = self._mean_cosine().unsqueeze(-1)
        m2 = self._mean_cosine_sq().unsqueeze(-1)
        tangential = (1 - m2) / (d - 1)
        return tangential + (m2 - m1 * m1 - tangential) * self.loc * self.loc

    def pairwise_log_prob(self, points: Tensor, log_normalizer: Tensor | None = None) -> Tensor:
        """Log density of every distribution of a 1-D batch at every point: ``(T, I)``.

        ``points`` are unit vectors ``(I, d)`` (not validated here); entry ``[t, i]`` is
        ``log p_t(x_i)``. One matmul, no ``(T, I, d)`` intermediate.
        :func:`asymvlm.losses.log_likelihood` adds validation and chunking over ``I``.

        Args:
            points: ``(I, d)`` unit vectors.
            log_normalizer: ``(T,)`` to use instead of the exact one (e.g. an approximation).
        """
        if len(self.batch_shape) != 1:
            raise ValueError(f"pairwise_log_prob needs a 1-D batch, got batch shape {tuple(self.batch_shape)}")
        if points.dim() != 2 or points.shape[-1] != self.dim:
            raise ValueError(f"points must have shape (I, {self.dim}), got {tuple(points.shape)}")
        if log_normalizer is None:
            log_normalizer = self.log_normalizer
        cos = self.loc @ points.to(self.loc.dtype).T  # (T, I)
        return self._log_prob_from_cosine(cos, self.concentration.unsqueeze(-1), log_normalizer.unsqueeze(-1))

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return self._log_prob_from_cosine(self._cosine(value), self.concentration, self.log_normalizer)

    @staticmethod
    def _log_prob_from_cosine(cos: Tensor, kappa: Tensor, log_norm: Tensor) -> Tensor:
        raise NotImplementedError

    @classmethod
    def _unnormalized_log_prob_(cls, cos: Tensor, kappa: Tensor) -> Tensor:
        """``log q(x) - log C(kappa)`` from the cosine, written over ``cos`` where the family can
        (the search's score buffer: no copy per chunk); this default is out of place."""
        return cls._log_prob_from_cosine(cos, kappa, torch.zeros((), dtype=cos.dtype, device=cos.device))

    @property
    def log_normalizer(self) -> Tensor:
        raise NotImplementedError


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
        x = cos.unsqueeze(-1) * loc + sin.unsqueeze(-1) * _tangent_uniform(loc, shape)
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
        return t * loc + sin * _tangent_uniform(loc, shape)


# --------------------------------------------------------------------------------------------
# Uniform
# --------------------------------------------------------------------------------------------
class HypersphericalUniform(Distribution):
    """Uniform distribution on S^{dim-1}, the unit sphere of R^dim (``dim`` is ambient).

    Args:
        dim: ambient dimension ``d >= 2``; ``event_shape == (d,)``.
        batch_shape: optional batch shape.
        dtype, device: of samples and log densities.

    Example:
        >>> u = HypersphericalUniform(3, dtype=torch.float64)
        >>> abs(float(u.entropy()) - math.log(4 * math.pi)) < 1e-15
        True
    """

    arg_constraints: dict = {}
    support = sphere
    has_rsample = True

    def __init__(
        self,
        dim: int,
        batch_shape=(),
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        validate_args: bool | None = None,
    ):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
            raise ValueError(f"dim is the ambient dimension and must be an integer >= 2, got {dim!r}")
        self._dtype = dtype or torch.get_default_dtype()
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        super().__init__(torch.Size(batch_shape), torch.Size((dim,)), validate_args=validate_args)

    @property
    def dim(self) -> int:
        return self.event_shape[0]

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(HypersphericalUniform, _instance)
        new._dtype, new._device = self._dtype, self._device
        Distribution.__init__(new, torch.Size(batch_shape), self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def log_area(self) -> float:
        """``log |S^{d-1}|``."""
        return log_sphere_area(self.dim)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            if value.dim() < 1 or value.shape[-1] != self.dim:
                raise ValueError(f"value must have shape (..., {self.dim}), got {tuple(value.shape)}")
            _check_unit(value, "value")
        shape = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        return torch.full(shape, -self.log_area, dtype=value.dtype, device=value.device)

    def entropy(self) -> Tensor:
        return torch.full(self.batch_shape, self.log_area, dtype=self._dtype, device=self._device)

    @property
    def mean(self) -> Tensor:
        return torch.zeros(self.batch_shape + self.event_shape, dtype=self._dtype, device=self._device)

    @property
    def variance(self) -> Tensor:
        return torch.full(self.batch_shape + self.event_shape, 1.0 / self.dim, dtype=self._dtype, device=self._device)

    def rsample(self, sample_shape=()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        g = torch.randn(shape, dtype=self._dtype, device=self._device)
        return torch.nn.functional.normalize(g, dim=-1)


# --------------------------------------------------------------------------------------------
# KL divergences (closed forms)
# --------------------------------------------------------------------------------------------
def _check_same_dim(p: Distribution, q: Distribution) -> None:
    if p.event_shape != q.event_shape:
        raise ValueError(
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
