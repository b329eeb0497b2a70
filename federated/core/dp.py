"""Differential privacy for the server step: the Gaussian mechanism on clipped client releases.

DP-FedAvg (McMahan, Ramage, Talwar & Zhang 2018, "Learning Differentially Private Recurrent
Language Models", https://arxiv.org/abs/1710.06963), user-level DP with add/remove-one-client
adjacency:

1. clients are sampled by **Poisson sampling** with rate ``q`` (each independently);
2. each client's *whole* release (every tensor it sends; in the exact LoRA modes also the dense
   change of every adapted layer) is clipped to one joint L2 norm ``S``;
3. the server adds Gaussian noise ``N(0, sigma^2 S^2)`` to every coordinate of the **sum** of the
   clipped releases (the sum's sensitivity is ``S``), and divides by the *fixed* expected number of
   participants ``q N`` (not the realised count, which would itself reveal a participant);
4. everything after that (server optimizer, LoRA folding, the released model) is post-processing;
5. **every round is released and accounted**, also one whose Poisson sample is empty (the release
   is then the noise alone): skipping it would make the released sequence depend on who is in the
   data, outside what the accountant covers (the rounds in :mod:`asymvlm.federated.rounds`).

Each participant counts with weight 1: example counts are the clients' private data and
unbounded, so weighting by them would make the sensitivity unbounded (McMahan et al. weight by
``min(n_k / n_cap, 1)``; uniform weights are that rule with ``n_cap`` at most the smallest
count). The privacy loss over T rounds is opacus's RDP accountant for the subsampled Gaussian
mechanism with ``(sigma, q, T)`` (:meth:`DifferentialPrivacy.epsilon`), whose analysis assumes
exactly this Poisson sampling.

Only aggregators with ``mean_type`` compose with it (:func:`check_dp_compatible`): a robust
rule (median, trimmed mean, Krum) outputs individual clients' coordinates or selects clients, so
its output has no bounded sensitivity to one client and the Gaussian mechanism on a sum says
nothing about it; AdaFedAdam and q-FFL weight clients by their (private, unclipped) losses.

Noise comes from the operating system's CSPRNG (``os.urandom``, Box–Muller in float64) and is
never stored. ``insecure_seed`` makes it reproducible for tests only; every report then says
``INSECURE``.

Example:
    >>> import torch
    >>> dp = DifferentialPrivacy(noise_multiplier=0.0, clip_norm=1.0, sample_rate=1.0, num_clients=2)
    >>> res = dp.aggregate([{"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([0.0, 0.5])}])
    >>> [round(x, 6) for x in res.delta["w"].tolist()]  # (clip([3, 4]) + [0, 0.5]) / (q N)
    [0.3, 0.65]
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from asymvlm.errors import ConfigError, MissingExtraError
from asymvlm.federated.core.aggregators import AggregateResult, Aggregator
from asymvlm.federated.core.tree import Params, keys_of

__all__ = ["DifferentialPrivacy", "DPCompositionError", "check_dp_compatible", "secure_gaussian", "dp_epsilon"]


class DPCompositionError(ConfigError):
    """A rule that has no sound differential-privacy analysis was combined with DP."""


def check_dp_compatible(aggregator: Aggregator, name: str, valid: Sequence[str] = ()) -> None:
    """Raise :class:`DPCompositionError` unless ``aggregator`` is a mean-type rule."""
    if getattr(aggregator, "mean_type", False):
        return
    listing = f"; DP composes with: {', '.join(valid)}" if valid else ""
    raise DPCompositionError(
        f"differential privacy cannot be combined with {name!r} ({type(aggregator).__name__}): the Gaussian "
        f"mechanism bounds a sum of clipped updates, and this rule selects, orders or loss-weights individual "
        f"updates, so no sound DP analysis covers its output{listing}"
    )


def secure_gaussian(shape: Sequence[int], dtype: torch.dtype, std: float) -> Tensor:
    """``N(0, std^2)`` samples from ``os.urandom`` (the OS CSPRNG): Box–Muller on 53-bit uniforms."""
    n = int(math.prod(shape))
    pairs = (n + 1) // 2
    raw = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64).reshape(2, pairs)
    u1 = ((raw[0] >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53  # (0, 1]: log is finite
    u2 = (raw[1] >> np.uint64(11)).astype(np.float64) * 2.0**-53
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])[:n]
    return torch.from_numpy(z * std).to(dtype).reshape(tuple(shape))


def dp_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """The (epsilon, delta) bound after ``rounds`` subsampled Gaussian mechanisms (opacus RDP)."""
    if rounds == 0:
        return 0.0
    try:
        from opacus.accountants import RDPAccountant
    except ImportError as err:
        raise MissingExtraError("differential privacy accounting needs opacus: pip install 'asymvlm[dp]'") from err
    acc = RDPAccountant()
    acc.history = [(float(noise_multiplier), float(sample_rate), int(rounds))]
    return float(acc.get_epsilon(delta))


@dataclass(frozen=True)
class DifferentialPrivacy:
    """The DP wrapper of a recipe's mean-type aggregation (module docstring).

    Attributes:
        noise_multiplier: ``sigma`` (> 0 for a privacy guarantee; 0 clips only and reports no epsilon).
        clip_norm: ``S``, the joint L2 bound of one client's release.
        sample_rate: ``q``, each client's Poisson participation probability per round.
        num_clients: ``N``; the fixed denominator is ``q N``.
        delta: the target delta of the reported epsilon.
        insecure_seed: tests only: seed a reproducible (predictable) noise stream.
    """

    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    num_clients: int
    delta: float = 1e-5
    insecure_seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ConfigError(f"dp_noise_multiplier must be >= 0 and finite, got {self.noise_multiplier}")
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ConfigError(f"dp_max_norm must be > 0 and finite, got {self.clip_norm}")
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"the client sampling rate must be in (0, 1], got {self.sample_rate}")
        if self.num_clients < 1:
            raise ConfigError(f"num_clients must be >= 1, got {self.num_clients}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"dp_delta must be in (0, 1), got {self.delta}")

    @property
    def secure(self) -> bool:
        return self.insecure_seed is None

    @property
    def denominator(self) -> float:
        return self.sample_rate * self.num_clients

    def noise_std(self) -> float:
        """Per-coordinate standard deviation of the noise on the released mean."""
        return self.noise_multiplier * self.clip_norm / self.denominator

    def epsilon(self, rounds: int) -> float | None:
        return (
            dp_epsilon(self.noise_multiplier, self.sample_rate, rounds, self.delta) if self.noise_multiplier else None
        )

    def describe(self) -> dict[str, Any]:
        return {
            "mechanism": "Gaussian on the sum of jointly clipped client releases, Poisson client sampling",
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.clip_norm,
            "sample_rate": self.sample_rate,
            "denominator": self.denominator,
            "delta": self.delta,
            "noise_source": "os.urandom (CSPRNG)" if self.secure else "INSECURE seeded test stream",
        }

    def aggregate(
        self,
        messages: Sequence[Mapping[str, Tensor]],
        *,
        frozen: Collection[str] = (),
        round_index: int = 0,
    ) -> AggregateResult:
        """``(sum_k clip(m_k) + N(0, sigma^2 S^2)) / (q N)`` for every released key (``frozen`` keys,
        which clients never change, are left at exactly zero and not part of the norm)."""
        keys = keys_of(messages) if messages else []
        released = [k for k in keys if k not in frozen]
        norms = []
        for m in messages:
            sq = sum(float(m[k].double().pow(2).sum()) for k in released)
            norms.append(math.sqrt(sq))
        factors = [min(1.0, self.clip_norm / n) if n > 0 else 1.0 for n in norms]
        gen = None
        if not self.secure:
            seq = np.random.SeedSequence([int(self.insecure_seed), int(round_index)])
            gen = torch.Generator().manual_seed(int(seq.generate_state(1, np.uint64)[0] >> np.uint64(1)))
        std = self.noise_multiplier * self.clip_norm  # on the sum
        out: Params = {}
        for k in keys:
            acc = None
            for f, m in zip(factors, messages):
                acc = m[k] * f if acc is None else acc.add_(m[k], alpha=f)
            if k in frozen:
                out[k] = torch.zeros_like(acc)
                continue
            if std > 0:
                noise = (
                    secure_gaussian(acc.shape, torch.float64, std)
                    if gen is None
                    else torch.randn(acc.shape, generator=gen, dtype=torch.float64) * std
                )
                acc = (acc.double() + noise).to(acc.dtype)
            out[k] = acc / self.denominator
        return AggregateResult(
            out,
            {
                "dp_norms": norms,
                "dp_clip_factors": factors,
                "dp_noise_std": self.noise_std(),
                "participants": len(messages),
            },
        )
