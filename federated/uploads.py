"""What the clients of a simulated round upload: their deltas through the run's codec.

:class:`Uploads` applies ``--compression`` (:mod:`asymvlm.federated.compression`) to a round's
updates as they would travel: each client encodes its delta (plus its error-feedback residual,
kept client-side in ``output_dir/compression_residuals``, one file per client, rolled back on
resume like personal states), the server decodes. Everything after it in the round (diagnostics,
attacks, validation, the server step) sees what the server received. The vectorised clients call
it on their stacked deltas before they are summed (:func:`asymvlm.federated.vectorized.train_round`),
the sequential ones on the round's list; both give the same rows
(:meth:`~asymvlm.federated.compression.Codec.roundtrip_stacked` is exact per row).

Example:
    >>> import torch
    >>> from asymvlm.federated.compression import build_codec
    >>> up = Uploads(build_codec("int8", {"int8": {"block": 4}}), None)
    >>> decoded, sizes = up.stacked([0, 1], {"w": torch.randn(2, 10)}, rnd=0)
    >>> sizes  # 10 int8 values and 3 float32 block scales per client
    [22, 22]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from asymvlm.federated.compression import Codec, build_codec
from asymvlm.federated.personal_store import ClientStates

__all__ = ["Uploads", "build_uploads", "RESIDUALS"]

RESIDUALS = "compression_residuals"  # the clients' error-feedback residuals, under output_dir


class Uploads:
    """A run's codec and the clients' residual store (None when the codec keeps no residual)."""

    def __init__(self, codec: Codec, store: ClientStates | None):
        self.codec, self.store = codec, store

    def stacked(self, clients: Sequence[int], deltas: Mapping[str, Tensor], rnd: int) -> tuple[dict, list[int]]:
        """Round ``rnd``'s uploads of ``clients`` whose deltas are rows of ``deltas`` (``(G, *shape)``):
        the decoded rows and the bytes each client sent; the new residuals are saved (round ``rnd + 1``)."""
        residual = None
        if self.store is not None:
            mine = [self.store.load(c, upto=rnd) for c in clients]
            sent, _ = self.codec.split(deltas)
            residual = {
                k: torch.stack([m[k] if m is not None else torch.zeros_like(deltas[k][0]) for m in mine]) for k in sent
            }
        decoded, new, sizes = self.codec.roundtrip_stacked(deltas, residual)
        if self.store is not None and new is not None:
            for i, c in enumerate(clients):
                self.store.save(c, rnd + 1, {k: v[i] for k, v in new.items()})
        return decoded, sizes

    def results(self, results: Sequence[Any], rnd: int) -> list[int]:
        """The uploads of a round's results (``.client``, ``.delta``), decoded in place; the bytes each sent."""
        if not results:
            return []
        keys = list(results[0].delta)
        stacked = {k: torch.stack([r.delta[k] for r in results]) for k in keys}
        decoded, sizes = self.stacked([r.client for r in results], stacked, rnd)
        for i, r in enumerate(results):
            r.delta = {k: decoded[k][i] for k in keys}
        return sizes


def build_uploads(fed: Any, frozen_keys: Sequence[str] = ()) -> Uploads | None:
    """The run's :class:`Uploads` (None for ``compression none``); a bad spec or option is a
    :class:`~asymvlm.errors.ConfigError` naming it."""
    if fed.compression == "none" and not fed.compression_options:
        return None
    codec = build_codec(fed.compression, fed.options_of("compression_options"), frozen_keys=frozen_keys)
    if codec.spec == "none":
        return None
    store = ClientStates(Path(fed.output_dir) / RESIDUALS) if codec.stateful else None
    return Uploads(codec, store)
