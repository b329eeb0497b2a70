"""Seeded, resumable batches drawn by index from in-memory tensors (training and federated clients).

Training on cached embeddings does not go through a per-item ``Dataset``/``DataLoader``: the
cached tensors are held in memory (on the GPU when training there) and every batch is a single
index operation. Batch composition is a pure function of ``(seed, micro-step)``: caption rows
follow a seeded permutation per epoch, so a resumed run sees exactly the batches an
uninterrupted one would, and with P processes the global batch is split into P contiguous
slices (process p takes slice p), so P processes see the same global batch as one.

Example:
    >>> import torch
    >>> b = IndexBatcher(torch.randn(10, 4), torch.randn(5, 4), torch.arange(10) // 2, batch_size=4, seed=0)
    >>> batch = b.batch(0)
    >>> batch["text"].shape, batch["images"].shape, bool((batch["ids"] < 5).all())
    (torch.Size([4, 4]), torch.Size([4, 4]), True)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["IndexBatcher"]


class IndexBatcher:
    """Seeded, resumable batches of caption rows drawn by index from in-memory tensors.

    Args:
        text: (T, d) cached text embeddings, or for mode=lora the tokenised captions: a (T, L) id
            tensor or a dict of such tensors (input_ids, attention_mask).
        images: (I, d) cached image embeddings.
        text_image_index: (T,) image row of each caption (also the positives' ids).
        batch_size: global captions per micro-step.
        seed: the permutation seed.
        device: where the tensors live (batches are built there).
    """

    def __init__(
        self,
        text: Tensor | dict[str, Tensor],
        images: Tensor,
        text_image_index: Tensor,
        batch_size: int,
        seed: int,
        device: torch.device | str = "cpu",
    ):
        rows = (next(iter(text.values())) if isinstance(text, dict) else text).shape[0]
        if rows != text_image_index.shape[0]:
            raise ValueError(f"{rows} text rows but {text_image_index.shape[0]} caption->image entries")
        if rows == 0:
            raise ValueError("no training captions")
        self.device = torch.device(device)
        self.text = {k: v.to(self.device) for k, v in text.items()} if isinstance(text, dict) else text.to(self.device)
        self.images = images.to(self.device)
        self.owner = text_image_index.to(self.device, torch.int64)
        self.batch_size = batch_size
        self.seed = seed
        self._perms: dict[int, Tensor] = {}

    @property
    def num_texts(self) -> int:
        return self.owner.shape[0]

    @property
    def num_batches(self) -> int:
        """Batches in one pass over the captions (at least 1)."""
        return max(1, self.num_texts // self.batch_size)

    def reseed(self, seed: int) -> None:
        """Start a new, independent batch order (federated rounds reseed per round and client)."""
        self.seed = seed
        self._perms.clear()

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.num_texts, generator=g).to(self.device)
        return self._perms[epoch]

    def global_rows(self, micro_index: int) -> Tensor:
        """Caption rows of global micro-batch ``micro_index`` (= step * accumulation + micro)."""
        start = micro_index * self.batch_size
        pos = torch.arange(start, start + self.batch_size)
        epochs = pos // self.num_texts
        out = torch.empty(self.batch_size, dtype=torch.int64, device=self.device)
        for e in torch.unique(epochs).tolist():
            sel = epochs == e
            out[sel.to(self.device)] = self._perm(int(e))[(pos[sel] % self.num_texts).to(self.device)]
        return out

    def batch(self, micro_index: int, rank: int = 0, world: int = 1) -> dict[str, Tensor]:
        """This process's slice of global micro-batch ``micro_index``."""
        if self.batch_size % world:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by {world} processes")
        per = self.batch_size // world
        rows = self.global_rows(micro_index)[rank * per : (rank + 1) * per]
        ids = self.owner[rows]
        text = {k: v[rows] for k, v in self.text.items()} if isinstance(self.text, dict) else self.text[rows]
        return {"text": text, "images": self.images[ids], "ids": ids}
