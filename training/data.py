"""The data seam of training: :func:`get_dataloaders` (tests and users may replace it).

Batches are drawn by index from the cached embeddings held in memory
(:class:`asymvlm.batching.IndexBatcher`): a pure function of ``(seed, step, micro-step)``, so a
resumed run and P processes see exactly the batches of one uninterrupted process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from asymvlm.batching import IndexBatcher, caption_groups
from asymvlm.errors import ArtefactError, CacheMismatchError, ConfigError
from asymvlm.worlds.data import cache_for_config

__all__ = ["TrainData", "get_dataloaders"]

logger = logging.getLogger(__name__)


def _batch_size(batch_size: int, captions: int, accelerator: Any) -> int:
    """``batch_size``, capped (with a warning) at the number of training captions, rounded down to
    a multiple of the process count: a batch never holds a caption twice."""
    world = accelerator.num_processes
    if batch_size <= captions:
        return batch_size
    cap = captions - captions % world
    if cap < world:
        raise ConfigError(f"{captions} training captions cannot fill a batch on {world} processes")
    if accelerator.is_main_process:
        logger.warning("batch_size %d exceeds the %d training captions; using %d", batch_size, captions, cap)
    return cap


@dataclass
class TrainData:
    """What :func:`get_dataloaders` returns.

    Attributes:
        batches: the :class:`IndexBatcher` of the training split.
        dim: embedding dimension.
        encoder_source: ``{"spec", "pretrained", "fingerprint", "dim"}`` of the frozen encoder.
        eval_data: an :class:`asymvlm.eval.benchmark.EvalData` for periodic evaluation (or None); its
            ``captions`` let a LoRA run (trainable lora/both) re-embed them with the adapted tower.
        encoder: the loaded encoder (LoRA runs only).
        extra: ``{"data": ..., "evaluation": {"dataset", "split"}}``: what the saved model's card says
            about the training and evaluation data (:func:`asymvlm.hub.describe_data`); optional.
        train_texts: (T, d) the frozen embeddings of the training captions (the familiarity density
            saved with the model is fitted on them; :mod:`asymvlm.confidence`), or None.
    """

    batches: IndexBatcher
    dim: int
    encoder_source: dict[str, Any] | None
    eval_data: Any = None
    encoder: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    train_texts: Any = None


def get_dataloaders(cfg: Any, accelerator: Any) -> TrainData:
    """Load (or build) the embedding cache and return the training batches and evaluation data.

    ``cfg`` is a :class:`asymvlm.training.config.TrainConfig`. The seam: ``asymvlm.training.loop.train`` calls
    ``asymvlm.training.data.get_dataloaders`` (or the ``data_fn`` passed to it), so tests and users can
    substitute their own data.
    """
    from asymvlm.eval.benchmark import EvalData

    d, t = cfg.data, cfg.train
    encoder = None
    if t.trainable != "head" or not d.cache_dir:
        from asymvlm.encoders import load_encoder

        encoder = load_encoder(d.encoder, d.pretrained or None, device=accelerator.device)
    with accelerator.main_process_first():  # build the cache once, then every process loads it
        cache = cache_for_config(d, encoder)
    source = dict(cache.manifest["encoder"])
    if encoder is not None and source.get("fingerprint") and encoder.fingerprint != source["fingerprint"]:
        raise CacheMismatchError(f"the cache {cache.path} was built by another encoder than {d.encoder!r}")
    images = cache.image_embeddings.float()
    text = cache.text_embeddings.float()
    owner = cache.text_image_index.clone()
    captions = cache.captions

    eval_data = None
    evaluation: dict[str, Any] = {}
    n_img = images.shape[0]
    from asymvlm.worlds import shapeworld as sw

    if sw.dataset_version(d.dataset) and not d.cache_dir and d.eval_images and t.eval_every >= 0:
        from asymvlm.eval.benchmark import shapeworld_eval_data

        eval_data = shapeworld_eval_data(
            encoder,
            n=d.eval_images,
            seed=d.data_seed + 10_000,
            caption_styles=sw.CAPTION_STYLES,
            visual_styles=sw.VISUAL_STYLES,
            version=sw.dataset_version(d.dataset),
        )
        evaluation = {"dataset": d.dataset, "split": f"a fresh split of {d.eval_images} images"}
    elif d.eval_fraction > 0:
        cut = int(round(n_img * (1 - d.eval_fraction)))
        held = owner >= cut
        held_captions = [c for c, h in zip(captions, held.tolist()) if h] if captions else None
        eval_data = EvalData(images[cut:], text[held], owner[held] - cut, captions=held_captions)
        text, owner, images = text[~held], owner[~held], images[:cut]
        captions = [c for c, h in zip(captions, held.tolist()) if not h] if captions else None
        evaluation = {"dataset": d.dataset if not d.cache_dir else Path(d.cache_dir).name,
                      "split": f"the last {d.eval_fraction:.0%} of the images, held out"}  # fmt: skip

    frozen_text = text  # (T, d) the training captions' frozen embeddings
    if t.trainable != "head":
        if not captions:
            raise ArtefactError(
                f"trainable={t.trainable} needs the caption strings in the cache ({cache.path}/captions.json)"
            )
        text = encoder.tokenize(captions)
    device = accelerator.device if d.device_resident else torch.device("cpu")
    groups = None if t.caption_positives == "none" else caption_groups(captions) if captions else "identical"
    scope = "data" if t.caption_positives == "data" else "batch"
    batches = IndexBatcher(text, images, owner, _batch_size(t.batch_size, owner.shape[0], accelerator), t.seed,
                           device, text_groups=groups, caption_scope=scope)  # fmt: skip
    from asymvlm.hub import describe_data

    return TrainData(
        batches=batches,
        dim=images.shape[1],
        encoder_source=source,
        eval_data=eval_data,
        encoder=encoder if t.trainable != "head" else None,
        train_texts=frozen_text,
        extra={  # what the saved model's card records
            "data": describe_data(d, cache, train_images=int(images.shape[0]), train_texts=int(owner.shape[0])),
            "evaluation": evaluation,
        },
    )
