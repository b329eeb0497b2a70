"""A served image collection: frozen image embeddings, thumbnails and the collection's captions in
one folder, built atomically (``asymvlm-index build``) and opened read-only (``asymvlm-serve``).

Layout of a gallery folder::

    gallery.json             type "asymvlm.gallery", format_version, encoder (spec, pretrained,
                             fingerprint, dim), size, source, thumbnails (format, max_side), captions
    images/index.json        an :class:`~asymvlm.retrieval.ImageIndex` (ids, dim, size, encoder)
    images/index.safetensors "embeddings": (N, d) unit image embeddings (float16 by default)
    images/faiss.index       with backend "faiss": an exact FAISS inner-product index of the same
                             rows (float32), read memory-mapped
    thumbnails.safetensors   "offsets": (N + 1,) int64, "data": (B,) uint8 — image i's encoded
                             thumbnail is data[offsets[i]:offsets[i + 1]]
    captions.json            the collection's distinct captions (optional; image -> text search)
    captions.safetensors     "embeddings": (M, d) their frozen text embeddings; "owner_offsets"
                             (M + 1,) int64 and "owner_rows" (E,) int64 — caption c is carried
                             by images owner_rows[owner_offsets[c]:owner_offsets[c + 1]] (sorted;
                             galleries built before owners were recorded lack both and serve
                             uncalibrated); optionally "truth_offsets" / "truth_rows" — the
                             images each caption is true of where the collection knows it
                             (ShapeWorld), named by gallery.json's "truth"

The gallery holds only what the frozen encoder computes (and what the collection says); the
text head's distributions over the captions are computed when a model opens it, so one gallery
serves every head trained on the same encoder (the encoder fingerprint is checked).

Thumbnails live in one memory-mapped blob addressed by row: serving a thumbnail never turns
anything from a request into a file path.

Which images carry each caption (its "owners", compressed rows as the thumbnails' offsets) lets
``asymvlm-serve`` fit a calibrator on the gallery's own captions
(:func:`asymvlm.confidence.fit_gallery_calibrator`): an answer to a caption is right when its best
image carries that caption.

Example:
    >>> import tempfile
    >>> from PIL import Image
    >>> from asymvlm.encoders import load_encoder
    >>> from asymvlm.heads import TextHead
    >>> from asymvlm.model import AsymVLM
    >>> enc = load_encoder("open_clip:asymvlm-tiny-vit")
    >>> model = AsymVLM(TextHead(dim=enc.dim, hidden_dims=(16,)), enc)
    >>> data = [{"image": Image.new("RGB", (32, 32), c), "captions": [f"a {c} square"], "image_id": c}
    ...         for c in ("red", "blue")]
    >>> g = build_gallery(model, data, tempfile.mkdtemp() + "/gallery", progress=False)
    >>> len(g), g.ids, g.captions, g.thumbnail(g.row_of("blue"))[:4]
    (2, ['red', 'blue'], ['a red square', 'a blue square'], b'\\xff\\xd8\\xff\\xe0')
    >>> [row.tolist() for row in g.caption_owners]  # (offsets, rows): "a blue square" is image 1's
    [[0, 1, 2], [0, 1]]
"""

from __future__ import annotations

import io
import logging
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from asymvlm.errors import ArtefactError, ConfigError, EncoderMismatchError
from asymvlm.io import (
    SafetensorsStreamWriter,
    atomic_directory,
    atomic_write_json,
    inside_folder,
    load_safetensors,
    read_json,
    read_tagged_json,
)

__all__ = [
    "Gallery",
    "build_gallery",
    "write_gallery",
    "load_image_collection",
    "collection_truth",
    "THUMBNAIL_FORMATS",
    "GALLERY_TYPE",
    "id_problem",
    "check_ids",
]

log = logging.getLogger("asymvlm.serve")

GALLERY_TYPE = "asymvlm.gallery"
GALLERY_VERSION = 1
BACKENDS = ("exact", "faiss")
ENCODER_KEYS = ("spec", "pretrained", "fingerprint", "dim")
# format -> (PIL format name, media type)
THUMBNAIL_FORMATS = {"jpeg": ("JPEG", "image/jpeg"), "png": ("PNG", "image/png"), "webp": ("WEBP", "image/webp")}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_DTYPES = {"float16": torch.float16, "float32": torch.float32}
TRUTH_LABEL = "consistent (the image satisfies the caption)"  # ShapeWorld's ground truth


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
        spec: a dataset spec of :func:`asymvlm.data.load_dataset_spec` (``imagefolder:<root>``,
            ``coco-karpathy:...``, ``coco2017:...``, ``flickr30k:...``); ``imagefolder:<root>``
            without a metadata.jsonl indexes every image file under the root (no captions);
            ``shapeworld`` / ``shapeworld:<version>`` generates ``num_images`` (default 1000)
            ShapeWorld scenes with ``seed``.
        num_images: keep the first ``num_images`` rows (all if None).
        seed: the ShapeWorld seed.
    """
    from asymvlm import shapeworld as sw

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
    from asymvlm.data import load_dataset_spec

    data = load_dataset_spec(spec)
    if num_images is not None and num_images < len(data):
        data = data.select(range(num_images))
    return data


def collection_truth(spec: str, *, num_images: int | None = None, seed: int = 0) -> tuple[Any, str | None]:
    """``(truth, label)`` for :func:`build_gallery` where a ``--images`` spec knows which images each
    caption is true of (ShapeWorld: :func:`asymvlm.shapeworld.caption_truth` of the same generated
    world as :func:`load_image_collection`'s), else ``(None, None)``."""
    from asymvlm import shapeworld as sw

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


def id_problem(image_id: str) -> str | None:
    """Why an image id cannot be served at a URL (``/v1/thumbnails/<id>``, percent-encoded), or None.

    Refused: the empty id, ``.`` and ``..`` (URL clients remove such path segments, encoded or
    not), control characters (a newline ends the route's match), line and paragraph separators, and
    lone surrogates (not UTF-8). Every other string is served at the URL the search returns.

    Example:
        >>> id_problem("sub/img 1.png") is None, id_problem("a\\nb"), id_problem("..")
        (True, "holds the control character '\\\\n'", 'is a dot segment')
    """
    if not isinstance(image_id, str) or image_id == "":
        return "is empty"
    if image_id in (".", ".."):
        return "is a dot segment"
    for c in image_id:
        if unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp"):
            return f"holds the control character {c!r}"
    return None


def check_ids(ids: Sequence[str], where: str) -> None:
    """Raise :class:`ConfigError` naming the first image id that cannot be served at a URL."""
    for row, i in enumerate(ids):
        why = id_problem(i)
        if why is not None:
            raise ConfigError(f"{where}: image id {i!r} (row {row}) {why}; rename it (ids become thumbnail URLs)")


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
    _check_backend(backend)
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
                raise ValueError(f"{len(thumbnails)} thumbnails for {n} images")
            if not all(isinstance(b, bytes) and b for b in thumbnails):
                raise ValueError("every thumbnail must be non-empty bytes (an encoded image)")
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


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")


def _faiss():
    from asymvlm.retrieval import faiss_module

    return faiss_module()


def _write_faiss(tmp: Path, chunk: int = 65536) -> None:
    """An exact FAISS inner-product index of the written embeddings (float32), next to them."""
    faiss = _faiss()
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
        raise ValueError(f"caption {prefix} rows for {len(owners)} captions, the gallery has {m} captions")
    rows = [sorted({int(r) for r in o}) for o in owners]
    bad = next(((c, r) for c, o in enumerate(rows) for r in o if not 0 <= r < n), None)
    if bad is not None:
        raise ValueError(f"caption {bad[0]}'s {prefix} row {bad[1]} is outside the gallery's {n} images")
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
        raise ValueError(f"{embeddings.shape[0]} caption embeddings for {len(captions)} captions")
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
            (e.g. :func:`asymvlm.shapeworld.caption_truth`); recorded with ``truth_label``, and the
            service calibrates ``p_correct`` on it instead of on who carries the caption.
        truth_label: what ``truth`` means, e.g. ``consistent (the image satisfies the caption)``.
        batch_size: images per encoder forward.
        backend: the gallery's default top-k engine, ``exact`` (chunked matmul over the memory-mapped
            embeddings) or ``faiss`` (also writes an exact FAISS index, read memory-mapped).
        progress: show progress bars.
    """
    from asymvlm.cache import iter_batches, load_rgb

    _check_backend(backend)
    if model.encoder is None:
        raise ConfigError("building a gallery needs a model with its encoder (it embeds images)")
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
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

        _write_images(tmp, _DTYPES[dtype], n, d, image_chunks(), ids, encoder.fingerprint)
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


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------
def _read_owners(
    t: dict[str, Tensor], m: int, n: int, where: Path, prefix: str = "owner"
) -> tuple[Tensor, Tensor] | None:
    """The checked ``(<prefix>_offsets, <prefix>_rows)`` of ``captions.safetensors``, or None when the
    gallery was built without them (both absent)."""
    present = [k for k in (f"{prefix}_offsets", f"{prefix}_rows") if k in t]
    if not present:
        return None
    if len(present) == 1:
        raise ArtefactError(
            f"{where}: caption {prefix}s need both '{prefix}_offsets' and '{prefix}_rows', found only {present[0]!r}"
        )
    offsets, rows = t[f"{prefix}_offsets"], t[f"{prefix}_rows"]
    if offsets.dtype != torch.int64 or rows.dtype != torch.int64:
        raise ArtefactError(f"{where}: caption {prefix}s must be int64, got {offsets.dtype} and {rows.dtype}")
    if offsets.shape != (m + 1,) or rows.dim() != 1:
        raise ArtefactError(
            f"{where}: {prefix}_offsets {tuple(offsets.shape)} and {prefix}_rows {tuple(rows.shape)} do not fit "
            f"{m} captions (need ({m + 1},) and (E,))"
        )
    if int(offsets[0]) != 0 or int(offsets[-1]) != rows.numel():
        raise ArtefactError(
            f"{where}: {prefix}_offsets must start at 0 and end at the {rows.numel()} {prefix} rows, "
            f"got {int(offsets[0])} ... {int(offsets[-1])}"
        )
    if bool((offsets[1:] < offsets[:-1]).any()):
        c = int((offsets[1:] < offsets[:-1]).nonzero()[0, 0])
        raise ArtefactError(
            f"{where}: {prefix}_offsets decrease at caption {c} ({int(offsets[c])} -> {int(offsets[c + 1])})"
        )
    out = (rows < 0) | (rows >= n)
    if bool(out.any()):
        e = int(out.nonzero()[0, 0])
        raise ArtefactError(f"{where}: {prefix} row {int(rows[e])} (entry {e}) is outside the gallery's {n} images")
    return offsets, rows


def _check_no_links(path: Path) -> None:
    """A gallery's files are its own: none of its entries (``images/`` and what it holds included) may
    be a symbolic link — one could make a gallery serve another gallery's embeddings."""
    entries = [*path.iterdir()]
    images = path / "images"
    if images.is_dir() and not images.is_symlink():
        entries += list(images.iterdir())
    for p in sorted(entries):
        if p.is_symlink():
            raise ArtefactError(
                f"{p} is a symbolic link (to {p.readlink()}); a gallery's files must be its own: copy them "
                "or rebuild with asymvlm-index build"
            )


def _check_meta(meta: dict[str, Any], where: Path) -> None:
    """Types and ranges of every gallery.json field (as :func:`write_gallery` writes them); an
    :class:`ArtefactError` naming the file and the field otherwise."""

    def bad(field: str, want: str, got: Any) -> ArtefactError:
        return ArtefactError(f"{where}: {field} must be {want}, got {got!r}"[:400])

    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if meta["format_version"] > GALLERY_VERSION:
        raise ArtefactError(
            f"{where}: format_version {meta['format_version']} is newer than this asymvlm reads ({GALLERY_VERSION}); "
            "upgrade asymvlm"
        )
    for key in ("size", "dim"):
        if not count(meta[key]) or meta[key] < 1:
            raise bad(key, "an integer >= 1", meta[key])
    if not count(meta["captions"]):
        raise bad("captions", "an integer >= 0 (how many captions captions.json holds)", meta["captions"])
    for key in ("source", "created"):
        if not isinstance(meta[key], str):
            raise bad(key, "a string", meta[key])
    if not isinstance(meta["backend"], str) or meta["backend"] not in BACKENDS:
        raise bad("backend", f"one of {list(BACKENDS)}", meta["backend"])
    if "truth" in meta and not (isinstance(meta["truth"], str) and meta["truth"]):
        raise bad("truth", "a non-empty string", meta["truth"])
    enc = meta["encoder"]
    if enc is not None:
        # a missing fingerprint is a missing provenance like null: check_encoder refuses it unless the
        # caller allows an unverified gallery explicitly
        need = set(ENCODER_KEYS) - {"fingerprint"}
        if not isinstance(enc, dict) or not need <= set(enc) <= set(ENCODER_KEYS):
            keys = sorted(enc) if isinstance(enc, dict) else enc
            raise bad("encoder", f"null or an object with the keys {list(ENCODER_KEYS)}", keys)
        for key in ("spec", "pretrained", "fingerprint"):
            if enc.get(key) is not None and not isinstance(enc[key], str):
                raise bad(f"encoder.{key}", "a string or null", enc[key])
        if enc["dim"] != meta["dim"] or isinstance(enc["dim"], bool):
            raise bad("encoder.dim", f"the gallery's dim ({meta['dim']})", enc["dim"])
    thumbs = meta["thumbnails"]
    if thumbs is not None:
        if not isinstance(thumbs, dict) or set(thumbs) != {"format", "max_side"}:
            keys = sorted(thumbs) if isinstance(thumbs, dict) else thumbs
            raise bad("thumbnails", "null or an object with exactly the keys ['format', 'max_side']", keys)
        if not isinstance(thumbs["format"], str) or thumbs["format"] not in THUMBNAIL_FORMATS:
            raise bad("thumbnails.format", f"one of {sorted(THUMBNAIL_FORMATS)}", thumbs["format"])
        side = thumbs["max_side"]
        if side is not None and not (count(side) and 1 <= side <= 1 << 16):
            raise bad("thumbnails.max_side", "null or an integer in [1, 65536] (pixels)", side)


@dataclass
class Gallery:
    """An opened gallery folder (memory-mapped, read-only: nothing here writes to it).

    Attributes:
        path: the folder.
        meta: gallery.json.
        index: the :class:`~asymvlm.retrieval.ImageIndex` over the image embeddings.
        captions: the distinct captions (empty without a caption index).
        caption_embeddings: (M, d) their frozen text embeddings, or None.
        caption_owners: ``(offsets (M + 1,), rows (E,))`` int64: caption ``c`` is carried by the
            images ``rows[offsets[c]:offsets[c + 1]]``; None in galleries built without them.
        caption_truth: the same layout for the images each caption is *true of*, where the
            collection knows (ShapeWorld's consistency; ``meta["truth"]`` says what it means), or None.
    """

    path: Path
    meta: dict[str, Any]
    index: Any
    captions: list[str]
    caption_embeddings: Tensor | None
    _thumb_offsets: Tensor | None
    _thumb_data: Tensor | None
    _row_of: dict[str, int] | None
    caption_owners: tuple[Tensor, Tensor] | None = None
    caption_truth: tuple[Tensor, Tensor] | None = None

    @classmethod
    def open(cls, path: str | Path, *, backend: str | None = None, chunk_size: int = 65536) -> Gallery:
        """Open a gallery folder read-only (embeddings memory-mapped; ids, captions read once).

        ``backend``: ``exact`` or ``faiss`` (None: the gallery's own, as built). FAISS reads the
        gallery's ``faiss.index`` memory-mapped when there is one, else builds it in memory.
        """
        from asymvlm.retrieval import ImageIndex

        path = Path(path)
        if not (path / "gallery.json").is_file():
            raise ArtefactError(f"no asymvlm gallery at {path} (no gallery.json); build one with asymvlm-index build")
        _check_no_links(path)
        meta_file = inside_folder(path, "gallery.json")
        meta = read_tagged_json(
            meta_file,
            GALLERY_TYPE,
            GALLERY_VERSION,
            required=("encoder", "size", "dim", "source", "thumbnails", "captions", "backend", "created"),
            known=("truth",),
        )
        _check_meta(meta, meta_file)
        for field, present, files in (
            ("thumbnails", meta["thumbnails"] is not None, ("thumbnails.safetensors",)),
            ("captions", meta["captions"] > 0, ("captions.json", "captions.safetensors")),
        ):
            stray = [f for f in files if not present and (path / f).exists()]
            if stray:
                raise ArtefactError(f"{meta_file}: {field} says there are none, but the gallery holds {stray[0]}")
        backend = backend or meta["backend"]
        _check_backend(backend)
        images = inside_folder(path, "images")
        faiss_index = None
        if backend == "faiss" and (images / "faiss.index").is_file():
            faiss = _faiss()
            try:  # memory-mapped and read-only: the index's vectors stay in the page cache
                faiss_index = faiss.read_index(
                    str(images / "faiss.index"), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
                )
            except RuntimeError as err:
                raise ArtefactError(f"{images / 'faiss.index'} is not a readable FAISS index: {err}") from err
        try:
            index = ImageIndex.load(images, mmap=True, backend=backend, chunk_size=chunk_size, faiss_index=faiss_index)
        except ValueError as err:
            raise ArtefactError(f"{images}: {err}") from err
        if (len(index), index.dim) != (meta["size"], meta["dim"]):
            raise ArtefactError(
                f"{meta_file}: size and dim say ({meta['size']}, {meta['dim']}), the image index "
                f"(images/index.json, images/index.safetensors) holds ({len(index)}, {index.dim})"
            )
        if index.ids is not None and not all(isinstance(i, str) for i in index.ids):
            bad = next(r for r, i in enumerate(index.ids) if not isinstance(i, str))
            raise ArtefactError(f"{images / 'index.json'}: ids[{bad}] must be a string, got {index.ids[bad]!r}")
        offsets = data = None
        if meta["thumbnails"] is not None:
            thumbs = inside_folder(path, "thumbnails.safetensors")
            t = load_safetensors(thumbs, ["offsets", "data"], mmap=True)
            offsets, data = t["offsets"], t["data"]
            if offsets.dtype != torch.int64 or data.dtype != torch.uint8 or data.dim() != 1:
                raise ArtefactError(
                    f"{thumbs}: offsets must be int64 and data 1-d uint8, got {offsets.dtype} and "
                    f"{data.dtype} {tuple(data.shape)}"
                )
            if offsets.shape != (len(index) + 1,) or int(offsets[0]) != 0 or int(offsets[-1]) != data.numel():
                raise ArtefactError(f"{thumbs}: offsets do not fit {len(index)} images")
            if bool((offsets[1:] < offsets[:-1]).any()):
                raise ArtefactError(f"{thumbs}: offsets are not increasing")
        captions: list[str] = []
        cap_emb = owners = truth = None
        if meta["captions"]:
            cap_json = inside_folder(path, "captions.json")
            cap_file = inside_folder(path, "captions.safetensors")
            captions = read_json(cap_json)
            if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
                raise ArtefactError(f"{cap_json} must be a list of strings")
            if len(captions) != meta["captions"]:
                raise ArtefactError(
                    f"{cap_json} holds {len(captions)} captions, gallery.json's captions says {meta['captions']}"
                )
            t = load_safetensors(cap_file, mmap=False)
            unknown = sorted(set(t) - {"embeddings", "owner_offsets", "owner_rows", "truth_offsets", "truth_rows"})
            if unknown:
                raise ArtefactError(f"{cap_file}: unknown tensor(s) {unknown}")
            if "embeddings" not in t:
                raise ArtefactError(f"{cap_file} has no tensor 'embeddings'")
            cap_emb = t["embeddings"]
            if tuple(cap_emb.shape) != (len(captions), meta["dim"]) or cap_emb.dtype != torch.float32:
                raise ArtefactError(
                    f"{cap_file}: embeddings {cap_emb.dtype} {tuple(cap_emb.shape)}, need float32 "
                    f"({len(captions)}, {meta['dim']}) for the {len(captions)} captions of captions.json"
                )
            from asymvlm.cache import validate_embeddings

            validate_embeddings(cap_emb, cap_file, "caption embeddings")
            owners = _read_owners(t, len(captions), len(index), cap_file)
            truth = _read_owners(t, len(captions), len(index), cap_file, "truth")
            if (truth is None) != ("truth" not in meta):
                raise ArtefactError(f"{meta_file}: its 'truth' and the truth rows of captions.safetensors go together")
        elif "truth" in meta:
            raise ArtefactError(f"{meta_file}: 'truth' without captions")
        if index.ids is not None:
            try:
                check_ids([str(i) for i in index.ids], str(path / "images" / "index.json"))
            except ConfigError as err:
                raise ArtefactError(f"{err}; rebuild the gallery with asymvlm-index build") from err
        row_of = None if index.ids is None else {str(i): r for r, i in enumerate(index.ids)}
        if row_of is not None and len(row_of) != len(index):
            raise ArtefactError(f"{path / 'images' / 'index.json'}: the ids are not unique")
        return cls(path, meta, index, captions, cap_emb, offsets, data, row_of, owners, truth)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def dim(self) -> int:
        return self.index.dim

    @property
    def ids(self) -> list[str]:
        """The image ids (the rows' numbers as strings when the gallery has none)."""
        return [str(i) for i in self.index.ids] if self.index.ids is not None else [str(i) for i in range(len(self))]

    def id_of(self, row: int) -> str:
        return str(self.index.ids[row]) if self.index.ids is not None else str(row)

    def row_of(self, image_id: str) -> int | None:
        """The row of an image id, or None when the gallery has no such image (never an error)."""
        if self._row_of is not None:
            return self._row_of.get(image_id)
        # no stored ids: the id is the row's number, written canonically (no sign, no leading zeros)
        if image_id.isascii() and image_id.isdigit() and str(int(image_id)) == image_id and int(image_id) < len(self):
            return int(image_id)
        return None

    @property
    def has_thumbnails(self) -> bool:
        return self._thumb_data is not None

    @property
    def thumbnail_media_type(self) -> str | None:
        return THUMBNAIL_FORMATS[self.meta["thumbnails"]["format"]][1] if self.has_thumbnails else None

    def thumbnail(self, row: int) -> bytes:
        """The encoded thumbnail of image ``row`` (a copy out of the memory map)."""
        if not self.has_thumbnails:
            raise ArtefactError(f"the gallery at {self.path} has no thumbnails")
        a, b = int(self._thumb_offsets[row]), int(self._thumb_offsets[row + 1])
        return self._thumb_data[a:b].numpy().tobytes()

    def check_encoder(self, model: Any, *, allow_unverified: bool = False) -> None:
        """Raise unless ``model``'s encoder made this gallery.

        Every fingerprint the gallery records (``gallery.json``'s ``encoder.fingerprint`` and
        ``images/index.json``'s ``encoder_fingerprint``) must equal the model's
        (:class:`EncoderMismatchError` otherwise). A gallery that records none while the model knows
        its encoder is of unknown provenance: an :class:`ArtefactError`, unless ``allow_unverified``
        (``asymvlm-serve --allow_unverified_gallery``), which serves it with a logged warning. A model
        that records no encoder (a head on bare embeddings) is served only a gallery that records none
        either (else the same choice). The dimensions must agree in any case.
        """
        have = None
        if model.encoder is not None:
            have = model.encoder.fingerprint
        elif model.encoder_source:
            have = model.encoder_source.get("fingerprint")
        have = have if isinstance(have, str) and have else None
        encoder = self.meta.get("encoder")
        spec = encoder.get("spec") if isinstance(encoder, dict) else None
        recorded = {  # (file, field) -> the fingerprint it records
            ("gallery.json", "encoder.fingerprint"): encoder.get("fingerprint") if isinstance(encoder, dict) else None,
            ("images/index.json", "encoder_fingerprint"): getattr(self.index, "encoder_fingerprint", None),
        }
        for (file, _), want in recorded.items():
            if isinstance(want, str) and want and have and want != have:
                raise EncoderMismatchError(
                    f"{self.path / file}: the gallery was built with another encoder ({spec}, "
                    f"fingerprint {want[:12]}) than the model's ({have[:12]}); rebuild it with asymvlm-index build "
                    "--model ..."
                )
        missing = [where for where, want in recorded.items() if not (isinstance(want, str) and want)]
        unverified = None
        if have and missing:
            file, name = missing[0]
            unverified = (
                f"{self.path / file}: records no encoder fingerprint (field {name!r}), so "
                "nothing shows that the model's encoder made this gallery"
            )
        elif not have and len(missing) < len(recorded):
            unverified = (
                f"{self.path}: the gallery records an encoder, the model none (a head on bare embeddings), so "
                "nothing shows that they match"
            )
        if unverified is not None:
            if not allow_unverified:
                raise ArtefactError(
                    f"{unverified}; rebuild it with asymvlm-index build --model ..., or serve it anyway with "
                    "--allow_unverified_gallery (allow_unverified_gallery=True)"
                )
            log.warning("serving an unverified gallery: %s (--allow_unverified_gallery)", unverified)
        if self.dim != model.dim:
            raise EncoderMismatchError(f"the gallery's embeddings have dimension {self.dim}, the model {model.dim}")
