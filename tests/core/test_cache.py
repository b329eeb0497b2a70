"""asymvlm.cache: embed once, reuse only on matching fingerprints, atomic, memory-mapped."""

import json

import pytest
import torch

from asymvlm.cache import CacheMismatchError, EmbeddingCache, embed_dataset
from asymvlm.io import ArtefactError, SafetensorsStreamWriter, load_safetensors

CAPTIONS = [
    ["a red circle", "a circle"],
    "a blue square",
    ["a big green triangle", "a triangle", "an object"],
    "a small object",
    ["the photo"],
]
FLAT = [
    "a red circle",
    "a circle",
    "a blue square",
    "a big green triangle",
    "a triangle",
    "an object",
    "a small object",
    "the photo",
]
INDEX = [0, 0, 1, 2, 2, 2, 3, 4]


@pytest.fixture
def rows(make_images):
    return [{"image": im, "captions": c} for im, c in zip(make_images(5, seed=1), CAPTIONS)]


def test_build_matches_encoder_and_maps_captions(tmp_path, tiny_encoder, rows):
    cache = embed_dataset(tiny_encoder, rows, tmp_path / "c", dtype="float32", batch_size=2, progress=False)
    assert cache.image_embeddings.shape == (5, 32) and cache.text_embeddings.shape == (8, 32)
    assert cache.text_image_index.tolist() == INDEX and cache.captions == FLAT
    torch.testing.assert_close(cache.image_embeddings, tiny_encoder.encode_image([r["image"] for r in rows]))
    torch.testing.assert_close(cache.text_embeddings, tiny_encoder.encode_text(FLAT))
    m = cache.manifest
    assert m["type"] == "asymvlm.embedding_cache" and m["encoder"]["fingerprint"] == tiny_encoder.fingerprint
    assert (m["num_images"], m["num_texts"], m["dtype"], cache.dim) == (5, 8, "float32", 32)
    # nothing but the cache itself next to it (no temp dirs left)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_float16_and_hf_datasets_input(tmp_path, tiny_encoder, rows):
    import datasets

    ds = datasets.Dataset.from_list(
        [{**r, "captions": [r["captions"]] if isinstance(r["captions"], str) else r["captions"]} for r in rows]
    )
    cache = embed_dataset(tiny_encoder, ds, tmp_path / "c", progress=False)
    assert cache.image_embeddings.dtype == torch.float16 and cache.manifest["dtype"] == "float16"
    assert cache.dataset_fingerprint == f"datasets:{ds._fingerprint}"
    ref = tiny_encoder.encode_image([r["image"] for r in rows])
    torch.testing.assert_close(cache.image_embeddings.float(), ref, rtol=0, atol=1e-3)  # float16 rounding
    assert cache.text_image_index.tolist() == INDEX


def test_reused_when_fingerprints_match_and_never_otherwise(
    tmp_path, tiny_encoder, rows, monkeypatch, make_tiny_open_clip
):
    from asymvlm.encoders import load_encoder

    path = tmp_path / "c"
    first = embed_dataset(tiny_encoder, rows, path, progress=False)
    calls = []
    monkeypatch.setattr(type(tiny_encoder), "encode_image", lambda *a, **k: calls.append(1))
    again = embed_dataset(tiny_encoder, rows, path, progress=False)
    assert calls == [] and torch.equal(again.image_embeddings, first.image_embeddings)
    monkeypatch.undo()
    # another encoder: a clear error, never a silent reuse
    other_dir, _ = make_tiny_open_clip(tmp_path / "other-enc", seed=9)
    other = load_encoder(str(other_dir))
    with pytest.raises(CacheMismatchError, match="built by another encoder"):
        embed_dataset(other, rows, path, progress=False)
    with pytest.raises(CacheMismatchError, match="built by another encoder"):
        EmbeddingCache.load(path, encoder_fingerprint=other.fingerprint)
    # another dataset
    changed = [dict(r) for r in rows]
    changed[1]["captions"] = "a green square"
    with pytest.raises(CacheMismatchError, match="another dataset"):
        embed_dataset(tiny_encoder, changed, path, progress=False)
    # overwrite rebuilds
    rebuilt = embed_dataset(other, rows, path, progress=False, overwrite=True)
    assert rebuilt.encoder_fingerprint == other.fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "other-enc"]


def test_interrupted_build_leaves_nothing(tmp_path, tiny_encoder, rows, monkeypatch):
    real = type(tiny_encoder).encode_image
    count = {"n": 0}

    def flaky(self, *args, **kwargs):
        count["n"] += 1
        if count["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny_encoder), "encode_image", flaky)
    with pytest.raises(KeyboardInterrupt):
        embed_dataset(tiny_encoder, rows, tmp_path / "c", batch_size=2, progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ArtefactError, match="no embedding cache"):
        EmbeddingCache.load(tmp_path / "c")


def test_corrupt_and_truncated_files_are_detected(tmp_path, tiny_encoder, rows):
    path = tmp_path / "c"
    embed_dataset(tiny_encoder, rows, path, progress=False)
    data = (path / "images.safetensors").read_bytes()
    (path / "images.safetensors").write_bytes(data[: len(data) - 10])
    with pytest.raises(ArtefactError, match="truncated"):
        EmbeddingCache.load(path)
    (path / "images.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ArtefactError, match="corrupt"):
        EmbeddingCache.load(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtefactError, match="corrupt JSON"):
        EmbeddingCache.load(path)
    (path / "manifest.json").write_text(json.dumps({"type": "something.else", "format_version": 1}))
    with pytest.raises(ArtefactError, match="expected 'asymvlm.embedding_cache'"):
        EmbeddingCache.load(path)


def test_bad_dataset_input(tmp_path, tiny_encoder, rows):
    with pytest.raises(ValueError, match="empty"):
        embed_dataset(tiny_encoder, [], tmp_path / "c", progress=False)
    with pytest.raises(TypeError, match="row 1: captions must be"):
        embed_dataset(
            tiny_encoder, [rows[0], {"image": rows[1]["image"], "captions": 3}], tmp_path / "c", progress=False
        )
    with pytest.raises(ValueError, match="dtype"):
        embed_dataset(tiny_encoder, rows, tmp_path / "c", dtype="int8", progress=False)
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "notes.txt").write_text("mine")
    with pytest.raises(CacheMismatchError, match="not an embedding cache"):
        embed_dataset(tiny_encoder, rows, tmp_path / "occupied", progress=False)
    assert (tmp_path / "occupied" / "notes.txt").read_text() == "mine"


def test_stream_writer_matches_safetensors_reader(tmp_path):
    from safetensors.torch import load_file

    a = torch.randn(10, 4)
    b = torch.arange(7)
    with SafetensorsStreamWriter(
        tmp_path / "x.safetensors",
        {"b": (torch.int64, (7,)), "a": (torch.float16, (10, 4)), "e": (torch.float32, (0, 4))},
    ) as w:
        w.write("b", b)
        w.write("a", a[:3])
        w.write("a", a[3:])
    ref = load_file(tmp_path / "x.safetensors")  # the official reader agrees
    assert torch.equal(ref["b"], b) and torch.equal(ref["a"], a.half()) and ref["e"].shape == (0, 4)
    mine = load_safetensors(tmp_path / "x.safetensors")
    assert torch.equal(mine["a"], a.half()) and torch.equal(mine["b"], b)
    with pytest.raises(ValueError, match="incomplete"):
        with SafetensorsStreamWriter(tmp_path / "y.safetensors", {"a": (torch.float32, (2, 2))}) as w:
            w.write("a", torch.zeros(1, 2))
    with pytest.raises(ValueError, match="more rows"):
        with SafetensorsStreamWriter(tmp_path / "z.safetensors", {"a": (torch.float32, (1, 2))}) as w:
            w.write("a", torch.zeros(2, 2))


@pytest.mark.slow
def test_memory_mapped_load_does_not_copy(tmp_path):
    psutil = pytest.importorskip("psutil")
    n, d = 262_144, 512  # 256 MiB of float16
    path = tmp_path / "big.safetensors"
    with SafetensorsStreamWriter(path, {"embeddings": (torch.float16, (n, d))}) as w:
        for _ in range(0, n, 65536):
            w.write("embeddings", torch.ones(65536, d, dtype=torch.float16))
    size = n * d * 2
    proc = psutil.Process()
    before = proc.memory_info()
    t = load_safetensors(path)["embeddings"]
    after = proc.memory_info()
    assert after.rss - before.rss < size // 8, "loading must not read the file into private memory"
    assert float(t[::4096].float().sum()) == (n // 4096) * d
    # touching every row maps the file's pages once; never a second copy of the data
    assert float(t.sum(dtype=torch.float32)) == n * d
    assert proc.memory_info().rss - before.rss < 1.25 * size


def test_write_cache_from_precomputed_embeddings(tmp_path):
    from asymvlm.cache import write_cache

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(4, 6, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(7, 6, generator=g), dim=-1)
    cache = write_cache(
        tmp_path / "c",
        img,
        txt,
        [0, 0, 1, 2, 3, 3, 3],
        captions=list("abcdefg"),
        encoder={"spec": "elsewhere", "fingerprint": "abc"},
    )
    assert torch.equal(cache.image_embeddings, img) and cache.encoder_fingerprint == "abc"
    assert cache.text_image_index.tolist() == [0, 0, 1, 2, 3, 3, 3] and cache.captions == list("abcdefg")
    with pytest.raises(ValueError, match="rows in"):
        write_cache(tmp_path / "d", img, txt, [0, 0, 1, 2, 3, 3, 4])
    with pytest.raises(ValueError, match="row 1 has norm"):
        write_cache(tmp_path / "d", torch.cat([img[:1], 2 * img[1:2]]), txt, [0] * 7)
    assert not (tmp_path / "d").exists()
