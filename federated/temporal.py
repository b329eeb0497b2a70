"""Temporal skew: a client's data distribution moves over the rounds on a schedule.

``asymvlm-federate --temporal_column COL --temporal_switch T``: each client's image rows are cut
in two phases by ``COL`` (a label column, or a column of vectors, clustered by k-means into
``TEMPORAL_CLUSTERS`` labels): the labels the client holds, in a seeded random order, the first
half in phase 0 and the rest in phase 1. The client trains on phase 0 before round ``T`` (1-based:
rounds ``1 .. T-1``) and on phase 1 from round ``T`` on, like a data holder whose users change
(Kairouz et al. 2021, "Advances and Open Problems in FL", section 3.1, https://arxiv.org/abs/1912.04977).
A client whose rows carry one label only keeps them in both phases (no drift for it; the
schedule lists it). Clustered runs can follow the drift: ``--cluster cfl`` with
``{"drift": delta}`` re-assigns a client whose loss on its cluster model jumps by more than
``delta`` (relative) to the cluster model with the lowest loss: drift-triggered re-clustering in
the spirit of FedDAA (Peng & Tang 2025, https://arxiv.org/abs/2506.21054), with a plain loss-jump
trigger, not FedDAA's prototype-based drift-source detection.

Example:
    >>> phases = temporal_phases([np.arange(6)], np.array(list("aabbcc")), seed=0)
    >>> [p.tolist() for p in phases[0]]
    [[0, 1, 2, 3], [4, 5]]
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import numpy as np

from asymvlm.errors import ConfigError

__all__ = ["DriftingBatcher", "temporal_phases", "TEMPORAL_CLUSTERS", "set_round"]

TEMPORAL_CLUSTERS = 4  # k-means labels of a vector column


def temporal_phases(parts: Sequence[np.ndarray], labels: Any, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per client, ``(phase 0 rows, phase 1 rows)`` of its ``parts`` rows by their ``labels``."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x7E3F]))
    out = []
    for rows in parts:
        mine = labels[rows]
        present = np.unique(mine)
        if len(present) < 2:
            out.append((rows, rows))
            continue
        order = present[rng.permutation(len(present))]
        first = set(order[: (len(order) + 1) // 2].tolist())
        in_first = np.array([x in first for x in mine.tolist()])
        out.append((np.sort(rows[in_first]), np.sort(rows[~in_first])))
    return out


class DriftingBatcher:
    """One client's batches from the batcher of its current phase (``set_round`` picks it); every
    other attribute (``batch``, ``reseed``, ``text``...) is the current phase batcher's."""

    def __init__(self, phases: Sequence[Any], switches: Sequence[int]):
        if len(switches) != len(phases) - 1 or list(switches) != sorted(switches):
            raise ConfigError("need one increasing switch round between consecutive phases")
        self.phases, self.switches = list(phases), list(switches)
        self.current = self.phases[0]
        self.phase = 0

    def set_round(self, rnd: int) -> None:
        """Use the phase of round ``rnd`` (0-based; phase p from round ``switches[p-1] - 1`` on)."""
        self.phase = bisect.bisect_right(self.switches, rnd + 1)
        self.current = self.phases[self.phase]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["current"], name)


def set_round(batchers: Sequence[Any], rnd: int) -> None:
    """Move every drifting client to round ``rnd``'s phase (others are left alone)."""
    for b in batchers:
        if isinstance(b, DriftingBatcher):
            b.set_round(rnd)
