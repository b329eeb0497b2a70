"""Compute frozen embeddings once: an on-disk cache of a dataset's image and caption embeddings.

Layout of a cache directory::

    manifest.json        type "asymvlm.embedding_cache", format_version, encoder (spec, pretrained,
                         fingerprint, dim), dataset_fingerprint, dtype, num_images, num_texts
    images.safetensors   "embeddings": (num_images, d)
    texts.safetensors    "embeddings": (num_texts, d), "image_index": (num_texts,) int64,
                         the image row each caption describes
    captions.json        the caption strings, in text-row order
    caption_meta.json    optional: {"level": [...], "ambiguity": [...]} per text row (either key),
                         the ground truth evaluations read (``asymvlm-eval --cache``)

The files are streamed to a temporary directory next to the target (never more than one batch
of embeddings in memory) and the directory is renamed into place at the end, so an interrupted
run leaves no half-valid cache. Loading memory-maps the safetensors files: a 1M x 512 float16
cache (1 GB) costs no private memory until rows are touched.

A cache is reused only when both the encoder fingerprint (spec + weights hash) and the dataset
fingerprint match; anything else is a :class:`CacheMismatchError`, never a silent reuse. Reading a
dataset's rows (batches, images within a pixel limit, the fingerprint) is :mod:`asymvlm.dataset_io`'s.

Example:
    >>> import tempfile
    >>> from PIL import Image
    >>> from asymvlm.encoders import load_encoder
    >>> enc = load_encoder("open_clip:asymvlm-tiny-vit")
    >>> data = [{"image": Image.new("RGB", (32, 32), c), "captions": [f"a {c} square", "a square"]}
    ...         for c in ("red", "blue")]
    >>> cache = embed_dataset(enc, data, tempfile.mkdtemp() + "/cache", progress=False)
    >>> cache.image_embeddings.shape, cache.text_embeddings.shape, cache.text_image_index.tolist()
    (torch.Size([2, 32]), torch.Size([4, 32]), [0, 0, 1, 1])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from asymvlm.dataset_io import caption_list, dataset_fingerprint, default_max_pixels, iter_batches, load_rgb, num_rows
from asymvlm.errors import CacheMismatchError, ConfigError, InputError
from asymvlm.io import (
    ArtefactError,
    SafetensorsStreamWriter,
    atomic_directory,
    atomic_save_safetensors,
    atomic_write_json,
    inside_folder,
    load_safetensors,
    read_json,
    read_tagged_json,
)

__all__ = [
    "EmbeddingCache",
    "CacheMismatchError",
    "embed_dataset",
    "write_cache",
    "dataset_fingerprint",
    "validate_embeddings",
    "validate_index",
    "iter_batches",
    "load_rgb",
    "default_max_pixels",
    "check_cache_encoder",
]

CACHE_TYPE = "asymvlm.embedding_cache"
CACHE_VERSION = 1
_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
ENCODER_KEYS = ("spec", "pretrained", "fingerprint", "dim")  # manifest.json's encoder, every key written


# ----------------------------------------------------------------------------------------------
# the cache
# ----------------------------------------------------------------------------------------------
@dataclass
class EmbeddingCache:
    """A loaded embedding cache (tensors memory-mapped; do not modify them in place).

    Attributes:
        path: the cache directory.
        manifest: the parsed manifest.json.
        image_embeddings: (num_images, d), stored dtype.
        text_embeddings: (num_texts, d), stored dtype.
        text_image_index: (num_texts,) int64, the image row of each caption.
        captions: the caption strings (or None if captions.json is absent).
        caption_meta: ``{"level": (T,) int64, "ambiguity": (T,) float64}`` (the keys present in
            caption_meta.json; empty without it).
    """

    path: Path
    manifest: dict[str, Any]
    image_embeddings: Tensor
    text_embeddings: Tensor
    text_image_index: Tensor
    captions: list[str] | None
    validated: bool = False  # the values were checked when loaded (ImageIndex.from_cache then skips it)
    caption_meta: dict[str, Tensor] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.manifest["encoder"]["dim"])

    @property
    def encoder_fingerprint(self) -> str:
        return self.manifest["encoder"]["fingerprint"]

    @property
    def dataset_fingerprint(self) -> str:
        return self.manifest["dataset_fingerprint"]

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        encoder_fingerprint: str | None = None,
        dataset_fingerprint: str | None = None,
        mmap: bool = True,
        validate: bool = True,
    ) -> EmbeddingCache:
        """Open a cache directory; optionally require matching fingerprints.

        ``validate`` (default) checks the stored values once, vectorised and in chunks (memory stays
        bounded on memory-mapped files): every embedding row finite and of unit norm (a zero row is
        not), every caption's image row in ``[0, num_images)``. A failure names the file and the row.

        Raises:
            ArtefactError: missing, corrupt or inconsistent files, or invalid values.
            CacheMismatchError: a fingerprint given here differs from the cache's.
        """
        path = Path(path)
        if not path.is_dir():
            raise ArtefactError(f"no embedding cache at {path} (expected a directory with manifest.json)")
        manifest_file = inside_folder(path, "manifest.json")
        manifest = read_tagged_json(
            manifest_file,
            CACHE_TYPE,
            CACHE_VERSION,
            required=("encoder", "dataset_fingerprint", "dtype", "num_images", "num_texts", "created_by"),
            known=(),
            allow_nan=False,
        )
        _check_manifest(manifest, manifest_file)
        _check_fingerprints(manifest, path, encoder_fingerprint, dataset_fingerprint)
        images_file = inside_folder(path, "images.safetensors")
        texts_file = inside_folder(path, "texts.safetensors")
        images = load_safetensors(images_file, ["embeddings"], mmap=mmap)["embeddings"]
        texts = load_safetensors(texts_file, ["embeddings", "image_index"], mmap=mmap)
        d = int(manifest["encoder"]["dim"])
        store = _DTYPES[manifest["dtype"]]
        n_img, n_txt = manifest["num_images"], manifest["num_texts"]
        for file, name, t, want in (
            (images_file, "embeddings", images, (store, (n_img, d))),
            (texts_file, "embeddings", texts["embeddings"], (store, (n_txt, d))),
            (texts_file, "image_index", texts["image_index"], (torch.int64, (n_txt,))),
        ):
            if (t.dtype, tuple(t.shape)) != want:
                raise ArtefactError(
                    f"{file}: {name!r} is {t.dtype} {tuple(t.shape)}, manifest.json implies {want[0]} {want[1]} "
                    f"({n_img} images, {n_txt} texts, d={d}, dtype {manifest['dtype']})"
                )
        captions = None
        if (path / "captions.json").exists() or (path / "captions.json").is_symlink():
            captions_file = inside_folder(path, "captions.json")
            captions = read_json(captions_file)
            if not isinstance(captions, list) or len(captions) != n_txt:
                raise ArtefactError(f"{captions_file}: expected a list of {n_txt} captions (num_texts)")
            bad = next((i for i, c in enumerate(captions) if not isinstance(c, str)), None)
            if bad is not None:
                raise ArtefactError(f"{captions_file}: caption [{bad}] must be a string, got {captions[bad]!r}"[:300])
        if validate:
            validate_embeddings(images, images_file, "image embeddings")
            validate_embeddings(texts["embeddings"], texts_file, "text embeddings")
            validate_index(texts["image_index"], n_img, texts_file)
        meta = {}
        if (path / CAPTION_META).exists() or (path / CAPTION_META).is_symlink():
            meta = _read_caption_meta(inside_folder(path, CAPTION_META), n_txt)
        cache = cls(path, manifest, images, texts["embeddings"], texts["image_index"], captions, caption_meta=meta)
        cache.validated = validate
        return cache


CAPTION_META = "caption_meta.json"
_META_DTYPES = {"level": torch.int64, "ambiguity": torch.float64}


MAX_LEVEL = 2**31 - 1  # a caption's level (its specificity): a small integer; anything past int32 is corrupt


def _is_level(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_LEVEL


def _read_caption_meta(path: Path, num_texts: int) -> dict[str, Tensor]:
    if not path.is_file():
        return {}
    doc = read_json(path)
    if not isinstance(doc, dict) or set(doc) - set(_META_DTYPES):
        raise ArtefactError(f"{path}: expected an object with keys among {sorted(_META_DTYPES)}")
    out = {}
    for key, values in doc.items():
        if not isinstance(values, list) or len(values) != num_texts:
            raise ArtefactError(f"{path}: '{key}' must be a list of {num_texts} numbers (one per caption)")
        if key == "level":
            bad = next((i for i, v in enumerate(values) if not _is_level(v)), None)
            if bad is not None:
                raise ArtefactError(
                    f"{path}: level[{bad}] must be an integer in [0, {MAX_LEVEL}], got {values[bad]!r}"[:300]
                )
        elif any(isinstance(v, bool) for v in values):
            raise ArtefactError(f"{path}: 'ambiguity' holds a non-number (a boolean)")
        try:
            t = torch.tensor(values, dtype=_META_DTYPES[key])
        except (TypeError, ValueError, RuntimeError) as err:
            raise ArtefactError(f"{path}: '{key}' holds a non-number: {err}") from None
        if key == "ambiguity" and not bool((torch.isfinite(t) & (t > 0)).all()):
            raise ArtefactError(f"{path}: 'ambiguity' must be positive and finite")
        out[key] = t
    return out


def validate_embeddings(x: Tensor, where: Path | str, name: str, chunk: int = 65536) -> None:
    """Every row finite and of unit norm, checked in chunks; an :class:`ArtefactError` naming the
    file and the first bad row otherwise."""
    from asymvlm.heads import check_embeddings

    if x.dim() != 2 or not x.is_floating_point():
        raise ArtefactError(f"{where}: {name} must be a floating (N, d) tensor, got {x.dtype} {tuple(x.shape)}")
    for s in range(0, x.shape[0], chunk):
        try:
            check_embeddings(x[s : s + chunk].float(), x.shape[1], name, unit=True, row_offset=s)
        except ValueError as err:
            raise ArtefactError(f"{where}: {err}") from None


def validate_index(index: Tensor, num_images: int, where: Path | str) -> None:
    """Each caption's image row is an integer in ``[0, num_images)`` (a -1 would wrap to the last image)."""
    if index.dim() != 1 or index.dtype not in (torch.int64, torch.int32):
        raise ArtefactError(
            f"{where}: image_index must be a 1-d integer tensor, got {index.dtype} {tuple(index.shape)}"
        )
    bad = (index < 0) | (index >= num_images)
    if bool(bad.any()):
        row = int(torch.nonzero(bad)[0, 0])
        raise ArtefactError(f"{where}: caption row {row} points at image {int(index[row])}, outside [0, {num_images})")


def check_cache_encoder(
    cache: EmbeddingCache, fingerprint: str | None, *, what: str = "the encoder", allow_missing: bool = False
) -> None:
    """The cache was made by the encoder of ``fingerprint`` (a model's recorded encoder, a loaded
    encoder's): a :class:`CacheMismatchError` when the two differ, and when either side records no
    fingerprint (missing provenance is never a match) unless ``allow_missing`` — then a warning says
    that nothing was checked. ``what`` names the other side in the messages.

    Example:
        >>> import torch, tempfile
        >>> x = torch.nn.functional.normalize(torch.randn(2, 4), dim=-1)
        >>> c = write_cache(tempfile.mkdtemp() + "/c", x, x, torch.arange(2), encoder={"fingerprint": "ab" * 32})
        >>> check_cache_encoder(c, "ab" * 32)  # the same encoder: nothing to say
    """
    import warnings

    have = (cache.manifest.get("encoder") or {}).get("fingerprint")
    if have and fingerprint:
        if have != fingerprint:
            raise CacheMismatchError(
                f"the cache at {cache.path} was made by another encoder (fingerprint {have[:16]}...) than {what} "
                f"(fingerprint {fingerprint[:16]}...)"
            )
        return
    side = f"the cache at {cache.path}" if not have else what
    if not allow_missing:
        raise CacheMismatchError(
            f"{side} records no encoder fingerprint, so the cache cannot be checked against {what}: rebuild the cache "
            "with embed_dataset (or write_cache(encoder={..., 'fingerprint': ...})), or allow it explicitly"
        )
    warnings.warn(
        f"{side} records no encoder fingerprint: the cache is used without checking its encoder", stacklevel=2
    )


def _check_manifest(manifest: dict, where: Path) -> None:
    """Types and ranges of every manifest field; an :class:`ArtefactError` naming the file and field."""

    def count(key: str) -> None:
        v = manifest[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ArtefactError(f"{where}: {key} must be an integer >= 0, got {v!r}")

    if manifest["format_version"] > CACHE_VERSION:
        raise ArtefactError(
            f"{where}: format_version {manifest['format_version']} is newer than this asymvlm reads ({CACHE_VERSION})"
        )
    enc = manifest["encoder"]
    if not isinstance(enc, dict) or set(enc) != set(ENCODER_KEYS):
        keys = sorted(enc) if isinstance(enc, dict) else enc
        raise ArtefactError(
            f"{where}: encoder must be an object with exactly the keys {list(ENCODER_KEYS)}, got {keys!r}"[:300]
        )
    dim = enc.get("dim")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ArtefactError(f"{where}: encoder.dim must be an integer >= 1, got {dim!r}")
    for key in ("spec", "pretrained", "fingerprint"):
        if enc.get(key) is not None and not isinstance(enc[key], str):
            raise ArtefactError(f"{where}: encoder.{key} must be a string or null, got {enc[key]!r}")
    if not isinstance(manifest["dataset_fingerprint"], str):
        raise ArtefactError(f"{where}: dataset_fingerprint must be a string, got {manifest['dataset_fingerprint']!r}")
    if not isinstance(manifest["created_by"], str):
        raise ArtefactError(f"{where}: created_by must be a string, got {manifest['created_by']!r}"[:300])
    if not isinstance(manifest["dtype"], str) or manifest["dtype"] not in _DTYPES:
        raise ArtefactError(f"{where}: dtype must be one of {sorted(_DTYPES)}, got {manifest['dtype']!r}")
    count("num_images")
    count("num_texts")


def _check_fingerprints(manifest: dict, path: Path, encoder_fp: str | None, dataset_fp: str | None) -> None:
    have_enc, have_data = manifest["encoder"].get("fingerprint"), manifest["dataset_fingerprint"]
    if encoder_fp is not None and not have_enc:  # missing provenance is never a match
        raise CacheMismatchError(
            f"the cache at {path} records no encoder fingerprint (encoder.fingerprint is {have_enc!r} in "
            f"manifest.json), so it cannot be checked against the encoder given (fingerprint {encoder_fp[:16]}...); "
            "rebuild it with embed_dataset, or load it without encoder_fingerprint= to use it as it is"
        )
    if encoder_fp is not None and encoder_fp != have_enc:
        raise CacheMismatchError(
            f"the cache at {path} was built by another encoder ({manifest['encoder'].get('spec')!r}, fingerprint "
            f"{str(have_enc)[:16]}...) than the one given (fingerprint {encoder_fp[:16]}...); use another cache "
            f"directory or overwrite=True"
        )
    if dataset_fp is not None and dataset_fp != have_data:
        raise CacheMismatchError(
            f"the cache at {path} was built from another dataset (fingerprint {have_data}) than the one given "
            f"({dataset_fp}); use another cache directory or overwrite=True"
        )


def _finish(
    tmp: Path,
    captions: list[str] | None,
    encoder_info: dict,
    dataset_fp: str,
    dtype: str,
    n_images: int,
    n_texts: int,
    created_by: str,
) -> None:
    if captions is not None:
        atomic_write_json(captions, tmp / "captions.json")
    manifest = {
        "type": CACHE_TYPE,
        "format_version": CACHE_VERSION,
        "encoder": encoder_info,
        "dataset_fingerprint": dataset_fp,
        "dtype": dtype,
        "num_images": n_images,
        "num_texts": n_texts,
        "created_by": created_by,
    }
    atomic_write_json(manifest, tmp / "manifest.json")  # written last: its presence marks completion


def write_cache(
    path: str | Path,
    image_embeddings: Tensor,
    text_embeddings: Tensor,
    text_image_index: Tensor,
    *,
    captions: list[str] | None = None,
    encoder: dict[str, Any] | None = None,
    dataset_fingerprint: str = "unknown",
    dtype: str = "float32",
    caption_meta: dict[str, Any] | None = None,
) -> EmbeddingCache:
    """Write precomputed embeddings as a cache (atomically), e.g. features made elsewhere.

    Args:
        path: the cache directory (replaced if it exists).
        image_embeddings: (I, d) unit vectors.
        text_embeddings: (T, d) unit vectors.
        text_image_index: (T,) image row of each caption.
        captions: optional caption strings (needed to train text-tower adapters).
        encoder: ``{"spec", "pretrained", "fingerprint"}`` of the encoder that made them.
        dataset_fingerprint: any stable id of the data.
        dtype: storage dtype.
        caption_meta: optional ground truth per caption, ``{"level": [...], "ambiguity": [...]}``
            (either key; ambiguity = how many images a caption is true of), read by
            ``asymvlm-eval --cache`` for per-level metrics and the ambiguity correlation.

    Example (features made by any other model):
        >>> import torch, tempfile
        >>> img = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
        >>> txt = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
        >>> c = write_cache(tempfile.mkdtemp() + "/c", img, txt, torch.tensor([0, 0, 1, 1, 2, 2]),
        ...                 captions=["a", "b", "c", "d", "e", "f"], caption_meta={"level": [0, 1] * 3})
        >>> c.caption_meta["level"].tolist(), c.text_embeddings.shape[0]
        ([0, 1, 0, 1, 0, 1], 6)
    """
    from asymvlm.heads import check_embeddings

    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    d = image_embeddings.shape[-1]
    check_embeddings(image_embeddings.float(), d, "image embeddings", unit=True)
    check_embeddings(text_embeddings.float(), d, "text embeddings", unit=True)
    index = torch.as_tensor(text_image_index, dtype=torch.int64)
    if index.shape != (text_embeddings.shape[0],) or (index < 0).any() or (index >= image_embeddings.shape[0]).any():
        raise InputError(
            f"text_image_index must have shape ({text_embeddings.shape[0]},) with rows in "
            f"[0, {image_embeddings.shape[0]})"
        )
    if captions is not None and len(captions) != text_embeddings.shape[0]:
        raise InputError(f"{len(captions)} captions for {text_embeddings.shape[0]} text embeddings")
    store = _DTYPES[dtype]
    unknown = sorted(set(encoder or {}) - set(ENCODER_KEYS))
    if unknown:
        raise ConfigError(f"unknown encoder key(s) {unknown}; a cache records {list(ENCODER_KEYS)}")
    info = {"spec": None, "pretrained": None, "fingerprint": None, **(encoder or {}), "dim": d}
    if caption_meta is not None:
        unknown = sorted(set(caption_meta) - set(_META_DTYPES))
        if unknown:
            raise ConfigError(f"unknown caption_meta key(s) {unknown}; valid: {sorted(_META_DTYPES)}")
        caption_meta = {k: torch.as_tensor(v).tolist() for k, v in caption_meta.items()}
        for k, v in caption_meta.items():
            if len(v) != text_embeddings.shape[0]:
                raise InputError(f"caption_meta['{k}'] has {len(v)} entries for {text_embeddings.shape[0]} texts")
    with atomic_directory(path) as tmp:
        if caption_meta:
            atomic_write_json(caption_meta, tmp / CAPTION_META)
        atomic_save_safetensors({"embeddings": image_embeddings.to(store)}, tmp / "images.safetensors")
        atomic_save_safetensors(
            {"image_index": index, "embeddings": text_embeddings.to(store)}, tmp / "texts.safetensors"
        )
        _finish(
            tmp,
            captions,
            info,
            dataset_fingerprint,
            dtype,
            image_embeddings.shape[0],
            text_embeddings.shape[0],
            "asymvlm.cache.write_cache",
        )
    return EmbeddingCache.load(path)


def embed_dataset(
    encoder: Any,
    dataset: Any,
    path: str | Path,
    *,
    image_column: str = "image",
    caption_column: str = "captions",
    dtype: str = "float16",
    batch_size: int = 64,
    fingerprint: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> EmbeddingCache:
    """Embed a dataset's images and captions once and cache them at ``path``; reuse if it matches.

    Args:
        encoder: a :class:`~asymvlm.encoders.FrozenEncoder`.
        dataset: a ``datasets.Dataset`` or a sequence of dicts, one row per image, with an image
            column (PIL images or file paths) and a caption column (a string or a list of strings).
        path: the cache directory.
        image_column, caption_column: column names.
        dtype: storage dtype, ``"float16"`` (default, half the disk) or ``"float32"``.
        batch_size: images per encoder forward pass (captions use 4x).
        fingerprint: the dataset fingerprint; computed with :func:`dataset_fingerprint` if None.
        overwrite: rebuild even if a cache with other fingerprints exists at ``path``.
        progress: show progress bars.

    Returns:
        The loaded :class:`EmbeddingCache` (memory-mapped).

    Raises:
        CacheMismatchError: ``path`` holds a cache of another encoder or dataset (and not overwrite).
    """
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    path = Path(path)
    n_images = num_rows(dataset)
    if n_images == 0:
        raise InputError("the dataset is empty")
    data_fp = fingerprint or dataset_fingerprint(dataset, image_column, caption_column)
    enc_fp = encoder.fingerprint
    if path.exists():
        if (path / "manifest.json").is_file():
            try:
                cache = EmbeddingCache.load(path, encoder_fingerprint=enc_fp, dataset_fingerprint=data_fp)
                if cache.manifest["dtype"] == dtype:
                    return cache
                if not overwrite:
                    raise CacheMismatchError(
                        f"the cache at {path} stores {cache.manifest['dtype']}, not {dtype}; "
                        f"pass overwrite=True to rebuild it"
                    )
            except CacheMismatchError:
                if not overwrite:
                    raise
        elif any(path.iterdir()) and not overwrite:
            raise CacheMismatchError(f"{path} exists and is not an embedding cache; choose another path")

    # first pass over the captions only: counts and the caption -> image map
    captions: list[str] = []
    image_index: list[int] = []
    row = 0
    for batch in iter_batches(dataset, [caption_column], 1024):
        for caps in batch[caption_column]:
            caps = caption_list(caps, row)
            captions.extend(caps)
            image_index.extend([row] * len(caps))
            row += 1
    n_texts, d = len(captions), encoder.dim
    store = _DTYPES[dtype]

    encoder_info = {"spec": encoder.spec, "pretrained": encoder.pretrained, "fingerprint": enc_fp, "dim": d}
    with atomic_directory(path) as tmp:
        with SafetensorsStreamWriter(tmp / "images.safetensors", {"embeddings": (store, (n_images, d))}) as w:
            bar = tqdm(total=n_images, desc="embed images", disable=not progress)
            for batch in iter_batches(dataset, [image_column], batch_size, decode=False):
                w.write(
                    "embeddings",
                    encoder.encode_image([load_rgb(im) for im in batch[image_column]], batch_size=batch_size),
                )
                bar.update(len(batch[image_column]))
            bar.close()
        with SafetensorsStreamWriter(
            tmp / "texts.safetensors", {"image_index": (torch.int64, (n_texts,)), "embeddings": (store, (n_texts, d))}
        ) as w:
            w.write("image_index", torch.tensor(image_index, dtype=torch.int64))
            step = batch_size * 4
            for s in tqdm(range(0, n_texts, step), desc="embed captions", disable=not progress):
                w.write("embeddings", encoder.encode_text(captions[s : s + step], batch_size=step))
        _finish(tmp, captions, encoder_info, data_fp, dtype, n_images, n_texts, "asymvlm.cache.embed_dataset")
    return EmbeddingCache.load(path)
