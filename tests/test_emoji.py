"""The emoji benchmark (bench/emoji/data.py) and its LiT-trained CLIP (bench/emoji/clip.py) on the real system assets.

Skipped, with the reason, where the assets are not installed (``bash bench/emoji/setup.sh``).
"""

import json
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from asymvlm.errors import MissingExtraError

# the benchmark's assets and tower live outside the package, in bench/emoji/
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from emoji import data as em  # noqa: E402

_MISSING = em.assets_available()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"emoji assets missing: {_MISSING}")
needs_minilm = pytest.mark.skipif(
    em.assets_available(text_tower=True) is not None,
    reason=f"MiniLM missing: {em.assets_available(text_tower=True)}",
)


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ASYMVLM_CACHE", str(tmp_path_factory.mktemp("asymvlm-cache")))
        em._collection.cache_clear()
        yield
    em._collection.cache_clear()


@pytest.fixture(scope="module")
def collection(_private_cache):
    return em.load_collection()


@pytest.fixture(scope="module")
def splits(collection):
    return {s: em.load_split(s, collection) for s in em.SPLITS}


def test_missing_asset_names_the_package_and_command(monkeypatch, tmp_path):
    monkeypatch.setenv("ASYMVLM_EMOJI_FONT", str(tmp_path / "absent.ttf"))
    with pytest.raises(MissingExtraError, match=r"apt-get install -y fonts-noto-color-emoji"):
        em.font_path()
    monkeypatch.setenv("ASYMVLM_CLDR_COMMON", str(tmp_path))
    with pytest.raises(MissingExtraError, match=r"unicode-cldr-core"):
        em.annotations_path()


def test_parsing_matches_what_the_file_says():
    text = em.emoji_test_path().read_text(encoding="utf-8")
    groups = re.findall(r"^# group: (.+)$", text, re.M)
    subgroups = re.findall(r"^# subgroup: (.+)$", text, re.M)
    status = dict(re.findall(r"^# ([a-z-]+) : (\d+)$", text, re.M))
    rows = em.parse_emoji_test()
    assert len(groups) == 10
    assert [*dict.fromkeys(r.group for r in rows)] == groups
    assert len({(r.group, r.subgroup) for r in rows}) == len(subgroups)
    counts = Counter(r.status for r in rows)
    assert {k: str(v) for k, v in counts.items()} == status
    first = rows[0]
    assert (first.codepoints, first.char, first.name, first.group, first.subgroup) == (
        "1F600",
        "\U0001f600",
        "grinning face",
        "Smileys & Emotion",
        "face-smiling",
    )


def test_character_names_are_real_text_that_is_not_emoji(tmp_path, monkeypatch):
    names = em.character_names(500, seed=0)
    assert len(names) == len(set(names)) == 500 and names == sorted(names)
    assert names == em.character_names(500, seed=0) and names != em.character_names(500, seed=1)
    emoji_names = {em.normalise_phrase(e.name) for e in em.parse_emoji_test()}
    assert not set(names) & emoji_names
    assert all(n == n.lower() and not n.startswith("<") and "cjk" not in n for n in names)
    # an independent reading of a tiny UnicodeData.txt: emoji code points and <...> names are left out
    first_emoji = em.parse_emoji_test()[0].codepoints.split()[0]
    (tmp_path / "UnicodeData.txt").write_text(
        f"0041;LATIN CAPITAL LETTER A;Lu;;;\n0000;<control>;Cc;;;\n{first_emoji};SOME EMOJI;So;;;\n"
        "2500;BOX DRAWINGS LIGHT HORIZONTAL;So;;;\n4E00;CJK UNIFIED IDEOGRAPH-4E00;Lo;;;\n"
    )
    monkeypatch.setenv("ASYMVLM_UNICODE_DATA", str(tmp_path / "UnicodeData.txt"))
    assert em.character_names(2) == ["box drawings light horizontal", "latin capital letter a"]
    with pytest.raises(ValueError, match="asked for 3 character names, UnicodeData.txt has 2"):
        em.character_names(3)
    monkeypatch.setenv("ASYMVLM_UNICODE_DATA", str(tmp_path / "nowhere.txt"))
    with pytest.raises(MissingExtraError, match="apt-get install -y unicode-data"):
        em.character_names(2)


def test_cldr_annotations():
    notes = em.parse_cldr_annotations()
    keywords, tts = notes["\U0001f600"]
    assert "grin" in keywords and tts == "grinning face"
    assert notes["\U0001f1ef\U0001f1f5"][1] == "flag: Japan"  # a sequence, from annotationsDerived


def test_collection_filtering(collection):
    rows = em.parse_emoji_test()
    fq = [r for r in rows if r.status == "fully-qualified"]
    assert not any(e.has_skin_tone for e in collection.emoji)
    assert len(collection.emoji) == len(fq) - collection.dropped["skin-tone modifier"] - collection.dropped.get(
        "not drawn by the font", 0
    ) - collection.dropped.get("fewer than 3 caption levels", 0)
    kept_groups = {e.group for e in collection.emoji}
    assert kept_groups == {r.group for r in fq if not r.has_skin_tone}  # "Component" holds no fully-qualified
    assert len({e.subgroup for e in collection.emoji}) == len({r.subgroup for r in fq if not r.has_skin_tone})
    assert all({0, 1, 3} <= set(c) for c in collection.captions)
    assert collection.images.shape == (len(collection.emoji), 32, 32, 3) and collection.images.dtype == np.uint8


def _brute_descriptors(e):
    norm = lambda s: " ".join(s.lower().replace("&", " and ").replace("-", " ").split())  # noqa: E731
    return {norm(x) for x in (e.group, e.subgroup, e.name, *e.keywords, *([e.tts] if e.tts else []))}


def test_ambiguity_against_brute_force(collection, splits):
    rng = np.random.default_rng(0)
    descs = [_brute_descriptors(e) for e in collection.emoji]
    for split in splits.values():
        positives = split.positives()
        assert positives[np.arange(len(split.captions)), split.image_index].all()  # true of its own image
        np.testing.assert_array_equal(positives.sum(1), split.split_ambiguity)
        split_descs = [_brute_descriptors(e) for e in split.emoji]
        for t in rng.choice(len(split.captions), 40, replace=False):
            text = split.captions[t]
            assert split.ambiguity[t] == sum(text in d for d in descs)
            assert split.split_ambiguity[t] == sum(text in d for d in split_descs)
        assert split.levels.min() == 0 and split.levels.max() == 3
        # on average a group (level 0) is true of more emoji than a subgroup, a subgroup or keyword than a name
        means = [split.ambiguity[split.levels == lv].mean() for lv in range(4)]
        assert means[0] > means[1] > means[3] and means[2] > means[3]
    assert set(splits["test"].captions[:2]) == {"smileys and emotion", "face smiling"}


def test_splits_are_disjoint_by_emoji_and_deterministic(collection, splits):
    sets = {s: {e.codepoints for e in d.emoji} for s, d in splits.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert set().union(*sets.values()) == {e.codepoints for e in collection.emoji}
    frac = {s: len(v) / len(collection.emoji) for s, v in sets.items()}
    assert 0.6 < frac["train"] < 0.8 and 0.05 < frac["val"] < 0.15 and 0.12 < frac["test"] < 0.28
    assert [em.split_of(e.codepoints) for e in collection.emoji] == collection.splits.tolist()
    again = em.load_split("test", collection)
    assert again.captions == splits["test"].captions and again.fingerprint == splits["test"].fingerprint


def test_rendered_emoji_has_colour():
    images, drawn = em.render_emoji(["\U0001f600", "\U0010fffd"], 32)
    assert drawn.tolist() == [True, False]
    rgb = images[0].astype(int)
    saturated = (rgb.max(-1) - rgb.min(-1)) > 60  # the yellow face
    assert saturated.mean() > 0.2
    assert (images[1] == 255).all()  # nothing drawn: white


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory, _private_cache):
    from emoji import clip as emojiclip

    recipe = emojiclip.EmojiCLIPRecipe(steps=3, batch_size=16, warmup=1, max_train_images=48)
    return emojiclip.build_emoji_clip(tmp_path_factory.mktemp("emoji") / "clip", recipe, progress=False)


@needs_minilm
def test_open_clip_text_tower_is_minilm_mean_pooling(tiny_clip_dir):
    from emoji import clip as emojiclip

    from asymvlm.encoders import load_encoder

    texts = ["grinning face", "smileys and emotion", "flag: japan", "family: man, woman, girl, boy", "cat"]
    reference = emojiclip.minilm_sentence_embeddings(texts)
    fresh = emojiclip.create_model().eval()
    with torch.no_grad():
        ours = torch.nn.functional.normalize(fresh.encode_text(emojiclip.text_tokenizer()(texts)), dim=-1)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    # the saved LiT model keeps the locked tower exactly, and loads through the encoder path
    enc = load_encoder(f"open_clip:{tiny_clip_dir}", device="cpu")
    assert enc.dim == 384
    torch.testing.assert_close(enc.encode_text(texts), reference, atol=1e-5, rtol=0)
    recipe = json.loads((tiny_clip_dir / "recipe.json").read_text())
    assert recipe["train_images"] == 48


@needs_minilm
def test_emoji_cache_and_meta(tiny_clip_dir, splits, tmp_path):
    from asymvlm.cache import EmbeddingCache
    from asymvlm.encoders import load_encoder

    enc = load_encoder(f"open_clip:{tiny_clip_dir}", device="cpu")
    val = splits["val"]
    cache = em.write_emoji_cache(enc, val, tmp_path / "val", progress=False)
    assert cache.image_embeddings.shape == (len(val.emoji), 384)
    assert cache.text_embeddings.shape == (len(val.captions), 384)
    np.testing.assert_array_equal(cache.text_image_index.numpy(), val.image_index)
    meta = em.read_emoji_meta(tmp_path / "val")
    assert meta["captions"] == val.captions and meta["levels"] == val.levels.tolist()
    assert meta["ambiguity"] == val.ambiguity.tolist() and meta["split_ambiguity"] == val.split_ambiguity.tolist()
    # reused on a second call (same encoder and split), meta rewritten
    again = em.write_emoji_cache(enc, val, tmp_path / "val", progress=False)
    assert again.manifest == EmbeddingCache.load(tmp_path / "val").manifest


@needs_minilm
def test_tiny_build_is_deterministic(tiny_clip_dir, tmp_path):
    from emoji import clip as emojiclip
    from safetensors.torch import load_file

    recipe = emojiclip.EmojiCLIPRecipe(steps=3, batch_size=16, warmup=1, max_train_images=48)
    again = emojiclip.build_emoji_clip(tmp_path / "clip", recipe, progress=False)
    a = load_file(tiny_clip_dir / "open_clip_model.safetensors")
    b = load_file(again / "open_clip_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    fresh = emojiclip.create_model(recipe.seed).state_dict()
    assert any(not torch.equal(a[k], fresh[k]) for k in a if k.startswith("visual."))  # the image tower trained
    assert all(torch.equal(a[k], fresh[k]) for k in a if k.startswith("text."))  # the text tower is locked
