"""Image–caption datasets from local files, as ``datasets.Dataset`` with ``image`` and ``captions``.

Nothing is downloaded: each loader reads the standard files you already have and explains the
expected layout when something is missing.

* COCO captions, Karpathy split: ``dataset_coco.json`` (``{"images": [{"filepath", "filename",
  "split", "sentences": [{"raw"}], "cocoid"}]}``) and the image root holding ``train2014/`` and
  ``val2014/``. ``split`` is ``train``, ``restval``, ``val`` or ``test`` (Karpathy's 5k test).
* COCO captions, 2017 annotations: ``annotations/captions_val2017.json`` (``{"images": [{"id",
  "file_name"}], "annotations": [{"image_id", "caption"}]}``) and the image folder ``val2017/``.
* Flickr30k, Karpathy split: ``dataset_flickr30k.json`` and the folder of ``*.jpg`` images.
* A generic image folder: ``<root>/metadata.jsonl``, one JSON object per line with
  ``file_name`` (relative to the root) and ``text`` / ``caption`` (a string) or ``captions`` (a
  list of strings) — the Hugging Face ``imagefolder`` convention.

:func:`load_dataset_spec` reads a ``<kind>:<field>:...`` string (the CLIs' ``--dataset``); its kinds
are the entries of :data:`DATASET_SPEC_REGISTRY`, each declaring its fields.

Every loader returns columns ``image`` (``datasets.Image``, decoded lazily from the file),
``image_id``, ``captions`` (list of strings) and ``file_name``.

Example:
    >>> import json, tempfile, pathlib
    >>> from PIL import Image
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> Image.new("RGB", (8, 8), "red").save(root / "a.png")
    >>> _ = (root / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a red square"}))
    >>> ds = load_image_folder(root)
    >>> ds[0]["captions"], ds[0]["image"].size
    (['a red square'], (8, 8))
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal

from asymvlm.errors import ConfigError, DatasetLayoutError
from asymvlm.registry import Param, Registry

__all__ = [
    "load_coco_karpathy",
    "load_coco_2017",
    "load_flickr30k_karpathy",
    "load_image_folder",
    "DATASET_SPEC_REGISTRY",
    "load_dataset_spec",
    "cache_for_config",
    "DatasetLayoutError",
]

KARPATHY_SPLITS = ("train", "restval", "val", "test")


def _require(path: Path, what: str, layout: str) -> Path:
    if not path.exists():
        raise DatasetLayoutError(f"{what} not found: {path}\nexpected layout:\n{layout}")
    return path


def _read_json(path: Path, what: str, layout: str) -> Any:
    _require(path, what, layout)
    try:
        return json.loads(path.read_bytes())
    except RecursionError:
        raise DatasetLayoutError(f"{what} {path} is not valid JSON (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise DatasetLayoutError(f"{what} {path} is not valid JSON ({err})\nexpected layout:\n{layout}") from None


def _relative_name(value: Any, where: str, key: str = "file_name") -> str:
    """A file name from a dataset's own files: a non-empty relative path that stays inside its root
    (no absolute path, no ``..``, no drive); a :class:`DatasetLayoutError` naming ``where`` and ``key``
    otherwise. A collection names its images relative to itself: an image outside it is never read."""
    if not isinstance(value, str) or not value.strip():
        raise DatasetLayoutError(f"{where}: '{key}' must be a non-empty relative path, got {value!r}")
    pure = PurePosixPath(value.replace("\\", "/"))
    if pure.is_absolute() or PureWindowsPath(value).drive or ".." in pure.parts or "\x00" in value:
        raise DatasetLayoutError(
            f"{where}: '{key}' {value!r} points outside the collection (absolute or with '..'): file names are "
            "relative to the collection's folder"
        )
    return value


def _to_dataset(rows: list[dict[str, Any]], layout: str, check_files: bool):
    import datasets

    if not rows:
        raise DatasetLayoutError(f"no images found\nexpected layout:\n{layout}")
    if check_files:
        missing = [r["image"] for r in rows if not Path(r["image"]).is_file()]
        if missing:
            raise DatasetLayoutError(
                f"{len(missing)} image file(s) missing, e.g. {missing[0]}\nexpected layout:\n{layout}"
            )
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "image_id": datasets.Value("string"),
            "captions": datasets.Sequence(datasets.Value("string")),
            "file_name": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features)


_KARPATHY_COCO_LAYOUT = """  <karpathy json>   dataset_coco.json: {"images": [{"filepath": "val2014",
                     "filename": "COCO_val2014_...jpg", "split": "test",
                     "sentences": [{"raw": "a caption"}, ...], "cocoid": 391895}, ...]}
  <image root>/train2014/*.jpg and <image root>/val2014/*.jpg"""


def _load_karpathy(
    karpathy_json: str | Path, image_root: str | Path, split: str, what: str, layout: str, check_files: bool
):
    """Karpathy's split format, shared by COCO (``filepath`` + ``filename``, ``cocoid``) and
    Flickr30k (``filename``, ``imgid``)."""
    if split not in KARPATHY_SPLITS:
        raise ConfigError(f"split must be one of {KARPATHY_SPLITS}, got {split!r}")
    doc = _read_json(Path(karpathy_json), f"Karpathy {what} json", layout)
    root = _require(Path(image_root), f"{what} image root", layout)
    if not isinstance(doc, dict) or "images" not in doc:
        raise DatasetLayoutError(f"{karpathy_json} has no 'images' list\nexpected layout:\n{layout}")
    if not isinstance(doc["images"], list):
        raise DatasetLayoutError(f"{karpathy_json}: 'images' must be a list\nexpected layout:\n{layout}")
    rows = []
    for n, im in enumerate(doc["images"]):
        where = f"{karpathy_json}: images[{n}]"
        if not isinstance(im, dict):
            raise DatasetLayoutError(f"{where} must be an object\nexpected layout:\n{layout}")
        if im.get("split") != split:
            continue
        try:
            filepath = im.get("filepath", "")
            rel = Path(_relative_name(filepath, where, "filepath") if filepath else "")
            rel = rel / _relative_name(im["filename"], where, "filename")
            captions = [s["raw"].strip() for s in im["sentences"]]
        except (KeyError, TypeError, AttributeError) as err:
            raise DatasetLayoutError(
                f"{where} needs 'filename' and 'sentences': [{{'raw': ...}}] ({type(err).__name__}: {err})"
                f"\nexpected layout:\n{layout}"
            ) from None
        rows.append(
            {
                "image": str(root / rel),
                "image_id": str(im.get("cocoid", im.get("imgid", im["filename"]))),
                "captions": captions,
                "file_name": str(rel),
            }
        )
    return _to_dataset(rows, layout, check_files)


def load_coco_karpathy(
    karpathy_json: str | Path, image_root: str | Path, split: str = "test", *, check_files: bool = True
):
    """COCO captions with Karpathy's splits (5 captions per image; ``split="test"`` is the 5k test set)."""
    return _load_karpathy(karpathy_json, image_root, split, "COCO", _KARPATHY_COCO_LAYOUT, check_files)


_COCO2017_LAYOUT = """  <annotations>  annotations/captions_val2017.json (or captions_train2017.json):
                 {"images": [{"id": 139, "file_name": "000000000139.jpg"}, ...],
                  "annotations": [{"image_id": 139, "caption": "a caption"}, ...]}
  <image dir>    val2017/000000000139.jpg, ..."""


def load_coco_2017(annotations_json: str | Path, image_dir: str | Path, *, check_files: bool = True):
    """COCO captions from the official 2017 annotation file (all captions of each image)."""
    doc = _read_json(Path(annotations_json), "COCO 2017 captions file", _COCO2017_LAYOUT)
    root = _require(Path(image_dir), "COCO 2017 image folder", _COCO2017_LAYOUT)
    if not isinstance(doc, dict) or "images" not in doc or "annotations" not in doc:
        raise DatasetLayoutError(
            f"{annotations_json} needs 'images' and 'annotations'\nexpected layout:\n{_COCO2017_LAYOUT}"
        )
    captions: dict[Any, list[str]] = defaultdict(list)
    rows = []
    try:
        for a in doc["annotations"]:
            captions[a["image_id"]].append(a["caption"].strip())
        for n, im in enumerate(doc["images"]):
            if captions.get(im["id"]):
                name = _relative_name(im["file_name"], f"{annotations_json}: images[{n}]")
                rows.append(
                    {"image": str(root / name), "image_id": str(im["id"]), "captions": captions[im["id"]],
                     "file_name": name}
                )  # fmt: skip
    except (KeyError, TypeError, AttributeError) as err:
        raise DatasetLayoutError(
            f"{annotations_json}: an image or annotation misses a field or has the wrong type ({type(err).__name__}: "
            f"{err})\nexpected layout:\n{_COCO2017_LAYOUT}"
        ) from None
    return _to_dataset(rows, _COCO2017_LAYOUT, check_files)


_FLICKR_LAYOUT = """  <karpathy json>  dataset_flickr30k.json: {"images": [{"filename": "1000092795.jpg",
                    "split": "test", "sentences": [{"raw": "a caption"}, ...], "imgid": 0}, ...]}
  <image dir>      flickr30k-images/1000092795.jpg, ..."""


def load_flickr30k_karpathy(
    karpathy_json: str | Path, image_dir: str | Path, split: str = "test", *, check_files: bool = True
):
    """Flickr30k with Karpathy's splits (1k test images, 5 captions each)."""
    return _load_karpathy(karpathy_json, image_dir, split, "Flickr30k", _FLICKR_LAYOUT, check_files)


_FOLDER_LAYOUT = """  <root>/metadata.jsonl   one JSON object per line:
                          {"file_name": "images/0001.png", "text": "a caption"}
                       or {"file_name": "images/0001.png", "captions": ["a caption", "another"]}
  <root>/images/0001.png ..."""


def load_image_folder(root: str | Path, *, check_files: bool = True):
    """An image folder with a ``metadata.jsonl`` of captions (Hugging Face ``imagefolder`` style)."""
    root = Path(root)
    meta = _require(root / "metadata.jsonl", "metadata.jsonl", _FOLDER_LAYOUT)
    rows = []
    for n, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except RecursionError:
            raise DatasetLayoutError(f"{meta}:{n} is not valid JSON (nested too deeply)") from None
        except ValueError as err:
            raise DatasetLayoutError(
                f"{meta}:{n} is not valid JSON ({err})\nexpected layout:\n{_FOLDER_LAYOUT}"
            ) from None
        if not isinstance(item, dict):
            raise DatasetLayoutError(f"{meta}:{n} must be a JSON object\nexpected layout:\n{_FOLDER_LAYOUT}")
        caps = item.get("captions", item.get("text", item.get("caption")))
        if "file_name" not in item or caps is None:
            raise DatasetLayoutError(
                f"{meta}:{n} needs 'file_name' and 'text'/'caption'/'captions'\nexpected layout:\n{_FOLDER_LAYOUT}"
            )
        name = _relative_name(item["file_name"], f"{meta}:{n}")
        if isinstance(caps, str):
            caps = [caps]
        elif isinstance(caps, list) and all(isinstance(c, (str, int, float)) for c in caps):
            caps = [str(c) for c in caps]
        else:
            raise DatasetLayoutError(f"{meta}:{n}: captions must be a string or a list of strings")
        rows.append(
            {
                "image": str(root / name),
                "image_id": str(item.get("id", name)),
                "captions": caps,
                "file_name": name,
            }
        )
    return _to_dataset(rows, _FOLDER_LAYOUT, check_files)


# ----------------------------------------------------------------------------------------------
# dataset specs: "<kind>:<field>:<field>..." strings (the --dataset flag of the CLIs)
# ----------------------------------------------------------------------------------------------
# Each entry's leading ``extra["fields"]`` params are the colon-separated fields of the spec (the
# first ``extra["required"]`` of them required); the rest (``check_files``) are keyword options of
# load_dataset_spec. ``extra["form"]`` is the spec's syntax, shown in every error.
DATASET_SPEC_REGISTRY = Registry("dataset spec")


def _non_empty(x: str) -> str | None:
    return None if x else "a non-empty path"


def _path(name: str, help: str) -> Param:
    return Param(name, str, None, f"{help} Required spec field.", check=_non_empty)


_SPLIT = Param(
    "split",
    Literal[KARPATHY_SPLITS],
    "test",
    "Karpathy split: train, restval, val or test.",
    reference="Karpathy & Fei-Fei 2015 https://arxiv.org/abs/1412.2306",
)
_CHECK_FILES = Param("check_files", bool, True, "Check that every image file exists (keyword only, not a spec field).")


DATASET_SPEC_REGISTRY.register(
    "imagefolder",
    params=[_path("root", "Folder holding metadata.jsonl and the images it names."), _CHECK_FILES],
    help="An image folder with a metadata.jsonl of captions (Hugging Face imagefolder convention).",
    reference="https://huggingface.co/docs/datasets/image_dataset#imagefolder",
    form="imagefolder:<root>",
    fields=1,
    required=1,
)(load_image_folder)
DATASET_SPEC_REGISTRY.register(
    "coco-karpathy",
    params=[
        _path("karpathy_json", "Karpathy's dataset_coco.json."),
        _path("image_root", "Image root holding train2014/ and val2014/."),
        _SPLIT,
        _CHECK_FILES,
    ],
    help="COCO captions with Karpathy's splits (test: the 5k test images, 5 captions each).",
    reference="Chen et al. 2015 https://arxiv.org/abs/1504.00325; splits: Karpathy & Fei-Fei 2015 "
    "https://arxiv.org/abs/1412.2306",
    form="coco-karpathy:<json>:<root>[:split]",
    fields=3,
    required=2,
)(load_coco_karpathy)
DATASET_SPEC_REGISTRY.register(
    "coco2017",
    params=[
        _path("annotations_json", "The official captions_val2017.json (or captions_train2017.json)."),
        _path("image_dir", "The matching image folder (val2017/ or train2017/)."),
        _CHECK_FILES,
    ],
    help="COCO captions from the official 2017 annotation file (all captions of each image).",
    reference="Chen et al. 2015 https://arxiv.org/abs/1504.00325; https://cocodataset.org/#download",
    form="coco2017:<json>:<dir>",
    fields=2,
    required=2,
)(load_coco_2017)
DATASET_SPEC_REGISTRY.register(
    "flickr30k",
    params=[
        _path("karpathy_json", "Karpathy's dataset_flickr30k.json."),
        _path("image_dir", "The folder of Flickr30k *.jpg images."),
        _SPLIT,
        _CHECK_FILES,
    ],
    help="Flickr30k with Karpathy's splits (test: 1k images, 5 captions each).",
    reference="Young et al. 2014 https://aclanthology.org/Q14-1006/; splits: Karpathy & Fei-Fei 2015 "
    "https://arxiv.org/abs/1412.2306",
    form="flickr30k:<json>:<dir>[:split]",
    fields=3,
    required=2,
)(load_flickr30k_karpathy)


def _spec_forms() -> str:
    return ", ".join(e.extra["form"] for e in DATASET_SPEC_REGISTRY.values())


def load_dataset_spec(spec: str, **options: Any):
    """The dataset a spec string names: ``imagefolder:<root>``, ``coco-karpathy:<json>:<image
    root>[:split]``, ``coco2017:<annotations json>:<image dir>`` or ``flickr30k:<json>:<image
    dir>[:split]`` (entries of :data:`DATASET_SPEC_REGISTRY`; ``DATASET_SPEC_REGISTRY.describe()``).

    Args:
        spec: ``<kind>:<field>:...``, the fields separated by ``:``.
        **options: keyword options of the kind that are not spec fields (``check_files``).

    Raises:
        ConfigError: an unknown kind, a wrong number of fields, an empty field, a bad split or an
            unknown option (the message names the valid kinds and the expected form).

    Example:
        >>> load_dataset_spec("coco:/x")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        asymvlm.errors.ConfigError: cannot parse dataset spec 'coco:/x': unknown kind 'coco'; valid kinds: ...
    """
    if not isinstance(spec, str):
        raise ConfigError(f"a dataset spec must be a string, got {type(spec).__name__}")
    kind, _, rest = spec.partition(":")
    parts = rest.split(":") if rest else []
    if kind not in DATASET_SPEC_REGISTRY:
        raise ConfigError(f"cannot parse dataset spec {spec!r}: unknown kind {kind!r}; valid kinds: {_spec_forms()}")
    entry = DATASET_SPEC_REGISTRY[kind]
    n_fields, n_required, form = entry.extra["fields"], entry.extra["required"], entry.extra["form"]
    if not n_required <= len(parts) <= n_fields:
        expected = str(n_fields) if n_required == n_fields else f"{n_required} to {n_fields}"
        plural = "s" if n_fields > 1 else ""
        raise ConfigError(
            f"cannot parse dataset spec {spec!r}: {kind} expects {form} ({expected} field{plural}, "
            f"got {len(parts)}); valid kinds: {_spec_forms()}"
        )
    field_names = entry.param_names[:n_fields]
    clash = sorted(set(options) & set(field_names))
    if clash:
        raise ConfigError(f"dataset spec {kind!r}: {clash} are fields of the spec string ({form}), not keyword options")
    resolved = DATASET_SPEC_REGISTRY.resolve(kind, {**dict(zip(field_names, parts)), **options})
    return entry.factory(**resolved)


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
    from asymvlm.worlds import shapeworld as sw
    from asymvlm.worlds.toyclip import cache_root

    if encoder is None:
        from asymvlm.encoders import load_encoder

        encoder = load_encoder(data_args.encoder, data_args.pretrained or None)
    version = sw.dataset_version(data_args.dataset)
    if version is not None:
        # a ShapeWorld cache this process already built or checked is loaded without generating the
        # split again (4 s for 8,000 v3 images); the generator cannot change within a process
        key = (str(cache_root()), version, data_args.train_images, data_args.data_seed, data_args.styles())
        key += (encoder.fingerprint,)
        if key in _SHAPEWORLD_CACHES:
            try:
                return EmbeddingCache.load(_SHAPEWORLD_CACHES[key])
            except ArtefactError:
                del _SHAPEWORLD_CACHES[key]
        dataset = sw.generate(
            data_args.train_images,
            seed=data_args.data_seed,
            caption_styles=data_args.styles(),
            visual_styles=sw.VISUAL_STYLES,
            version=version,
        )
        name = f"shapeworld-{data_args.train_images}-{data_args.data_seed}" + ("-v3" if version == 3 else "")
        if data_args.styles() != tuple(sw.CAPTION_STYLES):
            name += "-" + "+".join(data_args.styles())
    else:
        dataset = load_dataset_spec(data_args.dataset)
        import hashlib

        name = "dataset-" + hashlib.sha256(data_args.dataset.encode()).hexdigest()[:12]
    path = cache_root() / "caches" / f"{name}-{encoder.fingerprint[:12]}"
    cache = embed_dataset(encoder, dataset, path, batch_size=256)
    if version is not None:
        _SHAPEWORLD_CACHES[key] = cache.path
    return cache


_SHAPEWORLD_CACHES: dict[tuple, Any] = {}  # (root, version, images, seed, styles, encoder) -> path, this process
