"""The federation's data: an embedding cache partitioned by image among the simulated clients.

:func:`get_federated_data` is the seam tests (and users) replace: it returns one
:class:`~asymvlm.batching.IndexBatcher` per client over that client's caption rows (all captions
of an image go to the image's client). Evaluation data are not built here: the caller hands an
``evaluate`` function to :func:`asymvlm.federated.rounds.run_federated`.

Example:
    >>> FederatedData.__dataclass_fields__["batchers"].type
    'list[Any]'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from asymvlm.errors import ConfigError

__all__ = ["FederatedData", "get_federated_data", "partition_heterogeneity", "IMAGE_EMBEDDING"]

IMAGE_EMBEDDING = "image_embedding"  # the partition column of the cache's image embeddings (rows = images)


@dataclass
class FederatedData:
    """Per-client training data."""

    batchers: list[Any]  # one IndexBatcher per client (its caption rows)
    num_examples: list[int]  # images per client
    dim: int
    encoder_source: dict[str, Any] | None
    encoder: Any = None  # the frozen encoder, when clients train a text-tower LoRA
    summary: str = ""
    data_info: dict[str, Any] = field(default_factory=dict)  # the data as the model card records them
    heterogeneity: dict[str, Any] | None = None  # the partition's heterogeneity report (--heterogeneity_report)


def _shapeworld_columns(data_args: Any) -> dict[str, np.ndarray]:
    """Per-image attribute columns of the generated ShapeWorld training split (for partitioning)."""
    from asymvlm.worlds import shapeworld as sw

    version = sw.dataset_version(data_args.dataset)
    w = sw.generate_arrays(
        data_args.train_images,
        seed=data_args.data_seed,
        caption_styles=data_args.styles(),  # the columns of the cache cache_for_config built
        visual_styles=sw.VISUAL_STYLES,
        version=version,
    )
    names = sw.attribute_names(version)
    columns: dict[str, np.ndarray] = {}
    for i, attr in enumerate(names):
        columns[attr] = np.asarray(names[attr])[w.objects[:, 0, i]]
    columns["caption_style"] = np.asarray(w.config.caption_styles)[w.caption_style]
    columns["visual_style"] = np.asarray(w.config.visual_styles)[w.visual_style]
    return columns


def get_federated_data(data_args: Any, fed: Any) -> FederatedData:
    """The embedding cache (built once, as for asymvlm-train) partitioned by image among the clients.

    Args:
        data_args: an :class:`asymvlm.config.DataArguments`.
        fed: an :class:`asymvlm.federated.config.FederatedArguments`.
    """
    from asymvlm.batching import IndexBatcher, caption_groups
    from asymvlm.encoders import load_encoder
    from asymvlm.federated.partition import partition, partition_summary
    from asymvlm.worlds.data import cache_for_config

    encoder = None
    if fed.trainable != "head" or not data_args.cache_dir:
        encoder = load_encoder(data_args.encoder, data_args.pretrained or None)
    cache = cache_for_config(data_args, encoder)
    n_img = cache.image_embeddings.shape[0]
    from asymvlm.worlds.shapeworld import dataset_version

    columns = _shapeworld_columns(data_args) if dataset_version(data_args.dataset) and not data_args.cache_dir else {}

    class _Rows:
        def __len__(self):
            return n_img

        def __getitem__(self, name):
            if name == IMAGE_EMBEDDING:  # any cache's own frozen image embeddings (for --partition embedding)
                return cache.image_embeddings.float().numpy()
            if name not in columns:
                raise ConfigError(
                    f"partition column {name!r} is not available for this data; "
                    f"available: {sorted([*columns, IMAGE_EMBEDDING])} (ShapeWorld built from --dataset shapeworld)"
                )
            return columns[name]

    # the partition_* flags go to the partitioner that declares them (alpha means nothing to iid), then
    # partition_options (checked strictly by the registry)
    options = fed.partition_kwargs()
    parts = partition(_Rows(), fed.num_clients, fed.partition, seed=fed.seed, **options)
    owner = cache.text_image_index
    images = cache.image_embeddings.float()
    if fed.trainable == "head":
        text_all: Any = cache.text_embeddings.float()
    else:
        if not cache.captions:
            raise ConfigError("federating LoRA needs the caption strings in the cache")
        text_all = encoder.tokenize(cache.captions)
    batchers = []
    for k, img_rows in enumerate(parts):
        mask = torch.isin(owner, torch.from_numpy(img_rows))
        rows = torch.nonzero(mask).squeeze(1)
        text = {key: v[rows] for key, v in text_all.items()} if isinstance(text_all, dict) else text_all[rows]
        groups = caption_groups([cache.captions[r] for r in rows.tolist()]) if cache.captions else "identical"
        batchers.append(
            IndexBatcher(
                text, images, owner[rows], min(fed.local_batch_size, len(rows)), fed.seed + k, text_groups=groups
            )
        )
    summary = partition_summary(parts, columns.get(fed.partition_column) if columns else None)
    from asymvlm.hub import describe_data

    return FederatedData(
        batchers,
        [len(p) for p in parts],
        images.shape[1],
        dict(cache.manifest["encoder"]),
        encoder if fed.trainable != "head" else None,
        summary,
        describe_data(data_args, cache, partition=fed.partition),
        partition_heterogeneity(parts, _Rows(), fed, options) if fed.heterogeneity_report else None,
    )


def partition_heterogeneity(parts: list[np.ndarray], rows: Any, fed: Any, options: dict[str, Any]) -> dict[str, Any]:
    """The :func:`~asymvlm.federated.heterogeneity.heterogeneity_report` of the clients' images, against
    the partition's label column when the data have it (``options["column"]``, else
    ``fed.partition_column``), else the k-means clusters of an ``embedding`` partition (the same
    clusters, same seed), else a single label (client sizes only). ``labels_from`` says which.

    Example:
        >>> from types import SimpleNamespace as NS
        >>> fed = NS(partition="iid", partition_column="shape", seed=0)
        >>> r = partition_heterogeneity([np.arange(3), np.arange(3, 4)], {"shape": list("aabb")}, fed, {})
        >>> r["labels_from"], r["sizes"], r["histograms"]
        ("column 'shape'", [3, 1], [[2, 1], [0, 1]])
    """
    from asymvlm.federated.heterogeneity import heterogeneity_report
    from asymvlm.federated.partition import PARTITIONER_REGISTRY, embedding_clusters

    column = options.get("column", fed.partition_column)
    n = sum(len(p) for p in parts)  # every row belongs to one client
    if fed.partition == "embedding":
        clusters = PARTITIONER_REGISTRY.resolve("embedding", options)["clusters"]
        labels = embedding_clusters(rows[column], clusters, fed.seed)
        source = f"embedding clusters of {column!r}"
    else:
        try:
            labels = np.asarray(rows[column])
            source = f"column {column!r}"
        except (ConfigError, KeyError):
            labels, source = None, ""
        if labels is None or labels.ndim != 1 or len(labels) != n:
            labels, source = np.zeros(n, dtype=np.int64), "none (client sizes only)"
    report = heterogeneity_report(parts, labels)
    return {"partition": fed.partition, "options": dict(options), "labels_from": source, **report}
