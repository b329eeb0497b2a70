"""The unit sphere S^{d-1} as ``torch.distributions`` sees it: its constraint, the base class of the
rotationally symmetric families on it, and the uniform distribution.

* :data:`sphere`: the support constraint (unit vectors along the last dimension, ``event_dim = 1``,
  Pyro's ``_Sphere``), with a tolerance of the dtype's precision;
* :class:`SphericalDistribution`: the base of the families ``p(x) = f(mu^T x)`` of
  :mod:`asymvlm.distributions` (``loc``, ``concentration``, argument checks, moments from those of
  ``t = mu^T x``, ``pairwise_log_prob`` as one matmul, ``to_dict``);
* :class:`HypersphericalUniform` on S^{d-1}, and :func:`tangent_uniform` (uniform unit vectors
  orthogonal to a direction: the tangent part of every family's sampler).

:mod:`asymvlm.distributions` exports every name of this module.

Example:
    >>> import math, torch
    >>> bool(sphere.check(torch.tensor([[0.6, 0.8], [1.0, 1.0]]))[0]), HypersphericalUniform(3).dim
    (True, 3)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Distribution, constraints

from asymvlm.errors import InputError
from asymvlm.special import log_sphere_area

__all__ = ["sphere", "SphericalDistribution", "HypersphericalUniform", "tangent_uniform"]


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
    """Raise :class:`~asymvlm.errors.InputError` naming the first non-finite or non-unit vector and its norm."""
    if value.dim() < 1:
        raise InputError(f"{name} must have at least one dimension (the event dimension)")
    finite = torch.isfinite(value).all(-1)
    if not bool(finite.all()):
        idx = _first_bad(~finite)
        raise InputError(f"{name} has non-finite entries in the vector at batch index {idx}")
    norm = torch.linalg.vector_norm(value, dim=-1)
    bad = (norm - 1).abs() > _unit_tolerance(value.dtype)
    if bool(bad.any()):
        idx = _first_bad(bad)
        raise InputError(
            f"{name} must be unit vectors along the last dimension; found norm "
            f"{float(norm[idx]):.6g} at batch index {idx} (tolerance "
            f"{_unit_tolerance(value.dtype):.1e} for {value.dtype}). Normalise it, e.g. "
            f"torch.nn.functional.normalize({name}, dim=-1)."
        )


def _check_concentration(kappa: Tensor) -> None:
    bad = ~torch.isfinite(kappa) | (kappa < 0)
    if bool(bad.any()):
        idx = _first_bad(bad) if kappa.dim() else ()
        raise InputError(f"concentration must be finite and >= 0; found {float(kappa[idx])} at index {idx}")


def _finite_or_none(x: Any) -> Any:
    """Nested lists with every non-finite float replaced by None (strict JSON has no inf)."""
    if isinstance(x, list):
        return [_finite_or_none(v) for v in x]
    return x if math.isfinite(x) else None


def tangent_uniform(loc: Tensor, shape: torch.Size, generator: Any = None) -> Tensor:
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
            raise InputError(f"loc must have shape (..., d) with ambient dimension d >= 2, got {tuple(loc.shape)}")
        if concentration.dim() == loc.dim() and concentration.shape[-1] == 1:
            raise InputError(
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
            raise InputError(
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
            >>> from asymvlm.distributions import VonMisesFisher
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
            raise InputError("The value argument to log_prob must be a Tensor")
        if value.dim() < 1 or value.shape[-1] != self.dim:
            raise InputError(
                f"value must have shape (..., {self.dim}) to match the distribution's event "
                f"shape, got {tuple(value.shape)}"
            )
        try:
            torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        except RuntimeError as err:
            raise InputError(
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
            raise InputError(f"pairwise_log_prob needs a 1-D batch, got batch shape {tuple(self.batch_shape)}")
        if points.dim() != 2 or points.shape[-1] != self.dim:
            raise InputError(f"points must have shape (I, {self.dim}), got {tuple(points.shape)}")
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
            raise InputError(f"dim is the ambient dimension and must be an integer >= 2, got {dim!r}")
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
                raise InputError(f"value must have shape (..., {self.dim}), got {tuple(value.shape)}")
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
