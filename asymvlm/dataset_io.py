"""A dataset's rows as the embedding cache reads them: batches of images and captions, images
decoded within a pixel limit, and the dataset's fingerprint.

A dataset is a ``datasets.Dataset`` or any sequence of dicts with an image column (PIL images, image
file paths, or undecoded ``{"path", "bytes"}`` rows of a ``datasets.Image`` column) and a caption
column (a string or a list of strings per row). :func:`iter_batches` reads it in batches,
:func:`load_rgb` decodes an image after checking its size (a file too large, truncated or unreadable is
one :class:`~asymvlm.errors.ArtefactError` naming it), and :func:`dataset_fingerprint` is what a cache
records to be reused only on the same data. :mod:`asymvlm.cache` exports :func:`iter_batches`,
:func:`load_rgb`, :func:`default_max_pixels` and :func:`dataset_fingerprint`.

Example:
    >>> rows = [{"image": "a.png", "captions": ["a cat", "a pet"]}, {"image": "b.png", "captions": "a dog"}]
    >>> [batch["captions"] for batch in iter_batches(rows, ["captions"], 1)]
    [[['a cat', 'a pet']], ['a dog']]
    >>> caption_list(rows[1]["captions"], 1)
    ['a dog']
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from asymvlm.errors import ArtefactError, InputError, InputTypeError

__all__ = ["iter_batches", "num_rows", "caption_list", "dataset_fingerprint", "default_max_pixels", "load_rgb"]


def num_rows(dataset: Any) -> int:
    """The number of rows of a dataset."""
    return len(dataset)


def iter_batches(
    dataset: Any, columns: Sequence[str], batch_size: int, *, decode: bool = True
) -> Iterator[dict[str, list]]:
    """Batches of ``columns`` as dicts of lists, for a ``datasets.Dataset`` or a sequence of dicts.

    ``decode=False``: a ``datasets.Image`` column comes undecoded (``{"path", "bytes"}`` per row), for
    :func:`load_rgb` to decode with its pixel limit and an error naming the file."""
    n = num_rows(dataset)
    try:
        import datasets

        if isinstance(dataset, datasets.Dataset):
            sub = dataset.select_columns(list(columns))
            if not decode:
                for c in columns:
                    if isinstance(sub.features.get(c), datasets.Image):
                        sub = sub.cast_column(c, datasets.Image(decode=False))
            for s in range(0, n, batch_size):
                yield sub[s : s + batch_size]
            return
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    for s in range(0, n, batch_size):
        rows = [dataset[i] for i in range(s, min(n, s + batch_size))]
        yield {c: [r[c] for r in rows] for c in columns}


def caption_list(value: Any, row: int) -> list[str]:
    """A row's captions as a list of strings (one string is a list of one); an
    :class:`~asymvlm.errors.InputError` naming the row when it has none or another type."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        if len(value) == 0:
            raise InputError(f"row {row} has no captions")
        return list(value)
    raise InputTypeError(f"row {row}: captions must be a string or a list of strings, got {type(value).__name__}")


def dataset_fingerprint(dataset: Any, image_column: str = "image", caption_column: str = "captions") -> str:
    """A stable fingerprint: ``datasets.Dataset._fingerprint`` when available, else a sha256 of
    the captions and the image pixels (PIL ``mode``, ``size``, ``tobytes``) or file contents."""
    fp = getattr(dataset, "_fingerprint", None)
    if isinstance(fp, str) and fp:
        return f"datasets:{fp}"
    h = hashlib.sha256()
    row = 0
    for batch in iter_batches(dataset, [image_column, caption_column], 256):
        for im, caps in zip(batch[image_column], batch[caption_column]):
            caps = caption_list(caps, row)
            row += 1
            h.update(b"\x00img")
            if isinstance(im, (str, os.PathLike)):
                h.update(Path(im).read_bytes())
            elif hasattr(im, "tobytes"):
                h.update(f"{getattr(im, 'mode', '')}|{getattr(im, 'size', '')}".encode())
                h.update(im.tobytes())
            else:
                h.update(repr(im).encode())
            for c in caps:
                h.update(b"\x00cap" + c.encode())
    return f"sha256:{h.hexdigest()}"


def default_max_pixels() -> int:
    """The largest image (width x height) :func:`load_rgb` decodes: Pillow's own decompression-bomb
    limit, ``PIL.Image.MAX_IMAGE_PIXELS`` (89.5 MP; Pillow only warns below twice that), or 2**30
    where a program has set it to None."""
    from PIL import Image

    return int(Image.MAX_IMAGE_PIXELS or 1 << 30)


def load_rgb(im: Any, *, max_pixels: int | None = None, name: str | None = None) -> Any:
    """An RGB PIL image from a PIL image (any mode), an image file path, or an undecoded
    ``{"path", "bytes"}`` row of a ``datasets.Image`` column; anything else as it is.

    A file is checked before it is decoded: more than ``max_pixels`` pixels (default
    :func:`default_max_pixels`), a truncated or unreadable file is one :class:`ArtefactError` naming
    the file (``name``, else its path), never a traceback from Pillow.
    """
    if isinstance(im, dict) and ("path" in im or "bytes" in im):
        import io as _io

        where = name or im.get("path") or "an image without a file name"
        if im.get("bytes") is not None:
            return _decode(lambda: _io.BytesIO(im["bytes"]), where, max_pixels)
        if im.get("path"):
            return _decode(lambda: im["path"], where, max_pixels)
        raise ArtefactError(f"{where}: the image row holds neither bytes nor a path")
    if isinstance(im, (str, os.PathLike)):
        return _decode(lambda: im, name or str(im), max_pixels)
    if hasattr(im, "convert"):
        return im.convert("RGB")
    return im


def _decode(source: Any, where: str, max_pixels: int | None) -> Any:
    import warnings

    from PIL import Image, UnidentifiedImageError

    limit = default_max_pixels() if max_pixels is None else int(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            with Image.open(source()) as f:
                w, h = f.size
                if w * h > limit:
                    raise ArtefactError(
                        f"{where}: {w} x {h} = {w * h / 1e6:.1f} MP, more than the limit of {limit / 1e6:.1f} MP; "
                        "nothing decoded (resize it, or raise max_pixels)"
                    )
                f.load()
                return f.convert("RGB")
    except ArtefactError:
        raise
    except Image.DecompressionBombError as err:
        raise ArtefactError(f"{where}: too many pixels to decode safely ({err})") from None
    except FileNotFoundError:
        raise ArtefactError(f"{where}: image file not found") from None
    except UnidentifiedImageError:
        raise ArtefactError(f"{where}: not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as err:  # truncated / corrupt data
        raise ArtefactError(f"{where}: corrupt or truncated image ({type(err).__name__}: {err})") from None
