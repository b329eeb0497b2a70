"""Probabilistic text heads: frozen text embedding -> distribution on the sphere.

AsymVLM (Ju et al., NeurIPS 2025, https://arxiv.org/abs/2505.11029) maps a frozen text
embedding ``x`` (N, d) through an MLP to ``eta`` (N, d) and reads the distribution off it:
``loc = eta / |eta|`` and ``concentration = |eta|``; ``1 / concentration`` is the text's
uncertainty. The default MLP is the paper's, d -> 1024 -> 1024 -> 1024 -> d with ReLU.

The family (``"vmf"`` or ``"ps"``) is an entry of :data:`FAMILY_REGISTRY`, which declares each
family's options and reference (``FAMILY_REGISTRY.describe()``); :func:`make_distribution` builds
one. :func:`family_class` gives a family's distribution class.

Options beyond the paper:

* ``direction="frozen"`` (the default of ``HeadConfig`` and of ``asymvlm-train``): ``loc = x``, the
  frozen text embedding itself, and only ``concentration = |eta|`` is learned. The promise of
  uncertainty *added* to a frozen model then holds by construction: text->image rankings by
  log-likelihood are the frozen model's cosine rankings (for a fixed text both vMF and Power
  Spherical log-densities increase with ``loc . x``), and the concentration says how specific the
  text is. Measured on real text (MiniLM, d = 384) a learned direction lost a quarter or more of
  the frozen model's exact R@1, with or without the residual start (README, "Real text").
  ``direction="learned"`` is the paper's ``loc = eta / |eta|``;
* ``hidden_dims`` / ``activation`` for other widths and depths;
* ``residual=True``: ``eta = init_concentration * x + MLP(x)`` with the MLP's last layer
  initialised to zero, so an untrained head has ``loc == x`` for unit ``x`` and retrieves
  exactly like the frozen CLIP model, with a constant concentration;
* concentration bounds: ``concentration = clamp(|eta|, min_concentration, max_concentration)``
  (defaults 1e-3 and 1e5) while ``loc = eta / |eta|`` stays the exact direction. The lower
  bound keeps ``1/concentration`` finite; the upper bound keeps float32 log-likelihoods
  (which grow like ``kappa``) resolvable: at 1e5 float32 still separates them by ~0.01 nats.
  The clamp has zero gradient outside the bounds, as usual.

Example:
    >>> import torch
    >>> from asymvlm.heads import TextHead
    >>> head = TextHead(dim=512, family="vmf")
    >>> q = head(torch.nn.functional.normalize(torch.randn(3, 512), dim=-1))
    >>> q.loc.shape, q.concentration.shape
    (torch.Size([3, 512]), torch.Size([3]))
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from asymvlm.distributions import PowerSpherical, SphericalDistribution, VonMisesFisher
from asymvlm.errors import ConfigError, InputError, InputTypeError
from asymvlm.registry import Param, Registry

__all__ = [
    "FAMILY_REGISTRY",
    "family_class",
    "family_of",
    "make_distribution",
    "ACTIVATIONS",
    "DIRECTIONS",
    "HeadConfig",
    "MAX_WIDTH",
    "MAX_HEAD_PARAMETERS",
    "check_head_fields",
    "TextHead",
    "check_embeddings",
]

# ----------------------------------------------------------------------------------------------
# distribution families: name -> constructor (loc, concentration) of a SphericalDistribution
# ----------------------------------------------------------------------------------------------
# ``FAMILY_REGISTRY.build(name, **options)`` returns a constructor ``(loc (N, d), concentration (N,))
# -> distribution``; ``FAMILY_REGISTRY[name].extra["cls"]`` is the class (see make_distribution).
FAMILY_REGISTRY = Registry("family")

_VALIDATE_ARGS = Param(
    "validate_args",
    bool,
    None,
    "Check that loc is unit and concentration finite and >= 0 (None: torch.distributions' global default).",
    reference="https://pytorch.org/docs/stable/distributions.html#torch.distributions.distribution.Distribution",
)


def _family_factory(cls: type[SphericalDistribution]) -> Callable[..., Callable[..., SphericalDistribution]]:
    def factory(validate_args: bool | None = None) -> Callable[..., SphericalDistribution]:
        return functools.partial(cls, validate_args=validate_args)

    return factory


FAMILY_REGISTRY.register(
    "vmf",
    params=[_VALIDATE_ARGS],
    help="von Mises-Fisher vMF(mu, kappa): density C_d(kappa) exp(kappa mu^T x), exact log-space normaliser.",
    reference="Banerjee et al. 2005 https://jmlr.org/papers/v6/banerjee05a.html; Mardia & Jupp 2000 sec. 9.3; "
    "sampling: Wood 1994 https://doi.org/10.1080/03610919408813161",
    cls=VonMisesFisher,
)(_family_factory(VonMisesFisher))
FAMILY_REGISTRY.register(
    "ps",
    params=[_VALIDATE_ARGS],
    help="Power Spherical PS(mu, kappa): density C(kappa) (1 + mu^T x)^kappa, closed-form normaliser and sampler.",
    reference="De Cao & Aziz 2020 https://arxiv.org/abs/2006.04437",
    cls=PowerSpherical,
)(_family_factory(PowerSpherical))

def family_class(family: str) -> type[SphericalDistribution]:
    """The distribution class of a family (a :class:`~asymvlm.errors.ConfigError` naming the valid ones).

    Example:
        >>> family_class("vmf").__name__
        'VonMisesFisher'
    """
    return FAMILY_REGISTRY.entry(family).extra["cls"]


def family_of(distribution: Any) -> str | None:
    """The family name of a distribution instance, or None if it is of no registered family."""
    for name, entry in FAMILY_REGISTRY.items():
        if isinstance(distribution, entry.extra["cls"]):
            return name
    return None


def make_distribution(family: str, loc: Tensor, concentration: Tensor, **options: Any) -> SphericalDistribution:
    """``family``'s distribution over ``loc`` (N, d) and ``concentration`` (N,), ``options`` checked
    against the family's declared parameters (see ``FAMILY_REGISTRY.describe()``).

    Example:
        >>> import torch
        >>> make_distribution("vmf", torch.eye(4)[:1], torch.tensor([3.0])).concentration
        tensor([3.])
    """
    return FAMILY_REGISTRY.build(family, **options)(loc, concentration)


ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
DIRECTIONS = ("frozen", "learned")  # where loc comes from (HeadConfig.direction)


def check_embeddings(x: Tensor, dim: int, name: str, *, unit: bool = False, row_offset: int = 0) -> None:
    """Validate a (N, dim) embedding matrix; raise :class:`~asymvlm.errors.InputError` naming the bad
    shape or row (:class:`~asymvlm.errors.InputTypeError` for a non-tensor or a non-float one).

    Args:
        x: tensor expected to be ``(N, dim)``.
        dim: expected embedding dimension.
        name: how to call it in messages, e.g. ``"text embeddings"``.
        unit: also require unit L2 norm per row.
        row_offset: added to reported row numbers (when ``x`` is a slice of a larger matrix).
    """
    if not isinstance(x, Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise InputError(f"{name} must have shape (N, {dim}), got {tuple(x.shape)}")
    if x.shape[1] != dim:
        raise InputError(
            f"{name} have dimension {x.shape[1]} (shape {tuple(x.shape)}) but {dim} is expected: "
            f"the head/model was built for d={dim}"
        )
    if not x.is_floating_point():
        raise InputTypeError(f"{name} must be floating point, got {x.dtype}")
    finite = torch.isfinite(x).all(-1)
    if not bool(finite.all()):
        row = int(torch.nonzero(~finite)[0, 0])
        raise InputError(f"{name}: row {row + row_offset} contains NaN or inf")
    if unit:
        norms = torch.linalg.vector_norm(x.float(), dim=-1)
        tol = 1e-2 if x.dtype in (torch.float16, torch.bfloat16) else 10 * torch.finfo(x.dtype).eps ** 0.5
        bad = (norms - 1).abs() > tol
        if bool(bad.any()):
            row = int(torch.nonzero(bad)[0, 0])
            raise InputError(
                f"{name} must be unit vectors: row {row + row_offset} has norm {float(norms[row]):.6g}. "
                f"L2-normalise them first (torch.nn.functional.normalize(x, dim=-1))."
            )


MAX_WIDTH = 1 << 16  # the widest embedding or hidden layer a head config may ask for (the paper's: 1024)
MAX_HEAD_PARAMETERS = 1 << 28  # 1 GiB of float32: far above any head (the paper's at d=1024: 4.2M), far below a hang


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def check_head_fields(config: Any) -> None:
    """Check every field of a :class:`HeadConfig` (types and ranges) before anything is allocated;
    a :class:`~asymvlm.errors.ConfigError` naming the field otherwise. Normalises ``hidden_dims`` to
    a tuple of ints and the bounds to floats (on the frozen instance)."""
    c = config
    for name in ("family", "activation", "direction"):
        if not isinstance(getattr(c, name), str):
            raise ConfigError(f"{name} must be a string, got {getattr(c, name)!r}")
    FAMILY_REGISTRY.entry(c.family)  # ConfigError "unknown family ...; choose one of [...]"
    if c.direction not in DIRECTIONS:
        raise ConfigError(f"unknown direction {c.direction!r}; choose one of {list(DIRECTIONS)}")
    if c.activation not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {c.activation!r}; choose one of {sorted(ACTIVATIONS)}")
    if not _is_int(c.dim) or not 2 <= c.dim <= MAX_WIDTH:
        raise ConfigError(f"dim must be an integer in [2, {MAX_WIDTH}], got {c.dim!r}")
    hidden = c.hidden_dims
    if not isinstance(hidden, (list, tuple)) or not all(_is_int(h) and 1 <= h <= MAX_WIDTH for h in hidden):
        raise ConfigError(f"hidden_dims must be a list of integer widths in [1, {MAX_WIDTH}], got {hidden!r}")
    object.__setattr__(c, "hidden_dims", tuple(int(h) for h in hidden))
    widths = (int(c.dim), *c.hidden_dims, int(c.dim))
    count = sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:]))
    if count > MAX_HEAD_PARAMETERS:
        raise ConfigError(
            f"hidden_dims {list(c.hidden_dims)} with dim {c.dim} make a head of {count:,} parameters, more than "
            f"{MAX_HEAD_PARAMETERS:,}"
        )
    object.__setattr__(c, "dim", int(c.dim))
    if not isinstance(c.residual, bool):
        raise ConfigError(f"residual must be true or false, got {c.residual!r}")
    for name in ("init_concentration", "min_concentration", "max_concentration"):
        value = getattr(c, name)
        if not _is_number(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        object.__setattr__(c, name, float(value))
    if not 0 < c.min_concentration < c.max_concentration:
        raise ConfigError(
            f"need 0 < min_concentration < max_concentration, got {c.min_concentration}, {c.max_concentration}"
        )
    if c.residual and c.init_concentration <= 0:
        raise ConfigError(f"init_concentration must be > 0, got {c.init_concentration}")


@dataclass(frozen=True)
class HeadConfig:
    """Architecture of a :class:`TextHead` (what ``save_pretrained`` stores)."""

    dim: int = field(default=512, metadata={"help": "Embedding dimension d of the frozen encoder."})
    family: str = field(default="vmf", metadata={"help": "Distribution family: 'vmf' or 'ps'."})
    hidden_dims: tuple[int, ...] = field(
        default=(1024, 1024, 1024), metadata={"help": "Hidden layer widths of the MLP (paper: 1024 x 3)."}
    )
    activation: str = field(default="relu", metadata={"help": f"Activation: one of {sorted(ACTIVATIONS)}."})
    direction: str = field(
        default="frozen",
        metadata={
            "help": "'frozen': loc is the frozen text embedding, only the concentration is learned; "
            "'learned': loc = eta / |eta| (the paper)."
        },
    )
    residual: bool = field(
        default=False,
        metadata={"help": "eta = init_concentration * x + MLP(x), last layer zero-initialised."},
    )
    init_concentration: float = field(
        default=10.0, metadata={"help": "Concentration of an untrained residual head (unit inputs)."}
    )
    min_concentration: float = field(default=1e-3, metadata={"help": "Lower bound on concentration."})
    max_concentration: float = field(default=1e5, metadata={"help": "Upper bound on concentration."})

    def __post_init__(self) -> None:
        check_head_fields(self)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden_dims"] = list(self.hidden_dims)
        return d


class TextHead(nn.Module):
    """Map frozen text embeddings (N, d) to a vMF or Power Spherical distribution.

    Args:
        dim: embedding dimension d (input and output).
        family: ``"vmf"`` or ``"ps"``.
        hidden_dims, activation, direction, residual, init_concentration, min_concentration, max_concentration:
            see :class:`HeadConfig` and the module docstring.
        config: a ready :class:`HeadConfig` instead of the keyword arguments.
        validate: check inputs (shape, finiteness) on every call (one host sync per call).

    Example:
        >>> import torch
        >>> head = TextHead(dim=8, hidden_dims=(16,), direction="learned", residual=True, init_concentration=20.0)
        >>> x = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
        >>> q = head(x)
        >>> torch.allclose(q.loc, x, atol=1e-6), torch.allclose(q.concentration, torch.full((2,), 20.0))
        (True, True)
    """

    def __init__(
        self,
        dim: int = 512,
        family: str = "vmf",
        *,
        hidden_dims=(1024, 1024, 1024),
        activation: str = "relu",
        direction: str = "frozen",
        residual: bool = False,
        init_concentration: float = 10.0,
        min_concentration: float = 1e-3,
        max_concentration: float = 1e5,
        config: HeadConfig | None = None,
        validate: bool = True,
    ):
        super().__init__()
        if config is None:
            config = HeadConfig(
                dim=dim,
                family=family,
                hidden_dims=tuple(hidden_dims) if isinstance(hidden_dims, (list, tuple, range)) else hidden_dims,
                activation=activation,
                direction=direction,
                residual=residual,
                init_concentration=init_concentration,
                min_concentration=min_concentration,
                max_concentration=max_concentration,
            )
        self.config = config
        self.validate = validate
        widths = (config.dim, *config.hidden_dims, config.dim)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(ACTIVATIONS[config.activation]())
        self.mlp = nn.Sequential(*layers)
        if config.residual:
            last = self.mlp[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def family(self) -> str:
        return self.config.family

    def eta(self, text_embeddings: Tensor) -> Tensor:
        """The unconstrained natural parameter ``eta`` (N, d)."""
        if self.validate:
            check_embeddings(text_embeddings, self.dim, "text embeddings")
        x = text_embeddings.to(self.mlp[0].weight.dtype)
        out = self.mlp(x)  # (N, d)
        if self.config.residual:
            out = out + self.config.init_concentration * x
        return out

    def loc_concentration(self, text_embeddings: Tensor) -> tuple[Tensor, Tensor]:
        """``(loc (N, d), concentration (N,))`` with the documented bounds applied."""
        eta = self.eta(text_embeddings)
        norm = torch.linalg.vector_norm(eta, dim=-1)  # (N,)
        if self.config.direction == "frozen":  # the (unit) frozen embedding itself, as given: rankings stay exact
            loc = text_embeddings.to(eta.dtype)
        else:
            loc = eta / norm.clamp_min(torch.finfo(eta.dtype).tiny).unsqueeze(-1)  # (N, d), unit unless eta == 0
        kappa = norm.clamp(self.config.min_concentration, self.config.max_concentration)
        return loc, kappa

    def forward(self, text_embeddings: Tensor) -> SphericalDistribution:
        """Distribution over image embeddings for each text: batch shape (N,), event (d,)."""
        loc, kappa = self.loc_concentration(text_embeddings)
        return family_class(self.config.family)(loc, kappa, validate_args=False)

    def uncertainty(self, text_embeddings: Tensor) -> Tensor:
        """``1 / concentration`` (N,)."""
        return 1.0 / self.loc_concentration(text_embeddings)[1]
