"""ShapeWorld v3: exact ambiguity against brute-force enumeration, the consistency matrix against
loops, captions, the generator's uniqueness at the most specific level, v2 still selectable."""

import itertools
import math

import numpy as np
import pytest

from asymvlm.worlds import shapeworld as sw
from asymvlm.worlds.shapeworld import v3 as s3

SMALL = s3.World(
    shapes=("circle", "square"),
    colours=("red", "blue"),
    sizes=("small",),
    rows=2,
    cols=2,
    row_names=("top", "bottom"),
    col_names=("left", "right"),
)


def _holds(world, rel, a, b):  # an independent transcription of the relations
    (ra, ca), (rb, cb) = divmod(a, world.cols), divmod(b, world.cols)
    return {0: ca < cb, 1: ca > cb, 2: ra < rb, 3: ra > rb}[rel]


def _true_of(spec, scene, world):
    """Loop semantics of a caption spec on one scene (a list of (shape, colour, size, cell))."""
    spec = [int(v) for v in spec]

    def matches(obj, attrs):
        return all(s < 0 or s == o for s, o in zip(attrs, obj))

    for k, obj in enumerate(scene):
        if not matches(obj, spec[:4]):
            continue
        if spec[s3.ALONE] >= 0:
            if len(scene) == 1:
                return True
            continue
        if spec[s3.REL] < 0:
            return True
        for j, other in enumerate(scene):
            if j != k and matches(other[:2], (spec[s3.SHAPE2], spec[s3.COLOUR2])):
                if _holds(world, spec[s3.REL], obj[3], other[3]):
                    return True
    return False


def _scenes(world, max_objects):
    """Every scene with its probability under the generator (ordered distinct cells, iid attributes)."""
    attrs = list(itertools.product(range(len(world.shapes)), range(len(world.colours)), range(len(world.sizes))))
    for n in range(1, max_objects + 1):
        cells = list(itertools.permutations(range(world.cells), n))
        for cell_tuple in cells:
            for a in itertools.product(attrs, repeat=n):
                w = 1.0 / max_objects / len(cells) / len(attrs) ** n
                yield [(*a[i], cell_tuple[i]) for i in range(n)], w


def _all_specs(world):
    S, C, Z, G = len(world.shapes), len(world.colours), len(world.sizes), world.cells
    out = []
    for sh, co, si in itertools.product(range(-1, S), range(-1, C), range(-1, Z)):
        for cell in range(-1, G):
            out.append([sh, co, si, cell, -1, -1, -1, -1])
            if cell >= 0:
                out.append([sh, co, si, cell, -1, -1, -1, 1])
                for rel, s2, c2 in itertools.product(range(4), range(-1, S), range(-1, C)):
                    out.append([sh, co, si, cell, rel, s2, c2, -1])
    return np.array(out, dtype=np.int64)


@pytest.mark.parametrize("max_objects", [1, 2, 3])
def test_ambiguity_is_the_exact_probability_by_enumeration(max_objects):
    specs = _all_specs(SMALL)
    scenes = list(_scenes(SMALL, max_objects))
    assert math.isclose(sum(w for _, w in scenes), 1.0, rel_tol=1e-12)
    # the consistency matrix against the loops, on every scene at once
    objects = np.full((len(scenes), max_objects, 4), -1, dtype=np.int64)
    for i, (scene, _) in enumerate(scenes):
        objects[i, : len(scene)] = scene
    weights = np.array([w for _, w in scenes])
    m = s3.consistency_matrix(specs, objects, world=SMALL)
    picks = np.random.default_rng(0).choice(len(specs), 60, replace=False)
    for t in picks:
        loop = [_true_of(specs[t], scene, SMALL) for scene, _ in scenes]
        assert m[t].tolist() == loop, specs[t]
    brute = m.astype(np.float64) @ weights
    exact = np.array([s3.ambiguity(s, max_objects, SMALL) for s in specs])
    np.testing.assert_allclose(exact, brute, rtol=1e-12, atol=1e-15)
    assert exact[0] == pytest.approx(1.0, abs=1e-15)  # "an object"


def test_relation_needs_a_cell_and_widths_are_checked():
    with pytest.raises(ValueError, match="needs the target's cell"):
        s3.ambiguity([0, 0, 0, -1, 0, 1, 1, -1])
    with pytest.raises(ValueError, match="8 entries"):
        s3.ambiguity([0, 0, 0, 0])
    with pytest.raises(ValueError, match="8 entries"):
        s3.describe([0, 0])


def test_generated_captions_are_true_of_their_image_and_levels_narrow():
    w = sw.generate_arrays(400, seed=3, version=3, caption_styles=sw.CAPTION_STYLES, visual_styles=sw.VISUAL_STYLES)
    assert w.images.shape == (400, 48, 48, 3) and w.specs.shape == (400, 6, 8)
    n_obj = (w.objects[:, :, 0] >= 0).sum(1)
    assert set(n_obj.tolist()) == {1, 2, 3}
    cells = w.objects[:, :, 3]
    for row, n in zip(cells, n_obj):
        assert len(set(row[:n].tolist())) == n  # distinct cells
    amb = sw.ambiguities(w.specs)
    assert (np.diff(amb, axis=1) < 0).all()  # every level narrows the one before
    for j in range(6):
        m = sw.consistency_matrix(w.specs[:, j], w.objects)
        assert m[np.arange(400), np.arange(400)].all()
        # the formula agrees with the generator: expected vs counted consistent images (MC, 400 images)
        counted = m.sum(1).mean()
        expected = (1 + 399 * amb[:, j]).mean()
        assert abs(counted - expected) <= 0.06 * expected + 0.05, (j, counted, expected)
    # level 5: "alone" exactly for the single-object scenes, a relation otherwise
    assert ((w.specs[:, 5, s3.ALONE] == 1) == (n_obj == 1)).all()
    assert ((w.specs[:, 5, s3.REL] >= 0) == (n_obj > 1)).all()


def test_most_specific_caption_is_nearly_unique_in_a_1000_gallery():
    w = sw.generate_arrays(1000, seed=12345, version=3)
    m = sw.consistency_matrix(w.specs[:, 5], w.objects)
    assert m.sum(1).mean() <= 1.5  # the target: about one image per most specific caption
    m4 = sw.consistency_matrix(w.specs[:, 4], w.objects)
    assert m4.sum(1).mean() > m.sum(1).mean()


def test_describe_in_every_style():
    spec = [0, 0, 0, 0, 0, 1, 5, -1]
    assert s3.describe(spec) == "a small red circle in the top left, left of a blue square"
    assert s3.describe(spec, "photo") == "a photo of a small red circle in the top left, left of a blue square"
    assert s3.describe(spec, "synonyms") == "a tiny crimson disc at the upper left, to the left of a navy box"
    assert s3.describe(spec, "reordered") == "a circle, red, small, in the top left, left of a blue square"
    assert s3.describe([-1] * 8) == "an object"
    assert s3.describe([4, -1, -1, 4, -1, -1, -1, 1]) == "a diamond in the centre, alone"
    words = set(s3.vocabulary())
    w = sw.generate_arrays(300, seed=1, version=3, caption_styles=sw.CAPTION_STYLES)
    for row in w.captions:
        for c in row:
            assert set(c.replace(",", " , ").split()) <= words, c


def test_rendering_draws_every_object_in_its_cell():
    w = sw.generate_arrays(60, seed=4, version=3)
    world = s3.DEFAULT_WORLD
    bg = 28
    for img, objs in zip(w.images, w.objects):
        for shape, colour, _, cell in objs:
            if shape < 0:
                continue
            r, c = divmod(int(cell), world.cols)
            tile = img[r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16].astype(int)
            target = np.array(s3.COLOURS[world.colours[colour]])
            close = np.abs(tile - target).max(-1) <= 20  # colour jitter is +-18
            assert close.sum() >= 8, (shape, colour, cell)
            assert (np.abs(tile - bg).max(-1) > 40).any()


def test_version_three_is_the_default_and_two_selectable():
    a = sw.generate_arrays(50, seed=0)
    b = sw.generate_arrays(50, seed=0, version=3)
    assert a.config.version == 3 and a.images.shape[1:] == (48, 48, 3) and a.specs.shape[-1] == 8
    assert np.array_equal(a.images, b.images) and a.captions == b.captions
    two = sw.generate_arrays(50, seed=0, version=2)  # the earlier world, for reproducing earlier results
    assert two.images.shape[1:] == (32, 32, 3) and two.specs.shape[-1] == 4
    assert sw.WORLD_VERSION == 3 and sw.WORLD_VERSIONS == (2, 3)
    assert sw.vocabulary() == sw.vocabulary(3) and sw.level_names() == sw.level_names(3)
    with pytest.raises(ValueError, match="version must be one of"):
        sw.ShapeWorldConfig(version=4)
    with pytest.raises(ValueError, match="levels must be"):
        sw.ShapeWorldConfig(version=2, levels=(5,))
    assert sw.ShapeWorldConfig(version=3).levels == s3.LEVELS


def test_dataset_columns_v3():
    ds = sw.generate(6, seed=0, version=3)
    row = ds[0]
    assert len(row["captions"]) == 6 and row["image"].size == (48, 48)
    assert row["caption_ambiguity"][0] == pytest.approx(1.0)
    assert all(isinstance(a, float) for a in row["caption_ambiguity"])
    assert row["caption_alone"][5] == (len(row["objects"]) == 1)
    assert (row["caption_relation"][5] != "") == (len(row["objects"]) > 1)


def test_dataset_names_pick_the_world_and_the_matching_toy_clip():
    from asymvlm.config import DataArguments
    from asymvlm.errors import ConfigError

    assert sw.dataset_version("shapeworld") == 3 and sw.dataset_version("shapeworld:2") == 2
    assert sw.dataset_version("coco2017:a.json:dir") is None
    # the default encoder is the toy CLIP of the dataset's world
    assert DataArguments().encoder == DataArguments(dataset="shapeworld:3").encoder == "open_clip:asymvlm-toy-clip-v3"
    assert DataArguments(dataset="shapeworld:2").encoder == "open_clip:asymvlm-toy-clip"
    with pytest.raises(ConfigError, match="use --encoder open_clip:asymvlm-toy-clip-v3"):
        DataArguments(dataset="shapeworld", encoder="open_clip:asymvlm-toy-clip")
    with pytest.raises(ConfigError, match="use --encoder open_clip:asymvlm-toy-clip$"):
        DataArguments(dataset="shapeworld:2", encoder="open_clip:asymvlm-toy-clip-v3")
    with pytest.raises(ConfigError, match="unknown ShapeWorld version"):
        DataArguments(dataset="shapeworld:7")
    DataArguments(dataset="shapeworld:3", encoder="open_clip:asymvlm-toy-clip-v3")


def test_i2t_per_level_counts_identical_texts_as_the_images_own():
    import torch

    from asymvlm.eval.benchmark import EvalData, evaluate

    img = torch.eye(3)[:2]  # two images
    # captions: level 0 "an object" for both (identical text), level 1 distinct
    captions = ["an object", "a red object", "an object", "a circle"]
    rows = [[1.0, 1.0, 0.0], [1.0, 1.0, 0.2], [1.0, 1.0, 0.0], [0.3, 0.3, 1.0]]
    text = torch.nn.functional.normalize(torch.tensor(rows), dim=-1)
    data = EvalData(
        image_embeddings=img,
        text_embeddings=text,
        text_image_index=torch.tensor([0, 0, 1, 1]),
        levels=torch.tensor([0, 1, 0, 1]),
        captions=captions,
    )
    m = evaluate(data, {})["clip"]
    # level 0: both images' best level-0 caption is "an object", their own text (ties are the same text)
    assert m["i2t_R@1_level0"] == 1.0
    # level 1: image 0 prefers "a red object" (its own); image 1 also prefers "a red object" (not its own)
    s = img @ text.T
    assert s[0, 1] > s[0, 3] and s[1, 1] > s[1, 3]
    assert m["i2t_R@1_level1"] == 0.5
    # the overall i2t keeps the exact convention: identical texts of other images tie -> a miss
    assert m["i2t_R@1"] < 1.0
