"""Seeded, resumable batches drawn by index from in-memory tensors (training and federated clients).

Training on cached embeddings does not go through a per-item ``Dataset``/``DataLoader``: the
cached tensors are held in memory (on the GPU when training there) and every batch is a single
index operation. Batch composition is a pure function of ``(seed, micro-step)``: each epoch is a
seeded permutation of the caption rows cut into ``T // batch_size`` batches (the remainder of
that permutation is left out, so no batch holds a caption twice), so a resumed run sees exactly
the batches an uninterrupted one would, and with P processes the global batch is split into P
contiguous slices (process p takes slice p), so P processes see the same global batch as one.

Positives. Every batch carries ``positives`` (B, B), True where caption ``a`` is true of the image
of caption ``b``: the same image, or ``b``'s caption is *identical* to ``a`` (``text_groups``;
``caption_scope="data"``: ``b``'s image has such a caption anywhere in the data). Identical
captions of different images ("a picture", a category name) are then never each other's
negatives — the multi-positive masking of the AsymVLM reference code, by caption identity as well
as image identity.

Example:
    >>> import torch
    >>> b = IndexBatcher(torch.randn(10, 4), torch.randn(5, 4), torch.arange(10) // 2, batch_size=4, seed=0)
    >>> batch = b.batch(0)
    >>> batch["text"].shape, batch["images"].shape, bool((batch["ids"] < 5).all())
    (torch.Size([4, 4]), torch.Size([4, 4]), True)
    >>> same = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0]])  # captions 0 and 1 are identical
    >>> b = IndexBatcher(same, torch.eye(3), torch.tensor([0, 1, 2]), batch_size=3, seed=0)
    >>> p = b.batch(0)
    >>> rows = b.global_rows(0).tolist()
    >>> bool(p["positives"][rows.index(0), rows.index(1)])  # caption 0 is true of image 1
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

from asymvlm.errors import ConfigError, InputError

__all__ = ["IndexBatcher", "caption_groups"]


def caption_groups(captions: list[str]) -> Tensor:
    """(T,) int64: equal ids for identical caption strings (first occurrence order).

    >>> caption_groups(["a dog", "a cat", "a dog"]).tolist()
    [0, 1, 0]
    """
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(c, len(ids)) for c in captions], dtype=torch.int64)


class IndexBatcher:
    """Seeded, resumable batches of caption rows drawn by index from in-memory tensors.

    Args:
        text: (T, d) cached text embeddings, or for a LoRA-trained text tower the tokenised captions: a (T, L) id
            tensor or a dict of such tensors (input_ids, attention_mask).
        images: (I, d) cached image embeddings.
        text_image_index: (T,) image row of each caption (also the positives' ids).
        batch_size: global captions per micro-step, at most the number of captions (callers that
            want a cap instead of this error: ``min(batch_size, T)``).
        seed: the permutation seed.
        device: where the tensors live (batches are built there).
        text_groups: (T,) ids of equivalent captions (equal id = the same text), or ``"identical"``
            (default): captions whose rows (embeddings, or token ids) are identical, or ``None``:
            positives by image only.
        caption_scope: ``"batch"`` (default): caption ``a`` is a positive of image ``b`` when ``b``'s
            caption *in the batch* is identical to ``a`` (the reference code's masking: a duplicate
            caption is not a negative); ``"data"``: when ``b`` has an identical caption anywhere in
            the data. Measured on real text, ``"data"`` removes most of a vague caption's
            competitors and with them the ambiguity signal (README, "Real text").
    """

    def __init__(
        self,
        text: Tensor | dict[str, Tensor],
        images: Tensor,
        text_image_index: Tensor,
        batch_size: int,
        seed: int,
        device: torch.device | str = "cpu",
        text_groups: Tensor | str | None = "identical",
        caption_scope: str = "batch",
    ):
        first = next(iter(text.values())) if isinstance(text, dict) else text
        rows = first.shape[0]
        if rows != text_image_index.shape[0]:
            raise InputError(f"{rows} text rows but {text_image_index.shape[0]} caption->image entries")
        if rows == 0:
            raise InputError("no training captions")
        if not 1 <= batch_size <= rows:
            raise ConfigError(f"batch_size must be in [1, {rows}] (the number of captions), got {batch_size}")
        self.device = torch.device(device)
        self.text = {k: v.to(self.device) for k, v in text.items()} if isinstance(text, dict) else text.to(self.device)
        self.images = images.to(self.device)
        self.owner = text_image_index.to(self.device, torch.int64)
        self.batch_size = batch_size
        self.seed = seed
        self._perms: dict[int, Tensor] = {}
        if caption_scope not in ("batch", "data"):
            raise ConfigError(f"caption_scope must be 'batch' or 'data', got {caption_scope!r}")
        self.caption_scope = caption_scope
        if isinstance(text_groups, str):
            if text_groups != "identical":
                raise ConfigError(f"text_groups must be a tensor, 'identical' or None, got {text_groups!r}")
            key = text["input_ids"] if isinstance(text, dict) and "input_ids" in text else first
            text_groups = torch.unique(key.reshape(rows, -1), dim=0, return_inverse=True)[1]
        self.groups: Tensor | None = None
        self._pair_keys: Tensor | None = None
        if text_groups is not None:
            groups = torch.as_tensor(text_groups, dtype=torch.int64).to(self.device)
            if groups.shape != (rows,):
                raise InputError(f"text_groups must have shape ({rows},), got {tuple(groups.shape)}")
            self.groups = torch.unique(groups, return_inverse=True)[1]  # 0..G-1
            # every (caption text, image) pair the data states, as one sorted int64 key
            self._pair_keys = torch.unique(self.groups * self.images.shape[0] + self.owner)

    @property
    def num_texts(self) -> int:
        return self.owner.shape[0]

    @property
    def num_batches(self) -> int:
        """Batches in one epoch (one pass over the captions, less the permutation's remainder)."""
        return self.num_texts // self.batch_size

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
        epoch, k = divmod(micro_index, self.num_batches)
        return self._perm(epoch)[k * self.batch_size : (k + 1) * self.batch_size]

    def positives(self, rows: Tensor) -> Tensor:
        """(B, B) bool: caption ``rows[a]`` is true of the image of caption ``rows[b]``: the same
        image, or (``caption_scope``) caption ``rows[b]`` is identical to it / that image has an
        identical caption anywhere in the data."""
        ids = self.owner[rows]
        same = ids.unsqueeze(1) == ids.unsqueeze(0)
        if self.groups is None:
            return same
        if self.caption_scope == "batch":
            g = self.groups[rows]
            return same | (g.unsqueeze(1) == g.unsqueeze(0))
        query = self.groups[rows].unsqueeze(1) * self.images.shape[0] + ids.unsqueeze(0)  # (B, B)
        at = torch.searchsorted(self._pair_keys, query).clamp_max(self._pair_keys.numel() - 1)
        return same | (self._pair_keys[at] == query)

    def batch(self, micro_index: int, rank: int = 0, world: int = 1) -> dict[str, Tensor]:
        """This process's slice of global micro-batch ``micro_index``, with the ``positives`` of the
        *global* batch (every process computes the loss over the whole gathered batch)."""
        if self.batch_size % world:
            raise ConfigError(f"batch_size {self.batch_size} is not divisible by {world} processes")
        per = self.batch_size // world
        everyone = self.global_rows(micro_index)
        rows = everyone[rank * per : (rank + 1) * per]
        ids = self.owner[rows]
        text = {k: v[rows] for k, v in self.text.items()} if isinstance(self.text, dict) else self.text[rows]
        return {"text": text, "images": self.images[ids], "ids": ids, "positives": self.positives(everyone)}
