"""Dataset loaders on tiny on-disk fixtures the tests write."""

import json

import pytest
from PIL import Image

from asymvlm.worlds.data import (
    DatasetLayoutError,
    load_coco_2017,
    load_coco_karpathy,
    load_dataset_spec,
    load_flickr30k_karpathy,
    load_image_folder,
)


def _img(path, colour="red"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (10, 8), colour).save(path)


@pytest.fixture
def coco_karpathy(tmp_path):
    root = tmp_path / "coco"
    _img(root / "val2014" / "COCO_val2014_1.jpg")
    _img(root / "train2014" / "COCO_train2014_2.jpg", "blue")
    doc = {
        "images": [
            {
                "filepath": "val2014",
                "filename": "COCO_val2014_1.jpg",
                "split": "test",
                "cocoid": 1,
                "sentences": [{"raw": "a red square. "}, {"raw": "red"}],
            },
            {
                "filepath": "train2014",
                "filename": "COCO_train2014_2.jpg",
                "split": "train",
                "cocoid": 2,
                "sentences": [{"raw": "blue"}],
            },
        ]
    }
    (tmp_path / "dataset_coco.json").write_text(json.dumps(doc))
    return tmp_path / "dataset_coco.json", root


def test_coco_karpathy(coco_karpathy):
    js, root = coco_karpathy
    test = load_coco_karpathy(js, root, "test")
    assert len(test) == 1 and test[0]["captions"] == ["a red square.", "red"] and test[0]["image_id"] == "1"
    assert test[0]["image"].size == (10, 8) and test[0]["file_name"] == "val2014/COCO_val2014_1.jpg"
    train = load_coco_karpathy(js, root, "train")
    assert train[0]["captions"] == ["blue"]
    assert len(load_dataset_spec(f"coco-karpathy:{js}:{root}:test")) == 1
    with pytest.raises(ValueError, match="split must be one of"):
        load_coco_karpathy(js, root, "dev")


def test_missing_and_malformed_files_explain_the_layout(coco_karpathy, tmp_path):
    js, root = coco_karpathy
    with pytest.raises(DatasetLayoutError, match="expected layout:[\\s\\S]*dataset_coco.json"):
        load_coco_karpathy(tmp_path / "nope.json", root)
    (root / "val2014" / "COCO_val2014_1.jpg").unlink()
    with pytest.raises(DatasetLayoutError, match="1 image file\\(s\\) missing"):
        load_coco_karpathy(js, root, "test")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(DatasetLayoutError, match="not valid JSON"):
        load_coco_karpathy(bad, root)
    bad.write_text(json.dumps({"annotations": []}))
    with pytest.raises(DatasetLayoutError, match="no 'images' list"):
        load_coco_karpathy(bad, root)
    with pytest.raises(ValueError, match="cannot parse dataset spec"):
        load_dataset_spec("coco:/x")


def test_coco_2017(tmp_path):
    _img(tmp_path / "val2017" / "000000000139.jpg")
    _img(tmp_path / "val2017" / "000000000285.jpg")
    ann = {
        "images": [{"id": 139, "file_name": "000000000139.jpg"}, {"id": 285, "file_name": "000000000285.jpg"}],
        "annotations": [
            {"image_id": 139, "caption": "one"},
            {"image_id": 285, "caption": "two"},
            {"image_id": 139, "caption": "three"},
        ],
    }
    (tmp_path / "captions_val2017.json").write_text(json.dumps(ann))
    ds = load_coco_2017(tmp_path / "captions_val2017.json", tmp_path / "val2017")
    assert [r["captions"] for r in ds] == [["one", "three"], ["two"]]
    with pytest.raises(DatasetLayoutError, match="COCO 2017 image folder not found"):
        load_coco_2017(tmp_path / "captions_val2017.json", tmp_path / "val2014")


def test_flickr30k(tmp_path):
    _img(tmp_path / "images" / "1000092795.jpg")
    doc = {
        "images": [
            {
                "filename": "1000092795.jpg",
                "split": "test",
                "imgid": 0,
                "sentences": [{"raw": "two men"}, {"raw": "people"}],
            },
            {"filename": "x.jpg", "split": "train", "imgid": 1, "sentences": [{"raw": "x"}]},
        ]
    }
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(doc))
    ds = load_flickr30k_karpathy(tmp_path / "dataset_flickr30k.json", tmp_path / "images")
    assert len(ds) == 1 and ds[0]["captions"] == ["two men", "people"] and ds[0]["image_id"] == "0"


def test_image_folder(tmp_path):
    _img(tmp_path / "imgs" / "a.png")
    _img(tmp_path / "imgs" / "b.png", "green")
    lines = [{"file_name": "imgs/a.png", "text": "a red thing"}, {"file_name": "imgs/b.png", "captions": ["g", "h"]}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    ds = load_dataset_spec(f"imagefolder:{tmp_path}")
    assert [r["captions"] for r in ds] == [["a red thing"], ["g", "h"]]
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "imgs/a.png"}))
    with pytest.raises(DatasetLayoutError, match=":1 needs 'file_name' and 'text'"):
        load_image_folder(tmp_path)
    with pytest.raises(DatasetLayoutError, match="metadata.jsonl not found"):
        load_image_folder(tmp_path / "imgs")


def test_loaded_dataset_feeds_the_embedding_cache(tmp_path, tiny_encoder):
    from asymvlm.cache import embed_dataset

    _img(tmp_path / "imgs" / "a.png")
    _img(tmp_path / "imgs" / "b.png", "blue")
    lines = [{"file_name": "imgs/a.png", "text": "a red square"}, {"file_name": "imgs/b.png", "text": "blue"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    cache = embed_dataset(tiny_encoder, load_image_folder(tmp_path), tmp_path / "cache", progress=False)
    assert cache.text_image_index.tolist() == [0, 1] and cache.captions == ["a red square", "blue"]
