"""The toy CLIP recipe: tokenizer, preprocessing parity, determinism, caching, loading path."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from asymvlm.encoders import load_encoder
from asymvlm.worlds import shapeworld as sw
from asymvlm.worlds import toyclip

TINY = toyclip.ToyCLIPRecipe(steps=4, batch_size=16, train_images=300, warmup=2)


@pytest.fixture(scope="module")
def tiny_toy_dir(tmp_path_factory):
    return toyclip.build_toy_clip(tmp_path_factory.mktemp("toy") / "clip", TINY, progress=False)


def test_tokenizer_matches_the_packaged_config():
    tok = toyclip.build_tokenizer()
    cfg = json.loads(
        (
            toyclip._model_config()
            and __import__("asymvlm.encoders").encoders.PACKAGE_MODEL_CONFIGS / "asymvlm-toy-clip.json"
        ).read_text()
    )
    assert len(tok) == cfg["text_cfg"]["vocab_size"]
    ids = tok(["a small red circle in the top left", "a circle, red"])["input_ids"]
    assert all(i[0] == tok.bos_token_id and i[-1] == tok.eos_token_id for i in ids)
    assert tok.eos_token_id == len(tok) - 1  # argmax pooling finds EOS
    assert tok.unk_token_id not in ids[0] + ids[1]
    # every caption any style can produce fits the context
    w = sw.generate_arrays(300, seed=0, caption_styles=sw.CAPTION_STYLES, version=2)
    longest = max(len(tok(c)["input_ids"]) for row in w.captions for c in row)
    assert longest <= cfg["text_cfg"]["context_length"]


def test_training_pixels_equal_the_inference_preprocessing(tiny_toy_dir):
    enc = load_encoder(str(tiny_toy_dir), device="cpu")
    w = sw.generate_arrays(6, seed=1, visual_styles=sw.VISUAL_STYLES, version=2)  # the v2 toy CLIP: 32 px
    ours = toyclip.normalized_pixels(w.images)
    theirs = enc.preprocess([Image.fromarray(im) for im in w.images])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert enc.dim == 256
    assert enc.encode_text(["a red circle"]).shape == (1, 256)


def test_build_is_deterministic(tmp_path, tiny_toy_dir):
    again = toyclip.build_toy_clip(tmp_path / "again", TINY, progress=False)
    a = load_encoder(str(tiny_toy_dir)).model.state_dict()
    b = load_encoder(str(again)).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_encoder(str(tiny_toy_dir)).fingerprint == load_encoder(str(again)).fingerprint
    meta = json.loads((again / "recipe.json").read_text())
    assert meta["fingerprint"] == TINY.fingerprint() and meta["recipe"]["steps"] == 4


def test_cached_under_the_user_cache_and_built_once(tmp_path, monkeypatch):
    monkeypatch.setenv("ASYMVLM_CACHE", str(tmp_path / "cache"))
    path = toyclip.ensure_toy_clip(TINY, progress=False)
    assert path == tmp_path / "cache" / "toy-clip" / TINY.fingerprint()
    monkeypatch.setattr(toyclip, "build_toy_clip", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rebuilt")))
    assert toyclip.ensure_toy_clip(TINY, progress=False) == path
    assert sorted(p.name for p in path.parent.iterdir()) == [TINY.fingerprint()]  # no temp folders left


def test_loaded_through_load_encoder_with_its_tag(tiny_toy_dir, monkeypatch):
    monkeypatch.setattr(toyclip, "ensure_toy_clip", lambda *a, **k: tiny_toy_dir)
    enc = load_encoder(toyclip.TOY_CLIP_SPEC, pretrained=toyclip.TOY_CLIP_TAG, device="cpu")
    assert enc.source == {"spec": "open_clip:asymvlm-toy-clip", "pretrained": "shapeworld"}
    assert enc.fingerprint == load_encoder(str(tiny_toy_dir)).fingerprint  # same weights, same fingerprint
    with pytest.raises(ValueError, match="pretrained='shapeworld'"):
        load_encoder(toyclip.TOY_CLIP_SPEC)


def test_quality_metric_on_a_perfect_oracle():
    # an "encoder" that embeds attributes exactly must score 1.0 consistent top-1 at every level
    class Oracle:
        def encode_image(self, images):
            arr = np.stack([np.asarray(im) for im in images])
            return torch.tensor(self._feat_images(arr))

        def encode_text(self, texts):
            return torch.tensor(np.stack([self._feat_text(t) for t in texts]))

        def _feat_images(self, arr):
            out = np.zeros((len(arr), 16))
            for i, key in enumerate(self.keys):
                for a, v in enumerate(key):
                    out[i, [0, 4, 10, 12][a] + v] = 1
            return out / np.linalg.norm(out, axis=1, keepdims=True)

        def _feat_text(self, text):
            out = np.zeros(16)
            for a, values in enumerate(sw.ATTRIBUTES.values()):
                for v, name in enumerate(values):
                    if name in text:
                        out[[0, 4, 10, 12][a] + v] = 1
            return out / max(np.linalg.norm(out), 1e-9) if out.any() else np.ones(16) / 4

    oracle = Oracle()
    oracle.keys = sw.generate_arrays(200, seed=7, version=2).objects[:, 0]
    scores = toyclip.evaluate_retrieval_by_level(
        oracle, n=200, seed=7, caption_styles=("plain",), visual_styles=("plain",), version=2
    )
    assert scores[3] == 1.0 and scores[4] == 1.0


TINY3 = toyclip.ToyCLIPRecipe(steps=4, batch_size=16, train_images=300, warmup=2, world_version=3)


def test_v3_recipe_is_deterministic_and_loads_at_48_px(tmp_path):
    a_dir = toyclip.build_toy_clip(tmp_path / "a", TINY3, progress=False)
    b_dir = toyclip.build_toy_clip(tmp_path / "b", TINY3, progress=False)
    a, b = load_encoder(str(a_dir), device="cpu"), load_encoder(str(b_dir), device="cpu")
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and a.fingerprint == b.fingerprint
    w = sw.generate_arrays(4, seed=2, version=3, visual_styles=sw.VISUAL_STYLES)
    torch.testing.assert_close(
        toyclip.normalized_pixels(w.images), a.preprocess([Image.fromarray(im) for im in w.images]), rtol=0, atol=1e-6
    )
    tok = toyclip.build_tokenizer(3)
    cfg = toyclip._model_config(3)
    assert len(tok) == cfg["text_cfg"]["vocab_size"]
    w = sw.generate_arrays(300, seed=0, version=3, caption_styles=sw.CAPTION_STYLES)
    ids = [tok(c)["input_ids"] for row in w.captions for c in row]
    assert max(len(i) for i in ids) <= cfg["text_cfg"]["context_length"]
    assert all(tok.unk_token_id not in i for i in ids)
    assert a.encode_text(["a big red ring in the centre, left of a blue square"]).shape == (1, 256)


def test_v2_recipe_fingerprint_is_unchanged_by_the_v3_fields():
    # the version-2 cache key must not move (built toy CLIPs stay valid): the payload as before
    r = toyclip.ToyCLIPRecipe()
    assert r.world_version == 2 and r.steps == 2000 and r.level_weights == (0.05, 0.1, 0.15, 0.25, 0.45)
    assert r.fingerprint() == "a2e42831f888b9f3"
    assert toyclip.ToyCLIPRecipe(world_version=3).steps == 2600
    with pytest.raises(ValueError, match="world_version"):
        toyclip.ToyCLIPRecipe(world_version=4)
    with pytest.raises(ValueError, match="level_weights needs 6"):
        toyclip.ToyCLIPRecipe(world_version=3, level_weights=(1.0,) * 5)


def test_caption_styles_of_the_recipe():
    from asymvlm.worlds import shapeworld as sw

    # v3 is pretrained on plain captions (the other styles are domains it never saw); v2 on every style
    default = toyclip.ToyCLIPRecipe(world_version=3)
    assert default.caption_styles == ("plain",) == toyclip.PRETRAINING_STYLES[3]
    assert toyclip.ToyCLIPRecipe().caption_styles == sw.CAPTION_STYLES == toyclip.PRETRAINING_STYLES[2]
    # naming the default styles explicitly is the default recipe (same cache key); others are other recipes
    assert toyclip.ToyCLIPRecipe(world_version=3, caption_styles=["plain"]).fingerprint() == default.fingerprint()
    every = toyclip.ToyCLIPRecipe(world_version=3, caption_styles=sw.CAPTION_STYLES)
    held_out = toyclip.ToyCLIPRecipe(world_version=3, caption_styles=("plain", "photo", "reordered"))
    assert len({default.fingerprint(), every.fingerprint(), held_out.fingerprint()}) == 3
    # every style keeps the payload (and so the cache key) it had as v3's default before plain-only
    assert every.fingerprint() == "ce0ff3bd6b8104fc"
    with pytest.raises(ValueError, match="caption_styles must be a non-empty subset"):
        toyclip.ToyCLIPRecipe(world_version=3, caption_styles=("plain", "klingon"))
    with pytest.raises(ValueError, match="caption_styles must be a non-empty subset"):
        toyclip.ToyCLIPRecipe(world_version=3, caption_styles=())
