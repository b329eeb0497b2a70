"""Simulated Byzantine clients, so that robustness can be measured (``--attack``).

The attackers are a fixed ``malicious_fraction`` of the clients (drawn once per run from the
seed). Update attacks replace what an attacker sends after its local training; data attacks
poison what it trains on:

===================  ============================================================================
``sign_flip``        send ``-delta``
``scale``            send ``attack_scale * delta`` (a negative scale flips and scales)
``gaussian``         send Gaussian noise with ``attack_scale`` times the norm of the honest update
``alie``             "A Little Is Enough" (Baruch et al. 2019, https://arxiv.org/abs/1902.06156):
                     every attacker sends ``mean - z * std`` of the round's updates, coordinate-wise,
                     with ``z`` from the number of clients and attackers (omniscient attackers)
``caption_shuffle``  data poisoning: train on captions paired with the wrong images (a fixed random
                     permutation of the image rows), the retrieval analogue of label flipping
===================  ============================================================================

Example:
    >>> import torch
    >>> d = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 2.0])}]
    >>> attack_updates("sign_flip", d, {0}, scale=10.0, seed=0)[0]["w"].tolist()
    [-1.0, -2.0]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from asymvlm.federated.seeds import int_seed
from asymvlm.registry import Registry

__all__ = [
    "ATTACKS", "UPDATE_ATTACKS", "DATA_ATTACKS", "attack_updates", "attack_results", "alie_z", "ShuffledCaptions",
]  # fmt: skip

ATTACKS = Registry("attack")
for _name, _help, _ref in (
    ("none", "no attackers", ""),
    ("sign_flip", "send -delta", "https://arxiv.org/abs/1902.06156"),
    ("scale", "send attack_scale * delta", "https://arxiv.org/abs/1703.02757"),
    ("gaussian", "send Gaussian noise of attack_scale x the honest update's norm", "https://arxiv.org/abs/1703.02757"),
    ("alie", "A Little Is Enough: mean - z * std of the round's updates", "https://arxiv.org/abs/1902.06156"),
    ("caption_shuffle", "train on captions paired with the wrong images", "https://arxiv.org/abs/2007.08432"),
):
    ATTACKS.register(_name, help=_help, reference=_ref)(dict)
UPDATE_ATTACKS = ("sign_flip", "scale", "gaussian", "alie")
DATA_ATTACKS = ("caption_shuffle",)


def alie_z(n: int, f: int) -> float:
    """ALIE's ``z_max``: ``s = floor(n / 2 + 1) - f`` clients must be "won over"; ``z`` is the
    standard normal quantile of ``(n - s) / n`` (Baruch et al. 2019, Section 3)."""
    from scipy.stats import norm

    s = math.floor(n / 2 + 1) - f
    return float(norm.ppf((n - s) / n))


def attack_updates(
    attack: str, deltas: Sequence[Mapping[str, Tensor]], attackers: set[int], *, scale: float, seed: int
) -> list[dict[str, Tensor]]:
    """The deltas as sent: those at the ``attackers`` positions replaced by the attack's."""
    out = [dict(d) for d in deltas]
    if attack == "none" or not attackers:
        return out
    if attack in ("sign_flip", "scale"):
        factor = -1.0 if attack == "sign_flip" else scale
        for i in attackers:
            out[i] = {k: v * factor for k, v in deltas[i].items()}
    elif attack == "gaussian":
        g = torch.Generator().manual_seed(int(seed))
        for i in attackers:
            norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in deltas[i].values()))
            z = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in deltas[i].items()}
            zn = math.sqrt(sum(float(v.pow(2).sum()) for v in z.values())) or 1.0
            out[i] = {k: (scale * norm / zn * z[k]).to(deltas[i][k].dtype) for k in z}
    elif attack == "alie":
        n, f = len(deltas), len(attackers)
        z = alie_z(n, f)
        for k in deltas[0]:
            stack = torch.stack([d[k].double() for d in deltas])  # (n, ...) of one tensor
            forged = (stack.mean(0) - z * stack.std(0, unbiased=False)).to(deltas[0][k].dtype)
            for i in attackers:
                out[i][k] = forged
    elif attack not in DATA_ATTACKS:
        ATTACKS.entry(attack)
    return out


class ShuffledCaptions:
    """A client's batcher whose captions come with the wrong images (a fixed permutation of the
    image rows): the attacker trains honestly on poisoned pairs."""

    def __init__(self, batcher: Any, seed: int):
        self.inner = batcher
        n = batcher.images.shape[0]
        self.perm = torch.from_numpy(np.random.default_rng(seed).permutation(n)).to(batcher.images.device)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def batch(self, micro_index: int, rank: int = 0, world: int = 1) -> dict[str, Tensor]:
        b = self.inner.batch(micro_index, rank, world)
        return {**b, "images": self.inner.images[self.perm[b["ids"]]]}


def attack_results(fed: Any, results: Sequence[Any], malicious: set[int], rnd: int) -> Sequence[Any]:
    """What round ``rnd``'s attackers among ``results`` (``.client``, ``.delta``) send instead of
    their honest updates under ``fed.attack`` (update attacks; the results are changed in place)."""
    at = {i for i, r in enumerate(results) if r.client in malicious}
    if not at or fed.attack not in UPDATE_ATTACKS:
        return results
    sent = attack_updates(
        fed.attack, [r.delta for r in results], at, scale=fed.attack_scale, seed=int_seed(fed.seed, "attack", rnd)
    )
    for r, d in zip(results, sent):
        r.delta = d
    return results
