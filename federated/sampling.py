"""Who takes part in a round: the sampled clients, dropouts and stragglers, the simulated attackers,
and the per-client fairness summary the round logs.

Every draw comes from :func:`~asymvlm.federated.seeds.seed_sequence` ``(seed, stream, round)``, so
the round number is the RNG state (a resumed run samples the same clients). Under an availability
model other than ``uniform`` (:mod:`asymvlm.federated.participation`) the round's sampled clients are
the available ones (at most the round's size with ``cap``); dropouts and stragglers then act on them
as on a uniform sample.

Example:
    >>> from asymvlm.federated.config import FederatedArguments
    >>> fed = FederatedArguments(num_clients=10, clients_per_round=3, seed=0)
    >>> active, who = sample_clients(fed, 0)
    >>> len(active), active == who["sampled"]
    (3, True)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from asymvlm.errors import ConfigError
from asymvlm.federated.participation import available_clients
from asymvlm.federated.seeds import seed_sequence

__all__ = ["sample_clients", "attackers", "fairness"]


def sample_clients(fed: Any, rnd: int, poisson: bool = False) -> tuple[list[int], dict[str, Any]]:
    """Round ``rnd``'s active clients and who was sampled, dropped or late. ``poisson``: each client
    independently with probability ``fed.sample_rate`` (what the DP accountant assumes), else a
    uniform sample of fixed size, or under ``fed.availability`` other than ``uniform`` the available
    clients (``who["available"]`` lists them all, before the cap)."""
    rng = np.random.default_rng(seed_sequence(fed.seed, "sampling", rnd))
    availability = getattr(fed, "availability", "uniform")
    extra: dict[str, Any] = {}
    if availability != "uniform":
        if poisson:
            raise ConfigError(f"availability {availability!r} cannot be Poisson-sampled (differential privacy)")
        sampled, extra["available"] = available_clients(fed, rnd)
    elif poisson:
        sampled = [c for c in range(fed.num_clients) if rng.random() < fed.sample_rate]
    else:
        m = round(fed.sample_rate * fed.num_clients)
        sampled = sorted(rng.choice(fed.num_clients, size=m, replace=False).tolist())
    dropped = [c for c in sampled if rng.random() < fed.dropout_prob]
    speeds = {c: float(rng.lognormal(0.0, 0.5)) for c in sampled}
    late = []
    if fed.straggler_deadline > 0:
        late = [c for c in sampled if c not in dropped and fed.local_steps / speeds[c] > fed.straggler_deadline]
    active = [c for c in sampled if c not in dropped and c not in late]
    return active, {"sampled": sampled, "dropped": dropped, "stragglers": late, **extra}


def attackers(fed: Any) -> set[int]:
    """The simulated Byzantine clients (fixed for the run)."""
    if fed.attack == "none" or fed.malicious_fraction <= 0:
        return set()
    rng = np.random.default_rng(seed_sequence(fed.seed, "attackers"))
    count = int(round(fed.malicious_fraction * fed.num_clients))
    return set(rng.choice(fed.num_clients, size=count, replace=False).tolist())


def fairness(values: list[float]) -> dict[str, float]:
    """Mean, std and mean of the worst 10% (at least one) of per-client values (losses: worst = highest)."""
    v = np.asarray(values, dtype=np.float64)
    worst = np.sort(v)[::-1][: max(1, int(math.ceil(0.1 * len(v))))]
    return {"mean": float(v.mean()), "std": float(v.std()), "worst10": float(worst.mean())}
