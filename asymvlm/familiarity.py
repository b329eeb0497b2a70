"""Unfamiliarity, the epistemic part of an answer's uncertainty: how far a query's frozen text
embedding lies from the texts the model was trained on.

:class:`Familiarity` is a compact density of the training texts (a mixture of von Mises-Fisher
components with one shared concentration) fitted at training time and saved with the model
(``familiarity.safetensors``, :mod:`asymvlm.confidence`). :func:`tail_p_value` and
:func:`percentile_of` place a value among a sorted reference (held-out training texts, calibrated
answers). :mod:`asymvlm.confidence` exports :class:`Familiarity`, :func:`tail_p_value` and
:func:`percentile_of`.

Example:
    >>> import torch
    >>> torch.manual_seed(0) and None
    >>> near, far = torch.eye(8)[:1], torch.eye(8)[1:2]
    >>> texts = torch.nn.functional.normalize(near + 0.1 * torch.randn(200, 8), dim=-1)
    >>> fam = Familiarity.fit(texts, components=4)
    >>> bool(fam.score(near) < fam.score(far))   # a text like the training texts is more familiar
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from asymvlm.errors import ArtefactError, ConfigError, InputError

__all__ = ["Familiarity", "tail_p_value", "percentile_of", "finite_float64"]


def finite_float64(x: Any, name: str) -> Tensor:
    """``x`` as a float64 CPU tensor; an :class:`~asymvlm.errors.InputError` naming ``name`` when it
    holds NaN or inf."""
    t = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"{name} contains NaN or inf")
    return t


def _kmeans_pp(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k-means++ seeding on the sphere (distance 1 - cos; Arthur & Vassilvitskii 2007)."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centers = [x[first]]
    d2 = (1 - x @ x[first]).clamp_min(0)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # fewer distinct points than k: the rest repeat
            centers.append(x[int(torch.randint(n, (1,), generator=gen))])
            continue
        j = int(torch.multinomial(d2 / total, 1, generator=gen))
        centers.append(x[j])
        d2 = torch.minimum(d2, (1 - x @ x[j]).clamp_min(0))
    return torch.stack(centers)


def _banerjee_kappa(r: float, d: int) -> float:
    """The vMF concentration of mean resultant length ``r`` in ``d`` dimensions (Banerjee et al.
    2005, eq. 4.4: ``kappa ~ r (d - r^2) / (1 - r^2)``), bounded to [1e-3, 1e5]."""
    r = min(max(r, 1e-6), 1 - 1e-9)
    return float(min(max(r * (d - r * r) / (1 - r * r), 1e-3), 1e5))


@dataclass
class Familiarity:
    """How typical a unit embedding is of a reference set (the texts a head was trained on).

    A mixture of ``K`` von Mises-Fisher components with one shared concentration ``kappa``, fitted by
    spherical k-means (Dhillon & Modha 2001) with the shared ``kappa`` from the pooled mean resultant
    length (Banerjee et al. 2005). The unfamiliarity of ``x`` is a soft cosine distance to the
    mixture, ``1 - (1/kappa) log sum_k pi_k exp(kappa mu_k^T x)``: about ``1 - max_k mu_k^T x`` (0 on
    a component's mean, 2 at its antipode), larger = less familiar. The shared normaliser cancels, so
    this is the mixture's negative log-density up to an affine map. It stores only the ``K``
    component means (each the mean of many texts), never the texts or their embeddings.

    Attributes:
        means: (K, d) unit component means.
        log_weights: (K,) log mixing weights.
        kappa: the shared concentration.
        reference: sorted unfamiliarity of held-out reference texts (the percentile scale).
        count: how many embeddings the density was fitted on.
    """

    means: Tensor
    log_weights: Tensor
    kappa: float
    reference: Tensor
    count: int

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @classmethod
    def fit(
        cls,
        embeddings: Tensor,
        *,
        components: int | None = None,
        iterations: int = 25,
        max_points: int = 100_000,
        holdout: float = 0.2,
        seed: int = 0,
    ) -> Familiarity:
        """Fit to (N, d) unit embeddings (rows may repeat: repeats weigh as often as they occur).

        Args:
            embeddings: the reference set (e.g. a head's training texts, frozen embeddings).
            components: K (default ``clamp(N_fit // 16, 1, 1024)``: about 16 embeddings per mean).
            iterations: spherical k-means iterations.
            max_points: a uniform subsample of at most this many rows is used.
            holdout: fraction of rows held out of the fit; their unfamiliarity is the reference
                scale (percentiles), so that in-distribution text sits at its true percentile.
            seed: the subsample, the split and the k-means++ seeding.
        """
        x = finite_float64(embeddings, "embeddings").float()
        if x.dim() != 2 or x.shape[0] < 2:
            raise InputError(f"fitting a familiarity density needs (N >= 2, d) embeddings, got {tuple(x.shape)}")
        norms = x.norm(dim=1)
        if bool(((norms - 1).abs() > 1e-3).any()):
            raise InputError("familiarity embeddings must be unit vectors")
        gen = torch.Generator().manual_seed(seed)
        if x.shape[0] > max_points:
            x = x[torch.randperm(x.shape[0], generator=gen)[:max_points]]
        perm = torch.randperm(x.shape[0], generator=gen)
        n_hold = int(round(holdout * x.shape[0])) if x.shape[0] >= 10 else 0
        held, fit = x[perm[:n_hold]], x[perm[n_hold:]]
        k = components if components is not None else min(1024, max(1, fit.shape[0] // 16))
        if not 1 <= k <= fit.shape[0]:
            raise ConfigError(f"components must be in [1, {fit.shape[0]}], got {k}")
        means = _kmeans_pp(fit, k, gen)
        for _ in range(iterations):
            assign = (fit @ means.T).argmax(1)
            sums = torch.zeros_like(means).index_add_(0, assign, fit)
            empty = sums.norm(dim=1) == 0
            new = torch.nn.functional.normalize(sums, dim=1)
            new[empty] = means[empty]
            if torch.equal(new, means):
                break
            means = new
        assign = (fit @ means.T).argmax(1)
        counts = torch.bincount(assign, minlength=k).double()
        keep = counts > 0
        means, counts = means[keep], counts[keep]
        r = float((fit @ means.T).amax(1).double().mean())  # each text's cosine to its nearest mean
        fam = cls(
            means, torch.log(counts / counts.sum()).float(), _banerjee_kappa(r, x.shape[1]), torch.empty(0), len(x)
        )
        ref = held if held.shape[0] else fit
        fam.reference = torch.sort(fam.score(ref).double()).values
        return fam

    def score(self, x: Tensor, chunk: int = 8192) -> Tensor:
        """(N,) unfamiliarity of unit embeddings ``x`` (N, d) (float32)."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise InputError(f"need (N, {self.dim}) embeddings, got {tuple(x.shape)}")
        out = []
        for s in range(0, x.shape[0], chunk):
            cos = x[s : s + chunk].float() @ self.means.T  # (n, K)
            lse = torch.logsumexp(self.kappa * cos.double() + self.log_weights.double(), dim=1)
            out.append((1 - lse / self.kappa).float())
        return torch.cat(out) if out else torch.empty(0)

    def percentile(self, u: Tensor) -> Tensor:
        """(N,) mid-rank percentile of unfamiliarity ``u`` among the reference texts (0-100)."""
        return percentile_of(self.reference, u)

    def p_value(self, u: Tensor, tail: float = 0.1) -> Tensor:
        """(N,) the chance that a reference text is at least this unfamiliar (:func:`tail_p_value`)."""
        return tail_p_value(self.reference, u, tail)

    def tensors(self) -> dict[str, Tensor]:
        return {"means": self.means.float(), "log_weights": self.log_weights.float(), "reference": self.reference}

    def meta(self) -> dict[str, Any]:
        return {"kappa": self.kappa, "count": self.count, "components": int(self.means.shape[0]), "dim": self.dim}

    @classmethod
    def from_saved(cls, tensors: Mapping[str, Tensor], meta: Mapping[str, Any], where: str) -> Familiarity:
        missing = {"means", "log_weights", "reference"} - set(tensors)
        if missing:
            raise ArtefactError(f"{where}: missing tensor(s) {sorted(missing)}")
        means, lw, ref = tensors["means"].float(), tensors["log_weights"].float(), tensors["reference"].double()
        kappa = meta.get("kappa")
        if (
            means.dim() != 2
            or lw.shape != means.shape[:1]
            or ref.dim() != 1
            or not isinstance(kappa, (int, float))
            or not 0 < kappa < math.inf
        ):
            raise ArtefactError(f"{where}: inconsistent familiarity density (means, weights, kappa)")
        for name, t in (("means", means), ("log_weights", lw), ("reference", ref)):
            if not bool(torch.isfinite(t).all()):
                raise ArtefactError(f"{where}: {name} contains NaN or inf")
        if bool(((means.norm(dim=1) - 1).abs() > 1e-3).any()):
            raise ArtefactError(f"{where}: familiarity means are not unit vectors")
        if ref.numel() > 1 and bool((ref[1:] < ref[:-1]).any()):
            raise ArtefactError(f"{where}: the familiarity reference is not sorted")
        return cls(means, lw, float(kappa), ref, int(meta.get("count", 0)))


def tail_p_value(sorted_ref: Tensor, u: Tensor, tail: float = 0.1) -> Tensor:
    """(N,) the chance that a reference value is at least ``u``: the conformal p-value
    ``(1 + #{reference >= u}) / (n + 1)`` (Vovk et al. 2005) inside the reference's bulk, and beyond
    its ``1 - tail`` quantile an exponential tail fitted to the excesses over that quantile (peaks
    over threshold, Pickands 1975), so that a value beyond every reference value still gets a graded,
    ever smaller p-value.

    Example:
        >>> ref = torch.arange(100, dtype=torch.float64)
        >>> [round(float(p), 4) for p in tail_p_value(ref, torch.tensor([50.0, 99.0, 200.0]))]
        [0.505, 0.0177, 0.0]
    """
    ref = sorted_ref.double()
    u = u.double().contiguous()
    above = ref.numel() - torch.searchsorted(ref, u, right=False)
    p = (1.0 + above.double()) / (ref.numel() + 1.0)
    n_tail = int(math.floor(tail * ref.numel()))
    if n_tail >= 2:
        threshold = ref[ref.numel() - n_tail - 1]
        scale = float((ref[ref.numel() - n_tail :] - threshold).mean())
        if scale > 0:
            p_tail = (n_tail + 1.0) / (ref.numel() + 1.0) * torch.exp(-(u - threshold) / scale)
            p = torch.where(u > threshold, p_tail, p)
    return p


def percentile_of(sorted_ref: Tensor, u: Tensor) -> Tensor:
    """(N,) float64 mid-rank percentile (0-100; ties count half, so a value equal to every reference
    sits at 50) of each ``u`` among ``sorted_ref``; NaN without a reference.

    Example:
        >>> ref = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
        >>> percentile_of(ref, torch.tensor([0.2, 1.0], dtype=torch.float64)).tolist()
        [50.0, 100.0]
    """
    u = u.double().contiguous()
    if sorted_ref.numel() == 0:
        return torch.full_like(u, math.nan)
    sorted_ref = sorted_ref.double()
    below = torch.searchsorted(sorted_ref, u, right=False)
    at_or_below = torch.searchsorted(sorted_ref, u, right=True)
    return 100.0 * (below + at_or_below).double() / (2 * sorted_ref.numel())
