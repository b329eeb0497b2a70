"""Issue 26, galleries and embedding caches: every field of every file is checked on load.

* ``gallery.json`` / ``manifest.json``: every key the writer writes is required, with its type and range;
  an unknown key inside ``encoder`` / ``thumbnails`` is an error; a newer ``format_version`` is refused.
* ``images/index.json``: ``ids`` required (null or a list of one string per row), the recorded dtype
  compared with the tensor's.
* Tensors: the dtype the writer writes (or the JSON records), the shape the JSON implies; a message
  names the file.
* ``captions.json`` / ``caption_meta.json`` entries of the wrong type or range are errors.
* Files reached through a symbolic link outside the folder are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from asymvlm.cache import EmbeddingCache, write_cache
from asymvlm.errors import ArtefactError
from asymvlm.serve.gallery import Gallery
from asymvlm.serve.indexing import write_gallery

FP = "ab" * 32


def _unit(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)


def _gallery(path: Path) -> Path:
    write_gallery(
        path,
        _unit(4, 8).to(torch.float16),
        ids=["a", "b", "c", "d"],
        thumbnails=[b"t%d" % i for i in range(4)],
        thumbnail_format="png",
        thumbnail_size=32,
        captions=["x", "y"],
        caption_embeddings=_unit(2, 8, 1),
        caption_owners=[[0], [1, 2]],
        encoder={"spec": "open_clip:x", "pretrained": None, "fingerprint": FP, "dim": 8},
        source="test",
    )
    return path


def _cache(path: Path) -> Path:
    img = _unit(3, 8)
    idx = torch.tensor([0, 0, 1, 2])
    write_cache(
        path,
        img,
        torch.nn.functional.normalize(img[idx] + 0.1, dim=-1),
        idx,
        captions=["a", "b", "c", "d"],
        encoder={"spec": "open_clip:x", "fingerprint": FP},
        caption_meta={"level": [0, 1, 2, 0]},
    )
    return path


def _edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _refused(load, *names: str) -> str:
    with pytest.raises(ArtefactError) as err:
        load()
    msg = str(err.value)
    assert "\n" not in msg
    for name in names:
        assert name in msg, msg
    return msg


# ----------------------------------------------------------------------------------------------
# gallery.json
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value",
    [
        ("backend", None),
        ("backend", ["exact"]),
        ("captions", "2"),
        ("captions", 5),
        ("created", 3),
        ("source", None),
        ("truth", ["t"]),
        ("thumbnails", "png"),
        ("thumbnails", {"format": ["png"], "max_side": 32}),
        ("thumbnails", {"format": "png", "max_side": "32"}),
        ("thumbnails", {"format": "png", "max_side": 32, "extra": 1}),
        ("encoder", {"spec": "open_clip:x", "pretrained": None, "fingerprint": FP, "dim": 8, "extra": 1}),
        ("encoder", {"spec": "open_clip:x", "pretrained": None, "fingerprint": FP, "dim": "8"}),
        ("encoder", {"spec": "open_clip:x", "pretrained": None, "fingerprint": FP, "dim": 2**62}),
        ("encoder", {"spec": ["x"], "pretrained": None, "fingerprint": FP, "dim": 8}),
        ("encoder", {"pretrained": None, "fingerprint": FP, "dim": 8}),
        ("encoder", {"spec": "x", "pretrained": 3, "fingerprint": FP, "dim": 8}),
        ("format_version", 2**62),
    ],
)
def test_gallery_json_fields_are_type_checked(tmp_path, field, value):
    g = _gallery(tmp_path / "g")
    _edit_json(g / "gallery.json", lambda d: d.__setitem__(field, value))
    _refused(lambda: Gallery.open(g), "gallery.json", field)


@pytest.mark.parametrize("field", ["backend", "captions", "created", "source", "thumbnails", "encoder"])
def test_gallery_json_keys_the_writer_writes_are_required(tmp_path, field):
    g = _gallery(tmp_path / "g")
    _edit_json(g / "gallery.json", lambda d: d.pop(field))
    _refused(lambda: Gallery.open(g), "gallery.json", field)


def test_a_valid_gallery_still_opens_unchanged(tmp_path):
    g = Gallery.open(_gallery(tmp_path / "g"))
    assert g.ids == ["a", "b", "c", "d"] and g.captions == ["x", "y"] and g.thumbnail(2) == b"t2"
    assert g.index.embeddings.dtype == torch.float16
    assert g.meta["encoder"] == {"spec": "open_clip:x", "pretrained": None, "fingerprint": FP, "dim": 8}
    # a partial encoder dict given to write_gallery is completed (every key written)
    h = write_gallery(tmp_path / "h", _unit(2, 8), encoder={"spec": "x", "fingerprint": FP})
    assert h.meta["encoder"] == {"spec": "x", "pretrained": None, "fingerprint": FP, "dim": 8}


# ----------------------------------------------------------------------------------------------
# images/index.json and the tensors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["abcd", True, 2**62, {"a": 1}, [None, "b", "c", "d"], [["a"], "b", "c", "d"]])
def test_index_json_ids_are_checked(tmp_path, value):
    g = _gallery(tmp_path / "g")
    _edit_json(g / "images" / "index.json", lambda d: d.__setitem__("ids", value))
    _refused(lambda: Gallery.open(g), "index.json", "ids")


def test_index_json_ids_are_required(tmp_path):
    g = _gallery(tmp_path / "g")
    _edit_json(g / "images" / "index.json", lambda d: d.pop("ids"))
    _refused(lambda: Gallery.open(g), "index.json", "ids")


def _retype(path: Path, key: str, dtype: torch.dtype, shape_rows: int = 0) -> None:
    t = load_file(str(path))
    x = t[key].to(dtype)
    if shape_rows:
        x = torch.cat([x, x[:shape_rows]])
    t[key] = x
    save_file(t, str(path))


@pytest.mark.parametrize(
    "file, key, dtype, rows",
    [
        ("images/index.safetensors", "embeddings", torch.float32, 0),
        ("images/index.safetensors", "embeddings", torch.float16, 1),
        ("thumbnails.safetensors", "data", torch.float32, 0),
        ("thumbnails.safetensors", "offsets", torch.int32, 0),
        ("captions.safetensors", "embeddings", torch.float16, 0),
    ],
)
def test_gallery_tensors_of_another_dtype_or_shape_are_refused(tmp_path, file, key, dtype, rows):
    g = _gallery(tmp_path / "g")
    _retype(g / file, key, dtype, rows)
    _refused(lambda: Gallery.open(g), Path(file).name)


def test_a_missing_caption_in_captions_json_names_captions_json(tmp_path):
    g = _gallery(tmp_path / "g")
    (g / "captions.json").write_text('["x"]')
    _refused(lambda: Gallery.open(g), "captions.json")


# ----------------------------------------------------------------------------------------------
# the embedding cache
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value",
    [
        ("dtype", ["float32"]),
        ("dtype", {"a": 1}),
        ("created_by", 3),
        ("num_images", 2**62),
        ("num_texts", 2**62),
        ("format_version", 2**62),
        ("encoder", {"spec": "open_clip:x", "pretrained": None, "fingerprint": FP, "dim": 8, "extra": 1}),
        ("encoder", {"spec": "open_clip:x", "pretrained": None, "fingerprint": FP, "dim": 2**62}),
        ("encoder", {"spec": "open_clip:x", "pretrained": None, "dim": 8}),
        ("encoder", {"pretrained": None, "fingerprint": FP, "dim": 8}),
        ("encoder", {"spec": "open_clip:x", "fingerprint": FP, "dim": 8}),
    ],
)
def test_manifest_fields_are_type_checked(tmp_path, field, value):
    c = _cache(tmp_path / "c")
    _edit_json(c / "manifest.json", lambda d: d.__setitem__(field, value))
    _refused(lambda: EmbeddingCache.load(c), "manifest.json")


def test_manifest_created_by_is_required(tmp_path):
    c = _cache(tmp_path / "c")
    _edit_json(c / "manifest.json", lambda d: d.pop("created_by"))
    _refused(lambda: EmbeddingCache.load(c), "manifest.json", "created_by")


@pytest.mark.parametrize(
    "file, key, dtype, rows",
    [
        ("images.safetensors", "embeddings", torch.float16, 0),
        ("images.safetensors", "embeddings", torch.float32, 1),
        ("texts.safetensors", "embeddings", torch.float16, 0),
        ("texts.safetensors", "embeddings", torch.float32, 1),
        ("texts.safetensors", "image_index", torch.int32, 0),
        ("texts.safetensors", "image_index", torch.int64, 1),
    ],
)
def test_cache_tensors_of_another_dtype_or_shape_are_refused(tmp_path, file, key, dtype, rows):
    c = _cache(tmp_path / "c")
    _retype(c / file, key, dtype, rows)
    _refused(lambda: EmbeddingCache.load(c), file)


@pytest.mark.parametrize(
    "file, doc",
    [
        ("captions.json", None),
        ("captions.json", [None, "b", "c", "d"]),
        ("captions.json", [3, "b", "c", "d"]),
        ("caption_meta.json", {"level": [True, 1, 2, 0]}),
        ("caption_meta.json", {"level": [-1, 1, 2, 0]}),
        ("caption_meta.json", {"level": [2**62, 1, 2, 0]}),
        ("caption_meta.json", {"level": [0.5, 1, 2, 0]}),
    ],
)
def test_cache_captions_and_meta_entries_are_checked(tmp_path, file, doc):
    c = _cache(tmp_path / "c")
    (c / file).write_text(json.dumps(doc))
    _refused(lambda: EmbeddingCache.load(c), file)


@pytest.mark.parametrize("name", ["manifest.json", "images.safetensors", "texts.safetensors", "captions.json"])
def test_cache_files_linked_outside_the_folder_are_refused(tmp_path, name):
    c = _cache(tmp_path / "c")
    other = _cache(tmp_path / "other")
    (c / name).unlink()
    (c / name).symlink_to(other / name)
    _refused(lambda: EmbeddingCache.load(c), name)


def test_a_valid_cache_still_loads_unchanged(tmp_path):
    c = EmbeddingCache.load(_cache(tmp_path / "c"))
    assert c.captions == ["a", "b", "c", "d"] and c.caption_meta["level"].tolist() == [0, 1, 2, 0]
    assert c.text_image_index.tolist() == [0, 0, 1, 2] and c.image_embeddings.dtype == torch.float32
    assert c.manifest["encoder"] == {"spec": "open_clip:x", "pretrained": None, "fingerprint": FP, "dim": 8}
    # features made elsewhere (no encoder) still write and load: null provenance is checked at use
    bare = write_cache(tmp_path / "bare", _unit(2, 4), _unit(2, 4), torch.arange(2))
    assert bare.manifest["encoder"]["fingerprint"] is None


@pytest.mark.parametrize(
    "field, value, file", [("thumbnails", None, "thumbnails.safetensors"), ("captions", 0, "captions.json")]
)
def test_gallery_json_cannot_hide_files_the_gallery_holds(tmp_path, field, value, file):
    g = _gallery(tmp_path / "g")
    _edit_json(g / "gallery.json", lambda d: d.__setitem__(field, value))
    _refused(lambda: Gallery.open(g), "gallery.json", field, file)
