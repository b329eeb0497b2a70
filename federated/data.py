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

__all__ = [
    "FederatedData",
    "ClientTests",
    "get_federated_data",
    "split_client_tests",
    "partition_heterogeneity",
    "label_column",
    "IMAGE_EMBEDDING",
    "caption_rows",
]

IMAGE_EMBEDDING = "image_embedding"  # the partition column of the cache's image embeddings (rows = images)


@dataclass
class ClientTests:
    """Every client's own test split: images held out of its partition (so from its own
    distribution), pooled into one gallery, and their captions as the client's queries."""

    images: torch.Tensor  # (I, d) the pooled gallery: every client's held-out images
    texts: list[Any]  # per client: its held-out captions ((T_k, d) embeddings, or token ids for LoRA)
    image_index: list[torch.Tensor]  # per client: (T_k,) the gallery row of each caption's image
    ambiguity: list[torch.Tensor | None]  # per client: (T_k,) true ambiguity (ShapeWorld), else None
    # per client: (T_k, I) bool, the gallery images that have a caption identical to the query (its own
    # image included): a vague caption repeated across images is right about each of them
    positives: list[torch.Tensor] | None = None


def split_client_tests(
    parts: list[np.ndarray], fraction: float, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``(train, test)`` image rows of every client: ``round(fraction * n_k)`` of its ``n_k`` images
    (at least one, and at least one left to train on) drawn at random (seeded) for its test split.

    Example:
        >>> train, test = split_client_tests([np.arange(10), np.arange(10, 12)], 0.2, seed=0)
        >>> [len(t) for t in train], [len(t) for t in test]
        ([8, 1], [2, 1])
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x7E57]))
    train, test = [], []
    for k, rows in enumerate(parts):
        if len(rows) < 2:
            raise ConfigError(
                f"client {k} has {len(rows)} image(s): a test split needs at least 2 (raise min_client_size)"
            )
        n_test = min(len(rows) - 1, max(1, int(round(fraction * len(rows)))))
        chosen = np.zeros(len(rows), dtype=bool)
        chosen[rng.choice(len(rows), size=n_test, replace=False)] = True
        train.append(np.sort(rows[~chosen]))
        test.append(np.sort(rows[chosen]))
    return train, test


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
    tests: ClientTests | None = None  # every client's own test split (--client_test_fraction)


def _shapeworld_world(data_args: Any) -> Any:
    """The generated ShapeWorld training split the cache was built from (its arrays)."""
    from asymvlm.worlds import shapeworld as sw

    return sw.generate_arrays(
        data_args.train_images,
        seed=data_args.data_seed,
        caption_styles=data_args.styles(),  # the columns of the cache cache_for_config built
        visual_styles=sw.VISUAL_STYLES,
        version=sw.dataset_version(data_args.dataset),
    )


def _shapeworld_columns(data_args: Any, world: Any = None) -> dict[str, np.ndarray]:
    """Per-image attribute columns of the generated ShapeWorld training split (for partitioning);
    ``world``: that split when the caller has it already (generated otherwise)."""
    from asymvlm.worlds import shapeworld as sw

    w = world if world is not None else _shapeworld_world(data_args)
    names = sw.attribute_names(sw.dataset_version(data_args.dataset))
    columns: dict[str, np.ndarray] = {}
    for i, attr in enumerate(names):
        columns[attr] = np.asarray(names[attr])[w.objects[:, 0, i]]
    columns["caption_style"] = np.asarray(w.config.caption_styles)[w.caption_style]
    columns["visual_style"] = np.asarray(w.config.visual_styles)[w.visual_style]
    return columns


def caption_rows(parts: list[np.ndarray], owner: torch.Tensor, num_images: int) -> list[torch.Tensor]:
    """Every part's caption rows (ascending): the captions whose image (``owner``) is in the part;
    the parts are disjoint sets of images. One pass over the captions for all parts (10,000 clients
    cost one sort, not 10,000 scans).

    Example:
        >>> [r.tolist() for r in caption_rows([np.array([2]), np.array([0, 1])], torch.tensor([0, 2, 1, 2, 0]), 3)]
        [[1, 3], [0, 2, 4]]
    """
    client_of = np.full(num_images, len(parts), dtype=np.int64)  # len(parts): the image is in no part
    for k, rows in enumerate(parts):
        client_of[rows] = k
    cap = client_of[owner.numpy()]
    order = np.argsort(cap, kind="stable")  # stable: ascending caption rows within each part
    bounds = np.searchsorted(cap[order], np.arange(len(parts) + 1))
    return [torch.from_numpy(order[bounds[k] : bounds[k + 1]]) for k in range(len(parts))]


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

    world = _shapeworld_world(data_args) if dataset_version(data_args.dataset) and not data_args.cache_dir else None
    columns = _shapeworld_columns(data_args, world) if world is not None else {}

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
    test_parts = None
    if fed.client_test_fraction > 0:
        parts, test_parts = split_client_tests(parts, fed.client_test_fraction, fed.seed)
    owner = cache.text_image_index
    images = cache.image_embeddings.float()
    if fed.trainable == "head":
        text_all: Any = cache.text_embeddings.float()
    else:
        if not cache.captions:
            raise ConfigError("federating LoRA needs the caption strings in the cache")
        text_all = encoder.tokenize(cache.captions)

    def batcher(k: int, rows: torch.Tensor) -> IndexBatcher:
        text = {key: v[rows] for key, v in text_all.items()} if isinstance(text_all, dict) else text_all[rows]
        groups = caption_groups([cache.captions[r] for r in rows.tolist()]) if cache.captions else "identical"
        return IndexBatcher(
            text, images, owner[rows], min(fed.local_batch_size, len(rows)), fed.seed + k, text_groups=groups
        )

    if fed.temporal_column:  # temporal skew: each client's data in two phases, switched at temporal_switch
        from asymvlm.federated.partition import embedding_clusters
        from asymvlm.federated.temporal import TEMPORAL_CLUSTERS, DriftingBatcher, temporal_phases

        labels = np.asarray(_Rows()[fed.temporal_column])
        if labels.ndim == 2:
            labels = embedding_clusters(labels, TEMPORAL_CLUSTERS, fed.seed)
        phases = temporal_phases(parts, labels, fed.seed)
        rows = caption_rows([p for ab in phases for p in ab], owner, n_img)
        batchers: list[Any] = [
            DriftingBatcher([batcher(k, rows[2 * k]), batcher(k, rows[2 * k + 1])], [fed.temporal_switch])
            for k in range(len(phases))
        ]
    else:
        batchers = [batcher(k, r) for k, r in enumerate(caption_rows(parts, owner, n_img))]
    tests = None
    if test_parts is not None:
        ambiguity = _shapeworld_ambiguity(world, owner) if world is not None else None
        tests = _client_tests(test_parts, owner, images, text_all, ambiguity, cache.captions)
    summary = partition_summary(parts, columns.get(label_column(fed, options)) if columns else None)
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
        tests,
    )


def _client_tests(
    test_parts: list[np.ndarray],
    owner: torch.Tensor,
    images: torch.Tensor,
    text_all: Any,
    ambiguity: Any,
    captions: list[str] | None = None,
) -> ClientTests:
    """The clients' test splits: their held-out images pooled in client order, their captions, and
    which gallery images each caption is also the caption of (identical strings; without strings,
    identical embedding / token rows)."""
    from asymvlm.batching import caption_groups

    gallery = np.concatenate(test_parts)
    position = torch.full((images.shape[0],), -1, dtype=torch.int64)
    position[torch.from_numpy(gallery)] = torch.arange(len(gallery))
    all_rows = torch.nonzero(torch.isin(owner, torch.from_numpy(gallery))).squeeze(1)
    if captions:
        groups = caption_groups([captions[r] for r in all_rows.tolist()])
    else:
        key = text_all["input_ids"] if isinstance(text_all, dict) else text_all
        groups = torch.unique(key[all_rows].reshape(len(all_rows), -1), dim=0, return_inverse=True)[1]
    group_of = dict(zip(all_rows.tolist(), groups.tolist()))
    said = torch.zeros(int(groups.max()) + 1 if len(groups) else 0, len(gallery), dtype=torch.bool)
    said[groups, position[owner[all_rows]]] = True  # (caption group, gallery image): the image has that caption
    texts, index, amb, pos = [], [], [], []
    for img_rows in test_parts:
        rows = torch.nonzero(torch.isin(owner, torch.from_numpy(img_rows))).squeeze(1)
        texts.append({k: v[rows] for k, v in text_all.items()} if isinstance(text_all, dict) else text_all[rows])
        index.append(position[owner[rows]])
        amb.append(None if ambiguity is None else ambiguity[rows])
        pos.append(said[torch.tensor([group_of[r] for r in rows.tolist()], dtype=torch.int64)])
    return ClientTests(images[torch.from_numpy(gallery)], texts, index, amb, pos)


def _shapeworld_ambiguity(w: Any, owner: torch.Tensor) -> torch.Tensor | None:
    """The true ambiguity of every caption row of the generated ShapeWorld split ``w`` the cache was
    built from (rows image-major, one per caption level), or None when the rows do not line up."""
    from asymvlm.worlds import shapeworld as sw

    amb = torch.as_tensor(sw.ambiguities(w.specs), dtype=torch.float64).reshape(-1)
    levels = w.specs.shape[1]
    if amb.shape[0] != owner.shape[0] or not torch.equal(
        owner, torch.arange(w.specs.shape[0]).repeat_interleave(levels)
    ):
        return None
    return amb


def label_column(fed: Any, options: dict[str, Any]) -> str:
    """The column a partition skews (its ``column`` or ``style_column`` option), else ``--partition_column``."""
    from asymvlm.federated.partition import PARTITIONER_REGISTRY

    resolved = PARTITIONER_REGISTRY.resolve(fed.partition, options)
    return resolved.get("column") or resolved.get("style_column") or fed.partition_column


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
    from asymvlm.federated.partition import PARTITIONER_REGISTRY, embedding_clusters, joint_labels

    column = label_column(fed, options)
    n = sum(len(p) for p in parts)  # every row belongs to one client
    if fed.partition == "joint":
        names = PARTITIONER_REGISTRY.resolve("joint", options)["columns"]
        names = [c.strip() for c in names.split(",")] if isinstance(names, str) else list(names)
        labels, source = joint_labels([rows[c] for c in names]), f"joint labels of {names}"
        return {"partition": fed.partition, "options": dict(options), "labels_from": source,
                **heterogeneity_report(parts, labels)}  # fmt: skip
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
