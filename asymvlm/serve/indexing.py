"""Building a gallery (``asymvlm-index build``): an image collection embedded once by the frozen
encoder, with thumbnails and the collection's captions, written atomically in the layout
:mod:`asymvlm.serve.gallery` reads.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from asymvlm.errors import ConfigError, InputError
from asymvlm.io import SafetensorsStreamWriter, atomic_directory, atomic_write_json, load_safetensors
from asymvlm.serve.gallery import (
    ENCODER_KEYS,
    GALLERY_TYPE,
    GALLERY_VERSION,
    IMAGE_SUFFIXES,
    THUMBNAIL_FORMATS,
    TRUTH_LABEL,
    Gallery,
    check_backend,
    check_ids,
    load_faiss,
)

__all__ = ["build_gallery", "write_gallery", "load_image_collection", "collection_truth"]

log = logging.getLogger("asymvlm.serve")

DTYPES = {"float16": torch.float16, "float32": torch.float32}  # how the embeddings may be stored


# ----------------------------------------------------------------------------------------------
# the collection
# ----------------------------------------------------------------------------------------------
def _plain_folder(root: Path) -> list[dict[str, Any]]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ConfigError(f"{root} holds no metadata.jsonl and no image files ({', '.join(IMAGE_SUFFIXES)})")
    return [{"image": str(p), "file_name": p.relative_to(root).as_posix()} for p in files]


def load_image_collection(spec: str, *, num_images: int | None = None, seed: int = 0) -> Any:
    """The images (and captions, where the collection has them) a ``--images`` spec names.

    Args:
        spec: a dataset spec of :func:`asymvlm.worlds.data.load_dataset_spec` (``imagefolder:<root>``,
            ``coco-karpathy:...``, ``coco2017:...``, ``flickr30k:...``); ``imagefolder:<root>``
            without a metadata.jsonl indexes every image file under the root (no captions);
            ``shapeworld`` / ``shapeworld:<version>`` generates ``num_images`` (default 1000)
            ShapeWorld scenes with ``seed``.
        num_images: keep the first ``num_images`` rows (all if None).
        seed: the ShapeWorld seed.
    """
    from asymvlm.worlds import shapeworld as sw

    if num_images is not None and num_images < 1:
        raise ConfigError(f"num_images must be >= 1, got {num_images}")
    try:
        version = sw.dataset_version(spec)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if version is not None:
        return sw.generate(num_images or 1000, seed=seed, version=version, visual_styles=sw.VISUAL_STYLES)
    kind, _, rest = spec.partition(":")
    if kind == "imagefolder" and rest and Path(rest).is_dir() and not (Path(rest) / "metadata.jsonl").exists():
        rows = _plain_folder(Path(rest))
        return rows[:num_images] if num_images else rows
    from asymvlm.worlds.data import load_dataset_spec

    data = load_dataset_spec(spec)
    if num_images is not None and num_images < len(data):
        data = data.select(range(num_images))
    return data


def collection_truth(spec: str, *, num_images: int | None = None, seed: int = 0) -> tuple[Any, str | None]:
    """``(truth, label)`` for :func:`build_gallery` where a ``--images`` spec knows which images each
    caption is true of (ShapeWorld: :func:`asymvlm.worlds.shapeworld.caption_truth` of the same generated
    world as :func:`load_image_collection`'s), else ``(None, None)``."""
    from asymvlm.worlds import shapeworld as sw

    try:
        version = sw.dataset_version(spec)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if version is None:
        return None, None
    world = sw.generate_arrays(num_images or 1000, seed=seed, version=version, visual_styles=sw.VISUAL_STYLES)
    return sw.caption_truth(world), TRUTH_LABEL


def _columns(dataset: Any) -> list[str]:
    """The column names of a ``datasets.Dataset`` or of a sequence of dicts (its first row's keys)."""
    if hasattr(dataset, "column_names"):
        return list(dataset.column_names)
    return list(dataset[0]) if len(dataset) else []


def _ids_of(dataset: Any) -> list[str]:
    from asymvlm.cache import iter_batches

    columns = _columns(dataset)
    key = next((c for c in ("file_name", "image_id", "id") if c in columns), None)
    if key is None:
        return [str(i) for i in range(len(dataset))]
    ids = [str(v) for b in iter_batches(dataset, [key], 4096) for v in b[key]]
    check_ids(ids, f"the collection's {key!r} column")
    seen: dict[str, int] = {}
    for row, i in enumerate(ids):
        if i in seen:
            raise ConfigError(f"the collection's ids ({key!r}) are not unique: {i!r} is rows {seen[i]} and {row}")
        seen[i] = row
    return ids


def _thumbnail(image: Any, max_side: int, fmt: str) -> bytes:
    im = image.copy()
    im.thumbnail((max_side, max_side))  # keeps the aspect ratio, never enlarges
    if fmt == "jpeg" and im.mode not in ("RGB", "L"):
        im = im.convert("RGB")
    out = io.BytesIO()
    pil_format = THUMBNAIL_FORMATS[fmt][0]
    im.save(out, format=pil_format, **({"quality": 85} if fmt in ("jpeg", "webp") else {}))
    return out.getvalue()


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------
def _encoder_info(model: Any) -> dict[str, Any]:
    enc = model.encoder
    return {"spec": enc.spec, "pretrained": enc.pretrained, "fingerprint": enc.fingerprint, "dim": enc.dim}


def write_gallery(
    out: str | Path,
    embeddings: Tensor,
    *,
    ids: Sequence[str] | None = None,
    thumbnails: Sequence[bytes] | None = None,
    thumbnail_format: str = "jpeg",
    thumbnail_size: int | None = None,
    captions: Sequence[str] | None = None,
    caption_embeddings: Tensor | None = None,
    caption_owners: Sequence[Sequence[int]] | None = None,
    caption_truth: Sequence[Sequence[int]] | None = None,
    truth_label: str | None = None,
    encoder: dict[str, Any] | None = None,
    source: str = "",
    backend: str = "exact",
) -> Gallery:
    """Write a gallery from tensors already in memory (tests, benchmarks, custom pipelines).

    ``ids`` None means the rows' numbers are the ids. ``caption_owners``: for each caption, the rows
    of the images that carry it (None: not recorded, and the gallery serves uncalibrated unless the
    model carries a calibrator). ``caption_truth`` / ``truth_label``: for each caption, the rows of the
    images it is true of where the collection knows (ShapeWorld's consistency), and what that means;
    the service then calibrates on it instead of on who carries the caption. Written atomically;
    returns the opened gallery.
    """
    if (caption_truth is None) != (truth_label is None):
        raise ConfigError("caption_truth and truth_label go together")
    out = Path(out)
    n, d = embeddings.shape
    check_backend(backend)
    if ids is not None and (len(ids) != n or len(set(map(str, ids))) != n):
        raise ConfigError(f"need {n} distinct ids, got {len(ids)} ({len(set(map(str, ids)))} distinct)")
    if ids is not None:
        ids = [str(i) for i in ids]
        check_ids(ids, "ids")
    if encoder is not None:
        unknown = sorted(set(encoder) - set(ENCODER_KEYS))
        if unknown:
            raise ConfigError(f"unknown encoder key(s) {unknown}; a gallery records {list(ENCODER_KEYS)}")
        encoder = {"spec": None, "pretrained": None, "fingerprint": None, **encoder, "dim": d}
    with atomic_directory(out) as tmp:
        _write_images(tmp, embeddings.dtype, n, d, [embeddings], ids, (encoder or {}).get("fingerprint"))
        thumb_meta = None
        if thumbnails is not None:
            if len(thumbnails) != n:
                raise InputError(f"{len(thumbnails)} thumbnails for {n} images")
            if not all(isinstance(b, bytes) and b for b in thumbnails):
                raise InputError("every thumbnail must be non-empty bytes (an encoded image)")
            _write_thumbnails(tmp, list(thumbnails))
            thumb_meta = {"format": thumbnail_format, "max_side": thumbnail_size}
        n_caps = _write_captions(tmp, captions, caption_embeddings, caption_owners, n, caption_truth)
        if backend == "faiss":
            _write_faiss(tmp)
        _write_meta(tmp, encoder, n, d, source, thumb_meta, n_caps, backend, truth_label if n_caps else None)
    return Gallery.open(out)


def _write_images(
    tmp: Path, dtype: torch.dtype, n: int, d: int, chunks: Any, ids: Sequence[str] | None, fingerprint: str | None
) -> None:
    (tmp / "images").mkdir()
    with SafetensorsStreamWriter(tmp / "images" / "index.safetensors", {"embeddings": (dtype, (n, d))}) as w:
        for chunk in chunks:
            w.write("embeddings", chunk)
    atomic_write_json(
        {
            "type": "asymvlm.image_index",
            "format_version": 1,
            "dim": d,
            "size": n,
            "ids": None if ids is None else list(ids),
            "encoder_fingerprint": fingerprint,
            "dtype": str(dtype).removeprefix("torch."),
        },
        tmp / "images" / "index.json",
    )


def _write_faiss(tmp: Path, chunk: int = 65536) -> None:
    """An exact FAISS inner-product index of the written embeddings (float32), next to them."""
    faiss = load_faiss()
    emb = load_safetensors(tmp / "images" / "index.safetensors", ["embeddings"], mmap=True)["embeddings"]
    index = faiss.IndexFlatIP(emb.shape[1])
    for s in range(0, emb.shape[0], chunk):
        index.add(emb[s : s + chunk].float().contiguous().numpy())
    faiss.write_index(index, str(tmp / "images" / "faiss.index"))


def _write_thumbnails(tmp: Path, blobs: Any, blob_file: Path | None = None) -> None:
    """``blobs``: the encoded thumbnails in row order (a list), or their lengths when ``blob_file``
    already holds the concatenated bytes."""
    sizes = [len(b) for b in blobs] if blob_file is None else list(blobs)
    offsets = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(sizes, dtype=torch.int64).cumsum(0)
    total = int(offsets[-1])
    specs = {"offsets": (torch.int64, (len(sizes) + 1,)), "data": (torch.uint8, (total,))}
    with SafetensorsStreamWriter(tmp / "thumbnails.safetensors", specs) as w:
        w.write("offsets", offsets)
        if blob_file is None:
            for b in blobs:
                if b:
                    w.write("data", torch.frombuffer(bytearray(b), dtype=torch.uint8))
        else:
            with open(blob_file, "rb") as f:
                while chunk := f.read(1 << 24):
                    w.write("data", torch.frombuffer(bytearray(chunk), dtype=torch.uint8))


def _owner_tensors(owners: Sequence[Sequence[int]], m: int, n: int, prefix: str = "owner") -> dict[str, Tensor]:
    """``<prefix>_offsets`` (M + 1,) and ``<prefix>_rows`` (E,), int64: each caption's distinct image
    rows, sorted, in compressed rows (``owner``: who carries it; ``truth``: what it is true of)."""
    if len(owners) != m:
        raise InputError(f"caption {prefix} rows for {len(owners)} captions, the gallery has {m} captions")
    rows = [sorted({int(r) for r in o}) for o in owners]
    bad = next(((c, r) for c, o in enumerate(rows) for r in o if not 0 <= r < n), None)
    if bad is not None:
        raise InputError(f"caption {bad[0]}'s {prefix} row {bad[1]} is outside the gallery's {n} images")
    offsets = torch.zeros(m + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor([len(o) for o in rows], dtype=torch.int64).cumsum(0)
    flat = torch.tensor([r for o in rows for r in o], dtype=torch.int64)
    return {f"{prefix}_offsets": offsets, f"{prefix}_rows": flat}


def _write_captions(
    tmp: Path,
    captions: Sequence[str] | None,
    embeddings: Tensor | None,
    owners: Sequence[Sequence[int]] | None = None,
    n_images: int = 0,
    truth: Sequence[Sequence[int]] | None = None,
) -> int:
    if captions is None or embeddings is None or len(captions) == 0:
        return 0
    if embeddings.shape[0] != len(captions):
        raise InputError(f"{embeddings.shape[0]} caption embeddings for {len(captions)} captions")
    from asymvlm.io import atomic_save_safetensors

    tensors = {"embeddings": embeddings.float()}
    if owners is not None:
        tensors.update(_owner_tensors(owners, len(captions), n_images))
    if truth is not None:
        tensors.update(_owner_tensors(truth, len(captions), n_images, "truth"))
    atomic_save_safetensors(tensors, tmp / "captions.safetensors")
    atomic_write_json(list(captions), tmp / "captions.json")
    return len(captions)


def _write_meta(
    tmp: Path,
    encoder: dict | None,
    n: int,
    d: int,
    source: str,
    thumbnails: dict | None,
    n_captions: int,
    backend: str = "exact",
    truth: str | None = None,
) -> None:
    atomic_write_json(
        {
            **({"truth": truth} if truth else {}),
            "type": GALLERY_TYPE,
            "format_version": GALLERY_VERSION,
            "encoder": encoder,
            "size": n,
            "dim": d,
            "source": source,
            "thumbnails": thumbnails,
            "captions": n_captions,
            "backend": backend,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        tmp / "gallery.json",
    )


@torch.no_grad()
def build_gallery(
    model: Any,
    dataset: Any,
    out: str | Path,
    *,
    source: str = "",
    dtype: str = "float16",
    thumbnail_size: int = 256,
    thumbnail_format: str = "jpeg",
    captions: bool = True,
    batch_size: int = 64,
    backend: str = "exact",
    truth: Any = None,
    truth_label: str | None = None,
    progress: bool = True,
) -> Gallery:
    """Embed an image collection into a gallery folder (atomically: ``out`` is complete or untouched).

    Args:
        model: an :class:`~asymvlm.model.AsymVLM` with its encoder (its text tower, adapted if the
            model adapts it, embeds the captions).
        dataset: rows with an ``image`` (PIL image or file path) and optionally ``captions`` (a
            string or a list) and an id column (``file_name``, ``image_id`` or ``id``; else the row).
        out: the gallery folder.
        source: what the collection was (the ``--images`` spec), recorded in gallery.json.
        dtype: storage of the image embeddings, ``float16`` or ``float32``.
        thumbnail_size: longest side of the thumbnails in pixels (never enlarged).
        thumbnail_format: ``jpeg``, ``png`` or ``webp``.
        captions: index the collection's distinct captions for image -> text search, with the
            images that carry each (for the service's calibration).
        truth: ``truth(distinct captions) -> [image rows]``, the images each caption is true of
            (e.g. :func:`asymvlm.worlds.shapeworld.caption_truth`); recorded with ``truth_label``, and the
            service calibrates ``p_correct`` on it instead of on who carries the caption.
        truth_label: what ``truth`` means, e.g. ``consistent (the image satisfies the caption)``.
        batch_size: images per encoder forward.
        backend: the gallery's default top-k engine, ``exact`` (chunked matmul over the memory-mapped
            embeddings) or ``faiss`` (also writes an exact FAISS index, read memory-mapped).
        progress: show progress bars.
    """
    from asymvlm.cache import iter_batches, load_rgb

    check_backend(backend)
    if model.encoder is None:
        raise ConfigError("building a gallery needs a model with its encoder (it embeds images)")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if thumbnail_format not in THUMBNAIL_FORMATS:
        raise ConfigError(f"thumbnail_format must be one of {sorted(THUMBNAIL_FORMATS)}, got {thumbnail_format!r}")
    if thumbnail_size < 8:
        raise ConfigError(f"thumbnail_size must be >= 8 pixels, got {thumbnail_size}")
    n = len(dataset)
    if n == 0:
        raise ConfigError("the image collection is empty")
    ids = _ids_of(dataset)
    columns = _columns(dataset)
    has_captions = captions and "captions" in columns
    encoder = model.encoder
    d = encoder.dim
    out = Path(out)
    sizes: list[int] = []
    distinct: dict[str, list[int]] = {}  # caption -> the rows of the images that carry it (ascending)
    with atomic_directory(out) as tmp:
        blob_file = tmp / "thumbnails.bin.part"

        def image_chunks():
            bar = tqdm(total=n, desc="embed images", disable=not progress)
            with open(blob_file, "wb") as blob:
                wanted = ["image", "captions"] if has_captions else ["image"]
                for batch in iter_batches(dataset, wanted, batch_size):
                    images = [load_rgb(im) for im in batch["image"]]
                    first = len(sizes)  # the batch's first row
                    for im in images:
                        b = _thumbnail(im, thumbnail_size, thumbnail_format)
                        blob.write(b)
                        sizes.append(len(b))
                    if has_captions:
                        for row, caps in enumerate(batch["captions"], start=first):
                            for c in [caps] if isinstance(caps, str) else caps:
                                owners = distinct.setdefault(c, [])
                                if not owners or owners[-1] != row:  # a caption repeated on one image
                                    owners.append(row)
                    yield encoder.encode_image(images, batch_size=batch_size)
                    bar.update(len(images))
            bar.close()

        _write_images(tmp, DTYPES[dtype], n, d, image_chunks(), ids, encoder.fingerprint)
        _write_thumbnails(tmp, sizes, blob_file)
        blob_file.unlink()
        texts = list(distinct)
        cap_emb = None
        if texts:
            step = 1024
            cap_emb = torch.cat(
                [
                    model.text_embeddings(texts[s : s + step]).float().cpu()
                    for s in tqdm(range(0, len(texts), step), desc="embed captions", disable=not progress)
                ]
            )
        true_of = truth(texts) if truth is not None and texts else None
        n_caps = _write_captions(tmp, texts, cap_emb, [distinct[t] for t in texts], n, true_of)
        if backend == "faiss":
            _write_faiss(tmp)
        thumbs = {"format": thumbnail_format, "max_side": thumbnail_size}
        label = truth_label if true_of is not None else None
        _write_meta(tmp, _encoder_info(model), n, d, source, thumbs, n_caps, backend, label)
    return Gallery.open(out)
