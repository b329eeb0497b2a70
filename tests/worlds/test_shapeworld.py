"""ShapeWorld: determinism, ground truth, rendering, domains."""

import itertools

import numpy as np
import pytest

from asymvlm.worlds import shapeworld as sw


def test_deterministic_in_seed_and_config():
    a = sw.generate_arrays(
        300, seed=5, caption_styles=sw.CAPTION_STYLES, visual_styles=sw.VISUAL_STYLES, max_objects=3, version=2
    )
    b = sw.generate_arrays(
        300, seed=5, caption_styles=sw.CAPTION_STYLES, visual_styles=sw.VISUAL_STYLES, max_objects=3, version=2
    )
    c = sw.generate_arrays(
        300, seed=6, caption_styles=sw.CAPTION_STYLES, visual_styles=sw.VISUAL_STYLES, max_objects=3, version=2
    )
    assert np.array_equal(a.images, b.images) and np.array_equal(a.objects, b.objects)
    assert a.captions == b.captions and np.array_equal(a.specs, b.specs)
    assert not np.array_equal(a.images, c.images)
    d1, d2 = sw.generate(50, seed=1, version=2), sw.generate(50, seed=1, version=2)
    assert d1._fingerprint == d2._fingerprint and d1[7]["captions"] == d2[7]["captions"]


def test_ambiguity_is_the_number_of_consistent_combinations():
    combos = np.array(list(itertools.product(*[range(len(v)) for v in sw.ATTRIBUTES.values()])))  # (192, 4)
    assert len(combos) == 192
    w = sw.generate_arrays(200, seed=0, version=2)
    for spec in w.specs.reshape(-1, 4)[:300]:
        brute = sum(all(s < 0 or s == c for s, c in zip(spec, combo)) for combo in combos)
        assert sw.ambiguity(spec) == brute
    # levels go from vague to exact
    amb = np.array([[sw.ambiguity(s) for s in row] for row in w.specs])
    assert (amb[:, 0] == 192).all() and (amb[:, 4] == 1).all()
    assert (np.diff(amb, axis=1) < 0).all()
    assert set(amb[:, 1]) == {32, 48}
    assert sw.level_ambiguity(2) == {0: 192.0, 1: 40.0, 2: 8.0, 3: 4.0, 4: 1.0}


def test_consistency_matrix_matches_loops_with_distractors():
    w = sw.generate_arrays(60, seed=2, max_objects=3, version=2)
    specs = w.specs.reshape(-1, 4)
    m = sw.consistency_matrix(specs, w.objects)
    for t, spec in enumerate(specs):
        for i, objs in enumerate(w.objects):
            ok = any(o[0] >= 0 and all(s < 0 or s == v for s, v in zip(spec, o)) for o in objs)
            assert m[t, i] == ok
    # every caption is consistent with its own image
    own = np.repeat(np.arange(60), len(w.config.levels))
    assert m[np.arange(len(specs)), own].all()
    # distractors never share the target's quadrant
    present = w.objects[:, :, 0] >= 0
    for objs, pres in zip(w.objects, present):
        pos = objs[pres, 3]
        assert len(set(pos.tolist())) == len(pos)


def test_captions_describe_their_specs_in_every_style():
    vocab = set(sw.vocabulary(2))
    spec = [2, 3, 1, 2]  # a big yellow triangle in the bottom left
    assert sw.describe(spec) == "a big yellow triangle in the bottom left"
    assert sw.describe(spec, "photo") == "a photo of a big yellow triangle in the bottom left"
    assert sw.describe(spec, "synonyms") == "a large golden wedge at the lower left"
    assert sw.describe(spec, "reordered") == "a triangle, yellow, big, bottom left"
    assert sw.describe([-1, -1, -1, -1]) == "an object" and sw.describe([-1, -1, -1, -1], "synonyms") == "a thing"
    w = sw.generate_arrays(200, seed=3, caption_styles=sw.CAPTION_STYLES, version=2)
    for row, style in zip(w.captions, w.caption_style):
        for text in row:
            assert set(text.replace(",", " , ").split()) <= vocab
        if sw.CAPTION_STYLES[style] == "photo":
            assert all(t.startswith("a photo of") for t in row)


def test_rendering_puts_the_target_where_its_attributes_say():
    w = sw.generate_arrays(400, seed=4, visual_styles=("plain",), colour_jitter=0.0, version=2)
    size = w.config.image_size
    palette = np.array(list(sw.COLOURS.values()))
    areas = {0: [], 1: []}
    for img, obj in zip(w.images, w.objects[:, 0]):
        mask = np.abs(img.astype(int) - palette[obj[1]]).sum(-1) == 0
        assert mask.sum() > 0
        ys, xs = np.nonzero(mask)
        cx, cy = xs.mean() / size, ys.mean() / size
        ex, ey = sw.POSITIONS[list(sw.POSITIONS)[obj[3]]]
        assert abs(cx - ex) < 0.15 and abs(cy - ey) < 0.15
        areas[obj[2]].append(mask.sum())
    assert max(areas[0]) < min(areas[1])  # every small object is smaller than every big one


def test_visual_styles_and_dataset_columns():
    w = sw.generate_arrays(200, seed=0, visual_styles=("light", "noise"), version=2)
    styles = np.array(w.config.visual_styles)[w.visual_style]
    corner = w.images[:, :2, :2].reshape(200, -1).mean(1)
    assert (corner[styles == "light"] > 200).all() and (corner[styles == "noise"] < 100).all()
    ds = sw.generate(12, seed=0, caption_styles=("synonyms",), version=2)
    row = ds[3]
    assert row["image"].size == (32, 32) and len(row["captions"]) == 5
    assert row["caption_levels"] == [0, 1, 2, 3, 4] and row["caption_ambiguity"][4] == 1
    assert row["caption_style"] == "synonyms" and row["objects"][0]["shape"] == row["shape"]
    assert row["caption_shape"][4] == row["shape"] and row["caption_shape"][0] == ""
    spec = sw.spec_from_names(row["caption_shape"][3], row["caption_colour"][3], row["caption_size"][3])
    assert sw.describe(spec, "synonyms") == row["captions"][3]


def test_bad_config():
    with pytest.raises(ValueError, match="caption_styles"):
        sw.ShapeWorldConfig(caption_styles=("emoji",), version=2)
    with pytest.raises(ValueError, match="max_objects"):
        sw.ShapeWorldConfig(max_objects=9, version=2)
    with pytest.raises(ValueError, match="image_size"):
        sw.ShapeWorldConfig(image_size=4, version=2)
    with pytest.raises(ValueError, match="levels"):
        sw.ShapeWorldConfig(levels=(7,), version=2)
