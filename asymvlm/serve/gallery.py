"""A served image collection: frozen image embeddings, thumbnails and the collection's captions in
one folder, built atomically (``asymvlm-index build``, :mod:`asymvlm.serve.indexing`) and opened
read-only (``asymvlm-serve``, :class:`Gallery`).

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
    >>> from asymvlm.serve.indexing import build_gallery
    >>> g = build_gallery(model, data, tempfile.mkdtemp() + "/gallery", progress=False)
    >>> len(g), g.ids, g.captions, g.thumbnail(g.row_of("blue"))[:4]
    (2, ['red', 'blue'], ['a red square', 'a blue square'], b'\\xff\\xd8\\xff\\xe0')
    >>> [row.tolist() for row in g.caption_owners]  # (offsets, rows): "a blue square" is image 1's
    [[0, 1, 2], [0, 1]]
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from asymvlm.errors import ArtefactError, ConfigError, EncoderMismatchError
from asymvlm.io import (
    inside_folder,
    load_safetensors,
    read_json,
    read_tagged_json,
)

__all__ = [
    "Gallery",
    "THUMBNAIL_FORMATS",
    "GALLERY_TYPE",
    "TRUTH_LABEL",
    "id_problem",
    "check_ids",
    "check_backend",
]

log = logging.getLogger("asymvlm.serve")

GALLERY_TYPE = "asymvlm.gallery"
GALLERY_VERSION = 1
BACKENDS = ("exact", "faiss")
ENCODER_KEYS = ("spec", "pretrained", "fingerprint", "dim")
# format -> (PIL format name, media type)
THUMBNAIL_FORMATS = {"jpeg": ("JPEG", "image/jpeg"), "png": ("PNG", "image/png"), "webp": ("WEBP", "image/webp")}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TRUTH_LABEL = "consistent (the image satisfies the caption)"  # ShapeWorld's ground truth


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


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")


def load_faiss():
    from asymvlm.retrieval import faiss_module

    return faiss_module()


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
    def open(
        cls, path: str | Path, *, backend: str | None = None, chunk_size: int = 65536, scan_dtype: str = "auto"
    ) -> Gallery:
        """Open a gallery folder read-only (embeddings memory-mapped; ids, captions read once).

        ``backend``: ``exact`` or ``faiss`` (None: the gallery's own, as built). FAISS reads the
        gallery's ``faiss.index`` memory-mapped when there is one, else builds it in memory.
        ``scan_dtype``: how the exact backend reads the embeddings
        (:class:`~asymvlm.retrieval.ImageIndex`; its bf16 copy is made on first search or by
        ``gallery.index.prepare()``).
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
        check_backend(backend)
        images = inside_folder(path, "images")
        faiss_index = None
        if backend == "faiss" and (images / "faiss.index").is_file():
            faiss = load_faiss()
            try:  # memory-mapped and read-only: the index's vectors stay in the page cache
                faiss_index = faiss.read_index(
                    str(images / "faiss.index"), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
                )
            except RuntimeError as err:
                raise ArtefactError(f"{images / 'faiss.index'} is not a readable FAISS index: {err}") from err
        try:
            index = ImageIndex.load(
                images,
                mmap=True,
                backend=backend,
                chunk_size=chunk_size,
                faiss_index=faiss_index,
                scan_dtype=scan_dtype,
            )
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
