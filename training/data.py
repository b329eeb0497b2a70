"""The data seam of training: :func:`get_dataloaders` (tests and users may replace it).

Training on cached embeddings does not go through a per-item ``Dataset``/``DataLoader``: the
cached tensors are held in memory (on the GPU when training there) and every batch is a single
index operation. Batch composition is a pure function of ``(seed, step, micro-step)``: caption
rows follow a seeded permutation per epoch, so a resumed run sees exactly the batches an
uninterrupted one would, and with P processes the global batch is split into P contiguous
slices (process p takes slice p), so P processes see the same global batch as one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["TrainData", "IndexBatcher", "get_dataloaders", "cache_for_config"]


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


@dataclass
class TrainData:
    """What :func:`get_dataloaders` returns.

    Attributes:
        batches: the :class:`IndexBatcher` of the training split.
        dim: embedding dimension.
        encoder_source: ``{"spec", "pretrained", "fingerprint", "dim"}`` of the frozen encoder.
        eval_data: an :class:`eval.benchmark.EvalData` for periodic evaluation (or None); its
            ``captions`` let mode=lora re-embed them with the adapted tower.
        encoder: the loaded encoder (mode=lora only).
    """

    batches: IndexBatcher
    dim: int
    encoder_source: dict[str, Any] | None
    eval_data: Any = None
    encoder: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def cache_for_config(data_args: Any, encoder: Any = None):
    """The embedding cache a config names: ``cache_dir`` if given, else built (once) from ``dataset``."""
    from asymvlm.cache import EmbeddingCache, embed_dataset
    from asymvlm.io import ArtefactError

    if data_args.cache_dir:
        try:
            return EmbeddingCache.load(data_args.cache_dir)
        except ArtefactError as err:
            raise FileNotFoundError(
                f"cannot use the embedding cache {data_args.cache_dir!r}: {err}. Build one with "
                f"asymvlm.embed_dataset(encoder, dataset, path) or leave --cache_dir empty to build from --dataset"
            ) from err
    from asymvlm import shapeworld as sw
    from asymvlm.toyclip import cache_root

    if encoder is None:
        from asymvlm.encoders import load_encoder

        encoder = load_encoder(data_args.encoder, data_args.pretrained or None)
    if data_args.dataset == "shapeworld":
        dataset = sw.generate(
            data_args.train_images,
            seed=data_args.data_seed,
            caption_styles=data_args.styles(),
            visual_styles=sw.VISUAL_STYLES,
        )
        name = f"shapeworld-{data_args.train_images}-{data_args.data_seed}"
        if data_args.styles() != tuple(sw.CAPTION_STYLES):
            name += "-" + "+".join(data_args.styles())
    else:
        from asymvlm.data import load_dataset_spec

        dataset = load_dataset_spec(data_args.dataset)
        import hashlib

        name = "dataset-" + hashlib.sha256(data_args.dataset.encode()).hexdigest()[:12]
    path = cache_root() / "caches" / f"{name}-{encoder.fingerprint[:12]}"
    return embed_dataset(encoder, dataset, path, batch_size=256)


def get_dataloaders(cfg: Any, accelerator: Any) -> TrainData:
    """Load (or build) the embedding cache and return the training batches and evaluation data.

    ``cfg`` is a :class:`training.config.TrainConfig`. The seam: ``training.loop.train`` calls
    ``training.data.get_dataloaders`` (or the ``data_fn`` passed to it), so tests and users can
    substitute their own data.
    """
    from eval.benchmark import EvalData

    d, m, t = cfg.data, cfg.model, cfg.train
    encoder = None
    if m.mode == "lora" or not d.cache_dir:
        from asymvlm.encoders import load_encoder

        encoder = load_encoder(d.encoder, d.pretrained or None, device=accelerator.device)
    with accelerator.main_process_first():  # build the cache once, then every process loads it
        cache = cache_for_config(d, encoder)
    source = dict(cache.manifest["encoder"])
    if encoder is not None and source.get("fingerprint") and encoder.fingerprint != source["fingerprint"]:
        raise ValueError(f"the cache {cache.path} was built by another encoder than {d.encoder!r}")
    images = cache.image_embeddings.float()
    text = cache.text_embeddings.float()
    owner = cache.text_image_index.clone()
    captions = cache.captions

    eval_data = None
    n_img = images.shape[0]
    if d.dataset == "shapeworld" and not d.cache_dir and d.eval_images and t.eval_every >= 0:
        from asymvlm import shapeworld as sw
        from eval.benchmark import shapeworld_eval_data

        eval_data = shapeworld_eval_data(
            encoder,
            n=d.eval_images,
            seed=d.data_seed + 10_000,
            caption_styles=sw.CAPTION_STYLES,
            visual_styles=sw.VISUAL_STYLES,
        )
    elif d.eval_fraction > 0:
        cut = int(round(n_img * (1 - d.eval_fraction)))
        held = owner >= cut
        held_captions = [c for c, h in zip(captions, held.tolist()) if h] if captions else None
        eval_data = EvalData(images[cut:], text[held], owner[held] - cut, captions=held_captions)
        text, owner, images = text[~held], owner[~held], images[:cut]
        captions = [c for c, h in zip(captions, held.tolist()) if not h] if captions else None

    if m.mode == "lora":
        if not captions:
            raise ValueError(f"mode=lora needs the caption strings in the cache ({cache.path}/captions.json)")
        text = encoder.tokenize(captions)
    device = accelerator.device if d.device_resident else torch.device("cpu")
    batches = IndexBatcher(text, images, owner, t.batch_size, t.seed, device)
    return TrainData(
        batches=batches,
        dim=images.shape[1],
        encoder_source=source,
        eval_data=eval_data,
        encoder=encoder if m.mode == "lora" else None,
    )
