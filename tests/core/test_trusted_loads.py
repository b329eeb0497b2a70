"""Loads do not trust their input: an embedding cache or a saved image index with a NaN, inf,
non-unit or zero row, or a caption pointing outside the images, is an error naming the file and
the row (checked once, vectorised), never a silently wrong retrieval or training run."""

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from asymvlm.cache import EmbeddingCache, write_cache
from asymvlm.errors import ArtefactError
from asymvlm.retrieval import ImageIndex


def unit(n, d=8, seed=0):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.fixture
def cache(tmp_path):
    img = unit(6)
    write_cache(tmp_path / "c", img, img[[0, 1, 2, 3, 4, 5, 0]], torch.tensor([0, 1, 2, 3, 4, 5, 0]))
    return tmp_path / "c"


def corrupt(path, name, key, fn):
    tensors = load_file(path / name)
    tensors[key] = fn(tensors[key].clone())
    save_file(tensors, path / name)


def set_row(row, value):
    def fn(t):
        t[row] = value
        return t

    return fn


@pytest.mark.parametrize(
    "name,key,fn,message",
    [
        ("images.safetensors", "embeddings", set_row(3, float("nan")), "image embeddings: row 3 contains NaN or inf"),
        ("images.safetensors", "embeddings", set_row(2, float("inf")), "image embeddings: row 2 contains NaN or inf"),
        ("images.safetensors", "embeddings", set_row(4, 0.0), "row 4 has norm 0"),
        ("images.safetensors", "embeddings", lambda t: t * 2, "row 0 has norm 2"),
        ("texts.safetensors", "embeddings", set_row(5, float("nan")), "text embeddings: row 5 contains NaN"),
        ("texts.safetensors", "image_index", set_row(6, -1), "caption row 6 points at image -1, outside [0, 6)"),
        ("texts.safetensors", "image_index", set_row(1, 6), "caption row 1 points at image 6"),
    ],
)
def test_a_corrupt_cache_is_a_clear_error_naming_the_file_and_row(cache, name, key, fn, message):
    EmbeddingCache.load(cache)  # fine before
    corrupt(cache, name, key, fn)
    with pytest.raises(ArtefactError, match=re.escape(message)) as err:
        EmbeddingCache.load(cache)
    assert name in str(err.value)  # the message names the file
    assert EmbeddingCache.load(cache, validate=False).text_image_index.shape == (7,)  # an explicit opt-out


def test_a_saved_index_with_a_nan_row_cannot_become_every_querys_top_1(tmp_path):
    g = unit(50)
    ImageIndex(g).save(tmp_path / "idx")
    assert len(ImageIndex.load(tmp_path / "idx")) == 50
    corrupt(tmp_path / "idx", "index.safetensors", "embeddings", set_row(7, float("nan")))
    with pytest.raises(ArtefactError, match="index.safetensors: image embeddings: row 7 contains NaN"):
        ImageIndex.load(tmp_path / "idx")


def test_from_cache_validates_a_cache_that_was_not(cache):
    corrupt(cache, "images.safetensors", "embeddings", set_row(1, 0.0))
    raw = EmbeddingCache.load(cache, validate=False)
    with pytest.raises(ValueError, match="row 1 has norm 0"):
        ImageIndex.from_cache(raw)


def test_training_data_refuse_a_caption_pointing_outside_the_images(cache, tmp_path):
    from asymvlm.training.config import TrainConfig
    from asymvlm.training.loop import train

    corrupt(cache, "texts.safetensors", "image_index", set_row(0, -1))
    cfg = TrainConfig.from_dict(
        dict(cache_dir=str(cache), hidden_dims=[8], max_steps=1, batch_size=4, output_dir=str(tmp_path / "o"),
             log_with="none", progress=False, eval_every=-1)
    )  # fmt: skip
    with pytest.raises(FileNotFoundError, match="caption row 0 points at image -1"):
        train(cfg)


# ----------------------------------------------------------------------------------------------
# nothing lost: replacing an output folder keeps what asymvlm did not write, with no missing window
# ----------------------------------------------------------------------------------------------
def test_replacing_a_folder_keeps_the_users_files_and_drops_only_ours(tmp_path):
    from asymvlm.io import atomic_directory

    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "model.safetensors").write_text("v1")
        (tmp / "stale.json").write_text("v1 only")
    (out / "notes.txt").write_text("the user's")
    (out / "results").mkdir()
    (out / "results" / "r.csv").write_text("1,2")
    with atomic_directory(out) as tmp:
        (tmp / "model.safetensors").write_text("v2")
    assert (out / "model.safetensors").read_text() == "v2"
    assert not (out / "stale.json").exists()  # ours, from the previous version: dropped
    assert (out / "notes.txt").read_text() == "the user's" and (out / "results" / "r.csv").read_text() == "1,2"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp or old folders left


def test_a_foreign_non_empty_folder_is_never_replaced(tmp_path):
    from asymvlm.io import atomic_directory

    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(ArtefactError, match="not written by asymvlm"):
        with atomic_directory(out) as tmp:
            (tmp / "x").write_text("1")
    assert (out / "thesis.tex").read_text() == "years of work" and sorted(p.name for p in out.iterdir()) == [
        "thesis.tex"
    ]


def test_the_folder_is_never_missing_while_it_is_replaced(tmp_path, monkeypatch):
    import os

    import asymvlm.io as io

    out = tmp_path / "out"
    with io.atomic_directory(out) as tmp:
        (tmp / "a").write_text("1")
    seen = []
    real_replace = os.replace

    def watch(src, dst):  # a rename-based replace would leave `out` missing between two calls
        seen.append(out.exists())
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", watch)
    with io.atomic_directory(out) as tmp:
        (tmp / "a").write_text("2")
    assert all(seen) and out.exists() and (out / "a").read_text() == "2"


def test_merge_refuses_an_expert_fine_tuned_from_another_base_and_warns_when_unknown(tmp_path):
    from asymvlm.errors import MergeInputError
    from asymvlm.heads import TextHead
    from asymvlm.io import tensor_fingerprint
    from asymvlm.merging.api import merge
    from asymvlm.model import AsymVLM

    def head(seed):
        torch.manual_seed(seed)
        return TextHead(dim=8, hidden_dims=(16,), residual=True)

    base, other = head(0), head(1)
    AsymVLM(base).save_pretrained(tmp_path / "base")
    fp = {"init_from": str(tmp_path / "base"), "init_from_fingerprint": tensor_fingerprint(base.state_dict())}
    wrong = {"init_from": "elsewhere", "init_from_fingerprint": tensor_fingerprint(other.state_dict())}
    for name, lineage, seed in (("good", fp, 2), ("bad", wrong, 3), ("unknown", None, 4)):
        h = head(0)
        with torch.no_grad():
            for p in h.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
        AsymVLM(h, lineage=lineage).save_pretrained(tmp_path / name)
    rep = merge(tmp_path / "base", [tmp_path / "good"], tmp_path / "m1", "task_arithmetic")
    assert "warnings" not in rep
    with pytest.raises(MergeInputError, match="was fine-tuned from 'elsewhere'"):
        merge(tmp_path / "base", [tmp_path / "good", tmp_path / "bad"], tmp_path / "m2", "task_arithmetic")
    assert not (tmp_path / "m2").exists()
    rep = merge(tmp_path / "base", [tmp_path / "good", tmp_path / "unknown"], tmp_path / "m3", "task_arithmetic")
    assert any("does not record what it was fine-tuned from" in w for w in rep["warnings"])


def test_training_from_a_model_records_its_lineage(tmp_path, cache):
    from asymvlm.io import tensor_fingerprint
    from asymvlm.model import AsymVLM
    from asymvlm.training.config import TrainConfig
    from asymvlm.training.loop import train

    common = dict(cache_dir=str(cache), hidden_dims=[8], max_steps=1, batch_size=4, log_with="none",
                  progress=False, eval_every=-1)  # fmt: skip
    base = train(TrainConfig.from_dict(dict(output_dir=str(tmp_path / "b"), **common)))
    tuned = train(TrainConfig.from_dict(dict(output_dir=str(tmp_path / "t"), init_from=str(base), **common)))
    lineage = AsymVLM.from_pretrained(tuned, load_encoder=False).lineage
    assert lineage["init_from_fingerprint"] == tensor_fingerprint(
        AsymVLM.from_pretrained(base, load_encoder=False).head.state_dict()
    )
    assert AsymVLM.from_pretrained(base, load_encoder=False).lineage == {"init_from": None, "init": "scratch"}
