"""What each simulated client keeps between rounds: its personal parameters, on its own side.

A client's state is written after every round it takes part in, atomically, as
``<root>/client-<k>/round-<t>.safetensors`` (``t`` = the round it finished, 1-based). The server
checkpoint of round ``t`` is written after its clients' states, so a run killed in between has
client states newer than the checkpoint it resumes from: :meth:`ClientStates.rollback` deletes
them (the replayed round writes them again, bit-identically), and a resumed run reads, for each
client, the latest state no newer than the checkpoint. :meth:`ClientStates.prune` keeps one state
per client at or before the last checkpoint. Never uploaded: the rounds hand the server only the
shared update (tests inspect every upload).

Example:
    >>> import tempfile, torch
    >>> store = ClientStates(tempfile.mkdtemp())
    >>> store.save(3, 1, {"w": torch.ones(2)}); store.save(3, 2, {"w": torch.zeros(2)})
    >>> store.load(3, upto=1)["w"].tolist(), store.load(4, upto=2) is None
    ([1.0, 1.0], True)
"""

from __future__ import annotations

import re
from pathlib import Path

from asymvlm.errors import ArtefactError
from asymvlm.federated.core import Params

__all__ = ["ClientStates"]

_FILE = re.compile(r"^round-(\d{6})\.safetensors$")


class ClientStates:
    """Per-client persistent state under ``root`` (one folder per client)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._cache: dict[int, tuple[int, Params]] = {}  # client -> (round, state): the latest written

    def _dir(self, client: int) -> Path:
        return self.root / f"client-{int(client)}"

    def _rounds(self, client: int) -> list[tuple[int, Path]]:
        folder = self._dir(client)
        if not folder.is_dir():
            return []
        out = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _FILE.match(p.name))]
        return sorted(out)

    def save(self, client: int, rnd: int, state: Params) -> None:
        """Write ``state`` as client ``client``'s after round ``rnd`` (1-based), atomically."""
        from asymvlm.io import atomic_save_safetensors

        folder = self._dir(client)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in state.items()}
        atomic_save_safetensors(tensors, folder / f"round-{int(rnd):06d}.safetensors")
        self._cache[int(client)] = (int(rnd), tensors)

    def load(self, client: int, upto: int) -> Params | None:
        """Client ``client``'s latest state from a round ``<= upto`` (None before its first round)."""
        hit = self._cache.get(int(client))
        if hit is not None and hit[0] <= upto:  # the latest this process wrote
            return dict(hit[1])
        rounds = [(r, p) for r, p in self._rounds(client) if r <= upto]
        if not rounds:
            return None
        from asymvlm.io_read import load_safetensors

        path = rounds[-1][1]
        try:
            state = load_safetensors(path, mmap=False)
        except ArtefactError as err:
            raise ArtefactError(f"client {client}'s personal state {path} cannot be read: {err}") from None
        self._cache[int(client)] = (rounds[-1][0], state)
        return dict(state)

    def clients(self) -> list[int]:
        """The clients that have a saved state."""
        if not self.root.is_dir():
            return []
        return sorted(int(p.name.split("-", 1)[1]) for p in self.root.glob("client-*") if p.name[7:].isdigit())

    def rollback(self, upto: int) -> list[Path]:
        """Delete every state newer than round ``upto`` (a crashed round's); returns them."""
        gone = []
        for c in self.clients():
            for r, p in self._rounds(c):
                if r > upto:
                    p.unlink()
                    gone.append(p)
        self._cache = {c: v for c, v in self._cache.items() if v[0] <= upto}
        return gone

    def prune(self, upto: int) -> None:
        """Keep, per client, only the latest state at or before round ``upto`` (and any newer)."""
        for c in self.clients():
            old = [(r, p) for r, p in self._rounds(c) if r <= upto]
            for _, p in old[:-1]:
                p.unlink()
