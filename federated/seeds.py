"""The random streams of a federated run: ``(seed, stream, *key) -> numpy SeedSequence``.

Every random choice of round ``t`` (which clients are sampled, each client's batch order, ...)
comes from its own stream keyed by the round and the client, so the round number *is* the RNG
state (:mod:`asymvlm.federated.rounds`: a resumed run replays exactly).

Example:
    >>> int_seed(0, "client", 3, 1) == int_seed(0, "client", 3, 1) != int_seed(0, "client", 3, 2)
    True
"""

from __future__ import annotations

import numpy as np

__all__ = ["STREAMS", "seed_sequence", "int_seed"]

# every random stream of a run: (seed, stream id, round, client) -> numpy's SeedSequence
STREAMS = {
    "sampling": 1, "attackers": 2, "client": 3, "initial_loss": 4, "fairness": 5, "lora_init": 6, "attack": 7,
    "diagnostics": 8, "personal": 9, "personal_eval": 10, "cluster": 11, "cluster_eval": 12, "availability": 13,
    "async": 14,
}  # fmt: skip


def seed_sequence(seed: int, stream: str, *key: int) -> np.random.SeedSequence:
    """The independent stream ``stream`` of ``(seed, *key)`` (NumPy's SeedSequence: no collisions
    between different keys, unlike hand-made ``seed * a + round * b + client`` formulas)."""
    return np.random.SeedSequence([int(seed), STREAMS[stream], *(int(k) for k in key)])


def int_seed(seed: int, stream: str, *key: int) -> int:
    """A 32-bit seed of that stream (for ``torch.manual_seed`` and the batchers)."""
    return int(seed_sequence(seed, stream, *key).generate_state(1)[0])
